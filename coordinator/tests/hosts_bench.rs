//! Heartbeats per second, before and after the fast path, on the embedded store and on
//! etcd (when it is installed), measured in the same run. It prints; it asserts no
//! timing. `HOSTS_BENCH_SECS` sets the length of each measurement (default 1).
//!
//! - before: the old heartbeat (the credential read from the store, a get of the
//!   heartbeat key, a keep-alive), as the handler did it;
//! - after: [`coordinator::hosts::agent_api::serve_heartbeat`] (the credential checked
//!   against the replica's cache, a keep-alive of the cached lease);
//! - after, HTTP: the same through the agent API over loopback HTTP.
//!
//! The two function-level paths alternate twice, so a noisy neighbour hurts both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::hosts::{agent_api, auth, heartbeat};
use coordinator::testing::TestSite;
use model::agent_api::{EnrolRequest, HostCredential};
use store::embedded::EmbeddedStore;
use store::testing::EtcdServer;

const HOSTS: usize = 200;
const CONCURRENCY: usize = 32;

fn secs() -> Duration {
    Duration::from_secs_f64(std::env::var("HOSTS_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0))
}

async fn enrol_hosts(s: &TestSite) -> Arc<Vec<HostCredential>> {
    let store = s.state.store.as_ref();
    let mut creds = Vec::with_capacity(HOSTS);
    for i in 0..HOSTS {
        let token = coordinator::hosts::create_join_token(store, 600, None).await.unwrap();
        let req = EnrolRequest { join_token: token, hostname: format!("bench-{i}") };
        let r = coordinator::hosts::enrol::enrol(store, &req, 30).await.unwrap();
        let cred = HostCredential { host_id: r.host_id, secret: r.secret };
        agent_api::serve_heartbeat(&s.state, &cred, &cred.host_id).await.unwrap();
        creds.push(cred);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !creds.iter().all(|c| s.state.hosts.verify(&c.host_id, &c.secret).is_some()) {
        assert!(Instant::now() < deadline, "the host cache did not learn every host");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Arc::new(creds)
}

/// Runs `beat` from CONCURRENCY tasks over the hosts for the bench time; heartbeats/s.
async fn rate<F, Fut>(creds: &Arc<Vec<HostCredential>>, beat: F) -> f64
where
    F: Fn(HostCredential) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + secs();
    let mut tasks = vec![];
    for t in 0..CONCURRENCY {
        let (creds, done, beat) = (creds.clone(), done.clone(), beat.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while Instant::now() < until {
                beat(creds[i % creds.len()].clone()).await;
                done.fetch_add(1, Ordering::Relaxed);
                i += CONCURRENCY;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn bench(name: &str, s: TestSite) {
    let creds = enrol_hosts(&s).await;
    let state = s.state.clone();
    let before = {
        let state = state.clone();
        move |c: HostCredential| {
            let state = state.clone();
            async move {
                let a = auth::verify_in_store(state.store.as_ref(), &c).await.unwrap();
                a.require(&c.host_id).unwrap();
                let b = heartbeat::heartbeat(state.store.as_ref(), &c.host_id, 30).await.unwrap();
                assert!(!b.renewed);
            }
        }
    };
    let after = {
        let state = state.clone();
        move |c: HostCredential| {
            let state = state.clone();
            async move {
                let r = agent_api::serve_heartbeat(&state, &c, &c.host_id).await.unwrap();
                assert!(!r.renewed);
            }
        }
    };
    let mut b = vec![];
    let mut a = vec![];
    for _ in 0..2 {
        b.push(rate(&creds, before.clone()).await);
        a.push(rate(&creds, after.clone()).await);
    }
    let http = {
        let client = reqwest::Client::new();
        let url = s.url.clone();
        rate(&creds, move |c: HostCredential| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = client.post(format!("{url}/agent/v1/hosts/{}/heartbeat", c.host_id)).header("authorization", c.authorization()).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        })
        .await
    };
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "{name}: heartbeats/s over {HOSTS} hosts, {CONCURRENCY} in flight: before {:.0} ({:.0}, {:.0}); after {:.0} ({:.0}, {:.0}), x{:.2}; after over HTTP {http:.0}",
        avg(&b), b[0], b[1], avg(&a), a[0], a[1], avg(&a) / avg(&b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_rate_before_and_after_the_fast_path() {
    let dir = tempfile::tempdir().unwrap();
    let embedded = TestSite::start(Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap()), |c| c.hosts.heartbeat_ttl_secs = 30).await;
    bench("embedded", embedded).await;
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let on_etcd = TestSite::start(Arc::new(etcd.store().await.unwrap()), |c| c.hosts.heartbeat_ttl_secs = 30).await;
    bench("etcd", on_etcd).await;
}
