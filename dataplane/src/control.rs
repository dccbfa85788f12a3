//! The control API the agent calls: attach ports, apply a model, read stats.
//! One [`Dataplane`] assembles the compiler and the engine for one host.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::compiler::{CompileError, Compiler, HostConfig, Neighbors};
use crate::engine::{Engine, EngineConfig, EngineStats, PortKind};
use crate::model::Model;
use crate::ports::{AfPacket, PortError, Tunnel};

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The model was rejected; the running pipeline is unchanged.
    #[error("Model rejected, running pipeline kept: {0}")]
    Rejected(#[from] CompileError),
    /// A port could not be opened.
    #[error("Port could not be attached: {0}")]
    Port(#[from] PortError),
}

struct State {
    compiler: Compiler,
    host: HostConfig,
    model: Model,
    neighbors: Neighbors,
}

/// One host's dataplane: compiler plus engine.
pub struct Dataplane {
    engine: Arc<Engine>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    learner: Option<JoinHandle<()>>,
}

impl Dataplane {
    /// Starts the engine for host `name`.
    pub fn start(name: &str, cfg: EngineConfig) -> Dataplane {
        let engine = Arc::new(Engine::start(cfg));
        let state = Arc::new(Mutex::new(State { compiler: Compiler::new(), host: HostConfig { name: name.to_string(), ..Default::default() }, model: Model::default(), neighbors: Neighbors::new() }));
        let stop = Arc::new(AtomicBool::new(false));
        let learner = {
            let (engine, state, stop) = (engine.clone(), state.clone(), stop.clone());
            std::thread::Builder::new()
                .name("dp-learner".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                        let learned = engine.take_learned();
                        if learned.is_empty() {
                            continue;
                        }
                        let mut s = state.lock().expect("state lock");
                        let mut changed = false;
                        for (net, ip, mac) in learned {
                            changed |= s.neighbors.insert((net, ip), mac) != Some(mac);
                        }
                        if changed {
                            let State { compiler, host, model, neighbors } = &mut *s;
                            if let Ok(p) = compiler.compile(model, host, neighbors) {
                                engine.set_pipeline(p);
                            }
                        }
                    }
                })
                .expect("spawning the learner thread")
        };
        Dataplane { engine, state, stop, learner: Some(learner) }
    }

    /// The engine (stats, trace, conntrack).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn recompile(&self, s: &mut State) -> Result<(), CompileError> {
        let State { compiler, host, model, neighbors } = s;
        let p = compiler.compile(model, host, neighbors)?;
        self.engine.set_pipeline(p);
        Ok(())
    }

    /// Validates and compiles `model`; on error the running pipeline stays.
    pub fn apply_model(&self, model: Model) -> Result<(), ControlError> {
        let mut s = self.state.lock().expect("state lock");
        let State { compiler, host, neighbors, .. } = &mut *s;
        let p = compiler.compile(&model, host, neighbors)?;
        self.engine.set_pipeline(p);
        s.model = model;
        Ok(())
    }

    /// Attaches kernel interface `ifname` (in `netns`) as logical port `port_id`.
    pub fn add_port(&self, port_id: &str, ifname: &str, netns: Option<&Path>) -> Result<u32, ControlError> {
        let sock = AfPacket::open(ifname, netns)?;
        let no = self.engine.add_port(ifname, PortKind::AfPacket(sock));
        let mut s = self.state.lock().expect("state lock");
        s.host.ports.insert(port_id.to_string(), no);
        if let Err(e) = self.recompile(&mut s) {
            s.host.ports.remove(port_id);
            self.engine.remove_port(no);
            return Err(e.into());
        }
        Ok(no)
    }

    /// Detaches logical port `port_id`.
    pub fn remove_port(&self, port_id: &str) -> Result<(), ControlError> {
        let mut s = self.state.lock().expect("state lock");
        if let Some(no) = s.host.ports.remove(port_id) {
            self.recompile(&mut s)?;
            self.engine.remove_port(no);
        }
        Ok(())
    }

    /// Attaches `ifname` as the uplink of physical network `physnet`.
    pub fn add_uplink(&self, physnet: &str, ifname: &str, netns: Option<&Path>) -> Result<u32, ControlError> {
        let sock = AfPacket::open(ifname, netns)?;
        let no = self.engine.add_port(ifname, PortKind::AfPacket(sock));
        let mut s = self.state.lock().expect("state lock");
        s.host.uplinks.insert(physnet.to_string(), no);
        self.recompile(&mut s)?;
        Ok(no)
    }

    /// Opens the VXLAN tunnel port on underlay address `local`.
    pub fn add_tunnel(&self, local: Ipv4Addr, netns: Option<&Path>) -> Result<u32, ControlError> {
        let t = Tunnel::open(local, netns)?;
        let no = self.engine.add_port("vxlan", PortKind::Tunnel(t));
        let mut s = self.state.lock().expect("state lock");
        s.host.tunnel_port = Some(no);
        self.recompile(&mut s)?;
        Ok(no)
    }

    /// Counters, caches and conntrack size.
    pub fn stats(&self) -> EngineStats {
        self.engine.stats()
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
