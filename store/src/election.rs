//! Leader election over leases and compare-and-swap, for loops that must run
//! once across coordinator replicas (the host monitor, the rebalancer).
//!
//! Each candidate holds a lease. It becomes leader by creating
//! `/election/<name>` with its id, attached to its lease, in a transaction that
//! succeeds only if the key is absent. The leader renews the lease every third
//! of the TTL; the key vanishes when the lease ends (resignation, crash, lost
//! contact), and a follower that watches the key then tries again.
//!
//! A leader steps down (its flag turns false) when the lease is gone, when its
//! key is deleted or taken, or when it could not renew for so long that the
//! store may already have expired the lease: it gives up leadership before the
//! store could grant it to someone else, so two candidates never both believe
//! they lead (as long as their clocks run at the same rate).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::{Compare, EventKind, LeaseId, Op, Store, StoreError, Txn};

/// Prefix of the election keys; the value of `/election/<name>` is the leader's id.
pub const ELECTION_PREFIX: &str = "/election/";

/// Pause after a failed store call before the campaign tries again.
const RETRY: Duration = Duration::from_millis(500);

/// One candidate's part in an election. Dropping it resigns.
pub struct Election {
    key: String,
    leader: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Election {
    /// Starts campaigning for leadership of `name` as `candidate_id` (which
    /// must be unique among the candidates) with a lease of `ttl_secs` seconds,
    /// in a background task of the current tokio runtime.
    ///
    /// Returns at once; watch [`is_leader`](Self::is_leader) or
    /// [`subscribe`](Self::subscribe) to learn when this candidate leads.
    pub fn campaign(store: Arc<dyn Store>, name: &str, candidate_id: &str, ttl_secs: i64) -> crate::Result<Election> {
        if name.is_empty() || name.contains('/') {
            return Err(StoreError::Invalid(format!("Election name {name:?} must be non-empty and contain no '/'")));
        }
        if candidate_id.is_empty() {
            return Err(StoreError::Invalid("Empty candidate id".into()));
        }
        if ttl_secs < 2 {
            return Err(StoreError::Invalid(format!("Election TTL must be at least 2 seconds, got {ttl_secs}")));
        }
        let key = format!("{ELECTION_PREFIX}{name}");
        let (flag, leader) = watch::channel(false);
        let (stop, stopped) = oneshot::channel();
        let campaign = Campaign {
            store,
            key: key.clone(),
            id: candidate_id.to_owned(),
            ttl: Duration::from_secs(ttl_secs as u64),
            ttl_secs,
            flag,
            stopped,
        };
        let task = tokio::spawn(campaign.run());
        Ok(Election { key, leader, stop: Some(stop), task: Some(task) })
    }

    /// Whether this candidate leads now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// A receiver of the leadership flag: `true` while this candidate leads.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// The store key this election is decided on.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Waits until this candidate leads.
    pub async fn wait_for_leadership(&self) {
        let mut rx = self.leader.clone();
        // The sender lives as long as the campaign task, which outlives `self`'s borrow.
        let _ = rx.wait_for(|leads| *leads).await;
    }

    /// Stops campaigning and gives up leadership now: the lease is revoked, so
    /// another candidate can take over at once. Returns when that is done.
    pub async fn resign(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// The id of the current leader of `name`, if any.
    pub async fn leader(store: &dyn Store, name: &str) -> crate::Result<Option<String>> {
        let key = format!("{ELECTION_PREFIX}{name}");
        match store.get(&key).await? {
            Some(kv) => String::from_utf8(kv.value)
                .map(Some)
                .map_err(|_| StoreError::Corrupt { key, reason: "leader id is not UTF-8".into() }),
            None => Ok(None),
        }
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        // The task sees the stop, revokes the lease and ends on its own.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election").field("key", &self.key).field("leader", &self.is_leader()).finish()
    }
}

/// The background task of one candidate.
struct Campaign {
    store: Arc<dyn Store>,
    key: String,
    id: String,
    ttl: Duration,
    ttl_secs: i64,
    flag: watch::Sender<bool>,
    stopped: oneshot::Receiver<()>,
}

/// How a phase of the campaign ended.
enum Next {
    /// Try to take the key again with the same lease.
    Campaign,
    /// The lease is gone or doubtful: get a new one.
    NewLease,
    /// Resign: the candidate was dropped.
    Stop,
}

/// A lease and the latest instant at which the store surely still holds it.
struct Held {
    id: LeaseId,
    safe_until: Instant,
}

impl Campaign {
    fn renew_every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(300))
    }

    /// When leadership must be given up if no renewal succeeds: a little
    /// before the store could expire the lease.
    fn margin(&self) -> Duration {
        (self.ttl / 4).min(Duration::from_secs(1))
    }

