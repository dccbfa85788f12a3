//! The vhost-user port: the datapath is the vhost-user backend of a VM's
//! virtio-net device. It listens on a unix socket (server mode), lets the
//! vhost-user-backend crate handle the protocol (features, memory table,
//! vring addresses, kicks), and then the engine's poll-mode worker reads the
//! guest's transmit virtqueues and writes its receive virtqueues directly in
//! guest memory: one copy out of a guest buffer into the worker's packet
//! buffer, one copy into the receiving guest's buffer, as virtio requires.
//!
//! Queue pair `q` is vring `2q` (guest receive, our transmit) and `2q + 1`
//! (guest transmit, our receive). Notifications are adaptive: while a worker
//! finds packets it tells the guest not to kick; when a queue has stayed
//! empty for a while it asks for kicks again, and a kick wakes a sleeping
//! worker through [`VhostUserPort::fd`].

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringMutex, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as QueueError, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::packet::SPLIT_HEAD;
use crate::ports::{BurstPort, Tail};

/// Guest memory as the vhost-user backend maps it (no dirty-page bitmap).
type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
/// virtio_net_hdr_mrg_rxbuf; also the header size with VERSION_1.
const NET_HDR_LEN: usize = 12;
/// The legacy header without num_buffers.
const NET_HDR_LEN_LEGACY: usize = 10;
/// Most receive buffers one frame may spread over with mergeable buffers.
const MAX_MERGE: usize = 32;
/// Most queue pairs a port offers.
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// How long a transmit queue must stay empty before the guest is asked to
/// kick again. Shorter gaps are bursts of a busy guest: a kick there costs the
/// guest a system call and wakes a thread on its CPU for nothing, because the
/// worker polls again within microseconds.
const KICK_AFTER_IDLE: std::time::Duration = std::time::Duration::from_micros(200);

/// Errors creating a vhost-user port.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be created.
    #[error("Cannot listen on vhost-user socket {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: vhost::vhost_user::Error,
    },
    /// A bad queue count or size was asked for.
    #[error("Invalid vhost-user port configuration: {0}")]
    Config(&'static str),
    /// An eventfd or thread could not be created.
    #[error("{what} failed: {source}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Settings of one vhost-user port.
#[derive(Debug, Clone)]
pub struct VhostUserConfig {
    /// Path of the server socket the VMM (or testpmd's virtio-user) connects to.
    pub socket: PathBuf,
    /// Queue pairs offered to the guest (1..=16); the guest may enable fewer.
    pub queue_pairs: u16,
    /// Largest virtqueue size the guest may configure (a power of two).
    pub queue_size: u16,
}

impl VhostUserConfig {
    /// One queue pair of 1024 descriptors at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> VhostUserConfig {
        VhostUserConfig { socket: socket.into(), queue_pairs: 1, queue_size: 1024 }
    }
}

/// Counters of one vhost-user port, beyond the engine's per-port rx/tx.
#[derive(Debug, Default)]
pub struct VhostUserCounters {
    /// Guest connections accepted.
    pub connections: AtomicU64,
    /// Transmit chains dropped as malformed (no readable data, too long, bad address).
    pub rx_bad_chains: AtomicU64,
    /// Frames not delivered because the guest had no receive buffers.
    pub tx_no_buffers: AtomicU64,
    /// Kicks received from the guest.
    pub kicks: AtomicU64,
    /// Calls (interrupts) sent to the guest.
    pub calls: AtomicU64,
    /// Frames received per queue pair.
    pub rx_per_queue: [AtomicU64; MAX_QUEUE_PAIRS as usize],
}

/// What the worker needs of one live guest connection.
struct Connection {
    mem: Mem,
    vrings: Vec<VringMutex<Mem>>,
}

struct Shared {
    name: String,
    conn: RwLock<Option<Arc<Connection>>>,
    generation: AtomicU64,
    wake: EventFd,
    wake_pending: AtomicBool,
    stop: AtomicBool,
    shutdown: Mutex<Option<ShutdownHandle>>,
    acked_features: AtomicU64,
    /// Bumped whenever the guest sends a memory table, after it is in place.
    mem_generation: AtomicU64,
    counters: VhostUserCounters,
}

impl Shared {
    fn wake(&self) {
        self.counters.kicks.fetch_add(1, Ordering::Relaxed);
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let _ = self.wake.write(1);
        }
    }

    fn set_connection(&self, conn: Option<Arc<Connection>>) {
        *self.conn.write().expect("connection lock") = conn;
        self.generation.fetch_add(1, Ordering::Release);
        // Wake the worker so that it picks up the change.
        self.wake();
    }
}

thread_local! {
    /// Vrings created by the daemon being constructed on this thread (see [`PortVring::new`]).
    static NEW_VRINGS: RefCell<Vec<VringMutex<Mem>>> = const { RefCell::new(Vec::new()) };
}

/// The vring type given to vhost-user-backend: its own `VringMutex`, plus a
/// record of every vring the daemon creates, so that the port's worker can
/// poll the same vrings the protocol thread configures.
#[derive(Clone)]
pub struct PortVring(VringMutex<Mem>);

impl<'a> VringStateGuard<'a, Mem> for PortVring {
    type G = <VringMutex<Mem> as VringStateGuard<'a, Mem>>::G;
}

impl<'a> VringStateMutGuard<'a, Mem> for PortVring {
    type G = <VringMutex<Mem> as VringStateMutGuard<'a, Mem>>::G;
}

