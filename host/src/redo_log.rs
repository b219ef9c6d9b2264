//! A redo log in front of a redb file: what makes a batch of writes
//! durable between redb's own durable commits. The ledger keeps one
//! (`ledger.wal`, of operation batches) and so does the state store
//! (`state.wal`, of record, event and key-value writes).
//!
//! A durable redb commit rewrites the copy-on-write path of every table a
//! write touches (about 23 scattered pages for a ledger hold or settle) and
//! syncs them. Instead, the writer appends the batch's inputs to this log,
//! syncs that one small write (`fdatasync` of a region already written, so
//! no file metadata changes), and commits the batch to redb without
//! durability. Every so often (when the log is full, when a write needs a
//! durable redb commit anyway, and on close) redb commits durably and the
//! log starts again from its beginning. Opening the database replays, in
//! one durable commit, every logged batch newer than the last one redb
//! holds durably: what is logged is everything a batch's writes depend on
//! besides the database itself, so the replay rebuilds exactly the state
//! the callers were told about.
//!
//! Layout: a 4 KiB header (magic, version, the id of the database it
//! belongs to), then records, each
//! `magic u32 | payload length u32 | lsn u64 | epoch u64 | crc32 u32 | payload`,
//! little endian, the crc over the lsn, the epoch and the payload. The
//! epoch is random for each opening of the log: a record a crashed run left
//! past the replayed ones (an unsynced write the disk kept while losing the
//! one before it) never continues a later run's chain, even when its lsn
//! happens to follow. Each batch has the next log
//! sequence number (lsn); redb keeps the lsn of the newest batch it holds
//! in the same commit as the batch.
//!
//! Why the beginning of the file is enough to read: records after a
//! rewind are always written from the first record's place on, and a rewind
//! happens only after a durable redb commit. So on open, either the first
//! record is newer than redb (lsn = redb's + 1) and the new records follow
//! it with consecutive lsns, or it is older (already in redb) and nothing
//! is to be replayed. A torn last record fails its crc: it was never
//! acknowledged. The file is filled with zeros when created, so a write
//! later never grows it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const HEADER_LEN: u64 = 4096;
const HEADER_MAGIC: &[u8; 16] = b"sandboxer-redo-1";
const HEADER_VERSION: u32 = 1;
const RECORD_MAGIC: u32 = 0x4c42_5853; // "SXBL"
const RECORD_HEADER_LEN: usize = 4 + 4 + 8 + 8 + 4;
/// The log's size: records from the header to here, then a durable redb
/// commit and a rewind. 2 MiB holds thousands of single writes and dozens
/// of full 64-caller batches.
pub(crate) const CAPACITY: u64 = 2 << 20;

/// A redo log file, open for appending records.
pub(crate) struct RedoLog {
    file: File,
    path: PathBuf,
    /// Where the next record goes.
    offset: u64,
    /// This opening's epoch, in every record it writes.
    epoch: u64,
}

/// A logged batch, read back to be replayed.
pub(crate) struct LoggedRecord {
    pub lsn: u64,
    epoch: u64,
    pub payload: Vec<u8>,
}

/// Where the redo log of the redb file `database` is kept.
pub(crate) fn path_for(database: &Path) -> PathBuf {
    database.with_extension("wal")
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {why}", path.display()),
    )
}

fn header(owner_id: &str) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(HEADER_MAGIC);
    header.extend_from_slice(&HEADER_VERSION.to_le_bytes());
    header.extend_from_slice(&(owner_id.len() as u32).to_le_bytes());
    header.extend_from_slice(owner_id.as_bytes());
    header.resize(HEADER_LEN as usize, 0);
    header
}

/// The database id a header names, if it is a redo log's header at all.
fn header_owner_id(bytes: &[u8]) -> Option<String> {
    if bytes.len() < 24 || &bytes[..16] != HEADER_MAGIC {
        return None;
    }
    let version = u32::from_le_bytes(bytes[16..20].try_into().ok()?);
    let length = u32::from_le_bytes(bytes[20..24].try_into().ok()?) as usize;
    if version != HEADER_VERSION || 24 + length > bytes.len() {
        return None;
    }
    String::from_utf8(bytes[24..24 + length].to_vec()).ok()
}

