//! The pipeline: numbered match/action tables (an OpenFlow-like model), their
//! classifier, and the translation of one flow key through them into a list of
//! datapath actions plus the megaflow mask that says which bits decided it.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;

use crate::flow::{ct_state, FlowKey};
use crate::mac::MacAddr;

/// Table numbers, in the order a packet usually visits them.
pub mod table {
    /// Ingress classification: datapath port (and VNI/VLAN) to logical network and port.
    pub const CLASSIFY: u8 = 0;
    /// Anti-spoofing: a port may send only from its MAC and addresses.
    pub const PORT_SECURITY: u8 = 1;
    /// Answers from the model: ARP, ND, DHCP, router advertisements, pings to routers, metadata.
    pub const LOCAL: u8 = 2;
    /// Security groups, traffic leaving a port (stateful).
    pub const EGRESS_SG: u8 = 3;
    /// L2 forwarding inside a logical network.
    pub const L2: u8 = 4;
    /// Distributed routing on a logical router.
    pub const ROUTE: u8 = 5;
    /// Toward the external network: floating-IP SNAT here, or SNAT on the gateway host.
    pub const EXT_OUT: u8 = 6;
    /// After gateway SNAT: leave on the external network.
    pub const SNAT_OUT: u8 = 7;
    /// Routing on the external network (connected or via the upstream gateway).
    pub const EXT_ROUTE: u8 = 8;
    /// Next hop to MAC, from the model or learned by ARP.
    pub const NEIGHBOR: u8 = 9;
    /// Return traffic of gateway SNAT after conntrack restored the inside address.
    pub const SNAT_IN: u8 = 10;
    /// Security groups, traffic entering a port (stateful), then output.
    pub const INGRESS_SG: u8 = 11;
    /// Security groups of a port receiving a flooded (broadcast, multicast)
    /// copy: stateless, resubmitted once per receiving port.
    pub const FLOOD_SG: u8 = 12;
    /// Number of tables.
    pub const COUNT: usize = 13;

    /// A name for each table, for `show pipeline` and traces.
    pub fn name(t: u8) -> &'static str {
        ["classify", "port_security", "local", "egress_sg", "l2", "route", "ext_out", "snat_out", "ext_route", "neighbor", "snat_in", "ingress_sg", "flood_sg"]
            .get(t as usize)
            .copied()
            .unwrap_or("?")
    }
}

/// Pipeline register indexes.
pub mod reg {
    /// Logical network id.
    pub const NET: usize = 0;
    /// Logical ingress port id (0 when from a tunnel or uplink).
    pub const INPORT: usize = 1;
    /// Logical egress port id.
    pub const OUTPORT: usize = 2;
    /// Logical router id.
    pub const ROUTER: usize = 3;
}

/// Network address translation requested from conntrack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Nat {
    /// Source NAT of new connections to this address, ports translated from this range.
    Snat {
        /// The outside address.
        addr: Ipv4Addr,
        /// Lowest source port.
        port_min: u16,
        /// Highest source port.
        port_max: u16,
    },
    /// Undo the NAT of an existing connection only (no new mappings).
    Reverse,
}

/// One conntrack step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtAction {
    /// The conntrack zone.
    pub zone: u16,
    /// Commit the connection (create it if new).
    pub commit: bool,
    /// NAT to apply.
    pub nat: Option<Nat>,
    /// Mark stored with a committed connection (which table committed it).
    pub mark: u32,
}

/// An action of a pipeline rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Set a pipeline register.
    SetReg(usize, u32),
    /// Set the next-hop register.
    SetNexthop([u8; 16]),
    /// Rewrite the Ethernet source.
    SetEthSrc(MacAddr),
    /// Rewrite the Ethernet destination.
    SetEthDst(MacAddr),
    /// Rewrite the IP source (16-byte form; IPv4-mapped for IPv4).
    SetIpSrc([u8; 16]),
    /// Rewrite the IP destination.
    SetIpDst([u8; 16]),
    /// Decrement TTL/hop limit; drop at zero.
    DecTtl,
    /// Remove the 802.1Q tag.
    PopVlan,
    /// Add an 802.1Q tag with this VLAN id.
    PushVlan(u16),
    /// Send to a datapath port (never back to the input port).
    Output(u32),
    /// Send back out of the input port.
    OutputInPort,
    /// Encapsulate in VXLAN and send to a remote tunnel endpoint through the tunnel port.
    Tunnel {
        /// The tunnel port.
        port: u32,
        /// VXLAN network identifier.
        vni: u32,
        /// Remote endpoint.
        remote: Ipv4Addr,
    },
    /// Continue in another table.
    Goto(u8),
    /// Run another table, then continue with the next action here (a miss or
    /// a drop there only ends that branch). Used to filter flooded copies.
    Resubmit(u8),
    /// Conntrack; with `recirc`, the packet continues in that table with `ct_state` set.
    Ct(CtAction, Option<u8>),
    /// Turn an ARP request into the reply for its target with this MAC.
    ArpReply(MacAddr),
    /// Turn a neighbour solicitation into the advertisement with this MAC.
    NdAdvert(MacAddr),
    /// Turn an echo request into the reply, sent from this MAC.
    EchoReply(MacAddr),
    /// Answer a DHCPv4 request from this configuration (index into the pipeline's list).
    DhcpReply(u32),
    /// Answer a router solicitation from this configuration (index into the pipeline's list).
    RouterAdvert(u32),
    /// The next hop's MAC is unknown: send an ARP request for it out of this port, drop the packet.
    ArpResolve {
        /// The port toward the network.
        port: u32,
        /// VLAN tag to use (0 = none).
        vlan: u16,
    },
    /// Learn (sender IP, sender MAC) of an ARP packet on this logical network.
    LearnNeighbor,
    /// Stop here and drop; the reason is counted.
    Drop(&'static str),
}