impl VringT<Mem> for PortVring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, QueueError> {
        let v = VringMutex::new(mem, max_queue_size)?;
        NEW_VRINGS.with(|n| n.borrow_mut().push(v.clone()));
        Ok(PortVring(v))
    }
    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.0.get_ref()
    }
    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.0.get_mut()
    }
    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.0.add_used(desc_index, len)
    }
    fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }
    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.0.enable_notification()
    }
    fn disable_notification(&self) -> Result<(), QueueError> {
        self.0.disable_notification()
    }
    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.0.needs_notification()
    }
    fn set_enabled(&self, enabled: bool) {
        self.0.set_enabled(enabled)
    }
    fn set_queue_info(&self, desc_table: u64, avail_ring: u64, used_ring: u64) -> Result<(), QueueError> {
        self.0.set_queue_info(desc_table, avail_ring, used_ring)
    }
    fn queue_next_avail(&self) -> u16 {
        self.0.queue_next_avail()
    }
    fn set_queue_next_avail(&self, base: u16) {
        self.0.set_queue_next_avail(base)
    }
    fn set_queue_next_used(&self, idx: u16) {
        self.0.set_queue_next_used(idx)
    }
    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.0.queue_used_idx()
    }
    fn set_queue_size(&self, num: u16) {
        self.0.set_queue_size(num)
    }
    fn set_queue_event_idx(&self, enabled: bool) {
        self.0.set_queue_event_idx(enabled)
    }
    fn set_queue_ready(&self, ready: bool) {
        self.0.set_queue_ready(ready)
    }
    fn set_kick(&self, file: Option<std::fs::File>) {
        self.0.set_kick(file)
    }
    fn read_kick(&self) -> io::Result<bool> {
        self.0.read_kick()
    }
    fn set_call(&self, file: Option<std::fs::File>) {
        self.0.set_call(file)
    }
    fn set_err(&self, file: Option<std::fs::File>) {
        self.0.set_err(file)
    }
}

/// The virtio-net device as the vhost-user-backend crate sees it. Packet
/// processing is not done here (the engine's worker polls the vrings); a kick
/// only wakes that worker.
struct NetBackend {
    shared: Arc<Shared>,
    queue_pairs: u16,
    queue_size: u16,
    exit: Mutex<Option<EventNotifier>>,
}

