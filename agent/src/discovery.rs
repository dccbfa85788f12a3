//! Inventory discovery from sysfs and procfs.
//!
//! Both roots can be pointed elsewhere, so tests drive this from a fixture tree
//! (`tests/fixtures/sysfs/`); on a host they are `/sys` and `/proc`.
//! - NUMA nodes: `<sys>/devices/system/node/node*/{cpulist,meminfo}`, their
//!   hugepages under `node*/hugepages/hugepages-<size>kB/`; a host without that
//!   directory is one node with every online CPU and all memory.
//! - Memory: `MemTotal` of `<proc>/meminfo`; hugepages: `<sys>/kernel/mm/hugepages/`.
//! - Instance pool: `statvfs(2)` of its directory.
//! - CPU features: `flags` of `<proc>/cpuinfo`, mapped to os-traits names.
//! - SR-IOV: `<sys>/class/net/*/device/{sriov_totalvfs,sriov_numvfs,virtfn*}`.
//! - Uptime and load (sent with each report, not part of the inventory):
//!   `<proc>/uptime`, `<proc>/loadavg`, and the users logged in per utmp.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use model::agent_api::HostLoad;
use model::inventory::{DiskPool, HostInventory, HugepagePool, NumaNode, SriovPf, SriovVf};

/// Where to look and what the operator told us.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// Root of sysfs (`/sys`).
    pub sysfs_root: PathBuf,
    /// Root of procfs (`/proc`).
    pub procfs_root: PathBuf,
    /// Directory holding instance disks.
    pub instance_pool: PathBuf,
    /// Host name to report; the kernel's when `None`.
    pub hostname: Option<String>,
    /// Interface name -> physical network it is cabled to.
    pub physnets: BTreeMap<String, String>,
}

/// What can go wrong discovering the inventory.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("Cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("Unexpected content in {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("Cannot stat the instance pool {path}: {source}")]
    Statvfs { path: PathBuf, source: std::io::Error },
}

fn read(path: &Path) -> Result<String, DiscoveryError> {
    std::fs::read_to_string(path).map_err(|source| DiscoveryError::Read { path: path.into(), source })
}

fn read_u64(path: &Path) -> Result<u64, DiscoveryError> {
    let text = read(path)?;
    text.trim().parse().map_err(|_| DiscoveryError::Parse { path: path.into(), reason: format!("not a number: {:?}", text.trim()) })
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpulist(text: &str) -> Option<Vec<u32>> {
    let mut cpus = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 65536 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => {
                cpus.insert(part.parse().ok()?);
            }
        }
    }
    Some(cpus.into_iter().collect())
}

/// Reads `<dir>/hugepages-<size>kB/{nr_hugepages,free_hugepages}`, sorted by size.
fn hugepages_in(dir: &Path) -> Result<Vec<HugepagePool>, DiscoveryError> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(vec![]) };
    let mut pools = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(size) = name.strip_prefix("hugepages-").and_then(|s| s.strip_suffix("kB")).and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        pools.push(HugepagePool { size_kb: size, total: read_u64(&e.path().join("nr_hugepages"))?, free: read_u64(&e.path().join("free_hugepages"))? });
    }
    pools.sort_by_key(|p| p.size_kb);
    Ok(pools)
}

/// `MemTotal` of a meminfo file in MiB (`Node N MemTotal:` lines too).
fn mem_total_mb(path: &Path) -> Result<u64, DiscoveryError> {
    let text = read(path)?;
    for line in text.lines() {
        let Some((label, rest)) = line.split_once(':') else { continue };
        if label.trim_end().ends_with("MemTotal") {
            let kb: u64 = rest.split_whitespace().next().and_then(|n| n.parse().ok()).ok_or_else(|| DiscoveryError::Parse {
                path: path.into(),
                reason: format!("bad MemTotal line {line:?}"),
            })?;
            return Ok(kb / 1024);
        }
    }
    Err(DiscoveryError::Parse { path: path.into(), reason: "no MemTotal line".into() })
}

