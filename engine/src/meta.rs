//! On-disk metadata: the superblock and the per-block records (`<name>.meta`).
//!
//! Layout of the metadata file, all integers little-endian:
//!
//! ```text
//! page 0, page 1   two superblock copies; the valid one with the higher generation wins, so a
//!                  torn superblock update (grow) falls back to the previous copy
//! page 2..         record pages of 8 sectors; each 512-byte sector holds 21 records of 24 bytes
//!                  (504 bytes), 4 reserved bytes and at byte 508 a CRC32 of bytes 0..508.
//!                  An all-zero sector is valid (never written: its blocks read as zeroes).
//! record           crc32 u32 | flags u32 | stamp [u8; 16]
//! ```
//!
//! Records never straddle a 512-byte sector and every sector carries its own CRC, so a page
//! torn by a crash mid-flush (some sectors old, some new) is still a set of valid sectors, each
//! holding consistent old or new records: tearing never costs the records of blocks that were
//! not written since the last flush.
//!
//! A block's CRC is CRC32 (crc32fast, IEEE) over `volume uuid (16) || lba (u64 LE) || data`, so
//! data written to the wrong place or the wrong volume fails verification.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crate::io::lock;
use crate::{Stamp, BLOCK_SIZE};

pub const PAGE_BYTES: usize = 4096;
pub const MAGIC: [u8; 8] = *b"STRMETA\0";
pub const FORMAT_VERSION: u32 = 1;
/// CRC32 (IEEE, crc32fast) over uuid || lba || data.
pub const CHECKSUM_CRC32_UUID_LBA: u32 = 1;
pub const RECORD_BYTES: usize = 24;
pub const SECTOR_BYTES: usize = 512;
pub const RECORDS_PER_SECTOR: usize = 21;
pub const SECTORS_PER_PAGE: usize = PAGE_BYTES / SECTOR_BYTES;
pub const RECORDS_PER_PAGE: u64 = (RECORDS_PER_SECTOR * SECTORS_PER_PAGE) as u64;
const SECTOR_CRC_AT: usize = SECTOR_BYTES - 4;
/// Record pages start after the two superblock copies.
pub const RECORDS_FIRST_PAGE: u64 = 2;
const PAGE_CRC_AT: usize = PAGE_BYTES - 4;

const _: () = assert!(RECORDS_PER_SECTOR * RECORD_BYTES <= SECTOR_CRC_AT);

/// Byte offset of record `index` (0..RECORDS_PER_PAGE) within its page.
fn record_at(index: usize) -> usize {
    (index / RECORDS_PER_SECTOR) * SECTOR_BYTES + (index % RECORDS_PER_SECTOR) * RECORD_BYTES
}

/// The block's data has a CRC in the record.
pub const FLAG_WRITTEN: u32 = 1;
/// The block was trimmed or zeroed: it reads as zeroes; the stamp is its tombstone.
pub const FLAG_ZERO: u32 = 2;
/// The zeroes are a hole (punched), not allocated zeroes.
pub const FLAG_HOLE: u32 = 4;
/// The record was lost (its page failed its CRC): reads fail until the block is rewritten.
pub const FLAG_BAD: u32 = 8;

/// One block's metadata record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub crc: u32,
    pub flags: u32,
    pub stamp: Stamp,
}

impl Record {
    fn decode(bytes: &[u8]) -> Record {
        let mut stamp = [0u8; 16];
        stamp.copy_from_slice(&bytes[8..24]);
        Record {
            crc: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            flags: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            stamp: Stamp(stamp),
        }
    }

    fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.crc.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..24].copy_from_slice(&self.stamp.0);
    }
}

/// CRC of one block with its volume and address mixed in.
pub fn block_crc(uuid: &[u8; 16], lba: u64, data: &[u8]) -> u32 {
    debug_assert_eq!(data.len(), BLOCK_SIZE as usize);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(uuid);
    hasher.update(&lba.to_le_bytes());
    hasher.update(data);
    hasher.finalize()
}

