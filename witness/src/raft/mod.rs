//! The Raft group {A, B, W} (DESIGN §6) on openraft 0.9: a file-backed log and vote store,
//! the cluster map as the state machine, and TCP networking with deadlines.
//!
//! Node ids are derived from the group's generation: `generation << 8 | member`, member A = 1,
//! B = 2, W = 3, so generation 0 is A = 1, B = 2, W = 3. `force-survivor` starts a new
//! generation (generation.rs): a one-voter group under a new id, which the others rejoin under
//! new ids too, so an id is never reused. Every RPC carries its sender's generation and a node
//! refuses RPCs of another generation, so the abandoned group's messages are never merged into
//! the new one.

pub mod generation;
pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;

use std::io::Cursor;

use crate::map::{ApplyResult, Command};

openraft::declare_raft_types!(
    /// The witness group's openraft types: map commands in, typed apply results out.
    pub TypeConfig:
        D = Command,
        R = ApplyResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub use openraft::BasicNode;

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;

/// The ids of the three voters in generation 0.
pub const NODE_A: NodeId = 1;
pub const NODE_B: NodeId = 2;
pub const NODE_W: NodeId = 3;

/// One of the three members of the group, whatever its generation's node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Member {
    A,
    B,
    W,
}

impl Member {
    fn low_bits(self) -> NodeId {
        match self {
            Member::A => NODE_A,
            Member::B => NODE_B,
            Member::W => NODE_W,
        }
    }

    /// The member a node id names, in any generation.
    pub fn of(id: NodeId) -> Option<Member> {
        match id & 0xff {
            NODE_A => Some(Member::A),
            NODE_B => Some(Member::B),
            NODE_W => Some(Member::W),
            _ => None,
        }
    }
}

/// Largest generation: the replicator's accept epoch keeps 8 bits for it (design.md,
/// Departures), and node ids keep 56.
pub const GENERATION_MAX: u64 = 255;

/// The node id of `member` in `generation`: never the id of any member in another one.
pub fn node_id(generation: u64, member: Member) -> NodeId {
    (generation << 8) | member.low_bits()
}

/// The generation a node id belongs to.
pub fn generation_of(id: NodeId) -> u64 {
    id >> 8
}

/// Largest frame (a log record, an RPC) read from disk or the network. Map commands are small;
/// a snapshot of `CGS_MAX` CGs stays well under it.
pub const FRAME_BYTES_MAX: usize = 16 << 20;

/// Frames a postcard payload as `len: u32 LE | crc32: u32 LE | payload`. Refuses a payload
/// over `FRAME_BYTES_MAX`: written, it could never be read back.
pub(crate) fn frame(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let len = match u32::try_from(payload.len()) {
        Ok(len) if payload.len() <= FRAME_BYTES_MAX => len,
        _ => {
            return Err(std::io::Error::other(FrameError::TooLong {
                len: payload.len(),
            }))
        }
    };
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Parses one frame at the start of `buf`: `Ok(Some((payload, consumed)))`, `Ok(None)` if `buf`
/// ends inside the frame (a torn tail), `Err` if the frame is corrupt or oversized.
pub(crate) fn unframe(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(header) = buf.get(..8) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLong { len });
    }
    let Some(payload) = buf.get(8..8 + len) else {
        return Ok(None);
    };
    if crc32fast::hash(payload) != crc {
        return Err(FrameError::Checksum);
    }
    Ok(Some((payload, 8 + len)))
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit")]
    TooLong { len: usize },
    #[error("frame checksum mismatch")]
    Checksum,
}
