//! Each filter, seen from the outside: the host a request lands on (or the
//! "no valid host" answer) for hosts that differ in one respect.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use coordinator::placement::db::{self, Inventory, ProviderSpec, ProviderTree};
use coordinator::placement::traits::physnet_trait;
use coordinator::scheduler::{
    GroupPolicy, HostStatus, NumaNodeRequest, RequestSpec, ScheduleError, Scheduler, SchedulerConfig, ServerGroup, SriovRequest, Strategy,
};
use store::Store;
use uuid::Uuid;

fn inv(pairs: &[(&str, u64)]) -> BTreeMap<String, Inventory> {
    pairs.iter().map(|(c, n)| (c.to_string(), Inventory::new(*n))).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// host "big": 2 NUMA nodes of 8 PCPU + 1024 hugepages, a PF on physnet "data" with 4 VFs, AVX2.
/// host "small": 1 NUMA node of 2 PCPU, no hugepages, no PF, no AVX2.
async fn site() -> (tempfile::TempDir, Arc<dyn Store>, Uuid, Uuid) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    let big = Uuid::new_v4();
    let small = Uuid::new_v4();
    let numa = |host: &str, i: u32, pcpu: u64, pages: u64| {
        let mut inventories = inv(&[("PCPU", pcpu), ("MEMORY_MB", 16384)]);
        if pages > 0 {
            inventories.insert("CUSTOM_HUGEPAGES_2M".into(), Inventory::new(pages));
        }
        ProviderSpec { uuid: Uuid::new_v4(), name: format!("{host}_NUMA{i}"), inventories, traits: set(&["HW_NUMA_ROOT"]), children: vec![] }
    };
    let pf = ProviderSpec {
        uuid: Uuid::new_v4(),
        name: "big_PF0".into(),
        inventories: inv(&[("SRIOV_NET_VF", 4)]),
        traits: BTreeSet::from([physnet_trait("data"), "HW_NIC_SRIOV".to_string()]),
        children: vec![],
    };
    let trees = [
        ProviderTree {
            root: ProviderSpec {
                uuid: big,
                name: "big".into(),
                inventories: inv(&[("VCPU", 32), ("DISK_GB", 500)]),
                traits: set(&["HW_CPU_X86_AVX2"]),
                children: vec![numa("big", 0, 8, 1024), numa("big", 1, 8, 1024), pf],
            },
        },
        ProviderTree {
            root: ProviderSpec {
                uuid: small,
                name: "small".into(),
                inventories: inv(&[("VCPU", 64), ("DISK_GB", 1000)]),
                traits: set(&["COMPUTE_STATUS_DISABLED"]),
                children: vec![numa("small", 0, 2, 0)],
            },
        },
    ];
    for t in &trees {
        db::sync_provider_tree(store.as_ref(), t).await.unwrap();
    }
    (dir, store, big, small)
}

fn request(resources: &[(&str, u64)]) -> RequestSpec {
    RequestSpec {
        consumer: Uuid::new_v4(),
        project_id: "p".into(),
        user_id: "u".into(),
        resources: resources.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
        ..RequestSpec::default()
    }
}

async fn scheduler(store: &Arc<dyn Store>, down: Option<Uuid>, strategy: Strategy) -> Scheduler {
    let hosts = move |h: Uuid| Some(HostStatus { up: Some(h) != down, enabled: true, availability_zone: Some("az1".into()) });
    let config = SchedulerConfig { strategy, host_subset_size: 1, ..SchedulerConfig::default() };
    Scheduler::start(store.clone(), Arc::new(hosts), config).await.unwrap()
}

