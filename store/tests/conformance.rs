//! One conformance suite for both store backends.
//!
//! Every check is a generic async function over `Arc<dyn Store>`; the
//! `conformance!` macro instantiates each one for the embedded store (on a
//! temporary file) and for etcd (a fresh `etcd` per test via
//! `store::testing::EtcdServer`; skipped with a message when etcd is not
//! installed, unless EDGECLOUD_REQUIRE_ETCD=1).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use store::election::Election;
use store::embedded::EmbeddedStore;
use store::etcd::EtcdStore;
use store::record::{self, Record};
use store::testing::EtcdServer;
use store::{
    Compare, Event, EventKind, KeyValue, LeaseId, Op, OpResult, RangeResponse, Store, StoreError, Txn, TxnResponse,
    WatchResponse, WatchStream,
};

/// Keeps a backend alive for the length of a test.
#[allow(dead_code)]
enum Guard {
    Embedded(tempfile::TempDir),
    Etcd(EtcdServer),
}

struct Fixture {
    store: Arc<dyn Store>,
    prefix: String,
    _guard: Guard,
}

fn unique_prefix() -> String {
    format!("/conformance/{}/", uuid::Uuid::new_v4())
}

fn embedded_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    Fixture { store: Arc::new(store), prefix: unique_prefix(), _guard: Guard::Embedded(dir) }
}

async fn etcd_fixture() -> Option<Fixture> {
    let server = EtcdServer::start_or_skip()?;
    let store = EtcdStore::connect(&server.endpoints()).await.unwrap();
    Some(Fixture { store: Arc::new(store), prefix: unique_prefix(), _guard: Guard::Etcd(server) })
}

/// Instantiates each listed check for both backends.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let f = super::embedded_fixture();
                    super::$name(f.store.clone(), &f.prefix).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(f) = super::etcd_fixture().await else { return };
                    super::$name(f.store.clone(), &f.prefix).await;
                }
            )*
        }
    };
}

conformance!(
    revision_is_bumped_once_per_write_txn,
    get_and_range,
    versions_and_create_revision,
    compare_mod_revision,
    compare_version,
    compare_absent_and_exists,
    failure_branch_runs,
    txn_is_atomic,
    delete_prefix_and_reads_inside_txn,
    concurrent_cas_one_winner_per_round,
    concurrent_cas_increments_add_up,
    watch_replays_from_past_revision,
    watch_from_now_sees_only_new_writes,
    watch_delivers_multi_op_txn_as_one_response,
    watch_resumes_from_last_revision_plus_one,
    slow_watcher_misses_nothing,
    watch_from_compacted_revision_errors,
    lease_expiry_deletes_keys_with_events,
    keep_alive_extends_lease,
    revoke_deletes_keys,
    records_round_trip_through_the_store,
    election_has_exactly_one_leader,
    election_resign_hands_over,
    election_dead_leader_is_replaced_within_ttl,
    election_leader_steps_down_when_lease_is_lost,
);

// ---------------------------------------------------------------- helpers

const WAIT: Duration = Duration::from_secs(10);

async fn put(s: &Arc<dyn Store>, key: &str, value: &str) -> i64 {
    s.put(key, value.as_bytes().to_vec()).await.unwrap()
}

async fn txn(s: &Arc<dyn Store>, t: Txn) -> TxnResponse {
    s.txn(t).await.unwrap()
}

async fn value(s: &Arc<dyn Store>, key: &str) -> Option<String> {
    s.get(key).await.unwrap().map(|kv| String::from_utf8(kv.value).unwrap())
}

/// The next watch response, failing the test after [`WAIT`].
async fn next_response(w: &mut WatchStream) -> WatchResponse {
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(r))) => r,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch response within {WAIT:?}"),
    }
}

/// Collects whole responses until one holds an event at `last_revision`, then
/// checks that nothing more arrives for a moment.
async fn collect_until(w: &mut WatchStream, last_revision: i64) -> Vec<Event> {
    let mut events = Vec::new();
    while events.last().is_none_or(|e: &Event| e.kv.mod_revision < last_revision) {
        events.extend(next_response(w).await.events);
    }
    assert_quiet(w).await;
    events
}

async fn assert_quiet(w: &mut WatchStream) {
    if let Ok(extra) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        panic!("unexpected watch item: {extra:?}");
    }
}

/// (kind, key, mod revision) of each event, for comparisons.
fn summary(events: &[Event]) -> Vec<(EventKind, String, i64)> {
    events.iter().map(|e| (e.kind, e.kv.key.clone(), e.kv.mod_revision)).collect()
}

async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_compacted<T: std::fmt::Debug>(r: &Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Compacted { .. }))
}

// ------------------------------------------------------- revisions, reads

