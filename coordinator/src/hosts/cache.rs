//! What one replica keeps in memory about hosts, so that a heartbeat costs one store
//! round trip (the keep-alive of the host's lease) instead of three.
//!
//! - Every host's record (its credential hash, enabled flag, name) and the lease of its
//!   heartbeat key, fed by one watch on the `/hosts/` prefix, so the two are always a
//!   consistent picture at one store revision.
//! - The time of the last heartbeat this replica served for each host (for
//!   os-services' `updated_at`; never written to the store).
//!
//! Correctness does not rest on the watch being quick. A heartbeat is accepted on the
//! fast path only if the secret matches the cached hash *and* the keep-alive of the
//! cached lease succeeds; every change that takes a credential away revokes the host's
//! lease before the call that made it returns (host delete, re-enrolment with a new
//! secret), so once that call has returned the old credential fails its keep-alive on
//! every replica and falls back to the slow path, which reads the record from the store
//! and refuses it. Anything else the cache cannot answer (unknown host, hash mismatch,
//! no lease, watch not running) also takes the slow path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use store::record::decode;
use store::{EventKind, KeyValue, LeaseId, Store, StoreError};
use time::OffsetDateTime;

use super::records::{self, AliveRecord, HostRecord};

/// A host as the cache knows it.
#[derive(Clone, Debug, Default)]
struct Entry {
    /// The record and the revision it was written at.
    record: Option<(Arc<HostRecord>, i64)>,
    /// The heartbeat key's lease, when the lease was granted, and the key's revision.
    lease: Option<(LeaseId, Option<OffsetDateTime>, i64)>,
}

#[derive(Default)]
struct Inner {
    hosts: RwLock<HashMap<String, Entry>>,
    /// Last heartbeat this replica served, per host.
    beats: RwLock<HashMap<String, OffsetDateTime>>,
    /// Whether the watch runs (the fast path is off while it does not).
    live: AtomicBool,
}

/// A host whose credential matched the cache.
#[derive(Clone, Debug)]
pub struct CachedHost {
    pub record: Arc<HostRecord>,
    /// The lease of its heartbeat key.
    pub lease: LeaseId,
}

/// The replica's host cache; stops following the store when dropped.
pub struct ReplicaCache {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ReplicaCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ReplicaCache {
    /// Starts loading and following the store in the background; until the watch runs,
    /// every heartbeat takes the slow path.
    pub fn start(store: Arc<dyn Store>) -> Arc<ReplicaCache> {
        let inner = Arc::new(Inner::default());
        let task = tokio::spawn(follow(store, inner.clone()));
        Arc::new(ReplicaCache { inner, task })
    }

    /// Whether the cache follows the store now.
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }

    /// The host and its lease if `secret` matches the cached credential hash and a
    /// lease is known; `None` sends the caller to the slow path.
    pub fn verify(&self, host_id: &str, secret: &str) -> Option<CachedHost> {
        if !self.is_live() {
            return None;
        }
        let hosts = self.inner.hosts.read().unwrap_or_else(|p| p.into_inner());
        let e = hosts.get(host_id)?;
        let (record, _) = e.record.as_ref()?;
        let (lease, _, _) = e.lease?;
        if lease == 0 || !records::constant_time_eq(&records::sha256_hex(secret), &record.credential_sha256) {
            return None;
        }
        Some(CachedHost { record: record.clone(), lease })
    }

    /// Notes a lease this replica just attached to the host's heartbeat key at `revision`.
    pub fn learned_lease(&self, host_id: &str, lease: LeaseId, revision: i64) {
        let mut hosts = self.inner.hosts.write().unwrap_or_else(|p| p.into_inner());
        let e = hosts.entry(host_id.to_string()).or_default();
        if e.lease.is_none_or(|(_, _, rev)| rev < revision) {
            e.lease = Some((lease, Some(OffsetDateTime::now_utc()), revision));
        }
    }

    /// Forgets the host's lease (it turned out to be gone).
    pub fn forget_lease(&self, host_id: &str, lease: LeaseId) {
        let mut hosts = self.inner.hosts.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = hosts.get_mut(host_id) {
            if e.lease.is_some_and(|(l, _, _)| l == lease) {
                e.lease = None;
            }
        }
    }

    /// Notes that this replica served a heartbeat of the host now.
    pub fn beat(&self, host_id: &str) {
        let now = OffsetDateTime::now_utc();
        let mut beats = self.inner.beats.write().unwrap_or_else(|p| p.into_inner());
        match beats.get_mut(host_id) {
            Some(t) => *t = now,
            None => {
                beats.insert(host_id.to_string(), now);
            }
        }
    }

