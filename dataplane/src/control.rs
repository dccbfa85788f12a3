//! The control API the agent calls (attach ports, apply a model, read state)
//! and the same API on a unix socket for the `dataplane` CLI.
//!
//! One [`Dataplane`] assembles the compiler and the engine for one host. The
//! socket speaks one JSON [`Request`] per line and answers one JSON line:
//! `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::compiler::{CompileError, Compiler, HostConfig, MetadataPort, Neighbors, MARK_EGRESS, MARK_INGRESS};
use crate::conntrack::Connection;
use crate::engine::{Engine, EngineConfig, EngineStats, PortKind};
use crate::flow::{ct_state, ethertype, ip_from_bytes, proto, FlowKey};
use crate::metadata::{MetadataClient, MetadataError, MetadataHandler, MetadataService, TAP_MAC, TAP_NAME};
use crate::model::Model;
use crate::pipeline::{describe_actions, describe_dp_action, describe_match, parse_flow, reg, table, DpAction, Pipeline};
use crate::ports::{AfPacket, PortError, Tap, Tunnel};

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The model was rejected; the running pipeline is unchanged.
    #[error("Model rejected, running pipeline kept: {0}")]
    Rejected(#[from] CompileError),
    /// A port could not be opened.
    #[error("Port could not be attached: {0}")]
    Port(#[from] PortError),
    /// The metadata service could not start.
    #[error("Metadata service: {0}")]
    Metadata(#[from] MetadataError),
    /// A vhost-user port could not be created.
    #[error("vhost-user port could not be attached: {0}")]
    VhostUser(#[from] crate::vhost_user::VhostUserError),
    /// The control socket could not be served or reached.
    #[error("Control socket {path}: {source}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A request could not be understood.
    #[error("Bad request: {0}")]
    BadRequest(String),
    /// The datapath answered with an error.
    #[error("{0}")]
    Remote(String),
}

/// What a datapath port is for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Role {
    kind: &'static str,
    what: Option<String>,
}

struct State {
    compiler: Compiler,
    host: HostConfig,
    model: Model,
    neighbors: Neighbors,
    roles: BTreeMap<u32, Role>,
    metadata: Option<MetadataService>,
}

struct Inner {
    engine: Engine,
    state: Mutex<State>,
}

/// One host's dataplane: compiler plus engine.
pub struct Dataplane {
    inner: Arc<Inner>,
    stop: Arc<AtomicBool>,
    learner: Option<JoinHandle<()>>,
}

/// A datapath port as `show ports` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortInfo {
    /// Datapath port number.
    pub port: u32,
    /// Interface name.
    pub name: String,
    /// afpacket, tap, internal, tunnel, uplink, metadata.
    pub kind: String,
    /// The logical port (or physical network of an uplink).
    pub attached_to: Option<String>,
    /// The logical port's network.
    pub network: Option<String>,
    /// The logical port's MAC.
    pub mac: Option<String>,
}

/// A pipeline rule as `show pipeline` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleInfo {
    /// Table number.
    pub table: u8,
    /// Table name.
    pub table_name: String,
    /// Priority.
    pub priority: u16,
    /// The match.
    #[serde(rename = "match")]
    pub matches: String,
    /// The actions.
    pub actions: String,
    /// Which model object the rule comes from.
    pub note: String,
}

/// Cache counters as `show caches` lists them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheInfo {
    /// Packets received.
    pub packets: u64,
    /// Exact-match cache hits.
    pub emc_hits: u64,
    /// Megaflow cache hits.
    pub megaflow_hits: u64,
    /// Misses that ran the pipeline.
    pub upcalls: u64,
    /// Installed megaflows.
    pub megaflows: u64,
    /// (EMC + megaflow hits) / lookups.
    pub hit_rate: f64,
    /// Exact-match hits / lookups.
    pub emc_hit_rate: f64,
    /// Megaflows kept by revalidation after pipeline changes.
    pub revalidated_kept: u64,
    /// Megaflows removed by revalidation.
    pub revalidated_removed: u64,
}

/// Per-port and per-reason counters as `show counters` lists them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counters {
    /// Per port: number, name, rx, tx, tx_dropped.
    pub ports: Vec<(u32, String, u64, u64, u64)>,
    /// Frames that failed to parse, by reason.
    pub parse_errors: Vec<(String, u64)>,
    /// Packets dropped by the pipeline, by reason.
    pub drops: Vec<(String, u64)>,
}

/// One table visit in a trace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceStepInfo {
    /// Resubmit depth.
    pub depth: u8,
    /// Table name.
    pub table: String,
    /// Matched rule's priority (none: a miss).
    pub priority: Option<u16>,
    /// Matched rule's note.
    pub rule: String,
    /// Matched rule's actions.
    pub actions: String,
}

