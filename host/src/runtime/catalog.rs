//! The extension set a long-running host serves, swapped whole when the
//! extensions directory changes.
//!
//! A caller takes a snapshot (an `Arc` of one [`ExtensionSet`]) and keeps
//! using it for the whole of its work: calls in flight finish on the version
//! they started with, whatever is swapped in meanwhile. A loaded instance
//! that a new set no longer serves (its file was removed, or now fails to
//! load) is retired, not dropped: sandboxes it created can still be
//! destroyed and billed through it, while routing sees only the current set.

use super::{Extension, ExtensionSet};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

pub struct ExtensionCatalog {
    current: RwLock<Arc<ExtensionSet>>,
    /// Instances no longer in the current set, by name: the newest retired
    /// version of each.
    retired: Mutex<BTreeMap<String, Arc<Extension>>>,
}

impl ExtensionCatalog {
    pub fn new(set: ExtensionSet) -> Self {
        Self {
            current: RwLock::new(Arc::new(set)),
            retired: Mutex::new(BTreeMap::new()),
        }
    }

    /// The set serving now.
    pub fn snapshot(&self) -> Arc<ExtensionSet> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Serves `set` from now on. Every instance the old set loaded that the
    /// new one does not (by name) is retired.
    pub fn replace(&self, set: ExtensionSet) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut retired = self
            .retired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for old in current.loaded() {
            if set.get(&old.name).is_none() {
                retired.insert(old.name.clone(), old.clone());
            }
        }
        for new in set.loaded() {
            retired.remove(&new.name);
        }
        *current = Arc::new(set);
    }

    /// The instance a live sandbox runs on: the current one, else the
    /// retired one; otherwise why there is none.
    pub fn for_existing(&self, name: &str) -> Result<Arc<Extension>, String> {
        let current = self.snapshot();
        if let Some(extension) = current.get(name) {
            return Ok(extension.clone());
        }
        if let Some(extension) = self
            .retired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(name)
        {
            return Ok(extension.clone());
        }
        Err(match current.entry(name) {
            Some(entry) => format!(
                "rejected: {}",
                entry.status.as_ref().err().map_or("", String::as_str)
            ),
            None => "no such file in the extensions directory".into(),
        })
    }

    /// Instances kept only for the sandboxes they created.
    pub fn retired(&self) -> Vec<Arc<Extension>> {
        self.retired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
