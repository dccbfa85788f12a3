//! `bench-control-plane`: control-plane figures, each beside a reference
//! measured in the same run.
//!
//! - scheduler claims per second against N hosts' inventories in etcd, with 1
//!   and with 3 concurrent schedulers (each its own cache and etcd client, as
//!   on separate replicas), beside a plain compare-and-swap loop on one key
//!   per task through the same store client (the store's ceiling);
//! - resident memory: a scheduler's cache of those hosts (this process), the
//!   coordinator serving them, and etcd holding them;
//! - token issue and validation per second and p99 over HTTP, beside the
//!   same server answering Placement's version document (the HTTP floor).
//!
//! `scripts/bench-control-plane` starts etcd and a coordinator and runs this.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use coordinator::placement::db::{self, Inventory, ProviderSpec, ProviderTree};
use coordinator::scheduler::{AllHostsUp, RequestSpec, Scheduler, SchedulerConfig};
use store::{Compare, Op, Store, Txn};
use uuid::Uuid;

/// Control-plane benchmark; prints each figure beside its reference.
#[derive(Parser)]
struct Args {
    /// etcd client URL.
    #[arg(long)]
    etcd_endpoint: String,
    /// Hosts to load (one provider each with VCPU, MEMORY_MB, DISK_GB).
    #[arg(long, default_value_t = 10_000)]
    hosts: usize,
    /// Claims per scheduler run.
    #[arg(long, default_value_t = 10_000)]
    claims: u64,
    /// Claims in flight per scheduler.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Coordinator base URL, for the token and memory figures.
    #[arg(long)]
    coordinator_url: Option<String>,
    /// Coordinator process id, for its resident memory.
    #[arg(long)]
    coordinator_pid: Option<u32>,
    /// etcd process id, for its resident memory.
    #[arg(long)]
    etcd_pid: Option<u32>,
    /// Admin password of the coordinator.
    #[arg(long, default_value = "bench-admin")]
    admin_password: String,
    /// Token requests per token figure.
    #[arg(long, default_value_t = 2_000)]
    token_requests: usize,
    /// HTTP requests in flight for the token figures.
    #[arg(long, default_value_t = 16)]
    http_concurrency: usize,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) a process has used so far, from /proc.
fn cpu_time(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ, the unit of these fields, is 100 on every Linux architecture (fixed ABI).
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time per claim of this process and of etcd over one run, as text.
fn cpu_per_claim(before: (Option<Duration>, Option<Duration>), after: (Option<Duration>, Option<Duration>), claims: u64) -> String {
    let per = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.0} us", (b.saturating_sub(a)).as_secs_f64() * 1e6 / claims.max(1) as f64),
        _ => "n/a".into(),
    };
    format!("schedulers {} + etcd {}", per(before.0, after.0), per(before.1, after.1))
}

fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "n/a".into())
}

fn row(what: &str, ours: String, reference: String) {
    println!("{what:<58} {ours:>22}   ref: {reference}");
}

async fn load_hosts(store: Arc<dyn Store>, n: usize) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let store = store.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return Ok::<_, db::DbError>(());
                }
                let mut vcpu = Inventory::new(64);
                vcpu.allocation_ratio = 4.0;
                let mut mem = Inventory::new(262_144);
                mem.reserved = 4096;
                let tree = ProviderTree {
                    root: ProviderSpec {
                        uuid: Uuid::new_v4(),
                        name: format!("bench-host-{i:05}"),
                        inventories: BTreeMap::from([
                            ("VCPU".to_string(), vcpu),
                            ("MEMORY_MB".to_string(), mem),
                            ("DISK_GB".to_string(), Inventory::new(4000)),
                        ]),
                        traits: BTreeSet::from(["HW_CPU_X86_AVX2".to_string()]),
                        children: vec![],
                    },
                };
                db::sync_provider_tree(store.as_ref(), &tree).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Runs `schedulers` concurrently until `claims` claims each; returns claims/s,
