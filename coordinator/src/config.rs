//! Coordinator configuration: defaults, then a TOML file, then environment
//! variables, then command-line flags (each later source wins).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;

/// The whole configuration of a coordinator replica.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP(S) server listens on.
    pub listen: SocketAddr,
    /// Base URL clients use to reach this site (catalog endpoints are built from it).
    pub public_url: String,
    /// Region name in the service catalog.
    pub region: String,
    pub store: StoreConfig,
    pub tls: Option<TlsConfig>,
    pub identity: IdentityConfig,
    pub hosts: HostsConfig,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

/// Where state lives.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `embedded` or `etcd`.
    pub backend: String,
    /// Embedded store file.
    pub path: PathBuf,
    /// etcd client URLs.
    pub endpoints: Vec<String>,
}

/// TLS certificate and key (PEM) for the API server.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Identity settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Token lifetime in seconds.
    pub token_ttl_secs: u64,
    /// Optional policy file (JSON or YAML-free TOML map of rule name to rule).
    pub policy_file: Option<PathBuf>,
    /// Failed logins allowed per user before throttling.
    pub max_failed_logins: u32,
    /// How long a throttled user must wait, in seconds.
    pub lockout_secs: u64,
}

/// Host monitoring settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostsConfig {
    /// TTL of a host's heartbeat lease; a host is down this long after its last heartbeat.
    pub heartbeat_ttl_secs: i64,
    /// Lifetime of a join token, in seconds.
    pub join_token_ttl_secs: i64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:5000".parse().unwrap(),
            public_url: String::new(),
            region: "RegionOne".into(),
            store: StoreConfig::default(),
            tls: None,
            identity: IdentityConfig::default(),
            hosts: HostsConfig::default(),
            max_body_bytes: 1 << 20,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: "embedded".into(),
            path: PathBuf::from("/var/lib/edgecloud/coordinator.redb"),
            endpoints: vec!["http://127.0.0.1:2379".into()],
        }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self { token_ttl_secs: 3600, policy_file: None, max_failed_logins: 5, lockout_secs: 60 }
    }
}

impl Default for HostsConfig {
    fn default() -> Self {
        Self { heartbeat_ttl_secs: 10, join_token_ttl_secs: 3600 }
    }
}

/// Flags (each also readable from an `EDGECLOUD_*` environment variable) that override the file.
#[derive(Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "EDGECLOUD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:5000.
    #[arg(long, env = "EDGECLOUD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// URL clients use to reach this site; defaults to http(s)://<listen>.
    #[arg(long, env = "EDGECLOUD_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Region name in the service catalog.
    #[arg(long, env = "EDGECLOUD_REGION")]
    pub region: Option<String>,
    /// Store backend: `embedded` (single node, a file) or `etcd`.
    #[arg(long, env = "EDGECLOUD_STORE")]
    pub store: Option<String>,
    /// File of the embedded store.
    #[arg(long, env = "EDGECLOUD_STORE_PATH")]
    pub store_path: Option<PathBuf>,
    /// etcd endpoints, comma separated.
    #[arg(long, env = "EDGECLOUD_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// PEM certificate for TLS (needs --tls-key too).
    #[arg(long, env = "EDGECLOUD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "EDGECLOUD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Heartbeat lease TTL in seconds.
    #[arg(long, env = "EDGECLOUD_HEARTBEAT_TTL")]
    pub heartbeat_ttl: Option<i64>,
    /// Token lifetime in seconds.
    #[arg(long, env = "EDGECLOUD_TOKEN_TTL")]
    pub token_ttl: Option<u64>,
    /// Policy override file (JSON map of rule name to rule).
    #[arg(long, env = "EDGECLOUD_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
}

/// Errors loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("Invalid configuration in {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("Invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the file named by the flags (if any) and applies the flags on top.
    pub fn load(args: &ConfigArgs) -> Result<Config, ConfigError> {
        let mut cfg = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.clone(), source })?
            }
            None => Config::default(),
        };
        if let Some(v) = args.listen {
            cfg.listen = v;
        }
        if let Some(v) = &args.public_url {
            cfg.public_url = v.clone();
        }
        if let Some(v) = &args.region {
            cfg.region = v.clone();
        }
        if let Some(v) = &args.store {
            cfg.store.backend = v.clone();
        }
        if let Some(v) = &args.store_path {
            cfg.store.path = v.clone();
        }
        if let Some(v) = &args.etcd_endpoints {
            cfg.store.endpoints = v.clone();
        }
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            cfg.tls = Some(TlsConfig { cert: cert.clone(), key: key.clone() });
        }
        if let Some(v) = args.heartbeat_ttl {
            cfg.hosts.heartbeat_ttl_secs = v;
        }
        if let Some(v) = args.token_ttl {
            cfg.identity.token_ttl_secs = v;
        }
        if let Some(v) = &args.policy_file {
            cfg.identity.policy_file = Some(v.clone());
        }
        if cfg.public_url.is_empty() {
            let scheme = if cfg.tls.is_some() { "https" } else { "http" };
            cfg.public_url = format!("{scheme}://{}", cfg.listen);
        }
        cfg.public_url = cfg.public_url.trim_end_matches('/').to_string();
        match cfg.store.backend.as_str() {
            "embedded" | "etcd" => {}
            other => return Err(ConfigError::Invalid(format!("store backend must be 'embedded' or 'etcd', not '{other}'"))),
        }
        if cfg.hosts.heartbeat_ttl_secs < 1 {
            return Err(ConfigError::Invalid("heartbeat TTL must be at least 1 second".into()));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:7000\"\nregion = \"Edge1\"\n[store]\nbackend = \"etcd\"\n").unwrap();
        let args = ConfigArgs { config: Some(path), listen: Some("127.0.0.1:7001".parse().unwrap()), ..Default::default() };
        let cfg = Config::load(&args).unwrap();
        assert_eq!(cfg.listen.port(), 7001);
        assert_eq!(cfg.region, "Edge1");
        assert_eq!(cfg.store.backend, "etcd");
        assert_eq!(cfg.public_url, "http://127.0.0.1:7001");
    }

    #[test]
    fn unknown_keys_and_backends_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let err = Config::load(&ConfigArgs { config: Some(path.clone()), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        std::fs::write(&path, "[store]\nbackend = \"mysql\"\n").unwrap();
        let err = Config::load(&ConfigArgs { config: Some(path), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("mysql"), "{err}");
    }
}
