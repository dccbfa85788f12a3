//! Host enrolment and the agent API, end to end over HTTP against an in-process
//! replica on the embedded store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::testing::TestSite;
use model::agent_api::HostCredential;
use model::inventory::{DiskPool, HostInventory, HugepagePool, NumaNode, SriovPf};
use serde_json::{json, Value};
use store::embedded::EmbeddedStore;

async fn site(dir: &tempfile::TempDir, ttl: i64) -> TestSite {
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    TestSite::start(store, |c| c.hosts.heartbeat_ttl_secs = ttl).await
}

/// Sends an agent API call with a host credential (or a raw Authorization value).
async fn agent(s: &TestSite, method: &str, path: &str, auth: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method.parse().unwrap(), format!("{}/agent/v1{}", s.url, path));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null))
}

async fn join_token(s: &TestSite, admin: &str, host: Option<&str>) -> String {
    let (code, v) = s.call("POST", "/edge/v1/join-tokens", Some(admin), Some(json!({"host": host}))).await;
    assert_eq!(code, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

async fn enrol(s: &TestSite, token: &str, hostname: &str) -> HostCredential {
    let (code, v) = agent(s, "POST", "/enrol", None, Some(json!({"join_token": token, "hostname": hostname}))).await;
    assert_eq!(code, 201, "{v}");
    HostCredential { host_id: v["host_id"].as_str().unwrap().into(), secret: v["secret"].as_str().unwrap().into() }
}

fn inventory(hostname: &str) -> HostInventory {
    HostInventory {
        hostname: hostname.into(),
        numa_nodes: vec![
            NumaNode { id: 0, cpus: vec![0, 1], memory_mb: 2048, hugepages: vec![HugepagePool { size_kb: 2048, total: 64, free: 64 }] },
            NumaNode { id: 1, cpus: vec![2, 3], memory_mb: 2048, hugepages: vec![] },
        ],
        memory_mb: 4096,
        hugepages: vec![HugepagePool { size_kb: 2048, total: 64, free: 64 }],
        instance_pool: Some(DiskPool { path: "/srv".into(), total_gb: 50, free_gb: 40 }),
        cpu_traits: vec!["HW_CPU_X86_AVX2".into(), "HW_CPU_X86_SSE42".into()],
        cpu_model: None,
        host_ip: None,
        sriov_pfs: vec![SriovPf {
            interface: "ens1f0".into(),
            pci_address: "0000:03:00.0".into(),
            numa_node: Some(0),
            total_vfs: 8,
            num_vfs: 4,
            physnet: Some("physnet1".into()),
            vfs: vec![],
        }],
    }
}

#[tokio::test]
async fn join_token_works_once_and_the_credential_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, 10).await;
    let admin = s.admin_token().await;

    // Only an authenticated admin may create join tokens.
    let (code, _) = s.call("POST", "/edge/v1/join-tokens", None, Some(json!({}))).await;
    assert_eq!(code, 401);
    let (code, v) = s.call("POST", "/edge/v1/join-tokens", Some(&admin), Some(json!({"ttl_secs": 0}))).await;
    assert_eq!(code, 400, "{v}");

    let token = join_token(&s, &admin, None).await;
    let cred = enrol(&s, &token, "edge-1").await;

    // A second use of the same token is refused, with a message that says why.
    let (code, v) = agent(&s, "POST", "/enrol", None, Some(json!({"join_token": token, "hostname": "edge-2"}))).await;
    assert_eq!(code, 409, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("already used"), "{v}");
    // An unknown token, and a malformed request.
    let (code, _) = agent(&s, "POST", "/enrol", None, Some(json!({"join_token": "nope", "hostname": "edge-2"}))).await;
    assert_eq!(code, 401);
    let (code, _) = agent(&s, "POST", "/enrol", None, Some(json!({"join_token": token}))).await;
    assert_eq!(code, 400);
    // A second host may not take an enrolled name with an unrestricted token.
    let t2 = join_token(&s, &admin, None).await;
    let (code, v) = agent(&s, "POST", "/enrol", None, Some(json!({"join_token": t2, "hostname": "edge-1"}))).await;
    assert_eq!(code, 409, "{v}");

    // The credential: missing, wrong secret, right secret.
    let path = format!("/hosts/{}/heartbeat", cred.host_id);
    let (code, _) = agent(&s, "POST", &path, None, None).await;
    assert_eq!(code, 401);
    let wrong = HostCredential { host_id: cred.host_id.clone(), secret: "0".repeat(64) };
    let (code, _) = agent(&s, "POST", &path, Some(&wrong.authorization()), None).await;
    assert_eq!(code, 401);
    let (code, v) = agent(&s, "POST", &path, Some(&cred.authorization()), None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["renewed"], true);
    let (code, v) = agent(&s, "POST", &path, Some(&cred.authorization()), None).await;
    assert_eq!(code, 200);
    assert_eq!(v["renewed"], false, "a live lease is kept alive, not replaced");

    // Only the hash of the secret is stored.
    let stored = s.state.store.range("/hosts/").await.unwrap();
    for kv in &stored.kvs {
        let text = String::from_utf8_lossy(&kv.value);
        assert!(!text.contains(&cred.secret) && !text.contains(&token), "secret in clear at {}", kv.key);
    }
}