#[tokio::test]
async fn filters_pick_the_only_host_that_qualifies() {
    let (_dir, store, big, small) = site().await;
    let s = scheduler(&store, None, Strategy::Spread).await;

    // Spread: the host with more free VCPU and disk wins a plain request.
    assert_eq!(s.schedule(&request(&[("VCPU", 1), ("DISK_GB", 10)])).await.unwrap().host, small);

    // Required trait: only big has AVX2. Forbidden trait: small is marked disabled.
    let mut r = request(&[("VCPU", 1)]);
    r.required_traits = set(&["HW_CPU_X86_AVX2"]);
    assert_eq!(s.schedule(&r).await.unwrap().host, big);
    let mut r = request(&[("VCPU", 1)]);
    r.forbidden_traits = set(&["COMPUTE_STATUS_DISABLED"]);
    assert_eq!(s.schedule(&r).await.unwrap().host, big);

    // NUMA: two guest nodes of 4 dedicated CPUs and 512 hugepages each land on two different host nodes.
    let mut r = request(&[("DISK_GB", 20)]);
    let node = NumaNodeRequest { pcpus: 4, hugepages: BTreeMap::from([("CUSTOM_HUGEPAGES_2M".to_string(), 512)]), ..Default::default() };
    r.numa_nodes = vec![node.clone(), node.clone()];
    let sel = s.schedule(&r).await.unwrap();
    assert_eq!(sel.host, big);
    assert_eq!(sel.numa_nodes.len(), 2);
    assert_ne!(sel.numa_nodes[0], sel.numa_nodes[1]);
    for n in &sel.numa_nodes {
        assert_eq!(sel.allocations[n]["PCPU"], 4);
        assert_eq!(sel.allocations[n]["CUSTOM_HUGEPAGES_2M"], 512);
    }
    // Both nodes now have 4 PCPU and 512 pages left: a guest node of 6 PCPU fits nowhere.
    let mut r = request(&[]);
    r.numa_nodes = vec![NumaNodeRequest { pcpus: 6, ..Default::default() }];
    match s.schedule(&r).await {
        Err(ScheduleError::NoValidHost(msg)) => assert!(msg.contains("NUMATopologyFilter"), "{msg}"),
        other => panic!("expected no valid host, got {other:?}"),
    }

    // SR-IOV: 3 VFs on physnet "data", then 2 more do not fit; other physnets never do.
    let mut r = request(&[("VCPU", 1)]);
    r.sriov = vec![SriovRequest { physnet: "data".into(), count: 3 }];
    let sel = s.schedule(&r).await.unwrap();
    assert_eq!(sel.host, big);
    assert_eq!(sel.allocations[&sel.sriov_pfs[0]]["SRIOV_NET_VF"], 3);
    r.consumer = Uuid::new_v4();
    r.sriov[0].count = 2;
    assert!(matches!(s.schedule(&r).await, Err(ScheduleError::NoValidHost(_))));
    r.sriov[0] = SriovRequest { physnet: "other".into(), count: 1 };
    assert!(matches!(s.schedule(&r).await, Err(ScheduleError::NoValidHost(_))));

    // Availability zone.
    let mut r = request(&[("VCPU", 1)]);
    r.availability_zone = Some("az2".into());
    assert!(matches!(s.schedule(&r).await, Err(ScheduleError::NoValidHost(_))));
    r.availability_zone = Some("az1".into());
    assert!(s.schedule(&r).await.is_ok());

    // Server groups.
    let mut r = request(&[("VCPU", 1)]);
    r.server_group = Some(ServerGroup { id: Uuid::new_v4(), policy: GroupPolicy::AntiAffinity, member_hosts: BTreeSet::from([small]) });
    assert_eq!(s.schedule(&r).await.unwrap().host, big);
    let mut r = request(&[("VCPU", 1)]);
    r.server_group = Some(ServerGroup { id: Uuid::new_v4(), policy: GroupPolicy::Affinity, member_hosts: BTreeSet::from([big]) });
    assert_eq!(s.schedule(&r).await.unwrap().host, big);
    let mut r = request(&[("VCPU", 1)]);
    r.server_group = Some(ServerGroup { id: Uuid::new_v4(), policy: GroupPolicy::AntiAffinity, member_hosts: BTreeSet::from([small, big]) });
    assert!(matches!(s.schedule(&r).await, Err(ScheduleError::NoValidHost(_))));

    // What the scheduler claimed is in the store.
    let stored = db::get_tree(store.as_ref(), &big).await.unwrap();
    let pcpu: u64 = stored.iter().map(|p| p.value.used("PCPU")).sum();
    assert_eq!(pcpu, 8);
}

#[tokio::test]
async fn down_hosts_are_skipped_and_pack_fills_the_fullest_host() {
    let (_dir, store, big, small) = site().await;
    let s = scheduler(&store, Some(small), Strategy::Spread).await;
    assert_eq!(s.schedule(&request(&[("VCPU", 1)])).await.unwrap().host, big, "small is down");
    drop(s);
    let s = scheduler(&store, None, Strategy::Pack).await;
    // big now has 1 of 32 VCPU used and small 0 of 64: pack prefers the fuller one.
    assert_eq!(s.schedule(&request(&[("VCPU", 1)])).await.unwrap().host, big);
}

#[tokio::test]
async fn the_cache_follows_changes_made_elsewhere() {
    let (_dir, store, big, _small) = site().await;
    let s = scheduler(&store, None, Strategy::Spread).await;
    assert_eq!(s.cache().host_count(), 2);
    let extra = db::create_provider(store.as_ref(), None, "late", None).await.unwrap();
    db::update_provider(store.as_ref(), &extra.uuid, None, |p| {
        p.inventories.insert("CUSTOM_GPU".into(), Inventory::new(1));
        Ok(true)
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.cache().get(&extra.uuid).is_none_or(|p| p.value.inventories.is_empty()) {
        assert!(std::time::Instant::now() < deadline, "watch did not deliver the new provider");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(s.schedule(&request(&[("CUSTOM_GPU", 1)])).await.unwrap().host, extra.uuid);
    assert!(s.cache().get(&big).is_some());
}
