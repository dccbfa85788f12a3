//! The coordinator's agent API, as the agent calls it.

use std::time::Duration;

use model::agent_api::{
    DesiredState, EnrolRequest, EnrolResponse, HeartbeatResponse, HostCredential, HostLoad, InventoryAccepted, InventoryReport, ObservedRecord,
    ObservedReport, AGENT_API_PREFIX,
};
use model::inventory::HostInventory;
use serde::de::DeserializeOwned;

/// Errors talking to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot reach the coordinator: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("The coordinator refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            ClientError::Transport(_) => None,
        }
    }
}

/// A client of the agent API.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    credential: Option<HostCredential>,
}

impl Client {
    /// A client of the coordinator at `base` (e.g. `http://10.0.0.1:5000`).
    pub fn new(base: &str) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
        Ok(Client { base: format!("{}{AGENT_API_PREFIX}", base.trim_end_matches('/')), http, credential: None })
    }

    /// The same client, authenticating as a host.
    pub fn with_credential(mut self, credential: HostCredential) -> Client {
        self.credential = Some(credential);
        self
    }

    fn host_id(&self) -> &str {
        self.credential.as_ref().map(|c| c.host_id.as_str()).unwrap_or("")
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let req = match &self.credential {
            Some(c) => req.header(reqwest::header::AUTHORIZATION, c.authorization()),
            None => req,
        };
        let resp = req.send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        Err(ClientError::Refused { status: status.as_u16(), message })
    }

    /// Exchanges a join token for a host identity.
    pub async fn enrol(&self, join_token: &str, hostname: &str) -> Result<EnrolResponse, ClientError> {
        let body = EnrolRequest { join_token: join_token.into(), hostname: hostname.into() };
        self.send(self.http.post(format!("{}/enrol", self.base)).json(&body).timeout(Duration::from_secs(30))).await
    }

    /// Keeps the host's heartbeat lease alive.
    pub async fn heartbeat(&self) -> Result<HeartbeatResponse, ClientError> {
        self.send(self.http.post(format!("{}/hosts/{}/heartbeat", self.base, self.host_id())).timeout(Duration::from_secs(10))).await
    }

    /// Reports the host's inventory, with its uptime and load now if known.
    pub async fn report_inventory(&self, inventory: &HostInventory, load: Option<HostLoad>) -> Result<InventoryAccepted, ClientError> {
        let body = InventoryReport { inventory: inventory.clone(), load };
        self.send(self.http.put(format!("{}/hosts/{}/inventory", self.base, self.host_id())).json(&body).timeout(Duration::from_secs(30))).await
    }

    /// Reads the desired state; with `after` > 0, waits up to `wait` for a change after that revision.
    pub async fn desired(&self, after: i64, wait: Duration) -> Result<DesiredState, ClientError> {
        let url = format!("{}/hosts/{}/desired?after={after}&timeout={}", self.base, self.host_id(), wait.as_secs());
        self.send(self.http.get(url).timeout(wait + Duration::from_secs(15))).await
    }

    /// Reports the observed state of one object.
    pub async fn put_observed(&self, kind: &str, name: &str, status: serde_json::Value) -> Result<ObservedRecord, ClientError> {
        let url = format!("{}/hosts/{}/observed/{kind}/{name}", self.base, self.host_id());
        self.send(self.http.put(url).json(&ObservedReport { status }).timeout(Duration::from_secs(10))).await
    }
}