/// One pass of a packet through the pipeline (a ct() recirculates).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TracePass {
    /// The packet as this pass sees it.
    pub flow: String,
    /// The conntrack state assumed for this pass (after a ct()).
    pub ct_state: Option<String>,
    /// The tables visited.
    pub steps: Vec<TraceStepInfo>,
    /// The datapath actions of this pass.
    pub actions: Vec<String>,
}

/// Where one packet would go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceReport {
    /// The passes.
    pub passes: Vec<TracePass>,
    /// The outcome in words: outputs, local answer or drop reason.
    pub result: String,
}

/// A request on the control socket (one JSON object per line, tagged by `cmd`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Datapath ports.
    Ports,
    /// Pipeline rules, of one table (name or number) or all.
    Pipeline {
        /// The table.
        #[serde(default)]
        table: Option<String>,
    },
    /// Cache counters and hit rates.
    Caches,
    /// Conntrack entries.
    Conntrack,
    /// Per-port counters, parse errors, drops.
    Counters,
    /// Where one packet would go.
    Trace {
        /// The packet as `field=value` pairs (see [`parse_flow`]); `port=<logical port>` sets in_port.
        flow: String,
        /// Conntrack state to assume after each ct() (`new`, `est`, `rel`, `inv`, `+rpl`); else looked up.
        #[serde(default)]
        ct_state: Option<String>,
    },
    /// Apply a new model (same checks as the library call).
    Apply {
        /// The model.
        model: serde_json::Value,
    },
}

impl Dataplane {
    /// Starts the engine for host `name`.
    pub fn start(name: &str, cfg: EngineConfig) -> Dataplane {
        let inner = Arc::new(Inner {
            engine: Engine::start(cfg),
            state: Mutex::new(State {
                compiler: Compiler::new(),
                host: HostConfig { name: name.to_string(), ..Default::default() },
                model: Model::default(),
                neighbors: Neighbors::new(),
                roles: BTreeMap::new(),
                metadata: None,
            }),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let learner = {
            let (inner, stop) = (inner.clone(), stop.clone());
            std::thread::Builder::new()
                .name("dp-learner".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                        let learned = inner.engine.take_learned();
                        if learned.is_empty() {
                            continue;
                        }
                        let mut s = inner.state.lock().expect("state lock");
                        let mut changed = false;
                        for (net, ip, mac) in learned {
                            changed |= s.neighbors.insert((net, ip), mac) != Some(mac);
                        }
                        if changed {
                            let _ = inner.recompile(&mut s);
                        }
                    }
                })
                .expect("spawning the learner thread")
        };
        Dataplane { inner, stop, learner: Some(learner) }
    }

    /// The engine (stats, trace, conntrack).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Validates and compiles `model`; on error the running pipeline stays.
    /// Established connections that the new security groups no longer allow
    /// are cut; those still allowed carry on.
    pub fn apply_model(&self, model: Model) -> Result<(), ControlError> {
        self.inner.apply_model(model)
    }

    /// Attaches kernel interface `ifname` (in `netns`) as logical port `port_id`.
    pub fn add_port(&self, port_id: &str, ifname: &str, netns: Option<&Path>) -> Result<u32, ControlError> {
        let sock = AfPacket::open(ifname, netns)?;
        self.inner.attach_port(port_id, ifname, PortKind::AfPacket(sock), "afpacket")
    }

    /// Creates internal tap `ifname` (in `netns`; with the port's MAC from the
    /// model when known) and attaches it as logical port `port_id`. The
    /// interface goes away when the port is removed or the datapath stops.
    pub fn add_internal_port(&self, port_id: &str, ifname: &str, netns: Option<&Path>) -> Result<u32, ControlError> {
        let mac = self.inner.state.lock().expect("state lock").model.port(port_id).map(|p| p.mac_address);
        let tap = Tap::create(ifname, mac, netns)?;
        self.inner.attach_port(port_id, ifname, PortKind::Tap(tap), "internal")
    }

    /// Listens for a VM's virtio-net device on the vhost-user socket in `cfg`
    /// and attaches it as logical port `port_id`: the datapath is the device's
    /// vhost-user backend (see [`crate::vhost_user`]).
    pub fn add_vhost_user_port(&self, port_id: &str, cfg: &crate::vhost_user::VhostUserConfig) -> Result<u32, ControlError> {
        let port = crate::vhost_user::VhostUserPort::listen(cfg)?;
        self.inner.attach_port(port_id, port_id, PortKind::Burst(Box::new(port)), "vhost-user")
    }

    /// Attaches any [`crate::ports::BurstPort`] (a VM port of another kind,
    /// a test double) as the datapath port of logical port `port_id`.
    pub fn add_burst_port(&self, port_id: &str, name: &str, port: Box<dyn crate::ports::BurstPort>) -> Result<u32, ControlError> {
        self.inner.attach_port(port_id, name, PortKind::Burst(port), "burst")
    }

    /// Detaches logical port `port_id`.
    pub fn remove_port(&self, port_id: &str) -> Result<(), ControlError> {
        let mut s = self.inner.state.lock().expect("state lock");
        if let Some(no) = s.host.ports.remove(port_id) {
            self.inner.recompile(&mut s)?;
            self.inner.engine.remove_port(no);
            s.roles.remove(&no);
        }
        Ok(())
    }

