//! [`MemStore`]: an in-memory [`BlockStore`] for the simulator, durable the way the engine
//! is: a write is visible at once but survives a crash only after a flush. A crash (between
//! steps) may therefore lose any block written since the last flush, each independently —
//! it comes back with its content and stamp as of that flush — and clears of dirty bits
//! since the last flush are undone, as with the engine's region map (cleared only after a
//! flush). Marks are durable at once. The HLC high-water mark and the loser-reset epoch live
//! in a side file written with fsync, so they are durable at once too.
//!
//! The engine can also leave a block torn or damaged at rest (its data no longer matches its
//! checksum). [`MemStore::rot`] models the damage at rest: the block's bytes are garbage, its
//! stamp is kept, `read_checked` refuses it and `read` returns the garbage (which a core that
//! served it would hand a client: the checker catches that). A write replaces the block and
//! its checksum. Torn writes after a crash are not modelled separately: every block a crash
//! touches is untrusted and settled from the peer anyway.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::SmallRng;
use rand::Rng;
use stretch_engine::{Stamp, BLOCK_SIZE};

use crate::core::{BlockStore, Content};

const BLOCK_BYTES: usize = BLOCK_SIZE as usize;

/// What a crash takes away of the writes since the last flush.
pub enum Loss<'a> {
    /// Nothing: the crash happened to keep everything.
    Nothing,
    /// Each block independently, by the rng.
    Random(&'a mut SmallRng),
    /// Every block (a power loss right after the last flush).
    All,
}

/// A block's content (`None`: zeroes, a TRIM/WRITE_ZEROES tombstone) and stamp.
type Block = (Option<Box<[u8]>>, Stamp);

/// One site's volume: sparse blocks (absent = zeroes, stamp ZERO), dirty map, HLC mark.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    blocks: u64,
    /// Written blocks as reads see them; `None` data is a tombstone (TRIM/WRITE_ZEROES) that
    /// reads as zeroes.
    data: BTreeMap<u64, Block>,
    /// `data` as of the last flush: what a crash falls back to.
    durable: BTreeMap<u64, Block>,
    dirty: BTreeSet<u64>,
    /// The dirty map on disk: marks at once, clears at the next flush.
    durable_dirty: BTreeSet<u64>,
    hlc_high_water: u64,
    resync_reset_epoch: u32,
    /// Blocks whose bytes fail their checksum (see the module documentation).
    rotten: BTreeSet<u64>,
    /// `rotten` as of the last flush: a crash that loses a write brings the damage back.
    durable_rotten: BTreeSet<u64>,
    /// Blocks written, for tests that count what resync touched.
    pub writes: u64,
    pub flushes: u64,
    /// Blocks a crash took back to their flushed version.
    pub blocks_lost: u64,
}

impl MemStore {
    pub fn new(blocks: u64) -> MemStore {
        MemStore {
            blocks,
            ..MemStore::default()
        }
    }

    /// The block's content as stored (`None` = zeroes) and its stamp.
    pub fn block(&self, lba: u64) -> (Option<&[u8]>, Stamp) {
        match self.data.get(&lba) {
            Some((data, stamp)) => (data.as_deref(), *stamp),
            None => (None, Stamp::ZERO),
        }
    }

    /// A crash of the site: blocks written since the last flush fall back to their flushed
    /// version as `loss` says. Either way dirty-bit clears since the last flush are undone.
    pub fn crash(&mut self, mut loss: Loss<'_>) {
        if !matches!(loss, Loss::Nothing) {
            let changed: BTreeSet<u64> = self
                .data
                .keys()
                .chain(self.durable.keys())
                .copied()
                .filter(|lba| self.data.get(lba) != self.durable.get(lba))
                .collect();
            for lba in changed {
                debug_assert!(
                    self.durable_dirty.contains(&lba),
                    "block {lba} changed since the last flush but is not in the activity log"
                );
                let lost = match &mut loss {
                    Loss::Random(rng) => rng.random_bool(0.5),
                    _ => true,
                };
                if lost {
                    self.blocks_lost += 1;
                    match self.durable.get(&lba) {
                        Some(block) => self.data.insert(lba, block.clone()),
                        None => self.data.remove(&lba),
                    };
                    if self.durable_rotten.contains(&lba) {
                        self.rotten.insert(lba);
                    } else {
                        self.rotten.remove(&lba);
                    }
                }
            }
        }
        // Whatever survived is on disk now.
        self.durable = self.data.clone();
        self.durable_rotten = self.rotten.clone();
        self.dirty = self.durable_dirty.clone();
    }

