//! The userspace datapath engine: poll-mode worker threads that receive bursts
//! of packets, look them up in an exact-match cache, then a megaflow cache, and
//! only on a miss run the pipeline (once, installing a megaflow). Packets are
//! processed run-to-completion in preallocated buffers.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::conntrack::Conntrack;
use crate::flow::FlowKey;
use crate::mac::MacAddr;
use crate::packet::{self, Layout, ParseError};
use crate::pipeline::{DpAction, Pipeline, RecircTable, TraceStep, Translation};
use crate::ports::{AfPacket, Tap, Tunnel};

/// Packets received per port per poll.
pub const BURST: usize = 32;
const HEADROOM: usize = 64;
const BUF_SIZE: usize = HEADROOM + 4096;
const EMC_SIZE: usize = 8192;
const MAX_MEGAFLOWS: usize = 200_000;
const MAX_RECIRC: usize = 6;

/// A hasher for flow keys, whose `Hash` feeds it words (FxHash-style).
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
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
}

struct Shared {
    pipeline: RwLock<(u64, Arc<Pipeline>)>,
    recirc: Mutex<RecircTable>,
    conntrack: Mutex<Conntrack>,
    ports: RwLock<(u64, Vec<Option<Arc<Port>>>)>,
    learned: Mutex<Vec<(u32, Ipv4Addr, MacAddr)>>,
    drops: Mutex<HashMap<&'static str, u64>>,
    megaflow_count: Vec<AtomicU64>,
    stop: AtomicBool,
    counters: Counters,
    start: Instant,
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
            pipeline: RwLock::new((1, Arc::new(Pipeline::default()))),
            recirc: Mutex::new(RecircTable::default()),
            conntrack: Mutex::new(Conntrack::new(1_000_000)),
            ports: RwLock::new((1, Vec::new())),
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
        };
        let port = Arc::new(Port { name: name.to_string(), io: Mutex::new(kind), fd, counters: PortCounters::default() });
        let mut ports = self.shared.ports.write().expect("ports lock");
        ports.0 += 1;
        let list = &mut ports.1;
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
        idx as u32 + 1
    }

    /// Detaches a port.
    pub fn remove_port(&self, no: u32) {
        let mut ports = self.shared.ports.write().expect("ports lock");
        ports.0 += 1;
        if let Some(slot) = ports.1.get_mut(no as usize - 1) {
            *slot = None;
        }
    }

    /// Installs a new pipeline; workers revalidate their megaflows against it.
    pub fn set_pipeline(&self, p: Pipeline) {
        let mut cur = self.shared.pipeline.write().expect("pipeline lock");
        cur.0 += 1;
        cur.1 = Arc::new(p);
    }

    /// The current pipeline.
    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.shared.pipeline.read().expect("pipeline lock").1.clone()
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
        self.shared.conntrack.lock().expect("conntrack lock").connections().map(|c| c.to_string()).collect()
    }

    /// The conntrack state `key` would get in `zone` (for traces; changes nothing).
    pub fn conntrack_peek(&self, key: &FlowKey, zone: u16) -> u8 {
        self.shared.conntrack.lock().expect("conntrack lock").peek(key, zone)
    }

    /// Drops connections that `keep` rejects (after a security group change).
    pub fn retain_connections(&self, keep: impl FnMut(&crate::conntrack::Connection) -> bool) -> usize {
        self.shared.conntrack.lock().expect("conntrack lock").retain(keep)
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
                .1
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.as_ref().map(|p| (i as u32 + 1, p.name.clone(), p.counters.rx.load(Ordering::Relaxed), p.counters.tx.load(Ordering::Relaxed), p.counters.tx_dropped.load(Ordering::Relaxed))))
                .collect(),
            connections: self.shared.conntrack.lock().expect("conntrack lock").len(),
            revalidated: (c.revalidated_kept.load(Ordering::Relaxed), c.revalidated_removed.load(Ordering::Relaxed)),
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

