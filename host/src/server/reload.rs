//! Hot reload: the server watches the extensions directory and swaps in
//! what changed, without stopping.
//!
//! Every pass compares each `.wasm` and its sidecar with the versions the
//! serving set was loaded from (device, inode, size, mtime and ctime, so a
//! rewrite in place is seen). A new or changed file is loaded off the
//! request path (compiling runs on a blocking thread) and the whole set is
//! swapped at once ([`crate::runtime::ExtensionCatalog::replace`]): calls in
//! flight finish on the version they started with. A changed file that fails
//! to load is reported (log, metric, `ext list`) and the previous version
//! keeps serving; it is tried again when it changes again. A removed file
//! takes no new sandboxes; its live ones can still be destroyed and billed.

use super::metrics::Metrics;
use crate::runtime::{ExtensionEntry, ExtensionSet, Runtime, sidecar_path};
use crate::service::Service;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How often the directory is looked at.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// What identifies one version of a file.
type FileStamp = Option<(u64, u64, u64, i64, i64, i64, i64)>;

fn stamp(path: &Path) -> FileStamp {
    let metadata = std::fs::metadata(path).ok()?;
    Some((
        metadata.dev(),
        metadata.ino(),
        metadata.len(),
        metadata.mtime(),
        metadata.mtime_nsec(),
        metadata.ctime(),
        metadata.ctime_nsec(),
    ))
}

/// The version of an instance: its component and its sidecar.
type Version = (FileStamp, FileStamp);

fn version(path: &Path) -> Version {
    (stamp(path), stamp(&sidecar_path(path)))
}

#[derive(Default)]
struct Seen {
    /// The version each serving entry was loaded from.
    serving: BTreeMap<String, Version>,
    /// Versions that failed to load, with why: not tried again until they
    /// change.
    failed: BTreeMap<String, (Version, String)>,
}

#[derive(Default)]
pub struct Reloader {
    seen: tokio::sync::Mutex<Seen>,
    /// Why the newest version of each instance did not load (the previous
    /// one serving), for `ext list`.
    failures: Mutex<BTreeMap<String, String>>,
}

impl Reloader {
    /// Notes the versions in `dir` now: call before the first load, so a
    /// change made while it loads is seen by the first pass.
    pub async fn remember_current(&self, dir: &Path) {
        let mut seen = self.seen.lock().await;
        if let Ok(files) = Runtime::extension_files(dir) {
            seen.serving = files
                .iter()
                .map(|(name, path)| (name.clone(), version(path)))
                .collect();
        }
    }

    /// Why the newest version of `name` is not serving, if it failed.
    pub fn failure(&self, name: &str) -> Option<String> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(name)
            .cloned()
    }

    /// One pass: loads what changed and swaps the set when anything did.
    pub async fn reload_now(&self, service: &Arc<Service>, metrics: &Metrics) {
        let dir = &service.config().paths.extensions_dir;
        let Ok(files) = Runtime::extension_files(dir) else {
            return;
        };
        let mut seen = self.seen.lock().await;
        let current = service.catalog().snapshot();
        let mut entries: Vec<ExtensionEntry> = Vec::with_capacity(files.len());
        let mut changed = current.entries.len() != files.len();
        for (name, path) in &files {
            let now = version(path);
            let unchanged = seen.serving.get(name) == Some(&now);
            let known_bad = seen
                .failed
                .get(name)
                .is_some_and(|(failed, _)| failed == &now);
            let serving = current.entry(name).cloned();
            if (unchanged || known_bad)
                && let Some(entry) = serving
            {
                entries.push(entry);
                continue;
            }
            let loaded = service.runtime().load_file(path).await;
            match (&loaded.status, serving) {
                (Err(reason), Some(previous)) if previous.status.is_ok() => {
                    tracing::warn!(
                        extension = %name,
                        "{} changed but does not load ({reason}); the previous version keeps serving",
                        path.display()
                    );
                    metrics.reload_failures.inc();
                    seen.failed.insert(name.clone(), (now, reason.clone()));
                    self.failures
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert(name.clone(), reason.clone());
                    entries.push(previous);
                }
                _ => {
                    if let Err(reason) = &loaded.status {
                        metrics.reload_failures.inc();
                        tracing::warn!(extension = %name, "{} does not load: {reason}", path.display());
                    } else {
                        tracing::info!(extension = %name, "loaded {}", path.display());
                    }
                    seen.serving.insert(name.clone(), now);
                    seen.failed.remove(name);
                    self.failures
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .remove(name);
                    entries.push(loaded);
                    changed = true;
                }
            }
        }
        seen.serving.retain(|name, _| files.contains_key(name));
        seen.failed.retain(|name, _| files.contains_key(name));
        if changed {
            service.catalog().replace(ExtensionSet { entries });
        }
    }
}

/// Runs passes until `shutdown` turns true.
pub async fn watch(
    reloader: Arc<Reloader>,
    service: Arc<Service>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(WATCH_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
        reloader.reload_now(&service, &metrics).await;
    }
}
