//! The acceptance checks of issue 2 with the real `openstack` CLI: against a
//! single-node site on the embedded store, and against two coordinator
//! replicas sharing one etcd.

use serde_json::Value;
use systest::*;

fn rows_have(rows: &Value, field: &str, want: &str) -> bool {
    rows.as_array().unwrap().iter().any(|r| r[field].as_str() == Some(want))
}

/// A field of `openstack ... -f json` output, whichever capitalisation this client version uses.
fn field<'a>(v: &'a Value, name: &str) -> &'a str {
    let upper = name.to_uppercase();
    let title = format!("{}{}", &name[..1].to_uppercase(), &name[1..]);
    [name, upper.as_str(), title.as_str()].iter().find_map(|k| v[*k].as_str()).unwrap_or_else(|| panic!("no {name} in {v}"))
}

/// Issue 2's acceptance list, run with the CLI against a site; with several
/// replicas, users talk to different replicas (alice to the last one).
fn acceptance(cli: &std::path::Path, urls: &[String]) {
    let url = urls[0].clone();
    let other = urls.last().unwrap().clone();
    let admin = Cloud::password(cli, &url, "admin", ADMIN_PASSWORD, "admin");

    let token = admin.json(&["token", "issue"]);
    assert!(token["id"].as_str().is_some_and(|t| t.len() > 100), "{token}");
    assert!(token["project_id"].as_str().is_some() && token["user_id"].as_str().is_some());

    let catalog = admin.json(&["catalog", "list"]);
    for t in ["identity", "placement", "compute"] {
        assert!(rows_have(&catalog, "Type", t), "catalog lacks {t}: {catalog}");
    }

    admin.ok(&["project", "create", "alpha"]);
    admin.ok(&["project", "create", "beta"]);
    let projects = admin.json(&["project", "list"]);
    assert!(rows_have(&projects, "Name", "alpha") && rows_have(&projects, "Name", "beta"), "{projects}");
    let err = admin.fails(&["project", "create", "alpha"]);
    assert!(err.contains("409") || err.to_lowercase().contains("conflict"), "{err}");

    admin.ok(&["user", "create", "--password", "first-pw", "alice"]);
    admin.ok(&["user", "set", "--password", "second-pw", "alice"]);
    admin.ok(&["role", "add", "--project", "alpha", "--user", "alice", "member"]);
    let assignments = admin.json(&["role", "assignment", "list", "--names", "--project", "alpha"]);
    assert!(
        assignments.as_array().unwrap().iter().any(|r| r["Role"] == "member" && r["User"] == "alice@Default" && r["Project"] == "alpha@Default"),
        "{assignments}"
    );

    // alice logs in with the new password only, and sees project alpha but not beta.
    Cloud::password(cli, &other, "alice", "first-pw", "alpha").fails(&["token", "issue"]);
    let alice = Cloud::password(cli, &other, "alice", "second-pw", "alpha");
    alice.json(&["token", "issue"]);
    alice.ok(&["project", "show", "alpha"]);
    // Another project is invisible to her: by name it is not found, by id it is forbidden.
    let err = alice.fails(&["project", "show", "beta"]);
    assert!(err.contains("No Project found") || err.contains("403"), "{err}");
    let beta_id = admin.json(&["project", "show", "beta"])["id"].as_str().unwrap().to_string();
    let err = alice.fails(&["project", "show", &beta_id]);
    assert!(err.contains("No Project found") || err.contains("403"), "{err}");
    assert!(!rows_have(&alice.json(&["project", "list"]), "Name", "beta"));
    let err = alice.fails(&["project", "create", "gamma"]);
    assert!(err.contains("403"), "{err}");

    // An application credential logs in on its own.
    let cred = admin.json(&["application", "credential", "create", "ci"]);
    let mut app = Cloud { cli: cli.to_path_buf(), env: vec![] };
    app.env = vec![
        ("OS_AUTH_TYPE".into(), "v3applicationcredential".into()),
        ("OS_AUTH_URL".into(), format!("{other}/v3")),
        ("OS_APPLICATION_CREDENTIAL_ID".into(), field(&cred, "id").into()),
        ("OS_APPLICATION_CREDENTIAL_SECRET".into(), field(&cred, "secret").into()),
        ("OS_IDENTITY_API_VERSION".into(), "3".into()),
    ];
    let t = app.json(&["token", "issue"]);
    assert_eq!(t["project_id"], token["project_id"]);

    // Placement through osc-placement.
    let rp = admin.json(&["resource", "provider", "create", "edge-rp-1"]);
    let rp_uuid = rp["uuid"].as_str().unwrap().to_string();
    admin.ok(&["resource", "provider", "inventory", "set", &rp_uuid, "--resource", "VCPU=16", "--resource", "MEMORY_MB=8192"]);
    assert!(rows_have(&admin.json(&["resource", "provider", "list"]), "name", "edge-rp-1"));
    let inv = admin.json(&["resource", "provider", "inventory", "list", &rp_uuid]);
    assert!(inv.as_array().unwrap().iter().any(|r| r["resource_class"] == "VCPU" && r["total"] == 16), "{inv}");
    // Placement is for admins only.
    let err = alice.fails(&["resource", "provider", "list"]);
    assert!(err.contains("403"), "{err}");

    admin.ok(&["project", "delete", "beta"]);
    assert!(!rows_have(&admin.json(&["project", "list"]), "Name", "beta"));
}

