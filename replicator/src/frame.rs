//! The replication frame: a fixed, self-checking, little-endian header followed by the raw
//! payload (DESIGN.md §4 "Frames").
//!
//! The shape follows TigerBeetle's message header: magic and version first, cluster, CG,
//! volume and accept epoch inside the checksummed header, reserved bytes for later versions,
//! and the header checksum last. [`Header::decode`] checks everything about the header before
//! a single payload byte is read, so a link driver can read the 128 header bytes, learn
//! `body_len_bytes`, and read the payload from the socket straight into an aligned buffer;
//! [`Header::check_body`] then checks the payload. Nothing here trusts its input: every
//! rejection is a typed [`FrameError`], counted by [`RejectCounters`], and never applied.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! off size field              off size field
//!   0   4  magic                48   8  seq
//!   4   2  version              56   8  lba
//!   6   1  kind                 64  16  stamp (big-endian inside; see stamp.rs)
//!   7   1  sender_site          80   4  body_crc32
//!   8   4  flags                84  40  reserved (zero)
//!  12   4  body_len_bytes      124   4  header_crc32 (over bytes 0..124)
//!  16   8  cluster_id
//!  24   8  cg_id
//!  32   8  volume_id
//!  40   4  accept_epoch
//!  44   4  blocks
//! ```

use stretch_engine::{Stamp, BLOCK_SIZE};

/// "STRF" read as a little-endian u32: the first bytes of every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"STRF");
/// Bumped on any incompatible change of the header or of a kind's meaning.
pub const VERSION: u16 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_BYTES: usize = 128;
/// The largest payload one frame may carry. It matches the largest request the engine
/// accepts, so one client write always fits one frame, and it bounds the buffer a receiver
/// must allocate before it has checked the body.
pub const BODY_BYTES_MAX: u32 = stretch_engine::REQUEST_BYTES_MAX;

/// `flags` of a Write, Trim or WriteZeroes: the receiver makes the mutation durable before
/// it acknowledges it (NBD FUA).
pub const FLAG_FUA: u32 = 1 << 0;
/// `flags` of a ResyncBlock: the sender's own copy of the block is untrusted too (both sites
/// restarted from a crash before settling it), so the receiver merges it by the apply rule
/// instead of taking it unconditionally (see `core::replica`, "Settling after a crash").
pub const FLAG_UNTRUSTED: u32 = 1 << 1;
/// `flags` of a Write, Trim or WriteZeroes: the origin runs `sync-received` (DESIGN.md §5),
/// so the receiver may acknowledge it as received (`FLAG_RECEIVED`) before it applies it.
pub const FLAG_ACK_ON_RECEIVE: u32 = 1 << 2;
/// `flags` of a WriteAck: the mutation was received and is visible to reads there, but not
/// yet applied; a plain WriteAck follows once it is.
pub const FLAG_RECEIVED: u32 = 1 << 3;
/// `flags` of a ModeSwitchAck: the peer refused the switch (it still writes); the leader
/// tries again later.
pub const FLAG_REFUSED: u32 = 1 << 4;
/// `flags` of a RepairBlock: the sender cannot repair this block (its own copy fails its
/// checksum, is not settled, or the sender is not in sync); the body is empty. The requester
/// fails what waits on the block at once instead of timing out (see `core::repair`).
pub const FLAG_UNREADABLE: u32 = 1 << 5;
/// `flags` of a ResyncRequest sent by the survivor to a catching-up loser: the body lists
/// blocks the survivor will copy (its copy plan, chunked like a request); the loser counts
/// them stale until their copies land (see `core::replica`, "Reads while catching up").
pub const FLAG_PLAN: u32 = 1 << 6;
/// `flags` of a ResyncRequest sent by a catching-up loser: a read waits for these blocks,
/// copy them first. Not part of the loser's dirty list (no chunk counting).
pub const FLAG_PRIORITY: u32 = 1 << 7;
/// `flags` of a HeartbeatEcho from a survivor to a catching-up loser: the echo grants a read
/// lease, and the survivor will not acknowledge alone until it surely lapsed.
pub const FLAG_LEASE: u32 = 1 << 8;

