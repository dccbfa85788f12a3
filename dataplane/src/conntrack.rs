//! Connection tracking: TCP state, UDP and ICMP pseudo-connections, timeouts,
//! zones, and NAT (port-translating SNAT and its reverse).
//!
//! A connection is stored once and found under two tuples: the original
//! direction and the (post-NAT) reply direction, as Linux conntrack does.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::engine::KeyHasher;
use crate::flow::{ct_state, ethertype, frag, ip_from_bytes, proto, FlowKey};
use crate::packet::{self, Layout};
use crate::pipeline::{CtAction, Nat};

/// One direction's 5-tuple in a zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    /// Zone.
    pub zone: u16,
    /// IP protocol.
    pub proto: u8,
    /// Source address (16-byte form).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port or ICMP id.
    pub sport: u16,
    /// Destination port (0 for ICMP).
    pub dport: u16,
}

/// Hashed as five words (consistent with the field-wise `Eq`).
impl Hash for Tuple {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64((self.zone as u64) << 48 | (self.proto as u64) << 32 | (self.sport as u64) << 16 | self.dport as u64);
        for a in [&self.src, &self.dst] {
            h.write_u64(u64::from_ne_bytes(a[..8].try_into().expect("8 bytes")));
            h.write_u64(u64::from_ne_bytes(a[8..].try_into().expect("8 bytes")));
        }
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

impl Tuple {
    fn reversed(&self) -> Tuple {
        Tuple { zone: self.zone, proto: self.proto, src: self.dst, dst: self.src, sport: self.dport, dport: self.sport }
    }
}

/// TCP connection state, simplified from Linux's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// SYN seen from the originator.
    SynSent,
    /// SYN+ACK seen from the responder.
    SynRecv,
    /// Handshake done.
    Established,
    /// One side sent FIN.
    FinWait,
    /// Both sides sent FIN.
    TimeWait,
    /// Reset.
    Closed,
}

/// Protocol state of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoState {
    /// TCP with its state.
    Tcp(TcpState),
    /// UDP (or other IP protocol); `replied` once the reply direction was seen.
    Datagram {
        /// Whether a reply was seen.
        replied: bool,
    },
    /// ICMP echo.
    Icmp,
}

/// A tracked connection.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Original-direction tuple (before NAT).
    pub orig: Tuple,
    /// Reply-direction tuple (after NAT: what the reply looks like on the wire).
    pub reply: Tuple,
    /// Protocol state.
    pub state: ProtoState,
    /// Expiry time (engine clock).
    pub expires: Duration,
    /// Mark given at commit.
    pub mark: u32,
    /// Whether source NAT was applied.
    pub snat: bool,
    /// Packets seen (both directions).
    pub packets: u64,
}

/// Timeouts, as in OVS's defaults (shortened where a test would otherwise wait).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP before the handshake completes.
    pub tcp_syn: Duration,
    /// Established TCP.
    pub tcp_established: Duration,
    /// TCP closing (FIN seen).
    pub tcp_fin: Duration,
    /// TCP after reset.
    pub tcp_closed: Duration,
    /// UDP before a reply.
    pub udp_first: Duration,
    /// UDP after a reply.
    pub udp_replied: Duration,
    /// ICMP.
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn: Duration::from_secs(30),
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_fin: Duration::from_secs(30),
            tcp_closed: Duration::from_secs(10),
            udp_first: Duration::from_secs(30),
            udp_replied: Duration::from_secs(180),
            icmp: Duration::from_secs(30),
        }
    }
}

