//! Where the host keeps its files: one home directory holding the ledger, the
//! state store and, by default, the extensions and profiles directories; and
//! one precompiled-extension cache per user, shared by all of that user's
//! homes (a fresh home does not compile again).

use std::path::{Path, PathBuf};

/// The directories one host process works with.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub home: PathBuf,
    pub extensions_dir: PathBuf,
    pub profiles_dir: PathBuf,
    cache_dir: PathBuf,
}

impl HostPaths {
    /// `home` with `<home>/extensions` and `<home>/profiles` unless given,
    /// and the user's cache ([`default_cache_dir`]).
    pub fn new(
        home: PathBuf,
        extensions_dir: Option<PathBuf>,
        profiles_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            extensions_dir: extensions_dir.unwrap_or_else(|| home.join("extensions")),
            profiles_dir: profiles_dir.unwrap_or_else(|| home.join("profiles")),
            cache_dir: default_cache_dir().unwrap_or_else(|| home.join("cache")),
            home,
        }
    }

    /// Precompiled extensions, keyed by content hash and engine: the user's
    /// cache, or `<home>/cache` when the environment names no cache or home
    /// directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone()
    }

    /// The same home with another cache directory.
    pub fn with_cache_dir(mut self, cache_dir: PathBuf) -> Self {
        self.cache_dir = cache_dir;
        self
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

fn non_empty_env(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

/// The compiled-extension cache: `$SANDBOXER_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/sandboxer/extensions`, else
/// `$HOME/.cache/sandboxer/extensions`; `None` when none is set.
///
/// Per user rather than per home: compiling a big guest takes seconds, and
/// entries are safe to share (keyed by content and engine, verified before
/// use, written atomically under a temporary name).
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = non_empty_env("SANDBOXER_CACHE_DIR") {
        return Some(dir);
    }
    if let Some(cache_home) = non_empty_env("XDG_CACHE_HOME") {
        return Some(cache_home.join("sandboxer").join("extensions"));
    }
    non_empty_env("HOME").map(|home| home.join(".cache").join("sandboxer").join("extensions"))
}

/// `$XDG_DATA_HOME/sandboxer`, else `$HOME/.local/share/sandboxer`, else
/// `./.sandboxer` when neither variable is set.
pub fn default_home() -> PathBuf {
    if let Some(data_home) = non_empty_env("XDG_DATA_HOME") {
        return data_home.join("sandboxer");
    }
    if let Some(home) = non_empty_env("HOME") {
        return home.join(".local").join("share").join("sandboxer");
    }
    Path::new(".sandboxer").to_path_buf()
}
