//! The flow key: the fields of a packet (and its metadata) that the pipeline
//! matches on, in a fixed, padding-free layout so that masking and hashing are
//! a handful of word operations.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::mac::MacAddr;

/// Number of 64-bit words in a [`FlowKey`].
pub const KEY_WORDS: usize = 16;

/// Connection tracking state bits (`ct_state`), as OVS names them.
pub mod ct_state {
    /// The packet went through conntrack.
    pub const TRACKED: u8 = 0x01;
    /// First packet of a connection not yet committed.
    pub const NEW: u8 = 0x02;
    /// Part of a committed connection.
    pub const ESTABLISHED: u8 = 0x04;
    /// Related to a committed connection (ICMP error).
    pub const RELATED: u8 = 0x08;
    /// In the reply direction.
    pub const REPLY: u8 = 0x10;
    /// Invalid (bad TCP state, unparsable).
    pub const INVALID: u8 = 0x20;
    /// Source NAT was applied.
    pub const SNAT: u8 = 0x40;
    /// Destination NAT was applied.
    pub const DNAT: u8 = 0x80;
}

/// `ip_frag` values.
pub mod frag {
    /// Not a fragment.
    pub const NONE: u8 = 0;
    /// The first fragment (has L4 header).
    pub const FIRST: u8 = 1;
    /// A later fragment (no L4 header).
    pub const LATER: u8 = 2;
}

/// The match fields of a packet plus pipeline metadata.
///
/// IPv4 addresses (and ARP's sender/target addresses) are kept IPv4-mapped in
/// the 16-byte address fields; ARP's opcode is kept in `ip_proto`, ICMP's type
/// and code in `l4_src`/`l4_dst`, and an ND packet's link-layer option in
/// `arp_sha`, as OVS does. `regs` and `nexthop` are pipeline registers: the
/// datapath never matches on them.
#[repr(C, align(8))]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowKey {
    /// The datapath port the packet came in on.
    pub in_port: u32,
    /// Recirculation id; 0 on first pass.
    pub recirc_id: u32,
    /// VXLAN network identifier of a decapsulated packet.
    pub tun_id: u32,
    /// Outer source (IPv4, network order) of a decapsulated packet.
    pub tun_src: [u8; 4],
    /// Connection tracking state bits.
    pub ct_state: u8,
    /// IP protocol, or ARP opcode (low byte).
    pub ip_proto: u8,
    /// Fragment state.
    pub ip_frag: u8,
    /// IP TTL or hop limit.
    pub ip_ttl: u8,
    /// Conntrack zone of the last ct() lookup.
    pub ct_zone: u16,
    /// Ethertype (after any VLAN tag).
    pub eth_type: u16,
    /// VLAN TCI with the CFI bit set when a tag is present (0 = untagged).
    pub vlan_tci: u16,
    /// TCP/UDP source port, or ICMP type.
    pub l4_src: u16,
    /// TCP/UDP destination port, or ICMP code.
    pub l4_dst: u16,
    /// Ethernet source.
    pub eth_src: [u8; 6],
    /// Ethernet destination.
    pub eth_dst: [u8; 6],
    /// ARP sender hardware address, or ND source/target link-layer option.
    pub arp_sha: [u8; 6],
    /// IP (or ARP sender) source address.
    pub ip_src: [u8; 16],
    /// IP (or ARP target) destination address.
    pub ip_dst: [u8; 16],
    /// Target of an IPv6 neighbour solicitation or advertisement.
    pub nd_target: [u8; 16],
    /// Pipeline registers (not datapath fields).
    pub regs: [u32; 4],
    /// Pipeline register: next-hop address (not a datapath field).
    pub nexthop: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<FlowKey>() == KEY_WORDS * 8);

/// Hashes the key through [`FlowKey::hash`] (consistent with the field-wise
/// `Eq`), so a hash map's hasher sees one word instead of every byte.
impl std::hash::Hash for FlowKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(FlowKey::hash(self));
    }
}

