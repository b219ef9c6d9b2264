//! Keeps `<home>/sandboxes/` to the sandboxes the host knows: a process
//! tree that belongs to no live sandbox (left by a crash between spawn and
//! the record, or started before spawning was tied to `create`) is killed,
//! and the directory of a sandbox that ended is removed once its logs have
//! been kept for the retention time ([`RETENTION_ENV`], default
//! [`DEFAULT_RETENTION`]). The caller says which sandboxes are live; this
//! module reads no records and calls no extension.

use crate::runtime::process::{ProcessState, kill_tree, read_state};
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

/// How long a sandbox's output is kept after it ended, in seconds.
pub const RETENTION_ENV: &str = "SANDBOXER_SANDBOX_LOG_RETENTION_SECS";
/// One day.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// What a pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SandboxTidy {
    /// Sandboxes whose process tree was killed: no live sandbox owned it.
    pub killed: Vec<String>,
    /// Sandboxes whose directory was removed: ended longer ago than the
    /// retention time.
    pub removed: Vec<String>,
    /// What could not be done, one line each.
    pub problems: Vec<String>,
}

impl SandboxTidy {
    /// One line per action, for a reconcile report.
    pub fn lines(&self) -> Vec<String> {
        let killed = self
            .killed
            .iter()
            .map(|id| format!("{id}: a process tree ran without a live sandbox; killed"));
        let removed = self.removed.iter().map(|id| {
            format!("{id}: ended longer ago than the log retention; its directory was removed")
        });
        killed
            .chain(removed)
            .chain(self.problems.iter().cloned())
            .collect()
    }
}

/// The retention time from [`RETENTION_ENV`], or the default.
pub fn log_retention() -> Result<Duration, String> {
    match std::env::var(RETENTION_ENV) {
        Err(_) => Ok(DEFAULT_RETENTION),
        Ok(text) => text.trim().parse::<u64>().map(Duration::from_secs).map_err(|_| {
            format!("{RETENTION_ENV}={text:?} is not a whole number of seconds; sandbox logs are kept until it is")
        }),
    }
}

/// Kills the process trees under `sandboxes_dir` that belong to none of
/// `live` and started before `live_as_of_ms` (one started later may belong
/// to a sandbox created since), and removes directories of sandboxes that
/// ended more than the retention time before `now_ms`.
pub fn tidy_sandboxes(
    sandboxes_dir: &Path,
    live: &HashSet<String>,
    live_as_of_ms: u64,
    now_ms: u64,
) -> SandboxTidy {
    let mut tidy = SandboxTidy::default();
    let Ok(entries) = std::fs::read_dir(sandboxes_dir) else {
        return tidy;
    };
    let retention = match log_retention() {
        Ok(retention) => Some(retention.as_millis() as u64),
        Err(problem) => {
            tidy.problems.push(problem);
            None
        }
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(id) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let dir = entry.path();
        if live.contains(&id) || crate::names::check_name("sandbox", &id).is_err() || !dir.is_dir()
        {
            continue;
        }
        match read_state(&dir) {
            Some(ProcessState::Running { started }) if started.started_ms < live_as_of_ms => {
                match kill_tree(&dir) {
                    Ok(_) => tidy.killed.push(id),
                    Err(error) => tidy.problems.push(format!(
                        "{id}: a process tree runs without a live sandbox and could not be killed: {error}"
                    )),
                }
            }
            Some(ProcessState::Running { .. }) => {}
            Some(ProcessState::Exited(exited)) => {
                if retention.is_some_and(|keep| now_ms.saturating_sub(exited.ended_ms) >= keep) {
                    remove(&dir, id, &mut tidy);
                }
            }
            // Never started (refused, or failed to set up): its age is the
            // directory's.
            None => {
                let age_ms = std::fs::metadata(&dir)
                    .and_then(|metadata| metadata.modified())
                    .ok()
                    .and_then(|modified| modified.elapsed().ok())
                    .map_or(0, |age| age.as_millis() as u64);
                if retention.is_some_and(|keep| age_ms >= keep) {
                    remove(&dir, id, &mut tidy);
                }
            }
        }
    }
    tidy.killed.sort();
    tidy.removed.sort();
    tidy
}

fn remove(dir: &Path, id: String, tidy: &mut SandboxTidy) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => tidy.removed.push(id),
        Err(error) => tidy
            .problems
            .push(format!("{id}: cannot remove {}: {error}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::Enforcement;
    use crate::runtime::process::{EndCause, Exited};

    fn ended(dir: &Path, ended_ms: u64) {
        std::fs::create_dir_all(dir).unwrap();
        let exited = Exited {
            exit_code: Some(0),
            signal: None,
            ended_by: EndCause::Exited,
            enforcement: Enforcement::Rlimits,
            wall_ms: 1,
            cpu_ms: 0,
            peak_memory_kb: 0,
            ended_ms,
        };
        std::fs::write(dir.join("exit.json"), serde_json::to_vec(&exited).unwrap()).unwrap();
    }

    #[test]
    fn ended_sandboxes_keep_their_logs_for_the_retention_time() {
        let sandboxes = tempfile::tempdir().unwrap();
        let day = DEFAULT_RETENTION.as_millis() as u64;
        let now = 10 * day;
        ended(&sandboxes.path().join("sbx-old"), now - day - 1);
        ended(&sandboxes.path().join("sbx-recent"), now - 1000);
        ended(&sandboxes.path().join("sbx-live"), now - 2 * day);
        let live = HashSet::from(["sbx-live".to_string()]);
        let tidy = tidy_sandboxes(sandboxes.path(), &live, now, now);
        assert_eq!(tidy.removed, vec!["sbx-old".to_string()]);
        assert!(
            tidy.killed.is_empty() && tidy.problems.is_empty(),
            "{tidy:?}"
        );
        assert!(sandboxes.path().join("sbx-recent/exit.json").is_file());
        assert!(sandboxes.path().join("sbx-live").is_dir());
        assert_eq!(
            tidy.lines(),
            vec!["sbx-old: ended longer ago than the log retention; its directory was removed"]
        );
    }
}
