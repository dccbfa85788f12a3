//! Nova's os-services and os-hypervisors over enrolled hosts, over HTTP against an
//! in-process replica on the embedded store, and through python-openstackclient
//! when it is installed.

use std::sync::Arc;

use coordinator::testing::TestSite;
use model::agent_api::HostCredential;
use model::inventory::{DiskPool, HostInventory, NumaNode};
use serde_json::{json, Value};
use store::embedded::EmbeddedStore;

async fn site(dir: &tempfile::TempDir) -> TestSite {
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    TestSite::start(store, |c| c.hosts.heartbeat_ttl_secs = 30).await
}

/// A compute API call at a microversion; returns status, headers and JSON.
async fn nova(s: &TestSite, method: &str, path: &str, token: &str, version: Option<&str>, body: Option<Value>) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().request(method.parse().unwrap(), format!("{}/compute{}", s.url, path)).header("x-auth-token", token);
    if let Some(v) = version {
        req = req.header("openstack-api-version", format!("compute {v}"));
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null))
}

/// Enrols a host and reports a small inventory; heartbeats if `up`.
async fn host(s: &TestSite, admin: &str, name: &str, cpus: u32, up: bool) -> HostCredential {
    let (_, v) = s.call("POST", "/edge/v1/join-tokens", Some(admin), Some(json!({}))).await;
    let client = reqwest::Client::new();
    let r = client.post(format!("{}/agent/v1/enrol", s.url)).json(&json!({"join_token": v["token"], "hostname": name})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let cred = HostCredential { host_id: v["host_id"].as_str().unwrap().into(), secret: v["secret"].as_str().unwrap().into() };
    let inv = HostInventory {
        hostname: name.into(),
        numa_nodes: vec![NumaNode { id: 0, cpus: (0..cpus).collect(), memory_mb: 8192, hugepages: vec![] }],
        memory_mb: 8192,
        instance_pool: Some(DiskPool { path: "/srv".into(), total_gb: 100, free_gb: 60 }),
        cpu_traits: vec!["HW_CPU_X86_AVX2".into()],
        cpu_model: Some("Test CPU".into()),
        host_ip: Some("192.0.2.10".into()),
        ..Default::default()
    };
    let r = client
        .put(format!("{}/agent/v1/hosts/{}/inventory", s.url, cred.host_id))
        .header("authorization", cred.authorization())
        .json(&json!({"inventory": inv, "load": if up { json!({"uptime_secs": 3 * 86400 + 2 * 3600 + 5 * 60, "load_average": [0.5, 0.25, 0.125], "users": 1}) } else { Value::Null }}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    if up {
        let r = client.post(format!("{}/agent/v1/hosts/{}/heartbeat", s.url, cred.host_id)).header("authorization", cred.authorization()).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    cred
}

#[tokio::test]
async fn version_discovery_and_microversion_negotiation() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir).await;
    // (`/compute/` with a slash is not routed: axum's nest matches only `/compute`.)
    for path in ["/compute"] {
        let (code, v) = s.call("GET", path, None, None).await;
        assert_eq!(code, 200, "{path}");
        assert_eq!(v["versions"][0]["id"], "v2.1");
        assert_eq!(v["versions"][0]["min_version"], "2.1");
        assert_eq!(v["versions"][0]["version"], "2.79");
    }
    for path in ["/compute/v2.1", "/compute/v2.1/"] {
        let (code, v) = s.call("GET", path, None, None).await;
        assert_eq!(code, 200, "{path}");
        assert_eq!(v["version"]["status"], "CURRENT");
        assert_eq!(v["version"]["links"][0]["href"], format!("{}/compute/v2.1/", s.url));
    }
    let admin = s.admin_token().await;
    let (code, h, _) = nova(&s, "GET", "/v2.1/os-services", &admin, None, None).await;
    assert_eq!(code, 200);
    assert_eq!(h["openstack-api-version"], "compute 2.1");
    assert_eq!(h["x-openstack-nova-api-version"], "2.1");
    let (code, h, _) = nova(&s, "GET", "/v2.1/os-services", &admin, Some("latest"), None).await;
    assert_eq!(code, 200);
    assert_eq!(h["openstack-api-version"], "compute 2.79");
    let (code, _, v) = nova(&s, "GET", "/v2.1/os-services", &admin, Some("2.999"), None).await;
    assert_eq!(code, 406, "{v}");
    let (code, _, v) = nova(&s, "GET", "/v2.1/os-services", "not-a-token", None, None).await;
    assert_eq!(code, 401, "{v}");
    let (code, _, v) = nova(&s, "GET", "/v2.1/os-nothing", &admin, None, None).await;
    assert_eq!(code, 404);
    assert!(v["itemNotFound"].is_object(), "{v}");
}

#[tokio::test]
async fn services_show_hosts_and_enable_disable_at_old_and_new_microversions() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir).await;
    let admin = s.admin_token().await;
    let a = host(&s, &admin, "edge-a", 4, true).await;
    let _b = host(&s, &admin, "edge-b", 2, false).await;

    // 2.1: integer ids, no forced_down.
    let (code, _, v) = nova(&s, "GET", "/v2.1/os-services", &admin, None, None).await;
    assert_eq!(code, 200);
    let list = v["services"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["host"], "edge-a");
    assert_eq!(list[0]["binary"], "nova-compute");
    assert!(list[0]["id"].is_i64() && list[1]["id"].is_i64() && list[0]["id"] != list[1]["id"], "{v}");
    assert_eq!(list[0]["state"], "up");
    assert_eq!(list[1]["state"], "down");
    assert_eq!(list[0]["status"], "enabled");
    assert_eq!(list[0]["zone"], "nova");
    assert!(list[0]["updated_at"].as_str().unwrap().contains('.'), "{}", list[0]["updated_at"]);
    assert!(list[0].get("forced_down").is_none());

    // updated_at is the last heartbeat (served by this replica, just now), not the record's
    // last change; a host that never heartbeated has none.
    let updated = time::PrimitiveDateTime::parse(list[0]["updated_at"].as_str().unwrap(), time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond]")).unwrap().assume_utc();
    let age = time::OffsetDateTime::now_utc() - updated;
    assert!(age >= time::Duration::ZERO && age < time::Duration::seconds(30), "updated_at {updated} is the last heartbeat");
    assert_eq!(list[1]["updated_at"], Value::Null, "edge-b never heartbeated: {}", list[1]);

    // 2.53: uuid ids; filter by host and binary.
    let (_, _, v) = nova(&s, "GET", "/v2.1/os-services?host=edge-a&binary=nova-compute", &admin, Some("2.53"), None).await;
    let list = v["services"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], a.host_id.as_str());
    assert_eq!(list[0]["forced_down"], false);
    let (_, _, v) = nova(&s, "GET", "/v2.1/os-services?binary=nova-scheduler", &admin, Some("2.53"), None).await;
    assert_eq!(v["services"], json!([]));

    // 2.53: PUT by id.
    let path = format!("/v2.1/os-services/{}", a.host_id);
    let (code, _, v) = nova(&s, "PUT", &path, &admin, Some("2.53"), Some(json!({"status": "disabled", "disabled_reason": "fibre cut"}))).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["service"]["status"], "disabled");
    assert_eq!(v["service"]["disabled_reason"], "fibre cut");
    let (code, _, v) = nova(&s, "PUT", &path, &admin, Some("2.53"), Some(json!({"status": "enabled", "disabled_reason": "x"}))).await;
    assert_eq!(code, 400, "{v}");
    assert!(v["badRequest"]["message"].is_string(), "Nova's error shape: {v}");
    let (code, _, _) = nova(&s, "PUT", &path, &admin, Some("2.53"), Some(json!({"status": "sleepy"}))).await;
    assert_eq!(code, 400);
    let (code, _, _) = nova(&s, "PUT", &path, &admin, Some("2.53"), Some(json!({"colour": "red"}))).await;
    assert_eq!(code, 400);
    let (code, _, _) = nova(&s, "PUT", &format!("/v2.1/os-services/{}", uuid::Uuid::new_v4()), &admin, Some("2.53"), Some(json!({"status": "enabled"}))).await;
    assert_eq!(code, 404);
    let (code, _, v) = nova(&s, "PUT", &path, &admin, Some("2.53"), Some(json!({"status": "enabled"}))).await;
    assert_eq!(code, 200);
    assert_eq!(v["service"]["disabled_reason"], Value::Null);

    // Before 2.53: the action endpoints.
    let (code, _, v) = nova(&s, "PUT", "/v2.1/os-services/disable-log-reason", &admin, None, Some(json!({"host": "edge-b", "binary": "nova-compute", "disabled_reason": "rma"}))).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["service"]["disabled_reason"], "rma");
    let (_, _, v) = nova(&s, "GET", "/v2.1/os-services?host=edge-b", &admin, None, None).await;
    assert_eq!(v["services"][0]["status"], "disabled");
    assert_eq!(v["services"][0]["disabled_reason"], "rma");
    let (code, _, _) = nova(&s, "PUT", "/v2.1/os-services/enable", &admin, None, Some(json!({"host": "edge-b", "binary": "nova-compute"}))).await;
    assert_eq!(code, 200);
    let (code, _, _) = nova(&s, "PUT", "/v2.1/os-services/enable", &admin, None, Some(json!({"host": "nope", "binary": "nova-compute"}))).await;
    assert_eq!(code, 404);
    let (code, _, _) = nova(&s, "PUT", "/v2.1/os-services/disable", &admin, Some("2.53"), Some(json!({"host": "edge-b", "binary": "nova-compute"}))).await;
    assert_eq!(code, 400, "2.53 wants a uuid in the path");
}

