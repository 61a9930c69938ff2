//! `stretch-engine`: local volumes at one site.
//!
//! This crate owns the contract every other crate builds on: [`BlockDevice`] (what the NBD
//! server serves and what the replicator wraps), [`AlignedBuf`] (the owned, 4096-aligned buffer
//! that carries block data end to end so io_uring and O_DIRECT never see a borrowed buffer),
//! [`BlockError`] and [`Stamp`] (the opaque, ordered mutation stamp the replicator assigns).

mod buf;
mod device;
mod error;
mod stamp;

pub use buf::AlignedBuf;
pub use device::{BlockDevice, Extent, ZeroFlags};
pub use error::BlockError;
pub use stamp::Stamp;

/// Every volume is an array of blocks of this size; mutations must be whole blocks.
pub const BLOCK_SIZE: u32 = 4096;

/// The largest single request the engine accepts (matches the NBD max block size we advertise).
pub const REQUEST_BYTES_MAX: u32 = 32 * 1024 * 1024;
