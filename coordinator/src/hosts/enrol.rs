//! Enrolment: a join token is exchanged, once, for a host id and a host secret.
//!
//! The exchange is one compare-and-swap transaction over the token and the
//! host-name index, so two agents racing with the same token cannot both win, and
//! a failed exchange leaves nothing behind. There is no site-wide counter to
//! contend on: a host's small integer id (for old Nova microversions) is the store
//! revision that created its record.

use model::agent_api::{EnrolRequest, EnrolResponse};
use store::record::{decode, encode};
use store::{Compare, Op, Store, Txn};

use super::error::HostsError;
use super::records::{self, HostRecord, JoinTokenRecord, NameRecord, TokenUse};

/// Availability zone of newly enrolled hosts.
pub const DEFAULT_ZONE: &str = "nova";

/// How often a transaction is retried when another writer got in between.
const ATTEMPTS: usize = 8;

/// Exchanges a join token for a host identity.
///
/// A host name may enrol again (keeping its id, getting a new secret) only with a
/// token restricted to that name, which is how an operator re-installs a host.
pub async fn enrol(store: &dyn Store, req: &EnrolRequest, heartbeat_ttl_secs: i64) -> Result<EnrolResponse, HostsError> {
    if !records::valid_hostname(&req.hostname) {
        return Err(HostsError::Invalid(format!("'{}' is not a valid host name", req.hostname)));
    }
    if req.join_token.is_empty() || req.join_token.len() > 256 {
        return Err(HostsError::TokenUnknown);
    }
    let token_key = records::join_token_key(&records::sha256_hex(&req.join_token));
    let name_key = records::name_key(&req.hostname);
    for _ in 0..ATTEMPTS {
        let Some(token_kv) = store.get(&token_key).await? else {
            return Err(HostsError::TokenUnknown);
        };
        let mut token: JoinTokenRecord = decode(&token_kv.key, &token_kv.value)?;
        if let Some(u) = &token.used {
            return Err(HostsError::TokenUsed { host_id: u.host_id.clone(), at: u.at.clone() });
        }
        if token.expires_at_unix < records::now_unix() {
            return Err(HostsError::TokenExpired(super::join_tokens::unix_to_rfc3339(token.expires_at_unix)));
        }
        if let Some(h) = &token.host {
            if *h != req.hostname {
                return Err(HostsError::TokenForOtherHost(h.clone()));
            }
        }
        let now = records::now_rfc3339();
        let secret = records::random_secret();
        let existing = store.get(&name_key).await?;
        let txn = match existing {
            Some(name_kv) => {
                if token.host.is_none() {
                    return Err(HostsError::NameTaken(req.hostname.clone()));
                }
                // Re-enrolment of a known host: same id, new secret.
                let name: NameRecord = decode(&name_kv.key, &name_kv.value)?;
                let record_key = records::record_key(&name.host_id);
                let Some(record_kv) = store.get(&record_key).await? else {
                    return Err(HostsError::NotFound(name.host_id));
                };
                let mut record: HostRecord = decode(&record_kv.key, &record_kv.value)?;
                record.credential_sha256 = records::sha256_hex(&secret);
                record.updated_at = now.clone();
                token.used = Some(TokenUse { host_id: record.id.clone(), at: now });
                let txn = Txn::new()
                    .when(Compare::ModRevision(token_key.clone(), token_kv.mod_revision))
                    .when(Compare::ModRevision(name_key.clone(), name_kv.mod_revision))
                    .when(Compare::ModRevision(record_key.clone(), record_kv.mod_revision))
                    .and_then(Op::put(token_key.clone(), encode(&token)))
                    .and_then(Op::put(record_key, encode(&record)));
                (txn, record.id, true)
            }
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                let record = HostRecord {
                    id: id.clone(),
                    hostname: req.hostname.clone(),
                    zone: DEFAULT_ZONE.into(),
                    enabled: true,
                    disabled_reason: None,
                    credential_sha256: records::sha256_hex(&secret),
                    state: None,
                    transitions: vec![],
                    created_at: now.clone(),
                    updated_at: now.clone(),
                };
                token.used = Some(TokenUse { host_id: id.clone(), at: now });
                let txn = Txn::new()
                    .when(Compare::ModRevision(token_key.clone(), token_kv.mod_revision))
                    .when(Compare::Absent(name_key.clone()))
                    .and_then(Op::put(token_key.clone(), encode(&token)))
                    .and_then(Op::put(name_key.clone(), encode(&NameRecord { host_id: id.clone() })))
                    .and_then(Op::put(records::record_key(&id), encode(&record)));
                (txn, id, false)
            }
        };
        let (txn, host_id, again) = txn;
        if store.txn(txn).await?.succeeded {
            if again {
                // The old secret must stop working on every replica before this call
                // returns: replicas accept a cached credential only while its lease
                // lives (see `cache`), so end the old incarnation's lease.
                super::heartbeat::stop(store, &host_id).await?;
            }
            tracing::info!(host_id = %host_id, hostname = %req.hostname, again, "host enrolled");
            return Ok(EnrolResponse { host_id, secret, heartbeat_ttl_secs });
        }
    }
    Err(HostsError::Contention)
}
