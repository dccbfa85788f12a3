//! The control API, the state file, and a hostile guest.

mod common;

use common::*;

fn api_vm(dir: &TempDir, kernel: &str, cmdline: &str) -> TestVm {
    let mut cfg = guest_config(dir, kernel, cmdline);
    cfg["api"] = serde_json::json!({ "socket": dir.path("api.sock") });
    let disk = dir.path("disk.img");
    make_disk(&disk, 32, 3);
    cfg["block"] = serde_json::json!([{ "id": "root", "path": disk }]);
    let mut vm = TestVm::boot(dir, &cfg);
    vm.wait_api(30);
    vm
}

fn last_heartbeat(text: &str) -> u64 {
    text.lines().filter_map(|l| l.strip_prefix("heartbeat ")).filter_map(|n| n.trim().parse().ok()).max().unwrap_or(0)
}

#[test]
fn api_describes_pauses_resumes_and_reports() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("api");
    let mut vm = api_vm(&dir, vmm::TEST_GUEST, "guest.hb=20000");
    vm.wait_for("heartbeat 2", 60);

    // The state file lets an agent find and adopt this process.
    let sf = vmm::state_file::VmmStateFile::read(&vmm::state_file::path_for(&vm.socket)).unwrap();
    assert_eq!(sf.pid, vm.pid());
    assert!(sf.is_alive());
    assert_eq!(sf.config.block[0].id, "root");

    let (st, d) = vm.api("GET", "/vm", None);
    assert_eq!(st, 200);
    assert_eq!(d["state"], "running");
    assert_eq!(d["devices"][0]["id"], "root");
    assert_eq!(d["devices"][0]["mmio_base"], "0xd0000000");

    // Errors leave the VM as it was.
    assert_eq!(vm.api("PUT", "/vm/resume", None).0, 409);
    assert_eq!(vm.api("GET", "/vm/nope", None).0, 404);
    assert_eq!(vm.api("GET", "/vm/pause", None).0, 405);
    assert_eq!(vm.api("PUT", "/vm/snapshot", Some(serde_json::json!({"dir": "/tmp/x"}))).0, 409);
    assert_eq!(vm.api("PUT", "/vm/dirty-log", Some(serde_json::json!({"on": 1}))).0, 400);
    assert_eq!(vm.api("GET", "/vm", None).1["state"], "running");

    assert_eq!(vm.api("PUT", "/vm/pause", None).0, 204);
    assert_eq!(vm.api("PUT", "/vm/pause", None).0, 409, "pausing twice is refused");
    assert_eq!(vm.api("GET", "/vm", None).1["state"], "paused");
    let frozen = last_heartbeat(&vm.console_text());
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert_eq!(last_heartbeat(&vm.console_text()), frozen, "no heartbeat while paused");
    assert_eq!(vm.api("PUT", "/vm/shutdown", None).0, 409, "a paused guest cannot take Ctrl-Alt-Del");
    assert_eq!(vm.api("PUT", "/vm/resume", None).0, 204);
    vm.wait_for(&format!("heartbeat {}", frozen + 2), 30);

    let (st, c) = vm.api("GET", "/vm/counters", None);
    assert_eq!(st, 200);
    assert!(c["vcpus"][0]["pio"].as_u64().unwrap() > 100, "serial output exits counted: {c}");
    assert!(c["devices"][0]["device"]["reads"].as_u64().unwrap() >= 1, "{c}");
    assert!(c["serial"]["bytes"].as_u64().unwrap() > 50, "{c}");

    let (st, console) = vm.api("GET", "/vm/console?bytes=4096", None);
    assert_eq!(st, 200);
    assert!(console.as_str().unwrap().contains("heartbeat"), "{console}");

    // Dirty-page log: the guest's stack and counters dirty pages.
    assert_eq!(vm.api("GET", "/vm/dirty-pages", None).0, 409);
    assert_eq!(vm.api("PUT", "/vm/dirty-log", Some(serde_json::json!({"enabled": true}))).0, 204);
    vm.wait_for(&format!("heartbeat {}", frozen + 4), 30);
    let (st, dp) = vm.api("GET", "/vm/dirty-pages", None);
    assert_eq!(st, 200);
    let dirty = dp["regions"][0]["dirty_pages"].as_u64().unwrap();
    assert!((1..64 * 256).contains(&dirty), "a running guest dirties some pages, not all: {dirty}");

    // Ctrl-Alt-Del: the guest sees the keys and powers off.
    assert_eq!(vm.api("PUT", "/vm/shutdown", None).0, 204);
    vm.wait_for("guest: ctrl-alt-del", 30);
    assert!(vm.wait_exit(30).success());
    assert!(!vm.socket.exists(), "socket removed on exit");
    assert!(!vmm::state_file::path_for(&vm.socket).exists(), "state file removed on exit");
}

