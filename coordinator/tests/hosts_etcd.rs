//! Hosts on etcd with two coordinator replicas: enrolment on one, heartbeats on
//! either (one lease per host between them), the host down on both when the lease
//! runs out, and one elected monitor recording the history once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::hosts::registry;
use coordinator::testing::TestSite;
use model::agent_api::HostCredential;
use serde_json::{json, Value};
use store::testing::EtcdServer;

async fn agent(url: &str, method: &str, path: &str, cred: Option<&HostCredential>, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method.parse().unwrap(), format!("{url}/agent/v1{path}"));
    if let Some(c) = cred {
        req = req.header("authorization", c.authorization());
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_etcd_share_heartbeats_and_one_monitor_records_history() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let ttl = 2;
    let s1 = TestSite::start(Arc::new(etcd.store().await.unwrap()), |c| c.hosts.heartbeat_ttl_secs = ttl).await;
    let s2 = TestSite::start(Arc::new(etcd.store().await.unwrap()), |c| c.hosts.heartbeat_ttl_secs = ttl).await;
    let store = s1.state.store.clone();

    // Enrol through replica 1, with a token created through replica 2.
    let admin = s2.admin_token().await;
    let (code, v) = s2.call("POST", "/edge/v1/join-tokens", Some(&admin), Some(json!({}))).await;
    assert_eq!(code, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let (code, v) = agent(&s1.url, "POST", "/enrol", None, Some(json!({"join_token": token, "hostname": "edge-1"}))).await;
    assert_eq!(code, 201, "{v}");
    let cred = HostCredential { host_id: v["host_id"].as_str().unwrap().into(), secret: v["secret"].as_str().unwrap().into() };
    let (code, v) = agent(&s2.url, "POST", "/enrol", None, Some(json!({"join_token": token, "hostname": "edge-2"}))).await;
    assert_eq!(code, 409, "the token is used up on every replica: {v}");

    // Heartbeats alternate between replicas: one lease, granted once.
    let beat = format!("/hosts/{}/heartbeat", cred.host_id);
    let mut renewed = vec![];
    for i in 0..6 {
        let url = if i % 2 == 0 { &s1.url } else { &s2.url };
        let (code, v) = agent(url, "POST", &beat, Some(&cred), None).await;
        assert_eq!(code, 200, "{v}");
        renewed.push(v["renewed"].as_bool().unwrap());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(renewed, [true, false, false, false, false, false]);
    let alive = store.get(&format!("/hosts/alive/{}", cred.host_id)).await.unwrap().unwrap();
    assert_ne!(alive.lease, 0);

    // Silence: down on both replicas within the TTL (plus etcd's expiry tick).
    let stopped = Instant::now();
    loop {
        let d1 = !registry::get(s1.state.store.as_ref(), &cred.host_id).await.unwrap().up;
        let d2 = !registry::get(s2.state.store.as_ref(), &cred.host_id).await.unwrap().up;
        if d1 && d2 {
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(ttl as u64 + 2), "still up after {:?}", stopped.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("etcd: host down {:?} after its last heartbeat (TTL {ttl} s)", stopped.elapsed());

    // Exactly one monitor wrote the history, once per transition.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = registry::get(store.as_ref(), &cred.host_id).await.unwrap();
        let states: Vec<_> = h.record.transitions.iter().map(|t| t.state.as_str()).collect();
        if states == ["up", "down"] {
            break;
        }
        assert!(Instant::now() < deadline, "history {states:?}");
        assert!(states.len() <= 2, "a transition was recorded twice: {states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leaders = store.range(store::election::ELECTION_PREFIX).await.unwrap();
    assert_eq!(leaders.kvs.iter().filter(|kv| kv.key.ends_with(coordinator::hosts::monitor::ELECTION)).count(), 1);

    // Back up through replica 2.
    let (code, v) = agent(&s2.url, "POST", &beat, Some(&cred), None).await;
    assert_eq!(code, 200);
    assert_eq!(v["renewed"], true);
    assert!(registry::get(s1.state.store.as_ref(), &cred.host_id).await.unwrap().up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_removed_through_one_replica_is_refused_at_once_by_the_other() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let s1 = TestSite::start(Arc::new(etcd.store().await.unwrap()), |c| c.hosts.heartbeat_ttl_secs = 10).await;
    let s2 = TestSite::start(Arc::new(etcd.store().await.unwrap()), |c| c.hosts.heartbeat_ttl_secs = 10).await;
    let admin = s1.admin_token().await;
    let enrol = |token: String| {
        let url = s1.url.clone();
        async move {
            let (code, v) = agent(&url, "POST", "/enrol", None, Some(json!({"join_token": token, "hostname": "edge-1"}))).await;
            assert_eq!(code, 201, "{v}");
            HostCredential { host_id: v["host_id"].as_str().unwrap().into(), secret: v["secret"].as_str().unwrap().into() }
        }
    };
    let token = |host: Option<&str>| {
        let (s2, admin, host) = (&s2, admin.clone(), host.map(str::to_string));
        async move { s2.call("POST", "/edge/v1/join-tokens", Some(&admin), Some(json!({"host": host}))).await.1["token"].as_str().unwrap().to_string() }
    };
    // Replica 2 learns the host and its lease (granted through replica 1) from its watch.
    let cached_on_2 = |c: HostCredential| {
        let hosts = s2.state.hosts.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while hosts.verify(&c.host_id, &c.secret).is_none() {
                assert!(Instant::now() < deadline, "replica 2 never cached the host");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let first = enrol(token(Some("edge-1")).await).await;
    let beat = format!("/hosts/{}/heartbeat", first.host_id);
    assert_eq!(agent(&s1.url, "POST", &beat, Some(&first), None).await.0, 200);
    cached_on_2(first.clone()).await;
    let (code, v) = agent(&s2.url, "POST", &beat, Some(&first), None).await;
    assert_eq!((code, &v["renewed"]), (200, &json!(false)), "{v}");

    // Re-enrolled through replica 1: replica 2 refuses the old secret at once.
    let again = enrol(token(Some("edge-1")).await).await;
    let (code, _) = agent(&s2.url, "POST", &beat, Some(&first), None).await;
    assert_eq!(code, 401, "replica 2 still took the old secret");
    let (code, v) = agent(&s2.url, "POST", &beat, Some(&again), None).await;
    assert_eq!((code, &v["renewed"]), (200, &json!(true)), "{v}");
    cached_on_2(again.clone()).await;

    // Deleted through replica 1: replica 2 refuses it at once.
    let (code, _) = s1.call("DELETE", &format!("/edge/v1/hosts/{}", again.host_id), Some(&admin), None).await;
    assert_eq!(code, 204);
    let (code, _) = agent(&s2.url, "POST", &beat, Some(&again), None).await;
    assert_eq!(code, 401, "replica 2 still took a deleted host's heartbeat");
}
