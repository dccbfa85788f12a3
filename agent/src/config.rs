//! Agent configuration: defaults, then a TOML file, then `AGENT_*` environment
//! variables, then flags (each later source wins).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

/// Flags of the `agent` binary (each also readable from an `AGENT_*` variable).
#[derive(Parser, Clone, Debug, Default)]
#[command(name = "agent", version, about = "The per-host agent of the edge cloud: enrols the host with the coordinator, \
heartbeats, reports the host's inventory and follows the host's desired state.\n\n\
Configuration comes from defaults, then the TOML file (--config), then AGENT_* environment variables, \
then flags; later sources win.")]
pub struct Flags {
    /// TOML configuration file (keys as the long flags with '_' for '-', plus a [physnets] table
    /// mapping interface names to physical networks).
    #[arg(long, env = "AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Base URL of the coordinator, e.g. http://10.0.0.1:5000.
    #[arg(long, env = "AGENT_COORDINATOR")]
    pub coordinator: Option<String>,
    /// One-use join token from `coordinator join-token create`; needed only on the first start.
    #[arg(long, env = "AGENT_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Directory for the agent's state (its host credential is kept here, mode 0600).
    #[arg(long, env = "AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Root of sysfs to discover NUMA nodes, hugepages and SR-IOV NICs from [default: /sys].
    #[arg(long, env = "AGENT_SYSFS_ROOT")]
    pub sysfs_root: Option<PathBuf>,
    /// Root of procfs to read meminfo and cpuinfo from [default: /proc].
    #[arg(long, env = "AGENT_PROCFS_ROOT")]
    pub procfs_root: Option<PathBuf>,
    /// Directory that holds instance disks; its free space is offered as DISK_GB
    /// [default: /var/lib/edgecloud/instances].
    #[arg(long, env = "AGENT_INSTANCE_POOL")]
    pub instance_pool: Option<PathBuf>,
    /// Host name to enrol as [default: the kernel's host name].
    #[arg(long, env = "AGENT_HOSTNAME")]
    pub hostname: Option<String>,
    /// Seconds between inventory checks; a changed inventory is reported at once [default: 60].
    #[arg(long, env = "AGENT_INVENTORY_INTERVAL")]
    pub inventory_interval: Option<u64>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "AGENT_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// The configuration file's keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub coordinator: Option<String>,
    pub join_token: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub sysfs_root: Option<PathBuf>,
    pub procfs_root: Option<PathBuf>,
    pub instance_pool: Option<PathBuf>,
    pub hostname: Option<String>,
    pub inventory_interval: Option<u64>,
    /// Interface name -> physical network (for SR-IOV PFs).
    pub physnets: BTreeMap<String, String>,
}

/// The agent's effective configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Base URL of the coordinator, without a trailing slash.
    pub coordinator: String,
    pub join_token: Option<String>,
    pub state_dir: PathBuf,
    pub sysfs_root: PathBuf,
    pub procfs_root: PathBuf,
    pub instance_pool: PathBuf,
    pub hostname: Option<String>,
    pub inventory_interval_secs: u64,
    pub physnets: BTreeMap<String, String>,
}

/// Errors loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("Invalid configuration in {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("Missing setting: {0}")]
    Missing(&'static str),
    #[error("Invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Merges the file named by the flags (if any) under the flags and environment.
    pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.clone(), source })?
            }
            None => FileConfig::default(),
        };
        let coordinator = flags.coordinator.clone().or(file.coordinator).ok_or(ConfigError::Missing("--coordinator"))?;
        if !(coordinator.starts_with("http://") || coordinator.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!("--coordinator must be an http(s) URL, not {coordinator:?}")));
        }
        let inventory_interval_secs = flags.inventory_interval.or(file.inventory_interval).unwrap_or(60);
        if inventory_interval_secs == 0 {
            return Err(ConfigError::Invalid("inventory interval must be at least 1 second".into()));
        }
        Ok(Config {
            coordinator: coordinator.trim_end_matches('/').to_string(),
            join_token: flags.join_token.clone().or(file.join_token),
            state_dir: flags.state_dir.clone().or(file.state_dir).ok_or(ConfigError::Missing("--state-dir"))?,
            sysfs_root: flags.sysfs_root.clone().or(file.sysfs_root).unwrap_or_else(|| "/sys".into()),
            procfs_root: flags.procfs_root.clone().or(file.procfs_root).unwrap_or_else(|| "/proc".into()),
            instance_pool: flags.instance_pool.clone().or(file.instance_pool).unwrap_or_else(|| "/var/lib/edgecloud/instances".into()),
            hostname: flags.hostname.clone().or(file.hostname),
            inventory_interval_secs,
            physnets: file.physnets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "coordinator = \"http://file:5000/\"\nstate_dir = \"/var/x\"\nhostname = \"h\"\n[physnets]\nens1f0 = \"physnet1\"\n").unwrap();
        let flags = Flags { config: Some(path.clone()), coordinator: Some("http://flag:5000".into()), ..Default::default() };
        let c = Config::load(&flags).unwrap();
        assert_eq!(c.coordinator, "http://flag:5000");
        assert_eq!(c.state_dir, PathBuf::from("/var/x"));
        assert_eq!(c.hostname.as_deref(), Some("h"));
        assert_eq!(c.physnets["ens1f0"], "physnet1");
        assert_eq!(c.sysfs_root, PathBuf::from("/sys"));

        std::fs::write(&path, "coordinater = \"x\"\n").unwrap();
        assert!(Config::load(&Flags { config: Some(path), ..Default::default() }).unwrap_err().to_string().contains("coordinater"));
        let err = Config::load(&Flags { coordinator: Some("ftp://x".into()), state_dir: Some("/x".into()), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("http"), "{err}");
        assert!(matches!(Config::load(&Flags::default()), Err(ConfigError::Missing("--coordinator"))));
    }
}
