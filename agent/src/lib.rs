//! The per-host agent: enrols the host, heartbeats, reports its inventory and
//! follows its desired state.
//!
//! [`run`] is the whole agent; the `agent` binary only parses flags and waits
//! for SIGTERM. On the first start the join token is exchanged for a host
//! credential, which is kept in the state directory; later starts reuse it and
//! keep the same host id.

use std::future::Future;
use std::time::Duration;

use model::agent_api::HostCredential;
use model::inventory::HostInventory;

pub mod client;
pub mod config;
pub mod credential;
pub mod discovery;

use client::{Client, ClientError};
use config::Config;
use discovery::DiscoveryConfig;

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("Inventory discovery failed: {0}")]
    Discovery(#[from] discovery::DiscoveryError),
    #[error(transparent)]
    Credential(#[from] credential::CredentialError),
    #[error("Enrolment failed: {0}")]
    Enrol(ClientError),
    #[error("This host has not enrolled yet and no join token was given (--join-token)")]
    NoJoinToken,
    #[error("The coordinator no longer accepts this host's credential ({0}); enrol again with a join token restricted to this host (coordinator join-token create --host NAME) after removing the old credential file")]
    CredentialRejected(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Longest wait of one desired-state long-poll.
const DESIRED_WAIT: Duration = Duration::from_secs(25);

/// The address this host uses to reach the coordinator (its management IP).
fn local_ip_towards(url: &str) -> Option<String> {
    use std::net::ToSocketAddrs;
    let url = reqwest::Url::parse(url).ok()?;
    let addr = (url.host_str()?, url.port_or_known_default()?).to_socket_addrs().ok()?.next()?;
    let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = std::net::UdpSocket::bind(bind).ok()?;
    sock.connect(addr).ok()?;
    Some(sock.local_addr().ok()?.ip().to_string())
}

fn discovery_config(cfg: &Config) -> DiscoveryConfig {
    DiscoveryConfig {
        sysfs_root: cfg.sysfs_root.clone(),
        procfs_root: cfg.procfs_root.clone(),
        instance_pool: cfg.instance_pool.clone(),
        hostname: cfg.hostname.clone(),
        physnets: cfg.physnets.clone(),
    }
}

/// Discovers the inventory (blocking file reads, off the async threads).
async fn discover(cfg: &DiscoveryConfig, host_ip: &Option<String>) -> Result<HostInventory, AgentError> {
    let cfg = cfg.clone();
    let mut inv = tokio::task::spawn_blocking(move || discovery::discover(&cfg)).await.expect("discovery does not panic")?;
    inv.host_ip = host_ip.clone();
    Ok(inv)
}

/// Retries `op` while the coordinator cannot be reached or answers with a server
/// error (5xx), with growing pauses; refusals (4xx) are returned at once.
async fn patiently<T, F, Fut>(what: &str, mut op: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut pause = Duration::from_millis(200);
    loop {
        match op().await {
            Err(e) if e.status().is_none_or(|s| s >= 500) => {
                tracing::warn!(error = %e, "{what}: coordinator unavailable, retrying in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Loads the host credential, or enrols with the join token and keeps the credential.
async fn identity(cfg: &Config, client: &Client, hostname: &str) -> Result<(HostCredential, Option<i64>), AgentError> {
    if let Some(c) = credential::load(&cfg.state_dir)? {
        tracing::info!(host_id = %c.host_id, "using the stored host credential");
        return Ok((c, None));
    }
    let token = cfg.join_token.as_deref().ok_or(AgentError::NoJoinToken)?;
    let resp = patiently("enrolment", || client.enrol(token, hostname)).await.map_err(AgentError::Enrol)?;
    let cred = HostCredential { host_id: resp.host_id, secret: resp.secret };
    credential::save(&cfg.state_dir, &cred)?;
    tracing::info!(host_id = %cred.host_id, hostname, "enrolled; credential stored");
    Ok((cred, Some(resp.heartbeat_ttl_secs)))
}

fn rejected(e: ClientError) -> AgentError {
    match e.status() {
        Some(401) => AgentError::CredentialRejected(e.to_string()),
        _ => AgentError::Client(e),
    }
}

/// Long-polls the host's desired state and logs each new picture of it (the
/// reconcilers that act on it come later).
async fn follow_desired(client: Client) {
    let mut after = 0;
    loop {
        match client.desired(after, DESIRED_WAIT).await {
            Ok(state) => {
                if state.changed {
                    tracing::info!(revision = state.revision, records = state.records.len(), "desired state");
                    for r in &state.records {
                        tracing::info!(kind = %r.kind, name = %r.name, revision = r.revision, "desired record");
                    }
                }
                after = state.revision;
            }
            Err(e) => {
                tracing::warn!(error = %e, "desired-state poll failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Heartbeat period for a lease TTL: a third of it, at least 200 ms.
pub fn heartbeat_period(ttl_secs: i64) -> Duration {
    Duration::from_millis((ttl_secs.max(1) as u64 * 1000 / 3).max(200))
}

/// Runs the agent until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    tokio::pin!(shutdown);
    tokio::select! {
        r = run_forever(&cfg) => r,
        _ = &mut shutdown => {
            tracing::info!("agent stopping");
            Ok(())
        }
    }
}

async fn run_forever(cfg: &Config) -> Result<(), AgentError> {
    let disc = discovery_config(cfg);
    let host_ip = local_ip_towards(&cfg.coordinator);
    let inventory = discover(&disc, &host_ip).await?;
    let client = Client::new(&cfg.coordinator)?;
    let (cred, _) = identity(cfg, &client, &inventory.hostname).await?;
    let client = client.with_credential(cred.clone());

    let beat = patiently("heartbeat", || client.heartbeat()).await.map_err(rejected)?;
    let mut period = heartbeat_period(beat.ttl_secs);
    tracing::info!(host_id = %cred.host_id, ttl_secs = beat.ttl_secs, "heartbeating every {period:?}");
    // The inventory last accepted; a refused report (say, less than is allocated) is
    // retried at the next check while the host keeps heartbeating.
    let mut reported: Option<HostInventory> = None;
    let load = || discovery::load(&disc.procfs_root, std::path::Path::new(discovery::UTMP));
    match patiently("inventory report", || client.report_inventory(&inventory, load())).await {
        Ok(accepted) => {
            tracing::info!(providers = accepted.providers.len(), cpus = inventory.cpu_count(), memory_mb = inventory.memory_mb, "inventory reported");
            reported = Some(inventory);
        }
        Err(e) if e.status() == Some(401) => return Err(rejected(e)),
        Err(e) => tracing::error!(error = %e, "inventory refused; will report again"),
    }

    let desired = tokio::spawn(follow_desired(client.clone()));
    let _abort_desired = AbortOnDrop(desired);
    let mut heartbeat = tokio::time::interval(period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut recheck = tokio::time::interval(Duration::from_secs(cfg.inventory_interval_secs));
    recheck.tick().await;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => match client.heartbeat().await {
                Ok(b) => {
                    if b.renewed {
                        tracing::warn!("heartbeat lease had expired; the host was shown as down and is up again");
                    }
                    let p = heartbeat_period(b.ttl_secs);
                    if p != period {
                        period = p;
                        heartbeat = tokio::time::interval(period);
                        heartbeat.tick().await;
                    }
                }
                Err(e) if e.status() == Some(401) => return Err(rejected(e)),
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            },
            _ = recheck.tick() => {
                let now = discover(&disc, &host_ip).await?;
                if reported.as_ref() != Some(&now) {
                    match client.report_inventory(&now, load()).await {
                        Ok(_) => {
                            tracing::info!("inventory reported");
                            reported = Some(now);
                        }
                        Err(e) if e.status() == Some(401) => return Err(rejected(e)),
                        Err(e) => tracing::warn!(error = %e, "inventory report failed; will retry"),
                    }
                }
            }
        }
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