    /// Attaches `ifname` as the uplink of physical network `physnet`.
    pub fn add_uplink(&self, physnet: &str, ifname: &str, netns: Option<&Path>) -> Result<u32, ControlError> {
        let sock = AfPacket::open(ifname, netns)?;
        let no = self.inner.engine.add_port(ifname, PortKind::AfPacket(sock));
        let mut s = self.inner.state.lock().expect("state lock");
        s.host.uplinks.insert(physnet.to_string(), no);
        s.roles.insert(no, Role { kind: "uplink", what: Some(physnet.to_string()) });
        self.inner.recompile(&mut s)?;
        Ok(no)
    }

    /// Opens the VXLAN tunnel port on underlay address `local`.
    pub fn add_tunnel(&self, local: Ipv4Addr, netns: Option<&Path>) -> Result<u32, ControlError> {
        let t = Tunnel::open(local, netns)?;
        let no = self.inner.engine.add_port("vxlan", PortKind::Tunnel(t));
        let mut s = self.inner.state.lock().expect("state lock");
        s.host.tunnel_port = Some(no);
        s.roles.insert(no, Role { kind: "tunnel", what: Some(local.to_string()) });
        self.inner.recompile(&mut s)?;
        Ok(no)
    }

    /// Opens the VXLAN port with encapsulation done in the datapath: frames go
    /// out of (and come in through) an AF_PACKET ring on underlay interface
    /// `ifname`, whose address is `local`. Remote endpoints' MACs come from
    /// the kernel's neighbour table of that namespace, read now.
    pub fn add_vxlan_underlay(&self, local: Ipv4Addr, ifname: &str, netns: Option<&Path>) -> Result<u32, ControlError> {
        let sock = crate::ports::AfPacket::open(ifname, netns)?;
        let name = ifname.to_string();
        let (mac, neighbors) = crate::ports::in_netns(netns, move || Ok((crate::ports::interface_mac(&name)?, crate::ports::read_neighbors())))?;
        self.add_vxlan_underlay_port(local, Box::new(sock), mac, neighbors, None, ifname)
    }

    /// Opens the VXLAN port with encapsulation done in the datapath over any
    /// frame port (a DPDK NIC, for instance) that owns underlay address
    /// `local` with MAC `mac`; `neighbors` are MACs already known for remote
    /// endpoints or next hops (others are resolved with ARP on the port);
    /// `gateway` (prefix length of `local`'s subnet, router) is where
    /// remotes off that subnet are sent. `name` is what `show ports` calls
    /// the underlay.
    pub fn add_vxlan_underlay_port(&self, local: Ipv4Addr, port: Box<dyn crate::ports::BurstPort>, mac: [u8; 6], neighbors: Vec<(Ipv4Addr, [u8; 6])>, gateway: Option<(u8, Ipv4Addr)>, name: &str) -> Result<u32, ControlError> {
        let mut u = crate::ports::VxlanUnderlay::new(port, local, mac, neighbors);
        if let Some((len, gw)) = gateway {
            u.set_gateway(len, gw);
        }
        let no = self.inner.engine.add_port("vxlan", PortKind::Underlay(u));
        let mut s = self.inner.state.lock().expect("state lock");
        s.host.tunnel_port = Some(no);
        s.roles.insert(no, Role { kind: "tunnel", what: Some(format!("{local} on {name}")) });
        self.inner.recompile(&mut s)?;
        Ok(no)
    }

    /// Serves 169.254.169.254:80 for local ports with `handler` (replacing an
    /// earlier handler). See [`crate::metadata`].
    pub fn set_metadata_handler(&self, handler: Arc<dyn MetadataHandler>) -> Result<(), ControlError> {
        let (service, tap) = MetadataService::start(handler)?;
        let no = self.inner.engine.add_port(TAP_NAME, PortKind::Tap(tap));
        let mut s = self.inner.state.lock().expect("state lock");
        let old = s.host.metadata.replace(MetadataPort { port: no, mac: TAP_MAC });
        s.roles.insert(no, Role { kind: "metadata", what: None });
        s.metadata = Some(service);
        self.inner.recompile(&mut s)?;
        if let Some(old) = old {
            self.inner.engine.remove_port(old.port);
            s.roles.remove(&old.port);
        }
        Ok(())
    }

    /// Counters, caches and conntrack size.
    pub fn stats(&self) -> EngineStats {
        self.inner.engine.stats()
    }

    /// The datapath ports.
    pub fn ports(&self) -> Vec<PortInfo> {
        self.inner.ports()
    }

    /// The pipeline's rules, of one table or all, by table then priority.
    pub fn rules(&self, table: Option<u8>) -> Vec<RuleInfo> {
        rules_of(&self.inner.engine.pipeline(), table)
    }

