//! Packet parsing (Ethernet, 802.1Q, ARP, IPv4, IPv6, ICMP, ICMPv6/ND, TCP,
//! UDP, VXLAN) into a [`FlowKey`], and the in-place rewrites the datapath's
//! actions perform. Nothing here panics on malformed or truncated input: a bad
//! packet yields a [`ParseError`] that the caller counts and drops.

use crate::flow::{ethertype, frag, proto, FlowKey};
use crate::mac::MacAddr;

/// The VXLAN UDP port (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// Length of a VXLAN header.
pub const VXLAN_HEADER_LEN: usize = 8;

/// Why a frame could not be parsed; each variant has its own drop counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than an Ethernet header.
    #[error("Frame shorter than an Ethernet header")]
    TruncatedEthernet,
    /// A VLAN tag or ARP body was cut short.
    #[error("Frame truncated inside a VLAN tag or ARP body")]
    TruncatedL2,
    /// IPv4 header too short, bad IHL, bad version or total length.
    #[error("Malformed IPv4 header")]
    BadIpv4,
    /// IPv6 header or an extension header was cut short or malformed.
    #[error("Malformed IPv6 header")]
    BadIpv6,
    /// TCP, UDP or ICMP header cut short or malformed.
    #[error("Malformed transport header")]
    BadL4,
}

impl ParseError {
    /// Number of variants, for counter arrays.
    pub const COUNT: usize = 5;

    /// Index of this reason in counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Short name for counters.
    pub fn name(i: usize) -> &'static str {
        ["truncated_ethernet", "truncated_l2", "bad_ipv4", "bad_ipv6", "bad_l4"][i]
    }
}

/// Offsets of the layers of a parsed frame (0 when absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Layout {
    /// Start of the network header.
    pub l3: u16,
    /// Start of the transport header.
    pub l4: u16,
    /// Start of the transport payload.
    pub l7: u16,
}

#[inline]
fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(off)?, *b.get(off + 1)?]))
}

#[inline]
fn slice(b: &[u8], off: usize, len: usize) -> Option<&[u8]> {
    b.get(off..off.checked_add(len)?)
}

/// Parses `frame` into `key`'s packet fields (metadata fields are left alone).
pub fn parse(frame: &[u8], key: &mut FlowKey) -> Result<Layout, ParseError> {
    parse_wire(frame, frame.len(), key)
}

/// Whether the headers of a frame that starts with `head` lie within its
/// first `SPLIT_HEAD` bytes whatever their options: untagged IPv4 carrying
/// TCP, UDP or ICMP (at most 14 + 60 + 60 bytes), or untagged IPv6 whose
/// next header is TCP or UDP (at most 14 + 40 + 60). Such a frame can be
/// parsed and forwarded from its head alone (see [`parse_wire`]).
pub fn headers_in_head(head: &[u8]) -> bool {
    if head.len() < SPLIT_HEAD {
        return false;
    }
    match u16::from_be_bytes([head[12], head[13]]) {
        ethertype::IPV4 => matches!(head[23], proto::TCP | proto::UDP | proto::ICMP),
        ethertype::IPV6 => matches!(head[20], proto::TCP | proto::UDP),
        _ => false,
    }
}

/// Bytes of a large frame a port copies before leaving the rest in place.
pub const SPLIT_HEAD: usize = 256;

