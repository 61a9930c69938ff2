//! [`Replica`]: one site's replication state for one volume (DESIGN.md §4, `sync` policy).
//!
//! The rules it implements, and why each exists:
//!
//! - Every mutation gets one stamp `(accept_epoch, hlc, origin)` that exceeds the current
//!   stamp of every block it covers, and is applied locally (dirty bit first) in the same
//!   step. A block's current stamp therefore already includes every in-flight local write,
//!   so the comparison of the apply rule sees them.
//! - Apply rule, both sites: a block takes a mutation only if its stamp is greater. Two
//!   overlapping writes racing from the two sites end the same at both, whatever the order.
//! - `sync`: a write is acknowledged once applied at both sites. Its blocks stay dirty
//!   until then, and an in-sync site's reads of a dirty block wait, so no read returns data
//!   that a failover could take away.
//! - Fencing: a receiver refuses a mutation iff `accept_epoch < fenced_before[origin]`.
//! - Resync: after a reconnect in the same epoch each site pushes its dirty blocks and the
//!   apply rule settles them. After a detach the loser first discards its own divergent
//!   blocks (reported for the side file), then receives the survivor's version of every
//!   block dirty on either side by the apply rule. Discarding first is what makes "the
//!   survivor's version wins unconditionally" hold even when the loser's clock ran ahead and
//!   its divergent stamps are larger, while still letting a live write that overtakes a copy
//!   win over it.
//!
//! Settling after a crash (DESIGN.md §4: "stamps of blocks in the activity log are untrusted
//! and are settled from the peer"). Acknowledgements do not wait for a flush, so a crash may
//! lose writes this site applied — its own and the peer's — and the engine may even leave a
//! block torn. Every such block is in the persistent dirty map (the activity log). At start
//! those blocks are *untrusted*: their content and stamp say nothing reliable.
//!
//! - While a block is untrusted its local content and stamp are ignored: versions from the
//!   peer are applied by the apply rule among themselves only (the first one always). A
//!   copy from the peer settles the block (it is trusted again); a live write does not,
//!   because a write the peer sent before the crash and resends now may be older than what
//!   the peer holds — a newer write of this site that the crash took away. A copy is read
//!   from the peer's store after this site restarted, so it holds every write the crash
//!   could have taken from here.
//! - A local mutation covering the block also settles it: its stamp is above every stamp
//!   this site issued or saw before the crash (the HLC high-water mark is persisted before
//!   any stamp above it is applied or sent), so it wins over anything the crash could have
//!   lost, at both sites.
//! - At link-up in the same epoch an in-sync site asks the peer for its untrusted blocks
//!   (a ResyncRequest, in batches) and the peer answers with copies.
//! - Why no acknowledged write is lost: a write is acknowledged only after both sites
//!   applied it; a site that then loses it in a crash has the block in its activity log, and
//!   the peer — which did not crash — still holds that version or a newer one (its blocks
//!   only move forward by the apply rule), which is what the restarted site takes. Both
//!   sites losing it (two crashes before a FLUSH) is outside the contract: only FLUSH makes
//!   writes survive the power loss of both.
//! - If the peer's copy of the block is untrusted too (both crashed before settling), its
//!   copy is flagged, and the two versions are merged by the apply rule and pushed again, so
//!   the sites still converge.
//! - An untrusted site does not answer a FlushMarker, and does not complete a client FLUSH,
//!   until it has settled: a flush must cover the writes the crash lost here.
//! - A survivor has no peer to settle from, so it never relies on one: while it is the
//!   survivor, each local mutation is flushed before anything about it leaves the site.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use stretch_engine::{Stamp, BLOCK_SIZE};
use tracing::{info, warn};

use super::policy::{desired_mode, ADAPTIVE_DWELL_US};
use super::{
    AckPolicy, Action, BlockStore, ClientError, ClientOpId, Config, Content, Event, Fault, MapView,
    Mode, Policy, Role,
};
use crate::frame::{
    Frame, Header, Kind, BODY_BYTES_MAX, FLAG_ACK_ON_RECEIVE, FLAG_FUA, FLAG_LEASE, FLAG_PLAN,
    FLAG_PRIORITY, FLAG_RECEIVED, FLAG_REFUSED, FLAG_UNTRUSTED,
};
use crate::stamp::{Hlc, SiteId, StampParts};

const BLOCK_BYTES: usize = BLOCK_SIZE as usize;

// Repair of blocks that fail their checksum lives in its own file; as a child module it
// shares the replica's private state.
#[path = "repair.rs"]
mod repair;

#[derive(Clone, Debug)]
enum Mutation {
    Write(Vec<u8>),
    Trim,
    WriteZeroes,
}

impl Mutation {
    fn kind(&self) -> Kind {
        match self {
            Mutation::Write(_) => Kind::Write,
            Mutation::Trim => Kind::Trim,
            Mutation::WriteZeroes => Kind::WriteZeroes,
        }
    }

    fn content(&self, block: usize) -> Content<'_> {
        match self {
            Mutation::Write(data) => Content::Data(&data[block * BLOCK_BYTES..][..BLOCK_BYTES]),
            Mutation::Trim | Mutation::WriteZeroes => Content::Zero,
        }
    }

    fn body_bytes(&self) -> usize {
        match self {
            Mutation::Write(data) => data.len(),
            _ => 0,
        }
    }
}

/// A client mutation not yet stamped (waiting for room in the window).
#[derive(Debug)]
struct QueuedWrite {
    id: ClientOpId,
    lba: u64,
    blocks: u32,
    mutation: Mutation,
    fua: bool,
}

/// A local mutation applied here and sent to the peer, waiting for its ack.
#[derive(Debug)]
struct PendingWrite {
    id: ClientOpId,
    lba: u64,
    blocks: u32,
    mutation: Mutation,
    stamp: Stamp,
    accept_epoch: u32,
    /// 0 while the link is down (never sent yet in this link session).
    last_sent_us: u64,
    wire_bytes: usize,
    fua: bool,
    /// The client has its ack: `async` acks at once, `sync-received` on the peer's
    /// receipt. The write stays pending until the peer applied it (or, under `async`, made
    /// it durable), and a detach never fails it.
    client_acked: bool,
    /// Accepted under `async`: released only by the peer's DurableAck (the lag, §5).
    is_async: bool,
    /// Accepted under `sync-received` (and not FUA): the frame asks for an ack of receipt.
    ack_on_receive: bool,
    /// `async`: the peer acknowledged the apply; waiting for a lag marker's DurableAck.
    peer_applied: bool,
    /// `async`: the seq of the lag marker whose DurableAck releases this write.
    lag_marker: Option<u64>,
    admitted_us: u64,
}

/// `sync-received`: a mutation acknowledged as received, waiting to be applied.
#[derive(Debug)]
struct Received {
    header: Header,
    body: Vec<u8>,
}

/// A mode switch this site leads, sent and not yet answered.
#[derive(Debug)]
struct SwitchOut {
    seq: u64,
    to: Mode,
    sent_us: u64,
}

/// A client FLUSH waiting for the peer's DurableAck (and for this site to settle).
#[derive(Debug)]
struct PendingFlush {
    id: ClientOpId,
    peer_durable: bool,
    /// 0 while the link is down.
    last_sent_us: u64,
}

/// Where a version applied by [`Replica::apply_from_peer`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// A live write, trim or write-zeroes.
    Write,
    /// A resync copy of the peer's current version.
    Copy,
    /// A copy of a block the peer has not settled either (flagged `FLAG_UNTRUSTED`).
    UntrustedCopy,
}

#[derive(Debug)]
struct WaitingRead {
    id: ClientOpId,
    lba: u64,
    blocks: u32,
}

/// Blocks this site sends to the peer: the in-sync push after a reconnect, or the
/// survivor's copies to a catching-up loser.
#[derive(Debug, Default)]
struct ResyncOut {
    to_send: BTreeSet<u64>,
    /// Survivor: blocks of `to_send` a read at the catching-up loser waits for; sent first.
    /// Bounded by `PRIORITY_BLOCKS_MAX`.
    priority: BTreeSet<u64>,
    /// Survivor: the id of the loser's request that started this link session's resync;
    /// copies and the plan carry it as their seq, so the loser can tell them from frames of
    /// an earlier session.
    request_id: u64,
    /// Survivor: the request id this resync started under; acks of copies sent under it or
    /// any later id of this session count.
    first_request_id: u64,
    /// Per block: the stamp sent and when.
    in_flight: BTreeMap<u64, (Stamp, u64)>,
    /// Survivor: the newest request id seen and which of its chunks arrived.
    request_chunks: Option<(u64, BTreeSet<u64>)>,
    /// Survivor: one whole request has arrived.
    request_complete: bool,
    complete_reported: bool,
}

/// Counters for metrics and tests; every rejection is counted, never silently dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames for another CG or volume, from the wrong site, or out of range.
    pub frames_foreign: u64,
    /// Mutations refused because their origin is fenced.
    pub mutations_fenced: u64,
    /// Mutations from an epoch this site has not learned yet; not applied, the sender retries.
    pub mutations_from_future: u64,
    /// Local writes the peer refused as fenced (failed with EIO).
    pub writes_nacked: u64,
    pub writes_acked_alone: u64,
    pub writes_retransmitted: u64,
    pub resync_blocks_sent: u64,
    pub resync_blocks_applied: u64,
    pub divergent_blocks_saved: u64,
    pub rtt_samples: u64,
    /// Untrusted blocks (after a crash) settled by the peer's version.
    pub blocks_settled: u64,
    pub settle_requests_sent: u64,
    /// Client flushes completed (durable at both sites).
    pub flushes_done: u64,
    /// Flush markers of the peer answered with a DurableAck.
    pub durable_acks_sent: u64,
    /// Mode switches that took effect here (both sites count each one).
    pub mode_switches: u64,
    /// Mode switches the peer refused (it was still writing).
    pub mode_switches_refused: u64,
    /// `async`: writes acknowledged before the peer had them.
    pub writes_acked_async: u64,
    /// `sync-received`: the peer's writes acknowledged as received before their apply.
    pub writes_received_early: u64,
    /// Client requests refused because this site is the passive site of `async`.
    pub requests_refused_passive: u64,
    /// Blocks that failed their checksum here and were replaced by the peer's copy.
    pub blocks_repaired: u64,
    pub repair_requests_sent: u64,
    /// Blocks asked for repair that could not be repaired (the peer could not, timeout,
    /// link lost, not in sync).
    pub repairs_failed: u64,
    /// Repair answers of "cannot" sent to the peer (our copy fails too, or we are not in sync).
    pub repair_refusals_sent: u64,
    /// Client reads failed with EIO because a block failed its checksum and was not repaired.
    pub reads_failed_unreadable: u64,
    /// Resync copies withheld because the block fails its checksum here (never sent).
    pub copies_withheld_unreadable: u64,
    /// Catching up: reads served from blocks already resynced (or never stale).
    pub catchup_reads_local: u64,
    /// Catching up: reads that waited for blocks copied first (a priority request).
    pub catchup_reads_pulled: u64,
    /// Catching up: blocks of the survivor's plan marked stale here.
    pub plan_blocks_marked: u64,
}