/// The LBAs of a ResyncRequest's or RepairRequest's body: little-endian u64s (the header
/// check has made sure the body is a whole number of them).
pub fn body_lbas(body: &[u8]) -> impl Iterator<Item = u64> + '_ {
    body.chunks_exact(8).map(|raw| {
        let mut b = [0u8; 8];
        b.copy_from_slice(raw);
        u64::from_le_bytes(b)
    })
}

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_KIND: usize = 6;
const OFF_SENDER: usize = 7;
const OFF_FLAGS: usize = 8;
const OFF_BODY_LEN: usize = 12;
const OFF_CLUSTER: usize = 16;
const OFF_CG: usize = 24;
const OFF_VOLUME: usize = 32;
const OFF_EPOCH: usize = 40;
const OFF_BLOCKS: usize = 44;
const OFF_SEQ: usize = 48;
const OFF_LBA: usize = 56;
const OFF_STAMP: usize = 64;
const OFF_BODY_CRC: usize = 80;
const OFF_RESERVED: usize = 84;
const RESERVED_BYTES: usize = 40;
const OFF_HEADER_CRC: usize = 124;

// The layout above must tile the header exactly; a field added without moving the others
// fails the build instead of silently overlapping.
const _: () = assert!(OFF_STAMP + Stamp::LEN == OFF_BODY_CRC);
const _: () = assert!(OFF_RESERVED + RESERVED_BYTES == OFF_HEADER_CRC);
const _: () = assert!(OFF_HEADER_CRC + 4 == HEADER_BYTES);
const _: () = assert!(HEADER_BYTES % 8 == 0);
// A body must be able to hold one whole request of blocks.
const _: () = assert!(BODY_BYTES_MAX % BLOCK_SIZE == 0);

/// What a frame means. The numeric values are the wire encoding and never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A client WRITE: `blocks` whole blocks of data at `lba`, body = the data.
    Write = 1,
    /// The receiver applied (or superseded by a newer stamp) the write `seq` with `stamp`:
    /// it is visible to every later read there.
    WriteAck = 2,
    /// The receiver made the write `seq` durable (sync-received policy, DESIGN.md §5).
    DurableAck = 3,
    /// Liveness and RTT probe; `seq` is echoed back.
    Heartbeat = 4,
    /// The echo of heartbeat `seq`.
    HeartbeatEcho = 5,
    /// A catching-up site asks for the listed blocks; body = little-endian u64 LBAs.
    ResyncRequest = 6,
    /// One block copied by resync: `lba`, `stamp`, body = the data (empty for a tombstone).
    ResyncBlock = 7,
    /// A TRIM of `blocks` blocks at `lba`; no body. The stamp stays as a tombstone.
    Trim = 8,
    /// A WRITE_ZEROES of `blocks` blocks at `lba`; no body.
    WriteZeroes = 9,
    /// Marks a client FLUSH in the stream (used by the async and sync-received policies).
    FlushMarker = 10,
    /// The receiver refused the write `seq` because it is fenced (DESIGN.md §4 "Fencing").
    WriteNack = 11,
    /// The receiver applied the resync copy of `lba` with `stamp`.
    ResyncAck = 12,
    /// A control-plane message between the sites (the witness's lease heartbeats and
    /// echoes, DESIGN.md §6): an opaque body of at most [`CONTROL_BODY_BYTES_MAX`] bytes.
    /// It travels the replication link on purpose — a lease must lapse exactly when that
    /// link stops carrying writes — but the link hands it to the control plane, never to the
    /// replica.
    Control = 13,
    /// The leading site switches the ack mode at `seq` of its stream (DESIGN.md §5: "agreed
    /// in-band"); `lba` carries the mode (`core::Mode::encode`). No body.
    ModeSwitch = 14,
    /// The answer to ModeSwitch `seq`: in force here from now on, unless `FLAG_REFUSED`.
    ModeSwitchAck = 15,
    /// A site asks its in-sync peer for its version of blocks that fail their checksum here
    /// (read repair, `verify --repair`); body = little-endian u64 LBAs. Not a resync request:
    /// it changes no resync state at either end (see `core::repair`).
    RepairRequest = 16,
    /// The answer to a RepairRequest for one block: `lba`, `stamp`, body = the data (empty
    /// for zeroes), or no data and [`FLAG_UNREADABLE`] when the sender cannot repair it.
    RepairBlock = 17,
}

