//! Server groups under concurrency: many members of one group scheduled at
//! once by several schedulers (each its own cache, as on separate replicas),
//! none of them told where the others went. Anti-affinity must never put two
//! members on one host; affinity must put them all on one. Runs against the
//! embedded store and against a real etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use coordinator::placement::db::{self, Inventory, ProviderSpec, ProviderTree};
use coordinator::scheduler::{groups, AllHostsUp, GroupPolicy, RequestSpec, Scheduler, SchedulerConfig, ServerGroup};
use store::Store;
use uuid::Uuid;

const HOSTS: usize = 16;
const SCHEDULERS: usize = 3;
const MEMBERS: usize = 12;

async fn load_hosts(store: &dyn Store) -> BTreeSet<Uuid> {
    let mut hosts = BTreeSet::new();
    for i in 0..HOSTS {
        let uuid = Uuid::new_v4();
        let tree = ProviderTree {
            root: ProviderSpec {
                uuid,
                name: format!("host{i}"),
                inventories: BTreeMap::from([
                    ("VCPU".to_string(), Inventory::new(64)),
                    ("MEMORY_MB".to_string(), Inventory::new(65536)),
                ]),
                traits: BTreeSet::new(),
                children: vec![],
            },
        };
        db::sync_provider_tree(store, &tree).await.unwrap();
        hosts.insert(uuid);
    }
    hosts
}

/// Schedules `MEMBERS` members of one group at once across the schedulers;
/// returns member -> host as the schedulers answered.
async fn place_members(stores: &[Arc<dyn Store>], group: Uuid, policy: GroupPolicy) -> BTreeMap<Uuid, Uuid> {
    let mut schedulers = Vec::new();
    for store in stores {
        // Every scheduler sees the whole site and always takes the best host,
        // so without the group record they would keep choosing the same one.
        let config = SchedulerConfig { host_subset_size: 1, sample_size: HOSTS, ..SchedulerConfig::default() };
        schedulers.push(Arc::new(Scheduler::start(store.clone(), Arc::new(AllHostsUp), config).await.unwrap()));
    }
    let start = Arc::new(tokio::sync::Barrier::new(MEMBERS));
    let mut tasks = Vec::new();
    for m in 0..MEMBERS {
        let sched = schedulers[m % SCHEDULERS].clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let req = RequestSpec {
                consumer: Uuid::new_v4(),
                project_id: "p".into(),
                user_id: "u".into(),
                resources: BTreeMap::from([("VCPU".to_string(), 1), ("MEMORY_MB".to_string(), 512)]),
                // The caller knows of no members: the scheduler's record must.
                server_group: Some(ServerGroup { id: group, policy, member_hosts: BTreeSet::new() }),
                ..RequestSpec::default()
            };
            start.wait().await;
            let sel = sched.schedule(&req).await.unwrap_or_else(|e| panic!("member {m}: {e}"));
            (req.consumer, sel.host)
        }));
    }
    let mut placed = BTreeMap::new();
    for t in tasks {
        let (member, host) = t.await.unwrap();
        placed.insert(member, host);
    }
    let conflicts: u64 = schedulers.iter().map(|s| s.stats().conflicts.load(std::sync::atomic::Ordering::Relaxed)).sum();
    println!("{policy:?}: placed {} members; {conflicts} claims lost a race and re-selected", placed.len());
    placed
}

/// What the store says: the group record and the consumers' allocations agree with the answers.
async fn check_store(store: &dyn Store, group: Uuid, placed: &BTreeMap<Uuid, Uuid>) {
    let recorded = groups::read(store, &group).await.unwrap();
    assert_eq!(&recorded.members.members, placed, "the group record holds every member where it was placed");
    for (member, host) in placed {
        let c = db::get_consumer(store, member).await.unwrap().expect("consumer record");
        assert_eq!(c.value.allocations.keys().collect::<Vec<_>>(), vec![host], "member {member} is allocated on its host");
    }
}

async fn anti_affinity(stores: Vec<Arc<dyn Store>>) {
    let hosts = load_hosts(stores[0].as_ref()).await;
    let group = Uuid::new_v4();
    let placed = place_members(&stores, group, GroupPolicy::AntiAffinity).await;
    assert_eq!(placed.len(), MEMBERS);
    let used: BTreeSet<Uuid> = placed.values().copied().collect();
    assert_eq!(used.len(), MEMBERS, "two anti-affinity members share a host: {placed:?}");
    assert!(used.is_subset(&hosts));
    check_store(stores[0].as_ref(), group, &placed).await;

    // A member that leaves frees its host for the group.
    let (gone, _) = placed.iter().next().unwrap();
    assert!(groups::remove_member(stores[0].as_ref(), &group, gone).await.unwrap());
    assert!(!groups::remove_member(stores[0].as_ref(), &group, gone).await.unwrap());
    assert_eq!(groups::read(stores[0].as_ref(), &group).await.unwrap().members.members.len(), MEMBERS - 1);
}

async fn affinity(stores: Vec<Arc<dyn Store>>) {
    load_hosts(stores[0].as_ref()).await;
    let group = Uuid::new_v4();
    let placed = place_members(&stores, group, GroupPolicy::Affinity).await;
    assert_eq!(placed.len(), MEMBERS);
    let used: BTreeSet<Uuid> = placed.values().copied().collect();
    assert_eq!(used.len(), 1, "affinity members are spread over several hosts: {placed:?}");
    check_store(stores[0].as_ref(), group, &placed).await;
}

fn embedded() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_anti_affinity_members_never_share_a_host_embedded() {
    let (_dir, store) = embedded();
    anti_affinity(vec![store; SCHEDULERS]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_affinity_members_share_one_host_embedded() {
    let (_dir, store) = embedded();
    affinity(vec![store; SCHEDULERS]).await;
}

async fn etcd_stores(etcd: &store::testing::EtcdServer) -> Vec<Arc<dyn Store>> {
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..SCHEDULERS {
        stores.push(Arc::new(etcd.store().await.unwrap()));
    }
    stores
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_anti_affinity_members_never_share_a_host_etcd() {
    let Some(etcd) = store::testing::EtcdServer::start_or_skip() else { return };
    anti_affinity(etcd_stores(&etcd).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_affinity_members_share_one_host_etcd() {
    let Some(etcd) = store::testing::EtcdServer::start_or_skip() else { return };
    affinity(etcd_stores(&etcd).await).await;
}
