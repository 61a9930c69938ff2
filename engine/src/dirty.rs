//! The persistent dirty map (`<name>.dirty`): one bit per region of `region_blocks` blocks
//! (1 MiB by default) that may differ from the peer.
//!
//! It plays both parts of DRBD's activity log + bitmap: a mutation marks its regions *durably
//! before* its data is submitted, so after a crash at any instant every block that might hold a
//! torn or un-recorded write lies in a dirty region. Marking a region that is already dirty
//! costs nothing (an atomic load), so the write path does metadata I/O only on the first write
//! to a region since it was last cleared. Bits are cleared only by [`crate::Volume::clear_dirty`],
//! after the replicator knows the region matches the peer and the local copy is durable.
//!
//! The file is the raw bitmap (bit `r % 8` of byte `r / 8` is region `r`), no header: the
//! region size lives in the superblock. No per-page checksum is needed because every partial
//! (torn) update is safe: a page is only ever rewritten whole from memory, and each of its bytes
//! on disk is either the old or the new value — when setting, both are supersets of what had to
//! be durable before (the data write waits for the fsync); when clearing, a surviving old byte
//! only leaves extra regions dirty, which costs a redundant resync, never a lost write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::io::{FileId, IoEngine, IoOp};
use crate::{AlignedBuf, BlockError};

pub const PAGE_BYTES: u64 = 4096;
const REGIONS_PER_PAGE: u64 = PAGE_BYTES * 8;

/// Dirty-map file length for `regions` regions (at least one page).
pub fn dirty_file_bytes(regions: u64) -> u64 {
    regions.div_ceil(REGIONS_PER_PAGE).max(1) * PAGE_BYTES
}

pub struct DirtyMap {
    engine: Arc<dyn IoEngine>,
    file: FileId,
    pub region_blocks: u64,
    regions: AtomicU64,
    /// Bit set = region durably dirty. A bit is set here only after it is durable on disk.
    bits: RwLock<Vec<AtomicU64>>,
    /// Serialises updates of the on-disk bitmap.
    persist: tokio::sync::Mutex<()>,
}

impl DirtyMap {
    /// A map over `regions` regions with the given on-disk bitmap bytes.
    pub fn new(
        engine: Arc<dyn IoEngine>,
        file: FileId,
        region_blocks: u64,
        regions: u64,
        bitmap: &[u8],
    ) -> DirtyMap {
        let words = regions.div_ceil(64) as usize;
        let bits = (0..words)
            .map(|w| {
                let mut word = [0u8; 8];
                for (i, byte) in word.iter_mut().enumerate() {
                    *byte = bitmap.get(w * 8 + i).copied().unwrap_or(0);
                }
                AtomicU64::new(u64::from_le_bytes(word))
            })
            .collect();
        let map = DirtyMap {
            engine,
            file,
            region_blocks,
            regions: AtomicU64::new(regions),
            bits: RwLock::new(bits),
            persist: tokio::sync::Mutex::new(()),
        };
        // Bits past the last region (garbage in the file's tail) are ignored.
        map.mask_tail(regions);
        map
    }

    fn mask_tail(&self, regions: u64) {
        let bits = self.bits.read().unwrap_or_else(|p| p.into_inner());
        if regions % 64 != 0 {
            if let Some(last) = bits.last() {
                last.fetch_and((1u64 << (regions % 64)) - 1, Ordering::SeqCst);
            }
        }
    }

    /// The bitmap file.
    pub fn file(&self) -> FileId {
        self.file
    }

    pub fn region_count(&self) -> u64 {
        self.regions.load(Ordering::SeqCst)
    }

    pub fn is_dirty(&self, region: u64) -> bool {
        let bits = self.bits.read().unwrap_or_else(|p| p.into_inner());
        bits.get((region / 64) as usize)
            .is_some_and(|w| w.load(Ordering::SeqCst) & (1 << (region % 64)) != 0)
    }

    /// Regions covering blocks `[first, first + count)`.
    pub fn regions_of(&self, first: u64, count: u64) -> std::ops::Range<u64> {
        if count == 0 {
            return 0..0;
        }
        first / self.region_blocks..(first + count - 1) / self.region_blocks + 1
    }

    /// Dirty regions at or after `start`, at most `max_regions` of them, ascending.
    pub fn dirty_regions(&self, start: u64, max_regions: usize) -> Vec<u64> {
        let bits = self.bits.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut word_index = (start / 64) as usize;
        while word_index < bits.len() && out.len() < max_regions {
            let mut word = bits[word_index].load(Ordering::SeqCst);
            if word_index as u64 == start / 64 {
                word &= !0u64 << (start % 64);
            }
            while word != 0 && out.len() < max_regions {
                let bit = word.trailing_zeros() as u64;
                out.push(word_index as u64 * 64 + bit);
                word &= word - 1;
            }
            word_index += 1;
        }
        out
    }

