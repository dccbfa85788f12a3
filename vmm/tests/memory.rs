//! Guest memory backends: 2 MiB hugepages and shared file-backed memory.

mod common;

use common::*;

#[test]
fn guest_runs_on_2m_hugepages() {
    if skip_reason().is_some() {
        return;
    }
    let Some(_pages) = HugePages::reserve(32) else {
        eprintln!("SKIPPED: cannot reserve 32 free 2 MiB hugepages (needs root and free memory)");
        return;
    };
    let dir = TempDir::new("huge");
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.hb=20000");
    cfg["machine"]["memory_backend"] = "hugetlb-2m".into();
    let mut vm = TestVm::boot(&dir, &cfg);
    vm.wait_for("heartbeat 1", 60);
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", vm.pid())).unwrap();
    let huge_kb: u64 = smaps
        .lines()
        .filter_map(|l| l.strip_prefix("Private_Hugetlb:"))
        .map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0))
        .sum();
    assert!(huge_kb >= 2048, "guest memory sits on hugepages: Private_Hugetlb {huge_kb} kB");
}

#[test]
fn file_backed_memory_is_shared_with_the_file() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("memfile");
    let memfile = dir.path("guest.mem");
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "marker-in-shared-memory guest.hb=20000");
    cfg["machine"]["memory_backend"] = "file".into();
    cfg["machine"]["memory_file"] = memfile.to_str().unwrap().into();
    let mut vm = TestVm::boot(&dir, &cfg);
    vm.wait_for("heartbeat 1", 60);
    let bytes = std::fs::read(&memfile).unwrap();
    assert_eq!(bytes.len(), 64 << 20);
    // The command line lives at 0x20000 in guest memory.
    let at = &bytes[0x20000..0x20000 + 23];
    assert_eq!(at, b"marker-in-shared-memory");
}

/// The mapping of exactly `size` bytes in `pid`'s address space (the guest RAM).
fn mapping_of_size(pid: u32, size: u64) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines().find_map(|l| {
        let (range, _) = l.split_once(' ')?;
        let (a, b) = range.split_once('-')?;
        let (a, b) = (u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?);
        (b - a == size).then(|| format!("{a:x}"))
    })
}

#[test]
fn guest_memory_is_bound_to_the_numa_node() {
    if skip_reason().is_some() {
        return;
    }
    if !std::path::Path::new("/proc/self/numa_maps").exists() {
        eprintln!("SKIPPED: this kernel has no NUMA support (/proc/PID/numa_maps missing)");
        return;
    }
    let dir = TempDir::new("numa");
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.fill=8 guest.hb=20000");
    cfg["machine"]["numa_node"] = 0.into();
    let mut vm = TestVm::boot(&dir, &cfg);
    vm.wait_for("heartbeat 1", 60);
    let start = mapping_of_size(vm.pid(), 64 << 20).expect("guest RAM mapping");
    let numa = std::fs::read_to_string(format!("/proc/{}/numa_maps", vm.pid())).unwrap();
    let line = numa.lines().find(|l| l.starts_with(&format!("{start} "))).unwrap_or_else(|| panic!("{start}\n{numa}"));
    assert!(line.contains(" bind:0 "), "guest RAM has the MPOL_BIND policy for node 0: {line}");
    // The pages the guest touched live on node 0.
    assert!(line.contains(" N0="), "{line}");

    // A node that does not exist is refused before anything runs.
    let mut bad = guest_config(&dir, vmm::TEST_GUEST, "");
    bad["machine"]["numa_node"] = 63.into();
    let path = dir.path("bad.json");
    std::fs::write(&path, serde_json::to_vec(&bad).unwrap()).unwrap();
    let out = std::process::Command::new(VMM).args(["--config", path.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NUMA node 63"), "{out:?}");
}
