//! The logical network model: networks, subnets, ports, routers, floating IPs
//! and security groups, in the shape Neutron gives them, with validation.
//!
//! The coordinator's Neutron API produces a [`Model`]; every agent compiles the
//! part its own ports need (see [`crate::compiler`]). [`Model::validate`] is the
//! gate: a model that fails it is never compiled, so the running pipeline stays.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;

/// The whole logical model one agent sees.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Hosts and their underlay (tunnel endpoint) addresses.
    #[serde(default)]
    pub hosts: Vec<Host>,
    /// Layer-2 networks.
    #[serde(default)]
    pub networks: Vec<Network>,
    /// IP subnets on the networks.
    #[serde(default)]
    pub subnets: Vec<Subnet>,
    /// Ports (VM interfaces and other endpoints).
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Logical routers.
    #[serde(default)]
    pub routers: Vec<Router>,
    /// Floating IPs.
    #[serde(default)]
    pub floating_ips: Vec<FloatingIp>,
    /// Security groups with their rules.
    #[serde(default)]
    pub security_groups: Vec<SecurityGroup>,
}

/// A host that runs a datapath.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// The host's name, as ports' `binding_host` names it.
    pub name: String,
    /// The host's underlay address, the VXLAN tunnel endpoint.
    pub tunnel_ip: IpAddr,
}

/// How a network's frames are carried between hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Segment {
    /// An overlay: VXLAN over the underlay with this VNI.
    Vxlan {
        /// The VXLAN network identifier (24 bits).
        vni: u32,
    },
    /// A VLAN on a physical network (an uplink interface on each host).
    Vlan {
        /// The physical network name, mapped to an interface per host.
        physical_network: String,
        /// The 802.1Q VLAN id (1..4094).
        vlan_id: u16,
    },
    /// Untagged on a physical network.
    Flat {
        /// The physical network name, mapped to an interface per host.
        physical_network: String,
    },
}

/// A layer-2 network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Unique id.
    pub id: String,
    /// Human name.
    #[serde(default)]
    pub name: String,
    /// The owning project.
    #[serde(default)]
    pub project_id: String,
    /// How the network is carried.
    pub segment: Segment,
    /// The MTU offered to ports (by DHCP); 68..=9000.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Whether this is an external (provider) network that routers use as gateway.
    #[serde(default)]
    pub external: bool,
    /// Default port security for ports of this network.
    #[serde(default = "yes")]
    pub port_security_enabled: bool,
}

fn default_mtu() -> u32 {
    1450
}

fn yes() -> bool {
    true
}

/// A static route handed to a subnet's hosts by DHCP, or set on a router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Destination prefix.
    pub destination: IpNet,
    /// Next hop address.
    pub nexthop: IpAddr,
}

/// IPv6 address configuration mode of a subnet (Neutron's `ipv6_address_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ipv6Mode {
    /// Stateless address autoconfiguration from router advertisements.
    Slaac,
    /// Addresses by DHCPv6.
    Dhcpv6Stateful,
    /// SLAAC addresses, other options by DHCPv6.
    Dhcpv6Stateless,
}

/// An IP subnet on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subnet {
    /// Unique id.
    pub id: String,
    /// The network it belongs to.
    pub network_id: String,
    /// The prefix; host bits must be zero.
    pub cidr: IpNet,
    /// The gateway address (the router interface), if any.
    #[serde(default)]
    pub gateway_ip: Option<IpAddr>,
    /// Whether this host's datapath answers DHCP for ports on the subnet.
    #[serde(default = "yes")]
    pub enable_dhcp: bool,
    /// DNS servers handed out by DHCP.
    #[serde(default)]
    pub dns_nameservers: Vec<IpAddr>,
    /// Extra routes handed out by DHCP.
    #[serde(default)]
    pub host_routes: Vec<Route>,
    /// IPv6 address mode (IPv6 subnets only).
    #[serde(default)]
    pub ipv6_address_mode: Option<Ipv6Mode>,
}

