//! A private Open vSwitch: ovsdb-server and ovs-vswitchd started in a run
//! directory of their own (optionally inside a network namespace), stopped
//! and removed on drop. Tests and the benchmark use it so that they never
//! touch a system-wide OVS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting a private OVS.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// A command could not be run or failed.
    #[error("{what}: {detail}")]
    Command {
        /// What was being done.
        what: String,
        /// Its error output.
        detail: String,
    },
    /// A daemon did not come up in time.
    #[error("{0} did not start; its log: {1}")]
    Timeout(&'static str, String),
}

/// How to start the private OVS.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// Run directory (database, sockets, logs, pid files); created, and removed on drop.
    pub dir: PathBuf,
    /// The ovs-vswitchd binary (the plain one or the DPDK build).
    pub vswitchd: PathBuf,
    /// Network namespace to run ovs-vswitchd in (its tap and netdev ports live there).
    pub netns: Option<String>,
    /// `Open_vSwitch` other_config keys set before ovs-vswitchd starts (dpdk-init, pmd-cpu-mask, ...).
    pub other_config: Vec<(String, String)>,
}

impl InstanceConfig {
    /// The plain userspace build of ovs-vswitchd, in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> InstanceConfig {
        let plain = PathBuf::from("/usr/lib/openvswitch-switch/ovs-vswitchd");
        InstanceConfig { dir: dir.into(), vswitchd: if plain.exists() { plain } else { PathBuf::from("ovs-vswitchd") }, netns: None, other_config: Vec::new() }
    }
}

/// A running private OVS.
pub struct Instance {
    cfg: InstanceConfig,
    ovsdb: Option<Child>,
    vswitchd: Option<Child>,
}

fn run(what: &str, cmd: &mut Command) -> Result<String, InstanceError> {
    let out = cmd.output().map_err(|e| InstanceError::Command { what: what.to_string(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(InstanceError::Command { what: what.to_string(), detail: String::from_utf8_lossy(&out.stderr).into_owned() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_path(p: &Path, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn stop(child: &mut Child) {
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Instance {
    /// Creates the database and starts both daemons; returns once ovs-vswitchd answers.
    pub fn start(cfg: InstanceConfig) -> Result<Instance, InstanceError> {
        let d = &cfg.dir;
        std::fs::create_dir_all(d).map_err(|e| InstanceError::Command { what: format!("creating {}", d.display()), detail: e.to_string() })?;
        let db = d.join("conf.db");
        let _ = std::fs::remove_file(&db);
        run("ovsdb-tool create", Command::new("ovsdb-tool").arg("create").arg(&db).arg("/usr/share/openvswitch/vswitch.ovsschema"))?;
        let mut inst = Instance { cfg: cfg.clone(), ovsdb: None, vswitchd: None };
        let env = |c: &mut Command| {
            c.env("OVS_RUNDIR", d).env("OVS_DBDIR", d).env("OVS_LOGDIR", d).env("OVS_PKGDATADIR", "/usr/share/openvswitch");
        };
        let mut c = Command::new("ovsdb-server");
        env(&mut c);
        c.arg(&db)
            .arg(format!("--remote=punix:{}", d.join("db.sock").display()))
            .arg(format!("--unixctl={}", d.join("ovsdb-server.ctl").display()))
            .arg(format!("--pidfile={}", d.join("ovsdb-server.pid").display()))
            .arg(format!("--log-file={}", d.join("ovsdb-server.log").display()))
            .arg("--no-chdir")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        inst.ovsdb = Some(c.spawn().map_err(|e| InstanceError::Command { what: "ovsdb-server".into(), detail: e.to_string() })?);
        if !wait_path(&d.join("db.sock"), Duration::from_secs(10)) {
            return Err(InstanceError::Timeout("ovsdb-server", std::fs::read_to_string(d.join("ovsdb-server.log")).unwrap_or_default()));
        }
        let dbarg = format!("--db=unix:{}", d.join("db.sock").display());
        run("ovs-vsctl init", Command::new("ovs-vsctl").arg(&dbarg).args(["--no-wait", "init"]))?;
        for (k, v) in &cfg.other_config {
            run("ovs-vsctl set other_config", Command::new("ovs-vsctl").arg(&dbarg).args(["--no-wait", "set", "Open_vSwitch", ".", &format!("other_config:{k}={v}")]))?;
        }
        let mut c = match &cfg.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&cfg.vswitchd);
                c
            }
            None => Command::new(&cfg.vswitchd),
        };
        env(&mut c);
        c.arg(format!("unix:{}", d.join("db.sock").display()))
            .arg(format!("--unixctl={}", d.join("ovs-vswitchd.ctl").display()))
            .arg(format!("--pidfile={}", d.join("ovs-vswitchd.pid").display()))
            .arg(format!("--log-file={}", d.join("ovs-vswitchd.log").display()))
            .arg("--no-chdir")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        inst.vswitchd = Some(c.spawn().map_err(|e| InstanceError::Command { what: "ovs-vswitchd".into(), detail: e.to_string() })?);
        let t = Instant::now();
        loop {
            if inst.appctl(&["version"]).is_ok() {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(InstanceError::Timeout("ovs-vswitchd", inst.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(inst)
    }

    /// The database socket for [`super::ovsdb::Ovsdb::connect`].
    pub fn db_socket(&self) -> PathBuf {
        self.cfg.dir.join("db.sock")
    }

    /// The run directory (bridge management sockets, vhost-user sockets).
    pub fn rundir(&self) -> &Path {
        &self.cfg.dir
    }

    /// The process id of ovs-vswitchd (from its pidfile), to find its PMD threads.
    pub fn vswitchd_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.cfg.dir.join("ovs-vswitchd.pid")).ok()?.trim().parse().ok()
    }

    /// Runs `ovs-appctl` against this ovs-vswitchd.
    pub fn appctl(&self, args: &[&str]) -> Result<String, InstanceError> {
        run("ovs-appctl", Command::new("ovs-appctl").arg("-t").arg(self.cfg.dir.join("ovs-vswitchd.ctl")).args(args))
    }

    /// The tail of ovs-vswitchd's log.
    pub fn log(&self) -> String {
        let s = std::fs::read_to_string(self.cfg.dir.join("ovs-vswitchd.log")).unwrap_or_default();
        let start = s.len().saturating_sub(4000);
        s[s.floor_char_boundary(start)..].to_string()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.vswitchd.take() {
            stop(&mut c);
        }
        if let Some(mut c) = self.ovsdb.take() {
            stop(&mut c);
        }
        let _ = std::fs::remove_dir_all(&self.cfg.dir);
    }
}