async fn revision_is_bumped_once_per_write_txn(s: Arc<dyn Store>, p: &str) {
    let r0 = s.revision().await.unwrap();
    let t = Txn::new().and_then(Op::put(format!("{p}a"), "1")).and_then(Op::put(format!("{p}b"), "2")).and_then(Op::put(format!("{p}c"), "3"));
    let resp = txn(&s, t).await;
    assert!(resp.succeeded);
    assert_eq!(resp.revision, r0 + 1, "a txn of three puts is one revision");
    assert_eq!(s.revision().await.unwrap(), r0 + 1);
    for k in ["a", "b", "c"] {
        assert_eq!(s.get(&format!("{p}{k}")).await.unwrap().unwrap().mod_revision, r0 + 1);
    }
    // A transaction that writes nothing leaves the revision alone.
    let resp = txn(&s, Txn::new().when(Compare::Absent(format!("{p}a"))).and_then(Op::put(format!("{p}d"), "x"))).await;
    assert!(!resp.succeeded);
    assert_eq!(resp.revision, r0 + 1);
    assert!(!s.delete(&format!("{p}missing")).await.unwrap());
    assert_eq!(s.revision().await.unwrap(), r0 + 1);
    // Each further write moves it by exactly one.
    let mut last = r0 + 1;
    for i in 0..5 {
        let r = put(&s, &format!("{p}seq"), &i.to_string()).await;
        assert_eq!(r, last + 1);
        last = r;
    }
    assert_eq!(s.revision().await.unwrap(), last);
}

async fn get_and_range(s: Arc<dyn Store>, p: &str) {
    for k in ["b", "a", "c", "x/y"] {
        put(&s, &format!("{p}{k}"), k).await;
    }
    put(&s, &format!("{}other", p.trim_end_matches('/')), "outside").await;
    assert_eq!(value(&s, &format!("{p}a")).await.as_deref(), Some("a"));
    assert_eq!(s.get(&format!("{p}zzz")).await.unwrap(), None);
    let RangeResponse { kvs, revision } = s.range(p).await.unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.strip_prefix(p).unwrap().to_owned()).collect();
    assert_eq!(keys, ["a", "b", "c", "x/y"], "sorted by key, only under the prefix");
    assert_eq!(revision, s.revision().await.unwrap());
    assert!(s.range(&format!("{p}nothing/")).await.unwrap().kvs.is_empty());
}

async fn versions_and_create_revision(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}k");
    let r1 = put(&s, &k, "1").await;
    let r2 = put(&s, &k, "2").await;
    let kv = s.get(&k).await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version, kv.lease), (r1, r2, 2, 0));
    assert!(s.delete(&k).await.unwrap());
    let r4 = put(&s, &k, "3").await;
    let kv = s.get(&k).await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (r4, r4, 1), "recreated key starts over");
}

// ------------------------------------------------------------- compares

async fn compare_mod_revision(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}k");
    let rev = put(&s, &k, "1").await;
    let ok = txn(&s, Txn::new().when(Compare::ModRevision(k.clone(), rev)).and_then(Op::put(&k, "2"))).await;
    assert!(ok.succeeded);
    let stale = txn(&s, Txn::new().when(Compare::ModRevision(k.clone(), rev)).and_then(Op::put(&k, "3"))).await;
    assert!(!stale.succeeded);
    assert_eq!(value(&s, &k).await.as_deref(), Some("2"));
    // Mod revision 0 means absent.
    let absent = format!("{p}absent");
    assert!(txn(&s, Txn::new().when(Compare::ModRevision(absent.clone(), 0)).and_then(Op::put(&absent, "x"))).await.succeeded);
    assert!(!txn(&s, Txn::new().when(Compare::ModRevision(absent.clone(), 0)).and_then(Op::put(&absent, "y"))).await.succeeded);
}

async fn compare_version(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}k");
    put(&s, &k, "1").await;
    put(&s, &k, "2").await;
    assert!(txn(&s, Txn::new().when(Compare::Version(k.clone(), 2)).and_then(Op::put(&k, "3"))).await.succeeded);
    assert!(!txn(&s, Txn::new().when(Compare::Version(k.clone(), 2)).and_then(Op::put(&k, "4"))).await.succeeded);
    assert_eq!(value(&s, &k).await.as_deref(), Some("3"));
    assert!(txn(&s, Txn::new().when(Compare::Version(format!("{p}none"), 0))).await.succeeded);
    assert!(!txn(&s, Txn::new().when(Compare::Version(format!("{p}none"), 1))).await.succeeded);
}

async fn compare_absent_and_exists(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}k");
    assert!(txn(&s, Txn::new().when(Compare::Absent(k.clone())).and_then(Op::put(&k, "1"))).await.succeeded);
    assert!(!txn(&s, Txn::new().when(Compare::Absent(k.clone())).and_then(Op::put(&k, "2"))).await.succeeded);
    assert!(txn(&s, Txn::new().when(Compare::Exists(k.clone())).and_then(Op::put(&k, "3"))).await.succeeded);
    assert!(!txn(&s, Txn::new().when(Compare::Exists(format!("{p}none"))).and_then(Op::put(&k, "4"))).await.succeeded);
    assert_eq!(value(&s, &k).await.as_deref(), Some("3"));
    // All compares must hold.
    let both = Txn::new().when(Compare::Exists(k.clone())).when(Compare::Exists(format!("{p}none"))).and_then(Op::put(&k, "5"));
    assert!(!txn(&s, both).await.succeeded);
    assert_eq!(value(&s, &k).await.as_deref(), Some("3"));
}

