//! Store benchmark: compare-and-swap transactions per second on the embedded
//! store and on etcd (1, 16 and 64 concurrent tasks), beside etcd's raw put
//! rate from a plain etcd-client loop (sequential and 16 concurrent) and the
//! same compare-and-swap through plain etcd-client (the cost of the store
//! layer), all in one run. Prints a table.
//!
//! ```text
//! store-bench [--etcd-endpoint URL] [--embedded-path PATH] [--seconds N]
//! ```
//! Without `--etcd-endpoint` it starts its own etcd (the `etcd` binary, as the
//! tests do); without `--embedded-path` the embedded store lives in a
//! temporary directory. Each case runs for N seconds (default 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use store::embedded::EmbeddedStore;
use store::etcd::EtcdStore;
use store::testing::EtcdServer;
use store::{Compare, Op, Store, Txn};

struct Args {
    etcd_endpoint: Option<String>,
    embedded_path: Option<std::path::PathBuf>,
    seconds: u64,
}

const USAGE: &str = "usage: store-bench [--etcd-endpoint URL] [--embedded-path PATH] [--seconds N]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args { etcd_endpoint: None, embedded_path: None, seconds: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            "--etcd-endpoint" => args.etcd_endpoint = Some(value("--etcd-endpoint")?),
            "--embedded-path" => args.embedded_path = Some(value("--embedded-path")?.into()),
            "--seconds" => {
                args.seconds = value("--seconds")?.parse().map_err(|e| format!("--seconds: {e}"))?;
                if args.seconds == 0 {
                    return Err("--seconds must be at least 1".into());
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}\n\nCompare-and-swap rate of the embedded store and etcd, beside etcd's raw put rate.");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// Operations done and their latencies.
#[derive(Default)]
struct Tally {
    ops: u64,
    failed: u64,
    latencies_us: Vec<u64>,
}

struct Row {
    backend: &'static str,
    operation: &'static str,
    tasks: usize,
    tally: Tally,
    elapsed: Duration,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn print_table(rows: &mut [Row]) {
    println!();
    println!("{:<10} {:<34} {:>6} {:>12} {:>9} {:>9} {:>8}", "backend", "operation", "tasks", "ops/s", "p50 ms", "p99 ms", "errors");
    println!("{}", "-".repeat(94));
    for r in rows.iter_mut() {
        r.tally.latencies_us.sort_unstable();
        let rate = r.tally.ops as f64 / r.elapsed.as_secs_f64();
        println!(
            "{:<10} {:<34} {:>6} {:>12.0} {:>9.2} {:>9.2} {:>8}",
            r.backend,
            r.operation,
            r.tasks,
            rate,
            percentile(&r.tally.latencies_us, 0.50),
            percentile(&r.tally.latencies_us, 0.99),
            r.tally.failed
        );
    }
}

/// Each task compare-and-swaps its own key in a loop: read once, then every
/// transaction compares the mod revision its previous one produced.
async fn cas(store: Arc<dyn Store>, tasks: usize, secs: u64, run: &str) -> (Tally, Duration) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let key = format!("/bench/{run}/cas/{t}");
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let Ok(mut last) = store.put(&key, b"0".to_vec()).await else {
                tally.failed += 1;
                return tally;
            };
            let mut n: u64 = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let txn = Txn::new().when(Compare::ModRevision(key.clone(), last)).and_then(Op::put(&key, (n + 1).to_string()));
                match store.txn(txn).await {
                    Ok(r) if r.succeeded => {
                        tally.latencies_us.push(t0.elapsed().as_micros() as u64);
                        tally.ops += 1;
                        n += 1;
                        last = r.revision;
                    }
                    Ok(_) => {
                        tally.failed += 1;
                        if let Ok(Some(kv)) = store.get(&key).await {
                            last = kv.mod_revision;
                        }
                    }
                    Err(_) => tally.failed += 1,
                }
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for h in handles {
        if let Ok(t) = h.await {
            total.ops += t.ops;
            total.failed += t.failed;
            total.latencies_us.extend(t.latencies_us);
        }
    }
    (total, start.elapsed())
}

/// Plain etcd-client puts, no store layer: the reference.
async fn raw_puts(client: etcd_client::Client, tasks: usize, secs: u64, run: &str) -> (Tally, Duration) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let mut kv = client.kv_client();
        let key = format!("/bench/{run}/raw/{t}");
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut n: u64 = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match kv.put(key.as_str(), n.to_string(), None).await {
                    Ok(_) => {
                        tally.latencies_us.push(t0.elapsed().as_micros() as u64);
                        tally.ops += 1;
                    }
                    Err(_) => tally.failed += 1,
                }
                n += 1;
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for h in handles {
        if let Ok(t) = h.await {
            total.ops += t.ops;
            total.failed += t.failed;
            total.latencies_us.extend(t.latencies_us);
        }
    }
    (total, start.elapsed())
}