/// The largest body of a [`Kind::Control`] frame.
pub const CONTROL_BODY_BYTES_MAX: u32 = 64 * 1024;

impl Kind {
    /// Every kind, for tests and exhaustive tables.
    pub const ALL: [Kind; 17] = [
        Kind::Write,
        Kind::WriteAck,
        Kind::DurableAck,
        Kind::Heartbeat,
        Kind::HeartbeatEcho,
        Kind::ResyncRequest,
        Kind::ResyncBlock,
        Kind::Trim,
        Kind::WriteZeroes,
        Kind::FlushMarker,
        Kind::WriteNack,
        Kind::ResyncAck,
        Kind::Control,
        Kind::ModeSwitch,
        Kind::ModeSwitchAck,
        Kind::RepairRequest,
        Kind::RepairBlock,
    ];

    fn from_wire(byte: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == byte)
    }

    /// Whether the body of this kind is whole blocks (`body_len_bytes == blocks * 4096`),
    /// may be a list (`ResyncRequest`), or must be empty.
    fn body_rule(self) -> BodyRule {
        match self {
            Kind::Write => BodyRule::Blocks,
            // A resync copy of a tombstone carries no data; of a written block, one block.
            Kind::ResyncBlock | Kind::RepairBlock => BodyRule::BlocksOrEmpty,
            Kind::ResyncRequest | Kind::RepairRequest => BodyRule::LbaList,
            Kind::Control => BodyRule::Opaque,
            _ => BodyRule::Empty,
        }
    }
}

enum BodyRule {
    Blocks,
    BlocksOrEmpty,
    LbaList,
    /// Any bytes up to [`CONTROL_BODY_BYTES_MAX`].
    Opaque,
    Empty,
}

/// Why a frame was rejected. Each variant is counted separately ([`RejectCounters`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than a header or than header + body; not an error on a stream (read
    /// more), but a rejection for a datagram-like buffer that should hold a whole frame.
    #[error("truncated frame: {needed_bytes} bytes needed, {available_bytes} available")]
    Truncated {
        needed_bytes: usize,
        available_bytes: usize,
    },
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported frame version {0}")]
    BadVersion(u16),
    #[error("header checksum mismatch")]
    BadHeaderChecksum,
    #[error("body checksum mismatch")]
    BadBodyChecksum,
    #[error("frame from cluster {got:#x}, expected {expected:#x}")]
    WrongCluster { got: u64, expected: u64 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("body of {body_len_bytes} bytes exceeds the limit of {max_bytes}")]
    TooLong { body_len_bytes: u32, max_bytes: u32 },
    /// The body length does not fit the kind (e.g. a Write whose body is not `blocks` blocks).
    #[error("{kind:?} frame with {blocks} blocks has a body of {body_len_bytes} bytes")]
    BadLength {
        kind: Kind,
        blocks: u32,
        body_len_bytes: u32,
    },
    /// Reserved bytes must be zero in this version; non-zero means a newer or broken sender.
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
}

/// The decoded, checked header. Fields are plain values; `encode` recomputes both checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// The site that sent this frame (0 or 1); needed to fence by origin.
    pub sender_site: u8,
    pub flags: u32,
    pub body_len_bytes: u32,
    pub cluster_id: u64,
    pub cg_id: u64,
    pub volume_id: u64,
    /// The epoch in which the origin accepted the write; set at accept time, never refreshed.
    pub accept_epoch: u32,
    /// Number of blocks a mutation covers (Write, Trim, WriteZeroes, ResyncBlock).
    pub blocks: u32,
    pub seq: u64,
    pub lba: u64,
    pub stamp: Stamp,
    pub body_crc32: u32,
}

impl Header {
    /// A header of `kind` with every other field zero; callers fill what the kind uses.
    pub fn new(kind: Kind) -> Header {
        Header {
            kind,
            sender_site: 0,
            flags: 0,
            body_len_bytes: 0,
            cluster_id: 0,
            cg_id: 0,
            volume_id: 0,
            accept_epoch: 0,
            blocks: 0,
            seq: 0,
            lba: 0,
            stamp: Stamp::ZERO,
            body_crc32: 0,
        }
    }

