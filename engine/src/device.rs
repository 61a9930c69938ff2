//! [`BlockDevice`]: the trait the NBD server serves. Both the local engine volume and the
//! replicated volume implement it. Kept small and exact: each method maps to one NBD command.

use std::future::Future;

use crate::{AlignedBuf, BlockError};

/// Flags of WRITE_ZEROES (NBD `NO_HOLE`, `FAST_ZERO`, `FUA`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range must stay allocated (no hole punched).
    pub no_hole: bool,
    /// Fail with [`BlockError::NotFast`] unless zeroing is faster than writing zeroes.
    pub fast: bool,
    /// Durable before the call returns.
    pub fua: bool,
}

/// One run of blocks with the same status, as NBD `base:allocation` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, a multiple of the block size.
    pub len_bytes: u64,
    /// Not allocated on the backing store (NBD_STATE_HOLE).
    pub hole: bool,
    /// Reads as zeroes (NBD_STATE_ZERO).
    pub zero: bool,
}

/// A block volume as a client sees it.
///
/// Offsets and lengths are in bytes. Mutations (write, trim, write_zeroes) must cover whole
/// 4096-byte blocks ([`BlockError::Misaligned`] otherwise); reads may have any alignment. Every
/// method checks its range against [`BlockDevice::size_bytes`] without overflow.
/// Buffers are owned so that io_uring never sees memory a cancelled future could free.
pub trait BlockDevice: Send + Sync + 'static {
    /// Volume size in bytes, a multiple of the block size.
    fn size_bytes(&self) -> u64;

    /// The block size: minimum and preferred I/O size (4096).
    fn block_size(&self) -> u32 {
        crate::BLOCK_SIZE
    }

    /// False when every mutation fails with [`BlockError::ReadOnly`].
    fn is_writable(&self) -> bool {
        true
    }

    /// Reads `len` bytes at `offset` (any alignment). A checksum failure is an error, never data.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<AlignedBuf, BlockError>> + Send;

    /// Writes whole blocks; with `fua` the data is durable before this returns.
    fn write(
        &self,
        offset: u64,
        data: AlignedBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), BlockError>> + Send;

    /// Makes every write that completed before this call durable (data and metadata).
    fn flush(&self) -> impl Future<Output = Result<(), BlockError>> + Send;

    /// Discards whole blocks; they read as zeroes afterwards.
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), BlockError>> + Send;

    /// Makes whole blocks read as zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> impl Future<Output = Result<(), BlockError>> + Send;

    /// Allocation status of `[offset, offset + len)` as consecutive extents starting at `offset`
    /// (the last may run past `offset + len`, never past the volume end). At least one extent.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, BlockError>> + Send;
}

/// Checks that `[offset, offset + len)` lies inside a device of `size_bytes`, without ever
/// computing `offset + len` unchecked (NBD.md §5: offset overflow).
pub fn check_range(offset: u64, len: u64, size_bytes: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size_bytes => Ok(()),
        _ => Err(BlockError::OutOfRange {
            offset,
            len,
            size: size_bytes,
        }),
    }
}

/// Checks that a mutation covers whole blocks: no read-modify-write on the server, because with
/// two writing sites it could lose an acknowledged write (DESIGN.md §4, Alignment).
pub fn check_aligned(offset: u64, len: u64) -> Result<(), BlockError> {
    let block = u64::from(crate::BLOCK_SIZE);
    if offset % block != 0 || len % block != 0 {
        return Err(BlockError::Misaligned { offset, len });
    }
    Ok(())
}

/// Checks that one read is no larger than [`crate::REQUEST_BYTES_MAX`].
pub fn check_read_len(len: u32) -> Result<(), BlockError> {
    if len > crate::REQUEST_BYTES_MAX {
        return Err(BlockError::TooLarge {
            len: u64::from(len),
            max: u64::from(crate::REQUEST_BYTES_MAX),
        });
    }
    Ok(())
}
