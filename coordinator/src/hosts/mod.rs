//! Hosts: join tokens, enrolment, the agent API, heartbeats and the host monitor.
//!
//! - An administrator creates a one-use join token ([`join_tokens`]), through
//!   `POST /edge/v1/join-tokens` or `coordinator join-token create`.
//! - The agent exchanges it once for a host id and secret ([`enrol`]); the secret is
//!   its credential on every later call ([`auth`]), and it reaches only its own host.
//! - The agent heartbeats ([`heartbeat`]: a store lease per host), reports its
//!   inventory (kept, and synced to placement as a provider tree: [`provider_tree`]),
//!   long-polls its desired state and reports its observed state ([`agent_api`]).
//! - A host is up while its heartbeat key exists; the elected host monitor
//!   ([`monitor`]) records the transitions. Administrators enable and disable hosts
//!   ([`admin_api`], and Nova's os-services in `crate::compute`).
//! - The scheduler learns which hosts are up and enabled from [`directory::HostCache`].
//! - Each replica keeps hosts' credential hashes and heartbeat leases in memory
//!   ([`cache::ReplicaCache`], fed by a watch of `/hosts/`), so a heartbeat costs one
//!   store round trip (a keep-alive); deleting or re-enrolling a host revokes its lease,
//!   so the old credential fails on every replica once that call returned.

use std::sync::Arc;

use axum::Router;

use crate::server::Shutdown;
use crate::state::AppState;

pub mod admin_api;
pub mod agent_api;
pub mod auth;
pub mod cache;
pub mod directory;
pub mod enrol;
pub mod error;
pub mod heartbeat;
pub mod join_tokens;
pub mod monitor;
pub mod provider_tree;
pub mod records;
pub mod registry;

pub use error::HostsError;

/// The agent API, nested under `/agent/v1`; callers authenticate with their host credential.
pub fn agent_routes() -> Router<AppState> {
    agent_api::routes()
}

/// Admin API for hosts (join tokens, enable/disable), nested under `/edge/v1`.
pub fn admin_routes() -> Router<AppState> {
    admin_api::routes()
}

/// Starts the host monitor (it runs on the elected leader only).
pub fn spawn_monitor(state: AppState, shutdown: Arc<Shutdown>) {
    monitor::spawn(state, shutdown)
}

/// Creates a one-use join token valid for `ttl_secs`, optionally bound to a host name.
pub async fn create_join_token(store: &dyn store::Store, ttl_secs: i64, host: Option<String>) -> anyhow::Result<String> {
    Ok(join_tokens::create(store, ttl_secs, host).await?.token)
}
