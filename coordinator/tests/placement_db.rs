//! Placement's storage layer against the embedded store: trees, inventories,
//! allocations, generations and the refusal to shrink below usage.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use coordinator::placement::db::{self, ConsumerAllocations, ConsumerGeneration, DbError, Inventory, ProviderSpec, ProviderTree};
use store::embedded::EmbeddedStore;
use store::Store;
use uuid::Uuid;

fn open() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
    (dir, Arc::new(store))
}

fn host_tree(name: &str, vcpus: u64) -> ProviderTree {
    let root = Uuid::new_v4();
    let numa = |i: u32| ProviderSpec {
        uuid: Uuid::new_v4(),
        name: format!("{name}_NUMA{i}"),
        inventories: BTreeMap::from([
            ("PCPU".to_string(), Inventory::new(4)),
            ("MEMORY_MB".to_string(), Inventory::new(8192)),
            ("CUSTOM_HUGEPAGES_2M".to_string(), Inventory::new(512)),
        ]),
        traits: BTreeSet::from(["HW_NUMA_ROOT".to_string()]),
        children: vec![],
    };
    ProviderTree {
        root: ProviderSpec {
            uuid: root,
            name: name.into(),
            inventories: BTreeMap::from([
                ("VCPU".to_string(), Inventory::new(vcpus)),
                ("DISK_GB".to_string(), Inventory::new(100)),
            ]),
            traits: BTreeSet::from(["HW_CPU_X86_AVX2".to_string(), "HW_CPU_X86_NEWFLAG".to_string()]),
            children: vec![numa(0), numa(1)],
        },
    }
}

fn alloc(consumer: Uuid, rp: Uuid, class: &str, n: u64, generation: ConsumerGeneration) -> ConsumerAllocations {
    ConsumerAllocations {
        consumer,
        project_id: "p".into(),
        user_id: "u".into(),
        consumer_type: None,
        generation,
        allocations: BTreeMap::from([(rp, BTreeMap::from([(class.to_string(), n)]))]),
    }
}

#[tokio::test]
async fn sync_provider_tree_is_idempotent_and_refuses_to_shrink_below_usage() {
    let (_dir, store) = open();
    let s = store.as_ref();
    let mut tree = host_tree("host1", 8);
    let r = db::sync_provider_tree(s, &tree).await.unwrap();
    assert_eq!((r.created, r.updated, r.deleted), (3, 0, 0));
    let r = db::sync_provider_tree(s, &tree).await.unwrap();
    assert_eq!((r.created, r.updated, r.unchanged), (0, 0, 3));
    let root = tree.root.uuid;
    let stored = db::get_tree(s, &root).await.unwrap();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[1].value.root, root);
    assert!(db::trait_exists(s, "HW_CPU_X86_NEWFLAG").await.unwrap(), "host-reported trait registered");
    assert!(db::resource_class_exists(s, "CUSTOM_HUGEPAGES_2M").await.unwrap(), "custom class registered");

    let c = Uuid::new_v4();
    db::replace_allocations(s, &[alloc(c, root, "VCPU", 6, ConsumerGeneration::New)]).await.unwrap();
    tree.root.inventories.insert("VCPU".into(), Inventory::new(4));
    match db::sync_provider_tree(s, &tree).await {
        Err(DbError::InventoryInUse { used: 6, capacity: 4, .. }) => {}
        other => panic!("expected InventoryInUse, got {other:?}"),
    }
    assert_eq!(db::must_get_provider(s, &root).await.unwrap().value.inventories["VCPU"].total, 8, "nothing written");

    // Growing is fine and keeps the allocation; dropping a NUMA child deletes it.
    tree.root.inventories.insert("VCPU".into(), Inventory::new(16));
    let gone = tree.root.children.pop().unwrap();
    let r = db::sync_provider_tree(s, &tree).await.unwrap();
    assert_eq!((r.updated, r.deleted), (1, 1));
    let p = db::must_get_provider(s, &root).await.unwrap().value;
    assert_eq!(p.used("VCPU"), 6);
    assert_eq!(p.children.len(), 1);
    assert!(db::get_provider(s, &gone.uuid).await.unwrap().is_none());
    assert!(db::provider_by_name(s, &gone.name).await.unwrap().is_none());

    // Bad class names never reach the store.
    tree.root.inventories.insert("CUSTOM_bad".into(), Inventory::new(1));
    assert!(matches!(db::sync_provider_tree(s, &tree).await, Err(DbError::InvalidResourceClass(_))));
}

