//! The per-host compiler: from the logical [`Model`] and one host's attachments,
//! the rules of every pipeline table (see [`crate::pipeline::table`]).
//!
//! Each host compiles only what its own ports need: their networks, the
//! networks on routers those networks attach to, and the external networks of
//! those routers. Logical ids (networks, ports, routers) are allocated once and
//! kept across compiles, so an unchanged object yields identical rules and the
//! engine's revalidation keeps its cached flows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use crate::flow::{ct_state, ethertype, ip_bytes, proto};
use crate::mac::MacAddr;
use crate::model::{Direction, EtherType, Model, Network, Port, Protocol, Router, Segment, SecurityGroupRule, Subnet};
use crate::pipeline::{port_range_masks, reg, table, Action, CtAction, DhcpConfig, Match, Nat, Pipeline, RaConfig, Rule, M};

/// The source MAC of DHCP answers on subnets without a router.
pub const SERVICE_MAC: MacAddr = MacAddr([0x0a, 0x58, 0xa9, 0xfe, 0xa9, 0xfe]);
/// Conntrack mark of connections committed by the egress security group table.
pub const MARK_EGRESS: u32 = 1;
/// Conntrack mark of connections committed by the ingress security group table.
pub const MARK_INGRESS: u32 = 2;
/// Conntrack mark of connections committed by gateway SNAT.
pub const MARK_SNAT: u32 = 3;
/// Conntrack zones of routers start here; zones below are ports'.
pub const ROUTER_ZONE_BASE: u16 = 0x8000;

/// What one host has attached, as datapath port numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// This host's name in the model.
    pub name: String,
    /// The VXLAN tunnel port, if the host has one.
    pub tunnel_port: Option<u32>,
    /// Physical network name to uplink datapath port.
    pub uplinks: BTreeMap<String, u32>,
    /// Logical port id to datapath port, for the ports attached here.
    pub ports: BTreeMap<String, u32>,
    /// The metadata service's tap, when the host serves metadata.
    pub metadata: Option<MetadataPort>,
}

/// Where the metadata service is attached (see [`crate::metadata`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataPort {
    /// Datapath port of the service's tap.
    pub port: u32,
    /// The tap's MAC.
    pub mac: MacAddr,
}

/// A neighbour learned by ARP: (logical network, IPv4 address) to MAC.
pub type Neighbors = BTreeMap<(u32, Ipv4Addr), MacAddr>;

/// Why a model could not be compiled for this host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    /// The model is invalid.
    #[error("Invalid model: {0}")]
    Model(#[from] crate::model::ModelError),
    /// The host is not in the model.
    #[error("Host '{0}' is not in the model")]
    UnknownHost(String),
    /// A port is attached here that the model binds elsewhere (or not at all).
    #[error("Port '{port}' is attached to this host but bound to {bound:?} in the model")]
    PortNotBoundHere {
        /// Port id.
        port: String,
        /// Where the model binds it.
        bound: Option<String>,
    },
    /// Too many ports for 16-bit conntrack zones.
    #[error("Too many logical ports for conntrack zones")]
    TooManyPorts,
}

/// Stable numbering of logical objects across compiles.
#[derive(Debug, Default, Clone)]
pub struct Ids {
    map: HashMap<(char, String), u32>,
    next: HashMap<char, u32>,
}

impl Ids {
    fn get(&mut self, kind: char, id: &str) -> u32 {
        if let Some(v) = self.map.get(&(kind, id.to_string())) {
            return *v;
        }
        let n = self.next.entry(kind).or_insert(1);
        let v = *n;
        *n += 1;
        self.map.insert((kind, id.to_string()), v);
        v
    }

    /// The logical network id of a network, if it has one.
    pub fn network(&self, id: &str) -> Option<u32> {
        self.map.get(&('n', id.to_string())).copied()
    }

    /// The logical port id (and conntrack zone) of a port, if it has one.
    pub fn port(&self, id: &str) -> Option<u32> {
        self.map.get(&('p', id.to_string())).copied()
    }

    /// The name of a logical network id.
    pub fn network_name(&self, n: u32) -> Option<&str> {
        self.map.iter().find(|((k, _), v)| *k == 'n' && **v == n).map(|((_, s), _)| s.as_str())
    }
}

/// The MAC a host answers ARP with for a floating IP (derived from the address,
/// so the external network sees one stable MAC per floating IP).
pub fn floating_ip_mac(ip: Ipv4Addr) -> MacAddr {
    let o = ip.octets();
    MacAddr([0x02, 0xf1, o[0], o[1], o[2], o[3]])
}

/// The compiler; keeps logical ids stable across compiles.
#[derive(Debug, Default)]
pub struct Compiler {
    /// Logical ids.
    pub ids: Ids,
}

struct Ctx<'a> {
    model: &'a Model,
    host: &'a HostConfig,
    rules: Vec<Rule>,
    dhcp: Vec<DhcpConfig>,
    ra: Vec<RaConfig>,
    subnets: HashMap<&'a str, &'a Subnet>,
    networks: HashMap<&'a str, &'a Network>,
}

impl Ctx<'_> {
    fn rule(&mut self, table: u8, priority: u16, m: M, actions: Vec<Action>, note: impl Into<String>) {
        self.rules.push(Rule { table, priority, m: m.build(), actions, note: note.into() });
    }
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn et_of(ip: &IpAddr) -> u16 {
    if ip.is_ipv4() {
        ethertype::IPV4
    } else {
        ethertype::IPV6
    }
}

impl Compiler {
    /// A compiler with fresh ids.
    pub fn new() -> Compiler {
        Compiler::default()
    }

    /// Compiles the pipeline for `host` (neighbours learned so far included).
    pub fn compile(&mut self, model: &Model, host: &HostConfig, neighbors: &Neighbors) -> Result<Pipeline, CompileError> {
        model.validate()?;
        let me = model.host(&host.name).ok_or_else(|| CompileError::UnknownHost(host.name.clone()))?;
        let _ = me;
        for pid in host.ports.keys() {
            let bound = model.port(pid).and_then(|p| p.binding_host.clone());
            if bound.as_deref() != Some(host.name.as_str()) {
                return Err(CompileError::PortNotBoundHere { port: pid.clone(), bound });
            }
        }
        let mut c = Ctx {
            model,
            host,
            rules: Vec::new(),
            dhcp: Vec::new(),
            ra: Vec::new(),
            subnets: model.subnets.iter().map(|s| (s.id.as_str(), s)).collect(),
            networks: model.networks.iter().map(|n| (n.id.as_str(), n)).collect(),
        };
        let local: Vec<&Port> = model.ports.iter().filter(|p| host.ports.contains_key(&p.id)).collect();

        // Which networks and routers this host needs.
        let mut nets: BTreeSet<&str> = local.iter().map(|p| p.network_id.as_str()).collect();
        let router_nets = |r: &Router| -> Vec<&str> { r.interfaces.iter().filter_map(|i| model.subnet(&i.subnet_id)).map(|s| s.network_id.as_str()).collect::<Vec<_>>() };
        let routers: Vec<&Router> = model
            .routers
            .iter()
            .filter(|r| router_nets(r).iter().any(|n| nets.contains(n)) || r.external_gateway.as_ref().is_some_and(|g| g.host == host.name))
            .collect();
        for r in &routers {
            nets.extend(router_nets(r));
            if let Some(g) = &r.external_gateway {
                nets.insert(g.network_id.as_str());
            }
        }
        // Allocate ids in a deterministic order.
        for n in &nets {
            self.ids.get('n', n);
        }
        for p in &model.ports {
            self.ids.get('p', &p.id);
        }
        for r in &routers {
            self.ids.get('r', &r.id);
        }
        if self.ids.next.get(&'p').copied().unwrap_or(1) >= ROUTER_ZONE_BASE as u32 {
            return Err(CompileError::TooManyPorts);
        }
        let ids = &mut self.ids;

        Self::classify(&mut c, ids, &local, &nets);
        for p in &local {
            Self::port_security(&mut c, ids, p);
        }
        Self::local_answers(&mut c, ids, &local, &nets, &routers);
        for p in &local {
            Self::security_groups(&mut c, ids, p);
        }
        Self::l2(&mut c, ids, &nets, &routers);
        for r in &routers {
            Self::routing(&mut c, ids, r, &local);
        }
        Self::neighbors(&mut c, ids, &nets, neighbors);
        Ok(Pipeline::new(c.rules, c.dhcp, c.ra))
    }

