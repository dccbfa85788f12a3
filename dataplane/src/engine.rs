//! The userspace datapath engine: poll-mode worker threads that receive bursts
//! of packets, look them up in an exact-match cache, then a megaflow cache, and
//! only on a miss run the pipeline (once, installing a megaflow). Packets are
//! processed run-to-completion in preallocated buffers.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::conntrack::Conntrack;
use crate::flow::FlowKey;
use crate::mac::MacAddr;
use crate::packet::{self, Layout, ParseError};
use crate::pipeline::{DpAction, Pipeline, RecircTable, TraceStep, Translation};
use crate::ports::{AfPacket, Encap, Tail, Tap, Tunnel};

/// Packets received per port per poll.
pub const BURST: usize = 32;
const HEADROOM: usize = 64;
const BUF_SIZE: usize = HEADROOM + 4096;
const EMC_SIZE: usize = 8192;
const MAX_MEGAFLOWS: usize = 200_000;
const MAX_RECIRC: usize = 6;

/// A hasher for flow keys and conntrack tuples, whose `Hash` feeds it words
/// (FxHash-style; not for keys an attacker picks to collide).
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // A multiply only carries a word's bits upward, so keys that differ in
        // their high bits (IPv4 addresses sit in the top half of a word) would
        // share the low bits a table indexes by. A full avalanche (MurmurHash3's
        // 64-bit finalizer) moves every input bit into the low bits.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ *b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type KeyMap<V> = HashMap<FlowKey, V, BuildHasherDefault<KeyHasher>>;

/// What a port is.
pub enum PortKind {
    /// An AF_PACKET socket on a kernel interface.
    AfPacket(AfPacket),
    /// The VXLAN tunnel port.
    Tunnel(Tunnel),
    /// A port with rings of its own (vhost-user, DPDK ethdev), polled in bursts.
    Burst(Box<dyn crate::ports::BurstPort>),
    /// An internal tap interface.
    Tap(Tap),
    /// VXLAN encapsulated by the datapath over a frame port on the underlay.
    Underlay(crate::ports::VxlanUnderlay),
}

/// Per-port counters.
#[derive(Debug, Default)]
pub struct PortCounters {
    /// Packets received.
    pub rx: AtomicU64,
    /// Packets sent.
    pub tx: AtomicU64,
    /// Packets that could not be sent (ring full).
    pub tx_dropped: AtomicU64,
}

/// A port attached to the engine.
pub struct Port {
    /// Name (interface name, or "vxlan").
    pub name: String,
    io: Mutex<PortKind>,
    fd: i32,
    /// Whether the port takes frames in two parts (head, tail in another guest's memory).
    split: bool,
    /// Counters.
    pub counters: PortCounters,
}

/// Engine-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets received by all ports.
    pub packets: AtomicU64,
    /// Exact-match cache hits (per pass, recirculations included).
    pub emc_hits: AtomicU64,
    /// Megaflow cache hits.
    pub megaflow_hits: AtomicU64,
    /// Misses that ran the pipeline.
    pub upcalls: AtomicU64,
    /// Frames that failed to parse, by [`ParseError`] index.
    pub parse_errors: [AtomicU64; ParseError::COUNT],
    /// Megaflows kept by the last revalidations.
    pub revalidated_kept: AtomicU64,
    /// Megaflows removed by revalidations.
    pub revalidated_removed: AtomicU64,
    /// TSC cycles workers spent in poll rounds that found packets (as OVS's
    /// "processing cycles"), receive to transmit included.
    pub busy_cycles: AtomicU64,
    /// Packets processed in those rounds.
    pub busy_packets: AtomicU64,
    /// Bursts received (non-empty polls of a port).
    pub bursts: AtomicU64,
}

/// Conntrack shards: a zone's connections (both directions, NAT included)
/// live in shard `zone % CT_SHARDS`, so workers on different zones never meet
/// on a lock, and a worker takes each shard's lock at most once per burst.
pub const CT_SHARDS: usize = 16;

struct Shared {
    /// The pipeline, swapped whole (RCU-like): workers compare `pipeline_version`
    /// once per poll round and take the lock only when it moved.
    pipeline: RwLock<Arc<Pipeline>>,
    pipeline_version: AtomicU64,
    recirc: Mutex<RecircTable>,
    conntrack: Vec<Mutex<Conntrack>>,
    /// Ports by number - 1, swapped whole like the pipeline.
    ports: RwLock<Vec<Option<Arc<Port>>>>,
    ports_version: AtomicU64,
    learned: Mutex<Vec<(u32, Ipv4Addr, MacAddr)>>,
    drops: Mutex<HashMap<&'static str, u64>>,
    megaflow_count: Vec<AtomicU64>,
    stop: AtomicBool,
    counters: Counters,
    start: Instant,
}

impl Shared {
    fn ct_shard(&self, zone: u16) -> &Mutex<Conntrack> {
        &self.conntrack[zone as usize % CT_SHARDS]
    }
}

/// Engine settings.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// Number of poll-mode worker threads (at least one).
    pub workers: usize,
    /// CPUs to pin workers to, in order (none: not pinned).
    pub pin: Vec<usize>,
    /// Busy-poll this many empty rounds before sleeping in poll(2); 0 sleeps at once.
    pub busy_rounds: u32,
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStats {
    /// Packets received.
    pub packets: u64,
    /// Exact-match cache hits.
    pub emc_hits: u64,
    /// Megaflow hits.
    pub megaflow_hits: u64,
    /// Pipeline runs.
    pub upcalls: u64,
    /// Installed megaflows (all workers).
    pub megaflows: u64,
    /// Cache hit rate over all lookups, 0..1.
    pub hit_rate: f64,
    /// Parse errors by reason.
    pub parse_errors: Vec<(String, u64)>,
    /// Drops by reason.
    pub drops: Vec<(String, u64)>,
    /// Per-port (number, name, rx, tx, tx_dropped).
    pub ports: Vec<(u32, String, u64, u64, u64)>,
    /// Conntrack entries.
    pub connections: usize,
    /// Megaflows kept / removed by revalidation.
    pub revalidated: (u64, u64),
    /// TSC cycles spent processing packets (poll rounds that found some).
    pub busy_cycles: u64,
    /// Packets those cycles processed.
    pub busy_packets: u64,
    /// Non-empty bursts received.
    pub bursts: u64,
}