/// A rule's match: a key and which bits of it matter.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Match {
    /// Values (already masked).
    pub key: FlowKey,
    /// Bits that matter.
    pub mask: FlowKey,
}

impl fmt::Debug for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", describe_match(self))
    }
}

/// One rule of a table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Table.
    pub table: u8,
    /// Higher wins.
    pub priority: u16,
    /// What it matches.
    pub m: Match,
    /// What it does.
    pub actions: Vec<Action>,
    /// Why it exists (model object), for `show pipeline` and traces.
    pub note: String,
}

/// A group of rules sharing one mask: one hash lookup per group.
#[derive(Debug, Clone)]
struct Subtable {
    mask: FlowKey,
    max_priority: u16,
    rules: HashMap<FlowKey, Vec<usize>>,
}

/// A table: rules grouped by mask, searched in order of their best priority
/// (tuple space search, as OVS's classifier does).
#[derive(Debug, Clone, Default)]
pub struct Table {
    subtables: Vec<Subtable>,
}

impl Table {
    fn insert(&mut self, idx: usize, rule: &Rule, rules: &[Rule]) {
        let sub = match self.subtables.iter_mut().position(|s| s.mask == rule.m.mask) {
            Some(i) => &mut self.subtables[i],
            None => {
                self.subtables.push(Subtable { mask: rule.m.mask, max_priority: 0, rules: HashMap::new() });
                self.subtables.last_mut().expect("just pushed")
            }
        };
        sub.max_priority = sub.max_priority.max(rule.priority);
        let list = sub.rules.entry(rule.m.key).or_default();
        list.push(idx);
        list.sort_by(|a, b| rules[*b].priority.cmp(&rules[*a].priority));
    }

    fn finish(&mut self) {
        self.subtables.sort_by_key(|s| std::cmp::Reverse(s.max_priority));
    }

    /// Finds the best rule for `key`, OR-ing the masks it had to look at into `wc`.
    fn lookup(&self, key: &FlowKey, rules: &[Rule], wc: &mut FlowKey) -> Option<usize> {
        let mut best: Option<(u16, usize)> = None;
        for s in &self.subtables {
            if let Some((p, _)) = best {
                if s.max_priority <= p {
                    break;
                }
            }
            wc.union(&s.mask);
            if let Some(list) = s.rules.get(&key.masked(&s.mask)) {
                let i = list[0];
                let p = rules[i].priority;
                if best.is_none_or(|(bp, _)| p > bp) {
                    best = Some((p, i));
                }
            }
        }
        best.map(|(_, i)| i)
    }
}

/// What a DHCPv4 answer contains for one port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DhcpConfig {
    /// The port's MAC (requests from other MACs are ignored).
    pub client_mac: MacAddr,
    /// The address handed out.
    pub client_ip: Ipv4Addr,
    /// Prefix length of the subnet.
    pub prefix_len: u8,
    /// The server identifier and source of answers.
    pub server_ip: Ipv4Addr,
    /// The source MAC of answers.
    pub server_mac: MacAddr,
    /// Default gateway.
    pub router: Option<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// Classless static routes (destination, prefix length, next hop).
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    /// Interface MTU.
    pub mtu: u16,
    /// Lease time in seconds.
    pub lease_secs: u32,
}

/// What a router advertisement announces on one network.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RaConfig {
    /// Router MAC.
    pub mac: MacAddr,
    /// The /64 prefix.
    pub prefix: [u8; 16],
    /// Link MTU.
    pub mtu: u32,
    /// Whether hosts autoconfigure addresses (SLAAC) from the prefix.
    pub autonomous: bool,
}

/// A compiled pipeline: the rules, their classifier and the answer configurations.
#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    rules: Vec<Rule>,
    tables: Vec<Table>,
    /// DHCP answers referred to by [`Action::DhcpReply`].
    pub dhcp: Vec<DhcpConfig>,
    /// RA answers referred to by [`Action::RouterAdvert`].
    pub ra: Vec<RaConfig>,
}