    async fn run(mut self) {
        loop {
            let sent = Instant::now();
            let granted = tokio::select! {
                r = self.store.lease_grant(self.ttl_secs) => r,
                _ = &mut self.stopped => return,
            };
            let mut lease = match granted {
                Ok(id) => Held { id, safe_until: sent + self.ttl },
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "election: cannot get a lease");
                    if self.pause(RETRY).await {
                        return;
                    }
                    continue;
                }
            };
            let next = loop {
                let step = match self.try_acquire(&lease).await {
                    Ok(Some(revision)) => self.lead(&mut lease, revision).await,
                    Ok(None) => self.follow(&mut lease).await,
                    Err(StoreError::LeaseNotFound(_)) => Next::NewLease,
                    Err(e) => {
                        tracing::warn!(key = %self.key, error = %e, "election: campaign failed");
                        if self.pause(RETRY).await {
                            Next::Stop
                        } else if Instant::now() >= lease.safe_until {
                            Next::NewLease
                        } else {
                            Next::Campaign
                        }
                    }
                };
                match step {
                    Next::Campaign => continue,
                    other => break other,
                }
            };
            self.flag.send_replace(false);
            // Best effort: a revoked lease frees the key at once for the others.
            let _ = timeout(Duration::from_secs(2), self.store.lease_revoke(lease.id)).await;
            if matches!(next, Next::Stop) {
                return;
            }
        }
    }

    /// Sleeps; returns true if the candidate was stopped meanwhile.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = sleep(d) => false,
            _ = &mut self.stopped => true,
        }
    }

    /// Creates the key if absent: `Some(revision)` when we won.
    async fn try_acquire(&mut self, lease: &Held) -> crate::Result<Option<i64>> {
        let txn = Txn::new()
            .when(Compare::Absent(self.key.clone()))
            .and_then(Op::put_with_lease(self.key.clone(), self.id.clone(), lease.id))
            .or_else(Op::get(self.key.clone()));
        let resp = self.store.txn(txn).await?;
        Ok(resp.succeeded.then_some(resp.revision))
    }

    /// Renews the lease once; updates `safe_until` on success.
    async fn renew(&self, lease: &mut Held) -> std::result::Result<(), StoreError> {
        let sent = Instant::now();
        let wait = lease.safe_until.saturating_duration_since(sent).max(Duration::from_millis(100));
        match timeout(wait, self.store.lease_keep_alive(lease.id)).await {
            Ok(Ok(_)) => {
                lease.safe_until = sent + self.ttl;
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Unavailable("lease renewal timed out".into())),
        }
    }

    /// Leads until the lease or the key is lost, or the candidate is stopped.
    async fn lead(&mut self, lease: &mut Held, won_at: i64) -> Next {
        let mut events = match self.store.watch(&self.key, won_at + 1).await {
            Ok(s) => s,
            // Without a watch we cannot notice losing the key; start over.
            Err(_) => return Next::NewLease,
        };
        self.flag.send_replace(true);
        tracing::info!(key = %self.key, id = %self.id, "election: became leader");
        let mut next_renew = Instant::now() + self.renew_every();
        loop {
            let give_up_at = lease.safe_until - self.margin();
            tokio::select! {
                _ = sleep_until(give_up_at) => {
                    tracing::warn!(key = %self.key, "election: could not renew the lease in time; stepping down");
                    return Next::NewLease;
                }
                _ = sleep_until(next_renew) => match self.renew(lease).await {
                    Ok(()) => next_renew = Instant::now() + self.renew_every(),
                    Err(StoreError::LeaseNotFound(_)) => {
                        tracing::warn!(key = %self.key, "election: lease lost; stepping down");
                        return Next::NewLease;
                    }
                    Err(e) => {
                        tracing::warn!(key = %self.key, error = %e, "election: lease renewal failed");
                        next_renew = Instant::now() + Duration::from_millis(200);
                    }
                },
                ev = events.next() => match ev {
                    Some(Ok(resp)) => {
                        let lost = resp.events.iter().any(|e| {
                            e.kv.key == self.key && (e.kind == EventKind::Delete || e.kv.lease != lease.id)
                        });
                        if lost {
                            tracing::warn!(key = %self.key, "election: leader key deleted or taken; stepping down");
                            return Next::NewLease;
                        }
                    }
                    _ => return Next::NewLease,
                },
                _ = &mut self.stopped => return Next::Stop,
            }
        }
    }

    /// Waits, keeping our lease alive, until the current leader's key goes away.
    async fn follow(&mut self, lease: &mut Held) -> Next {
        // A range gives the holder and the revision it was read at; watching
        // from the next revision cannot miss its deletion, and that revision
        // is recent enough never to be compacted away.
        let (holder, at) = match self.store.range(&self.key).await {
            Ok(r) => (r.kvs.into_iter().find(|kv| kv.key == self.key), r.revision),
            Err(_) => return if self.pause(RETRY).await { Next::Stop } else { Next::Campaign },
        };
        if holder.is_none() {
            return Next::Campaign;
        }
        let mut events = match self.store.watch(&self.key, at + 1).await {
            Ok(s) => s,
            Err(_) => return if self.pause(RETRY).await { Next::Stop } else { Next::Campaign },
        };
        let mut next_renew = Instant::now() + self.renew_every();
        loop {
            tokio::select! {
                _ = sleep_until(next_renew) => {
                    match self.renew(lease).await {
                        Err(StoreError::LeaseNotFound(_)) => return Next::NewLease,
                        _ => next_renew = Instant::now() + self.renew_every(),
                    }
                }
                ev = events.next() => match ev {
                    Some(Ok(resp)) => {
                        if resp.events.iter().any(|e| e.kv.key == self.key && e.kind == EventKind::Delete) {
                            return Next::Campaign;
                        }
                    }
                    _ => return Next::Campaign,
                },
                _ = &mut self.stopped => return Next::Stop,
            }
        }
    }
}
