//! The scheduler library: filters, weighers and the claim transaction.
//!
//! A [`Scheduler`] keeps every resource provider in a watch-fed cache
//! ([`cache::ProviderCache`]). To place a request it scans hosts from a
//! random starting point, runs the [`filters`] on each, fits the request into
//! the host's provider tree ([`fit`]) and weighs the fit ([`weighers`]) until
//! it has `sample_size` candidates (as kube-scheduler stops after enough
//! feasible nodes, so a request costs the same at 100 or 10,000 hosts). It
//! then claims on one of the best few, chosen at random so concurrent
//! requests do not all race for the same host. The claim is one store
//! transaction comparing the mod-revision of every provider it touches
//! ([`crate::placement::db::claim`]); when another scheduler got there first,
//! the transaction returns the providers as they are now, the cache takes
//! them, and the next candidate is tried. That is why any number of
//! schedulers on any number of replicas never over-commit a provider.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::Rng;
use store::Store;
use uuid::Uuid;

use crate::placement::db::{self, Claim, Consumer, DbError, Versioned};

pub mod cache;
pub mod filters;
pub mod fit;
pub mod request;
pub mod weighers;

pub use request::{GroupPolicy, NumaNodeRequest, RequestSpec, Selection, ServerGroup, SriovRequest};
pub use weighers::Strategy;

/// What the hosts module tells the scheduler about one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostStatus {
    /// The heartbeat lease is alive.
    pub up: bool,
    /// Not disabled by an operator.
    pub enabled: bool,
    pub availability_zone: Option<String>,
}

/// Source of host status, keyed by the host's root provider uuid; provided by
/// the hosts module. Any `Fn(Uuid) -> Option<HostStatus>` is one.
pub trait HostDirectory: Send + Sync {
    /// The status of a host, `None` if the host is unknown.
    fn status(&self, host: Uuid) -> Option<HostStatus>;
}

impl<F> HostDirectory for F
where
    F: Fn(Uuid) -> Option<HostStatus> + Send + Sync,
{
    fn status(&self, host: Uuid) -> Option<HostStatus> {
        self(host)
    }
}

/// A directory that reports every host up, enabled and in no zone (benchmarks and tests).
pub struct AllHostsUp;

impl HostDirectory for AllHostsUp {
    fn status(&self, _host: Uuid) -> Option<HostStatus> {
        Some(HostStatus { up: true, enabled: true, availability_zone: None })
    }
}

/// Tuning of a scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub strategy: Strategy,
    /// Hosts that pass the filters to collect before weighing.
    pub sample_size: usize,
    /// Claim on one of this many best hosts, at random (Nova's host_subset_size).
    pub host_subset_size: usize,
    /// Times to re-select after every candidate of a selection lost its race.
    pub max_rounds: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { strategy: Strategy::Spread, sample_size: 32, host_subset_size: 4, max_rounds: 8 }
    }
}

/// Errors of scheduling.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("No valid host was found. {0}")]
    NoValidHost(String),
    #[error("No valid host was found: every candidate was taken by concurrent requests")]
    Exhausted,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Counters of one scheduler.
#[derive(Debug, Default)]
pub struct Stats {
    pub claims: AtomicU64,
    /// Claims that lost a race and moved on to another candidate.
    pub conflicts: AtomicU64,
}

/// Places requests on hosts and claims their resources.
pub struct Scheduler {
    store: Arc<dyn Store>,
    cache: cache::ProviderCache,
    hosts: Arc<dyn HostDirectory>,
    filters: Vec<Arc<dyn filters::Filter>>,
    config: SchedulerConfig,
    stats: Stats,
}

impl Scheduler {
    /// Loads the provider cache and starts following the store.
    pub async fn start(store: Arc<dyn Store>, hosts: Arc<dyn HostDirectory>, config: SchedulerConfig) -> Result<Scheduler, DbError> {
        let cache = cache::ProviderCache::start(store.clone()).await?;
        Ok(Scheduler { store, cache, hosts, filters: filters::default_filters(), config, stats: Stats::default() })
    }

    /// The provider cache.
    pub fn cache(&self) -> &cache::ProviderCache {
        &self.cache
    }

    /// Claims made and races lost so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Picks up to `sample_size` hosts that pass every filter and fit the
    /// request, best first.
    fn select(&self, req: &RequestSpec) -> Result<Vec<(f64, Selection)>, ScheduleError> {
        let hosts = self.cache.host_count();
        if hosts == 0 {
            return Err(ScheduleError::NoValidHost("There are no hosts.".into()));
        }
        let start = rand::thread_rng().gen_range(0..hosts);
        let mut rejected = vec![0usize; self.filters.len()];
        let mut unfit = 0usize;
        let mut out = Vec::with_capacity(self.config.sample_size);
        self.cache.scan(start, |tree| {
            let status = self.hosts.status(tree[0].value.uuid);
            let view = filters::HostView { tree, status: status.as_ref() };
            if let Some(i) = self.filters.iter().position(|f| !f.passes(&view, req)) {
                rejected[i] += 1;
                return true;
            }
            match fit::fit(tree, req) {
                Some(sel) => {
                    let w = weighers::weigh(self.config.strategy, tree, &sel.allocations);
                    out.push((w, sel));
                }
                None => unfit += 1,
            }
            out.len() < self.config.sample_size
        });
        if out.is_empty() {
            let mut why: Vec<String> = self
                .filters
                .iter()
                .zip(&rejected)
                .filter(|(_, n)| **n > 0)
                .map(|(f, n)| format!("{} rejected {n}", f.name()))
                .collect();
            if unfit > 0 {
                why.push(format!("{unfit} could not fit the whole request"));
            }
            return Err(ScheduleError::NoValidHost(format!("{hosts} hosts: {}.", why.join(", "))));
        }
        out.sort_by(|a, b| b.0.total_cmp(&a.0));
        let k = self.config.host_subset_size.clamp(1, out.len());
        let pick = rand::thread_rng().gen_range(0..k);
        out.swap(0, pick);
        Ok(out)
    }

    /// Places `req` and claims its resources; returns where it landed.
    pub async fn schedule(&self, req: &RequestSpec) -> Result<Selection, ScheduleError> {
        let consumer = Consumer {
            uuid: req.consumer,
            project_id: req.project_id.clone(),
            user_id: req.user_id.clone(),
            consumer_type: Some("INSTANCE".into()),
            generation: 0,
            allocations: Default::default(),
        };
        for _ in 0..self.config.max_rounds {
            let candidates = self.select(req)?;
            for (_, first_fit) in candidates {
                // Re-fit against the cache as it is now: claims of this
                // replica since the selection are already in it.
                let tree = self.cache.tree(&first_fit.host);
                if tree.is_empty() {
                    continue;
                }
                let Some(sel) = fit::fit(&tree, req) else { continue };
                let touched: Vec<Versioned<db::Provider>> =
                    tree.iter().filter(|p| sel.allocations.contains_key(&p.value.uuid)).map(|p| (**p).clone()).collect();
                match db::claim(self.store.as_ref(), &consumer, &touched, &sel.allocations, None).await {
                    Ok(Claim::Claimed { providers: now, .. }) => {
                        self.cache.apply(now);
                        self.stats.claims.fetch_add(1, Ordering::Relaxed);
                        return Ok(sel);
                    }
                    Ok(Claim::Stale { providers: now, .. }) => {
                        self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                        self.cache.apply(now.into_iter().flatten());
                    }
                    Err(DbError::Capacity { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Err(ScheduleError::Exhausted)
    }
}
