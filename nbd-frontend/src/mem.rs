//! [`MemDevice`]: a sparse, block-granular, in-memory [`BlockDevice`] for tests and the bench.
//!
//! Blocks never written are holes (read as zeroes, reported `hole | zero`). WRITE_ZEROES with
//! NO_HOLE keeps the blocks allocated but zero; without it, and TRIM, punch holes. Memory is
//! sharded by block index so that concurrent requests on different blocks rarely contend.
//! Flush and FUA are no-ops that are export-wide by construction: there is no cache, so every
//! completed write is visible to every connection at once (what CAN_MULTI_CONN requires).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use stretch_engine::{AlignedBuf, BlockDevice, BlockError, Extent, ZeroFlags};

const BLOCK_BYTES: u64 = stretch_engine::BLOCK_SIZE as u64;
const SHARDS: usize = 64;
/// Block status looks at no more than this many blocks per call (1 GiB); the reply may cover
/// less than asked, which the contract and NBD both allow.
const STATUS_BLOCKS_MAX: u64 = 1 << 18;

enum Block {
    Data(Box<[u8]>),
    /// Allocated, reads as zeroes (WRITE_ZEROES with NO_HOLE).
    Zero,
}

/// An in-memory volume.
pub struct MemDevice {
    size_bytes: u64,
    shards: Vec<Mutex<HashMap<u64, Block>>>,
    flushes: AtomicU64,
}

impl MemDevice {
    /// A volume of `size_bytes`, rounded down to whole 4096-byte blocks; all holes.
    pub fn new(size_bytes: u64) -> MemDevice {
        MemDevice {
            size_bytes: size_bytes / BLOCK_BYTES * BLOCK_BYTES,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            flushes: AtomicU64::new(0),
        }
    }

    /// FLUSH commands served so far (lets tests see that a flush reached the device).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Blocks that hold memory (data or allocated zeroes).
    pub fn allocated_blocks(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len() as u64).unwrap_or(0))
            .sum()
    }

    fn shard(&self, lba: u64) -> &Mutex<HashMap<u64, Block>> {
        &self.shards[(lba % SHARDS as u64) as usize]
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        stretch_engine::check_range(offset, len, self.size_bytes)
    }

    fn check_mutation(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_range(offset, len)?;
        stretch_engine::check_aligned(offset, len)
    }

    fn punch_or_zero(&self, offset: u64, len: u64, keep_allocated: bool) {
        let first = offset / BLOCK_BYTES;
        for lba in first..first + len / BLOCK_BYTES {
            // A poisoned shard only means another test thread panicked; the map is still valid.
            let mut shard = self.shard(lba).lock().unwrap_or_else(|e| e.into_inner());
            if keep_allocated {
                shard.insert(lba, Block::Zero);
            } else {
                shard.remove(&lba);
            }
        }
    }

    fn lock(&self, lba: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Block>> {
        self.shard(lba).lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, BlockError> {
        self.check_range(offset, u64::from(len))?;
        let mut buf = AlignedBuf::zeroed(len as usize);
        let end = offset + u64::from(len);
        let mut pos = offset;
        while pos < end {
            let lba = pos / BLOCK_BYTES;
            let in_block = (pos % BLOCK_BYTES) as usize;
            let n = (BLOCK_BYTES - pos % BLOCK_BYTES).min(end - pos) as usize;
            let at = (pos - offset) as usize;
            if let Some(Block::Data(d)) = self.lock(lba).get(&lba) {
                buf[at..at + n].copy_from_slice(&d[in_block..in_block + n]);
            }
            pos += n as u64;
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: AlignedBuf, _fua: bool) -> Result<(), BlockError> {
        self.check_mutation(offset, data.len() as u64)?;
        let first = offset / BLOCK_BYTES;
        for (i, chunk) in data.chunks(BLOCK_BYTES as usize).enumerate() {
            let lba = first + i as u64;
            self.lock(lba).insert(lba, Block::Data(chunk.into()));
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), BlockError> {
        self.check_mutation(offset, len)?;
        self.punch_or_zero(offset, len, false);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        self.check_mutation(offset, len)?;
        // Zeroing memory is always faster than writing zeroes over the wire, so FAST_ZERO is
        // honoured by simply doing it.
        self.punch_or_zero(offset, len, flags.no_hole);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(BlockError::OutOfRange {
                offset,
                len,
                size: self.size_bytes,
            });
        }
        let first = offset / BLOCK_BYTES;
        let last = (offset + len)
            .div_ceil(BLOCK_BYTES)
            .min(first + STATUS_BLOCKS_MAX);
        let mut extents: Vec<Extent> = Vec::new();
        for lba in first..last {
            let (hole, zero) = match self.lock(lba).get(&lba) {
                None => (true, true),
                Some(Block::Zero) => (false, true),
                Some(Block::Data(_)) => (false, false),
            };
            // The first extent starts at `offset`, so it is shortened by the offset's position
            // inside its block; the others are whole blocks.
            let start = (lba * BLOCK_BYTES).max(offset);
            let n = (lba + 1) * BLOCK_BYTES - start;
            match extents.last_mut() {
                Some(e) if e.hole == hole && e.zero == zero => e.len_bytes += n,
                _ => extents.push(Extent {
                    len_bytes: n,
                    hole,
                    zero,
                }),
            }
        }
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn sparse_write_read_trim_zero_status() {
        block_on(async {
            let d = MemDevice::new(1 << 20);
            let data = AlignedBuf::from_slice(&[7u8; 8192]);
            d.write(4096, data, false).await.expect("write");
            let r = d.read(4000, 200).await.expect("read");
            assert!(r[..96].iter().all(|&b| b == 0));
            assert!(r[96..].iter().all(|&b| b == 7));
            let st = d.block_status(0, 1 << 20).await.expect("status");
            let shape: Vec<_> = st.iter().map(|e| (e.len_bytes, e.hole, e.zero)).collect();
            assert_eq!(
                shape,
                vec![
                    (4096, true, true),
                    (8192, false, false),
                    ((1 << 20) - 12288, true, true)
                ]
            );
            let nh = ZeroFlags {
                no_hole: true,
                ..ZeroFlags::default()
            };
            d.write_zeroes(4096, 4096, nh).await.expect("zero");
            d.trim(8192, 4096, false).await.expect("trim");
            let st = d.block_status(4096, 8192).await.expect("status");
            assert_eq!(
                (st[0].len_bytes, st[0].hole, st[0].zero),
                (4096, false, true)
            );
            assert_eq!((st[1].hole, st[1].zero), (true, true));
            assert!(d
                .read(4096, 8192)
                .await
                .expect("read")
                .iter()
                .all(|&b| b == 0));
        });
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        block_on(async {
            let d = MemDevice::new(1 << 20);
            assert!(matches!(
                d.read(u64::MAX - 1, 4096).await,
                Err(BlockError::OutOfRange { .. })
            ));
            assert!(matches!(
                d.trim(4096, u64::MAX - 100, false).await,
                Err(BlockError::OutOfRange { .. })
            ));
            assert!(matches!(
                d.write(1, AlignedBuf::zeroed(4096), false).await,
                Err(BlockError::Misaligned { .. })
            ));
        });
    }
}