/// A datapath action: what the engine does to a packet, after translation.
/// Plain data (`Copy`), so a worker reads it out of its cache without a
/// reference count.
// repr(C): the tag is a full word and every field sits at a fixed, aligned
// offset. With Rust's own layout the worker read `Tunnel`'s VNI across the
// 16-byte halves of the copy it had just made, and paid a failed
// store-to-load forward on every packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C)]
pub enum DpAction {
    /// Rewrite the Ethernet source.
    SetEthSrc(MacAddr),
    /// Rewrite the Ethernet destination.
    SetEthDst(MacAddr),
    /// Rewrite the IP source.
    SetIpSrc([u8; 16]),
    /// Rewrite the IP destination.
    SetIpDst([u8; 16]),
    /// Decrement TTL (drop at zero).
    DecTtl,
    /// Remove the VLAN tag.
    PopVlan,
    /// Add a VLAN tag.
    PushVlan(u16),
    /// Send a copy to a port.
    Output(u32),
    /// Send a copy back to the input port.
    OutputInPort,
    /// Send a VXLAN-encapsulated copy.
    Tunnel {
        /// Tunnel port.
        port: u32,
        /// VNI.
        vni: u32,
        /// Remote endpoint.
        remote: Ipv4Addr,
    },
    /// Conntrack, then (if `recirc` is non-zero) run the datapath again with this recirculation id.
    Ct(CtAction, u32),
    /// ARP reply in place.
    ArpReply(MacAddr),
    /// ND advertisement in place.
    NdAdvert(MacAddr),
    /// Echo reply in place.
    EchoReply(MacAddr),
    /// DHCP answer in place.
    DhcpReply(u32),
    /// Router advertisement in place.
    RouterAdvert(u32),
    /// Ask for a next hop's MAC.
    ArpResolve {
        /// Port.
        port: u32,
        /// VLAN.
        vlan: u16,
        /// Logical network the answer belongs to.
        net: u32,
        /// The address asked for.
        target: [u8; 4],
    },
    /// Learn a neighbour on a logical network.
    LearnNeighbor {
        /// Logical network.
        net: u32,
    },
    /// Drop (counted by reason).
    Drop(&'static str),
}

/// Where a recirculated packet continues: table and registers at the ct() action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Frozen {
    /// Table to continue in.
    pub table: u8,
    /// Registers.
    pub regs: [u32; 4],
    /// Next-hop register.
    pub nexthop: [u8; 16],
}

/// Recirculation ids for frozen states; shared by all pipeline versions so that
/// ids in cached flows stay meaningful across model changes.
#[derive(Debug, Default)]
pub struct RecircTable {
    by_state: HashMap<Frozen, u32>,
    by_id: Vec<Frozen>,
}

impl RecircTable {
    /// The id for `state`, allocating one if new (ids start at 1).
    pub fn id(&mut self, state: Frozen) -> u32 {
        if let Some(id) = self.by_state.get(&state) {
            return *id;
        }
        self.by_id.push(state);
        let id = self.by_id.len() as u32;
        self.by_state.insert(state, id);
        id
    }

    /// The state for an id.
    pub fn get(&self, id: u32) -> Option<Frozen> {
        self.by_id.get((id as usize).checked_sub(1)?).copied()
    }
}

/// The result of running one key through the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    /// Datapath actions, in order.
    pub actions: Vec<DpAction>,
    /// The megaflow mask: packets equal to the key under it get the same actions.
    pub mask: FlowKey,
}

/// One step of a trace.
#[derive(Debug, Clone)]
pub struct TraceStep {
    /// Table.
    pub table: u8,
    /// Nesting depth (resubmits).
    pub depth: u8,
    /// Matched rule (priority, note, actions), or None for a miss.
    pub rule: Option<(u16, String, Vec<Action>)>,
}

const MAX_STEPS: usize = 256;
const MAX_DEPTH: u8 = 4;

/// Whether translation goes on after a table run.
enum Flow {
    Continue,
    Stop,
}

/// The state of one translation.
struct Run<'r, 't> {
    k: FlowKey,
    wc: FlowKey,
    out: Vec<DpAction>,
    recirc: &'r mut RecircTable,
    trace: Option<&'t mut Vec<TraceStep>>,
    steps: usize,
}

impl Pipeline {
    /// Builds the classifier over `rules`.
    pub fn new(rules: Vec<Rule>, dhcp: Vec<DhcpConfig>, ra: Vec<RaConfig>) -> Pipeline {
        let mut tables = vec![Table::default(); table::COUNT];
        for (i, r) in rules.iter().enumerate() {
            if let Some(t) = tables.get_mut(r.table as usize) {
                t.insert(i, r, &rules);
            }
        }
        for t in &mut tables {
            t.finish();
        }
        Pipeline { rules, tables, dhcp, ra }
    }

    /// All rules, in compile order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Runs `key` through the tables. `recirc` resolves recirculation ids of
    /// ct() actions; `trace` records each step when given.
    pub fn translate(&self, key: &FlowKey, recirc: &mut RecircTable, trace: Option<&mut Vec<TraceStep>>) -> Translation {
        let mut k = *key;
        // Always exact on the metadata that selects where we start.
        let wc = FlowKey { in_port: u32::MAX, recirc_id: u32::MAX, ..Default::default() };
        let mut table_id = table::CLASSIFY;
        if key.recirc_id != 0 {
            match recirc.get(key.recirc_id) {
                Some(f) => {
                    table_id = f.table;
                    k.regs = f.regs;
                    k.nexthop = f.nexthop;
                }
                None => {
                    return Translation { actions: vec![DpAction::Drop("unknown recirculation id")], mask: finish_mask(wc) };
                }
            }
        }
        let mut run = Run { k, wc, out: Vec::new(), recirc, trace, steps: 0 };
        self.run(table_id, &mut run, 0);
        let Run { mut out, wc, .. } = run;
        if !out.iter().any(|a| !matches!(a, DpAction::Drop(_))) && !matches!(out.last(), Some(DpAction::Drop(_))) {
            out.push(DpAction::Drop("no output"));
        }
        Translation { actions: out, mask: finish_mask(wc) }
    }