    /// Where the packet described by `flow` would go (see [`Request::Trace`]).
    pub fn trace(&self, flow: &str, ct: Option<&str>) -> Result<TraceReport, ControlError> {
        self.inner.trace(flow, ct)
    }

    /// Answers one control request.
    pub fn handle(&self, req: Request) -> Result<serde_json::Value, ControlError> {
        self.inner.handle(req)
    }

    /// Serves the control API on unix socket `path` until the returned value is dropped.
    pub fn serve_control(&self, path: &Path) -> Result<ControlSocket, ControlError> {
        ControlSocket::start(self.inner.clone(), path)
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.learner.take() {
            let _ = h.join();
        }
    }
}

impl Inner {
    fn recompile(&self, s: &mut State) -> Result<(), CompileError> {
        let State { compiler, host, model, neighbors, .. } = s;
        let p = compiler.compile(model, host, neighbors)?;
        self.installed(s, p);
        Ok(())
    }

    /// Installs a freshly compiled pipeline and brings the rest in line with it:
    /// the metadata client map, and the connections it no longer allows.
    fn installed(&self, s: &State, p: Pipeline) {
        self.engine.set_pipeline(p);
        let p = self.engine.pipeline();
        self.engine.retain_connections(|c| still_allowed(&p, c));
        if let Some(m) = &s.metadata {
            let mut clients = BTreeMap::new();
            for (pid, _) in s.host.ports.iter() {
                let (Some(port), Some(lp)) = (s.model.port(pid), s.compiler.ids.port(pid)) else { continue };
                let Some(ip) = port.fixed_ips.iter().find_map(|f| match f.ip_address {
                    std::net::IpAddr::V4(a) => Some(a),
                    _ => None,
                }) else {
                    continue;
                };
                clients.insert(crate::metadata::client_addr(lp), MetadataClient { port_id: pid.clone(), network_id: port.network_id.clone(), fixed_ip: ip });
            }
            if let Ok(mut c) = m.clients.write() {
                *c = clients.into_iter().collect();
            }
        }
    }

    fn apply_model(&self, model: Model) -> Result<(), ControlError> {
        let mut s = self.state.lock().expect("state lock");
        let State { compiler, host, neighbors, .. } = &mut *s;
        let p = compiler.compile(&model, host, neighbors)?;
        s.model = model;
        self.installed(&s, p);
        Ok(())
    }

    fn attach_port(&self, port_id: &str, ifname: &str, kind: PortKind, role: &'static str) -> Result<u32, ControlError> {
        let no = self.engine.add_port(ifname, kind);
        let mut s = self.state.lock().expect("state lock");
        s.host.ports.insert(port_id.to_string(), no);
        if let Err(e) = self.recompile(&mut s) {
            s.host.ports.remove(port_id);
            self.engine.remove_port(no);
            return Err(e.into());
        }
        s.roles.insert(no, Role { kind: role, what: Some(port_id.to_string()) });
        Ok(no)
    }

    fn ports(&self) -> Vec<PortInfo> {
        let stats = self.engine.stats();
        let s = self.state.lock().expect("state lock");
        stats
            .ports
            .iter()
            .map(|(no, name, ..)| {
                let role = s.roles.get(no);
                let logical = role.filter(|r| r.kind == "afpacket" || r.kind == "internal").and_then(|r| r.what.as_deref()).and_then(|id| s.model.port(id));
                PortInfo {
                    port: *no,
                    name: name.clone(),
                    kind: role.map(|r| r.kind).unwrap_or("other").to_string(),
                    attached_to: role.and_then(|r| r.what.clone()),
                    network: logical.map(|p| p.network_id.clone()),
                    mac: logical.map(|p| p.mac_address.to_string()),
                }
            })
            .collect()
    }

    fn caches(&self) -> CacheInfo {
        let st = self.engine.stats();
        let lookups = st.emc_hits + st.megaflow_hits + st.upcalls;
        CacheInfo {
            packets: st.packets,
            emc_hits: st.emc_hits,
            megaflow_hits: st.megaflow_hits,
            upcalls: st.upcalls,
            megaflows: st.megaflows,
            hit_rate: st.hit_rate,
            emc_hit_rate: if lookups == 0 { 0.0 } else { st.emc_hits as f64 / lookups as f64 },
            revalidated_kept: st.revalidated.0,
            revalidated_removed: st.revalidated.1,
        }
    }

    fn counters(&self) -> Counters {
        let st = self.engine.stats();
        Counters { ports: st.ports, parse_errors: st.parse_errors, drops: st.drops }
    }

    fn port_name(&self, no: u32) -> String {
        self.engine.stats().ports.iter().find(|p| p.0 == no).map(|p| format!("{} (port {no})", p.1)).unwrap_or_else(|| format!("port {no}"))
    }