    /// Writes the header, computing the header checksum. `body_len_bytes` and `body_crc32`
    /// must already describe the body (see [`Frame::encode`]).
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&MAGIC.to_le_bytes());
        b[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&VERSION.to_le_bytes());
        b[OFF_KIND] = self.kind as u8;
        b[OFF_SENDER] = self.sender_site;
        b[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&self.flags.to_le_bytes());
        b[OFF_BODY_LEN..OFF_BODY_LEN + 4].copy_from_slice(&self.body_len_bytes.to_le_bytes());
        b[OFF_CLUSTER..OFF_CLUSTER + 8].copy_from_slice(&self.cluster_id.to_le_bytes());
        b[OFF_CG..OFF_CG + 8].copy_from_slice(&self.cg_id.to_le_bytes());
        b[OFF_VOLUME..OFF_VOLUME + 8].copy_from_slice(&self.volume_id.to_le_bytes());
        b[OFF_EPOCH..OFF_EPOCH + 4].copy_from_slice(&self.accept_epoch.to_le_bytes());
        b[OFF_BLOCKS..OFF_BLOCKS + 4].copy_from_slice(&self.blocks.to_le_bytes());
        b[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&self.seq.to_le_bytes());
        b[OFF_LBA..OFF_LBA + 8].copy_from_slice(&self.lba.to_le_bytes());
        b[OFF_STAMP..OFF_STAMP + Stamp::LEN].copy_from_slice(&self.stamp.0);
        b[OFF_BODY_CRC..OFF_BODY_CRC + 4].copy_from_slice(&self.body_crc32.to_le_bytes());
        let crc = crc32fast::hash(&b[..OFF_HEADER_CRC]);
        b[OFF_HEADER_CRC..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Checks and decodes a header; reads no body byte. Order matters: magic and version
    /// first (a different version may lay out the checksum differently), then the header
    /// checksum (so no field below is trusted before it), then the fields' meaning.
    pub fn decode(b: &[u8; HEADER_BYTES], expected_cluster_id: u64) -> Result<Header, FrameError> {
        let magic = le_u32(b, OFF_MAGIC);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[OFF_VERSION], b[OFF_VERSION + 1]]);
        if version != VERSION {
            return Err(FrameError::BadVersion(version));
        }
        if crc32fast::hash(&b[..OFF_HEADER_CRC]) != le_u32(b, OFF_HEADER_CRC) {
            return Err(FrameError::BadHeaderChecksum);
        }
        let kind = Kind::from_wire(b[OFF_KIND]).ok_or(FrameError::UnknownKind(b[OFF_KIND]))?;
        if b[OFF_RESERVED..OFF_RESERVED + RESERVED_BYTES]
            .iter()
            .any(|&x| x != 0)
        {
            return Err(FrameError::ReservedNotZero);
        }
        let cluster_id = le_u64(b, OFF_CLUSTER);
        if cluster_id != expected_cluster_id {
            return Err(FrameError::WrongCluster {
                got: cluster_id,
                expected: expected_cluster_id,
            });
        }
        let body_len_bytes = le_u32(b, OFF_BODY_LEN);
        if body_len_bytes > BODY_BYTES_MAX {
            return Err(FrameError::TooLong {
                body_len_bytes,
                max_bytes: BODY_BYTES_MAX,
            });
        }
        let blocks = le_u32(b, OFF_BLOCKS);
        let block_body = u64::from(blocks) * u64::from(BLOCK_SIZE) == u64::from(body_len_bytes);
        let fits = match kind.body_rule() {
            BodyRule::Blocks => blocks > 0 && block_body,
            BodyRule::BlocksOrEmpty => blocks == 1 && (block_body || body_len_bytes == 0),
            BodyRule::LbaList => body_len_bytes % 8 == 0,
            BodyRule::Opaque => body_len_bytes <= CONTROL_BODY_BYTES_MAX,
            BodyRule::Empty => body_len_bytes == 0,
        };
        if !fits {
            return Err(FrameError::BadLength {
                kind,
                blocks,
                body_len_bytes,
            });
        }
        let mut stamp = [0u8; Stamp::LEN];
        stamp.copy_from_slice(&b[OFF_STAMP..OFF_STAMP + Stamp::LEN]);
        Ok(Header {
            kind,
            sender_site: b[OFF_SENDER],
            flags: le_u32(b, OFF_FLAGS),
            body_len_bytes,
            cluster_id,
            cg_id: le_u64(b, OFF_CG),
            volume_id: le_u64(b, OFF_VOLUME),
            accept_epoch: le_u32(b, OFF_EPOCH),
            blocks,
            seq: le_u64(b, OFF_SEQ),
            lba: le_u64(b, OFF_LBA),
            stamp: Stamp(stamp),
            body_crc32: le_u32(b, OFF_BODY_CRC),
        })
    }

    /// Checks a body read after this header: its length and its checksum.
    pub fn check_body(&self, body: &[u8]) -> Result<(), FrameError> {
        if body.len() != self.body_len_bytes as usize {
            return Err(FrameError::Truncated {
                needed_bytes: self.body_len_bytes as usize,
                available_bytes: body.len(),
            });
        }
        if crc32fast::hash(body) != self.body_crc32 {
            return Err(FrameError::BadBodyChecksum);
        }
        Ok(())
    }
}

