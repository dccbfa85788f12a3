//! vhost-user port tests with dpdk-testpmd (net_virtio_user) as the guest
//! side: testpmd transmits on one port, the datapath forwards per the model
//! to a second vhost-user port where another testpmd receives.
//!
//! Needs root, hugepages (reserved here and given back) and dpdk-testpmd
//! (Debian package dpdk). A test that cannot run says so and why.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane::compiler::{Compiler, HostConfig, Neighbors};
use dataplane::engine::{Engine, EngineConfig, PortKind};
use dataplane::model::Model;
use dataplane::vhost_user::{VhostUserConfig, VhostUserPort, VhostUserStatus};

static SEQ: AtomicU32 = AtomicU32::new(0);
/// testpmd runs are serialised within this binary: they are CPU hungry and share the hugepage pool.
static DPDK: Mutex<()> = Mutex::new(());

const MODEL: &str = r#"{
  "hosts": [{"name": "h1", "tunnel_ip": "192.0.2.1"}],
  "networks": [{"id": "net1", "name": "net1", "project_id": "p", "segment": {"type": "vxlan", "vni": 100}}],
  "subnets": [{"id": "sub1", "network_id": "net1", "cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.1"}],
  "ports": [
    {"id": "vm1", "network_id": "net1", "mac_address": "fa:16:3e:00:00:01", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.0.0.11"}], "security_groups": ["open"]},
    {"id": "vm2", "network_id": "net1", "mac_address": "fa:16:3e:00:00:02", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.0.0.12"}], "security_groups": ["open"]}
  ],
  "security_groups": [{"id": "open", "name": "open", "rules": [
    {"direction": "egress", "ethertype": "IPv4"}, {"direction": "ingress", "ethertype": "IPv4"}]}]
}"#;

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (hugepages and testpmd need it)".into());
    }
    if Command::new("dpdk-testpmd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        return Some("dpdk-testpmd missing (Debian package dpdk)".into());
    }
    None
}

fn read_u64(path: &str) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// 2 MiB hugepages this test added to the pool; given back on drop.
struct Hugepages {
    added: u64,
}

const NR: &str = "/proc/sys/vm/nr_hugepages";
const FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

impl Hugepages {
    fn reserve(pages: u64) -> Result<Hugepages, String> {
        if !std::path::Path::new(FREE).exists() {
            return Err("no 2 MiB hugepage support".into());
        }
        let mounted = std::fs::read_to_string("/proc/mounts").unwrap_or_default().lines().any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"));
        if !mounted {
            let _ = std::fs::create_dir_all("/dev/hugepages");
            let ok = Command::new("mount").args(["-t", "hugetlbfs", "nodev", "/dev/hugepages"]).status().map(|s| s.success()).unwrap_or(false);
            if !ok {
                return Err("cannot mount hugetlbfs on /dev/hugepages".into());
            }
        }
        let free = read_u64(FREE);
        let mut h = Hugepages { added: 0 };
        if free < pages {
            let want = pages - free;
            let before = read_u64(NR);
            std::fs::write(NR, (before + want).to_string()).map_err(|e| format!("writing {NR}: {e}"))?;
            h.added = read_u64(NR).saturating_sub(before);
            if read_u64(FREE) < pages {
                return Err(format!("only {} free 2 MiB hugepages after asking for {pages} (memory too fragmented?)", read_u64(FREE)));
            }
        }
        Ok(h)
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        if self.added > 0 {
            let now = read_u64(NR);
            let _ = std::fs::write(NR, now.saturating_sub(self.added).to_string());
        }
    }
}

/// A dpdk-testpmd process standing in for a VM; stopped on drop.
struct Testpmd {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Testpmd {
    /// Starts testpmd on `socket` with `mac`, in `mode` (txonly, rxonly), plus extra testpmd arguments.
    fn start(socket: &std::path::Path, mac: &str, queues: u16, mode: &str, extra: &[&str]) -> Testpmd {
        let prefix = format!("dpvtest{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let vdev = format!("net_virtio_user0,path={},queues={queues},mac={mac}", socket.display());
        let q = queues.to_string();
        let mut args: Vec<String> = ["--lcores", "0@0,1@0", "--no-pci", "--in-memory", "--single-file-segments", "-m", "128", "--file-prefix", &prefix, "--log-level", "lib.eal:error", "--vdev", &vdev, "--"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--total-num-mbufs=8192", &format!("--forward-mode={mode}"), "--stats-period=1", "--nb-cores=1", &format!("--rxq={q}"), &format!("--txq={q}"), "-a"].iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new("dpdk-testpmd").args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning dpdk-testpmd");
        let out = Arc::new(Mutex::new(String::new()));
        for stream in [child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>)].into_iter().flatten() {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        Testpmd { child, out }
    }

    /// The largest "RX-packets" testpmd has printed so far.
    fn rx_packets(&self) -> u64 {
        let o = self.out.lock().unwrap();
        o.split("RX-packets:").skip(1).filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok()).max().unwrap_or(0)
    }