    /// Makes `regions` durably dirty before returning.
    pub async fn mark(&self, regions: std::ops::Range<u64>) -> Result<(), BlockError> {
        if regions.clone().all(|r| self.is_dirty(r)) {
            return Ok(());
        }
        let _persist = self.persist.lock().await;
        let missing: Vec<u64> = regions.filter(|&r| !self.is_dirty(r)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut pages: Vec<u64> = missing.iter().map(|r| r / REGIONS_PER_PAGE).collect();
        pages.dedup();
        for &page in &pages {
            let mut image = self.page_image(page);
            for &r in missing.iter().filter(|&&r| r / REGIONS_PER_PAGE == page) {
                let bit = r % REGIONS_PER_PAGE;
                image[(bit / 8) as usize] |= 1 << (bit % 8);
            }
            self.write_page(page, image).await?;
        }
        let done = self
            .engine
            .submit(IoOp::Fdatasync { file: self.file })
            .await;
        done.result.map_err(crate::volume::io_error)?;
        // Only now may writers skip the mark: the bits are on stable storage.
        let bits = self.bits.read().unwrap_or_else(|p| p.into_inner());
        for r in missing {
            if let Some(word) = bits.get((r / 64) as usize) {
                word.fetch_or(1 << (r % 64), Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// The same as [`DirtyMap::mark`], blocking (used at open, outside any runtime).
    pub fn mark_blocking(&self, regions: &[u64]) -> Result<(), BlockError> {
        let bits = self.bits.read().unwrap_or_else(|p| p.into_inner());
        for &r in regions {
            if let Some(word) = bits.get((r / 64) as usize) {
                word.fetch_or(1 << (r % 64), Ordering::SeqCst);
            }
        }
        drop(bits);
        let mut pages: Vec<u64> = regions.iter().map(|r| r / REGIONS_PER_PAGE).collect();
        pages.sort_unstable();
        pages.dedup();
        for page in pages {
            let image = self.page_image(page);
            let done = self
                .engine
                .submit(IoOp::Write {
                    file: self.file,
                    offset: page * PAGE_BYTES,
                    buf: image,
                })
                .wait();
            done.result.map_err(crate::volume::io_error)?;
        }
        let done = self
            .engine
            .submit(IoOp::Fdatasync { file: self.file })
            .wait();
        done.result.map_err(crate::volume::io_error)
    }

    /// Clears `regions` in memory and writes the bitmap back. The write is not synced: a clear
    /// that a crash undoes only costs a redundant resync, and the next mark's fsync carries it.
    pub async fn clear(&self, regions: &[u64]) -> Result<(), BlockError> {
        let _persist = self.persist.lock().await;
        let mut pages = Vec::new();
        {
            let bits = self.bits.read().unwrap_or_else(|p| p.into_inner());
            for &r in regions {
                if let Some(word) = bits.get((r / 64) as usize) {
                    word.fetch_and(!(1 << (r % 64)), Ordering::SeqCst);
                    pages.push(r / REGIONS_PER_PAGE);
                }
            }
        }
        pages.sort_unstable();
        pages.dedup();
        for page in pages {
            let image = self.page_image(page);
            self.write_page(page, image).await?;
        }
        Ok(())
    }

    /// Grows the in-memory map to `regions` regions (the file was already extended with zeroes).
    pub fn grow(&self, regions: u64) {
        let mut bits = self.bits.write().unwrap_or_else(|p| p.into_inner());
        while (bits.len() as u64) < regions.div_ceil(64) {
            bits.push(AtomicU64::new(0));
        }
        self.regions.fetch_max(regions, Ordering::SeqCst);
    }

    fn page_image(&self, page: u64) -> AlignedBuf {
        let mut image = AlignedBuf::zeroed(PAGE_BYTES as usize);
        let bits = self.bits.read().unwrap_or_else(|p| p.into_inner());
        let first_word = (page * REGIONS_PER_PAGE / 64) as usize;
        for (i, chunk) in image.chunks_mut(8).enumerate() {
            if let Some(word) = bits.get(first_word + i) {
                chunk.copy_from_slice(&word.load(Ordering::SeqCst).to_le_bytes());
            }
        }
        image
    }

    async fn write_page(&self, page: u64, image: AlignedBuf) -> Result<(), BlockError> {
        let done = self
            .engine
            .submit(IoOp::Write {
                file: self.file,
                offset: page * PAGE_BYTES,
                buf: image,
            })
            .await;
        done.result.map_err(crate::volume::io_error)
    }
}
