//! `stretch-engine`: local volumes at one site.
//!
//! This crate owns the contract every other crate builds on: [`BlockDevice`] (what the NBD
//! server serves and what the replicator wraps), [`AlignedBuf`] (the owned, 4096-aligned buffer
//! that carries block data end to end so io_uring and O_DIRECT never see a borrowed buffer),
//! [`BlockError`] and [`Stamp`] (the opaque, ordered mutation stamp the replicator assigns).
//!
//! It also implements them: [`Volume`] is a checksummed, crash-consistent local volume on one
//! of three I/O engines ([`io`]): io_uring, a pread/pwrite fallback, and a simulator that
//! injects faults and crashes for tests.

mod buf;
mod device;
mod dirty;
mod error;
pub mod io;
mod lock;
pub mod meta;
mod stamp;
mod volume;

pub use buf::AlignedBuf;
pub use device::{check_aligned, check_range, check_read_len, BlockDevice, Extent, ZeroFlags};
pub use error::{BlockError, EngineError};
pub use io::IoEngineKind;
pub use stamp::Stamp;
pub use volume::{
    delete_volume, delete_volume_with, list_volumes, list_volumes_with, ApplyMode, ApplyOutcome,
    Volume, VolumeConfig, VolumeInfo, DIRTY_REGION_BLOCKS, VOLUME_BYTES_MAX, ZERO_BYTES_MAX,
};

/// Every volume is an array of blocks of this size; mutations must be whole blocks.
pub const BLOCK_SIZE: u32 = 4096;

/// The largest single request the engine accepts (matches the NBD max block size we advertise).
pub const REQUEST_BYTES_MAX: u32 = 32 * 1024 * 1024;
