//! The virtio-mmio transport (version 2, "modern"): registers, feature
//! negotiation, queue set-up, interrupts, and the failed state a device
//! enters when the driver breaks the rules.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{BackendContext, DeviceError, VirtioDevice, Work, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR: u32 = 0x554d_4551; // the value QEMU uses; drivers ignore it

/// Device status bits.
pub mod status {
    /// Guest saw the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// Guest has a driver.
    pub const DRIVER: u32 = 2;
    /// Driver ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// Interrupt status: used buffer.
pub const INT_VRING: u32 = 1;
/// Interrupt status: configuration change (also signals NEEDS_RESET).
pub const INT_CONFIG: u32 = 2;

/// Per-device transport counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TransportCounters {
    /// Queue notifications handled.
    pub notifications: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Driver errors that failed the device.
    pub driver_errors: u64,
    /// Register accesses the transport ignored (bad offset or width).
    pub bad_accesses: u64,
    /// Resets by the driver.
    pub resets: u64,
    /// The last driver error, for operators.
    pub last_error: Option<String>,
}

/// Saved transport state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MmioSnapshot {
    /// Device status register.
    pub status: u32,
    /// Feature selectors.
    pub features_sel: u32,
    /// Driver feature selector.
    pub acked_sel: u32,
    /// Accepted features.
    pub acked: u64,
    /// Selected queue.
    pub queue_sel: u32,
    /// Interrupt status.
    pub interrupt_status: u32,
    /// Config generation.
    pub config_generation: u32,
    /// Whether the device was activated.
    pub activated: bool,
    /// Queues: max_size, next_avail, next_used, size, ready, desc, avail, used.
    pub queues: Vec<(u16, u16, u16, u16, bool, u64, u64, u64)>,
    /// Device-specific state.
    pub device: serde_json::Value,
}

