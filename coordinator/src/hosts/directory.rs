//! Host status for the scheduler: an in-memory view of every host's record and
//! heartbeat key, kept current by two store watches.
//!
//! The scheduler asks per candidate host, synchronously and often, so the answer
//! must come from memory; the watches make it follow the store within a moment.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use store::record::decode;
use store::{EventKind, Store, StoreError};
use uuid::Uuid;

use super::records::{self, HostRecord};
use crate::scheduler::{HostDirectory, HostStatus};

#[derive(Clone, Debug, Default)]
struct Entry {
    /// (enabled, zone) from the host record; `None` when the record is gone.
    record: Option<(bool, String)>,
    up: bool,
}

type Map = Arc<RwLock<HashMap<Uuid, Entry>>>;

/// A watch-fed directory of host status; stops following the store when dropped.
pub struct HostCache {
    map: Map,
    task: tokio::task::JoinHandle<()>,
}

impl HostCache {
    /// Loads every host and starts following changes.
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<HostCache>, StoreError> {
        let map: Map = Arc::default();
        let revisions = load(store.as_ref(), &map).await?;
        let task = tokio::spawn(follow(store, map.clone(), revisions));
        Ok(Arc::new(HostCache { map, task }))
    }

    /// How many hosts the directory knows.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).values().filter(|e| e.record.is_some()).count()
    }

    /// Whether the directory knows no host.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for HostCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HostDirectory for HostCache {
    fn status(&self, host: Uuid) -> Option<HostStatus> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let e = map.get(&host)?;
        let (enabled, zone) = e.record.clone()?;
        Some(HostStatus { up: e.up, enabled, availability_zone: Some(zone) })
    }
}

fn id_of(key: &str, prefix: &str) -> Option<Uuid> {
    key.strip_prefix(prefix).and_then(|id| Uuid::parse_str(id).ok())
}

/// Replaces the map's content with the store's; returns the revisions of the two reads.
async fn load(store: &dyn Store, map: &Map) -> Result<(i64, i64), StoreError> {
    let recs = store.range(records::RECORDS_PREFIX).await?;
    let alive = store.range(records::ALIVE_PREFIX).await?;
    let mut fresh: HashMap<Uuid, Entry> = HashMap::new();
    for kv in &recs.kvs {
        let (Some(id), Ok(r)) = (id_of(&kv.key, records::RECORDS_PREFIX), decode::<HostRecord>(&kv.key, &kv.value)) else { continue };
        fresh.entry(id).or_default().record = Some((r.enabled, r.zone));
    }
    for kv in &alive.kvs {
        if let Some(id) = id_of(&kv.key, records::ALIVE_PREFIX) {
            fresh.entry(id).or_default().up = true;
        }
    }
    *map.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    Ok((recs.revision, alive.revision))
}

async fn follow(store: Arc<dyn Store>, map: Map, mut revisions: (i64, i64)) {
    loop {
        if let Err(e) = watch(store.as_ref(), &map, revisions).await {
            tracing::warn!(error = %e, "host directory lost its watch; reloading");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        match load(store.as_ref(), &map).await {
            Ok(r) => revisions = r,
            Err(e) => tracing::warn!(error = %e, "host directory cannot reload"),
        }
    }
}

async fn watch(store: &dyn Store, map: &Map, (records_rev, alive_rev): (i64, i64)) -> Result<(), StoreError> {
    let mut recs = store.watch(records::RECORDS_PREFIX, records_rev + 1).await?;
    let mut alive = store.watch(records::ALIVE_PREFIX, alive_rev + 1).await?;
    loop {
        tokio::select! {
            item = recs.next() => {
                let resp = item.ok_or_else(|| StoreError::Unavailable("watch ended".into()))??;
                let mut m = map.write().unwrap_or_else(|p| p.into_inner());
                for ev in resp.events {
                    let Some(id) = id_of(&ev.kv.key, records::RECORDS_PREFIX) else { continue };
                    let entry = m.entry(id).or_default();
                    entry.record = match ev.kind {
                        EventKind::Put => decode::<HostRecord>(&ev.kv.key, &ev.kv.value).ok().map(|r| (r.enabled, r.zone)),
                        EventKind::Delete => None,
                    };
                }
            }
            item = alive.next() => {
                let resp = item.ok_or_else(|| StoreError::Unavailable("watch ended".into()))??;
                let mut m = map.write().unwrap_or_else(|p| p.into_inner());
                for ev in resp.events {
                    let Some(id) = id_of(&ev.kv.key, records::ALIVE_PREFIX) else { continue };
                    m.entry(id).or_default().up = ev.kind == EventKind::Put;
                }
            }
        }
    }
}
