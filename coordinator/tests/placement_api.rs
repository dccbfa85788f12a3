//! The Placement API over HTTP, as osc-placement and Nova use it: version
//! negotiation, providers, inventories, traits, allocations, candidates,
//! usages, generations and Placement's error shape; then the real
//! `openstack resource provider ...` commands.

use std::sync::Arc;

use coordinator::testing::TestSite;
use serde_json::{json, Value};
use store::Store;

async fn site(dir: &tempfile::TempDir) -> TestSite {
    let store: Arc<dyn Store> = Arc::new(store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    TestSite::start(store, |_| {}).await
}

/// Sends a Placement request at microversion `mv` (None: no header); returns status, headers and JSON.
async fn pl(s: &TestSite, method: &str, path: &str, token: Option<&str>, mv: Option<&str>, body: Option<Value>) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().request(method.parse().unwrap(), format!("{}/placement{path}", s.url));
    if let Some(t) = token {
        req = req.header("x-auth-token", t);
    }
    if let Some(v) = mv {
        req = req.header("openstack-api-version", format!("placement {v}"));
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    (status, headers, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["errors"][0]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_discovery_negotiation_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir).await;
    for path in ["", "/"] {
        let (st, h, v) = pl(&s, "GET", path, None, None, None).await;
        assert_eq!(st, 200, "GET /placement{path}");
        assert_eq!(v["versions"][0]["max_version"], "1.39");
        assert_eq!(v["versions"][0]["min_version"], "1.0");
        assert_eq!(h["openstack-api-version"], "placement 1.0");
    }
    // osc-placement negotiates by asking for its own maximum and falling back to ours on 406.
    let (st, _, v) = pl(&s, "GET", "/", None, Some("1.99"), None).await;
    assert_eq!(st, 406);
    assert_eq!(v["errors"][0]["max_version"], "1.39");
    let (st, h, _) = pl(&s, "GET", "/", None, Some("latest"), None).await;
    assert_eq!((st, h["openstack-api-version"].to_str().unwrap()), (200, "placement 1.39"));
    let (st, _, _) = pl(&s, "GET", "/", None, Some("1.x"), None).await;
    assert_eq!(st, 400);
    let (st, _, v) = pl(&s, "GET", "/resource_providers", None, None, None).await;
    assert_eq!(st, 401);
    assert!(v["errors"][0]["detail"].is_string(), "Placement's error shape: {v}");

    // A member (not admin) is refused.
    let admin = s.admin_token().await;
    let (st, roles) = s.call("GET", "/v3/roles?name=member", Some(&admin), None).await;
    assert_eq!(st, 200);
    let member_role = roles["roles"][0]["id"].as_str().unwrap().to_string();
    let (_, projects) = s.call("GET", "/v3/projects?name=admin", Some(&admin), None).await;
    let project = projects["projects"][0]["id"].as_str().unwrap().to_string();
    let (st, user) = s
        .call("POST", "/v3/users", Some(&admin), Some(json!({"user": {"name": "bob", "password": "bob-pw", "domain_id": "default"}})))
        .await;
    assert_eq!(st, 201, "{user}");
    let uid = user["user"]["id"].as_str().unwrap();
    let (st, _) = s.call("PUT", &format!("/v3/projects/{project}/users/{uid}/roles/{member_role}"), Some(&admin), None).await;
    assert_eq!(st, 204);
    let bob = s.token("bob", "bob-pw", "admin").await;
    let (st, _, v) = pl(&s, "GET", "/resource_providers", Some(&bob), None, None).await;
    assert_eq!(st, 403, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_inventories_traits_allocations_and_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir).await;
    let t = s.admin_token().await;
    let t = Some(t.as_str());

    // Create (1.20 returns the body), duplicate name 409, nested child (1.14).
    let (st, h, host) = pl(&s, "POST", "/resource_providers", t, Some("1.20"), Some(json!({"name": "cn1"}))).await;
    assert_eq!(st, 200, "{host}");
    assert!(h["location"].to_str().unwrap().starts_with("/resource_providers/") && h["location"].to_str().unwrap().ends_with(host["uuid"].as_str().unwrap()));
    let rp = host["uuid"].as_str().unwrap().to_string();
    assert_eq!(host["generation"], 0);
    assert_eq!(host["root_provider_uuid"], rp.as_str());
    let (st, _, v) = pl(&s, "POST", "/resource_providers", t, Some("1.20"), Some(json!({"name": "cn1"}))).await;
    assert_eq!((st, code(&v)), (409, "placement.duplicate_name"));
    let (st, _, _) = pl(&s, "POST", "/resource_providers", t, Some("1.0"), Some(json!({"name": "cn2"}))).await;
    assert_eq!(st, 201);
    let (st, _, numa) =
        pl(&s, "POST", "/resource_providers", t, Some("1.20"), Some(json!({"name": "cn1_NUMA0", "parent_provider_uuid": rp}))).await;
    assert_eq!(st, 200);
    let numa_rp = numa["uuid"].as_str().unwrap().to_string();
    assert_eq!(numa["root_provider_uuid"], rp.as_str());
    let (st, _, v) = pl(&s, "POST", "/resource_providers", t, Some("1.20"), Some(json!({"name": "x", "bogus": 1}))).await;
    assert_eq!(st, 400, "{v}");
    let (st, _, v) = pl(&s, "GET", "/resource_providers/00000000-0000-0000-0000-000000000001", t, None, None).await;
    assert_eq!(st, 404, "{v}");

    // Inventories with generations.
    let inv = json!({"resource_provider_generation": 0, "inventories": {
        "VCPU": {"total": 8, "allocation_ratio": 2.0},
        "MEMORY_MB": {"total": 4096, "reserved": 512},
        "DISK_GB": {"total": 100, "step_size": 10, "max_unit": 50},
    }});
    let (st, _, v) = pl(&s, "PUT", &format!("/resource_providers/{rp}/inventories"), t, Some("1.29"), Some(inv.clone())).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["resource_provider_generation"], 1);
    assert_eq!(v["inventories"]["VCPU"]["max_unit"], 2147483647);
    let (st, _, v) = pl(&s, "PUT", &format!("/resource_providers/{rp}/inventories"), t, Some("1.29"), Some(inv)).await;
    assert_eq!((st, code(&v)), (409, "placement.concurrent_update"), "stale generation: {v}");
    let (st, _, v) = pl(
        &s,
        "PUT",
        &format!("/resource_providers/{rp}/inventories/CUSTOM_NOPE"),
        t,
        Some("1.29"),
        Some(json!({"resource_provider_generation": 1, "total": 1})),
    )
    .await;
    assert_eq!(st, 400, "unknown custom class: {v}");
    let (st, _, _) = pl(&s, "PUT", "/resource_classes/CUSTOM_HUGEPAGES_2M", t, Some("1.7"), None).await;
    assert_eq!(st, 201);
    let (st, _, v) = pl(
        &s,
        "PUT",
        &format!("/resource_providers/{numa_rp}/inventories/CUSTOM_HUGEPAGES_2M"),
        t,
        Some("1.29"),
        Some(json!({"resource_provider_generation": 0, "total": 512})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (_, _, v) = pl(&s, "GET", "/resource_classes", t, Some("1.2"), None).await;
    assert!(v["resource_classes"].as_array().unwrap().iter().any(|c| c["name"] == "CUSTOM_HUGEPAGES_2M"));

    // Traits.
    let (st, _, _) = pl(&s, "PUT", "/traits/CUSTOM_FAST", t, Some("1.6"), None).await;
    assert_eq!(st, 201);
    let (st, _, _) = pl(&s, "PUT", "/traits/NOT_CUSTOM", t, Some("1.6"), None).await;
    assert_eq!(st, 400);
    let body = json!({"resource_provider_generation": 1, "traits": ["CUSTOM_FAST", "HW_CPU_X86_AVX2"]});
    let (st, _, v) = pl(&s, "PUT", &format!("/resource_providers/{rp}/traits"), t, Some("1.6"), Some(body)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["resource_provider_generation"], 2);
    let body = json!({"resource_provider_generation": 2, "traits": ["CUSTOM_UNKNOWN"]});
    let (st, _, _) = pl(&s, "PUT", &format!("/resource_providers/{rp}/traits"), t, Some("1.6"), Some(body)).await;
    assert_eq!(st, 400);
    let (_, _, v) = pl(&s, "GET", "/traits?name=startswith:CUSTOM_&associated=true", t, Some("1.6"), None).await;
    assert_eq!(v["traits"], json!(["CUSTOM_FAST"]));
    let (_, _, v) = pl(&s, "GET", "/resource_providers?required=CUSTOM_FAST", t, Some("1.18"), None).await;
    assert_eq!(v["resource_providers"].as_array().unwrap().len(), 1);
    let (_, _, v) = pl(&s, "GET", "/resource_providers?required=!CUSTOM_FAST", t, Some("1.22"), None).await;
    assert_eq!(v["resource_providers"].as_array().unwrap().len(), 2);
    let (_, _, v) = pl(&s, "GET", &format!("/resource_providers?in_tree={numa_rp}"), t, Some("1.14"), None).await;
    assert_eq!(v["resource_providers"].as_array().unwrap().len(), 2);

    // Allocation candidates: VCPU and DISK from the host, hugepages from the NUMA child.
    let (st, _, v) =
        pl(&s, "GET", "/allocation_candidates?resources=VCPU:2,DISK_GB:20,CUSTOM_HUGEPAGES_2M:100&required=CUSTOM_FAST", t, Some("1.34"), None)
            .await;
    assert_eq!(st, 200, "{v}");
    let reqs = v["allocation_requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 1, "{v}");
    assert_eq!(reqs[0]["allocations"][&rp]["resources"], json!({"VCPU": 2, "DISK_GB": 20}));
    assert_eq!(reqs[0]["allocations"][&numa_rp]["resources"], json!({"CUSTOM_HUGEPAGES_2M": 100}));
    assert_eq!(v["provider_summaries"][&rp]["resources"]["VCPU"], json!({"capacity": 16, "used": 0}));
    assert_eq!(v["provider_summaries"][&numa_rp]["parent_provider_uuid"], rp.as_str());
    let (_, _, v) = pl(&s, "GET", "/allocation_candidates?resources=VCPU:17", t, Some("1.29"), None).await;
    assert_eq!(v["allocation_requests"].as_array().unwrap().len(), 0);
    let (st, _, _) = pl(&s, "GET", "/allocation_candidates?resources=DISK_GB:15", t, Some("1.29"), None).await;
    assert_eq!(st, 200);
    let (st, _, v) = pl(&s, "GET", "/allocation_candidates?resources=VCPU:x", t, Some("1.29"), None).await;
    assert_eq!((st, code(&v)), (400, "placement.query.bad_value"));
    // Granular: a suffixed group must come whole from one provider.
    let (st, _, v) = pl(&s, "GET", "/allocation_candidates?resources1=VCPU:1,CUSTOM_HUGEPAGES_2M:1", t, Some("1.34"), None).await;
    assert_eq!(st, 200);
    assert_eq!(v["allocation_requests"].as_array().unwrap().len(), 0, "{v}");

    // Allocations: consumer generations (1.28), capacity, units.
    let consumer = "11111111-2222-3333-4444-555555555555";
    let alloc = |gen: Value, vcpu: u64| {
        json!({"allocations": {rp.clone(): {"resources": {"VCPU": vcpu, "DISK_GB": 10}}}, "project_id": "p1", "user_id": "u1", "consumer_generation": gen})
    };
    let (st, _, v) = pl(&s, "PUT", &format!("/allocations/{consumer}"), t, Some("1.28"), Some(alloc(Value::Null, 4))).await;
    assert_eq!(st, 204, "{v}");
    let (st, _, v) = pl(&s, "PUT", &format!("/allocations/{consumer}"), t, Some("1.28"), Some(alloc(Value::Null, 4))).await;
    assert_eq!((st, code(&v)), (409, "placement.concurrent_update"));
    let (_, _, v) = pl(&s, "GET", &format!("/allocations/{consumer}"), t, Some("1.28"), None).await;
    assert_eq!(v["consumer_generation"], 1);
    assert_eq!(v["project_id"], "p1");
    assert_eq!(v["allocations"][&rp]["resources"]["VCPU"], 4);
    let (st, _, v) = pl(&s, "PUT", &format!("/allocations/{consumer}"), t, Some("1.28"), Some(alloc(json!(1), 17))).await;
    assert_eq!(st, 409, "over capacity: {v}");
    let other = "99999999-2222-3333-4444-555555555555";
    let (st, _, v) = pl(&s, "PUT", &format!("/allocations/{other}"), t, Some("1.28"), Some(alloc(Value::Null, 12))).await;
    assert_eq!(st, 204, "{v}");
    let (st, _, _) = pl(&s, "PUT", &format!("/allocations/{other}"), t, Some("1.28"), Some(alloc(json!(1), 13))).await;
    assert_eq!(st, 409, "4 + 13 > 16");
    let (_, _, v) = pl(&s, "GET", &format!("/resource_providers/{rp}/usages"), t, None, None).await;
    assert_eq!(v["usages"], json!({"VCPU": 16, "MEMORY_MB": 0, "DISK_GB": 20}));
    let (_, _, v) = pl(&s, "GET", "/usages?project_id=p1", t, Some("1.9"), None).await;
    assert_eq!(v["usages"], json!({"VCPU": 16, "DISK_GB": 20}));
    let (_, _, v) = pl(&s, "GET", &format!("/resource_providers/{rp}/allocations"), t, None, None).await;
    assert_eq!(v["allocations"][consumer]["resources"]["VCPU"], 4);
    // In-use inventory cannot shrink below usage or go away; the provider cannot be deleted.
    let gen = pl(&s, "GET", &format!("/resource_providers/{rp}"), t, None, None).await.2["generation"].clone();
    let body = json!({"resource_provider_generation": gen, "total": 4});
    let (st, _, v) = pl(&s, "PUT", &format!("/resource_providers/{rp}/inventories/VCPU"), t, Some("1.29"), Some(body)).await;
    assert_eq!((st, code(&v)), (409, "placement.inventory.inuse"), "{v}");
    let (st, _, v) = pl(&s, "DELETE", &format!("/resource_providers/{rp}/inventories/VCPU"), t, None, None).await;
    assert_eq!((st, code(&v)), (409, "placement.inventory.inuse"));
    let (st, _, v) = pl(&s, "DELETE", &format!("/resource_providers/{numa_rp}"), t, None, None).await;
    assert_eq!(st, 204, "{v}");
    let (st, _, v) = pl(&s, "DELETE", &format!("/resource_providers/{rp}"), t, None, None).await;
    assert_eq!((st, code(&v)), (409, "placement.resource_provider.inuse"));
    // 1.28 empty allocations delete safely; DELETE removes; then the provider goes.
    let (st, _, _) = pl(&s, "PUT", &format!("/allocations/{other}"), t, Some("1.28"), Some(json!({"allocations": {}, "project_id": "p1", "user_id": "u1", "consumer_generation": 1}))).await;
    assert_eq!(st, 204);
    let (st, _, _) = pl(&s, "DELETE", &format!("/allocations/{consumer}"), t, None, None).await;
    assert_eq!(st, 204);
    let (st, _, _) = pl(&s, "DELETE", &format!("/allocations/{consumer}"), t, None, None).await;
    assert_eq!(st, 404);
    let (st, _, _) = pl(&s, "DELETE", &format!("/resource_providers/{rp}"), t, None, None).await;
    assert_eq!(st, 204);
}

/// The `openstack` CLI, or None (saying so) when it is not installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osc_placement_commands_work() {
    let Some(cli) = coordinator::testing::openstack_cli() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = site(&dir).await;
    let url = s.url.clone();
    let run = move |args: &[&str]| -> String { coordinator::testing::openstack_as_admin(&cli, &url, args) };
    let json = |s: String| -> Value { serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}")) };
    tokio::task::spawn_blocking(move || {
        let rp = json(run(&["resource", "provider", "create", "edge1", "-f", "json"]));
        let uuid = rp["uuid"].as_str().unwrap().to_string();
        let list = json(run(&["resource", "provider", "list", "-f", "json"]));
        assert_eq!(list[0]["name"], "edge1", "{list}");
        run(&["resource", "provider", "set", "--name", "edge1-renamed", &uuid]);
        let shown = json(run(&["resource", "provider", "show", &uuid, "-f", "json"]));
        assert_eq!(shown["name"], "edge1-renamed");
        run(&["resource", "provider", "inventory", "set", &uuid, "--resource", "VCPU=8", "--resource", "VCPU:allocation_ratio=2.0", "--resource", "MEMORY_MB=4096", "--resource", "DISK_GB=100"]);
        let inv = json(run(&["resource", "provider", "inventory", "list", &uuid, "-f", "json"]));
        let vcpu = inv.as_array().unwrap().iter().find(|i| i["resource_class"] == "VCPU").unwrap().clone();
        assert_eq!(vcpu["total"], 8, "{inv}");
        run(&["resource", "provider", "inventory", "delete", &uuid, "--resource-class", "DISK_GB"]);
        let inv = json(run(&["resource", "provider", "inventory", "list", &uuid, "-f", "json"]));
        assert_eq!(inv.as_array().unwrap().len(), 2, "{inv}");
        run(&["resource", "provider", "trait", "set", &uuid, "--trait", "HW_CPU_X86_AVX2"]);
        let traits = json(run(&["resource", "provider", "trait", "list", &uuid, "-f", "json"]));
        assert_eq!(traits[0]["name"], "HW_CPU_X86_AVX2", "{traits}");
        let classes = run(&["resource", "class", "list", "-f", "value"]);
        assert!(classes.contains("SRIOV_NET_VF"));
        let traits = run(&["trait", "list", "-f", "value"]);
        assert!(traits.contains("HW_NUMA_ROOT"));
        let cands = json(run(&["allocation", "candidate", "list", "--resource", "VCPU=1", "-f", "json"]));
        assert_eq!(cands.as_array().unwrap().len(), 1, "{cands}");
        let consumer = "6b1a2f4e-8c3d-4e5f-9a0b-1c2d3e4f5a6b";
        run(&["resource", "provider", "allocation", "set", consumer, "--allocation", &format!("rp={uuid},VCPU=2,MEMORY_MB=512"), "--project-id", "p1", "--user-id", "u1"]);
        let shown = json(run(&["resource", "provider", "allocation", "show", consumer, "-f", "json"]));
        assert_eq!(shown[0]["resources"]["VCPU"], 2, "{shown}");
        let usage = json(run(&["resource", "provider", "usage", "show", &uuid, "-f", "json"]));
        let vcpu = usage.as_array().unwrap().iter().find(|u| u["resource_class"] == "VCPU").unwrap().clone();
        assert_eq!(vcpu["usage"], 2, "{usage}");
        let usage = run(&["resource", "usage", "show", "p1", "-f", "value"]);
        assert!(usage.contains("VCPU 2"), "{usage}");
        run(&["resource", "provider", "allocation", "delete", consumer]);
        run(&["resource", "provider", "delete", &uuid]);
        let list = json(run(&["resource", "provider", "list", "-f", "json"]));
        assert_eq!(list, json!([]));
    })
    .await
    .unwrap();
}