    /// The time of the host's last heartbeat, as well as this replica can tell without
    /// asking the store (see [`last_heartbeat`] for what it means).
    pub fn last_heartbeat(&self, record: &HostRecord, up: bool, ttl_secs: i64) -> Option<OffsetDateTime> {
        let served = self.inner.beats.read().unwrap_or_else(|p| p.into_inner()).get(&record.id).copied();
        let since = {
            let hosts = self.inner.hosts.read().unwrap_or_else(|p| p.into_inner());
            hosts.get(&record.id).and_then(|e| e.lease).and_then(|(_, since, _)| since)
        };
        last_heartbeat(record, up, ttl_secs, served, since, OffsetDateTime::now_utc())
    }
}

/// The time of a host's last heartbeat, from what a replica knows without a store write
/// per heartbeat:
///
/// - an up host (its lease lives): the latest of the last heartbeat this replica served,
///   the time the current lease was granted, and `now - ttl` (a live lease proves a
///   heartbeat within the last TTL; that bound is what a host that heartbeats through
///   another replica shows, so it is exact to within one TTL);
/// - a down host: the last heartbeat this replica served, else the time the monitor
///   recorded it down minus the TTL (the lease ran out one TTL after the last
///   heartbeat), else none (it never heartbeated).
pub fn last_heartbeat(
    record: &HostRecord,
    up: bool,
    ttl_secs: i64,
    served: Option<OffsetDateTime>,
    lease_since: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Option<OffsetDateTime> {
    let ttl = time::Duration::seconds(ttl_secs.max(0));
    if up {
        let bound = now - ttl;
        let known = served.into_iter().chain(lease_since).max();
        return Some(known.map_or(bound, |k| k.max(bound)).min(now));
    }
    if served.is_some() {
        return served;
    }
    let down_at = record
        .transitions
        .iter()
        .rev()
        .find(|t| t.state == records::HostState::Down)
        .and_then(|t| OffsetDateTime::parse(&t.at, &time::format_description::well_known::Rfc3339).ok())?;
    Some(down_at - ttl)
}

/// Parses an RFC 3339 time.
fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// Which of the cached keys a key is.
enum Key<'a> {
    Record(&'a str),
    Alive(&'a str),
}

fn classify(key: &str) -> Option<Key<'_>> {
    if let Some(id) = key.strip_prefix(records::RECORDS_PREFIX) {
        return Some(Key::Record(id));
    }
    key.strip_prefix(records::ALIVE_PREFIX).map(Key::Alive)
}

fn apply_put(hosts: &mut HashMap<String, Entry>, kv: &KeyValue) {
    match classify(&kv.key) {
        Some(Key::Record(id)) => {
            let e = hosts.entry(id.to_string()).or_default();
            if e.record.as_ref().is_some_and(|(_, rev)| *rev >= kv.mod_revision) {
                return;
            }
            match decode::<HostRecord>(&kv.key, &kv.value) {
                Ok(r) => e.record = Some((Arc::new(r), kv.mod_revision)),
                Err(err) => {
                    tracing::warn!(key = %kv.key, error = %err, "host cache cannot decode a host record");
                    e.record = None;
                }
            }
        }
        Some(Key::Alive(id)) => {
            let e = hosts.entry(id.to_string()).or_default();
            if e.lease.is_some_and(|(_, _, rev)| rev >= kv.mod_revision) {
                return;
            }
            let since = decode::<AliveRecord>(&kv.key, &kv.value).ok().and_then(|a| parse_time(&a.since));
            e.lease = Some((kv.lease, since, kv.mod_revision));
        }
        None => {}
    }
}

fn apply_delete(hosts: &mut HashMap<String, Entry>, kv: &KeyValue) {
    let (id, record) = match classify(&kv.key) {
        Some(Key::Record(id)) => (id, true),
        Some(Key::Alive(id)) => (id, false),
        None => return,
    };
    let Some(e) = hosts.get_mut(id) else { return };
    // A replayed delete older than what the entry holds (the key was written again
    // since) changes nothing.
    if record {
        if e.record.as_ref().is_some_and(|(_, rev)| *rev < kv.mod_revision) {
            e.record = None;
        }
    } else if e.lease.is_some_and(|(_, _, rev)| rev < kv.mod_revision) {
        e.lease = None;
    }
    if e.record.is_none() && e.lease.is_none() {
        hosts.remove(id);
    }
}

/// Replaces the cache's content with the store's; returns the revision to watch after.
async fn load(store: &dyn Store, inner: &Inner) -> Result<i64, StoreError> {
    let recs = store.range(records::RECORDS_PREFIX).await?;
    let alive = store.range(records::ALIVE_PREFIX).await?;
    let mut fresh = HashMap::with_capacity(recs.kvs.len());
    for kv in recs.kvs.iter().chain(&alive.kvs) {
        apply_put(&mut fresh, kv);
    }
    *inner.hosts.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    // Events after the older read are replayed; puts and deletes older than what an
    // entry holds are ignored, so the replay is harmless.
    Ok(recs.revision.min(alive.revision))
}

async fn follow(store: Arc<dyn Store>, inner: Arc<Inner>) {
    let mut pause = Duration::from_millis(200);
    loop {
        match run(store.as_ref(), &inner).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "host cache lost the store; heartbeats take the slow path until it reloads"),
        }
        inner.live.store(false, Ordering::Release);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

async fn run(store: &dyn Store, inner: &Inner) -> Result<(), StoreError> {
    let revision = load(store, inner).await?;
    let mut events = store.watch("/hosts/", revision + 1).await?;
    inner.live.store(true, Ordering::Release);
    tracing::debug!(revision, "host cache follows the store");
    while let Some(item) = events.next().await {
        let resp = item?;
        let mut hosts = inner.hosts.write().unwrap_or_else(|p| p.into_inner());
        for ev in &resp.events {
            match ev.kind {
                EventKind::Put => apply_put(&mut hosts, &ev.kv),
                EventKind::Delete => apply_delete(&mut hosts, &ev.kv),
            }
        }
    }
    Err(StoreError::Unavailable("the watch of /hosts/ ended".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::records::{HostState, Transition};

    fn record() -> HostRecord {
        HostRecord {
            id: "h".into(),
            hostname: "h".into(),
            zone: "nova".into(),
            enabled: true,
            disabled_reason: None,
            credential_sha256: String::new(),
            state: None,
            transitions: vec![],
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn last_heartbeat_of_up_and_down_hosts() {
        let now = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let s = time::Duration::seconds;
        let r = record();
        // Up: the bound now - ttl unless something later is known.
        assert_eq!(last_heartbeat(&r, true, 10, None, None, now), Some(now - s(10)));
        assert_eq!(last_heartbeat(&r, true, 10, Some(now - s(2)), Some(now - s(600)), now), Some(now - s(2)));
        assert_eq!(last_heartbeat(&r, true, 10, None, Some(now - s(3)), now), Some(now - s(3)));
        assert_eq!(last_heartbeat(&r, true, 10, Some(now - s(100)), None, now), Some(now - s(10)));
        // Down: never heartbeated, served here, recorded down by the monitor.
        assert_eq!(last_heartbeat(&r, false, 10, None, None, now), None);
        assert_eq!(last_heartbeat(&r, false, 10, Some(now - s(50)), None, now), Some(now - s(50)));
        let mut r = r;
        let down = OffsetDateTime::from_unix_timestamp(999_000).unwrap();
        r.transitions = vec![Transition { state: HostState::Down, at: down.format(&time::format_description::well_known::Rfc3339).unwrap() }];
        assert_eq!(last_heartbeat(&r, false, 10, None, None, now), Some(down - s(10)));
    }

    #[test]
    fn replayed_events_do_not_undo_newer_ones() {
        let mut hosts = HashMap::new();
        let kv = |key: &str, rev: i64, lease: i64| KeyValue {
            key: key.into(),
            value: store::record::encode(&AliveRecord { since: "2024-01-01T00:00:00Z".into() }),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease,
        };
        apply_put(&mut hosts, &kv("/hosts/alive/h", 10, 7));
        apply_put(&mut hosts, &kv("/hosts/alive/h", 5, 3));
        assert_eq!(hosts["h"].lease.unwrap().0, 7);
        apply_delete(&mut hosts, &KeyValue { value: vec![], ..kv("/hosts/alive/h", 9, 0) });
        assert_eq!(hosts["h"].lease.unwrap().0, 7, "a replayed delete older than the put changes nothing");
        apply_put(&mut hosts, &kv("/hosts/inventory/h", 14, 0));
        assert_eq!(hosts.len(), 1);
        apply_delete(&mut hosts, &KeyValue { value: vec![], ..kv("/hosts/alive/h", 12, 0) });
        assert!(hosts.is_empty());
        apply_put(&mut hosts, &kv("/hosts/alive/h", 13, 9));
        assert_eq!(hosts["h"].lease.unwrap().0, 9);
    }
}
