//! The Open vSwitch backend: the same logical model, compiled by the same
//! [`Compiler`], rendered to an OVS bridge. Ports and tunnels are created
//! through OVSDB (JSON-RPC over the database's unix socket, [`ovsdb`]); the
//! pipeline becomes OpenFlow flows in the same numbered tables
//! ([`openflow`]), installed with `ovs-ofctl --bundle replace-flows`, which
//! changes only the flows that differ, atomically. Security groups and NAT
//! use OVS's own conntrack through ct() actions.
//!
//! Each datapath port number of the pipeline is requested as the port's
//! OpenFlow number (`ofport_request`), so flows name ports directly.

pub mod instance;
pub mod openflow;
pub mod ovsdb;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::compiler::{CompileError, Compiler, HostConfig, Neighbors};
use crate::model::Model;
use openflow::Rendered;
use ovsdb::{map, named, Ovsdb, OvsdbError};

/// Errors of the OVS backend.
#[derive(Debug, thiserror::Error)]
pub enum OvsError {
    /// OVSDB refused or could not be reached.
    #[error("OVSDB: {0}")]
    Db(#[from] OvsdbError),
    /// The model was rejected; the installed flows are unchanged.
    #[error("Model rejected, installed flows kept: {0}")]
    Rejected(#[from] CompileError),
    /// ovs-ofctl failed.
    #[error("ovs-ofctl {what}: {detail}")]
    Ofctl {
        /// The subcommand.
        what: &'static str,
        /// Its error output.
        detail: String,
    },
    /// ovs-vswitchd did not bring an interface up.
    #[error("Interface '{name}' did not get OpenFlow port {ofport}: {error}")]
    Interface {
        /// Interface name.
        name: String,
        /// The requested port number.
        ofport: u32,
        /// What OVS reported.
        error: String,
    },
    /// A logical port is already attached.
    #[error("Port '{0}' is already attached")]
    Exists(String),
    /// Writing the flow file failed.
    #[error("Cannot write the flow file: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the bridge lives and what it is called.
#[derive(Debug, Clone)]
pub struct OvsConfig {
    /// ovsdb-server's unix socket (normally /var/run/openvswitch/db.sock).
    pub db_socket: PathBuf,
    /// ovs-vswitchd's run directory, where `<bridge>.mgmt` is (normally /var/run/openvswitch).
    pub rundir: PathBuf,
    /// Bridge name.
    pub bridge: String,
    /// `netdev` for the userspace datapath (also OVS-DPDK), `system` for the kernel module.
    pub datapath_type: String,
    /// This host's name in the model.
    pub host: String,
}

impl OvsConfig {
    /// The system OVS's default sockets, userspace datapath.
    pub fn new(bridge: &str, host: &str) -> OvsConfig {
        OvsConfig { db_socket: "/var/run/openvswitch/db.sock".into(), rundir: "/var/run/openvswitch".into(), bridge: bridge.into(), datapath_type: "netdev".into(), host: host.into() }
    }
}

/// What kind of OVS interface a port is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OvsPortType {
    /// An existing kernel interface (veth, tap, NIC) that OVS opens.
    System,
    /// An internal interface OVS creates (a tap in the userspace datapath).
    Internal,
    /// A vhost-user server socket OVS-DPDK creates in its run directory, named after the port.
    DpdkVhostUser,
    /// OVS-DPDK connects as vhost-user client to this socket.
    DpdkVhostUserClient(PathBuf),
    /// A VXLAN tunnel from underlay address `local`, remote and VNI chosen per flow.
    Vxlan(Ipv4Addr),
}

/// One host's OVS bridge programmed from the model.
pub struct OvsBackend {
    cfg: OvsConfig,
    db: Ovsdb,
    compiler: Compiler,
    host: HostConfig,
    model: Model,
    neighbors: Neighbors,
    ifnames: Vec<(u32, String)>,
    rendered: Rendered,
}

impl OvsBackend {
    /// Connects to OVSDB and creates the bridge if it is missing (secure
    /// fail mode: nothing passes that the flows do not allow).
    pub fn connect(cfg: OvsConfig) -> Result<OvsBackend, OvsError> {
        let mut db = Ovsdb::connect(&cfg.db_socket)?;
        let existing = db.select("Bridge", "name", json!(cfg.bridge), &["_uuid"])?;
        if existing.is_empty() {
            db.transact(vec![
                json!({"op": "insert", "table": "Interface", "row": {"name": cfg.bridge, "type": "internal"}, "uuid-name": "iface"}),
                json!({"op": "insert", "table": "Port", "row": {"name": cfg.bridge, "interfaces": named("iface")}, "uuid-name": "port"}),
                json!({"op": "insert", "table": "Bridge", "row": {
                    "name": cfg.bridge, "ports": named("port"), "datapath_type": cfg.datapath_type, "fail_mode": "secure",
                    "protocols": ["set", ["OpenFlow10", "OpenFlow13", "OpenFlow14", "OpenFlow15"]],
                    "other_config": map([("disable-in-band", "true".to_string())])}, "uuid-name": "br"}),
                json!({"op": "mutate", "table": "Open_vSwitch", "where": [], "mutations": [["bridges", "insert", ["set", [named("br")]]]]}),
            ])?;
        }
        let host = HostConfig { name: cfg.host.clone(), ..Default::default() };
        let b = OvsBackend { cfg, db, compiler: Compiler::new(), host, model: Model::default(), neighbors: Neighbors::new(), ifnames: Vec::new(), rendered: Rendered::default() };
        b.wait_mgmt()?;
        Ok(b)
    }

    fn mgmt(&self) -> String {
        format!("unix:{}", self.cfg.rundir.join(format!("{}.mgmt", self.cfg.bridge)).display())
    }

    fn wait_mgmt(&self) -> Result<(), OvsError> {
        let path = self.cfg.rundir.join(format!("{}.mgmt", self.cfg.bridge));
        let t = Instant::now();
        while !path.exists() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err(OvsError::Ofctl { what: "connect", detail: format!("{} did not appear", path.display()) });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn next_ofport(&self) -> u32 {
        (1..).find(|n| !self.ifnames.iter().any(|(p, _)| p == n)).unwrap_or(1)
    }

    /// Creates an interface on the bridge with OpenFlow port number `ofport`
    /// and waits until ovs-vswitchd has it up.
    fn add_interface(&mut self, ifname: &str, ty: &OvsPortType, ofport: u32) -> Result<(), OvsError> {
        let (type_name, options): (&str, Vec<(&str, String)>) = match ty {
            OvsPortType::System => ("", vec![]),
            OvsPortType::Internal => ("internal", vec![]),
            OvsPortType::DpdkVhostUser => ("dpdkvhostuser", vec![]),
            OvsPortType::DpdkVhostUserClient(p) => ("dpdkvhostuserclient", vec![("vhost-server-path", p.display().to_string())]),
            OvsPortType::Vxlan(local) => ("vxlan", vec![("remote_ip", "flow".into()), ("key", "flow".into()), ("local_ip", local.to_string())]),
        };
        self.db.transact(vec![
            json!({"op": "insert", "table": "Interface", "row": {"name": ifname, "type": type_name, "options": map(options), "ofport_request": ofport}, "uuid-name": "iface"}),
            json!({"op": "insert", "table": "Port", "row": {"name": ifname, "interfaces": named("iface")}, "uuid-name": "port"}),
            json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", self.cfg.bridge]], "mutations": [["ports", "insert", ["set", [named("port")]]]]}),
        ])?;
        self.ifnames.push((ofport, ifname.to_string()));
        let t = Instant::now();
        loop {
            let rows = self.db.select("Interface", "name", json!(ifname), &["ofport", "error"])?;
            let row = rows.first().cloned().unwrap_or(Value::Null);
            let got = ovsdb::int_column(&row, "ofport");
            let error = row.get("error").and_then(Value::as_str).unwrap_or("").to_string();
            if got == Some(ofport as i64) {
                return Ok(());
            }
            if !error.is_empty() || got == Some(-1) || t.elapsed() > Duration::from_secs(20) {
                let _ = self.delete_interface(ifname);
                return Err(OvsError::Interface { name: ifname.to_string(), ofport, error: if error.is_empty() { format!("ofport {got:?}") } else { error } });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn delete_interface(&mut self, ifname: &str) -> Result<(), OvsError> {
        let rows = self.db.select("Port", "name", json!(ifname), &["_uuid"])?;
        if let Some(uuid) = rows.first().and_then(ovsdb::row_uuid) {
            self.db.transact(vec![json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", self.cfg.bridge]], "mutations": [["ports", "delete", ["set", [uuid]]]]})])?;
        }
        self.ifnames.retain(|(_, n)| n != ifname);
        Ok(())
    }

    /// Attaches interface `ifname` as logical port `port_id`; returns its OpenFlow port.
    pub fn add_port(&mut self, port_id: &str, ifname: &str, ty: OvsPortType) -> Result<u32, OvsError> {
        if self.host.ports.contains_key(port_id) {
            return Err(OvsError::Exists(port_id.to_string()));
        }
        let no = self.next_ofport();
        self.add_interface(ifname, &ty, no)?;
        self.host.ports.insert(port_id.to_string(), no);
        if let Err(e) = self.sync() {
            self.host.ports.remove(port_id);
            let _ = self.delete_interface(ifname);
            return Err(e);
        }
        Ok(no)
    }

    /// Detaches logical port `port_id` and removes its interface from the bridge.
    pub fn remove_port(&mut self, port_id: &str) -> Result<(), OvsError> {
        let Some(no) = self.host.ports.remove(port_id) else { return Ok(()) };
        self.sync()?;
        if let Some(name) = self.ifnames.iter().find(|(p, _)| *p == no).map(|(_, n)| n.clone()) {
            self.delete_interface(&name)?;
        }
        Ok(())
    }

    /// Attaches `ifname` as the uplink of physical network `physnet`.
    pub fn add_uplink(&mut self, physnet: &str, ifname: &str) -> Result<u32, OvsError> {
        let no = self.next_ofport();
        self.add_interface(ifname, &OvsPortType::System, no)?;
        self.host.uplinks.insert(physnet.to_string(), no);
        self.sync()?;
        Ok(no)
    }

    /// Creates the VXLAN port (remote and VNI set per flow) with underlay address `local`.
    pub fn add_tunnel(&mut self, local: Ipv4Addr) -> Result<u32, OvsError> {
        let no = self.next_ofport();
        let name = format!("vx{}", truncate(&self.cfg.bridge, 10));
        self.add_interface(&name, &OvsPortType::Vxlan(local), no)?;
        self.host.tunnel_port = Some(no);
        self.sync()?;
        Ok(no)
    }

    /// Validates, compiles and installs `model`; on error the installed flows stay.
    pub fn apply_model(&mut self, model: Model) -> Result<(), OvsError> {
        let p = self.compiler.compile(&model, &self.host, &self.neighbors)?;
        self.install(&p)?;
        self.model = model;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), OvsError> {
        let p = self.compiler.compile(&self.model, &self.host, &self.neighbors)?;
        self.install(&p)
    }

    fn install(&mut self, p: &crate::pipeline::Pipeline) -> Result<(), OvsError> {
        let r = openflow::render(p);
        let file = self.cfg.rundir.join(format!("{}.flows", self.cfg.bridge));
        std::fs::write(&file, r.to_file())?;
        let out = Command::new("ovs-ofctl").args(["-O", "OpenFlow15", "--bundle", "replace-flows", &self.mgmt()]).arg(&file).output()?;
        let _ = std::fs::remove_file(&file);
        if !out.status.success() {
            return Err(OvsError::Ofctl { what: "replace-flows", detail: String::from_utf8_lossy(&out.stderr).into_owned() });
        }
        self.rendered = r;
        Ok(())
    }

    /// The flows last installed (with the actions OVS could not express).
    pub fn rendered(&self) -> &Rendered {
        &self.rendered
    }

    /// The bridge's flows with their packet counters (`ovs-ofctl dump-flows`).
    pub fn dump_flows(&self) -> Result<String, OvsError> {
        let out = Command::new("ovs-ofctl").args(["-O", "OpenFlow15", "dump-flows", &self.mgmt()]).output()?;
        if !out.status.success() {
            return Err(OvsError::Ofctl { what: "dump-flows", detail: String::from_utf8_lossy(&out.stderr).into_owned() });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The datapath port number of logical port `port_id`.
    pub fn port_number(&self, port_id: &str) -> Option<u32> {
        self.host.ports.get(port_id).copied()
    }

    /// The bridge name.
    pub fn bridge(&self) -> &str {
        &self.cfg.bridge
    }

    /// The run directory (where dpdkvhostuser sockets appear).
    pub fn rundir(&self) -> &Path {
        &self.cfg.rundir
    }

    /// Removes the bridge with all its ports from OVSDB.
    pub fn delete_bridge(mut self) -> Result<(), OvsError> {
        let rows = self.db.select("Bridge", "name", json!(self.cfg.bridge), &["_uuid"])?;
        if let Some(uuid) = rows.first().and_then(ovsdb::row_uuid) {
            self.db.transact(vec![json!({"op": "mutate", "table": "Open_vSwitch", "where": [], "mutations": [["bridges", "delete", ["set", [uuid]]]]})])?;
        }
        Ok(())
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
