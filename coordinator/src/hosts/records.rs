//! Store keys and records of hosts.
//!
//! Layout under `/hosts/`:
//! - `records/<id>`: [`HostRecord`] (name, enabled flag, credential hash, state history)
//! - `names/<hostname>`: [`NameRecord`], the id of the host of that name
//! - `join-tokens/<sha256 of token>`: [`JoinTokenRecord`]
//! - `inventory/<id>`: [`InventoryRecord`], the host's last reported inventory
//! - `alive/<id>`: [`AliveRecord`], attached to the host's heartbeat lease
//! - `<id>/desired/<kind>/<name>`: desired state, written by the coordinator
//! - `<id>/observed/<kind>/<name>`: [`ObservedValue`], written by the host's agent

use model::inventory::HostInventory;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use store::record::Record;

/// Prefix of host records.
pub const RECORDS_PREFIX: &str = "/hosts/records/";
/// Prefix of the heartbeat keys; a host is up while its key exists.
pub const ALIVE_PREFIX: &str = "/hosts/alive/";
/// Prefix of join tokens.
pub const JOIN_TOKENS_PREFIX: &str = "/hosts/join-tokens/";

/// Key of a host's record.
pub fn record_key(id: &str) -> String {
    format!("{RECORDS_PREFIX}{id}")
}
/// Key mapping a host name to its id.
pub fn name_key(hostname: &str) -> String {
    format!("/hosts/names/{hostname}")
}
/// Key of a join token, by the hash of the token.
pub fn join_token_key(token_hash: &str) -> String {
    format!("{JOIN_TOKENS_PREFIX}{token_hash}")
}
/// Key of a host's inventory.
pub fn inventory_key(id: &str) -> String {
    format!("/hosts/inventory/{id}")
}
/// Key of a host's heartbeat.
pub fn alive_key(id: &str) -> String {
    format!("{ALIVE_PREFIX}{id}")
}
/// Prefix of a host's desired state; other modules write here to tell a host what to run.
pub fn desired_prefix(id: &str) -> String {
    format!("/hosts/{id}/desired/")
}
/// Key of one desired-state record of a host.
pub fn desired_key(id: &str, kind: &str, name: &str) -> String {
    format!("/hosts/{id}/desired/{kind}/{name}")
}
/// Prefix of a host's observed state.
pub fn observed_prefix(id: &str) -> String {
    format!("/hosts/{id}/observed/")
}
/// Key of one observed-state record of a host.
pub fn observed_key(id: &str, kind: &str, name: &str) -> String {
    format!("/hosts/{id}/observed/{kind}/{name}")
}

/// Heartbeat state of a host, as the host monitor last recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    Up,
    Down,
}

impl HostState {
    /// `up` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Down => "down",
        }
    }
}

/// One recorded change of a host's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The state entered.
    pub state: HostState,
    /// When the monitor saw it (RFC 3339).
    pub at: String,
}

/// How many transitions a host record keeps.
pub const TRANSITIONS_KEPT: usize = 20;

/// An enrolled host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's id (a UUID).
    pub id: String,
    /// The host's name; unique within the site.
    pub hostname: String,
    /// Availability zone.
    pub zone: String,
    /// Whether the scheduler may place work on the host.
    pub enabled: bool,
    /// Why the host was disabled.
    pub disabled_reason: Option<String>,
    /// Hex SHA-256 of the host's secret.
    pub credential_sha256: String,
    /// State last recorded by the host monitor; `None` before the first heartbeat was seen.
    pub state: Option<HostState>,
    /// The latest state changes, oldest first, at most [`TRANSITIONS_KEPT`].
    #[serde(default)]
    pub transitions: Vec<Transition>,
    /// When the host enrolled (RFC 3339).
    pub created_at: String,
    /// Last change of this record (RFC 3339).
    pub updated_at: String,
}

impl Record for HostRecord {
    const VERSION: u32 = 1;
}

