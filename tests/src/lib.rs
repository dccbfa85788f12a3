//! Helpers for the cross-crate tests: start coordinators and agents as real
//! processes, run the real `openstack` CLI against them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Password the tests bootstrap the admin user with.
pub const ADMIN_PASSWORD: &str = "systest-admin";

/// Directory holding the workspace's binaries (`EDGECLOUD_BIN_DIR`, else `target/debug`).
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("EDGECLOUD_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
    }
}

/// Path of one of the workspace's binaries; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.is_file(), "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)", p.display());
    p
}

/// The `openstack` CLI, or None (with a SKIPPED line) when it is not installed and not required.
pub fn openstack_cli() -> Option<PathBuf> {
    let configured = std::env::var_os("EDGECLOUD_OPENSTACK_CLI").map(PathBuf::from);
    let candidate = configured.clone().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/openstack"));
    if candidate.is_file() {
        return Some(candidate);
    }
    if configured.is_some() {
        panic!("EDGECLOUD_OPENSTACK_CLI names {} but it does not exist", candidate.display());
    }
    println!("SKIPPED: the openstack CLI is not installed (scripts/test installs it into .venv)");
    None
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Sends SIGTERM and waits for the process to exit.
    pub fn stop(&mut self) {
        // SAFETY: kill(2) with a pid we own; at worst it fails with ESRCH.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Starts a program with its output in `log`.
pub fn spawn(program: &Path, args: &[String], env: &[(String, String)], log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc { child: cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display())), log }
}

/// Waits until `url` answers 200.
pub fn wait_ready(url: &str, p: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::blocking::get(url) {
            if r.status().is_success() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} did not become ready; log:\n{}", p.log_text());
}

/// Store arguments for a coordinator: the embedded store in `dir`, or etcd.
pub fn store_args(dir: &Path, etcd: Option<&str>) -> Vec<String> {
    match etcd {
        Some(url) => vec!["--store".into(), "etcd".into(), "--etcd-endpoints".into(), url.into()],
        None => vec!["--store".into(), "embedded".into(), "--store-path".into(), dir.join("store.redb").display().to_string()],
    }
}

/// Runs `coordinator bootstrap` against a store.
pub fn bootstrap(store: &[String], public_url: &str) {
    let mut args = store.to_vec();
    args.extend(["--public-url".into(), public_url.into(), "bootstrap".into(), "--admin-password".into(), ADMIN_PASSWORD.into()]);
    let out = Command::new(bin("coordinator")).args(&args).output().unwrap();
    assert!(out.status.success(), "bootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A URL on a free loopback port, for a coordinator about to be bootstrapped and started.
pub fn free_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// Starts a coordinator replica serving at `url` (from [`free_url`]); waits until it is healthy.
pub fn coordinator(dir: &Path, store: &[String], name: &str, url: &str, extra: &[&str]) -> Proc {
    let port = url.rsplit(':').next().unwrap();
    let url = url.to_string();
    let mut args = store.to_vec();
    args.extend(["--listen".into(), format!("127.0.0.1:{port}"), "--public-url".into(), url.clone()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("serve".into());
    let p = spawn(&bin("coordinator"), &args, &[("RUST_LOG".into(), "info".into())], dir.join(format!("{name}.log")));
    wait_ready(&format!("{url}/healthz"), &p);
    p
}

/// Credentials the `openstack` CLI is run with.
#[derive(Clone)]
pub struct Cloud {
    pub cli: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Cloud {
    /// Password credentials for `user` on `project` (Default domain).
    pub fn password(cli: &Path, url: &str, user: &str, password: &str, project: &str) -> Cloud {
        let env = [
            ("OS_AUTH_URL", format!("{url}/v3")),
            ("OS_USERNAME", user.into()),
            ("OS_PASSWORD", password.into()),
            ("OS_PROJECT_NAME", project.into()),
            ("OS_USER_DOMAIN_NAME", "Default".into()),
            ("OS_PROJECT_DOMAIN_NAME", "Default".into()),
            ("OS_IDENTITY_API_VERSION", "3".into()),
            ("OS_REGION_NAME", "RegionOne".into()),
        ];
        Cloud { cli: cli.to_path_buf(), env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect() }
    }

    /// Runs `openstack ARGS` and returns its output, whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.cli);
        cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("HOME", std::env::temp_dir());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("run the openstack CLI")
    }

    /// Runs `openstack ARGS`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "openstack {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `openstack ARGS -f json`, asserting success; returns the parsed output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-f", "json"]);
        let text = self.ok(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("openstack {}: not JSON ({e}): {text}", args.join(" ")))
    }

    /// Runs `openstack ARGS`, asserting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "openstack {} should have failed but printed: {}", args.join(" "), String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}
