//! How the CLI reaches and proves itself to the coordinator: the API token and the CA certificate, from
//! flags, the environment, or `~/.config/drover/config.toml` (`token = ...`, `coordinator = ...`,
//! `ca-file = ...`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;

/// The CLI's config file, all optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct FileSettings {
    /// API token (`drover tokens create --kind api`, or the coordinator's `<data>/admin.token`).
    pub(crate) token: Option<String>,
    /// Coordinator URL, used when neither `--coordinator` nor `DROVER_COORDINATOR` is given.
    pub(crate) coordinator: Option<String>,
    /// CA certificate (PEM) to trust for an https:// coordinator.
    pub(crate) ca_file: Option<PathBuf>,
}

/// What every connection of this process uses.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectSettings {
    /// Bearer token sent with every call.
    pub(crate) token: Option<String>,
    /// CA certificate file for https://.
    pub(crate) ca_file: Option<PathBuf>,
}

/// Set once in `main` before any command runs: every command connects with the same identity, so it is
/// process-wide rather than threaded through each command's arguments.
static SETTINGS: OnceLock<ConnectSettings> = OnceLock::new();

/// Record the settings for [`current`]; later calls are ignored.
pub(crate) fn set(settings: ConnectSettings) {
    let _ = SETTINGS.set(settings);
}

/// The settings in force (empty when none were set, e.g. in unit tests).
pub(crate) fn current() -> ConnectSettings {
    SETTINGS.get().cloned().unwrap_or_default()
}

/// `$XDG_CONFIG_HOME/drover/config.toml`, else `~/.config/drover/config.toml`.
pub(crate) fn config_path() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(Path::new(&x).join("drover/config.toml"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| Path::new(&h).join(".config/drover/config.toml"))
}

/// Reads the config file; a missing file is an empty configuration.
pub(crate) fn read_file(path: &Path) -> anyhow::Result<FileSettings> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileSettings::default()),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        assert!(read_file(&p).unwrap().token.is_none());
        std::fs::write(
            &p,
            "token = \"drv_x\"\ncoordinator = \"https://ci:7330\"\nca-file = \"/etc/drover/ca.pem\"\n",
        )
        .unwrap();
        let f = read_file(&p).unwrap();
        assert_eq!(f.token.as_deref(), Some("drv_x"));
        assert_eq!(f.coordinator.as_deref(), Some("https://ci:7330"));
        assert_eq!(f.ca_file, Some(PathBuf::from("/etc/drover/ca.pem")));
        std::fs::write(&p, "tokn = \"x\"\n").unwrap();
        assert!(read_file(&p).unwrap_err().to_string().contains("tokn"));
    }
}
