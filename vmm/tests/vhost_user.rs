//! virtio-net over vhost-user against a real backend: dpdk-testpmd's vhost
//! PMD (`net_vhost0`) serves the guest's rings directly and forwards in
//! macswap mode, so every probe frame the guest sends comes back to it with
//! the MAC addresses swapped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A dpdk-testpmd process with one vhost-user port; killed on drop.
struct Testpmd {
    child: Child,
    out: PathBuf,
    prefix: String,
}

impl Testpmd {
    /// Starts testpmd serving `socket` in forwarding `mode`, or says why it cannot.
    fn start(dir: &TempDir, socket: &Path, mode: &str) -> Result<Self, String> {
        if Command::new("dpdk-testpmd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            return Err("dpdk-testpmd is not installed (Debian package dpdk-dev)".into());
        }
        let out = dir.path("testpmd.out");
        let log = std::fs::File::create(&out).unwrap();
        let prefix = unique("vmmtp");
        // No hugepages: the vhost PMD maps the guest's memory from the file
        // descriptors the VMM sends, and testpmd's own mbufs may live in
        // ordinary memory. Its two lcores float over both CPUs.
        let child = Command::new("dpdk-testpmd")
            .args(["--lcores", "0@(0,1),1@(0,1)", "--no-pci", "--no-huge", "-m", "128", "--log-level", "lib.eal:error"])
            .arg(format!("--file-prefix={prefix}"))
            .arg(format!("--vdev=net_vhost0,iface={},queues=1", socket.display()))
            .args(["--", "--total-num-mbufs=2048", "--nb-cores=1", "--stats-period=1", "-a"])
            .arg(format!("--forward-mode={mode}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run dpdk-testpmd: {e}"))?;
        let mut t = Testpmd { child, out, prefix };
        let end = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Ok(Some(st)) = t.child.try_wait() {
                return Err(format!("dpdk-testpmd exited ({st}) before listening:\n{}", t.output()));
            }
            if Instant::now() > end {
                return Err(format!("dpdk-testpmd did not create its socket:\n{}", t.output()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(t)
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    /// The last value printed after `key` (e.g. "RX-packets:").
    fn last_stat(&self, key: &str) -> u64 {
        let out = self.output();
        out.rmatch_indices(key)
            .next()
            .and_then(|(i, _)| out[i + key.len()..].split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

#[test]
fn guest_frames_come_back_macswapped_through_testpmd() {
    if skip_reason().is_some() {
        return;
    }
    macswap_round_trip("vhu", |_| {});
}

/// The NFV layout: guest RAM on 2 MiB hugepages, shared through a hugetlb memfd.
#[test]
fn vhost_user_on_shared_hugepage_memory() {
    if skip_reason().is_some() {
        return;
    }
    let Some(_pages) = HugePages::reserve(32) else {
        eprintln!("SKIPPED: cannot reserve 32 free 2 MiB hugepages (needs root and free memory)");
        return;
    };
    macswap_round_trip("vhuhuge", |cfg| cfg["machine"]["memory_backend"] = "hugetlb-2m".into());
}

fn macswap_round_trip(tag: &str, tweak: impl Fn(&mut serde_json::Value)) {
    let dir = TempDir::new(tag);
    let sock = dir.path("vhost.sock");
    let tp = match Testpmd::start(&dir, &sock, "macswap") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.probe=8 guest.hb=50000");
    cfg["machine"]["memory_shared"] = true.into();
    cfg["api"] = serde_json::json!({ "socket": dir.path("api.sock") });
    cfg["net"] = serde_json::json!([{ "id": "vu0", "vhost_user_socket": sock, "mac": "52:54:00:00:be:ef" }]);
    tweak(&mut cfg);
    let mut vm = TestVm::boot(&dir, &cfg);
    let out = vm.wait_for("probe: sent 8", 120);
    assert!(out.contains("net: mac 52:54:00:00:be:ef"), "{out}");
    assert!(
        out.contains("probe: sent 8 returned 8 macswapped 8"),
        "every probe came back with swapped MACs:\n{out}\n--- testpmd:\n{}",
        tp.output()
    );
    vm.wait_api(10);
    if cfg["machine"]["memory_backend"] == "hugetlb-2m" {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", vm.pid())).unwrap();
        let kb: u64 = smaps
            .lines()
            .filter_map(|l| l.strip_prefix("Shared_Hugetlb:"))
            .map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0))
            .sum();
        assert!(kb >= 2048, "guest RAM is shared hugepage memory: Shared_Hugetlb {kb} kB");
    }
    let (_, c) = vm.api("GET", "/vm/counters", None);
    let d = &c["devices"][0];
    assert_eq!(d["type"], "net");
    assert_eq!(d["device"]["backend"], "vhost-user");
    assert_eq!(d["device"]["running"], true, "{c}");
    assert_eq!(d["failed"], false, "{c}");
    // Packets never passed through the VMM: its event loop saw no queue notification.
    assert_eq!(d["transport"]["notifications"], 0, "{c}");

    // testpmd counted the probes on its port (stats print every second).
    let end = Instant::now() + Duration::from_secs(10);
    while tp.last_stat("RX-packets:") < 8 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(tp.last_stat("RX-packets:") >= 8, "testpmd received the probes:\n{}", tp.output());
    assert!(tp.last_stat("TX-packets:") >= 8, "testpmd sent them back:\n{}", tp.output());

    // The backend's ring state is not the VMM's to save.
    assert_eq!(vm.api("PUT", "/vm/pause", None).0, 204);
    let (st, body) = vm.api("PUT", "/vm/snapshot", Some(serde_json::json!({ "dir": dir.path("snap") })));
    assert_eq!(st, 409, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("vhost-user"), "{body}");
    assert_eq!(vm.api("PUT", "/vm/power-off", None).0, 204);
    assert!(vm.wait_exit(30).success());
}

#[test]
fn vhost_user_without_a_backend_or_shared_memory_is_refused() {
    let dir = TempDir::new("vhu-bad");
    let sock = dir.path("nobody.sock");
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "");
    cfg["net"] = serde_json::json!([{ "id": "vu0", "vhost_user_socket": sock }]);
    let path = dir.path("vm.json");
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = Command::new(VMM).args(["--config", path.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vhost-user needs shared guest memory"), "{err}");

    if skip_reason().is_some() {
        return;
    }
    cfg["machine"]["memory_shared"] = true.into();
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = Command::new(VMM).args(["--config", path.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Cannot connect to the vhost-user backend"), "{err}");
}
