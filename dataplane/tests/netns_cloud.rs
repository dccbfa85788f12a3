//! Real traffic through the datapath in network namespaces: TCP and security
//! groups, rule removal on live connections, east-west routing, floating IPs
//! and gateway SNAT to an outside network, IPv6, flooding, metadata and
//! internal tap ports. Three hosts: h1 and h2 carry endpoints, h3 is the
//! router's gateway host and has no endpoints.

mod netns_lab;

use std::sync::Arc;

use dataplane::metadata::StaticMetadata;
use dataplane::model::{Direction, Protocol, SecurityGroupRule};
use netns_lab::{connect, drain, model, ping, sh, udp, Cloud, Server, Spec, OUTSIDE_IP};

fn tcp_rule(port: u16) -> SecurityGroupRule {
    SecurityGroupRule {
        id: format!("tcp-{port}"),
        direction: Direction::Ingress,
        ethertype: Default::default(),
        protocol: Some(Protocol::Tcp),
        port_range_min: Some(port),
        port_range_max: Some(port),
        remote_ip_prefix: None,
        remote_group_id: None,
    }
}

#[test]
fn tcp_and_a_group_that_allows_only_ssh() {
    require_netns!("tcp_and_a_group_that_allows_only_ssh");
    let c = Cloud::new(model(), Spec::default());
    // a3 (h1) has the ssh-only group; a1 (h1) and a2 (h2) have the default group.
    let _ssh = Server::start(c.ep("a3"), "10.0.0.13:22");
    let _web = Server::start(c.ep("a3"), "10.0.0.13:80");
    let _a1 = Server::start(c.ep("a1"), "10.0.0.11:22");
    let _a2 = Server::start(c.ep("a2"), "10.0.0.12:8080");

    // TCP 22 comes in, on the same host and across hosts.
    let mut s = connect(c.ep("a1"), "10.0.0.13:22", 5).expect("a1 -> a3:22 on h1");
    assert_eq!(s.seen_as, "10.0.0.11");
    assert_eq!(s.echo("hello", 3).unwrap(), "hello");
    let mut s = connect(c.ep("a2"), "10.0.0.13:22", 5).expect("a2 (h2) -> a3:22 over VXLAN");
    assert_eq!(s.echo("across", 3).unwrap(), "across");
    // Nothing else does: TCP 80 is silently dropped (a timeout, not a reset) ...
    let e = connect(c.ep("a1"), "10.0.0.13:80", 2).err().expect("a3 refuses TCP 80");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    // ... UDP does not arrive ...
    let rx = udp(c.ep("a3"), "10.0.0.13:5353");
    let tx = udp(c.ep("a1"), "10.0.0.11:0");
    for _ in 0..3 {
        tx.send_to(b"dns?", "10.0.0.13:5353").unwrap();
    }
    assert!(drain(&rx, 1.0).is_empty(), "UDP must not reach a3");
    // ... nor ICMP.
    assert!(ping(c.ep("a1"), "10.0.0.13").is_err(), "ICMP must not reach a3");

    // Return traffic of a3's own connections always passes its ingress group.
    let mut out = connect(c.ep("a3"), "10.0.0.11:22", 5).expect("a3 -> a1:22: the SYN-ACK must come back in");
    assert_eq!(out.echo("back", 3).unwrap(), "back");
    ping(c.ep("a3"), "10.0.0.11").expect("a3 pings out, echo replies come back");

    // TCP between default-group endpoints across hosts, any port.
    let mut s = connect(c.ep("a1"), "10.0.0.12:8080", 5).expect("a1 -> a2:8080 across hosts");
    assert_eq!(s.echo(&"x".repeat(1000), 3).unwrap().len(), 1000);
    let drops = c.dp("h1").stats().drops;
    assert!(drops.iter().any(|(why, n)| why == "ingress security group" && *n > 0), "{drops:?}");
}

