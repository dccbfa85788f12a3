//! The DPDK ethdev port with DPDK's net_tap virtual device: two net_tap
//! ports attached to the engine as vm1 and vm2, their kernel interfaces moved
//! into endpoint namespaces, and a ping between them through the pipeline.
//!
//! Builds and runs only with the feature (root, libdpdk-dev installed):
//!   CARGO_TARGET_DIR=target-dpv cargo test -p dataplane --features dpdk --test dpdk
//! The EAL runs with --no-huge, so no hugepages are needed.
#![cfg(feature = "dpdk")]

use std::process::Command;

use dataplane::compiler::{Compiler, HostConfig, Neighbors};
use dataplane::dpdk::{Eal, EthPort};
use dataplane::engine::{Engine, EngineConfig, PortKind};
use dataplane::model::Model;

const MODEL: &str = r#"{
  "hosts": [{"name": "h1", "tunnel_ip": "192.0.2.1"}],
  "networks": [{"id": "net1", "name": "net1", "project_id": "p", "segment": {"type": "vxlan", "vni": 100}}],
  "subnets": [{"id": "sub1", "network_id": "net1", "cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.1"}],
  "ports": [
    {"id": "vm1", "network_id": "net1", "mac_address": "fa:16:3e:00:00:01", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.0.0.11"}], "security_groups": ["open"]},
    {"id": "vm2", "network_id": "net1", "mac_address": "fa:16:3e:00:00:02", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.0.0.12"}], "security_groups": ["open"]}
  ],
  "security_groups": [{"id": "open", "name": "open", "rules": [
    {"direction": "egress", "ethertype": "IPv4"}, {"direction": "ingress", "ethertype": "IPv4"}]}]
}"#;

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Endpoint namespaces, deleted on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

#[test]
fn ping_through_two_net_tap_ports() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED ping_through_two_net_tap_ports: not root");
        return;
    }
    let pid = std::process::id() % 100_000;
    let prefix = format!("--file-prefix=dpvdpdk{pid}");
    Eal::init(&["dataplane-test", "--no-huge", "-m", "256", "--no-pci", "--no-shconf", &prefix, "--log-level=lib.eal:error"], 8192).expect("EAL");
    let engine = Engine::start(EngineConfig { workers: 1, pin: vec![], busy_rounds: 100_000 });
    let mut host = HostConfig { name: "h1".into(), ..Default::default() };
    let mut ns = Namespaces(Vec::new());
    for (i, (id, mac, ip)) in [("vm1", "fa:16:3e:00:00:01", "10.0.0.11/24"), ("vm2", "fa:16:3e:00:00:02", "10.0.0.12/24")].iter().enumerate() {
        let iface = format!("dpt{pid}{i}");
        let port = EthPort::open(&format!("net_tap{i}"), Some(&format!("iface={iface}"))).expect("net_tap port");
        let no = engine.add_port(id, PortKind::Burst(Box::new(port)));
        host.ports.insert(id.to_string(), no);
        let n = format!("dpdk{pid}{id}");
        sh(&["ip", "netns", "add", &n]).unwrap();
        ns.0.push(n.clone());
        sh(&["ip", "link", "set", &iface, "netns", &n]).unwrap();
        sh(&["ip", "-n", &n, "link", "set", &iface, "address", mac]).unwrap();
        sh(&["ip", "-n", &n, "addr", "add", ip, "dev", &iface]).unwrap();
        sh(&["ip", "-n", &n, "link", "set", &iface, "up"]).unwrap();
        let _ = sh(&["ip", "netns", "exec", &n, "ethtool", "-K", &iface, "tx", "off"]);
    }
    let model = Model::from_json(MODEL).unwrap();
    engine.set_pipeline(Compiler::new().compile(&model, &host, &Neighbors::new()).unwrap());
    let out = Command::new("ip").args(["netns", "exec", &ns.0[0], "ping", "-c", "3", "-W", "2", "10.0.0.12"]).output().unwrap();
    let stats = engine.stats();
    assert!(out.status.success(), "ping vm1 -> vm2 through DPDK ports: {}\n{stats:#?}", String::from_utf8_lossy(&out.stdout));
    let vm2 = stats.ports.iter().find(|p| p.1 == "vm2").unwrap();
    assert!(vm2.3 >= 3, "vm2's DPDK port transmitted the echo requests: {stats:?}");
}