/// Parses a frame of `wire_len` bytes of which `frame` holds the first ones
/// (all of them, or a head for which [`headers_in_head`] holds): lengths in
/// the headers are checked against `wire_len`, and only bytes of `frame`
/// are read.
pub fn parse_wire(frame: &[u8], wire_len: usize, key: &mut FlowKey) -> Result<Layout, ParseError> {
    // Reset packet fields, keep in_port/recirc/tunnel/ct metadata and registers.
    key.eth_type = 0;
    key.vlan_tci = 0;
    key.ip_proto = 0;
    key.ip_frag = 0;
    key.ip_ttl = 0;
    key.l4_src = 0;
    key.l4_dst = 0;
    key.arp_sha = [0; 6];
    key.ip_src = [0; 16];
    key.ip_dst = [0; 16];
    key.nd_target = [0; 16];

    let eth = slice(frame, 0, 14).ok_or(ParseError::TruncatedEthernet)?;
    key.eth_dst.copy_from_slice(&eth[0..6]);
    key.eth_src.copy_from_slice(&eth[6..12]);
    let mut off = 12;
    let mut et = be16(frame, off).ok_or(ParseError::TruncatedEthernet)?;
    if et == ethertype::VLAN {
        let tci = be16(frame, 14).ok_or(ParseError::TruncatedL2)?;
        key.vlan_tci = tci | 0x1000;
        off += 4;
        et = be16(frame, off).ok_or(ParseError::TruncatedL2)?;
    }
    off += 2;
    key.eth_type = et;
    let mut layout = Layout { l3: off as u16, l4: 0, l7: 0 };
    match et {
        ethertype::ARP => {
            let arp = slice(frame, off, 28).ok_or(ParseError::TruncatedL2)?;
            // Only Ethernet/IPv4 ARP is meaningful to us.
            if arp[0..2] != [0, 1] || arp[2..4] != [8, 0] || arp[4] != 6 || arp[5] != 4 {
                return Err(ParseError::TruncatedL2);
            }
            key.ip_proto = arp[7];
            key.arp_sha.copy_from_slice(&arp[8..14]);
            key.ip_src[10] = 0xff;
            key.ip_src[11] = 0xff;
            key.ip_src[12..16].copy_from_slice(&arp[14..18]);
            key.ip_dst[10] = 0xff;
            key.ip_dst[11] = 0xff;
            key.ip_dst[12..16].copy_from_slice(&arp[24..28]);
        }
        ethertype::IPV4 => {
            let ip = slice(frame, off, 20).ok_or(ParseError::BadIpv4)?;
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || off + total > wire_len {
                return Err(ParseError::BadIpv4);
            }
            key.ip_ttl = ip[8];
            key.ip_proto = ip[9];
            key.ip_src[10] = 0xff;
            key.ip_src[11] = 0xff;
            key.ip_src[12..16].copy_from_slice(&ip[12..16]);
            key.ip_dst[10] = 0xff;
            key.ip_dst[11] = 0xff;
            key.ip_dst[12..16].copy_from_slice(&ip[16..20]);
            let fragoff = u16::from_be_bytes([ip[6], ip[7]]);
            let more = fragoff & 0x2000 != 0;
            let offset = fragoff & 0x1fff;
            key.ip_frag = if offset != 0 { frag::LATER } else if more { frag::FIRST } else { frag::NONE };
            let l4 = off + ihl;
            layout.l4 = l4 as u16;
            if key.ip_frag != frag::LATER {
                let end = off + total;
                layout.l7 = parse_l4(&frame[..end.min(frame.len())], l4, end, key)? as u16;
            }
        }
        ethertype::IPV6 => {
            let ip = slice(frame, off, 40).ok_or(ParseError::BadIpv6)?;
            if ip[0] >> 4 != 6 {
                return Err(ParseError::BadIpv6);
            }
            let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            let end = off + 40 + payload;
            if end > wire_len {
                return Err(ParseError::BadIpv6);
            }
            key.ip_ttl = ip[7];
            key.ip_src.copy_from_slice(&ip[8..24]);
            key.ip_dst.copy_from_slice(&ip[24..40]);
            let frame = &frame[..end.min(frame.len())];
            let mut next = ip[6];
            let mut l4 = off + 40;
            // Walk at most a few extension headers.
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        let h = slice(frame, l4, 8).ok_or(ParseError::BadIpv6)?;
                        next = h[0];
                        l4 += (h[1] as usize + 1) * 8;
                    }
                    44 => {
                        let h = slice(frame, l4, 8).ok_or(ParseError::BadIpv6)?;
                        next = h[0];
                        let offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                        key.ip_frag = if offset != 0 { frag::LATER } else { frag::FIRST };
                        l4 += 8;
                    }
                    _ => break,
                }
            }
            if l4 > end {
                return Err(ParseError::BadIpv6);
            }
            key.ip_proto = next;
            layout.l4 = l4 as u16;
            if key.ip_frag != frag::LATER {
                layout.l7 = parse_l4(frame, l4, end, key)? as u16;
            }
        }
        _ => {}
    }
    Ok(layout)
}