/// The running datapath.
pub struct Engine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Starts the worker threads with an empty pipeline.
    pub fn start(cfg: EngineConfig) -> Engine {
        let n = cfg.workers.max(1);
        let shared = Arc::new(Shared {
            pipeline: RwLock::new(Arc::new(Pipeline::default())),
            pipeline_version: AtomicU64::new(1),
            recirc: Mutex::new(RecircTable::default()),
            conntrack: (0..CT_SHARDS).map(|_| Mutex::new(Conntrack::new(1_000_000))).collect(),
            ports: RwLock::new(Vec::new()),
            ports_version: AtomicU64::new(1),
            learned: Mutex::new(Vec::new()),
            drops: Mutex::new(HashMap::new()),
            megaflow_count: (0..n).map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            start: Instant::now(),
        });
        let workers = (0..n)
            .map(|i| {
                let shared = shared.clone();
                let cpu = cfg.pin.get(i).copied();
                let busy = cfg.busy_rounds;
                std::thread::Builder::new()
                    .name(format!("dp-worker-{i}"))
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            pin_to(cpu);
                        }
                        Worker::new(i, n, shared, busy).run()
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        Engine { shared, workers }
    }

    /// Attaches a port; returns its datapath port number (from 1).
    pub fn add_port(&self, name: &str, kind: PortKind) -> u32 {
        let fd = match &kind {
            PortKind::AfPacket(p) => p.fd(),
            PortKind::Tunnel(t) => t.fd(),
            PortKind::Burst(b) => b.fd(),
            PortKind::Tap(t) => t.fd(),
            PortKind::Underlay(u) => crate::ports::Encap::fd(u),
        };
        let split = match &kind {
            PortKind::Burst(b) => b.supports_split(),
            PortKind::Underlay(u) => u.supports_split(),
            _ => false,
        };
        let port = Arc::new(Port { name: name.to_string(), io: Mutex::new(kind), fd, split, counters: PortCounters::default() });
        let mut list = self.shared.ports.write().expect("ports lock");
        let slot = list.iter().position(Option::is_none);
        let idx = match slot {
            Some(i) => {
                list[i] = Some(port);
                i
            }
            None => {
                list.push(Some(port));
                list.len() - 1
            }
        };
        self.shared.ports_version.fetch_add(1, Ordering::Release);
        idx as u32 + 1
    }

    /// Detaches a port.
    pub fn remove_port(&self, no: u32) {
        let mut list = self.shared.ports.write().expect("ports lock");
        if let Some(slot) = list.get_mut(no as usize - 1) {
            *slot = None;
        }
        self.shared.ports_version.fetch_add(1, Ordering::Release);
    }

    /// Installs a new pipeline; workers revalidate their megaflows against it.
    pub fn set_pipeline(&self, p: Pipeline) {
        *self.shared.pipeline.write().expect("pipeline lock") = Arc::new(p);
        self.shared.pipeline_version.fetch_add(1, Ordering::Release);
    }

    /// The current pipeline.
    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.shared.pipeline.read().expect("pipeline lock").clone()
    }

    /// Neighbours learned since the last call (network, address, MAC).
    pub fn take_learned(&self) -> Vec<(u32, Ipv4Addr, MacAddr)> {
        std::mem::take(&mut *self.shared.learned.lock().expect("learned lock"))
    }

    /// Runs a key through the current pipeline, recording each table step.
    pub fn trace(&self, key: &FlowKey) -> (Translation, Vec<TraceStep>) {
        let p = self.pipeline();
        let mut steps = Vec::new();
        let t = p.translate(key, &mut self.shared.recirc.lock().expect("recirc lock"), Some(&mut steps));
        (t, steps)
    }

    /// Conntrack entries as text.
    pub fn connections(&self) -> Vec<String> {
        self.shared.conntrack.iter().flat_map(|c| c.lock().expect("conntrack lock").connections().map(|c| c.to_string()).collect::<Vec<_>>()).collect()
    }

    /// The conntrack state `key` would get in `zone` (for traces; changes nothing).
    pub fn conntrack_peek(&self, key: &FlowKey, zone: u16) -> u8 {
        self.shared.ct_shard(zone).lock().expect("conntrack lock").peek(key, zone)
    }

    /// What the NAT of ct() step `ct` would do to `key` (see [`Conntrack::peek_nat`]).
    pub fn conntrack_peek_nat(&self, key: &FlowKey, ct: &crate::pipeline::CtAction) -> Option<crate::conntrack::NatPeek> {
        self.shared.ct_shard(ct.zone).lock().expect("conntrack lock").peek_nat(key, ct.zone, ct.nat, ct.commit)
    }

    /// Drops connections that `keep` rejects (after a security group change).
    pub fn retain_connections(&self, mut keep: impl FnMut(&crate::conntrack::Connection) -> bool) -> usize {
        self.shared.conntrack.iter().map(|c| c.lock().expect("conntrack lock").retain(&mut keep)).sum()
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        let emc = c.emc_hits.load(Ordering::Relaxed);
        let mf = c.megaflow_hits.load(Ordering::Relaxed);
        let up = c.upcalls.load(Ordering::Relaxed);
        let total = emc + mf + up;
        EngineStats {
            packets: c.packets.load(Ordering::Relaxed),
            emc_hits: emc,
            megaflow_hits: mf,
            upcalls: up,
            megaflows: self.shared.megaflow_count.iter().map(|m| m.load(Ordering::Relaxed)).sum(),
            hit_rate: if total == 0 { 0.0 } else { (emc + mf) as f64 / total as f64 },
            parse_errors: (0..ParseError::COUNT).map(|i| (ParseError::name(i).to_string(), c.parse_errors[i].load(Ordering::Relaxed))).collect(),
            drops: {
                let mut d: Vec<(String, u64)> = self.shared.drops.lock().expect("drops lock").iter().map(|(k, v)| (k.to_string(), *v)).collect();
                d.sort();
                d
            },
            ports: self
                .shared
                .ports
                .read()
                .expect("ports lock")
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.as_ref().map(|p| (i as u32 + 1, p.name.clone(), p.counters.rx.load(Ordering::Relaxed), p.counters.tx.load(Ordering::Relaxed), p.counters.tx_dropped.load(Ordering::Relaxed))))
                .collect(),
            connections: self.shared.conntrack.iter().map(|c| c.lock().expect("conntrack lock").len()).sum(),
            revalidated: (c.revalidated_kept.load(Ordering::Relaxed), c.revalidated_removed.load(Ordering::Relaxed)),
            busy_cycles: c.busy_cycles.load(Ordering::Relaxed),
            busy_packets: c.busy_packets.load(Ordering::Relaxed),
            bursts: c.bursts.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity(0) affects this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The time-stamp counter, for cycles-per-packet accounting (OVS's PMD
/// statistics count the same unit).
#[inline]
fn tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions; it only reads the time-stamp counter.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// A packet buffer with headroom for pushed headers. A large frame from a
/// port that splits ([`crate::ports::BurstPort::recv_burst_split`]) holds
/// only its head here; the rest (`tail`) stays in the sending guest's
/// memory until the frame is sent (one copy, guest to guest) or something
/// needs the whole frame ([`Buf::join`]).
struct Buf {
    data: Box<[u8]>,
    start: usize,
    /// The frame's length, tail included.
    len: usize,
    tail: Tail,
}

impl Buf {
    fn new() -> Buf {
        Buf { data: vec![0u8; BUF_SIZE].into_boxed_slice(), start: HEADROOM, len: 0, tail: Tail::NONE }
    }
    /// The whole frame; only for a frame without a tail.
    fn frame(&self) -> &[u8] {
        debug_assert_eq!(self.tail.len, 0, "frame() of a split frame");
        &self.data[self.start..self.start + self.len]
    }
    /// The bytes held here: the whole frame, or the head of a split one.
    fn head(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len - self.tail.len]
    }
    fn head_mut(&mut self) -> &mut [u8] {
        let end = self.start + self.len - self.tail.len;
        &mut self.data[self.start..end]
    }
    /// Copies the tail in after the head (the frame is whole afterwards).
    fn join(&mut self) {
        if self.tail.len == 0 {
            return;
        }
        let at = self.start + self.len - self.tail.len;
        // SAFETY: the tail belongs to the receive burst being processed (its
        // port's rx_done comes after this burst), and the port only splits
        // frames that fit this buffer whole.
        let tail = unsafe { self.tail.bytes() };
        self.data[at..at + tail.len()].copy_from_slice(tail);
        self.tail = Tail::NONE;
    }
}

struct Megaflow {
    key: FlowKey,
    mask: FlowKey,
    actions: Box<[DpAction]>,
}

#[derive(Default)]
struct MegaflowCache {
    subtables: Vec<(FlowKey, KeyMap<usize>)>,
    flows: Vec<Option<Megaflow>>,
    free: Vec<usize>,
    count: usize,
}

impl MegaflowCache {
    fn lookup(&self, key: &FlowKey) -> Option<usize> {
        for (mask, map) in &self.subtables {
            if let Some(i) = map.get(&key.masked(mask)) {
                return Some(*i);
            }
        }
        None
    }

    fn insert(&mut self, key: &FlowKey, t: &Translation) -> Option<usize> {
        if self.count >= MAX_MEGAFLOWS {
            return None;
        }
        let masked = key.masked(&t.mask);
        let flow = Megaflow { key: masked, mask: t.mask, actions: t.actions.clone().into_boxed_slice() };
        let idx = match self.free.pop() {
            Some(i) => {
                self.flows[i] = Some(flow);
                i
            }
            None => {
                self.flows.push(Some(flow));
                self.flows.len() - 1
            }
        };
        let sub = match self.subtables.iter().position(|(m, _)| *m == t.mask) {
            Some(s) => s,
            None => {
                self.subtables.push((t.mask, KeyMap::default()));
                self.subtables.len() - 1
            }
        };
        self.subtables[sub].1.insert(masked, idx);
        self.count += 1;
        Some(idx)
    }

    /// Re-translates every flow against `p`; keeps those whose actions are
    /// unchanged and whose decision needs no bits beyond their mask.
    fn revalidate(&mut self, p: &Pipeline, recirc: &mut RecircTable) -> (u64, u64) {
        let (mut kept, mut removed) = (0, 0);
        for i in 0..self.flows.len() {
            let Some(f) = &self.flows[i] else { continue };
            let t = p.translate(&f.key, recirc, None);
            let extra = {
                let mut m = t.mask;
                let (mw, ow) = (m.words_mut(), f.mask.words());
                let mut any = false;
                for j in 0..mw.len() {
                    mw[j] &= !ow[j];
                    any |= mw[j] != 0;
                }
                any
            };
            if !extra && t.actions[..] == f.actions[..] {
                kept += 1;
                continue;
            }
            let (key, mask) = (f.key, f.mask);
            if let Some((_, map)) = self.subtables.iter_mut().find(|(m, _)| *m == mask) {
                map.remove(&key);
            }
            self.flows[i] = None;
            self.free.push(i);
            self.count -= 1;
            removed += 1;
        }
        self.subtables.retain(|(_, m)| !m.is_empty());
        (kept, removed)
    }
}

#[derive(Clone, Copy)]
struct EmcEntry {
    hash: u64,
    key: FlowKey,
    flow: u32,
    valid: bool,
}

/// Where the actions of one lookup are: a cached megaflow, or (when the
/// cache is full) the worker's scratch list.
#[derive(Clone, Copy)]
enum ActRef {
    Flow(u32),
    Temp,
}

/// Where a frame to transmit is: a received buffer (its last output goes
/// without a copy) or a copy taken for an earlier output of the same packet.
#[derive(Clone, Copy)]
enum TxSrc {
    Rx(u16),
    Copy(u16),
}

/// One frame staged for transmission at the end of the burst.
#[derive(Clone, Copy)]
struct TxEntry {
    port: u32,
    src: TxSrc,
    tunnel: Option<(u32, Ipv4Addr)>,
}

/// Counters a worker keeps to itself and publishes once per burst.
#[derive(Default)]
struct LocalCounters {
    emc_hits: u64,
    megaflow_hits: u64,
    upcalls: u64,
    parse_errors: [u64; ParseError::COUNT],
    any_parse_error: bool,
    drops: Vec<(&'static str, u64)>,
}

/// Conntrack shard locks held during one burst: each shard is locked at most
/// once per burst and all are released at its end.
struct CtLocks<'a> {
    shards: &'a [Mutex<Conntrack>],
    held: [Option<MutexGuard<'a, Conntrack>>; CT_SHARDS],
}

impl<'a> CtLocks<'a> {
    fn new(shards: &'a [Mutex<Conntrack>]) -> CtLocks<'a> {
        CtLocks { shards, held: std::array::from_fn(|_| None) }
    }

    fn get(&mut self, zone: u16) -> &mut Conntrack {
        let i = zone as usize % CT_SHARDS;
        if self.held[i].is_none() {
            let g = match self.shards[i].try_lock() {
                Ok(g) => g,
                Err(TryLockError::WouldBlock) => {
                    // Never wait while holding another shard: a worker holding this
                    // one could be waiting for ours.
                    for h in self.held.iter_mut() {
                        *h = None;
                    }
                    self.shards[i].lock().expect("conntrack lock")
                }
                Err(TryLockError::Poisoned(e)) => panic!("conntrack lock poisoned: {e}"),
            };
            self.held[i] = Some(g);
        }
        self.held[i].as_deref_mut().expect("shard locked above")
    }
}

/// The receive areas of the worker's BURST buffers (after the headroom),
/// each buffer reset to start there.
fn rx_slices(bufs: &mut [Buf]) -> [&mut [u8]; BURST] {
    let mut it = bufs.iter_mut();
    std::array::from_fn(|_| {
        let b = it.next().expect("BURST buffers");
        b.start = HEADROOM;
        &mut b.data[HEADROOM..]
    })
}

/// Whether `a` reads and writes only a frame's headers (Ethernet, IP, the
/// transport ports and checksums), so that a split frame's head suffices.
fn touches_headers_only(a: &DpAction) -> bool {
    matches!(
        a,
        DpAction::SetEthSrc(_)
            | DpAction::SetEthDst(_)
            | DpAction::SetIpSrc(_)
            | DpAction::SetIpDst(_)
            | DpAction::DecTtl
            | DpAction::PopVlan
            | DpAction::PushVlan(_)
            | DpAction::Output(_)
            | DpAction::OutputInPort
            | DpAction::Tunnel { .. }
            | DpAction::LearnNeighbor { .. }
            | DpAction::Drop(_)
    )
}

/// Most frames handed to a port in one call.
const TX_CHUNK: usize = 64;

struct Worker {
    id: usize,
    workers: usize,
    shared: Arc<Shared>,
    busy_rounds: u32,
    pipeline: Arc<Pipeline>,
    pipeline_version: u64,
    ports: Vec<Option<Arc<Port>>>,
    ports_version: u64,
    emc: Vec<EmcEntry>,
    mf: MegaflowCache,
    bufs: Vec<Buf>,
    meta: Vec<(u32, Ipv4Addr)>,
    /// Copies for outputs that are not a packet's last; reused every burst.
    copies: Vec<Buf>,
    ncopies: usize,
    /// Frames staged for transmission, sent per port at the end of the burst.
    tx: Vec<TxEntry>,
    /// Actions of an upcall the megaflow cache had no room for.
    temp: Vec<DpAction>,
    local: LocalCounters,
    /// Engine clock, read once per burst (conntrack timestamps).
    now: Duration,
    /// Per recirculation pass, the last key looked up in this burst and its actions.
    recent: [(FlowKey, Option<ActRef>); RECENT_PASSES],
    /// Whether the burst being processed has tails (its port awaits rx_done).
    rx_split: bool,
}

/// Passes of a packet that remember their last lookup within a burst.
const RECENT_PASSES: usize = 4;

impl Worker {
    fn new(id: usize, workers: usize, shared: Arc<Shared>, busy_rounds: u32) -> Worker {
        Worker {
            id,
            workers,
            shared,
            busy_rounds,
            pipeline: Arc::new(Pipeline::default()),
            pipeline_version: 0,
            ports: Vec::new(),
            ports_version: 0,
            emc: vec![EmcEntry { hash: 0, key: FlowKey::default(), flow: 0, valid: false }; EMC_SIZE],
            mf: MegaflowCache::default(),
            bufs: (0..BURST).map(|_| Buf::new()).collect(),
            meta: vec![(0, Ipv4Addr::UNSPECIFIED); BURST],
            copies: (0..BURST).map(|_| Buf::new()).collect(),
            ncopies: 0,
            tx: Vec::with_capacity(4 * BURST),
            temp: Vec::new(),
            local: LocalCounters::default(),
            now: Duration::ZERO,
            recent: [(FlowKey::default(), None); RECENT_PASSES],
            rx_split: false,
        }
    }

    /// Picks up a new pipeline or port list: one atomic load each per round,
    /// a lock only when it changed.
    fn refresh(&mut self) {
        let v = self.shared.pipeline_version.load(Ordering::Acquire);
        if v != self.pipeline_version {
            self.pipeline = self.shared.pipeline.read().expect("pipeline lock").clone();
            self.pipeline_version = v;
            let (kept, removed) = self.mf.revalidate(&self.pipeline, &mut self.shared.recirc.lock().expect("recirc lock"));
            self.shared.counters.revalidated_kept.fetch_add(kept, Ordering::Relaxed);
            self.shared.counters.revalidated_removed.fetch_add(removed, Ordering::Relaxed);
            if removed > 0 {
                for e in self.emc.iter_mut() {
                    e.valid = false;
                }
            }
            self.shared.megaflow_count[self.id].store(self.mf.count as u64, Ordering::Relaxed);
        }
        let v = self.shared.ports_version.load(Ordering::Acquire);
        if v != self.ports_version {
            self.ports = self.shared.ports.read().expect("ports lock").clone();
            self.ports_version = v;
        }
    }

    fn run(mut self) {
        let mut idle = 0u32;
        let mut last_expire = Instant::now();
        let mut rounds = 0u32;
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.refresh();
            let mut got = 0;
            let mut pi = self.id;
            while pi < self.ports.len() {
                let t0 = tsc();
                let n = self.recv_burst(pi);
                if n > 0 {
                    got += n;
                    self.process_burst(n, pi as u32 + 1);
                    self.publish(pi, n, tsc().wrapping_sub(t0));
                }
                pi += self.workers;
            }
            rounds = rounds.wrapping_add(1);
            if self.id == 0 && rounds.is_multiple_of(4096) && last_expire.elapsed() > Duration::from_secs(1) {
                last_expire = Instant::now();
                let now = self.shared.start.elapsed();
                for shard in &self.shared.conntrack {
                    shard.lock().expect("conntrack lock").expire(now);
                }
            }
            if got == 0 {
                idle += 1;
                if idle > self.busy_rounds {
                    self.sleep();
                }
            } else {
                idle = 0;
            }
        }
    }

    fn sleep(&self) {
        let mut fds: Vec<libc::pollfd> = self
            .ports
            .iter()
            .enumerate()
            .filter(|(i, p)| i % self.workers == self.id && p.is_some())
            .filter_map(|(_, p)| p.as_ref().map(|p| libc::pollfd { fd: p.fd, events: libc::POLLIN, revents: 0 }))
            .filter(|p| p.fd >= 0)
            .collect();
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
            return;
        }
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
    }

    /// Receives one burst from port index `pi` into the worker's buffers,
    /// holding the port's lock once for the whole burst.
    fn recv_burst(&mut self, pi: usize) -> usize {
        let Some(port) = self.ports[pi].as_ref() else { return 0 };
        let mut io = port.io.lock().expect("port lock");
        let bufs = &mut self.bufs;
        let meta = &mut self.meta;
        match &mut *io {
            PortKind::Burst(p) => {
                let mut lens = [0usize; BURST];
                let mut tails = [Tail::NONE; BURST];
                let n = p.recv_burst_split(&mut rx_slices(bufs), &mut lens, &mut tails);
                let mut split = false;
                for i in 0..n {
                    if tails[i].len > lens[i] || lens[i] > BUF_SIZE - HEADROOM {
                        // A port broke the contract (a tail must fit the buffer
                        // once joined): an empty frame, counted as truncated.
                        lens[i] = 0;
                        tails[i] = Tail::NONE;
                    }
                    bufs[i].len = lens[i];
                    bufs[i].tail = tails[i];
                    split |= tails[i].len > 0;
                    meta[i] = (0, Ipv4Addr::UNSPECIFIED);
                }
                self.rx_split = split;
                n
            }
            PortKind::Tunnel(t) => Self::recv_encap(t, bufs, meta),
            PortKind::Underlay(u) => Self::recv_encap(u, bufs, meta),
            io => {
                let mut n = 0;
                while n < BURST {
                    let b = &mut bufs[n];
                    b.start = HEADROOM;
                    let got = match io {
                        PortKind::AfPacket(p) => p.recv(&mut b.data[HEADROOM..]),
                        PortKind::Tap(t) => t.recv(&mut b.data[HEADROOM..]),
                        _ => None,
                    };
                    let Some(len) = got else { break };
                    b.len = len;
                    b.tail = Tail::NONE;
                    meta[n] = (0, Ipv4Addr::UNSPECIFIED);
                    n += 1;
                }
                n
            }
        }
    }

    /// Receives a burst of decapsulated frames from a VXLAN port.
    fn recv_encap(t: &mut dyn Encap, bufs: &mut [Buf], meta: &mut [(u32, Ipv4Addr)]) -> usize {
        let mut m = [(0usize, 0u32, Ipv4Addr::UNSPECIFIED); BURST];
        let n = t.recv_burst(&mut rx_slices(bufs), &mut m);
        for i in 0..n {
            bufs[i].len = m[i].0;
            bufs[i].tail = Tail::NONE;
            meta[i] = (m[i].1, m[i].2);
        }
        n
    }

    /// Classifies and executes a received burst, then transmits what it
    /// produced, grouped by output port.
    fn process_burst(&mut self, n: usize, in_port: u32) {
        let shared = Arc::clone(&self.shared);
        self.now = shared.start.elapsed();
        // The caches may have changed since the last burst (revalidation).
        for r in self.recent.iter_mut() {
            r.1 = None;
        }
        {
            let mut ct = CtLocks::new(&shared.conntrack);
            for i in 0..n {
                self.process(i, in_port, &mut ct);
            }
        }
        self.transmit();
        if self.rx_split {
            // The tails have been sent or joined: the guest may have its buffers back.
            self.rx_split = false;
            if let Some(Some(p)) = self.ports.get(in_port as usize - 1) {
                if let PortKind::Burst(b) = &mut *p.io.lock().expect("port lock") {
                    b.rx_done();
                }
            }
        }
    }

    /// Publishes the burst's counters: a handful of atomic adds per burst.
    fn publish(&mut self, pi: usize, n: usize, cycles: u64) {
        let c = &self.shared.counters;
        c.packets.fetch_add(n as u64, Ordering::Relaxed);
        c.busy_packets.fetch_add(n as u64, Ordering::Relaxed);
        c.busy_cycles.fetch_add(cycles, Ordering::Relaxed);
        c.bursts.fetch_add(1, Ordering::Relaxed);
        if let Some(Some(p)) = self.ports.get(pi) {
            p.counters.rx.fetch_add(n as u64, Ordering::Relaxed);
        }
        let l = &mut self.local;
        for (counter, v) in [(&c.emc_hits, &mut l.emc_hits), (&c.megaflow_hits, &mut l.megaflow_hits), (&c.upcalls, &mut l.upcalls)] {
            if *v > 0 {
                counter.fetch_add(*v, Ordering::Relaxed);
                *v = 0;
            }
        }
        if l.any_parse_error {
            for (i, v) in l.parse_errors.iter_mut().enumerate() {
                if *v > 0 {
                    c.parse_errors[i].fetch_add(*v, Ordering::Relaxed);
                    *v = 0;
                }
            }
            l.any_parse_error = false;
        }
        if !l.drops.is_empty() {
            let mut d = self.shared.drops.lock().expect("drops lock");
            for (why, v) in l.drops.drain(..) {
                *d.entry(why).or_insert(0) += v;
            }
        }
    }

    fn drop(&mut self, why: &'static str) {
        match self.local.drops.iter_mut().find(|(w, _)| std::ptr::eq(*w, why) || *w == why) {
            Some((_, v)) => *v += 1,
            None => self.local.drops.push((why, 1)),
        }
    }

    /// The actions for `key` on pass `pass` of a packet. Consecutive packets of
    /// one flow in a burst share one lookup: each pass remembers its last key.
    fn lookup(&mut self, key: &FlowKey, pass: usize) -> ActRef {
        if let Some((k, Some(r))) = self.recent.get(pass) {
            if k.same(key) {
                self.local.emc_hits += 1;
                return *r;
            }
        }
        let r = self.lookup_caches(key);
        if let Some(slot) = self.recent.get_mut(pass) {
            *slot = (*key, Some(r));
        }
        r
    }

    fn lookup_caches(&mut self, key: &FlowKey) -> ActRef {
        let h = key.hash();
        let slot = (h as usize) & (EMC_SIZE - 1);
        let e = &self.emc[slot];
        if e.valid && e.hash == h && e.key.same(key) {
            if let Some(Some(_)) = self.mf.flows.get(e.flow as usize) {
                self.local.emc_hits += 1;
                return ActRef::Flow(e.flow);
            }
        }
        let idx = match self.mf.lookup(key) {
            Some(i) => {
                self.local.megaflow_hits += 1;
                i
            }
            None => {
                self.local.upcalls += 1;
                let t = self.pipeline.translate(key, &mut self.shared.recirc.lock().expect("recirc lock"), None);
                match self.mf.insert(key, &t) {
                    Some(i) => {
                        self.shared.megaflow_count[self.id].store(self.mf.count as u64, Ordering::Relaxed);
                        i
                    }
                    None => {
                        self.temp.clear();
                        self.temp.extend_from_slice(&t.actions);
                        return ActRef::Temp;
                    }
                }
            }
        };
        self.emc[slot] = EmcEntry { hash: h, key: *key, flow: idx as u32, valid: true };
        ActRef::Flow(idx as u32)
    }

    #[inline]
    fn actions_len(&self, r: ActRef) -> usize {
        match r {
            ActRef::Flow(i) => self.mf.flows[i as usize].as_ref().map_or(0, |f| f.actions.len()),
            ActRef::Temp => self.temp.len(),
        }
    }

    #[inline]
    fn action(&self, r: ActRef, j: usize) -> DpAction {
        match r {
            ActRef::Flow(i) => self.mf.flows[i as usize].as_ref().map_or(DpAction::Drop("flow removed"), |f| f.actions[j]),
            ActRef::Temp => self.temp[j],
        }
    }

    fn process(&mut self, i: usize, in_port: u32, ct: &mut CtLocks<'_>) {
        let (vni, remote) = self.meta[i];
        let mut key = FlowKey { in_port, tun_id: vni, tun_src: remote.octets(), ..Default::default() };
        let b = &mut self.bufs[i];
        if b.tail.len > 0 && !packet::headers_in_head(b.head()) {
            b.join();
        }
        match packet::parse_wire(b.head(), b.len, &mut key) {
            Ok(layout) => self.execute(i, &mut key, layout, ct),
            Err(e) => {
                self.local.parse_errors[e.index()] += 1;
                self.local.any_parse_error = true;
            }
        }
    }

    /// A free copy buffer (the pool grows to the largest burst seen, then stays).
    fn copy_slot(&mut self) -> usize {
        if self.ncopies == self.copies.len() {
            self.copies.push(Buf::new());
        }
        self.ncopies += 1;
        self.ncopies - 1
    }

    /// Stages packet `i` for output: its own buffer when this is its last
    /// action, otherwise a copy of the frame as it is now.
    fn stage(&mut self, i: usize, port: u32, tunnel: Option<(u32, Ipv4Addr)>, last: bool) {
        if self.bufs[i].tail.len > 0 {
            // Only the frame's last output to a port that takes split frames keeps the tail.
            let split_ok = last && matches!(self.ports.get((port as usize).wrapping_sub(1)), Some(Some(p)) if p.split);
            if !split_ok {
                self.bufs[i].join();
            }
        }
        let src = if last {
            TxSrc::Rx(i as u16)
        } else {
            let c = self.copy_slot();
            let (b, dst) = (&self.bufs[i], &mut self.copies[c]);
            dst.start = HEADROOM;
            dst.len = b.len;
            dst.data[HEADROOM..HEADROOM + b.len].copy_from_slice(b.frame());
            TxSrc::Copy(c as u16)
        };
        self.tx.push(TxEntry { port, src, tunnel });
    }

    fn execute(&mut self, i: usize, key: &mut FlowKey, mut layout: Layout, ct: &mut CtLocks<'_>) {
        let in_port = key.in_port;
        'passes: for pass in 0..MAX_RECIRC {
            let r = self.lookup(key, pass);
            let n = self.actions_len(r);
            for j in 0..n {
                let last = j + 1 == n;
                let action = self.action(r, j);
                if self.bufs[i].tail.len > 0 && !touches_headers_only(&action) {
                    self.bufs[i].join();
                }
                match action {
                    DpAction::SetEthSrc(m) => packet::set_eth_src(self.bufs[i].head_mut(), m),
                    DpAction::SetEthDst(m) => packet::set_eth_dst(self.bufs[i].head_mut(), m),
                    DpAction::SetIpSrc(ip) => {
                        packet::set_ip(self.bufs[i].head_mut(), &layout, key, false, &ip);
                        key.ip_src = ip;
                    }
                    DpAction::SetIpDst(ip) => {
                        packet::set_ip(self.bufs[i].head_mut(), &layout, key, true, &ip);
                        key.ip_dst = ip;
                    }
                    DpAction::DecTtl => {
                        if !packet::dec_ttl(self.bufs[i].head_mut(), &layout, key) {
                            self.drop("TTL expired");
                            return;
                        }
                    }
                    DpAction::PopVlan => {
                        let buf = &mut self.bufs[i];
                        if key.vlan_tci != 0 && buf.len >= 18 {
                            let s = buf.start;
                            buf.data.copy_within(s..s + 12, s + 4);
                            buf.start += 4;
                            buf.len -= 4;
                            key.vlan_tci = 0;
                            layout.l3 -= 4;
                            layout.l4 = layout.l4.saturating_sub(4);
                            layout.l7 = layout.l7.saturating_sub(4);
                        }
                    }
                    DpAction::PushVlan(v) => {
                        let buf = &mut self.bufs[i];
                        if buf.start >= 4 {
                            let s = buf.start;
                            buf.data.copy_within(s..s + 12, s - 4);
                            buf.start -= 4;
                            buf.len += 4;
                            let s = buf.start;
                            buf.data[s + 12..s + 14].copy_from_slice(&0x8100u16.to_be_bytes());
                            buf.data[s + 14..s + 16].copy_from_slice(&(v & 0x0fff).to_be_bytes());
                            key.vlan_tci = v | 0x1000;
                            layout.l3 += 4;
                            if layout.l4 != 0 {
                                layout.l4 += 4;
                            }
                            if layout.l7 != 0 {
                                layout.l7 += 4;
                            }
                        }
                    }
                    DpAction::Output(p) => {
                        if p != in_port {
                            self.stage(i, p, None, last);
                        }
                    }
                    DpAction::OutputInPort => self.stage(i, in_port, None, last),
                    DpAction::Tunnel { port, vni, remote } => {
                        if port != in_port {
                            self.stage(i, port, Some((vni, remote)), last);
                        }
                    }
                    DpAction::Ct(c, recirc) => {
                        let buf = &mut self.bufs[i];
                        let (s, l) = (buf.start, buf.len);
                        ct.get(c.zone).process(&mut buf.data[s..s + l], &layout, key, &c, self.now);
                        if recirc != 0 {
                            key.recirc_id = recirc;
                            match packet::parse(self.bufs[i].head(), key) {
                                Ok(l) => layout = l,
                                Err(_) => return,
                            }
                            continue 'passes;
                        }
                    }
                    DpAction::ArpReply(m) => packet::make_arp_reply(self.bufs[i].head_mut(), &layout, m),
                    DpAction::EchoReply(m) => packet::make_echo_reply(self.bufs[i].head_mut(), &layout, key, m),
                    DpAction::NdAdvert(m) => {
                        let buf = &mut self.bufs[i];
                        let n = packet::write_neighbor_advert(&mut buf.data[HEADROOM..], key, m);
                        buf.start = HEADROOM;
                        buf.len = n;
                    }
                    DpAction::RouterAdvert(idx) => {
                        let Some(ra) = self.pipeline.ra.get(idx as usize) else { return };
                        let (dst, eth_dst) = if key.ip_src == [0; 16] {
                            let all = std::net::Ipv6Addr::from([0xff02, 0, 0, 0, 0, 0, 0, 1]);
                            (all.octets(), MacAddr::ipv6_multicast(&all))
                        } else {
                            (key.ip_src, key.eth_src())
                        };
                        let buf = &mut self.bufs[i];
                        let n = packet::write_router_advert(&mut buf.data[HEADROOM..], ra.mac, eth_dst, &dst, &ra.prefix, ra.mtu, ra.autonomous);
                        buf.start = HEADROOM;
                        buf.len = n;
                    }
                    DpAction::DhcpReply(idx) => {
                        let Some(cfg) = self.pipeline.dhcp.get(idx as usize) else { return };
                        let buf = &mut self.bufs[i];
                        // Move the request to the buffer's start so the answer has room.
                        let (s, l) = (buf.start, buf.len);
                        buf.data.copy_within(s..s + l, 0);
                        buf.start = 0;
                        match crate::dhcp::answer(&mut buf.data, l, &layout, cfg) {
                            Some(n) => buf.len = n,
                            None => {
                                self.drop("DHCP request not answered");
                                return;
                            }
                        }
                    }
                    DpAction::ArpResolve { port, vlan, net: _, target } => {
                        let f = self.bufs[i].head();
                        let mac = MacAddr(f[6..12].try_into().unwrap_or([0; 6]));
                        let spa = key.ip_src[12..16].try_into().unwrap_or([0; 4]);
                        let c = self.copy_slot();
                        let out = &mut self.copies[c];
                        let n = packet::write_arp_request(&mut out.data[HEADROOM..], mac, spa, target, if vlan != 0 { vlan | 0x1000 } else { 0 });
                        out.start = HEADROOM;
                        out.len = n;
                        self.tx.push(TxEntry { port, src: TxSrc::Copy(c as u16), tunnel: None });
                        self.drop("waiting for ARP resolution");
                        return;
                    }
                    DpAction::LearnNeighbor { net } => {
                        let ip = key.src_v4();
                        let mac = MacAddr(key.arp_sha);
                        if !ip.is_unspecified() && !mac.is_multicast() {
                            self.shared.learned.lock().expect("learned lock").push((net, ip, mac));
                        }
                    }
                    DpAction::Drop(why) => {
                        self.drop(why);
                        return;
                    }
                }
            }
            return;
        }
        self.drop("too many recirculations");
    }

    /// Sends what the burst staged: per output port one lock, one burst call
    /// (one ring publish and at most one notification), one counter update.
    fn transmit(&mut self) {
        let Some(first) = self.tx.first().map(|e| e.port) else { return };
        if self.tx.iter().all(|e| e.port == first) {
            self.send_port(first, 0);
            self.tx.clear();
            self.ncopies = 0;
            return;
        }
        let mut k = 0;
        while k < self.tx.len() {
            let port = self.tx[k].port;
            if !self.tx[..k].iter().any(|e| e.port == port) {
                self.send_port(port, k);
            }
            k += 1;
        }
        self.tx.clear();
        self.ncopies = 0;
    }

    fn send_port(&mut self, port: u32, first: usize) {
        let entries = self.tx[first..].iter().filter(|e| e.port == port);
        let Some(Some(p)) = self.ports.get((port as usize).wrapping_sub(1)) else {
            let n = entries.count() as u64;
            match self.local.drops.iter_mut().find(|(w, _)| *w == "output to a missing port") {
                Some((_, v)) => *v += n,
                None => self.local.drops.push(("output to a missing port", n)),
            }
            return;
        };
        let (bufs, copies) = (&self.bufs, &self.copies);
        let frame = |e: &TxEntry| -> &[u8] {
            match e.src {
                TxSrc::Rx(i) => bufs[i as usize].frame(),
                TxSrc::Copy(c) => copies[c as usize].frame(),
            }
        };
        // (head, tail): a tail is only here while its receive burst is open.
        let parts = |e: &TxEntry| -> (&[u8], &[u8]) {
            match e.src {
                // SAFETY: the tail's port gets rx_done only after this transmit.
                TxSrc::Rx(i) => (bufs[i as usize].head(), unsafe { bufs[i as usize].tail.bytes() }),
                TxSrc::Copy(c) => (copies[c as usize].frame(), &[]),
            }
        };
        let (mut total, mut sent) = (0usize, 0usize);
        {
            let mut io = p.io.lock().expect("port lock");
            match &mut *io {
                PortKind::Burst(b) if p.split && self.rx_split => {
                    (total, sent) = send_chunked(entries, (&[][..], &[][..]), |e| e.tunnel.is_none().then(|| parts(e)), |f| b.send_burst_split(f));
                }
                PortKind::Burst(b) => {
                    (total, sent) = send_chunked(entries, &[][..], |e| e.tunnel.is_none().then(|| frame(e)), |f| b.send_burst(f));
                }
                PortKind::Tunnel(t) => (total, sent) = send_encap(t, entries, frame),
                PortKind::Underlay(u) if p.split => {
                    let item = |e: &TxEntry| {
                        e.tunnel.map(|(vni, remote)| {
                            let (head, tail) = parts(e);
                            (head, tail, vni, remote)
                        })
                    };
                    (total, sent) = send_chunked(entries, (&[][..], &[][..], 0, Ipv4Addr::UNSPECIFIED), item, |f| u.send_burst_split(f));
                }
                PortKind::Underlay(u) => (total, sent) = send_encap(u, entries, frame),
                PortKind::AfPacket(a) => {
                    for e in entries {
                        total += 1;
                        if e.tunnel.is_none() && a.send(frame(e)) {
                            sent += 1;
                        }
                    }
                    a.flush();
                }
                PortKind::Tap(t) => {
                    for e in entries {
                        total += 1;
                        if e.tunnel.is_none() && t.send(frame(e)) {
                            sent += 1;
                        }
                    }
                }
            }
        }
        if sent > 0 {
            p.counters.tx.fetch_add(sent as u64, Ordering::Relaxed);
        }
        if total > sent {
            p.counters.tx_dropped.fetch_add((total - sent) as u64, Ordering::Relaxed);
        }
    }
}

