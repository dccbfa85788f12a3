//! The Open vSwitch backend on OVS's userspace datapath (datapath_type
//! netdev; no kernel module needed): a private ovsdb-server and ovs-vswitchd
//! per test, inside a network namespace, endpoints standing in for VMs in
//! namespaces of their own behind veths. The model is applied through OVSDB
//! and OpenFlow; packets are real pings and TCP connections.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dataplane::model::Model;
use dataplane::ovs::instance::{Instance, InstanceConfig};
use dataplane::ovs::{OvsBackend, OvsConfig, OvsPortType};

static SEQ: AtomicU32 = AtomicU32::new(0);

const MODEL: &str = r#"{
  "hosts": [{"name": "h1", "tunnel_ip": "192.0.2.1"}],
  "networks": [{"id": "net1", "name": "net1", "project_id": "p", "segment": {"type": "vxlan", "vni": 100}}],
  "subnets": [{"id": "sub1", "network_id": "net1", "cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.1", "enable_dhcp": false}],
  "ports": [
    {"id": "vm1", "network_id": "net1", "mac_address": "fa:16:3e:00:00:01", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.0.0.11"}], "security_groups": ["web"]},
    {"id": "vm2", "network_id": "net1", "mac_address": "fa:16:3e:00:00:02", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.0.0.12"}], "security_groups": ["ssh-only"]}
  ],
  "security_groups": [
    {"id": "web", "name": "web", "rules": [{"direction": "egress", "ethertype": "IPv4"},
      {"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp"},
      {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 22, "port_range_max": 22}]},
    {"id": "ssh-only", "name": "ssh-only", "rules": [{"direction": "egress", "ethertype": "IPv4"},
      {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 22, "port_range_max": 22}]}
  ]
}"#;

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for (bin, pkg) in [("ovsdb-server", "openvswitch-switch"), ("ovs-ofctl", "openvswitch-switch"), ("busybox", "busybox-static")] {
        if Command::new(bin).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            return Some(format!("{bin} missing (package {pkg})"));
        }
    }
    None
}

/// Namespaces, a private OVS and its bridge; all removed on drop, also when a test fails.
struct Lab {
    namespaces: Vec<String>,
    ovs: Option<Instance>,
    backend: Option<OvsBackend>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(b) = self.backend.take() {
            let _ = b.delete_bridge();
        }
        self.ovs.take();
        for ns in self.namespaces.iter().rev() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

impl Lab {
    fn ep(&self, i: usize) -> &str {
        &self.namespaces[i + 1]
    }
}

/// OVS in its own namespace with vm1 and vm2 as endpoint namespaces behind veths.
fn lab() -> Lab {
    let tag = format!("{}{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed));
    let mut lab = Lab { namespaces: Vec::new(), ovs: None, backend: None };
    let ovs_ns = format!("dpovs{tag}");
    sh(&["ip", "netns", "add", &ovs_ns]).unwrap();
    lab.namespaces.push(ovs_ns.clone());
    let dir = std::env::temp_dir().join(format!("dpovs-{tag}"));
    let mut cfg = InstanceConfig::new(&dir);
    cfg.netns = Some(ovs_ns.clone());
    let inst = Instance::start(cfg).expect("private OVS starts");
    let bridge = format!("brdp{tag}");
    let mut backend = OvsBackend::connect(OvsConfig { db_socket: inst.db_socket(), rundir: inst.rundir().to_path_buf(), bridge, datapath_type: "netdev".into(), host: "h1".into() }).expect("bridge");
    lab.ovs = Some(inst);
    let model = Model::from_json(MODEL).unwrap();
    backend.apply_model(model.clone()).unwrap();
    for (i, p) in model.ports.iter().enumerate() {
        let ns = format!("dpo{tag}{}", p.id);
        sh(&["ip", "netns", "add", &ns]).unwrap();
        lab.namespaces.push(ns.clone());
        let host_if = format!("o{tag}{i}");
        sh(&["ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &host_if, "netns", &ovs_ns]).unwrap();
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "address", &p.mac_address.to_string()]).unwrap();
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", p.fixed_ips[0].ip_address), "dev", "eth0"]).unwrap();
        for n in [ns.as_str(), ovs_ns.as_str()] {
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]).unwrap();
        }
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]).unwrap();
        sh(&["ip", "-n", &ovs_ns, "link", "set", &host_if, "up"]).unwrap();
        // Full checksums from the endpoint (the userspace datapath sees what the veth carries).
        let _ = sh(&["ip", "netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off"]);
        let no = backend.add_port(&p.id, &host_if, OvsPortType::System).unwrap();
        assert_eq!(backend.port_number(&p.id), Some(no));
    }
    lab.backend = Some(backend);
    lab
}

