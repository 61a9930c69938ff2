//! A file-backed Raft log and vote store.
//!
//! The log is one append-only file of framed records (`len | crc32 | postcard`): entries,
//! truncations and purges, replayed in order on open. Every append, truncation, purge and vote
//! is on stable storage (`fdatasync`, and for renamed files an `fsync` of the directory)
//! before the call returns or its flush callback fires, because Raft counts a vote or an
//! acknowledged entry as durable. A torn record at the end of the log (a crash mid-append, so
//! never acknowledged) is cut off on open; a corrupt record elsewhere fails the open rather
//! than silently dropping acknowledged entries behind it.
//!
//! File I/O is blocking and done under a mutex on the storage task: control-plane entries are
//! a few hundred bytes and rare (volume changes, detaches), so this never queues real work.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError, Vote,
};
use serde::{Deserialize, Serialize};

use super::{frame, unframe, NodeId, TypeConfig};

const LOG_FILE: &str = "raft-log";
const VOTE_FILE: &str = "raft-vote";
const COMMITTED_FILE: &str = "raft-committed";

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Entry(Entry<TypeConfig>),
    /// Entries at and after `since` were removed (a new leader overwrote them).
    Truncate {
        since: u64,
    },
    /// Entries up to and including `upto` were purged (covered by a snapshot).
    Purge {
        upto: LogId<NodeId>,
    },
}

