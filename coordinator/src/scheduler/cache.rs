//! The candidate cache: every provider, kept current by a store watch on
//! `/placement/rp/`, so scheduling never range-reads the store.
//!
//! The cache starts from one range read, then applies watch events from the
//! next revision on. Claims this replica makes are applied at once (the
//! transaction's revision is the records' new mod-revision), and an update
//! never replaces a record with an older one, so the watch echo of our own
//! write is a no-op. If the watch breaks (store restart, compaction), the
//! cache reloads and watches again.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use store::{EventKind, Store};
use uuid::Uuid;

use crate::placement::db::{self, Provider, Versioned};

/// A cached provider.
pub type CachedProvider = Arc<Versioned<Provider>>;

/// A host's providers, root first, as cached.
pub type CachedTree = Arc<[CachedProvider]>;

#[derive(Default)]
struct Inner {
    providers: HashMap<Uuid, CachedProvider>,
    /// Root providers (hosts), in no particular order, for sampling.
    roots: Vec<Uuid>,
    /// The tree of each root, same order: assembled when a provider of it
    /// changes, so a scan reads trees without lookups or reference counting.
    trees: Vec<CachedTree>,
    root_index: HashMap<Uuid, usize>,
    /// Store revision the cache reflects at least.
    revision: i64,
}

impl Inner {
    fn add_root(&mut self, u: Uuid) {
        if !self.root_index.contains_key(&u) {
            self.root_index.insert(u, self.roots.len());
            self.roots.push(u);
            self.trees.push(Arc::from([]));
        }
    }

    fn remove_root(&mut self, u: &Uuid) {
        if let Some(i) = self.root_index.remove(u) {
            self.roots.swap_remove(i);
            self.trees.swap_remove(i);
            if let Some(moved) = self.roots.get(i) {
                self.root_index.insert(*moved, i);
            }
        }
    }

    /// Re-assembles the tree of `root` after one of its providers changed.
    fn refresh_tree(&mut self, root: &Uuid) {
        if let Some(&i) = self.root_index.get(root) {
            let mut tree = Vec::new();
            collect_tree(self, root, &mut tree);
            self.trees[i] = tree.into();
        }
    }

    fn upsert(&mut self, p: Versioned<Provider>) {
        let old_root = match self.providers.get(&p.value.uuid) {
            Some(old) if old.mod_revision >= p.mod_revision => return,
            Some(old) => Some(old.value.root),
            None => None,
        };
        let (u, root) = (p.value.uuid, p.value.root);
        if p.value.parent.is_none() {
            self.add_root(u);
        } else {
            self.remove_root(&u);
        }
        self.providers.insert(u, Arc::new(p));
        self.refresh_tree(&root);
        if let Some(old) = old_root.filter(|o| *o != root) {
            self.refresh_tree(&old);
        }
    }

    fn remove(&mut self, u: &Uuid, revision: i64) {
        if self.providers.get(u).is_some_and(|p| p.mod_revision < revision) {
            if let Some(p) = self.providers.remove(u) {
                self.refresh_tree(&p.value.root);
            }
            self.remove_root(u);
        }
    }
}