#[test]
fn removing_a_rule_cuts_only_the_connections_it_allowed() {
    require_netns!("removing_a_rule_cuts_only_the_connections_it_allowed");
    let mut m = model();
    m.security_groups[1].rules.push(tcp_rule(8022));
    let mut c = Cloud::new(m.clone(), Spec::default());
    let _ssh = Server::start(c.ep("a3"), "10.0.0.13:22");
    let _alt = Server::start(c.ep("a3"), "10.0.0.13:8022");
    let _a1 = Server::start(c.ep("a1"), "10.0.0.11:22");
    let mut to22 = connect(c.ep("a1"), "10.0.0.13:22", 5).expect("a1 -> a3:22");
    let mut to8022 = connect(c.ep("a2"), "10.0.0.13:8022", 5).expect("a2 -> a3:8022");
    let mut outgoing = connect(c.ep("a3"), "10.0.0.11:22", 5).expect("a3 -> a1:22");
    for s in [&mut to22, &mut to8022, &mut outgoing] {
        assert_eq!(s.echo("before", 3).unwrap(), "before");
    }
    // a3's ingress group committed the connection (mark 2) in a3's zone.
    let entry = format!("orig=({} -> 10.0.0.13:22)", to22.local);
    let ingress = |c: &Cloud| c.dp("h1").engine().connections().into_iter().filter(|l| l.contains(&entry) && l.contains(",mark=2,")).count();
    assert_eq!(ingress(&c), 1, "{:?}", c.dp("h1").engine().connections());

    // Take TCP 22 out of a3's group.
    m.security_groups[1].rules.retain(|r| r.port_range_min != Some(22));
    c.apply(m);
    assert!(to22.echo("after", 2).is_err(), "the established a1 -> a3:22 connection is cut");
    assert_eq!(to8022.echo("after", 3).unwrap(), "after", "a3:8022 is still allowed and keeps going");
    assert_eq!(outgoing.echo("after", 3).unwrap(), "after", "a3's own outgoing connection keeps going");
    assert!(connect(c.ep("a1"), "10.0.0.13:22", 2).is_err(), "new connections to 22 are refused");
    assert_eq!(ingress(&c), 0, "its conntrack entry was removed: {:?}", c.dp("h1").engine().connections());
}

#[test]
fn east_west_routing_across_hosts_without_the_gateway_host() {
    require_netns!("east_west_routing_across_hosts_without_the_gateway_host");
    let c = Cloud::new(model(), Spec::default());
    let _a4 = Server::start(c.ep("a4"), "10.0.1.14:7000");
    let gw_before = c.tunnel_rx("h3");
    // a1 (h1, 10.0.0.0/24) -> a4 (h2, 10.0.1.0/24): routed on h1, one hop.
    let out = ping(c.ep("a1"), "10.0.1.14").expect("a1 -> a4 through the distributed router");
    assert!(out.contains("ttl=63"), "routed once: {out}");
    let mut s = connect(c.ep("a1"), "10.0.1.14:7000", 5).expect("TCP a1 -> a4 across subnets and hosts");
    assert_eq!(s.seen_as, "10.0.0.11", "no NAT between subnets");
    assert_eq!(s.echo("routed", 3).unwrap(), "routed");
    // And back the other way, routed on h2.
    ping(c.ep("a4"), "10.0.0.11").expect("a4 -> a1");
    // The router's own address answers on both legs.
    ping(c.ep("a4"), "10.0.1.1").expect("router leg on sub-a2");
    assert_eq!(c.tunnel_rx("h3"), gw_before, "the gateway host h3 saw none of it");
    assert!(c.tunnel_rx("h2") > 0);
}

