//! [`EngineStore`]: the core's [`BlockStore`] over an engine [`Volume`].
//!
//! # Why a synchronous store over an async engine is honest here
//! The core calls its store directly inside [`crate::core::Replica::step`], and the engine's
//! I/O methods are async. The store therefore waits for engine calls with
//! [`tokio::runtime::Handle::block_on`], and it may only be used on a dedicated OS thread (the
//! replica thread of [`crate::driver`]), never on a tokio worker: a worker blocked on disk
//! I/O would stall every other task. The engine's futures need no particular runtime (their
//! completions wake the task directly), so waiting for them from a plain thread is sound.
//!
//! # Staged writes: many engine writes in flight, one wait per batch
//! Waiting for each engine write in turn made the replica thread's throughput one engine
//! write latency per mutation (about 6,000 writes/s on the reference VM, whatever the queue
//! depth). Instead [`BlockStore::write`] only *stages* a block: consecutive blocks with the
//! same stamp and kind are gathered into one [`Run`], and a batch's runs wait in [`Staged`]
//! until [`EngineStore::submit`], which submits them all at once and waits for all of them
//! together (one engine latency per batch, not per write). The driver calls `submit` at the
//! end of every batch, before any action of the batch leaves the thread: a client ack, a
//! WriteAck ("applied here"), a DurableAck, a read's data. So "applied" in DESIGN.md §4 —
//! visible to every later read at this site — holds for everything an action reports.
//!
//! While a block is staged the store answers for it from memory: `stamp` returns the staged
//! stamp; `read` of a staged block first submits everything staged (rare: the core reads a
//! block it has just written only for resync and divergent saves). A second write of a staged
//! block submits everything staged first, so there are never two writes of one block in
//! flight and the engine applies them in the core's order (`ApplyMode::Always` needs that).
//! Staging is bounded by [`STAGED_RUNS_MAX`] runs and [`STAGED_BYTES_MAX`] bytes; beyond,
//! the staged writes are submitted early.
//!
//! # The apply rule stays atomic per block
//! The core compares a block's stamp and then calls [`BlockStore::write`]. That pair is one
//! atomic unit because the replica thread is the **only** mutator of the volume: the
//! [`crate::device::ReplicatedVolume`] sends every client mutation through the core and
//! touches the volume directly only to read clean ranges, to flush and to report allocation.
//! Nothing can write a block between the comparison and the write, which is what the
//! engine's per-block lock gives a concurrent caller of `write_stamped(.., ApplyMode::IfNewer)`.
//! Staging keeps this: the comparison reads the *staged* stamp when there is one, so it sees
//! exactly what an immediate write would have left, and the staged writes are submitted by
//! the same thread, in the core's order, before it handles another batch. The writes of one
//! submit run concurrently in the engine, but they touch disjoint blocks (see above), so
//! their order among themselves does not matter. `write` uses `ApplyMode::Always` because
//! the trait's `write` is unconditional (the loser's reset to `Stamp::ZERO` must apply).
//!
//! # Dirty blocks over dirty regions
//! The core tracks dirty *blocks*; the engine persists dirty *regions* (1 MiB by default). The
//! store keeps the block set in memory and keeps the engine's region map a superset of it: a
//! block is marked in its region durably before the core mutates it (the engine also marks
//! the region itself inside every mutation). A region is cleared in the engine only once no
//! block of it is dirty, lazily and in batches ([`EngineStore::clear_clean_regions`]),
//! because the engine's clear flushes the whole volume. At start every block of a dirty region
//! counts as dirty: more than necessary after a crash, never less, and pushing a block the
//! peer already has is harmless under the apply rule.
//!
//! # Durability
//! Engine writes are durable only after a flush, and that is what [`BlockStore`] promises
//! too: the core calls [`BlockStore::flush`] where it needs durability (a client FLUSH, the
//! peer's FlushMarker, FUA, a survivor's writes, the loser's reset), and settles the blocks
//! a crash may have lost from the peer (see `core::replica`). The engine's own region map is
//! the activity log that tells a restarted site which blocks those are: the engine marks a
//! region durably before any write into it and clears it only after a flush.
//!
//! # Engine errors
//! [`BlockStore`] methods cannot fail. An engine error is recorded ([`EngineStore::failure`])
//! and the driver stops the replica (fail-stop, like a crash; a restart recovers through
//! `Replica::start`). A block whose read fails its checksum is recorded separately: the core
//! learns it through `read_checked` and repairs it from the in-sync peer or fails the read
//! (`core::repair`); as a second line, the driver fails any client read of a block still
//! recorded unreadable ([`EngineStore::take_unreadable`]) and never sends its copy. A write of
//! the block (a repair) removes it from the record.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use stretch_engine::{
    AlignedBuf, ApplyMode, ApplyOutcome, BlockDevice, BlockError, Stamp, Volume, BLOCK_SIZE,
};

