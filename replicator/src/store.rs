//! [`EngineStore`]: the core's [`BlockStore`] over an engine [`Volume`].
//!
//! # Why a synchronous store over an async engine is honest here
//! The core calls its store directly inside [`crate::core::Replica::step`], and the engine's
//! I/O methods are async. The store therefore waits for each engine call with
//! [`tokio::runtime::Handle::block_on`], and it may only be used on a dedicated OS thread (the
//! replica thread of [`crate::driver`]), never on a tokio worker: a worker blocked on disk
//! I/O would stall every other task. The engine's futures need no particular runtime (their
//! completions wake the task directly), so waiting for them from a plain thread is sound.
//!
//! # The apply rule stays atomic per block
//! The core compares a block's stamp and then calls [`BlockStore::write`]. That pair is one
//! atomic unit because the replica thread is the **only** mutator of the volume: the
//! [`crate::device::ReplicatedVolume`] sends every client mutation through the core and
//! touches the volume directly only to flush and to report allocation. Nothing can write a
//! block between the comparison and the write, which is what the engine's per-block lock
//! gives a concurrent caller of `write_stamped(.., ApplyMode::IfNewer)`. `write` here uses
//! `ApplyMode::Always` because the trait's `write` is unconditional (the loser's reset to
//! `Stamp::ZERO` must apply).
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
use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stretch_engine::{AlignedBuf, ApplyMode, BlockDevice, Stamp, Volume, BLOCK_SIZE};

use crate::core::{BlockStore, Content};
use crate::shadow::DirtyShadow;

const BLOCK_BYTES: u64 = BLOCK_SIZE as u64;

/// The side file beside the volume holding what the engine has no place for: the HLC
/// high-water mark and the epoch of the last loser reset. 32 bytes, checksummed.
const SIDE_MAGIC: [u8; 4] = *b"STRR";
const SIDE_VERSION: u32 = 1;
const SIDE_BYTES: usize = 32;

/// The replicator's persisted per-volume state (the side file's content).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SideState {
    hlc_high_water: u64,
    resync_reset_epoch: u32,
}