/// Ethertypes.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// 802.1Q VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// IPv6.
    pub const IPV6: u16 = 0x86dd;
}

/// IP protocol numbers.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Maps an address into the 16-byte key representation.
pub fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Maps 16 key bytes back to an address (IPv4-mapped become IPv4).
pub fn ip_from_bytes(b: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The 16-byte mask of a prefix of `len` bits over an address of this family.
pub fn prefix_mask(is_v4: bool, len: u8) -> [u8; 16] {
    let bits = if is_v4 { 96 + len as u32 } else { len as u32 };
    let m = if bits == 0 { 0u128 } else { u128::MAX << (128 - bits.min(128)) };
    m.to_be_bytes()
}

impl FlowKey {
    /// The key as words, for masking and hashing.
    pub fn words(&self) -> &[u64; KEY_WORDS] {
        // SAFETY: FlowKey is repr(C), 8-aligned, exactly KEY_WORDS*8 bytes (asserted
        // above) and consists only of integers and byte arrays laid out without
        // padding, so every byte is initialised and any bit pattern is valid u64s.
        unsafe { &*(self as *const FlowKey as *const [u64; KEY_WORDS]) }
    }

    /// The key as mutable words.
    pub fn words_mut(&mut self) -> &mut [u64; KEY_WORDS] {
        // SAFETY: as in `words`; additionally every bit pattern written through the
        // words is a valid FlowKey because all its fields are plain integers/bytes.
        unsafe { &mut *(self as *mut FlowKey as *mut [u64; KEY_WORDS]) }
    }

    /// This key with `mask` applied.
    #[inline]
    pub fn masked(&self, mask: &FlowKey) -> FlowKey {
        let mut out = FlowKey::default();
        let (a, m) = (self.words(), mask.words());
        let o = out.words_mut();
        for i in 0..KEY_WORDS {
            o[i] = a[i] & m[i];
        }
        out
    }

    /// Whether `self` equals `other` under `mask` (only masked bits compared).
    #[inline]
    pub fn eq_masked(&self, other: &FlowKey, mask: &FlowKey) -> bool {
        let (a, b, m) = (self.words(), other.words(), mask.words());
        (0..KEY_WORDS).all(|i| (a[i] ^ b[i]) & m[i] == 0)
    }

    /// Bitwise OR of two masks.
    pub fn union(&mut self, other: &FlowKey) {
        let o = other.words();
        let s = self.words_mut();
        for i in 0..KEY_WORDS {
            s[i] |= o[i];
        }
    }

    /// A fast hash of the key: four independent multiply-rotate lanes over its
    /// 16 words, so the multiplications overlap instead of forming one
    /// 16-step chain. All words count: the pipeline's classifier keys rules
    /// by register values.
    #[inline]
    pub fn hash(&self) -> u64 {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let w = self.words();
        let mut l = [0x243f_6a88_85a3_08d3u64, 0x1319_8a2e_0370_7344, 0xa409_3822_299f_31d0, 0x082e_fa98_ec4e_6c89];
        for r in 0..4 {
            for (j, lane) in l.iter_mut().enumerate() {
                *lane = (*lane ^ w[4 * r + j]).wrapping_mul(K).rotate_left(29);
            }
        }
        let h = l[0] ^ l[1].rotate_left(16) ^ l[2].rotate_left(32) ^ l[3].rotate_left(48);
        let h = (h ^ (h >> 31)).wrapping_mul(K);
        h ^ (h >> 29)
    }

    /// Whether two keys are equal, word by word without early exits.
    #[inline]
    pub fn same(&self, other: &FlowKey) -> bool {
        let (a, b) = (self.words(), other.words());
        let mut d = 0u64;
        for i in 0..KEY_WORDS {
            d |= a[i] ^ b[i];
        }
        d == 0
    }

    /// A mask with all datapath fields set and the pipeline registers clear.
    pub fn exact_mask() -> FlowKey {
        let mut m = FlowKey::default();
        for w in m.words_mut() {
            *w = u64::MAX;
        }
        m.regs = [0; 4];
        m.nexthop = [0; 16];
        m
    }

    /// Clears the pipeline registers (used on masks that go to the datapath).
    pub fn clear_registers(&mut self) {
        self.regs = [0; 4];
        self.nexthop = [0; 16];
    }

    /// Ethernet source as a MAC.
    pub fn eth_src(&self) -> MacAddr {
        MacAddr(self.eth_src)
    }

    /// Ethernet destination as a MAC.
    pub fn eth_dst(&self) -> MacAddr {
        MacAddr(self.eth_dst)
    }

    /// Whether the network layer is IPv4 (or ARP, whose addresses are IPv4).
    pub fn is_v4(&self) -> bool {
        self.eth_type == ethertype::IPV4 || self.eth_type == ethertype::ARP
    }

    /// Source address.
    pub fn src_ip(&self) -> IpAddr {
        ip_from_bytes(self.ip_src)
    }

    /// Destination address.
    pub fn dst_ip(&self) -> IpAddr {
        ip_from_bytes(self.ip_dst)
    }

    /// Source IPv4 address (meaningful only for IPv4/ARP).
    pub fn src_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.ip_src[12], self.ip_src[13], self.ip_src[14], self.ip_src[15])
    }

    /// Destination IPv4 address (meaningful only for IPv4/ARP).
    pub fn dst_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.ip_dst[12], self.ip_dst[13], self.ip_dst[14], self.ip_dst[15])
    }
}