/// conflicts and the CPU time per claim of this process and of etcd.
async fn run_schedulers(schedulers: &[Arc<Scheduler>], claims: u64, concurrency: usize, etcd_pid: Option<u32>) -> Result<(f64, u64, String)> {
    let conflicts_before: u64 = schedulers.iter().map(|s| s.stats().conflicts.load(Ordering::Relaxed)).sum();
    let cpu = || (cpu_time(std::process::id()), etcd_pid.and_then(cpu_time));
    let cpu_before = cpu();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in schedulers {
        let done = Arc::new(AtomicU64::new(0));
        for _ in 0..concurrency {
            let s = s.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                while done.fetch_add(1, Ordering::Relaxed) < claims {
                    let req = RequestSpec {
                        consumer: Uuid::new_v4(),
                        project_id: "bench".into(),
                        user_id: "bench".into(),
                        resources: BTreeMap::from([
                            ("VCPU".to_string(), 2),
                            ("MEMORY_MB".to_string(), 4096),
                            ("DISK_GB".to_string(), 20),
                        ]),
                        ..RequestSpec::default()
                    };
                    s.schedule(&req).await?;
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let total = claims * schedulers.len() as u64;
    let cpu = cpu_per_claim(cpu_before, cpu(), total);
    let conflicts: u64 = schedulers.iter().map(|s| s.stats().conflicts.load(Ordering::Relaxed)).sum::<u64>() - conflicts_before;
    Ok((total as f64 / secs, conflicts, cpu))
}

/// Compare-and-swap on one key per task through `store` for `secs`; returns
/// transactions/s and the CPU time per transaction of this process and of etcd.
async fn cas_rate(store: Arc<dyn Store>, tasks: usize, secs: f64, etcd_pid: Option<u32>) -> Result<(f64, String)> {
    let cpu = || (cpu_time(std::process::id()), etcd_pid.and_then(cpu_time));
    let cpu_before = cpu();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let count = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let count = count.clone();
        handles.push(tokio::spawn(async move {
            let key = format!("/bench/cas/{t}");
            let mut rev = 0i64;
            while Instant::now() < deadline {
                let cmp = if rev == 0 { Compare::Absent(key.clone()) } else { Compare::ModRevision(key.clone(), rev) };
                let r = store.txn(Txn::new().when(cmp).and_then(Op::put(key.clone(), vec![b'x'; 300]))).await?;
                if !r.succeeded {
                    bail!("unexpected CAS failure on a private key");
                }
                rev = r.revision;
                count.fetch_add(1, Ordering::Relaxed);
            }
            store.delete(&key).await?;
            Ok(())
        }));
    }
    let start = Instant::now();
    for h in handles {
        h.await??;
    }
    let n = count.load(Ordering::Relaxed);
    Ok((n as f64 / start.elapsed().as_secs_f64(), cpu_per_claim(cpu_before, cpu(), n).replace("schedulers", "client")))
}

/// Runs `n` requests made by `make`, `conc` at a time; returns requests/s and p99 latency.
async fn http_rate<F, Fut>(n: usize, conc: usize, make: F) -> Result<(f64, Duration)>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..conc {
        let make = make.clone();
        let next = next.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while (next.fetch_add(1, Ordering::Relaxed) as usize) < n {
                let t = Instant::now();
                make().await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for h in handles {
        all.extend(h.await??);
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort();
    let p99 = all.get((all.len() * 99 / 100).min(all.len().saturating_sub(1))).copied().unwrap_or_default();
    Ok((rate, p99))
}

fn token_body(password: &str) -> serde_json::Value {
    serde_json::json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {"name": "admin", "domain": {"id": "default"}, "password": password}}},
        "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}
    }})
}