    fn trace(&self, flow: &str, ct: Option<&str>) -> Result<TraceReport, ControlError> {
        let (mut key, extra) = parse_flow(flow).map_err(ControlError::BadRequest)?;
        for (name, value) in extra {
            match name.as_str() {
                "port" => {
                    let s = self.state.lock().expect("state lock");
                    key.in_port = *s.host.ports.get(&value).ok_or_else(|| ControlError::BadRequest(format!("Port '{value}' is not attached here")))?;
                    if key.eth_src == [0; 6] {
                        if let Some(p) = s.model.port(&value) {
                            key.eth_src = p.mac_address.0;
                            if key.eth_type == ethertype::ARP && key.arp_sha == [0; 6] {
                                key.arp_sha = p.mac_address.0;
                            }
                        }
                    }
                }
                "in_port" => {
                    let no = self.engine.stats().ports.iter().find(|p| p.1 == value).map(|p| p.0);
                    key.in_port = no.ok_or_else(|| ControlError::BadRequest(format!("No datapath port named '{value}'")))?;
                }
                _ => return Err(ControlError::BadRequest(format!("Unknown flow field '{name}'"))),
            }
        }
        if key.in_port == 0 {
            return Err(ControlError::BadRequest("The flow needs in_port=<number or name> or port=<logical port>".into()));
        }
        let forced = ct.map(parse_ct_state).transpose().map_err(ControlError::BadRequest)?;
        let mut passes = Vec::new();
        let mut ct_note = None;
        for _ in 0..6 {
            let (t, steps) = self.engine.trace(&key);
            passes.push(TracePass {
                flow: describe_key(&key),
                ct_state: ct_note.take(),
                steps: steps
                    .iter()
                    .map(|st| TraceStepInfo {
                        depth: st.depth,
                        table: table::name(st.table).to_string(),
                        priority: st.rule.as_ref().map(|r| r.0),
                        rule: st.rule.as_ref().map(|r| r.1.clone()).unwrap_or_else(|| "(no rule matched)".into()),
                        actions: st.rule.as_ref().map(|r| describe_actions(&r.2)).unwrap_or_default(),
                    })
                    .collect(),
                actions: t.actions.iter().map(describe_dp_action).collect(),
            });
            let recirc = t.actions.iter().find_map(|a| match a {
                DpAction::Ct(ct, id) if *id != 0 => Some((*ct, *id)),
                _ => None,
            });
            let Some((ct, id)) = recirc else {
                return Ok(TraceReport { passes, result: self.outcome(&t.actions) });
            };
            let zone = ct.zone;
            let mut state = forced.unwrap_or_else(|| self.engine.conntrack_peek(&key, zone));
            // NAT as the datapath would apply it: the mapping of the known
            // connection, or for a new one that source NAT commits, the
            // outside address (forced states judge by the connection table
            // too, except a forced "new", which takes the new mapping).
            let nat = if forced.is_some_and(|f| f & ct_state::NEW != 0) {
                match ct.nat {
                    Some(crate::pipeline::Nat::Snat { addr, .. }) if ct.commit => Some(crate::conntrack::NatPeek { dst: false, addr: crate::flow::ip_bytes(addr.into()), port: None }),
                    _ => None,
                }
            } else {
                self.engine.conntrack_peek_nat(&key, &ct)
            };
            let mut nat_note = String::new();
            if let Some(n) = nat {
                let ports = matches!(key.ip_proto, proto::TCP | proto::UDP);
                let addr = crate::flow::ip_from_bytes(n.addr);
                if n.dst {
                    key.ip_dst = n.addr;
                    state |= ct_state::DNAT;
                } else {
                    key.ip_src = n.addr;
                    state |= ct_state::SNAT;
                }
                let port = match (n.port, ports) {
                    (Some(p), true) => {
                        if n.dst {
                            key.l4_dst = p;
                        } else {
                            key.l4_src = p;
                        }
                        format!(":{p}")
                    }
                    (None, true) => " (port picked at commit)".to_string(),
                    _ => String::new(),
                };
                nat_note = format!("; NAT: {} becomes {addr}{port}", if n.dst { "destination" } else { "source" });
            } else if ct.nat.is_some() && forced.is_some_and(|f| f & ct_state::ESTABLISHED != 0) {
                nat_note = "; NAT: no connection in the table to take a mapping from".into();
            }
            key.recirc_id = id;
            key.ct_zone = zone;
            key.ct_state = state;
            ct_note = Some(format!("{} (zone {zone}{}){nat_note}", ct_state_name(state), if forced.is_some() { ", as asked" } else { ", from the connection table" }));
        }
        Ok(TraceReport { passes, result: "too many recirculations".into() })
    }

