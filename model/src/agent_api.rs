//! Messages of the agent API (`/agent/v1`) and of the host admin API (`/edge/v1`).
//!
//! Agent calls other than enrolment carry `Authorization: Bearer <host_id>:<secret>`;
//! every path names the caller's own host id, and a different id is refused with 403.

use serde::{Deserialize, Serialize};

use crate::inventory::HostInventory;

/// Path prefix of the agent API.
pub const AGENT_API_PREFIX: &str = "/agent/v1";

/// `POST /agent/v1/enrol`: exchange a one-use join token for a host identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolRequest {
    /// The join token an administrator created.
    pub join_token: String,
    /// The host's name; must match the token's host name if the token names one.
    pub hostname: String,
}

/// Answer to a successful enrolment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolResponse {
    /// The host's id, stable for the life of the host.
    pub host_id: String,
    /// The host's secret; only its hash is kept by the coordinator, so it is shown once.
    pub secret: String,
    /// Heartbeat lease TTL; the agent heartbeats at a third of it.
    pub heartbeat_ttl_secs: i64,
}

/// A host's credential as the agent keeps it on disk.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCredential {
    /// The host's id.
    pub host_id: String,
    /// The host's secret.
    pub secret: String,
}

impl HostCredential {
    /// The value of the `Authorization` header for agent API calls.
    pub fn authorization(&self) -> String {
        format!("Bearer {}:{}", self.host_id, self.secret)
    }

    /// Parses an `Authorization` header value of the form `Bearer <host_id>:<secret>`.
    pub fn from_authorization(value: &str) -> Option<HostCredential> {
        let rest = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
        let (host_id, secret) = rest.trim().split_once(':')?;
        if host_id.is_empty() || secret.is_empty() {
            return None;
        }
        Some(HostCredential { host_id: host_id.into(), secret: secret.into() })
    }
}

impl std::fmt::Debug for HostCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCredential").field("host_id", &self.host_id).field("secret", &"<redacted>").finish()
    }
}

/// Answer to `POST /agent/v1/hosts/<id>/heartbeat`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// TTL of the host's lease; the next heartbeat is due well before it runs out.
    pub ttl_secs: i64,
    /// True when the lease had expired (the host was down) and a new one was granted.
    pub renewed: bool,
    /// Whether the host is enabled for scheduling.
    pub enabled: bool,
}

/// `PUT /agent/v1/hosts/<id>/inventory`: the host's discovered inventory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InventoryReport {
    /// What the host has.
    pub inventory: HostInventory,
    /// How long the host has been running and how busy it is, when the report was made
    /// (absent from agents that do not read it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<HostLoad>,
}

/// Uptime and load of a host at the time of a report, as `uptime(1)` shows them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostLoad {
    /// Seconds since boot (`/proc/uptime`).
    pub uptime_secs: u64,
    /// Load averages over 1, 5 and 15 minutes (`/proc/loadavg`).
    pub load_average: [f64; 3],
    /// Logged-in users (USER_PROCESS entries of utmp; 0 without utmp, as `uptime` says).
    pub users: u32,
}

/// Answer to an inventory report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryAccepted {
    /// Store revision at which the inventory was recorded.
    pub revision: i64,
    /// Names (uuids) of the resource providers the inventory maps to, root first.
    pub providers: Vec<String>,
}

/// Answer to `GET /agent/v1/hosts/<id>/desired?after=<rev>`.
///
/// Without `after` (or with `after=0`) the answer is the whole desired state at
/// once. With `after`, the call waits until something under the host's desired
/// state changed after that revision (or the wait timed out) and then returns the
/// whole desired state again, so the agent always reconciles against a full,
/// consistent picture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Store revision the records were read at; pass it as `after` in the next call.
    pub revision: i64,
    /// False when the wait timed out with no change (then `records` is empty).
    pub changed: bool,
    /// Every desired record of the host, sorted by kind then name.
    pub records: Vec<DesiredRecord>,
}

/// One desired-state record, such as a VM or a port the host should run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRecord {
    /// Kind of object, e.g. `vm`.
    pub kind: String,
    /// Name of the object within its kind.
    pub name: String,
    /// Store revision of the record's last change.
    pub revision: i64,
    /// The record itself.
    pub spec: serde_json::Value,
}

/// `PUT /agent/v1/hosts/<id>/observed/<kind>/<name>`: what the host sees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedReport {
    /// The observed status, free-form per kind.
    pub status: serde_json::Value,
}

/// An observed-state record as stored and as read back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedRecord {
    /// Kind of object.
    pub kind: String,
    /// Name of the object within its kind.
    pub name: String,
    /// The observed status.
    pub status: serde_json::Value,
    /// When the coordinator received it (RFC 3339).
    pub reported_at: String,
}

/// `POST /edge/v1/join-tokens`: create a join token (admin only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRequest {
    /// Lifetime in seconds; the site's default when absent.
    #[serde(default)]
    pub ttl_secs: Option<i64>,
    /// Restrict the token to the host of this name.
    #[serde(default)]
    pub host: Option<String>,
}

/// A join token, shown once at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenCreated {
    /// The token to give to `agent --join-token`.
    pub token: String,
    /// When it stops working (RFC 3339).
    pub expires_at: String,
    /// The host name it is restricted to, if any.
    pub host: Option<String>,
}

/// A host as the admin API shows it (`GET /edge/v1/hosts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// The host's id.
    pub id: String,
    /// The host's name.
    pub hostname: String,
    /// Availability zone.
    pub zone: String,
    /// Whether the scheduler may place work on it.
    pub enabled: bool,
    /// Why it was disabled.
    pub disabled_reason: Option<String>,
    /// `up` while its heartbeat lease lives, else `down`.
    pub state: String,
    /// When the host monitor last saw the state change (RFC 3339).
    pub state_changed_at: Option<String>,
    /// When it enrolled (RFC 3339).
    pub created_at: String,
    /// Last change of its record (RFC 3339).
    pub updated_at: String,
}

/// `PUT /edge/v1/hosts/<id>`: enable or disable a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostUpdate {
    /// New enabled flag.
    pub enabled: bool,
    /// Why it is disabled (ignored when enabling).
    #[serde(default)]
    pub disabled_reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_header_round_trips() {
        let c = HostCredential { host_id: "abc".into(), secret: "s3:cr:et".into() };
        let parsed = HostCredential::from_authorization(&c.authorization()).unwrap();
        assert_eq!(parsed.host_id, "abc");
        assert_eq!(parsed.secret, "s3:cr:et");
        assert!(HostCredential::from_authorization("Basic abc").is_none());
        assert!(HostCredential::from_authorization("Bearer :x").is_none());
        assert!(!format!("{c:?}").contains("s3"));
    }
}
