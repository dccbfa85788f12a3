//! virtio-rng: fills the driver's buffers from the host's getrandom().

use std::io::Write;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT};

use super::rate_limiter::RateLimiter;
use super::{add_used, check_chain, next_chain, DeviceError, VirtioDevice, Work, TYPE_RNG, VIRTIO_F_VERSION_1};
use crate::config::RateLimitConfig;
use crate::vstate::memory::GuestMemoryMmap;

/// Most bytes handed out per request.
const MAX_CHUNK: u64 = 64 * 1024;

/// Counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RngCounters {
    /// Requests served.
    pub requests: u64,
    /// Bytes handed to the guest.
    pub bytes: u64,
    /// Times the rate limiter held requests back.
    pub throttled: u64,
}

/// The entropy device.
pub struct Rng {
    limiter: RateLimiter,
    counters: RngCounters,
}

impl Rng {
    /// A new device.
    pub fn new(limit: Option<RateLimitConfig>) -> Self {
        Rng { limiter: RateLimiter::new(limit), counters: RngCounters::default() }
    }

    fn process(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let mut work = Work::default();
        while let Some(chain) = next_chain(q, mem)? {
            let head = chain.head_index();
            let (r, w) = check_chain(&chain, mem)?;
            if r != 0 {
                return Err(DeviceError::MalformedChain(format!("rng request {head} has readable buffers")));
            }
            let n = w.min(MAX_CHUNK);
            if !self.limiter.consume(n) {
                self.counters.throttled += 1;
                q.go_to_previous_position();
                break;
            }
            let mut buf = vec![0u8; n as usize];
            fill_random(&mut buf);
            let mut writer = chain.writer(mem).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            writer.write_all(&buf).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            add_used(q, mem, head, n as u32)?;
            self.counters.requests += 1;
            self.counters.bytes += n;
            work.used = true;
        }
        Ok(work)
    }
}

fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of buf.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r <= 0 {
            continue;
        }
        done += r as usize;
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[64]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _acked: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reset(&mut self) {
        self.limiter.clear();
    }
    fn process_queue(&mut self, _q: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        self.process(&mut queues[0], mem)
    }
    fn next_timer_ms(&self) -> Option<u64> {
        self.limiter.blocked_ms()
    }
    fn process_timer(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        self.limiter.clear();
        self.process(&mut queues[0], mem)
    }
    fn counters(&self) -> serde_json::Value {
        serde_json::to_value(&self.counters).unwrap_or_default()
    }
}