/// Parses the transport header at `l4` inside `frame` (cut to the IP
/// length, or a head of it), where the IP packet ends at `end`.
fn parse_l4(frame: &[u8], l4: usize, end: usize, key: &mut FlowKey) -> Result<usize, ParseError> {
    match key.ip_proto {
        proto::TCP => {
            let h = slice(frame, l4, 20).ok_or(ParseError::BadL4)?;
            let doff = ((h[12] >> 4) as usize) * 4;
            if doff < 20 || l4 + doff > end {
                return Err(ParseError::BadL4);
            }
            key.l4_src = u16::from_be_bytes([h[0], h[1]]);
            key.l4_dst = u16::from_be_bytes([h[2], h[3]]);
            Ok(l4 + doff)
        }
        proto::UDP => {
            let h = slice(frame, l4, 8).ok_or(ParseError::BadL4)?;
            let len = u16::from_be_bytes([h[4], h[5]]) as usize;
            if len < 8 || l4 + len > end {
                return Err(ParseError::BadL4);
            }
            key.l4_src = u16::from_be_bytes([h[0], h[1]]);
            key.l4_dst = u16::from_be_bytes([h[2], h[3]]);
            Ok(l4 + 8)
        }
        proto::ICMP => {
            let h = slice(frame, l4, 8).ok_or(ParseError::BadL4)?;
            key.l4_src = h[0] as u16;
            key.l4_dst = h[1] as u16;
            Ok(l4 + 8)
        }
        proto::ICMPV6 => {
            let h = slice(frame, l4, 8).ok_or(ParseError::BadL4)?;
            key.l4_src = h[0] as u16;
            key.l4_dst = h[1] as u16;
            if h[0] == 135 || h[0] == 136 {
                let target = slice(frame, l4 + 8, 16).ok_or(ParseError::BadL4)?;
                key.nd_target.copy_from_slice(target);
                let mut opt = l4 + 24;
                while let Some(o) = slice(frame, opt, 2) {
                    let len = o[1] as usize * 8;
                    if len == 0 {
                        return Err(ParseError::BadL4);
                    }
                    if (o[0] == 1 || o[0] == 2) && len == 8 {
                        let mac = slice(frame, opt + 2, 6).ok_or(ParseError::BadL4)?;
                        key.arp_sha.copy_from_slice(mac);
                    }
                    opt += len;
                }
            }
            Ok(l4 + 8)
        }
        _ => Ok(l4),
    }
}

/// Parses a VXLAN header (the UDP payload); returns the VNI.
pub fn parse_vxlan(payload: &[u8]) -> Option<u32> {
    let h = slice(payload, 0, VXLAN_HEADER_LEN)?;
    if h[0] & 0x08 == 0 {
        return None;
    }
    Some(u32::from_be_bytes([0, h[4], h[5], h[6]]))
}

/// Writes a VXLAN header for `vni` into the first 8 bytes of `out`.
pub fn write_vxlan(out: &mut [u8; VXLAN_HEADER_LEN], vni: u32) {
    *out = [0x08, 0, 0, 0, (vni >> 16) as u8, (vni >> 8) as u8, vni as u8, 0];
}

/// The Internet checksum (RFC 1071) of `data`, folded and complemented, starting from `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u16::from_be_bytes([c[0], c[1]]) as u32);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add((*last as u32) << 8);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The unfolded pseudo-header sum for a transport checksum.
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for c in src.chunks_exact(2).chain(dst.chunks_exact(2)) {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    sum + proto as u32 + (len as u32 & 0xffff) + (len as u32 >> 16)
}

/// Incrementally updates a checksum for a 16-bit word changing from `old` to `new` (RFC 1624).
#[inline]
pub fn csum_replace16(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!csum as u32) + (!old as u32 & 0xffff) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

fn csum_replace_bytes(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut c = csum;
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        c = csum_replace16(c, u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([n[0], n[1]]));
    }
    c
}

fn get16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Which transport checksum field covers the addresses, if any (offset within frame).
fn l4_csum_offset(frame: &[u8], layout: &Layout, key: &FlowKey) -> Option<usize> {
    if layout.l4 == 0 || key.ip_frag == frag::LATER {
        return None;
    }
    let l4 = layout.l4 as usize;
    let off = match key.ip_proto {
        proto::TCP => l4 + 16,
        proto::UDP => {
            if frame.get(l4 + 6..l4 + 8)? == [0, 0] && key.eth_type == ethertype::IPV4 {
                return None; // UDP over IPv4 without checksum stays without.
            }
            l4 + 6
        }
        proto::ICMPV6 => l4 + 2,
        _ => return None,
    };
    (off + 2 <= frame.len()).then_some(off)
}

/// Rewrites the Ethernet source.
pub fn set_eth_src(frame: &mut [u8], mac: MacAddr) {
    frame[6..12].copy_from_slice(&mac.0);
}

