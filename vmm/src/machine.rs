//! A running VM: the device event loop (one thread, like Firecracker's),
//! the vCPU threads, and the operations the control API offers.

use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory::{self, GuestMemoryMmap};
use crate::vstate::vcpu::{ExitReason, Vcpu, VcpuHandle, VcpuRunner};
use crate::vstate::vm::Vm;

/// A virtio device and where the guest finds it.
pub struct VirtioSlot {
    /// Device id from the config.
    pub id: String,
    /// MMIO base address.
    pub addr: u64,
    /// Legacy IRQ line.
    pub irq: u32,
    /// The transport (and device inside it).
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Run state as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs are stopped; devices keep their state.
    Paused,
}

/// Errors of VM operations requested through the API.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The VM is not in a state that allows this.
    #[error("{0}")]
    State(String),
    /// A request argument is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// The operation failed on the host side.
    #[error("{0}")]
    Internal(String),
}

/// What ended the event loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest stopped (reset, triple fault, or a KVM error).
    Guest(ExitReason),
    /// Power off was requested through the API.
    PowerOff,
}

const TOKEN_EXIT: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_API: u64 = 3;
const TOKEN_QUEUE_BASE: u64 = 1 << 32;
const TOKEN_DEVFD_BASE: u64 = 2 << 32;

/// The VM.
pub struct Vmm {
    /// Its configuration.
    pub config: VmConfig,
    /// The KVM handle (kept open for the VM's lifetime).
    pub kvm: KvmContext,
    /// The KVM VM.
    pub vm: Vm,
    /// Guest memory.
    pub mem: Arc<GuestMemoryMmap>,
    /// vCPU threads.
    pub vcpus: Vec<VcpuHandle>,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Keyboard controller.
    pub i8042: Arc<Mutex<I8042>>,
    /// virtio devices.
    pub virtio: Vec<VirtioSlot>,
    exit_evt: EventFd,
    reset_evt: EventFd,
    exit_reason: Arc<Mutex<Option<ExitReason>>>,
    state: RunState,
    started: Instant,
    epoll: Epoll,
    stop: Option<StopReason>,
    /// Handler for readiness of the API listener, set by the API server.
    api: Option<Box<dyn FnMut(&mut Vmm) + Send>>,
    api_fd: Option<RawFd>,
    ioevents: Vec<DeferredIoevent>,
}

/// A queue notification eventfd to register as a KVM ioeventfd: (eventfd,
/// MMIO address, queue index as datamatch, device id).
pub type DeferredIoevent = (EventFd, u64, u32, String);

impl Drop for Vmm {
    fn drop(&mut self) {
        // Also on a panic of the VMM thread: no vCPU (vCPU 0 runs on the
        // main thread) may outlive the event loop.
        self.shutdown_vcpus();
    }
}

