//! Benchmark of our userspace datapath beside Open vSwitch with DPDK, on the
//! same cores in the same run. dpdk-testpmd over virtio-user stands in for
//! the VMs: one testpmd in flowgen mode owns both VM ports, sending new
//! frames into the sending VM's port and receiving (and discarding) what
//! the datapath delivers to the receiving VM's port (see [`Bench::vms`]).
//! testpmd has CPU 0; the datapath (our worker, or OVS's PMD thread) has
//! CPU 1 to itself.
//!
//! Run through scripts/bench-dataplane, which installs packages and reserves
//! hugepages. Needs root.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dataplane::control::Dataplane;
use dataplane::engine::EngineConfig;
use dataplane::model::Model;
use dataplane::ovs::instance::{Instance, InstanceConfig};
use dataplane::ovs::{OvsBackend, OvsConfig, OvsPortType};
use dataplane::vhost_user::VhostUserConfig;

/// CPU of the datapath worker (ours) and of OVS's PMD thread.
const DATAPATH_CPU: usize = 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    /// VM to VM on one network, no port security.
    L2,
    /// VM to VM across a distributed router.
    Routed,
    /// VM to VM on one network with a stateful security group (conntrack).
    SecurityGroup,
    /// VM to a VM on a remote host over VXLAN.
    Vxlan,
}

impl Scenario {
    fn all() -> [Scenario; 4] {
        [Scenario::L2, Scenario::Routed, Scenario::SecurityGroup, Scenario::Vxlan]
    }
    fn name(self) -> &'static str {
        match self {
            Scenario::L2 => "VM-VM, one network",
            Scenario::Routed => "VM-VM, distributed router",
            Scenario::SecurityGroup => "VM-VM, security group + conntrack",
            Scenario::Vxlan => "VM to remote host, VXLAN",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Scenario::L2 => "l2",
            Scenario::Routed => "routed",
            Scenario::SecurityGroup => "sg",
            Scenario::Vxlan => "vxlan",
        }
    }

    /// The model. testpmd 22.11's flowgen ignores --eth-peer: it always
    /// sends UDP from 00:01:02:03:04:00 and 10.254.0.0 to 00:01:02:03:04:01
    /// and 10.253.0.0 (plus the flow number). So vm1 carries the source
    /// MAC and address; the destination MAC is vm2's on one network and the
    /// router's interface on net1 in the routed row, where vm2 sits on net2.
    fn model(self) -> String {
        let sec = |on: bool| if on { r#""security_groups": ["open"]"# } else { r#""port_security_enabled": false"# };
        let sg = self == Scenario::SecurityGroup;
        let routed = self == Scenario::Routed;
        let vm2_host = if self == Scenario::Vxlan { "h2" } else { "h1" };
        let (sub1, gw1, sub2, gw2) = if routed { ("10.254.0.0/15", "10.254.0.1", "10.252.0.0/15", "10.252.0.1") } else { ("10.252.0.0/14", "10.252.0.1", "10.0.1.0/24", "10.0.1.1") };
        let (vm2_net, vm2_sub, vm2_mac) = if routed { ("net2", "sub2", "fa:16:3e:00:00:02") } else { ("net1", "sub1", FLOWGEN_DST_MAC) };
        let router_mac1 = if routed { FLOWGEN_DST_MAC } else { "fa:16:3e:ff:00:01" };
        format!(
            r#"{{
  "hosts": [{{"name": "h1", "tunnel_ip": "192.0.2.1"}}, {{"name": "h2", "tunnel_ip": "192.0.2.2"}}],
  "networks": [{{"id": "net1", "name": "net1", "project_id": "p", "segment": {{"type": "vxlan", "vni": 100}}}},
               {{"id": "net2", "name": "net2", "project_id": "p", "segment": {{"type": "vxlan", "vni": 200}}}}],
  "subnets": [{{"id": "sub1", "network_id": "net1", "cidr": "{sub1}", "gateway_ip": "{gw1}"}},
              {{"id": "sub2", "network_id": "net2", "cidr": "{sub2}", "gateway_ip": "{gw2}"}}],
  "routers": [{{"id": "r1", "name": "r1", "interfaces": [
      {{"subnet_id": "sub1", "ip_address": "{gw1}", "mac_address": "{router_mac1}"}},
      {{"subnet_id": "sub2", "ip_address": "{gw2}", "mac_address": "fa:16:3e:ff:00:02"}}]}}],
  "ports": [
    {{"id": "vm1", "network_id": "net1", "mac_address": "{FLOWGEN_SRC_MAC}", "binding_host": "h1",
     "fixed_ips": [{{"subnet_id": "sub1", "ip_address": "10.254.0.0"}}], {s1}}},
    {{"id": "vm2", "network_id": "{vm2_net}", "mac_address": "{vm2_mac}", "binding_host": "{vm2_host}",
     "fixed_ips": [{{"subnet_id": "{vm2_sub}", "ip_address": "10.253.0.0"}}], {s2}}}
  ],
  "security_groups": [{{"id": "open", "name": "open", "rules": [
    {{"direction": "egress", "ethertype": "IPv4"}}, {{"direction": "ingress", "ethertype": "IPv4"}}]}}]
}}"#,
            s1 = sec(sg),
            s2 = sec(sg),
        )
    }
}