fn ping(ns: &str, dst: &str) -> bool {
    Command::new("ip").args(["netns", "exec", ns, "busybox", "ping", "-c", "2", "-W", "2", dst]).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Sends a line from `client` to `server_ip:port` where `server` listens; returns what the server got.
fn tcp(lab: &Lab, client: usize, server: usize, server_ip: &str, port: u16) -> String {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", lab.ep(server), "busybox", "nc", "-l", "-p", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("ip").args(["netns", "exec", lab.ep(client), "sh", "-c", &format!("echo hello-{port} | busybox nc -w 2 {server_ip} {port}")]).output();
    std::thread::sleep(Duration::from_millis(300));
    let _ = srv.kill();
    let _ = srv.wait();
    let mut got = String::new();
    if let Some(mut o) = srv.stdout.take() {
        let _ = o.read_to_string(&mut got);
    }
    got
}

#[test]
fn ovs_ping_between_two_ports_of_one_network() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED ovs_ping_between_two_ports_of_one_network: {why}");
        return;
    }
    let lab = lab();
    let b = lab.backend.as_ref().unwrap();
    assert!(b.rendered().flow_count() > 10, "{:?}", b.rendered());
    // vm2 -> vm1: ARP answered by flows, ICMP allowed into vm1, the reply is established.
    assert!(ping(lab.ep(1), "10.0.0.11"), "vm2 -> vm1 on OVS\n{}\n{}", b.dump_flows().unwrap_or_default(), lab.ovs.as_ref().unwrap().log());
    let dump = b.dump_flows().unwrap();
    let per_table = dataplane::ovs::openflow::packets_by_table(&dump);
    assert!(per_table.get(&11).copied().unwrap_or(0) > 0, "ingress security group table carried packets: {per_table:?}");
    let ct = lab.ovs.as_ref().unwrap().appctl(&["dpctl/dump-conntrack"]).unwrap();
    assert!(ct.contains("icmp") && ct.contains("10.0.0.12"), "OVS conntrack has the ping: {ct}");
}

#[test]
fn ovs_security_group_blocks_what_it_should() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED ovs_security_group_blocks_what_it_should: {why}");
        return;
    }
    let mut lab = lab();
    // vm2 only lets TCP 22 in: ping from vm1 is refused, SSH's port is open.
    assert!(!ping(lab.ep(0), "10.0.0.12"), "ICMP into vm2 must be blocked");
    let got = tcp(&lab, 0, 1, "10.0.0.12", 22);
    assert!(got.contains("hello-22"), "TCP 22 into vm2 allowed, got {got:?}");
    let got = tcp(&lab, 0, 1, "10.0.0.12", 23);
    assert!(!got.contains("hello-23"), "TCP 23 into vm2 must be blocked, got {got:?}");
    // Removing the rule set's TCP rule on the fly closes port 22 as well.
    let mut m = Model::from_json(MODEL).unwrap();
    m.security_groups[1].rules.retain(|r| r.protocol.is_none());
    lab.backend.as_mut().unwrap().apply_model(m).unwrap();
    let got = tcp(&lab, 0, 1, "10.0.0.12", 22);
    assert!(!got.contains("hello-22"), "after the rule is gone TCP 22 is blocked, got {got:?}");
    // A bad model is refused and the installed flows stay.
    let mut bad = Model::from_json(MODEL).unwrap();
    bad.ports[0].network_id = "missing".into();
    assert!(lab.backend.as_mut().unwrap().apply_model(bad).is_err());
    assert!(ping(lab.ep(1), "10.0.0.11"), "flows kept after a rejected model");
}
