//! A file's identity as the filesystem reports it, and when a digest
//! remembered against that identity may stand in for reading the file again.
//!
//! Hashing a big guest (18 MB) or its artifact (tens of MB) costs tens of
//! milliseconds; a `stat` costs a microsecond. So the cache remembers "the
//! file with this identity had this sha256" and hashes again only when the
//! identity changes. The identity is (device, inode, size, mtime, ctime):
//! every write through the filesystem sets ctime to the current time, and
//! user space cannot set ctime back (`touch -d` and `utimensat` set mtime and
//! atime, and themselves bump ctime). Replacing the file by rename gives a
//! new inode.
//!
//! One gap remains and is closed here: timestamps have a granularity (a
//! clock tick, or a whole second on some filesystems), so two writes close
//! together can leave the same ctime. A remembered digest is therefore
//! trusted only when it was observed at least [`SETTLE_WINDOW`] after the
//! file's last change, as git does for "racily clean" index entries: any
//! later write then lands on a later ctime. A file changed moments ago is
//! simply hashed again.

use serde::{Deserialize, Serialize};
use std::fs::Metadata;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long after a file's last change an observation of its content can be
/// trusted to see every write: more than a whole second (filesystems with
/// one-second timestamps) plus a clock tick.
pub const SETTLE_WINDOW: Duration = Duration::from_secs(2);

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub device: u64,
    pub inode: u64,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub modified_ns: i128,
    /// Status-change time (any write, chmod, rename or utime), nanoseconds.
    pub changed_ns: i128,
}

impl FileIdentity {
    #[cfg(unix)]
    pub fn of(metadata: &Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let nanos = |secs: i64, nsec: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
        Self {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.len(),
            modified_ns: nanos(metadata.mtime(), metadata.mtime_nsec()),
            changed_ns: nanos(metadata.ctime(), metadata.ctime_nsec()),
        }
    }

    /// Without a ctime to rely on, no identity matches another: every load
    /// hashes again.
    #[cfg(not(unix))]
    pub fn of(metadata: &Metadata) -> Self {
        let _ = metadata;
        Self {
            device: 0,
            inode: 0,
            size: u64::MAX,
            modified_ns: i128::MIN,
            changed_ns: i128::from(rand::random::<i64>()),
        }
    }

    /// A stable file name for records about this file (not its version).
    pub fn file_key(&self) -> String {
        format!("{}-{}", self.device, self.inode)
    }
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as i128)
}

/// "The file with `identity` had content with this sha256", as seen at
/// `observed_ns` (taken before the identity and the content were read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedDigest {
    pub identity: FileIdentity,
    pub sha256: String,
    pub observed_ns: i128,
}

impl ObservedDigest {
    /// Whether this record speaks for a file whose identity is now
    /// `current`: the same version, observed after it had settled.
    pub fn vouches_for(&self, current: &FileIdentity) -> bool {
        self.identity == *current
            && self.identity.changed_ns + SETTLE_WINDOW.as_nanos() as i128 <= self.observed_ns
    }

    /// Whether writing this record down is worth it (a record that can
    /// never vouch only costs a write).
    pub fn is_settled(&self) -> bool {
        self.vouches_for(&self.identity)
    }

    /// Reads a record; a missing, unreadable or malformed one is none.
    pub fn read(path: &Path) -> Option<Self> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Writes the record atomically (a reader sees the old record, none, or
    /// the new one). Not synced: a record lost in a crash costs one hash.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        write_atomically(path, &serde_json::to_vec(self)?, false)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, syncing
/// the data first when `sync` is set.
pub fn write_atomically(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temporary = tempfile::NamedTempFile::new_in(dir)?;
    temporary.write_all(bytes)?;
    if sync {
        temporary.as_file().sync_all()?;
    }
    temporary.persist(path).map_err(|error| error.error)?;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::fs::File;

    fn identity(path: &Path) -> FileIdentity {
        FileIdentity::of(&std::fs::metadata(path).unwrap())
    }

    #[test]
    fn a_rewrite_with_the_same_size_and_mtime_changes_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.wasm");
        std::fs::write(&path, b"version one").unwrap();
        let old_mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old_mtime)
            .unwrap();
        let before = identity(&path);
        // Keep ctime's clock moving past a coarse tick before the rewrite.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"version two").unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old_mtime)
            .unwrap();
        let after = identity(&path);
        assert_eq!(
            (before.size, before.modified_ns),
            (after.size, after.modified_ns)
        );
        assert_ne!(before, after, "ctime moved although size and mtime did not");
    }

    #[test]
    fn a_record_vouches_only_for_a_settled_identical_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.wasm");
        std::fs::write(&path, b"bytes").unwrap();
        let current = identity(&path);
        let fresh = ObservedDigest {
            identity: current,
            sha256: "aa".into(),
            observed_ns: now_ns(),
        };
        assert!(
            !fresh.vouches_for(&current),
            "a file changed just now is hashed again"
        );
        let settled = ObservedDigest {
            observed_ns: current.changed_ns + SETTLE_WINDOW.as_nanos() as i128,
            ..fresh.clone()
        };
        assert!(settled.vouches_for(&current));
        let other_inode = FileIdentity {
            inode: current.inode + 1,
            ..current
        };
        assert!(!settled.vouches_for(&other_inode));

        let record = dir.path().join("record.json");
        settled.write(&record).unwrap();
        assert_eq!(ObservedDigest::read(&record), Some(settled));
        std::fs::write(&record, b"{ torn").unwrap();
        assert_eq!(ObservedDigest::read(&record), None, "a torn record is none");
    }
}
