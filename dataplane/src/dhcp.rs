//! The DHCPv4 responder: answers DISCOVER, REQUEST and INFORM from a port's
//! [`DhcpConfig`] without leaving the datapath (no server process, no leases
//! to store: the model already says which address a port has).

use std::net::Ipv4Addr;

use crate::flow::{ethertype, proto};
use crate::packet::{checksum, pseudo_header_sum, Layout};
use crate::pipeline::DhcpConfig;

const BOOTP_LEN: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Room the answer needs in the packet buffer.
pub const MAX_REPLY_LEN: usize = 14 + 20 + 8 + BOOTP_LEN + 4 + 312;

/// Writes the answer to the DHCP request in `buf[..len]` into `buf` (in place).
/// Returns the answer's length, or None when the request gets no answer.
pub fn answer(buf: &mut [u8], len: usize, layout: &Layout, cfg: &DhcpConfig) -> Option<usize> {
    if buf.len() < MAX_REPLY_LEN {
        return None;
    }
    let b = layout.l7 as usize;
    let req = buf.get(b..len)?;
    if req.len() < BOOTP_LEN + 4 || req[0] != 1 || req[236..240] != MAGIC {
        return None;
    }
    let xid: [u8; 4] = req[4..8].try_into().ok()?;
    let flags: [u8; 2] = req[10..12].try_into().ok()?;
    let ciaddr: [u8; 4] = req[12..16].try_into().ok()?;
    let chaddr: [u8; 16] = req[28..44].try_into().ok()?;
    if chaddr[..6] != cfg.client_mac.0 {
        return None;
    }
    let (mut msg_type, mut requested) = (0u8, None);
    let mut i = BOOTP_LEN + 4;
    while i < req.len() {
        let code = req[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let l = *req.get(i + 1)? as usize;
        let v = req.get(i + 2..i + 2 + l)?;
        match (code, l) {
            (53, 1) => msg_type = v[0],
            (50, 4) => requested = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
            _ => {}
        }
        i += 2 + l;
    }
    let reply_type = match msg_type {
        1 => 2,
        3 => {
            let asked = requested.unwrap_or(Ipv4Addr::from(ciaddr));
            if asked == cfg.client_ip || asked.is_unspecified() {
                5
            } else {
                6
            }
        }
        8 => 5,
        _ => return None,
    };

    // Build the answer from scratch.
    let out = &mut buf[..MAX_REPLY_LEN];
    out.fill(0);
    out[0..6].copy_from_slice(&chaddr[..6]);
    out[6..12].copy_from_slice(&cfg.server_mac.0);
    out[12..14].copy_from_slice(&ethertype::IPV4.to_be_bytes());
    let ip = 14;
    let udp = ip + 20;
    let bootp = udp + 8;
    out[bootp] = 2;
    out[bootp + 1] = 1;
    out[bootp + 2] = 6;
    out[bootp + 4..bootp + 8].copy_from_slice(&xid);
    out[bootp + 10..bootp + 12].copy_from_slice(&flags);
    out[bootp + 12..bootp + 16].copy_from_slice(&ciaddr);
    if reply_type != 6 && msg_type != 8 {
        out[bootp + 16..bootp + 20].copy_from_slice(&cfg.client_ip.octets());
    }
    out[bootp + 20..bootp + 24].copy_from_slice(&cfg.server_ip.octets());
    out[bootp + 28..bootp + 44].copy_from_slice(&chaddr);
    out[bootp + 236..bootp + 240].copy_from_slice(&MAGIC);
    let mut o = bootp + 240;
    let mut opt = |out: &mut [u8], code: u8, val: &[u8]| {
        out[o] = code;
        out[o + 1] = val.len() as u8;
        out[o + 2..o + 2 + val.len()].copy_from_slice(val);
        o += 2 + val.len();
    };
    opt(out, 53, &[reply_type]);
    opt(out, 54, &cfg.server_ip.octets());
    if reply_type != 6 {
        if msg_type != 8 {
            opt(out, 51, &cfg.lease_secs.to_be_bytes());
            opt(out, 58, &(cfg.lease_secs / 2).to_be_bytes());
            opt(out, 59, &(cfg.lease_secs / 8 * 7).to_be_bytes());
        }
        let mask = if cfg.prefix_len == 0 { 0 } else { u32::MAX << (32 - cfg.prefix_len as u32) };
        opt(out, 1, &mask.to_be_bytes());
        let bcast = u32::from(cfg.client_ip) | !mask;
        opt(out, 28, &bcast.to_be_bytes());
        if let Some(r) = cfg.router {
            opt(out, 3, &r.octets());
        }
        if !cfg.dns.is_empty() {
            let v: Vec<u8> = cfg.dns.iter().take(8).flat_map(|d| d.octets()).collect();
            opt(out, 6, &v);
        }
        opt(out, 26, &cfg.mtu.to_be_bytes());
        // Classless static routes (RFC 3442); clients then ignore option 3, so the default route goes in too.
        let mut routes = Vec::new();
        for (dst, plen, via) in cfg.routes.iter().chain(cfg.router.map(|r| (Ipv4Addr::UNSPECIFIED, 0, r)).iter()) {
            if routes.len() + 9 > 255 {
                break;
            }
            routes.push(*plen);
            let sig = (*plen as usize).div_ceil(8);
            routes.extend_from_slice(&dst.octets()[..sig]);
            routes.extend_from_slice(&via.octets());
        }
        if cfg.routes.iter().len() > 0 || cfg.router.is_some() {
            opt(out, 121, &routes);
        }
    }
    out[o] = 255;
    o += 1;
    let end = o.max(bootp + 300);
    // UDP and IP headers.
    let udp_len = end - udp;
    out[udp..udp + 2].copy_from_slice(&67u16.to_be_bytes());
    out[udp + 2..udp + 4].copy_from_slice(&68u16.to_be_bytes());
    out[udp + 4..udp + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let src = cfg.server_ip.octets();
    let dst = [255u8; 4];
    let c = checksum(&out[udp..end], pseudo_header_sum(&src, &dst, proto::UDP, udp_len));
    out[udp + 6..udp + 8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    out[ip] = 0x45;
    out[ip + 1] = 0x10;
    out[ip + 2..ip + 4].copy_from_slice(&((end - ip) as u16).to_be_bytes());
    out[ip + 8] = 64;
    out[ip + 9] = proto::UDP;
    out[ip + 12..ip + 16].copy_from_slice(&src);
    out[ip + 16..ip + 20].copy_from_slice(&dst);
    let c = checksum(&out[ip..ip + 20], 0);
    out[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::FlowKey;
    use crate::packet::{parse, tests::ipv4_frame};

    fn discover(mac: [u8; 6], msg: u8) -> Vec<u8> {
        let mut bootp = vec![0u8; BOOTP_LEN];
        bootp[0] = 1;
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&[1, 2, 3, 4]);
        bootp[28..34].copy_from_slice(&mac);
        bootp.extend_from_slice(&MAGIC);
        bootp.extend_from_slice(&[53, 1, msg, 255]);
        ipv4_frame(proto::UDP, [0; 4], [255; 4], 68, 67, &bootp)
    }

    fn cfg() -> DhcpConfig {
        DhcpConfig {
            client_mac: "fa:16:3e:00:00:01".parse().unwrap(),
            client_ip: Ipv4Addr::new(10, 0, 0, 11),
            prefix_len: 24,
            server_ip: Ipv4Addr::new(10, 0, 0, 1),
            server_mac: "fa:16:3e:ff:00:01".parse().unwrap(),
            router: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dns: vec![Ipv4Addr::new(10, 0, 0, 2)],
            routes: vec![(Ipv4Addr::new(172, 31, 0, 0), 16, Ipv4Addr::new(10, 0, 0, 1))],
            mtu: 1450,
            lease_secs: 86400,
        }
    }

    #[test]
    fn offers_the_model_address() {
        let f = discover([0xfa, 0x16, 0x3e, 0, 0, 1], 1);
        let mut k = FlowKey::default();
        let l = parse(&f, &mut k).unwrap();
        let mut buf = vec![0u8; 2048];
        buf[..f.len()].copy_from_slice(&f);
        let n = answer(&mut buf, f.len(), &l, &cfg()).expect("an offer");
        let mut k2 = FlowKey::default();
        let l2 = parse(&buf[..n], &mut k2).unwrap();
        assert_eq!((k2.l4_src, k2.l4_dst), (67, 68));
        let b = l2.l7 as usize;
        assert_eq!(&buf[b + 16..b + 20], &[10, 0, 0, 11]);
        assert_eq!(&buf[b + 240..b + 243], &[53, 1, 2]);
        // UDP checksum is valid.
        let udp = l2.l4 as usize;
        assert_eq!(checksum(&buf[udp..n], pseudo_header_sum(&buf[26..30], &buf[30..34], 17, n - udp)), 0);
        // A REQUEST gets an ACK.
        let f = discover([0xfa, 0x16, 0x3e, 0, 0, 1], 3);
        buf[..f.len()].copy_from_slice(&f);
        let n = answer(&mut buf, f.len(), &l, &cfg()).unwrap();
        assert_eq!(&buf[b + 240..b + 243], &[53, 1, 5]);
        assert!(n > 300);
    }

    #[test]
    fn ignores_other_macs_and_garbage() {
        let f = discover([0xfa, 0x16, 0x3e, 0, 0, 9], 1);
        let mut k = FlowKey::default();
        let l = parse(&f, &mut k).unwrap();
        let mut buf = vec![0u8; 2048];
        buf[..f.len()].copy_from_slice(&f);
        assert!(answer(&mut buf, f.len(), &l, &cfg()).is_none());
        let g = ipv4_frame(proto::UDP, [0; 4], [255; 4], 68, 67, &[1, 2, 3]);
        let l = parse(&g, &mut k).unwrap();
        buf[..g.len()].copy_from_slice(&g);
        assert!(answer(&mut buf, g.len(), &l, &cfg()).is_none());
    }
}