impl NetBackend {
    fn exit(&self) {
        if let Some(n) = self.exit.lock().expect("exit lock").take() {
            let _ = n.notify();
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = PortVring;

    fn num_queues(&self) -> usize {
        2 * self.queue_pairs as usize
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size as usize
    }

    fn features(&self) -> u64 {
        let mq = if self.queue_pairs > 1 { VIRTIO_NET_F_MQ } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF | mq | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.shared.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered, so it is never enabled.
    }

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        // The handler has replaced the mapping inside the GuestMemoryAtomic the
        // port already holds; the worker re-translates its regions at its next burst.
        self.shared.mem_generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread receives every kick; it only wakes the worker.
        vec![(1u64 << self.num_queues()) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        let keep = notifier.try_clone().ok()?;
        *self.exit.lock().expect("exit lock") = Some(keep);
        Some((consumer, notifier))
    }

    fn handle_event(&self, _device_event: u16, _evset: EventSet, _vrings: &[PortVring], _thread_id: usize) -> io::Result<()> {
        self.shared.wake();
        Ok(())
    }
}

/// A vhost-user port attached to the engine: the server socket, the thread
/// that accepts guest connections, and the state the worker keeps to poll
/// the guest's virtqueues.
pub struct VhostUserPort {
    shared: Arc<Shared>,
    socket: PathBuf,
    acceptor: Option<JoinHandle<()>>,
    conn: Option<Arc<Connection>>,
    generation: u64,
    pairs: usize,
    rx_cursor: usize,
    /// Per transmit vring: whether we asked the guest for kicks.
    kicks_on: [bool; MAX_QUEUE_PAIRS as usize],
    /// Per transmit vring: the used index to publish at rx_done (a burst
    /// with tails keeps its chains until they are sent).
    deferred: [Option<u16>; MAX_QUEUE_PAIRS as usize],
    /// A burst with tails is open: the memory map must not change.
    rx_pending: bool,
    /// Per receive vring: whether the guest was told not to kick when it adds buffers.
    rx_kicks_off: [bool; MAX_QUEUE_PAIRS as usize],
    /// Per transmit vring: since when it has been found empty (kicks still off).
    empty_since: [Option<std::time::Instant>; MAX_QUEUE_PAIRS as usize],
    /// The guest's memory as host pointers.
    map: GuestMap,
    /// Per transmit vring: empty polls since it last had packets.
    empty_polls: [u32; MAX_QUEUE_PAIRS as usize],
}

// SAFETY: the raw pointers in `map` point into guest memory mappings that `map`
// keeps alive (an Arc of the mapping); the port is used by one thread at a time
// (the engine holds it behind a mutex).
unsafe impl Send for VhostUserPort {}

impl VhostUserPort {
    /// Creates the server socket (replacing a stale file) and starts accepting
    /// guest connections, one at a time; a guest that disconnects may reconnect.
    pub fn listen(cfg: &VhostUserConfig) -> Result<VhostUserPort, VhostUserError> {
        if cfg.queue_pairs == 0 || cfg.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(VhostUserError::Config("queue_pairs must be 1..=16"));
        }
        if !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
            return Err(VhostUserError::Config("queue_size must be a power of two up to 32768"));
        }
        let listener = Listener::new(&cfg.socket, true).map_err(|source| VhostUserError::Listen { path: cfg.socket.clone(), source })?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|source| VhostUserError::Sys { what: "eventfd", source })?;
        let name = cfg.socket.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "vhost-user".into());
        let shared = Arc::new(Shared {
            name: name.clone(),
            conn: RwLock::new(None),
            generation: AtomicU64::new(0),
            wake,
            wake_pending: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            shutdown: Mutex::new(None),
            acked_features: AtomicU64::new(0),
            mem_generation: AtomicU64::new(0),
            counters: VhostUserCounters::default(),
        });
        let acceptor = {
            let (shared, cfg) = (shared.clone(), cfg.clone());
            std::thread::Builder::new()
                .name(format!("vhu-{}", truncate(&name, 10)))
                .spawn(move || accept_loop(shared, listener, cfg))
                .map_err(|source| VhostUserError::Sys { what: "spawning the vhost-user thread", source })?
        };
        Ok(VhostUserPort {
            shared,
            socket: cfg.socket.clone(),
            acceptor: Some(acceptor),
            conn: None,
            generation: u64::MAX,
            pairs: 0,
            rx_cursor: 0,
            kicks_on: [true; MAX_QUEUE_PAIRS as usize],
            rx_kicks_off: [false; MAX_QUEUE_PAIRS as usize],
            deferred: [None; MAX_QUEUE_PAIRS as usize],
            rx_pending: false,
            empty_since: [None; MAX_QUEUE_PAIRS as usize],
            map: GuestMap::default(),
            empty_polls: [0; MAX_QUEUE_PAIRS as usize],
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether a guest is connected.
    pub fn connected(&self) -> bool {
        self.shared.conn.read().expect("connection lock").is_some()
    }

    /// Queue pairs the connected guest has enabled (0 when none is connected).
    pub fn enabled_queue_pairs(&self) -> usize {
        let g = self.shared.conn.read().expect("connection lock");
        let Some(c) = g.as_ref() else { return 0 };
        (0..c.vrings.len() / 2).filter(|q| c.vrings[2 * q + 1].get_ref().is_enabled()).count()
    }

    /// The port's own counters.
    pub fn counters(&self) -> &VhostUserCounters {
        &self.shared.counters
    }

    /// A handle that reads the port's state from other threads (tests, the agent).
    pub fn status(&self) -> VhostUserStatus {
        VhostUserStatus { shared: self.shared.clone() }
    }

    fn refresh(&mut self) {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g == self.generation || self.rx_pending {
            // (A new connection is picked up after the open burst's rx_done.)
            return;
        }
        self.generation = g;
        self.conn = self.shared.conn.read().expect("connection lock").clone();
        self.pairs = self.conn.as_ref().map(|c| c.vrings.len() / 2).unwrap_or(0);
        self.kicks_on = [true; MAX_QUEUE_PAIRS as usize];
        self.rx_kicks_off = [false; MAX_QUEUE_PAIRS as usize];
        self.empty_since = [None; MAX_QUEUE_PAIRS as usize];
        self.map.clear();
        self.rx_cursor = 0;
    }

    fn features(&self) -> u64 {
        self.shared.acked_features.load(Ordering::Acquire)
    }
}

/// A shareable view of a vhost-user port's state.
#[derive(Clone)]
pub struct VhostUserStatus {
    shared: Arc<Shared>,
}

impl VhostUserStatus {
    /// Whether a guest is connected.
    pub fn connected(&self) -> bool {
        self.shared.conn.read().expect("connection lock").is_some()
    }

    /// Whether a guest is connected and has enabled at least one queue pair.
    pub fn ready(&self) -> bool {
        let g = self.shared.conn.read().expect("connection lock");
        let Some(c) = g.as_ref() else { return false };
        (0..c.vrings.len() / 2).any(|q| {
            let v = c.vrings[2 * q + 1].get_ref();
            v.is_enabled() && v.get_queue().ready()
        })
    }

    /// The port's counters.
    pub fn counters(&self) -> &VhostUserCounters {
        &self.shared.counters
    }

    /// Features the guest acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.shared.acked_features.load(Ordering::Acquire)
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Accepts one guest connection at a time until the port is dropped.
fn accept_loop(shared: Arc<Shared>, mut listener: Listener, cfg: VhostUserConfig) {
    while !shared.stop.load(Ordering::Acquire) {
        let backend = Arc::new(NetBackend { shared: shared.clone(), queue_pairs: cfg.queue_pairs, queue_size: cfg.queue_size, exit: Mutex::new(None) });
        let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        NEW_VRINGS.with(|v| v.borrow_mut().clear());
        let daemon = VhostUserDaemon::new(shared.name.clone(), backend.clone(), mem.clone());
        let vrings = NEW_VRINGS.with(|v| std::mem::take(&mut *v.borrow_mut()));
        let mut daemon = match daemon {
            Ok(d) => d,
            Err(e) => {
                eprintln!("vhost-user {}: cannot create the backend: {e}", shared.name);
                return;
            }
        };
        // Blocks until a guest connects (or Drop connects to wake us).
        if let Err(e) = daemon.start(&mut listener) {
            backend.exit();
            if shared.stop.load(Ordering::Acquire) {
                break;
            }
            eprintln!("vhost-user {}: accept failed: {e}", shared.name);
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        if shared.stop.load(Ordering::Acquire) {
            daemon.request_shutdown();
            let _ = daemon.wait();
            backend.exit();
            break;
        }
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        *shared.shutdown.lock().expect("shutdown lock") = daemon.shutdown_handle();
        shared.set_connection(Some(Arc::new(Connection { mem, vrings })));
        let _ = daemon.wait();
        *shared.shutdown.lock().expect("shutdown lock") = None;
        shared.set_connection(None);
        shared.acked_features.store(0, Ordering::Release);
        backend.exit();
    }
}

impl Drop for VhostUserPort {
    fn drop(&mut self) {
        self.conn = None;
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.shared.shutdown.lock().expect("shutdown lock").take() {
            h.shutdown();
        }
        // Wake an accept() that is still waiting for a guest.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn header_len(features: u64) -> usize {
    if features & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) != 0 {
        NET_HDR_LEN
    } else {
        NET_HDR_LEN_LEGACY
    }
}

/// Split-virtqueue descriptor flags.
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
/// The guest asks not to be interrupted (avail ring flags).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// What identifies a translated ring: descriptor table, avail and used ring addresses, size.
type RingId = (u64, u64, u64, u16);

/// One guest memory region, translated once per memory table.
#[derive(Clone, Copy)]
struct Region {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

/// The guest's memory as host pointers: rebuilt when the guest sends a new
/// memory table, so descriptors translate with a range check instead of a
/// search through vm-memory per access.
#[derive(Default)]
struct GuestMap {
    /// Keeps the mapping the region pointers point into alive.
    mem: Option<Arc<GuestMemoryMmap<()>>>,
    regions: Vec<Region>,
    last: usize,
    generation: u64,
    /// Per vring: the ring addresses and size last translated, and the result.
    rings: Vec<Option<(RingId, Ring)>>,
}

impl GuestMap {
    fn load(&mut self, mem: Arc<GuestMemoryMmap<()>>, generation: u64) {
        self.regions = mem
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some(Region { gpa: r.start_addr().0, len: r.len(), host })
            })
            .collect();
        self.mem = Some(mem);
        self.last = 0;
        self.generation = generation;
        self.rings.clear();
    }

    fn clear(&mut self) {
        *self = GuestMap { generation: self.generation, ..Default::default() };
    }

    /// The host address of `len` bytes at guest address `gpa`, when they lie in one region.
    #[inline]
    fn translate(&mut self, gpa: u64, len: usize) -> Option<*mut u8> {
        let fits = |r: &Region| gpa >= r.gpa && gpa.checked_add(len as u64).is_some_and(|end| end <= r.gpa + r.len);
        if let Some(r) = self.regions.get(self.last) {
            if fits(r) {
                // SAFETY: gpa - r.gpa + len <= r.len, so the offset stays inside the region's mapping.
                return Some(unsafe { r.host.add((gpa - r.gpa) as usize) });
            }
        }
        let i = self.regions.iter().position(fits)?;
        self.last = i;
        let r = self.regions[i];
        // SAFETY: as above, checked by `fits`.
        Some(unsafe { r.host.add((gpa - r.gpa) as usize) })
    }

    /// Copies guest bytes at `gpa` into `out`.
    fn read(&mut self, gpa: u64, out: &mut [u8]) -> bool {
        match self.translate(gpa, out.len()) {
            Some(p) => {
                // SAFETY: p is valid for out.len() bytes (translate checked the range) and
                // cannot overlap our own buffer. The guest owns the race on these bytes: the
                // descriptor is ours until we return it, and any value is a valid u8.
                unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
                true
            }
            // A buffer that spans two regions: let vm-memory split it.
            None => self.mem.as_ref().is_some_and(|m| m.read_slice(out, GuestAddress(gpa)).is_ok()),
        }
    }

    /// Copies `data` into guest memory at `gpa`.
    fn write(&mut self, gpa: u64, data: &[u8]) -> bool {
        match self.translate(gpa, data.len()) {
            Some(p) => {
                // SAFETY: p is valid for data.len() bytes (checked by translate); the guest gave
                // us this write-only buffer and does not read it before we return it.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
                true
            }
            None => self.mem.as_ref().is_some_and(|m| m.write_slice(data, GuestAddress(gpa)).is_ok()),
        }
    }

    /// The host view of a queue's three rings, or None when they are not
    /// mapped, not aligned as virtio requires, or the size is not a power of two.
    fn ring(&mut self, vring: usize, q: &virtio_queue::Queue) -> Option<Ring> {
        let id = (q.desc_table(), q.avail_ring(), q.used_ring(), q.size());
        if let Some(Some((cached, r))) = self.rings.get(vring) {
            if *cached == id {
                return Some(*r);
            }
        }
        let r = self.translate_ring(q)?;
        if self.rings.len() <= vring {
            self.rings.resize(vring + 1, None);
        }
        self.rings[vring] = Some((id, r));
        Some(r)
    }

    fn translate_ring(&mut self, q: &virtio_queue::Queue) -> Option<Ring> {
        let size = q.size();
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let (d, a, u) = (q.desc_table(), q.avail_ring(), q.used_ring());
        if d % 16 != 0 || a % 2 != 0 || u % 4 != 0 {
            return None;
        }
        let n = size as usize;
        Some(Ring { desc: self.translate(d, 16 * n)?, avail: self.translate(a, 6 + 2 * n)?, used: self.translate(u, 6 + 8 * n)?, size })
    }
}

/// A split virtqueue's rings as host pointers (valid while the [`GuestMap`]
/// they came from holds its mapping). All accesses are volatile: the guest
/// writes these rings concurrently.
#[derive(Clone, Copy)]
struct Ring {
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    size: u16,
}

impl Ring {
    /// The guest's avail index, with acquire ordering for the entries before it.
    #[inline]
    fn avail_idx(&self) -> u16 {
        // SAFETY: avail is 2-aligned and maps 6 + 2*size bytes (GuestMap::ring); idx is at offset 2.
        let v = unsafe { std::ptr::read_volatile(self.avail.add(2) as *const u16) };
        fence(Ordering::Acquire);
        u16::from_le(v)
    }

    #[inline]
    fn avail_flags(&self) -> u16 {
        // SAFETY: flags is at offset 0 of the mapped, aligned avail ring.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail as *const u16) })
    }

    #[inline]
    fn avail_entry(&self, i: u16) -> u16 {
        let slot = (i & (self.size - 1)) as usize;
        // SAFETY: slot < size, so 4 + 2*slot + 2 <= 6 + 2*size, inside the mapping; 2-aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16) })
    }

    /// Starts loading descriptor `i` into the cache.
    #[inline]
    fn prefetch_desc(&self, i: u16) {
        if i < self.size {
            // SAFETY: i < size, inside the descriptor table mapping.
            prefetch(unsafe { self.desc.add(16 * i as usize) }, false);
        }
    }

    /// Descriptor `i`: (address, length, flags, next); None when out of range.
    #[inline]
    fn desc(&self, i: u16) -> Option<(u64, u32, u16, u16)> {
        if i >= self.size {
            return None;
        }
        // SAFETY: i < size and the table maps 16*size bytes, 16-aligned; fields are naturally aligned.
        unsafe {
            let p = self.desc.add(16 * i as usize);
            Some((
                u64::from_le(std::ptr::read_volatile(p as *const u64)),
                u32::from_le(std::ptr::read_volatile(p.add(8) as *const u32)),
                u16::from_le(std::ptr::read_volatile(p.add(12) as *const u16)),
                u16::from_le(std::ptr::read_volatile(p.add(14) as *const u16)),
            ))
        }
    }

    /// Writes used element `i` (not yet visible: see [`Ring::publish_used`]).
    #[inline]
    fn put_used(&self, i: u16, id: u16, len: u32) {
        let slot = (i & (self.size - 1)) as usize;
        // SAFETY: slot < size: 4 + 8*slot + 8 <= 6 + 8*size, inside the mapping; 4-aligned.
        unsafe {
            let p = self.used.add(4 + 8 * slot);
            std::ptr::write_volatile(p as *mut u32, (id as u32).to_le());
            std::ptr::write_volatile(p.add(4) as *mut u32, len.to_le());
        }
    }

    /// Makes every used element before `idx` visible to the guest at once.
    #[inline]
    fn publish_used(&self, idx: u16) {
        fence(Ordering::Release);
        // SAFETY: idx is at offset 2 of the mapped, 4-aligned used ring.
        unsafe { std::ptr::write_volatile(self.used.add(2) as *mut u16, idx.to_le()) };
        // The guest's flags are read after this store (notification decision).
        fence(Ordering::SeqCst);
    }
}

/// Starts loading the cache line at `p` (for writing when `write`). The
/// guest's rings and buffers were last touched by the guest's CPU, so every
/// first access is a cache miss; issuing them for a whole burst before the
/// first use lets the misses overlap instead of queueing one after another.
#[inline(always)]
fn prefetch(p: *const u8, write: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetches are hints; they never fault, whatever the address.
    // PREFETCHW is written out because without the `prfchw` target feature
    // LLVM lowers a write prefetch to a read one, which fetches the line
    // shared and leaves the store to pay a second coherence round trip; CPUs
    // without PREFETCHW execute its encoding (0F 0D /1) as a NOP.
    unsafe {
        if write {
            std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
        } else {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, write);
}

/// Most chains one prefetch pass looks ahead at.
const PREFETCH_AHEAD: usize = 64;

/// Prefetches, for up to `count` chains starting at avail slot `from`,
/// their first descriptor and then the first buffer it points at (`write`:
/// receive buffers we are about to fill).
fn prefetch_chains(map: &mut GuestMap, ring: &Ring, from: u16, count: usize, write: bool) {
    let count = count.min(PREFETCH_AHEAD);
    let mut heads = [0u16; PREFETCH_AHEAD];
    for (k, h) in heads[..count].iter_mut().enumerate() {
        *h = ring.avail_entry(from.wrapping_add(k as u16));
        ring.prefetch_desc(*h);
    }
    for &h in &heads[..count] {
        if let Some((addr, len, _, _)) = ring.desc(h) {
            let len = (len as usize).clamp(1, 128);
            if let Some(p) = map.translate(addr, len) {
                prefetch(p, write);
                if len > 64 {
                    // SAFETY: translate checked len bytes from p, and len > 64.
                    prefetch(unsafe { p.add(64) }, write);
                }
            }
        }
    }
}

/// A frame to transmit: whole, or a head and a tail (see
/// [`BurstPort::send_burst_split`]). The transmit path is compiled once for
/// each, so whole frames pay nothing for the split case.
trait FrameParts {
    fn head(&self) -> &[u8];
    fn tail(&self) -> &[u8];
}

impl FrameParts for &[u8] {
    #[inline(always)]
    fn head(&self) -> &[u8] {
        self
    }
    #[inline(always)]
    fn tail(&self) -> &[u8] {
        &[]
    }
}

impl FrameParts for (&[u8], &[u8]) {
    #[inline(always)]
    fn head(&self) -> &[u8] {
        self.0
    }
    #[inline(always)]
    fn tail(&self) -> &[u8] {
        self.1
    }
}

/// Writes bytes `from..from + k` of the frame made of `parts` (head, then
/// tail) to guest address `addr`.
#[inline(always)]
fn write_parts(map: &mut GuestMap, addr: u64, parts: (&[u8], &[u8]), from: usize, k: usize) -> bool {
    let (head, tail) = parts;
    let (mut addr, mut from, mut k) = (addr, from, k);
    if from < head.len() {
        let n = k.min(head.len() - from);
        if !map.write(addr, &head[from..from + n]) {
            return false;
        }
        addr += n as u64;
        from += n;
        k -= n;
    }
    if k > 0 {
        let o = from - head.len();
        return map.write(addr, &tail[o..o + k]);
    }
    true
}

/// Frames longer than this are split when the caller takes tails.
const SPLIT_MIN: usize = 512;

/// Copies the frame of a guest transmit chain (after the virtio-net header)
/// into `out`; None when the chain is malformed or the frame does not fit.
fn read_chain(map: &mut GuestMap, ring: &Ring, head: u16, hdr_len: usize, out: &mut [u8], tail: Option<&mut Tail>) -> Option<usize> {
    let mut skip = hdr_len;
    let mut len = 0;
    let mut idx = head;
    let mut tail = tail;
    for _ in 0..ring.size {
        let (addr, dlen, flags, next) = ring.desc(idx)?;
        if flags & (VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) != 0 {
            return None;
        }
        let mut addr = addr;
        let mut dl = dlen as usize;
        if skip > 0 {
            let s = skip.min(dl);
            addr += s as u64;
            dl -= s;
            skip -= s;
        }
        // A large frame in one buffer: copy its head, leave the rest in place.
        if len == 0 && dl > SPLIT_MIN && dl <= out.len() && flags & VRING_DESC_F_NEXT == 0 && skip == 0 {
            if let (Some(t), Some(p)) = (tail.as_deref_mut(), map.translate(addr, dl)) {
                // SAFETY: translate checked dl bytes at p; SPLIT_HEAD < SPLIT_MIN < dl.
                unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), SPLIT_HEAD) };
                // SAFETY: as above, p + SPLIT_HEAD .. p + dl is inside the checked range.
                *t = Tail { ptr: unsafe { p.add(SPLIT_HEAD) }, len: dl - SPLIT_HEAD };
                return Some(dl);
            }
        }
        if dl > 0 {
            if len + dl > out.len() || !map.read(addr, &mut out[len..len + dl]) {
                return None;
            }
            len += dl;
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return (skip == 0).then_some(len);
        }
        idx = next;
    }
    None
}

