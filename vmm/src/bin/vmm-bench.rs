//! `vmm-bench`: boot latency, memory overhead, snapshot/restore time and
//! virtio-blk throughput of the `vmm` binary on the test guest, each beside
//! a reference measured in the same run. Run through scripts/bench-vmm.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::api::http::call;

struct Vm(Child);
impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vmm_bin() -> PathBuf {
    let me = std::env::current_exe().expect("current exe");
    me.with_file_name("vmm")
}

fn write_cfg(dir: &Path, name: &str, v: &serde_json::Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(v).unwrap()).unwrap();
    p
}

fn wait_console(path: &Path, needle: &str, secs: u64) -> Instant {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if std::fs::read(path).map(|b| String::from_utf8_lossy(&b).contains(needle)).unwrap_or(false) {
            return Instant::now();
        }
        assert!(Instant::now() < end, "Timed out waiting for {needle:?} in {}", path.display());
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn wait_socket(sock: &Path, secs: u64) {
    let end = Instant::now() + Duration::from_secs(secs);
    while call(sock, "GET", "/vm", None).is_err() {
        assert!(Instant::now() < end, "API did not come up");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn now_us() -> u64 {
    vmm::timing::now_us()
}

fn boot_latency(dir: &Path, runs: usize) {
    let cfg = serde_json::json!({
        "machine": { "vcpus": 1, "memory_mib": 128 },
        "boot": { "kernel": vmm::TEST_GUEST, "cmdline": "guest.beats=1 guest.hb=10" },
        "serial": { "log": dir.join("boot.log") },
    });
    let path = write_cfg(dir, "boot.json", &cfg);
    let (mut run, mut line, mut main) = (Vec::new(), Vec::new(), Vec::new());
    let phases = [
        "build_start_us",
        "vm_ready_us",
        "guest_loaded_us",
        "vcpus_started_us",
        "ioeventfds_ready_us",
        "vcpu_thread_running_us",
        "vcpu_filtered_us",
    ];
    let mut phase: Vec<Vec<f64>> = vec![Vec::new(); phases.len()];
    // The same boot with another build (scripts/bench-vmm builds the
    // revision named by VMM_BENCH_BASELINE), interleaved run by run so that
    // both see the same host load.
    let base = std::env::var_os("VMM_BENCH_BASELINE_BIN");
    let mut base_run = Vec::new();
    for _ in 0..runs {
        if let Some(base) = &base {
            let t0 = now_us();
            let out = Command::new(base).arg("--config").arg(&path).env("VMM_TIMING", "1").output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            if let Some(json) = err.lines().find_map(|l| l.strip_prefix("vmm: timing ")) {
                let t: serde_json::Value = serde_json::from_str(json).unwrap();
                base_run.push(t["first_kvm_run_us"].as_u64().unwrap_or(0).saturating_sub(t0) as f64 / 1000.0);
            }
        }
        let t0 = now_us();
        let out = Command::new(vmm_bin()).arg("--config").arg(&path).env("VMM_TIMING", "1").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let json = err.lines().find_map(|l| l.strip_prefix("vmm: timing ")).expect("timing line");
        let t: serde_json::Value = serde_json::from_str(json).unwrap();
        let rel = |k: &str| (t[k].as_u64().unwrap().saturating_sub(t0)) as f64 / 1000.0;
        main.push(rel("main_start_us"));
        for (i, p) in phases.iter().enumerate() {
            phase[i].push(rel(p));
        }
        run.push(rel("first_kvm_run_us"));
        line.push(rel("first_serial_line_us"));
    }
    let mut tru = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        Command::new("/bin/true").status().unwrap();
        tru.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!("boot (median of {runs}, ms after spawn):");
    println!("  process start -> main()              {:8.2}", median(main));
    let names = [
        "build starts",
        "VM, memory slot, irqchip, PIT, vCPUs",
        "kernel loaded, devices built",
        "other vCPU threads spawned",
        "ioeventfds registered (event thread)",
        "vCPU 0 loop entered (main thread)",
        "vCPU 0 seccomp filter on",
    ];
    for (n, v) in names.iter().zip(phase) {
        println!("    {n:<38} {:8.2}", median(v));
    }
    println!("  process start -> first guest instr.  {:8.2}   (aim < 10)", median(run));
    if !base_run.is_empty() {
        let rev = std::env::var("VMM_BENCH_BASELINE").unwrap_or_default();
        println!("  reference: build {rev:<10} -> first guest instr. {:8.2}", median(base_run));
    }
    println!("  process start -> first serial line   {:8.2}", median(line));
    println!("  reference: spawn+exit of /bin/true   {:8.2}", median(tru));
}

fn smaps_rss(pid: u32, guest_bytes: u64) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut guest) = (0u64, 0u64);
    let mut in_guest = false;
    for l in s.lines() {
        if let Some((range, _)) = l.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    in_guest = b - a == guest_bytes;
                    continue;
                }
            }
        }
        if let Some(v) = l.strip_prefix("Rss:") {
            let kb: u64 = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
            total += kb;
            if in_guest {
                guest += kb;
            }
        }
    }
    (total, guest)
}

