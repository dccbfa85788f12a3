//! Fernet tokens: AES-128-CBC + HMAC-SHA256 over a small JSON payload, with the
//! keys kept in the store so that any replica validates any token without a
//! store read. Revocations are events in the store, mirrored in memory by a watch.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use fernet::{Fernet, MultiFernet};
use serde::{Deserialize, Serialize};
use store::record::{decode, encode};
use store::{Compare, Op, Store, StoreError, Txn};

use super::model::{keys, Revocation, TokenKeys};

/// How many keys stay active: the primary and the previous ones, so tokens
/// signed before a rotation stay valid until they expire.
pub const ACTIVE_KEYS: usize = 3;

/// What a token says. Field names are short to keep tokens short.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenPayload {
    /// User id.
    pub u: String,
    /// User name.
    pub un: String,
    /// User's domain id.
    pub ud: String,
    /// Authentication methods.
    pub m: Vec<String>,
    /// Project scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p: Option<String>,
    /// Domain of the project scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pd: Option<String>,
    /// Domain scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<String>,
    /// Roles on the scope: (id, name).
    #[serde(default)]
    pub r: Vec<(String, String)>,
    /// Application credential the token came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c: Option<String>,
    /// Issued at, unix seconds.
    pub i: f64,
    /// Expires at, unix seconds.
    pub e: f64,
    /// Audit id.
    pub a: String,
}

/// Why a token is not accepted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("The token is malformed or was not issued by this cloud")]
    Invalid,
    #[error("The token has expired")]
    Expired,
    #[error("The token has been revoked")]
    Revoked,
}

/// Seconds since the epoch, with fractions.
pub fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Keys and revocations of one replica.
pub struct TokenBook {
    keys: RwLock<(Vec<String>, MultiFernet)>,
    revocations: RwLock<HashMap<String, Revocation>>,
}

impl TokenBook {
    /// Loads keys (creating the first one if the store has none) and revocations.
    /// Returns the book and the store revision it reflects.
    pub async fn load(store: &dyn Store) -> Result<(TokenBook, i64), StoreError> {
        let keys = ensure_keys(store).await?;
        let fernet = multi(&keys)?;
        let revs = store.range(keys::REVOKED).await?;
        let mut revocations = HashMap::new();
        for kv in &revs.kvs {
            revocations.insert(kv.key.clone(), decode::<Revocation>(&kv.key, &kv.value)?);
        }
        Ok((TokenBook { keys: RwLock::new((keys, fernet)), revocations: RwLock::new(revocations) }, revs.revision))
    }

    /// Encrypts a payload with the primary key.
    pub fn issue(&self, payload: &TokenPayload) -> String {
        let bytes = serde_json::to_vec(payload).expect("payload serializes");
        self.keys.read().unwrap().1.encrypt(&bytes)
    }

    /// Decrypts and checks a token: signature, expiry, revocation.
    pub fn validate(&self, token: &str) -> Result<TokenPayload, TokenError> {
        let bytes = self.keys.read().unwrap().1.decrypt(token).map_err(|_| TokenError::Invalid)?;
        let p: TokenPayload = serde_json::from_slice(&bytes).map_err(|_| TokenError::Invalid)?;
        if p.e <= now() {
            return Err(TokenError::Expired);
        }
        if self.revocations.read().unwrap().values().any(|r| revokes(r, &p)) {
            return Err(TokenError::Revoked);
        }
        Ok(p)
    }

    /// Replaces the keys (after a rotation seen in the store).
    pub fn set_keys(&self, k: Vec<String>) -> Result<(), StoreError> {
        let f = multi(&k)?;
        *self.keys.write().unwrap() = (k, f);
        Ok(())
    }

    /// Re-reads the keys from the store; used when a token fails to decrypt, in
    /// case this replica has not yet seen a rotation.
    pub async fn reload_keys(&self, store: &dyn Store) -> Result<bool, StoreError> {
        let k = ensure_keys(store).await?;
        let changed = self.keys.read().unwrap().0 != k;
        if changed {
            self.set_keys(k)?;
        }
        Ok(changed)
    }

    /// Mirrors a revocation event (put) in memory.
    pub fn add_revocation(&self, key: String, r: Revocation) {
        self.revocations.write().unwrap().insert(key, r);
    }

    /// Forgets an expired revocation event.
    pub fn remove_revocation(&self, key: &str) {
        self.revocations.write().unwrap().remove(key);
    }
}

fn revokes(r: &Revocation, p: &TokenPayload) -> bool {
    if p.i > r.issued_before {
        return false;
    }
    let field = |want: &Option<String>, have: Option<&str>| want.as_deref().is_none_or(|w| Some(w) == have);
    let role_ok = r.role_id.as_deref().is_none_or(|w| p.r.iter().any(|(id, _)| id == w));
    field(&r.audit_id, Some(&p.a))
        && field(&r.user_id, Some(&p.u))
        && field(&r.project_id, p.p.as_deref())
        && field(&r.domain_id, p.d.as_deref().or(p.pd.as_deref()))
        && field(&r.app_cred_id, p.c.as_deref())
        && role_ok
}