    fn classify(c: &mut Ctx, ids: &mut Ids, local: &[&Port], nets: &BTreeSet<&str>) {
        for p in local {
            let dp = c.host.ports[&p.id];
            let net = ids.get('n', &p.network_id);
            let lp = ids.get('p', &p.id);
            let n = c.networks[p.network_id.as_str()];
            if !p.admin_state_up {
                c.rule(table::CLASSIFY, 100, M::any().in_port(dp), vec![Action::Drop("port administratively down")], format!("port {} down", p.id));
                continue;
            }
            let next = if p.security_enabled(n) { table::PORT_SECURITY } else { table::LOCAL };
            c.rule(table::CLASSIFY, 100, M::any().in_port(dp), vec![Action::SetReg(reg::NET, net), Action::SetReg(reg::INPORT, lp), Action::Goto(next)], format!("port {}", p.id));
        }
        for nid in nets {
            let n = c.networks[nid];
            let net = ids.get('n', nid);
            match &n.segment {
                Segment::Vxlan { vni } => {
                    if let Some(t) = c.host.tunnel_port {
                        c.rule(table::CLASSIFY, 100, M::any().in_port(t).tun_id(*vni), vec![Action::SetReg(reg::NET, net), Action::Goto(table::L2)], format!("network {nid} from tunnel"));
                    }
                }
                Segment::Vlan { physical_network, vlan_id } => {
                    if let Some(u) = c.host.uplinks.get(physical_network) {
                        c.rule(table::CLASSIFY, 100, M::any().in_port(*u).vlan(Some(*vlan_id)), vec![Action::PopVlan, Action::SetReg(reg::NET, net), Action::Goto(table::LOCAL)], format!("network {nid} from {physical_network}"));
                    }
                }
                Segment::Flat { physical_network } => {
                    if let Some(u) = c.host.uplinks.get(physical_network) {
                        c.rule(table::CLASSIFY, 100, M::any().in_port(*u).vlan(None), vec![Action::SetReg(reg::NET, net), Action::Goto(table::LOCAL)], format!("network {nid} from {physical_network}"));
                    }
                }
            }
        }
    }