/// Record pages needed for `blocks` blocks.
pub fn record_pages(blocks: u64) -> u64 {
    blocks.div_ceil(RECORDS_PER_PAGE)
}

/// Metadata file length for `blocks` blocks.
pub fn meta_file_bytes(blocks: u64) -> u64 {
    (RECORDS_FIRST_PAGE + record_pages(blocks)) * PAGE_BYTES as u64
}

fn seal(chunk: &mut [u8], crc_at: usize) {
    let crc = crc32fast::hash(&chunk[..crc_at]);
    chunk[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

fn is_sealed(chunk: &[u8], crc_at: usize) -> bool {
    let stored = u32::from_le_bytes([
        chunk[crc_at],
        chunk[crc_at + 1],
        chunk[crc_at + 2],
        chunk[crc_at + 3],
    ]);
    stored == crc32fast::hash(&chunk[..crc_at])
}

/// Seals a record page: writes each sector's CRC.
pub fn seal_page(page: &mut [u8]) {
    for sector in page.chunks_mut(SECTOR_BYTES) {
        seal(sector, SECTOR_CRC_AT);
    }
}

/// Checks a record page read back from disk: sectors that fail their CRC (not all-zero, i.e.
/// not never-written) are replaced by [`FLAG_BAD`] records. Returns the indices (within the
/// page) of the records lost.
pub fn repair_page(page: &mut [u8]) -> Vec<usize> {
    let mut lost = Vec::new();
    for (s, sector) in page.chunks_mut(SECTOR_BYTES).enumerate() {
        if sector.iter().all(|&b| b == 0) || is_sealed(sector, SECTOR_CRC_AT) {
            continue;
        }
        sector.fill(0);
        let bad = Record {
            crc: 0,
            flags: FLAG_BAD,
            stamp: Stamp::ZERO,
        };
        for r in 0..RECORDS_PER_SECTOR {
            bad.encode(&mut sector[r * RECORD_BYTES..(r + 1) * RECORD_BYTES]);
            lost.push(s * RECORDS_PER_SECTOR + r);
        }
        seal(sector, SECTOR_CRC_AT);
    }
    lost
}

/// The superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub generation: u64,
    pub size_bytes: u64,
    pub uuid: [u8; 16],
    pub dirty_region_blocks: u32,
}

impl Superblock {
    pub fn encode(&self) -> [u8; PAGE_BYTES] {
        let mut page = [0u8; PAGE_BYTES];
        page[0..8].copy_from_slice(&MAGIC);
        page[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        page[12..16].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        page[16..20].copy_from_slice(&CHECKSUM_CRC32_UUID_LBA.to_le_bytes());
        page[20..24].copy_from_slice(&(RECORD_BYTES as u32).to_le_bytes());
        page[24..28].copy_from_slice(&(RECORDS_PER_PAGE as u32).to_le_bytes());
        page[28..32].copy_from_slice(&self.dirty_region_blocks.to_le_bytes());
        page[32..40].copy_from_slice(&self.generation.to_le_bytes());
        page[40..48].copy_from_slice(&self.size_bytes.to_le_bytes());
        page[48..64].copy_from_slice(&self.uuid);
        seal(&mut page, PAGE_CRC_AT);
        page
    }

    /// Parses one superblock copy; `Err` says why it is unusable.
    pub fn decode(page: &[u8]) -> Result<Superblock, String> {
        if page.len() < PAGE_BYTES {
            return Err("superblock shorter than a page".into());
        }
        if page[0..8] != MAGIC {
            return Err("bad magic (not a Stretch metadata file)".into());
        }
        if !is_sealed(page, PAGE_CRC_AT) {
            return Err("superblock checksum mismatch".into());
        }
        let u32_at =
            |at: usize| u32::from_le_bytes([page[at], page[at + 1], page[at + 2], page[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&page[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "unsupported format version {version} (this build reads {FORMAT_VERSION})"
            ));
        }
        if u32_at(12) != BLOCK_SIZE {
            return Err(format!("unsupported block size {}", u32_at(12)));
        }
        if u32_at(16) != CHECKSUM_CRC32_UUID_LBA {
            return Err(format!("unsupported checksum algorithm {}", u32_at(16)));
        }
        if u32_at(20) as usize != RECORD_BYTES || u64::from(u32_at(24)) != RECORDS_PER_PAGE {
            return Err("unsupported record layout".into());
        }
        let dirty_region_blocks = u32_at(28);
        if dirty_region_blocks == 0 || !dirty_region_blocks.is_power_of_two() {
            return Err(format!(
                "bad dirty region size {dirty_region_blocks} blocks"
            ));
        }
        let size_bytes = u64_at(40);
        if size_bytes == 0 || size_bytes % u64::from(BLOCK_SIZE) != 0 {
            return Err(format!("bad volume size {size_bytes}"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&page[48..64]);
        Ok(Superblock {
            generation: u64_at(32),
            size_bytes,
            uuid,
            dirty_region_blocks,
        })
    }
}

/// The in-memory copy of every record page (24 bytes per block), each page under its own mutex
/// so a flush copies a consistent page while writers update other pages. Pages changed since
/// the last flush are remembered in a bitmap (one bit per page, fixed by the table's size), so
/// recording a change is one atomic OR, with no lock and no allocation.
pub struct Records {
    table: RwLock<Table>,
}

struct Table {
    pages: Vec<Mutex<Box<[u8; PAGE_BYTES]>>>,
    /// Bit `page % 64` of word `page / 64`: changed since the last `take_dirty_pages`.
    dirty: Vec<AtomicU64>,
}

impl Table {
    fn mark(&self, page: u64) {
        if page >= self.pages.len() as u64 {
            return;
        }
        if let Some(word) = self.dirty.get((page / 64) as usize) {
            // Release: a flush that takes the bit (AcqRel swap) sees the change before it; the
            // page contents themselves are ordered by the page mutex.
            word.fetch_or(1 << (page % 64), Ordering::Release);
        }
    }
}

impl Records {
    pub fn new(pages: Vec<Box<[u8; PAGE_BYTES]>>) -> Records {
        let words = pages.len().div_ceil(64);
        Records {
            table: RwLock::new(Table {
                pages: pages.into_iter().map(Mutex::new).collect(),
                dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, lba: u64) -> Record {
        let page = lba / RECORDS_PER_PAGE;
        let at = record_at((lba % RECORDS_PER_PAGE) as usize);
        match self.read().pages.get(page as usize) {
            Some(page) => Record::decode(&lock(page)[at..at + RECORD_BYTES]),
            None => Record::default(),
        }
    }

    /// Records of blocks `[first, first + count)`.
    pub fn get_range(&self, first: u64, count: u64) -> Vec<Record> {
        (first..first + count).map(|lba| self.get(lba)).collect()
    }

    pub fn set(&self, lba: u64, record: Record) {
        let page = lba / RECORDS_PER_PAGE;
        let at = record_at((lba % RECORDS_PER_PAGE) as usize);
        let table = self.read();
        if let Some(slot) = table.pages.get(page as usize) {
            record.encode(&mut lock(slot)[at..at + RECORD_BYTES]);
            table.mark(page);
        }
    }

    /// Marks a page as needing a write at the next flush.
    pub fn mark_page_dirty(&self, page: u64) {
        self.read().mark(page);
    }

    /// Takes the pages changed since the last call, ascending.
    pub fn take_dirty_pages(&self) -> Vec<u64> {
        let table = self.read();
        let mut pages = Vec::new();
        for (i, word) in table.dirty.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                pages.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        pages
    }

    /// Puts pages back (their write failed; the next flush retries them).
    pub fn restore_dirty_pages(&self, pages: &[u64]) {
        let table = self.read();
        for &page in pages {
            table.mark(page);
        }
    }

    /// A sealed copy of one page, ready to write.
    pub fn sealed_page(&self, page: u64) -> Option<crate::AlignedBuf> {
        let table = self.read();
        let mut buf = crate::AlignedBuf::from_slice(&lock(table.pages.get(page as usize)?)[..]);
        seal_page(&mut buf);
        Some(buf)
    }

    /// Extends the table to `page_count` pages of unwritten records.
    pub fn grow(&self, page_count: u64) {
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        while (table.pages.len() as u64) < page_count {
            table.pages.push(Mutex::new(Box::new([0u8; PAGE_BYTES])));
        }
        let words = table.pages.len().div_ceil(64);
        table.dirty.resize_with(words, || AtomicU64::new(0));
    }

    /// The greatest stamp of any block.
    pub fn max_stamp(&self) -> Stamp {
        let table = self.read();
        let mut max = Stamp::ZERO;
        for page in table.pages.iter() {
            let page = lock(page);
            for i in 0..RECORDS_PER_PAGE as usize {
                let at = record_at(i);
                let record = Record::decode(&page[at..at + RECORD_BYTES]);
                max = max.max(record.stamp);
            }
        }
        max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = Superblock {
            generation: 7,
            size_bytes: 1 << 30,
            uuid: [9; 16],
            dirty_region_blocks: 256,
        };
        let mut page = sb.encode();
        assert_eq!(Superblock::decode(&page), Ok(sb));
        page[41] ^= 1;
        assert!(Superblock::decode(&page).unwrap_err().contains("checksum"));
        assert!(Superblock::decode(&[0u8; PAGE_BYTES])
            .unwrap_err()
            .contains("magic"));
    }

    #[test]
    fn crc_mixes_in_lba_and_volume() {
        let data = [0x5au8; 4096];
        let a = block_crc(&[1; 16], 10, &data);
        assert_ne!(a, block_crc(&[1; 16], 11, &data));
        assert_ne!(a, block_crc(&[2; 16], 10, &data));
    }

    #[test]
    fn records_round_trip_and_track_dirty_pages() {
        let records = Records::new(vec![Box::new([0u8; PAGE_BYTES]); 2]);
        let r = Record {
            crc: 0xdead_beef,
            flags: FLAG_WRITTEN,
            stamp: Stamp([3; 16]),
        };
        records.set(169, r);
        assert_eq!(records.get(169), r);
        assert_eq!(records.get(168), Record::default());
        assert_eq!(records.take_dirty_pages(), vec![1]);
        assert!(records.take_dirty_pages().is_empty());
        records.restore_dirty_pages(&[1, 0]);
        records.mark_page_dirty(7); // beyond the table: ignored
        assert_eq!(records.take_dirty_pages(), vec![0, 1]);
        records.grow(130);
        records.set(129 * RECORDS_PER_PAGE, r);
        assert_eq!(records.take_dirty_pages(), vec![129]);
        let mut page = records.sealed_page(1).expect("page exists");
        assert!(repair_page(&mut page).is_empty());
    }

    #[test]
    fn torn_sector_loses_only_its_records() {
        let records = Records::new(vec![Box::new([0u8; PAGE_BYTES])]);
        for lba in 0..RECORDS_PER_PAGE {
            records.set(
                lba,
                Record {
                    crc: lba as u32,
                    flags: FLAG_WRITTEN,
                    stamp: Stamp::ZERO,
                },
            );
        }
        let mut page = records.sealed_page(0).expect("page exists");
        page[SECTOR_BYTES + 3] ^= 0xff; // damage sector 1
        let lost = repair_page(&mut page);
        assert_eq!(lost, (21..42).collect::<Vec<_>>());
    }
}
