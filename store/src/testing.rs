//! Test support for every crate: a throwaway etcd server.
//!
//! [`EtcdServer::start`] runs the `etcd` binary (Debian's etcd-server installs
//! `/usr/bin/etcd`; env `EDGECLOUD_ETCD_BIN` names another) on free loopback
//! ports with its data in a temporary directory, and waits until it answers.
//! Dropping the server kills etcd and removes the directory. [`EtcdServer::stop`]
//! and [`EtcdServer::restart`] kill it and bring it back on the same data
//! directory and ports, for reconnect tests.
//!
//! Tests that need etcd call [`EtcdServer::start_or_skip`]: when etcd is not
//! installed it prints `SKIPPED: etcd not installed` and returns `None`, unless
//! env `EDGECLOUD_REQUIRE_ETCD=1` is set (as `scripts/test` does), in which case
//! it panics so the test fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Env variable naming the etcd binary to run instead of `/usr/bin/etcd`.
pub const ETCD_BIN_ENV: &str = "EDGECLOUD_ETCD_BIN";
/// Env variable that turns "etcd not installed" from a skip into a failure.
pub const REQUIRE_ETCD_ENV: &str = "EDGECLOUD_REQUIRE_ETCD";

/// How long etcd may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of starting and stopping a test etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    /// The etcd binary is missing.
    #[error("etcd is not installed: {0} not found (install the Debian package etcd-server or set EDGECLOUD_ETCD_BIN)")]
    NotInstalled(PathBuf),
    /// Creating the directory, the log file or the process failed.
    #[error("Cannot run etcd")]
    Io(#[from] std::io::Error),
    /// etcd exited while starting.
    #[error("etcd exited while starting ({status}); its log ends with:\n{log}")]
    Exited {
        /// How it exited.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// etcd did not answer its health check in time.
    #[error("etcd did not become healthy within {secs} s; its log ends with:\n{log}")]
    NotReady {
        /// How long we waited.
        secs: u64,
        /// The end of its log.
        log: String,
    },
}

/// A running (or stopped) etcd with its own data directory; killed and removed on drop.
pub struct EtcdServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports in a new temporary directory and
    /// waits until it reports healthy.
    pub fn start() -> Result<EtcdServer, EtcdServerError> {
        let bin = etcd_binary();
        if !bin.is_file() {
            return Err(EtcdServerError::NotInstalled(bin));
        }
        let dir = tempfile::Builder::new().prefix("edgecloud-etcd-").tempdir()?;
        let mut server = EtcdServer { bin, dir, client_port: 0, peer_port: 0, child: None };
        // Free ports can be taken by someone else between our probe and etcd's
        // bind; try a few pairs.
        let mut last = None;
        for _ in 0..5 {
            server.client_port = free_port()?;
            server.peer_port = free_port()?;
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e @ EtcdServerError::Exited { .. }) if e.to_string().contains("address already in use") => {
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(EtcdServerError::NotReady { secs: 0, log: String::new() }))
    }

    /// Starts etcd for a test, or returns `None` after printing
    /// `SKIPPED: etcd not installed` when it is missing and
    /// `EDGECLOUD_REQUIRE_ETCD=1` is not set.
    ///
    /// # Panics
    /// When etcd is missing and required, or installed but failing to start:
    /// both are test failures.
    pub fn start_or_skip() -> Option<EtcdServer> {
        match EtcdServer::start() {
            Ok(s) => Some(s),
            Err(e @ EtcdServerError::NotInstalled(_)) => {
                if std::env::var(REQUIRE_ETCD_ENV).is_ok_and(|v| v == "1") {
                    panic!("{e} and {REQUIRE_ETCD_ENV}=1 requires it");
                }
                println!("SKIPPED: etcd not installed ({e})");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The client URL, such as `http://127.0.0.1:23790`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client URLs, as [`crate::etcd::EtcdStore::connect`] takes them.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The data directory (kept across [`stop`](Self::stop) and [`restart`](Self::restart)).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The file etcd's output goes to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Whether etcd is running (started and not stopped).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Connects an [`EtcdStore`](crate::etcd::EtcdStore) to this server.
    pub async fn store(&self) -> crate::Result<crate::etcd::EtcdStore> {
        crate::etcd::EtcdStore::connect(&self.endpoints()).await
    }

    /// Kills etcd (SIGKILL, as a crash) and waits for it to exit; the data stays.
    pub fn stop(&mut self) -> Result<(), EtcdServerError> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    /// Starts etcd again on the same data directory and ports; stops it first if running.
    pub fn restart(&mut self) -> Result<(), EtcdServerError> {
        self.stop()?;
        // The kernel may hold the old listening port for a moment; retry.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch() {
                Err(e @ EtcdServerError::Exited { .. })
                    if e.to_string().contains("address already in use") && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    fn launch(&mut self) -> Result<(), EtcdServerError> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("test={peer}"))
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_tied_to_process(cmd)?;
        self.child = Some(child);
        let started = Instant::now();
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(EtcdServerError::Exited { status: status.to_string(), log: self.log_tail() });
                }
            }
            if healthy(addr) {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let _ = self.stop();
                return Err(EtcdServerError::NotReady { secs: READY_TIMEOUT.as_secs(), log: self.log_tail() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.stop();
        // The temporary directory removes itself after this.
    }
}

impl std::fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdServer").field("endpoint", &self.endpoint()).field("dir", &self.dir.path()).finish()
    }
}

fn etcd_binary() -> PathBuf {
    match std::env::var_os(ETCD_BIN_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new("/usr/bin/etcd").to_path_buf(),
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Asks etcd's `/health` endpoint whether it serves requests.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` so that it gets SIGKILL when this test process dies, even
/// when the process is killed before any destructor runs.
///
/// Linux sends the parent-death signal when the *thread* that forked the child
/// exits, so every child is forked from one thread that lives as long as the
/// process.
fn spawn_tied_to_process(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("cannot start the etcd spawner thread: {e}"));
        Mutex::new(tx)
    });
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the async-signal-safe prctl system call.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    let sent = spawner.lock().unwrap_or_else(|p| p.into_inner()).send((cmd, reply_tx));
    if let Err(mpsc::SendError((mut cmd, _))) = sent {
        // No spawner thread: spawn here; the child then dies with this thread.
        return cmd.spawn();
    }
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the etcd spawner thread is gone"))?
}