    /// Damages a flushed block at rest: its bytes become garbage that fails its checksum; its
    /// stamp stays. False (nothing done) if the block was written since the last flush.
    pub fn rot(&mut self, lba: u64) -> bool {
        if lba >= self.blocks || self.is_unflushed(lba) {
            return false;
        }
        let stamp = self.stamp_of(lba);
        let garbage: Block = (Some(vec![0xEE; BLOCK_BYTES].into_boxed_slice()), stamp);
        self.data.insert(lba, garbage.clone());
        self.durable.insert(lba, garbage);
        self.rotten.insert(lba);
        self.durable_rotten.insert(lba);
        true
    }

    /// Whether a block fails its checksum.
    pub fn is_rotten(&self, lba: u64) -> bool {
        self.rotten.contains(&lba)
    }

    /// Every block that fails its checksum, in ascending order.
    pub fn rotten_blocks(&self) -> Vec<u64> {
        self.rotten.iter().copied().collect()
    }

    fn stamp_of(&self, lba: u64) -> Stamp {
        self.data.get(&lba).map_or(Stamp::ZERO, |(_, s)| *s)
    }

    /// Whether a block was written since the last flush (a crash could lose it).
    pub fn is_unflushed(&self, lba: u64) -> bool {
        self.data.get(&lba) != self.durable.get(&lba)
    }

    /// The first dirty block, if any.
    pub fn dirty_blocks_first(&self) -> Option<u64> {
        self.dirty.first().copied()
    }

    /// Whether two stores hold the same data and stamp in every block.
    pub fn same_blocks_as(&self, other: &MemStore) -> Option<u64> {
        (0..self.blocks).find(|&lba| {
            let (a, sa) = self.block(lba);
            let (b, sb) = other.block(lba);
            let zero_a = a.is_none_or(|d| d.iter().all(|&x| x == 0));
            let zero_b = b.is_none_or(|d| d.iter().all(|&x| x == 0));
            sa != sb || !(a == b || (zero_a && zero_b))
        })
    }
}

impl BlockStore for MemStore {
    fn blocks(&self) -> u64 {
        self.blocks
    }

    fn stamp(&self, lba: u64) -> Stamp {
        self.data.get(&lba).map_or(Stamp::ZERO, |(_, s)| *s)
    }

    fn read(&self, lba: u64, out: &mut [u8]) -> Stamp {
        match self.data.get(&lba) {
            Some((Some(data), stamp)) => {
                out.copy_from_slice(data);
                *stamp
            }
            Some((None, stamp)) => {
                out.fill(0);
                *stamp
            }
            None => {
                out.fill(0);
                Stamp::ZERO
            }
        }
    }

    fn read_checked(&self, lba: u64, out: &mut [u8]) -> Option<Stamp> {
        let stamp = self.read(lba, out);
        (!self.rotten.contains(&lba)).then_some(stamp)
    }

    fn write(&mut self, lba: u64, content: Content<'_>, stamp: Stamp) {
        assert!(lba < self.blocks, "the core range-checks before writing");
        self.writes += 1;
        self.rotten.remove(&lba);
        let data = match content {
            Content::Data(d) => {
                assert_eq!(d.len(), BLOCK_BYTES);
                Some(d.to_vec().into_boxed_slice())
            }
            Content::Zero => None,
        };
        self.data.insert(lba, (data, stamp));
    }

    fn mark_dirty(&mut self, lba: u64) {
        self.dirty.insert(lba);
        self.durable_dirty.insert(lba);
    }

    fn flush(&mut self) {
        self.flushes += 1;
        self.durable = self.data.clone();
        self.durable_dirty = self.dirty.clone();
        self.durable_rotten = self.rotten.clone();
    }

    fn clear_dirty(&mut self, lba: u64) {
        self.dirty.remove(&lba);
    }

    fn is_dirty(&self, lba: u64) -> bool {
        self.dirty.contains(&lba)
    }

    fn dirty_blocks(&self) -> Vec<u64> {
        self.dirty.iter().copied().collect()
    }

    fn hlc_high_water(&self) -> u64 {
        self.hlc_high_water
    }

    fn persist_hlc_high_water(&mut self, value: u64) {
        self.hlc_high_water = self.hlc_high_water.max(value);
    }

    fn max_stamp(&self) -> Stamp {
        self.data
            .values()
            .map(|(_, s)| *s)
            .max()
            .unwrap_or(Stamp::ZERO)
    }

    fn resync_reset_epoch(&self) -> u32 {
        self.resync_reset_epoch
    }

    fn persist_resync_reset_epoch(&mut self, epoch: u32) {
        self.resync_reset_epoch = epoch;
    }
}