    fn port_security(c: &mut Ctx, ids: &mut Ids, p: &Port) {
        let n = c.networks[p.network_id.as_str()];
        if !p.security_enabled(n) || !p.admin_state_up {
            return;
        }
        let lp = ids.get('p', &p.id);
        let base = M::any().reg(reg::INPORT, lp);
        let note = format!("port {} may send from its addresses", p.id);
        let go = vec![Action::Goto(table::LOCAL)];
        let mut sources: Vec<(MacAddr, IpNet)> = p.fixed_ips.iter().map(|f| (p.mac_address, host_net(f.ip_address))).collect();
        for pair in &p.allowed_address_pairs {
            sources.push((pair.mac_address.unwrap_or(p.mac_address), pair.ip_address));
        }
        sources.push((p.mac_address, host_net(IpAddr::V6(p.mac_address.link_local_v6()))));
        for (mac, src) in &sources {
            let et = et_of(&src.addr());
            c.rule(table::PORT_SECURITY, 100, base.eth_src(*mac).eth_type(et).ip_src(*src), go.clone(), note.clone());
            if et == ethertype::IPV4 {
                c.rule(table::PORT_SECURITY, 100, base.eth_src(*mac).eth_type(ethertype::ARP).arp_sha(*mac).ip_src(*src), go.clone(), note.clone());
            }
        }
        let unspec4 = host_net(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let unspec6 = host_net(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
        c.rule(table::PORT_SECURITY, 100, base.eth_src(p.mac_address).eth_type(ethertype::ARP).arp_sha(p.mac_address).ip_src(unspec4), go.clone(), format!("port {} ARP probe", p.id));
        c.rule(table::PORT_SECURITY, 100, base.eth_src(p.mac_address).eth_type(ethertype::IPV4).ip_src(unspec4).proto(proto::UDP).l4_src(68, 0xffff).l4_dst(67, 0xffff), go.clone(), format!("port {} DHCP discover", p.id));
        c.rule(table::PORT_SECURITY, 100, base.eth_src(p.mac_address).eth_type(ethertype::IPV6).ip_src(unspec6).proto(proto::ICMPV6), go, format!("port {} IPv6 DAD", p.id));
    }

    fn local_answers(c: &mut Ctx, ids: &mut Ids, local: &[&Port], nets: &BTreeSet<&str>, routers: &[&Router]) {
        let model = c.model;
        for nid in nets {
            let net = ids.get('n', nid);
            let n = c.networks[nid];
            // ARP and ND for every port of the network, wherever it is.
            for q in model.ports.iter().filter(|q| q.network_id == *nid) {
                let lq = ids.get('p', &q.id);
                for f in &q.fixed_ips {
                    match f.ip_address {
                        IpAddr::V4(a) => {
                            let m = M::any().reg(reg::NET, net).eth_type(ethertype::ARP).proto(1).ip_dst(host_net(IpAddr::V4(a)));
                            c.rule(table::LOCAL, 110, m.reg(reg::INPORT, lq), vec![Action::Drop("ARP for own address")], format!("port {} probing {a}", q.id));
                            c.rule(table::LOCAL, 100, m, vec![Action::ArpReply(q.mac_address), Action::OutputInPort], format!("ARP {a} is {} (port {})", q.mac_address, q.id));
                        }
                        IpAddr::V6(a) => {
                            let m = M::any().reg(reg::NET, net).eth_type(ethertype::IPV6).proto(proto::ICMPV6).l4_src(135, 0xffff).nd_target(a.octets());
                            c.rule(table::LOCAL, 110, m.reg(reg::INPORT, lq), vec![Action::Drop("ND for own address")], format!("port {} DAD for {a}", q.id));
                            c.rule(table::LOCAL, 100, m, vec![Action::NdAdvert(q.mac_address), Action::OutputInPort], format!("ND {a} is {} (port {})", q.mac_address, q.id));
                        }
                    }
                }
            }
            // Router interfaces on this network: ARP, ND, ping, router advertisements.
            for r in routers {
                for i in &r.interfaces {
                    let Some(s) = c.subnets.get(i.subnet_id.as_str()).copied() else { continue };
                    if s.network_id != *nid {
                        continue;
                    }
                    let ip = i.ip_address;
                    match ip {
                        IpAddr::V4(a) => {
                            c.rule(table::LOCAL, 100, M::any().reg(reg::NET, net).eth_type(ethertype::ARP).proto(1).ip_dst(host_net(ip)), vec![Action::ArpReply(i.mac_address), Action::OutputInPort], format!("ARP {a} is router {}", r.id));
                            c.rule(table::LOCAL, 100, M::any().reg(reg::NET, net).eth_type(ethertype::IPV4).proto(proto::ICMP).l4_src(8, 0xffff).ip_dst(host_net(ip)), vec![Action::EchoReply(i.mac_address), Action::OutputInPort], format!("router {} answers ping on {a}", r.id));
                        }
                        IpAddr::V6(a) => {
                            for target in [a, i.mac_address.link_local_v6()] {
                                c.rule(table::LOCAL, 100, M::any().reg(reg::NET, net).eth_type(ethertype::IPV6).proto(proto::ICMPV6).l4_src(135, 0xffff).nd_target(target.octets()), vec![Action::NdAdvert(i.mac_address), Action::OutputInPort], format!("ND {target} is router {}", r.id));
                                c.rule(table::LOCAL, 100, M::any().reg(reg::NET, net).eth_type(ethertype::IPV6).proto(proto::ICMPV6).l4_src(128, 0xffff).ip_dst(host_net(IpAddr::V6(target))), vec![Action::EchoReply(i.mac_address), Action::OutputInPort], format!("router {} answers ping on {target}", r.id));
                            }
                            if s.cidr.prefix_len() == 64 {
                                let idx = c.ra.len() as u32;
                                c.ra.push(RaConfig { mac: i.mac_address, prefix: ip_bytes(s.cidr.network()), mtu: n.mtu, autonomous: s.ipv6_address_mode != Some(crate::model::Ipv6Mode::Dhcpv6Stateful) });
                                c.rule(table::LOCAL, 100, M::any().reg(reg::NET, net).eth_type(ethertype::IPV6).proto(proto::ICMPV6).l4_src(133, 0xffff), vec![Action::RouterAdvert(idx), Action::OutputInPort], format!("router {} advertises {}", r.id, s.cidr));
                            }
                        }
                    }
                }
                // The gateway host answers for the router's external address.
                if let Some(g) = &r.external_gateway {
                    if g.network_id == *nid && g.host == c.host.name {
                        c.rule(table::LOCAL, 100, M::any().reg(reg::NET, net).eth_type(ethertype::ARP).proto(1).ip_dst(host_net(g.ip_address)), vec![Action::LearnNeighbor, Action::ArpReply(g.mac_address), Action::OutputInPort], format!("ARP {} is router {} gateway", g.ip_address, r.id));
                        c.rule(table::LOCAL, 100, M::any().reg(reg::NET, net).eth_type(ethertype::IPV4).proto(proto::ICMP).l4_src(8, 0xffff).ip_dst(host_net(g.ip_address)), vec![Action::EchoReply(g.mac_address), Action::OutputInPort], format!("router {} answers ping on {}", r.id, g.ip_address));
                    }
                }
            }
            if n.external {
                // Floating IPs of local ports are answered here, and only here.
                for f in &model.floating_ips {
                    let (Some(pid), true) = (&f.port_id, f.floating_network_id == *nid) else { continue };
                    if !c.host.ports.contains_key(pid) {
                        continue;
                    }
                    let Some(a) = v4(f.floating_ip_address) else { continue };
                    c.rule(table::LOCAL, 100, M::any().reg(reg::NET, net).eth_type(ethertype::ARP).proto(1).ip_dst(host_net(f.floating_ip_address)), vec![Action::LearnNeighbor, Action::ArpReply(floating_ip_mac(a)), Action::OutputInPort], format!("ARP floating IP {a}"));
                }
                c.rule(table::LOCAL, 90, M::any().reg(reg::NET, net).eth_type(ethertype::ARP).proto(2), vec![Action::LearnNeighbor], format!("learn neighbours on {nid}"));
            }
        }
        // DHCP for local ports.
        for p in local {
            let lp = ids.get('p', &p.id);
            let n = c.networks[p.network_id.as_str()];
            for f in &p.fixed_ips {
                let (Some(a), Some(s)) = (v4(f.ip_address), c.subnets.get(f.subnet_id.as_str())) else { continue };
                if !s.enable_dhcp {
                    continue;
                }
                let router_iface = routers.iter().flat_map(|r| r.interfaces.iter()).find(|i| i.subnet_id == s.id);
                let gw = s.gateway_ip.and_then(v4);
                let server_ip = gw.or_else(|| match s.cidr.network() {
                    IpAddr::V4(n) => Some(Ipv4Addr::from(u32::from(n) + 1)),
                    _ => None,
                });
                let cfg = DhcpConfig {
                    client_mac: p.mac_address,
                    client_ip: a,
                    prefix_len: s.cidr.prefix_len(),
                    server_ip: server_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
                    server_mac: router_iface.map(|i| i.mac_address).unwrap_or(SERVICE_MAC),
                    router: gw,
                    dns: s.dns_nameservers.iter().filter_map(|d| v4(*d)).collect(),
                    routes: s
                        .host_routes
                        .iter()
                        .filter_map(|r| match (r.destination, v4(r.nexthop)) {
                            (IpNet::V4(d), Some(nh)) => Some((d.network(), d.prefix_len(), nh)),
                            _ => None,
                        })
                        .collect(),
                    mtu: n.mtu.min(u16::MAX as u32) as u16,
                    lease_secs: 86400,
                };
                let idx = c.dhcp.len() as u32;
                c.dhcp.push(cfg);
                c.rule(table::LOCAL, 100, M::any().reg(reg::INPORT, lp).eth_type(ethertype::IPV4).proto(proto::UDP).l4_src(68, 0xffff).l4_dst(67, 0xffff), vec![Action::DhcpReply(idx), Action::OutputInPort], format!("DHCP for port {} ({a})", p.id));
                break;
            }
        }
        if let Some(mp) = c.host.metadata {
            Self::metadata(c, ids, local, routers, mp);
        }
        c.rule(table::LOCAL, 0, M::any(), vec![Action::Goto(table::EGRESS_SG)], "not for a local responder");
    }

    /// Metadata: each local port's TCP to 169.254.169.254:80 goes to the
    /// service's tap with its source translated to the port's client address;
    /// the answers come back translated to the port's address.
    fn metadata(c: &mut Ctx, ids: &mut Ids, local: &[&Port], routers: &[&Router], mp: MetadataPort) {
        use crate::metadata::{client_addr, METADATA_IP, METADATA_PORT, PEER_MAC};
        let service = IpAddr::V4(METADATA_IP);
        for p in local.iter().filter(|p| p.admin_state_up) {
            let Some(f) = p.fixed_ips.iter().find(|f| f.ip_address.is_ipv4()) else { continue };
            let lp = ids.get('p', &p.id);
            let net = ids.get('n', &p.network_id);
            let dp = c.host.ports[&p.id];
            let gw_mac = routers.iter().flat_map(|r| r.interfaces.iter()).find(|i| i.subnet_id == f.subnet_id).map(|i| i.mac_address).unwrap_or(SERVICE_MAC);
            let client = IpAddr::V4(client_addr(lp));
            c.rule(table::LOCAL, 120, M::any().reg(reg::INPORT, lp).eth_type(ethertype::ARP).proto(1).ip_dst(host_net(service)), vec![Action::ArpReply(gw_mac), Action::OutputInPort], format!("ARP {METADATA_IP} for port {}", p.id));
            c.rule(
                table::LOCAL,
                120,
                M::any().reg(reg::INPORT, lp).eth_type(ethertype::IPV4).ip_src(host_net(f.ip_address)).ip_dst(host_net(service)).proto(proto::TCP).l4_dst(METADATA_PORT, 0xffff),
                vec![Action::SetIpSrc(ip_bytes(client)), Action::SetEthSrc(PEER_MAC), Action::SetEthDst(mp.mac), Action::Output(mp.port)],
                format!("metadata request of port {} as {client}", p.id),
            );
            c.rule(
                table::CLASSIFY,
                100,
                M::any().in_port(mp.port).eth_type(ethertype::IPV4).ip_src(host_net(service)).ip_dst(host_net(client)).proto(proto::TCP).l4_src(METADATA_PORT, 0xffff),
                vec![Action::SetReg(reg::NET, net), Action::SetIpDst(ip_bytes(f.ip_address)), Action::SetEthSrc(gw_mac), Action::SetEthDst(p.mac_address), Action::Output(dp)],
                format!("metadata answer to port {}", p.id),
            );
        }
        c.rule(table::CLASSIFY, 90, M::any().in_port(mp.port).eth_type(ethertype::ARP).proto(1), vec![Action::ArpReply(PEER_MAC), Action::OutputInPort], "metadata service ARP for its clients");
        c.rule(table::CLASSIFY, 10, M::any().in_port(mp.port), vec![Action::Drop("metadata service: not for a local port")], "metadata service, anything else");
    }

    fn security_groups(c: &mut Ctx, ids: &mut Ids, p: &Port) {
        let n = c.networks[p.network_id.as_str()];
        let lp = ids.get('p', &p.id);
        let out = c.host.ports[&p.id];
        if !p.security_enabled(n) {
            c.rule(table::INGRESS_SG, 100, M::any().reg(reg::OUTPORT, lp), vec![Action::Output(out)], format!("to port {} (no port security)", p.id));
            if p.admin_state_up {
                c.rule(table::FLOOD_SG, 100, M::any().reg(reg::OUTPORT, lp), vec![Action::Output(out)], format!("flood to port {} (no port security)", p.id));
            }
            return;
        }
        let zone = lp as u16;
        Self::flood_filter(c, p, lp, out);
        for (tbl, dir, reg_, mark, after) in [
            (table::EGRESS_SG, Direction::Egress, reg::INPORT, MARK_EGRESS, vec![Action::Goto(table::L2)]),
            (table::INGRESS_SG, Direction::Ingress, reg::OUTPORT, MARK_INGRESS, vec![Action::Output(out)]),
        ] {
            let base = M::any().reg(reg_, lp);
            let what = if dir == Direction::Egress { "from" } else { "to" };
            // Neighbour discovery and router advertisements always pass, as in Neutron.
            for t in 133..=137u16 {
                c.rule(tbl, 250, base.eth_type(ethertype::IPV6).proto(proto::ICMPV6).l4_src(t, 0xffff), after.clone(), format!("ND {what} port {}", p.id));
            }
            if dir == Direction::Egress {
                // Multicast listener queries, reports and done messages: conntrack has no state for them.
                for t in [130u16, 131, 132, 143] {
                    c.rule(tbl, 250, base.eth_type(ethertype::IPV6).proto(proto::ICMPV6).l4_src(t, 0xffff), after.clone(), format!("MLD from port {}", p.id));
                }
            }
            let tracked = base.ct_zone(zone);
            c.rule(tbl, 200, tracked.ct(ct_state::TRACKED | ct_state::INVALID, ct_state::TRACKED | ct_state::INVALID), vec![Action::Drop("conntrack invalid")], format!("invalid {what} port {}", p.id));
            c.rule(tbl, 190, tracked.ct(ct_state::TRACKED | ct_state::ESTABLISHED, ct_state::TRACKED | ct_state::ESTABLISHED | ct_state::INVALID), after.clone(), format!("established {what} port {}", p.id));
            c.rule(tbl, 190, tracked.ct(ct_state::TRACKED | ct_state::RELATED, ct_state::TRACKED | ct_state::RELATED | ct_state::INVALID), after.clone(), format!("related {what} port {}", p.id));
            let commit = Action::Ct(CtAction { zone, commit: true, nat: None, mark }, None);
            let mut allow = vec![commit];
            allow.extend(after.clone());
            for gid in &p.security_groups {
                let Some(g) = c.model.security_groups.iter().find(|g| &g.id == gid) else { continue };
                for rule in g.rules.iter().filter(|r| r.direction == dir) {
                    for m in rule_matches(c.model, rule, dir) {
                        let mut mm = tracked.ct(ct_state::TRACKED | ct_state::NEW, ct_state::TRACKED | ct_state::NEW | ct_state::INVALID);
                        merge(&mut mm, &m);
                        c.rule(tbl, 100, mm, allow.clone(), format!("security group {gid} rule {} {what} port {}", rule_label(g, rule), p.id));
                    }
                }
            }
            c.rule(tbl, 50, tracked.ct(ct_state::TRACKED, ct_state::TRACKED), vec![Action::Drop(if dir == Direction::Egress { "egress security group" } else { "ingress security group" })], format!("default deny {what} port {}", p.id));
            for et in [ethertype::IPV4, ethertype::IPV6] {
                c.rule(tbl, 10, base.eth_type(et), vec![Action::Ct(CtAction { zone, commit: false, nat: None, mark: 0 }, Some(tbl))], format!("conntrack {what} port {}", p.id));
            }
            if dir == Direction::Ingress {
                c.rule(tbl, 5, base, after.clone(), format!("non-IP to port {}", p.id));
            }
        }
    }

    /// Flooded copies (broadcast, multicast, unknown unicast) into port `p`:
    /// its ingress rules decide statelessly, as a new connection would be.
    fn flood_filter(c: &mut Ctx, p: &Port, lp: u32, out: u32) {
        if !p.admin_state_up {
            return;
        }
        let base = M::any().reg(reg::OUTPORT, lp);
        let give = vec![Action::Output(out)];
        for t in 133..=137u16 {
            c.rule(table::FLOOD_SG, 250, base.eth_type(ethertype::IPV6).proto(proto::ICMPV6).l4_src(t, 0xffff), give.clone(), format!("flooded ND to port {}", p.id));
        }
        for gid in &p.security_groups {
            let Some(g) = c.model.security_groups.iter().find(|g| &g.id == gid) else { continue };
            for rule in g.rules.iter().filter(|r| r.direction == Direction::Ingress) {
                for m in rule_matches(c.model, rule, Direction::Ingress) {
                    let mut mm = base;
                    merge(&mut mm, &m);
                    c.rule(table::FLOOD_SG, 100, mm, give.clone(), format!("security group {gid} rule {} lets a flooded copy into port {}", rule_label(g, rule), p.id));
                }
            }
        }
        for et in [ethertype::IPV4, ethertype::IPV6] {
            c.rule(table::FLOOD_SG, 10, base.eth_type(et), vec![Action::Drop("flooded copy refused by ingress security group")], format!("flooded IP into port {} not allowed", p.id));
        }
        c.rule(table::FLOOD_SG, 5, base, give, format!("flooded non-IP into port {}", p.id));
    }

    fn l2(c: &mut Ctx, ids: &mut Ids, nets: &BTreeSet<&str>, routers: &[&Router]) {
        let model = c.model;
        c.rule(table::EGRESS_SG, 0, M::any(), vec![Action::Goto(table::L2)], "no security group");
        for nid in nets {
            let net = ids.get('n', nid);
            let n = c.networks[nid];
            let uplink = match &n.segment {
                Segment::Vxlan { .. } => None,
                Segment::Vlan { physical_network, vlan_id } => c.host.uplinks.get(physical_network).map(|u| (*u, Some(*vlan_id))),
                Segment::Flat { physical_network } => c.host.uplinks.get(physical_network).map(|u| (*u, None)),
            };
            let to_uplink = |(u, vlan): (u32, Option<u16>)| -> Vec<Action> {
                match vlan {
                    Some(v) => vec![Action::PushVlan(v), Action::Output(u), Action::PopVlan],
                    None => vec![Action::Output(u)],
                }
            };
            let mut flood: Vec<Action> = Vec::new();
            let mut remote_hosts = BTreeSet::new();
            for q in model.ports.iter().filter(|q| q.network_id == *nid) {
                let lq = ids.get('p', &q.id);
                let mut macs = vec![q.mac_address];
                macs.extend(q.allowed_address_pairs.iter().filter_map(|a| a.mac_address));
                macs.dedup();
                let actions = if c.host.ports.contains_key(&q.id) {
                    // Each local port's copy passes that port's security groups.
                    flood.extend([Action::SetReg(reg::OUTPORT, lq), Action::Resubmit(table::FLOOD_SG)]);
                    vec![Action::SetReg(reg::OUTPORT, lq), Action::Goto(table::INGRESS_SG)]
                } else if let Some(h) = q.binding_host.as_deref().filter(|h| *h != c.host.name) {
                    match (&n.segment, c.host.tunnel_port, model.host(h).and_then(|h| v4(h.tunnel_ip))) {
                        (Segment::Vxlan { vni }, Some(port), Some(remote)) => {
                            remote_hosts.insert((remote, *vni, port));
                            vec![Action::Tunnel { port, vni: *vni, remote }]
                        }
                        _ => match uplink {
                            Some(u) => to_uplink(u),
                            None => continue,
                        },
                    }
                } else {
                    continue;
                };
                for mac in macs {
                    c.rule(table::L2, 100, M::any().reg(reg::NET, net).eth_dst(mac), actions.clone(), format!("{mac} is port {}", q.id));
                }
            }
            // Gateway hosts of routers on this network receive flooded frames too (they may need ARP).
            for (remote, vni, port) in &remote_hosts {
                flood.push(Action::Tunnel { port: *port, vni: *vni, remote: *remote });
            }
            if let Some(u) = uplink {
                flood.extend(to_uplink(u));
                c.rule(table::L2, 1, M::any().reg(reg::NET, net), to_uplink(u), format!("unknown unicast on {nid} to the physical network"));
            }
            c.rule(table::L2, 50, M::any().reg(reg::NET, net).eth_dst_multicast(), flood, format!("flood on {nid}"));
            for r in routers {
                let rid = ids.get('r', &r.id);
                for i in &r.interfaces {
                    if c.subnets.get(i.subnet_id.as_str()).map(|s| s.network_id.as_str()) != Some(*nid) {
                        continue;
                    }
                    c.rule(table::L2, 100, M::any().reg(reg::NET, net).eth_dst(i.mac_address), vec![Action::SetReg(reg::ROUTER, rid), Action::Goto(table::ROUTE)], format!("{} is router {}", i.mac_address, r.id));
                }
                if let Some(g) = r.external_gateway.as_ref().filter(|g| g.network_id == *nid) {
                    // Floating IPs of local ports: DNAT to the fixed address, route to the port.
                    for f in model.floating_ips.iter().filter(|f| f.router_id.as_deref() == Some(r.id.as_str())) {
                        let Some(pid) = &f.port_id else { continue };
                        let Some(p) = model.port(pid) else { continue };
                        if !c.host.ports.contains_key(pid) {
                            continue;
                        }
                        let (Some(fip), Some(fixed)) = (v4(f.floating_ip_address), floating_fixed(p, f.fixed_ip_address)) else { continue };
                        let Some(iface) = r.interfaces.iter().find(|i| c.subnets.get(i.subnet_id.as_str()).is_some_and(|s| s.network_id == p.network_id && s.cidr.contains(&IpAddr::V4(fixed)))) else { continue };
                        c.rule(
                            table::L2,
                            110,
                            M::any().reg(reg::NET, net).eth_dst(floating_ip_mac(fip)).eth_type(ethertype::IPV4).ip_dst(host_net(IpAddr::V4(fip))),
                            vec![
                                Action::SetIpDst(ip_bytes(IpAddr::V4(fixed))),
                                Action::SetEthSrc(iface.mac_address),
                                Action::SetEthDst(p.mac_address),
                                Action::SetReg(reg::NET, ids.get('n', &p.network_id)),
                                Action::SetReg(reg::ROUTER, rid),
                                Action::DecTtl,
                                Action::Goto(table::L2),
                            ],
                            format!("floating IP {fip} to {fixed} (port {pid})"),
                        );
                    }
                    if g.host == c.host.name {
                        let zone = ROUTER_ZONE_BASE + rid as u16;
                        c.rule(
                            table::L2,
                            110,
                            M::any().reg(reg::NET, net).eth_dst(g.mac_address).eth_type(ethertype::IPV4).ip_dst(host_net(g.ip_address)),
                            vec![Action::SetReg(reg::ROUTER, rid), Action::Ct(CtAction { zone, commit: false, nat: Some(Nat::Reverse), mark: 0 }, Some(table::SNAT_IN))],
                            format!("return traffic of router {} SNAT", r.id),
                        );
                        c.rule(table::SNAT_IN, 100, M::any().reg(reg::ROUTER, rid).ct(ct_state::TRACKED | ct_state::ESTABLISHED, ct_state::TRACKED | ct_state::ESTABLISHED | ct_state::INVALID), vec![Action::Goto(table::ROUTE)], format!("router {} SNAT return", r.id));
                    }
                }
            }
        }
    }

    fn routing(c: &mut Ctx, ids: &mut Ids, r: &Router, local: &[&Port]) {
        let model = c.model;
        let rid = ids.get('r', &r.id);
        let base = M::any().reg(reg::ROUTER, rid);
        let mut connected: Vec<(IpNet, u32, MacAddr)> = Vec::new();
        for i in &r.interfaces {
            let Some(s) = c.subnets.get(i.subnet_id.as_str()).copied() else { continue };
            let net = ids.get('n', &s.network_id);
            connected.push((s.cidr, net, i.mac_address));
            c.rule(
                table::ROUTE,
                100 + s.cidr.prefix_len() as u16,
                base.eth_type(et_of(&s.cidr.addr())).ip_dst(s.cidr),
                vec![Action::SetReg(reg::NET, net), Action::SetEthSrc(i.mac_address), Action::SetNexthop([0; 16]), Action::DecTtl, Action::Goto(table::NEIGHBOR)],
                format!("router {} connected {}", r.id, s.cidr),
            );
        }
        for route in &r.routes {
            let Some((_, net, mac)) = connected.iter().find(|(cidr, _, _)| cidr.contains(&route.nexthop)) else { continue };
            c.rule(
                table::ROUTE,
                100 + route.destination.prefix_len() as u16,
                base.eth_type(et_of(&route.destination.addr())).ip_dst(route.destination),
                vec![Action::SetReg(reg::NET, *net), Action::SetEthSrc(*mac), Action::SetNexthop(ip_bytes(route.nexthop)), Action::DecTtl, Action::Goto(table::NEIGHBOR)],
                format!("router {} route {} via {}", r.id, route.destination, route.nexthop),
            );
        }
        let Some(g) = &r.external_gateway else { return };
        c.rule(table::ROUTE, 1, base.eth_type(ethertype::IPV4), vec![Action::Goto(table::EXT_OUT)], format!("router {} default to external", r.id));
        let ext = ids.get('n', &g.network_id);
        // Floating IPs of local ports leave from this host.
        for f in model.floating_ips.iter().filter(|f| f.router_id.as_deref() == Some(r.id.as_str())) {
            let Some(pid) = &f.port_id else { continue };
            let Some(p) = local.iter().find(|p| &p.id == pid) else { continue };
            let (Some(fip), Some(fixed)) = (v4(f.floating_ip_address), floating_fixed(p, f.fixed_ip_address)) else { continue };
            c.rule(
                table::EXT_OUT,
                100,
                base.eth_type(ethertype::IPV4).reg(reg::NET, ids.get('n', &p.network_id)).ip_src(host_net(IpAddr::V4(fixed))),
                vec![Action::SetIpSrc(ip_bytes(IpAddr::V4(fip))), Action::SetEthSrc(floating_ip_mac(fip)), Action::SetReg(reg::NET, ext), Action::DecTtl, Action::Goto(table::EXT_ROUTE)],
                format!("floating IP {fip} for {fixed} (port {pid})"),
            );
        }
        if g.enable_snat {
            if g.host == c.host.name {
                let zone = ROUTER_ZONE_BASE + rid as u16;
                let Some(addr) = v4(g.ip_address) else { return };
                c.rule(table::EXT_OUT, 10, base.eth_type(ethertype::IPV4), vec![Action::Ct(CtAction { zone, commit: true, nat: Some(Nat::Snat { addr, port_min: 1024, port_max: 65535 }), mark: MARK_SNAT }, Some(table::SNAT_OUT))], format!("router {} SNAT to {addr}", r.id));
                c.rule(table::SNAT_OUT, 100, base.ct(ct_state::TRACKED, ct_state::TRACKED | ct_state::INVALID), vec![Action::SetEthSrc(g.mac_address), Action::SetReg(reg::NET, ext), Action::DecTtl, Action::Goto(table::EXT_ROUTE)], format!("router {} out after SNAT", r.id));
            } else if let (Some(port), Some(remote)) = (c.host.tunnel_port, model.host(&g.host).and_then(|h| v4(h.tunnel_ip))) {
                for i in &r.interfaces {
                    let Some(s) = c.subnets.get(i.subnet_id.as_str()).copied() else { continue };
                    let Some(Segment::Vxlan { vni }) = c.networks.get(s.network_id.as_str()).map(|n| &n.segment) else { continue };
                    let net = ids.get('n', &s.network_id);
                    c.rule(table::EXT_OUT, 10, base.eth_type(ethertype::IPV4).reg(reg::NET, net), vec![Action::Tunnel { port, vni: *vni, remote }], format!("router {} SNAT happens on {}", r.id, g.host));
                }
            }
        }
        // Routing on the external network.
        for s in model.subnets.iter().filter(|s| s.network_id == g.network_id && s.cidr.addr().is_ipv4()) {
            c.rule(table::EXT_ROUTE, 100 + s.cidr.prefix_len() as u16, base.reg(reg::NET, ext).ip_dst(s.cidr), vec![Action::SetNexthop([0; 16]), Action::Goto(table::NEIGHBOR)], format!("external {} on-link", s.cidr));
        }
        let upstream = g.nexthop.or_else(|| model.subnets.iter().find(|s| s.network_id == g.network_id && s.cidr.contains(&g.ip_address)).and_then(|s| s.gateway_ip));
        if let Some(up) = upstream {
            c.rule(table::EXT_ROUTE, 1, base.reg(reg::NET, ext), vec![Action::SetNexthop(ip_bytes(up)), Action::Goto(table::NEIGHBOR)], format!("external default via {up}"));
        }
    }

    fn neighbors(c: &mut Ctx, ids: &mut Ids, nets: &BTreeSet<&str>, learned: &Neighbors) {
        let model = c.model;
        for nid in nets {
            let net = ids.get('n', nid);
            for q in model.ports.iter().filter(|q| q.network_id == *nid) {
                for f in &q.fixed_ips {
                    let b = ip_bytes(f.ip_address);
                    let acts = vec![Action::SetEthDst(q.mac_address), Action::Goto(table::L2)];
                    c.rule(table::NEIGHBOR, 100, M::any().reg(reg::NET, net).nexthop([0; 16]).ip_dst(host_net(f.ip_address)), acts.clone(), format!("{} is port {}", f.ip_address, q.id));
                    c.rule(table::NEIGHBOR, 100, M::any().reg(reg::NET, net).nexthop(b), acts, format!("next hop {} is port {}", f.ip_address, q.id));
                }
            }
            let n = c.networks[nid];
            let uplink = match &n.segment {
                Segment::Vxlan { .. } => None,
                Segment::Vlan { physical_network, vlan_id } => c.host.uplinks.get(physical_network).map(|u| (*u, *vlan_id)),
                Segment::Flat { physical_network } => c.host.uplinks.get(physical_network).map(|u| (*u, 0)),
            };
            if let Some((port, vlan)) = uplink {
                for ((lnet, ip), mac) in learned.range((net, Ipv4Addr::UNSPECIFIED)..=(net, Ipv4Addr::BROADCAST)) {
                    let _ = lnet;
                    let acts = vec![Action::SetEthDst(*mac), Action::Goto(table::L2)];
                    c.rule(table::NEIGHBOR, 90, M::any().reg(reg::NET, net).nexthop([0; 16]).ip_dst(host_net(IpAddr::V4(*ip))), acts.clone(), format!("{ip} is {mac} (learned)"));
                    c.rule(table::NEIGHBOR, 90, M::any().reg(reg::NET, net).nexthop(ip_bytes(IpAddr::V4(*ip))), acts, format!("next hop {ip} is {mac} (learned)"));
                }
                c.rule(table::NEIGHBOR, 1, M::any().reg(reg::NET, net).eth_type(ethertype::IPV4), vec![Action::ArpResolve { port, vlan }], format!("resolve next hops on {nid}"));
            }
        }
    }
}

fn floating_fixed(p: &Port, wanted: Option<IpAddr>) -> Option<Ipv4Addr> {
    match wanted {
        Some(ip) => v4(ip),
        None => p.fixed_ips.iter().find_map(|f| v4(f.ip_address)),
    }
}

/// ORs the set fields of `extra` into `m`.
fn merge(m: &mut M, extra: &Match) {
    let mut key = m.0.key;
    let mut mask = m.0.mask;
    let (kw, mw) = (key.words_mut(), mask.words_mut());
    let (ek, em) = (extra.key.words(), extra.mask.words());
    for i in 0..kw.len() {
        kw[i] |= ek[i];
        mw[i] |= em[i];
    }
    m.0.key = key;
    m.0.mask = mask;
}

/// A rule's id, or when it has none its position and what it allows.
fn rule_label(g: &crate::model::SecurityGroup, rule: &SecurityGroupRule) -> String {
    if !rule.id.is_empty() {
        return rule.id.clone();
    }
    let idx = g.rules.iter().position(|r| std::ptr::eq(r, rule)).unwrap_or(0);
    let proto = rule.protocol.map(|p| format!(" {p:?}").to_lowercase()).unwrap_or_default();
    let range = match (rule.port_range_min, rule.port_range_max) {
        (Some(a), Some(b)) if a != b => format!(" {a}-{b}"),
        (Some(a), _) => format!(" {a}"),
        _ => String::new(),
    };
    format!("#{idx} ({:?}{proto}{range})", rule.ethertype)
}

/// The matches (on the remote side and protocol) one security group rule expands to.
fn rule_matches(model: &Model, rule: &SecurityGroupRule, dir: Direction) -> Vec<Match> {
    let et = match rule.ethertype {
        EtherType::IPv4 => ethertype::IPV4,
        EtherType::IPv6 => ethertype::IPV6,
    };
    let base = M::any().eth_type(et);
    // Remote side: source for ingress, destination for egress.
    let remote = |m: M, net: IpNet| if dir == Direction::Ingress { m.ip_src(net) } else { m.ip_dst(net) };
    let mut remotes: Vec<Option<IpNet>> = Vec::new();
    if let Some(g) = &rule.remote_group_id {
        for p in model.ports.iter().filter(|p| p.security_groups.contains(g)) {
            for f in &p.fixed_ips {
                if et_of(&f.ip_address) == et {
                    remotes.push(Some(host_net(f.ip_address)));
                }
            }
            for a in &p.allowed_address_pairs {
                if et_of(&a.ip_address.addr()) == et {
                    remotes.push(Some(a.ip_address));
                }
            }
        }
    } else {
        match rule.remote_ip_prefix {
            Some(p) if p.prefix_len() > 0 => remotes.push(Some(p.trunc())),
            _ => remotes.push(None),
        }
    }
    let mut protos: Vec<M> = Vec::new();
    match rule.protocol {
        None => protos.push(base),
        Some(pr @ (Protocol::Tcp | Protocol::Udp)) => {
            let lo = rule.port_range_min.unwrap_or(0);
            let hi = rule.port_range_max.unwrap_or(if rule.port_range_min.is_some() { lo } else { 65535 });
            for (v, m) in port_range_masks(lo, hi) {
                protos.push(if m == 0 { base.proto(pr.number()) } else { base.proto(pr.number()).l4_dst(v, m) });
            }
        }
        Some(pr @ (Protocol::Icmp | Protocol::Icmpv6)) => {
            let mut m = base.proto(if et == ethertype::IPV6 { proto::ICMPV6 } else { pr.number() });
            if let Some(t) = rule.port_range_min {
                m = m.l4_src(t, 0xffff);
                if let Some(code) = rule.port_range_max {
                    m = m.l4_dst(code, 0xffff);
                }
            }
            protos.push(m);
        }
        Some(pr) => protos.push(base.proto(pr.number())),
    }
    let mut out = Vec::new();
    for p in &protos {
        for r in &remotes {
            out.push(match r {
                Some(net) => remote(*p, *net).build(),
                None => p.build(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::FlowKey;
    use crate::pipeline::{DpAction, RecircTable};

    fn model() -> Model {
        let path = format!("{}/tests/models/two_tenants.json", env!("CARGO_MANIFEST_DIR"));
        Model::from_json(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn h1() -> HostConfig {
        HostConfig {
            name: "h1".into(),
            tunnel_port: Some(1),
            uplinks: [("physnet1".to_string(), 2)].into_iter().collect(),
            ports: [("a1".to_string(), 10), ("a3".to_string(), 11), ("b1".to_string(), 12)].into_iter().collect(),
            metadata: None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn ip_key(in_port: u32, src_mac: &str, dst_mac: &str, src: &str, dst: &str, proto_: u8, sport: u16, dport: u16) -> FlowKey {
        let mut k = FlowKey { in_port, eth_type: ethertype::IPV4, ip_proto: proto_, l4_src: sport, l4_dst: dport, ip_ttl: 64, ..Default::default() };
        k.eth_src = src_mac.parse::<MacAddr>().unwrap().0;
        k.eth_dst = dst_mac.parse::<MacAddr>().unwrap().0;
        k.ip_src = ip_bytes(src.parse().unwrap());
        k.ip_dst = ip_bytes(dst.parse().unwrap());
        k
    }

    /// Runs the key through, emulating conntrack verdicts by `ct` on each ct() step.
    fn run(p: &Pipeline, rt: &mut RecircTable, mut k: FlowKey, ct: u8) -> Vec<DpAction> {
        let mut all = Vec::new();
        for _ in 0..8 {
            let t = p.translate(&k, rt, None);
            let recirc = t.actions.iter().find_map(|a| match a {
                DpAction::Ct(c, id) if *id != 0 => Some((c.zone, *id)),
                _ => None,
            });
            all.extend(t.actions.clone());
            match recirc {
                Some((zone, id)) => {
                    k.recirc_id = id;
                    k.ct_zone = zone;
                    k.ct_state = ct;
                }
                None => return all,
            }
        }
        all
    }

    #[test]
    fn same_host_tenant_traffic_passes_security_groups() {
        let mut c = Compiler::new();
        let p = c.compile(&model(), &h1(), &Neighbors::new()).unwrap();
        let mut rt = RecircTable::default();
        // a1 -> a3 TCP 22: a3's group allows only ssh.
        let k = ip_key(10, "fa:16:3e:00:0a:01", "fa:16:3e:00:0a:03", "10.0.0.11", "10.0.0.13", proto::TCP, 40000, 22);
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert!(acts.contains(&DpAction::Output(11)), "{acts:?}");
        // TCP 80 is dropped by a3's ingress group.
        let k = ip_key(10, "fa:16:3e:00:0a:01", "fa:16:3e:00:0a:03", "10.0.0.11", "10.0.0.13", proto::TCP, 40000, 80);
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert_eq!(acts.last(), Some(&DpAction::Drop("ingress security group")), "{acts:?}");
        // But an established reply always passes.
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::ESTABLISHED);
        assert!(acts.contains(&DpAction::Output(11)), "{acts:?}");
    }

    #[test]
    fn spoofed_sources_are_dropped() {
        let mut c = Compiler::new();
        let p = c.compile(&model(), &h1(), &Neighbors::new()).unwrap();
        let mut rt = RecircTable::default();
        let k = ip_key(10, "fa:16:3e:00:0a:01", "fa:16:3e:00:0a:03", "10.0.0.99", "10.0.0.13", proto::TCP, 1, 22);
        assert_eq!(run(&p, &mut rt, k, 0), vec![DpAction::Drop("port security (spoofed source)")]);
        let k = ip_key(10, "fa:16:3e:00:0a:99", "fa:16:3e:00:0a:03", "10.0.0.11", "10.0.0.13", proto::TCP, 1, 22);
        assert_eq!(run(&p, &mut rt, k, 0), vec![DpAction::Drop("port security (spoofed source)")]);
        // a3's allowed address pair may be used.
        let k = ip_key(11, "fa:16:3e:00:0a:03", "fa:16:3e:00:0a:01", "10.0.0.100", "10.0.0.11", proto::TCP, 1000, 22);
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert!(acts.contains(&DpAction::Output(10)), "{acts:?}");
    }

    #[test]
    fn cross_host_goes_over_vxlan_and_tenants_stay_apart() {
        let mut c = Compiler::new();
        let p = c.compile(&model(), &h1(), &Neighbors::new()).unwrap();
        let mut rt = RecircTable::default();
        let k = ip_key(10, "fa:16:3e:00:0a:01", "fa:16:3e:00:0a:02", "10.0.0.11", "10.0.0.12", proto::ICMP, 8, 0);
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert!(acts.contains(&DpAction::Tunnel { port: 1, vni: 1001, remote: "192.0.2.2".parse().unwrap() }), "{acts:?}");
        // b1 (tenant b, same addresses) to a2's MAC: not on b's network.
        let k = ip_key(12, "fa:16:3e:00:0b:01", "fa:16:3e:00:0a:02", "10.0.0.11", "10.0.0.12", proto::ICMP, 8, 0);
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert_eq!(acts.last(), Some(&DpAction::Drop("unknown destination MAC")), "{acts:?}");
        // From the tunnel with b's VNI to a1's MAC: dropped too.
        let mut k = ip_key(1, "fa:16:3e:00:0b:02", "fa:16:3e:00:0a:01", "10.0.0.12", "10.0.0.11", proto::ICMP, 8, 0);
        k.tun_id = 2001;
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert_eq!(acts.last(), Some(&DpAction::Drop("unknown destination MAC")), "{acts:?}");
    }

    #[test]
    fn routing_and_floating_ip() {
        let mut c = Compiler::new();
        let p = c.compile(&model(), &h1(), &Neighbors::new()).unwrap();
        let mut rt = RecircTable::default();
        // a1 (net-a, h1) -> a4 (net-a2, h2) through the router: routed here, tunnelled on a2's VNI.
        let k = ip_key(10, "fa:16:3e:00:0a:01", "fa:16:3e:ff:00:01", "10.0.0.11", "10.0.1.14", proto::TCP, 1000, 22);
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert!(acts.contains(&DpAction::SetEthDst("fa:16:3e:00:0a:04".parse().unwrap())), "{acts:?}");
        assert!(acts.contains(&DpAction::Tunnel { port: 1, vni: 1002, remote: "192.0.2.2".parse().unwrap() }), "{acts:?}");
        // a1 to the outside leaves with its floating IP, asking ARP for the next hop first.
        let k = ip_key(10, "fa:16:3e:00:0a:01", "fa:16:3e:ff:00:01", "10.0.0.11", "203.0.113.100", proto::TCP, 1000, 80);
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert!(acts.contains(&DpAction::SetIpSrc(ip_bytes("203.0.113.50".parse().unwrap()))), "{acts:?}");
        assert!(matches!(acts.last(), Some(DpAction::ArpResolve { port: 2, target: [203, 0, 113, 100], .. })), "{acts:?}");
        // With the neighbour learned, it goes out of the uplink.
        let mut learned = Neighbors::new();
        learned.insert((c.ids.network("ext").unwrap(), "203.0.113.100".parse().unwrap()), "02:00:00:00:00:64".parse().unwrap());
        let p = c.compile(&model(), &h1(), &learned).unwrap();
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert_eq!(acts.last(), Some(&DpAction::Output(2)), "{acts:?}");
        // a3 has no floating IP: sent to the gateway host h2 unchanged.
        let k = ip_key(11, "fa:16:3e:00:0a:03", "fa:16:3e:ff:00:01", "10.0.0.13", "203.0.113.100", proto::TCP, 1000, 80);
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert_eq!(acts.last(), Some(&DpAction::Tunnel { port: 1, vni: 1001, remote: "192.0.2.2".parse().unwrap() }), "{acts:?}");
        // Inbound to the floating IP reaches a1.
        let mut k = ip_key(2, "02:00:00:00:00:64", "02:f1:cb:00:71:32", "203.0.113.100", "203.0.113.50", proto::TCP, 5555, 22);
        k.in_port = 2;
        let acts = run(&p, &mut rt, k, ct_state::TRACKED | ct_state::NEW);
        assert!(acts.contains(&DpAction::SetIpDst(ip_bytes("10.0.0.11".parse().unwrap()))), "{acts:?}");
        assert_eq!(acts.last(), Some(&DpAction::Output(10)), "{acts:?}");
    }

    #[test]
    fn ids_are_stable_and_unchanged_models_compile_identically() {
        let mut c = Compiler::new();
        let a = c.compile(&model(), &h1(), &Neighbors::new()).unwrap();
        let b = c.compile(&model(), &h1(), &Neighbors::new()).unwrap();
        assert_eq!(a.rules(), b.rules());
        let mut bad = HostConfig { name: "h9".into(), ..h1() };
        assert!(matches!(c.compile(&model(), &bad, &Neighbors::new()), Err(CompileError::UnknownHost(_))));
        bad.name = "h2".into();
        assert!(matches!(c.compile(&model(), &bad, &Neighbors::new()), Err(CompileError::PortNotBoundHere { .. })));
    }
}