/// An address a port holds on one of its network's subnets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedIp {
    /// The subnet the address is on.
    pub subnet_id: String,
    /// The address.
    pub ip_address: IpAddr,
}

/// An extra source address (and optionally MAC) a port may use, e.g. a VRRP address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressPair {
    /// An address or prefix.
    pub ip_address: IpNet,
    /// The MAC it may be sent from; the port's own MAC when absent.
    #[serde(default)]
    pub mac_address: Option<MacAddr>,
}

/// A port: one endpoint (VM interface, service) on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// Unique id.
    pub id: String,
    /// The network it is on.
    pub network_id: String,
    /// Its MAC address.
    pub mac_address: MacAddr,
    /// Its addresses.
    #[serde(default)]
    pub fixed_ips: Vec<FixedIp>,
    /// Extra addresses it may send from.
    #[serde(default)]
    pub allowed_address_pairs: Vec<AddressPair>,
    /// Anti-spoofing and security groups on or off; the network's default when absent.
    #[serde(default)]
    pub port_security_enabled: Option<bool>,
    /// Security groups applied to the port.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// The host the port is bound to (Neutron's `binding:host_id`).
    #[serde(default)]
    pub binding_host: Option<String>,
    /// Whether the port passes traffic.
    #[serde(default = "yes")]
    pub admin_state_up: bool,
}

/// A router's leg on one subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterInterface {
    /// The subnet.
    pub subnet_id: String,
    /// The router's address on it (usually the subnet's gateway).
    pub ip_address: IpAddr,
    /// The router's MAC on that network.
    pub mac_address: MacAddr,
}

/// A router's leg on an external network, with the host that does its SNAT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalGateway {
    /// The external network.
    pub network_id: String,
    /// The router's address on the external network (the SNAT address).
    pub ip_address: IpAddr,
    /// The router's MAC on the external network.
    pub mac_address: MacAddr,
    /// The upstream router on the external network, for the default route.
    #[serde(default)]
    pub nexthop: Option<IpAddr>,
    /// The host that does SNAT for ports without a floating IP.
    pub host: String,
    /// Whether ports without a floating IP get SNAT at all.
    #[serde(default = "yes")]
    pub enable_snat: bool,
}

/// A distributed logical router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Router {
    /// Unique id.
    pub id: String,
    /// Human name.
    #[serde(default)]
    pub name: String,
    /// Legs on internal subnets.
    #[serde(default)]
    pub interfaces: Vec<RouterInterface>,
    /// The leg on an external network.
    #[serde(default)]
    pub external_gateway: Option<ExternalGateway>,
    /// Static routes.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// A public address mapped 1:1 to a port's fixed address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatingIp {
    /// Unique id.
    pub id: String,
    /// The public address.
    pub floating_ip_address: IpAddr,
    /// The external network it is on.
    pub floating_network_id: String,
    /// The port it is associated with, if any.
    #[serde(default)]
    pub port_id: Option<String>,
    /// Which of the port's addresses; the first IPv4 one when absent.
    #[serde(default)]
    pub fixed_ip_address: Option<IpAddr>,
    /// The router that connects the port's subnet to the external network.
    #[serde(default)]
    pub router_id: Option<String>,
}

/// Traffic direction of a rule, seen from the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Into the port.
    Ingress,
    /// Out of the port.
    Egress,
}

/// Address family of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum EtherType {
    /// IPv4.
    #[default]
    IPv4,
    /// IPv6.
    IPv6,
}

/// The protocol a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP (1).
    Icmp,
    /// ICMPv6 (58).
    #[serde(alias = "ipv6-icmp")]
    Icmpv6,
    /// Any other IP protocol by number.
    #[serde(untagged)]
    Number(u8),
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(&self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
            Protocol::Icmpv6 => 58,
            Protocol::Number(n) => *n,
        }
    }
}