    fn output(&self) -> String {
        let o = self.out.lock().unwrap();
        let start = o.len().saturating_sub(3000);
        o[o.floor_char_boundary(start)..].to_string()
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A unique directory for sockets; removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let d = std::env::temp_dir().join(format!("dpv-vhost-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Datapath {
    engine: Engine,
    status: Vec<VhostUserStatus>,
    numbers: Vec<u32>,
}

/// An engine on host h1 with vm1 and vm2 attached as vhost-user ports.
fn datapath(dir: &Dir, queue_pairs: u16) -> Datapath {
    let model = Model::from_json(MODEL).unwrap();
    let engine = Engine::start(EngineConfig { workers: 1, pin: vec![], busy_rounds: 2000 });
    let mut host = HostConfig { name: "h1".into(), ..Default::default() };
    let mut status = Vec::new();
    let mut numbers = Vec::new();
    for id in ["vm1", "vm2"] {
        let cfg = VhostUserConfig { socket: dir.0.join(format!("{id}.sock")), queue_pairs, queue_size: 1024 };
        let port = VhostUserPort::listen(&cfg).unwrap();
        assert!(cfg.socket.exists(), "socket created");
        status.push(port.status());
        let no = engine.add_port(id, PortKind::Burst(Box::new(port)));
        host.ports.insert(id.to_string(), no);
        numbers.push(no);
    }
    let p = Compiler::new().compile(&model, &host, &Neighbors::new()).unwrap();
    engine.set_pipeline(p);
    Datapath { engine, status, numbers }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("timed out waiting for {what}");
    false
}

fn port_counters(dp: &Datapath, no: u32) -> (u64, u64, u64) {
    dp.engine.stats().ports.iter().find(|p| p.0 == no).map(|p| (p.2, p.3, p.4)).unwrap_or_default()
}

macro_rules! skip_unless_ready {
    ($name:expr) => {
        if let Some(why) = skip_reason() {
            eprintln!("SKIPPED {}: {why}", $name);
            return;
        }
    };
}

#[test]
fn testpmd_txonly_reaches_the_second_vm_through_the_pipeline() {
    skip_unless_ready!("testpmd_txonly_reaches_the_second_vm_through_the_pipeline");
    let _serial = DPDK.lock().unwrap_or_else(|e| e.into_inner());
    let _huge = match Hugepages::reserve(160) {
        Ok(h) => h,
        Err(why) => {
            eprintln!("SKIPPED testpmd_txonly_reaches_the_second_vm_through_the_pipeline: {why}");
            return;
        }
    };
    let dir = Dir::new();
    let dp = datapath(&dir, 1);
    let mut rx = Testpmd::start(&dir.0.join("vm2.sock"), "fa:16:3e:00:00:02", 1, "rxonly", &[]);
    assert!(wait_for("vm2 to connect", Duration::from_secs(30), || dp.status[1].ready() || rx.exited()), "vm2 testpmd did not bring its queues up:\n{}", rx.output());
    let tx = Testpmd::start(&dir.0.join("vm1.sock"), "fa:16:3e:00:00:01", 1, "txonly", &["--eth-peer=0,fa:16:3e:00:00:02", "--tx-ip=10.0.0.11,10.0.0.12", "--txpkts=64"]);
    let delivered = wait_for("frames at vm2", Duration::from_secs(30), || port_counters(&dp, dp.numbers[1]).1 >= 10_000 && rx.rx_packets() > 0);
    let stats = dp.engine.stats();
    assert!(delivered, "vm1 -> vm2 through the datapath: {stats:#?}\n--- tx testpmd:\n{}\n--- rx testpmd:\n{}", tx.output(), rx.output());
    let (rx1, _, _) = port_counters(&dp, dp.numbers[0]);
    assert!(rx1 >= 10_000, "vm1's transmit queue was read: {rx1}");
    // Features: VERSION_1 and mergeable buffers were negotiated with DPDK's virtio-user.
    assert_ne!(dp.status[0].acked_features() & (1 << 32), 0, "VIRTIO_F_VERSION_1 acked");
    assert_eq!(dp.status[0].counters().rx_bad_chains.load(Ordering::Relaxed), 0);
    // The same frames, seen by the guest on the far side.
    assert!(rx.rx_packets() > 0, "rx testpmd counted frames: {}", rx.output());
    // The megaflow cache carried the flow after the first packets.
    assert!(stats.hit_rate > 0.99, "{stats:?}");
    eprintln!("vm1 rx {rx1}, vm2 tx {}, testpmd on vm2 received {}, upcalls {}", port_counters(&dp, dp.numbers[1]).1, rx.rx_packets(), stats.upcalls);
}

#[test]
fn spoofed_source_from_a_vm_is_dropped() {
    skip_unless_ready!("spoofed_source_from_a_vm_is_dropped");
    let _serial = DPDK.lock().unwrap_or_else(|e| e.into_inner());
    let _huge = match Hugepages::reserve(160) {
        Ok(h) => h,
        Err(why) => {
            eprintln!("SKIPPED spoofed_source_from_a_vm_is_dropped: {why}");
            return;
        }
    };
    let dir = Dir::new();
    let dp = datapath(&dir, 1);
    let mut rx = Testpmd::start(&dir.0.join("vm2.sock"), "fa:16:3e:00:00:02", 1, "rxonly", &[]);
    assert!(wait_for("vm2 to connect", Duration::from_secs(30), || dp.status[1].ready() || rx.exited()), "{}", rx.output());
    // vm1 claims 10.0.0.99, which is not its address.
    let tx = Testpmd::start(&dir.0.join("vm1.sock"), "fa:16:3e:00:00:01", 1, "txonly", &["--eth-peer=0,fa:16:3e:00:00:02", "--tx-ip=10.0.0.99,10.0.0.12", "--txpkts=64"]);
    assert!(wait_for("frames from vm1", Duration::from_secs(30), || port_counters(&dp, dp.numbers[0]).0 >= 10_000), "{}", tx.output());
    let (_, tx2, _) = port_counters(&dp, dp.numbers[1]);
    assert_eq!(tx2, 0, "nothing spoofed reaches vm2");
    let drops = dp.engine.stats().drops;
    assert!(drops.iter().any(|(why, n)| why.contains("port security") && *n >= 10_000), "{drops:?}");
}

#[test]
fn multiqueue_and_reconnect() {
    skip_unless_ready!("multiqueue_and_reconnect");
    let _serial = DPDK.lock().unwrap_or_else(|e| e.into_inner());
    let _huge = match Hugepages::reserve(160) {
        Ok(h) => h,
        Err(why) => {
            eprintln!("SKIPPED multiqueue_and_reconnect: {why}");
            return;
        }
    };
    let dir = Dir::new();
    let dp = datapath(&dir, 2);
    let mut rx = Testpmd::start(&dir.0.join("vm2.sock"), "fa:16:3e:00:00:02", 2, "rxonly", &[]);
    assert!(wait_for("vm2 to connect", Duration::from_secs(30), || dp.status[1].ready() || rx.exited()), "{}", rx.output());
    let args = ["--eth-peer=0,fa:16:3e:00:00:02", "--tx-ip=10.0.0.11,10.0.0.12", "--txpkts=64"];
    let tx = Testpmd::start(&dir.0.join("vm1.sock"), "fa:16:3e:00:00:01", 2, "txonly", &args);
    let both = || dp.status[0].counters().rx_per_queue[..2].iter().all(|c| c.load(Ordering::Relaxed) > 1000);
    assert!(wait_for("frames on both queue pairs", Duration::from_secs(30), both), "per queue {:?}\n{}", dp.status[0].counters().rx_per_queue, tx.output());
    assert!(wait_for("frames at vm2", Duration::from_secs(10), || port_counters(&dp, dp.numbers[1]).1 > 10_000), "{:?}", dp.engine.stats());
    // The guest goes away and comes back: the port accepts it again.
    drop(tx);
    assert!(wait_for("vm1 to disconnect", Duration::from_secs(10), || !dp.status[0].connected()));
    let before = port_counters(&dp, dp.numbers[0]).0;
    let _tx = Testpmd::start(&dir.0.join("vm1.sock"), "fa:16:3e:00:00:01", 2, "txonly", &args);
    assert!(wait_for("frames after reconnecting", Duration::from_secs(30), || port_counters(&dp, dp.numbers[0]).0 > before + 10_000));
    assert_eq!(dp.status[0].counters().connections.load(Ordering::Relaxed), 2);
    eprintln!("per queue pair on vm1: {:?}", &dp.status[0].counters().rx_per_queue[..2]);
}

#[test]
fn port_rejects_bad_config_and_removes_its_socket() {
    let dir = Dir::new();
    let sock = dir.0.join("x.sock");
    assert!(VhostUserPort::listen(&VhostUserConfig { socket: sock.clone(), queue_pairs: 0, queue_size: 256 }).is_err());
    assert!(VhostUserPort::listen(&VhostUserConfig { socket: sock.clone(), queue_pairs: 1, queue_size: 100 }).is_err());
    let port = VhostUserPort::listen(&VhostUserConfig::new(&sock)).unwrap();
    assert!(sock.exists());
    assert!(!port.connected());
    drop(port);
    assert!(!sock.exists(), "socket removed with the port");
}
