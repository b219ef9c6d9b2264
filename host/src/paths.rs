//! Where the host keeps its files: one home directory holding the ledger, the
//! state store, the precompiled cache and, by default, the extensions and
//! profiles directories.

use std::path::{Path, PathBuf};

/// The directories one host process works with.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub home: PathBuf,
    pub extensions_dir: PathBuf,
    pub profiles_dir: PathBuf,
}

impl HostPaths {
    /// `home` with `<home>/extensions` and `<home>/profiles` unless given.
    pub fn new(
        home: PathBuf,
        extensions_dir: Option<PathBuf>,
        profiles_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            extensions_dir: extensions_dir.unwrap_or_else(|| home.join("extensions")),
            profiles_dir: profiles_dir.unwrap_or_else(|| home.join("profiles")),
            home,
        }
    }

    /// Precompiled extensions, keyed by content hash and engine.
    pub fn cache_dir(&self) -> PathBuf {
        self.home.join("cache")
    }

    /// The credits ledger.
    pub fn ledger_file(&self) -> PathBuf {
        self.home.join("ledger.redb")
    }

    /// One directory per sandbox whose process runs on this machine.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.home.join("sandboxes")
    }

    /// Extension key-value stores and other host state.
    pub fn state_file(&self) -> PathBuf {
        self.home.join("state.redb")
    }
}

/// `$XDG_DATA_HOME/sandboxer`, else `$HOME/.local/share/sandboxer`, else
/// `./.sandboxer` when neither variable is set.
pub fn default_home() -> PathBuf {
    let from_env = |name: &str| {
        std::env::var_os(name)
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
    };
    if let Some(data_home) = from_env("XDG_DATA_HOME") {
        return data_home.join("sandboxer");
    }
    if let Some(home) = from_env("HOME") {
        return home.join(".local").join("share").join("sandboxer");
    }
    Path::new(".sandboxer").to_path_buf()
}