impl SideState {
    fn encode(self) -> [u8; SIDE_BYTES] {
        let mut b = [0u8; SIDE_BYTES];
        b[0..4].copy_from_slice(&SIDE_MAGIC);
        b[4..8].copy_from_slice(&SIDE_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.hlc_high_water.to_le_bytes());
        b[16..20].copy_from_slice(&self.resync_reset_epoch.to_le_bytes());
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
        Ok(SideState {
            hlc_high_water: u64::from_le_bytes(hlc),
            resync_reset_epoch: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
        })
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
    /// Regions with no dirty block left, still dirty in the engine.
    regions_to_clear: BTreeSet<u64>,
    side_path: PathBuf,
    side: SideState,
    wrote_since_sync: bool,
    /// Interior mutability because `stamp` and `read` take `&self`; the store is used by one
    /// thread only (it is `Send`, not `Sync`).
    failure: RefCell<Option<String>>,
    unreadable: RefCell<BTreeSet<u64>>,
    /// Consecutive block writes of one mutation, not yet submitted (see [`Run`]).
    run: RefCell<Option<Run>>,
    /// Blocks read ahead for the core's block-by-block reads (see [`ReadAhead`]).
    read_ahead: RefCell<Option<ReadAhead>>,
}

/// The core writes a mutation one block at a time, each after comparing that block's stamp.
/// Submitting each block as its own engine write would make a 1 MiB write 256 disk writes;
/// instead consecutive blocks with the same stamp and kind are gathered here and submitted as
/// one engine write when something else comes (a non-adjacent block, another stamp, a read of
/// a gathered block, the end of a batch). Until then `stamp` and `read` answer for gathered
/// blocks from here, so the core sees exactly what an immediate write would show.
struct Run {
    first_lba: u64,
    blocks: u64,
    stamp: Stamp,
    /// `None` for zeroes.
    data: Option<Vec<u8>>,
}

/// The core reads a range block by block; the store reads up to [`READ_AHEAD_BLOCKS`] at once
/// and answers the following blocks from memory. Any write drops it.
struct ReadAhead {
    first_lba: u64,
    data: AlignedBuf,
    stamps: Vec<Stamp>,
}

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
            Ok(bytes) => SideState::decode(&bytes)
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
            regions_to_clear: BTreeSet::new(),
            side_path,
            side,
            wrote_since_sync: false,
            failure: RefCell::new(None),
            unreadable: RefCell::new(BTreeSet::new()),
            run: RefCell::new(None),
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
        self.submit_run();
        std::mem::take(&mut *self.unreadable.borrow_mut())
    }

    /// Submits the gathered writes to the engine, so that everything the core has applied is
    /// visible to direct readers of the volume (block status). Called at the end of a batch.
    pub fn submit(&mut self) {
        self.submit_run();
        // Blocks read ahead serve the next blocks of one range within a batch; kept longer,
        // they would hide damage done to the disk since (a block that now fails its
        // checksum would look fine to read repair and `verify --repair`).
        *self.read_ahead.borrow_mut() = None;
    }

    /// Makes every write since the last flush durable (data and records).
    fn flush_volume(&mut self) {
        self.submit_run();
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

    /// Clears, in the engine, the regions no dirty block is left in. The engine's clear
    /// flushes the volume first, so a region is never clean on disk while a write in it could
    /// still be lost. Returns the number of regions cleared.
    pub fn clear_clean_regions(&mut self) -> usize {
        self.submit_run();
        if self.regions_to_clear.is_empty() || self.failed() {
            return 0;
        }
        let regions: Vec<u64> = std::mem::take(&mut self.regions_to_clear)
            .into_iter()
            .collect();
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

    /// Submits the gathered run, if any, as one engine write.
    fn submit_run(&self) {
        let Some(run) = self.run.borrow_mut().take() else {
            return;
        };
        // Blocks read ahead before this write may be among the run's: drop them.
        *self.read_ahead.borrow_mut() = None;
        if self.failed() {
            return;
        }
        let offset = run.first_lba * BLOCK_BYTES;
        let len = run.blocks * BLOCK_BYTES;
        let result = match run.data {
            Some(data) => self.handle.block_on(self.volume.write_stamped(
                offset,
                AlignedBuf::from_slice(&data),
                false,
                run.stamp,
                ApplyMode::Always,
            )),
            None => self.handle.block_on(self.volume.trim_stamped(
                offset,
                len,
                false,
                run.stamp,
                ApplyMode::Always,
            )),
        };
        if let Err(err) = result {
            self.fail(format!(
                "write blocks [{}, +{}): {err}",
                run.first_lba, run.blocks
            ));
        }
    }

    fn run_covers(&self, lba: u64) -> bool {
        self.run
            .borrow()
            .as_ref()
            .is_some_and(|r| (r.first_lba..r.first_lba + r.blocks).contains(&lba))
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

    fn write_side(&mut self, side: SideState) {
        let tmp = self.side_path.with_extension("repl.tmp");
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&side.encode())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.side_path)?;
            if let Some(dir) = self.side_path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
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
        if let Some(run) = self.run.borrow().as_ref() {
            if (run.first_lba..run.first_lba + run.blocks).contains(&lba) {
                return run.stamp;
            }
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
        if self.run_covers(lba) {
            self.submit_run();
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
        {
            let mut run = self.run.borrow_mut();
            if let Some(r) = run.as_mut() {
                let extends = r.stamp == stamp
                    && r.first_lba + r.blocks == lba
                    && r.blocks < RUN_BLOCKS_MAX
                    && matches!(
                        (&r.data, content),
                        (Some(_), Content::Data(_)) | (None, Content::Zero)
                    );
                if extends {
                    if let (Some(buf), Content::Data(d)) = (r.data.as_mut(), content) {
                        buf.extend_from_slice(d);
                    }
                    r.blocks += 1;
                    return;
                }
            }
        }
        self.submit_run();
        *self.run.borrow_mut() = Some(Run {
            first_lba: lba,
            blocks: 1,
            stamp,
            data: match content {
                Content::Data(d) => Some(d.to_vec()),
                Content::Zero => None,
            },
        });
    }

    fn flush(&mut self) {
        self.flush_volume();
    }

    fn mark_dirty(&mut self, lba: u64) {
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
            self.regions_to_clear.insert(region);
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
        self.submit_run();
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

    #[test]
    fn side_file_corruption_is_an_error_not_a_reset() {
        let state = SideState {
            hlc_high_water: 99,
            resync_reset_epoch: 3,
        };
        let mut bytes = state.encode();
        assert_eq!(SideState::decode(&bytes), Ok(state));
        bytes[9] ^= 1;
        assert!(SideState::decode(&bytes).is_err());
        assert!(SideState::decode(&bytes[..31]).is_err());
    }
}
