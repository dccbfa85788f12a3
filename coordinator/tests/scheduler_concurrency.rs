//! Several schedulers (separate instances, each with its own cache, as on
//! separate replicas) place requests at once against the same hosts; after
//! they run out of room, no provider may be over its capacity and every
//! provider's allocations must match the consumers' records. Runs against
//! the embedded store and against a real etcd.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use coordinator::placement::db::{self, Inventory, ProviderSpec, ProviderTree};
use coordinator::scheduler::{AllHostsUp, RequestSpec, ScheduleError, Scheduler, SchedulerConfig};
use store::Store;
use uuid::Uuid;

const HOSTS: usize = 12;
const SCHEDULERS: usize = 3;
const TASKS_PER_SCHEDULER: usize = 8;

async fn load_hosts(store: &dyn Store) {
    for i in 0..HOSTS {
        let mut vcpu = Inventory::new(8);
        vcpu.allocation_ratio = 1.5; // capacity 12
        let mut mem = Inventory::new(8192);
        mem.reserved = 512; // capacity 7680
        let tree = ProviderTree {
            root: ProviderSpec {
                uuid: Uuid::new_v4(),
                name: format!("host{i}"),
                inventories: BTreeMap::from([
                    ("VCPU".to_string(), vcpu),
                    ("MEMORY_MB".to_string(), mem),
                    ("DISK_GB".to_string(), Inventory::new(200)),
                ]),
                traits: BTreeSet::new(),
                children: vec![],
            },
        };
        db::sync_provider_tree(store, &tree).await.unwrap();
    }
}

/// Runs the schedulers until every task has hit "no valid host"; returns the placements made.
/// `stores[i]` is the store connection of scheduler `i`.
async fn race(stores: Vec<Arc<dyn Store>>) -> usize {
    load_hosts(stores[0].as_ref()).await;
    let mut schedulers = Vec::new();
    for store in stores {
        let config = SchedulerConfig { host_subset_size: 1, sample_size: 4, ..SchedulerConfig::default() };
        schedulers.push(Arc::new(Scheduler::start(store.clone(), Arc::new(AllHostsUp), config).await.unwrap()));
    }
    let mut tasks = Vec::new();
    for (s, sched) in schedulers.iter().enumerate() {
        for t in 0..TASKS_PER_SCHEDULER {
            let sched = sched.clone();
            tasks.push(tokio::spawn(async move {
                let mut placed = 0usize;
                let mut n = 0u64;
                loop {
                    n += 1;
                    let req = RequestSpec {
                        consumer: Uuid::new_v4(),
                        project_id: format!("p{s}"),
                        user_id: format!("u{t}"),
                        resources: BTreeMap::from([
                            ("VCPU".to_string(), 1 + (n + t as u64) % 3),
                            ("MEMORY_MB".to_string(), 512 * (1 + n % 4)),
                            ("DISK_GB".to_string(), 10),
                        ]),
                        ..RequestSpec::default()
                    };
                    match sched.schedule(&req).await {
                        Ok(_) => placed += 1,
                        Err(ScheduleError::NoValidHost(_)) | Err(ScheduleError::Exhausted) => {
                            // Another round trip after the cache settles must agree.
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            match sched.schedule(&req).await {
                                Ok(_) => placed += 1,
                                Err(ScheduleError::NoValidHost(_)) | Err(ScheduleError::Exhausted) => return placed,
                                Err(e) => panic!("{e}"),
                            }
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
    }
    let mut placed = 0;
    for t in tasks {
        placed += t.await.unwrap();
    }
    let conflicts: u64 = schedulers.iter().map(|s| s.stats().conflicts.load(std::sync::atomic::Ordering::Relaxed)).sum();
    println!("placed {placed} requests; {conflicts} claims lost a race and moved on");
    placed
}

async fn check_no_overcommit(store: &dyn Store, placed: usize) {
    let (providers, _) = db::list_providers(store).await.unwrap();
    assert_eq!(providers.len(), HOSTS);
    let consumers = db::list_consumers(store).await.unwrap();
    assert_eq!(consumers.len(), placed, "one consumer record per successful placement");
    let mut from_consumers: HashMap<Uuid, BTreeMap<String, u64>> = HashMap::new();
    for c in &consumers {
        for (rp, amounts) in &c.allocations {
            for (class, n) in amounts {
                *from_consumers.entry(*rp).or_default().entry(class.clone()).or_default() += n;
            }
        }
    }
    let mut full = 0;
    for p in &providers {
        let p = &p.value;
        for (class, inv) in &p.inventories {
            let used = p.used(class);
            let limit = ((inv.total - inv.reserved) as f64 * inv.allocation_ratio) as u64;
            assert!(used <= limit, "{} {class}: used {used} > (total - reserved) * ratio = {limit}", p.name);
            let seen = from_consumers.get(&p.uuid).and_then(|m| m.get(class)).copied().unwrap_or(0);
            assert_eq!(used, seen, "{} {class}: provider and consumer records disagree", p.name);
        }
        // The provider's allocation index holds exactly the consumers' shares of it.
        let indexed = db::provider_allocations(store, p).await.unwrap();
        let expected: BTreeMap<Uuid, BTreeMap<String, u64>> =
            consumers.iter().filter_map(|c| c.allocations.get(&p.uuid).map(|a| (c.uuid, a.clone()))).collect();
        assert_eq!(indexed, expected, "{}: allocation index and consumer records disagree", p.name);
        assert_eq!(p.consumers, expected.len() as u64, "{}: consumer count", p.name);
        if p.free("VCPU") < 3 || p.free("MEMORY_MB") < 2048 {
            full += 1;
        }
    }
    assert!(placed >= HOSTS * 3, "the hosts should hold many requests, placed only {placed}");
    assert!(full > 0, "the race should have filled hosts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_schedulers_never_overcommit_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    let placed = race(vec![store.clone(); SCHEDULERS]).await;
    check_no_overcommit(store.as_ref(), placed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_schedulers_never_overcommit_etcd() {
    let Some(etcd) = store::testing::EtcdServer::start_or_skip() else { return };
    // Each scheduler has its own client connection, as separate replicas would.
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..SCHEDULERS {
        stores.push(Arc::new(etcd.store().await.unwrap()));
    }
    let store = stores[0].clone();
    let placed = race(stores).await;
    check_no_overcommit(store.as_ref(), placed).await;
}