    /// Runs tables from `table_id` until a rule ends without a Goto. At depth 0
    /// a miss or drop ends the packet; deeper (inside a resubmit) it only ends
    /// the branch.
    fn run(&self, mut table_id: u8, r: &mut Run<'_, '_>, depth: u8) -> Flow {
        let nested = depth > 0;
        'tables: loop {
            r.steps += 1;
            if r.steps > MAX_STEPS {
                r.out.push(DpAction::Drop("pipeline loop"));
                return Flow::Stop;
            }
            let Some(t) = self.tables.get(table_id as usize) else {
                r.out.push(DpAction::Drop("no such table"));
                return Flow::Stop;
            };
            let Some(ri) = t.lookup(&r.k, &self.rules, &mut r.wc) else {
                if let Some(tr) = r.trace.as_deref_mut() {
                    tr.push(TraceStep { table: table_id, depth, rule: None });
                }
                if nested {
                    return Flow::Continue;
                }
                r.out.push(DpAction::Drop(miss_reason(table_id)));
                return Flow::Stop;
            };
            let rule = &self.rules[ri];
            if let Some(tr) = r.trace.as_deref_mut() {
                tr.push(TraceStep { table: table_id, depth, rule: Some((rule.priority, rule.note.clone(), rule.actions.clone())) });
            }
            for a in &rule.actions {
                let Run { k, wc, out, recirc, .. } = &mut *r;
                match a {
                    Action::SetReg(i, v) => k.regs[*i] = *v,
                    Action::SetNexthop(n) => k.nexthop = *n,
                    Action::SetEthSrc(m) => {
                        k.eth_src = m.0;
                        out.push(DpAction::SetEthSrc(*m));
                    }
                    Action::SetEthDst(m) => {
                        k.eth_dst = m.0;
                        out.push(DpAction::SetEthDst(*m));
                    }
                    Action::SetIpSrc(ip) => {
                        k.ip_src = *ip;
                        out.push(DpAction::SetIpSrc(*ip));
                    }
                    Action::SetIpDst(ip) => {
                        k.ip_dst = *ip;
                        out.push(DpAction::SetIpDst(*ip));
                    }
                    Action::DecTtl => {
                        // The datapath drops at TTL <= 1, so the TTL's value matters.
                        wc.ip_ttl = u8::MAX;
                        if k.ip_ttl <= 1 {
                            out.push(DpAction::Drop("TTL expired"));
                            return Flow::Stop;
                        }
                        k.ip_ttl -= 1;
                        out.push(DpAction::DecTtl);
                    }
                    Action::PopVlan => {
                        k.vlan_tci = 0;
                        out.push(DpAction::PopVlan);
                    }
                    Action::PushVlan(v) => {
                        k.vlan_tci = v | 0x1000;
                        out.push(DpAction::PushVlan(*v));
                    }
                    Action::Output(p) => out.push(DpAction::Output(*p)),
                    Action::OutputInPort => out.push(DpAction::OutputInPort),
                    Action::Tunnel { port, vni, remote } => out.push(DpAction::Tunnel { port: *port, vni: *vni, remote: *remote }),
                    Action::Goto(t) => {
                        table_id = *t;
                        continue 'tables;
                    }
                    Action::Resubmit(t) => {
                        if depth >= MAX_DEPTH {
                            out.push(DpAction::Drop("resubmit too deep"));
                            return Flow::Stop;
                        }
                        if let Flow::Stop = self.run(*t, r, depth + 1) {
                            return Flow::Stop;
                        }
                    }
                    Action::Ct(ct, next) => match next {
                        Some(t) => {
                            let id = recirc.id(Frozen { table: *t, regs: k.regs, nexthop: k.nexthop });
                            out.push(DpAction::Ct(*ct, id));
                            return Flow::Stop;
                        }
                        None => out.push(DpAction::Ct(*ct, 0)),
                    },
                    Action::ArpReply(m) => out.push(DpAction::ArpReply(*m)),
                    Action::NdAdvert(m) => out.push(DpAction::NdAdvert(*m)),
                    Action::EchoReply(m) => out.push(DpAction::EchoReply(*m)),
                    Action::DhcpReply(i) => out.push(DpAction::DhcpReply(*i)),
                    Action::RouterAdvert(i) => out.push(DpAction::RouterAdvert(*i)),
                    Action::ArpResolve { port, vlan } => {
                        let target = if k.nexthop != [0; 16] { k.nexthop } else { k.ip_dst };
                        wc.ip_dst = [0xff; 16];
                        out.push(DpAction::ArpResolve { port: *port, vlan: *vlan, net: k.regs[reg::NET], target: target[12..16].try_into().unwrap_or([0; 4]) });
                        return Flow::Stop;
                    }
                    Action::LearnNeighbor => {
                        // The learned pair comes from the packet: make it exact.
                        wc.ip_src = [0xff; 16];
                        wc.arp_sha = [0xff; 6];
                        out.push(DpAction::LearnNeighbor { net: k.regs[reg::NET] })
                    }
                    Action::Drop(why) => {
                        if nested {
                            return Flow::Continue;
                        }
                        out.push(DpAction::Drop(why));
                        return Flow::Stop;
                    }
                }
            }
            // Rule ended without Goto: done.
            return Flow::Continue;
        }
    }

    /// Whether a new connection described by `key` (with `regs`) would be
    /// committed by `table` (a security group table). Used to re-check
    /// established connections after a rule change.
    pub fn allows_new(&self, table_id: u8, key: &FlowKey) -> bool {
        let mut k = *key;
        k.ct_state = ct_state::TRACKED | ct_state::NEW;
        let mut wc = FlowKey::default();
        match self.tables.get(table_id as usize).and_then(|t| t.lookup(&k, &self.rules, &mut wc)) {
            Some(i) => self.rules[i].actions.iter().any(|a| matches!(a, Action::Ct(ct, None) if ct.commit)) || !self.rules[i].actions.iter().any(|a| matches!(a, Action::Drop(_) | Action::Ct(_, Some(_)))),
            None => false,
        }
    }
}

