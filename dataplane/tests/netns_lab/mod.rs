//! A cloud in network namespaces for the dataplane's end-to-end tests: hosts
//! on an underlay bridge (and an external bridge for the flat physical
//! network), one datapath per host, endpoints standing in for VMs behind veths
//! or internal taps, and an "outside" namespace on the external network.
//! Everything is removed on drop, also when a test fails.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use dataplane::control::Dataplane;
use dataplane::engine::EngineConfig;
use dataplane::model::Model;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The outside host's address on the external network.
pub const OUTSIDE_IP: &str = "203.0.113.100";

/// Runs a command; its stdout, or an error with its stderr.
pub fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why these tests cannot run here, if they cannot.
pub fn can_run() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root");
    }
    if sh(&["ip", "netns", "list"]).is_err() {
        return Some("ip netns unavailable");
    }
    if sh(&["busybox", "true"]).is_err() {
        return Some("busybox missing (package busybox-static)");
    }
    None
}

/// Skips the calling test (loudly) when the machine cannot run it.
#[macro_export]
macro_rules! require_netns {
    ($name:expr) => {
        if let Some(why) = netns_lab::can_run() {
            eprintln!("SKIPPED {}: {why}", $name);
            return;
        }
    };
}

/// The model most tests use: two tenants, a router whose external gateway
/// (and SNAT) lives on a third host `h3` that has no ports of its own.
pub fn model() -> Model {
    let path = format!("{}/tests/models/two_tenants.json", env!("CARGO_MANIFEST_DIR"));
    let mut m = Model::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
    m.hosts.push(dataplane::model::Host { name: "h3".into(), tunnel_ip: "192.0.2.3".parse().unwrap() });
    m.routers[0].external_gateway.as_mut().unwrap().host = "h3".into();
    m.validate().unwrap();
    m
}

/// Runs `f` on a thread inside namespace `ns`; sockets it opens stay in that namespace.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a valid namespace fd changes only this short-lived thread's namespace.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {path}");
        f()
    })
    .join()
    .expect("namespace thread")
}

/// Namespaces; deleted on drop.
pub struct Lab {
    tag: String,
    namespaces: Vec<String>,
}

impl Lab {
    /// An empty lab with a unique tag.
    pub fn new() -> Lab {
        Lab { tag: format!("{}-{}", std::process::id() % 100000, SEQ.fetch_add(1, Ordering::Relaxed)), namespaces: Vec::new() }
    }

    /// A new namespace `dp<name>-<tag>` with lo up.
    pub fn ns(&mut self, name: &str) -> String {
        let full = format!("dp{name}-{}", self.tag);
        sh(&["ip", "netns", "add", &full]).expect("ip netns add");
        self.namespaces.push(full.clone());
        sh(&["ip", "-n", &full, "link", "set", "lo", "up"]).expect("lo up");
        full
    }

    /// The tag that makes this lab's names unique.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The namespace's path.
    pub fn path(ns: &str) -> PathBuf {
        PathBuf::from(format!("/run/netns/{ns}"))
    }