fn memory_overhead(dir: &Path) {
    let sock = dir.join("mem.sock");
    let log = dir.join("mem.log");
    let cfg = serde_json::json!({
        "machine": { "vcpus": 1, "memory_mib": 128 },
        "boot": { "kernel": vmm::TEST_GUEST, "cmdline": "guest.hb=2000000" },
        "serial": { "log": log },
        "api": { "socket": sock },
        "block": [{ "id": "root", "path": dir.join("disk.img") }],
    });
    let path = write_cfg(dir, "mem.json", &cfg);
    let child = Command::new(vmm_bin()).arg("--config").arg(&path).stderr(Stdio::null()).spawn().unwrap();
    let vm = Vm(child);
    wait_console(&log, "guest: ready", 60);
    let (total, guest) = smaps_rss(vm.0.id(), 128 << 20);
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.0.id())).unwrap();
    let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap_or("?").trim().to_string();
    println!("memory (1 vCPU, 128 MiB guest, one disk):");
    println!("  VMM process RSS                      {:8} KiB  (peak {hwm})", total);
    println!("  of which guest pages touched         {:8} KiB", guest);
    println!("  VMM overhead                         {:8} KiB  (aim < 5120; Firecracker's published bound)", total - guest);
    println!("  reference: guest memory size         {:8} KiB", 128 * 1024);
}

fn snapshot_restore(dir: &Path) {
    let sock = dir.join("snap.sock");
    let log = dir.join("snap.log");
    let cfg = serde_json::json!({
        "machine": { "vcpus": 1, "memory_mib": 256 },
        "boot": { "kernel": vmm::TEST_GUEST, "cmdline": "guest.fill=200 guest.hb=20000" },
        "serial": { "log": log },
        "api": { "socket": sock },
    });
    let path = write_cfg(dir, "snap.json", &cfg);
    let child = Command::new(vmm_bin()).arg("--config").arg(&path).stderr(Stdio::null()).spawn().unwrap();
    let vm = Vm(child);
    wait_console(&log, "heartbeat 1\n", 120);
    wait_socket(&sock, 10);
    call(&sock, "PUT", "/vm/pause", None).unwrap();
    let snapdir = dir.join("snapshot");
    let t = Instant::now();
    let (st, body) = call(&sock, "PUT", "/vm/snapshot", Some(&serde_json::json!({ "dir": snapdir }))).unwrap();
    let snap_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    call(&sock, "PUT", "/vm/power-off", None).unwrap();
    drop(vm);
    let mem = snapdir.join("memory.bin");
    let used_kb = std::fs::metadata(&mem).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512 / 1024
    });

    let sock2 = dir.join("snap2.sock");
    let log2 = dir.join("snap2.log");
    let t = Instant::now();
    let child = Command::new(vmm_bin())
        .arg("--restore")
        .arg(&snapdir)
        .arg("--api-socket")
        .arg(&sock2)
        .arg("--serial-log")
        .arg(&log2)
        .arg("--resume")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let vm2 = Vm(child);
    wait_socket(&sock2, 30);
    let api_ms = t.elapsed().as_secs_f64() * 1000.0;
    wait_console(&log2, "heartbeat", 60);
    let beat_ms = t.elapsed().as_secs_f64() * 1000.0;
    drop(vm2);

    // Reference: copy the same memory file with plain reads and writes.
    let t = Instant::now();
    let mut src = std::fs::File::open(&mem).unwrap();
    let mut dst = std::fs::File::create(dir.join("copy.bin")).unwrap();
    std::io::copy(&mut src, &mut dst).unwrap();
    dst.sync_all().ok();
    let cp_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!("snapshot / restore (256 MiB guest, 200 MiB written by the guest):");
    println!("  snapshot (paused VM -> files)        {:8.1} ms  (memory.bin uses {} KiB on disk)", snap_ms, used_kb.unwrap_or(0));
    println!("  restore: spawn -> API answers        {:8.1} ms", api_ms);
    println!("  restore: spawn -> next heartbeat     {:8.1} ms", beat_ms);
    println!("  reference: cp of memory.bin          {:8.1} ms", cp_ms);
    let _ = std::fs::remove_dir_all(&snapdir);
    let _ = std::fs::remove_file(dir.join("copy.bin"));
}