fn finish_mask(mut wc: FlowKey) -> FlowKey {
    wc.clear_registers();
    wc
}

fn miss_reason(t: u8) -> &'static str {
    match t {
        table::CLASSIFY => "unknown input port or segment",
        table::PORT_SECURITY => "port security (spoofed source)",
        table::EGRESS_SG => "egress security group",
        table::INGRESS_SG => "ingress security group",
        table::L2 => "unknown destination MAC",
        table::ROUTE => "no route",
        table::NEIGHBOR => "unknown next hop",
        _ => "table miss",
    }
}

/// Describes a match in ovs-ofctl-like syntax.
pub fn describe_match(m: &Match) -> String {
    use crate::flow::ip_from_bytes;
    let (k, w) = (&m.key, &m.mask);
    let mut parts = Vec::new();
    if w.in_port != 0 {
        parts.push(format!("in_port={}", k.in_port));
    }
    if w.recirc_id != 0 {
        parts.push(format!("recirc={}", k.recirc_id));
    }
    if w.tun_id != 0 {
        parts.push(format!("tun_id={}", k.tun_id));
    }
    if w.ct_zone != 0 {
        parts.push(format!("ct_zone={}", k.ct_zone));
    }
    if w.ct_state != 0 {
        parts.push(format!("ct_state={:#04x}/{:#04x}", k.ct_state, w.ct_state));
    }
    for (i, name) in ["net", "inport", "outport", "router"].iter().enumerate() {
        if w.regs[i] != 0 {
            parts.push(format!("{name}={}", k.regs[i]));
        }
    }
    if w.nexthop != [0; 16] {
        parts.push(format!("nexthop={}", ip_from_bytes(k.nexthop)));
    }
    if w.vlan_tci != 0 {
        parts.push(format!("vlan_tci={:#06x}/{:#06x}", k.vlan_tci, w.vlan_tci));
    }
    if w.eth_src != [0; 6] {
        parts.push(format!("eth_src={}", MacAddr(k.eth_src)));
    }
    if w.eth_dst != [0; 6] {
        parts.push(format!("eth_dst={}/{}", MacAddr(k.eth_dst), MacAddr(w.eth_dst)));
    }
    if w.eth_type != 0 {
        parts.push(format!("eth_type={:#06x}", k.eth_type));
    }
    if w.arp_sha != [0; 6] {
        parts.push(format!("arp_sha={}", MacAddr(k.arp_sha)));
    }
    let prefix = |a: [u8; 16], m: [u8; 16]| {
        let len = u128::from_be_bytes(m).count_ones();
        let ip = ip_from_bytes(a);
        let len = if ip.is_ipv4() { len.saturating_sub(96) } else { len };
        format!("{ip}/{len}")
    };
    if w.ip_src != [0; 16] {
        parts.push(format!("ip_src={}", prefix(k.ip_src, w.ip_src)));
    }
    if w.ip_dst != [0; 16] {
        parts.push(format!("ip_dst={}", prefix(k.ip_dst, w.ip_dst)));
    }
    if w.ip_proto != 0 {
        parts.push(format!("ip_proto={}", k.ip_proto));
    }
    if w.l4_src != 0 {
        parts.push(format!("l4_src={}/{:#06x}", k.l4_src, w.l4_src));
    }
    if w.l4_dst != 0 {
        parts.push(format!("l4_dst={}/{:#06x}", k.l4_dst, w.l4_dst));
    }
    if w.nd_target != [0; 16] {
        parts.push(format!("nd_target={}", ip_from_bytes(k.nd_target)));
    }
    if parts.is_empty() {
        "any".to_string()
    } else {
        parts.join(",")
    }
}