/// One virtio-mmio device window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq: EventFd,
    status: u32,
    features_sel: u32,
    acked_sel: u32,
    acked: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
    /// Counters.
    pub counters: TransportCounters,
    /// Name for logs and the API.
    pub id: String,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is its irqfd.
    pub fn new(id: String, device: Box<dyn VirtioDevice>, mem: Arc<GuestMemoryMmap>, irq: EventFd) -> std::io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|s| Queue::new(*s).expect("Device queue sizes are powers of two"))
            .collect::<Vec<_>>();
        let queue_evts = queues.iter().map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_evts,
            irq,
            status: 0,
            features_sel: 0,
            acked_sel: 0,
            acked: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
            counters: TransportCounters::default(),
            id,
        })
    }

    /// The eventfds KVM signals on QueueNotify writes, one per queue.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Lets the device clean up on the host before the VM goes away.
    pub fn shutdown(&mut self) {
        self.device.shutdown();
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Host fds the device wants watched.
    pub fn event_fds(&self) -> Vec<(std::os::unix::io::RawFd, u32)> {
        self.device.event_fds()
    }

    fn failed(&self) -> bool {
        self.status & status::DEVICE_NEEDS_RESET != 0
    }

    fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        self.counters.interrupts += 1;
        // An irqfd write only fails if the counter would overflow.
        let _ = self.irq.write(1);
    }

    fn fail(&mut self, e: DeviceError) {
        eprintln!("vmm: virtio device {}: {e}; device needs reset", self.id);
        self.counters.driver_errors += 1;
        self.counters.last_error = Some(e.to_string());
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(INT_CONFIG);
    }

    fn finish(&mut self, r: Result<Work, DeviceError>) {
        match r {
            Ok(w) if w.used => self.raise(INT_VRING),
            Ok(_) => {}
            Err(e) => self.fail(e),
        }
    }

    /// Handles a notification of queue `q` (from the event loop).
    pub fn notify_queue(&mut self, q: usize) {
        self.counters.notifications += 1;
        if !self.activated || self.failed() || q >= self.queues.len() {
            return;
        }
        let mem = self.mem.clone();
        let r = self.device.process_queue(q, &mut self.queues, &mem);
        self.finish(r);
    }

    /// Handles readiness of a device's host fd.
    pub fn device_event(&mut self, token: u32) {
        if !self.activated || self.failed() {
            return;
        }
        let mem = self.mem.clone();
        let r = self.device.process_event(token, &mut self.queues, &mem);
        self.finish(r);
    }

    /// Milliseconds until the device wants a timer callback.
    pub fn next_timer_ms(&self) -> Option<u64> {
        if !self.activated || self.failed() {
            return None;
        }
        self.device.next_timer_ms()
    }

    /// Runs the device's timer work.
    pub fn timer(&mut self) {
        if !self.activated || self.failed() {
            return;
        }
        let mem = self.mem.clone();
        let r = self.device.process_timer(&mut self.queues, &mem);
        self.finish(r);
    }

    fn reset(&mut self) {
        self.counters.resets += 1;
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.features_sel = 0;
        self.acked_sel = 0;
        self.acked = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.activated = false;
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(self.mem.as_ref()) {
                return Err(DeviceError::BadQueue(format!(
                    "queue {i} rings are misaligned or outside guest memory (desc {:#x}, avail {:#x}, used {:#x})",
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                )));
            }
        }
        if self.device.external_backend() {
            let ctx = BackendContext { acked: self.acked, queues: &self.queues, kicks: &self.queue_evts, call: &self.irq, mem: self.mem.as_ref() };
            self.device.activate_backend(&ctx)?;
        }
        self.device.activate(self.acked)?;
        self.activated = true;
        Ok(())
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let keep = old & status::DEVICE_NEEDS_RESET;
        let v = v & !status::DEVICE_NEEDS_RESET;
        // Bits may only be added until the next reset.
        if (old & !status::DEVICE_NEEDS_RESET) & !v != 0 {
            self.counters.bad_accesses += 1;
            return;
        }
        let mut v = v | keep;
        if v & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let ok = self.acked & !self.device.features() == 0 && self.acked & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                v &= !status::FEATURES_OK;
            }
        }
        self.status = v;
        if v & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 && v & status::FEATURES_OK != 0 {
            if let Err(e) = self.activate() {
                self.fail(e);
            }
        }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => match self.features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.ready())),
            // An external backend signals the irqfd without telling the
            // transport, so a used buffer is always a possible cause.
            0x060 if self.activated && self.device.external_backend() => self.interrupt_status | INT_VRING,
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => {
                self.counters.bad_accesses += 1;
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue layout may only change before DRIVER_OK.
        let can_setup = self.status & status::DRIVER_OK == 0;
        match offset {
            0x014 => self.features_sel = v,
            0x020 => {
                if self.status & status::FEATURES_OK == 0 {
                    match self.acked_sel {
                        0 => self.acked = (self.acked & !0xffff_ffff) | u64::from(v),
                        1 => self.acked = (self.acked & 0xffff_ffff) | (u64::from(v) << 32),
                        _ => self.counters.bad_accesses += 1,
                    }
                }
            }
            0x024 => self.acked_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if can_setup => match self.queue() {
                Some(q) if v <= u32::from(q.max_size()) && v.is_power_of_two() => q.set_size(v as u16),
                _ => self.counters.bad_accesses += 1,
            },
            0x044 if can_setup => match self.queue() {
                Some(q) => q.set_ready(v == 1),
                None => self.counters.bad_accesses += 1,
            },
            0x050 => match self.queue_evts.get(v as usize) {
                // Without an ioeventfd KVM exits here; hand the work to the event loop.
                Some(e) => {
                    let _ = e.write(1);
                }
                None => self.counters.bad_accesses += 1,
            },
            0x064 => self.interrupt_status &= !v,
            0x070 => self.write_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if can_setup => {
                let Some(q) = self.queue() else {
                    self.counters.bad_accesses += 1;
                    return;
                };
                let (lo, hi) = if offset & 4 == 0 { (Some(v), None) } else { (None, Some(v)) };
                match offset & !4 {
                    0x080 => q.set_desc_table_address(lo, hi),
                    0x090 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => self.counters.bad_accesses += 1,
        }
    }

    /// State for a snapshot.
    pub fn snapshot(&self) -> MmioSnapshot {
        MmioSnapshot {
            status: self.status,
            features_sel: self.features_sel,
            acked_sel: self.acked_sel,
            acked: self.acked,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            activated: self.activated,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    (s.max_size, s.next_avail, s.next_used, s.size, s.ready, s.desc_table, s.avail_ring, s.used_ring)
                })
                .collect(),
            device: self.device.save(),
        }
    }

    /// Restores a snapshot (before the vCPUs run).
    pub fn restore(&mut self, s: &MmioSnapshot) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!("Device {} has {} queues, the snapshot {}", self.id, self.queues.len(), s.queues.len()));
        }
        for (q, t) in self.queues.iter_mut().zip(&s.queues) {
            let st = QueueState {
                max_size: t.0,
                next_avail: t.1,
                next_used: t.2,
                event_idx_enabled: false,
                size: t.3,
                ready: t.4,
                desc_table: t.5,
                avail_ring: t.6,
                used_ring: t.7,
            };
            *q = Queue::try_from(st).map_err(|e| format!("Invalid queue state in snapshot: {e}"))?;
        }
        self.status = s.status;
        self.features_sel = s.features_sel;
        self.acked_sel = s.acked_sel;
        self.acked = s.acked;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        self.device.restore(&s.device)?;
        if s.activated {
            self.activate().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Counters of transport and device, for the API.
    pub fn counters_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "type": match self.device.device_type() { 1 => "net", 2 => "block", 4 => "rng", 19 => "vsock", _ => "other" },
            "status": self.status,
            "failed": self.failed(),
            "transport": self.counters,
            "device": self.device.counters(),
        })
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.counters.bad_accesses += 1;
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.counters.bad_accesses += 1;
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}