/// Rewrites the Ethernet destination.
pub fn set_eth_dst(frame: &mut [u8], mac: MacAddr) {
    frame[0..6].copy_from_slice(&mac.0);
}

/// Rewrites the IP source or destination (16-byte key form), fixing IP and transport checksums.
pub fn set_ip(frame: &mut [u8], layout: &Layout, key: &FlowKey, dst: bool, addr: &[u8; 16]) {
    let l3 = layout.l3 as usize;
    match key.eth_type {
        ethertype::IPV4 => {
            let off = l3 + if dst { 16 } else { 12 };
            let old: [u8; 4] = frame[off..off + 4].try_into().unwrap_or([0; 4]);
            let new = &addr[12..16];
            let c = csum_replace_bytes(get16(frame, l3 + 10), &old, new);
            put16(frame, l3 + 10, c);
            if let Some(co) = l4_csum_offset(frame, layout, key) {
                let c = csum_replace_bytes(get16(frame, co), &old, new);
                put16(frame, co, if c == 0 && key.ip_proto == proto::UDP { 0xffff } else { c });
            }
            frame[off..off + 4].copy_from_slice(new);
        }
        ethertype::IPV6 => {
            let off = l3 + if dst { 24 } else { 8 };
            let old: [u8; 16] = frame[off..off + 16].try_into().unwrap_or([0; 16]);
            if let Some(co) = l4_csum_offset(frame, layout, key) {
                let c = csum_replace_bytes(get16(frame, co), &old, addr);
                put16(frame, co, c);
            }
            frame[off..off + 16].copy_from_slice(addr);
        }
        _ => {}
    }
}

/// Rewrites the TCP/UDP source or destination port, fixing the checksum.
pub fn set_l4_port(frame: &mut [u8], layout: &Layout, key: &FlowKey, dst: bool, port: u16) {
    if layout.l4 == 0 || !matches!(key.ip_proto, proto::TCP | proto::UDP) || key.ip_frag == frag::LATER {
        return;
    }
    let off = layout.l4 as usize + if dst { 2 } else { 0 };
    let old = get16(frame, off);
    if let Some(co) = l4_csum_offset(frame, layout, key) {
        let c = csum_replace16(get16(frame, co), old, port);
        put16(frame, co, if c == 0 && key.ip_proto == proto::UDP { 0xffff } else { c });
    }
    put16(frame, off, port);
}

/// Rewrites the ICMP echo identifier (for port-translating NAT of pings).
pub fn set_icmp_id(frame: &mut [u8], layout: &Layout, id: u16) {
    let l4 = layout.l4 as usize;
    let old = get16(frame, l4 + 4);
    let c = csum_replace16(get16(frame, l4 + 2), old, id);
    put16(frame, l4 + 2, c);
    put16(frame, l4 + 4, id);
}

/// Reads the ICMP echo identifier, if the packet is an ICMP(v6) echo request/reply.
pub fn icmp_echo_id(frame: &[u8], layout: &Layout, key: &FlowKey) -> Option<u16> {
    let echo = match key.ip_proto {
        proto::ICMP => key.l4_src == 8 || key.l4_src == 0,
        proto::ICMPV6 => key.l4_src == 128 || key.l4_src == 129,
        _ => false,
    };
    if !echo || layout.l4 == 0 {
        return None;
    }
    be16(frame, layout.l4 as usize + 4)
}

/// Decrements the TTL or hop limit; false when it would reach zero (drop).
pub fn dec_ttl(frame: &mut [u8], layout: &Layout, key: &FlowKey) -> bool {
    let l3 = layout.l3 as usize;
    match key.eth_type {
        ethertype::IPV4 => {
            let ttl = frame[l3 + 8];
            if ttl <= 1 {
                return false;
            }
            let old = get16(frame, l3 + 8);
            frame[l3 + 8] = ttl - 1;
            let c = csum_replace16(get16(frame, l3 + 10), old, get16(frame, l3 + 8));
            put16(frame, l3 + 10, c);
            true
        }
        ethertype::IPV6 => {
            if frame[l3 + 7] <= 1 {
                return false;
            }
            frame[l3 + 7] -= 1;
            true
        }
        _ => true,
    }
}

/// TCP flags of a parsed TCP packet (0 otherwise).
pub fn tcp_flags(frame: &[u8], layout: &Layout, key: &FlowKey) -> u8 {
    if key.ip_proto != proto::TCP || layout.l4 == 0 || key.ip_frag == frag::LATER {
        return 0;
    }
    frame.get(layout.l4 as usize + 13).copied().unwrap_or(0)
}