fn le_u32(b: &[u8; HEADER_BYTES], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn le_u64(b: &[u8; HEADER_BYTES], off: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(x)
}

/// A header with its body, as the sans-IO core and the simulator pass it around. The link
/// driver will keep the body in an `AlignedBuf` instead; the checks are the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Vec<u8>,
}

impl Frame {
    /// A frame of `header` carrying `body`; fixes up `body_len_bytes` and `body_crc32`.
    pub fn new(mut header: Header, body: Vec<u8>) -> Frame {
        debug_assert!(body.len() <= BODY_BYTES_MAX as usize);
        header.body_len_bytes = body.len() as u32;
        header.body_crc32 = crc32fast::hash(&body);
        Frame { header, body }
    }

    /// Header bytes followed by the body.
    pub fn encode(&self) -> Vec<u8> {
        debug_assert_eq!(self.header.body_len_bytes as usize, self.body.len());
        let mut out = Vec::with_capacity(HEADER_BYTES + self.body.len());
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes one frame from the front of `buf`, returning it and the bytes it used. The
    /// header is fully checked before the body length is trusted.
    pub fn decode(buf: &[u8], expected_cluster_id: u64) -> Result<(Frame, usize), FrameError> {
        let Some(head) = buf.first_chunk::<HEADER_BYTES>() else {
            return Err(FrameError::Truncated {
                needed_bytes: HEADER_BYTES,
                available_bytes: buf.len(),
            });
        };
        let header = Header::decode(head, expected_cluster_id)?;
        let total = HEADER_BYTES + header.body_len_bytes as usize;
        let Some(body) = buf.get(HEADER_BYTES..total) else {
            return Err(FrameError::Truncated {
                needed_bytes: total,
                available_bytes: buf.len(),
            });
        };
        header.check_body(body)?;
        Ok((
            Frame {
                header,
                body: body.to_vec(),
            },
            total,
        ))
    }

    /// Bytes this frame occupies on the wire; what in-flight windows count.
    pub fn wire_bytes(&self) -> usize {
        HEADER_BYTES + self.body.len()
    }
}

/// Counts of rejected frames by reason: rejected frames are counted, never applied
/// (DESIGN.md §7 invariant 7), and these counters become metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectCounters {
    pub truncated: u64,
    pub bad_magic: u64,
    pub bad_version: u64,
    pub bad_header_checksum: u64,
    pub bad_body_checksum: u64,
    pub wrong_cluster: u64,
    pub unknown_kind: u64,
    pub too_long: u64,
    pub bad_length: u64,
    pub reserved_not_zero: u64,
}

impl RejectCounters {
    pub fn record(&mut self, error: &FrameError) {
        let counter = match error {
            FrameError::Truncated { .. } => &mut self.truncated,
            FrameError::BadMagic(_) => &mut self.bad_magic,
            FrameError::BadVersion(_) => &mut self.bad_version,
            FrameError::BadHeaderChecksum => &mut self.bad_header_checksum,
            FrameError::BadBodyChecksum => &mut self.bad_body_checksum,
            FrameError::WrongCluster { .. } => &mut self.wrong_cluster,
            FrameError::UnknownKind(_) => &mut self.unknown_kind,
            FrameError::TooLong { .. } => &mut self.too_long,
            FrameError::BadLength { .. } => &mut self.bad_length,
            FrameError::ReservedNotZero => &mut self.reserved_not_zero,
        };
        *counter += 1;
    }