impl VhostUserPort {
    /// Picks up a new guest memory table (one atomic load per burst).
    fn sync_memory(&mut self, conn: &Connection) {
        let g = self.shared.mem_generation.load(Ordering::Acquire);
        if (g != self.map.generation || self.map.mem.is_none()) && !self.rx_pending {
            self.map.load(conn.mem.memory().into_inner(), g);
        }
    }

    /// Takes up to `bufs.len() - n` frames from guest transmit queue `q`:
    /// one vring lock, one read of the avail index, one used-index publish.
    fn poll_queue(&mut self, conn: &Connection, q: usize, hdr_len: usize, out: &mut RxOut<'_, '_>, mut n: usize) -> usize {
        let RxOut { bufs, lens, tails } = out;
        let mut st = conn.vrings[2 * q + 1].get_mut();
        if !st.is_enabled() || !st.get_queue().ready() {
            return n;
        }
        let queue = st.get_queue_mut();
        let Some(ring) = self.map.ring(2 * q + 1, queue) else { return n };
        let (mut next_avail, mut next_used) = (queue.next_avail(), queue.next_used());
        let pending = ring.avail_idx().wrapping_sub(next_avail);
        let take = if pending > ring.size { 0 } else { (pending as usize).min(bufs.len() - n) };
        let mut bad = 0u64;
        let mut split = false;
        if take > 0 {
            prefetch_chains(&mut self.map, &ring, next_avail, take, false);
        }
        for _ in 0..take {
            let head = ring.avail_entry(next_avail);
            next_avail = next_avail.wrapping_add(1);
            let tail = tails.as_deref_mut().map(|t| {
                t[n] = Tail::NONE;
                &mut t[n]
            });
            match read_chain(&mut self.map, &ring, head, hdr_len, &mut *bufs[n], tail) {
                Some(l) => {
                    lens[n] = l;
                    split |= tails.as_deref().is_some_and(|t| t[n].len > 0);
                    n += 1;
                }
                None => bad += 1,
            }
            ring.put_used(next_used, head, 0);
            next_used = next_used.wrapping_add(1);
        }
        if bad > 0 {
            self.shared.counters.rx_bad_chains.fetch_add(bad, Ordering::Relaxed);
        }
        if take > 0 {
            if split {
                // The guest gets these chains back at rx_done, once the tails are sent.
                self.deferred[q] = Some(next_used);
                self.rx_pending = true;
            } else {
                ring.publish_used(next_used);
            }
            queue.set_next_avail(next_avail);
            queue.set_next_used(next_used);
            self.shared.counters.rx_per_queue[q].fetch_add(take as u64, Ordering::Relaxed);
            self.empty_since[q] = None;
            if self.kicks_on[q] {
                if let Some(mem) = self.map.mem.clone() {
                    let _ = queue.disable_notification(&*mem);
                }
                self.kicks_on[q] = false;
            }
            if !split && ring.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT == 0 {
                self.shared.counters.calls.fetch_add(1, Ordering::Relaxed);
                let _ = st.signal_used_queue();
            }
        } else if !self.kicks_on[q] {
            // Look at the clock only every 64 empty polls: a poll is far shorter.
            self.empty_polls[q] = self.empty_polls[q].wrapping_add(1);
            let since = *self.empty_since[q].get_or_insert_with(std::time::Instant::now);
            if self.empty_polls[q].is_multiple_of(64) && since.elapsed() >= KICK_AFTER_IDLE {
                // Idle: ask for kicks again so that a sleeping worker wakes.
                // Buffers the guest added before it saw the flag would get
                // no kick, so wake ourselves for them.
                self.kicks_on[q] = true;
                self.empty_since[q] = None;
                if let Some(mem) = self.map.mem.clone() {
                    if queue.enable_notification(&*mem).unwrap_or(true) {
                        self.shared.wake();
                    }
                }
            }
        }
        n
    }