#[tokio::test]
async fn hypervisors_show_sizes_and_usage() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir).await;
    let admin = s.admin_token().await;
    let a = host(&s, &admin, "edge-a", 4, true).await;
    host(&s, &admin, "edge-b", 2, false).await;

    let (code, _, v) = nova(&s, "GET", "/v2.1/os-hypervisors", &admin, None, None).await;
    assert_eq!(code, 200);
    let number = v["hypervisors"][0]["id"].as_i64().expect("integer ids before 2.53");
    assert_eq!(v["hypervisors"][0], json!({"id": number, "hypervisor_hostname": "edge-a", "state": "up", "status": "enabled"}));

    let (code, _, v) = nova(&s, "GET", "/v2.1/os-hypervisors/detail", &admin, Some("2.53"), None).await;
    assert_eq!(code, 200);
    let h = &v["hypervisors"][0];
    assert_eq!(h["id"], a.host_id.as_str());
    assert_eq!(h["vcpus"], 4);
    assert_eq!(h["vcpus_used"], 0);
    assert_eq!(h["memory_mb"], 8192);
    assert_eq!(h["local_gb"], 60);
    assert_eq!(h["host_ip"], "192.0.2.10");
    assert_eq!(h["hypervisor_type"], "KVM");
    assert_eq!(h["service"]["host"], "edge-a");
    assert_eq!(h["cpu_info"]["model"], "Test CPU");
    assert!(h["cpu_info"]["features"].as_array().unwrap().contains(&json!("avx2")));
    assert_eq!(v["hypervisors"][1]["state"], "down");

    // Before 2.28 cpu_info is a string.
    let (_, _, v) = nova(&s, "GET", &format!("/v2.1/os-hypervisors/{number}"), &admin, None, None).await;
    assert!(v["hypervisor"]["cpu_info"].is_string());
    assert_eq!(v["hypervisor"]["vcpus"], 4);
    let (code, _, _) = nova(&s, "GET", &format!("/v2.1/os-hypervisors/{}", a.host_id), &admin, Some("2.53"), None).await;
    assert_eq!(code, 200);
    let (code, _, _) = nova(&s, "GET", "/v2.1/os-hypervisors/999999", &admin, None, None).await;
    assert_eq!(code, 404);

    // Paging (2.33+) and name patterns (2.53+, /search before).
    let (_, _, v) = nova(&s, "GET", "/v2.1/os-hypervisors?limit=1", &admin, Some("2.33"), None).await;
    assert_eq!(v["hypervisors"].as_array().unwrap().len(), 1);
    assert!(v["hypervisors_links"][0]["href"].as_str().unwrap().contains(&format!("marker={number}")));
    let (_, _, v) = nova(&s, "GET", &format!("/v2.1/os-hypervisors?limit=1&marker={number}"), &admin, Some("2.33"), None).await;
    assert_eq!(v["hypervisors"][0]["hypervisor_hostname"], "edge-b");
    let (code, _, _) = nova(&s, "GET", "/v2.1/os-hypervisors?limit=1", &admin, None, None).await;
    assert_eq!(code, 400);
    let (_, _, v) = nova(&s, "GET", "/v2.1/os-hypervisors?hypervisor_hostname_pattern=-b", &admin, Some("2.53"), None).await;
    assert_eq!(v["hypervisors"].as_array().unwrap().len(), 1);
    let (_, _, v) = nova(&s, "GET", "/v2.1/os-hypervisors/edge/search", &admin, None, None).await;
    assert_eq!(v["hypervisors"].as_array().unwrap().len(), 2);

    // Uptime from the host's last report, in uptime(1)'s words; 501 (as Nova says for
    // drivers without it) for a host that did not report one.
    let (code, _, v) = nova(&s, "GET", &format!("/v2.1/os-hypervisors/{number}/uptime"), &admin, None, None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["hypervisor"]["hypervisor_hostname"], "edge-a");
    let line = v["hypervisor"]["uptime"].as_str().unwrap();
    assert!(line.ends_with(" up 3 days,  2:05,  1 user,  load average: 0.50, 0.25, 0.12"), "{line}");
    let (code, _, v) = nova(&s, "GET", &format!("/v2.1/os-hypervisors/{}/uptime", a.host_id), &admin, Some("2.53"), None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["hypervisor"]["id"], a.host_id.as_str());
    let (_, _, v) = nova(&s, "GET", "/v2.1/os-hypervisors?hypervisor_hostname_pattern=edge-b", &admin, Some("2.53"), None).await;
    let b_id = v["hypervisors"][0]["id"].as_str().unwrap().to_string();
    let (code, _, v) = nova(&s, "GET", &format!("/v2.1/os-hypervisors/{b_id}/uptime"), &admin, Some("2.53"), None).await;
    assert_eq!(code, 501, "{v}");
    let (code, _, _) = nova(&s, "GET", "/v2.1/os-hypervisors/999999/uptime", &admin, None, None).await;
    assert_eq!(code, 404);
    // No aggregates yet: an honest empty list.
    let (code, _, v) = nova(&s, "GET", "/v2.1/os-aggregates", &admin, None, None).await;
    assert_eq!(code, 200);
    assert_eq!(v, json!({"aggregates": []}));

    let (code, _, v) = nova(&s, "GET", "/v2.1/os-hypervisors/statistics", &admin, None, None).await;
    assert_eq!(code, 200);
    assert_eq!(v["hypervisor_statistics"]["count"], 2);
    assert_eq!(v["hypervisor_statistics"]["vcpus"], 6);

    // Usage comes from placement's allocations against the host.
    use coordinator::placement::db;
    let root: uuid::Uuid = a.host_id.parse().unwrap();
    let alloc = db::ConsumerAllocations {
        consumer: uuid::Uuid::new_v4(),
        project_id: "p".into(),
        user_id: "u".into(),
        consumer_type: None,
        generation: db::ConsumerGeneration::New,
        allocations: [(root, [("VCPU".to_string(), 3), ("MEMORY_MB".to_string(), 1024)].into())].into(),
    };
    db::replace_allocations(s.state.store.as_ref(), &[alloc]).await.unwrap();
    let (_, _, v) = nova(&s, "GET", &format!("/v2.1/os-hypervisors/{number}"), &admin, None, None).await;
    assert_eq!(v["hypervisor"]["vcpus_used"], 3);
    assert_eq!(v["hypervisor"]["memory_mb_used"], 1024);
    assert_eq!(v["hypervisor"]["free_ram_mb"], 8192 - 1024);
    assert_eq!(v["hypervisor"]["running_vms"], 1);

    // A host that runs something cannot be deleted.
    let (code, v) = s.call("DELETE", &format!("/edge/v1/hosts/{}", a.host_id), Some(&admin), None).await;
    assert_eq!(code, 409, "{v}");
    assert_eq!(db::get_tree(s.state.store.as_ref(), &root).await.unwrap().len(), 2, "nothing was removed");
}

