//! A replica's health, metrics and graceful shutdown, as an operator sees them.

use std::time::{Duration, Instant};

use systest::*;

#[test]
fn health_metrics_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_args(dir.path(), None);
    let url = free_url();
    bootstrap(&store, &url);
    // Bootstrapping again is harmless.
    bootstrap(&store, &url);
    let mut p = coordinator(dir.path(), &store, "c", &url, &[]);

    let h: serde_json::Value = reqwest::blocking::get(format!("{url}/healthz")).unwrap().json().unwrap();
    assert_eq!(h["status"], "ok");
    // An unknown path is a JSON 404, with a request id.
    let r = reqwest::blocking::get(format!("{url}/no/such/thing")).unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().get("x-request-id").is_some());
    let body = serde_json::json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "admin", "domain": {"id": "default"}, "password": ADMIN_PASSWORD}}}}});
    let r = reqwest::blocking::Client::new().post(format!("{url}/v3/auth/tokens")).json(&body).send().unwrap();
    assert_eq!(r.status(), 201);
    let m = reqwest::blocking::get(format!("{url}/metrics")).unwrap().text().unwrap();
    assert!(m.contains("edgecloud_tokens_issued_total 1"), "{m}");
    assert!(m.contains("route=\"/v3/auth\""), "{m}");

    // SIGTERM: the replica drains and exits cleanly.
    let start = Instant::now();
    p.stop();
    let status = p.child.wait().unwrap();
    assert!(status.success(), "exit status {status}; log:\n{}", p.log_text());
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(p.log_text().contains("shutting down"));
}