/// Sends the VXLAN entries among `entries` through `t` in chunks; returns
/// (frames staged, frames sent).
fn send_encap<'a>(t: &mut dyn Encap, entries: impl Iterator<Item = &'a TxEntry>, frame: impl Fn(&TxEntry) -> &'a [u8]) -> (usize, usize) {
    send_chunked(entries, (&[][..], 0, Ipv4Addr::UNSPECIFIED), |e| e.tunnel.map(|(vni, remote)| (frame(e), vni, remote)), |f| t.send_burst(f))
}

/// Hands what `item` makes of each entry (None: not for this port) to
/// `send` in chunks of [`TX_CHUNK`]; returns (entries seen, frames sent).
fn send_chunked<'a, T: Copy>(entries: impl Iterator<Item = &'a TxEntry>, empty: T, mut item: impl FnMut(&TxEntry) -> Option<T>, mut send: impl FnMut(&[T]) -> usize) -> (usize, usize) {
    let mut chunk = [empty; TX_CHUNK];
    let (mut total, mut sent, mut m) = (0, 0, 0);
    for e in entries {
        total += 1;
        let Some(x) = item(e) else { continue };
        chunk[m] = x;
        m += 1;
        if m == TX_CHUNK {
            sent += send(&chunk[..m]);
            m = 0;
        }
    }
    if m > 0 {
        sent += send(&chunk[..m]);
    }
    (total, sent)
}
