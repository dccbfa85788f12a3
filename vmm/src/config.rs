//! The VM configuration file (JSON or TOML) the `vmm` process starts from.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("Cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file is not valid JSON.
    #[error("Invalid JSON config: {0}")]
    Json(#[from] serde_json::Error),
    /// The file is not valid TOML.
    #[error("Invalid TOML config: {0}")]
    Toml(#[from] toml::de::Error),
    /// A value is out of range or inconsistent.
    #[error("Invalid config: {0}")]
    Invalid(String),
}

/// The whole VM description.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs, memory and placement.
    #[serde(default)]
    pub machine: MachineConfig,
    /// What to boot. Absent when restoring from a snapshot.
    #[serde(default)]
    pub boot: Option<BootConfig>,
    /// Where the serial console goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// The control API socket; the state file lies beside it.
    #[serde(default)]
    pub api: Option<ApiConfig>,
    /// virtio-blk disks, in the order the guest sees them.
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    /// virtio-net interfaces.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// A virtio-rng device.
    #[serde(default)]
    pub rng: Option<RngConfig>,
    /// A virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
}

/// How guest memory is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryBackend {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// 2 MiB hugetlbfs pages (MAP_HUGETLB | MAP_HUGE_2MB).
    #[serde(rename = "hugetlb-2m")]
    Hugetlb2m,
    /// 1 GiB hugetlbfs pages.
    #[serde(rename = "hugetlb-1g")]
    Hugetlb1g,
    /// A shared mapping of `memory_file` (needed for vhost-user).
    File,
}

/// vCPUs, memory and placement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (1..=32).
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_mem")]
    pub memory_mib: u64,
    /// How guest memory is backed.
    #[serde(default)]
    pub memory_backend: MemoryBackend,
    /// Backing file for `memory_backend = "file"` (created if missing).
    #[serde(default)]
    pub memory_file: Option<PathBuf>,
    /// Map anonymous or hugepage memory shared, from a memfd, so that a
    /// vhost-user backend can map it too.
    #[serde(default)]
    pub memory_shared: bool,
    /// Bind guest memory to this host NUMA node (mbind, MPOL_BIND).
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// Host CPU for each vCPU thread, by vCPU index.
    #[serde(default)]
    pub vcpu_pin: Vec<usize>,
    /// Install a seccomp filter on every thread before the guest runs.
    #[serde(default = "yes")]
    pub seccomp: bool,
}

fn one() -> u8 {
    1
}
fn yes() -> bool {
    true
}
fn default_mem() -> u64 {
    128
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: 1,
            memory_mib: default_mem(),
            memory_backend: MemoryBackend::Anonymous,
            memory_file: None,
            memory_shared: false,
            numa_node: None,
            vcpu_pin: Vec::new(),
            seccomp: true,
        }
    }
}

/// The kernel to boot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// ELF (vmlinux or any 64-bit ELF) or bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends the virtio-mmio device list.
    #[serde(default)]
    pub cmdline: String,
}

/// Serial console output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Log file the console is written to (none: discarded).
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Size cap of the log; on reaching it the file moves to `<log>.1`.
    #[serde(default = "default_log_cap")]
    pub max_bytes: u64,
    /// Also copy console output to the process's stdout.
    #[serde(default)]
    pub stdout: bool,
}

fn default_log_cap() -> u64 {
    1 << 20
}

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig { log: None, max_bytes: default_log_cap(), stdout: false }
    }
}

/// The control API socket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Unix socket path; the state file is `<socket>.state.json`.
    pub socket: PathBuf,
}

/// A token bucket: `size` tokens, refilled over `refill_ms` milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Bucket size (bytes or operations).
    pub size: u64,
    /// Time in milliseconds to refill an empty bucket.
    pub refill_ms: u64,
}

/// Limits on a device's bandwidth and operation rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Bytes.
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests (block) or frames (net).
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

/// A virtio-blk disk backed by a raw file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Name used in the API and counters.
    pub id: String,
    /// Raw image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
    /// Optional rate limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// A virtio-net interface.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Name used in the API and counters.
    pub id: String,
    /// Host tap device (created if missing, as a persistent tap it is not).
    #[serde(default)]
    pub tap: Option<String>,
    /// vhost-user backend socket (the VMM is the frontend).
    #[serde(default)]
    pub vhost_user_socket: Option<PathBuf>,
    /// Guest MAC address, "52:54:00:12:34:56".
    #[serde(default)]
    pub mac: Option<String>,
    /// Optional rate limit on each direction.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// The entropy device.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Optional rate limit (bytes).
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// The vsock device: guest connections go to a unix socket on the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context id (3 or more).
    pub guest_cid: u64,
    /// Host-side unix socket prefix: a guest connect to port P goes to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