impl fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "in_port={}", self.in_port)?;
        if self.recirc_id != 0 {
            write!(f, ",recirc={:#x},ct_state={:#04x},ct_zone={}", self.recirc_id, self.ct_state, self.ct_zone)?;
        }
        if self.tun_id != 0 {
            write!(f, ",tun_id={},tun_src={}", self.tun_id, Ipv4Addr::from(self.tun_src))?;
        }
        write!(f, ",eth_src={},eth_dst={},eth_type={:#06x}", self.eth_src(), self.eth_dst(), self.eth_type)?;
        if self.vlan_tci != 0 {
            write!(f, ",vlan={}", self.vlan_tci & 0x0fff)?;
        }
        match self.eth_type {
            ethertype::ARP => write!(f, ",arp_op={},arp_spa={},arp_tpa={},arp_sha={}", self.ip_proto, self.src_v4(), self.dst_v4(), MacAddr(self.arp_sha)),
            ethertype::IPV4 | ethertype::IPV6 => {
                write!(f, ",ip_src={},ip_dst={},proto={},ttl={}", self.src_ip(), self.dst_ip(), self.ip_proto, self.ip_ttl)?;
                if self.ip_frag != frag::LATER && matches!(self.ip_proto, proto::TCP | proto::UDP | proto::ICMP | proto::ICMPV6) {
                    write!(f, ",l4_src={},l4_dst={}", self.l4_src, self.l4_dst)?;
                }
                if self.nd_target != [0; 16] {
                    write!(f, ",nd_target={}", Ipv6Addr::from(self.nd_target))?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_hashes() {
        let mut a = FlowKey { in_port: 3, l4_dst: 22, ..Default::default() };
        a.ip_dst = ip_bytes("10.0.0.5".parse().unwrap());
        let mut b = a;
        b.l4_dst = 80;
        let mut mask = FlowKey { in_port: u32::MAX, ip_dst: prefix_mask(true, 24), ..Default::default() };
        assert!(a.eq_masked(&b, &mask));
        assert_eq!(a.masked(&mask).hash(), b.masked(&mask).hash());
        mask.l4_dst = u16::MAX;
        assert!(!a.eq_masked(&b, &mask));
        assert_eq!(prefix_mask(false, 0), [0; 16]);
        assert_eq!(prefix_mask(true, 32), [0xff; 16]);
        assert_eq!(ip_from_bytes(ip_bytes("10.1.2.3".parse().unwrap())).to_string(), "10.1.2.3");
    }
}
