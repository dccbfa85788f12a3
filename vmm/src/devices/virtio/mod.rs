//! virtio devices over the MMIO transport.

pub mod block;
pub mod mmio;
pub mod net;
pub mod rate_limiter;
pub mod rng;
pub mod tap;
pub mod vhost_user_net;
pub mod vsock;

use std::os::unix::io::RawFd;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

/// VIRTIO_F_VERSION_1: the only (modern) interface offered.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device ID of virtio-net.
pub const TYPE_NET: u32 = 1;
/// Device ID of virtio-blk.
pub const TYPE_BLOCK: u32 = 2;
/// Device ID of virtio-rng.
pub const TYPE_RNG: u32 = 4;
/// Device ID of virtio-vsock.
pub const TYPE_VSOCK: u32 = 19;

/// Ways a driver breaks the virtio contract; each one fails the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The descriptor chain is empty, loops, leaves the table, or has the wrong shape.
    #[error("Malformed descriptor chain: {0}")]
    MalformedChain(String),
    /// A descriptor or ring points outside guest memory.
    #[error("Guest address out of range: {0}")]
    BadAddress(String),
    /// The queue's indexes or layout are inconsistent.
    #[error("Queue in a bad state: {0}")]
    BadQueue(String),
    /// The device could not start (backend failure).
    #[error("Cannot activate device: {0}")]
    Activate(String),
}

/// What a device handler reports back to the transport.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Buffers were returned: raise the used-buffer interrupt.
    pub used: bool,
}

/// What a device whose queues are served outside the VMM (vhost-user) gets
/// at activation: the rings as the driver set them up, the eventfds KVM
/// signals when the driver notifies each queue, and the irqfd to signal.
pub struct BackendContext<'a> {
    /// Features the driver accepted.
    pub acked: u64,
    /// The queues, in device order.
    pub queues: &'a [Queue],
    /// One notification eventfd per queue (KVM ioeventfds).
    pub kicks: &'a [EventFd],
    /// The device's interrupt eventfd (a KVM irqfd).
    pub call: &'a EventFd,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
}

/// A virtio device model. Queues live in the transport and are lent to the
/// device for each event.
pub trait VirtioDevice: Send {
    /// virtio device ID.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (ignored unless the device has writable fields).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, acked: u64) -> Result<(), DeviceError>;
    /// The driver reset the device.
    fn reset(&mut self);
    /// True when another process serves the queues: the event loop leaves
    /// the notification eventfds alone and the interrupt status always
    /// reports a used buffer (the backend signals the irqfd directly).
    fn external_backend(&self) -> bool {
        false
    }
    /// Hands the queues to the external backend, before `activate`.
    fn activate_backend(&mut self, _ctx: &BackendContext) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The driver notified queue `q`.
    fn process_queue(&mut self, q: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError>;
    /// Host-side file descriptors to watch (edge-triggered, readable), with tokens.
    fn event_fds(&self) -> Vec<(RawFd, u32)> {
        Vec::new()
    }
    /// One of `event_fds` became readable.
    fn process_event(&mut self, _token: u32, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        Ok(Work::default())
    }
    /// Milliseconds until the device wants `process_timer` (rate limiting), if any.
    fn next_timer_ms(&self) -> Option<u64> {
        None
    }
    /// A rate-limit timer expired.
    fn process_timer(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        Ok(Work::default())
    }
    /// The VM is going away: remove what the device created on the host
    /// (called on the VMM thread; the last reference may be dropped
    /// elsewhere, under a stricter seccomp filter).
    fn shutdown(&mut self) {}
    /// Device counters for the API.
    fn counters(&self) -> serde_json::Value;
    /// Device-specific state for a snapshot.
    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores `save`'s output.
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
}

/// Takes the next available chain from `queue`, checking the avail index.
pub fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, DeviceError> {
    let mut it = queue.iter(mem).map_err(|e| DeviceError::BadQueue(e.to_string()))?;
    Ok(it.next())
}

/// Walks a chain once to prove it is well formed: not empty, ends without a
/// dangling NEXT (a loop or an index past the table), and every buffer lies
/// in guest memory. Returns (readable bytes, writable bytes).
pub fn check_chain(chain: &DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Result<(u64, u64), DeviceError> {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let mut n = 0;
    let mut last_next = false;
    let (mut r, mut w) = (0u64, 0u64);
    let mut seen_writable = false;
    for d in chain.clone() {
        n += 1;
        last_next = d.has_next();
        let len = u64::from(d.len());
        if len > 0 && !mem.check_range(GuestAddress(d.addr().0), len as usize) {
            return Err(DeviceError::BadAddress(format!(
                "descriptor {:#x}+{:#x} is outside guest memory",
                d.addr().0,
                len
            )));
        }
        if d.is_write_only() {
            seen_writable = true;
            w += len;
        } else {
            if seen_writable {
                return Err(DeviceError::MalformedChain("a readable descriptor follows a writable one".into()));
            }
            r += len;
        }
    }
    if n == 0 {
        return Err(DeviceError::MalformedChain(format!(
            "chain head {} yields no descriptor (index past the table or unreadable)",
            chain.head_index()
        )));
    }
    if last_next {
        return Err(DeviceError::MalformedChain(format!(
            "chain from head {} does not end (a loop, or a next index past the table)",
            chain.head_index()
        )));
    }
    Ok((r, w))
}

/// Returns a chain to the driver with `len` bytes written.
pub fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), DeviceError> {
    queue.add_used(mem, head, len).map_err(|e| DeviceError::BadQueue(e.to_string()))
}