fn checksum(lsn: u64, epoch: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    hasher.update(&epoch.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Reads the records to replay from an existing log: those after
/// `applied` (the newest lsn redb holds durably), oldest first. No file:
/// nothing to replay. `owner_id` is the database's own id (the ledger's
/// id, the host id).
///
/// A log of another database is refused while it may hold batches this
/// one lacks; it is removed when the database's id is being made now
/// (`fresh`: its old file was deleted), before that id is committed, so
/// that a later open does not find it.
pub(crate) fn read_pending(
    path: &Path,
    owner_id: &str,
    applied: u64,
    fresh: bool,
) -> std::io::Result<Vec<LoggedRecord>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    // The header and the first record's head tell whether anything is to
    // be replayed; only then is the whole log read.
    let mut bytes = Vec::new();
    (&mut file)
        .take(HEADER_LEN + RECORD_HEADER_LEN as u64)
        .read_to_end(&mut bytes)?;
    let first_lsn = bytes
        .get(HEADER_LEN as usize..)
        .filter(|head| head.len() == RECORD_HEADER_LEN)
        .map(|head| u64::from_le_bytes(head[8..16].try_into().expect("8 bytes")));
    if fresh && header_owner_id(&bytes).as_deref() != Some(owner_id) {
        drop(file);
        tracing::warn!(
            "removing {}: the database it belonged to is gone",
            path.display()
        );
        std::fs::remove_file(path)?;
        return Ok(Vec::new());
    }
    if first_lsn.is_none_or(|lsn| lsn <= applied)
        && header_owner_id(&bytes).as_deref() == Some(owner_id)
    {
        // Either no record, or the first is already in redb.
        return Ok(Vec::new());
    }
    file.read_to_end(&mut bytes)?;
    match header_owner_id(&bytes) {
        Some(id) if id == owner_id => {}
        Some(id) => {
            return Err(invalid(
                path,
                format!(
                    "this redo log belongs to {id}, not to {owner_id} (the database beside \
                     it); move it away if {id} is gone"
                ),
            ));
        }
        None => return Err(invalid(path, "not a sandboxer redo log")),
    }
    let mut records = Vec::new();
    let mut offset = HEADER_LEN as usize;
    let mut expected = applied + 1;
    while let Some(record) = record_at(&bytes, offset) {
        if record.lsn <= applied && records.is_empty() && offset == HEADER_LEN as usize {
            // The first record is already in redb: the log was rewound after
            // it and nothing newer was written.
            break;
        }
        if record.lsn != expected
            || records
                .first()
                .is_some_and(|first: &LoggedRecord| first.epoch != record.epoch)
        {
            if records.is_empty() {
                return Err(invalid(
                    path,
                    format!(
                        "the log starts at batch {} but the database holds batches up to {applied}: \
                         batches in between are missing",
                        record.lsn
                    ),
                ));
            }
            // Older records the new ones did not overwrite (an older
            // lsn, or a record of an earlier opening).
            break;
        }
        offset += RECORD_HEADER_LEN + record.payload.len();
        expected += 1;
        records.push(record);
    }
    Ok(records)
}

/// The record at `offset`, when a whole valid one is there.
fn record_at(bytes: &[u8], offset: usize) -> Option<LoggedRecord> {
    let head = bytes.get(offset..offset + RECORD_HEADER_LEN)?;
    let magic = u32::from_le_bytes(head[0..4].try_into().ok()?);
    let length = u32::from_le_bytes(head[4..8].try_into().ok()?) as usize;
    let lsn = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let epoch = u64::from_le_bytes(head[16..24].try_into().ok()?);
    let crc = u32::from_le_bytes(head[24..28].try_into().ok()?);
    if magic != RECORD_MAGIC {
        return None;
    }
    let start = offset + RECORD_HEADER_LEN;
    let payload = bytes.get(start..start.checked_add(length)?)?;
    (checksum(lsn, epoch, payload) == crc).then(|| LoggedRecord {
        lsn,
        epoch,
        payload: payload.to_vec(),
    })
}

impl RedoLog {
    /// Opens the log for writing from its first record's place, creating
    /// it (filled with zeros, synced, then renamed into place) when it is
    /// missing, of another database, or not the expected size. Call only once
    /// nothing in it remains to be replayed.
    pub fn open(path: &Path, owner_id: &str) -> std::io::Result<Self> {
        let reusable = (|| -> std::io::Result<Option<File>> {
            let file = match OpenOptions::new().read(true).write(true).open(path) {
                Ok(file) => file,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(error) => return Err(error),
            };
            if file.metadata()?.len() != CAPACITY {
                return Ok(None);
            }
            let mut head = vec![0; HEADER_LEN as usize];
            file.read_exact_at(&mut head, 0)?;
            Ok((header_owner_id(&head).as_deref() == Some(owner_id)).then_some(file))
        })()?;
        let file = match reusable {
            Some(file) => file,
            None => Self::create(path, owner_id)?,
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            offset: HEADER_LEN,
            epoch: rand::random(),
        })
    }

    fn create(path: &Path, owner_id: &str) -> std::io::Result<File> {
        let temporary = path.with_extension("wal.new");
        {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temporary)?;
            file.write_all(&header(owner_id))?;
            let zeros = vec![0u8; 64 << 10];
            let mut written = HEADER_LEN;
            while written < CAPACITY {
                let chunk = zeros.len().min((CAPACITY - written) as usize);
                file.write_all(&zeros[..chunk])?;
                written += chunk as u64;
            }
            file.sync_all()?;
        }
        std::fs::rename(&temporary, path)?;
        if let Some(directory) = path.parent() {
            let directory = if directory.as_os_str().is_empty() {
                Path::new(".")
            } else {
                directory
            };
            File::open(directory)?.sync_all()?;
        }
        OpenOptions::new().read(true).write(true).open(path)
    }

    /// Whether a record of `payload_len` bytes fits before the end.
    pub fn fits(&self, payload_len: usize) -> bool {
        self.offset + (RECORD_HEADER_LEN + payload_len) as u64 <= CAPACITY
    }

    /// Appends one record, and syncs it when `sync`: then, when this
    /// returns, the batch (and every record before it) is durable. An
    /// unsynced record becomes durable with the next synced one. Call only
    /// when [`RedoLog::fits`].
    pub fn append(&mut self, lsn: u64, payload: &[u8], sync: bool) -> std::io::Result<()> {
        let length = u32::try_from(payload.len())
            .map_err(|_| invalid(&self.path, "a batch too large to log"))?;
        let mut record = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
        record.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        record.extend_from_slice(&length.to_le_bytes());
        record.extend_from_slice(&lsn.to_le_bytes());
        record.extend_from_slice(&self.epoch.to_le_bytes());
        record.extend_from_slice(&checksum(lsn, self.epoch, payload).to_le_bytes());
        record.extend_from_slice(payload);
        self.file.write_all_at(&record, self.offset)?;
        if sync {
            self.file.sync_data()?;
        }
        self.offset += record.len() as u64;
        Ok(())
    }

    /// Starts again from the first record's place: call after a durable
    /// redb commit holding every logged batch.
    pub fn rewind(&mut self) {
        self.offset = HEADER_LEN;
    }
}