/// Plain etcd-client compare-and-swap transactions, no store layer: shows
/// what the store layer itself costs.
async fn raw_cas(client: etcd_client::Client, tasks: usize, secs: u64, run: &str) -> (Tally, Duration) {
    use etcd_client::{Compare as EtcdCompare, CompareOp, Txn as EtcdTxn, TxnOp};
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let mut kv = client.kv_client();
        let key = format!("/bench/{run}/rawcas/{t}");
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut last = match kv.put(key.as_str(), "0", None).await {
                Ok(r) => r.header().map_or(0, |h| h.revision()),
                Err(_) => {
                    tally.failed += 1;
                    return tally;
                }
            };
            let mut n: u64 = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let txn = EtcdTxn::new()
                    .when([EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, last)])
                    .and_then([TxnOp::put(key.as_str(), (n + 1).to_string(), None)]);
                match kv.txn(txn).await {
                    Ok(r) if r.succeeded() => {
                        tally.latencies_us.push(t0.elapsed().as_micros() as u64);
                        tally.ops += 1;
                        n += 1;
                        last = r.header().map_or(last, |h| h.revision());
                    }
                    _ => tally.failed += 1,
                }
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for h in handles {
        if let Ok(t) = h.await {
            total.ops += t.ops;
            total.failed += t.failed;
            total.latencies_us.extend(t.latencies_us);
        }
    }
    (total, start.elapsed())
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let run = uuid::Uuid::new_v4().to_string();
    let secs = args.seconds;
    let mut rows = Vec::new();

    // Embedded store.
    let tmp = tempfile::tempdir().expect("temporary directory");
    let path = args.embedded_path.clone().unwrap_or_else(|| tmp.path().join("bench.redb"));
    match EmbeddedStore::open(&path) {
        Ok(s) => {
            let s: Arc<dyn Store> = Arc::new(s);
            for tasks in [1, 16, 64] {
                eprintln!("embedded: compare-and-swap with {tasks} tasks for {secs} s");
                let (tally, elapsed) = cas(s.clone(), tasks, secs, &run).await;
                rows.push(Row { backend: "embedded", operation: "compare-and-swap txn", tasks, tally, elapsed });
            }
        }
        Err(e) => eprintln!("embedded store at {}: {e}; skipping", path.display()),
    }

    // etcd: ours, then the plain client as the reference.
    let mut own_etcd = None;
    let endpoint = match args.etcd_endpoint.clone() {
        Some(e) => Some(e),
        None => match EtcdServer::start() {
            Ok(server) => {
                let e = server.endpoint();
                own_etcd = Some(server);
                Some(e)
            }
            Err(e) => {
                eprintln!("no --etcd-endpoint and cannot start etcd ({e}); skipping etcd");
                None
            }
        },
    };
    if let Some(endpoint) = endpoint {
        match EtcdStore::connect(std::slice::from_ref(&endpoint)).await {
            Ok(s) => {
                let client = s.client();
                let s: Arc<dyn Store> = Arc::new(s);
                for tasks in [1, 16, 64] {
                    eprintln!("etcd: compare-and-swap with {tasks} tasks for {secs} s");
                    let (tally, elapsed) = cas(s.clone(), tasks, secs, &run).await;
                    rows.push(Row { backend: "etcd", operation: "compare-and-swap txn", tasks, tally, elapsed });
                }
                for tasks in [1, 16, 64] {
                    eprintln!("etcd: raw etcd-client compare-and-swap with {tasks} tasks for {secs} s");
                    let (tally, elapsed) = raw_cas(client.clone(), tasks, secs, &run).await;
                    rows.push(Row { backend: "etcd", operation: "raw CAS txn (etcd-client)", tasks, tally, elapsed });
                }
                for tasks in [1, 16] {
                    eprintln!("etcd: raw etcd-client put with {tasks} tasks for {secs} s");
                    let (tally, elapsed) = raw_puts(client.clone(), tasks, secs, &run).await;
                    rows.push(Row { backend: "etcd", operation: "raw put (etcd-client, reference)", tasks, tally, elapsed });
                }
                let _ = s.txn(Txn::new().and_then(Op::delete_prefix(format!("/bench/{run}/")))).await;
            }
            Err(e) => eprintln!("etcd at {endpoint}: {e}; skipping etcd"),
        }
    }
    drop(own_etcd);
    print_table(&mut rows);
}
