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

/// What can go wrong managing volumes (create, open, grow, list, delete).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No volume of that name in the directory.
    #[error("volume {name:?} not found in {dir}")]
    NotFound { name: String, dir: String },
    /// A volume (or one of its files) of that name already exists.
    #[error("volume {name:?} already exists in {dir}")]
    AlreadyExists { name: String, dir: String },
    /// A size that is zero, not a multiple of 4096, too large, or a shrink.
    #[error("invalid volume size {size_bytes}: {reason}")]
    InvalidSize { size_bytes: u64, reason: String },
    /// A volume name outside `[A-Za-z0-9._-]{1,64}` (or starting with a dot).
    #[error(
        "invalid volume name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with '.')"
    )]
    InvalidName { name: String },
    /// A metadata or data file is truncated, garbage, or from an unsupported format.
    #[error("volume metadata {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    /// The I/O engine asked for cannot start.
    #[error("I/O engine {engine} cannot start: {source}")]
    Engine { engine: String, source: io::Error },
    /// Any other I/O failure while managing the volume; the message names the action
    /// ("open data file /x/y.img: ..."), the kind is the original one.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl EngineError {
    /// Wraps an I/O error with the action that failed ("open data file /x/y.img").
    pub fn io(action: impl std::fmt::Display, source: io::Error) -> EngineError {
        EngineError::Io(io::Error::new(source.kind(), format!("{action}: {source}")))
    }
}

impl From<BlockError> for EngineError {
    fn from(err: BlockError) -> EngineError {
        match err {
            BlockError::Io(source) => EngineError::io("volume I/O", source),
            other => EngineError::io("volume I/O", io::Error::other(other.to_string())),
        }
    }
}