/// What became of a record handed to [`WriterLog::append`].
pub(crate) enum Appended {
    /// In the log (synced if asked).
    Logged,
    /// Not written: the log is full, or cannot be created here. The batch
    /// must go to redb some other way.
    NotLogged,
}

/// A writer's redo log: opened on the first write (so that reading a
/// database creates no file), and given up with a warning when it cannot
/// be created (then every batch goes to redb durably: slower, as safe).
pub(crate) struct WriterLog {
    path: PathBuf,
    owner_id: String,
    /// The database's name in messages ("the ledger", "the state store").
    what: &'static str,
    log: Option<RedoLog>,
    unavailable: bool,
}

impl WriterLog {
    pub fn new(path: PathBuf, owner_id: String, what: &'static str) -> Self {
        Self {
            path,
            owner_id,
            what,
            log: None,
            unavailable: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the log could not be created here.
    pub fn unavailable(&self) -> bool {
        self.unavailable
    }

    /// Appends `payload()` as the record of `lsn` when there is a log and
    /// room in it; the payload is made only then.
    pub fn append(
        &mut self,
        lsn: u64,
        payload: impl FnOnce() -> std::io::Result<Vec<u8>>,
        sync: bool,
    ) -> std::io::Result<Appended> {
        if self.unavailable {
            return Ok(Appended::NotLogged);
        }
        if self.log.is_none() {
            match RedoLog::open(&self.path, &self.owner_id) {
                Ok(log) => self.log = Some(log),
                Err(error) => {
                    tracing::warn!(
                        "{}'s redo log {} cannot be created ({error}); every durable write \
                         commits to redb durably",
                        self.what,
                        self.path.display()
                    );
                    self.unavailable = true;
                    return Ok(Appended::NotLogged);
                }
            }
        }
        let payload = payload()?;
        match self.log.as_mut().filter(|log| log.fits(payload.len())) {
            Some(log) => {
                log.append(lsn, &payload, sync)?;
                Ok(Appended::Logged)
            }
            None => Ok(Appended::NotLogged),
        }
    }

    /// After a durable redb commit holding every logged batch.
    pub fn rewind(&mut self) {
        if let Some(log) = &mut self.log {
            log.rewind();
        }
    }
}

/// The closing commit of a writer with batches redb holds only in memory:
/// one durable commit holds them all, so the next open has nothing to
/// replay. A failure is only warned of: the log is replayed instead.
pub(crate) fn closing_commit(database: &redb::Database, what: &str) {
    let result = database
        .begin_write()
        .map_err(|error| error.to_string())
        .and_then(|write| write.commit().map_err(|error| error.to_string()));
    if let Err(error) = result {
        tracing::warn!(
            "{what}'s closing commit failed ({error}); its redo log is replayed on the next open"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_after_the_applied_lsn_are_read_back_and_a_torn_one_ends_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.wal");
        let mut log = RedoLog::open(&path, "abc").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
        for lsn in 1..=5u64 {
            log.append(lsn, format!("batch {lsn}").as_bytes(), true)
                .unwrap();
        }
        // redb holds none of them durably.
        let pending = read_pending(&path, "abc", 0, false).unwrap();
        let lsns: Vec<u64> = pending.iter().map(|record| record.lsn).collect();
        assert_eq!(lsns, [1, 2, 3, 4, 5]);
        assert_eq!(pending[2].payload, b"batch 3");
        // It holds them all (a durable commit after them): nothing to do.
        assert!(read_pending(&path, "abc", 5, false).unwrap().is_empty());

        // Rewound after a durable commit of 1..=5: two new batches overwrite
        // the start, and the older records after them are not replayed.
        log.rewind();
        log.append(6, b"six", true).unwrap();
        log.append(7, b"seven", true).unwrap();
        let lsns: Vec<u64> = read_pending(&path, "abc", 5, false)
            .unwrap()
            .iter()
            .map(|record| record.lsn)
            .collect();
        assert_eq!(lsns, [6, 7]);

        // A torn write of batch 7: only 6 is replayed.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let seven_at = HEADER_LEN + (RECORD_HEADER_LEN + 3) as u64;
        file.write_all_at(b"XX", seven_at + RECORD_HEADER_LEN as u64 + 1)
            .unwrap();
        let pending = read_pending(&path, "abc", 5, false).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].payload, b"six");
    }

    #[test]
    fn a_record_left_by_an_earlier_opening_never_continues_a_later_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.wal");
        // A crashed run appended 21, 22 and 23 unsynced; the disk kept 21
        // and 23 but not 22.
        let mut crashed = RedoLog::open(&path, "abc").unwrap();
        crashed.append(21, b"twenty-one", false).unwrap();
        let twenty_two_at = crashed.offset;
        crashed.append(22, b"twenty-two", false).unwrap();
        let twenty_three_at = crashed.offset;
        crashed.append(23, b"twenty-three", true).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0; 8], twenty_two_at).unwrap();
        let replayed = read_pending(&path, "abc", 20, false).unwrap();
        assert_eq!(replayed.len(), 1, "only 21 before the hole");

        // The next run (21 applied) writes its 22 so that it ends exactly
        // where the old 23 starts: the old 23 is not taken as its successor.
        let mut next = RedoLog::open(&path, "abc").unwrap();
        let filler = twenty_three_at - HEADER_LEN - RECORD_HEADER_LEN as u64;
        next.append(22, &vec![b'x'; filler as usize], true).unwrap();
        assert_eq!(next.offset, twenty_three_at);
        let lsns: Vec<u64> = read_pending(&path, "abc", 21, false)
            .unwrap()
            .iter()
            .map(|record| record.lsn)
            .collect();
        assert_eq!(lsns, [22]);
    }

    #[test]
    fn a_gap_and_another_databases_log_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.wal");
        let mut log = RedoLog::open(&path, "abc").unwrap();
        log.append(9, b"nine", true).unwrap();
        let gap = read_pending(&path, "abc", 3, false).err().unwrap();
        assert!(
            gap.to_string().contains("batches in between are missing"),
            "{gap}"
        );
        let other = read_pending(&path, "xyz", 0, false).err().unwrap();
        assert!(
            other.to_string().contains("belongs to abc, not to xyz"),
            "{other}"
        );
        // A database made just now removes a log left by a deleted one,
        // before its own id is committed: no later open finds it.
        assert!(read_pending(&path, "xyz", 0, true).unwrap().is_empty());
        assert!(!path.exists());
        // Opening it for writing replaces it with this ledger's.
        RedoLog::open(&path, "xyz").unwrap();
        assert!(read_pending(&path, "xyz", 0, false).unwrap().is_empty());
    }
}
