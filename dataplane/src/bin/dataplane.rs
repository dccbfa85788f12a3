//! `dataplane`: the operator's command line. `run` starts a datapath for one
//! host from a model file; the other subcommands talk to a running datapath
//! over its control socket. A thin shell over the `dataplane` library.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use dataplane::control::{self, CacheInfo, Counters, Dataplane, PortInfo, Request, RuleInfo, TraceReport};
use dataplane::engine::EngineConfig;
use dataplane::metadata::StaticMetadata;
use dataplane::model::Model;

const DEFAULT_SOCKET: &str = "/run/dataplane/dataplane.sock";

/// Operate the userspace datapath: start it for one host, look inside it, trace packets.
#[derive(Parser)]
#[command(name = "dataplane", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where to reach a running datapath.
#[derive(clap::Args)]
struct SocketArg {
    /// The control socket of the running datapath (the --socket given to `dataplane run`).
    #[arg(long, env = "DATAPLANE_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the raw JSON answer instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Start a datapath for one host from a model file and serve its control socket until SIGINT or SIGTERM; SIGHUP re-reads the model file.
    Run(RunArgs),
    /// Show the state of a running datapath.
    Show {
        /// What to show.
        #[arg(value_enum)]
        what: Show,
        /// For `pipeline`: only this table (name such as `ingress_sg`, or number).
        #[arg(long)]
        table: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show where one packet would go: every table it visits, the rule it matches there, and the outcome.
    ///
    /// The packet is given as field=value pairs separated by commas or spaces, e.g.
    /// `port=a1,tcp,ip_dst=10.0.0.13,tp_dst=22,eth_dst=fa:16:3e:00:0a:03`. Fields: port (a logical
    /// port attached here), in_port (datapath port number or interface name), eth_src, eth_dst,
    /// eth_type, vlan, ip_src, ip_dst, ip_proto, ttl, tp_src, tp_dst, icmp_type, icmp_code, arp_op,
    /// arp_sha, nd_target, tun_id, tun_src; shorthands arp, ip, ipv6, tcp, udp, icmp, icmp6.
    /// With `port=`, eth_src defaults to the port's MAC.
    Trace {
        /// The packet, as field=value pairs.
        #[arg(required = true, num_args = 1..)]
        flow: Vec<String>,
        /// Conntrack state to assume after each ct() step (new, est, rel, inv, with +rpl for the
        /// reply direction); by default it is looked up in the connection table.
        #[arg(long)]
        ct_state: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Send a new model file to a running datapath. An invalid model is refused and the running pipeline stays.
    Apply {
        /// The model file (JSON).
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Show {
    /// Datapath ports: number, interface, kind, what they attach.
    Ports,
    /// Pipeline tables and their rules (match, actions, the model object behind each).
    Pipeline,
    /// Exact-match and megaflow caches: hits, misses (upcalls), hit rates, revalidation.
    Caches,
    /// Connection tracking entries.
    Conntrack,
    /// Per-port packet counters, parse errors and drops by reason.
    Counters,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The logical model (JSON) to compile.
    #[arg(long)]
    model: PathBuf,
    /// This host's name in the model.
    #[arg(long)]
    host: String,
    /// Where to serve the control socket.
    #[arg(long, env = "DATAPLANE_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Network namespace (a path such as /run/netns/NAME) in which interfaces and the tunnel
    /// socket are opened unless a flag names another one with @PATH.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Attach a kernel interface as a logical port: PORT_ID=IFNAME[@NETNS]. Repeatable.
    #[arg(long = "port", value_name = "PORT_ID=IFNAME[@NETNS]")]
    ports: Vec<String>,
    /// Create an internal tap interface for a logical port (with the port's MAC from the model):
    /// PORT_ID=IFNAME[@NETNS]. Repeatable.
    #[arg(long = "internal-port", value_name = "PORT_ID=IFNAME[@NETNS]")]
    internal_ports: Vec<String>,
    /// Attach a kernel interface as the uplink of a physical network: PHYSNET=IFNAME[@NETNS]. Repeatable.
    #[arg(long = "uplink", value_name = "PHYSNET=IFNAME[@NETNS]")]
    uplinks: Vec<String>,
    /// Underlay address for VXLAN (UDP 4789); the host's tunnel_ip in the model by default.
    #[arg(long)]
    tunnel_ip: Option<Ipv4Addr>,
    /// Do not open the VXLAN tunnel port.
    #[arg(long, conflicts_with = "tunnel_ip")]
    no_tunnel: bool,
    /// Serve 169.254.169.254 from files: DIR/<port id>/<path>.
    #[arg(long, value_name = "DIR")]
    metadata_dir: Option<PathBuf>,
    /// Number of poll-mode worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// CPUs to pin the workers to, in order (comma separated).
    #[arg(long, value_delimiter = ',')]
    pin: Vec<usize>,
    /// Empty polling rounds before a worker sleeps in poll(2) (0: sleep at once; higher: lower latency, more CPU).
    #[arg(long, default_value_t = 50)]
    busy_rounds: u32,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Show { what, table, socket } => show(what, table, &socket),
        Command::Trace { flow, ct_state, socket } => trace(flow.join(","), ct_state, &socket),
        Command::Apply { model, socket } => apply(&model, &socket),
    };
    if let Err(e) = result {
        eprintln!("dataplane: {e:#}");
        std::process::exit(1);
    }
}

/// Splits `NAME=IFNAME[@NETNS]`.
fn attachment<'a>(spec: &'a str, default_ns: Option<&'a Path>) -> Result<(&'a str, &'a str, Option<PathBuf>)> {
    let (name, rest) = spec.split_once('=').ok_or_else(|| anyhow!("'{spec}' is not NAME=IFNAME[@NETNS]"))?;
    let (ifname, ns) = match rest.split_once('@') {
        Some((i, ns)) => (i, Some(PathBuf::from(ns))),
        None => (rest, default_ns.map(Path::to_path_buf)),
    };
    if name.is_empty() || ifname.is_empty() {
        bail!("'{spec}' is not NAME=IFNAME[@NETNS]");
    }
    Ok((name, ifname, ns))
}

fn read_model(path: &Path) -> Result<Model> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Model::from_json(&text).with_context(|| format!("model {}", path.display()))
}

fn run(a: RunArgs) -> Result<()> {
    let model = read_model(&a.model)?;
    let host = model.host(&a.host).ok_or_else(|| anyhow!("host '{}' is not in the model", a.host))?.clone();
    // Block the signals we wait for before any thread starts, so all threads inherit the mask.
    let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    // SAFETY: sigset_t is plain data initialised by sigemptyset; pthread_sigmask changes this thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let dp = Dataplane::start(&a.host, EngineConfig { workers: a.workers, pin: a.pin.clone(), busy_rounds: a.busy_rounds });
    dp.apply_model(model)?;
    let netns = a.netns.as_deref();
    if !a.no_tunnel {
        let ip = match (a.tunnel_ip, host.tunnel_ip) {
            (Some(ip), _) => Some(ip),
            (None, IpAddr::V4(ip)) => Some(ip),
            (None, IpAddr::V6(_)) => None,
        };
        match ip {
            Some(ip) => {
                dp.add_tunnel(ip, netns).with_context(|| format!("VXLAN tunnel on {ip}"))?;
            }
            None => eprintln!("dataplane: host '{}' has an IPv6 tunnel address; VXLAN over IPv6 is not supported, no tunnel", a.host),
        }
    }
    for spec in &a.uplinks {
        let (physnet, ifname, ns) = attachment(spec, netns)?;
        dp.add_uplink(physnet, ifname, ns.as_deref()).with_context(|| format!("uplink {spec}"))?;
    }
    for spec in &a.ports {
        let (id, ifname, ns) = attachment(spec, netns)?;
        dp.add_port(id, ifname, ns.as_deref()).with_context(|| format!("port {spec}"))?;
    }
    for spec in &a.internal_ports {
        let (id, ifname, ns) = attachment(spec, netns)?;
        dp.add_internal_port(id, ifname, ns.as_deref()).with_context(|| format!("internal port {spec}"))?;
    }
    if let Some(dir) = &a.metadata_dir {
        dp.set_metadata_handler(Arc::new(StaticMetadata::new(dir))).context("metadata service")?;
    }
    let _sock = dp.serve_control(&a.socket)?;
    eprintln!("dataplane: host {} running, control socket {}", a.host, a.socket.display());
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: set holds blocked signals; sigwait writes the one received into sig.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        if sig == libc::SIGHUP {
            match read_model(&a.model).and_then(|m| dp.apply_model(m).map_err(Into::into)) {
                Ok(()) => eprintln!("dataplane: model re-read from {}", a.model.display()),
                Err(e) => eprintln!("dataplane: model not applied, running pipeline kept: {e:#}"),
            }
            continue;
        }
        eprintln!("dataplane: stopping");
        return Ok(());
    }
}

