//! Renders a compiled [`Pipeline`] as OpenFlow flows in ovs-ofctl syntax.
//!
//! The pipeline is already OpenFlow-shaped (numbered tables, priorities,
//! masked matches, register loads, resubmits, ct() with recirculation), so
//! each rule becomes one flow in the same table:
//!
//! | pipeline | OVS |
//! |---|---|
//! | registers net, inport, outport, router | reg0..reg3 |
//! | next hop | xxreg1 (reg4..reg7) |
//! | `Goto(t)`, `Resubmit(t)` | `resubmit(,t)` |
//! | `Ct(zone, commit, nat, mark, table)` | `ct(commit,zone=..,nat(..),exec(set_field:..->ct_mark),table=..)` |
//! | `ArpReply`, `EchoReply` | field moves through the scratch register reg9 / xxreg3 |
//! | `Tunnel` | `set_field` of `tun_id` and `tun_dst`, then output to the VXLAN port |
//!
//! DHCP and router-advertisement answers, ND advertisements, ARP resolution
//! of unknown next hops and neighbour learning need a controller on OVS;
//! a rule using one is rendered as a drop at that point and counted in
//! [`Rendered::unsupported`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::flow::{ct_state, ethertype, proto};
use crate::mac::MacAddr;
use crate::pipeline::{Action, Match, Nat, Pipeline, Rule};

/// Flows for one bridge.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    /// One flow per line, ovs-ofctl syntax, with `#` comments naming the model object.
    pub flows: Vec<String>,
    /// Actions OVS cannot do without a controller, by name, with how many rules used them.
    pub unsupported: BTreeMap<&'static str, usize>,
}

impl Rendered {
    /// The flows as a file for `ovs-ofctl replace-flows`.
    pub fn to_file(&self) -> String {
        let mut s = String::new();
        for f in &self.flows {
            s.push_str(f);
            s.push('\n');
        }
        s
    }

    /// Number of flows (comment lines excluded).
    pub fn flow_count(&self) -> usize {
        self.flows.iter().filter(|f| !f.starts_with('#')).count()
    }
}

/// Renders every rule of `p`.
pub fn render(p: &Pipeline) -> Rendered {
    let mut out = Rendered::default();
    for rule in p.rules() {
        out.flows.push(format!("# {}", rule.note.replace('\n', " ")));
        let flow = render_rule(rule, &mut out.unsupported);
        out.flows.push(flow);
    }
    out
}

/// The address family a match talks about, from its ethertype.
fn family(m: &Match) -> u16 {
    if m.mask.eth_type != 0 {
        m.key.eth_type
    } else {
        0
    }
}

fn render_rule(rule: &Rule, unsupported: &mut BTreeMap<&'static str, usize>) -> String {
    let mut s = format!("table={},priority={}", rule.table, rule.priority);
    let m = render_match(&rule.m);
    if !m.is_empty() {
        s.push(',');
        s.push_str(&m);
    }
    let actions = render_actions(&rule.actions, family(&rule.m), unsupported);
    s.push_str(",actions=");
    s.push_str(if actions.is_empty() { "drop" } else { &actions });
    s
}

fn mac(m: [u8; 6]) -> String {
    MacAddr(m).to_string()
}

fn v4(b: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(b[12], b[13], b[14], b[15])
}

fn hex128(b: &[u8; 16]) -> String {
    format!("{:#x}", u128::from_be_bytes(*b))
}

