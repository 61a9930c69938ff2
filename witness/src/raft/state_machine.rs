//! The cluster map as openraft's state machine, with durable snapshots.
//!
//! The map itself lives in memory and is rebuilt on start from the last snapshot plus the log
//! after it (openraft replays from `applied_state`). A snapshot is written to disk (temp file,
//! fsync, rename, fsync dir) before it is reported built or installed, because openraft may
//! purge the log it covers right after.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::log_store::{read_one_frame, write_atomic};
use super::{frame, NodeId, TypeConfig};
use crate::map::{ApplyResult, ClusterMap};

const SNAPSHOT_FILE: &str = "map-snapshot";

/// Everything the state machine holds; also the snapshot's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub map: ClusterMap,
}

type Meta = SnapshotMeta<NodeId, BasicNode>;

struct Inner {
    dir: PathBuf,
    data: SmData,
    snapshot: Option<(Meta, Vec<u8>)>,
    snapshots_built: u64,
}

#[derive(Clone)]
pub struct MapStateMachine {
    inner: Arc<Mutex<Inner>>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn snap_err(verb: ErrorVerb, e: io::Error) -> StorageError<NodeId> {
    StorageError::from_io_error(ErrorSubject::Snapshot(None), verb, e)
}

impl MapStateMachine {
    /// Opens the state machine in `dir`, starting from the snapshot stored there, if any.
    pub fn open(dir: &Path) -> io::Result<MapStateMachine> {
        std::fs::create_dir_all(dir)?;
        let (data, snapshot) = match read_one_frame(&dir.join(SNAPSHOT_FILE))? {
            Some(bytes) => {
                let (meta, body): (Meta, Vec<u8>) = postcard::from_bytes(&bytes).map_err(io_err)?;
                let data: SmData = postcard::from_bytes(&body).map_err(io_err)?;
                (data, Some((meta, body)))
            }
            None => (SmData::default(), None),
        };
        let inner = Inner {
            dir: dir.to_path_buf(),
            data,
            snapshot,
            snapshots_built: 0,
        };
        Ok(MapStateMachine {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The map as applied so far on this node (not a linearizable read: use
    /// `Raft::ensure_linearizable` first for that).
    pub fn map(&self) -> ClusterMap {
        self.lock().data.map.clone()
    }

    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.lock().data.last_applied
    }

    /// The log index of the last applied entry (0 before anything was applied): a cheap test
    /// of whether the map may have changed.
    pub fn applied_index(&self) -> u64 {
        self.lock().data.last_applied.map(|l| l.index).unwrap_or(0)
    }

    /// The applied map with the log index it reflects (0 before anything was applied), read
    /// under one lock so the two agree.
    pub fn indexed_map(&self) -> (u64, ClusterMap) {
        let inner = self.lock();
        let index = inner.data.last_applied.map(|l| l.index).unwrap_or(0);
        (index, inner.data.map.clone())
    }
}

impl Inner {
    fn persist_snapshot(&mut self, meta: Meta, body: Vec<u8>) -> io::Result<()> {
        let bytes = postcard::to_stdvec(&(&meta, &body)).map_err(io_err)?;
        write_atomic(&self.dir, SNAPSHOT_FILE, &frame(&bytes)?)?;
        self.snapshot = Some((meta, body));
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MapStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut inner = self.lock();
        let body =
            postcard::to_stdvec(&inner.data).map_err(|e| snap_err(ErrorVerb::Write, io_err(e)))?;
        inner.snapshots_built += 1;
        let index = inner.data.last_applied.map_or(0, |l| l.index);
        let meta = SnapshotMeta {
            last_log_id: inner.data.last_applied,
            last_membership: inner.data.membership.clone(),
            snapshot_id: format!("{index}-{}", inner.snapshots_built),
        };
        inner
            .persist_snapshot(meta.clone(), body.clone())
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(body)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for MapStateMachine {
    type SnapshotBuilder = MapStateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let inner = self.lock();
        Ok((inner.data.last_applied, inner.data.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let mut results = Vec::new();
        for entry in entries {
            inner.data.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => ApplyResult::Internal,
                EntryPayload::Normal(cmd) => inner.data.map.apply(&cmd),
                EntryPayload::Membership(m) => {
                    inner.data.membership = StoredMembership::new(Some(entry.log_id), m);
                    ApplyResult::Internal
                }
            };
            results.push(result);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let body = snapshot.into_inner();
        // Decoded before anything changes: a bad snapshot from the network leaves the map as is.
        let data: SmData =
            postcard::from_bytes(&body).map_err(|e| snap_err(ErrorVerb::Read, io_err(e)))?;
        let mut inner = self.lock();
        inner
            .persist_snapshot(meta.clone(), body)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        inner.data = data;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.lock();
        Ok(inner.snapshot.as_ref().map(|(meta, body)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(body.clone())),
        }))
    }
}