    fn outcome(&self, actions: &[DpAction]) -> String {
        let mut parts = Vec::new();
        for a in actions {
            match a {
                DpAction::Output(p) => parts.push(format!("output to {}", self.port_name(*p))),
                DpAction::OutputInPort => parts.push("sent back out of the input port".to_string()),
                DpAction::Tunnel { vni, remote, .. } => parts.push(format!("VXLAN (VNI {vni}) to {remote}")),
                DpAction::ArpReply(_) | DpAction::NdAdvert(_) | DpAction::EchoReply(_) | DpAction::DhcpReply(_) | DpAction::RouterAdvert(_) => parts.push(format!("answered by the datapath: {}", describe_dp_action(a))),
                DpAction::ArpResolve { target, .. } => parts.push(format!("held: ARP request for next hop {} sent", Ipv4Addr::from(*target))),
                DpAction::Drop(why) => parts.push(format!("dropped: {why}")),
                _ => {}
            }
        }
        if parts.is_empty() {
            "no output".into()
        } else {
            parts.join("; ")
        }
    }

    fn handle(&self, req: Request) -> Result<serde_json::Value, ControlError> {
        let json = |v: Result<serde_json::Value, serde_json::Error>| v.map_err(|e| ControlError::BadRequest(e.to_string()));
        match req {
            Request::Ports => json(serde_json::to_value(self.ports())),
            Request::Pipeline { table } => {
                let t = match table.as_deref() {
                    None | Some("") | Some("all") => None,
                    Some(name) => Some(table_number(name).ok_or_else(|| ControlError::BadRequest(format!("No table '{name}'")))?),
                };
                json(serde_json::to_value(rules_of(&self.engine.pipeline(), t)))
            }
            Request::Caches => json(serde_json::to_value(self.caches())),
            Request::Conntrack => json(serde_json::to_value(self.engine.connections())),
            Request::Counters => json(serde_json::to_value(self.counters())),
            Request::Trace { flow, ct_state } => json(serde_json::to_value(self.trace(&flow, ct_state.as_deref())?)),
            Request::Apply { model } => {
                let m = Model::from_json(&model.to_string()).map_err(|e| ControlError::Rejected(CompileError::Model(e)))?;
                self.apply_model(m)?;
                Ok(serde_json::json!("applied"))
            }
        }
    }
}

/// Whether a committed connection would still be admitted by the security
/// group table that committed it. Connections committed elsewhere (SNAT) stay.
fn still_allowed(p: &Pipeline, c: &Connection) -> bool {
    let (tbl, r) = match c.mark {
        MARK_EGRESS => (table::EGRESS_SG, reg::INPORT),
        MARK_INGRESS => (table::INGRESS_SG, reg::OUTPORT),
        _ => return true,
    };
    let o = &c.orig;
    let mut k = FlowKey { ip_proto: o.proto, ip_src: o.src, ip_dst: o.dst, ct_zone: o.zone, ip_ttl: 64, ..Default::default() };
    k.eth_type = if ip_from_bytes(o.src).is_ipv4() { ethertype::IPV4 } else { ethertype::IPV6 };
    k.regs[r] = o.zone as u32;
    match o.proto {
        proto::TCP | proto::UDP => {
            k.l4_src = o.sport;
            k.l4_dst = o.dport;
        }
        proto::ICMP => k.l4_src = 8,
        proto::ICMPV6 => k.l4_src = 128,
        _ => {}
    }
    p.allows_new(tbl, &k)
}

fn rules_of(p: &Pipeline, only: Option<u8>) -> Vec<RuleInfo> {
    let mut out: Vec<RuleInfo> = p
        .rules()
        .iter()
        .filter(|r| only.is_none_or(|t| t == r.table))
        .map(|r| RuleInfo { table: r.table, table_name: table::name(r.table).to_string(), priority: r.priority, matches: describe_match(&r.m), actions: describe_actions(&r.actions), note: r.note.clone() })
        .collect();
    out.sort_by(|a, b| a.table.cmp(&b.table).then(b.priority.cmp(&a.priority)));
    out
}

/// A table's number from its name or number.
pub fn table_number(name: &str) -> Option<u8> {
    if let Ok(n) = name.parse::<u8>() {
        return ((n as usize) < table::COUNT).then_some(n);
    }
    (0..table::COUNT as u8).find(|t| table::name(*t) == name)
}

fn parse_ct_state(s: &str) -> Result<u8, String> {
    let mut bits = ct_state::TRACKED;
    for part in s.split(['+', ',', '|']).map(str::trim).filter(|p| !p.is_empty()) {
        bits |= match part {
            "new" => ct_state::NEW,
            "est" | "established" => ct_state::ESTABLISHED,
            "rel" | "related" => ct_state::RELATED,
            "rpl" | "reply" => ct_state::REPLY,
            "inv" | "invalid" => ct_state::INVALID,
            "trk" => 0,
            other => return Err(format!("Unknown conntrack state '{other}' (new, est, rel, rpl, inv)")),
        };
    }
    Ok(bits)
}

fn ct_state_name(bits: u8) -> String {
    let names = [(ct_state::TRACKED, "trk"), (ct_state::NEW, "new"), (ct_state::ESTABLISHED, "est"), (ct_state::RELATED, "rel"), (ct_state::REPLY, "rpl"), (ct_state::INVALID, "inv"), (ct_state::SNAT, "snat"), (ct_state::DNAT, "dnat")];
    names.iter().filter(|(b, _)| bits & b != 0).map(|(_, n)| *n).collect::<Vec<_>>().join("+")
}