/// One site's replication state for one volume; see the module documentation.
pub struct Replica {
    cfg: Config,
    map: MapView,
    hlc: Hlc,
    link_up: bool,
    next_seq: u64,
    /// Keyed by seq; BTreeMap so retransmission order is deterministic.
    pending: BTreeMap<u64, PendingWrite>,
    inflight_bytes: usize,
    /// Per block: local writes waiting for the peer.
    block_pending: BTreeMap<u64, u32>,
    admission: VecDeque<QueuedWrite>,
    reads: VecDeque<WaitingRead>,
    /// Heartbeat seq -> send time (this site's clock; RTT never mixes two clocks).
    heartbeats: BTreeMap<u64, u64>,
    next_heartbeat_seq: u64,
    next_heartbeat_due_us: u64,
    rtt_us_smoothed: Option<u64>,
    resync_out: Option<ResyncOut>,
    /// Loser: when the request was last sent or resync traffic last arrived.
    loser_progress_us: Option<u64>,
    /// Blocks whose content and stamp are untrusted after a crash (module documentation),
    /// each with the newest stamp applied to it from the peer since (`None`: none yet; the
    /// first always applies, even a never-written block's ZERO). A subset of the store's
    /// dirty blocks; empty once settled.
    untrusted: BTreeMap<u64, Option<Stamp>>,
    /// Untrusted blocks asked from the peer and not answered yet, and when they were asked.
    settle_asked: BTreeSet<u64>,
    settle_asked_us: Option<u64>,
    /// Client flushes, keyed by the seq of their FlushMarker.
    flushes: BTreeMap<u64, PendingFlush>,
    /// The peer's FlushMarkers held until this site has settled, keyed by seq.
    markers_waiting: BTreeMap<u64, Header>,
    /// Set when something this step did must be durable before its actions leave.
    flush_before_actions: bool,
    counters: Counters,
    policy: Policy,
    /// The mode in force (see `policy`).
    mode: Mode,
    /// False while a site that does not lead has not yet heard the leader's mode after a
    /// start or rejoin under `async`/`adaptive`: it might be the passive site, so it holds
    /// client requests until it knows.
    mode_known: bool,
    /// The leader has told the peer the mode in this link session.
    mode_announced: bool,
    switch_out: Option<SwitchOut>,
    /// After a refused switch: not before this.
    switch_retry_at_us: u64,
    /// Leaving `async` (or handing over): new writes wait until every async write is
    /// durable at the peer.
    draining: bool,
    /// `sync-received`: received mutations acknowledged and not yet applied, in order.
    received: VecDeque<Received>,
    received_bytes: usize,
    /// Per block: received mutations queued for their apply (the block is dirty meanwhile).
    received_blocks: BTreeMap<u64, u32>,
    apply_requested: bool,
    /// `async`: the lag marker in flight (seq, sent at).
    lag_marker: Option<(u64, u64)>,
    /// `async`: wire bytes of pending async writes (the lag in bytes).
    async_bytes: usize,
    last_peer_write_us: Option<u64>,
    last_local_write_us: Option<u64>,
    last_rtt_sample_us: Option<u64>,
    /// Blocks being repaired from the peer and what waits on them (`core::repair`).
    repair: repair::RepairState,
    /// The time of the step being run (for rules deep in the call tree).
    now_us: u64,
    /// Survivor: no acknowledgement alone before this time, because a catching-up peer may
    /// still serve reads under a lease this site granted (or may have, before a restart).
    alone_hold_until_us: u64,
    /// Loser: reads may be served until this time (own clock), if the plan is complete.
    read_lease_until_us: Option<u64>,
    /// Loser: the survivor's copy plan of this link session: (plan id, chunks seen).
    plan_chunks: Option<(u64, BTreeSet<u64>)>,
    /// Loser: every block of the plan is marked dirty here, in this link session.
    plan_complete: bool,
    /// Loser: the id of its first resync request in this link session and epoch; a plan or
    /// copy with a smaller seq belongs to an earlier session and cleans nothing.
    catchup_floor: Option<u64>,
    /// Loser: blocks a copy of this session already settled. The link may reorder frames,
    /// so a plan chunk can arrive after a copy of one of its blocks; it must not mark that
    /// block stale again (no second copy would come). At most one entry per block copied.
    catchup_copied: BTreeSet<u64>,
}

/// Blocks a catching-up loser's reads may ask to be copied first, at the survivor.
const PRIORITY_BLOCKS_MAX: usize = 4096;

impl Replica {
    /// Starts (or restarts after a crash) from the store and the committed map. Volatile
    /// state of an earlier incarnation is gone: its pending writes' blocks are still dirty
    /// in the store and are settled with the peer on the next link-up.
    pub fn start(cfg: Config, now_us: u64, map: MapView, store: &mut dyn BlockStore) -> Replica {
        assert!(cfg.site < 2, "a stretched volume has sites 0 and 1");
        // A single write must always fit an empty window, or it could never be sent.
        assert!(cfg.window_bytes_max >= BODY_BYTES_MAX as usize + crate::frame::HEADER_BYTES);
        let hlc = Hlc::start(now_us, store.hlc_high_water(), store.max_stamp());
        // Seqs start at the clock, which is above every seq of an earlier life (each seq
        // advances the clock before it is used, see `alloc_seq`), so a restarted site never
        // reuses one; acks are matched on (seq, stamp) besides.
        let next_seq = hlc.current().saturating_add(1);
        // The activity log: whatever a crash may have lost or torn. A survivor has nothing
        // lost (it flushes before anything leaves, see the module documentation), and no
        // peer to settle from: its dirty blocks are pushed to the loser as they are.
        let untrusted: BTreeMap<u64, Option<Stamp>> = match map.role {
            Role::Survivor => BTreeMap::new(),
            _ if cfg.fault == Fault::NoSettle => BTreeMap::new(),
            _ => store
                .dirty_blocks()
                .into_iter()
                .map(|b| (b, None))
                .collect(),
        };
        if !untrusted.is_empty() {
            info!(
                site = cfg.site,
                blocks = untrusted.len(),
                "blocks of the activity log are untrusted until settled from the peer"
            );
        }
        let cfg_policy = cfg.policy;
        let mut replica = Replica {
            cfg,
            map,
            hlc,
            link_up: false,
            next_seq,
            pending: BTreeMap::new(),
            inflight_bytes: 0,
            block_pending: BTreeMap::new(),
            admission: VecDeque::new(),
            reads: VecDeque::new(),
            heartbeats: BTreeMap::new(),
            next_heartbeat_seq: 1,
            next_heartbeat_due_us: now_us,
            rtt_us_smoothed: None,
            resync_out: None,
            loser_progress_us: None,
            untrusted,
            settle_asked: BTreeSet::new(),
            settle_asked_us: None,
            flushes: BTreeMap::new(),
            markers_waiting: BTreeMap::new(),
            flush_before_actions: false,
            counters: Counters::default(),
            policy: cfg_policy,
            mode: Mode::Sync,
            mode_known: true,
            mode_announced: false,
            switch_out: None,
            switch_retry_at_us: 0,
            draining: false,
            received: VecDeque::new(),
            received_bytes: 0,
            received_blocks: BTreeMap::new(),
            apply_requested: false,
            lag_marker: None,
            async_bytes: 0,
            last_peer_write_us: None,
            last_local_write_us: None,
            last_rtt_sample_us: None,
            repair: repair::RepairState::default(),
            now_us,
            alone_hold_until_us: 0,
            read_lease_until_us: None,
            plan_chunks: None,
            plan_complete: false,
            catchup_floor: None,
            catchup_copied: BTreeSet::new(),
        };
        if replica.map.role == Role::Survivor {
            // Before this restart a catching-up peer may have been granted a read lease that
            // still runs: wait as if one was granted just now.
            replica.alone_hold_until_us = replica.hold_after_grant(now_us);
        }
        replica.reset_mode();
        replica.persist_hlc(store);
        info!(site = replica.cfg.site, ?map, "replica started");
        replica
    }

    pub fn role(&self) -> Role {
        self.map.role
    }