/// The model for the many-flows run. testpmd 22.11's flowgen ignores
/// --eth-peer: it always sends from 00:01:02:03:04:00 and 10.254.0.0 to
/// 00:01:02:03:04:01 and 10.253.x.y, UDP, one destination address per flow
/// (read from a capture of its output). vm1 and vm2 carry those MACs, and
/// both have the open security group, so every flow is tracked by conntrack
/// in vm1's egress zone and in vm2's ingress zone, as in the sg row.
const FLOWS_MODEL: &str = r#"{
  "hosts": [{"name": "h1", "tunnel_ip": "192.0.2.1"}],
  "networks": [{"id": "net1", "name": "net1", "project_id": "p", "segment": {"type": "vxlan", "vni": 100}}],
  "subnets": [{"id": "sub1", "network_id": "net1", "cidr": "10.252.0.0/14", "gateway_ip": "10.252.0.1"}],
  "ports": [
    {"id": "vm1", "network_id": "net1", "mac_address": "00:01:02:03:04:00", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.254.0.0"}], "security_groups": ["open"]},
    {"id": "vm2", "network_id": "net1", "mac_address": "00:01:02:03:04:01", "binding_host": "h1",
     "fixed_ips": [{"subnet_id": "sub1", "ip_address": "10.253.0.0"}], "security_groups": ["open"]}
  ],
  "security_groups": [{"id": "open", "name": "open", "rules": [
    {"direction": "egress", "ethertype": "IPv4"}, {"direction": "ingress", "ethertype": "IPv4"}]}]
}"#;

/// MACs of the flowgen sender and receiver (see [`FLOWS_MODEL`]).
const FLOWGEN_SRC_MAC: &str = "00:01:02:03:04:00";
const FLOWGEN_DST_MAC: &str = "00:01:02:03:04:01";

/// Sets the nice value of thread `tid` (a datapath thread or a testpmd).
fn renice(tid: i32, nice: i32) {
    // SAFETY: setpriority on a thread id only changes that thread's scheduling weight.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
}

/// Thread ids of process `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let tid: i32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.starts_with(prefix).then_some(tid)
        })
        .collect()
}

/// A dpdk-testpmd standing in for a VM; stopped on drop.
struct Testpmd {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Testpmd {
    /// One testpmd owning the virtio-user ports of `vms` (socket, MAC), in
    /// that order: port 0 is the first.
    fn start(tag: &str, vms: &[(&Path, &str)], mode: &str, extra: &[String], nice: i32) -> Result<Testpmd> {
        let mut c = Command::new("nice");
        c.arg("-n").arg(nice.to_string()).arg("dpdk-testpmd");
        // One forwarding lcore per port (see VmPair), all on CPU 0.
        let lcores = (0..=vms.len()).map(|l| format!("{l}@0")).collect::<Vec<_>>().join(",");
        c.args(["--lcores", &lcores, "--no-pci", "--in-memory", "--single-file-segments", "-m", "256", "--log-level", "lib.eal:error"]);
        c.arg(format!("--file-prefix=dpvbench{}{tag}", std::process::id()));
        for (i, (socket, mac)) in vms.iter().enumerate() {
            c.arg(format!("--vdev=net_virtio_user{i},path={},queues=1,mac={mac},queue_size=1024", socket.display()));
        }
        c.arg("--");
        c.args(["--total-num-mbufs=32768", "--stats-period=1", "--rxd=1024", "--txd=1024", "--burst=32", "-a"]).arg(format!("--nb-cores={}", vms.len())).arg(format!("--forward-mode={mode}"));
        c.args(extra);
        let mut child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("starting dpdk-testpmd")?;
        let out = Arc::new(Mutex::new(String::new()));
        for s in [child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>)].into_iter().flatten() {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    let mut o = out.lock().expect("output lock");
                    if o.len() > 1 << 20 {
                        let cut = o.len() - (1 << 19);
                        let cut = o.floor_char_boundary(cut);
                        o.drain(..cut);
                    }
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        Ok(Testpmd { child, out })
    }