/// The connection table.
#[derive(Debug, Default)]
pub struct Conntrack {
    /// Connections in slots; the index maps both tuples to a slot.
    conns: Vec<Option<Connection>>,
    free: Vec<u32>,
    count: usize,
    index: FastMap<Tuple, (u32, bool)>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Maximum number of connections; new ones beyond it are invalid.
    pub limit: usize,
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A NAT rewrite as a trace shows it (see [`Conntrack::peek_nat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatPeek {
    /// The destination is rewritten (a reply); otherwise the source.
    pub dst: bool,
    /// The new address (16-byte form).
    pub addr: [u8; 16],
    /// The new port (or ICMP id); None when it is picked at commit.
    pub port: Option<u16>,
}

impl Conntrack {
    /// An empty table holding at most `limit` connections.
    pub fn new(limit: usize) -> Conntrack {
        Conntrack { limit, ..Default::default() }
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// All connections (for `show conntrack`).
    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.conns.iter().flatten()
    }

    /// Removes connections for which `keep` says false.
    pub fn retain(&mut self, mut keep: impl FnMut(&Connection) -> bool) -> usize {
        let drop: Vec<u32> = self.conns.iter().enumerate().filter(|(_, c)| c.as_ref().is_some_and(|c| !keep(c))).map(|(i, _)| i as u32).collect();
        for id in &drop {
            self.remove(*id);
        }
        drop.len()
    }

    /// Removes expired connections.
    pub fn expire(&mut self, now: Duration) -> usize {
        self.retain(|c| c.expires > now)
    }

    fn remove(&mut self, slot: u32) {
        if let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::take) {
            self.free.push(slot);
            self.count -= 1;
            self.index.remove(&c.orig);
            self.index.remove(&c.reply);
        }
    }

    /// Runs one packet through conntrack: sets `key.ct_state`/`ct_zone`,
    /// commits and NATs as `ct` asks, rewriting `frame` in place.
    pub fn process(&mut self, frame: &mut [u8], layout: &Layout, key: &mut FlowKey, ct: &CtAction, now: Duration) {
        key.ct_zone = ct.zone;
        key.ct_state = ct_state::TRACKED;
        if !matches!(key.eth_type, ethertype::IPV4 | ethertype::IPV6) || key.ip_frag == frag::LATER || layout.l4 == 0 {
            key.ct_state |= ct_state::INVALID;
            return;
        }
        let flags = packet::tcp_flags(frame, layout, key);
        let (sport, dport, icmp_kind) = match key.ip_proto {
            proto::TCP | proto::UDP => (key.l4_src, key.l4_dst, IcmpKind::NotIcmp),
            proto::ICMP | proto::ICMPV6 => {
                let t = key.l4_src as u8;
                match (key.ip_proto, t) {
                    (proto::ICMP, 8) | (proto::ICMPV6, 128) => (packet::icmp_echo_id(frame, layout, key).unwrap_or(0), 0, IcmpKind::Request),
                    (proto::ICMP, 0) | (proto::ICMPV6, 129) => (0, packet::icmp_echo_id(frame, layout, key).unwrap_or(0), IcmpKind::Reply),
                    (proto::ICMP, 3 | 11 | 12) | (proto::ICMPV6, 1..=4) => {
                        self.related(frame, layout, key, ct);
                        return;
                    }
                    _ => {
                        key.ct_state |= ct_state::INVALID;
                        return;
                    }
                }
            }
            _ => (0, 0, IcmpKind::NotIcmp),
        };
        // Echo requests and replies share one tuple shape: id in sport (request) / dport (reply).
        let tuple = Tuple { zone: ct.zone, proto: key.ip_proto, src: key.ip_src, dst: key.ip_dst, sport, dport };
        let mut found = self.index.get(&tuple).copied();
        if let Some((id, _)) = found {
            let c = self.conns[id as usize].as_ref().expect("indexed connection exists");
            let dead = c.expires <= now || (matches!(c.state, ProtoState::Tcp(TcpState::TimeWait | TcpState::Closed)) && flags & (TCP_SYN | TCP_ACK) == TCP_SYN);
            if dead {
                self.remove(id);
                found = None;
            }
        }
        match found {
            Some((id, is_reply)) => {
                let timeouts = self.timeouts;
                let c = self.conns[id as usize].as_mut().expect("indexed connection exists");
                let valid = advance(c, is_reply, flags, &timeouts, now, icmp_kind);
                c.packets += 1;
                if !valid {
                    key.ct_state |= ct_state::INVALID;
                    return;
                }
                key.ct_state |= ct_state::ESTABLISHED;
                if is_reply {
                    key.ct_state |= ct_state::REPLY;
                }
                if ct.nat.is_some() && c.snat {
                    let c = c.clone();
                    if is_reply {
                        // Reply to a source-NATed connection: restore the inside destination.
                        rewrite(frame, layout, key, true, &c.orig.src, c.orig.sport, icmp_kind);
                        key.ct_state |= ct_state::DNAT;
                    } else {
                        let out = c.reply.reversed();
                        rewrite(frame, layout, key, false, &out.src, out.sport, icmp_kind);
                        key.ct_state |= ct_state::SNAT;
                    }
                }
            }
            None => {
                if key.ip_proto == proto::TCP && flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
                    key.ct_state |= ct_state::INVALID;
                    return;
                }
                if icmp_kind == IcmpKind::Reply {
                    key.ct_state |= ct_state::INVALID;
                    return;
                }
                key.ct_state |= ct_state::NEW;
                if !ct.commit {
                    return;
                }
                if self.limit != 0 && self.count >= self.limit {
                    key.ct_state = ct_state::TRACKED | ct_state::INVALID;
                    return;
                }
                let mut reply = tuple.reversed();
                if icmp_kind == IcmpKind::Request {
                    reply.sport = 0;
                    reply.dport = tuple.sport;
                }
                let mut snat = false;
                if let Some(Nat::Snat { addr, port_min, port_max }) = ct.nat {
                    if key.eth_type != ethertype::IPV4 {
                        key.ct_state = ct_state::TRACKED | ct_state::INVALID;
                        return;
                    }
                    let a = ip_bytes4(addr);
                    reply.dst = a;
                    let Some(port) = self.free_port(&reply, icmp_kind, port_min, port_max) else {
                        key.ct_state = ct_state::TRACKED | ct_state::INVALID;
                        return;
                    };
                    // The translated port (or, for echoes, the translated id) is what replies carry back.
                    reply.dport = port;
                    snat = true;
                }
                let timeouts = self.timeouts;
                let mut c = Connection {
                    orig: tuple,
                    reply,
                    state: match key.ip_proto {
                        proto::TCP => ProtoState::Tcp(TcpState::SynSent),
                        proto::ICMP | proto::ICMPV6 if icmp_kind != IcmpKind::NotIcmp => ProtoState::Icmp,
                        _ => ProtoState::Datagram { replied: false },
                    },
                    expires: now,
                    mark: ct.mark,
                    snat,
                    packets: 1,
                };
                c.expires = now + timeout(&c.state, &timeouts);
                let id = match self.free.pop() {
                    Some(i) => i,
                    None => {
                        self.conns.push(None);
                        (self.conns.len() - 1) as u32
                    }
                };
                self.index.insert(c.orig, (id, false));
                self.index.insert(c.reply, (id, true));
                if snat {
                    let out = c.reply.reversed();
                    rewrite(frame, layout, key, false, &out.src, out.sport, icmp_kind);
                    key.ct_state |= ct_state::SNAT;
                }
                self.conns[id as usize] = Some(c);
                self.count += 1;
            }
        }
    }

    /// The state a packet described by `key` would get in `zone`, without
    /// changing anything (for traces): established (and reply) when its tuple
    /// is known, else new. ICMP echo ids are not in a flow key, so echoes are
    /// looked up with id 0.
    pub fn peek(&self, key: &FlowKey, zone: u16) -> u8 {
        let (sport, dport) = match key.ip_proto {
            proto::TCP | proto::UDP => (key.l4_src, key.l4_dst),
            _ => (0, 0),
        };
        let t = Tuple { zone, proto: key.ip_proto, src: key.ip_src, dst: key.ip_dst, sport, dport };
        match self.index.get(&t) {
            Some((_, true)) => ct_state::TRACKED | ct_state::ESTABLISHED | ct_state::REPLY,
            Some((_, false)) => ct_state::TRACKED | ct_state::ESTABLISHED,
            None => ct_state::TRACKED | ct_state::NEW,
        }
    }

    /// What the NAT of a ct() step (`nat`, committing or not) would do to a
    /// packet described by `key` in `zone`, without changing anything (for
    /// traces): an existing source-NATed connection's mapping (restoring the
    /// inside destination for replies), or for a new connection that source
    /// NAT commits, the outside address (its port is picked at commit).
    pub fn peek_nat(&self, key: &FlowKey, zone: u16, nat: Option<Nat>, commit: bool) -> Option<NatPeek> {
        let nat = nat?;
        let (sport, dport) = match key.ip_proto {
            proto::TCP | proto::UDP => (key.l4_src, key.l4_dst),
            _ => (0, 0),
        };
        let t = Tuple { zone, proto: key.ip_proto, src: key.ip_src, dst: key.ip_dst, sport, dport };
        match self.index.get(&t) {
            Some(&(id, is_reply)) => {
                let c = self.conns.get(id as usize)?.as_ref()?;
                if !c.snat {
                    return None;
                }
                Some(if is_reply {
                    NatPeek { dst: true, addr: c.orig.src, port: Some(c.orig.sport) }
                } else {
                    let out = c.reply.reversed();
                    NatPeek { dst: false, addr: out.src, port: Some(out.sport) }
                })
            }
            None => match nat {
                Nat::Snat { addr, .. } if commit && key.eth_type == ethertype::IPV4 => Some(NatPeek { dst: false, addr: ip_bytes4(addr), port: None }),
                _ => None,
            },
        }
    }

    /// Picks a source port (or ICMP id) for SNAT so that the reply tuple is unused.
    fn free_port(&self, reply: &Tuple, kind: IcmpKind, lo: u16, hi: u16) -> Option<u16> {
        let _ = kind;
        let span = (hi as u32).saturating_sub(lo as u32) + 1;
        // Start from a hash of the tuple to spread connections.
        let h = FlowKey { ip_src: reply.src, l4_src: reply.sport, ..Default::default() };
        let start = (h.hash() % span as u64) as u32;
        for i in 0..span {
            let port = (lo as u32 + (start + i) % span) as u16;
            let t = Tuple { dport: port, ..*reply };
            if !self.index.contains_key(&t) {
                return Some(port);
            }
        }
        None
    }

    /// ICMP errors: related if the embedded packet belongs to a connection.
    fn related(&mut self, frame: &mut [u8], layout: &Layout, key: &mut FlowKey, ct: &CtAction) {
        let inner = layout.l4 as usize + 8;
        let mut k = FlowKey::default();
        // Parse the embedded IP header by faking an Ethernet header offset.
        let Some(body) = frame.get(inner..) else {
            key.ct_state |= ct_state::INVALID;
            return;
        };
        let mut fake = [0u8; 14 + 60];
        let n = body.len().min(60);
        fake[12..14].copy_from_slice(&key.eth_type.to_be_bytes());
        fake[14..14 + n].copy_from_slice(&body[..n]);
        // The embedded header's total length usually exceeds what is quoted; patch it.
        if key.eth_type == ethertype::IPV4 && n >= 20 {
            let ihl = (fake[14] & 0x0f) as usize * 4;
            let tl = (n as u16).max(ihl as u16);
            fake[16..18].copy_from_slice(&tl.to_be_bytes());
        } else if key.eth_type == ethertype::IPV6 && n >= 40 {
            fake[18..20].copy_from_slice(&((n - 40) as u16).to_be_bytes());
        }
        let ok = packet::parse(&fake[..14 + n], &mut k).is_ok();
        let t = Tuple { zone: ct.zone, proto: k.ip_proto, src: k.ip_src, dst: k.ip_dst, sport: k.l4_src, dport: k.l4_dst };
        if ok && (self.index.contains_key(&t) || self.index.contains_key(&t.reversed())) {
            key.ct_state |= ct_state::RELATED;
        } else {
            key.ct_state |= ct_state::INVALID;
        }
        let _ = frame;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IcmpKind {
    NotIcmp,
    Request,
    Reply,
}

fn ip_bytes4(a: Ipv4Addr) -> [u8; 16] {
    a.to_ipv6_mapped().octets()
}

/// Rewrites source (or destination when `dst`) address and port/ICMP id.
fn rewrite(frame: &mut [u8], layout: &Layout, key: &mut FlowKey, dst: bool, addr: &[u8; 16], port: u16, kind: IcmpKind) {
    packet::set_ip(frame, layout, key, dst, addr);
    if dst {
        key.ip_dst = *addr;
    } else {
        key.ip_src = *addr;
    }
    match kind {
        IcmpKind::NotIcmp => {
            if matches!(key.ip_proto, proto::TCP | proto::UDP) {
                packet::set_l4_port(frame, layout, key, dst, port);
                if dst {
                    key.l4_dst = port;
                } else {
                    key.l4_src = port;
                }
            }
        }
        _ => packet::set_icmp_id(frame, layout, port),
    }
}

fn timeout(s: &ProtoState, t: &Timeouts) -> Duration {
    match s {
        ProtoState::Tcp(TcpState::SynSent | TcpState::SynRecv) => t.tcp_syn,
        ProtoState::Tcp(TcpState::Established) => t.tcp_established,
        ProtoState::Tcp(TcpState::FinWait | TcpState::TimeWait) => t.tcp_fin,
        ProtoState::Tcp(TcpState::Closed) => t.tcp_closed,
        ProtoState::Datagram { replied: false } => t.udp_first,
        ProtoState::Datagram { replied: true } => t.udp_replied,
        ProtoState::Icmp => t.icmp,
    }
}

/// Advances a connection's state by one packet; false if the packet is invalid for the state.
fn advance(c: &mut Connection, is_reply: bool, flags: u8, t: &Timeouts, now: Duration, icmp: IcmpKind) -> bool {
    let ok = match &mut c.state {
        ProtoState::Tcp(s) => {
            if flags & TCP_RST != 0 {
                *s = TcpState::Closed;
                true
            } else {
                match (*s, is_reply) {
                    (TcpState::SynSent, false) => flags & TCP_SYN == 0 || flags & TCP_ACK == 0,
                    (TcpState::SynSent, true) => {
                        if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
                            *s = TcpState::SynRecv;
                            true
                        } else {
                            false
                        }
                    }
                    (TcpState::SynRecv, false) => {
                        if flags & TCP_ACK != 0 && flags & TCP_SYN == 0 {
                            *s = TcpState::Established;
                        }
                        true
                    }
                    (TcpState::SynRecv, true) => true,
                    (TcpState::Established, _) => {
                        if flags & TCP_SYN != 0 {
                            false
                        } else {
                            if flags & TCP_FIN != 0 {
                                *s = TcpState::FinWait;
                            }
                            true
                        }
                    }
                    (TcpState::FinWait, _) => {
                        if flags & TCP_FIN != 0 {
                            *s = TcpState::TimeWait;
                        }
                        true
                    }
                    (TcpState::TimeWait, _) => flags & TCP_SYN == 0,
                    (TcpState::Closed, _) => false,
                }
            }
        }
        ProtoState::Datagram { replied } => {
            if is_reply {
                *replied = true;
            }
            true
        }
        ProtoState::Icmp => (icmp == IcmpKind::Request) != is_reply,
    };
    if ok {
        c.expires = now + timeout(&c.state, t);
    }
    ok
}

impl std::fmt::Display for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.orig.proto {
            proto::TCP => "tcp",
            proto::UDP => "udp",
            proto::ICMP => "icmp",
            proto::ICMPV6 => "icmpv6",
            _ => "ip",
        };
        write!(
            f,
            "{p},zone={},orig=({}:{} -> {}:{}),reply=({}:{} -> {}:{}),state={:?},mark={},packets={}",
            self.orig.zone,
            ip_from_bytes(self.orig.src),
            self.orig.sport,
            ip_from_bytes(self.orig.dst),
            self.orig.dport,
            ip_from_bytes(self.reply.src),
            self.reply.sport,
            ip_from_bytes(self.reply.dst),
            self.reply.dport,
            self.state,
            self.mark,
            self.packets
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests::ipv4_frame;

    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut f = ipv4_frame(proto::TCP, src, dst, sport, dport, b"");
        let l4 = 34;
        let old = u16::from_be_bytes([f[l4 + 12], f[l4 + 13]]);
        f[l4 + 13] = flags;
        let new = u16::from_be_bytes([f[l4 + 12], f[l4 + 13]]);
        let c = packet::csum_replace16(u16::from_be_bytes([f[l4 + 16], f[l4 + 17]]), old, new);
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        f
    }

    fn run(ct: &mut Conntrack, f: &mut [u8], a: &CtAction, now: u64) -> FlowKey {
        let mut k = FlowKey::default();
        let l = packet::parse(f, &mut k).unwrap();
        ct.process(f, &l, &mut k, a, Duration::from_secs(now));
        k
    }

    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 0, 2];

    #[test]
    fn tcp_handshake_and_invalid() {
        let mut ct = Conntrack::new(100);
        let commit = CtAction { zone: 5, commit: true, nat: None, mark: 1 };
        let look = CtAction { commit: false, ..commit };
        // A stray ACK is invalid.
        let k = run(&mut ct, &mut tcp(A, B, 1000, 22, TCP_ACK), &commit, 0);
        assert_eq!(k.ct_state, ct_state::TRACKED | ct_state::INVALID);
        let k = run(&mut ct, &mut tcp(A, B, 1000, 22, TCP_SYN), &look, 0);
        assert_eq!(k.ct_state, ct_state::TRACKED | ct_state::NEW);
        assert!(ct.is_empty(), "not committed");
        run(&mut ct, &mut tcp(A, B, 1000, 22, TCP_SYN), &commit, 0);
        let k = run(&mut ct, &mut tcp(B, A, 22, 1000, TCP_SYN | TCP_ACK), &look, 1);
        assert_eq!(k.ct_state, ct_state::TRACKED | ct_state::ESTABLISHED | ct_state::REPLY);
        let k = run(&mut ct, &mut tcp(A, B, 1000, 22, TCP_ACK), &look, 1);
        assert_eq!(k.ct_state, ct_state::TRACKED | ct_state::ESTABLISHED);
        // Another zone does not see it.
        let k = run(&mut ct, &mut tcp(B, A, 22, 1000, TCP_ACK), &CtAction { zone: 6, ..look }, 1);
        assert_eq!(k.ct_state & ct_state::INVALID, ct_state::INVALID);
        // Expiry.
        assert_eq!(ct.expire(Duration::from_secs(2)), 0);
        assert_eq!(ct.expire(Duration::from_secs(25 * 3600)), 1);
    }

    #[test]
    fn snat_translates_and_reverses() {
        let mut ct = Conntrack::new(100);
        let snat = CtAction { zone: 9, commit: true, nat: Some(Nat::Snat { addr: Ipv4Addr::new(203, 0, 113, 10), port_min: 1024, port_max: 1025 }), mark: 0 };
        let rev = CtAction { zone: 9, commit: false, nat: Some(Nat::Reverse), mark: 0 };
        let ext = [203, 0, 113, 100];
        let mut f = ipv4_frame(proto::UDP, A, ext, 5000, 53, b"q");
        let k = run(&mut ct, &mut f, &snat, 0);
        assert_eq!(k.ct_state, ct_state::TRACKED | ct_state::NEW | ct_state::SNAT);
        let mut k2 = FlowKey::default();
        packet::parse(&f, &mut k2).unwrap();
        assert_eq!(k2.src_v4(), Ipv4Addr::new(203, 0, 113, 10));
        let outside_port = k2.l4_src;
        assert!((1024..=1025).contains(&outside_port));
        // A second inside host gets the other port.
        let mut f2 = ipv4_frame(proto::UDP, B, ext, 5000, 53, b"q");
        run(&mut ct, &mut f2, &snat, 0);
        let mut k3 = FlowKey::default();
        packet::parse(&f2, &mut k3).unwrap();
        assert_ne!(k3.l4_src, outside_port);
        // A third has no port left.
        let mut f3 = ipv4_frame(proto::UDP, [10, 0, 0, 3], ext, 5000, 53, b"q");
        let k = run(&mut ct, &mut f3, &snat, 0);
        assert_eq!(k.ct_state & ct_state::INVALID, ct_state::INVALID);
        // The reply comes back to the inside host.
        let mut r = ipv4_frame(proto::UDP, ext, [203, 0, 113, 10], 53, outside_port, b"a");
        let k = run(&mut ct, &mut r, &rev, 1);
        assert_eq!(k.ct_state, ct_state::TRACKED | ct_state::ESTABLISHED | ct_state::REPLY | ct_state::DNAT);
        let mut kr = FlowKey::default();
        packet::parse(&r, &mut kr).unwrap();
        assert_eq!((kr.dst_v4().octets(), kr.l4_dst), (A, 5000));
        // Checksums stay valid.
        let ps = packet::pseudo_header_sum(&r[26..30], &r[30..34], proto::UDP, r.len() - 34);
        assert_eq!(packet::checksum(&r[34..], ps), 0);
        // Unsolicited traffic to the outside address is new, not established.
        let mut u = ipv4_frame(proto::UDP, ext, [203, 0, 113, 10], 53, 4444, b"a");
        let k = run(&mut ct, &mut u, &rev, 1);
        assert_eq!(k.ct_state, ct_state::TRACKED | ct_state::NEW);
    }

    #[test]
    fn icmp_echo_and_snat_of_pings() {
        let mut ct = Conntrack::new(100);
        let snat = CtAction { zone: 9, commit: true, nat: Some(Nat::Snat { addr: Ipv4Addr::new(203, 0, 113, 10), port_min: 1024, port_max: 65535 }), mark: 0 };
        let rev = CtAction { zone: 9, commit: false, nat: Some(Nat::Reverse), mark: 0 };
        let ext = [203, 0, 113, 100];
        let mut req = ipv4_frame(proto::ICMP, A, ext, 8, 0, b"ping");
        run(&mut ct, &mut req, &snat, 0);
        let mut k = FlowKey::default();
        let l = packet::parse(&req, &mut k).unwrap();
        let id = packet::icmp_echo_id(&req, &l, &k).unwrap();
        assert_eq!(packet::checksum(&req[34..], 0), 0, "ICMP checksum after id rewrite");
        let mut rep = ipv4_frame(proto::ICMP, ext, [203, 0, 113, 10], 0, 0, b"ping");
        rep[38..40].copy_from_slice(&id.to_be_bytes());
        let c = packet::checksum(&{
            let mut x = rep[34..].to_vec();
            x[2] = 0;
            x[3] = 0;
            x
        }, 0);
        rep[36..38].copy_from_slice(&c.to_be_bytes());
        let k = run(&mut ct, &mut rep, &rev, 1);
        assert_eq!(k.ct_state & ct_state::ESTABLISHED, ct_state::ESTABLISHED);
        let mut k2 = FlowKey::default();
        let l2 = packet::parse(&rep, &mut k2).unwrap();
        assert_eq!(k2.dst_v4().octets(), A);
        assert_eq!(packet::icmp_echo_id(&rep, &l2, &k2), Some(0x1234));
        // A reply with no request is invalid.
        let mut stray = ipv4_frame(proto::ICMP, ext, A, 0, 0, b"x");
        let k = run(&mut ct, &mut stray, &CtAction { zone: 1, commit: true, nat: None, mark: 0 }, 1);
        assert_eq!(k.ct_state & ct_state::INVALID, ct_state::INVALID);
    }
}

#[cfg(test)]
mod hash_tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Tuples that differ only in the last bytes of the destination address
    /// (as 10,000 flows to 10.253.x.y do) must spread over a table's buckets.
    #[test]
    fn tuples_differing_in_address_high_bits_spread() {
        let build = BuildHasherDefault::<KeyHasher>::default();
        let mut buckets = std::collections::HashSet::new();
        for i in 0..4096u32 {
            let mut dst = [0u8; 16];
            dst[10..12].copy_from_slice(&[0xff, 0xff]);
            dst[12..16].copy_from_slice(&[10, 253, (i >> 8) as u8, i as u8]);
            let t = Tuple { zone: 3, proto: proto::UDP, src: dst, dst, sport: 9, dport: 9 };
            buckets.insert(build.hash_one(t) & 4095);
        }
        // Uniform hashing fills about 63% of 4096 buckets with 4096 keys.
        assert!(buckets.len() > 2000, "only {} of 4096 buckets used", buckets.len());
    }
}