#[tokio::test]
async fn a_host_cannot_read_or_write_another_hosts_records() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, 10).await;
    let admin = s.admin_token().await;
    let a = enrol(&s, &join_token(&s, &admin, None).await, "host-a").await;
    let b = enrol(&s, &join_token(&s, &admin, None).await, "host-b").await;
    let auth_a = a.authorization();

    // Host B writes something of its own; A must not see or change it.
    let (code, _) = agent(&s, "PUT", &format!("/hosts/{}/observed/vm/web", b.host_id), Some(&b.authorization()), Some(json!({"status": {"running": true}}))).await;
    assert_eq!(code, 200);
    s.state.store.put(&format!("/hosts/{}/desired/vm/web", b.host_id), br#"{"v":1,"image":"x"}"#.to_vec()).await.unwrap();

    let other = &b.host_id;
    let attempts: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", format!("/hosts/{other}"), None),
        ("POST", format!("/hosts/{other}/heartbeat"), None),
        ("PUT", format!("/hosts/{other}/inventory"), Some(json!({"inventory": inventory("host-b")}))),
        ("GET", format!("/hosts/{other}/inventory"), None),
        ("GET", format!("/hosts/{other}/desired"), None),
        ("GET", format!("/hosts/{other}/observed"), None),
        ("GET", format!("/hosts/{other}/observed/vm/web"), None),
        ("PUT", format!("/hosts/{other}/observed/vm/web"), Some(json!({"status": {"running": false}}))),
        ("DELETE", format!("/hosts/{other}/observed/vm/web"), None),
    ];
    for (method, path, body) in attempts {
        let (code, v) = agent(&s, method, &path, Some(&auth_a), body).await;
        assert_eq!(code, 403, "{method} {path}: {v}");
    }
    // B's records are untouched, and A can use its own paths.
    let (code, v) = agent(&s, "GET", &format!("/hosts/{}/observed/vm/web", b.host_id), Some(&b.authorization()), None).await;
    assert_eq!(code, 200);
    assert_eq!(v["status"]["running"], true);
    assert!(s.state.store.get(&format!("/hosts/alive/{}", b.host_id)).await.unwrap().is_none(), "A could not heartbeat for B");
    let (code, v) = agent(&s, "GET", &format!("/hosts/{}/desired", b.host_id), Some(&b.authorization()), None).await;
    assert_eq!(code, 200);
    assert_eq!(v["records"][0]["name"], "web");
    let (code, v) = agent(&s, "GET", &format!("/hosts/{}", a.host_id), Some(&auth_a), None).await;
    assert_eq!(code, 200);
    assert_eq!(v["host"]["hostname"], "host-a");
    // A host's credential is no admin token, and an admin token is no host credential.
    let (code, _) = s.call("GET", "/edge/v1/hosts", None, None).await;
    assert_eq!(code, 401);
    let (code, _) = agent(&s, "GET", &format!("/hosts/{}", a.host_id), Some(&format!("Bearer {admin}")), None).await;
    assert_eq!(code, 401);
}

