//! A host as an operator sees it through the openstack CLI: enrolled by its
//! agent, inventory in placement, down within the lease TTL when the agent
//! dies, back with the same identity when it restarts.

use std::time::{Duration, Instant};

use serde_json::Value;
use systest::*;

fn service_state(admin: &Cloud, host: &str) -> Option<(String, String)> {
    let rows = admin.json(&["compute", "service", "list"]);
    rows.as_array()?.iter().find(|r| r["Host"] == host).map(|r| (r["ID"].to_string(), r["State"].as_str().unwrap_or("").to_string()))
}

fn wait_state(admin: &Cloud, host: &str, want: &str, within: Duration) -> (String, Duration) {
    let start = Instant::now();
    loop {
        if let Some((id, state)) = service_state(admin, host) {
            if state == want {
                return (id, start.elapsed());
            }
        }
        assert!(start.elapsed() < within, "{host} not {want} within {within:?}: {:?}", service_state(admin, host));
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn agent_enrols_goes_down_and_comes_back_as_itself() {
    let Some(cli) = openstack_cli() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = store_args(dir.path(), None);
    let url = free_url();
    bootstrap(&store, &url);
    // The embedded store is locked while the coordinator runs: make the join token first.
    let mut args = store.clone();
    args.extend(["join-token".into(), "create".into(), "--ttl".into(), "300".into()]);
    let out = std::process::Command::new(bin("coordinator")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let join = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let ttl = 3;
    let _c = coordinator(dir.path(), &store, "coordinator", &url, &["--heartbeat-ttl", &ttl.to_string()]);
    let admin = Cloud::password(&cli, &url, "admin", ADMIN_PASSWORD, "admin");

    let host = format!("systest-{}", std::process::id());
    let state_dir = dir.path().join("agent");
    let pool = dir.path().join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let agent_args = |join: Option<&str>| {
        let mut a = vec![
            "--coordinator".to_string(),
            url.clone(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--instance-pool".into(),
            pool.display().to_string(),
            "--hostname".into(),
            host.clone(),
        ];
        if let Some(j) = join {
            a.extend(["--join-token".into(), j.into()]);
        }
        a
    };
    let mut agent = spawn(&bin("agent"), &agent_args(Some(&join)), &[], dir.path().join("agent1.log"));
    let (id, _) = wait_state(&admin, &host, "up", Duration::from_secs(30));

    // Its inventory is in placement.
    let rps: Value = admin.json(&["resource", "provider", "list"]);
    let rp = rps.as_array().unwrap().iter().find(|r| r["name"] == host.as_str()).unwrap_or_else(|| panic!("no provider {host}: {rps}")).clone();
    let inv = admin.json(&["resource", "provider", "inventory", "list", rp["uuid"].as_str().unwrap()]);
    for class in ["VCPU", "MEMORY_MB", "DISK_GB"] {
        assert!(inv.as_array().unwrap().iter().any(|r| r["resource_class"] == class), "{class} missing: {inv}");
    }
    assert!(rows_have_host(&admin.json(&["hypervisor", "list"]), &host));

    // Killed like a crash: down within the lease TTL (plus the CLI's own time).
    agent.kill();
    let (_, took) = wait_state(&admin, &host, "down", Duration::from_secs(ttl + 10));
    println!("host reported down {took:?} after the agent was killed (TTL {ttl} s)");

    // Restarted without a join token: the same host comes back up.
    let _agent = spawn(&bin("agent"), &agent_args(None), &[], dir.path().join("agent2.log"));
    let (id2, _) = wait_state(&admin, &host, "up", Duration::from_secs(30));
    assert_eq!(id, id2, "the restarted agent is the same host");

    // An operator disables the host with a reason.
    admin.ok(&["compute", "service", "set", "--disable", "--disable-reason", "maintenance", &host, "nova-compute"]);
    let rows = admin.json(&["compute", "service", "list", "--long"]);
    let row = rows.as_array().unwrap().iter().find(|r| r["Host"] == host.as_str()).unwrap();
    assert_eq!(row["Status"], "disabled");
    assert_eq!(row["Disabled Reason"], "maintenance");

    // The join token was used up.
    let again = spawn(&bin("agent"), &[
        "--coordinator".into(), url.clone(), "--state-dir".into(), dir.path().join("other").display().to_string(),
        "--instance-pool".into(), pool.display().to_string(), "--hostname".into(), format!("{host}-b"), "--join-token".into(), join.clone(),
    ], &[], dir.path().join("agent3.log"));
    let mut again = again;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = again.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "an agent with a used join token should exit");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
}

fn rows_have_host(rows: &Value, host: &str) -> bool {
    rows.as_array().unwrap().iter().any(|r| r["Hypervisor Hostname"] == host)
}