#[test]
fn floating_ip_and_gateway_snat_to_the_outside() {
    require_netns!("floating_ip_and_gateway_snat_to_the_outside");
    let c = Cloud::new(model(), Spec { external: true, ..Default::default() });
    let outside = c.outside.clone().unwrap();
    let _web = Server::start(&outside, &format!("{OUTSIDE_IP}:8080"));
    let _a1 = Server::start(c.ep("a1"), "10.0.0.11:22");

    // a1 has floating IP 203.0.113.50: its traffic leaves from h1 with it.
    let gw_before = c.tunnel_rx("h3");
    let mut s = connect(c.ep("a1"), &format!("{OUTSIDE_IP}:8080"), 8).expect("a1 -> outside");
    assert_eq!(s.seen_as, "203.0.113.50", "a1 leaves with its floating IP");
    assert_eq!(s.echo("fip", 3).unwrap(), "fip");
    assert_eq!(c.tunnel_rx("h3"), gw_before, "floating IP traffic does not touch the gateway host");
    // The floating IP is reachable from outside.
    ping(&outside, "203.0.113.50").expect("outside pings the floating IP");
    let mut s = connect(&outside, "203.0.113.50:22", 5).expect("outside -> floating IP:22");
    assert_eq!(s.seen_as, OUTSIDE_IP, "a1 sees the outside address");
    assert_eq!(s.echo("in", 3).unwrap(), "in");

    // a3 (h1) and a4 (h2) have none: SNAT to the router's address on gateway host h3.
    for (port, ns) in [("a3", c.ep("a3")), ("a4", c.ep("a4"))] {
        let mut s = connect(ns, &format!("{OUTSIDE_IP}:8080"), 8).unwrap_or_else(|e| panic!("{port} -> outside: {e}"));
        assert_eq!(s.seen_as, "203.0.113.10", "{port} leaves through the gateway's SNAT");
        assert_eq!(s.echo(port, 3).unwrap(), port);
    }
    assert!(c.tunnel_rx("h3") > gw_before, "SNAT traffic went through h3");
    ping(c.ep("a4"), OUTSIDE_IP).expect("ICMP through SNAT too");
    assert!(c.dp("h3").engine().connections().iter().any(|l| l.contains("203.0.113.10")), "{:?}", c.dp("h3").engine().connections());
    // The router's gateway address answers pings from outside (on h3).
    ping(&outside, "203.0.113.10").expect("router gateway address");
}

#[test]
fn ipv6_static_and_slaac() {
    require_netns!("ipv6_static_and_slaac");
    let mut m = model();
    // a2 takes its address by SLAAC: the model holds the EUI-64 address, as Neutron computes it.
    let a2 = m.ports.iter_mut().find(|p| p.id == "a2").unwrap();
    let slaac = a2.mac_address.eui64_in(&"fd00:a::".parse().unwrap());
    a2.fixed_ips[1].ip_address = slaac.into();
    let c = Cloud::new(m, Spec { slaac: vec!["a2"], ..Default::default() });
    let ns = c.ep("a2");
    sh(&["ip", "netns", "exec", ns, "sh", "-c", "echo 2 > /proc/sys/net/ipv6/conf/eth0/accept_ra; echo 1 > /proc/sys/net/ipv6/conf/eth0/autoconf; echo 0 > /proc/sys/net/ipv6/conf/eth0/dad_transmits"]).unwrap();
    // Link flap: router solicitations now that the datapath is attached.
    sh(&["ip", "-n", ns, "link", "set", "eth0", "down"]).unwrap();
    sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]).unwrap();
    let want = slaac.to_string();
    let mut got = String::new();
    for _ in 0..60 {
        got = sh(&["ip", "-n", ns, "-6", "addr", "show", "dev", "eth0"]).unwrap();
        if got.contains(&want) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(got.contains(&want), "a2 configured {want} from the router advertisement: {got}");
    // Static a1 (h1) <-> SLAAC a2 (h2) over VXLAN, neighbours answered from the model.
    ping(c.ep("a1"), &want).expect("ping6 a1 -> a2 (SLAAC)");
    ping(ns, "fd00:a::11").expect("ping6 a2 -> a1 (static)");
    ping(c.ep("a1"), "fd00:a::1").expect("the router answers on its IPv6 address");
    // a3 has no IPv6 rule in its group: a1's pings to its link-local address get nowhere.
    let a3_ll = c.model.port("a3").unwrap().mac_address.link_local_v6().to_string();
    assert!(ping(c.ep("a1"), &format!("{a3_ll}%eth0")).is_err(), "a3 allows only TCP 22 over IPv4");
}