    fn poll_queues(&mut self, conn: &Connection, out: &mut RxOut<'_, '_>) -> usize {
        self.sync_memory(conn);
        let hdr_len = header_len(self.features());
        let mut n = 0;
        for k in 0..self.pairs {
            let q = (self.rx_cursor + k) % self.pairs;
            n = self.poll_queue(conn, q, hdr_len, out, n);
            if n == out.bufs.len() {
                break;
            }
        }
        if self.pairs > 0 {
            self.rx_cursor = (self.rx_cursor + 1) % self.pairs;
        }
        n
    }

    /// Gives the guest back the transmit chains of the burst that handed
    /// out tails: one used-index publish and at most one call per queue.
    fn publish_deferred(&mut self) {
        self.rx_pending = false;
        let Some(conn) = self.conn.clone() else {
            self.deferred = [None; MAX_QUEUE_PAIRS as usize];
            return;
        };
        for q in 0..self.pairs.min(MAX_QUEUE_PAIRS as usize) {
            let Some(idx) = self.deferred[q].take() else { continue };
            let st = conn.vrings[2 * q + 1].get_mut();
            let Some(ring) = self.map.ring(2 * q + 1, st.get_queue()) else { continue };
            ring.publish_used(idx);
            if ring.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT == 0 {
                self.shared.counters.calls.fetch_add(1, Ordering::Relaxed);
                let _ = st.signal_used_queue();
            }
        }
    }