#[tokio::test]
async fn inventory_becomes_a_provider_tree() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, 10).await;
    let admin = s.admin_token().await;
    let h = enrol(&s, &join_token(&s, &admin, None).await, "edge-1").await;
    let path = format!("/hosts/{}/inventory", h.host_id);

    let mut bad = inventory("edge-1");
    bad.sriov_pfs[0].num_vfs = 99;
    let (code, v) = agent(&s, "PUT", &path, Some(&h.authorization()), Some(json!({"inventory": bad}))).await;
    assert_eq!(code, 400, "{v}");

    let (code, v) = agent(&s, "PUT", &path, Some(&h.authorization()), Some(json!({"inventory": inventory("edge-1")}))).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["providers"].as_array().unwrap().len(), 4, "{v}");

    let root: uuid::Uuid = h.host_id.parse().unwrap();
    let tree = coordinator::placement::db::get_tree(s.state.store.as_ref(), &root).await.unwrap();
    let by_name = |n: &str| tree.iter().find(|p| p.value.name == n).unwrap_or_else(|| panic!("no provider {n}")).value.clone();
    let host = by_name("edge-1");
    assert_eq!(host.inventories["VCPU"].total, 4);
    assert_eq!(host.inventories["MEMORY_MB"].total, 4096 - 128);
    assert_eq!(host.inventories["DISK_GB"].total, 40);
    assert!(host.traits.contains("HW_CPU_X86_AVX2"));
    let numa0 = by_name("edge-1_NUMA0");
    assert_eq!(numa0.inventories["PCPU"].total, 2);
    assert_eq!(numa0.inventories["CUSTOM_HUGEPAGES_2M"].total, 64);
    let pf = by_name("edge-1_PF_ens1f0");
    assert_eq!(pf.inventories["SRIOV_NET_VF"].total, 4);
    assert!(pf.traits.contains("CUSTOM_PHYSNET_PHYSNET1"));

    // A re-report with a PF gone drops its provider; the inventory reads back.
    let mut smaller = inventory("edge-1");
    smaller.sriov_pfs.clear();
    let (code, _) = agent(&s, "PUT", &path, Some(&h.authorization()), Some(json!({"inventory": smaller}))).await;
    assert_eq!(code, 200);
    let tree = coordinator::placement::db::get_tree(s.state.store.as_ref(), &root).await.unwrap();
    assert_eq!(tree.len(), 3);
    let (code, v) = agent(&s, "GET", &path, Some(&h.authorization()), None).await;
    assert_eq!(code, 200);
    assert_eq!(v["inventory"]["sriov_pfs"], json!([]));

    // Disabling the host marks its root provider as Nova does.
    let (code, v) = s
        .call("PUT", &format!("/edge/v1/hosts/{}", h.host_id), Some(&admin), Some(json!({"enabled": false, "disabled_reason": "maintenance"})))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["host"]["disabled_reason"], "maintenance");
    let root_rp = coordinator::placement::db::get_provider(s.state.store.as_ref(), &root).await.unwrap().unwrap();
    assert!(root_rp.value.traits.contains("COMPUTE_STATUS_DISABLED"));

    // Deleting the host removes its providers, records and credential.
    let (code, _) = agent(&s, "POST", &format!("/hosts/{}/heartbeat", h.host_id), Some(&h.authorization()), None).await;
    assert_eq!(code, 200);
    let (code, v) = s.call("DELETE", &format!("/edge/v1/hosts/{}", h.host_id), Some(&admin), None).await;
    assert_eq!(code, 204, "{v}");
    assert!(coordinator::placement::db::get_tree(s.state.store.as_ref(), &root).await.unwrap().is_empty());
    let left = s.state.store.range("/hosts/").await.unwrap();
    assert!(left.kvs.iter().all(|kv| !kv.key.contains(&h.host_id) && !kv.key.starts_with("/hosts/names/")), "{:?}", left.kvs.iter().map(|k| &k.key).collect::<Vec<_>>());
    let (code, _) = agent(&s, "GET", &format!("/hosts/{}", h.host_id), Some(&h.authorization()), None).await;
    assert_eq!(code, 401);
    let (code, _) = s.call("DELETE", &format!("/edge/v1/hosts/{}", h.host_id), Some(&admin), None).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn an_expired_lease_shows_the_host_down_and_a_heartbeat_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let ttl = 2;
    let s = site(&dir, ttl).await;
    let admin = s.admin_token().await;
    let h = enrol(&s, &join_token(&s, &admin, None).await, "edge-1").await;
    let show = format!("/edge/v1/hosts/{}", h.host_id);
    let (_, v) = s.call("GET", &show, Some(&admin), None).await;
    assert_eq!(v["host"]["state"], "down", "no heartbeat yet: {v}");

    let beat = format!("/hosts/{}/heartbeat", h.host_id);
    let (code, _) = agent(&s, "POST", &beat, Some(&h.authorization()), None).await;
    assert_eq!(code, 200);
    let (_, v) = s.call("GET", &show, Some(&admin), None).await;
    assert_eq!(v["host"]["state"], "up");

    // Stop heartbeating: the host is down within the TTL (plus the store's expiry tick).
    let stopped = Instant::now();
    loop {
        let (_, v) = s.call("GET", &show, Some(&admin), None).await;
        if v["host"]["state"] == "down" {
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(ttl as u64) + Duration::from_millis(1500), "still up after {:?}", stopped.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The monitor (leader of its election) records the transitions with times.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = s.call("GET", &show, Some(&admin), None).await;
        let kv = s.state.store.get(&format!("/hosts/records/{}", h.host_id)).await.unwrap().unwrap();
        let rec: Value = serde_json::from_slice(&kv.value).unwrap();
        let states: Vec<&str> = rec["transitions"].as_array().unwrap().iter().map(|t| t["state"].as_str().unwrap()).collect();
        if states == ["up", "down"] {
            assert!(v["host"]["state_changed_at"].is_string());
            break;
        }
        assert!(Instant::now() < deadline, "monitor recorded {states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (code, v) = agent(&s, "POST", &beat, Some(&h.authorization()), None).await;
    assert_eq!(code, 200);
    assert_eq!(v["renewed"], true);
    let (_, v) = s.call("GET", &show, Some(&admin), None).await;
    assert_eq!(v["host"]["state"], "up");
}

#[tokio::test]
async fn desired_state_long_poll_wakes_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, 10).await;
    let admin = s.admin_token().await;
    let h = enrol(&s, &join_token(&s, &admin, None).await, "edge-1").await;
    let path = format!("/hosts/{}/desired", h.host_id);
    let (code, v) = agent(&s, "GET", &path, Some(&h.authorization()), None).await;
    assert_eq!(code, 200);
    assert_eq!(v["records"], json!([]));
    let rev = v["revision"].as_i64().unwrap();

    // Nothing changes: the poll times out and says so.
    let started = Instant::now();
    let (code, v) = agent(&s, "GET", &format!("{path}?after={rev}&timeout=1"), Some(&h.authorization()), None).await;
    assert_eq!(code, 200);
    assert_eq!(v["changed"], false);
    assert_eq!(v["revision"], rev);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A write to another host's desired state does not wake this host; one to its own does.
    let other = uuid::Uuid::new_v4();
    let store = s.state.store.clone();
    let own_key = format!("/hosts/{}/desired/vm/db", h.host_id);
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.put(&format!("/hosts/{other}/desired/vm/x"), br#"{"v":1}"#.to_vec()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.put(&own_key, br#"{"v":1,"vcpus":2}"#.to_vec()).await.unwrap()
    });
    let (code, v) = agent(&s, "GET", &format!("{path}?after={rev}&timeout=20"), Some(&h.authorization()), None).await;
    let written = writer.await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(v["changed"], true);
    assert!(v["revision"].as_i64().unwrap() >= written);
    assert_eq!(v["records"][0]["kind"], "vm");
    assert_eq!(v["records"][0]["name"], "db");
    assert_eq!(v["records"][0]["spec"]["vcpus"], 2);

    let (code, _) = agent(&s, "GET", &format!("{path}?after=-1"), Some(&h.authorization()), None).await;
    assert_eq!(code, 400);
    let (code, _) = agent(&s, "PUT", &format!("/hosts/{}/observed/vm/a%2Fb", h.host_id), Some(&h.authorization()), Some(json!({"status": 1}))).await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn a_host_bound_token_re_enrols_the_same_host_with_a_new_secret() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, 10).await;
    let admin = s.admin_token().await;
    let first = enrol(&s, &join_token(&s, &admin, None).await, "edge-1").await;
    let bound = join_token(&s, &admin, Some("edge-1")).await;
    let (code, v) = agent(&s, "POST", "/enrol", None, Some(json!({"join_token": bound, "hostname": "edge-9"}))).await;
    assert_eq!(code, 403, "{v}");
    let again = enrol(&s, &bound, "edge-1").await;
    assert_eq!(again.host_id, first.host_id);
    assert_ne!(again.secret, first.secret);
    let path = format!("/hosts/{}", first.host_id);
    let (code, _) = agent(&s, "GET", &path, Some(&first.authorization()), None).await;
    assert_eq!(code, 401, "the old secret no longer works");
    let (code, _) = agent(&s, "GET", &path, Some(&again.authorization()), None).await;
    assert_eq!(code, 200);

    // The CLI's path creates tokens the same way.
    let t = coordinator::hosts::create_join_token(s.state.store.as_ref(), 60, None).await.unwrap();
    enrol(&s, &t, "edge-2").await;
    let (code, v) = s.call("GET", "/edge/v1/hosts", Some(&admin), None).await;
    assert_eq!(code, 200);
    let names: Vec<&str> = v["hosts"].as_array().unwrap().iter().map(|h| h["hostname"].as_str().unwrap()).collect();
    assert_eq!(names, ["edge-1", "edge-2"]);
}

