//! Test support: a coordinator replica served in-process on a loopback port,
//! bootstrapped with an admin user, for this crate's tests and other crates'.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use store::Store;

use crate::config::Config;
use crate::identity::bootstrap;
use crate::state::AppState;

/// Password of the bootstrap admin in test sites.
pub const ADMIN_PASSWORD: &str = "admin-secret";

/// A replica serving on `url` until dropped.
pub struct TestSite {
    pub url: String,
    pub state: AppState,
    shutdown: Arc<crate::server::Shutdown>,
    task: tokio::task::JoinHandle<()>,
}

impl TestSite {
    /// Serves a replica over `store` (bootstrapping it) with `tweak` applied to the default config.
    pub async fn start(store: Arc<dyn Store>, tweak: impl FnOnce(&mut Config)) -> TestSite {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let mut config = Config { listen: addr, public_url: format!("http://{addr}"), ..Config::default() };
        tweak(&mut config);
        bootstrap::run(
            store.clone(),
            &config,
            &bootstrap::Options { admin_password: ADMIN_PASSWORD.into(), admin_user: "admin".into(), admin_project: "admin".into(), reset_password: false },
        )
        .await
        .expect("bootstrap");
        let state = crate::server::build_state(config, store).await.expect("build state");
        let shutdown = state.shutdown.clone();
        crate::identity::spawn_key_refresh(state.clone(), shutdown.clone());
        crate::hosts::spawn_monitor(state.clone(), shutdown.clone());
        let app = crate::server::router(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        TestSite { url: format!("http://{addr}"), state, shutdown, task }
    }

    /// A project-scoped token for `user` on `project` (both in the Default domain).
    pub async fn token(&self, user: &str, password: &str, project: &str) -> String {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {"name": user, "domain": {"id": "default"}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}}
        }});
        let r = reqwest::Client::new().post(format!("{}/v3/auth/tokens", self.url)).json(&body).send().await.expect("token request");
        assert_eq!(r.status().as_u16(), 201, "token for {user}: {}", r.text().await.unwrap_or_default());
        r.headers()["x-subject-token"].to_str().unwrap().to_string()
    }

    /// An admin token on the admin project.
    pub async fn admin_token(&self) -> String {
        self.token("admin", ADMIN_PASSWORD, "admin").await
    }

    /// Sends a request with a token and a JSON body; returns the status and the JSON answer (Null if none).
    pub async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut req = reqwest::Client::new().request(method.parse().unwrap(), format!("{}{}", self.url, path));
        if let Some(t) = token {
            req = req.header("x-auth-token", t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

impl Drop for TestSite {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        self.task.abort();
    }
}

/// The `openstack` CLI (`EDGECLOUD_OPENSTACK_CLI`, else the repository's `.venv`), or
/// None with a SKIPPED line when it is not installed and not required.
pub fn openstack_cli() -> Option<PathBuf> {
    let configured = std::env::var_os("EDGECLOUD_OPENSTACK_CLI").map(PathBuf::from);
    let candidate = configured.clone().unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/openstack")));
    if candidate.is_file() {
        return Some(candidate);
    }
    assert!(configured.is_none(), "EDGECLOUD_OPENSTACK_CLI names {} but it does not exist", candidate.display());
    println!("SKIPPED: the openstack CLI is not installed (scripts/test installs it into .venv)");
    None
}

/// Runs `openstack ARGS` as the bootstrap admin against the site at `url` (blocking);
/// asserts success and returns stdout.
pub fn openstack_as_admin(cli: &Path, url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cli)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("OS_AUTH_URL", format!("{url}/v3"))
        .env("OS_USERNAME", "admin")
        .env("OS_PASSWORD", ADMIN_PASSWORD)
        .env("OS_PROJECT_NAME", "admin")
        .env("OS_USER_DOMAIN_NAME", "Default")
        .env("OS_PROJECT_DOMAIN_NAME", "Default")
        .env("OS_IDENTITY_API_VERSION", "3")
        .env("OS_REGION_NAME", "RegionOne")
        .output()
        .expect("run the openstack CLI");
    assert!(out.status.success(), "openstack {args:?}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