    /// Puts the frames `pick` selects onto guest receive queue `q`: one vring
    /// lock, one used-index publish, at most one call. Returns how many went.
    /// A frame is given in two parts (head, tail), written one after the other.
    fn send_queue<F: FrameParts>(&mut self, conn: &Connection, q: usize, frames: &[F], pick: impl Fn(usize) -> bool) -> usize {
        let features = self.features();
        let max_chains = if features & VIRTIO_NET_F_MRG_RXBUF != 0 { MAX_MERGE } else { 1 };
        let hdr_len = header_len(features);
        let mut st = conn.vrings[2 * q].get_mut();
        if !st.is_enabled() || !st.get_queue().ready() {
            return 0;
        }
        let queue = st.get_queue_mut();
        let Some(ring) = self.map.ring(2 * q, queue) else { return 0 };
        if !self.rx_kicks_off[q] {
            // A frame that finds the receive ring full is dropped, never
            // parked until the guest adds buffers, so a kick for new receive
            // buffers would only cost the guest a system call and wake our
            // protocol thread on its CPU: ask the guest not to send them.
            if let Some(mem) = self.map.mem.clone() {
                self.rx_kicks_off[q] = queue.disable_notification(&*mem).is_ok();
            }
        }
        let (mut next_avail, mut next_used) = (queue.next_avail(), queue.next_used());
        let first_used = next_used;
        let mut avail_idx = ring.avail_idx();
        let ready = avail_idx.wrapping_sub(next_avail) as usize;
        if ready > 0 && ready <= ring.size as usize {
            prefetch_chains(&mut self.map, &ring, next_avail, ready.min(frames.len()), true);
        }
        let (mut sent, mut no_buffers) = (0usize, false);
        for (fi, f) in frames.iter().enumerate() {
            if !pick(fi) {
                continue;
            }
            let parts = (f.head(), f.tail());
            let frame_len = parts.0.len() + parts.1.len();
            let (start_avail, start_used) = (next_avail, next_used);
            let mut written = 0usize;
            let mut hdr_at: Option<u64> = None;
            let mut nb = 0u16;
            let ok = loop {
                if written == frame_len && hdr_at.is_some() {
                    break true;
                }
                if nb as usize == max_chains {
                    break false;
                }
                if next_avail == avail_idx {
                    avail_idx = ring.avail_idx();
                    if next_avail == avail_idx || avail_idx.wrapping_sub(next_avail) > ring.size {
                        no_buffers = true;
                        break false;
                    }
                }
                let head = ring.avail_entry(next_avail);
                next_avail = next_avail.wrapping_add(1);
                let mut chain_len = 0usize;
                let mut bad = false;
                let mut idx = head;
                for _ in 0..ring.size {
                    let Some((addr, dlen, flags, next)) = ring.desc(idx) else {
                        bad = true;
                        break;
                    };
                    if flags & VRING_DESC_F_WRITE == 0 || flags & VRING_DESC_F_INDIRECT != 0 {
                        bad = true;
                        break;
                    }
                    let (mut addr, mut room) = (addr, dlen as usize);
                    if hdr_at.is_none() {
                        // The header goes first, whole, into the first buffer.
                        if room < hdr_len {
                            bad = true;
                            break;
                        }
                        hdr_at = Some(addr);
                        addr += hdr_len as u64;
                        room -= hdr_len;
                        chain_len += hdr_len;
                    }
                    let k = room.min(frame_len - written);
                    if k > 0 {
                        if !write_parts(&mut self.map, addr, parts, written, k) {
                            bad = true;
                            break;
                        }
                        written += k;
                        chain_len += k;
                    }
                    if written == frame_len || flags & VRING_DESC_F_NEXT == 0 {
                        break;
                    }
                    idx = next;
                }
                ring.put_used(next_used, head, chain_len as u32);
                next_used = next_used.wrapping_add(1);
                nb += 1;
                if bad {
                    break false;
                }
            };
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10..12].copy_from_slice(&nb.to_le_bytes());
            if !ok || !hdr_at.is_some_and(|at| self.map.write(at, &hdr[..hdr_len])) {
                // Give the chains back: the guest sees none of what we wrote.
                next_avail = start_avail;
                next_used = start_used;
                if no_buffers {
                    break;
                }
                continue;
            }
            sent += 1;
        }
        if next_used != first_used {
            ring.publish_used(next_used);
            queue.set_next_avail(next_avail);
            queue.set_next_used(next_used);
            if ring.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT == 0 {
                self.shared.counters.calls.fetch_add(1, Ordering::Relaxed);
                let _ = st.signal_used_queue();
            }
        }
        sent
    }
}