/// Describes a rule action in ovs-ofctl-like syntax.
pub fn describe_action(a: &Action) -> String {
    use crate::flow::ip_from_bytes;
    match a {
        Action::SetReg(r, v) => format!("set {}={v}", ["net", "inport", "outport", "router"].get(*r).copied().unwrap_or("reg?")),
        Action::SetNexthop(n) => format!("set nexthop={}", ip_from_bytes(*n)),
        Action::SetEthSrc(m) => format!("set eth_src={m}"),
        Action::SetEthDst(m) => format!("set eth_dst={m}"),
        Action::SetIpSrc(ip) => format!("set ip_src={}", ip_from_bytes(*ip)),
        Action::SetIpDst(ip) => format!("set ip_dst={}", ip_from_bytes(*ip)),
        Action::DecTtl => "dec_ttl".into(),
        Action::PopVlan => "pop_vlan".into(),
        Action::PushVlan(v) => format!("push_vlan:{v}"),
        Action::Output(p) => format!("output:{p}"),
        Action::OutputInPort => "output:in_port".into(),
        Action::Tunnel { port, vni, remote } => format!("tunnel(port={port},vni={vni},remote={remote})"),
        Action::Goto(t) => format!("goto:{}", table::name(*t)),
        Action::Resubmit(t) => format!("resubmit:{}", table::name(*t)),
        Action::Ct(ct, next) => {
            let mut s = format!("ct(zone={}", ct.zone);
            if ct.commit {
                s.push_str(",commit");
            }
            match ct.nat {
                Some(Nat::Snat { addr, port_min, port_max }) => s.push_str(&format!(",snat={addr}:{port_min}-{port_max}")),
                Some(Nat::Reverse) => s.push_str(",nat"),
                None => {}
            }
            if ct.mark != 0 {
                s.push_str(&format!(",mark={}", ct.mark));
            }
            if let Some(t) = next {
                s.push_str(&format!(",table={}", table::name(*t)));
            }
            s.push(')');
            s
        }
        Action::ArpReply(m) => format!("arp_reply({m})"),
        Action::NdAdvert(m) => format!("nd_advert({m})"),
        Action::EchoReply(m) => format!("echo_reply({m})"),
        Action::DhcpReply(i) => format!("dhcp_reply({i})"),
        Action::RouterAdvert(i) => format!("router_advert({i})"),
        Action::ArpResolve { port, vlan } => format!("arp_resolve(port={port},vlan={vlan})"),
        Action::LearnNeighbor => "learn_neighbor".into(),
        Action::Drop(why) => format!("drop({why})"),
    }
}

/// Describes a list of rule actions.
pub fn describe_actions(actions: &[Action]) -> String {
    actions.iter().map(describe_action).collect::<Vec<_>>().join(",")
}

/// Describes a datapath action.
pub fn describe_dp_action(a: &DpAction) -> String {
    use crate::flow::ip_from_bytes;
    match a {
        DpAction::SetEthSrc(m) => format!("set eth_src={m}"),
        DpAction::SetEthDst(m) => format!("set eth_dst={m}"),
        DpAction::SetIpSrc(ip) => format!("set ip_src={}", ip_from_bytes(*ip)),
        DpAction::SetIpDst(ip) => format!("set ip_dst={}", ip_from_bytes(*ip)),
        DpAction::DecTtl => "dec_ttl".into(),
        DpAction::PopVlan => "pop_vlan".into(),
        DpAction::PushVlan(v) => format!("push_vlan:{v}"),
        DpAction::Output(p) => format!("output:{p}"),
        DpAction::OutputInPort => "output:in_port".into(),
        DpAction::Tunnel { port, vni, remote } => format!("tunnel(port={port},vni={vni},remote={remote})"),
        DpAction::Ct(ct, recirc) => describe_action(&Action::Ct(*ct, None)).trim_end_matches(')').to_string() + &format!(",recirc={recirc})"),
        DpAction::ArpReply(m) => format!("arp_reply({m})"),
        DpAction::NdAdvert(m) => format!("nd_advert({m})"),
        DpAction::EchoReply(m) => format!("echo_reply({m})"),
        DpAction::DhcpReply(i) => format!("dhcp_reply({i})"),
        DpAction::RouterAdvert(i) => format!("router_advert({i})"),
        DpAction::ArpResolve { port, target, .. } => format!("arp_resolve(port={port},target={})", Ipv4Addr::from(*target)),
        DpAction::LearnNeighbor { net } => format!("learn_neighbor(net={net})"),
        DpAction::Drop(why) => format!("drop({why})"),
    }
}

