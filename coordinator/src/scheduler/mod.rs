//! The scheduler library: filters, weighers and the claim transaction.
//!
//! A [`Scheduler`] keeps every resource provider in a watch-fed cache
//! ([`cache::ProviderCache`]). To place a request it scans hosts in a
//! random order (random start and stride), runs the [`filters`] on each, fits the request into
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
//! A member of a server group is also placed against the group's record
//! ([`groups`]), which its claim compares and extends in the same
//! transaction, so concurrent members of one group cannot both miss each other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::Rng;
use store::Store;
use uuid::Uuid;

use crate::placement::db::{self, Claim, Consumer, DbError, Guard, Versioned};

pub mod cache;
pub mod filters;
pub mod fit;
pub mod groups;
pub mod request;
pub mod weighers;

/// Times a member of a server group re-selects, without it counting as a
/// round, because other members were placed while it was choosing.
const MAX_GROUP_CHANGES: usize = 256;

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
        Self { strategy: Strategy::Spread, sample_size: 32, host_subset_size: 8, max_rounds: 8 }
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
    /// request, in the order to try them: the best `host_subset_size` in a
    /// random order (so concurrent requests, here and on other replicas,
    /// spread over them rather than all racing for the best), then the rest
    /// best first.
    fn select(&self, req: &RequestSpec) -> Result<Vec<Uuid>, ScheduleError> {
        let hosts = self.cache.host_count();
        if hosts == 0 {
            return Err(ScheduleError::NoValidHost("There are no hosts.".into()));
        }
        let mut rng = rand::thread_rng();
        let mut rejected = vec![0usize; self.filters.len()];
        let mut unfit = 0usize;
        let mut out: Vec<(f64, Uuid)> = Vec::with_capacity(self.config.sample_size);
        self.cache.scan(rng.gen(), |tree| {
            let status = self.hosts.status(tree[0].value.uuid);
            let view = filters::HostView { tree, status: status.as_ref() };
            if let Some(i) = self.filters.iter().position(|f| !f.implied_by_fit() && !f.passes(&view, req)) {
                rejected[i] += 1;
                return true;
            }
            match fit::fit_taken(tree, req) {
                Some(f) => out.push((weighers::weigh(self.config.strategy, tree, &f.taken), tree[0].value.uuid)),
                // Say which rule turned the host down.
                None => match self.filters.iter().position(|f| f.implied_by_fit() && !f.passes(&view, req)) {
                    Some(i) => rejected[i] += 1,
                    None => unfit += 1,
                },
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
        out[..k].shuffle(&mut rng);
        Ok(out.into_iter().map(|(_, h)| h).collect())
    }

    /// Places `req` and claims its resources; returns where it landed.
    ///
    /// A member of a server group is placed against the group's membership
    /// as recorded in the store, and its claim compares and extends that
    /// record ([`groups`]), so concurrent members of one group are placed one
    /// after another however many schedulers place them.
    pub async fn schedule(&self, req: &RequestSpec) -> Result<Selection, ScheduleError> {
        let consumer = Consumer {
            uuid: req.consumer,
            project_id: req.project_id.clone(),
            user_id: req.user_id.clone(),
            consumer_type: Some("INSTANCE".into()),
            generation: 0,
            allocations: Default::default(),
        };
        let mut group = match &req.server_group {
            Some(g) => Some(groups::read(self.store.as_ref(), &g.id).await?),
            None => None,
        };
        let mut rounds = 0;
        let mut group_changes = 0;
        'round: while rounds < self.config.max_rounds {
            rounds += 1;
            // The request as the filters see it: with the members recorded now.
            let with_members;
            let effective = match (&req.server_group, &group) {
                (Some(g), Some(state)) if !state.members.members.is_empty() => {
                    let mut r = req.clone();
                    let mut g = g.clone();
                    g.member_hosts.extend(state.members.members.values().copied());
                    r.server_group = Some(g);
                    with_members = r;
                    &with_members
                }
                _ => req,
            };
            for host in self.select(effective)? {
                // Re-fit against the cache as it is now: claims of this
                // replica since the selection are already in it.
                let tree = self.cache.tree(&host);
                if tree.is_empty() {
                    continue;
                }
                let Some(sel) = fit::fit(&tree, effective) else { continue };
                let touched: Vec<&Versioned<db::Provider>> =
                    tree.iter().filter(|p| sel.allocations.contains_key(&p.value.uuid)).map(|p| &**p).collect();
                let guard = match (&req.server_group, &group) {
                    (Some(g), Some(state)) => {
                        let mut members = state.members.clone();
                        members.members.insert(req.consumer, host);
                        Some(Guard { key: groups::group_key(&g.id), mod_revision: state.mod_revision, value: db::encode_record(&members) })
                    }
                    _ => None,
                };
                match db::claim(self.store.as_ref(), &consumer, &touched, &sel.allocations, guard.as_ref()).await {
                    Ok(Claim::Claimed { providers, .. }) => {
                        self.cache.apply(providers);
                        self.stats.claims.fetch_add(1, Ordering::Relaxed);
                        return Ok(sel);
                    }
                    Ok(Claim::Stale { providers, guard: now }) => {
                        self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                        self.cache.apply(providers.into_iter().flatten());
                        if let Some(state) = &mut group {
                            if now.as_ref().map_or(0, |kv| kv.mod_revision) != state.mod_revision {
                                // The group changed meanwhile (a member was
                                // placed or left): select again against it.
                                // Such retries do not use up rounds, up to a
                                // bound, since each means another member won.
                                *state = groups::GroupState::from_kv(now.as_ref())?;
                                group_changes += 1;
                                if group_changes <= MAX_GROUP_CHANGES {
                                    rounds -= 1;
                                }
                                continue 'round;
                            }
                        }
                    }
                    Err(DbError::Capacity { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Err(ScheduleError::Exhausted)
    }
}
