//! virtio-net served by a vhost-user backend: the VMM is the frontend. It
//! negotiates features, hands the backend the guest memory (file
//! descriptors of the shared mapping), the ring addresses, the KVM
//! ioeventfds the guest kicks and the irqfd the backend signals, and then
//! stays out of the data path: packets never pass through the VMM.

use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use serde::Serialize;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{BackendContext, DeviceError, VirtioDevice, Work, TYPE_NET, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemoryMmap;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_UFO: u64 = 1 << 10;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_UFO: u64 = 1 << 14;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_RING_INDIRECT_DESC: u64 = 1 << 28;
const F_RING_EVENT_IDX: u64 = 1 << 29;

/// Backend features the guest may see. Everything here is handled by the
/// guest driver and the backend alone; the VMM only relays the bits. Left out
/// on purpose: the control queue and multiqueue (this device has one queue
/// pair), packed rings (the transport sets up split rings), IOMMU_PLATFORM.
const PASSTHROUGH: u64 = VIRTIO_F_VERSION_1
    | F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_UFO
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_UFO
    | F_MRG_RXBUF
    | F_RING_INDIRECT_DESC
    | F_RING_EVENT_IDX;

/// Bits the VMM answers itself from its own config space.
const OWN: u64 = F_MAC | F_STATUS;

const QUEUE_SIZE: u16 = 256;
const NUM_QUEUES: usize = 2;
const TOKEN_SOCKET: u32 = 0;

/// Errors connecting to the backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserNetError {
    /// The socket could not be connected.
    #[error("Cannot connect to the vhost-user backend at {0}: {1}")]
    Connect(PathBuf, vhost::Error),
    /// A protocol request failed.
    #[error("vhost-user {0} failed: {1}")]
    Request(&'static str, vhost::Error),
    /// The backend lacks something the VMM needs.
    #[error("The vhost-user backend at {0} does not offer {1}")]
    Missing(PathBuf, &'static str),
}

/// What the API shows about the device.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VhostUserNetCounters {
    /// Backend socket.
    pub socket: String,
    /// Virtio features the backend offered.
    pub backend_features: u64,
    /// vhost-user protocol features acknowledged.
    pub protocol_features: u64,
    /// Features the guest accepted.
    pub acked_features: u64,
    /// Times the rings were handed to the backend.
    pub activations: u64,
    /// The backend has the rings now.
    pub running: bool,
    /// The backend closed the connection.
    pub disconnected: bool,
}

/// The device.
pub struct VhostUserNet {
    frontend: Frontend,
    socket: PathBuf,
    mac: [u8; 6],
    backend_features: u64,
    acked: u64,
    started: [bool; NUM_QUEUES],
    counters: VhostUserNetCounters,
}

fn req<T>(what: &'static str, r: Result<T, vhost::Error>) -> Result<T, VhostUserNetError> {
    r.map_err(|e| VhostUserNetError::Request(what, e))
}

impl VhostUserNet {
    /// Connects to the backend listening on `socket` and learns its features.
    pub fn connect(socket: &Path, mac: [u8; 6]) -> Result<Self, VhostUserNetError> {
        let mut frontend =
            Frontend::connect(socket, NUM_QUEUES as u64).map_err(|e| VhostUserNetError::Connect(socket.into(), e))?;
        req("SET_OWNER", frontend.set_owner())?;
        let backend_features = req("GET_FEATURES", frontend.get_features())?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserNetError::Missing(socket.into(), "VIRTIO_F_VERSION_1"));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = req("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
            // Replies to every request let a refused memory table or ring
            // address surface as an error instead of a silent dead link.
            protocol = offered & VhostUserProtocolFeatures::REPLY_ACK;
            req("SET_PROTOCOL_FEATURES", frontend.set_protocol_features(protocol))?;
        }
        let counters = VhostUserNetCounters {
            socket: socket.display().to_string(),
            backend_features,
            protocol_features: protocol.bits(),
            ..Default::default()
        };
        Ok(VhostUserNet {
            frontend,
            socket: socket.into(),
            mac,
            backend_features,
            acked: 0,
            started: [false; NUM_QUEUES],
            counters,
        })
    }

    fn has_protocol_features(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn start(&mut self, ctx: &BackendContext) -> Result<(), DeviceError> {
        let act = |e: VhostUserNetError| DeviceError::Activate(e.to_string());
        let mut features = ctx.acked & self.backend_features & !OWN;
        if self.has_protocol_features() {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        req("SET_FEATURES", self.frontend.set_features(features)).map_err(act)?;
        let regions = memory_table(ctx.mem)?;
        req("SET_MEM_TABLE", self.frontend.set_mem_table(&regions)).map_err(act)?;
        for (i, q) in ctx.queues.iter().enumerate().take(NUM_QUEUES) {
            if !q.ready() {
                continue;
            }
            let host = |gpa: u64, what: &str| -> Result<u64, DeviceError> {
                ctx.mem
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| DeviceError::BadQueue(format!("queue {i} {what} ring {gpa:#x} is not in guest memory")))
            };
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table(), "descriptor")?,
                used_ring_addr: host(q.used_ring(), "used")?,
                avail_ring_addr: host(q.avail_ring(), "available")?,
                log_addr: None,
            };
            req("SET_VRING_NUM", self.frontend.set_vring_num(i, q.size())).map_err(act)?;
            req("SET_VRING_ADDR", self.frontend.set_vring_addr(i, &cfg)).map_err(act)?;
            req("SET_VRING_BASE", self.frontend.set_vring_base(i, q.next_avail())).map_err(act)?;
            req("SET_VRING_CALL", self.frontend.set_vring_call(i, ctx.call)).map_err(act)?;
            req("SET_VRING_KICK", self.frontend.set_vring_kick(i, &ctx.kicks[i])).map_err(act)?;
            if self.has_protocol_features() {
                req("SET_VRING_ENABLE", self.frontend.set_vring_enable(i, true)).map_err(act)?;
            }
            self.started[i] = true;
        }
        self.counters.activations += 1;
        self.counters.running = true;
        Ok(())
    }

    /// Takes the rings back from the backend (GET_VRING_BASE stops a ring).
    fn stop(&mut self) {
        for i in 0..NUM_QUEUES {
            if !self.started[i] {
                continue;
            }
            if self.has_protocol_features() {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            if let Err(e) = self.frontend.get_vring_base(i) {
                eprintln!("vmm: vhost-user {}: cannot stop ring {i}: {e}", self.socket.display());
            }
            self.started[i] = false;
        }
        self.counters.running = false;
    }
}