async fn token_figures(args: &Args, url: &str) -> Result<()> {
    let client = reqwest::Client::new();
    let body = Arc::new(token_body(&args.admin_password));
    let r = client.post(format!("{url}/v3/auth/tokens")).json(&*body).send().await.context("token request")?;
    if r.status().as_u16() != 201 {
        bail!("token issue answered {}: {}", r.status(), r.text().await.unwrap_or_default());
    }
    let token = r.headers()["x-subject-token"].to_str()?.to_string();
    let n = args.token_requests;
    let conc = args.http_concurrency;

    let (c, u) = (client.clone(), url.to_string());
    let (floor, floor_p99) = http_rate(n, conc, move || {
        let (c, u) = (c.clone(), u.clone());
        async move {
            let r = c.get(format!("{u}/placement/")).send().await?;
            anyhow::ensure!(r.status().is_success(), "version document answered {}", r.status());
            r.bytes().await?;
            Ok(())
        }
    })
    .await?;
    let (c, u, b) = (client.clone(), url.to_string(), body.clone());
    let issue_n = n.min(500);
    let (issue, issue_p99) = http_rate(issue_n, conc, move || {
        let (c, u, b) = (c.clone(), u.clone(), b.clone());
        async move {
            let r = c.post(format!("{u}/v3/auth/tokens")).json(&*b).send().await?;
            anyhow::ensure!(r.status().as_u16() == 201, "token issue answered {}", r.status());
            r.bytes().await?;
            Ok(())
        }
    })
    .await?;
    let (c, u, t) = (client.clone(), url.to_string(), token.clone());
    let (validate, validate_p99) = http_rate(n, conc, move || {
        let (c, u, t) = (c.clone(), u.clone(), t.clone());
        async move {
            let r = c.get(format!("{u}/v3/auth/tokens")).header("x-auth-token", &t).header("x-subject-token", &t).send().await?;
            anyhow::ensure!(r.status().as_u16() == 200, "token validation answered {}", r.status());
            r.bytes().await?;
            Ok(())
        }
    })
    .await?;
    let floor_ref = format!("GET /placement/ {floor:.0}/s, p99 {:.2} ms", floor_p99.as_secs_f64() * 1e3);
    row(&format!("token issue (POST /v3/auth/tokens, {conc} in flight)"), format!("{issue:.0}/s, p99 {:.1} ms", issue_p99.as_secs_f64() * 1e3), floor_ref.clone());
    row(&format!("token validation (GET /v3/auth/tokens, {conc} in flight)"), format!("{validate:.0}/s, p99 {:.2} ms", validate_p99.as_secs_f64() * 1e3), floor_ref);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let connect = || async { Ok::<Arc<dyn Store>, anyhow::Error>(Arc::new(store::etcd::EtcdStore::connect(std::slice::from_ref(&args.etcd_endpoint)).await?)) };
    let store = connect().await?;
    println!("control-plane benchmark: {} hosts, etcd at {}", args.hosts, args.etcd_endpoint);
    let t = Instant::now();
    load_hosts(store.clone(), args.hosts).await?;
    eprintln!("loaded {} hosts in {:.1} s", args.hosts, t.elapsed().as_secs_f64());

    let config = SchedulerConfig::default();
    let t = Instant::now();
    let one = Arc::new(Scheduler::start(connect().await?, Arc::new(AllHostsUp), config.clone()).await?);
    let cache_load = t.elapsed();
    let self_rss = rss_kib(std::process::id());

    let (rate1, conflicts1, cpu1) = run_schedulers(std::slice::from_ref(&one), args.claims, args.concurrency, args.etcd_pid).await?;
    let (cas1, cas_cpu1) = cas_rate(connect().await?, args.concurrency, 3.0, args.etcd_pid).await?;
    row(
        &format!("scheduler claims, 1 scheduler ({} in flight)", args.concurrency),
        format!("{rate1:.0}/s ({conflicts1} races lost)"),
        format!("etcd CAS on private keys, {} tasks: {cas1:.0}/s", args.concurrency),
    );
    row("  CPU time per claim, 1 scheduler", cpu1, format!("per CAS: {cas_cpu1}"));
    let mut three = vec![one.clone()];
    for _ in 0..2 {
        three.push(Arc::new(Scheduler::start(connect().await?, Arc::new(AllHostsUp), config.clone()).await?));
    }
    let (rate3, conflicts3, cpu3) = run_schedulers(&three, args.claims, args.concurrency, args.etcd_pid).await?;
    let (cas3, cas_cpu3) = cas_rate(connect().await?, args.concurrency * 3, 3.0, args.etcd_pid).await?;
    row(
        &format!("scheduler claims, 3 schedulers ({} in flight each)", args.concurrency),
        format!("{rate3:.0}/s ({conflicts3} races lost)"),
        format!("etcd CAS on private keys, {} tasks: {cas3:.0}/s", args.concurrency * 3),
    );
    row("  CPU time per claim, 3 schedulers", cpu3, format!("per CAS: {cas_cpu3}"));
    println!("{:<58} {:>22}   ref: kube-scheduler's own benchmark, 5,000 nodes: 680-810 pods/s (published, not measured here)", "", "");

    // Over-commit check across everything the runs claimed.
    let (providers, _) = db::list_providers(store.as_ref()).await?;
    let mut over = 0;
    for p in &providers {
        for (class, inv) in &p.value.inventories {
            if p.value.used(class) > inv.capacity() {
                over += 1;
            }
        }
    }
    row("providers over capacity after the runs", format!("{over}"), "must be 0".into());
    drop(three);

    row(
        &format!("scheduler cache: {} providers, loaded in", one.cache().provider_count()),
        format!("{:.2} s", cache_load.as_secs_f64()),
        "-".into(),
    );
    row("bench process RSS with one scheduler cache of the hosts", mib(self_rss), format!("etcd RSS {}", mib(args.etcd_pid.and_then(rss_kib))));
    if let (Some(url), Some(pid)) = (&args.coordinator_url, args.coordinator_pid) {
        let before = rss_kib(pid);
        let client = reqwest::Client::new();
        let body = token_body(&args.admin_password);
        let r = client.post(format!("{url}/v3/auth/tokens")).json(&body).send().await?;
        if r.status().as_u16() == 201 {
            let token = r.headers()["x-subject-token"].to_str()?.to_string();
            let r = client.get(format!("{url}/placement/resource_providers")).header("x-auth-token", &token).send().await?;
            let status = r.status();
            let n = r.json::<serde_json::Value>().await.ok().and_then(|v| v["resource_providers"].as_array().map(|a| a.len())).unwrap_or(0);
            eprintln!("coordinator listed {n} providers ({status})");
        }
        let after = rss_kib(pid);
        row("coordinator RSS, idle with the hosts in etcd", mib(before), format!("etcd RSS {}", mib(args.etcd_pid.and_then(rss_kib))));
        row("coordinator RSS after listing every provider", mib(after), format!("etcd RSS {}", mib(args.etcd_pid.and_then(rss_kib))));
    }
    match &args.coordinator_url {
        Some(url) => {
            if let Err(e) = token_figures(&args, url).await {
                row("token issue and validation", "failed".into(), format!("{e:#}"));
            }
        }
        None => row("token issue and validation", "skipped".into(), "no --coordinator-url".into()),
    }
    Ok(())
}