    /// A veth from `a` (named `a_if`) to `b` (named `b_if`), both up.
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) {
        sh(&["ip", "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b]).expect("veth");
        sh(&["ip", "-n", a, "link", "set", a_if, "up"]).expect("up");
        sh(&["ip", "-n", b, "link", "set", b_if, "up"]).expect("up");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

fn quiet_ipv6(ns: &str) {
    let _ = sh(&["ip", "netns", "exec", ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"]);
}

/// How to build a [`Cloud`].
#[derive(Default)]
pub struct Spec {
    /// Ports attached as internal taps instead of veths.
    pub taps: Vec<&'static str>,
    /// Ports that get their IPv6 address by SLAAC instead of statically.
    pub slaac: Vec<&'static str>,
    /// Whether hosts get an uplink on physnet1 and an outside namespace exists.
    pub external: bool,
}

/// Hosts, their datapaths and the endpoints of every bound port.
pub struct Cloud {
    /// Datapaths by host name (dropped before the lab).
    pub dps: BTreeMap<String, Dataplane>,
    /// Host namespaces by host name.
    pub hosts: BTreeMap<String, String>,
    /// Endpoint namespaces by port id.
    pub eps: BTreeMap<String, String>,
    /// The outside namespace (203.0.113.100 on the external network).
    pub outside: Option<String>,
    /// The model the datapaths run.
    pub model: Model,
    /// The namespaces (last, so it is dropped after the datapaths).
    pub lab: Lab,
}

impl Cloud {
    /// Builds the cloud for `model` as `spec` asks.
    pub fn new(model: Model, spec: Spec) -> Cloud {
        let mut lab = Lab::new();
        let under = lab.ns("u");
        quiet_ipv6(&under);
        for br in ["br0", "brx"] {
            sh(&["ip", "-n", &under, "link", "add", br, "type", "bridge"]).unwrap();
            sh(&["ip", "-n", &under, "link", "set", br, "up"]).unwrap();
        }
        let mut hosts = BTreeMap::new();
        let mut dps = BTreeMap::new();
        for (i, h) in model.hosts.iter().enumerate() {
            let ns = lab.ns(&h.name);
            quiet_ipv6(&ns);
            lab.veth(&ns, "underlay", &under, &format!("u{i}"));
            sh(&["ip", "-n", &under, "link", "set", &format!("u{i}"), "master", "br0"]).unwrap();
            sh(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", h.tunnel_ip), "dev", "underlay"]).unwrap();
            let dp = Dataplane::start(&h.name, EngineConfig { workers: 1, pin: vec![], busy_rounds: 20 });
            dp.apply_model(model.clone()).unwrap();
            let IpAddr::V4(tip) = h.tunnel_ip else { panic!("IPv4 underlay") };
            dp.add_tunnel(tip, Some(&Lab::path(&ns))).unwrap();
            if spec.external {
                lab.veth(&ns, "ext", &under, &format!("x{i}"));
                sh(&["ip", "-n", &under, "link", "set", &format!("x{i}"), "master", "brx"]).unwrap();
                dp.add_uplink("physnet1", "ext", Some(&Lab::path(&ns))).unwrap();
            }
            hosts.insert(h.name.clone(), ns);
            dps.insert(h.name.clone(), dp);
        }
        let outside = spec.external.then(|| {
            let o = lab.ns("out");
            quiet_ipv6(&o);
            lab.veth(&o, "eth0", &under, "xo");
            sh(&["ip", "-n", &under, "link", "set", "xo", "master", "brx"]).unwrap();
            sh(&["ip", "-n", &o, "addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "eth0"]).unwrap();
            o
        });
        let mut eps = BTreeMap::new();
        for p in &model.ports {
            let Some(host) = p.binding_host.as_deref() else { continue };
            let (dp, hns) = (&dps[host], &hosts[host]);
            let ns = if spec.taps.contains(&p.id.as_str()) {
                let ns = lab.ns(&p.id);
                dp.add_internal_port(&p.id, "eth0", Some(&Lab::path(&ns))).unwrap();
                addresses(&model, p, &ns, spec.slaac.contains(&p.id.as_str()));
                ns
            } else {
                let ns = veth_endpoint(&mut lab, &model, p, hns, spec.slaac.contains(&p.id.as_str()));
                dp.add_port(&p.id, &format!("v{}", p.id), Some(&Lab::path(hns))).unwrap();
                ns
            };
            eps.insert(p.id.clone(), ns);
        }
        Cloud { dps, hosts, eps, outside, model, lab }
    }

    /// The endpoint namespace of port `id`.
    pub fn ep(&self, id: &str) -> &str {
        &self.eps[id]
    }

    /// The datapath of host `h`.
    pub fn dp(&self, h: &str) -> &Dataplane {
        &self.dps[h]
    }

    /// Applies `m` on every host.
    pub fn apply(&mut self, m: Model) {
        for dp in self.dps.values() {
            dp.apply_model(m.clone()).unwrap();
        }
        self.model = m;
    }

    /// Packets host `h` received over VXLAN so far.
    pub fn tunnel_rx(&self, h: &str) -> u64 {
        self.dps[h].stats().ports.iter().find(|p| p.1 == "vxlan").map(|p| p.2).unwrap_or(0)
    }
}

/// An endpoint namespace for `p` behind a veth whose other end, `v<port id>`,
/// is in `host_ns`; addresses and default route from the model.
pub fn veth_endpoint(lab: &mut Lab, model: &Model, p: &dataplane::model::Port, host_ns: &str, slaac: bool) -> String {
    let ns = lab.ns(&p.id);
    lab.veth(&ns, "eth0", host_ns, &format!("v{}", p.id));
    sh(&["ip", "-n", &ns, "link", "set", "eth0", "address", &p.mac_address.to_string()]).unwrap();
    // Let the kernel finish checksums itself (AF_PACKET would otherwise see partial ones).
    let _ = sh(&["ip", "netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off"]);
    addresses(model, p, &ns, slaac);
    ns
}

fn addresses(model: &Model, p: &dataplane::model::Port, ns: &str, slaac: bool) {
    for f in &p.fixed_ips {
        let s = model.subnet(&f.subnet_id).unwrap();
        let cidr = format!("{}/{}", f.ip_address, s.cidr.prefix_len());
        if f.ip_address.is_ipv4() {
            sh(&["ip", "-n", ns, "addr", "add", &cidr, "brd", "+", "dev", "eth0"]).unwrap();
            if let Some(gw) = s.gateway_ip {
                sh(&["ip", "-n", ns, "route", "add", "default", "via", &gw.to_string()]).unwrap();
            }
        } else if !slaac {
            sh(&["ip", "-n", ns, "addr", "add", &cidr, "dev", "eth0", "nodad"]).unwrap();
        }
    }
}

/// Pings `dst` from namespace `ns` (`-6` for IPv6); the output on success.
pub fn ping(ns: &str, dst: &str) -> Result<String, String> {
    let six = if dst.contains(':') { "-6" } else { "-4" };
    sh(&["ip", "netns", "exec", ns, "ping", six, "-c", "2", "-i", "0.3", "-W", "2", dst]).or_else(|_| sh(&["ip", "netns", "exec", ns, "ping", six, "-c", "3", "-i", "0.5", "-W", "2", dst]))
}

/// A TCP server inside a namespace: on each connection it writes `peer=<address>`
/// and then echoes every line back.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &str, addr: &str) -> Server {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = in_ns(ns, move || TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let s = s.clone();
                        std::thread::spawn(move || echo(stream, peer, s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Server { stop, thread: Some(thread) }
    }
}

fn echo(stream: TcpStream, peer: SocketAddr, stop: Arc<AtomicBool>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
    let Ok(mut out) = stream.try_clone() else { return };
    if writeln!(out, "peer={}", peer.ip()).is_err() {
        return;
    }
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if out.write_all(line.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client connection to a [`Server`].
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The address the server saw us come from.
    pub seen_as: String,
    /// Our own address.
    pub local: SocketAddr,
}

/// Connects from namespace `ns` to `dst`, waiting up to `secs` seconds.
pub fn connect(ns: &str, dst: &str, secs: u64) -> std::io::Result<Conn> {
    let dst: SocketAddr = dst.parse().unwrap();
    let stream = in_ns(ns, move || TcpStream::connect_timeout(&dst, Duration::from_secs(secs)))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let writer = stream.try_clone()?;
    let local = stream.local_addr()?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let seen_as = first.trim().strip_prefix("peer=").unwrap_or("").to_string();
    Ok(Conn { reader, writer, seen_as, local })
}

impl Conn {
    /// Sends a line and waits up to `secs` for it to come back.
    pub fn echo(&mut self, msg: &str, secs: u64) -> std::io::Result<String> {
        self.reader.get_ref().set_read_timeout(Some(Duration::from_secs(secs)))?;
        writeln!(self.writer, "{msg}")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Ok(line.trim().to_string())
    }
}

/// A UDP socket bound inside namespace `ns`.
pub fn udp(ns: &str, bind: &str) -> UdpSocket {
    let addr: SocketAddr = bind.parse().unwrap();
    let s = in_ns(ns, move || UdpSocket::bind(addr)).unwrap_or_else(|e| panic!("udp bind {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    s
}

/// Everything `sock` receives within `secs` seconds.
pub fn drain(sock: &UdpSocket, secs: f64) -> Vec<(String, SocketAddr)> {
    let mut got = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < end {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            got.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
        }
    }
    got
}