    /// Puts forwarding lcore `lcore` at idle priority (SCHED_IDLE): with the
    /// other lcores spinning on the same CPU it (almost) never runs.
    fn idle_lcore(&self, lcore: usize) -> Result<()> {
        let name = format!("rte-worker-{lcore}");
        let t = Instant::now();
        loop {
            let tids = threads_named(self.child.id(), &name);
            if let Some(&tid) = tids.first() {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: changes the scheduling policy of one thread of our child.
                if unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) } != 0 {
                    bail!("SCHED_IDLE for {name}: {}", std::io::Error::last_os_error());
                }
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("testpmd has no thread {name}:\n{}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Renices every thread of this testpmd.
    fn renice(&self, nice: i32) {
        for t in threads_named(self.child.id(), "") {
            renice(t, nice);
        }
    }

    /// The last "Tx-pps" testpmd printed.
    fn tx_pps(&self) -> u64 {
        let o = self.out.lock().expect("output lock");
        o.rsplit("Tx-pps:").next().filter(|_| o.contains("Tx-pps:")).and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    }

    fn tail(&self) -> String {
        let o = self.out.lock().expect("output lock");
        let s = o.floor_char_boundary(o.len().saturating_sub(2000));
        o[s..].to_string()
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One measured run.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Packets per second the datapath took from the sender.
    rx_pps: f64,
    /// Packets per second the datapath delivered (ring, ring full, or underlay).
    out_pps: f64,
    /// Of those, put on the receiver's ring (or sent into the underlay).
    delivered_pps: f64,
    /// The sender's offered rate (testpmd Tx-pps).
    offered_pps: f64,
    /// TSC cycles per packet in rounds that found packets (ours: our counters;
    /// OVS: its PMD's "avg processing cycles per packet").
    cycles: f64,
    /// Extra facts (OVS PMD cycles per packet, cache hit rates).
    note: String,
}

/// Counters (rx at the sender's port, out = delivered + full-ring drops, full-ring drops).
type Reading = (u64, u64, u64);

fn measure(seconds: f64, mut read: impl FnMut() -> Result<Reading>) -> Result<(f64, f64, f64)> {
    let a = read()?;
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let b = read()?;
    let dt = t.elapsed().as_secs_f64();
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
    // The third counter is the ring-full drops: delivered = out - drops.
    Ok((d(a.0, b.0), d(a.1, b.1), (d(a.1, b.1) - d(a.2, b.2)).max(0.0)))
}

struct Bench {
    dir: PathBuf,
    seconds: f64,
    /// Nice value given to the datapath thread and the sender (the same for ours and OVS).
    nice: i32,
    /// Namespace of our VXLAN underlay veth (used without the `dpdk` feature).
    #[cfg_attr(feature = "dpdk", allow(dead_code))]
    netns: String,
    ovs_netns: String,
}

impl Bench {
    fn wait_ready(&self, what: &str, mut ready: impl FnMut() -> bool, pmd: &Testpmd) -> Result<()> {
        let t = Instant::now();
        while !ready() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("{what} did not connect:\n{}", pmd.tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The VMs: one testpmd in flowgen mode that owns both virtio-user
    /// ports, the receiving VM's as port 0 and the sending VM's as port 1
    /// (only the sender's for VXLAN, whose receiver is on another host).
    ///
    /// Why one process: two spinning testpmds sharing CPU 0 take turns in
    /// scheduler time slices (4 ms here), and the receiver's ring (1024
    /// frames) cannot hold a slice's worth of the sender's traffic, so most
    /// frames would be dropped at a full ring and never copied. In one
    /// process, one lcore receives a burst from port 0 (discarding it) and
    /// then transmits a burst of new frames on port 1, so the receiver keeps
    /// up with what the datapath delivers. testpmd gives every port such a
    /// stream; the other one (receive on port 1, transmit into the
    /// receiving VM's port 0) runs on an idle-priority lcore that the
    /// spinning one starves, and the few frames it sends are counted.
    fn vms(&self, size: usize, flows: u32, sockets: &[&Path]) -> Result<Testpmd> {
        let macs = [FLOWGEN_DST_MAC, FLOWGEN_SRC_MAC];
        let vms: Vec<(&Path, &str)> = if sockets.len() == 2 { vec![(sockets[0], macs[0]), (sockets[1], macs[1])] } else { vec![(sockets[0], macs[1])] };
        let args = vec![format!("--txpkts={size}"), format!("--flowgen-flows={flows}")];
        let pmd = Testpmd::start("v", &vms, "flowgen", &args, 0)?;
        if vms.len() == 2 {
            pmd.idle_lcore(2)?;
        }
        pmd.renice(self.nice);
        Ok(pmd)
    }

    /// Our datapath: one worker on DATAPATH_CPU.
    fn ours(&self, sc: Scenario, size: usize, flows: Option<u32>) -> Result<Sample> {
        let model = sc.model();
        let model = if flows.is_some() { FLOWS_MODEL.to_string() } else { model };
        let dp = Dataplane::start("h1", EngineConfig { workers: 1, pin: vec![DATAPATH_CPU], busy_rounds: u32::MAX });
        dp.apply_model(Model::from_json(&model)?)?;
        let sock = |id: &str| self.dir.join(format!("ours-{}-{id}.sock", sc.key()));
        let a = dp.add_vhost_user_port("vm1", &VhostUserConfig::new(sock("vm1")))?;
        let b = if sc == Scenario::Vxlan {
            self.underlay(&dp)?
        } else {
            dp.add_vhost_user_port("vm2", &VhostUserConfig::new(sock("vm2")))?
        };
        let (s1, s2) = (sock("vm1"), sock("vm2"));
        let sockets: Vec<&Path> = if sc == Scenario::Vxlan { vec![&s1] } else { vec![&s2, &s1] };
        let vms = self.vms(size, flows.unwrap_or(1), &sockets)?;
        self.wait_ready("sender", || dp.stats().ports.iter().any(|p| p.0 == a && p.2 > 0), &vms)?;
        for t in threads_named(std::process::id(), "dp-worker") {
            renice(t, self.nice);
        }
        std::thread::sleep(Duration::from_secs(2));
        let before = dp.stats();
        let (rx_pps, out_pps, delivered_pps) = measure(self.seconds, || {
            let s = dp.stats();
            let pa = s.ports.iter().find(|p| p.0 == a).map(|p| p.2).unwrap_or(0);
            let (t, d) = s.ports.iter().find(|p| p.0 == b).map(|p| (p.3, p.4)).unwrap_or((0, 0));
            Ok((pa, t + d, d))
        })?;
        let after = dp.stats();
        let lookups = |s: &dataplane::engine::EngineStats| (s.emc_hits + s.megaflow_hits, s.upcalls);
        let (h0, u0) = lookups(&before);
        let (h1, u1) = lookups(&after);
        let hits = (h1 - h0) as f64;
        let total = hits + (u1 - u0) as f64;
        let busy = (after.busy_packets - before.busy_packets) as f64;
        let cycles = if busy > 0.0 { (after.busy_cycles - before.busy_cycles) as f64 / busy } else { 0.0 };
        let mut note = format!(
            "{cycles:.0} cycles/packet, {:.1} packets/burst, cache hit rate {:.4}% (emc {}, megaflow {}, upcalls {})",
            busy / (after.bursts - before.bursts).max(1) as f64,
            if total > 0.0 { 100.0 * hits / total } else { 0.0 },
            after.emc_hits - before.emc_hits,
            after.megaflow_hits - before.megaflow_hits,
            u1 - u0
        );
        if flows.is_some() {
            note += &format!(", {} connections, {} megaflows", after.connections, after.megaflows);
        }
        let top_drops: Vec<String> = after.drops.iter().filter(|d| d.1 > 0).map(|(w, n)| format!("{w}: {n}")).collect();
        if !top_drops.is_empty() {
            note += &format!(", drops {}", top_drops.join("; "));
        }
        let stray = |s: &dataplane::engine::EngineStats| s.ports.iter().find(|p| p.0 == b).map(|p| p.2).unwrap_or(0);
        if stray(&after) > stray(&before) {
            note += &format!(", {} frames from the receiving VM", stray(&after) - stray(&before));
        }
        let offered = vms.tx_pps() as f64;
        if rx_pps == 0.0 {
            bail!("no traffic reached our datapath: {:?}\n{}", after, vms.tail());
        }
        Ok(Sample { rx_pps, out_pps, delivered_pps, offered_pps: offered, cycles, note })
    }

    /// Our VXLAN port. With the `dpdk` feature: encapsulated by our datapath
    /// onto a DPDK null device, the same "NIC" OVS-DPDK sends into. Without
    /// it: onto an AF_PACKET ring on the underlay veth (the kernel's veth
    /// path then costs more per packet than the datapath).
    fn underlay(&self, dp: &Dataplane) -> Result<u32> {
        let local = Ipv4Addr::new(192, 0, 2, 1);
        #[cfg(feature = "dpdk")]
        {
            use dataplane::dpdk::{Eal, EthPort};
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let prefix = format!("--file-prefix=dpvbenchours{}", std::process::id());
            Eal::init(&["bench-dataplane", "--no-huge", "-m", "256", "--no-pci", "--no-shconf", "--lcores=0@(0-1)", &prefix, "--log-level=lib.eal:error"], 8192)?;
            let port = EthPort::open(&format!("net_null{}", 100 + NEXT.fetch_add(1, Ordering::Relaxed)), Some("no-rx=1"))?;
            Ok(dp.add_vxlan_underlay_port(local, Box::new(port), [2, 0, 0, 0, 0, 1], vec![(Ipv4Addr::new(192, 0, 2, 2), [2, 0, 0, 0, 0, 2])], None, "net_null")?)
        }
        #[cfg(not(feature = "dpdk"))]
        {
            Ok(dp.add_vxlan_underlay(local, "und0", Some(&PathBuf::from(format!("/run/netns/{}", self.netns))))?)
        }
    }

    /// OVS with DPDK carrying the same pipeline, rendered to OpenFlow.
    /// Rates come from the ports' own counters (dump-ports): received on the
    /// sender's port; transmitted plus dropped on the receiver's port, or
    /// transmitted by the underlay NIC for VXLAN.
    fn ovs(&self, inst: &Instance, sc: Scenario, size: usize, flows: Option<u32>) -> Result<Sample> {
        let model = sc.model();
        let model = if flows.is_some() { FLOWS_MODEL.to_string() } else { model };
        let bridge = format!("brb{}", sc.key());
        let mut ovs = OvsBackend::connect(OvsConfig { db_socket: inst.db_socket(), rundir: inst.rundir().to_path_buf(), bridge: bridge.clone(), datapath_type: "netdev".into(), host: "h1".into() })?;
        let guard = BridgeGuard(Some(bridge.clone()), inst);
        ovs.apply_model(Model::from_json(&model)?)?;
        let a_name = format!("vhu{}a", sc.key());
        let b_name = format!("vhu{}b", sc.key());
        ovs.add_port("vm1", &a_name, OvsPortType::DpdkVhostUser)?;
        let sock_a = inst.rundir().join(&a_name);
        let b = if sc == Scenario::Vxlan {
            self.ovs_underlay(inst)?;
            ovs.add_tunnel(Ipv4Addr::new(192, 0, 2, 1))?
        } else {
            ovs.add_port("vm2", &b_name, OvsPortType::DpdkVhostUser)?
        };
        let sock_b = inst.rundir().join(&b_name);
        let sockets: Vec<&Path> = if sc == Scenario::Vxlan { vec![&sock_a] } else { vec![&sock_b, &sock_a] };
        let tx = self.vms(size, flows.unwrap_or(1), &sockets)?;
        // OVS 3.1 reports no port counters for dpdkvhostuser ports ("?" in
        // dump-ports). Received: the PMD's own count (only the sender's port
        // receives anything). Out: what the flows that output to the
        // receiver's port carried (ring-full drops included; those are its
        // ovs_tx_failure_drops), or what the underlay "NIC" transmitted.
        let read = || -> Result<Reading> {
            let pmd = inst.appctl(&["dpif-netdev/pmd-stats-show"])?;
            let rx: u64 = pmd.lines().filter_map(|l| l.trim().strip_prefix("packets received:")).filter_map(|v| v.trim().parse::<u64>().ok()).sum();
            if sc == Scenario::Vxlan {
                let (_, tx, dropped) = port_stats(inst, "brbphy", 1)?;
                Ok((rx, tx + dropped, dropped))
            } else {
                Ok((rx, flow_packets_to(&ovs.dump_flows()?, b), tx_failure_drops(inst, &bridge, b)?))
            }
        };
        self.wait_ready("sender", || read().map(|r| r.0 > 0).unwrap_or(false), &tx).with_context(|| format!("{:?}\n{}", read(), dump_ports(inst, &bridge)))?;
        if let Some(pid) = inst.vswitchd_pid() {
            for t in threads_named(pid, "pmd") {
                renice(t, self.nice);
            }
        }
        std::thread::sleep(Duration::from_secs(2));
        inst.appctl(&["dpif-netdev/pmd-stats-clear"])?;
        let (rx_pps, out_pps, delivered_pps) = measure(self.seconds, read)?;
        let pmd = inst.appctl(&["dpif-netdev/pmd-stats-show"])?;
        let pick = |name: &str| pmd.lines().find(|l| l.trim_start().starts_with(name)).and_then(|l| l.rsplit(':').next()).map(|v| v.split_whitespace().next().unwrap_or("").to_string()).unwrap_or_default();
        let cycles: f64 = pick("avg processing cycles per packet").parse().unwrap_or(0.0);
        let mut note = format!(
            "PMD {} cycles/packet, {} packets/batch, emc hits {}, smc hits {}, megaflow hits {}, upcalls {}",
            pick("avg processing cycles per packet"),
            pick("avg. packets per output batch"),
            pick("emc hits"),
            pick("smc hits"),
            pick("megaflow hits"),
            pick("miss with success upcall")
        );
        let recv: f64 = pick("packets received").parse().unwrap_or(0.0);
        let hits: f64 = ["emc hits", "smc hits", "megaflow hits"].iter().map(|n| pick(n).parse::<f64>().unwrap_or(0.0)).sum();
        let passes: f64 = pick("avg. datapath passes per packet").parse().unwrap_or(1.0);
        if recv > 0.0 {
            // OVS counts a lookup per datapath pass (recirculations included).
            let lookups = recv * passes.max(1.0);
            note += &format!(", cache hit rate {:.4}% ({:.2} passes/packet)", 100.0 * hits / lookups, passes);
        }
        if ovs.rendered().unsupported.values().sum::<usize>() > 0 {
            note += &format!(", flows without a controller: {:?}", ovs.rendered().unsupported);
        }
        let offered = tx.tx_pps() as f64;
        drop(tx);
        drop(guard);
        if rx_pps == 0.0 {
            bail!("no traffic reached OVS:\n{}\n{}", ovs.dump_flows().unwrap_or_default(), inst.log());
        }
        Ok(Sample { rx_pps, out_pps, delivered_pps, offered_pps: offered, cycles, note })
    }

    /// OVS's VXLAN underlay: bridge brbphy with 192.0.2.1 on its internal
    /// port and a DPDK null device as the "NIC", so encapsulated packets are
    /// counted and discarded at full speed. `no-rx=1`: by default net_null
    /// also generates received packets at full speed, which OVS's PMD would
    /// poll, miss and drop on the same CPU.
    fn ovs_underlay(&self, inst: &Instance) -> Result<()> {
        let db = format!("--db=unix:{}", inst.db_socket().display());
        let vsctl = |args: &[&str]| -> Result<()> {
            let o = Command::new("ovs-vsctl").arg(&db).args(args).output()?;
            if !o.status.success() {
                bail!("ovs-vsctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            }
            Ok(())
        };
        vsctl(&["--may-exist", "add-br", "brbphy", "--", "set", "bridge", "brbphy", "datapath_type=netdev", "fail_mode=secure"])?;
        vsctl(&["--may-exist", "add-port", "brbphy", "null0", "--", "set", "Interface", "null0", "type=dpdk", "options:dpdk-devargs=net_null0,no-rx=1", "ofport_request=1", "mtu_request=1600"])?;
        let ns = |args: &[&str]| Command::new("ip").args(["netns", "exec", &self.ovs_netns]).args(args).status();
        let mut t = Instant::now();
        while ns(&["ip", "link", "set", "brbphy", "up"]).map(|s| !s.success()).unwrap_or(true) {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("brbphy did not appear");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = ns(&["ip", "addr", "add", "192.0.2.1/24", "dev", "brbphy"]);
        let o = Command::new("ovs-ofctl").args(["add-flow", &format!("unix:{}/brbphy.mgmt", inst.rundir().display()), "in_port=LOCAL,actions=output:1"]).output()?;
        if !o.status.success() {
            bail!("ovs-ofctl add-flow: {}", String::from_utf8_lossy(&o.stderr));
        }
        t = Instant::now();
        while inst.appctl(&["ovs/route/show"]).map(|r| !r.contains("192.0.2.0/24")).unwrap_or(true) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = inst.appctl(&["ovs/route/add", "192.0.2.2/32", "brbphy"]);
        inst.appctl(&["tnl/arp/set", "brbphy", "192.0.2.2", "02:00:00:00:00:02"])?;
        Ok(())
    }
}

/// Deletes a bridge when a run ends, also on error.
struct BridgeGuard<'a>(Option<String>, &'a Instance);

impl Drop for BridgeGuard<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            let _ = Command::new("ovs-vsctl").arg(format!("--db=unix:{}", self.1.db_socket().display())).args(["--if-exists", "del-br", &b]).output();
            let _ = Command::new("ovs-vsctl").arg(format!("--db=unix:{}", self.1.db_socket().display())).args(["--if-exists", "del-br", "brbphy"]).output();
        }
    }
}

fn dump_ports(inst: &Instance, bridge: &str) -> String {
    Command::new("ovs-ofctl").args(["-O", "OpenFlow15", "dump-ports", &format!("unix:{}/{bridge}.mgmt", inst.rundir().display())]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)).unwrap_or_default()
}

/// Packets that flows outputting to OpenFlow port `port` have carried.
fn flow_packets_to(dump: &str, port: u32) -> u64 {
    let needle = format!("output:{port}");
    dump.lines()
        .filter(|l| l.split("actions=").nth(1).is_some_and(|a| a.split(',').any(|x| x == needle)))
        .filter_map(|l| l.split("n_packets=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// Frames OVS-DPDK could not put on a vhost-user port's ring (its custom port statistics).
fn tx_failure_drops(inst: &Instance, bridge: &str, port: u32) -> Result<u64> {
    let o = Command::new("ovs-ofctl").args(["-O", "OpenFlow15", "--no-names", "dump-ports", &format!("unix:{}/{bridge}.mgmt", inst.rundir().display()), &port.to_string()]).output()?;
    if !o.status.success() {
        bail!("dump-ports {bridge}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let text = String::from_utf8_lossy(&o.stdout);
    Ok(text.split("ovs_tx_failure_drops=").nth(1).and_then(|r| r.split([',', ' ', '\n']).next()).and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// (rx packets, tx packets, tx dropped) of OpenFlow port `port` on `bridge`,
/// from OVS's own port counters. A vhost-user port counts as dropped what
/// found the guest's ring full.
fn port_stats(inst: &Instance, bridge: &str, port: u32) -> Result<(u64, u64, u64)> {
    let o = Command::new("ovs-ofctl").args(["-O", "OpenFlow15", "--no-names", "dump-ports", &format!("unix:{}/{bridge}.mgmt", inst.rundir().display()), &port.to_string()]).output()?;
    if !o.status.success() {
        bail!("dump-ports {bridge}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let field = |after: &str, name: &str| -> u64 {
        text.split(after).nth(1).and_then(|r| r.split(name).nth(1)).and_then(|r| r.split([',', ' ', '\n']).next()).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    Ok((field("rx pkts", "="), field("tx pkts", "="), field("tx pkts", "drop=")))
}

fn fmt_rate(pps: f64, size: usize) -> String {
    // Gbit/s on the wire-size frame (with the 4-byte FCS that virtio does not carry).
    format!("{:>6.2} Mpps {:>6.2} Gb/s", pps / 1e6, pps * ((size + 4) * 8) as f64 / 1e9)
}

/// The better of two runs of one row: the one that carried more.
fn best(a: Option<Result<Sample>>, b: Result<Sample>) -> Result<Sample> {
    if let Ok(s) = &b {
        eprintln!("    {:.2} Mpps, {:.0} cycles/packet", s.out_pps / 1e6, s.cycles);
    }
    match (a, b) {
        (Some(Ok(a)), Ok(b)) => Ok(if b.out_pps > a.out_pps { b } else { a }),
        (Some(Ok(a)), Err(e)) => {
            eprintln!("a run failed: {e:#}");
            Ok(a)
        }
        (_, b) => b,
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    const KNOWN: [&str; 9] = ["--seconds", "--repeat", "--only", "--no-ovs", "--sizes", "--flows", "--dir", "--nice", "--help"];
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench-dataplane [--seconds N] [--repeat N] [--only l2|routed|sg|vxlan|flows] [--no-ovs] [--sizes 60,1514] [--flows N] [--nice N] [--dir PATH]");
        return Ok(());
    }
    if let Some(bad) = args.iter().skip(1).find(|a| a.starts_with("--") && !KNOWN.contains(&a.as_str())) {
        bail!("unknown option {bad} (try --help)");
    }
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let seconds: f64 = opt("--seconds").map(|s| s.parse()).transpose()?.unwrap_or(5.0);
    let no_ovs = args.iter().any(|a| a == "--no-ovs");
    let only: Option<String> = opt("--only");
    let sizes: Vec<usize> = opt("--sizes").map(|s| s.split(',').map(|x| x.parse()).collect::<Result<_, _>>()).transpose()?.unwrap_or(vec![60, 1514]);
    let flows: u32 = opt("--flows").map(|s| s.parse()).transpose()?.unwrap_or(10_000);
    let dir = PathBuf::from(opt("--dir").unwrap_or_else(|| format!("/tmp/bench-dataplane-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let netns = format!("dpvbench{}", std::process::id());
    let _ns = Netns::create(&netns, true)?;
    let ovs_netns = format!("dpvbenchovs{}", std::process::id());
    let _ovs_ns = Netns::create(&ovs_netns, false)?;
    // Each row runs `repeat` times, ours and OVS alternating, and keeps each
    // side's best run: the machine is shared, and the best run is the one
    // the neighbours disturbed least.
    let repeat: usize = opt("--repeat").map(|s| s.parse()).transpose()?.unwrap_or(3).max(1);
    let nice: i32 = opt("--nice").map(|s| s.parse()).transpose()?.unwrap_or(-10);
    let bench = Bench { dir: dir.clone(), seconds, nice, netns: netns.clone(), ovs_netns: ovs_netns.clone() };

    println!("# bench-dataplane: one datapath worker / OVS PMD thread on CPU {DATAPATH_CPU}; both VMs are one testpmd (flowgen) on CPU 0; {seconds} s per run");
    println!("# Rates are packets the datapath took from the sending VM (rx) and handed on (out: onto the receiving VM's ring, dropped there as ring-full, or into the VXLAN underlay).");
    println!("# Ours and OVS alternate run by run, {repeat} runs each per row, best run kept (OVS started for its run only, so its PMD never spins beside our worker); the datapath thread and testpmd run at nice {nice} in both.");
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let runs: Vec<(Scenario, usize)> = Scenario::all().into_iter().filter(|sc| only.as_deref().is_none_or(|o| o == sc.key())).flat_map(|sc| sizes.iter().map(move |s| (sc, *s))).collect();
    let want_flows = only.is_none() || only.as_deref() == Some("flows");
    let ovs_instance = || -> Result<Instance> {
        let mut cfg = InstanceConfig::new(dir.join("ovs"));
        cfg.vswitchd = PathBuf::from("/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk");
        cfg.netns = Some(ovs_netns.clone());
        cfg.other_config = vec![
            ("dpdk-init".into(), "true".into()),
            ("dpdk-socket-mem".into(), "512".into()),
            ("dpdk-lcore-mask".into(), "0x1".into()),
            ("pmd-cpu-mask".into(), format!("{:#x}", 1 << DATAPATH_CPU)),
            ("dpdk-extra".into(), format!("--file-prefix=dpvbenchovs{} --single-file-segments --no-pci", std::process::id())),
        ];
        Instance::start(cfg).context("starting OVS with DPDK")
    };
    let run_ovs = |sc: Scenario, size: usize, flows: Option<u32>| -> Result<Sample> {
        let inst = ovs_instance()?;
        bench.ovs(&inst, sc, size, flows)
    };
    for &(sc, size) in &runs {
        let (mut ours, mut theirs): (Option<Result<Sample>>, Option<Result<Sample>>) = (None, None);
        for round in 1..=repeat {
            eprintln!("ours: {} {}B ({round}/{repeat})", sc.key(), size + 4);
            ours = Some(best(ours, bench.ours(sc, size, None)));
            if !no_ovs {
                eprintln!("OVS: {} {}B ({round}/{repeat})", sc.key(), size + 4);
                theirs = Some(best(theirs, run_ovs(sc, size, None)));
            }
        }
        rows.push((sc, size, ours.expect("at least one round"), theirs));
    }
    let (mut ours_flows, mut ovs_flows): (Option<Result<Sample>>, Option<Result<Sample>>) = (None, None);
    for round in 1..=repeat {
        if !want_flows {
            break;
        }
        eprintln!("ours: {flows} flows ({round}/{repeat})");
        ours_flows = Some(best(ours_flows, bench.ours(Scenario::SecurityGroup, 60, Some(flows))));
        if !no_ovs {
            eprintln!("OVS: {flows} flows ({round}/{repeat})");
            ovs_flows = Some(best(ovs_flows, run_ovs(Scenario::SecurityGroup, 60, Some(flows))));
        }
    }
    println!();
    println!("{:<36} {:>5} | {:^26} | {:^26} | {:>5} | {:>8} {:>8} | {:>7} {:>7}", "scenario", "frame", "ours (out)", "OVS-DPDK (out)", "x", "offered", "offered", "cycles/", "cycles/");
    println!("{:<36} {:>5} | {:^26} | {:^26} | {:>5} | {:>8} {:>8} | {:>7} {:>7}", "", "bytes", "", "", "", "ours", "OVS", "pkt us", "pkt OVS");
    for (sc, size, ours, theirs) in &rows {
        let o = ours.as_ref().map(|s| s.out_pps).unwrap_or(0.0);
        let t = theirs.as_ref().and_then(|r| r.as_ref().ok()).map(|s| s.out_pps).unwrap_or(0.0);
        let ratio = if t > 0.0 { format!("{:.2}", o / t) } else { "-".into() };
        let off = |s: &Result<Sample>| s.as_ref().map(|s| format!("{:.2}", s.offered_pps / 1e6)).unwrap_or("-".into());
        let cyc = |s: &Result<Sample>| s.as_ref().map(|s| format!("{:.0}", s.cycles)).unwrap_or("-".into());
        println!(
            "{:<36} {:>5} | {:>26} | {:>26} | {:>5} | {:>8} {:>8} | {:>7} {:>7}",
            sc.name(),
            size + 4,
            fmt_rate(o, *size),
            if theirs.is_some() { fmt_rate(t, *size) } else { "not run".into() },
            ratio,
            off(ours),
            theirs.as_ref().map(off).unwrap_or("-".into()),
            cyc(ours),
            theirs.as_ref().map(cyc).unwrap_or("-".into())
        );
        match ours {
            Ok(s) => notes.push(format!("ours {} {}B: rx {:.2} Mpps, on ring {:.2} Mpps; {}", sc.key(), size + 4, s.rx_pps / 1e6, s.delivered_pps / 1e6, s.note)),
            Err(e) => notes.push(format!("ours {} {}B failed: {e:#}", sc.key(), size + 4)),
        }
        match theirs {
            Some(Ok(s)) => notes.push(format!("OVS  {} {}B: rx {:.2} Mpps, on ring {:.2} Mpps; {}", sc.key(), size + 4, s.rx_pps / 1e6, s.delivered_pps / 1e6, s.note)),
            Some(Err(e)) => notes.push(format!("OVS  {} {}B failed: {e:#}", sc.key(), size + 4)),
            None => {}
        }
    }
    println!();
    for n in &notes {
        println!("  {n}");
    }
    if let Some(r) = ours_flows {
        println!();
        println!("# Cache hit rate with {flows} active flows (testpmd flowgen, security group + conntrack, 64-byte frames)");
        match r {
            Ok(s) => println!("  ours: {} ; {}", fmt_rate(s.out_pps, 60), s.note),
            Err(e) => println!("  ours failed: {e:#}"),
        }
        match ovs_flows {
            Some(Ok(s)) => println!("  OVS:  {} ; {}", fmt_rate(s.out_pps, 60), s.note),
            Some(Err(e)) => println!("  OVS failed: {e:#}"),
            None => {}
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A network namespace, with the VXLAN underlay when asked (a veth with
/// 192.0.2.1/24 whose peer discards what is sent to the remote endpoint,
/// 192.0.2.2, a static neighbour); deleted on drop.
struct Netns(String);

impl Netns {
    fn create(name: &str, underlay: bool) -> Result<Netns> {
        let run = |args: &[&str]| -> Result<()> {
            let o = Command::new("ip").args(args).output()?;
            if !o.status.success() {
                bail!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            }
            Ok(())
        };
        run(&["netns", "add", name])?;
        let ns = Netns(name.to_string());
        run(&["-n", name, "link", "set", "lo", "up"])?;
        if !underlay {
            return Ok(ns);
        }
        run(&["-n", name, "link", "add", "und0", "type", "veth", "peer", "name", "und1"])?;
        run(&["-n", name, "addr", "add", "192.0.2.1/24", "dev", "und0"])?;
        // Room for a 1518-byte frame plus 50 bytes of VXLAN headers.
        run(&["-n", name, "link", "set", "und0", "mtu", "9000"])?;
        run(&["-n", name, "link", "set", "und1", "mtu", "9000"])?;
        run(&["-n", name, "link", "set", "und0", "up"])?;
        run(&["-n", name, "link", "set", "und1", "up"])?;
        run(&["-n", name, "neigh", "add", "192.0.2.2", "lladdr", "02:00:00:00:00:02", "dev", "und0"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