#[tokio::test]
async fn the_scheduler_directory_follows_enrolment_heartbeats_and_disabling() {
    use coordinator::scheduler::HostDirectory;
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, 2).await;
    let admin = s.admin_token().await;
    let cache = coordinator::hosts::directory::HostCache::start(s.state.store.clone()).await.unwrap();
    let h = enrol(&s, &join_token(&s, &admin, None).await, "edge-1").await;
    let id: uuid::Uuid = h.host_id.parse().unwrap();
    let wait = |want: Option<(bool, bool)>| {
        let cache = cache.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let got = cache.status(id).map(|st| (st.up, st.enabled));
                if got == want {
                    return;
                }
                assert!(Instant::now() < deadline, "directory says {got:?}, want {want:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait(Some((false, true))).await;
    assert_eq!(cache.status(id).unwrap().availability_zone.as_deref(), Some("nova"));
    let (code, _) = agent(&s, "POST", &format!("/hosts/{}/heartbeat", h.host_id), Some(&h.authorization()), None).await;
    assert_eq!(code, 200);
    wait(Some((true, true))).await;
    let (code, _) = s.call("PUT", &format!("/edge/v1/hosts/{}", h.host_id), Some(&admin), Some(json!({"enabled": false, "disabled_reason": "x"}))).await;
    assert_eq!(code, 200);
    wait(Some((true, false))).await;
    // The lease runs out: down.
    wait(Some((false, false))).await;
    assert!(cache.status(uuid::Uuid::new_v4()).is_none());
    assert_eq!(cache.len(), 1);
}

/// Waits until the replica's host cache accepts `cred` on the fast path.
async fn cached(s: &TestSite, cred: &HostCredential) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.state.hosts.verify(&cred.host_id, &cred.secret).is_none() {
        assert!(Instant::now() < deadline, "the host cache never learned host {}", cred.host_id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn heartbeats_use_the_cache_and_a_removed_credential_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, 10).await;
    let admin = s.admin_token().await;
    let first = enrol(&s, &join_token(&s, &admin, Some("edge-1")).await, "edge-1").await;
    let beat = format!("/hosts/{}/heartbeat", first.host_id);
    let (code, v) = agent(&s, "POST", &beat, Some(&first.authorization()), None).await;
    assert_eq!((code, &v["renewed"]), (200, &json!(true)), "{v}");
    cached(&s, &first).await;
    let (code, v) = agent(&s, "POST", &beat, Some(&first.authorization()), None).await;
    assert_eq!((code, &v["renewed"]), (200, &json!(false)), "{v}");
    // Even on the fast path a host reaches only its own heartbeat, and a wrong secret is refused.
    let other = enrol(&s, &join_token(&s, &admin, None).await, "edge-2").await;
    let (code, _) = agent(&s, "POST", &format!("/hosts/{}/heartbeat", other.host_id), Some(&first.authorization()), None).await;
    assert_eq!(code, 403);
    let wrong = HostCredential { host_id: first.host_id.clone(), secret: "0".repeat(64) };
    let (code, _) = agent(&s, "POST", &beat, Some(&wrong.authorization()), None).await;
    assert_eq!(code, 401);

    // Re-enrolment: the old secret fails as soon as the enrolment returned, although the
    // cache held it with a live lease a moment ago.
    let again = enrol(&s, &join_token(&s, &admin, Some("edge-1")).await, "edge-1").await;
    let (code, _) = agent(&s, "POST", &beat, Some(&first.authorization()), None).await;
    assert_eq!(code, 401, "the old secret still heartbeats");
    let (code, v) = agent(&s, "POST", &beat, Some(&again.authorization()), None).await;
    assert_eq!((code, &v["renewed"]), (200, &json!(true)), "{v}");
    cached(&s, &again).await;

    // Deletion: refused as soon as the delete returned.
    let (code, _) = s.call("DELETE", &format!("/edge/v1/hosts/{}", again.host_id), Some(&admin), None).await;
    assert_eq!(code, 204);
    let (code, _) = agent(&s, "POST", &beat, Some(&again.authorization()), None).await;
    assert_eq!(code, 401, "a deleted host still heartbeats");
    assert!(s.state.store.get(&format!("/hosts/alive/{}", again.host_id)).await.unwrap().is_none());
}

#[tokio::test]
async fn the_desired_state_long_poll_ends_when_the_replica_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir, 10).await;
    let admin = s.admin_token().await;
    let h = enrol(&s, &join_token(&s, &admin, None).await, "edge-1").await;
    let path = format!("/hosts/{}/desired", h.host_id);
    let (_, v) = agent(&s, "GET", &path, Some(&h.authorization()), None).await;
    let rev = v["revision"].as_i64().unwrap();
    let poll = {
        let (url, auth) = (s.url.clone(), h.authorization());
        let path = format!("{path}?after={rev}&timeout=50");
        tokio::spawn(async move {
            let r = reqwest::Client::new().get(format!("{url}/agent/v1{path}")).header("authorization", auth).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap(), Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!poll.is_finished(), "the poll waits while nothing changes");
    let stopped = Instant::now();
    s.state.shutdown.send_replace(true);
    let (code, v, at) = tokio::time::timeout(Duration::from_secs(5), poll).await.expect("the poll ended on shutdown").unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["changed"], false);
    assert_eq!(v["revision"], rev);
    println!("long poll answered {:?} after shutdown", at.duration_since(stopped));
}