use crate::core::{BlockStore, Content};
use crate::shadow::DirtyShadow;

const BLOCK_BYTES: u64 = BLOCK_SIZE as u64;

/// The side file beside the volume holding what the engine has no place for: the HLC
/// high-water mark and the epoch of the last loser reset. Two checksummed 32-byte slots,
/// written in place alternately, each with a sequence number; the valid slot with the
/// larger one is current. A write torn by a crash fails its checksum and the other slot
/// (the value before) is used, which is safe because nothing depends on a value before its
/// write returned. In place, not by rename: a rename frees the old file's blocks, and on a
/// file system mounted with `discard` that is a synchronous discard on the replica thread
/// (95-128 ms per write in `perf sched`, once a second: the whole replicated write tail).
/// A file of one slot (an older build's) reads as slot 0 with sequence 0.
const SIDE_MAGIC: [u8; 4] = *b"STRR";
const SIDE_VERSION: u32 = 1;
const SIDE_BYTES: usize = 32;
const SIDE_SLOTS: usize = 2;

/// The replicator's persisted per-volume state (the side file's content).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SideState {
    hlc_high_water: u64,
    resync_reset_epoch: u32,
    /// Which write this is; the slot written is `seq % SIDE_SLOTS`.
    seq: u64,
}

impl SideState {
    fn encode(self) -> [u8; SIDE_BYTES] {
        let mut b = [0u8; SIDE_BYTES];
        b[0..4].copy_from_slice(&SIDE_MAGIC);
        b[4..8].copy_from_slice(&SIDE_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.hlc_high_water.to_le_bytes());
        b[16..20].copy_from_slice(&self.resync_reset_epoch.to_le_bytes());
        b[20..28].copy_from_slice(&self.seq.to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<SideState, String> {
        let b: &[u8; SIDE_BYTES] = b
            .try_into()
            .map_err(|_| format!("side file is {} bytes, expected {SIDE_BYTES}", b.len()))?;
        let crc = u32::from_le_bytes([b[28], b[29], b[30], b[31]]);
        if crc32fast::hash(&b[..28]) != crc {
            return Err("side file checksum mismatch".into());
        }
        if b[0..4] != SIDE_MAGIC {
            return Err("side file has a bad magic".into());
        }
        let version = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        if version != SIDE_VERSION {
            return Err(format!("side file version {version} is not supported"));
        }
        let mut hlc = [0u8; 8];
        hlc.copy_from_slice(&b[8..16]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[20..28]);
        Ok(SideState {
            hlc_high_water: u64::from_le_bytes(hlc),
            resync_reset_epoch: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            seq: u64::from_le_bytes(seq),
        })
    }

    /// The current state of a side file's bytes: the valid slot with the larger sequence
    /// number. An error only if no slot is valid.
    fn decode_file(bytes: &[u8]) -> Result<SideState, String> {
        if bytes.len() != SIDE_BYTES && bytes.len() != SIDE_BYTES * SIDE_SLOTS {
            return Err(format!(
                "side file is {} bytes, expected {SIDE_BYTES} or {}",
                bytes.len(),
                SIDE_BYTES * SIDE_SLOTS
            ));
        }
        let mut best: Option<SideState> = None;
        let mut first_err = None;
        for slot in bytes.chunks_exact(SIDE_BYTES) {
            match SideState::decode(slot) {
                Ok(st) if best.is_none_or(|b| st.seq > b.seq) => best = Some(st),
                Ok(_) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        best.ok_or_else(|| first_err.unwrap_or_else(|| "side file has no valid slot".into()))
    }
}

/// The side file path for a volume's data file: `NAME.img` -> `NAME.repl`.
pub fn side_file_path(data_path: &Path) -> PathBuf {
    data_path.with_extension("repl")
}

/// One site's volume as the replication core sees it. Use only on a thread outside the tokio
/// runtime (see the module documentation).
pub struct EngineStore {
    volume: Arc<Volume>,
    handle: tokio::runtime::Handle,
    blocks: u64,
    region_blocks: u64,
    dirty: BTreeSet<u64>,
    /// The dirty set, mirrored for the device's read fast path (see [`DirtyShadow`]).
    shadow: Arc<DirtyShadow>,
    /// Regions with no dirty block left, still dirty in the engine, with the clear pass
    /// during which each last turned clean (see [`EngineStore::clear_clean_regions`]).
    regions_to_clear: HashMap<u64, u64>,
    /// Calls of [`EngineStore::clear_clean_regions`] so far.
    clear_pass: u64,
    /// A block was marked dirty since the last call of `clear_clean_regions`.
    marked_since_pass: bool,
    side_path: PathBuf,
    side: SideState,
    wrote_since_sync: bool,
    /// Interior mutability because `stamp` and `read` take `&self`; the store is used by one
    /// thread only (it is `Send`, not `Sync`).
    failure: RefCell<Option<String>>,
    unreadable: RefCell<BTreeSet<u64>>,
    /// Block writes not yet submitted to the engine (see [`Staged`]).
    staged: RefCell<Staged>,
    /// Blocks read ahead for the core's block-by-block reads (see [`ReadAhead`]).
    read_ahead: RefCell<Option<ReadAhead>>,
}

/// The core writes a mutation one block at a time, each after comparing that block's stamp.
/// Submitting each block as its own engine write would make a 1 MiB write 256 disk writes;
/// instead consecutive blocks with the same stamp and kind are gathered into one run, and a
/// batch's runs are submitted together (module documentation, "Staged writes").
struct Run {
    first_lba: u64,
    blocks: u64,
    stamp: Stamp,
    /// `None` for zeroes.
    data: Option<Vec<u8>>,
}

/// The staged runs of the current batch. Each block is in at most one run.
#[derive(Default)]
struct Staged {
    runs: Vec<Run>,
    /// Block -> index in `runs` of the run holding it.
    blocks: HashMap<u64, usize>,
    bytes: usize,
}

impl Staged {
    fn stamp(&self, lba: u64) -> Option<Stamp> {
        let &i = self.blocks.get(&lba)?;
        self.runs.get(i).map(|r| r.stamp)
    }

    /// Adds `lba` to the last run if it extends it; false if it does not.
    fn extend_last(&mut self, lba: u64, content: Content<'_>, stamp: Stamp) -> bool {
        let i = self.runs.len().wrapping_sub(1);
        let Some(r) = self.runs.get_mut(i) else {
            return false;
        };
        let extends = r.stamp == stamp
            && r.first_lba + r.blocks == lba
            && r.blocks < RUN_BLOCKS_MAX
            && matches!(
                (&r.data, content),
                (Some(_), Content::Data(_)) | (None, Content::Zero)
            );
        if !extends {
            return false;
        }
        if let (Some(buf), Content::Data(d)) = (r.data.as_mut(), content) {
            buf.extend_from_slice(d);
            self.bytes += d.len();
        }
        r.blocks += 1;
        self.blocks.insert(lba, i);
        true
    }

    fn push(&mut self, lba: u64, content: Content<'_>, stamp: Stamp) {
        let data = match content {
            Content::Data(d) => {
                self.bytes += d.len();
                Some(d.to_vec())
            }
            Content::Zero => None,
        };
        self.blocks.insert(lba, self.runs.len());
        self.runs.push(Run {
            first_lba: lba,
            blocks: 1,
            stamp,
            data,
        });
    }
}

/// Runs staged at most before they are submitted early (each becomes one engine request in
/// flight; the engine's own I/O depth limit queues the rest).
const STAGED_RUNS_MAX: usize = 256;
/// Data bytes staged at most before they are submitted early.
const STAGED_BYTES_MAX: usize = 64 * 1024 * 1024;

type EngineWrite<'a> = Pin<Box<dyn Future<Output = Result<ApplyOutcome, BlockError>> + 'a>>;

/// Polls every future together on the calling task and returns their outputs in order: the
/// engine overlaps their I/O, so the wait is about the slowest one, not the sum.
async fn join_all<T>(mut futures: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    let mut outputs: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// The core reads a range block by block; the store reads up to [`READ_AHEAD_BLOCKS`] at once
/// and answers the following blocks from memory. Any write drops it.
struct ReadAhead {
    first_lba: u64,
    data: AlignedBuf,
    stamps: Vec<Stamp>,
}

/// Calls of [`EngineStore::clear_clean_regions`] a clean region waits while the volume is
/// busy (20 x the driver's 0.5 s = 10 s).
const REGION_IDLE_PASSES: u64 = 20;

/// Blocks read at once for the core's sequential block reads (256 KiB).
const READ_AHEAD_BLOCKS: u64 = 64;
/// The largest gathered write: the engine's request limit.
const RUN_BLOCKS_MAX: u64 = stretch_engine::REQUEST_BYTES_MAX as u64 / BLOCK_BYTES;

impl EngineStore {
    /// Opens the store over `volume`: reads the side file (absent on a fresh volume) and
    /// expands the engine's dirty regions into dirty blocks.
    pub fn open(
        volume: Arc<Volume>,
        handle: tokio::runtime::Handle,
    ) -> Result<EngineStore, String> {
        let info = volume.info();
        let side_path = side_file_path(&info.data_path);
        let side = match std::fs::read(&side_path) {
            Ok(bytes) => SideState::decode_file(&bytes)
                .map_err(|e| format!("read {}: {e}", side_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SideState::default(),
            Err(e) => return Err(format!("read {}: {e}", side_path.display())),
        };
        let blocks = volume.size_bytes() / BLOCK_BYTES;
        let region_blocks = (volume.dirty_region_bytes() / BLOCK_BYTES).max(1);
        let mut dirty = BTreeSet::new();
        let region_count = volume.dirty_region_count();
        let mut next_region = 0;
        // Bounded: each round advances past at least one region, and there are region_count.
        while next_region < region_count {
            let regions = volume.dirty_regions(next_region, 1024);
            let Some(&last) = regions.last() else {
                break;
            };
            for region in regions {
                let first = region * region_blocks;
                let end = (first + region_blocks).min(blocks);
                dirty.extend(first..end);
            }
            next_region = last + 1;
        }
        Ok(EngineStore {
            volume,
            handle,
            blocks,
            region_blocks,
            shadow: {
                let shadow = DirtyShadow::new(blocks, region_blocks);
                for &lba in &dirty {
                    shadow.marked(lba);
                }
                Arc::new(shadow)
            },
            dirty,
            regions_to_clear: HashMap::new(),
            clear_pass: 0,
            marked_since_pass: false,
            side_path,
            side,
            wrote_since_sync: false,
            failure: RefCell::new(None),
            unreadable: RefCell::new(BTreeSet::new()),
            staged: RefCell::new(Staged::default()),
            read_ahead: RefCell::new(None),
        })
    }

    /// The first engine error since the store opened; the replica must stop.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    fn failed(&self) -> bool {
        self.failure.borrow().is_some()
    }

    /// Blocks that may differ from the peer.
    /// The lock-free mirror of the dirty set, for reads that bypass the replica thread.
    pub fn shadow(&self) -> Arc<DirtyShadow> {
        self.shadow.clone()
    }

    pub fn dirty_count(&self) -> u64 {
        self.dirty.len() as u64
    }

    /// Blocks whose reads failed since the last call (checksum or I/O errors).
    pub fn take_unreadable(&mut self) -> BTreeSet<u64> {
        self.submit_staged();
        std::mem::take(&mut *self.unreadable.borrow_mut())
    }

    /// Submits the staged writes to the engine and waits for them, so that everything the
    /// core has applied is in the engine, visible to every reader of the volume. Called at
    /// the end of a batch, before any of its actions leaves (module documentation).
    pub fn submit(&mut self) {
        self.submit_staged();
        // Blocks read ahead serve the next blocks of one range within a batch; kept longer,
        // they would hide damage done to the disk since (a block that now fails its
        // checksum would look fine to read repair and `verify --repair`).
        *self.read_ahead.borrow_mut() = None;
    }

    /// Makes every write since the last flush durable (data and records).
    fn flush_volume(&mut self) {
        self.submit_staged();
        if !self.wrote_since_sync || self.failed() {
            return;
        }
        let volume = self.volume.clone();
        if let Err(err) = self.handle.block_on(volume.flush()) {
            self.fail(format!("flush the volume: {err}"));
            return;
        }
        self.wrote_since_sync = false;
    }

    /// Clears, in the engine, regions that no dirty block is left in, that no block was
    /// marked in since the previous call, and either the whole volume saw no mark since the
    /// previous call or the region has been clean for [`REGION_IDLE_PASSES`] calls. An
    /// activity log keeps its hot regions while writes flow: marking a region again costs a
    /// write and an fdatasync on the replica thread before the next write into it, at both
    /// sites. Clearing every clean region at each call made a QD1 random-write benchmark pay
    /// that on most writes at long RTTs (few writes per region per second), and made the
    /// peer, which applies and cleans every write at once, re-mark up to ~250 regions a
    /// second under QD32. A quiet volume still has its regions cleared within two calls.
    /// The engine's clear flushes the volume first, so a region is never clean on disk while
    /// a write in it could still be lost. Returns the number of regions cleared.
    pub fn clear_clean_regions(&mut self) -> usize {
        self.submit_staged();
        let pass = self.clear_pass;
        self.clear_pass += 1;
        let volume_idle = !std::mem::take(&mut self.marked_since_pass);
        if self.failed() {
            return 0;
        }
        let mut regions: Vec<u64> = self
            .regions_to_clear
            .iter()
            .filter(|&(_, &clean_since)| {
                clean_since < pass && (volume_idle || clean_since + REGION_IDLE_PASSES <= pass)
            })
            .map(|(&region, _)| region)
            .collect();
        if regions.is_empty() {
            return 0;
        }
        regions.sort_unstable();
        for region in &regions {
            self.regions_to_clear.remove(region);
        }
        let volume = self.volume.clone();
        match self.handle.block_on(volume.clear_dirty(&regions)) {
            Ok(()) => regions.len(),
            Err(err) => {
                self.fail(format!("clear dirty regions: {err}"));
                0
            }
        }
    }

    fn fail(&self, what: String) {
        let mut failure = self.failure.borrow_mut();
        if failure.is_none() {
            tracing::error!("replicated volume failed: {what}");
            *failure = Some(what);
        }
    }

    fn region(&self, lba: u64) -> u64 {
        lba / self.region_blocks
    }

    /// Submits every staged run and waits for all of them together.
    fn submit_staged(&self) {
        let staged = std::mem::take(&mut *self.staged.borrow_mut());
        if staged.runs.is_empty() {
            return;
        }
        // Blocks read ahead before these writes may be among them: drop them.
        *self.read_ahead.borrow_mut() = None;
        if self.failed() {
            return;
        }
        let volume = &self.volume;
        let writes: Vec<EngineWrite<'_>> = staged
            .runs
            .iter()
            .map(|run| -> EngineWrite<'_> {
                let offset = run.first_lba * BLOCK_BYTES;
                match &run.data {
                    Some(data) => Box::pin(volume.write_stamped(
                        offset,
                        AlignedBuf::from_slice(data),
                        false,
                        run.stamp,
                        ApplyMode::Always,
                    )),
                    None => Box::pin(volume.trim_stamped(
                        offset,
                        run.blocks * BLOCK_BYTES,
                        false,
                        run.stamp,
                        ApplyMode::Always,
                    )),
                }
            })
            .collect();
        let results = self.handle.block_on(join_all(writes));
        for (run, result) in staged.runs.iter().zip(results) {
            if let Err(err) = result {
                self.fail(format!(
                    "write blocks [{}, +{}): {err}",
                    run.first_lba, run.blocks
                ));
            }
        }
    }

    fn read_ahead_block(&self, lba: u64, out: &mut [u8]) -> Option<Stamp> {
        let ra = self.read_ahead.borrow();
        let ra = ra.as_ref()?;
        let i = lba.checked_sub(ra.first_lba)?;
        let stamp = *ra.stamps.get(usize::try_from(i).ok()?)?;
        let at = (i * BLOCK_BYTES) as usize;
        out.copy_from_slice(ra.data.get(at..at + BLOCK_BYTES as usize)?);
        Some(stamp)
    }

    /// Persists `side` in the slot after the current one, in place (see [`SIDE_MAGIC`]).
    fn write_side(&mut self, side: SideState) {
        let side = SideState {
            seq: self.side.seq.wrapping_add(1),
            ..side
        };
        let offset = (side.seq % SIDE_SLOTS as u64) * SIDE_BYTES as u64;
        let result = (|| -> std::io::Result<()> {
            let created = !self.side_path.exists();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.side_path)?;
            f.write_all_at(&side.encode(), offset)?;
            if created {
                // The new name must survive a crash too: once per volume.
                f.sync_all()?;
                if let Some(dir) = self.side_path.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
            } else {
                f.sync_data()?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => self.side = side,
            Err(err) => self.fail(format!("write {}: {err}", self.side_path.display())),
        }
    }
}

impl BlockStore for EngineStore {
    fn blocks(&self) -> u64 {
        self.blocks
    }

    fn stamp(&self, lba: u64) -> Stamp {
        if let Some(stamp) = self.staged.borrow().stamp(lba) {
            return stamp;
        }
        // Out of range cannot happen (the core checks ranges). An error stops the replica
        // before any action of this step leaves the thread, so the ZERO returned is never
        // acted on.
        match self.handle.block_on(self.volume.block_stamp(lba)) {
            Ok(stamp) => stamp,
            Err(err) => {
                self.fail(format!("read the stamp of block {lba}: {err}"));
                Stamp::ZERO
            }
        }
    }

    fn read(&self, lba: u64, out: &mut [u8]) -> Stamp {
        debug_assert_eq!(out.len() as u64, BLOCK_BYTES);
        if self.staged.borrow().blocks.contains_key(&lba) {
            self.submit_staged();
        }
        if let Some(stamp) = self.read_ahead_block(lba, out) {
            return stamp;
        }
        // Read ahead from here; a failure anywhere in the range (a checksum) falls back to
        // this one block, so one bad block never makes its neighbours unreadable.
        let ahead = READ_AHEAD_BLOCKS
            .min(self.blocks.saturating_sub(lba))
            .max(1);
        let len = (ahead * BLOCK_BYTES) as u32;
        if let Ok((data, stamps)) = self
            .handle
            .block_on(self.volume.read_with_stamps(lba * BLOCK_BYTES, len))
        {
            if stamps.len() as u64 == ahead && data.len() as u64 == ahead * BLOCK_BYTES {
                *self.read_ahead.borrow_mut() = Some(ReadAhead {
                    first_lba: lba,
                    data,
                    stamps,
                });
                if let Some(stamp) = self.read_ahead_block(lba, out) {
                    return stamp;
                }
            }
        }
        match self
            .handle
            .block_on(self.volume.read_with_stamps(lba * BLOCK_BYTES, BLOCK_SIZE))
        {
            Ok((data, stamps)) if data.len() == out.len() && stamps.len() == 1 => {
                out.copy_from_slice(&data);
                stamps[0]
            }
            other => {
                let why = match other {
                    Err(err) => err.to_string(),
                    Ok(_) => "short read".into(),
                };
                tracing::warn!(lba, "block unreadable: {why}");
                out.fill(0);
                // `read` takes &self, hence the RefCell: the store lives on one thread.
                self.unreadable.borrow_mut().insert(lba);
                Stamp::ZERO
            }
        }
    }

    fn read_checked(&self, lba: u64, out: &mut [u8]) -> Option<Stamp> {
        let stamp = self.read(lba, out);
        (!self.unreadable.borrow().contains(&lba)).then_some(stamp)
    }

    fn write(&mut self, lba: u64, content: Content<'_>, stamp: Stamp) {
        if self.failed() {
            return;
        }
        // The whole block and its checksum are replaced (a repair): later reads of it are
        // good. The core read the damaged content only through `read_checked` and answered
        // nothing with it, so the driver's second line may stop refusing the block.
        self.unreadable.borrow_mut().remove(&lba);
        self.wrote_since_sync = true;
        *self.read_ahead.borrow_mut() = None;
        let full = {
            let staged = self.staged.borrow();
            staged.blocks.contains_key(&lba)
                || staged.runs.len() >= STAGED_RUNS_MAX
                || staged.bytes >= STAGED_BYTES_MAX
        };
        if full {
            // A second write of a staged block waits for the first (one write of a block in
            // flight at a time), and staging stays bounded.
            self.submit_staged();
        }
        let mut staged = self.staged.borrow_mut();
        if !staged.extend_last(lba, content, stamp) {
            staged.push(lba, content, stamp);
        }
    }

    fn flush(&mut self) {
        self.flush_volume();
    }

    fn mark_dirty(&mut self, lba: u64) {
        self.marked_since_pass = true;
        // Before the block's new data is applied: a fast-path read racing it must see this.
        if self.dirty.insert(lba) {
            self.shadow.marked(lba);
        }
        let region = self.region(lba);
        self.regions_to_clear.remove(&region);
        if !self.volume.is_region_dirty(region) {
            let volume = self.volume.clone();
            if let Err(err) = self
                .handle
                .block_on(volume.mark_dirty(lba * BLOCK_BYTES, BLOCK_BYTES))
            {
                self.fail(format!("mark block {lba} dirty: {err}"));
            }
        }
    }

    fn clear_dirty(&mut self, lba: u64) {
        if !self.dirty.remove(&lba) {
            return;
        }
        self.shadow.cleared(lba);
        let region = self.region(lba);
        let first = region * self.region_blocks;
        if self
            .dirty
            .range(first..first + self.region_blocks)
            .next()
            .is_none()
        {
            self.regions_to_clear.insert(region, self.clear_pass);
        }
    }

    fn is_dirty(&self, lba: u64) -> bool {
        self.dirty.contains(&lba)
    }

    fn dirty_blocks(&self) -> Vec<u64> {
        self.dirty.iter().copied().collect()
    }

    fn hlc_high_water(&self) -> u64 {
        self.side.hlc_high_water
    }

    fn persist_hlc_high_water(&mut self, value: u64) {
        let side = SideState {
            hlc_high_water: value,
            ..self.side
        };
        self.write_side(side);
    }

    fn max_stamp(&self) -> Stamp {
        self.submit_staged();
        self.volume.max_stamp()
    }

    fn resync_reset_epoch(&self) -> u32 {
        self.side.resync_reset_epoch
    }

    fn persist_resync_reset_epoch(&mut self, epoch: u32) {
        let side = SideState {
            resync_reset_epoch: epoch,
            ..self.side
        };
        self.write_side(side);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stretch_engine::VolumeConfig;

    fn stamp(n: u8) -> Stamp {
        let mut s = [0u8; 16];
        s[0] = 1;
        s[15] = n;
        Stamp(s)
    }

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BLOCK_BYTES as usize]
    }

    /// A runtime for the engine and a store used from this (non-runtime) thread, as the
    /// replica thread uses it.
    fn store(dir: &Path) -> (tokio::runtime::Runtime, Arc<Volume>, EngineStore) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let cfg = VolumeConfig {
            direct_io: false,
            ..VolumeConfig::default()
        };
        let volume = Arc::new(Volume::create(dir, "v", 4 << 20, &cfg).unwrap());
        let store = EngineStore::open(volume.clone(), rt.handle().clone()).unwrap();
        (rt, volume, store)
    }

    // The gathered run must be invisible to the core: stamp and read see each block's
    // newest write at once, and a read-ahead taken before a write never serves stale data.
    #[test]
    fn gathered_writes_read_back_like_immediate_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, volume, mut s) = store(dir.path());
        let mut out = block(0);
        // Fill a read-ahead window over blocks 10.. first.
        assert_eq!(s.read(10, &mut out), Stamp::ZERO);
        for lba in 10..14 {
            s.write(lba, Content::Data(&block(lba as u8)), stamp(1));
            assert_eq!(s.stamp(lba), stamp(1));
        }
        // Block 12 is in the run and in the stale read-ahead: the new data must win.
        assert_eq!(s.read(12, &mut out), stamp(1));
        assert_eq!(out, block(12));
        // A different stamp starts a new run; zeroes are a run of their own.
        s.write(14, Content::Data(&block(0xee)), stamp(2));
        s.write(15, Content::Zero, stamp(3));
        assert_eq!(s.stamp(15), stamp(3));
        s.flush();
        assert!(s.failure().is_none());
        let (data, stamps) = _rt
            .block_on(volume.read_with_stamps(10 * BLOCK_BYTES, 6 * BLOCK_SIZE))
            .unwrap();
        assert_eq!(
            stamps,
            vec![stamp(1), stamp(1), stamp(1), stamp(1), stamp(2), stamp(3)]
        );
        for (i, chunk) in data.chunks(BLOCK_BYTES as usize).enumerate() {
            let want = match i {
                4 => block(0xee),
                5 => block(0),
                _ => block(10 + i as u8),
            };
            assert!(chunk == &want[..], "block {} holds the wrong data", 10 + i);
        }
    }

    // A batch's writes are staged and submitted together: scattered blocks, a block written
    // twice in one batch (the second write must win, in the engine too), and zeroes, each
    // visible to stamp/read before the submit exactly as an immediate write would be.
    #[test]
    fn staged_batch_applies_in_core_order() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, volume, mut s) = store(dir.path());
        let scattered = [40u64, 7, 300, 8, 512, 41];
        for (i, &lba) in scattered.iter().enumerate() {
            s.write(lba, Content::Data(&block(lba as u8)), stamp(i as u8 + 1));
        }
        assert!(
            s.staged.borrow().runs.len() >= 4,
            "scattered blocks are separate runs"
        );
        // Rewrite block 300 in the same batch: a newer stamp and other data.
        s.write(300, Content::Data(&block(0xaa)), stamp(20));
        s.write(7, Content::Zero, stamp(21));
        assert_eq!(s.stamp(300), stamp(20));
        assert_eq!(s.stamp(7), stamp(21));
        assert_eq!(s.stamp(40), stamp(1));
        let mut out = block(0);
        assert_eq!(s.read(300, &mut out), stamp(20));
        assert_eq!(out, block(0xaa));
        s.submit();
        assert!(s.failure().is_none());
        assert!(s.staged.borrow().runs.is_empty());
        let want = [
            (40u64, stamp(1), block(40)),
            (7, stamp(21), block(0)),
            (300, stamp(20), block(0xaa)),
            (8, stamp(4), block(8)),
            (512, stamp(5), block(512u64 as u8)),
            (41, stamp(6), block(41)),
        ];
        for (lba, st, data) in want {
            let (got, stamps) = rt
                .block_on(volume.read_with_stamps(lba * BLOCK_BYTES, BLOCK_SIZE))
                .unwrap();
            assert_eq!(stamps, vec![st], "stamp of block {lba}");
            assert!(got[..] == data[..], "data of block {lba}");
        }
    }