    pub fn map(&self) -> MapView {
        self.map
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn rtt_us_smoothed(&self) -> Option<u64> {
        self.rtt_us_smoothed
    }

    pub fn inflight_bytes(&self) -> usize {
        self.inflight_bytes
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The mode in force, or `None` while this site waits to hear it from the leader.
    pub fn mode(&self) -> Option<Mode> {
        self.mode_known.then_some(self.mode)
    }

    /// Whether a read of a range with no dirty block may be served from the local store
    /// without asking the core (the read fast path): a serving role, a known mode, and not
    /// the passive site of `async`.
    pub fn serves_local_reads(&self) -> bool {
        match self.map.role {
            Role::Survivor => true,
            Role::Loser => false,
            Role::InSync => self.mode_known && !self.refuses_io(),
            // (A catching-up loser serves reads through the replica: they depend on its
            // lease and its dirty set.)
        }
    }

    /// `async`: bytes of this site's writes not yet durable at the peer, and the age of the
    /// oldest of them.
    pub fn async_lag(&self, now_us: u64) -> (u64, u64) {
        // Pending writes are keyed by seq, which grows with admission: the first async one is
        // the oldest. Both figures are O(1) here because admission asks for them per write.
        let oldest_us = self
            .pending
            .values()
            .find(|p| p.is_async)
            .map(|p| p.admitted_us);
        (
            self.async_bytes as u64,
            oldest_us.map_or(0, |t| now_us.saturating_sub(t)),
        )
    }

    pub fn hlc(&self) -> u64 {
        self.hlc.current()
    }

    /// `sync-received`: the newest stamp among the received, not yet applied mutations of
    /// `lba` — part of what this site holds (it is visible to reads here, which wait for the
    /// apply), for checkers.
    pub fn received_stamp(&self, lba: u64) -> Option<Stamp> {
        self.received
            .iter()
            .filter(|r| (r.header.lba..r.header.lba + u64::from(r.header.blocks)).contains(&lba))
            .map(|r| r.header.stamp)
            .max()
    }

    /// Whether a block is untrusted after a crash and not yet settled from the peer.
    pub fn is_untrusted(&self, lba: u64) -> bool {
        self.untrusted.contains_key(&lba)
    }

    /// Blocks still untrusted after a crash. A site with any may not be made the survivor of
    /// a detach: the peer may hold acknowledged writes it lost.
    pub fn untrusted_blocks(&self) -> usize {
        self.untrusted.len()
    }

    /// Nothing waiting, nothing in flight, nothing dirty: with the peer also quiescent and
    /// no frame on the wire, invariant 1 (convergence) must hold.
    pub fn is_quiescent(&self, store: &dyn BlockStore) -> bool {
        self.pending.is_empty()
            && self.admission.is_empty()
            && self.reads.is_empty()
            && self.untrusted.is_empty()
            && self.flushes.is_empty()
            && self.markers_waiting.is_empty()
            && self.received.is_empty()
            && self.switch_out.is_none()
            && self
                .resync_out
                .as_ref()
                .is_none_or(|r| r.to_send.is_empty() && r.in_flight.is_empty())
            && store.dirty_blocks().is_empty()
            && self.repair.is_idle()
    }

    fn peer(&self) -> SiteId {
        1 - self.cfg.site
    }

    /// Handles one event; actions are appended to `out` in the order they must happen.
    pub fn step(
        &mut self,
        now_us: u64,
        event: Event,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        self.repair.now_us = now_us;
        self.now_us = now_us;
        match event {
            Event::ClientWrite { id, lba, data, fua } => {
                if data.is_empty() || data.len() % BLOCK_BYTES != 0 {
                    out.push(Action::FailClient {
                        id,
                        error: ClientError::Invalid,
                    });
                    return;
                }
                let blocks = (data.len() / BLOCK_BYTES) as u64;
                let q = (id, lba, blocks, Mutation::Write(data), fua);
                self.client_mutation(now_us, q, store, out);
            }
            Event::ClientTrim { id, lba, blocks } => {
                let q = (id, lba, blocks.into(), Mutation::Trim, false);
                self.client_mutation(now_us, q, store, out)
            }
            Event::ClientWriteZeroes { id, lba, blocks } => {
                let q = (id, lba, blocks.into(), Mutation::WriteZeroes, false);
                self.client_mutation(now_us, q, store, out)
            }
            Event::ClientFlush { id } => self.client_flush(now_us, id, store, out),
            Event::ClientRead { id, lba, blocks } => self.client_read(id, lba, blocks, store, out),
            Event::FrameReceived(frame) => self.on_frame(now_us, frame, store, out),
            Event::Tick => self.on_tick(now_us, store, out),
            Event::LinkUp => self.on_link_up(now_us, store, out),
            Event::LinkDown => self.on_link_down(now_us, store, out),
            Event::Detach {
                survivor,
                new_epoch,
                fenced_before,
            } => self.on_detach(now_us, survivor, new_epoch, fenced_before, store, out),
            Event::Rejoin { new_epoch } => self.on_rejoin(new_epoch, store, out),
            Event::SetPolicy(policy) => self.on_set_policy(now_us, policy, store, out),
            Event::ApplyReceived => {
                self.apply_received(store, out);
                self.after_progress(now_us, store, out);
            }
            Event::ClientRepair { id, lbas, force } => {
                self.client_repair(id, lbas, force, store, out)
            }
        }
        self.complete_flushes(out);
        self.answer_waiting_markers(out);
        if std::mem::take(&mut self.flush_before_actions) {
            // Acks of FUA writes, flushes and a survivor's writes leave only after this.
            store.flush();
        }
        self.persist_hlc(store);
    }

    /// The next seq; the clock is advanced past it so the persisted high-water mark bounds
    /// every seq this life issues (see `start`).
    fn alloc_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.hlc.advance_to(seq);
        seq
    }

    /// Every stamp seen advances the clock, and the high-water mark is persisted before the
    /// stamp is applied: a crash right after the apply must not restart the clock below it,
    /// or a later local write could be stamped below a version the peer holds.
    fn observe(&mut self, stamp: Stamp, store: &mut dyn BlockStore) {
        self.hlc.observe(stamp);
        self.persist_hlc(store);
    }

    fn persist_hlc(&mut self, store: &mut dyn BlockStore) {
        if let Some(mark) = self.hlc.high_water_to_persist() {
            store.persist_hlc_high_water(mark);
        }
    }

    // ----- client requests -----------------------------------------------------------------

    fn client_mutation(
        &mut self,
        now_us: u64,
        (id, lba, blocks, mutation, fua): (ClientOpId, u64, u64, Mutation, bool),
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let in_range = lba
            .checked_add(blocks)
            .is_some_and(|end| end <= store.blocks());
        let too_big = blocks * u64::from(BLOCK_SIZE) > u64::from(BODY_BYTES_MAX);
        if blocks == 0 || !in_range || too_big {
            out.push(Action::FailClient {
                id,
                error: ClientError::Invalid,
            });
            return;
        }
        let queued = QueuedWrite {
            id,
            lba,
            blocks: blocks as u32,
            mutation,
            fua,
        };
        if self.map.role == Role::InSync && self.refuses_io() {
            self.counters.requests_refused_passive += 1;
            out.push(Action::FailClient {
                id,
                error: ClientError::Io,
            });
            return;
        }
        match self.map.role {
            Role::Loser => out.push(Action::FailClient {
                id,
                error: ClientError::Io,
            }),
            Role::Survivor if !self.peer_is_sync_target() && !self.alone_hold(now_us) => {
                self.accept_alone(now_us, queued, store, out)
            }
            Role::Survivor if !self.peer_is_sync_target() => {
                // A read lease granted to the catching-up peer may still run: the write waits.
                if self.admission.len() < self.cfg.admission_queue_max {
                    self.admission.push_back(queued);
                } else {
                    out.push(Action::FailClient {
                        id,
                        error: ClientError::Busy,
                    });
                }
            }
            _ => {
                let wire = crate::frame::HEADER_BYTES + queued.mutation.body_bytes();
                if self.admission.is_empty() && self.may_admit(now_us, wire) {
                    self.admit(now_us, queued, store, out);
                } else if self.admission.len() < self.cfg.admission_queue_max {
                    self.admission.push_back(queued);
                } else {
                    out.push(Action::FailClient {
                        id,
                        error: ClientError::Busy,
                    });
                }
            }
        }
    }

    /// Survivor only: the peer is catching up, so live writes wait for it (§4 "Resync").
    fn peer_is_sync_target(&self) -> bool {
        self.link_up && self.resync_out.is_some()
    }

    /// Survivor: a read lease granted to the catching-up peer may still run, so nothing may
    /// be acknowledged that the peer has not applied ("Reads while catching up").
    fn alone_hold(&self, now_us: u64) -> bool {
        self.cfg.fault != Fault::AloneDuringReadLease && now_us < self.alone_hold_until_us
    }

    /// Until when a lease granted at `now_us` may run at the peer, on any clock: the lease
    /// started at the peer before this grant, and its clock may run `lease_drift_ppm` slow.
    fn hold_after_grant(&self, now_us: u64) -> u64 {
        let lease = self.cfg.read_lease_us;
        let drift = lease.saturating_mul(self.cfg.lease_drift_ppm) / 1_000_000;
        now_us
            .saturating_add(lease)
            .saturating_add(drift)
            .saturating_add(self.cfg.lease_margin_us)
    }

    /// Loser: may a read be served now? Only once the survivor's copy plan of this link
    /// session is in (so every block the survivor wrote alone is dirty here), and under a
    /// lease (so the survivor acknowledges nothing this site has not applied).
    fn loser_serves(&self, now_us: u64) -> bool {
        self.map.role == Role::Loser
            && self.plan_complete
            && self.read_lease_until_us.is_some_and(|until| now_us < until)
    }

    /// Survivor: acknowledges alone the writes the catching-up peer has not applied, once
    /// the peer is no longer a sync target and no lease it was granted can still run.
    fn release_alone(&mut self, now_us: u64, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        if self.map.role != Role::Survivor || self.peer_is_sync_target() || self.alone_hold(now_us)
        {
            return;
        }
        if !self.pending.is_empty() {
            self.ack_pending_alone(out);
        }
        if !self.reads.is_empty() {
            self.serve_reads(store, out);
        }
        self.drain_admission(now_us, store, out);
    }

    fn window_has_room(&self, wire_bytes: usize) -> bool {
        self.pending.len() < self.cfg.writes_in_flight_max
            && (self.pending.is_empty()
                || self.inflight_bytes + wire_bytes <= self.cfg.window_bytes_max)
    }

    /// Whether a new write may be stamped and sent now: room in the window, a known mode,
    /// no drain in progress, and under `async` the lag below both bounds (§5: "beyond which
    /// writes wait").
    fn may_admit(&self, now_us: u64, wire_bytes: usize) -> bool {
        if !self.mode_known || self.draining || !self.window_has_room(wire_bytes) {
            return false;
        }
        if !self.is_async_writer() || self.pending.is_empty() {
            return true;
        }
        let (lag_bytes, lag_us) = self.async_lag(now_us);
        lag_bytes + wire_bytes as u64 <= self.policy.lag_bytes_max
            && lag_us < self.policy.lag_us_max
    }

    /// A stamp above every covered block's current stamp, or `None` if a covered block
    /// carries an epoch this site has not reached (it must not write until it learns it).
    fn stamp_for(
        &mut self,
        now_us: u64,
        lba: u64,
        blocks: u32,
        store: &mut dyn BlockStore,
    ) -> Option<Stamp> {
        let covered: Vec<Stamp> = (lba..lba + u64::from(blocks))
            .map(|b| store.stamp(b))
            .collect();
        if covered
            .iter()
            .any(|s| StampParts::decode(*s).accept_epoch > self.map.epoch)
        {
            warn!(
                site = self.cfg.site,
                lba, "block stamped in a future epoch; refusing write"
            );
            return None;
        }
        let hlc = self.hlc.next_for(now_us, self.map.epoch, &covered);
        // Persisted before the stamp is applied or sent (see `observe`).
        self.persist_hlc(store);
        Some(
            StampParts {
                accept_epoch: self.map.epoch,
                hlc,
                origin_site: self.cfg.site,
            }
            .encode(),
        )
    }

    /// Stamps a mutation and applies it locally, dirty bits first.
    fn stamp_and_apply_locally(
        &mut self,
        now_us: u64,
        q: &QueuedWrite,
        store: &mut dyn BlockStore,
    ) -> Option<Stamp> {
        let stamp = self.stamp_for(now_us, q.lba, q.blocks, store)?;
        for i in 0..q.blocks as usize {
            let lba = q.lba + i as u64;
            store.mark_dirty(lba);
            let applied = self.apply_rule(store, lba, q.mutation.content(i), stamp);
            debug_assert!(applied, "a local stamp exceeds the block's current stamp");
            // The whole block is replaced, under a stamp above anything the crash could have
            // lost here: it is settled (module documentation).
            self.settled(lba);
        }
        // A survivor is the only copy: nothing about a mutation leaves before it is durable.
        // FUA: durable here before the ack (the peer does its part before its WriteAck).
        if self.map.role == Role::Survivor || q.fua {
            self.flush_before_actions = true;
        }
        Some(stamp)
    }

    fn accept_alone(
        &mut self,
        now_us: u64,
        q: QueuedWrite,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        match self.stamp_and_apply_locally(now_us, &q, store) {
            Some(stamp) => {
                self.counters.writes_acked_alone += 1;
                out.push(Action::AckClient { id: q.id, stamp });
            }
            None => out.push(Action::FailClient {
                id: q.id,
                error: ClientError::Io,
            }),
        }
    }

    fn admit(
        &mut self,
        now_us: u64,
        q: QueuedWrite,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let Some(stamp) = self.stamp_and_apply_locally(now_us, &q, store) else {
            out.push(Action::FailClient {
                id: q.id,
                error: ClientError::Io,
            });
            return;
        };
        for b in q.lba..q.lba + u64::from(q.blocks) {
            *self.block_pending.entry(b).or_insert(0) += 1;
        }
        let seq = self.alloc_seq();
        let wire_bytes = crate::frame::HEADER_BYTES + q.mutation.body_bytes();
        self.last_local_write_us = Some(now_us);
        let is_async = self.is_async_writer();
        if is_async {
            self.async_bytes += wire_bytes;
            // Acknowledged once applied here (and durable here under FUA, flushed at the end
            // of this step before the ack leaves); shipped behind it.
            self.counters.writes_acked_async += 1;
            out.push(Action::AckClient { id: q.id, stamp });
        }
        let mut p = PendingWrite {
            id: q.id,
            lba: q.lba,
            blocks: q.blocks,
            mutation: q.mutation,
            stamp,
            accept_epoch: self.map.epoch,
            last_sent_us: 0,
            wire_bytes,
            fua: q.fua,
            client_acked: is_async,
            is_async,
            ack_on_receive: self.mode == Mode::SyncReceived && !q.fua,
            peer_applied: false,
            lag_marker: None,
            admitted_us: now_us,
        };
        self.inflight_bytes += wire_bytes;
        if self.link_up {
            p.last_sent_us = now_us.max(1);
            out.push(Action::SendFrame(self.write_frame(seq, &p)));
        }
        self.pending.insert(seq, p);
    }

    fn drain_admission(&mut self, now_us: u64, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        while let Some(front) = self.admission.front() {
            match self.map.role {
                Role::Loser => {
                    out.push(Action::FailClient {
                        id: front.id,
                        error: ClientError::Io,
                    });
                    self.admission.pop_front();
                }
                Role::Survivor if !self.peer_is_sync_target() => {
                    if self.alone_hold(now_us) {
                        break;
                    }
                    let Some(q) = self.admission.pop_front() else {
                        break;
                    };
                    self.accept_alone(now_us, q, store, out);
                }
                Role::InSync if self.refuses_io() => {
                    self.counters.requests_refused_passive += 1;
                    out.push(Action::FailClient {
                        id: front.id,
                        error: ClientError::Io,
                    });
                    self.admission.pop_front();
                }
                _ => {
                    let wire = crate::frame::HEADER_BYTES + front.mutation.body_bytes();
                    if !self.may_admit(now_us, wire) {
                        break;
                    }
                    let Some(q) = self.admission.pop_front() else {
                        break;
                    };
                    self.admit(now_us, q, store, out);
                }
            }
        }
    }

    /// NBD FLUSH: "all writes that have completed" become durable (NBD proto.md), here at
    /// both sites. Those writes were applied at both before their acks, so a flush of each
    /// site's store after the FLUSH arrived covers them; the peer's is asked for with a
    /// FlushMarker and confirmed by its DurableAck, and like a write it waits for a peer that
    /// is unreachable (resent on link-up and on a timer).
    fn client_flush(
        &mut self,
        now_us: u64,
        id: ClientOpId,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        if self.map.role == Role::Loser || (self.map.role == Role::InSync && self.refuses_io()) {
            out.push(Action::FailClient {
                id,
                error: ClientError::Io,
            });
            return;
        }
        if self.flushes.len() >= self.cfg.admission_queue_max {
            out.push(Action::FailClient {
                id,
                error: ClientError::Busy,
            });
            return;
        }
        // sync-received: the peer's writes received here are applied before the flush, so
        // it covers them (§5: "FLUSH ... first drains both receive queues").
        self.apply_received(store, out);
        let seq = self.alloc_seq();
        let mut flush = PendingFlush {
            id,
            // A survivor is the only copy while detached (single-copy durability). Under
            // async, FLUSH is local only (§5): the peer lags by design.
            peer_durable: self.map.role == Role::Survivor || self.is_async_writer(),
            last_sent_us: 0,
        };
        if !flush.peer_durable && self.link_up {
            flush.last_sent_us = now_us.max(1);
            out.push(Action::SendFrame(self.flush_marker(seq)));
        }
        self.flushes.insert(seq, flush);
    }

    fn flush_marker(&self, seq: u64) -> Frame {
        let mut h = self.header(Kind::FlushMarker);
        h.seq = seq;
        Frame::new(h, Vec::new())
    }

    /// Completes the flushes the peer has made durable, once this site has settled: the
    /// flush at the end of the step then covers every write completed before them.
    fn complete_flushes(&mut self, out: &mut Vec<Action>) {
        if !self.untrusted.is_empty() || !self.flushes.values().any(|f| f.peer_durable) {
            return;
        }
        let done: Vec<u64> = self
            .flushes
            .iter()
            .filter(|(_, f)| f.peer_durable)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in done {
            if let Some(f) = self.flushes.remove(&seq) {
                self.counters.flushes_done += 1;
                out.push(Action::FlushDone { id: f.id });
            }
        }
        self.flush_before_actions = true;
    }

    /// The peer's FlushMarker: answered with a DurableAck after this site's store is flushed,
    /// but only once this site has settled, or the flush would not cover the writes a crash
    /// lost here.
    fn on_flush_marker(&mut self, h: &Header, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        if self.map.role == Role::Loser || h.accept_epoch > self.map.epoch {
            return;
        }
        // The writes received before the marker are applied first, so the flush covers them.
        self.apply_received(store, out);
        // Full: dropped; the peer resends it.
        if self.markers_waiting.len() < self.cfg.admission_queue_max {
            self.markers_waiting.insert(h.seq, *h);
        }
    }

    fn answer_waiting_markers(&mut self, out: &mut Vec<Action>) {
        if self.markers_waiting.is_empty() || !self.untrusted.is_empty() {
            return;
        }
        // The DurableAcks leave after the flush at the end of this step.
        self.flush_before_actions = true;
        for (_, h) in std::mem::take(&mut self.markers_waiting) {
            self.counters.durable_acks_sent += 1;
            out.push(Action::SendFrame(self.reply(Kind::DurableAck, &h)));
        }
    }

    fn on_durable_ack(
        &mut self,
        now_us: u64,
        h: &Header,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        if let Some(f) = self.flushes.get_mut(&h.seq) {
            f.peer_durable = true;
        }
        if self.lag_marker.is_some_and(|(seq, _)| seq == h.seq) {
            self.release_durable(h.seq, store);
            self.after_progress(now_us, store, out);
        }
    }

    fn client_read(
        &mut self,
        id: ClientOpId,
        lba: u64,
        blocks: u32,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let in_range = lba
            .checked_add(blocks.into())
            .is_some_and(|end| end <= store.blocks());
        let too_big = u64::from(blocks) * u64::from(BLOCK_SIZE) > u64::from(BODY_BYTES_MAX);
        if blocks == 0 || !in_range || too_big {
            out.push(Action::FailClient {
                id,
                error: ClientError::Invalid,
            });
            return;
        }
        let loser_refuses = self.map.role == Role::Loser && !self.loser_serves(self.now_us);
        if loser_refuses || (self.map.role == Role::InSync && self.refuses_io()) {
            if self.map.role == Role::InSync {
                self.counters.requests_refused_passive += 1;
            }
            out.push(Action::FailClient {
                id,
                error: ClientError::Io,
            });
            return;
        }
        let read = WaitingRead { id, lba, blocks };
        // Reads are independent: one waiting for a block never holds back a read of others.
        if self.can_serve(&read, store) {
            if self.map.role == Role::Loser {
                self.counters.catchup_reads_local += 1;
            }
            self.serve_checked(read, store, out);
        } else if self.reads.len() < self.cfg.reads_waiting_max {
            if self.map.role == Role::Loser {
                // Not resynced yet: ask the survivor to copy these blocks first; the read is
                // served here once they landed.
                self.counters.catchup_reads_pulled += 1;
                self.send_priority_request(&read, store, out);
            }
            self.reads.push_back(read);
        } else {
            out.push(Action::FailClient {
                id,
                error: ClientError::Busy,
            });
        }
    }

    /// DESIGN.md §4 "Reads": at an in-sync site a read of a block whose write still waits
    /// for the peer (or whose state after a crash is not yet settled with the peer) waits.
    fn can_serve(&self, read: &WaitingRead, store: &dyn BlockStore) -> bool {
        match self.map.role {
            // A write the catching-up peer has not yet applied (or one held back after a cut
            // while its lease may run) is not yet acknowledged: a read here must not return
            // it before the peer's reads can (invariant 4 across the two sites).
            // While a lease granted to the peer may still run and the peer is no longer a
            // sync target, a dirty block may hold a write the peer never applied (one in
            // flight when this site restarted, say): the peer may still serve the older
            // version, so a read here waits for the lease to lapse.
            Role::Survivor => {
                let held = !self.peer_is_sync_target() && self.alone_hold(self.now_us);
                !(read.lba..read.lba + u64::from(read.blocks))
                    .any(|b| self.block_pending.contains_key(&b) || (held && store.is_dirty(b)))
            }
            // Catching up: a block clean here is current (see "Reads while catching up").
            Role::Loser => {
                !(read.lba..read.lba + u64::from(read.blocks)).any(|b| store.is_dirty(b))
            }
            Role::InSync if !self.mode_known => false,
            // The async writer's blocks stay dirty until the peer made them durable; its
            // reads wait for nothing but blocks a crash left unsettled.
            Role::InSync if self.is_async_writer() => !(read.lba
                ..read.lba + u64::from(read.blocks))
                .any(|b| self.untrusted.contains_key(&b)),
            Role::InSync => {
                self.cfg.fault == Fault::ReadsDontWait
                    || !(read.lba..read.lba + u64::from(read.blocks)).any(|b| store.is_dirty(b))
            }
        }
    }

    /// Serves every waiting read that can now be served. A read is independent of the
    /// others, so one blocked read does not hold back reads of other blocks.
    fn serve_reads(&mut self, store: &dyn BlockStore, out: &mut Vec<Action>) {
        if self.reads.is_empty() {
            return;
        }
        let mut still = VecDeque::with_capacity(self.reads.len());
        let refuse = (self.map.role == Role::Loser && !self.loser_serves(self.now_us))
            || (self.map.role == Role::InSync && self.refuses_io());
        while let Some(read) = self.reads.pop_front() {
            if refuse {
                out.push(Action::FailClient {
                    id: read.id,
                    error: ClientError::Io,
                });
            } else if self.can_serve(&read, store) {
                self.serve_checked(read, store, out);
            } else {
                still.push_back(read);
            }
        }
        self.reads = still;
    }

    // ----- apply rule ----------------------------------------------------------------------

    /// DESIGN.md §4 "Apply rule": write only if the stamp exceeds the block's current one.
    fn apply_rule(
        &self,
        store: &mut dyn BlockStore,
        lba: u64,
        content: Content<'_>,
        stamp: Stamp,
    ) -> bool {
        if self.cfg.fault != Fault::ApplyWithoutStampCompare && stamp <= store.stamp(lba) {
            return false;
        }
        store.write(lba, content, stamp);
        true
    }

    /// Applies a version of `lba` that came from the peer and returns whether it was written.
    /// Untrusted blocks follow the rules of the module documentation.
    fn apply_from_peer(
        &mut self,
        store: &mut dyn BlockStore,
        lba: u64,
        content: Content<'_>,
        stamp: Stamp,
        source: Source,
    ) -> bool {
        // A crash may lose this write too, so it goes into the activity log first; the clear
        // after it becomes durable only with the next flush.
        let was_dirty = store.is_dirty(lba);
        if !was_dirty {
            store.mark_dirty(lba);
        }
        let Some(&newest_from_peer) = self.untrusted.get(&lba) else {
            let applied = self.apply_rule(store, lba, content, stamp);
            if !was_dirty {
                store.clear_dirty(lba);
            }
            return applied;
        };
        if source == Source::UntrustedCopy {
            // Both sites crashed before settling the block: either version may be stale. Keep
            // the newer, and push it, so the peer converges on the same one. The block stays
            // dirty until the push is acknowledged.
            self.settled(lba);
            let applied = self.apply_rule(store, lba, content, stamp);
            if let Some(ro) = self.resync_out.as_mut() {
                ro.to_send.insert(lba);
            }
            return applied;
        }
        // The local content does not count; peer versions go by the apply rule among
        // themselves.
        let applied = newest_from_peer.is_none_or(|newest| stamp > newest);
        if applied {
            store.write(lba, content, stamp);
            self.untrusted.insert(lba, Some(stamp));
        }
        if source == Source::Copy {
            self.settled(lba);
            // Now the peer's version (or a newer one of its): clean, unless a local write still
            // waits on the block (a loser's blocks are cleaned by its own resync rule).
            if self.map.role == Role::InSync && !self.waits_on(lba) {
                store.clear_dirty(lba);
            }
        }
        applied
    }

    /// A local write waits for the peer on `lba`, or a received one waits for its apply:
    /// either keeps the block dirty (and reads of it waiting).
    fn waits_on(&self, lba: u64) -> bool {
        self.block_pending.contains_key(&lba) || self.received_blocks.contains_key(&lba)
    }

    fn settled(&mut self, lba: u64) {
        if self.untrusted.remove(&lba).is_some() {
            self.settle_asked.remove(&lba);
            self.counters.blocks_settled += 1;
        }
    }

    // ----- frames --------------------------------------------------------------------------

    fn header(&self, kind: Kind) -> Header {
        let mut h = Header::new(kind);
        h.sender_site = self.cfg.site;
        h.cluster_id = self.cfg.cluster_id;
        h.cg_id = self.cfg.cg_id;
        h.volume_id = self.cfg.volume_id;
        h.accept_epoch = self.map.epoch;
        h
    }

    fn write_frame(&self, seq: u64, p: &PendingWrite) -> Frame {
        let mut h = self.header(p.mutation.kind());
        h.accept_epoch = p.accept_epoch;
        h.seq = seq;
        h.lba = p.lba;
        h.blocks = p.blocks;
        h.stamp = p.stamp;
        if p.fua {
            h.flags |= FLAG_FUA;
        }
        if p.ack_on_receive {
            h.flags |= FLAG_ACK_ON_RECEIVE;
        }
        let body = match &p.mutation {
            Mutation::Write(data) => data.clone(),
            _ => Vec::new(),
        };
        Frame::new(h, body)
    }

    fn reply(&self, kind: Kind, to: &Header) -> Frame {
        let mut h = self.header(kind);
        h.seq = to.seq;
        h.lba = to.lba;
        h.blocks = to.blocks;
        h.stamp = to.stamp;
        Frame::new(h, Vec::new())
    }

    fn on_frame(
        &mut self,
        now_us: u64,
        frame: Frame,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let h = frame.header;
        if h.cluster_id != self.cfg.cluster_id
            || h.cg_id != self.cfg.cg_id
            || h.volume_id != self.cfg.volume_id
            || h.sender_site != self.peer()
            || frame.body.len() != h.body_len_bytes as usize
        {
            self.counters.frames_foreign += 1;
            return;
        }
        match h.kind {
            Kind::Write | Kind::Trim | Kind::WriteZeroes => {
                self.on_mutation(now_us, &h, frame.body, store, out)
            }
            Kind::WriteAck => self.on_write_ack(now_us, &h, store, out),
            Kind::WriteNack => self.on_write_nack(now_us, &h, store, out),
            Kind::Heartbeat => {
                let mut echo = self.reply(Kind::HeartbeatEcho, &h);
                if self.map.role == Role::Survivor
                    && self.peer_is_sync_target()
                    && h.accept_epoch == self.map.epoch
                {
                    // The catching-up peer applies every live write before its ack, so it
                    // may serve reads; this grant holds back acks alone until it lapsed.
                    echo.header.flags |= FLAG_LEASE;
                    self.alone_hold_until_us = self.hold_after_grant(now_us);
                }
                out.push(Action::SendFrame(echo));
            }
            Kind::HeartbeatEcho => self.on_heartbeat_echo(now_us, &h),
            Kind::ResyncRequest => self.on_resync_request(now_us, &h, &frame.body, store, out),
            Kind::ResyncBlock => self.on_resync_block(now_us, &h, &frame.body, store, out),
            Kind::ResyncAck => self.on_resync_ack(now_us, &h, store, out),
            // The link hands control frames to the control plane; one reaching the core came
            // by another path and carries nothing for it.
            Kind::Control => self.counters.frames_foreign += 1,
            Kind::FlushMarker => self.on_flush_marker(&h, store, out),
            Kind::DurableAck => self.on_durable_ack(now_us, &h, store, out),
            Kind::ModeSwitch => self.on_mode_switch(now_us, &h, store, out),
            Kind::ModeSwitchAck => self.on_mode_switch_ack(now_us, &h, store, out),
            Kind::RepairRequest => self.on_repair_request(&h, &frame.body, store, out),
            Kind::RepairBlock => self.on_repair_block(&h, &frame.body, store, out),
        }
    }

    /// Whether a mutation-carrying frame from the peer is fenced (DESIGN.md §4 "Fencing").
    fn fenced(&self, h: &Header) -> bool {
        self.cfg.fault != Fault::NoFencing
            && h.accept_epoch < self.map.fenced_before[usize::from(h.sender_site)]
    }

    fn on_mutation(
        &mut self,
        now_us: u64,
        h: &Header,
        body: Vec<u8>,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let parts = StampParts::decode(h.stamp);
        let in_range = h
            .lba
            .checked_add(h.blocks.into())
            .is_some_and(|end| end <= store.blocks());
        // Frame::decode already enforces the body shape; the core re-checks because frames
        // can reach it from other paths, and a short body must never be sliced.
        let body_fits = match h.kind {
            Kind::Write => body.len() as u64 == u64::from(h.blocks) * u64::from(BLOCK_SIZE),
            _ => body.is_empty(),
        };
        if parts.origin_site != h.sender_site
            || parts.accept_epoch != h.accept_epoch
            || !in_range
            || !body_fits
            || h.blocks == 0
        {
            self.counters.frames_foreign += 1;
            return;
        }
        if self.fenced(h) {
            self.counters.mutations_fenced += 1;
            out.push(Action::SendFrame(self.reply(Kind::WriteNack, h)));
            return;
        }
        if h.accept_epoch > self.map.epoch {
            self.counters.mutations_from_future += 1;
            return;
        }
        self.observe(h.stamp, store);
        self.last_peer_write_us = Some(now_us);
        if self.may_receive_early(h, body.len(), store) {
            self.receive_early(*h, body, store, out);
            return;
        }
        // Applied in arrival order: anything received earlier goes first.
        self.apply_received(store, out);
        for i in 0..h.blocks as usize {
            let content = match h.kind {
                Kind::Write => Content::Data(&body[i * BLOCK_BYTES..][..BLOCK_BYTES]),
                _ => Content::Zero,
            };
            self.apply_from_peer(store, h.lba + i as u64, content, h.stamp, Source::Write);
        }
        if h.flags & FLAG_FUA != 0 {
            // The WriteAck leaves after the flush at the end of this step.
            self.flush_before_actions = true;
        }
        // Applied (or superseded by a newer stamp, which is the same for every later read):
        // only now may the origin count this site in its ack.
        out.push(Action::SendFrame(self.reply(Kind::WriteAck, h)));
    }

    /// Removes a pending write matching `(seq, stamp)` and releases its window share.
    fn take_pending(&mut self, h: &Header) -> Option<PendingWrite> {
        if self.pending.get(&h.seq)?.stamp != h.stamp {
            return None;
        }
        let p = self.pending.remove(&h.seq)?;
        self.inflight_bytes -= p.wire_bytes;
        if p.is_async {
            self.async_bytes -= p.wire_bytes;
        }
        Some(p)
    }

    /// Drops one pending reference per block; returns the blocks no local write waits on.
    fn release_blocks(&mut self, lba: u64, blocks: u32) -> Vec<u64> {
        let mut settled = Vec::new();
        for b in lba..lba + u64::from(blocks) {
            if let Some(count) = self.block_pending.get_mut(&b) {
                *count -= 1;
                if *count == 0 {
                    self.block_pending.remove(&b);
                    settled.push(b);
                }
            }
        }
        settled
    }

    fn on_write_ack(
        &mut self,
        now_us: u64,
        h: &Header,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        if h.flags & FLAG_RECEIVED != 0 {
            // sync-received: at the peer and visible there; the client may have its ack. The
            // write stays pending (window, dirty bits, reads) until the peer applied it.
            if let Some(p) = self.pending.get_mut(&h.seq) {
                if p.stamp == h.stamp && !p.client_acked {
                    p.client_acked = true;
                    out.push(Action::AckClient {
                        id: p.id,
                        stamp: p.stamp,
                    });
                }
            }
            return;
        }
        if let Some(p) = self.pending.get_mut(&h.seq) {
            if p.is_async && p.stamp == h.stamp {
                // Applied at the peer, not yet durable there: the lag counts it until a
                // marker's DurableAck (§5: "counted to the peer's durable apply").
                p.peer_applied = true;
                self.send_lag_marker(now_us, out);
                return;
            }
        }
        let Some(p) = self.take_pending(h) else {
            return;
        };
        for b in self.release_blocks(p.lba, p.blocks) {
            if !self.received_blocks.contains_key(&b) {
                store.clear_dirty(b);
            }
        }
        if !p.client_acked {
            out.push(Action::AckClient {
                id: p.id,
                stamp: p.stamp,
            });
        }
        self.after_progress(now_us, store, out);
    }

    fn on_write_nack(
        &mut self,
        now_us: u64,
        h: &Header,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.take_pending(h) else {
            return;
        };
        // Fenced: the write may exist here only. Its blocks stay dirty for resync.
        self.release_blocks(p.lba, p.blocks);
        self.counters.writes_nacked += 1;
        out.push(Action::FailClient {
            id: p.id,
            error: ClientError::Io,
        });
        self.after_progress(now_us, store, out);
    }

    fn after_progress(&mut self, now_us: u64, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        self.drain_admission(now_us, store, out);
        self.serve_reads(store, out);
        self.pump_resync(now_us, store, out);
        self.check_resync_complete(store, out);
    }

    fn on_heartbeat_echo(&mut self, now_us: u64, h: &Header) {
        let Some(sent_us) = self.heartbeats.remove(&h.seq) else {
            return;
        };
        let sample_us = now_us.saturating_sub(sent_us);
        if h.flags & FLAG_LEASE != 0
            && self.map.role == Role::Loser
            && h.accept_epoch == self.map.epoch
        {
            // The lease runs from the send time of the heartbeat, which was before the grant.
            let until = sent_us.saturating_add(self.cfg.read_lease_us);
            self.read_lease_until_us =
                Some(self.read_lease_until_us.map_or(until, |u| u.max(until)));
        }
        // TCP's srtt smoothing (RFC 6298, alpha = 1/8).
        self.rtt_us_smoothed = Some(match self.rtt_us_smoothed {
            None => sample_us,
            Some(srtt) => srtt - srtt / 8 + sample_us / 8,
        });
        self.counters.rtt_samples += 1;
        self.last_rtt_sample_us = Some(now_us);
    }

    // ----- link and time -------------------------------------------------------------------

    fn on_tick(&mut self, now_us: u64, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        // Time alone ends the survivor's hold and the loser's lease.
        self.release_alone(now_us, store, out);
        if self.map.role == Role::Loser && !self.reads.is_empty() {
            self.serve_reads(store, out);
        }
        if !self.link_up {
            return;
        }
        // A heartbeat unanswered for a read lease (or a retransmit interval, if longer) is
        // taken as lost: its echo could not grant a lease that has not already run out. The
        // rest are still on their way: at the cap, this one waits rather than forgetting the
        // oldest, or with a round trip longer than cap x interval (160 ms by default) every
        // echo would find its heartbeat forgotten — no RTT sample, and no read lease for a
        // catching-up site.
        let lost_after_us = self.cfg.read_lease_us.max(self.cfg.retransmit_after_us);
        let lost_before_us = now_us.saturating_sub(lost_after_us);
        self.heartbeats
            .retain(|_, sent_us| *sent_us > lost_before_us);
        if now_us >= self.next_heartbeat_due_us
            && self.heartbeats.len() < self.cfg.heartbeats_outstanding_max
        {
            let seq = self.next_heartbeat_seq;
            self.next_heartbeat_seq += 1;
            let mut h = self.header(Kind::Heartbeat);
            h.seq = seq;
            out.push(Action::SendFrame(Frame::new(h, Vec::new())));
            self.heartbeats.insert(seq, now_us);
            self.next_heartbeat_due_us = now_us + self.cfg.heartbeat_interval_us;
        }
        let retransmit_after_us = self.cfg.retransmit_after_us;
        let due = |sent_us: u64| now_us.saturating_sub(sent_us) >= retransmit_after_us;
        let mut resend = Vec::new();
        // A survivor's writes held back after a cut go to the peer again only once it is a
        // sync target again (after its request: it must discard its divergent blocks first).
        let may_resend = self.map.role != Role::Survivor || self.peer_is_sync_target();
        for (seq, p) in self.pending.iter_mut() {
            // An async write the peer applied waits for a marker, not for a resend.
            if may_resend && !p.peer_applied && due(p.last_sent_us) {
                p.last_sent_us = now_us.max(1);
                resend.push(*seq);
            }
        }
        for seq in resend {
            if let Some(p) = self.pending.get(&seq) {
                out.push(Action::SendFrame(self.write_frame(seq, p)));
                self.counters.writes_retransmitted += 1;
            }
        }
        let in_sync = self.map.role == Role::InSync;
        let mut markers = Vec::new();
        for (seq, f) in self.flushes.iter_mut() {
            if in_sync && !f.peer_durable && due(f.last_sent_us) {
                f.last_sent_us = now_us.max(1);
                markers.push(*seq);
            }
        }
        for seq in markers {
            out.push(Action::SendFrame(self.flush_marker(seq)));
        }
        if in_sync
            && !self.untrusted.is_empty()
            && (self.settle_asked.is_empty() || self.settle_asked_us.is_none_or(due))
        {
            self.send_settle_request(now_us, out);
        }
        if let Some(ro) = self.resync_out.as_mut() {
            let stale: Vec<u64> = ro
                .in_flight
                .iter()
                .filter(|(_, (_, sent))| due(*sent))
                .map(|(b, _)| *b)
                .collect();
            for b in stale {
                ro.in_flight.remove(&b);
                ro.to_send.insert(b);
            }
        }
        if self.map.role == Role::Loser && self.loser_progress_us.is_none_or(due) {
            self.send_resync_request(now_us, store, out);
        }
        self.repair_tick(now_us, store, out);
        self.pump_resync(now_us, store, out);
        if let Some((seq, sent_us)) = self.lag_marker {
            if due(sent_us) {
                self.lag_marker = Some((seq, now_us));
                out.push(Action::SendFrame(self.flush_marker(seq)));
            }
        }
        if let Some(sw) = self.switch_out.as_mut() {
            if due(sw.sent_us) {
                sw.sent_us = now_us;
                let (seq, to) = (sw.seq, sw.to);
                out.push(Action::SendFrame(self.mode_switch_frame(seq, to)));
            }
        }
        // Time alone can lift the async lag bound's age limit only through a DurableAck;
        // the drain and the adaptive decision are time-driven.
        self.drain_admission(now_us, store, out);
        self.maybe_switch(now_us, out);
    }

    fn on_link_up(&mut self, now_us: u64, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        self.link_up = true;
        self.next_heartbeat_due_us = now_us;
        match self.map.role {
            Role::InSync => {
                // Resend every write the peer has not acked: the old connection may have lost
                // them, and applying one twice is harmless under the apply rule.
                let seqs: Vec<u64> = self.pending.keys().copied().collect();
                for seq in seqs {
                    if let Some(p) = self.pending.get_mut(&seq) {
                        p.last_sent_us = now_us.max(1);
                    }
                    if let Some(p) = self.pending.get(&seq) {
                        out.push(Action::SendFrame(self.write_frame(seq, p)));
                    }
                }
                let markers: Vec<u64> = self
                    .flushes
                    .iter_mut()
                    .filter(|(_, f)| !f.peer_durable)
                    .map(|(seq, f)| {
                        f.last_sent_us = now_us.max(1);
                        *seq
                    })
                    .collect();
                for seq in markers {
                    out.push(Action::SendFrame(self.flush_marker(seq)));
                }
                self.mode_announced = false;
                self.maybe_switch(now_us, out);
                // Dirty blocks no pending write covers are left from a link outage, or merged
                // after a double crash: push them, and the apply rule at the peer keeps
                // whichever version is newer. Untrusted blocks are never pushed: they are
                // asked for instead.
                let to_send: BTreeSet<u64> = store
                    .dirty_blocks()
                    .into_iter()
                    .filter(|b| {
                        !self.block_pending.contains_key(b) && !self.untrusted.contains_key(b)
                    })
                    .collect();
                self.resync_out = Some(ResyncOut {
                    to_send,
                    ..ResyncOut::default()
                });
                self.pump_resync(now_us, store, out);
                self.send_settle_request(now_us, out);
            }
            // The survivor waits for the loser's request: the loser must first discard its
            // divergent blocks, and only then may copies and live writes reach it.
            Role::Survivor => {}
            Role::Loser => {
                // A new session: reads wait for this session's plan.
                self.plan_chunks = None;
                self.plan_complete = false;
                self.catchup_floor = None;
                self.catchup_copied.clear();
                self.send_resync_request(now_us, store, out);
            }
        }
    }

    fn on_link_down(&mut self, now_us: u64, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        self.link_up = false;
        self.repair_abort("link down", out);
        self.heartbeats.clear();
        self.last_rtt_sample_us = None;
        // The peer may restart and lose what it applied but did not flush: every async
        // write is sent again after the reconnect, and the marker with them.
        self.lag_marker = None;
        for p in self.pending.values_mut() {
            p.peer_applied = false;
            p.lag_marker = None;
        }
        self.switch_out = None;
        self.resync_out = None;
        self.loser_progress_us = None;
        self.settle_asked.clear();
        self.settle_asked_us = None;
        if self.map.role == Role::Survivor {
            // The peer was a sync target only while connected; the survivor carries on alone
            // (once no read lease it granted can run) and its writes stay dirty for the next
            // resync.
            self.release_alone(now_us, store, out);
            self.serve_reads(store, out);
        }
    }

    fn ack_pending_alone(&mut self, out: &mut Vec<Action>) {
        self.async_bytes = 0;
        for (_, p) in std::mem::take(&mut self.pending) {
            if p.client_acked {
                continue;
            }
            self.counters.writes_acked_alone += 1;
            out.push(Action::AckClient {
                id: p.id,
                stamp: p.stamp,
            });
        }
        self.lag_marker = None;
        self.block_pending.clear();
        self.inflight_bytes = 0;
    }

    fn on_detach(
        &mut self,
        now_us: u64,
        survivor: SiteId,
        new_epoch: u32,
        fenced_before: [u32; 2],
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        // Received before the detach, and acknowledged as received: applied first, at either
        // role (the peer's client may already have its ack).
        self.apply_received(store, out);
        self.map.epoch = new_epoch;
        self.map.fenced_before = fenced_before;
        self.repair_abort("detach", out);
        self.resync_out = None;
        self.loser_progress_us = None;
        self.settle_asked.clear();
        self.settle_asked_us = None;
        // Only the survivor's flushes go on, and nobody asks the loser for durability.
        self.markers_waiting.clear();
        if survivor == self.cfg.site {
            info!(
                site = self.cfg.site,
                new_epoch, "detached the peer; serving alone"
            );
            if !self.untrusted.is_empty() {
                // The control plane must not pick an unsettled site (untrusted_blocks): the
                // peer may hold acknowledged writes this site lost in its crash.
                warn!(
                    site = self.cfg.site,
                    blocks = self.untrusted.len(),
                    "made survivor before settling; blocks lost in the crash stay lost"
                );
                self.untrusted.clear();
            }
            self.map.role = Role::Survivor;
            // This site is now the only copy: everything applied so far, and every write
            // acknowledged alone below, is flushed before the acks leave.
            self.flush_before_actions = true;
            for f in self.flushes.values_mut() {
                f.peer_durable = true;
            }
            if !self.alone_hold(now_us) {
                self.ack_pending_alone(out);
            }
        } else {
            info!(
                site = self.cfg.site,
                new_epoch, "detached; failing queued requests"
            );
            self.map.role = Role::Loser;
            self.plan_chunks = None;
            self.plan_complete = false;
            self.read_lease_until_us = None;
            self.catchup_floor = None;
            self.catchup_copied.clear();
            // Fenced: whatever these writes did here is settled by resync; the clients learn
            // EIO and the request is never re-issued. A write already acknowledged (received
            // by the survivor under sync-received) is the survivor's to keep.
            self.async_bytes = 0;
            for (_, p) in std::mem::take(&mut self.pending) {
                if !p.client_acked {
                    out.push(Action::FailClient {
                        id: p.id,
                        error: ClientError::Io,
                    });
                }
            }
            self.lag_marker = None;
            self.block_pending.clear();
            self.inflight_bytes = 0;
            for (_, f) in std::mem::take(&mut self.flushes) {
                out.push(Action::FailClient {
                    id: f.id,
                    error: ClientError::Io,
                });
            }
        }
        // Alone or fenced, the policy's mode means nothing until the rejoin.
        self.reset_mode();
        self.drain_admission(now_us, store, out);
        self.serve_reads(store, out);
        if self.map.role == Role::Loser && self.link_up {
            self.send_resync_request(now_us, store, out);
        }
    }

    fn on_rejoin(&mut self, new_epoch: u32, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        info!(site = self.cfg.site, new_epoch, "rejoined; in sync");
        self.map.epoch = new_epoch;
        self.map.role = Role::InSync;
        self.plan_chunks = None;
        self.plan_complete = false;
        self.read_lease_until_us = None;
        self.catchup_floor = None;
        self.catchup_copied = BTreeSet::new();
        self.repair_abort("rejoin", out);
        self.repair.unrecoverable.clear();
        self.resync_out = None;
        self.loser_progress_us = None;
        // Both start again from sync; the leader switches (and tells the peer) from there.
        self.reset_mode();
        self.serve_reads(store, out);
    }

    // ----- ack policies (DESIGN.md §5; see `policy`) ----------------------------------------

    /// The site that leads mode switches: the current async writer while it hands over to
    /// the other site, else the policy's active site.
    fn leader(&self) -> u8 {
        match self.mode {
            Mode::Async { active } if active != self.policy.active_site => active,
            _ => self.policy.active_site,
        }
    }

    /// This site is the one writer of `async`.
    fn is_async_writer(&self) -> bool {
        self.mode_known
            && self.mode
                == (Mode::Async {
                    active: self.cfg.site,
                })
    }

    /// The passive site of `async` refuses client I/O (§5): its copy lags by design. So does
    /// a site whose policy names the other site the async writer, from the moment it learns
    /// the policy (refusing is always safe; the switch follows).
    fn refuses_io(&self) -> bool {
        let passive_mode = self.mode_known
            && matches!(self.mode, Mode::Async { active } if active != self.cfg.site);
        let passive_policy =
            self.policy.ack == AckPolicy::Async && self.policy.active_site != self.cfg.site;
        passive_mode || passive_policy
    }

    /// Back to `sync` (start, detach, rejoin). A site that does not lead an async or
    /// adaptive policy waits to hear the leader's mode before it serves.
    fn reset_mode(&mut self) {
        self.mode = match self.policy.ack {
            AckPolicy::SyncReceived => Mode::SyncReceived,
            _ => Mode::Sync,
        };
        let leads = self.leader() == self.cfg.site;
        self.mode_known = self.map.role != Role::InSync
            || leads
            || matches!(self.policy.ack, AckPolicy::Sync | AckPolicy::SyncReceived);
        self.mode_announced = false;
        self.switch_out = None;
        self.draining = false;
        self.lag_marker = None;
    }

    fn set_mode(&mut self, mode: Mode) {
        let was_known = self.mode_known;
        self.mode_known = true;
        if self.mode == mode && was_known {
            return;
        }
        info!(
            site = self.cfg.site,
            from = self.mode.name(),
            to = mode.name(),
            ?mode,
            "ack mode switched"
        );
        self.mode = mode;
        self.counters.mode_switches += 1;
    }

    fn on_set_policy(
        &mut self,
        now_us: u64,
        policy: Policy,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        if policy == self.policy {
            return;
        }
        info!(site = self.cfg.site, ?policy, "ack policy changed");
        self.policy = policy;
        // An operator's change takes effect now, not after a dwell or a refusal's back-off.
        self.switch_retry_at_us = 0;
        // Between sync and sync-received nothing needs agreeing: each write frame carries
        // its origin's mode, so each site's stream switches at its own next seq.
        if !matches!(self.mode, Mode::Async { .. }) {
            match policy.ack {
                AckPolicy::Sync => self.set_mode(Mode::Sync),
                AckPolicy::SyncReceived => self.set_mode(Mode::SyncReceived),
                AckPolicy::Async | AckPolicy::Adaptive => {}
            }
        }
        self.drain_admission(now_us, store, out);
        self.serve_reads(store, out);
        self.maybe_switch(now_us, out);
    }

    /// Leader only: starts the switch to the mode the policy wants now, once the preconditions
    /// hold. Leaving `async` (or handing it over) drains first: new writes wait until every
    /// async write is durable at the peer, so the peer is never behind a site it does not
    /// know is ahead.
    fn maybe_switch(&mut self, now_us: u64, out: &mut Vec<Action>) {
        if self.leader() != self.cfg.site
            || self.map.role != Role::InSync
            || !self.link_up
            || self.switch_out.is_some()
            || !self.untrusted.is_empty()
        {
            return;
        }
        let fresh_rtt = self.rtt_us_smoothed.filter(|_| {
            self.last_rtt_sample_us.is_some_and(|t| {
                now_us.saturating_sub(t) <= 4 * self.cfg.heartbeat_interval_us.max(1)
            })
        });
        let peer_quiet = self
            .last_peer_write_us
            .is_none_or(|t| now_us.saturating_sub(t) >= self.policy.single_writer_quiet_us);
        let target = desired_mode(&self.policy, self.mode, fresh_rtt, peer_quiet);
        if target == self.mode && self.mode_announced {
            self.draining = false;
            return;
        }
        // A real change waits out a refusal's back-off and adaptive's dwell; telling the
        // peer the mode in force (after a reconnect) never waits.
        if target != self.mode && now_us < self.switch_retry_at_us {
            return;
        }
        if self.is_async_writer() && target != self.mode {
            self.draining = true;
            if !self.pending.is_empty() {
                self.send_lag_marker(now_us, out);
                return;
            }
        }
        let seq = self.alloc_seq();
        self.switch_out = Some(SwitchOut {
            seq,
            to: target,
            sent_us: now_us,
        });
        out.push(Action::SendFrame(self.mode_switch_frame(seq, target)));
    }

    fn mode_switch_frame(&self, seq: u64, to: Mode) -> Frame {
        let mut h = self.header(Kind::ModeSwitch);
        h.seq = seq;
        h.lba = to.encode();
        Frame::new(h, Vec::new())
    }

    /// The peer leads a switch. Into `async` with the peer as writer, this site must stop
    /// writing: it refuses while a write of its own is in flight or queued, and under
    /// `adaptive` while it wrote within the quiet period (one site alone writes, §5).
    fn on_mode_switch(
        &mut self,
        now_us: u64,
        h: &Header,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let Some(to) = Mode::decode(h.lba) else {
            self.counters.frames_foreign += 1;
            return;
        };
        if self.map.role != Role::InSync || h.accept_epoch != self.map.epoch {
            return;
        }
        let mut reply = self.reply(Kind::ModeSwitchAck, h);
        let becomes_passive = matches!(to, Mode::Async { active } if active != self.cfg.site);
        let wrote_recently = self
            .last_local_write_us
            .is_some_and(|t| now_us.saturating_sub(t) < self.policy.single_writer_quiet_us);
        let refuse = becomes_passive
            && (!self.pending.is_empty()
                || !self.admission.is_empty()
                || (self.policy.ack == AckPolicy::Adaptive && wrote_recently));
        if refuse {
            reply.header.flags |= FLAG_REFUSED;
            out.push(Action::SendFrame(reply));
            return;
        }
        self.set_mode(to);
        out.push(Action::SendFrame(reply));
        self.drain_admission(now_us, store, out);
        self.serve_reads(store, out);
    }

    fn on_mode_switch_ack(
        &mut self,
        now_us: u64,
        h: &Header,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let Some(sw) = self.switch_out.take_if(|sw| sw.seq == h.seq) else {
            return;
        };
        if h.flags & FLAG_REFUSED != 0 {
            self.counters.mode_switches_refused += 1;
            self.switch_retry_at_us = now_us + 4 * self.cfg.retransmit_after_us;
            self.draining = false;
            info!(
                site = self.cfg.site,
                to = sw.to.name(),
                "the peer refused the mode switch"
            );
            self.after_progress(now_us, store, out);
            return;
        }
        let changed = self.mode != sw.to;
        self.set_mode(sw.to);
        self.mode_announced = true;
        self.draining = false;
        if changed && self.policy.ack == AckPolicy::Adaptive {
            self.switch_retry_at_us = now_us + ADAPTIVE_DWELL_US;
        }
        self.after_progress(now_us, store, out);
    }

    /// `async`: asks the peer to make durable every write it has applied so far (a
    /// FlushMarker); its DurableAck releases them from the lag.
    fn send_lag_marker(&mut self, now_us: u64, out: &mut Vec<Action>) {
        if self.lag_marker.is_some() || !self.link_up {
            return;
        }
        let covered: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.is_async && p.peer_applied && p.lag_marker.is_none())
            .map(|(seq, _)| *seq)
            .collect();
        if covered.is_empty() {
            return;
        }
        let seq = self.alloc_seq();
        for c in covered {
            if let Some(p) = self.pending.get_mut(&c) {
                p.lag_marker = Some(seq);
            }
        }
        self.lag_marker = Some((seq, now_us));
        out.push(Action::SendFrame(self.flush_marker(seq)));
    }