#[tokio::test]
async fn allocations_check_capacity_units_and_generations() {
    let (_dir, store) = open();
    let s = store.as_ref();
    let tree = host_tree("host1", 4);
    db::sync_provider_tree(s, &tree).await.unwrap();
    let root = tree.root.uuid;
    db::update_provider(s, &root, None, |p| {
        p.inventories.get_mut("VCPU").unwrap().allocation_ratio = 2.0;
        p.inventories.get_mut("DISK_GB").unwrap().step_size = 10;
        Ok(true)
    })
    .await
    .unwrap();

    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    db::replace_allocations(s, &[alloc(a, root, "VCPU", 4, ConsumerGeneration::New)]).await.unwrap();
    db::replace_allocations(s, &[alloc(b, root, "VCPU", 4, ConsumerGeneration::New)]).await.unwrap();
    assert!(matches!(
        db::replace_allocations(s, &[alloc(Uuid::new_v4(), root, "VCPU", 1, ConsumerGeneration::New)]).await,
        Err(DbError::Capacity { capacity: 8, .. })
    ));
    assert!(matches!(
        db::replace_allocations(s, &[alloc(Uuid::new_v4(), root, "DISK_GB", 15, ConsumerGeneration::New)]).await,
        Err(DbError::BadAmount { .. })
    ));
    // A second "new" write for an existing consumer is a generation conflict.
    assert!(matches!(
        db::replace_allocations(s, &[alloc(a, root, "VCPU", 2, ConsumerGeneration::New)]).await,
        Err(DbError::ConsumerGeneration { .. })
    ));
    let ca = db::get_consumer(s, &a).await.unwrap().unwrap().value;
    db::replace_allocations(s, &[alloc(a, root, "VCPU", 2, ConsumerGeneration::Is(ca.generation))]).await.unwrap();
    assert_eq!(db::must_get_provider(s, &root).await.unwrap().value.used("VCPU"), 6);

    // The provider's generation moves with allocations, and a stale one is refused.
    let p = db::must_get_provider(s, &root).await.unwrap().value;
    let stale = p.generation - 1;
    assert!(matches!(db::update_provider(s, &root, Some(stale), |_| Ok(true)).await, Err(DbError::ProviderGeneration(_))));
    assert!(matches!(db::delete_provider(s, &root).await, Err(DbError::ProviderHasChildren(_))));
    db::delete_allocations(s, &a).await.unwrap();
    db::delete_allocations(s, &b).await.unwrap();
    assert_eq!(db::must_get_provider(s, &root).await.unwrap().value.used("VCPU"), 0);
    assert!(db::get_consumer(s, &a).await.unwrap().is_none());
}

#[tokio::test]
async fn providers_have_unique_names_and_delete_leaves_nothing_behind() {
    let (_dir, store) = open();
    let s = store.as_ref();
    let root = db::create_provider(s, None, "r1", None).await.unwrap();
    let child = db::create_provider(s, None, "c1", Some(root.uuid)).await.unwrap();
    assert_eq!(child.root, root.uuid);
    assert!(matches!(db::create_provider(s, None, "r1", None).await, Err(DbError::DuplicateName(_))));
    assert!(matches!(db::create_provider(s, Some(root.uuid), "r2", None).await, Err(DbError::DuplicateUuid(_))));
    let renamed = db::rename_provider(s, &child.uuid, "c1-renamed", None).await.unwrap();
    assert_eq!(renamed.name, "c1-renamed");
    assert!(db::provider_by_name(s, "c1").await.unwrap().is_none());
    db::delete_provider(s, &child.uuid).await.unwrap();
    assert!(db::must_get_provider(s, &root.uuid).await.unwrap().value.children.is_empty());
    db::delete_provider(s, &root.uuid).await.unwrap();
    assert!(store.range("/placement/rp").await.unwrap().kvs.is_empty(), "no provider or name records left");
}