fn blk_throughput(dir: &Path, mib: u64) {
    let disk = dir.join("big.img");
    let f = std::fs::File::create(&disk).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..mib {
        f.write_all_at(&chunk, i << 20).unwrap();
    }
    drop(f);
    // Reference: plain 64 KiB reads of the same file (page cache warm, as for the guest).
    let mut buf = vec![0u8; 65536];
    let t = Instant::now();
    let mut f = std::fs::File::open(&disk).unwrap();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let plain = total as f64 / t.elapsed().as_secs_f64() / 1e6;

    let log = dir.join("blk.log");
    let cfg = serde_json::json!({
        "machine": { "vcpus": 1, "memory_mib": 64 },
        "boot": { "kernel": vmm::TEST_GUEST, "cmdline": format!("guest.blkbench={mib} guest.hb=2000000") },
        "serial": { "log": log },
        "block": [{ "id": "root", "path": disk }],
    });
    let path = write_cfg(dir, "blk.json", &cfg);
    let child = Command::new(vmm_bin()).arg("--config").arg(&path).stderr(Stdio::null()).spawn().unwrap();
    let _vm = Vm(child);
    let start = wait_console(&log, "blkbench: start", 60);
    let end = wait_console(&log, "blkbench: done", 600);
    let guest = (mib << 20) as f64 / (end - start).as_secs_f64() / 1e6;
    println!("virtio-blk sequential read, 64 KiB requests, {mib} MiB:");
    println!("  guest through virtio-blk             {:8.1} MB/s", guest);
    println!("  reference: plain reads of the file   {:8.1} MB/s", plain);
    let _ = std::fs::remove_file(&disk);
}

fn main() {
    if let Some(r) = vmm::vstate::kvm::unavailable_reason() {
        eprintln!("vmm-bench: KVM is not usable here: {r}");
        std::process::exit(1);
    }
    let dir = std::env::temp_dir().join(format!("vmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    let runs: usize = std::env::var("VMM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    // VMM_BENCH_ONLY=boot,memory,snapshot,blk picks parts.
    let only = std::env::var("VMM_BENCH_ONLY").unwrap_or_default();
    let want = |part: &str| only.is_empty() || only.split(',').any(|p| p == part);
    if want("boot") {
        boot_latency(&dir, runs);
    }
    if want("memory") {
        memory_overhead(&dir);
    }
    if want("snapshot") {
        snapshot_restore(&dir);
    }
    if want("blk") {
        blk_throughput(&dir, std::env::var("VMM_BENCH_BLK_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
