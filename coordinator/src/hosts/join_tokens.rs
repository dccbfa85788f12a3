//! Join tokens: one-use, expiring secrets that let a new host enrol.
//!
//! Only the SHA-256 of a token is stored. A used token is kept (marked used) until
//! it expires, so that a second use is refused with a clear message; the host
//! monitor removes expired tokens.

use model::agent_api::JoinTokenCreated;
use store::record::{decode, encode};
use store::{Compare, Op, Store, Txn};

use super::error::HostsError;
use super::records::{self, JoinTokenRecord};

/// Longest lifetime a join token may have: one week.
pub const MAX_TTL_SECS: i64 = 7 * 24 * 3600;

/// Creates a join token valid for `ttl_secs`, optionally restricted to one host name.
pub async fn create(store: &dyn Store, ttl_secs: i64, host: Option<String>) -> Result<JoinTokenCreated, HostsError> {
    if !(1..=MAX_TTL_SECS).contains(&ttl_secs) {
        return Err(HostsError::Invalid(format!("ttl must be between 1 and {MAX_TTL_SECS} seconds, not {ttl_secs}")));
    }
    if let Some(h) = &host {
        if !records::valid_hostname(h) {
            return Err(HostsError::Invalid(format!("'{h}' is not a valid host name")));
        }
    }
    let token = records::random_secret();
    let expires_at_unix = records::now_unix() + ttl_secs;
    let record = JoinTokenRecord { expires_at_unix, host: host.clone(), created_at: records::now_rfc3339(), used: None };
    let key = records::join_token_key(&records::sha256_hex(&token));
    let resp = store
        .txn(Txn::new().when(Compare::Absent(key.clone())).and_then(Op::put(key, encode(&record))))
        .await?;
    if !resp.succeeded {
        // 256 random bits collided with an existing token: the generator is broken.
        return Err(HostsError::Contention);
    }
    Ok(JoinTokenCreated { token, expires_at: unix_to_rfc3339(expires_at_unix), host })
}

/// Deletes join tokens that expired; returns how many. Each delete compares the
/// token's mod-revision, so a token touched meanwhile is left for the next sweep.
pub async fn sweep_expired(store: &dyn Store) -> Result<usize, HostsError> {
    let now = records::now_unix();
    let mut removed = 0;
    for kv in store.range(records::JOIN_TOKENS_PREFIX).await?.kvs {
        let expired = match decode::<JoinTokenRecord>(&kv.key, &kv.value) {
            Ok(t) => t.expires_at_unix < now,
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "unreadable join token left in place");
                false
            }
        };
        if expired {
            let r = store
                .txn(Txn::new().when(Compare::ModRevision(kv.key.clone(), kv.mod_revision)).and_then(Op::delete(kv.key)))
                .await?;
            removed += usize::from(r.succeeded);
        }
    }
    Ok(removed)
}

/// Formats a Unix time as RFC 3339 (UTC).
pub fn unix_to_rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}