#[test]
fn single_node_site_with_the_openstack_cli() {
    let Some(cli) = openstack_cli() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = store_args(dir.path(), None);
    let url = free_url();
    bootstrap(&store, &url);
    let _site = coordinator(dir.path(), &store, "coordinator", &url, &[]);
    acceptance(&cli, &[url]);
}

#[test]
fn two_replicas_on_etcd_with_the_openstack_cli() {
    let Some(cli) = openstack_cli() else { return };
    let Some(etcd) = store::testing::EtcdServer::start_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = store_args(dir.path(), Some(&etcd.endpoint()));
    let (url_a, url_b) = (free_url(), free_url());
    bootstrap(&store, &url_a);
    let _a = coordinator(dir.path(), &store, "a", &url_a, &[]);
    let _b = coordinator(dir.path(), &store, "b", &url_b, &[]);
    acceptance(&cli, &[url_a, url_b]);
}

#[test]
fn two_replicas_on_etcd_share_tokens_and_revocations() {
    let Some(cli) = openstack_cli() else { return };
    let Some(etcd) = store::testing::EtcdServer::start_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = store_args(dir.path(), Some(&etcd.endpoint()));
    let (url_a, url_b) = (free_url(), free_url());
    bootstrap(&store, &url_a);
    let _a = coordinator(dir.path(), &store, "a", &url_a, &[]);
    let _b = coordinator(dir.path(), &store, "b", &url_b, &[]);

    let admin_a = Cloud::password(&cli, &url_a, "admin", ADMIN_PASSWORD, "admin");
    let token = admin_a.json(&["token", "issue"])["id"].as_str().unwrap().to_string();

    // The token issued by A works on B.
    let on_b = |t: &str| Cloud {
        cli: cli.clone(),
        env: vec![
            ("OS_AUTH_TYPE".into(), "v3token".into()),
            ("OS_TOKEN".into(), t.into()),
            ("OS_AUTH_URL".into(), format!("{url_b}/v3")),
            ("OS_PROJECT_NAME".into(), "admin".into()),
            ("OS_PROJECT_DOMAIN_NAME".into(), "Default".into()),
            ("OS_IDENTITY_API_VERSION".into(), "3".into()),
        ],
    };
    on_b(&token).json(&["project", "list"]);

    // A project made through A is seen through B.
    admin_a.ok(&["project", "create", "shared"]);
    assert!(rows_have(&on_b(&token).json(&["project", "list"]), "Name", "shared"));

    // Revoked on A, refused on both.
    admin_a.ok(&["token", "revoke", &token]);
    let err = on_b(&token).fails(&["project", "list"]);
    assert!(err.contains("401") || err.to_lowercase().contains("authenticat"), "{err}");
    let on_a = Cloud { env: on_b(&token).env.into_iter().map(|(k, v)| if k == "OS_AUTH_URL" { (k, format!("{url_a}/v3")) } else { (k, v) }).collect(), cli: cli.clone() };
    on_a.fails(&["project", "list"]);
}