async fn failure_branch_runs(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}k");
    let rev = put(&s, &k, "current").await;
    let t = Txn::new()
        .when(Compare::ModRevision(k.clone(), rev + 100))
        .and_then(Op::put(&k, "never"))
        .or_else(Op::get(&k))
        .or_else(Op::put(format!("{p}failed"), "yes"));
    let resp = txn(&s, t).await;
    assert!(!resp.succeeded);
    assert_eq!(resp.revision, rev + 1, "the failure branch wrote");
    match &resp.results[..] {
        [OpResult::Get(Some(kv)), OpResult::Put] => {
            assert_eq!(kv.value, b"current");
            assert_eq!(kv.mod_revision, rev);
        }
        other => panic!("unexpected results {other:?}"),
    }
    assert_eq!(value(&s, &format!("{p}failed")).await.as_deref(), Some("yes"));
    assert_eq!(value(&s, &k).await.as_deref(), Some("current"));
}

async fn txn_is_atomic(s: Arc<dyn Store>, p: &str) {
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let r0 = put(&s, &a, "0").await;
    // A put under a lease that does not exist fails the whole transaction.
    let bad_lease: LeaseId = 0x1234_5678_9abc;
    let t = Txn::new().and_then(Op::put(&a, "1")).and_then(Op::put_with_lease(&b, "1", bad_lease));
    match s.txn(t).await {
        Err(StoreError::LeaseNotFound(l)) => assert_eq!(l, bad_lease),
        other => panic!("expected LeaseNotFound, got {other:?}"),
    }
    // A key put twice is refused before anything runs.
    let t = Txn::new().and_then(Op::put(&a, "2")).and_then(Op::put(&b, "2")).and_then(Op::put(&b, "3"));
    assert!(matches!(s.txn(t).await, Err(StoreError::Invalid(_))));
    assert_eq!(value(&s, &a).await.as_deref(), Some("0"));
    assert_eq!(value(&s, &b).await, None);
    assert_eq!(s.revision().await.unwrap(), r0, "refused transactions do not move the revision");
    // Many writes land together, at one revision.
    let t = Txn::new().when(Compare::ModRevision(a.clone(), r0)).and_then(Op::put(&a, "1")).and_then(Op::put(&b, "1")).and_then(Op::delete(&a));
    assert!(matches!(s.txn(t).await, Err(StoreError::Invalid(_))), "put and delete of one key is refused");
    let t = Txn::new().when(Compare::ModRevision(a.clone(), r0)).and_then(Op::put(&a, "1")).and_then(Op::put(&b, "1"));
    let resp = txn(&s, t).await;
    assert!(resp.succeeded);
    assert_eq!(s.get(&a).await.unwrap().unwrap().mod_revision, resp.revision);
    assert_eq!(s.get(&b).await.unwrap().unwrap().mod_revision, resp.revision);
}

async fn delete_prefix_and_reads_inside_txn(s: Arc<dyn Store>, p: &str) {
    for k in ["d/1", "d/2", "d/3", "keep"] {
        put(&s, &format!("{p}{k}"), k).await;
    }
    let t = Txn::new()
        .and_then(Op::delete_prefix(format!("{p}d/")))
        .and_then(Op::get(format!("{p}d/1")))
        .and_then(Op::put(format!("{p}new"), "n"))
        .and_then(Op::get(format!("{p}new")));
    let resp = txn(&s, t).await;
    assert_eq!(resp.results[0], OpResult::Delete(3));
    assert_eq!(resp.results[1], OpResult::Get(None), "a read sees the earlier delete of its txn");
    assert_eq!(resp.results[2], OpResult::Put);
    match &resp.results[3] {
        OpResult::Get(Some(kv)) => {
            assert_eq!(kv.value, b"n");
            assert_eq!(kv.mod_revision, resp.revision, "a read sees the earlier put of its txn");
        }
        other => panic!("unexpected {other:?}"),
    }
    let keys: Vec<_> = s.range(p).await.unwrap().kvs.into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, [format!("{p}keep"), format!("{p}new")]);
}

// --------------------------------------------------------- concurrent CAS