/// The `openstack` CLI, or None (saying so) when it is not installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstack_cli_lists_and_disables_compute_services() {
    let Some(cli) = coordinator::testing::openstack_cli() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir).await;
    let admin = s.admin_token().await;
    host(&s, &admin, "edge-a", 4, true).await;
    host(&s, &admin, "edge-b", 2, false).await;
    let url = s.url.clone();
    let run = move |args: &[&str]| -> String { coordinator::testing::openstack_as_admin(&cli, &url, args) };
    let (services, hypervisors, shown, shown_b) = tokio::task::spawn_blocking(move || {
        run(&["compute", "service", "set", "--disable", "--disable-reason", "maintenance window", "edge-b", "nova-compute"]);
        let services: Value = serde_json::from_str(&run(&["compute", "service", "list", "--long", "-f", "json"])).unwrap();
        let hypervisors: Value = serde_json::from_str(&run(&["hypervisor", "list", "-f", "json"])).unwrap();
        let shown: Value = serde_json::from_str(&run(&["hypervisor", "show", "edge-a", "-f", "json"])).unwrap();
        let shown_b: Value = serde_json::from_str(&run(&["hypervisor", "show", "edge-b", "-f", "json"])).unwrap();
        (services, hypervisors, shown, shown_b)
    })
    .await
    .unwrap();
    let by_host = |h: &str| services.as_array().unwrap().iter().find(|s| s["Host"] == h).cloned().unwrap_or_else(|| panic!("{services}"));
    let a = by_host("edge-a");
    assert_eq!(a["Binary"], "nova-compute");
    assert_eq!(a["State"], "up");
    assert_eq!(a["Status"], "enabled");
    let b = by_host("edge-b");
    assert_eq!(b["State"], "down");
    assert_eq!(b["Status"], "disabled");
    assert_eq!(b["Disabled Reason"], "maintenance window");
    let names: Vec<&str> = hypervisors.as_array().unwrap().iter().map(|h| h["Hypervisor Hostname"].as_str().unwrap()).collect();
    assert_eq!(names, ["edge-a", "edge-b"], "{hypervisors}");
    // `hypervisor show` also reads os-aggregates and the uptime endpoint.
    assert_eq!(shown["hypervisor_hostname"], "edge-a", "{shown}");
    assert_eq!(shown["aggregates"], json!([]), "{shown}");
    assert_eq!(shown["uptime"], "3 days,  2:05", "{shown}");
    assert_eq!(shown["load_average"], "0.50, 0.25, 0.12", "{shown}");
    assert_eq!(shown["users"], "1", "{shown}");
    assert_eq!(shown["service_host"], "edge-a", "{shown}");
    assert_eq!(shown_b["hypervisor_hostname"], "edge-b", "{shown_b}");
    assert!(shown_b.get("uptime").is_none(), "edge-b reported no uptime: {shown_b}");
}
