//! The sans-IO replication core (DESIGN.md §4, §5 `sync`): one site's replication state for
//! one volume of a consistency group, as a state machine that takes [`Event`]s and returns
//! [`Action`]s, in the manner of openraft's engine. It never reads a clock, opens a socket or
//! touches a disk by itself: time comes in with every step, frames go out as actions, and
//! block I/O goes through the injected [`BlockStore`].

mod policy;
mod replica;
mod store;

pub use policy::{AckPolicy, Mode, Policy};
pub use replica::{Counters, Replica};
pub use store::{BlockStore, Content};

use stretch_engine::Stamp;

use crate::frame::Frame;
use crate::stamp::SiteId;

/// Identifies one client request, chosen by the caller (the NBD handle in the real daemon).
pub type ClientOpId = u64;

/// This site's standing in its consistency group, from the committed cluster map (§6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Both sites in sync: writes are acknowledged once applied at both.
    InSync,
    /// The peer was detached; this site serves alone and tracks what the peer lacks.
    Survivor,
    /// This site was detached: it serves nothing until resync and rejoin.
    Loser,
}

/// The cluster-map facts a replica needs, given at start and changed by detach and rejoin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapView {
    pub role: Role,
    pub epoch: u32,
    /// Per site: writes that site accepted in an epoch below this are fenced (§4).
    pub fenced_before: [u32; 2],
}

/// Deliberate bugs for checking the checker: the simulator must catch each of them. Never
/// set outside tests (`Fault::None` is the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// Apply received writes without comparing stamps (breaks the apply rule, §4).
    ApplyWithoutStampCompare,
    /// The loser keeps its divergent blocks and resync applies by stamp (breaks "the
    /// survivor's version wins unconditionally", §4 "Resync").
    ResyncByStamp,
    /// Receivers do not fence: a write accepted before a detach is applied when it
    /// arrives after it (breaks §4 "Fencing").
    NoFencing,
    /// Reads at the origin do not wait for the origin's writes still waiting for the peer
    /// (breaks §4 "Reads").
    ReadsDontWait,
    /// A restarted site trusts the blocks of its activity log instead of settling them from
    /// the peer (breaks §4 "After a crash, stamps of blocks in the activity log are untrusted
    /// and are settled from the peer"): a write lost by the crash stays lost.
    NoSettle,
    /// `sync-received`: a receiver acknowledges receipt without making the write visible
    /// to its reads (no dirty mark until the apply), so a read there after the origin's ack
    /// can return older data (breaks §5 "received by the peer, where it is visible to
    /// reads", invariant 4).
    ReceivedNotVisible,
    /// Reads serve a block that fails its checksum instead of repairing it or failing with
    /// EIO (breaks §7 invariant 6).
    ServeUnreadable,
    /// Repair asks, and answers, a peer that is not in sync at the current epoch (breaks
    /// §4 "Repair ... takes data only from a peer in-sync at the current epoch").
    RepairFromAnyPeer,
    /// The survivor acknowledges alone as soon as a catching-up peer stops being a sync
    /// target, without waiting for the read lease it granted to lapse: the peer may then
    /// serve a read older than an acknowledged write (breaks §4 "Resync", invariant 4).
    AloneDuringReadLease,
}

/// Static configuration of one replica.
#[derive(Clone, Debug)]
pub struct Config {
    pub site: SiteId,
    pub cluster_id: u64,
    pub cg_id: u64,
    pub volume_id: u64,
    /// Bytes of write frames (header + body) sent and not yet acknowledged.
    pub window_bytes_max: usize,
    /// Writes sent and not yet acknowledged.
    pub writes_in_flight_max: usize,
    /// Writes waiting for room in the window; beyond this, writes fail with `Busy` (the
    /// driver stops reading requests well before, so this is a last line).
    pub admission_queue_max: usize,
    /// Reads waiting for a block to settle.
    pub reads_waiting_max: usize,
    /// Resync copies sent and not yet acknowledged.
    pub resync_blocks_in_flight_max: usize,
    /// LBAs per ResyncRequest frame.
    pub resync_request_lbas_max: usize,
    pub heartbeat_interval_us: u64,
    /// Heartbeats awaiting their echo; at the cap the next waits (one unanswered for
    /// `read_lease_us` or `retransmit_after_us`, whichever is longer, is taken as lost).
    pub heartbeats_outstanding_max: usize,
    /// A write, copy or request unanswered this long is sent again. The link driver runs
    /// over TCP, which does not lose frames, but a reconnect does; resending is harmless
    /// because every apply is idempotent under the apply rule.
    pub retransmit_after_us: u64,
    /// The volume's ack policy at start; changed live by [`Event::SetPolicy`].
    pub policy: Policy,
    /// `sync-received`: bytes of received mutations held for their apply after the early
    /// ack. Beyond it a received write is applied before its ack, as under `sync`.
    pub receive_queue_bytes_max: usize,
    pub fault: Fault,
    /// A catching-up site serves reads for this long after the send time of its latest
    /// heartbeat the survivor echoed with a lease (DESIGN.md §4 "Resync").
    pub read_lease_us: u64,
    /// Clock rate difference the lease allows, in parts per million.
    pub lease_drift_ppm: u64,
    /// Slack on top of the lease for a pause of the survivor's process.
    pub lease_margin_us: u64,
}

