//! [`DirtyShadow`]: a lock-free copy of "is any block of this range dirty?" for the read fast
//! path of [`crate::ReplicatedVolume`].
//!
//! Reads stepped through the replica thread are serialised on one OS thread and read block by
//! block; a read-heavy guest then gets a fraction of the engine's throughput. Most reads touch
//! blocks with no write in flight, and for those the core's answer is always "serve it
//! locally" (DESIGN.md §4 "Reads"). So the store mirrors its dirty set here as a count per
//! region plus a generation bumped on every block that turns dirty, and the device reads a
//! clean range straight from the engine, concurrently:
//!
//! 1. read the generation `g1`; 2. check every region of the range has no dirty block;
//! 3. read from the engine; 4. accept the data only if the generation is still `g1`.
//!
//! A local write marks its blocks dirty (bumping the generation) *before* it is applied, so a
//! read that could have seen its data sees the generation move and falls back to the replica
//! thread, which waits for the peer as the sync policy requires. A block turns clean only once
//! its write is acknowledged, and then serving it is right. Region granularity makes the check
//! O(regions in the range) and the memory 4 bytes per region (4 MiB per TiB at 1 MiB regions).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[derive(Debug)]
pub struct DirtyShadow {
    region_blocks: u64,
    /// Dirty blocks per region.
    counts: Box<[AtomicU32]>,
    /// Bumped every time a block turns dirty.
    generation: AtomicU64,
}

impl DirtyShadow {
    pub fn new(blocks: u64, region_blocks: u64) -> DirtyShadow {
        let region_blocks = region_blocks.max(1);
        let regions = blocks.div_ceil(region_blocks) as usize;
        DirtyShadow {
            region_blocks,
            counts: (0..regions).map(|_| AtomicU32::new(0)).collect(),
            generation: AtomicU64::new(0),
        }
    }

    fn region(&self, lba: u64) -> Option<&AtomicU32> {
        self.counts.get((lba / self.region_blocks) as usize)
    }

    /// A block turned dirty (call before its new data is applied).
    pub fn marked(&self, lba: u64) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(c) = self.region(lba) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A dirty block turned clean.
    pub fn cleared(&self, lba: u64) {
        if let Some(c) = self.region(lba) {
            // Never below zero, whatever a caller does: a wrapped count would read as dirty
            // forever (only slower), but keep it exact.
            let _ = c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// No block of `lba..lba + blocks` is dirty (at region granularity; a region past the
    /// end: false). The caller has checked the range against the volume.
    pub fn range_clean(&self, lba: u64, blocks: u64) -> bool {
        if blocks == 0 {
            return true;
        }
        let first = lba / self.region_blocks;
        let last = (lba + blocks - 1) / self.region_blocks;
        (first..=last).all(|r| {
            self.counts
                .get(r as usize)
                .is_some_and(|c| c.load(Ordering::SeqCst) == 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The fast path's two checks: a dirty block anywhere in the range's regions refuses it,
    // and a block turning dirty moves the generation so a read in progress is discarded.
    #[test]
    fn dirty_regions_and_generation() {
        let s = DirtyShadow::new(1000, 256);
        assert!(s.range_clean(0, 1000));
        let g = s.generation();
        s.marked(300);
        assert_ne!(s.generation(), g);
        assert!(!s.range_clean(256, 1), "same region as block 300");
        assert!(s.range_clean(0, 256), "other region");
        assert!(!s.range_clean(0, 1000));
        s.marked(301);
        s.cleared(300);
        assert!(!s.range_clean(300, 1), "301 is still dirty");
        s.cleared(301);
        assert!(s.range_clean(0, 1000));
        s.cleared(301); // never below zero
        assert!(s.range_clean(0, 1000));
        assert!(
            !s.range_clean(5000, 1),
            "a region past the end is never clean"
        );
    }
}