async fn concurrent_cas_one_winner_per_round(s: Arc<dyn Store>, p: &str) {
    const TASKS: usize = 32;
    const ROUNDS: usize = 8;
    let key = format!("{p}counter");
    put(&s, &key, "0").await;
    for round in 0..ROUNDS {
        let kv = s.get(&key).await.unwrap().unwrap();
        let current: usize = String::from_utf8(kv.value).unwrap().parse().unwrap();
        assert_eq!(current, round);
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let (s, key, barrier) = (s.clone(), key.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let t = Txn::new().when(Compare::ModRevision(key.clone(), kv.mod_revision)).and_then(Op::put(&key, (current + 1).to_string()));
                s.txn(t).await.unwrap().succeeded
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += t.await.unwrap() as usize;
        }
        assert_eq!(winners, 1, "round {round}: exactly one compare-and-swap wins");
    }
    assert_eq!(value(&s, &key).await.unwrap(), ROUNDS.to_string());
}

async fn concurrent_cas_increments_add_up(s: Arc<dyn Store>, p: &str) {
    const TASKS: usize = 32;
    const PER_TASK: usize = 5;
    let key = format!("{p}counter");
    put(&s, &key, "0").await;
    let successes = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (s, key, successes) = (s.clone(), key.clone(), successes.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = 0;
            while mine < PER_TASK {
                let kv = s.get(&key).await.unwrap().unwrap();
                let n: usize = String::from_utf8(kv.value).unwrap().parse().unwrap();
                let t = Txn::new().when(Compare::ModRevision(key.clone(), kv.mod_revision)).and_then(Op::put(&key, (n + 1).to_string()));
                if s.txn(t).await.unwrap().succeeded {
                    mine += 1;
                    successes.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = successes.load(Ordering::SeqCst);
    assert_eq!(total, TASKS * PER_TASK);
    assert_eq!(value(&s, &key).await.unwrap(), total.to_string(), "no lost update");
}

// ------------------------------------------------------------------ watch

async fn watch_replays_from_past_revision(s: Arc<dyn Store>, p: &str) {
    let mut revs = Vec::new();
    for i in 0..6 {
        revs.push(put(&s, &format!("{p}k{}", i % 3), &i.to_string()).await);
    }
    put(&s, "/elsewhere/not-watched", "x").await;
    let del = txn(&s, Txn::new().and_then(Op::delete(format!("{p}k0")))).await.revision;
    let from = revs[2];
    let mut w = s.watch(p, from).await.unwrap();
    let events = collect_until(&mut w, del).await;
    let mut expected: Vec<_> = (2..6).map(|i| (EventKind::Put, format!("{p}k{}", i % 3), revs[i])).collect();
    expected.push((EventKind::Delete, format!("{p}k0"), del));
    assert_eq!(summary(&events), expected, "exactly the events from {from} on, in order");
    assert_eq!(events[0].kv.value, b"2");
    // Then live events follow, each once.
    let live = put(&s, &format!("{p}k1"), "live").await;
    let events = collect_until(&mut w, live).await;
    assert_eq!(summary(&events), [(EventKind::Put, format!("{p}k1"), live)]);
}

async fn watch_from_now_sees_only_new_writes(s: Arc<dyn Store>, p: &str) {
    put(&s, &format!("{p}old"), "old").await;
    let mut w = s.watch(p, 0).await.unwrap();
    let r = put(&s, &format!("{p}new"), "new").await;
    let events = collect_until(&mut w, r).await;
    assert_eq!(summary(&events), [(EventKind::Put, format!("{p}new"), r)]);
    assert_eq!(events[0].kv.value, b"new");
}

async fn watch_delivers_multi_op_txn_as_one_response(s: Arc<dyn Store>, p: &str) {
    put(&s, &format!("{p}gone"), "x").await;
    let mut live = s.watch(p, 0).await.unwrap();
    let t = Txn::new()
        .and_then(Op::put(format!("{p}a"), "1"))
        .and_then(Op::put(format!("{p}b"), "2"))
        .and_then(Op::delete(format!("{p}gone")))
        .and_then(Op::put(format!("{p}c"), "3"));
    let rev = txn(&s, t).await.revision;
    let check = |resp: WatchResponse| {
        let sum = summary(&resp.events);
        assert_eq!(
            sum,
            [
                (EventKind::Put, format!("{p}a"), rev),
                (EventKind::Put, format!("{p}b"), rev),
                (EventKind::Delete, format!("{p}gone"), rev),
                (EventKind::Put, format!("{p}c"), rev),
            ],
            "all events of the txn in one response, in op order"
        );
    };
    check(next_response(&mut live).await);
    assert_quiet(&mut live).await;
    // Replayed from history, too.
    let mut replay = s.watch(p, rev).await.unwrap();
    check(next_response(&mut replay).await);
}

async fn watch_resumes_from_last_revision_plus_one(s: Arc<dyn Store>, p: &str) {
    let mut w = s.watch(p, 0).await.unwrap();
    let mut last = 0;
    for i in 0..3 {
        last = put(&s, &format!("{p}k"), &i.to_string()).await;
    }
    let seen = collect_until(&mut w, last).await;
    assert_eq!(seen.len(), 3);
    drop(w);
    let mut more = Vec::new();
    for i in 3..6 {
        more.push(put(&s, &format!("{p}k"), &i.to_string()).await);
    }
    let mut w = s.watch(p, seen.last().unwrap().kv.mod_revision + 1).await.unwrap();
    let events = collect_until(&mut w, *more.last().unwrap()).await;
    assert_eq!(events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(), more, "no gap, no duplicate");
}

/// A watcher that does not read while many revisions pass (more than any
/// in-memory buffer holds) still gets every event, once, in order.
async fn slow_watcher_misses_nothing(s: Arc<dyn Store>, p: &str) {
    const TASKS: usize = 8;
    const PER_TASK: usize = 200;
    let mut w = s.watch(p, 0).await.unwrap();
    let mut writers = Vec::new();
    for t in 0..TASKS {
        let (s, p) = (s.clone(), p.to_owned());
        writers.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..PER_TASK {
                revs.push(s.put(&format!("{p}{t}"), i.to_string().into_bytes()).await.unwrap());
            }
            revs
        }));
    }
    let mut written = Vec::new();
    for wr in writers {
        written.extend(wr.await.unwrap());
    }
    written.sort_unstable();
    let events = collect_until(&mut w, *written.last().unwrap()).await;
    let seen: Vec<i64> = events.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(seen, written, "every revision once, in order");
}