impl HostRecord {
    /// When the monitor last recorded a change of state.
    pub fn state_changed_at(&self) -> Option<&str> {
        self.transitions.last().map(|t| t.at.as_str())
    }

    /// Records a change of state at `at`, keeping the history bounded.
    pub fn record_transition(&mut self, state: HostState, at: String) {
        self.state = Some(state);
        self.transitions.push(Transition { state, at: at.clone() });
        let excess = self.transitions.len().saturating_sub(TRANSITIONS_KEPT);
        self.transitions.drain(..excess);
        self.updated_at = at;
    }
}

/// The id of the host of a given name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRecord {
    pub host_id: String,
}

impl Record for NameRecord {
    const VERSION: u32 = 1;
}

/// A join token (stored under the hash of the token; the token itself is never stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Unix time after which the token is refused.
    pub expires_at_unix: i64,
    /// The host name the token is restricted to.
    pub host: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// Set once the token was used: which host it enrolled and when. A used token is
    /// kept until it expires so that a second use gets a clear answer.
    pub used: Option<TokenUse>,
}

/// The one use of a join token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    pub host_id: String,
    pub at: String,
}

impl Record for JoinTokenRecord {
    const VERSION: u32 = 1;
}

/// A host's last reported inventory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InventoryRecord {
    pub inventory: HostInventory,
    /// Uptime and load when it was reported (absent from older agents and records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<model::agent_api::HostLoad>,
    /// When it was reported (RFC 3339).
    pub reported_at: String,
}

impl Record for InventoryRecord {
    const VERSION: u32 = 1;
}

/// Value of a host's heartbeat key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliveRecord {
    /// When this lease was granted (RFC 3339), i.e. since when the host is up.
    pub since: String,
}

impl Record for AliveRecord {
    const VERSION: u32 = 1;
}

/// One observed-state record as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedValue {
    pub status: serde_json::Value,
    /// When it was reported (RFC 3339).
    pub reported_at: String,
}

impl Record for ObservedValue {
    const VERSION: u32 = 1;
}

/// Hex SHA-256 of a secret or token.
pub fn sha256_hex(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A fresh random secret: 32 bytes from the OS generator, hex encoded.
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The current time in RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("UTC times format as RFC 3339")
}

/// The current Unix time in seconds.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Whether a host name is acceptable: 1 to 253 characters of letters, digits, `.`, `-`, `_`.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && !name.starts_with(['.', '-'])
}

/// Whether a desired/observed kind or name is acceptable: 1 to 128 characters of
/// letters, digits, `.`, `-`, `_`, not starting with a dot.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_hex_sha256() {
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let s = random_secret();
        assert_eq!(s.len(), 64);
        assert_ne!(s, random_secret());
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
    }

    #[test]
    fn names_are_validated() {
        assert!(valid_hostname("edge-1.example.org"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("a/b"));
        assert!(!valid_hostname("-a"));
        assert!(valid_segment("vm"));
        assert!(!valid_segment(".."));
        assert!(!valid_segment("a/b"));
    }

    #[test]
    fn transitions_are_bounded() {
        let mut r = HostRecord {
            id: "i".into(),
            hostname: "h".into(),
            zone: "nova".into(),
            enabled: true,
            disabled_reason: None,
            credential_sha256: String::new(),
            state: None,
            transitions: vec![],
            created_at: String::new(),
            updated_at: String::new(),
        };
        for i in 0..30 {
            r.record_transition(if i % 2 == 0 { HostState::Up } else { HostState::Down }, format!("t{i}"));
        }
        assert_eq!(r.transitions.len(), TRANSITIONS_KEPT);
        assert_eq!(r.state_changed_at(), Some("t29"));
        assert_eq!(r.state, Some(HostState::Down));
        let bytes = store::record::encode(&r);
        assert_eq!(store::record::decode::<HostRecord>("k", &bytes).unwrap(), r);
    }
}