/// Every provider of the site, fed by a watch.
pub struct ProviderCache {
    inner: Arc<RwLock<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProviderCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ProviderCache {
    /// Loads every provider and starts following changes.
    pub async fn start(store: Arc<dyn Store>) -> Result<ProviderCache, db::DbError> {
        let inner = Arc::new(RwLock::new(Inner::default()));
        let revision = load(store.as_ref(), &inner).await?;
        let task = tokio::spawn(follow(store, inner.clone(), revision));
        Ok(ProviderCache { inner, task })
    }

    /// A provider as cached.
    pub fn get(&self, u: &Uuid) -> Option<CachedProvider> {
        self.inner.read().unwrap().providers.get(u).cloned()
    }

    /// Number of hosts (root providers).
    pub fn host_count(&self) -> usize {
        self.inner.read().unwrap().roots.len()
    }

    /// Number of providers.
    pub fn provider_count(&self) -> usize {
        self.inner.read().unwrap().providers.len()
    }

    /// Store revision the cache reflects at least.
    pub fn revision(&self) -> i64 {
        self.inner.read().unwrap().revision
    }

    /// Applies records known to be current (e.g. just written by a claim).
    pub fn apply(&self, providers: impl IntoIterator<Item = Versioned<Provider>>) {
        let mut inner = self.inner.write().unwrap();
        for p in providers {
            inner.upsert(p);
        }
    }

    /// Visits every host tree (root first, then its descendants) once, in an
    /// order drawn from `seed`: a random first host and a random stride
    /// coprime with the number of hosts, until `visit` returns `false`. The
    /// hosts one request samples are thus scattered over the site rather
    /// than a run of neighbours, so concurrent requests (here and on other
    /// replicas) rarely sample, and race for, the same hosts. Holds the read
    /// lock for the scan.
    pub fn scan(&self, seed: u64, mut visit: impl FnMut(&[CachedProvider]) -> bool) {
        let inner = self.inner.read().unwrap();
        let n = inner.roots.len();
        if n == 0 {
            return;
        }
        let start = (seed % n as u64) as usize;
        let mut stride = 1 + ((seed >> 32) % n as u64) as usize;
        while gcd(stride, n) != 1 {
            stride += 1;
        }
        let mut at = start;
        for _ in 0..n {
            let tree = &inner.trees[at];
            at = (at + stride) % n;
            if tree.is_empty() {
                continue;
            }
            if !visit(tree) {
                return;
            }
        }
    }

    /// The tree of `root` (root first), as cached; empty for an unknown host.
    pub fn tree(&self, root: &Uuid) -> CachedTree {
        let inner = self.inner.read().unwrap();
        match inner.root_index.get(root) {
            Some(&i) => inner.trees[i].clone(),
            None => Arc::from([]),
        }
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn collect_tree(inner: &Inner, root: &Uuid, out: &mut Vec<CachedProvider>) {
    let Some(r) = inner.providers.get(root) else { return };
    out.push(r.clone());
    let mut i = out.len() - 1;
    while i < out.len() {
        let children: Vec<Uuid> = out[i].value.children.iter().copied().collect();
        for c in children {
            if let Some(p) = inner.providers.get(&c) {
                out.push(p.clone());
            }
        }
        i += 1;
    }
}

async fn load(store: &dyn Store, inner: &RwLock<Inner>) -> Result<i64, db::DbError> {
    let (providers, revision) = db::list_providers(store).await?;
    let mut fresh = Inner::default();
    for p in providers {
        fresh.upsert(p);
    }
    fresh.revision = revision;
    let mut guard = inner.write().unwrap();
    // Keep newer records a claim may have applied while we were reading.
    for (u, p) in guard.providers.drain() {
        if fresh.providers.get(&u).is_none_or(|f| f.mod_revision < p.mod_revision) && p.mod_revision > revision {
            fresh.upsert(Arc::unwrap_or_clone(p));
        }
    }
    *guard = fresh;
    Ok(revision)
}

/// A watch event as the cache applies it.
enum Change {
    Put(Box<Versioned<Provider>>),
    Delete(Uuid, i64),
}

/// Decodes the records of a watch response that are newer than the cache's
/// copy, outside the write lock. The claims this replica made are already
/// in the cache at their revision, so their echo is not decoded again.
fn decode_events(inner: &RwLock<Inner>, events: Vec<store::Event>) -> Vec<Change> {
    let newer: Vec<bool> = {
        let guard = inner.read().unwrap();
        events
            .iter()
            .map(|ev| match Uuid::parse_str(&ev.kv.key[db::RP_PREFIX.len()..]) {
                Ok(u) => guard.providers.get(&u).is_none_or(|p| p.mod_revision < ev.kv.mod_revision),
                Err(_) => true,
            })
            .collect()
    };
    let mut out = Vec::with_capacity(events.len());
    for (ev, newer) in events.into_iter().zip(newer) {
        if !newer {
            continue;
        }
        match ev.kind {
            EventKind::Put => match db::decode_provider(&ev.kv.key, &ev.kv.value) {
                Ok(value) => out.push(Change::Put(Box::new(Versioned { value, mod_revision: ev.kv.mod_revision }))),
                Err(e) => tracing::warn!(error = %e, "skipping unreadable provider record"),
            },
            EventKind::Delete => {
                if let Ok(u) = Uuid::parse_str(&ev.kv.key[db::RP_PREFIX.len()..]) {
                    out.push(Change::Delete(u, ev.kv.mod_revision));
                }
            }
        }
    }
    out
}

async fn follow(store: Arc<dyn Store>, inner: Arc<RwLock<Inner>>, mut revision: i64) {
    loop {
        match store.watch(db::RP_PREFIX, revision + 1).await {
            Ok(mut stream) => {
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(resp) => {
                            for ev in &resp.events {
                                revision = revision.max(ev.kv.mod_revision);
                            }
                            let changes = decode_events(&inner, resp.events);
                            let mut guard = inner.write().unwrap();
                            for change in changes {
                                match change {
                                    Change::Put(p) => guard.upsert(*p),
                                    Change::Delete(u, rev) => guard.remove(&u, rev),
                                }
                            }
                            guard.revision = guard.revision.max(revision);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "provider watch broke; reloading");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch providers; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        match load(store.as_ref(), &inner).await {
            Ok(r) => revision = r,
            Err(e) => tracing::warn!(error = %e, "cannot reload providers"),
        }
    }
}