/// A packet buffer with headroom for pushed headers.
struct Buf {
    data: Box<[u8]>,
    start: usize,
    len: usize,
}

impl Buf {
    fn new() -> Buf {
        Buf { data: vec![0u8; BUF_SIZE].into_boxed_slice(), start: HEADROOM, len: 0 }
    }
    fn frame(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }
    fn frame_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.start + self.len]
    }
}

struct Megaflow {
    key: FlowKey,
    mask: FlowKey,
    actions: Arc<[DpAction]>,
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
        let flow = Megaflow { key: masked, mask: t.mask, actions: t.actions.clone().into() };
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
            if !extra && *t.actions == *f.actions {
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
    scratch: Buf,
    meta: Vec<(u32, Ipv4Addr)>,
    touched: Vec<u32>,
}

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
            scratch: Buf::new(),
            meta: vec![(0, Ipv4Addr::UNSPECIFIED); BURST],
            touched: Vec::with_capacity(64),
        }
    }

    fn refresh(&mut self) {
        let (v, p) = {
            let g = self.shared.pipeline.read().expect("pipeline lock");
            (g.0, g.1.clone())
        };
        if v != self.pipeline_version {
            self.pipeline = p;
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
        let g = self.shared.ports.read().expect("ports lock");
        if g.0 != self.ports_version {
            self.ports = g.1.clone();
            self.ports_version = g.0;
        }
    }

    fn run(mut self) {
        let mut idle = 0u32;
        let mut last_expire = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.refresh();
            let mut got = 0;
            for pi in 0..self.ports.len() {
                if pi % self.workers != self.id {
                    continue;
                }
                let Some(port) = self.ports[pi].clone() else { continue };
                let n = self.recv_burst(&port);
                if n == 0 {
                    continue;
                }
                got += n;
                port.counters.rx.fetch_add(n as u64, Ordering::Relaxed);
                self.shared.counters.packets.fetch_add(n as u64, Ordering::Relaxed);
                for i in 0..n {
                    self.process(i, pi as u32 + 1);
                }
                self.flush();
            }
            if self.id == 0 && last_expire.elapsed() > Duration::from_secs(1) {
                last_expire = Instant::now();
                let now = self.shared.start.elapsed();
                self.shared.conntrack.lock().expect("conntrack lock").expire(now);
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
            .collect();
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
            return;
        }
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
    }

    /// Receives a burst from a port with its own rings straight into the worker's buffers.
    fn recv_burst_ring(p: &mut dyn crate::ports::BurstPort, bufs: &mut [Buf], meta: &mut [(u32, Ipv4Addr)]) -> usize {
        let mut lens = [0usize; BURST];
        let n = {
            let mut it = bufs.iter_mut();
            let mut slices: [&mut [u8]; BURST] = std::array::from_fn(|_| {
                let b = it.next().expect("BURST buffers");
                b.start = HEADROOM;
                &mut b.data[HEADROOM..]
            });
            p.recv_burst(&mut slices, &mut lens)
        };
        for i in 0..n {
            bufs[i].len = lens[i];
            meta[i] = (0, Ipv4Addr::UNSPECIFIED);
        }
        n
    }

    fn recv_burst(&mut self, port: &Port) -> usize {
        let mut io = port.io.lock().expect("port lock");
        if let PortKind::Burst(p) = &mut *io {
            return Self::recv_burst_ring(&mut **p, &mut self.bufs, &mut self.meta);
        }
        let mut n = 0;
        while n < BURST {
            let b = &mut self.bufs[n];
            b.start = HEADROOM;
            let got = match &mut *io {
                PortKind::AfPacket(p) => p.recv(&mut b.data[HEADROOM..]).map(|l| (l, 0, Ipv4Addr::UNSPECIFIED)),
                PortKind::Tunnel(t) => t.recv(&mut b.data[HEADROOM..]),
                PortKind::Burst(_) => None,
                PortKind::Tap(t) => t.recv(&mut b.data[HEADROOM..]).map(|l| (l, 0, Ipv4Addr::UNSPECIFIED)),
            };
            let Some((len, vni, remote)) = got else { break };
            b.len = len;
            self.meta[n] = (vni, remote);
            n += 1;
        }
        n
    }

    fn drop(&self, why: &'static str) {
        *self.shared.drops.lock().expect("drops lock").entry(why).or_insert(0) += 1;
    }

    fn lookup(&mut self, key: &FlowKey) -> Option<Arc<[DpAction]>> {
        let h = key.hash();
        let slot = (h as usize) & (EMC_SIZE - 1);
        let e = &self.emc[slot];
        if e.valid && e.hash == h && e.key == *key {
            if let Some(Some(f)) = self.mf.flows.get(e.flow as usize) {
                self.shared.counters.emc_hits.fetch_add(1, Ordering::Relaxed);
                return Some(f.actions.clone());
            }
        }
        let idx = match self.mf.lookup(key) {
            Some(i) => {
                self.shared.counters.megaflow_hits.fetch_add(1, Ordering::Relaxed);
                i
            }
            None => {
                self.shared.counters.upcalls.fetch_add(1, Ordering::Relaxed);
                let t = self.pipeline.translate(key, &mut self.shared.recirc.lock().expect("recirc lock"), None);
                match self.mf.insert(key, &t) {
                    Some(i) => {
                        self.shared.megaflow_count[self.id].store(self.mf.count as u64, Ordering::Relaxed);
                        i
                    }
                    None => return Some(t.actions.into()),
                }
            }
        };
        self.emc[slot] = EmcEntry { hash: h, key: *key, flow: idx as u32, valid: true };
        self.mf.flows[idx].as_ref().map(|f| f.actions.clone())
    }

    fn process(&mut self, i: usize, in_port: u32) {
        let mut buf = std::mem::replace(&mut self.bufs[i], Buf { data: Box::new([]), start: 0, len: 0 });
        let (vni, remote) = self.meta[i];
        let mut key = FlowKey { in_port, tun_id: vni, tun_src: remote.octets(), ..Default::default() };
        match packet::parse(buf.frame(), &mut key) {
            Ok(layout) => self.execute(&mut buf, key, layout),
            Err(e) => {
                self.shared.counters.parse_errors[e.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.bufs[i] = buf;
    }

    fn execute(&mut self, buf: &mut Buf, mut key: FlowKey, mut layout: Layout) {
        let in_port = key.in_port;
        'passes: for _ in 0..MAX_RECIRC {
            let Some(actions) = self.lookup(&key) else { return };
            for a in actions.iter() {
                match a {
                    DpAction::SetEthSrc(m) => packet::set_eth_src(buf.frame_mut(), *m),
                    DpAction::SetEthDst(m) => packet::set_eth_dst(buf.frame_mut(), *m),
                    DpAction::SetIpSrc(ip) => {
                        packet::set_ip(buf.frame_mut(), &layout, &key, false, ip);
                        key.ip_src = *ip;
                    }
                    DpAction::SetIpDst(ip) => {
                        packet::set_ip(buf.frame_mut(), &layout, &key, true, ip);
                        key.ip_dst = *ip;
                    }
                    DpAction::DecTtl => {
                        if !packet::dec_ttl(buf.frame_mut(), &layout, &key) {
                            self.drop("TTL expired");
                            return;
                        }
                    }
                    DpAction::PopVlan => {
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
                        if *p != in_port {
                            self.send(*p, buf.frame(), None);
                        }
                    }
                    DpAction::OutputInPort => self.send(in_port, buf.frame(), None),
                    DpAction::Tunnel { port, vni, remote } => {
                        if *port != in_port {
                            self.send(*port, buf.frame(), Some((*vni, *remote)));
                        }
                    }
                    DpAction::Ct(ct, recirc) => {
                        let now = self.shared.start.elapsed();
                        let s = buf.start;
                        let l = buf.len;
                        self.shared.conntrack.lock().expect("conntrack lock").process(&mut buf.data[s..s + l], &layout, &mut key, ct, now);
                        if *recirc != 0 {
                            key.recirc_id = *recirc;
                            match packet::parse(buf.frame(), &mut key) {
                                Ok(l) => layout = l,
                                Err(_) => return,
                            }
                            continue 'passes;
                        }
                    }
                    DpAction::ArpReply(m) => packet::make_arp_reply(buf.frame_mut(), &layout, *m),
                    DpAction::EchoReply(m) => packet::make_echo_reply(buf.frame_mut(), &layout, &key, *m),
                    DpAction::NdAdvert(m) => {
                        let n = packet::write_neighbor_advert(&mut buf.data[HEADROOM..], &key, *m);
                        buf.start = HEADROOM;
                        buf.len = n;
                    }
                    DpAction::RouterAdvert(idx) => {
                        let Some(ra) = self.pipeline.ra.get(*idx as usize) else { return };
                        let (dst, eth_dst) = if key.ip_src == [0; 16] {
                            let all = std::net::Ipv6Addr::from([0xff02, 0, 0, 0, 0, 0, 0, 1]);
                            (all.octets(), MacAddr::ipv6_multicast(&all))
                        } else {
                            (key.ip_src, key.eth_src())
                        };
                        let n = packet::write_router_advert(&mut buf.data[HEADROOM..], ra.mac, eth_dst, &dst, &ra.prefix, ra.mtu, ra.autonomous);
                        buf.start = HEADROOM;
                        buf.len = n;
                    }
                    DpAction::DhcpReply(idx) => {
                        let Some(cfg) = self.pipeline.dhcp.get(*idx as usize) else { return };
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
                        let f = buf.frame();
                        let mac = MacAddr(f[6..12].try_into().unwrap_or([0; 6]));
                        let spa = key.ip_src[12..16].try_into().unwrap_or([0; 4]);
                        let n = packet::write_arp_request(&mut self.scratch.data[HEADROOM..], mac, spa, *target, if *vlan != 0 { *vlan | 0x1000 } else { 0 });
                        self.scratch.start = HEADROOM;
                        self.scratch.len = n;
                        let data = std::mem::replace(&mut self.scratch, Buf { data: Box::new([]), start: 0, len: 0 });
                        self.send(*port, data.frame(), None);
                        self.scratch = data;
                        self.drop("waiting for ARP resolution");
                        return;
                    }
                    DpAction::LearnNeighbor { net } => {
                        let ip = key.src_v4();
                        let mac = MacAddr(key.arp_sha);
                        if !ip.is_unspecified() && !mac.is_multicast() {
                            self.shared.learned.lock().expect("learned lock").push((*net, ip, mac));
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

    fn send(&mut self, port: u32, frame: &[u8], tunnel: Option<(u32, Ipv4Addr)>) {
        let Some(Some(p)) = self.ports.get(port as usize - 1) else {
            self.drop("output to a missing port");
            return;
        };
        let ok = match (&mut *p.io.lock().expect("port lock"), tunnel) {
            (PortKind::AfPacket(a), None) => a.send(frame),
            (PortKind::Tunnel(t), Some((vni, remote))) => t.send(frame, vni, remote),
            (PortKind::Burst(b), None) => b.send(frame),
            (PortKind::Tap(t), None) => t.send(frame),
            _ => false,
        };
        if ok {
            p.counters.tx.fetch_add(1, Ordering::Relaxed);
            if !self.touched.contains(&port) {
                self.touched.push(port);
            }
        } else {
            p.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&mut self) {
        for i in 0..self.touched.len() {
            let port = self.touched[i];
            if let Some(Some(p)) = self.ports.get(port as usize - 1) {
                match &mut *p.io.lock().expect("port lock") {
                    PortKind::AfPacket(a) => a.flush(),
                    PortKind::Burst(b) => b.flush(),
                    _ => {}
                }
            }
        }
        self.touched.clear();
    }
}