/// Turns an ARP request into the reply `mac` gives for its target address.
pub fn make_arp_reply(frame: &mut [u8], layout: &Layout, mac: MacAddr) {
    let a = layout.l3 as usize;
    let sender_mac: [u8; 6] = frame[a + 8..a + 14].try_into().unwrap_or([0; 6]);
    let sender_ip: [u8; 4] = frame[a + 14..a + 18].try_into().unwrap_or([0; 4]);
    let target_ip: [u8; 4] = frame[a + 24..a + 28].try_into().unwrap_or([0; 4]);
    frame[a + 6..a + 8].copy_from_slice(&[0, 2]);
    frame[a + 8..a + 14].copy_from_slice(&mac.0);
    frame[a + 14..a + 18].copy_from_slice(&target_ip);
    frame[a + 18..a + 24].copy_from_slice(&sender_mac);
    frame[a + 24..a + 28].copy_from_slice(&sender_ip);
    frame[0..6].copy_from_slice(&sender_mac);
    frame[6..12].copy_from_slice(&mac.0);
}

/// Writes an ARP request from (`mac`, `spa`) for `tpa` into `buf`; returns its length.
pub fn write_arp_request(buf: &mut [u8], mac: MacAddr, spa: [u8; 4], tpa: [u8; 4], vlan_tci: u16) -> usize {
    let mut off = 0;
    buf[0..6].copy_from_slice(&MacAddr::BROADCAST.0);
    buf[6..12].copy_from_slice(&mac.0);
    off += 12;
    if vlan_tci != 0 {
        put16(buf, off, ethertype::VLAN);
        put16(buf, off + 2, vlan_tci & 0xefff);
        off += 4;
    }
    put16(buf, off, ethertype::ARP);
    off += 2;
    buf[off..off + 8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    buf[off + 8..off + 14].copy_from_slice(&mac.0);
    buf[off + 14..off + 18].copy_from_slice(&spa);
    buf[off + 18..off + 24].copy_from_slice(&[0; 6]);
    buf[off + 24..off + 28].copy_from_slice(&tpa);
    let len = off + 28;
    // Pad to the Ethernet minimum.
    let min = 60;
    buf[len..min].fill(0);
    min
}

/// Turns an ICMP or ICMPv6 echo request into the echo reply, sent back from `mac`.
pub fn make_echo_reply(frame: &mut [u8], layout: &Layout, key: &FlowKey, mac: MacAddr) {
    let l3 = layout.l3 as usize;
    let l4 = layout.l4 as usize;
    let src: [u8; 6] = frame[6..12].try_into().unwrap_or([0; 6]);
    frame[0..6].copy_from_slice(&src);
    frame[6..12].copy_from_slice(&mac.0);
    match key.eth_type {
        ethertype::IPV4 => {
            let s: [u8; 4] = frame[l3 + 12..l3 + 16].try_into().unwrap_or([0; 4]);
            let d: [u8; 4] = frame[l3 + 16..l3 + 20].try_into().unwrap_or([0; 4]);
            frame[l3 + 12..l3 + 16].copy_from_slice(&d);
            frame[l3 + 16..l3 + 20].copy_from_slice(&s);
            let old = get16(frame, l4);
            frame[l4] = 0;
            let c = csum_replace16(get16(frame, l4 + 2), old, get16(frame, l4));
            put16(frame, l4 + 2, c);
        }
        ethertype::IPV6 => {
            let s: [u8; 16] = frame[l3 + 8..l3 + 24].try_into().unwrap_or([0; 16]);
            let d: [u8; 16] = frame[l3 + 24..l3 + 40].try_into().unwrap_or([0; 16]);
            frame[l3 + 8..l3 + 24].copy_from_slice(&d);
            frame[l3 + 24..l3 + 40].copy_from_slice(&s);
            frame[l3 + 7] = 255;
            let old = get16(frame, l4);
            frame[l4] = 129;
            let c = csum_replace16(get16(frame, l4 + 2), old, get16(frame, l4));
            put16(frame, l4 + 2, c);
        }
        _ => {}
    }
}

/// Writes an IPv6 header plus ICMPv6 body (checksum filled) after an Ethernet header.
/// `body` is written by the closure into the slice it is given; returns the frame length.
pub fn write_icmpv6(buf: &mut [u8], eth_dst: MacAddr, eth_src: MacAddr, src: &[u8; 16], dst: &[u8; 16], body_len: usize, body: impl FnOnce(&mut [u8])) -> usize {
    buf[0..6].copy_from_slice(&eth_dst.0);
    buf[6..12].copy_from_slice(&eth_src.0);
    put16(buf, 12, ethertype::IPV6);
    let ip = 14;
    buf[ip..ip + 4].copy_from_slice(&[0x60, 0, 0, 0]);
    put16(buf, ip + 4, body_len as u16);
    buf[ip + 6] = proto::ICMPV6;
    buf[ip + 7] = 255;
    buf[ip + 8..ip + 24].copy_from_slice(src);
    buf[ip + 24..ip + 40].copy_from_slice(dst);
    let l4 = ip + 40;
    buf[l4..l4 + body_len].fill(0);
    body(&mut buf[l4..l4 + body_len]);
    put16(buf, l4 + 2, 0);
    let c = checksum(&buf[l4..l4 + body_len], pseudo_header_sum(src, dst, proto::ICMPV6, body_len));
    put16(buf, l4 + 2, c);
    l4 + body_len
}

/// Writes the neighbour advertisement for a solicitation `key` (target answered by `mac`).
pub fn write_neighbor_advert(buf: &mut [u8], key: &FlowKey, mac: MacAddr) -> usize {
    let unspecified = key.ip_src == [0; 16];
    let dst = if unspecified { std::net::Ipv6Addr::from([0xff02, 0, 0, 0, 0, 0, 0, 1]).octets() } else { key.ip_src };
    let eth_dst = if unspecified { MacAddr::ipv6_multicast(&std::net::Ipv6Addr::from(dst)) } else { key.eth_src() };
    let target = key.nd_target;
    write_icmpv6(buf, eth_dst, mac, &target, &dst, 32, |b| {
        b[0] = 136;
        // Router + Solicited (unless answering DAD) + Override.
        b[4] = 0x80 | if unspecified { 0 } else { 0x40 } | 0x20;
        b[8..24].copy_from_slice(&target);
        b[24] = 2;
        b[25] = 1;
        b[26..32].copy_from_slice(&mac.0);
    })
}

/// Writes a router advertisement for `prefix`/64 from the router (`mac`, link-local) to `dst`.
pub fn write_router_advert(buf: &mut [u8], mac: MacAddr, eth_dst: MacAddr, dst: &[u8; 16], prefix: &[u8; 16], mtu: u32, autonomous: bool) -> usize {
    let src = mac.link_local_v6().octets();
    write_icmpv6(buf, eth_dst, mac, &src, dst, 16 + 32 + 8 + 8, |b| {
        b[0] = 134;
        b[4] = 64; // cur hop limit
        b[5] = if autonomous { 0 } else { 0x80 };
        b[6..8].copy_from_slice(&1800u16.to_be_bytes()); // router lifetime
        let mut o = 16;
        // Prefix information.
        b[o] = 3;
        b[o + 1] = 4;
        b[o + 2] = 64;
        b[o + 3] = 0x80 | if autonomous { 0x40 } else { 0 };
        b[o + 4..o + 8].copy_from_slice(&86400u32.to_be_bytes());
        b[o + 8..o + 12].copy_from_slice(&14400u32.to_be_bytes());
        b[o + 16..o + 32].copy_from_slice(prefix);
        o += 32;
        // MTU.
        b[o] = 5;
        b[o + 1] = 1;
        b[o + 4..o + 8].copy_from_slice(&mtu.to_be_bytes());
        o += 8;
        // Source link-layer address.
        b[o] = 1;
        b[o + 1] = 1;
        b[o + 2..o + 8].copy_from_slice(&mac.0);
    })
}

/// Computes the full TCP/UDP checksum of a frame whose checksum the sender left
/// to offload (AF_PACKET reports this as TP_STATUS_CSUMNOTREADY).
pub fn fill_partial_checksum(frame: &mut [u8]) {
    let mut key = FlowKey::default();
    let Ok(layout) = parse(frame, &mut key) else { return };
    if layout.l4 == 0 || key.ip_frag != frag::NONE {
        return;
    }
    let l3 = layout.l3 as usize;
    let l4 = layout.l4 as usize;
    let (end, src, dst) = match key.eth_type {
        ethertype::IPV4 => (l3 + get16(frame, l3 + 2) as usize, l3 + 12..l3 + 16, l3 + 16..l3 + 20),
        ethertype::IPV6 => (l3 + 40 + get16(frame, l3 + 4) as usize, l3 + 8..l3 + 24, l3 + 24..l3 + 40),
        _ => return,
    };
    let co = match key.ip_proto {
        proto::TCP => l4 + 16,
        proto::UDP => l4 + 6,
        _ => return,
    };
    if end > frame.len() || co + 2 > end {
        return;
    }
    put16(frame, co, 0);
    let ps = pseudo_header_sum(&frame[src], &frame[dst], key.ip_proto, end - l4);
    let c = checksum(&frame[l4..end], ps);
    put16(frame, co, if c == 0 && key.ip_proto == proto::UDP { 0xffff } else { c });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds an Ethernet+IPv4+UDP/TCP/ICMP frame for tests.
    pub(crate) fn ipv4_frame(proto_: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let l4len = match proto_ {
            proto::TCP => 20,
            _ => 8,
        };
        let total = 20 + l4len + payload.len();
        let mut f = vec![0u8; 14 + total];
        f[0..6].copy_from_slice(&[0xfa, 0x16, 0x3e, 0, 0, 2]);
        f[6..12].copy_from_slice(&[0xfa, 0x16, 0x3e, 0, 0, 1]);
        put16(&mut f, 12, ethertype::IPV4);
        let ip = 14;
        f[ip] = 0x45;
        put16(&mut f, ip + 2, total as u16);
        f[ip + 8] = 64;
        f[ip + 9] = proto_;
        f[ip + 12..ip + 16].copy_from_slice(&src);
        f[ip + 16..ip + 20].copy_from_slice(&dst);
        let c = checksum(&f[ip..ip + 20], 0);
        put16(&mut f, ip + 10, c);
        let l4 = ip + 20;
        match proto_ {
            proto::TCP => {
                put16(&mut f, l4, sport);
                put16(&mut f, l4 + 2, dport);
                f[l4 + 12] = 5 << 4;
                f[l4 + 13] = 0x02;
            }
            proto::UDP => {
                put16(&mut f, l4, sport);
                put16(&mut f, l4 + 2, dport);
                put16(&mut f, l4 + 4, (8 + payload.len()) as u16);
            }
            _ => {
                f[l4] = sport as u8;
                f[l4 + 1] = dport as u8;
                put16(&mut f, l4 + 4, 0x1234);
            }
        }
        f[l4 + l4len..].copy_from_slice(payload);
        let len = l4len + payload.len();
        if proto_ != proto::ICMP {
            let ps = pseudo_header_sum(&src, &dst, proto_, len);
            let co = if proto_ == proto::TCP { l4 + 16 } else { l4 + 6 };
            let c = checksum(&f[l4..l4 + len], ps);
            put16(&mut f, co, c);
        } else {
            let c = checksum(&f[l4..l4 + len], 0);
            put16(&mut f, l4 + 2, c);
        }
        f
    }

    fn l4_ok(f: &[u8]) -> bool {
        let ip = 14;
        let proto_ = f[ip + 9];
        let l4 = ip + 20;
        let len = f.len() - l4;
        let ps = pseudo_header_sum(&f[ip + 12..ip + 16], &f[ip + 16..ip + 20], proto_, len);
        checksum(&f[ip..ip + 20], 0) == 0 && checksum(&f[l4..], ps) == 0
    }

    #[test]
    fn parses_tcp_and_rewrites_with_valid_checksums() {
        let mut f = ipv4_frame(proto::TCP, [10, 0, 0, 1], [10, 0, 0, 2], 40000, 22, b"hello");
        assert!(l4_ok(&f));
        let mut k = FlowKey::default();
        let l = parse(&f, &mut k).unwrap();
        assert_eq!((k.eth_type, k.ip_proto, k.l4_src, k.l4_dst), (ethertype::IPV4, proto::TCP, 40000, 22));
        assert_eq!(k.src_v4().octets(), [10, 0, 0, 1]);
        assert_eq!(tcp_flags(&f, &l, &k), 0x02);
        set_ip(&mut f, &l, &k, false, &crate::flow::ip_bytes("203.0.113.5".parse().unwrap()));
        set_l4_port(&mut f, &l, &k, false, 1234);
        assert!(dec_ttl(&mut f, &l, &k));
        assert!(l4_ok(&f));
        let mut k2 = FlowKey::default();
        parse(&f, &mut k2).unwrap();
        assert_eq!(k2.src_v4().octets(), [203, 0, 113, 5]);
        assert_eq!(k2.l4_src, 1234);
        assert_eq!(k2.ip_ttl, 63);
    }

    #[test]
    fn udp_rewrite_keeps_checksum_valid() {
        let mut f = ipv4_frame(proto::UDP, [10, 0, 0, 1], [10, 0, 0, 2], 5353, 53, b"query");
        let mut k = FlowKey::default();
        let l = parse(&f, &mut k).unwrap();
        set_ip(&mut f, &l, &k, true, &crate::flow::ip_bytes("10.9.8.7".parse().unwrap()));
        set_l4_port(&mut f, &l, &k, true, 5300);
        assert!(l4_ok(&f));
    }

    #[test]
    fn arp_reply_in_place() {
        let mut f = vec![0u8; 64];
        let n = write_arp_request(&mut f, "fa:16:3e:00:00:01".parse().unwrap(), [10, 0, 0, 1], [10, 0, 0, 9], 0);
        f.truncate(n);
        let mut k = FlowKey::default();
        let l = parse(&f, &mut k).unwrap();
        assert_eq!((k.eth_type, k.ip_proto), (ethertype::ARP, 1));
        assert_eq!(k.dst_v4().octets(), [10, 0, 0, 9]);
        make_arp_reply(&mut f, &l, "fa:16:3e:00:00:09".parse().unwrap());
        parse(&f, &mut k).unwrap();
        assert_eq!(k.ip_proto, 2);
        assert_eq!(k.src_v4().octets(), [10, 0, 0, 9]);
        assert_eq!(k.eth_dst().to_string(), "fa:16:3e:00:00:01");
        assert_eq!(MacAddr(k.arp_sha).to_string(), "fa:16:3e:00:00:09");
    }

    #[test]
    fn neighbor_advert_has_valid_checksum_and_parses() {
        let mut k = FlowKey { eth_type: ethertype::IPV6, eth_src: [0xfa, 0x16, 0x3e, 0, 0, 1], ..Default::default() };
        k.ip_src = "fd00::5".parse::<std::net::Ipv6Addr>().unwrap().octets();
        k.nd_target = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let mut buf = [0u8; 256];
        let n = write_neighbor_advert(&mut buf, &k, "fa:16:3e:ff:00:01".parse().unwrap());
        let mut k2 = FlowKey::default();
        let l = parse(&buf[..n], &mut k2).unwrap();
        assert_eq!(k2.l4_src, 136);
        assert_eq!(k2.nd_target, k.nd_target);
        assert_eq!(MacAddr(k2.arp_sha).to_string(), "fa:16:3e:ff:00:01");
        let l4 = l.l4 as usize;
        assert_eq!(checksum(&buf[l4..n], pseudo_header_sum(&buf[22..38], &buf[38..54], 58, n - l4)), 0);
    }

    #[test]
    fn vxlan_header_round_trips() {
        let mut h = [0u8; 8];
        write_vxlan(&mut h, 0x123456);
        assert_eq!(parse_vxlan(&h), Some(0x123456));
        assert_eq!(parse_vxlan(&[0u8; 8]), None);
        assert_eq!(parse_vxlan(&[8u8; 3]), None);
    }

    #[test]
    fn truncated_and_random_frames_never_panic() {
        let mut k = FlowKey::default();
        let good = [
            ipv4_frame(proto::TCP, [10, 0, 0, 1], [10, 0, 0, 2], 1, 2, b"abc"),
            ipv4_frame(proto::UDP, [10, 0, 0, 1], [10, 0, 0, 2], 1, 2, b"abc"),
            ipv4_frame(proto::ICMP, [10, 0, 0, 1], [10, 0, 0, 2], 8, 0, b"abc"),
        ];
        let mut errors = 0;
        for f in &good {
            assert!(parse(f, &mut k).is_ok());
            for cut in 0..f.len() {
                if parse(&f[..cut], &mut k).is_err() {
                    errors += 1;
                }
            }
        }
        assert!(errors > 90, "truncations are reported as errors ({errors})");
        // Random bytes with plausible ethertypes.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = [0u8; 200];
        for i in 0..20000 {
            let len = (rnd() % 200) as usize;
            for b in buf.iter_mut() {
                *b = rnd() as u8;
            }
            let et = [0x0800u16, 0x86dd, 0x0806, 0x8100][i % 4];
            buf[12..14].copy_from_slice(&et.to_be_bytes());
            if i % 8 == 0 {
                buf[14] = 0x45;
            }
            if i % 8 == 1 {
                buf[14] = 0x60;
            }
            let _ = parse(&buf[..len], &mut k);
        }
    }
}
