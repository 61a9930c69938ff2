//! The one error type of the block layer. Callers branch on it (the NBD server maps each kind
//! to an NBD error code; the replicator repairs on `Checksum`), so it is a `thiserror` enum.

use std::io;

/// What can go wrong with a block request.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The range runs past the end of the volume (NBD: EINVAL for reads, ENOSPC for writes).
    #[error("range {offset}+{len} is beyond the volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A mutation not aligned to whole 4096-byte blocks (NBD: EINVAL). No read-modify-write:
    /// with two writing sites it could lose an acknowledged write.
    #[error("mutation {offset}+{len} is not aligned to 4096-byte blocks")]
    Misaligned { offset: u64, len: u64 },
    /// A request larger than the engine accepts in one piece (NBD: EINVAL/EOVERFLOW).
    #[error("request of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    /// The backing filesystem is full (NBD: ENOSPC).
    #[error("no space left on the backing store")]
    NoSpace,
    /// A block's data does not match its recorded checksum. Never returned as data; the
    /// replicator repairs it from an in-sync peer, otherwise it becomes EIO.
    #[error("checksum mismatch at block {lba}")]
    Checksum { lba: u64 },
    /// WRITE_ZEROES with FAST_ZERO where zeroing would not be faster than writing (NBD: ENOTSUP).
    #[error("zeroing this range is not faster than writing it")]
    NotFast,
    /// The volume or export is read-only (NBD: EPERM).
    #[error("volume is read-only")]
    ReadOnly,
    /// The device is shutting down or stopped serving (NBD: ESHUTDOWN).
    #[error("volume is shutting down")]
    Shutdown,
    /// Any other I/O failure (NBD: EIO).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl BlockError {
    /// Maps an OS error number to the matching variant (ENOSPC, EDQUOT and EFBIG are "no space",
    /// as the NBD spec asks).
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => BlockError::NoSpace,
            libc::EROFS | libc::EPERM => BlockError::ReadOnly,
            other => BlockError::Io(io::Error::from_raw_os_error(other)),
        }
    }
}