#[test]
fn floods_honour_the_receiving_ports_group() {
    require_netns!("floods_honour_the_receiving_ports_group");
    let c = Cloud::new(model(), Spec::default());
    let to_a2 = udp(c.ep("a2"), "0.0.0.0:5000");
    let to_a3 = udp(c.ep("a3"), "0.0.0.0:5000");
    let to_b1 = udp(c.ep("b1"), "0.0.0.0:5000");
    let tx = udp(c.ep("a1"), "10.0.0.11:0");
    tx.set_broadcast(true).unwrap();
    for i in 0..5 {
        tx.send_to(format!("bcast {i}").as_bytes(), "255.255.255.255:5000").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (a2, a3, b1) = (drain(&to_a2, 1.5), drain(&to_a3, 0.3), drain(&to_b1, 0.3));
    assert!(a2.iter().any(|(m, _)| m.starts_with("bcast")), "a2 (default group lets a1 in) gets the broadcast");
    assert!(a3.is_empty(), "a3 (ssh only) must not get it: {a3:?}");
    assert!(b1.is_empty(), "tenant b must not get it: {b1:?}");
    // Multicast follows the same rule.
    let join = |ns: &str, port: &str| {
        let s = udp(ns, &format!("0.0.0.0:{port}"));
        s.join_multicast_v4(&"239.1.1.1".parse().unwrap(), &"0.0.0.0".parse().unwrap()).unwrap();
        s
    };
    let (m2, m3) = (join(c.ep("a2"), "5001"), join(c.ep("a3"), "5001"));
    tx.set_multicast_ttl_v4(4).unwrap();
    for _ in 0..5 {
        tx.send_to(b"mcast", "239.1.1.1:5001").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!drain(&m2, 1.5).is_empty(), "a2 gets the multicast");
    assert!(drain(&m3, 0.3).is_empty(), "a3 does not");
    let rules = c.dp("h1").rules(Some(dataplane::pipeline::table::FLOOD_SG));
    assert!(rules.iter().any(|r| r.note.contains("port a3")), "flood filter rules exist for a3");
}

#[test]
fn metadata_and_internal_tap_ports() {
    require_netns!("metadata_and_internal_tap_ports");
    // a1 and b1 (two tenants, both 10.0.0.11 on h1) are internal taps this time.
    let c = Cloud::new(model(), Spec { taps: vec!["a1", "b1"], ..Default::default() });
    ping(c.ep("a1"), "10.0.0.12").expect("a tap endpoint reaches a2 over VXLAN");
    ping(c.ep("b1"), "10.0.0.12").expect("and b1 reaches b2");
    let dir = std::env::temp_dir().join(format!("dp-meta-{}-{}", std::process::id(), c.lab.tag()));
    for (port, name) in [("a1", "vm-a1"), ("b1", "vm-b1")] {
        std::fs::create_dir_all(dir.join(port).join("latest/meta-data")).unwrap();
        std::fs::write(dir.join(port).join("latest/meta-data/hostname"), name).unwrap();
    }
    let _cleanup = RemoveDir(dir.clone());
    c.dp("h1").set_metadata_handler(Arc::new(StaticMetadata::new(&dir))).unwrap();
    // Tenant b has no router: reach 169.254.169.254 on-link (ARP answered by the datapath).
    sh(&["ip", "-n", c.ep("b1"), "route", "add", "169.254.169.254/32", "dev", "eth0"]).unwrap();
    for (port, want) in [("a1", "vm-a1"), ("b1", "vm-b1")] {
        let out = sh(&["ip", "netns", "exec", c.ep(port), "curl", "-sS", "--max-time", "5", "http://169.254.169.254/latest/meta-data/hostname"]);
        let out = out.or_else(|_| sh(&["ip", "netns", "exec", c.ep(port), "busybox", "wget", "-q", "-T", "5", "-O", "-", "http://169.254.169.254/latest/meta-data/hostname"]));
        assert_eq!(out.as_deref().map(str::trim), Ok(want), "metadata for {port} (same address 10.0.0.11 in both tenants)");
    }
    let missing = sh(&["ip", "netns", "exec", c.ep("a1"), "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "http://169.254.169.254/nothing"]);
    assert_eq!(missing.as_deref(), Ok("404"));
    let ports = c.dp("h1").ports();
    assert!(ports.iter().any(|p| p.kind == "internal" && p.attached_to.as_deref() == Some("a1")), "{ports:?}");
    assert!(ports.iter().any(|p| p.kind == "metadata"), "{ports:?}");
}

struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