/// A flow written as `field=value` pairs (comma or space separated), for traces.
///
/// Fields: `in_port` (number), `eth_src`, `eth_dst`, `eth_type`, `vlan`,
/// `ip_src`, `ip_dst`, `ip_proto`, `ttl`, `l4_src`/`tp_src`, `l4_dst`/`tp_dst`,
/// `icmp_type`, `icmp_code`, `arp_op`, `arp_sha`, `nd_target`, `tun_id`,
/// `tun_src`, and the shorthands `arp`, `ip`, `ipv6`, `tcp`, `udp`, `icmp`,
/// `icmp6`. Other `name=value` pairs are returned for the caller (such as
/// `port=<logical port>`).
pub fn parse_flow(text: &str) -> Result<(FlowKey, Vec<(String, String)>), String> {
    use crate::flow::{ethertype, ip_bytes, proto};
    let mut k = FlowKey { ip_ttl: 64, ..Default::default() };
    let mut rest = Vec::new();
    let num = |v: &str| -> Result<u64, String> {
        let r = match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => v.parse(),
        };
        r.map_err(|_| format!("Bad number '{v}'"))
    };
    let mac = |v: &str| v.parse::<MacAddr>().map_err(|e| e.to_string());
    let ip = |v: &str| v.parse::<std::net::IpAddr>().map_err(|_| format!("Bad IP address '{v}'"));
    for item in text.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()) {
        let (name, value) = item.split_once('=').unwrap_or((item, ""));
        match (name, value) {
            ("arp", "") => {
                k.eth_type = ethertype::ARP;
                k.ip_proto = 1;
            }
            ("ip", "") => k.eth_type = ethertype::IPV4,
            ("ipv6", "") => k.eth_type = ethertype::IPV6,
            ("tcp" | "udp" | "icmp" | "tcp6" | "udp6" | "icmp6", "") => {
                if k.eth_type == 0 {
                    k.eth_type = if name.ends_with('6') { ethertype::IPV6 } else { ethertype::IPV4 };
                }
                k.ip_proto = match name.trim_end_matches('6') {
                    "tcp" => proto::TCP,
                    "udp" => proto::UDP,
                    _ if name == "icmp6" => proto::ICMPV6,
                    _ => proto::ICMP,
                };
            }
            ("in_port", v) => k.in_port = num(v)? as u32,
            ("eth_src" | "dl_src", v) => k.eth_src = mac(v)?.0,
            ("eth_dst" | "dl_dst", v) => k.eth_dst = mac(v)?.0,
            ("eth_type" | "dl_type", v) => k.eth_type = num(v)? as u16,
            ("vlan", v) => k.vlan_tci = (num(v)? as u16 & 0x0fff) | 0x1000,
            ("ip_src" | "nw_src" | "ipv6_src", v) => {
                let a = ip(v)?;
                if k.eth_type == 0 {
                    k.eth_type = if a.is_ipv4() { ethertype::IPV4 } else { ethertype::IPV6 };
                }
                k.ip_src = ip_bytes(a);
            }
            ("ip_dst" | "nw_dst" | "ipv6_dst", v) => {
                let a = ip(v)?;
                if k.eth_type == 0 {
                    k.eth_type = if a.is_ipv4() { ethertype::IPV4 } else { ethertype::IPV6 };
                }
                k.ip_dst = ip_bytes(a);
            }
            ("ip_proto" | "nw_proto" | "arp_op", v) => k.ip_proto = num(v)? as u8,
            ("ttl" | "nw_ttl", v) => k.ip_ttl = num(v)? as u8,
            ("l4_src" | "tp_src" | "icmp_type", v) => k.l4_src = num(v)? as u16,
            ("l4_dst" | "tp_dst" | "icmp_code", v) => k.l4_dst = num(v)? as u16,
            ("arp_sha", v) => k.arp_sha = mac(v)?.0,
            ("nd_target", v) => k.nd_target = ip_bytes(ip(v)?),
            ("tun_id", v) => k.tun_id = num(v)? as u32,
            ("tun_src", v) => match ip(v)? {
                std::net::IpAddr::V4(a) => k.tun_src = a.octets(),
                _ => return Err("tun_src must be IPv4".into()),
            },
            (n, "") => return Err(format!("Unknown flow field '{n}'")),
            (n, v) => rest.push((n.to_string(), v.to_string())),
        }
    }
    if k.eth_type == ethertype::ARP && k.arp_sha == [0; 6] {
        k.arp_sha = k.eth_src;
    }
    Ok((k, rest))
}

/// Builder for matches, so the compiler reads like the rules it writes.
#[derive(Clone, Copy, Default)]
pub struct M(pub Match);