/// Where a receive burst goes: frames (or heads), lengths, and tails when the caller takes them.
struct RxOut<'a, 'b> {
    bufs: &'a mut [&'b mut [u8]],
    lens: &'a mut [usize],
    tails: Option<&'a mut [Tail]>,
}

impl VhostUserPort {
    fn recv_inner(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize], tails: Option<&mut [Tail]>) -> usize {
        if self.rx_pending {
            // The previous burst was never finished (its caller dropped it): finish it now.
            self.publish_deferred();
        }
        if self.shared.wake_pending.load(Ordering::Relaxed) && self.shared.wake_pending.swap(false, Ordering::AcqRel) {
            let _ = self.shared.wake.read();
        }
        self.refresh();
        let Some(conn) = self.conn.take() else { return 0 };
        let n = self.poll_queues(&conn, &mut RxOut { bufs, lens, tails });
        self.conn = Some(conn);
        n
    }

    fn send_frames<F: FrameParts>(&mut self, frames: &[F]) -> usize {
        self.refresh();
        let Some(conn) = self.conn.take() else { return 0 };
        self.sync_memory(&conn);
        let sent = if self.pairs <= 1 {
            self.send_queue(&conn, 0, frames, |_| true)
        } else {
            // Keep a flow on one queue; a queue the guest has not enabled sends on queue 0.
            let mut which = [0u8; 256];
            let n = frames.len().min(which.len());
            for (i, f) in frames[..n].iter().enumerate() {
                which[i] = flow_queue(f.head(), self.pairs) as u8;
            }
            for q in 1..self.pairs {
                if which[..n].contains(&(q as u8)) && !conn.vrings[2 * q].get_ref().is_enabled() {
                    which[..n].iter_mut().filter(|w| **w == q as u8).for_each(|w| *w = 0);
                }
            }
            (0..self.pairs).filter(|q| which[..n].contains(&(*q as u8))).map(|q| self.send_queue(&conn, q, &frames[..n], |i| which[i] == q as u8)).sum()
        };
        if sent < frames.len() {
            self.shared.counters.tx_no_buffers.fetch_add((frames.len() - sent) as u64, Ordering::Relaxed);
        }
        self.conn = Some(conn);
        sent
    }
}

impl BurstPort for VhostUserPort {
    fn recv_burst(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> usize {
        self.recv_inner(bufs, lens, None)
    }

    fn recv_burst_split(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize], tails: &mut [Tail]) -> usize {
        self.recv_inner(bufs, lens, Some(tails))
    }

    fn rx_done(&mut self) {
        if self.rx_pending {
            self.publish_deferred();
        }
    }

    fn supports_split(&self) -> bool {
        true
    }

    fn send_burst_split(&mut self, frames: &[(&[u8], &[u8])]) -> usize {
        self.send_frames(frames)
    }

    fn send_burst(&mut self, frames: &[&[u8]]) -> usize {
        self.send_frames(frames)
    }

    fn fd(&self) -> RawFd {
        self.shared.wake.as_raw_fd()
    }
}

/// The receive queue of a frame: a hash of its IPv4 addresses and ports, so
/// a flow stays on one queue.
fn flow_queue(frame: &[u8], pairs: usize) -> usize {
    let h = if frame.len() >= 38 && frame[12] == 0x08 && frame[13] == 0x00 {
        frame[26..38].iter().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(*b as u32))
    } else {
        0
    };
    h as usize % pairs
}
