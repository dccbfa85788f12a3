//! Test harness: runs the `vmm` binary on the test guest in a private
//! directory, reads its console, talks to its API, and cleans up on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Returns why VMs cannot run here, printing it, or None when they can.
pub fn skip_reason() -> Option<String> {
    let r = vmm::vstate::kvm::unavailable_reason();
    if let Some(r) = &r {
        eprintln!("SKIPPED: KVM is not usable here: {r}");
    }
    r
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short name for interfaces and namespaces.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100000, SEQ.fetch_add(1, Ordering::Relaxed))
}

/// A private directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(unique(&format!("vmm-test-{tag}-")));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running VMM process, killed on drop.
pub struct TestVm {
    pub child: Option<Child>,
    pub console: PathBuf,
    pub socket: PathBuf,
    pub stderr: PathBuf,
}

impl TestVm {
    /// Starts `vmm` with `args` (prefix is e.g. `ip netns exec NS`).
    pub fn spawn(prefix: &[&str], args: &[&str], dir: &TempDir, console: &Path, socket: &Path) -> Self {
        let stderr = dir.path(&unique("stderr-"));
        let err = std::fs::File::create(&stderr).unwrap();
        let mut cmd = if prefix.is_empty() {
            Command::new(VMM)
        } else {
            let mut c = Command::new(prefix[0]);
            c.args(&prefix[1..]).arg(VMM);
            c
        };
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
        let child = cmd.spawn().expect("start vmm");
        TestVm { child: Some(child), console: console.into(), socket: socket.into(), stderr }
    }

    /// Boots `config` (written as JSON into `dir`).
    pub fn boot(dir: &TempDir, config: &serde_json::Value) -> Self {
        Self::boot_in(&[], dir, config)
    }

    /// Boots `config` under a command prefix.
    pub fn boot_in(prefix: &[&str], dir: &TempDir, config: &serde_json::Value) -> Self {
        let path = dir.path("vm.json");
        std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        let console = PathBuf::from(config["serial"]["log"].as_str().unwrap());
        let socket = config["api"]["socket"].as_str().map(PathBuf::from).unwrap_or_default();
        Self::spawn(prefix, &["--config", path.to_str().unwrap()], dir, &console, &socket)
    }

    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).to_string()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the console contains `needle`; panics with the console on timeout.
    pub fn wait_for(&mut self, needle: &str, secs: u64) -> String {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.console_text();
            // The guest prints slowly: wait until the line holding the needle is complete.
            if line_done(&t, needle) {
                return t;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    let t = self.console_text();
                    if t.contains(needle) {
                        return t;
                    }
                    panic!("vmm exited ({st}) before {needle:?}\nconsole:\n{t}\nstderr:\n{}", self.stderr_text());
                }
            }
            if Instant::now() > end {
                panic!("Timed out waiting for {needle:?}\nconsole:\n{t}\nstderr:\n{}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to end.
    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let end = Instant::now() + Duration::from_secs(secs);
        let c = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if Instant::now() > end {
                panic!("vmm did not exit\nconsole:\n{}\nstderr:\n{}", self.console_text(), self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the API socket's state file.
    pub fn wait_api(&mut self, secs: u64) {
        let end = Instant::now() + Duration::from_secs(secs);
        while !vmm::state_file::path_for(&self.socket).exists() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("vmm exited ({st}) before its API came up\nstderr:\n{}", self.stderr_text());
                }
            }
            assert!(Instant::now() < end, "API did not come up\nstderr:\n{}", self.stderr_text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One API call; returns (status, parsed JSON or Null).
    pub fn api(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        let (st, b) = vmm::api::http::call(&self.socket, method, path, body.as_ref()).expect("API call");
        (st, serde_json::from_slice(&b).unwrap_or(serde_json::Value::String(String::from_utf8_lossy(&b).into())))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A network namespace deleted on drop.
pub struct NetNs(pub String);

impl NetNs {
    pub fn new() -> Option<Self> {
        let name = unique("vmmt");
        let ok = Command::new("ip").args(["netns", "add", &name]).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED: cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        let ns = NetNs(name);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// Runs a command inside; returns success.
    pub fn run(&self, cmd: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// The command prefix that runs something inside.
    pub fn prefix(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.0.clone()]
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// FNV-1a 32, as the guest computes it.
pub fn fnv1a(b: &[u8]) -> u32 {
    let mut h: u32 = 2166136261;
    for x in b {
        h ^= u32::from(*x);
        h = h.wrapping_mul(16777619);
    }
    h
}

/// A disk image of `sectors` pseudo-random sectors.
pub fn make_disk(path: &Path, sectors: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    let bytes: Vec<u8> = (0..sectors * 512)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8 | 1
        })
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// A config for the test guest.
pub fn guest_config(dir: &TempDir, kernel: &str, cmdline: &str) -> serde_json::Value {
    serde_json::json!({
        "machine": { "vcpus": 1, "memory_mib": 64 },
        "boot": { "kernel": kernel, "cmdline": cmdline },
        "serial": { "log": dir.path("console.log") },
    })
}

const NR: &str = "/proc/sys/vm/nr_hugepages";

pub fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

/// Reserves hugepages for the test; gives back what it added on drop (unless
/// someone else changed the count meanwhile).
pub struct HugePages {
    before: u64,
    set: Option<u64>,
}

impl HugePages {
    pub fn reserve(pages: u64) -> Option<Self> {
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


/// Whether `text` holds `needle` followed, somewhere after it, by the end of its line.
fn line_done(text: &str, needle: &str) -> bool {
    text.find(needle).is_some_and(|at| text[at + needle.len()..].contains('\n'))
}