/// The ovs-ofctl match for a pipeline match.
pub fn render_match(m: &Match) -> String {
    let (k, w) = (&m.key, &m.mask);
    let fam = family(m);
    let mut p: Vec<String> = Vec::new();
    if w.in_port != 0 {
        p.push(format!("in_port={}", k.in_port));
    }
    if w.tun_id != 0 {
        p.push(format!("tun_id={:#x}/{:#x}", k.tun_id, w.tun_id));
    }
    if w.tun_src != [0; 4] {
        p.push(format!("tun_src={}/{}", Ipv4Addr::from(k.tun_src), Ipv4Addr::from(w.tun_src)));
    }
    if w.ct_state != 0 {
        let names = [
            (ct_state::TRACKED, "trk"),
            (ct_state::NEW, "new"),
            (ct_state::ESTABLISHED, "est"),
            (ct_state::RELATED, "rel"),
            (ct_state::REPLY, "rpl"),
            (ct_state::INVALID, "inv"),
            (ct_state::SNAT, "snat"),
            (ct_state::DNAT, "dnat"),
        ];
        let mut cs = String::from("ct_state=");
        for (bit, name) in names {
            if w.ct_state & bit != 0 {
                cs.push(if k.ct_state & bit != 0 { '+' } else { '-' });
                cs.push_str(name);
            }
        }
        p.push(cs);
    }
    if w.ct_zone != 0 {
        p.push(format!("ct_zone={}", k.ct_zone));
    }
    for i in 0..4 {
        if w.regs[i] != 0 {
            p.push(format!("reg{i}={:#x}/{:#x}", k.regs[i], w.regs[i]));
        }
    }
    if w.nexthop != [0; 16] {
        p.push(format!("xxreg1={}/{}", hex128(&k.nexthop), hex128(&w.nexthop)));
    }
    if w.vlan_tci != 0 {
        p.push(format!("vlan_tci={:#06x}/{:#06x}", k.vlan_tci, w.vlan_tci));
    }
    if w.eth_src != [0; 6] {
        p.push(format!("dl_src={}/{}", mac(k.eth_src), mac(w.eth_src)));
    }
    if w.eth_dst != [0; 6] {
        p.push(format!("dl_dst={}/{}", mac(k.eth_dst), mac(w.eth_dst)));
    }
    if w.eth_type != 0 {
        p.push(format!("dl_type={:#06x}", k.eth_type));
    }
    if w.ip_proto != 0 {
        if fam == ethertype::ARP {
            p.push(format!("arp_op={}", k.ip_proto));
        } else {
            p.push(format!("nw_proto={}", k.ip_proto));
        }
    }
    if w.ip_frag != 0 {
        let f = match k.ip_frag {
            crate::flow::frag::FIRST => "first",
            crate::flow::frag::LATER => "later",
            _ => "no",
        };
        p.push(format!("nw_frag={f}"));
    }
    if w.ip_ttl != 0 {
        p.push(format!("nw_ttl={}", k.ip_ttl));
    }
    for (name4, arp, name6, a, mask) in [("nw_src", "arp_spa", "ipv6_src", &k.ip_src, &w.ip_src), ("nw_dst", "arp_tpa", "ipv6_dst", &k.ip_dst, &w.ip_dst)] {
        if *mask == [0; 16] {
            continue;
        }
        match fam {
            ethertype::ARP => p.push(format!("{arp}={}/{}", v4(a), v4(mask))),
            ethertype::IPV6 => p.push(format!("{name6}={}/{}", Ipv6Addr::from(*a), Ipv6Addr::from(*mask))),
            _ => p.push(format!("{name4}={}/{}", v4(a), v4(mask))),
        }
    }
    let l4proto = if w.ip_proto != 0 { k.ip_proto } else { 0 };
    for (tp, icmp, icmp6, v, mask) in [("tp_src", "icmp_type", "icmpv6_type", k.l4_src, w.l4_src), ("tp_dst", "icmp_code", "icmpv6_code", k.l4_dst, w.l4_dst)] {
        if mask == 0 {
            continue;
        }
        match l4proto {
            proto::ICMP => p.push(format!("{icmp}={v}")),
            proto::ICMPV6 => p.push(format!("{icmp6}={v}")),
            _ => p.push(format!("{tp}={v:#x}/{mask:#x}")),
        }
    }
    if w.arp_sha != [0; 6] {
        if fam == ethertype::ARP {
            p.push(format!("arp_sha={}/{}", mac(k.arp_sha), mac(w.arp_sha)));
        } else if w.l4_src != 0 && k.l4_src == 136 {
            p.push(format!("nd_tll={}/{}", mac(k.arp_sha), mac(w.arp_sha)));
        } else {
            p.push(format!("nd_sll={}/{}", mac(k.arp_sha), mac(w.arp_sha)));
        }
    }
    if w.nd_target != [0; 16] {
        p.push(format!("nd_target={}/{}", Ipv6Addr::from(k.nd_target), Ipv6Addr::from(w.nd_target)));
    }
    p.join(",")
}