fn multi(keys: &[String]) -> Result<MultiFernet, StoreError> {
    let list: Option<Vec<Fernet>> = keys.iter().map(|k| Fernet::new(k)).collect();
    match list {
        Some(l) if !l.is_empty() => Ok(MultiFernet::new(l)),
        _ => Err(StoreError::Corrupt { key: keys::TOKEN_KEYS.into(), reason: "invalid Fernet key".into() }),
    }
}

async fn ensure_keys(store: &dyn Store) -> Result<Vec<String>, StoreError> {
    loop {
        if let Some(kv) = store.get(keys::TOKEN_KEYS).await? {
            return Ok(decode::<TokenKeys>(keys::TOKEN_KEYS, &kv.value)?.keys);
        }
        let first = TokenKeys { keys: vec![Fernet::generate_key()] };
        let txn = Txn::new()
            .when(Compare::Absent(keys::TOKEN_KEYS.into()))
            .and_then(Op::put(keys::TOKEN_KEYS, encode(&first)));
        if store.txn(txn).await?.succeeded {
            return Ok(first.keys);
        }
        // Another replica created them first: read theirs.
    }
}

/// Adds a new primary key and drops the oldest beyond [`ACTIVE_KEYS`]; returns
/// how many keys are active. Every replica picks the change up through its watch.
pub async fn rotate_keys(store: &dyn Store) -> anyhow::Result<usize> {
    ensure_keys(store).await?;
    loop {
        let kv = store.get(keys::TOKEN_KEYS).await?.ok_or_else(|| anyhow::anyhow!("token keys vanished during rotation"))?;
        let mut k = decode::<TokenKeys>(keys::TOKEN_KEYS, &kv.value)?;
        k.keys.insert(0, Fernet::generate_key());
        k.keys.truncate(ACTIVE_KEYS);
        let txn = Txn::new()
            .when(Compare::ModRevision(keys::TOKEN_KEYS.into(), kv.mod_revision))
            .and_then(Op::put(keys::TOKEN_KEYS, encode(&k)));
        if store.txn(txn).await?.succeeded {
            return Ok(k.keys.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: f64, e: f64) -> TokenPayload {
        TokenPayload {
            u: "u1".into(),
            un: "alice".into(),
            ud: "default".into(),
            m: vec!["password".into()],
            p: Some("p1".into()),
            pd: Some("default".into()),
            d: None,
            r: vec![("r1".into(), "member".into())],
            c: None,
            i,
            e,
            a: "audit".into(),
        }
    }

    fn book(keys: Vec<String>) -> TokenBook {
        let f = multi(&keys).unwrap();
        TokenBook { keys: RwLock::new((keys, f)), revocations: RwLock::new(HashMap::new()) }
    }

    #[test]
    fn issue_validate_expire_revoke() {
        let b = book(vec![Fernet::generate_key()]);
        let t = now();
        let tok = b.issue(&payload(t, t + 60.0));
        assert_eq!(b.validate(&tok).unwrap().u, "u1");
        assert_eq!(b.validate(&b.issue(&payload(t - 100.0, t - 1.0))), Err(TokenError::Expired));
        assert_eq!(b.validate("garbage"), Err(TokenError::Invalid));
        let mut tampered = tok.clone().into_bytes();
        tampered[20] = if tampered[20] == b'A' { b'B' } else { b'A' };
        assert_eq!(b.validate(&String::from_utf8(tampered).unwrap()), Err(TokenError::Invalid));
        b.add_revocation("k".into(), Revocation { user_id: Some("u2".into()), issued_before: t + 1.0, ..blank() });
        assert!(b.validate(&tok).is_ok(), "a revocation for another user leaves the token alone");
        b.add_revocation("k2".into(), Revocation { project_id: Some("p1".into()), issued_before: t + 1.0, ..blank() });
        assert_eq!(b.validate(&tok), Err(TokenError::Revoked));
        b.remove_revocation("k2");
        b.add_revocation("k3".into(), Revocation { user_id: Some("u1".into()), issued_before: t - 1.0, ..blank() });
        assert!(b.validate(&tok).is_ok(), "tokens issued after the event stay valid");
    }

    #[test]
    fn rotation_keeps_old_tokens_valid() {
        let old = Fernet::generate_key();
        let b = book(vec![old.clone()]);
        let t = now();
        let tok = b.issue(&payload(t, t + 60.0));
        b.set_keys(vec![Fernet::generate_key(), old]).unwrap();
        assert!(b.validate(&tok).is_ok());
        b.set_keys(vec![Fernet::generate_key()]).unwrap();
        assert_eq!(b.validate(&tok), Err(TokenError::Invalid));
    }

    fn blank() -> Revocation {
        Revocation { audit_id: None, user_id: None, project_id: None, domain_id: None, role_id: None, app_cred_id: None, issued_before: 0.0 }
    }
}