    // Dirty blocks live in memory over the engine's dirty regions: a restart (reopen) finds
    // every block of a region that was dirty, and a region whose blocks were all cleaned is
    // cleared in the engine.
    #[test]
    fn dirty_blocks_survive_reopen_and_clean_regions_clear() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, volume, mut s) = store(dir.path());
        let region_blocks = volume.dirty_region_bytes() / BLOCK_BYTES;
        s.mark_dirty(3);
        s.write(3, Content::Data(&block(3)), stamp(1));
        s.mark_dirty(region_blocks + 1);
        s.write(region_blocks + 1, Content::Data(&block(4)), stamp(2));
        s.flush();
        assert_eq!(s.dirty_blocks(), vec![3, region_blocks + 1]);
        s.clear_dirty(region_blocks + 1);
        // Region 1 turned clean during this pass: it stays dirty until it has been idle for
        // a whole pass, and region 0 still holds a dirty block.
        assert_eq!(s.clear_clean_regions(), 0);
        assert!(volume.is_region_dirty(1));
        assert_eq!(s.clear_clean_regions(), 1);
        assert!(volume.is_region_dirty(0));
        assert!(!volume.is_region_dirty(1));
        s.persist_hlc_high_water(12345);
        s.persist_resync_reset_epoch(7);
        drop(s);
        let region_bytes = volume.dirty_region_bytes();
        drop(volume);
        let cfg = VolumeConfig {
            direct_io: false,
            ..VolumeConfig::default()
        };
        let volume = Arc::new(Volume::open(dir.path(), "v", &cfg).unwrap());
        assert_eq!(volume.dirty_region_bytes(), region_bytes);
        let s = EngineStore::open(volume.clone(), rt.handle().clone()).unwrap();
        let dirty = s.dirty_blocks();
        assert_eq!(
            dirty.len() as u64,
            region_blocks,
            "all of region 0, nothing else"
        );
        assert!(dirty.contains(&3) && !dirty.contains(&(region_blocks + 1)));
        assert_eq!(s.hlc_high_water(), 12345);
        assert_eq!(s.resync_reset_epoch(), 7);
        assert_eq!(s.max_stamp(), stamp(2));
    }

    // While writes flow elsewhere, a clean region stays marked for REGION_IDLE_PASSES
    // calls (re-marking costs an fdatasync before the next write into it); once the volume
    // is quiet it is cleared at the next call.
    #[test]
    fn busy_volume_keeps_clean_regions_marked() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, volume, mut s) = store(dir.path());
        let region_blocks = volume.dirty_region_bytes() / BLOCK_BYTES;
        s.mark_dirty(1);
        s.write(1, Content::Data(&block(1)), stamp(1));
        s.clear_dirty(1);
        for pass in 0..REGION_IDLE_PASSES {
            // A write in another region between every two calls: the volume is busy.
            let lba = region_blocks + pass;
            s.mark_dirty(lba);
            s.write(lba, Content::Data(&block(2)), stamp(2));
            assert_eq!(s.clear_clean_regions(), 0, "pass {pass}");
            assert!(volume.is_region_dirty(0));
        }
        s.mark_dirty(2 * region_blocks);
        assert_eq!(s.clear_clean_regions(), 1, "region 0 waited long enough");
        assert!(!volume.is_region_dirty(0));
        // Region 1 is clean now too; nothing marked since the last call: cleared at once.
        for pass in 0..REGION_IDLE_PASSES {
            s.clear_dirty(region_blocks + pass);
        }
        s.clear_dirty(2 * region_blocks);
        assert_eq!(s.clear_clean_regions(), 0, "turned clean during this pass");
        assert_eq!(
            s.clear_clean_regions(),
            2,
            "quiet volume: regions 1 and 2 cleared"
        );
        assert!(s.failure().is_none());
    }

    #[test]
    fn side_file_corruption_is_an_error_not_a_reset() {
        let state = SideState {
            hlc_high_water: 99,
            resync_reset_epoch: 3,
            seq: 5,
        };
        let mut bytes = state.encode();
        assert_eq!(SideState::decode(&bytes), Ok(state));
        bytes[9] ^= 1;
        assert!(SideState::decode(&bytes).is_err());
        assert!(SideState::decode(&bytes[..31]).is_err());
    }

    // A torn write of one slot falls back to the other: the value before that write.
    #[test]
    fn side_file_takes_the_newest_valid_slot() {
        let old = SideState {
            hlc_high_water: 10,
            resync_reset_epoch: 2,
            seq: 7,
        };
        let new = SideState {
            hlc_high_water: 20,
            resync_reset_epoch: 3,
            seq: 8,
        };
        let mut file = [old.encode(), new.encode()].concat();
        assert_eq!(SideState::decode_file(&file), Ok(new));
        file.swap_with_slice(&mut [new.encode(), old.encode()].concat());
        assert_eq!(SideState::decode_file(&file), Ok(new));
        file[SIDE_BYTES - 1] ^= 1; // the newer slot, now first, is torn
        assert_eq!(SideState::decode_file(&file), Ok(old));
        // An older build's single-slot file.
        let v1 = SideState { seq: 0, ..old };
        assert_eq!(SideState::decode_file(&v1.encode()), Ok(v1));
        file[SIDE_BYTES * 2 - 1] ^= 1;
        assert!(SideState::decode_file(&file).is_err());
        assert!(SideState::decode_file(&file[..40]).is_err());
    }
}
