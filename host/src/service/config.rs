//! The host's configuration: the directories of a home and the settings read
//! from the environment, gathered once by whichever front end starts.

use crate::ledger::DEFAULT_STARTING_CREDITS;
use crate::paths::HostPaths;
use crate::runtime::{CompileNotice, CompileProgress};
use sandboxer_credits::parse_credits;
use std::time::Duration;

/// How long a command waits for another process to release a home's files
/// unless SANDBOXER_LOCK_WAIT_SECS says otherwise.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct ServiceConfig {
    pub paths: HostPaths,
    /// A webhook that also receives meter events.
    pub hub_url: Option<String>,
    /// Granted once to tenant `default` the first time it is used.
    pub default_credits: u64,
    /// How long to wait for another process to release the home.
    pub lock_wait: Duration,
    /// The program the process capability starts sandboxes through (this
    /// binary); none disables the capability.
    pub supervisor: Option<std::path::PathBuf>,
    /// Give sandboxes created here a stdin fed through a FIFO (`run`).
    pub pipe_stdin: bool,
    /// Told before and after each compile the cache cannot spare.
    pub on_compile: Option<CompileProgress>,
    /// Told once when opening has to wait for another process.
    pub on_wait: Option<CompileNotice>,
    /// The PostgreSQL database that keeps the ledger (`--store`,
    /// SANDBOXER_STORE); none: `<home>/ledger.redb`.
    pub store: Option<String>,
}

impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("paths", &self.paths)
            .field("hub_url", &self.hub_url)
            .field("default_credits", &self.default_credits)
            .field("lock_wait", &self.lock_wait)
            .field(
                "store",
                &self.store.as_deref().map(crate::ledger::redacted_store_url),
            )
            .finish_non_exhaustive()
    }
}

/// A setting from the environment that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

impl ServiceConfig {
    /// The configuration of `paths`, with SANDBOXER_DEFAULT_CREDITS and
    /// SANDBOXER_LOCK_WAIT_SECS read from the environment.
    pub fn from_env(paths: HostPaths, hub_url: Option<String>) -> Result<Self, ConfigError> {
        let default_credits = match std::env::var("SANDBOXER_DEFAULT_CREDITS") {
            Ok(text) => parse_credits(&text).map_err(|error| ConfigError {
                variable: "SANDBOXER_DEFAULT_CREDITS",
                message: error.to_string(),
            })?,
            Err(_) => DEFAULT_STARTING_CREDITS,
        };
        let lock_wait = match std::env::var("SANDBOXER_LOCK_WAIT_SECS") {
            Ok(text) => Duration::from_secs(text.trim().parse().map_err(|_| ConfigError {
                variable: "SANDBOXER_LOCK_WAIT_SECS",
                message: format!("{text:?} is not a whole number of seconds"),
            })?),
            Err(_) => DEFAULT_LOCK_WAIT,
        };
        Ok(Self {
            paths,
            hub_url,
            default_credits,
            lock_wait,
            supervisor: std::env::current_exe().ok(),
            pipe_stdin: false,
            on_compile: None,
            on_wait: None,
            store: None,
        })
    }
}
