//! `stretch-witness`: the control plane of Stretch (DESIGN §6).
//!
//! The safety argument lives in sans-IO code that tests drive without sockets or clocks:
//! - [`map`]: the cluster map, the deterministic state machine behind the Raft log;
//! - [`lease`]: the read/serve lease a site holds from its peer, with injected time;
//! - [`arbiter`]: one site's decisions after losing its peer (stop granting, propose a detach,
//!   stop serving, fail I/O when detached);
//! - [`sim`]: a seeded simulation of two sites and a witness that checks DESIGN §7 invariant 3.
//!
//! Around them, with I/O: [`raft`], the openraft group {A, B, W} with a file-backed log and
//! vote store, the map as its state machine, and TCP networking.

pub mod arbiter;
pub mod lease;
pub mod map;
pub mod preference;
pub mod raft;
pub mod sim;