fn ask(socket: &SocketArg, req: &Request) -> Result<serde_json::Value> {
    control::request(&socket.socket, req).map_err(Into::into)
}

fn show(what: Show, table: Option<String>, socket: &SocketArg) -> Result<()> {
    let req = match what {
        Show::Ports => Request::Ports,
        Show::Pipeline => Request::Pipeline { table },
        Show::Caches => Request::Caches,
        Show::Conntrack => Request::Conntrack,
        Show::Counters => Request::Counters,
    };
    let v = ask(socket, &req)?;
    if socket.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match what {
        Show::Ports => {
            let ports: Vec<PortInfo> = serde_json::from_value(v)?;
            println!("{:>4}  {:<15} {:<9} {:<20} {:<12} MAC", "PORT", "INTERFACE", "KIND", "ATTACHES", "NETWORK");
            for p in ports {
                println!("{:>4}  {:<15} {:<9} {:<20} {:<12} {}", p.port, p.name, p.kind, p.attached_to.unwrap_or_default(), p.network.unwrap_or_default(), p.mac.unwrap_or_default());
            }
        }
        Show::Pipeline => {
            let rules: Vec<RuleInfo> = serde_json::from_value(v)?;
            let mut last = None;
            for r in &rules {
                if last != Some(r.table) {
                    println!("table {} {} ({} rules)", r.table, r.table_name, rules.iter().filter(|x| x.table == r.table).count());
                    last = Some(r.table);
                }
                println!("  priority={} {} actions={}  # {}", r.priority, r.matches, r.actions, r.note);
            }
        }
        Show::Caches => {
            let c: CacheInfo = serde_json::from_value(v)?;
            println!("packets received    {}", c.packets);
            println!("exact-match hits    {}", c.emc_hits);
            println!("megaflow hits       {}", c.megaflow_hits);
            println!("misses (upcalls)    {}", c.upcalls);
            println!("megaflows installed {}", c.megaflows);
            println!("hit rate            {:.2}% (exact-match {:.2}%)", c.hit_rate * 100.0, c.emc_hit_rate * 100.0);
            println!("revalidation        {} kept, {} removed", c.revalidated_kept, c.revalidated_removed);
        }
        Show::Conntrack => {
            let list: Vec<String> = serde_json::from_value(v)?;
            for c in &list {
                println!("{c}");
            }
            println!("{} connections", list.len());
        }
        Show::Counters => {
            let c: Counters = serde_json::from_value(v)?;
            println!("{:>4}  {:<15} {:>12} {:>12} {:>10}", "PORT", "INTERFACE", "RX", "TX", "TX_DROP");
            for (no, name, rx, tx, txd) in &c.ports {
                println!("{no:>4}  {name:<15} {rx:>12} {tx:>12} {txd:>10}");
            }
            println!("drops:");
            for (why, n) in c.drops.iter().filter(|d| d.1 > 0) {
                println!("  {n:>10}  {why}");
            }
            println!("parse errors:");
            for (why, n) in &c.parse_errors {
                println!("  {n:>10}  {why}");
            }
        }
    }
    Ok(())
}

fn trace(flow: String, ct_state: Option<String>, socket: &SocketArg) -> Result<()> {
    let v = ask(socket, &Request::Trace { flow, ct_state })?;
    if socket.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let r: TraceReport = serde_json::from_value(v)?;
    for (i, pass) in r.passes.iter().enumerate() {
        println!("pass {}: {}", i + 1, pass.flow);
        if let Some(ct) = &pass.ct_state {
            println!("  conntrack: {ct}");
        }
        for s in &pass.steps {
            let indent = "  ".repeat(s.depth as usize + 1);
            match s.priority {
                Some(p) => println!("{indent}{} priority {p}: {}\n{indent}  -> {}", s.table, s.rule, s.actions),
                None => println!("{indent}{}: no rule matched", s.table),
            }
        }
        println!("  datapath actions: {}", pass.actions.join(", "));
    }
    println!("result: {}", r.result);
    Ok(())
}

fn apply(model: &Path, socket: &SocketArg) -> Result<()> {
    let text = std::fs::read_to_string(model).with_context(|| format!("reading {}", model.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", model.display()))?;
    ask(socket, &Request::Apply { model: value })?;
    println!("applied {}", model.display());
    Ok(())
}