    /// `async`: the peer made durable every write covered by marker `seq`.
    fn release_durable(&mut self, seq: u64, store: &mut dyn BlockStore) {
        self.lag_marker = None;
        let done: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.lag_marker == Some(seq))
            .map(|(s, _)| *s)
            .collect();
        for s in done {
            if let Some(p) = self.pending.remove(&s) {
                self.inflight_bytes -= p.wire_bytes;
                if p.is_async {
                    self.async_bytes -= p.wire_bytes;
                }
                for b in self.release_blocks(p.lba, p.blocks) {
                    if !self.received_blocks.contains_key(&b) {
                        store.clear_dirty(b);
                    }
                }
            }
        }
    }

    /// `sync-received`: a received mutation may be acknowledged before its apply when its
    /// origin asks for it, it is not FUA (durable before the ack), this site is in sync and
    /// settled for its blocks, and the queue has room. Otherwise it is applied first.
    fn may_receive_early(&self, h: &Header, body_bytes: usize, store: &dyn BlockStore) -> bool {
        h.flags & FLAG_ACK_ON_RECEIVE != 0
            && h.flags & FLAG_FUA == 0
            && self.map.role == Role::InSync
            && self.received_bytes + body_bytes <= self.cfg.receive_queue_bytes_max
            && !(h.lba..h.lba + u64::from(h.blocks)).any(|b| self.untrusted.contains_key(&b))
            && h.lba + u64::from(h.blocks) <= store.blocks()
    }

    /// Queues a received mutation and acknowledges its receipt. Its blocks are dirty from
    /// now on: the activity log covers it if this site crashes before the apply (the origin
    /// keeps it pending until the apply is acknowledged, and a restart settles the blocks
    /// from the origin), and reads here wait for the apply, so a read that starts after the
    /// origin's ack sees the write (invariant 4).
    fn receive_early(
        &mut self,
        header: Header,
        body: Vec<u8>,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        for b in header.lba..header.lba + u64::from(header.blocks) {
            if !store.is_dirty(b) && self.cfg.fault != Fault::ReceivedNotVisible {
                store.mark_dirty(b);
            }
            *self.received_blocks.entry(b).or_insert(0) += 1;
        }
        self.received_bytes += body.len();
        self.counters.writes_received_early += 1;
        let mut ack = self.reply(Kind::WriteAck, &header);
        ack.header.flags |= FLAG_RECEIVED;
        out.push(Action::SendFrame(ack));
        self.received.push_back(Received { header, body });
        if !self.apply_requested {
            self.apply_requested = true;
            out.push(Action::ApplyReceived);
        }
    }

    /// Applies every queued received mutation, in order, and acknowledges each apply.
    fn apply_received(&mut self, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        self.apply_requested = false;
        while let Some(Received { header: h, body }) = self.received.pop_front() {
            self.received_bytes -= body.len();
            for i in 0..h.blocks as usize {
                let lba = h.lba + i as u64;
                let content = match h.kind {
                    Kind::Write => Content::Data(&body[i * BLOCK_BYTES..][..BLOCK_BYTES]),
                    _ => Content::Zero,
                };
                self.apply_from_peer(store, lba, content, h.stamp, Source::Write);
                if let Some(count) = self.received_blocks.get_mut(&lba) {
                    *count -= 1;
                    if *count == 0 {
                        self.received_blocks.remove(&lba);
                        // Clean once nothing else keeps it dirty: a local write waiting for
                        // the peer, an unsettled crash, or a push to the peer in progress.
                        let pushing = self.resync_out.as_ref().is_some_and(|r| {
                            r.to_send.contains(&lba) || r.in_flight.contains_key(&lba)
                        });
                        if self.map.role == Role::InSync
                            && !self.waits_on(lba)
                            && !self.untrusted.contains_key(&lba)
                            && !pushing
                        {
                            store.clear_dirty(lba);
                        }
                    }
                }
            }
            out.push(Action::SendFrame(self.reply(Kind::WriteAck, &h)));
        }
    }

    // ----- resync --------------------------------------------------------------------------

    /// Loser: discard divergent blocks once per epoch, then ask for every dirty block.
    fn send_resync_request(
        &mut self,
        now_us: u64,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        if !self.link_up {
            return;
        }
        self.loser_progress_us = Some(now_us);
        if store.resync_reset_epoch() != self.map.epoch {
            if self.cfg.fault != Fault::ResyncByStamp {
                let mut data = vec![0u8; BLOCK_BYTES];
                for lba in store.dirty_blocks() {
                    let stamp = store.read(lba, &mut data);
                    if stamp != Stamp::ZERO {
                        self.counters.divergent_blocks_saved += 1;
                        out.push(Action::SaveDivergent {
                            lba,
                            data: data.clone(),
                            stamp,
                        });
                    }
                    // ZERO loses to every copy and every live write of the survivor.
                    store.write(lba, Content::Zero, Stamp::ZERO);
                }
                // The reset must be durable before it is recorded as done: a restart would
                // not repeat it, and a divergent block a crash brought back would win over
                // the survivor's copies by its stamp. The untrusted blocks (all dirty) are
                // now known zeroes.
                store.flush();
                self.untrusted.clear();
                self.settle_asked.clear();
            }
            store.persist_resync_reset_epoch(self.map.epoch);
        }
        let dirty = store.dirty_blocks();
        let request_id = self.alloc_seq();
        self.catchup_floor.get_or_insert(request_id);
        self.send_lba_list(request_id, 0, &dirty, out);
    }

    /// The most chunks a list of this volume's LBAs can take (`send_lba_list`): every block
    /// once, plus one for the empty list.
    fn chunks_max(&self, blocks: u64) -> u64 {
        let per_chunk = self.cfg.resync_request_lbas_max.max(1) as u64;
        blocks.div_ceil(per_chunk).max(1)
    }

    /// A list of LBAs as ResyncRequest frames with `flags`: `blocks` chunks of at most
    /// `resync_request_lbas_max` under one id (`seq`), the chunk index in `lba`, so the
    /// receiver counts distinct chunks and never takes a lost one for the end. An empty list
    /// is one empty chunk.
    fn send_lba_list(&self, id: u64, flags: u32, lbas: &[u64], out: &mut Vec<Action>) {
        let chunk_lbas = self.cfg.resync_request_lbas_max.max(1);
        let chunks: Vec<&[u64]> = if lbas.is_empty() {
            vec![&[][..]]
        } else {
            lbas.chunks(chunk_lbas).collect()
        };
        let chunk_count = chunks.len() as u32;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut h = self.header(Kind::ResyncRequest);
            h.flags |= flags;
            h.seq = id;
            h.lba = i as u64;
            h.blocks = chunk_count;
            let body: Vec<u8> = chunk.iter().flat_map(|b| b.to_le_bytes()).collect();
            out.push(Action::SendFrame(Frame::new(h, body)));
        }
    }

    /// In sync after a restart: asks the peer for the next batch of untrusted blocks. One
    /// batch at a time, resent after `retransmit_after_us`; the peer's copies settle them.
    fn send_settle_request(&mut self, now_us: u64, out: &mut Vec<Action>) {
        if !self.link_up || self.map.role != Role::InSync || self.untrusted.is_empty() {
            return;
        }
        let batch: Vec<u64> = self
            .untrusted
            .keys()
            .take(self.cfg.resync_request_lbas_max.max(1))
            .copied()
            .collect();
        self.settle_asked = batch.iter().copied().collect();
        self.settle_asked_us = Some(now_us);
        let mut h = self.header(Kind::ResyncRequest);
        h.seq = self.alloc_seq();
        // One chunk, index 0: the shape of a loser's request.
        h.blocks = 1;
        let body: Vec<u8> = batch.iter().flat_map(|b| b.to_le_bytes()).collect();
        self.counters.settle_requests_sent += 1;
        out.push(Action::SendFrame(Frame::new(h, body)));
    }

    fn on_resync_request(
        &mut self,
        now_us: u64,
        h: &Header,
        body: &[u8],
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        if h.blocks == 0 || h.lba >= u64::from(h.blocks) {
            self.counters.frames_foreign += 1;
            return;
        }
        if h.accept_epoch != self.map.epoch || !self.link_up {
            return;
        }
        if h.flags & FLAG_PLAN != 0 {
            self.on_plan(h, body, store, out);
            return;
        }
        match self.map.role {
            Role::Loser => return,
            Role::Survivor if h.flags & FLAG_PRIORITY != 0 => {
                // Blocks a read at the catching-up peer waits for: copied before the rest.
                let blocks = store.blocks();
                if let Some(ro) = self.resync_out.as_mut() {
                    for lba in crate::frame::body_lbas(body) {
                        if lba < blocks
                            && ro.to_send.contains(&lba)
                            && ro.priority.len() < PRIORITY_BLOCKS_MAX
                        {
                            ro.priority.insert(lba);
                        }
                    }
                    self.pump_resync(now_us, store, out);
                }
                return;
            }
            Role::InSync => {
                // A restarted peer settling its untrusted blocks: send our version of each.
                let blocks = store.blocks();
                let Some(ro) = self.resync_out.as_mut() else {
                    return;
                };
                queue_requested(ro, body, blocks, &mut self.counters);
                self.pump_resync(now_us, store, out);
                return;
            }
            Role::Survivor => {}
        }
        if self.resync_out.is_none() {
            info!(
                site = self.cfg.site,
                "peer catching up; it is a sync target from now on"
            );
            let dirty = store.dirty_blocks();
            // The copy plan first: every block this site wrote alone, which the peer cannot
            // know of. Live writes and copies only follow it on the link.
            self.send_plan(h.seq, &dirty, out);
            self.resync_out = Some(ResyncOut {
                request_id: h.seq,
                first_request_id: h.seq,
                to_send: dirty.into_iter().collect(),
                ..ResyncOut::default()
            });
        }
        if self
            .resync_out
            .as_ref()
            .is_some_and(|ro| h.seq > ro.request_id)
        {
            // A newer request of the loser: its first request of this session may have been
            // lost or overtaken, and the loser takes plans and copies only from its own
            // session's requests on. Re-plan under the new id; copies sent from now on carry
            // it (in-flight ones are resent under it when their acks do not match).
            // Every block the loser marks stale must be copied after the plan, or it stays
            // dirty there for good: the plan is what is left to copy plus every block dirty
            // here now (blocks of live writes in flight too: the loser may mark one after
            // applying the write), and all of it is queued for copying.
            if let Some(ro) = self.resync_out.as_mut() {
                let mut plan: BTreeSet<u64> = store.dirty_blocks().into_iter().collect();
                plan.extend(ro.to_send.iter().copied());
                plan.extend(ro.in_flight.keys().copied());
                for &b in &plan {
                    if !ro.in_flight.contains_key(&b) {
                        ro.to_send.insert(b);
                    }
                }
                ro.request_id = h.seq;
                let plan: Vec<u64> = plan.into_iter().collect();
                self.send_plan(h.seq, &plan, out);
            }
        }
        let blocks = store.blocks();
        let chunks_max = self.chunks_max(blocks);
        let Some(ro) = self.resync_out.as_mut() else {
            return;
        };
        queue_requested(ro, body, blocks, &mut self.counters);
        match note_chunk(&mut ro.request_chunks, h, chunks_max) {
            Chunk::Complete => ro.request_complete = true,
            Chunk::Garbage => self.counters.frames_foreign += 1,
            Chunk::Counted | Chunk::Stale => {}
        }
        self.pump_resync(now_us, store, out);
        self.check_resync_complete(store, out);
    }

    fn pump_resync(&mut self, now_us: u64, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        if !self.link_up {
            return;
        }
        // A copy is this site's current version: writes received and acked as received go
        // in first, or a copy could carry an older version than one this site acknowledged
        // (the simulator found a restarted origin settling on exactly that).
        if !self.received.is_empty()
            && self
                .resync_out
                .as_ref()
                .is_some_and(|r| !r.to_send.is_empty())
        {
            self.apply_received(store, out);
        }
        let limit = self.cfg.resync_blocks_in_flight_max;
        let header = self.header(Kind::ResyncBlock);
        let untrusted = &self.untrusted;
        let Some(ro) = self.resync_out.as_mut() else {
            return;
        };
        let mut data = vec![0u8; BLOCK_BYTES];
        let mut unreadable = Vec::new();
        while ro.in_flight.len() < limit {
            // A block a read at the peer waits for goes first.
            let next = loop {
                match ro.priority.pop_first() {
                    Some(lba) if ro.to_send.remove(&lba) => break Some(lba),
                    Some(_) => continue,
                    None => break ro.to_send.pop_first(),
                }
            };
            let Some(lba) = next else {
                break;
            };
            // A block that fails its checksum is never sent: the peer would take it as the
            // truth (a survivor's copies win unconditionally). See `copies_unreadable`.
            let Some(stamp) = store.read_checked(lba, &mut data) else {
                unreadable.push(lba);
                continue;
            };
            self.repair.unrecoverable.remove(&lba);
            let mut h = header;
            h.lba = lba;
            h.blocks = 1;
            h.stamp = stamp;
            h.seq = ro.request_id;
            if untrusted.contains_key(&lba) {
                // Asked for by a peer that crashed too: our version may be stale as well.
                h.flags |= FLAG_UNTRUSTED;
            }
            // A tombstone or an all-zero block travels without a body.
            let body = if data.iter().all(|&x| x == 0) {
                Vec::new()
            } else {
                data.clone()
            };
            out.push(Action::SendFrame(Frame::new(h, body)));
            ro.in_flight.insert(lba, (stamp, now_us.max(1)));
            self.counters.resync_blocks_sent += 1;
        }
        if !unreadable.is_empty() {
            self.copies_unreadable(unreadable, out);
        }
    }

    fn on_resync_block(
        &mut self,
        now_us: u64,
        h: &Header,
        body: &[u8],
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        if h.lba >= store.blocks()
            || h.blocks != 1
            || !(body.is_empty() || body.len() == BLOCK_BYTES)
        {
            self.counters.frames_foreign += 1;
            return;
        }
        if self.fenced(h) {
            self.counters.mutations_fenced += 1;
            return;
        }
        if h.accept_epoch > self.map.epoch {
            self.counters.mutations_from_future += 1;
            return;
        }
        self.observe(h.stamp, store);
        let content = if body.is_empty() {
            Content::Zero
        } else {
            Content::Data(body)
        };
        let source = if h.flags & FLAG_UNTRUSTED != 0 && self.cfg.fault != Fault::NoSettle {
            Source::UntrustedCopy
        } else {
            Source::Copy
        };
        if self.apply_from_peer(store, h.lba, content, h.stamp, source) {
            self.counters.resync_blocks_applied += 1;
        }
        // A loser's block is settled by a copy sent in this epoch, i.e. after its divergent
        // version was discarded, and in this link session, i.e. after the plan that marked
        // the block stale. Copies from before the detach or of an earlier session settle
        // nothing (the survivor copies every such block again in this session).
        if self.map.role == Role::Loser {
            if h.accept_epoch == self.map.epoch
                && store.resync_reset_epoch() == self.map.epoch
                && self.catchup_floor.is_some_and(|floor| h.seq >= floor)
            {
                store.clear_dirty(h.lba);
                self.catchup_copied.insert(h.lba);
                self.loser_progress_us = Some(now_us);
            } else {
                // Not taken as settling the block: no ack, or the survivor would count it
                // copied. It sends the block again under this session's request.
                self.serve_reads(store, out);
                return;
            }
        }
        out.push(Action::SendFrame(self.reply(Kind::ResyncAck, h)));
        // A settled block may be what a waiting read waits for.
        self.serve_reads(store, out);
    }

    fn on_resync_ack(
        &mut self,
        now_us: u64,
        h: &Header,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let untrusted = self.untrusted.contains_key(&h.lba);
        let Some(ro) = self.resync_out.as_mut() else {
            return;
        };
        // An ack of a copy of an earlier link session (same block, same stamp) says nothing
        // about this session's copy: the loser cleans only on copies of its own session.
        if h.seq >= ro.first_request_id
            && ro
                .in_flight
                .get(&h.lba)
                .is_some_and(|(stamp, _)| *stamp == h.stamp)
        {
            ro.in_flight.remove(&h.lba);
            // The peer now holds this version or a newer one. The block here changed since
            // only by a peer write (which the peer has) or by a local write still pending
            // (whose own ack cleans the block), so it is clean unless a local write waits
            // or our copy was itself untrusted.
            if !self.waits_on(h.lba) && !untrusted {
                store.clear_dirty(h.lba);
            }
        }
        self.after_progress(now_us, store, out);
    }

    /// Survivor: tells a catching-up loser which blocks it will copy (its own dirty blocks;
    /// the loser's are dirty there already), chunked like a request under one plan id.
    fn send_plan(&mut self, request_id: u64, dirty: &[u64], out: &mut Vec<Action>) {
        // The plan's id is the request's: the loser takes only plans of its own session.
        self.send_lba_list(request_id, FLAG_PLAN, dirty, out);
    }

    /// Loser: a chunk of the survivor's copy plan. Its blocks are marked dirty (persistently:
    /// a restart still knows them stale); once every chunk of the plan arrived in this link
    /// session, a block clean here is current and reads may be served.
    fn on_plan(
        &mut self,
        h: &Header,
        body: &[u8],
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        // Only after this epoch's reset: before it, this site's dirty list is not yet final
        // and a mark would be zeroed with the divergent blocks (harmless but pointless).
        if self.map.role != Role::Loser
            || h.accept_epoch != self.map.epoch
            || store.resync_reset_epoch() != self.map.epoch
            || self.catchup_floor.is_none_or(|floor| h.seq < floor)
        {
            return;
        }
        let blocks = store.blocks();
        let chunks_max = self.chunks_max(blocks);
        let chunk = note_chunk(&mut self.plan_chunks, h, chunks_max);
        if chunk == Chunk::Garbage {
            // No list of this volume has such a chunk: mark nothing from it.
            self.counters.frames_foreign += 1;
            return;
        }
        for lba in crate::frame::body_lbas(body) {
            if lba >= blocks {
                self.counters.frames_foreign += 1;
                continue;
            }
            if self.catchup_copied.contains(&lba) {
                continue;
            }
            if !store.is_dirty(lba) {
                store.mark_dirty(lba);
            }
            self.counters.plan_blocks_marked += 1;
        }
        if chunk == Chunk::Complete && !self.plan_complete {
            self.plan_complete = true;
            info!(
                site = self.cfg.site,
                "copy plan complete: serving reads of resynced blocks while catching up"
            );
            self.serve_reads(store, out);
        }
    }

    /// Loser: asks the survivor to copy the stale blocks of `read` before the rest.
    fn send_priority_request(
        &mut self,
        read: &WaitingRead,
        store: &dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        if !self.link_up {
            return;
        }
        let lbas: Vec<u64> = (read.lba..read.lba + u64::from(read.blocks))
            .filter(|&b| store.is_dirty(b))
            .take(self.cfg.resync_request_lbas_max.max(1))
            .collect();
        if lbas.is_empty() {
            return;
        }
        let mut h = self.header(Kind::ResyncRequest);
        h.flags |= FLAG_PRIORITY;
        h.seq = self.alloc_seq();
        h.blocks = 1;
        let body: Vec<u8> = lbas.iter().flat_map(|b| b.to_le_bytes()).collect();
        out.push(Action::SendFrame(Frame::new(h, body)));
    }

    fn check_resync_complete(&mut self, store: &dyn BlockStore, out: &mut Vec<Action>) {
        if self.map.role != Role::Survivor || !self.link_up {
            return;
        }
        let idle = self.pending.is_empty() && self.admission.is_empty();
        let epoch = self.map.epoch;
        let Some(ro) = self.resync_out.as_mut() else {
            return;
        };
        if ro.request_complete
            && !ro.complete_reported
            && ro.to_send.is_empty()
            && ro.in_flight.is_empty()
            && idle
            && store.dirty_blocks().is_empty()
            && self.repair.unrecoverable.is_empty()
        {
            ro.complete_reported = true;
            info!(
                site = self.cfg.site,
                epoch, "resync complete; ready to rejoin"
            );
            out.push(Action::ResyncComplete { epoch });
        }
    }
}

