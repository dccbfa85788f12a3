//! The `dataplane` CLI against a running datapath: host h1 is started with
//! `dataplane run` from a model file, h2 through the library; endpoints a1
//! and a3 on h1, a2 on h2. The CLI shows ports, pipeline, caches, conntrack
//! and counters, traces packets, and refuses a bad model.

mod netns_lab;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::control::Dataplane;
use dataplane::engine::EngineConfig;
use netns_lab::{model, ping, sh, veth_endpoint, Lab};

/// The `dataplane run` process; stopped on drop (also when the test fails).
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn cli(socket: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dataplane")).args(args).arg("--socket").arg(socket).output().expect("running the dataplane CLI");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn ok(socket: &Path, args: &[&str]) -> String {
    let (good, text) = cli(socket, args);
    assert!(good, "dataplane {args:?} failed: {text}");
    text
}

#[test]
fn cli_runs_shows_traces_and_applies() {
    require_netns!("cli_runs_shows_traces_and_applies");
    let mut lab = Lab::new();
    let dir = std::env::temp_dir().join(format!("dp-cli-{}", lab.tag()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDir(dir.clone());
    let under = lab.ns("u");
    sh(&["ip", "-n", &under, "link", "add", "br0", "type", "bridge"]).unwrap();
    sh(&["ip", "-n", &under, "link", "set", "br0", "up"]).unwrap();
    let m = model();
    let mut hosts = Vec::new();
    for (i, h) in m.hosts.iter().take(2).enumerate() {
        let ns = lab.ns(&h.name);
        lab.veth(&ns, "underlay", &under, &format!("u{i}"));
        sh(&["ip", "-n", &under, "link", "set", &format!("u{i}"), "master", "br0"]).unwrap();
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", h.tunnel_ip), "dev", "underlay"]).unwrap();
        hosts.push(ns);
    }
    let ep = |lab: &mut Lab, id: &str, host: &str| veth_endpoint(lab, &m, m.port(id).unwrap(), host, false);
    let a1 = ep(&mut lab, "a1", &hosts[0]);
    let a3 = ep(&mut lab, "a3", &hosts[0]);
    let a2 = ep(&mut lab, "a2", &hosts[1]);
    let h2 = Dataplane::start("h2", EngineConfig { workers: 1, pin: vec![], busy_rounds: 20 });
    h2.apply_model(m.clone()).unwrap();
    h2.add_tunnel("192.0.2.2".parse().unwrap(), Some(&Lab::path(&hosts[1]))).unwrap();
    h2.add_port("a2", "va2", Some(&Lab::path(&hosts[1]))).unwrap();

    let model_file = dir.join("model.json");
    std::fs::write(&model_file, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let socket = dir.join("h1.sock");
    let log = dir.join("run.log");
    let h1ns = Lab::path(&hosts[0]);
    let child = Command::new(env!("CARGO_BIN_EXE_dataplane"))
        .args(["run", "--host", "h1", "--workers", "1", "--port", "a1=va1", "--port", "a3=va3"])
        .arg("--model")
        .arg(&model_file)
        .arg("--netns")
        .arg(&h1ns)
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting dataplane run");
    let mut run = Running { child, log };
    let end = Instant::now() + Duration::from_secs(15);
    while !cli(&socket, &["show", "ports"]).0 {
        assert!(Instant::now() < end, "dataplane run did not come up: {}", run.log());
        assert!(run.child.try_wait().unwrap().is_none(), "dataplane run exited: {}", run.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    let ports = ok(&socket, &["show", "ports"]);
    for want in ["va1", "va3", "vxlan", "tunnel", "net-a", "fa:16:3e:00:0a:01"] {
        assert!(ports.contains(want), "show ports lacks {want}: {ports}");
    }
    // Traffic through the CLI-run datapath, same host and to h2.
    ping(&a3, "10.0.0.11").unwrap_or_else(|e| panic!("a3 -> a1 on h1: {e}\n{}", run.log()));
    ping(&a1, "10.0.0.12").expect("a1 (h1, CLI) -> a2 (h2, library)");
    ping(&a2, "10.0.0.11").expect("a2 -> a1");

    let ct = ok(&socket, &["show", "conntrack"]);
    assert!(ct.contains("icmp,zone=") && ct.contains("10.0.0.12"), "{ct}");
    let counters = ok(&socket, &["show", "counters"]);
    let va1 = counters.lines().find(|l| l.contains("va1")).unwrap_or_else(|| panic!("{counters}"));
    let rx: u64 = va1.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(rx >= 2, "va1 received the pings: {counters}");
    assert!(counters.contains("ingress security group") || counters.contains("drops:"), "{counters}");
    let caches = ok(&socket, &["show", "caches"]);
    assert!(caches.contains("hit rate") && caches.contains("megaflows installed"), "{caches}");
    let upcalls: u64 = caches.lines().find(|l| l.starts_with("misses")).and_then(|l| l.split_whitespace().last()).unwrap().parse().unwrap();
    assert!(upcalls > 0, "{caches}");
    let sg = ok(&socket, &["show", "pipeline", "--table", "ingress_sg"]);
    assert!(sg.starts_with("table 11 ingress_sg"), "{sg}");
    assert!(sg.contains("security group ssh-only") && !sg.contains("table 4 l2"), "{sg}");
    let all = ok(&socket, &["show", "pipeline"]);
    assert!(all.contains("table 0 classify") && all.contains("table 12 flood_sg"), "all tables listed");
    let (good, text) = cli(&socket, &["show", "pipeline", "--table", "nope"]);
    assert!(!good && text.contains("No table 'nope'"), "{text}");
    let json = ok(&socket, &["show", "ports", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v.as_array().unwrap().iter().any(|p| p["attached_to"] == "a3"), "{json}");

    // Trace: TCP 22 to a3 is let in, TCP 80 is not; the reply direction of an established connection is.
    let flow = "port=a1,tcp,ip_src=10.0.0.11,ip_dst=10.0.0.13,tp_src=40000,eth_dst=fa:16:3e:00:0a:03";
    let t = ok(&socket, &["trace", &format!("{flow},tp_dst=22")]);
    assert!(t.contains("result: output to va3"), "{t}");
    assert!(t.contains("port_security") && t.contains("egress_sg") && t.contains("ingress_sg"), "{t}");
    let t = ok(&socket, &["trace", &format!("{flow},tp_dst=80")]);
    assert!(t.contains("result: dropped: ingress security group"), "{t}");
    let t = ok(&socket, &["trace", "--ct-state", "est", &format!("{flow},tp_dst=80")]);
    assert!(t.contains("result: output to va3"), "established traffic passes: {t}");
    // Across hosts: into the tunnel toward h2.
    let t = ok(&socket, &["trace", "port=a1", "icmp", "ip_src=10.0.0.11", "ip_dst=10.0.0.12", "icmp_type=8", "eth_dst=fa:16:3e:00:0a:02"]);
    assert!(t.contains("VXLAN (VNI 1001) to 192.0.2.2"), "{t}");
    let t = ok(&socket, &["trace", "port=a1,arp,ip_src=10.0.0.11,ip_dst=10.0.0.1,eth_dst=ff:ff:ff:ff:ff:ff"]);
    assert!(t.contains("answered by the datapath: arp_reply(fa:16:3e:ff:00:01)"), "{t}");
    let (good, text) = cli(&socket, &["trace", "port=zz,tcp"]);
    assert!(!good && text.contains("Port 'zz' is not attached here"), "{text}");

    // A bad model is refused and the running pipeline stays.
    let mut bad = m.clone();
    bad.subnets[1].cidr = "10.0.0.128/25".parse().unwrap();
    bad.subnets[1].gateway_ip = None;
    bad.subnets[1].ipv6_address_mode = None;
    let bad_file = dir.join("bad.json");
    std::fs::write(&bad_file, serde_json::to_string(&bad).unwrap()).unwrap();
    let (good, text) = cli(&socket, &["apply", "--model", bad_file.to_str().unwrap()]);
    assert!(!good && text.contains("overlap"), "{text}");
    ping(&a1, "10.0.0.12").expect("still forwarding after the refused model");
    // A good one is applied: a3 now also lets TCP 80 in.
    let mut good_model = m.clone();
    let mut rule = good_model.security_groups[1].rules[1].clone();
    rule.port_range_min = Some(80);
    rule.port_range_max = Some(80);
    good_model.security_groups[1].rules.push(rule);
    std::fs::write(&model_file, serde_json::to_string(&good_model).unwrap()).unwrap();
    ok(&socket, &["apply", "--model", model_file.to_str().unwrap()]);
    let t = ok(&socket, &["trace", &format!("{flow},tp_dst=80")]);
    assert!(t.contains("result: output to va3"), "after apply: {t}");

    let st = run.stop();
    assert!(st.success(), "dataplane run exits cleanly on SIGTERM: {st:?} {}", run.log());
    assert!(!socket.exists(), "the control socket is removed");
    drop(h2);
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
