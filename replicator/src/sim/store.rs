//! [`MemStore`]: an in-memory [`BlockStore`] for the simulator. Every call is atomic and
//! durable (a simulated crash happens between steps and keeps the store), matching the
//! engine's crash-atomic data + stamp record.

use std::collections::{BTreeMap, BTreeSet};

use stretch_engine::{Stamp, BLOCK_SIZE};

use crate::core::{BlockStore, Content};

const BLOCK_BYTES: usize = BLOCK_SIZE as usize;

/// A block's content (`None`: zeroes, a TRIM/WRITE_ZEROES tombstone) and stamp.
type Block = (Option<Box<[u8]>>, Stamp);

/// One site's volume: sparse blocks (absent = zeroes, stamp ZERO), dirty map, HLC mark.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    blocks: u64,
    /// Written blocks; `None` data is a tombstone (TRIM/WRITE_ZEROES) that reads as zeroes.
    data: BTreeMap<u64, Block>,
    dirty: BTreeSet<u64>,
    hlc_high_water: u64,
    resync_reset_epoch: u32,
    /// Blocks written, for tests that count what resync touched.
    pub writes: u64,
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

    fn write(&mut self, lba: u64, content: Content<'_>, stamp: Stamp) {
        assert!(lba < self.blocks, "the core range-checks before writing");
        self.writes += 1;
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