fn set_ip(fam: u16, ip: &[u8; 16], dst: bool) -> String {
    let v4m = ip[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    if fam == ethertype::IPV6 || (fam == 0 && !v4m) {
        format!("set_field:{}->ipv6_{}", Ipv6Addr::from(*ip), if dst { "dst" } else { "src" })
    } else {
        format!("set_field:{}->ip_{}", v4(ip), if dst { "dst" } else { "src" })
    }
}

/// Renders actions; stops at the first action that ends the rule (goto, ct
/// with recirculation, drop) or that OVS cannot do (counted in `unsupported`).
fn render_actions(actions: &[Action], fam: u16, unsupported: &mut BTreeMap<&'static str, usize>) -> String {
    let mut a: Vec<String> = Vec::new();
    for act in actions {
        match act {
            Action::SetReg(i, v) => a.push(format!("set_field:{v:#x}->reg{i}")),
            Action::SetNexthop(n) => a.push(format!("set_field:{}->xxreg1", hex128(n))),
            Action::SetEthSrc(m) => a.push(format!("set_field:{m}->eth_src")),
            Action::SetEthDst(m) => a.push(format!("set_field:{m}->eth_dst")),
            Action::SetIpSrc(ip) => a.push(set_ip(fam, ip, false)),
            Action::SetIpDst(ip) => a.push(set_ip(fam, ip, true)),
            Action::DecTtl => a.push("dec_ttl".into()),
            Action::PopVlan => a.push("pop_vlan".into()),
            Action::PushVlan(v) => a.push(format!("push_vlan:0x8100,set_field:{:#x}->vlan_tci", v | 0x1000)),
            Action::Output(port) => a.push(format!("output:{port}")),
            Action::OutputInPort => a.push("in_port".into()),
            Action::Tunnel { port, vni, remote } => {
                a.push(format!("set_field:{vni:#x}->tun_id"));
                a.push(format!("set_field:{remote}->tun_dst"));
                a.push(format!("output:{port}"));
            }
            Action::Goto(t) => {
                a.push(format!("resubmit(,{t})"));
                break;
            }
            Action::Resubmit(t) => a.push(format!("resubmit(,{t})")),
            Action::Ct(ct, next) => {
                let mut c = String::from("ct(");
                if ct.commit {
                    c.push_str("commit,");
                }
                let _ = write!(c, "zone={}", ct.zone);
                match ct.nat {
                    Some(Nat::Snat { addr, port_min, port_max }) => {
                        if port_min == 0 && port_max == 0 {
                            let _ = write!(c, ",nat(src={addr})");
                        } else {
                            let _ = write!(c, ",nat(src={addr}:{port_min}-{port_max})");
                        }
                    }
                    Some(Nat::Reverse) => c.push_str(",nat"),
                    None => {}
                }
                if ct.commit && ct.mark != 0 {
                    let _ = write!(c, ",exec(set_field:{:#x}->ct_mark)", ct.mark);
                }
                if let Some(t) = next {
                    let _ = write!(c, ",table={t}");
                }
                c.push(')');
                a.push(c);
                if next.is_some() {
                    break;
                }
            }
            Action::ArpReply(m) => {
                a.push("move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[]".into());
                a.push(format!("set_field:{m}->eth_src"));
                a.push("set_field:2->arp_op".into());
                a.push("move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[]".into());
                a.push(format!("set_field:{m}->arp_sha"));
                a.push("move:NXM_OF_ARP_TPA[]->NXM_NX_REG9[]".into());
                a.push("move:NXM_OF_ARP_SPA[]->NXM_OF_ARP_TPA[]".into());
                a.push("move:NXM_NX_REG9[]->NXM_OF_ARP_SPA[]".into());
            }
            Action::EchoReply(m) => {
                a.push("move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[]".into());
                a.push(format!("set_field:{m}->eth_src"));
                if fam == ethertype::IPV6 {
                    a.push("move:NXM_NX_IPV6_SRC[]->NXM_NX_XXREG3[]".into());
                    a.push("move:NXM_NX_IPV6_DST[]->NXM_NX_IPV6_SRC[]".into());
                    a.push("move:NXM_NX_XXREG3[]->NXM_NX_IPV6_DST[]".into());
                    a.push("set_field:255->nw_ttl".into());
                    a.push("set_field:129->icmpv6_type".into());
                } else {
                    a.push("move:NXM_OF_IP_SRC[]->NXM_NX_REG9[]".into());
                    a.push("move:NXM_OF_IP_DST[]->NXM_OF_IP_SRC[]".into());
                    a.push("move:NXM_NX_REG9[]->NXM_OF_IP_DST[]".into());
                    a.push("set_field:0->icmp_type".into());
                }
            }
            Action::Drop(_) => break,
            other => {
                *unsupported.entry(unsupported_name(other)).or_insert(0) += 1;
                break;
            }
        }
    }
    a.join(",")
}

fn unsupported_name(a: &Action) -> &'static str {
    match a {
        Action::NdAdvert(_) => "ND advertisement",
        Action::DhcpReply(_) => "DHCPv4 answer",
        Action::RouterAdvert(_) => "router advertisement",
        Action::ArpResolve { .. } => "ARP resolution of a next hop",
        Action::LearnNeighbor => "neighbour learning",
        _ => "other",
    }
}