/// One security group rule. Rules only allow; anything not allowed is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupRule {
    /// Unique id.
    #[serde(default)]
    pub id: String,
    /// Direction.
    pub direction: Direction,
    /// Address family.
    #[serde(default)]
    pub ethertype: EtherType,
    /// Protocol; any when absent.
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// Lowest port (TCP/UDP) or ICMP type.
    #[serde(default)]
    pub port_range_min: Option<u16>,
    /// Highest port (TCP/UDP) or ICMP code.
    #[serde(default)]
    pub port_range_max: Option<u16>,
    /// Remote addresses allowed.
    #[serde(default)]
    pub remote_ip_prefix: Option<IpNet>,
    /// Remote group: the addresses of that group's ports.
    #[serde(default)]
    pub remote_group_id: Option<String>,
}

/// A named set of allow rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroup {
    /// Unique id.
    pub id: String,
    /// Human name.
    #[serde(default)]
    pub name: String,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<SecurityGroupRule>,
}

/// Why a model was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// The text was not a model.
    #[error("Model is not valid JSON for the schema: {0}")]
    Parse(String),
    /// Two objects of one kind share an id.
    #[error("Duplicate {kind} id '{id}'")]
    DuplicateId {
        /// Object kind.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// A reference names an object that does not exist.
    #[error("{kind} '{id}' refers to unknown {target_kind} '{target}'")]
    UnknownReference {
        /// Referring kind.
        kind: &'static str,
        /// Referring id.
        id: String,
        /// Referred kind.
        target_kind: &'static str,
        /// Referred id.
        target: String,
    },
    /// A subnet CIDR has host bits set.
    #[error("Subnet '{subnet}' has a bad CIDR {cidr}: host bits are set (did you mean {suggested}?)")]
    BadCidr {
        /// Subnet id.
        subnet: String,
        /// The CIDR given.
        cidr: String,
        /// The network address.
        suggested: String,
    },
    /// Two subnets on one network overlap.
    #[error("Subnets '{a}' ({a_cidr}) and '{b}' ({b_cidr}) overlap on network '{network}'")]
    OverlappingSubnets {
        /// Network id.
        network: String,
        /// First subnet.
        a: String,
        /// Its CIDR.
        a_cidr: String,
        /// Second subnet.
        b: String,
        /// Its CIDR.
        b_cidr: String,
    },
    /// An address lies outside the subnet it is claimed on.
    #[error("{kind} '{id}': address {ip} is not inside subnet '{subnet}' ({cidr})")]
    AddressOutsideSubnet {
        /// Object kind.
        kind: &'static str,
        /// Object id.
        id: String,
        /// The address.
        ip: IpAddr,
        /// The subnet.
        subnet: String,
        /// Its CIDR.
        cidr: String,
    },
    /// A port's fixed IP is on a subnet of another network.
    #[error("Port '{port}' has an address on subnet '{subnet}', which is not on the port's network '{network}'")]
    SubnetNotOnNetwork {
        /// Port id.
        port: String,
        /// Subnet id.
        subnet: String,
        /// The port's network.
        network: String,
    },
    /// An address is used twice on one network.
    #[error("Address {ip} is used twice on network '{network}' ('{first}' and '{second}')")]
    DuplicateAddress {
        /// Network id.
        network: String,
        /// The address.
        ip: IpAddr,
        /// First user.
        first: String,
        /// Second user.
        second: String,
    },
    /// A MAC is used twice on one network.
    #[error("MAC {mac} is used twice on network '{network}' ('{first}' and '{second}')")]
    DuplicateMac {
        /// Network id.
        network: String,
        /// The MAC.
        mac: MacAddr,
        /// First user.
        first: String,
        /// Second user.
        second: String,
    },
    /// A segment id is out of range or reused.
    #[error("Network '{network}': {reason}")]
    BadSegment {
        /// Network id.
        network: String,
        /// What is wrong.
        reason: String,
    },
    /// The MTU is out of range.
    #[error("Network '{network}' has MTU {mtu}; it must be between 68 and 9000")]
    BadMtu {
        /// Network id.
        network: String,
        /// The MTU.
        mtu: u32,
    },
    /// A unicast MAC was expected.
    #[error("{kind} '{id}' has a multicast or zero MAC {mac}")]
    BadMac {
        /// Object kind.
        kind: &'static str,
        /// Object id.
        id: String,
        /// The MAC.
        mac: MacAddr,
    },
    /// Mixed address families where one is required.
    #[error("{kind} '{id}': {reason}")]
    Invalid {
        /// Object kind.
        kind: &'static str,
        /// Object id.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

impl Model {
    /// Parses a model from JSON text and validates it.
    pub fn from_json(text: &str) -> Result<Model, ModelError> {
        let model: Model = serde_json::from_str(text).map_err(|e| ModelError::Parse(e.to_string()))?;
        model.validate()?;
        Ok(model)
    }

    /// Checks references, CIDRs, overlaps, addresses and segments; the first problem wins.
    pub fn validate(&self) -> Result<(), ModelError> {
        let hosts = unique_ids("host", self.hosts.iter().map(|h| h.name.as_str()))?;
        unique_ids("network", self.networks.iter().map(|n| n.id.as_str()))?;
        let networks: HashMap<&str, &Network> = self.networks.iter().map(|n| (n.id.as_str(), n)).collect();
        unique_ids("subnet", self.subnets.iter().map(|s| s.id.as_str()))?;
        unique_ids("port", self.ports.iter().map(|p| p.id.as_str()))?;
        unique_ids("router", self.routers.iter().map(|r| r.id.as_str()))?;
        unique_ids("floating IP", self.floating_ips.iter().map(|f| f.id.as_str()))?;
        let groups = unique_ids("security group", self.security_groups.iter().map(|g| g.id.as_str()))?;

        self.validate_networks()?;
        let subnets = self.validate_subnets(&networks)?;
        let mut used_ips: HashMap<(String, IpAddr), String> = HashMap::new();
        let mut used_macs: HashMap<(String, MacAddr), String> = HashMap::new();
        for p in &self.ports {
            if !networks.contains_key(p.network_id.as_str()) {
                return Err(unknown("port", &p.id, "network", &p.network_id));
            }
            if p.mac_address.is_multicast() || p.mac_address == MacAddr::ZERO {
                return Err(ModelError::BadMac { kind: "port", id: p.id.clone(), mac: p.mac_address });
            }
            if let Some(first) = used_macs.insert((p.network_id.clone(), p.mac_address), p.id.clone()) {
                return Err(ModelError::DuplicateMac { network: p.network_id.clone(), mac: p.mac_address, first, second: p.id.clone() });
            }
            for f in &p.fixed_ips {
                let s = subnets.get(f.subnet_id.as_str()).ok_or_else(|| unknown("port", &p.id, "subnet", &f.subnet_id))?;
                if s.network_id != p.network_id {
                    return Err(ModelError::SubnetNotOnNetwork { port: p.id.clone(), subnet: s.id.clone(), network: p.network_id.clone() });
                }
                check_inside("port", &p.id, f.ip_address, s)?;
                if let Some(first) = used_ips.insert((p.network_id.clone(), f.ip_address), p.id.clone()) {
                    return Err(ModelError::DuplicateAddress { network: p.network_id.clone(), ip: f.ip_address, first, second: p.id.clone() });
                }
            }
            for g in &p.security_groups {
                if !groups.contains(g.as_str()) {
                    return Err(unknown("port", &p.id, "security group", g));
                }
            }
            if let Some(h) = &p.binding_host {
                if !hosts.contains(h.as_str()) {
                    return Err(unknown("port", &p.id, "host", h));
                }
            }
        }
        for r in &self.routers {
            let mut seen_subnets = HashSet::new();
            for i in &r.interfaces {
                let s = subnets.get(i.subnet_id.as_str()).ok_or_else(|| unknown("router", &r.id, "subnet", &i.subnet_id))?;
                if !seen_subnets.insert(i.subnet_id.as_str()) {
                    return Err(invalid("router", &r.id, format!("has two interfaces on subnet '{}'", i.subnet_id)));
                }
                check_inside("router", &r.id, i.ip_address, s)?;
                if i.mac_address.is_multicast() || i.mac_address == MacAddr::ZERO {
                    return Err(ModelError::BadMac { kind: "router", id: r.id.clone(), mac: i.mac_address });
                }
                if let Some(first) = used_ips.insert((s.network_id.clone(), i.ip_address), r.id.clone()) {
                    if first != r.id {
                        return Err(ModelError::DuplicateAddress { network: s.network_id.clone(), ip: i.ip_address, first, second: r.id.clone() });
                    }
                }
            }
            if let Some(g) = &r.external_gateway {
                let n = networks.get(g.network_id.as_str()).ok_or_else(|| unknown("router", &r.id, "network", &g.network_id))?;
                if !n.external {
                    return Err(invalid("router", &r.id, format!("gateway network '{}' is not external", g.network_id)));
                }
                if !hosts.contains(g.host.as_str()) {
                    return Err(unknown("router", &r.id, "host", &g.host));
                }
                let on_subnet = self.subnets.iter().find(|s| s.network_id == g.network_id && s.cidr.contains(&g.ip_address));
                if on_subnet.is_none() {
                    return Err(invalid("router", &r.id, format!("gateway address {} is on no subnet of network '{}'", g.ip_address, g.network_id)));
                }
                if let Some(first) = used_ips.insert((g.network_id.clone(), g.ip_address), r.id.clone()) {
                    return Err(ModelError::DuplicateAddress { network: g.network_id.clone(), ip: g.ip_address, first, second: r.id.clone() });
                }
            }
            for route in &r.routes {
                if route.destination.addr().is_ipv4() != route.nexthop.is_ipv4() {
                    return Err(invalid("router", &r.id, format!("route to {} has a nexthop of the other family", route.destination)));
                }
            }
        }
        let ports: HashMap<&str, &Port> = self.ports.iter().map(|p| (p.id.as_str(), p)).collect();
        let routers: HashMap<&str, &Router> = self.routers.iter().map(|r| (r.id.as_str(), r)).collect();
        for f in &self.floating_ips {
            let n = networks.get(f.floating_network_id.as_str()).ok_or_else(|| unknown("floating IP", &f.id, "network", &f.floating_network_id))?;
            if !n.external {
                return Err(invalid("floating IP", &f.id, format!("network '{}' is not external", n.id)));
            }
            if !f.floating_ip_address.is_ipv4() {
                return Err(invalid("floating IP", &f.id, "floating IPs are IPv4".into()));
            }
            if let Some(first) = used_ips.insert((f.floating_network_id.clone(), f.floating_ip_address), f.id.clone()) {
                return Err(ModelError::DuplicateAddress { network: f.floating_network_id.clone(), ip: f.floating_ip_address, first, second: f.id.clone() });
            }
            if let Some(pid) = &f.port_id {
                let p = ports.get(pid.as_str()).ok_or_else(|| unknown("floating IP", &f.id, "port", pid))?;
                if let Some(fixed) = f.fixed_ip_address {
                    if !p.fixed_ips.iter().any(|x| x.ip_address == fixed) {
                        return Err(invalid("floating IP", &f.id, format!("port '{pid}' has no address {fixed}")));
                    }
                } else if !p.fixed_ips.iter().any(|x| x.ip_address.is_ipv4()) {
                    return Err(invalid("floating IP", &f.id, format!("port '{pid}' has no IPv4 address")));
                }
                let rid = f.router_id.as_ref().ok_or_else(|| invalid("floating IP", &f.id, "is associated with a port but names no router".into()))?;
                let r = routers.get(rid.as_str()).ok_or_else(|| unknown("floating IP", &f.id, "router", rid))?;
                if r.external_gateway.as_ref().map(|g| g.network_id.as_str()) != Some(f.floating_network_id.as_str()) {
                    return Err(invalid("floating IP", &f.id, format!("router '{rid}' has no gateway on network '{}'", f.floating_network_id)));
                }
            } else if let Some(rid) = &f.router_id {
                if !routers.contains_key(rid.as_str()) {
                    return Err(unknown("floating IP", &f.id, "router", rid));
                }
            }
        }
        for g in &self.security_groups {
            for rule in &g.rules {
                if let Some(rg) = &rule.remote_group_id {
                    if !groups.contains(rg.as_str()) {
                        return Err(unknown("security group", &g.id, "security group", rg));
                    }
                    if rule.remote_ip_prefix.is_some() {
                        return Err(invalid("security group", &g.id, "a rule has both a remote prefix and a remote group".into()));
                    }
                }
                if let Some(prefix) = rule.remote_ip_prefix {
                    if prefix.addr().is_ipv4() != (rule.ethertype == EtherType::IPv4) {
                        return Err(invalid("security group", &g.id, format!("rule remote prefix {prefix} does not match its ethertype")));
                    }
                }
                match (rule.port_range_min, rule.port_range_max) {
                    (Some(lo), Some(hi)) if matches!(rule.protocol, Some(Protocol::Tcp | Protocol::Udp)) && lo > hi => {
                        return Err(invalid("security group", &g.id, format!("rule port range {lo}-{hi} is empty")));
                    }
                    (Some(_), _) | (_, Some(_)) if !matches!(rule.protocol, Some(Protocol::Tcp | Protocol::Udp | Protocol::Icmp | Protocol::Icmpv6)) => {
                        return Err(invalid("security group", &g.id, "a port range needs protocol tcp, udp, icmp or icmpv6".into()));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn validate_networks(&self) -> Result<(), ModelError> {
        let mut vnis = HashMap::new();
        let mut vlans = HashMap::new();
        for n in &self.networks {
            if !(68..=9000).contains(&n.mtu) {
                return Err(ModelError::BadMtu { network: n.id.clone(), mtu: n.mtu });
            }
            match &n.segment {
                Segment::Vxlan { vni } => {
                    if *vni == 0 || *vni >= 1 << 24 {
                        return Err(ModelError::BadSegment { network: n.id.clone(), reason: format!("VNI {vni} is outside 1..16777215") });
                    }
                    if let Some(other) = vnis.insert(*vni, n.id.clone()) {
                        return Err(ModelError::BadSegment { network: n.id.clone(), reason: format!("VNI {vni} is already used by network '{other}'") });
                    }
                }
                Segment::Vlan { physical_network, vlan_id } => {
                    if *vlan_id == 0 || *vlan_id > 4094 {
                        return Err(ModelError::BadSegment { network: n.id.clone(), reason: format!("VLAN {vlan_id} is outside 1..4094") });
                    }
                    if let Some(other) = vlans.insert((physical_network.clone(), Some(*vlan_id)), n.id.clone()) {
                        return Err(ModelError::BadSegment { network: n.id.clone(), reason: format!("VLAN {vlan_id} on '{physical_network}' is already used by network '{other}'") });
                    }
                }
                Segment::Flat { physical_network } => {
                    if let Some(other) = vlans.insert((physical_network.clone(), None), n.id.clone()) {
                        return Err(ModelError::BadSegment { network: n.id.clone(), reason: format!("physical network '{physical_network}' already carries flat network '{other}'") });
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_subnets<'a>(&'a self, networks: &HashMap<&str, &Network>) -> Result<HashMap<&'a str, &'a Subnet>, ModelError> {
        let mut by_id = HashMap::new();
        let mut by_network: HashMap<&str, Vec<&Subnet>> = HashMap::new();
        for s in &self.subnets {
            if !networks.contains_key(s.network_id.as_str()) {
                return Err(unknown("subnet", &s.id, "network", &s.network_id));
            }
            if s.cidr.trunc() != s.cidr {
                return Err(ModelError::BadCidr { subnet: s.id.clone(), cidr: s.cidr.to_string(), suggested: s.cidr.trunc().to_string() });
            }
            let max = if s.cidr.addr().is_ipv4() { 30 } else { 126 };
            if s.cidr.prefix_len() > max {
                return Err(ModelError::BadCidr { subnet: s.id.clone(), cidr: s.cidr.to_string(), suggested: format!("a prefix of /{max} or shorter") });
            }
            if let Some(gw) = s.gateway_ip {
                check_inside("subnet", &s.id, gw, s)?;
            }
            for r in &s.host_routes {
                if r.destination.addr().is_ipv4() != s.cidr.addr().is_ipv4() || r.nexthop.is_ipv4() != s.cidr.addr().is_ipv4() {
                    return Err(invalid("subnet", &s.id, format!("host route to {} is of the other address family", r.destination)));
                }
            }
            if s.ipv6_address_mode.is_some() && s.cidr.addr().is_ipv4() {
                return Err(invalid("subnet", &s.id, "an IPv4 subnet has an IPv6 address mode".into()));
            }
            let list = by_network.entry(s.network_id.as_str()).or_default();
            for other in list.iter() {
                if other.cidr.contains(&s.cidr.network()) || s.cidr.contains(&other.cidr.network()) {
                    return Err(ModelError::OverlappingSubnets {
                        network: s.network_id.clone(),
                        a: other.id.clone(),
                        a_cidr: other.cidr.to_string(),
                        b: s.id.clone(),
                        b_cidr: s.cidr.to_string(),
                    });
                }
            }
            list.push(s);
            by_id.insert(s.id.as_str(), s);
        }
        Ok(by_id)
    }

    /// The network with this id.
    pub fn network(&self, id: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.id == id)
    }

    /// The subnet with this id.
    pub fn subnet(&self, id: &str) -> Option<&Subnet> {
        self.subnets.iter().find(|s| s.id == id)
    }

    /// The port with this id.
    pub fn port(&self, id: &str) -> Option<&Port> {
        self.ports.iter().find(|p| p.id == id)
    }

    /// The host with this name.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

impl Port {
    /// Whether anti-spoofing and security groups apply, given the port's network.
    pub fn security_enabled(&self, network: &Network) -> bool {
        self.port_security_enabled.unwrap_or(network.port_security_enabled)
    }
}

fn unique_ids<'a>(kind: &'static str, ids: impl Iterator<Item = &'a str>) -> Result<HashSet<&'a str>, ModelError> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(ModelError::DuplicateId { kind, id: id.to_string() });
        }
    }
    Ok(seen)
}

fn unknown(kind: &'static str, id: &str, target_kind: &'static str, target: &str) -> ModelError {
    ModelError::UnknownReference { kind, id: id.to_string(), target_kind, target: target.to_string() }
}

fn invalid(kind: &'static str, id: &str, reason: String) -> ModelError {
    ModelError::Invalid { kind, id: id.to_string(), reason }
}

fn check_inside(kind: &'static str, id: &str, ip: IpAddr, s: &Subnet) -> Result<(), ModelError> {
    if !s.cidr.contains(&ip) {
        return Err(ModelError::AddressOutsideSubnet { kind, id: id.to_string(), ip, subnet: s.id.clone(), cidr: s.cidr.to_string() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> String {
        let path = format!("{}/tests/models/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    #[test]
    fn two_tenant_model_is_valid_and_round_trips() {
        let m = Model::from_json(&file("two_tenants.json")).expect("valid model");
        assert_eq!(m.networks.len(), 4);
        assert_eq!(m.port("a3").unwrap().allowed_address_pairs[0].ip_address.to_string(), "10.0.0.100/32");
        assert_eq!(m.network("net-a").unwrap().segment, Segment::Vxlan { vni: 1001 });
        assert_eq!(m.network("net-a2").unwrap().mtu, 1450, "default MTU");
        assert!(!m.port("b2").unwrap().security_enabled(m.network("net-b").unwrap()));
        let again = Model::from_json(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn overlapping_subnets_are_rejected() {
        let e = Model::from_json(&file("overlapping_subnets.json")).unwrap_err();
        assert!(matches!(e, ModelError::OverlappingSubnets { .. }), "{e:?}");
        assert_eq!(e.to_string(), "Subnets 's1' (10.1.0.0/16) and 's2' (10.1.4.0/24) overlap on network 'n1'");
    }

    #[test]
    fn unknown_reference_is_rejected() {
        let e = Model::from_json(&file("unknown_reference.json")).unwrap_err();
        assert_eq!(e.to_string(), "port 'p1' refers to unknown security group 'nope'");
    }

    #[test]
    fn bad_cidrs_are_rejected() {
        let e = Model::from_json(&file("bad_cidr.json")).unwrap_err();
        assert!(matches!(e, ModelError::Parse(ref m) if m.contains("invalid IP")), "{e}");
        let e = Model::from_json(&file("host_bits_cidr.json")).unwrap_err();
        assert_eq!(e.to_string(), "Subnet 's1' has a bad CIDR 10.1.2.3/16: host bits are set (did you mean 10.1.0.0/16?)");
    }

    #[test]
    fn overlapping_subnets_on_different_networks_are_fine() {
        // Two tenants may both use 10.0.0.0/24 (the two-tenant model does).
        let m = Model::from_json(&file("two_tenants.json")).unwrap();
        assert_eq!(m.subnet("sub-a").unwrap().cidr, m.subnet("sub-b").unwrap().cidr);
    }

    #[test]
    fn other_mistakes_get_clear_errors() {
        let base = Model::from_json(&file("two_tenants.json")).unwrap();
        let mut m = base.clone();
        m.ports[0].fixed_ips[0].ip_address = "10.9.9.9".parse().unwrap();
        assert_eq!(m.validate().unwrap_err().to_string(), "port 'a1': address 10.9.9.9 is not inside subnet 'sub-a' (10.0.0.0/24)");
        let mut m = base.clone();
        m.ports[1].fixed_ips[0].ip_address = "10.0.0.11".parse().unwrap();
        assert!(matches!(m.validate().unwrap_err(), ModelError::DuplicateAddress { .. }));
        let mut m = base.clone();
        m.networks[1].segment = Segment::Vxlan { vni: 1001 };
        assert_eq!(m.validate().unwrap_err().to_string(), "Network 'net-a2': VNI 1001 is already used by network 'net-a'");
        let mut m = base.clone();
        m.ports[0].binding_host = Some("h9".into());
        assert_eq!(m.validate().unwrap_err().to_string(), "port 'a1' refers to unknown host 'h9'");
        let mut m = base.clone();
        m.floating_ips[0].floating_network_id = "net-a".into();
        assert_eq!(m.validate().unwrap_err().to_string(), "floating IP 'fip-a1': network 'net-a' is not external");
        let mut m = base.clone();
        m.networks[0].mtu = 20;
        assert!(matches!(m.validate().unwrap_err(), ModelError::BadMtu { .. }));
        let e = Model::from_json(r#"{"networks": [{"id": "n", "segment": {"type": "vxlan", "vni": 1}}], "bogus": 1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
        let e = Model::from_json(r#"{"ports": [{"id": "p", "network_id": "n", "mac_address": "fa:16"}]}"#).unwrap_err();
        assert!(e.to_string().contains("Bad MAC address 'fa:16'"), "{e}");
    }
}
