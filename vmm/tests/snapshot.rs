//! Snapshot a paused VM, restore it in a new process, and check it carries on.

mod common;

use common::*;

fn heartbeats(text: &str) -> Vec<u64> {
    text.lines().filter_map(|l| l.strip_prefix("heartbeat ")).filter_map(|n| n.trim().parse().ok()).collect()
}

/// Boots the guest with `tweak` applied to its config, snapshots it while
/// paused, restores it in a new process and checks that it carries on.
/// Returns the restored VM's console.
fn snapshot_cycle(tag: &str, tweak: impl Fn(&mut serde_json::Value, &TempDir), check_version: bool) -> String {
    let dir = TempDir::new(tag);
    let disk = dir.path("disk.img");
    let data = make_disk(&disk, 32, 5);
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.blkbeat guest.hb=20000");
    cfg["api"] = serde_json::json!({ "socket": dir.path("api.sock") });
    cfg["block"] = serde_json::json!([{ "id": "root", "path": disk }]);
    cfg["rng"] = serde_json::json!({});
    tweak(&mut cfg, &dir);
    let mut vm = TestVm::boot(&dir, &cfg);
    vm.wait_api(30);
    vm.wait_for("heartbeat 3\n", 60);
    assert_eq!(vm.api("PUT", "/vm/pause", None).0, 204);
    let before = vm.console_text();
    let last = *heartbeats(&before).last().unwrap();
    let snapdir = dir.path("snap");
    let (st, r) = vm.api("PUT", "/vm/snapshot", Some(serde_json::json!({ "dir": snapdir })));
    assert_eq!(st, 200, "{r}");
    assert_eq!(vm.api("PUT", "/vm/power-off", None).0, 204);
    assert!(vm.wait_exit(30).success());

    if check_version {
        // A version this build does not know is refused.
        let state = std::fs::read_to_string(snapdir.join("snapshot.json")).unwrap();
        let bad = dir.path("bad");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("snapshot.json"), state.replacen("\"version\":1", "\"version\":99", 1)).unwrap();
        let out = std::process::Command::new(VMM).args(["--restore", bad.to_str().unwrap()]).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("version 99"), "{out:?}");
    }

    let console2 = dir.path("console2.log");
    let sock2 = dir.path("api2.sock");
    let mut vm2 = TestVm::spawn(
        &[],
        &[
            "--restore",
            snapdir.to_str().unwrap(),
            "--api-socket",
            sock2.to_str().unwrap(),
            "--serial-log",
            console2.to_str().unwrap(),
        ],
        &dir,
        &console2,
        &sock2,
    );
    vm2.wait_api(30);
    assert_eq!(vm2.api("GET", "/vm", None).1["state"], "paused", "a restored VM waits to be resumed");
    assert_eq!(vm2.api("PUT", "/vm/resume", None).0, 204);
    let next = format!("heartbeat {}\n", last + 2);
    let after = vm2.wait_for(&next, 60);
    let beats = heartbeats(&after);
    assert_eq!(beats[0], last + 1, "the counter continues where it stopped:\n{after}");
    // The block device works after restore and the disk is intact.
    let want = format!("blk: read sectors 0-7 status=0 fnv={:#x}", fnv1a(&data[..4096]));
    assert!(after.contains(&want), "missing {want:?} after restore:\n{after}");
    assert_eq!(std::fs::read(&disk).unwrap(), data);
    let (_, c) = vm2.api("GET", "/vm/counters", None);
    assert_eq!(c["devices"][0]["failed"], false, "{c}");
    assert_eq!(vm2.api("PUT", "/vm/power-off", None).0, 204);
    assert!(vm2.wait_exit(30).success());
    after
}

#[test]
fn snapshot_then_restore_in_a_new_process_continues_the_guest() {
    if skip_reason().is_some() {
        return;
    }
    snapshot_cycle("snap", |_, _| {}, true);
}

#[test]
fn snapshot_and_restore_on_2m_hugepages() {
    if skip_reason().is_some() {
        return;
    }
    let Some(_pages) = HugePages::reserve(64) else {
        eprintln!("SKIPPED: cannot reserve 64 free 2 MiB hugepages (needs root and free memory)");
        return;
    };
    snapshot_cycle("snaphuge", |cfg, _| cfg["machine"]["memory_backend"] = "hugetlb-2m".into(), false);
}

#[test]
fn snapshot_and_restore_on_file_backed_memory_resets_vsock() {
    if skip_reason().is_some() {
        return;
    }
    let after = snapshot_cycle(
        "snapfile",
        |cfg, dir| {
            cfg["machine"]["memory_backend"] = "file".into();
            cfg["machine"]["memory_file"] = dir.path("guest.mem").to_str().unwrap().into();
            cfg["vsock"] = serde_json::json!({ "guest_cid": 9, "uds_path": dir.path("v.sock") });
        },
        false,
    );
    // Host connections do not survive a snapshot; the guest is told.
    assert!(after.contains("vsock: transport reset"), "{after}");
}

#[test]
fn snapshot_and_restore_on_shared_memfd_memory() {
    if skip_reason().is_some() {
        return;
    }
    snapshot_cycle("snapmemfd", |cfg, _| cfg["machine"]["memory_shared"] = true.into(), false);
}