fn numa_nodes(sys: &Path, proc_: &Path, memory_mb: u64) -> Result<Vec<NumaNode>, DiscoveryError> {
    let dir = sys.join("devices/system/node");
    let mut nodes = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_prefix("node").and_then(|n| n.parse::<u32>().ok()) else { continue };
            let path = e.path().join("cpulist");
            let text = read(&path)?;
            let cpus = parse_cpulist(&text).ok_or_else(|| DiscoveryError::Parse { path: path.clone(), reason: format!("bad CPU list {:?}", text.trim()) })?;
            nodes.push(NumaNode { id, cpus, memory_mb: mem_total_mb(&e.path().join("meminfo"))?, hugepages: hugepages_in(&e.path().join("hugepages"))? });
        }
    }
    if nodes.is_empty() {
        // No NUMA information: one node with every online CPU.
        let online = sys.join("devices/system/cpu/online");
        let cpus = match std::fs::read_to_string(&online) {
            Ok(text) => parse_cpulist(&text).ok_or_else(|| DiscoveryError::Parse { path: online, reason: format!("bad CPU list {:?}", text.trim()) })?,
            Err(_) => {
                let n = read(&proc_.join("cpuinfo"))?.lines().filter(|l| l.starts_with("processor")).count() as u32;
                (0..n.max(1)).collect()
            }
        };
        nodes.push(NumaNode { id: 0, cpus, memory_mb, hugepages: hugepages_in(&sys.join("kernel/mm/hugepages"))? });
    }
    nodes.sort_by_key(|n| n.id);
    Ok(nodes)
}

/// `/proc/cpuinfo` flag -> os-traits name (without the `HW_CPU_X86_` prefix).
const CPU_FLAG_TRAITS: &[(&str, &str)] = &[
    ("abm", "ABM"),
    ("aes", "AESNI"),
    ("avx", "AVX"),
    ("avx2", "AVX2"),
    ("avx512bw", "AVX512BW"),
    ("avx512cd", "AVX512CD"),
    ("avx512dq", "AVX512DQ"),
    ("avx512er", "AVX512ER"),
    ("avx512f", "AVX512F"),
    ("avx512pf", "AVX512PF"),
    ("avx512vl", "AVX512VL"),
    ("avx512_vnni", "AVX512VNNI"),
    ("bmi1", "BMI"),
    ("bmi2", "BMI2"),
    ("f16c", "F16C"),
    ("fma", "FMA3"),
    ("fma4", "FMA4"),
    ("mmx", "MMX"),
    ("mpx", "MPX"),
    ("pclmulqdq", "CLMUL"),
    ("pdpe1gb", "PDPE1GB"),
    ("pni", "SSE3"),
    ("sha_ni", "SHA"),
    ("sse", "SSE"),
    ("sse2", "SSE2"),
    ("sse4_1", "SSE41"),
    ("sse4_2", "SSE42"),
    ("sse4a", "SSE4A"),
    ("ssse3", "SSSE3"),
    ("svm", "SVM"),
    ("tbm", "TBM"),
    ("vmx", "VMX"),
    ("xop", "XOP"),
];

/// The CPU feature traits and model name of a cpuinfo text (first processor's flags).
pub fn cpu_traits(cpuinfo: &str) -> (Vec<String>, Option<String>) {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let flags: BTreeSet<String> = field("flags").unwrap_or_default().split_whitespace().map(str::to_string).collect();
    let mut traits: Vec<String> =
        CPU_FLAG_TRAITS.iter().filter(|(flag, _)| flags.contains(*flag)).map(|(_, t)| format!("HW_CPU_X86_{t}")).collect();
    traits.sort();
    traits.dedup();
    (traits, field("model name"))
}

/// The last path component a sysfs link points to (a PCI address for `device` and `virtfnN`).
fn link_target_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn sriov_pfs(sys: &Path, physnets: &BTreeMap<String, String>) -> Result<Vec<SriovPf>, DiscoveryError> {
    let Ok(entries) = std::fs::read_dir(sys.join("class/net")) else { return Ok(vec![]) };
    let mut pfs = Vec::new();
    for e in entries.flatten() {
        let interface = e.file_name().to_string_lossy().into_owned();
        let device = e.path().join("device");
        let total_path = device.join("sriov_totalvfs");
        if !total_path.exists() {
            continue;
        }
        let total_vfs = read_u64(&total_path)? as u32;
        let num_vfs = read_u64(&device.join("sriov_numvfs"))? as u32;
        let pci_address = link_target_name(&device).unwrap_or_default();
        let numa_node = std::fs::read_to_string(device.join("numa_node")).ok().and_then(|t| t.trim().parse::<i64>().ok()).and_then(|n| u32::try_from(n).ok());
        let mut vfs = Vec::new();
        if let Ok(dev_entries) = std::fs::read_dir(&device) {
            for d in dev_entries.flatten() {
                let name = d.file_name().to_string_lossy().into_owned();
                if let Some(index) = name.strip_prefix("virtfn").and_then(|n| n.parse::<u32>().ok()) {
                    vfs.push(SriovVf { index, pci_address: link_target_name(&d.path()).unwrap_or_default() });
                }
            }
        }
        vfs.sort_by_key(|v| v.index);
        let physnet = physnets.get(&interface).cloned();
        pfs.push(SriovPf { interface, pci_address, numa_node, total_vfs, num_vfs, physnet, vfs });
    }
    pfs.sort_by(|a, b| a.interface.cmp(&b.interface));
    Ok(pfs)
}

