//! What every request handler can reach.

use std::sync::Arc;

use store::Store;

use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::Metrics;

/// Shared state of one coordinator replica; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub config: Arc<Config>,
    pub identity: Arc<Identity>,
    pub metrics: Arc<Metrics>,
    /// Flips to `true` when the replica shuts down (long polls end early on it).
    pub shutdown: Arc<crate::server::Shutdown>,
    /// Hosts' records and heartbeat leases as this replica sees them (the heartbeat fast path).
    pub hosts: Arc<crate::hosts::cache::ReplicaCache>,
}