#[test]
fn api_power_off_ends_the_process() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("poweroff");
    let mut vm = api_vm(&dir, vmm::TEST_GUEST, "guest.hb=20000");
    vm.wait_for("heartbeat 1", 60);
    assert_eq!(vm.api("PUT", "/vm/power-off", None).0, 204);
    assert!(vm.wait_exit(30).success());
}

#[test]
fn hostile_guest_fails_devices_not_the_vmm() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("hostile");
    let mut vm = api_vm(&dir, vmm::TEST_GUEST_HOSTILE, "guest.hb=20000");
    let out = vm.wait_for("hostile: done", 60);
    for case in [
        "out-of-range-address",
        "next-out-of-table",
        "descriptor-loop",
        "avail-index-jump",
        "short-header",
        "huge-length",
        "head-out-of-table",
    ] {
        let line = out.lines().find(|l| l.starts_with(&format!("hostile: {case} "))).unwrap_or_else(|| panic!("{case}\n{out}"));
        assert!(line.ends_with("needs-reset"), "device must enter NEEDS_RESET on {case}: {line}");
    }
    let line = out.lines().find(|l| l.starts_with("hostile: bad-ring-address")).unwrap();
    assert!(line.contains("status=0x4f"), "rings outside memory fail activation: {line}");
    // After a reset the same device works again.
    vm.wait_for("blk: read sectors 0-7 status=0", 30);
    vm.wait_for("heartbeat 1", 30);
    let (st, c) = vm.api("GET", "/vm/counters", None);
    assert_eq!(st, 200, "the VMM survived");
    let t = &c["devices"][0]["transport"];
    assert!(t["driver_errors"].as_u64().unwrap() >= 8, "{c}");
    assert!(t["bad_accesses"].as_u64().unwrap() >= 1, "{c}");
    assert!(vm.stderr_text().contains("device needs reset"), "errors are logged: {}", vm.stderr_text());
}

fn thread_status(pid: u32, name: &str) -> String {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let p = t.unwrap().path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return std::fs::read_to_string(p.join("status")).unwrap();
        }
    }
    panic!("no thread {name} in {pid}");
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or("")
}

#[test]
fn vcpu_threads_are_pinned_and_every_thread_is_filtered() {
    if skip_reason().is_some() {
        return;
    }
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let dir = TempDir::new("pin");
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.hb=20000");
    cfg["api"] = serde_json::json!({ "socket": dir.path("api.sock") });
    let cpu = cpus - 1;
    cfg["machine"]["vcpu_pin"] = serde_json::json!([cpu]);
    let mut vm = TestVm::boot(&dir, &cfg);
    vm.wait_api(30);
    vm.wait_for("heartbeat 1", 60);
    // vCPU 0 runs on the process's main thread.
    let vcpu = std::fs::read_to_string(format!("/proc/{0}/task/{0}/status", vm.pid())).unwrap();
    assert_eq!(field(&vcpu, "Cpus_allowed_list:"), cpu.to_string(), "{vcpu}");
    assert_eq!(field(&vcpu, "Seccomp:"), "2", "vCPU thread runs under a seccomp filter");
    let events = thread_status(vm.pid(), "vmm-events");
    assert_eq!(field(&events, "Seccomp:"), "2", "VMM thread runs under a seccomp filter");
    for t in std::fs::read_dir(format!("/proc/{}/task", vm.pid())).unwrap() {
        let st = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap_or_default();
        assert_eq!(field(&st, "Seccomp:"), "2", "every thread is filtered:\n{st}");
    }
    // The filtered VMM still serves the API.
    assert_eq!(vm.api("GET", "/vm", None).0, 200);
}