impl Vmm {
    /// Starts the vCPU threads and sets up the event loop (called by the
    /// builder). vCPU 0 is returned to be run by the calling thread, which
    /// must hand the `Vmm` to another thread for [`Vmm::run`].
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: VmConfig,
        kvm: KvmContext,
        vm: Vm,
        mem: Arc<GuestMemoryMmap>,
        vcpus: Vec<Vcpu>,
        pio: Bus,
        mmio: Bus,
        serial: Arc<Mutex<SerialDevice>>,
        i8042: Arc<Mutex<I8042>>,
        virtio: Vec<VirtioSlot>,
        exit_evt: EventFd,
        reset_evt: EventFd,
        paused: bool,
        ioevents: Vec<DeferredIoevent>,
    ) -> std::io::Result<(Self, VcpuRunner)> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64, edge: bool| {
            let mut set = EventSet::IN;
            if edge {
                set |= EventSet::EDGE_TRIGGERED;
            }
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
        };
        add(exit_evt.as_raw_fd(), TOKEN_EXIT, false)?;
        add(reset_evt.as_raw_fd(), TOKEN_RESET, false)?;
        for (d, slot) in virtio.iter().enumerate() {
            let t = slot.transport.lock().unwrap();
            // An external backend reads its notifications itself.
            let kicks: &[EventFd] = if t.device().external_backend() { &[] } else { t.queue_evts() };
            for (q, e) in kicks.iter().enumerate() {
                add(e.as_raw_fd(), TOKEN_QUEUE_BASE + ((d as u64) << 16) + q as u64, false)?;
            }
            for (fd, tok) in t.event_fds() {
                add(fd, TOKEN_DEVFD_BASE + ((d as u64) << 16) + u64::from(tok), true)?;
            }
        }
        let exit_reason = Arc::new(Mutex::new(None));
        let seccomp = config.machine.seccomp;
        let mut handles = Vec::new();
        let mut first = None;
        for v in vcpus {
            let pin = config.machine.vcpu_pin.get(v.id as usize).copied();
            let filter = if seccomp { Some(crate::seccomp::vcpu_filter().map_err(std::io::Error::other)?) } else { None };
            let (evt, why) = (exit_evt.try_clone()?, exit_reason.clone());
            let h = if v.id == 0 {
                let (h, r) = v
                    .run_on_current_thread(pio.clone(), mmio.clone(), evt, why, paused, pin, filter)
                    .map_err(std::io::Error::other)?;
                first = Some(r);
                h
            } else {
                v.start(pio.clone(), mmio.clone(), evt, why, paused, pin, filter).map_err(std::io::Error::other)?
            };
            handles.push(h);
        }
        let first = first.ok_or_else(|| std::io::Error::other("A VM needs a vCPU 0"))?;
        let vmm = Vmm {
            config,
            kvm,
            vm,
            mem,
            vcpus: handles,
            serial,
            i8042,
            virtio,
            exit_evt,
            reset_evt,
            exit_reason,
            state: if paused { RunState::Paused } else { RunState::Running },
            started: Instant::now(),
            epoll,
            stop: None,
            api: None,
            api_fd: None,
            ioevents,
        };
        Ok((vmm, first))
    }

    /// Registers the queue ioeventfds the builder left for later (each
    /// costs KVM an SRCU grace period; until then notifications come as
    /// MMIO exits, which the transport turns into the same eventfd writes).
    pub fn register_deferred_ioevents(&mut self) {
        for (evt, addr, q, id) in std::mem::take(&mut self.ioevents) {
            if let Err(e) = self.vm.fd.register_ioevent(&evt, &kvm_ioctls::IoEventAddress::Mmio(addr), q) {
                eprintln!("vmm: ioeventfd for {id} queue {q}: {e}; notifications go through MMIO exits");
            }
        }
        crate::timing::mark(&crate::timing::IOEVENTFDS_READY);
    }

    /// Registers the API listener fd and the handler to call when it is readable.
    pub fn set_api(&mut self, fd: RawFd, handler: Box<dyn FnMut(&mut Vmm) + Send>) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, TOKEN_API))?;
        self.api = Some(handler);
        self.api_fd = Some(fd);
        Ok(())
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        self.state.clone()
    }

    /// Runs the device event loop until the guest stops or power off is requested.
    pub fn run(&mut self) -> StopReason {
        self.register_deferred_ioevents();
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            if let Some(r) = self.stop.take() {
                self.shutdown_vcpus();
                for s in &self.virtio {
                    s.transport.lock().unwrap().shutdown();
                }
                return r;
            }
            let timeout = self
                .virtio
                .iter()
                .filter_map(|s| s.transport.lock().unwrap().next_timer_ms())
                .min()
                .map_or(-1, |ms| ms.min(1000) as i32);
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("vmm: epoll_wait failed: {e}");
                    self.stop = Some(StopReason::Guest(ExitReason::Error(e.to_string())));
                    continue;
                }
            };
            if n == 0 {
                for s in &self.virtio {
                    let mut t = s.transport.lock().unwrap();
                    if t.next_timer_ms().is_some() {
                        t.timer();
                    }
                }
            }
            for ev in &events[..n] {
                let tok = ev.data();
                match tok {
                    TOKEN_EXIT => {
                        let _ = self.exit_evt.read();
                        let r = self.exit_reason.lock().unwrap().clone().unwrap_or(ExitReason::GuestReset);
                        self.stop = Some(StopReason::Guest(r));
                    }
                    TOKEN_RESET => {
                        let _ = self.reset_evt.read();
                        self.stop = Some(StopReason::Guest(ExitReason::GuestReset));
                    }
                    TOKEN_API => {
                        if let Some(mut h) = self.api.take() {
                            h(self);
                            self.api = Some(h);
                        }
                    }
                    t if t >= TOKEN_DEVFD_BASE => {
                        let d = ((t - TOKEN_DEVFD_BASE) >> 16) as usize;
                        if let Some(s) = self.virtio.get(d) {
                            s.transport.lock().unwrap().device_event((t & 0xffff) as u32);
                        }
                    }
                    t if t >= TOKEN_QUEUE_BASE => {
                        let d = ((t - TOKEN_QUEUE_BASE) >> 16) as usize;
                        let q = (t & 0xffff) as usize;
                        if let Some(s) = self.virtio.get(d) {
                            let mut tr = s.transport.lock().unwrap();
                            let _ = tr.queue_evts()[q].read();
                            tr.notify_queue(q);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn shutdown_vcpus(&mut self) {
        for v in &mut self.vcpus {
            v.exit();
        }
    }

    /// Stops the vCPUs. Fails (and changes nothing) when already paused.
    pub fn pause(&mut self) -> Result<(), OpError> {
        if self.state == RunState::Paused {
            return Err(OpError::State("The VM is already paused".into()));
        }
        for v in &self.vcpus {
            v.pause();
        }
        self.state = RunState::Paused;
        Ok(())
    }

    /// Lets the vCPUs run. Fails (and changes nothing) when not paused.
    pub fn resume(&mut self) -> Result<(), OpError> {
        if self.state != RunState::Paused {
            return Err(OpError::State("The VM is not paused".into()));
        }
        for v in &self.vcpus {
            v.resume();
        }
        self.state = RunState::Running;
        Ok(())
    }

    /// Sends Ctrl-Alt-Del to the guest, which decides how to shut down.
    pub fn request_shutdown(&mut self) -> Result<(), OpError> {
        if self.state == RunState::Paused {
            return Err(OpError::State("The VM is paused; resume it first".into()));
        }
        self.i8042.lock().unwrap().ctrl_alt_del().map_err(|e| OpError::Internal(e.to_string()))
    }

    /// Ends the VM at once, as pulling the plug would.
    pub fn power_off(&mut self) {
        self.stop = Some(StopReason::PowerOff);
    }

    /// What the API's describe returns.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "state": self.state,
            "pid": std::process::id(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "vcpus": self.config.machine.vcpus,
            "memory_mib": self.config.machine.memory_mib,
            "memory_backend": self.config.machine.memory_backend,
            "dirty_log": self.vm.dirty_log_enabled(),
            "boot_timing": crate::timing::json(),
            "devices": self.virtio.iter().map(|s| {
                let t = s.transport.lock().unwrap();
                serde_json::json!({
                    "id": s.id,
                    "type": t.counters_json()["type"],
                    "mmio_base": format!("{:#x}", s.addr),
                    "irq": s.irq,
                    "status": t.status(),
                })
            }).collect::<Vec<_>>(),
            "config": self.config,
        })
    }

    /// Counters of vCPUs and devices.
    pub fn counters(&self) -> serde_json::Value {
        let vcpus: Vec<_> = self
            .vcpus
            .iter()
            .map(|v| {
                let c = &v.shared.counters;
                serde_json::json!({
                    "id": v.id,
                    "exits": c.exits.load(Ordering::Relaxed),
                    "pio": c.pio.load(Ordering::Relaxed),
                    "mmio": c.mmio.load(Ordering::Relaxed),
                    "unhandled": c.unhandled.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::json!({
            "vcpus": vcpus,
            "serial": { "bytes": self.serial.lock().unwrap().bytes_written() },
            "i8042": { "resets": self.i8042.lock().unwrap().resets },
            "devices": self.virtio.iter().map(|s| s.transport.lock().unwrap().counters_json()).collect::<Vec<_>>(),
        })
    }

    /// Turns dirty-page logging on or off (KVM dirty log plus the VMM's own writes).
    pub fn set_dirty_log(&mut self, on: bool) -> Result<(), OpError> {
        self.vm.set_dirty_log(on).map_err(|e| OpError::Internal(e.to_string()))?;
        // Start from a clean VMM-side bitmap.
        for r in self.mem.iter() {
            let region: &vm_memory::MmapRegion<AtomicBitmap> = r;
            region.bitmap().reset();
        }
        Ok(())
    }

    /// Fetches and clears the dirty bitmaps; one bit per 4 KiB page per region.
    pub fn dirty_pages(&mut self) -> Result<serde_json::Value, OpError> {
        if !self.vm.dirty_log_enabled() {
            return Err(OpError::State("Dirty-page logging is off; enable it first".into()));
        }
        let mut regions = Vec::new();
        let slots = self.vm.slots().to_vec();
        for (slot, r) in slots.iter().zip(self.mem.iter()) {
            let mut kvm = self.vm.dirty_bitmap(slot).map_err(|e| OpError::Internal(e.to_string()))?;
            let region: &vm_memory::MmapRegion<AtomicBitmap> = r;
            let vmm = region.bitmap().get_and_reset();
            for (a, b) in kvm.iter_mut().zip(vmm.iter()) {
                *a |= *b;
            }
            let count: u32 = kvm.iter().map(|w| w.count_ones()).sum();
            regions.push(serde_json::json!({
                "guest_addr": slot.guest_addr,
                "size": slot.size,
                "dirty_pages": count,
                "bitmap": kvm,
            }));
        }
        Ok(serde_json::json!({ "page_size": 4096, "regions": regions }))
    }

    /// Guest memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        memory::total_size(&self.mem)
    }

    /// Guest memory regions (start, size).
    pub fn memory_regions(&self) -> Vec<(u64, u64)> {
        self.mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
    }

    /// Per-device id to index.
    pub fn device_index(&self) -> HashMap<String, usize> {
        self.virtio.iter().enumerate().map(|(i, s)| (s.id.clone(), i)).collect()
    }
}
