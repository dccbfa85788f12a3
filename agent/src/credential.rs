//! The host credential on disk: `<state-dir>/credential.json`, mode 0600.
//!
//! Written once after enrolment (to a temporary file, then renamed, so a crash never
//! leaves half a credential); read on every later start.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use model::agent_api::HostCredential;

/// Name of the credential file inside the state directory.
pub const FILE_NAME: &str = "credential.json";

/// Errors reading or writing the credential.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("Cannot access {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("The credential file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("The credential file {path} is readable by others (mode {mode:o}); it must be 0600")]
    Permissions { path: PathBuf, mode: u32 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialError + '_ {
    move |source| CredentialError::Io { path: path.into(), source }
}

/// Reads the credential from `state_dir`, `None` when the host has not enrolled yet.
pub fn load(state_dir: &Path) -> Result<Option<HostCredential>, CredentialError> {
    let path = state_dir.join(FILE_NAME);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialError::Permissions { path, mode });
    }
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map(Some).map_err(|e| CredentialError::Corrupt { path, reason: e.to_string() })
}

/// Writes the credential into `state_dir` (created if missing) with mode 0600.
pub fn save(state_dir: &Path, credential: &HostCredential) -> Result<(), CredentialError> {
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let path = state_dir.join(FILE_NAME);
    let tmp = state_dir.join(format!("{FILE_NAME}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    let text = serde_json::to_vec_pretty(credential).expect("credentials serialize");
    f.write_all(&text).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_0600_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(load(&state).unwrap().is_none());
        let c = HostCredential { host_id: "h".into(), secret: "s".into() };
        save(&state, &c).unwrap();
        let mode = std::fs::metadata(state.join(FILE_NAME)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&state).unwrap(), Some(c));
        std::fs::set_permissions(state.join(FILE_NAME), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load(&state), Err(CredentialError::Permissions { .. })));
    }
}