    pub fn total(&self) -> u64 {
        self.truncated
            + self.bad_magic
            + self.bad_version
            + self.bad_header_checksum
            + self.bad_body_checksum
            + self.wrong_cluster
            + self.unknown_kind
            + self.too_long
            + self.bad_length
            + self.reserved_not_zero
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CLUSTER: u64 = 0xC1_05_7E_12;

    fn write_frame(blocks: u32, fill: u8) -> Frame {
        let mut h = Header::new(Kind::Write);
        h.cluster_id = CLUSTER;
        h.cg_id = 7;
        h.volume_id = 9;
        h.accept_epoch = 3;
        h.blocks = blocks;
        h.seq = 42;
        h.lba = 1000;
        h.stamp = Stamp([0xAB; 16]);
        Frame::new(h, vec![fill; (blocks * BLOCK_SIZE) as usize])
    }

    fn arb_kind() -> impl Strategy<Value = Kind> {
        (0..Kind::ALL.len()).prop_map(|i| Kind::ALL[i])
    }

    proptest! {
        // DESIGN.md §4 "Frames": what goes on the wire comes back identical.
        #[test]
        fn round_trip(
            kind in arb_kind(), sender in 0u8..2, flags: u32, cg: u64, vol: u64, epoch: u32,
            seq: u64, lba: u64, stamp: [u8; 16], nblocks in 1u32..3, n_lbas in 0usize..5,
            fill: u8, with_body: bool,
        ) {
            let mut h = Header::new(kind);
            h.sender_site = sender;
            h.flags = flags;
            h.cluster_id = CLUSTER;
            h.cg_id = cg;
            h.volume_id = vol;
            h.accept_epoch = epoch;
            h.seq = seq;
            h.lba = lba;
            h.stamp = Stamp(stamp);
            let body = match kind {
                Kind::Write => { h.blocks = nblocks; vec![fill; (nblocks * BLOCK_SIZE) as usize] }
                Kind::ResyncBlock | Kind::RepairBlock => {
                    h.blocks = 1;
                    if with_body { vec![fill; BLOCK_SIZE as usize] } else { Vec::new() }
                }
                Kind::ResyncRequest | Kind::RepairRequest => (0..n_lbas as u64).flat_map(|x| x.to_le_bytes()).collect(),
                _ => { h.blocks = nblocks; Vec::new() }
            };
            let frame = Frame::new(h, body);
            let bytes = frame.encode();
            let (back, used) = Frame::decode(&bytes, CLUSTER).expect("valid frame decodes");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, frame);
        }

        // DESIGN.md §7 invariant 7: garbage never decodes into a frame.
        #[test]
        fn garbage_is_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert!(Frame::decode(&bytes, CLUSTER).is_err());
        }
    }

    // DESIGN.md §4: the header is self-checking; any single flipped bit is caught before
    // the frame is trusted.
    #[test]
    fn every_single_bit_flip_of_the_header_is_rejected() {
        let frame = write_frame(1, 0x5A);
        let bytes = frame.encode();
        for bit in 0..HEADER_BYTES * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let result = Frame::decode(&damaged, CLUSTER);
            assert!(result.is_err(), "bit {bit} flipped and still decoded");
        }
    }

    // A control frame carries an opaque body, but a bounded one: a peer cannot make the
    // link buffer a 32 MiB "heartbeat".
    #[test]
    fn control_body_is_bounded() {
        let mut h = Header::new(Kind::Control);
        h.cluster_id = CLUSTER;
        let ok = Frame::new(h, vec![7; CONTROL_BODY_BYTES_MAX as usize]).encode();
        assert!(Frame::decode(&ok, CLUSTER).is_ok());
        let big = Frame::new(h, vec![7; CONTROL_BODY_BYTES_MAX as usize + 1]).encode();
        assert!(matches!(
            Frame::decode(&big, CLUSTER),
            Err(FrameError::BadLength {
                kind: Kind::Control,
                ..
            })
        ));
    }

    #[test]
    fn body_bit_flip_is_rejected_as_body_checksum() {
        let bytes = write_frame(2, 0x11).encode();
        for byte in [HEADER_BYTES, HEADER_BYTES + 4095, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[byte] ^= 0x80;
            assert_eq!(
                Frame::decode(&damaged, CLUSTER),
                Err(FrameError::BadBodyChecksum)
            );
        }
    }

    #[test]
    fn truncated_input_is_rejected_at_every_length() {
        let bytes = write_frame(1, 0x33).encode();
        for len in 0..bytes.len() {
            match Frame::decode(&bytes[..len], CLUSTER) {
                Err(FrameError::Truncated {
                    needed_bytes,
                    available_bytes,
                }) => {
                    assert_eq!(available_bytes, len);
                    assert!(needed_bytes > len);
                }
                other => panic!("length {len}: expected Truncated, got {other:?}"),
            }
        }
    }

    // DESIGN.md §7 invariant 7: wrong-cluster and wrong-version frames are rejected.
    #[test]
    fn wrong_cluster_and_version_are_rejected() {
        let bytes = write_frame(1, 0).encode();
        assert_eq!(
            Frame::decode(&bytes, CLUSTER + 1),
            Err(FrameError::WrongCluster {
                got: CLUSTER,
                expected: CLUSTER + 1
            })
        );
        let mut v2 = bytes.clone();
        v2[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(Frame::decode(&v2, CLUSTER), Err(FrameError::BadVersion(2)));
    }

    /// Re-signs a header after a deliberate field change, so the semantic checks behind the
    /// checksum are reached.
    fn resign(bytes: &mut [u8]) {
        let crc = crc32fast::hash(&bytes[..OFF_HEADER_CRC]);
        bytes[OFF_HEADER_CRC..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn semantic_header_checks_behind_a_valid_checksum() {
        let good = write_frame(1, 0).encode();

        let mut kind = good.clone();
        kind[OFF_KIND] = 200;
        resign(&mut kind);
        assert_eq!(
            Frame::decode(&kind, CLUSTER),
            Err(FrameError::UnknownKind(200))
        );

        let mut long = good.clone();
        long[OFF_BODY_LEN..OFF_BODY_LEN + 4].copy_from_slice(&(BODY_BYTES_MAX + 1).to_le_bytes());
        resign(&mut long);
        assert!(matches!(
            Frame::decode(&long, CLUSTER),
            Err(FrameError::TooLong { .. })
        ));

        let mut mismatch = good.clone();
        mismatch[OFF_BLOCKS..OFF_BLOCKS + 4].copy_from_slice(&2u32.to_le_bytes());
        resign(&mut mismatch);
        assert!(matches!(
            Frame::decode(&mismatch, CLUSTER),
            Err(FrameError::BadLength { .. })
        ));

        let mut reserved = good.clone();
        reserved[OFF_RESERVED + 3] = 1;
        resign(&mut reserved);
        assert_eq!(
            Frame::decode(&reserved, CLUSTER),
            Err(FrameError::ReservedNotZero)
        );
    }

    #[test]
    fn rejections_are_counted_by_reason() {
        let mut counters = RejectCounters::default();
        let bytes = write_frame(1, 0).encode();
        for input in [&bytes[..10], &[0u8; 200][..]] {
            if let Err(e) = Frame::decode(input, CLUSTER) {
                counters.record(&e);
            }
        }
        if let Err(e) = Frame::decode(&bytes, CLUSTER + 1) {
            counters.record(&e);
        }
        assert_eq!(counters.truncated, 1);
        assert_eq!(counters.bad_magic, 1);
        assert_eq!(counters.wrong_cluster, 1);
        assert_eq!(counters.total(), 3);
    }

    #[test]
    fn header_is_checked_before_any_body_byte() {
        // A valid header followed by no body at all: decode must report exactly how many
        // bytes the body needs, which is what lets a driver read it into an aligned buffer.
        let frame = write_frame(3, 1);
        let bytes = frame.encode();
        assert_eq!(
            Frame::decode(&bytes[..HEADER_BYTES], CLUSTER),
            Err(FrameError::Truncated {
                needed_bytes: HEADER_BYTES + 3 * BLOCK_SIZE as usize,
                available_bytes: HEADER_BYTES
            })
        );
        let head: &[u8; HEADER_BYTES] = bytes.first_chunk().expect("header present");
        assert_eq!(Header::decode(head, CLUSTER), Ok(frame.header));
    }
}
