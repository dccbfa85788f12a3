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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringMutex, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{DescriptorChain, Error as QueueError, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ports::BurstPort;

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
        // The handler replaces the mapping inside the GuestMemoryAtomic the port
        // already holds; workers see it at their next burst.
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
    /// Per transmit vring: since when it has been found empty (kicks still off).
    empty_since: [Option<std::time::Instant>; MAX_QUEUE_PAIRS as usize],
    /// Receive vrings with used entries not yet signalled, as a bit set.
    tx_pending: u32,
}

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
            empty_since: [None; MAX_QUEUE_PAIRS as usize],
            tx_pending: 0,
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
        if g == self.generation {
            return;
        }
        self.generation = g;
        self.conn = self.shared.conn.read().expect("connection lock").clone();
        self.pairs = self.conn.as_ref().map(|c| c.vrings.len() / 2).unwrap_or(0);
        self.kicks_on = [true; MAX_QUEUE_PAIRS as usize];
        self.empty_since = [None; MAX_QUEUE_PAIRS as usize];
        self.tx_pending = 0;
        self.rx_cursor = 0;
    }

    fn features(&self) -> u64 {
        self.shared.acked_features.load(Ordering::Acquire)
    }

    fn choose_tx_queue(&self, conn: &Connection, frame: &[u8]) -> usize {
        if self.pairs <= 1 {
            return 0;
        }
        // Keep a flow on one queue: hash the IPv4 addresses and ports when present.
        let h = if frame.len() >= 38 && frame[12] == 0x08 && frame[13] == 0x00 {
            frame[26..38].iter().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(*b as u32))
        } else {
            0
        };
        let q = h as usize % self.pairs;
        if conn.vrings[2 * q].get_ref().is_enabled() {
            q
        } else {
            0
        }
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

/// Copies the frame of a guest transmit chain (after the virtio-net header)
/// into `out`; None when the chain is malformed or the frame does not fit.
fn read_chain<M>(mem: &GuestMemoryMmap<()>, chain: DescriptorChain<M>, hdr_len: usize, out: &mut [u8]) -> Option<usize>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut skip = hdr_len;
    let mut len = 0;
    for d in chain {
        if d.is_write_only() {
            return None;
        }
        let mut addr = d.addr().0;
        let mut dl = d.len() as usize;
        if skip > 0 {
            let s = skip.min(dl);
            addr += s as u64;
            dl -= s;
            skip -= s;
        }
        if dl == 0 {
            continue;
        }
        if len + dl > out.len() {
            return None;
        }
        mem.read_slice(&mut out[len..len + dl], GuestAddress(addr)).ok()?;
        len += dl;
    }
    if skip > 0 {
        return None;
    }
    Some(len)
}