struct Inner {
    dir: PathBuf,
    file: File,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

/// The log and vote store; clones share one state (the log reader is a clone).
#[derive(Clone)]
pub struct FileLogStore {
    inner: Arc<Mutex<Inner>>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn log_err(verb: ErrorVerb, e: io::Error) -> StorageError<NodeId> {
    StorageError::from_io_error(ErrorSubject::Logs, verb, e)
}

/// `fsync` of a directory, so a rename or a created file inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `dir/name` atomically and durably: temp file, fsync, rename, fsync dir.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Reads a file holding exactly one frame; `None` if it does not exist.
pub(crate) fn read_one_frame(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut buf)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match unframe(&buf).map_err(io_err)? {
        Some((payload, used)) if used == buf.len() => Ok(Some(payload.to_vec())),
        _ => Err(io_err(format!("{} is not one whole frame", path.display()))),
    }
}

impl FileLogStore {
    /// Opens (or creates) the store in `dir`, replaying the log.
    pub fn open(dir: &Path) -> io::Result<FileLogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let mut entries = BTreeMap::new();
        let mut last_purged = None;
        let mut at = 0usize;
        loop {
            match unframe(&buf[at..]) {
                Ok(Some((payload, used))) => {
                    let record: Record = postcard::from_bytes(payload).map_err(io_err)?;
                    apply_record(&mut entries, &mut last_purged, record);
                    at += used;
                }
                Ok(None) => break,
                // Only the last record can be torn by a crash; anything else is corruption.
                Err(e) if is_tail(&buf[at..]) => {
                    tracing::warn!(error = %e, offset = at, "cutting a torn record off the raft log");
                    break;
                }
                Err(e) => return Err(io_err(format!("raft log corrupt at offset {at}: {e}"))),
            }
        }
        if at < buf.len() {
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
        sync_dir(dir)?;
        let vote = match read_one_frame(&dir.join(VOTE_FILE))? {
            Some(bytes) => Some(postcard::from_bytes(&bytes).map_err(io_err)?),
            None => None,
        };
        let committed = match read_one_frame(&dir.join(COMMITTED_FILE))? {
            Some(bytes) => postcard::from_bytes(&bytes).map_err(io_err)?,
            None => None,
        };
        let inner = Inner {
            dir: dir.to_path_buf(),
            file,
            entries,
            last_purged,
            vote,
            committed,
        };
        Ok(FileLogStore {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the in-memory index possibly ahead of the
        // file; the process is going down anyway, and the file is the truth on restart.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a bad frame at the start of `rest` is the last thing in the file.
fn is_tail(rest: &[u8]) -> bool {
    let Some(header) = rest.get(..4) else {
        return true;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    rest.len() <= len.saturating_add(8)
}

fn apply_record(
    entries: &mut BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: &mut Option<LogId<NodeId>>,
    record: Record,
) {
    match record {
        Record::Entry(e) => {
            entries.insert(e.log_id.index, e);
        }
        Record::Truncate { since } => {
            entries.split_off(&since);
        }
        Record::Purge { upto } => {
            *entries = entries.split_off(&(upto.index + 1));
            if last_purged.is_none_or(|p| p < upto) {
                *last_purged = Some(upto);
            }
        }
    }
}

impl Inner {
    /// Appends records and makes them durable.
    fn write_records(&mut self, records: &[Record]) -> io::Result<()> {
        let mut buf = Vec::new();
        for r in records {
            buf.extend_from_slice(&frame(&postcard::to_stdvec(r).map_err(io_err)?)?);
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()
    }

    /// Rewrites the log with only live records, after a purge made most of it dead.
    fn compact(&mut self) -> io::Result<()> {
        let mut buf = Vec::new();
        if let Some(upto) = self.last_purged {
            buf.extend_from_slice(&frame(
                &postcard::to_stdvec(&Record::Purge { upto }).map_err(io_err)?,
            )?);
        }
        for e in self.entries.values() {
            let bytes = postcard::to_stdvec(&Record::Entry(e.clone())).map_err(io_err)?;
            buf.extend_from_slice(&frame(&bytes)?);
        }
        write_atomic(&self.dir, LOG_FILE, &buf)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_FILE))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for FileLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        Ok(self
            .lock()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for FileLogStore {
    type LogReader = FileLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.lock();
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        let bytes = postcard::to_stdvec(vote).map_err(io_err);
        let res = bytes.and_then(|b| write_atomic(&inner.dir, VOTE_FILE, &frame(&b)?));
        res.map_err(|e| StorageError::from_io_error(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Durable, so a restarted node re-applies its committed log to the map before it hears
        // from anyone (openraft re-applies up to `read_committed` at start).
        let mut inner = self.lock();
        let bytes = postcard::to_stdvec(&committed).map_err(io_err);
        let res = bytes.and_then(|b| write_atomic(&inner.dir, COMMITTED_FILE, &frame(&b)?));
        res.map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let records: Vec<Record> = entries.into_iter().map(Record::Entry).collect();
        let mut inner = self.lock();
        if let Err(e) = inner.write_records(&records) {
            let err = log_err(ErrorVerb::Write, io::Error::new(e.kind(), e.to_string()));
            callback.log_io_completed(Err(e));
            return Err(err);
        }
        for r in records {
            if let Record::Entry(e) = r {
                inner.entries.insert(e.log_id.index, e);
            }
        }
        drop(inner);
        // Durable: only now may Raft count these entries as stored here.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        let since = log_id.index;
        inner
            .write_records(&[Record::Truncate { since }])
            .map_err(|e| log_err(ErrorVerb::Delete, e))?;
        inner.entries.split_off(&since);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner
            .write_records(&[Record::Purge { upto: log_id }])
            .map_err(|e| log_err(ErrorVerb::Delete, e))?;
        apply_record(
            &mut inner.entries,
            &mut inner.last_purged,
            Record::Purge { upto: log_id },
        );
        inner.compact().map_err(|e| log_err(ErrorVerb::Write, e))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::map::{Command, Site};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::ForceSurvivor {
                survivor: Site::A,
                generation: index,
                carried: None,
            }),
        }
    }

    fn append(store: &FileLogStore, entries: Vec<Entry<TypeConfig>>) {
        let mut inner = store.lock();
        let records: Vec<Record> = entries.into_iter().map(Record::Entry).collect();
        inner.write_records(&records).expect("append");
        for r in records {
            if let Record::Entry(e) = r {
                inner.entries.insert(e.log_id.index, e);
            }
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    // Reference: DESIGN §6 — W stores its vote and the log; a restart finds both.
    #[test]
    fn log_vote_truncate_and_purge_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = FileLogStore::open(dir.path()).expect("open");
        append(&store, (1..=6).map(entry).collect());
        let vote = Vote::new_committed(3, 2);
        block_on(async {
            store.save_vote(&vote).await.expect("vote");
            store
                .truncate(LogId::new(CommittedLeaderId::new(1, 1), 5))
                .await
                .expect("truncate");
            store
                .purge(LogId::new(CommittedLeaderId::new(1, 1), 2))
                .await
                .expect("purge");
            store
                .save_committed(Some(LogId::new(CommittedLeaderId::new(1, 1), 4)))
                .await
                .expect("commit");
        });
        append(&store, vec![entry(5)]);
        drop(store);
        let mut again = FileLogStore::open(dir.path()).expect("reopen");
        block_on(async {
            assert_eq!(again.read_vote().await.expect("read vote"), Some(vote));
            let state = again.get_log_state().await.expect("state");
            assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(2));
            assert_eq!(state.last_log_id.map(|l| l.index), Some(5));
            let got = again.try_get_log_entries(0..100).await.expect("read");
            let idx: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
            assert_eq!(idx, vec![3, 4, 5]);
            assert_eq!(got[2], entry(5));
            let committed = again.read_committed().await.expect("committed");
            assert_eq!(committed.map(|l| l.index), Some(4));
        });
    }

    // A crash mid-append leaves a torn record, which was never acknowledged: it is cut off.
    // A corrupt record with valid data after it is not a torn tail: the open fails.
    #[test]
    fn torn_tail_is_cut_and_corruption_in_the_middle_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileLogStore::open(dir.path()).expect("open");
        append(&store, (1..=3).map(entry).collect());
        drop(store);
        let path = dir.path().join(LOG_FILE);
        let whole = std::fs::read(&path).expect("read log");
        std::fs::write(&path, &whole[..whole.len() - 3]).expect("tear");
        let mut store = FileLogStore::open(dir.path()).expect("open torn");
        let got = block_on(store.try_get_log_entries(0..100)).expect("read");
        assert_eq!(got.len(), 2);
        drop(store);
        let mut bad = std::fs::read(&path).expect("read log");
        bad[10] ^= 0xff;
        std::fs::write(&path, &bad).expect("corrupt");
        assert!(FileLogStore::open(dir.path()).is_err());
    }
}