/// The key fields a flow dump shows, for tests: `n_packets` of every flow, by table.
pub fn packets_by_table(dump: &str) -> BTreeMap<u8, u64> {
    let mut m = BTreeMap::new();
    for line in dump.lines() {
        let field = |name: &str| line.split([',', ' ']).find_map(|p| p.trim().strip_prefix(name)).and_then(|v| v.parse::<u64>().ok());
        if let (Some(t), Some(n)) = (field("table="), field("n_packets=")) {
            *m.entry(t as u8).or_insert(0) += n;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiler::{Compiler, HostConfig, Neighbors};
    use crate::model::Model;

    fn two_tenants() -> Pipeline {
        let m = Model::from_json(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/models/two_tenants.json")).unwrap()).unwrap();
        let mut host = HostConfig { name: "h1".into(), tunnel_port: Some(9), ..Default::default() };
        host.ports.insert("a1".into(), 1);
        host.ports.insert("a3".into(), 2);
        host.ports.insert("b1".into(), 3);
        Compiler::new().compile(&m, &host, &Neighbors::new()).unwrap()
    }

    #[test]
    fn every_rule_becomes_one_flow() {
        let p = two_tenants();
        let r = render(&p);
        assert_eq!(r.flow_count(), p.rules().len());
        for f in r.flows.iter().filter(|f| !f.starts_with('#')) {
            assert!(f.starts_with("table=") && f.contains(",actions="), "{f}");
        }
        // DHCP needs a controller on OVS and is reported, not silently lost.
        assert!(r.unsupported.contains_key("DHCPv4 answer"), "{:?}", r.unsupported);
    }

    #[test]
    fn security_groups_render_as_ct_with_zones_and_recirculation() {
        let r = render(&two_tenants());
        let text = r.to_file();
        assert!(text.contains("ct(zone="), "{text}");
        assert!(text.contains("ct(commit,zone="), "{text}");
        assert!(text.contains("ct_state=+trk"), "{text}");
        assert!(text.contains(",table=11)") || text.contains(",table=3)"), "{text}");
        // Tunnelled output sets the VNI and the remote endpoint.
        assert!(text.contains("->tun_id") && text.contains("->tun_dst,output:9"), "{text}");
        // ARP answered from the model with flows.
        assert!(text.contains("set_field:2->arp_op"), "{text}");
    }

    #[test]
    fn masks_render_in_ofctl_syntax() {
        let mut m = Match::default();
        m.key.eth_type = ethertype::IPV4;
        m.mask.eth_type = 0xffff;
        m.key.ip_proto = proto::TCP;
        m.mask.ip_proto = 0xff;
        m.key.l4_dst = 22;
        m.mask.l4_dst = 0xffff;
        m.key.ip_src = crate::flow::ip_bytes("10.0.0.0".parse().unwrap());
        m.mask.ip_src = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 255, 255, 255, 0];
        m.key.ct_state = ct_state::TRACKED | ct_state::NEW;
        m.mask.ct_state = ct_state::TRACKED | ct_state::NEW | ct_state::ESTABLISHED;
        let s = render_match(&m);
        assert_eq!(s, "ct_state=+trk+new-est,dl_type=0x0800,nw_proto=6,nw_src=10.0.0.0/255.255.255.0,tp_dst=0x16/0xffff");
    }

    #[test]
    fn flow_dump_counts_packets_per_table() {
        let dump = " cookie=0x0, duration=1.2s, table=0, n_packets=5, n_bytes=300, priority=100,in_port=1 actions=resubmit(,1)\n cookie=0x0, duration=1.2s, table=1, n_packets=3, n_bytes=180, priority=1 actions=drop\n";
        let m = packets_by_table(dump);
        assert_eq!(m.get(&0), Some(&5));
        assert_eq!(m.get(&1), Some(&3));
    }
}