impl VhostUserPort {
    fn poll_queues(&mut self, conn: &Connection, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> usize {
        let mem = conn.mem.memory();
        let hdr_len = header_len(self.features());
        let mut n = 0;
        for k in 0..self.pairs {
            let q = (self.rx_cursor + k) % self.pairs;
            let mut st = conn.vrings[2 * q + 1].get_mut();
            if !st.is_enabled() || !st.get_queue().ready() {
                continue;
            }
            let (took, notify) = {
                let queue = st.get_queue_mut();
                let mut took = 0usize;
                while n < bufs.len() {
                    let Some(chain) = queue.pop_descriptor_chain(&*mem) else { break };
                    let head = chain.head_index();
                    match read_chain(&mem, chain, hdr_len, &mut *bufs[n]) {
                        Some(l) => {
                            lens[n] = l;
                            n += 1;
                        }
                        None => {
                            self.shared.counters.rx_bad_chains.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let _ = queue.add_used(&*mem, head, 0);
                    took += 1;
                }
                if took > 0 {
                    self.shared.counters.rx_per_queue[q].fetch_add(took as u64, Ordering::Relaxed);
                    self.empty_since[q] = None;
                    if self.kicks_on[q] {
                        let _ = queue.disable_notification(&*mem);
                        self.kicks_on[q] = false;
                    }
                    (took, queue.needs_notification(&*mem).unwrap_or(true))
                } else {
                    if !self.kicks_on[q] {
                        let since = *self.empty_since[q].get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= KICK_AFTER_IDLE {
                            // Idle: ask for kicks again so that a sleeping worker wakes.
                            // Buffers the guest added before it saw the flag would get
                            // no kick, so wake ourselves for them.
                            self.kicks_on[q] = true;
                            self.empty_since[q] = None;
                            if queue.enable_notification(&*mem).unwrap_or(true) {
                                self.shared.wake();
                            }
                        }
                    }
                    (0, false)
                }
            };
            if took > 0 && notify {
                self.shared.counters.calls.fetch_add(1, Ordering::Relaxed);
                let _ = st.signal_used_queue();
            }
            if n == bufs.len() {
                break;
            }
        }
        if self.pairs > 0 {
            self.rx_cursor = (self.rx_cursor + 1) % self.pairs;
        }
        n
    }

    fn send_on(&mut self, conn: &Connection, frame: &[u8]) -> bool {
        let mem = conn.mem.memory();
        let features = self.features();
        let mergeable = features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let hdr_len = header_len(features);
        let q = self.choose_tx_queue(conn, frame);
        let mut st = conn.vrings[2 * q].get_mut();
        if !st.is_enabled() || !st.get_queue().ready() {
            return false;
        }
        let queue = st.get_queue_mut();
        let mut used = [(0u16, 0u32); MAX_MERGE];
        let mut nb = 0usize;
        let mut written = 0usize; // frame bytes written
        let mut hdr_addr = None;
        let max_chains = if mergeable { MAX_MERGE } else { 1 };
        let ok = loop {
            if written == frame.len() && hdr_addr.is_some() {
                break true;
            }
            if nb == max_chains {
                break false;
            }
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                self.shared.counters.tx_no_buffers.fetch_add(1, Ordering::Relaxed);
                break false;
            };
            let head = chain.head_index();
            let mut chain_len = 0usize;
            let mut bad = false;
            for d in chain {
                if !d.is_write_only() {
                    bad = true;
                    break;
                }
                let mut addr = d.addr().0;
                let mut room = d.len() as usize;
                if hdr_addr.is_none() {
                    // The header goes first, whole, into the first buffer.
                    if room < hdr_len {
                        bad = true;
                        break;
                    }
                    hdr_addr = Some(GuestAddress(addr));
                    addr += hdr_len as u64;
                    room -= hdr_len;
                    chain_len += hdr_len;
                }
                let k = room.min(frame.len() - written);
                if k > 0 {
                    if mem.write_slice(&frame[written..written + k], GuestAddress(addr)).is_err() {
                        bad = true;
                        break;
                    }
                    written += k;
                    chain_len += k;
                }
                if written == frame.len() {
                    break;
                }
            }
            used[nb] = (head, chain_len as u32);
            nb += 1;
            if bad {
                break false;
            }
        };
        if !ok {
            // Give the chains back: the guest sees none of what we wrote.
            let next = queue.next_avail().wrapping_sub(nb as u16);
            queue.set_next_avail(next);
            return false;
        }
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[10..12].copy_from_slice(&(nb as u16).to_le_bytes());
        let Some(at) = hdr_addr else { return false };
        if mem.write_slice(&hdr[..hdr_len], at).is_err() {
            let next = queue.next_avail().wrapping_sub(nb as u16);
            queue.set_next_avail(next);
            return false;
        }
        for (head, len) in &used[..nb] {
            let _ = queue.add_used(&*mem, *head, *len);
        }
        self.tx_pending |= 1 << q;
        true
    }
}

impl BurstPort for VhostUserPort {
    fn recv_burst(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> usize {
        if self.shared.wake_pending.load(Ordering::Relaxed) && self.shared.wake_pending.swap(false, Ordering::AcqRel) {
            let _ = self.shared.wake.read();
        }
        self.refresh();
        let Some(conn) = self.conn.take() else { return 0 };
        let n = self.poll_queues(&conn, bufs, lens);
        self.conn = Some(conn);
        n
    }

    fn send(&mut self, frame: &[u8]) -> bool {
        self.refresh();
        let Some(conn) = self.conn.take() else { return false };
        let ok = self.send_on(&conn, frame);
        self.conn = Some(conn);
        ok
    }

    fn flush(&mut self) {
        if self.tx_pending == 0 {
            return;
        }
        let Some(conn) = self.conn.take() else {
            self.tx_pending = 0;
            return;
        };
        let mem = conn.mem.memory();
        while self.tx_pending != 0 {
            let q = self.tx_pending.trailing_zeros() as usize;
            self.tx_pending &= !(1 << q);
            let mut st = conn.vrings[2 * q].get_mut();
            if st.get_queue_mut().needs_notification(&*mem).unwrap_or(true) {
                self.shared.counters.calls.fetch_add(1, Ordering::Relaxed);
                let _ = st.signal_used_queue();
            }
        }
        drop(mem);
        self.conn = Some(conn);
    }

    fn fd(&self) -> RawFd {
        self.shared.wake.as_raw_fd()
    }
}
