//! `stretch-nbd`: serves any [`stretch_engine::BlockDevice`] over NBD, and talks NBD as a client.
//!
//! The server ([`Server`]) speaks fixed-newstyle negotiation (INFO/GO, structured replies,
//! `base:allocation`) and pipelines requests per connection, completing them out of order with
//! bounded memory, following the NBD spec (NetworkBlockDevice/nbd `doc/proto.md`) and the
//! interoperability notes of QEMU, nbdkit and libnbd. [`client::Client`] is a small shareable
//! async client; [`mem::MemDevice`] an in-memory device for tests and benchmarks.
//!
//! Module map: `proto` (wire constants and headers), `handshake` (option negotiation),
//! `transmission` (the request pipeline and the BlockError → errno mapping), `server`
//! (listeners, admission, shutdown), `client`, `mem`.

pub mod client;
mod handshake;
pub mod mem;
pub mod proto;
mod server;
mod transmission;

pub use client::{BlockSizes, Client, ClientError, ClientOptions};
pub use mem::MemDevice;
pub use server::{Export, Server, ServerConfig};
pub use transmission::errno_for;