impl M {
    /// Matches everything.
    pub fn any() -> M {
        M::default()
    }
    fn set(mut self, f: impl Fn(&mut FlowKey, &mut FlowKey)) -> M {
        f(&mut self.0.key, &mut self.0.mask);
        self
    }
    /// Datapath input port.
    pub fn in_port(self, p: u32) -> M {
        self.set(|k, m| {
            k.in_port = p;
            m.in_port = u32::MAX;
        })
    }
    /// Tunnel VNI.
    pub fn tun_id(self, v: u32) -> M {
        self.set(|k, m| {
            k.tun_id = v;
            m.tun_id = u32::MAX;
        })
    }
    /// A register.
    pub fn reg(self, r: usize, v: u32) -> M {
        self.set(|k, m| {
            k.regs[r] = v;
            m.regs[r] = u32::MAX;
        })
    }
    /// The next-hop register (exact).
    pub fn nexthop(self, ip: [u8; 16]) -> M {
        self.set(|k, m| {
            k.nexthop = ip;
            m.nexthop = [0xff; 16];
        })
    }
    /// VLAN id (tagged) or untagged when `None`.
    pub fn vlan(self, v: Option<u16>) -> M {
        self.set(|k, m| {
            k.vlan_tci = v.map(|v| v | 0x1000).unwrap_or(0);
            m.vlan_tci = 0x1fff;
        })
    }
    /// Conntrack state bits under a mask.
    pub fn ct(self, state: u8, mask: u8) -> M {
        self.set(|k, m| {
            k.ct_state = state & mask;
            m.ct_state = mask;
        })
    }
    /// Conntrack zone of the last ct() lookup.
    pub fn ct_zone(self, z: u16) -> M {
        self.set(|k, m| {
            k.ct_zone = z;
            m.ct_zone = u16::MAX;
        })
    }
    /// Ethernet source.
    pub fn eth_src(self, mac: MacAddr) -> M {
        self.set(|k, m| {
            k.eth_src = mac.0;
            m.eth_src = [0xff; 6];
        })
    }
    /// Ethernet destination.
    pub fn eth_dst(self, mac: MacAddr) -> M {
        self.set(|k, m| {
            k.eth_dst = mac.0;
            m.eth_dst = [0xff; 6];
        })
    }
    /// Group (multicast/broadcast) destination.
    pub fn eth_dst_multicast(self) -> M {
        self.set(|k, m| {
            k.eth_dst = [1, 0, 0, 0, 0, 0];
            m.eth_dst = [1, 0, 0, 0, 0, 0];
        })
    }
    /// Ethertype.
    pub fn eth_type(self, t: u16) -> M {
        self.set(|k, m| {
            k.eth_type = t;
            m.eth_type = u16::MAX;
        })
    }
    /// ARP sender hardware address.
    pub fn arp_sha(self, mac: MacAddr) -> M {
        self.set(|k, m| {
            k.arp_sha = mac.0;
            m.arp_sha = [0xff; 6];
        })
    }
    /// IP protocol (ARP opcode for ARP).
    pub fn proto(self, p: u8) -> M {
        self.set(|k, m| {
            k.ip_proto = p;
            m.ip_proto = u8::MAX;
        })
    }
    /// Source prefix.
    pub fn ip_src(self, net: ipnet::IpNet) -> M {
        self.set(|k, m| {
            let mask = crate::flow::prefix_mask(net.addr().is_ipv4(), net.prefix_len());
            let a = crate::flow::ip_bytes(net.addr());
            for i in 0..16 {
                k.ip_src[i] = a[i] & mask[i];
            }
            m.ip_src = mask;
        })
    }
    /// Destination prefix.
    pub fn ip_dst(self, net: ipnet::IpNet) -> M {
        self.set(|k, m| {
            let mask = crate::flow::prefix_mask(net.addr().is_ipv4(), net.prefix_len());
            let a = crate::flow::ip_bytes(net.addr());
            for i in 0..16 {
                k.ip_dst[i] = a[i] & mask[i];
            }
            m.ip_dst = mask;
        })
    }
    /// Transport source under a mask.
    pub fn l4_src(self, v: u16, mask: u16) -> M {
        self.set(|k, m| {
            k.l4_src = v & mask;
            m.l4_src = mask;
        })
    }
    /// Transport destination under a mask.
    pub fn l4_dst(self, v: u16, mask: u16) -> M {
        self.set(|k, m| {
            k.l4_dst = v & mask;
            m.l4_dst = mask;
        })
    }
    /// ND target.
    pub fn nd_target(self, ip: [u8; 16]) -> M {
        self.set(|k, m| {
            k.nd_target = ip;
            m.nd_target = [0xff; 16];
        })
    }
    /// The match.
    pub fn build(self) -> Match {
        self.0
    }
}

/// Splits an inclusive port range into (value, mask) pairs covering it exactly.
pub fn port_range_masks(lo: u16, hi: u16) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo as u32, hi as u32);
    while lo <= hi {
        // Largest aligned block starting at lo that fits.
        let mut size = if lo == 0 { 1 << 16 } else { 1u32 << lo.trailing_zeros() };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, !((size - 1) as u16)));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_cover_exactly() {
        for (lo, hi) in [(22, 22), (0, 65535), (1000, 1999), (1, 1023), (80, 81), (65535, 65535)] {
            let masks = port_range_masks(lo, hi);
            for p in 0..=65535u16 {
                let hit = masks.iter().any(|(v, m)| p & m == *v);
                assert_eq!(hit, p >= lo && p <= hi, "port {p} in {lo}-{hi}");
            }
        }
        assert_eq!(port_range_masks(0, 65535), vec![(0, 0)]);
    }

    #[test]
    fn classifier_picks_highest_priority_and_reports_mask() {
        let rules = vec![
            Rule { table: 0, priority: 10, m: M::any().in_port(1).build(), actions: vec![Action::Output(2)], note: "low".into() },
            Rule { table: 0, priority: 20, m: M::any().in_port(1).l4_dst(22, 0xffff).build(), actions: vec![Action::Output(3)], note: "ssh".into() },
        ];
        let p = Pipeline::new(rules, vec![], vec![]);
        let mut rt = RecircTable::default();
        let mut k = FlowKey { in_port: 1, l4_dst: 22, ..Default::default() };
        let t = p.translate(&k, &mut rt, None);
        assert_eq!(t.actions, vec![DpAction::Output(3)]);
        assert_eq!(t.mask.l4_dst, 0xffff);
        k.l4_dst = 80;
        let t = p.translate(&k, &mut rt, None);
        assert_eq!(t.actions, vec![DpAction::Output(2)]);
        // The ssh subtable was consulted (and missed), so l4_dst is in the mask.
        assert_eq!(t.mask.l4_dst, 0xffff);
        k.in_port = 9;
        let t = p.translate(&k, &mut rt, None);
        assert!(matches!(t.actions[..], [DpAction::Drop(_)]));
    }
}