/// The shared guest memory as vhost-user regions (one file descriptor each).
fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, DeviceError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                DeviceError::Activate("vhost-user needs shared guest memory (memory_backend \"file\" or memory_shared)".into())
            })
        })
        .collect()
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        (self.backend_features & PASSTHROUGH) | OWN
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16: link up while the backend holds the rings or
        // before the driver started; down once the backend went away.
        let up = u8::from(!self.counters.disconnected);
        let cfg = [self.mac[0], self.mac[1], self.mac[2], self.mac[3], self.mac[4], self.mac[5], up, 0];
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn external_backend(&self) -> bool {
        true
    }
    fn activate_backend(&mut self, ctx: &BackendContext) -> Result<(), DeviceError> {
        if self.counters.disconnected {
            return Err(DeviceError::Activate(format!("the vhost-user backend {} is gone", self.socket.display())));
        }
        self.acked = ctx.acked;
        self.start(ctx)
    }
    fn activate(&mut self, acked: u64) -> Result<(), DeviceError> {
        self.acked = acked;
        self.counters.acked_features = acked;
        Ok(())
    }
    fn reset(&mut self) {
        self.stop();
        self.acked = 0;
    }
    fn process_queue(&mut self, _q: usize, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        // The backend reads the ioeventfds itself; nothing reaches here.
        Ok(Work::default())
    }
    fn event_fds(&self) -> Vec<(RawFd, u32)> {
        vec![(self.frontend.as_raw_fd(), TOKEN_SOCKET)]
    }
    fn process_event(&mut self, _token: u32, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        // The backend never speaks first on this socket, so readiness here
        // is either a reply another thread already consumed or the end.
        let mut b = [0u8; 1];
        // SAFETY: recv into a one-byte stack buffer we own; MSG_PEEK leaves
        // any pending reply for the request's owner.
        let n = unsafe {
            libc::recv(self.frontend.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        if n == 0 {
            self.counters.disconnected = true;
            self.counters.running = false;
            self.started = [false; NUM_QUEUES];
            return Err(DeviceError::Activate(format!("the vhost-user backend {} closed the connection", self.socket.display())));
        }
        Ok(Work::default())
    }
    fn counters(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.counters).unwrap_or_default();
        v["backend"] = "vhost-user".into();
        v
    }
}