async fn watch_from_compacted_revision_errors(s: Arc<dyn Store>, p: &str) {
    let first = put(&s, &format!("{p}k"), "1").await;
    put(&s, &format!("{p}k"), "2").await;
    let at = put(&s, &format!("{p}k"), "3").await;
    s.compact(at).await.unwrap();
    s.compact(first).await.unwrap(); // already compacted: no-op
    let r = s.watch(p, first).await;
    let compacted: Result<(), StoreError> = match r {
        Err(e) => Err(e),
        Ok(mut w) => match tokio::time::timeout(WAIT, w.next()).await.unwrap() {
            Some(Err(e)) => Err(e),
            other => panic!("watch from a compacted revision gave {other:?}"),
        },
    };
    assert!(is_compacted(&compacted), "got {compacted:?}");
    if let Err(StoreError::Compacted { requested, compacted }) = compacted {
        assert_eq!(requested, first);
        assert_eq!(compacted, at);
    }
    // From the compaction point on, history is still there.
    let mut w = s.watch(p, at).await.unwrap();
    let events = collect_until(&mut w, at).await;
    assert_eq!(events[0].kv.value, b"3");
    assert!(matches!(s.compact(at + 1000).await, Err(StoreError::Invalid(_))), "future revision");
}

// ----------------------------------------------------------------- leases

async fn lease_expiry_deletes_keys_with_events(s: Arc<dyn Store>, p: &str) {
    let lease = s.lease_grant(2).await.unwrap();
    let t = Txn::new().and_then(Op::put_with_lease(format!("{p}a"), "1", lease)).and_then(Op::put_with_lease(format!("{p}b"), "2", lease));
    let rev = txn(&s, t).await.revision;
    assert_eq!(s.get(&format!("{p}a")).await.unwrap().unwrap().lease, lease);
    put(&s, &format!("{p}plain"), "stays").await;
    let mut w = s.watch(p, rev + 1).await.unwrap();
    let granted = Instant::now();
    let resp = next_response(&mut w).await;
    let mut deleted: Vec<_> = resp.events.iter().filter(|e| e.kind == EventKind::Delete).map(|e| e.kv.key.clone()).collect();
    // The plain put may come first.
    while deleted.is_empty() {
        let resp = next_response(&mut w).await;
        deleted = resp.events.iter().filter(|e| e.kind == EventKind::Delete).map(|e| e.kv.key.clone()).collect();
    }
    deleted.sort();
    assert_eq!(deleted, [format!("{p}a"), format!("{p}b")], "both keys of the lease vanish together");
    assert!(granted.elapsed() < Duration::from_secs(8));
    assert_eq!(s.get(&format!("{p}a")).await.unwrap(), None);
    assert_eq!(value(&s, &format!("{p}plain")).await.as_deref(), Some("stays"));
    assert!(matches!(s.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(l)) if l == lease));
}

async fn keep_alive_extends_lease(s: Arc<dyn Store>, p: &str) {
    let lease = s.lease_grant(2).await.unwrap();
    let k = format!("{p}k");
    txn(&s, Txn::new().and_then(Op::put_with_lease(&k, "1", lease))).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        assert_eq!(s.lease_keep_alive(lease).await.unwrap(), 2);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(s.get(&k).await.unwrap().is_some(), "kept alive past twice its TTL");
    let stopped = Instant::now();
    wait_for("the key to expire", Duration::from_secs(8), async || s.get(&k).await.unwrap().is_none()).await;
    assert!(stopped.elapsed() >= Duration::from_millis(1500), "expired only after its TTL");
}