/// What one chunk of a chunked LBA list did to its count (see [`note_chunk`]).
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// Counted; the list is not complete yet.
    Counted,
    /// Counted, and every chunk of the list has now arrived.
    Complete,
    /// Of an older list than the one being counted: ignored.
    Stale,
    /// A chunk index or count no list of this volume can have: ignored (and counted foreign).
    Garbage,
}

/// Counts chunk `h.lba` of the list `h.seq` of `h.blocks` chunks ([`Replica::send_lba_list`])
/// in `chunks`: a newer list replaces an older one, a chunk of an older list changes
/// nothing. A chunk index not below the count, or a count above `chunks_max`, is garbage,
/// so the set never holds more than `chunks_max` entries.
fn note_chunk(chunks: &mut Option<(u64, BTreeSet<u64>)>, h: &Header, chunks_max: u64) -> Chunk {
    let count = u64::from(h.blocks);
    if count == 0 || count > chunks_max || h.lba >= count {
        return Chunk::Garbage;
    }
    match chunks.as_mut() {
        Some((id, _)) if *id > h.seq => return Chunk::Stale,
        Some((id, seen)) if *id == h.seq => {
            seen.insert(h.lba);
        }
        _ => *chunks = Some((h.seq, BTreeSet::from([h.lba]))),
    }
    if chunks
        .as_ref()
        .is_some_and(|(_, seen)| seen.len() as u64 >= count)
    {
        Chunk::Complete
    } else {
        Chunk::Counted
    }
}

/// Queues every LBA of a ResyncRequest body (little-endian u64s) that lies in the volume;
/// one out of range is counted as foreign, never sent.
fn queue_requested(ro: &mut ResyncOut, body: &[u8], blocks: u64, counters: &mut Counters) {
    for lba in crate::frame::body_lbas(body) {
        if lba < blocks {
            ro.to_send.insert(lba);
        } else {
            counters.frames_foreign += 1;
        }
    }
}