fn describe_key(k: &FlowKey) -> String {
    let mut parts = vec![format!("in_port={}", k.in_port)];
    if k.recirc_id != 0 {
        parts.push(format!("recirc={}", k.recirc_id));
    }
    if k.tun_id != 0 {
        parts.push(format!("tun_id={}", k.tun_id));
    }
    parts.push(format!("eth_src={}", k.eth_src()));
    parts.push(format!("eth_dst={}", k.eth_dst()));
    parts.push(format!("eth_type={:#06x}", k.eth_type));
    if matches!(k.eth_type, ethertype::IPV4 | ethertype::IPV6 | ethertype::ARP) {
        parts.push(format!("ip_src={}", k.src_ip()));
        parts.push(format!("ip_dst={}", k.dst_ip()));
        parts.push(format!("ip_proto={}", k.ip_proto));
    }
    if matches!(k.ip_proto, proto::TCP | proto::UDP | proto::ICMP | proto::ICMPV6) && k.eth_type != ethertype::ARP {
        parts.push(format!("l4_src={}", k.l4_src));
        parts.push(format!("l4_dst={}", k.l4_dst));
    }
    parts.join(",")
}

/// The control socket server; stops and removes the socket when dropped.
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlSocket {
    fn start(inner: Arc<Inner>, path: &Path) -> Result<ControlSocket, ControlError> {
        let err = |source| ControlError::Socket { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        if UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "Another datapath serves this socket")));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
        listener.set_nonblocking(true).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("dp-control".into())
                .spawn(move || {
                    // Each client gets its own thread, so a slow one (an
                    // operator's `dataplane show` while the agent holds a
                    // connection) never blocks another; at most
                    // MAX_CONTROL_CLIENTS at once.
                    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                    while !stop.load(Ordering::Relaxed) {
                        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                        // SAFETY: one valid pollfd for the duration of the call.
                        unsafe { libc::poll(&mut pfd, 1, 200) };
                        let Ok((mut stream, _)) = listener.accept() else { continue };
                        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONTROL_CLIENTS {
                            active.fetch_sub(1, Ordering::AcqRel);
                            let _ = writeln!(stream, "{}", serde_json::json!({"ok": false, "error": format!("Too many control clients (at most {MAX_CONTROL_CLIENTS} at once); try again")}));
                            continue;
                        }
                        let (inner, active2) = (inner.clone(), active.clone());
                        let spawned = std::thread::Builder::new().name("dp-control-client".into()).spawn(move || {
                            serve_client(&inner, stream);
                            active2.fetch_sub(1, Ordering::AcqRel);
                        });
                        if spawned.is_err() {
                            active.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                })
                .map_err(err)?
        };
        Ok(ControlSocket { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Most control clients served at once.
const MAX_CONTROL_CLIENTS: usize = 16;

fn serve_client(inner: &Inner, stream: UnixStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut out) = stream.try_clone() else { return };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match inner.handle(req) {
                Ok(v) => serde_json::json!({"ok": true, "result": v}),
                Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
            },
            Err(e) => serde_json::json!({"ok": false, "error": format!("Bad request: {e}")}),
        };
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

/// Sends one request to the datapath serving `path` and returns its result.
pub fn request(path: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    let err = |source| ControlError::Socket { path: path.to_path_buf(), source };
    let mut stream = UnixStream::connect(path).map_err(err)?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(err)?;
    let line = serde_json::to_string(req).map_err(|e| ControlError::BadRequest(e.to_string()))?;
    writeln!(stream, "{line}").map_err(err)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(err)?;
    let v: serde_json::Value = serde_json::from_str(&answer).map_err(|e| ControlError::Remote(format!("Unreadable answer: {e}")))?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v["result"].clone())
    } else {
        Err(ControlError::Remote(v["error"].as_str().unwrap_or("Unknown error").to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let path = format!("{}/tests/models/two_tenants.json", env!("CARGO_MANIFEST_DIR"));
        Model::from_json(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r: Request = serde_json::from_str(r#"{"cmd":"pipeline","table":"l2"}"#).unwrap();
        assert!(matches!(r, Request::Pipeline { table: Some(ref t) } if t == "l2"));
        let r: Request = serde_json::from_str(r#"{"cmd":"trace","flow":"port=a1,tcp,ip_dst=10.0.0.13,tp_dst=22"}"#).unwrap();
        assert!(matches!(r, Request::Trace { ct_state: None, .. }));
        assert_eq!(table_number("ingress_sg"), Some(table::INGRESS_SG));
        assert_eq!(table_number("12"), Some(table::FLOOD_SG));
        assert_eq!(table_number("99"), None);
        assert_eq!(parse_ct_state("est+rpl").unwrap(), ct_state::TRACKED | ct_state::ESTABLISHED | ct_state::REPLY);
        assert!(parse_ct_state("bogus").is_err());
    }

    #[test]
    fn rule_removal_is_judged_per_connection() {
        use crate::compiler::HostConfig;
        use crate::conntrack::{ProtoState, TcpState, Tuple};
        let mut c = Compiler::new();
        let host = HostConfig { name: "h1".into(), tunnel_port: Some(1), ports: [("a1".to_string(), 10), ("a3".to_string(), 11)].into_iter().collect(), ..Default::default() };
        let mut m = model();
        let p = c.compile(&m, &host, &Neighbors::new()).unwrap();
        let a3 = c.ids.port("a3").unwrap() as u16;
        let ip = |s: &str| crate::flow::ip_bytes(s.parse().unwrap());
        let conn = |dport: u16, mark: u32| {
            let orig = Tuple { zone: a3, proto: proto::TCP, src: ip("10.0.0.11"), dst: ip("10.0.0.13"), sport: 40000, dport };
            Connection { orig, reply: orig, state: ProtoState::Tcp(TcpState::Established), expires: Duration::from_secs(100), mark, snat: false, packets: 3 }
        };
        // a3's group lets TCP 22 in, nothing else.
        assert!(still_allowed(&p, &conn(22, MARK_INGRESS)));
        assert!(!still_allowed(&p, &conn(80, MARK_INGRESS)));
        // Without the ssh rule the port-22 connection no longer qualifies.
        m.security_groups[1].rules.retain(|r| r.protocol.is_none());
        let p = c.compile(&m, &host, &Neighbors::new()).unwrap();
        assert!(!still_allowed(&p, &conn(22, MARK_INGRESS)));
        // a3's egress (any IPv4) still admits its outgoing connections.
        let mut out = conn(22, MARK_EGRESS);
        out.orig = Tuple { zone: a3, proto: proto::TCP, src: ip("10.0.0.13"), dst: ip("10.0.0.11"), sport: 40000, dport: 22 };
        assert!(still_allowed(&p, &out));
        // SNAT connections are never judged by security groups.
        assert!(still_allowed(&p, &conn(80, crate::compiler::MARK_SNAT)));
    }

    #[test]
    fn a_held_connection_does_not_block_other_clients() {
        let dp = Dataplane::start("h1", crate::engine::EngineConfig { workers: 1, pin: vec![], busy_rounds: 50 });
        dp.apply_model(model()).unwrap();
        let path = std::env::temp_dir().join(format!("dp-control-test-{}.sock", std::process::id()));
        let _sock = dp.serve_control(&path).unwrap();
        // An agent that keeps its connection open without asking anything.
        let held = UnixStream::connect(&path).unwrap();
        let t = std::time::Instant::now();
        let ports = request(&path, &Request::Ports).unwrap();
        assert!(ports.is_array() || ports.is_object(), "{ports}");
        assert!(t.elapsed() < Duration::from_secs(2), "answer took {:?}", t.elapsed());
        drop(held);
    }

    /// A VM port that never sends (the trace needs the port attached only).
    struct Quiet;

    impl crate::ports::BurstPort for Quiet {
        fn recv_burst(&mut self, _: &mut [&mut [u8]], _: &mut [usize]) -> usize {
            0
        }
        fn send_burst(&mut self, frames: &[&[u8]]) -> usize {
            frames.len()
        }
        fn fd(&self) -> std::os::fd::RawFd {
            -1
        }
    }

    #[test]
    fn trace_shows_the_gateway_snat() {
        // h2 is r-a's gateway host: a2's traffic to the outside leaves through its SNAT.
        let dp = Dataplane::start("h2", crate::engine::EngineConfig { workers: 1, pin: vec![], busy_rounds: 50 });
        dp.apply_model(model()).unwrap();
        dp.add_burst_port("a2", "a2", Box::new(Quiet)).unwrap();
        let flow = "port=a2,tcp,eth_dst=fa:16:3e:ff:00:01,ip_src=10.0.0.12,ip_dst=198.51.100.7,tp_src=40000,tp_dst=80";
        let r = dp.trace(flow, None).unwrap();
        let snat = r.passes.iter().position(|p| p.ct_state.as_deref().is_some_and(|c| c.contains("NAT: source becomes 203.0.113.10 (port picked at commit)")));
        let Some(i) = snat else { panic!("no SNAT step in {r:#?}") };
        // The passes after it see the translated source.
        assert!(r.passes[i].flow.contains("203.0.113.10"), "{:#?}", r.passes[i]);
        assert!(!r.passes[i].flow.contains("10.0.0.12"), "{:#?}", r.passes[i]);
        // Asked as a new connection, the same mapping.
        let r = dp.trace(flow, Some("new")).unwrap();
        assert!(r.passes.iter().any(|p| p.ct_state.as_deref().is_some_and(|c| c.contains("as asked); NAT: source becomes 203.0.113.10"))), "{r:#?}");
    }
}
