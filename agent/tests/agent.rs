//! The agent binary against a coordinator served in-process (embedded store):
//! enrolment, inventory from the fixture host (and its re-report on change), down on kill within the lease TTL,
//! back up with the same identity on restart, a join token that works once, and a
//! clean exit on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::hosts::registry;
use coordinator::placement::db;
use coordinator::testing::TestSite;
use store::embedded::EmbeddedStore;

/// Heartbeat lease TTL of the test site.
const TTL_SECS: i64 = 3;

/// An agent process, killed when dropped.
struct AgentProc {
    child: Child,
    log: PathBuf,
}

impl AgentProc {
    /// Starts an agent whose host is the fixture copy under `dir/host` (see [`host_fixture`]).
    fn start(url: &str, dir: &Path, join_token: Option<&str>, log_name: &str) -> AgentProc {
        let fixture = dir.join("host");
        let pool = dir.join("pool");
        std::fs::create_dir_all(&pool).unwrap();
        let config = dir.join("agent.toml");
        std::fs::write(&config, "hostname = \"edge-e2e\"\ninventory_interval = 1\n[physnets]\nens1f0 = \"physnet1\"\n").unwrap();
        let log = dir.join(log_name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent"));
        cmd.arg("--coordinator").arg(url).arg("--state-dir").arg(dir.join("state")).arg("--config").arg(&config);
        cmd.arg("--sysfs-root").arg(fixture.join("sys")).arg("--procfs-root").arg(fixture.join("proc")).arg("--instance-pool").arg(&pool);
        if let Some(t) = join_token {
            cmd.arg("--join-token").arg(t);
        }
        cmd.env_remove("AGENT_JOIN_TOKEN").env("RUST_LOG", "info");
        cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        AgentProc { child: cmd.spawn().expect("start the agent"), log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; at worst it fails with ESRCH.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the process to exit; None if it still runs after `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the fixture host (links and all) to `dir/host`, so a test may change it.
fn host_fixture(dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sysfs");
    let status = Command::new("cp").arg("-a").arg(&src).arg(dir.join("host")).status().unwrap();
    assert!(status.success());
}

/// Polls `check` every 100 ms until it holds; panics with `what` and the agent's log after `limit`.
async fn wait_until<F, Fut>(what: &str, limit: Duration, agent: &AgentProc, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what}: not after {limit:?}\nagent log:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrols_reports_goes_down_when_killed_and_comes_back_as_the_same_host() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    let site = TestSite::start(store, |c| c.hosts.heartbeat_ttl_secs = TTL_SECS).await;
    let store = site.state.store.clone();
    let token = coordinator::hosts::create_join_token(store.as_ref(), 600, None).await.unwrap();

    host_fixture(dir.path());
    // Uptime and load averages, as procfs shows them (the shared fixture has none).
    std::fs::write(dir.path().join("host/proc/uptime"), "93784.25 180000.00\n").unwrap();
    std::fs::write(dir.path().join("host/proc/loadavg"), "0.75 0.50 0.25 2/345 6789\n").unwrap();
    // First start: enrol with the token, report the fixture host's inventory, heartbeat.
    let agent = AgentProc::start(&site.url, dir.path(), Some(&token), "agent-1.log");
    wait_until("host enrolled and up", Duration::from_secs(30), &agent, || async {
        registry::list(store.as_ref()).await.unwrap().iter().any(|h| h.record.hostname == "edge-e2e" && h.up)
    })
    .await;
    let host = registry::list(store.as_ref()).await.unwrap().remove(0);
    let host_id = host.record.id.clone();
    let root: uuid::Uuid = host_id.parse().unwrap();
    wait_until("inventory in placement", Duration::from_secs(10), &agent, || async {
        db::get_tree(store.as_ref(), &root).await.map(|t| t.len() == 4).unwrap_or(false)
    })
    .await;
    let tree = db::get_tree(store.as_ref(), &root).await.unwrap();
    let named = |n: &str| tree.iter().find(|p| p.value.name == n).map(|p| p.value.clone()).unwrap_or_else(|| panic!("no provider {n}"));
    let rp = named("edge-e2e");
    assert_eq!(rp.inventories["VCPU"].total, 4);
    assert_eq!(rp.inventories["MEMORY_MB"].total, 8192 - 16, "8 GiB minus eight 2 MiB hugepages");
    assert!(rp.traits.contains("HW_CPU_X86_AVX2") && rp.traits.contains("HW_CPU_X86_AESNI"), "{:?}", rp.traits);
    assert_eq!(named("edge-e2e_NUMA0").inventories["CUSTOM_HUGEPAGES_2M"].total, 8);
    assert_eq!(named("edge-e2e_NUMA1").inventories["PCPU"].total, 2);
    let pf = named("edge-e2e_PF_ens1f0");
    assert_eq!(pf.inventories["SRIOV_NET_VF"].total, 2);
    assert!(pf.traits.contains("CUSTOM_PHYSNET_PHYSNET1"));

    // The report carried the host's uptime and load, which the hypervisor uptime shows.
    let kv = store.get(&format!("/hosts/inventory/{host_id}")).await.unwrap().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(report["load"]["uptime_secs"], 93784, "{report}");
    assert_eq!(report["load"]["load_average"], serde_json::json!([0.75, 0.5, 0.25]), "{report}");

    // The operator creates two more VFs: the agent notices and re-reports.
    let numvfs = dir.path().join("host/sys/devices/pci0000:00/0000:00:02.0/0000:03:00.0/sriov_numvfs");
    std::fs::write(&numvfs, "4\n").unwrap();
    let pf_uuid = pf.uuid;
    wait_until("changed inventory re-reported", Duration::from_secs(10), &agent, || async {
        db::get_provider(store.as_ref(), &pf_uuid).await.unwrap().is_some_and(|p| p.value.inventories["SRIOV_NET_VF"].total == 4)
    })
    .await;

    // The credential is on disk, private.
    use std::os::unix::fs::PermissionsExt;
    let cred_path = dir.path().join("state/credential.json");
    assert_eq!(std::fs::metadata(&cred_path).unwrap().permissions().mode() & 0o777, 0o600);

    // Kill it: the host shows as down within the lease TTL.
    agent.signal(libc::SIGKILL);
    let mut agent = agent;
    agent.wait_exit(Duration::from_secs(5)).expect("killed agent exits");
    let down_after = wait_until("host down after kill", Duration::from_secs(TTL_SECS as u64 + 2), &agent, || async {
        !registry::get(store.as_ref(), &host_id).await.unwrap().up
    })
    .await;
    println!("host down {down_after:?} after SIGKILL (lease TTL {TTL_SECS} s)");
    assert!(down_after <= Duration::from_millis(TTL_SECS as u64 * 1000 + 1000), "down after {down_after:?}");
    drop(agent);

    // Restart without the join token: same identity, up again.
    let mut agent = AgentProc::start(&site.url, dir.path(), None, "agent-2.log");
    let up_after = wait_until("host up after restart", Duration::from_secs(20), &agent, || async {
        registry::get(store.as_ref(), &host_id).await.unwrap().up
    })
    .await;
    println!("host up {up_after:?} after restart");
    let hosts = registry::list(store.as_ref()).await.unwrap();
    assert_eq!(hosts.len(), 1, "the restart must not enrol a second host");
    assert_eq!(hosts[0].record.id, host_id);
    assert!(agent.log().contains("using the stored host credential"), "{}", agent.log());
    // The monitor recorded the history: up, down, up.
    wait_until("monitor history", Duration::from_secs(10), &agent, || async {
        let h = registry::get(store.as_ref(), &host_id).await.unwrap();
        let states: Vec<_> = h.record.transitions.iter().map(|t| t.state.as_str()).collect();
        states == ["up", "down", "up"]
    })
    .await;

    // SIGTERM: a clean exit.
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| panic!("agent ignored SIGTERM:\n{}", agent.log()));
    assert!(status.success(), "exit status {status}:\n{}", agent.log());

    // The join token worked once: another host cannot use it again.
    let other = tempfile::tempdir().unwrap();
    host_fixture(other.path());
    let mut second = AgentProc::start(&site.url, other.path(), Some(&token), "agent-3.log");
    let status = second.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| panic!("second agent kept running:\n{}", second.log()));
    assert!(!status.success());
    assert!(second.log().contains("already used"), "{}", second.log());
    assert!(!other.path().join("state/credential.json").exists());
    // An agent with neither credential nor token says what is missing.
    let none = tempfile::tempdir().unwrap();
    host_fixture(none.path());
    let mut third = AgentProc::start(&site.url, none.path(), None, "agent-4.log");
    let status = third.wait_exit(Duration::from_secs(20)).expect("agent without token exits");
    assert!(!status.success());
    assert!(third.log().contains("no join token"), "{}", third.log());
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_agent")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--coordinator", "--join-token", "--state-dir", "--sysfs-root", "--procfs-root", "--instance-pool", "--config", "--hostname"] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}