impl VmConfig {
    /// Reads a config from a file; `.toml` files are TOML, everything else JSON.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        let cfg = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text)?
        } else {
            serde_json::from_str(&text)?
        };
        Ok(cfg)
    }

    /// Checks ranges and consistency before anything is created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let m = &self.machine;
        if m.vcpus == 0 || m.vcpus > 32 {
            return bad(format!("vcpus must be 1..=32, not {}", m.vcpus));
        }
        if m.memory_mib < 16 || m.memory_mib > 1 << 20 {
            return bad(format!("memory_mib must be 16..=1048576, not {}", m.memory_mib));
        }
        if m.memory_backend == MemoryBackend::File && m.memory_file.is_none() {
            return bad("memory_backend \"file\" needs memory_file".into());
        }
        if m.memory_backend == MemoryBackend::Hugetlb2m && !m.memory_mib.is_multiple_of(2) {
            return bad("2 MiB hugepages need memory_mib to be a multiple of 2".into());
        }
        if m.memory_backend == MemoryBackend::Hugetlb1g && !m.memory_mib.is_multiple_of(1024) {
            return bad("1 GiB hugepages need memory_mib to be a multiple of 1024".into());
        }
        if !m.vcpu_pin.is_empty() && m.vcpu_pin.len() != m.vcpus as usize {
            return bad("vcpu_pin must name one host CPU per vCPU".into());
        }
        let mut ids = std::collections::HashSet::new();
        for b in &self.block {
            if !ids.insert(b.id.as_str()) {
                return bad(format!("duplicate device id {}", b.id));
            }
        }
        for n in &self.net {
            if !ids.insert(n.id.as_str()) {
                return bad(format!("duplicate device id {}", n.id));
            }
            if n.tap.is_some() == n.vhost_user_socket.is_some() {
                return bad(format!("net {} needs exactly one of tap and vhost_user_socket", n.id));
            }
            if let Some(mac) = &n.mac {
                parse_mac(mac).map_err(ConfigError::Invalid)?;
            }
            if n.vhost_user_socket.is_some() && m.memory_backend != MemoryBackend::File && !m.memory_shared {
                return bad(format!(
                    "net {}: vhost-user needs shared guest memory (memory_backend \"file\" or memory_shared = true)",
                    n.id
                ));
            }
            if n.vhost_user_socket.is_some() && n.rate_limit.is_some() {
                return bad(format!("net {}: a vhost-user backend does its own rate limiting", n.id));
            }
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 {
                return bad("vsock guest_cid must be 3 or more".into());
            }
        }
        Ok(())
    }
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("MAC address {s} must have six octets"));
    }
    for (i, p) in parts.iter().enumerate() {
        mac[i] = u8::from_str_radix(p, 16).map_err(|_| format!("MAC address {s} is not hex"))?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_read_the_same() {
        let dir = std::env::temp_dir().join(format!("vmm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = dir.join("a.toml");
        std::fs::write(
            &t,
            "[machine]\nvcpus = 2\nmemory_mib = 64\n[boot]\nkernel = \"/k\"\ncmdline = \"x\"\n\
             [[block]]\nid = \"d\"\npath = \"/d\"\nread_only = true\n",
        )
        .unwrap();
        let a = VmConfig::from_file(&t).unwrap();
        let j = dir.join("a.json");
        std::fs::write(&j, serde_json::to_string(&a).unwrap()).unwrap();
        let b = VmConfig::from_file(&j).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.machine.vcpus, 2);
        assert!(a.block[0].read_only);
        a.validate().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn validation_rejects_nonsense() {
        let mut c = VmConfig::default();
        c.machine.vcpus = 0;
        assert!(c.validate().is_err());
        let mut c = VmConfig::default();
        c.net.push(NetConfig {
            id: "n".into(),
            tap: None,
            vhost_user_socket: None,
            mac: None,
            rate_limit: None,
        });
        assert!(c.validate().unwrap_err().to_string().contains("exactly one"));
        assert!(parse_mac("52:54:00:00:00:zz").is_err());
        assert_eq!(parse_mac("52:54:00:00:00:01").unwrap()[5], 1);
    }
}
