//! Guest memory backends: 2 MiB hugepages and shared file-backed memory.

mod common;

use common::*;

const NR: &str = "/proc/sys/vm/nr_hugepages";

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

/// Reserves hugepages for the test; gives back what it added on drop (unless
/// someone else changed the count meanwhile).
struct HugePages {
    before: u64,
    set: Option<u64>,
}

impl HugePages {
    fn reserve(pages: u64) -> Option<Self> {
        let before: u64 = std::fs::read_to_string(NR).ok()?.trim().parse().ok()?;
        let free = meminfo("HugePages_Free:");
        let mut g = HugePages { before, set: None };
        if free < pages {
            let want = before + pages - free;
            std::fs::write(NR, want.to_string()).ok()?;
            g.set = Some(want);
            if meminfo("HugePages_Free:") < pages {
                return None;
            }
        }
        Some(g)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(set) = self.set {
            let now: u64 = std::fs::read_to_string(NR).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            if now == set {
                let _ = std::fs::write(NR, self.before.to_string());
            }
        }
    }
}

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
