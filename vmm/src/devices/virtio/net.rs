//! virtio-net on a tap device. Offloads are offered only where the tap can
//! honour them, and the tap is told exactly what the driver accepted.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT};

use super::rate_limiter::RateLimiter;
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use super::{add_used, check_chain, next_chain, DeviceError, VirtioDevice, Work, TYPE_NET, VIRTIO_F_VERSION_1};
use crate::config::RateLimitConfig;
use crate::vstate::memory::GuestMemoryMmap;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;

/// virtio-net header with VERSION_1 (num_buffers included).
pub const HDR_LEN: usize = 12;
/// Largest frame plus header (64 KiB GSO frames).
const MAX_FRAME: usize = 65562;
const QUEUE_SIZE: u16 = 256;
const TOKEN_TAP: u32 = 0;

/// Counters per interface.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NetCounters {
    /// Frames to the guest.
    pub rx_frames: u64,
    /// Bytes to the guest.
    pub rx_bytes: u64,
    /// Frames from the guest.
    pub tx_frames: u64,
    /// Bytes from the guest.
    pub tx_bytes: u64,
    /// Frames dropped: guest buffer too small.
    pub rx_dropped: u64,
    /// Frames the tap refused.
    pub tx_errors: u64,
    /// Times the guest had no receive buffer.
    pub rx_no_buffer: u64,
    /// Times the rate limiter held frames back.
    pub throttled: u64,
}

/// The interface.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    acked: u64,
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    rx_limit: RateLimiter,
    tx_limit: RateLimiter,
    counters: NetCounters,
}

impl Net {
    /// An interface on `tap` with `mac`.
    pub fn new(tap: Tap, mac: [u8; 6], limit: Option<RateLimitConfig>) -> Self {
        Net {
            tap,
            mac,
            acked: 0,
            pending: None,
            buf: vec![0; MAX_FRAME],
            rx_limit: RateLimiter::new(limit),
            tx_limit: RateLimiter::new(limit),
            counters: NetCounters::default(),
        }
    }

    fn tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let mut work = Work::default();
        while let Some(chain) = next_chain(q, mem)? {
            let head = chain.head_index();
            let (r, w) = check_chain(&chain, mem)?;
            if w != 0 {
                return Err(DeviceError::MalformedChain(format!("transmit chain {head} has writable buffers")));
            }
            if (r as usize) < HDR_LEN {
                return Err(DeviceError::MalformedChain(format!("transmit chain {head} is shorter than the header")));
            }
            if !self.tx_limit.consume(r) {
                self.counters.throttled += 1;
                q.go_to_previous_position();
                break;
            }
            let len = (r as usize).min(MAX_FRAME);
            let mut reader = chain.clone().reader(mem).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            reader.read_exact(&mut self.buf[..len]).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            if r as usize > MAX_FRAME {
                self.counters.tx_errors += 1;
            } else {
                match self.tap.write_frame(&self.buf[..len]) {
                    Ok(_) => {
                        self.counters.tx_frames += 1;
                        self.counters.tx_bytes += (len - HDR_LEN) as u64;
                    }
                    Err(_) => self.counters.tx_errors += 1,
                }
            }
            add_used(q, mem, head, 0)?;
            work.used = true;
        }
        Ok(work)
    }

    /// Moves frames from the tap into receive buffers until one side runs dry.
    fn rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let mut work = Work::default();
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.tap.read_frame(&mut self.buf) {
                    Ok(n) if n >= HDR_LEN => self.buf[..n].to_vec(),
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                },
            };
            if !self.rx_limit.consume(frame.len() as u64) {
                self.counters.throttled += 1;
                self.pending = Some(frame);
                break;
            }
            let Some(chain) = next_chain(q, mem)? else {
                self.counters.rx_no_buffer += 1;
                self.pending = Some(frame);
                break;
            };
            let head = chain.head_index();
            let (r, w) = check_chain(&chain, mem)?;
            if r != 0 {
                return Err(DeviceError::MalformedChain(format!("receive chain {head} has readable buffers")));
            }
            let mut frame = frame;
            // num_buffers = 1: one buffer holds the whole frame.
            frame[10] = 1;
            frame[11] = 0;
            if (w as usize) < frame.len() {
                self.counters.rx_dropped += 1;
                add_used(q, mem, head, 0)?;
            } else {
                let mut writer = chain.writer(mem).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
                writer.write_all(&frame).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
                add_used(q, mem, head, frame.len() as u32)?;
                self.counters.rx_frames += 1;
                self.counters.rx_bytes += (frame.len() - HDR_LEN) as u64;
            }
            work.used = true;
        }
        Ok(work)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | F_MAC
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16 (LINK_UP).
        let cfg = [self.mac[0], self.mac[1], self.mac[2], self.mac[3], self.mac[4], self.mac[5], 1, 0];
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self, acked: u64) -> Result<(), DeviceError> {
        self.acked = acked;
        let mut off = 0;
        if acked & F_GUEST_CSUM != 0 {
            off |= TUN_F_CSUM;
            if acked & F_GUEST_TSO4 != 0 {
                off |= TUN_F_TSO4;
            }
            if acked & F_GUEST_TSO6 != 0 {
                off |= TUN_F_TSO6;
            }
        }
        self.tap.set_offload(off).map_err(|e| DeviceError::Activate(e.to_string()))
    }
    fn reset(&mut self) {
        self.pending = None;
        self.acked = 0;
        self.rx_limit.clear();
        self.tx_limit.clear();
        let _ = self.tap.set_offload(0);
    }
    fn process_queue(&mut self, q: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        match q {
            0 => self.rx(&mut queues[0], mem),
            _ => {
                let w = self.tx(&mut queues[1], mem)?;
                // Sending may have been what the peer waited for; check for answers.
                let r = self.rx(&mut queues[0], mem)?;
                Ok(Work { used: w.used || r.used })
            }
        }
    }
    fn event_fds(&self) -> Vec<(std::os::unix::io::RawFd, u32)> {
        vec![(self.tap.as_raw_fd(), TOKEN_TAP)]
    }
    fn process_event(&mut self, _token: u32, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        self.rx(&mut queues[0], mem)
    }
    fn next_timer_ms(&self) -> Option<u64> {
        match (self.rx_limit.blocked_ms(), self.tx_limit.blocked_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    fn process_timer(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        self.rx_limit.clear();
        self.tx_limit.clear();
        let t = self.tx(&mut queues[1], mem)?;
        let r = self.rx(&mut queues[0], mem)?;
        Ok(Work { used: t.used || r.used })
    }
    fn counters(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.counters).unwrap_or_default();
        v["tap"] = self.tap.name().into();
        v["acked_features"] = self.acked.into();
        v
    }
    fn save(&self) -> serde_json::Value {
        serde_json::json!({ "acked": self.acked })
    }
}