impl Config {
    /// Defaults sized for the simulator and for a first daemon; every bound is explicit.
    pub fn new(site: SiteId, cluster_id: u64, cg_id: u64, volume_id: u64) -> Config {
        Config {
            site,
            cluster_id,
            cg_id,
            volume_id,
            window_bytes_max: 64 * 1024 * 1024,
            writes_in_flight_max: 1024,
            admission_queue_max: 1024,
            reads_waiting_max: 1024,
            resync_blocks_in_flight_max: 64,
            resync_request_lbas_max: 4096,
            heartbeat_interval_us: 10_000,
            heartbeats_outstanding_max: 16,
            retransmit_after_us: 50_000,
            policy: Policy::default(),
            receive_queue_bytes_max: 16 * 1024 * 1024,
            fault: Fault::None,
            read_lease_us: 600_000,
            lease_drift_ppm: 1_000,
            lease_margin_us: 50_000,
        }
    }
}

/// What happens to a replica.
#[derive(Clone, Debug)]
pub enum Event {
    /// A client WRITE of whole blocks (`data.len()` a multiple of 4096).
    ClientWrite {
        id: ClientOpId,
        lba: u64,
        data: Vec<u8>,
        /// NBD FUA: durable at both sites before the ack.
        fua: bool,
    },
    ClientTrim {
        id: ClientOpId,
        lba: u64,
        blocks: u32,
    },
    ClientWriteZeroes {
        id: ClientOpId,
        lba: u64,
        blocks: u32,
    },
    ClientRead {
        id: ClientOpId,
        lba: u64,
        blocks: u32,
    },
    /// NBD FLUSH: every mutation completed before it becomes durable at both sites (at this
    /// site alone while it is the survivor of a detach).
    ClientFlush {
        id: ClientOpId,
    },
    /// A frame from the peer that already passed [`Frame::decode`].
    FrameReceived(Frame),
    /// Time passed; heartbeats and retransmissions are due on ticks.
    Tick,
    LinkUp,
    LinkDown,
    /// The control plane committed a detach (§6); `survivor` carries on alone.
    Detach {
        survivor: SiteId,
        new_epoch: u32,
        fenced_before: [u32; 2],
    },
    /// The control plane committed the rejoin: both sites in sync again.
    Rejoin {
        new_epoch: u32,
    },
    /// The volume's ack policy changed in the committed map (DESIGN.md §5). The mode in
    /// force changes only through the in-band switch (see `policy`).
    SetPolicy(Policy),
    /// `sync-received`: apply the mutations received and already acknowledged as received
    /// (asked for by [`Action::ApplyReceived`]).
    ApplyReceived,
    /// Repair these blocks from the in-sync peer (`verify --repair`, DESIGN.md §4 "Repair"):
    /// each takes the peer's version if it fails its checksum here or the peer's stamp is
    /// greater (`force`: or equal). Acknowledged once every block is answered; fails with EIO
    /// if any could not be repaired. See `core::repair`.
    ClientRepair {
        id: ClientOpId,
        lbas: Vec<u64>,
        force: bool,
    },
}

/// Why a client request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// EIO: the outcome is unknown or this site may not serve (fenced, detached).
    Io,
    /// EINVAL: unaligned, empty or out of range.
    Invalid,
    /// Every bounded queue is full; the driver should have applied back-pressure first.
    Busy,
}

/// What a replica asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    SendFrame(Frame),
    /// The mutation `id` is done; `stamp` is the stamp it was given (for logs and checkers).
    AckClient {
        id: ClientOpId,
        stamp: Stamp,
    },
    /// The read `id` is done: its data and the stamp of every block read.
    ReadDone {
        id: ClientOpId,
        data: Vec<u8>,
        stamps: Vec<Stamp>,
    },
    /// The flush `id` is done: durable at both sites.
    FlushDone {
        id: ClientOpId,
    },
    FailClient {
        id: ClientOpId,
        error: ClientError,
    },
    /// A loser's divergent block, discarded by resync: save it to the side file (§4).
    SaveDivergent {
        lba: u64,
        data: Vec<u8>,
        stamp: Stamp,
    },
    /// The survivor has copied everything and the peer acked every write: the control
    /// plane may commit `Rejoin` for `epoch`.
    ResyncComplete {
        epoch: u32,
    },
    /// `sync-received`: mutations were acknowledged as received and wait to be applied; the
    /// driver steps [`Event::ApplyReceived`] once this step's frames are on their way.
    ApplyReceived,
}

#[cfg(test)]
mod catchup_tests;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;
