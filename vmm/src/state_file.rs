//! The state file beside the control socket (`<socket>.state.json`): how a
//! restarted agent finds a running VMM process and adopts it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Format version of the state file.
pub const STATE_FILE_VERSION: u32 = 1;

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// Filesystem trouble.
    #[error("State file {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// Not a state file this build understands.
    #[error("State file {0} is invalid: {1}")]
    Format(PathBuf, String),
}

/// What the VMM records about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmmStateFile {
    /// [`STATE_FILE_VERSION`].
    pub v: u32,
    /// Process id of the VMM.
    pub pid: u32,
    /// Start time of that process in clock ticks since boot (field 22 of
    /// /proc/PID/stat), so a reused pid is not mistaken for the VMM.
    pub start_ticks: u64,
    /// The control socket.
    pub api_socket: PathBuf,
    /// Unix time (ms) the VMM started.
    pub started_unix_ms: u64,
    /// Version of the vmm crate that wrote it.
    pub vmm_version: String,
    /// The VM's configuration.
    pub config: VmConfig,
}

/// `<socket>.state.json`.
pub fn path_for(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".state.json");
    PathBuf::from(s)
}

/// Start time of `pid` in clock ticks, from /proc.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

impl VmmStateFile {
    /// The record for this process.
    pub fn for_self(api_socket: &Path, config: &VmConfig) -> Self {
        let pid = std::process::id();
        VmmStateFile {
            v: STATE_FILE_VERSION,
            pid,
            start_ticks: process_start_ticks(pid).unwrap_or(0),
            api_socket: api_socket.to_path_buf(),
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            config: config.clone(),
        }
    }

    /// Writes it atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), StateFileError> {
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| StateFileError::Format(path.into(), e.to_string()))?;
        std::fs::write(&tmp, bytes).map_err(|e| StateFileError::Io(tmp.clone(), e))?;
        std::fs::rename(&tmp, path).map_err(|e| StateFileError::Io(path.into(), e))
    }

    /// Reads a state file.
    pub fn read(path: &Path) -> Result<Self, StateFileError> {
        let bytes = std::fs::read(path).map_err(|e| StateFileError::Io(path.into(), e))?;
        let s: VmmStateFile =
            serde_json::from_slice(&bytes).map_err(|e| StateFileError::Format(path.into(), e.to_string()))?;
        if s.v != STATE_FILE_VERSION {
            return Err(StateFileError::Format(path.into(), format!("version {} is unknown", s.v)));
        }
        Ok(s)
    }

    /// Whether the recorded process is still the VMM that wrote this file.
    pub fn is_alive(&self) -> bool {
        process_start_ticks(self.pid).is_some_and(|t| t == self.start_ticks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_liveness() {
        let dir = std::env::temp_dir().join(format!("vmm-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let s = VmmStateFile::for_self(&sock, &VmConfig::default());
        let p = path_for(&sock);
        s.write(&p).unwrap();
        let r = VmmStateFile::read(&p).unwrap();
        assert_eq!(r, s);
        assert!(r.is_alive());
        let mut dead = r.clone();
        dead.start_ticks += 1;
        assert!(!dead.is_alive());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