async fn revoke_deletes_keys(s: Arc<dyn Store>, p: &str) {
    let lease = s.lease_grant(60).await.unwrap();
    let k = format!("{p}k");
    let rev = txn(&s, Txn::new().and_then(Op::put_with_lease(&k, "1", lease))).await.revision;
    let mut w = s.watch(p, rev + 1).await.unwrap();
    s.lease_revoke(lease).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap(), None);
    let resp = next_response(&mut w).await;
    assert_eq!(resp.events.len(), 1);
    assert_eq!((resp.events[0].kind, resp.events[0].kv.key.as_str()), (EventKind::Delete, k.as_str()));
    assert!(matches!(s.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(_))));
    assert!(matches!(s.lease_revoke(lease).await, Err(StoreError::LeaseNotFound(_))));
    let t = Txn::new().and_then(Op::put_with_lease(&k, "2", lease));
    assert!(matches!(s.txn(t).await, Err(StoreError::LeaseNotFound(_))));
    // Re-putting a key without its lease detaches it.
    let lease2 = s.lease_grant(60).await.unwrap();
    txn(&s, Txn::new().and_then(Op::put_with_lease(&k, "3", lease2))).await;
    put(&s, &k, "4").await;
    s.lease_revoke(lease2).await.unwrap();
    assert_eq!(value(&s, &k).await.as_deref(), Some("4"));
}

// ---------------------------------------------------------------- records

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct HostV1 {
    name: String,
    cpus: u32,
}

impl Record for HostV1 {
    const VERSION: u32 = 1;
}