#[tokio::test]
async fn provider_allocations_are_indexed_and_schema_1_records_are_moved_on_write() {
    let (_dir, store) = open();
    let s = store.as_ref();
    let tree = host_tree("host1", 8);
    db::sync_provider_tree(s, &tree).await.unwrap();
    let root = tree.root.uuid;

    // Schema 1 kept each consumer's allocations inside the provider record.
    let old = Uuid::new_v4();
    let mut v1 = serde_json::to_value(db::must_get_provider(s, &root).await.unwrap().value).unwrap();
    let m = v1.as_object_mut().unwrap();
    m.remove("usage");
    m.remove("consumers");
    m.insert("allocations".into(), serde_json::json!({ old.to_string(): {"VCPU": 3, "DISK_GB": 10} }));
    m.insert("v".into(), 1.into());
    store.put(&db::rp_key(&root), serde_json::to_vec(&v1).unwrap()).await.unwrap();
    let consumer = db::Consumer {
        uuid: old,
        project_id: "p".into(),
        user_id: "u".into(),
        consumer_type: None,
        generation: 1,
        allocations: BTreeMap::from([(root, BTreeMap::from([("VCPU".to_string(), 3), ("DISK_GB".to_string(), 10)]))]),
    };
    store.put(&db::consumer_key(&old), store::record::encode(&consumer)).await.unwrap();

    let p = db::must_get_provider(s, &root).await.unwrap().value;
    assert_eq!((p.used("VCPU"), p.used("DISK_GB"), p.consumers), (3, 10, 1), "totals summed from a schema-1 record");
    assert_eq!(db::provider_allocations(s, &p).await.unwrap()[&old]["VCPU"], 3);

    // A new consumer's write moves the old one's share to the index as well.
    let new = Uuid::new_v4();
    db::replace_allocations(s, &[alloc(new, root, "VCPU", 2, ConsumerGeneration::New)]).await.unwrap();
    let raw = store.get(&db::rp_key(&root)).await.unwrap().unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&raw.value).unwrap();
    assert_eq!(stored["v"], 2);
    assert!(stored.get("allocations").is_none(), "no per-consumer allocations in the provider record: {stored}");
    assert_eq!(stored["usage"]["VCPU"], 5);
    assert_eq!(store.range(&format!("{}{root}/", db::ALLOC_PREFIX)).await.unwrap().kvs.len(), 2);
    let p = db::must_get_provider(s, &root).await.unwrap().value;
    let by_consumer = db::provider_allocations(s, &p).await.unwrap();
    assert_eq!(by_consumer.len(), 2);
    assert_eq!(by_consumer[&old], BTreeMap::from([("VCPU".to_string(), 3), ("DISK_GB".to_string(), 10)]));
    assert_eq!(by_consumer[&new], BTreeMap::from([("VCPU".to_string(), 2)]));

    // Removing allocations removes their index entries and lowers the totals.
    db::delete_allocations(s, &old).await.unwrap();
    let p = db::must_get_provider(s, &root).await.unwrap().value;
    assert_eq!((p.used("VCPU"), p.used("DISK_GB"), p.consumers), (2, 0, 1));
    assert_eq!(db::provider_allocations(s, &p).await.unwrap().keys().collect::<Vec<_>>(), vec![&new]);
    db::delete_allocations(s, &new).await.unwrap();
    let p = db::must_get_provider(s, &root).await.unwrap().value;
    assert!(!p.has_allocations());
    assert!(store.range(db::ALLOC_PREFIX).await.unwrap().kvs.is_empty());
}

#[test]
fn records_encoded_in_one_pass_read_back_like_any_record() {
    let c = db::Consumer {
        uuid: Uuid::new_v4(),
        project_id: "p".into(),
        user_id: "u".into(),
        consumer_type: Some("INSTANCE".into()),
        generation: 3,
        allocations: BTreeMap::from([(Uuid::new_v4(), BTreeMap::from([("VCPU".to_string(), 2)]))]),
    };
    let fast = db::encode_record(&c);
    assert_eq!(store::record::decode::<db::Consumer>("k", &fast).unwrap(), c);
    let as_json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
    assert_eq!(as_json(&fast), as_json(&store::record::encode(&c)), "same record, same schema version");
}
