//! The host monitor: records up/down transitions of hosts, on the elected leader only.
//!
//! Whether a host is up is always read live from its heartbeat key; the monitor adds
//! the history (when each host went down or came back) to the host records, logs each
//! transition, and removes expired join tokens. Every record update is a
//! compare-and-swap, so a monitor that lost its leadership mid-write cannot undo a
//! newer one.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use store::election::Election;
use store::record::{decode, encode};
use store::{Compare, EventKind, Op, Store, StoreError, Txn};
use tokio::sync::watch;

use super::error::HostsError;
use super::records::{self, HostRecord, HostState};
use super::{heartbeat, join_tokens};
use crate::server::Shutdown;
use crate::state::AppState;

/// Name of the monitor's election.
pub const ELECTION: &str = "host-monitor";
/// How often the leader re-checks every host and sweeps join tokens.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Starts the monitor's campaign and loop in the background.
pub fn spawn(state: AppState, shutdown: Arc<Shutdown>) {
    let stop = shutdown.subscribe();
    tokio::spawn(run(state, stop));
}

async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let candidate = uuid::Uuid::new_v4().to_string();
    let ttl = state.config.hosts.heartbeat_ttl_secs.max(2);
    let election = loop {
        match Election::campaign(state.store.clone(), ELECTION, &candidate, ttl) {
            Ok(e) => break e,
            Err(e) => {
                tracing::warn!(error = %e, "host monitor cannot campaign; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let mut leader = election.subscribe();
    loop {
        if *stop.borrow() {
            return;
        }
        if !*leader.borrow_and_update() {
            tokio::select! {
                r = leader.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            continue;
        }
        tracing::info!(candidate = %candidate, "host monitor leads");
        tokio::select! {
            r = lead(state.store.as_ref()) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "host monitor pass failed; starting over");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
            _ = async { let _ = leader.wait_for(|l| !*l).await.map(|_| ()); } => tracing::info!(candidate = %candidate, "host monitor stepped down"),
            _ = stop.changed() => return,
        }
    }
}

/// One term of leadership: reconcile, then follow the heartbeat keys until an error.
async fn lead(store: &dyn Store) -> Result<(), HostsError> {
    let revision = reconcile(store).await?;
    let mut events = store.watch(records::ALIVE_PREFIX, revision + 1).await?;
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.tick().await;
    loop {
        tokio::select! {
            item = events.next() => match item {
                Some(Ok(resp)) => {
                    for ev in resp.events {
                        let Some(id) = ev.kv.key.strip_prefix(records::ALIVE_PREFIX) else { continue };
                        let state = if ev.kind == EventKind::Put { HostState::Up } else { HostState::Down };
                        record_state(store, id, state).await?;
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(StoreError::Unavailable("the watch of heartbeats ended".into()).into()),
            },
            _ = sweep.tick() => {
                reconcile(store).await?;
                let n = join_tokens::sweep_expired(store).await?;
                if n > 0 {
                    tracing::info!(removed = n, "expired join tokens removed");
                }
            }
        }
    }
}

/// Brings every host record's recorded state in line with its heartbeat key; returns
/// the revision at which the heartbeat keys were read.
pub async fn reconcile(store: &dyn Store) -> Result<i64, HostsError> {
    let alive = store.range(records::ALIVE_PREFIX).await?;
    let up: std::collections::HashSet<&str> =
        alive.kvs.iter().filter_map(|kv| kv.key.strip_prefix(records::ALIVE_PREFIX)).collect();
    for kv in store.range(records::RECORDS_PREFIX).await?.kvs {
        let record: HostRecord = decode(&kv.key, &kv.value)?;
        let actual = if up.contains(record.id.as_str()) { HostState::Up } else { HostState::Down };
        // A host that never heartbeated has no state yet; it is not "down" in the history.
        if record.state != Some(actual) && (record.state.is_some() || actual == HostState::Up) {
            record_state(store, &record.id, actual).await?;
        }
    }
    Ok(alive.revision)
}

/// Records that host `id` entered `state` (if its record does not say so already).
pub async fn record_state(store: &dyn Store, id: &str, state: HostState) -> Result<(), HostsError> {
    let key = records::record_key(id);
    for _ in 0..8 {
        let Some(kv) = store.get(&key).await? else { return Ok(()) };
        let mut record: HostRecord = decode(&kv.key, &kv.value)?;
        if record.state == Some(state) {
            return Ok(());
        }
        // The heartbeat key is the truth; an event may be stale by the time we get here.
        let live = if heartbeat::is_up(store, id).await? { HostState::Up } else { HostState::Down };
        if live != state {
            return Ok(());
        }
        let at = records::now_rfc3339();
        record.record_transition(state, at.clone());
        let txn = Txn::new().when(Compare::ModRevision(key.clone(), kv.mod_revision)).and_then(Op::put(key.clone(), encode(&record)));
        if store.txn(txn).await?.succeeded {
            match state {
                HostState::Up => tracing::info!(host_id = %id, hostname = %record.hostname, at = %at, "host is up"),
                HostState::Down => tracing::warn!(host_id = %id, hostname = %record.hostname, at = %at, "host is down"),
            }
            return Ok(());
        }
    }
    Err(HostsError::Contention)
}