async fn records_round_trip_through_the_store(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}host");
    let host = HostV1 { name: "h1".into(), cpus: 8 };
    s.put(&k, record::encode(&host)).await.unwrap();
    let kv = s.get(&k).await.unwrap().unwrap();
    assert_eq!(record::decode::<HostV1>(&k, &kv.value).unwrap(), host);
    let raw: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(raw["v"], 1);
    // A newer writer's record is refused, not misread.
    s.put(&k, br#"{"v":2,"name":"h1","cpus":8,"numa":[]}"#.to_vec()).await.unwrap();
    let kv = s.get(&k).await.unwrap().unwrap();
    match record::decode::<HostV1>(&k, &kv.value) {
        Err(StoreError::Corrupt { key, reason }) => {
            assert_eq!(key, k);
            assert!(reason.contains("schema version 2"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

// --------------------------------------------------------------- election

/// Samples both flags for a while; at most one may ever be true.
async fn assert_never_two_leaders(a: &Election, b: &Election, d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        assert!(!(a.is_leader() && b.is_leader()), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn one_leader(a: &Election, b: &Election) -> bool {
    tokio::time::timeout(WAIT, async {
        loop {
            if a.is_leader() != b.is_leader() {
                return a.is_leader();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no leader elected")
}

async fn election_has_exactly_one_leader(s: Arc<dyn Store>, p: &str) {
    let name = format!("one-{}", p.replace('/', "-"));
    let a = Election::campaign(s.clone(), &name, "a", 2).unwrap();
    let b = Election::campaign(s.clone(), &name, "b", 2).unwrap();
    let a_leads = one_leader(&a, &b).await;
    assert_never_two_leaders(&a, &b, Duration::from_secs(3)).await;
    assert_eq!(a.is_leader(), a_leads, "leadership is stable while the leader lives");
    let expected = if a_leads { "a" } else { "b" };
    assert_eq!(Election::leader(s.as_ref(), &name).await.unwrap().as_deref(), Some(expected));
}

async fn election_resign_hands_over(s: Arc<dyn Store>, p: &str) {
    let name = format!("resign-{}", p.replace('/', "-"));
    let a = Election::campaign(s.clone(), &name, "a", 2).unwrap();
    a.wait_for_leadership().await;
    let b = Election::campaign(s.clone(), &name, "b", 2).unwrap();
    assert_never_two_leaders(&a, &b, Duration::from_millis(500)).await;
    assert!(!b.is_leader());
    let resigned = Instant::now();
    a.resign().await;
    tokio::time::timeout(Duration::from_secs(2), b.wait_for_leadership()).await.expect("b takes over within the TTL");
    assert!(resigned.elapsed() < Duration::from_secs(2));
    assert_eq!(Election::leader(s.as_ref(), &name).await.unwrap().as_deref(), Some("b"));
    // Dropping resigns too.
    drop(b);
    wait_for("the key to go", Duration::from_secs(3), async || Election::leader(s.as_ref(), &name).await.unwrap().is_none()).await;
}

/// A store handle that can "die": every call fails as if the process had
/// crashed or been cut off, while the store itself keeps running.
struct Killable {
    inner: Arc<dyn Store>,
    dead: AtomicBool,
}

impl Killable {
    fn check(&self) -> store::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("this candidate is dead".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for Killable {
    async fn get(&self, key: &str) -> store::Result<Option<KeyValue>> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn range(&self, prefix: &str) -> store::Result<RangeResponse> {
        self.check()?;
        self.inner.range(prefix).await
    }
    async fn txn(&self, t: Txn) -> store::Result<TxnResponse> {
        self.check()?;
        self.inner.txn(t).await
    }
    async fn watch(&self, prefix: &str, start: i64) -> store::Result<WatchStream> {
        self.check()?;
        self.inner.watch(prefix, start).await
    }
    async fn lease_grant(&self, ttl: i64) -> store::Result<LeaseId> {
        self.check()?;
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> store::Result<i64> {
        self.check()?;
        self.inner.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> store::Result<()> {
        self.check()?;
        self.inner.lease_revoke(lease).await
    }
    async fn compact(&self, rev: i64) -> store::Result<()> {
        self.check()?;
        self.inner.compact(rev).await
    }
    async fn revision(&self) -> store::Result<i64> {
        self.check()?;
        self.inner.revision().await
    }
}

async fn election_dead_leader_is_replaced_within_ttl(s: Arc<dyn Store>, p: &str) {
    let name = format!("dead-{}", p.replace('/', "-"));
    let doomed = Arc::new(Killable { inner: s.clone(), dead: AtomicBool::new(false) });
    let a = Election::campaign(doomed.clone(), &name, "a", 2).unwrap();
    a.wait_for_leadership().await;
    let b = Election::campaign(s.clone(), &name, "b", 2).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_leader());
    doomed.dead.store(true, Ordering::SeqCst);
    let died = Instant::now();
    // The dead leader gives up before the store can let b in...
    let mut a_flag = a.subscribe();
    tokio::time::timeout(Duration::from_secs(2), a_flag.wait_for(|l| !*l)).await.expect("a steps down within its TTL").unwrap();
    assert!(!b.is_leader() || !a.is_leader());
    // ...and b takes over once the lease has expired (TTL plus the store's expiry tick).
    tokio::time::timeout(Duration::from_secs(6), b.wait_for_leadership()).await.expect("b takes over");
    assert!(died.elapsed() >= Duration::from_millis(1000), "not before a's lease could expire");
    assert!(!a.is_leader());
    assert_eq!(Election::leader(s.as_ref(), &name).await.unwrap().as_deref(), Some("b"));
}

async fn election_leader_steps_down_when_lease_is_lost(s: Arc<dyn Store>, p: &str) {
    let name = format!("lost-{}", p.replace('/', "-"));
    let a = Election::campaign(s.clone(), &name, "a", 2).unwrap();
    a.wait_for_leadership().await;
    let kv = s.get(a.key()).await.unwrap().unwrap();
    let mut flag = a.subscribe();
    flag.mark_unchanged();
    // Someone (an operator, a partition healed late) ends a's lease.
    s.lease_revoke(kv.lease).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), flag.wait_for(|l| !*l)).await.expect("a steps down").unwrap();
    // It campaigns again with a new lease and wins, being alone.
    tokio::time::timeout(Duration::from_secs(5), a.wait_for_leadership()).await.expect("a leads again");
    let now = s.get(a.key()).await.unwrap().unwrap();
    assert_ne!(now.lease, kv.lease);
}

// -------------------------------------------------- backend-specific tests

/// Data, revision, history and leases survive closing and reopening the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let (rev, lease, first) = {
        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
        let first = put(&s, "/p/a", "1").await;
        put(&s, "/p/b", "2").await;
        let lease = s.lease_grant(3).await.unwrap();
        let rev = txn(&s, Txn::new().and_then(Op::put_with_lease("/p/leased", "x", lease))).await.revision;
        (rev, lease, first)
    };
    let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
    let reopened = Instant::now();
    assert_eq!(s.revision().await.unwrap(), rev);
    assert_eq!(value(&s, "/p/a").await.as_deref(), Some("1"));
    assert_eq!(s.range("/p/").await.unwrap().kvs.len(), 3);
    let mut w = s.watch("/p/", first).await.unwrap();
    let events = collect_until(&mut w, rev).await;
    assert_eq!(events.len(), 3, "history survives");
    // The lease got its full TTL again and still works.
    assert_eq!(s.lease_keep_alive(lease).await.unwrap(), 3);
    let next = put(&s, "/p/c", "3").await;
    assert_eq!(next, rev + 1);
    wait_for("the leased key to expire", Duration::from_secs(8), async || s.get("/p/leased").await.unwrap().is_none()).await;
    assert!(reopened.elapsed() >= Duration::from_millis(2500));
}

#[test]
fn embedded_refuses_a_second_open_of_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let _first = EmbeddedStore::open(&path).unwrap();
    assert!(EmbeddedStore::open(&path).is_err());
}

/// A watch keeps going across an etcd crash and restart, without losing or
/// repeating an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_survives_restart() {
    let Some(mut server) = EtcdServer::start_or_skip() else { return };
    let s: Arc<dyn Store> = Arc::new(EtcdStore::connect(&server.endpoints()).await.unwrap());
    let p = unique_prefix();
    let mut w = s.watch(&p, 0).await.unwrap();
    let before = put(&s, &format!("{p}k"), "before").await;
    let seen = collect_until(&mut w, before).await;
    assert_eq!(seen.len(), 1);

    // Down with nothing written meanwhile.
    server.stop().unwrap();
    assert!(matches!(s.get("/x").await, Err(StoreError::Unavailable(_))), "a down etcd is Unavailable");
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart().unwrap();
    let mut revs = Vec::new();
    for i in 0..3 {
        revs.push(retry_put(&s, &format!("{p}k"), &format!("after-{i}")).await);
    }
    let events = collect_until(&mut w, *revs.last().unwrap()).await;
    assert_eq!(events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(), revs);

    // Down again, and writes land right after the restart, before the watch
    // has reconnected: they must be replayed, once.
    server.stop().unwrap();
    server.restart().unwrap();
    let mut revs = Vec::new();
    for i in 0..3 {
        revs.push(retry_put(&s, &format!("{p}k{i}"), "x").await);
    }
    let events = collect_until(&mut w, *revs.last().unwrap()).await;
    assert_eq!(events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(), revs);
    let keys: HashSet<_> = events.iter().map(|e| e.kv.key.clone()).collect();
    assert_eq!(keys.len(), 3);
}

/// A put that retries while the client reconnects after an etcd restart.
async fn retry_put(s: &Arc<dyn Store>, key: &str, value: &str) -> i64 {
    let start = Instant::now();
    loop {
        match s.put(key, value.as_bytes().to_vec()).await {
            Ok(r) => return r,
            Err(StoreError::Unavailable(e)) if start.elapsed() < WAIT => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put failed: {e}"),
        }
    }
}

#[tokio::test]
async fn etcd_connect_to_nothing_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    match EtcdStore::connect(&[format!("http://127.0.0.1:{port}")]).await {
        Err(StoreError::Unavailable(_)) => {}
        Err(e) => panic!("expected Unavailable, got {e:?}"),
        Ok(_) => panic!("connected to a closed port"),
    }
}

#[test]
fn etcd_server_restarts_on_the_same_data() {
    let Some(mut server) = EtcdServer::start_or_skip() else { return };
    let dir = server.data_dir();
    let endpoint = server.endpoint();
    assert!(server.is_running());
    server.stop().unwrap();
    assert!(!server.is_running());
    server.restart().unwrap();
    assert!(server.is_running());
    assert_eq!(server.data_dir(), dir);
    assert_eq!(server.endpoint(), endpoint);
    let tmp = dir.parent().unwrap().to_path_buf();
    drop(server);
    assert!(!tmp.exists(), "the temporary directory is removed on drop");
}

#[test]
fn etcd_missing_binary_is_reported() {
    // Run the check through a child process so the env change stays there.
    if std::env::var("CONFORMANCE_MISSING_ETCD_CHILD").is_ok() {
        let e = EtcdServer::start().unwrap_err();
        assert!(e.to_string().contains("etcd is not installed"), "{e}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "etcd_missing_binary_is_reported", "--nocapture"])
        .env("CONFORMANCE_MISSING_ETCD_CHILD", "1")
        .env(store::testing::ETCD_BIN_ENV, "/nonexistent/etcd")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn record_decode_refuses_bad_bytes_without_panicking() {
    for bad in [&b""[..], b"not json", b"[1,2]", b"{\"name\":\"x\",\"cpus\":1}", b"{\"v\":0,\"name\":\"x\",\"cpus\":1}", b"{\"v\":4294967297,\"name\":\"x\",\"cpus\":1}", b"{\"v\":1,\"name\":5}"] {
        assert!(matches!(record::decode::<HostV1>("/k", bad), Err(StoreError::Corrupt { .. })), "{:?}", String::from_utf8_lossy(bad));
    }
    assert!(record::try_encode(&HostV1 { name: "x".into(), cpus: 1 }).is_ok());
}

/// The embedded store compacts history beyond its retention by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_history_is_compacted_automatically() {
    use store::embedded::EmbeddedOptions;
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions { history_revisions: Some(10) };
    let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open_with(&dir.path().join("s.redb"), options).unwrap());
    let first = put(&s, "/h/k", "0").await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..140 {
                s.put(&format!("/h/{t}"), i.to_string().into_bytes()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let last = s.revision().await.unwrap();
    assert!(last >= first + 1120);
    assert!(matches!(s.watch("/h/", first).await, Err(StoreError::Compacted { .. })));
    let mut w = s.watch("/h/", last - 9).await.unwrap();
    assert_eq!(collect_until(&mut w, last).await.len(), 10, "the last 10 revisions are kept");
}
