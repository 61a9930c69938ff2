//! `stretch-replicator`: site-to-site replication for Stretch (DESIGN.md §4, §5).
//!
//! This first stage holds the parts that need no sockets or disks:
//! - [`frame`]: the self-checking wire frame (header + raw payload);
//! - [`stamp`]: the mutation stamp `(accept_epoch, hlc, origin_site)` and the hybrid logical
//!   clock that issues it;
//! - [`core`]: the sans-IO replication state machine (events in, actions out);
//! - [`sim`]: a seeded, deterministic two-site simulator that drives the core through
//!   network faults, clock skew, crashes and detaches, and checks the invariants of §7.
//!
//! And the parts that run the core in the daemon:
//! - [`store`]: the core's `BlockStore` over an engine `Volume`;
//! - [`driver`]: the replica thread (group commit, bounded queues, fail-stop on disk errors);
//! - [`link`]: the TCP link to the peer (sessions, reconnects, frame checks);
//! - [`device`]: `ReplicatedVolume`, the `BlockDevice` the NBD server serves.

pub mod core;
pub mod device;
pub mod driver;
pub mod frame;
pub mod link;
pub mod shadow;
pub mod sim;
pub mod stamp;
pub mod store;

pub use device::{GateAnswer, ReplicatedOptions, ReplicatedVolume, ServeGate};