/// Free and total space of the file system holding `path`, in GiB.
#[allow(clippy::unnecessary_cast)] // statvfs field types differ between platforms
pub fn disk_pool(path: &Path) -> Result<DiskPool, DiscoveryError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| DiscoveryError::Statvfs { path: path.into(), source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e) })?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` points to
    // writable memory of the size statvfs(3) fills in.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(DiscoveryError::Statvfs { path: path.into(), source: std::io::Error::last_os_error() });
    }
    // SAFETY: statvfs returned 0, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    let gib = 1u64 << 30;
    let frsize = st.f_frsize as u64;
    Ok(DiskPool {
        path: path.display().to_string(),
        total_gb: st.f_blocks as u64 * frsize / gib,
        free_gb: st.f_bavail as u64 * frsize / gib,
    })
}

fn kernel_hostname(proc_: &Path) -> String {
    std::fs::read_to_string(proc_.join("sys/kernel/hostname")).map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

/// Where utmp is on this host.
pub const UTMP: &str = "/run/utmp";

/// Uptime and load averages now, from `<proc>/uptime` and `<proc>/loadavg`, with the
/// users logged in per `utmp`; `None` when procfs does not have them.
pub fn load(proc_: &Path, utmp: &Path) -> Option<HostLoad> {
    let uptime = std::fs::read_to_string(proc_.join("uptime")).ok()?;
    let uptime_secs = uptime.split_whitespace().next()?.parse::<f64>().ok()?;
    let loadavg = std::fs::read_to_string(proc_.join("loadavg")).ok()?;
    let mut fields = loadavg.split_whitespace().map(|f| f.parse::<f64>().ok());
    let load_average = [fields.next()??, fields.next()??, fields.next()??];
    Some(HostLoad { uptime_secs: uptime_secs.max(0.0) as u64, load_average, users: utmp_users(utmp) })
}

/// Users logged in: USER_PROCESS records of utmp (glibc's 384-byte records on Linux),
/// 0 when there is no utmp, as `uptime(1)` counts them.
pub fn utmp_users(path: &Path) -> u32 {
    const RECORD: usize = 384;
    const USER_PROCESS: i16 = 7;
    let Ok(bytes) = std::fs::read(path) else { return 0 };
    bytes
        .chunks_exact(RECORD)
        // ut_type is a short at offset 0, ut_user starts at offset 44.
        .filter(|r| i16::from_ne_bytes([r[0], r[1]]) == USER_PROCESS && r[44] != 0)
        .count() as u32
}

/// Discovers the host's inventory.
pub fn discover(cfg: &DiscoveryConfig) -> Result<HostInventory, DiscoveryError> {
    let sys = &cfg.sysfs_root;
    let proc_ = &cfg.procfs_root;
    let memory_mb = mem_total_mb(&proc_.join("meminfo"))?;
    let (cpu_traits, cpu_model) = cpu_traits(&read(&proc_.join("cpuinfo"))?);
    let instance_pool = if cfg.instance_pool.is_dir() { Some(disk_pool(&cfg.instance_pool)?) } else { None };
    Ok(HostInventory {
        hostname: cfg.hostname.clone().unwrap_or_else(|| kernel_hostname(proc_)),
        numa_nodes: numa_nodes(sys, proc_, memory_mb)?,
        memory_mb,
        hugepages: hugepages_in(&sys.join("kernel/mm/hugepages"))?,
        instance_pool,
        cpu_traits,
        cpu_model,
        sriov_pfs: sriov_pfs(sys, &cfg.physnets)?,
        host_ip: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists_parse() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpulist(""), Some(vec![]));
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("x"), None);
    }

    #[test]
    fn cpu_flags_map_to_os_traits() {
        let (traits, model) = cpu_traits("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 aes pclmulqdq avx512_vnni\n");
        assert_eq!(model.as_deref(), Some("Some CPU"));
        for t in ["HW_CPU_X86_AESNI", "HW_CPU_X86_AVX2", "HW_CPU_X86_SSE42", "HW_CPU_X86_SSE3", "HW_CPU_X86_CLMUL", "HW_CPU_X86_AVX512VNNI"] {
            assert!(traits.contains(&t.to_string()), "{t} in {traits:?}");
        }
        assert!(!traits.iter().any(|t| t.contains("FPU")));
    }

    #[test]
    fn the_fixture_host_is_discovered() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sysfs");
        let pool = tempfile::tempdir().unwrap();
        let cfg = DiscoveryConfig {
            sysfs_root: root.join("sys"),
            procfs_root: root.join("proc"),
            instance_pool: pool.path().into(),
            hostname: None,
            physnets: BTreeMap::from([("ens1f0".to_string(), "physnet1".to_string())]),
        };
        let inv = discover(&cfg).unwrap();
        assert_eq!(inv.hostname, "fixture-host");
        assert_eq!(inv.memory_mb, 8192);
        assert_eq!(inv.numa_nodes.len(), 2);
        assert_eq!(inv.numa_nodes[0].cpus, [0, 1]);
        assert_eq!(inv.numa_nodes[1].cpus, [2, 3]);
        assert_eq!(inv.numa_nodes[0].memory_mb, 4096);
        assert_eq!(inv.numa_nodes[0].hugepages, [HugepagePool { size_kb: 2048, total: 8, free: 6 }]);
        assert_eq!(inv.hugepages, [HugepagePool { size_kb: 2048, total: 8, free: 6 }, HugepagePool { size_kb: 1048576, total: 0, free: 0 }]);
        assert!(inv.instance_pool.is_some());
        assert!(inv.cpu_traits.contains(&"HW_CPU_X86_AVX512F".to_string()));
        assert_eq!(inv.cpu_model.as_deref(), Some("Fixture CPU @ 2.00GHz"));
        assert_eq!(inv.sriov_pfs.len(), 1, "only ens1f0 is SR-IOV capable: {:?}", inv.sriov_pfs);
        let pf = &inv.sriov_pfs[0];
        assert_eq!(pf.interface, "ens1f0");
        assert_eq!(pf.pci_address, "0000:03:00.0");
        assert_eq!((pf.total_vfs, pf.num_vfs, pf.numa_node), (8, 2, Some(0)));
        assert_eq!(pf.physnet.as_deref(), Some("physnet1"));
        assert_eq!(pf.vfs, [SriovVf { index: 0, pci_address: "0000:03:02.0".into() }, SriovVf { index: 1, pci_address: "0000:03:02.1".into() }]);
    }

    #[test]
    fn a_host_without_numa_information_is_one_node() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let proc_ = dir.path().join("proc");
        std::fs::create_dir_all(sys.join("devices/system/cpu")).unwrap();
        std::fs::create_dir_all(&proc_).unwrap();
        std::fs::write(sys.join("devices/system/cpu/online"), "0-5\n").unwrap();
        std::fs::write(proc_.join("meminfo"), "MemTotal: 2097152 kB\n").unwrap();
        std::fs::write(proc_.join("cpuinfo"), "processor : 0\nflags : sse\n").unwrap();
        let cfg = DiscoveryConfig { sysfs_root: sys, procfs_root: proc_, instance_pool: dir.path().join("none"), hostname: Some("h".into()), physnets: BTreeMap::new() };
        let inv = discover(&cfg).unwrap();
        assert_eq!(inv.numa_nodes.len(), 1);
        assert_eq!(inv.numa_nodes[0].cpus.len(), 6);
        assert_eq!(inv.numa_nodes[0].memory_mb, 2048);
        assert_eq!(inv.instance_pool, None);
        assert!(inv.sriov_pfs.is_empty());
    }

    #[test]
    fn uptime_load_and_users_are_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), &dir.path().join("utmp")), None);
        std::fs::write(dir.path().join("uptime"), "90061.52 170000.00\n").unwrap();
        std::fs::write(dir.path().join("loadavg"), "0.20 0.16 0.11 1/123 4567\n").unwrap();
        let mut utmp = vec![0u8; 384 * 3];
        for (i, kind) in [(0usize, 2i16), (1, 7), (2, 7)] {
            utmp[i * 384..i * 384 + 2].copy_from_slice(&kind.to_ne_bytes());
            utmp[i * 384 + 44] = b'u';
        }
        std::fs::write(dir.path().join("utmp"), &utmp).unwrap();
        let l = load(dir.path(), &dir.path().join("utmp")).unwrap();
        assert_eq!(l, HostLoad { uptime_secs: 90061, load_average: [0.20, 0.16, 0.11], users: 2 });
        assert_eq!(utmp_users(&dir.path().join("missing")), 0);
    }

    #[test]
    fn the_instance_pool_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        let pool = disk_pool(dir.path()).unwrap();
        assert!(pool.total_gb >= pool.free_gb);
        assert!(disk_pool(&dir.path().join("missing")).is_err());
    }
}
