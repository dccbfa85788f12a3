//! virtio-net on a tap inside a network namespace: ARP, ping, DHCP.

mod common;

use std::process::{Child, Command, Stdio};

use common::*;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn net_vm(ns: &NetNs, dir: &TempDir, tap: &str, cmdline: &str) -> TestVm {
    let mut cfg = guest_config(dir, vmm::TEST_GUEST, cmdline);
    cfg["net"] = serde_json::json!([{ "id": "eth0", "tap": tap, "mac": "52:54:00:ab:cd:01" }]);
    cfg["api"] = serde_json::json!({ "socket": dir.path("api.sock") });
    let prefix = ns.prefix();
    let p: Vec<&str> = prefix.iter().map(String::as_str).collect();
    TestVm::boot_in(&p, dir, &cfg)
}

#[test]
fn guest_answers_ping_through_a_tap() {
    if skip_reason().is_some() {
        return;
    }
    let Some(ns) = NetNs::new() else { return };
    let dir = TempDir::new("ping");
    let tap = unique("vtap");
    let mut vm = net_vm(&ns, &dir, &tap, "guest.ip=10.77.0.2 guest.hb=300000");
    vm.wait_for("net: address 10.77.0.2", 60);
    vm.wait_for("guest: ready", 60);
    assert!(vm.console_text().contains("net: mac 52:54:00:ab:cd:01"));
    assert!(ns.run(&["ip", "addr", "add", "10.77.0.1/24", "dev", &tap]));
    assert!(ns.run(&["ip", "link", "set", &tap, "up"]));
    let ok = ns.run(&["ping", "-c", "3", "-i", "0.3", "-W", "5", "10.77.0.2"]);
    assert!(ok, "ping failed\nconsole:\n{}\nstderr:\n{}", vm.console_text(), vm.stderr_text());
    vm.wait_for("net: echo reply 3", 10);
    let (st, c) = vm.api("GET", "/vm/counters", None);
    assert_eq!(st, 200);
    let dev = &c["devices"][0]["device"];
    assert!(dev["rx_frames"].as_u64().unwrap() >= 4, "ARP + 3 echo requests reached the guest: {c}");
    assert!(dev["tx_frames"].as_u64().unwrap() >= 4, "ARP + 3 echo replies left the guest: {c}");
    assert_eq!(c["devices"][0]["failed"], false);
}

#[test]
fn guest_gets_an_address_by_dhcp() {
    if skip_reason().is_some() {
        return;
    }
    let Ok(dnsmasq) = which("dnsmasq") else {
        eprintln!("SKIPPED: dnsmasq is not installed (Debian package dnsmasq-base)");
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let dir = TempDir::new("dhcp");
    let tap = unique("vtap");
    let mut vm = net_vm(&ns, &dir, &tap, "guest.dhcp guest.hb=40000");
    vm.wait_for("guest: ready", 60);
    assert!(ns.run(&["ip", "addr", "add", "10.78.0.1/24", "dev", &tap]));
    assert!(ns.run(&["ip", "link", "set", &tap, "up"]));
    let leases = dir.path("leases");
    let _server = Killed(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, &dnsmasq, "--no-daemon", "--port=0", "--no-resolv", "--bind-interfaces"])
            .arg(format!("--interface={tap}"))
            .arg("--dhcp-range=10.78.0.50,10.78.0.60,255.255.255.0,1h")
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .arg(format!("--pid-file={}", dir.path("dnsmasq.pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq"),
    );
    let out = vm.wait_for("dhcp: bound 10.78.0.", 90);
    let line = out.lines().find(|l| l.starts_with("dhcp: bound ")).unwrap();
    let ip = line.trim_start_matches("dhcp: bound ").trim().to_string();
    assert!(out.contains(&format!("dhcp: offer {ip}")), "{out}");
    assert!(ns.run(&["ping", "-c", "2", "-i", "0.3", "-W", "5", &ip]), "the leased address answers ping\n{}", vm.console_text());
}

fn which(name: &str) -> Result<String, ()> {
    for d in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = format!("{d}/{name}");
        if std::path::Path::new(&p).exists() {
            return Ok(p);
        }
    }
    Err(())
}

/// A guest that sends 40 frames through a tap whose bucket holds 4 frames
/// and refills 40 per second: the device must hold the queue back at least
/// every few frames (its throttle counter), deliver all 40 in the end, and
/// an unlimited twin sending the same never waits.
#[test]
fn a_tight_bucket_holds_back_the_guests_transmit_queue() {
    if skip_reason().is_some() {
        return;
    }
    let Some(ns) = NetNs::new() else { return };
    let run = |tag: &str, limit: Option<serde_json::Value>| -> (TestVm, TempDir) {
        let dir = TempDir::new(tag);
        let tap = unique("vtap");
        assert!(ns.run(&["ip", "tuntap", "add", &tap, "mode", "tap", "vnet_hdr"]));
        assert!(ns.run(&["ip", "link", "set", &tap, "up"]));
        let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.flood=40 guest.hb=100000");
        cfg["net"] = serde_json::json!([{ "id": "eth0", "tap": tap, "mac": "52:54:00:ab:cd:02" }]);
        if let Some(l) = limit {
            cfg["net"][0]["rate_limit"] = l;
        }
        cfg["api"] = serde_json::json!({ "socket": dir.path("api.sock") });
        let prefix = ns.prefix();
        let p: Vec<&str> = prefix.iter().map(String::as_str).collect();
        (TestVm::boot_in(&p, &dir, &cfg), dir)
    };
    let (mut limited, _d1) = run("rl", Some(serde_json::json!({ "ops": { "size": 4, "refill_ms": 100 } })));
    let (mut free, _d2) = run("free", None);
    for vm in [&mut limited, &mut free] {
        vm.wait_for("flood: sent 40", 120);
        vm.wait_api(10);
    }
    let dev = |vm: &TestVm| vm.api("GET", "/vm/counters", None).1["devices"][0]["device"].clone();
    let (l, f) = (dev(&limited), dev(&free));
    assert_eq!(l["tx_frames"], 40, "every frame left in the end: {l}");
    assert_eq!(f["tx_frames"], 40, "{f}");
    // 40 frames through a 4-frame bucket refilled at 40/s: at least nine
    // refills' worth of waiting, each one a throttle event.
    assert!(l["throttled"].as_u64().unwrap() >= 9, "the bucket held the queue back: {l}");
    assert_eq!(f["throttled"], 0, "without a limit nothing waits: {f}");
}
