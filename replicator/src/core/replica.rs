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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use stretch_engine::{Stamp, BLOCK_SIZE};
use tracing::{debug, info, warn};

use super::{
    Action, BlockStore, ClientError, ClientOpId, Config, Content, Event, Fault, MapView, Role,
};
use crate::frame::{Frame, Header, Kind, BODY_BYTES_MAX};
use crate::stamp::{Hlc, SiteId, StampParts};

const BLOCK_BYTES: usize = BLOCK_SIZE as usize;

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
    counters: Counters,
}

impl Replica {
    /// Starts (or restarts after a crash) from the store and the committed map. Volatile
    /// state of an earlier incarnation is gone: its pending writes' blocks are still dirty
    /// in the store and are settled with the peer on the next link-up.
    pub fn start(cfg: Config, now_us: u64, map: MapView, store: &mut dyn BlockStore) -> Replica {
        assert!(cfg.site < 2, "a stretched volume has sites 0 and 1");
        // A single write must always fit an empty window, or it could never be sent.
        assert!(cfg.window_bytes_max >= BODY_BYTES_MAX as usize + crate::frame::HEADER_BYTES);
        let hlc = Hlc::start(now_us, store.hlc_high_water(), store.max_stamp());
        // Seqs start at the clock so a restarted site never reuses an earlier seq; acks are
        // matched on (seq, stamp) besides.
        let next_seq = hlc.current();
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
            counters: Counters::default(),
        };
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

    pub fn hlc(&self) -> u64 {
        self.hlc.current()
    }

    /// Nothing waiting, nothing in flight, nothing dirty: with the peer also quiescent and
    /// no frame on the wire, invariant 1 (convergence) must hold.
    pub fn is_quiescent(&self, store: &dyn BlockStore) -> bool {
        self.pending.is_empty()
            && self.admission.is_empty()
            && self.reads.is_empty()
            && self
                .resync_out
                .as_ref()
                .is_none_or(|r| r.to_send.is_empty() && r.in_flight.is_empty())
            && store.dirty_blocks().is_empty()
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
        match event {
            Event::ClientWrite { id, lba, data } => {
                if data.is_empty() || data.len() % BLOCK_BYTES != 0 {
                    out.push(Action::FailClient {
                        id,
                        error: ClientError::Invalid,
                    });
                    return;
                }
                let blocks = (data.len() / BLOCK_BYTES) as u64;
                self.client_mutation(now_us, id, lba, blocks, Mutation::Write(data), store, out);
            }
            Event::ClientTrim { id, lba, blocks } => {
                self.client_mutation(now_us, id, lba, blocks.into(), Mutation::Trim, store, out)
            }
            Event::ClientWriteZeroes { id, lba, blocks } => self.client_mutation(
                now_us,
                id,
                lba,
                blocks.into(),
                Mutation::WriteZeroes,
                store,
                out,
            ),
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
        }
        self.persist_hlc(store);
    }

    fn persist_hlc(&mut self, store: &mut dyn BlockStore) {
        if let Some(mark) = self.hlc.high_water_to_persist() {
            store.persist_hlc_high_water(mark);
        }
    }

    // ----- client requests -----------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn client_mutation(
        &mut self,
        now_us: u64,
        id: ClientOpId,
        lba: u64,
        blocks: u64,
        mutation: Mutation,
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
        };
        match self.map.role {
            Role::Loser => out.push(Action::FailClient {
                id,
                error: ClientError::Io,
            }),
            Role::Survivor if !self.peer_is_sync_target() => {
                self.accept_alone(now_us, queued, store, out)
            }
            _ => {
                let wire = crate::frame::HEADER_BYTES + queued.mutation.body_bytes();
                if self.admission.is_empty() && self.window_has_room(wire) {
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

    fn window_has_room(&self, wire_bytes: usize) -> bool {
        self.pending.len() < self.cfg.writes_in_flight_max
            && (self.pending.is_empty()
                || self.inflight_bytes + wire_bytes <= self.cfg.window_bytes_max)
    }

    /// A stamp above every covered block's current stamp, or `None` if a covered block
    /// carries an epoch this site has not reached (it must not write until it learns it).
    fn stamp_for(
        &mut self,
        now_us: u64,
        lba: u64,
        blocks: u32,
        store: &dyn BlockStore,
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
        let seq = self.next_seq;
        self.next_seq += 1;
        let wire_bytes = crate::frame::HEADER_BYTES + q.mutation.body_bytes();
        let mut p = PendingWrite {
            id: q.id,
            lba: q.lba,
            blocks: q.blocks,
            mutation: q.mutation,
            stamp,
            accept_epoch: self.map.epoch,
            last_sent_us: 0,
            wire_bytes,
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
                    let Some(q) = self.admission.pop_front() else {
                        break;
                    };
                    self.accept_alone(now_us, q, store, out);
                }
                _ => {
                    let wire = crate::frame::HEADER_BYTES + front.mutation.body_bytes();
                    if !self.window_has_room(wire) {
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
        if self.map.role == Role::Loser {
            out.push(Action::FailClient {
                id,
                error: ClientError::Io,
            });
            return;
        }
        let read = WaitingRead { id, lba, blocks };
        // Reads are independent: one waiting for a block never holds back a read of others.
        if self.can_serve(&read, store) {
            out.push(self.serve(&read, store));
        } else if self.reads.len() < self.cfg.reads_waiting_max {
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
            Role::Survivor => true,
            Role::Loser => false,
            Role::InSync => {
                self.cfg.fault == Fault::ReadsDontWait
                    || !(read.lba..read.lba + u64::from(read.blocks)).any(|b| store.is_dirty(b))
            }
        }
    }

    fn serve(&self, read: &WaitingRead, store: &dyn BlockStore) -> Action {
        let mut data = vec![0u8; read.blocks as usize * BLOCK_BYTES];
        let mut stamps = Vec::with_capacity(read.blocks as usize);
        for (i, chunk) in data.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            stamps.push(store.read(read.lba + i as u64, chunk));
        }
        Action::ReadDone {
            id: read.id,
            data,
            stamps,
        }
    }

    /// Serves every waiting read that can now be served. A read is independent of the
    /// others, so one blocked read does not hold back reads of other blocks.
    fn serve_reads(&mut self, store: &dyn BlockStore, out: &mut Vec<Action>) {
        if self.reads.is_empty() {
            return;
        }
        let mut still = VecDeque::with_capacity(self.reads.len());
        while let Some(read) = self.reads.pop_front() {
            if self.map.role == Role::Loser {
                out.push(Action::FailClient {
                    id: read.id,
                    error: ClientError::Io,
                });
            } else if self.can_serve(&read, store) {
                out.push(self.serve(&read, store));
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
                self.on_mutation(&h, &frame.body, store, out)
            }
            Kind::WriteAck => self.on_write_ack(now_us, &h, store, out),
            Kind::WriteNack => self.on_write_nack(now_us, &h, store, out),
            Kind::Heartbeat => out.push(Action::SendFrame(self.reply(Kind::HeartbeatEcho, &h))),
            Kind::HeartbeatEcho => self.on_heartbeat_echo(now_us, &h),
            Kind::ResyncRequest => self.on_resync_request(now_us, &h, &frame.body, store, out),
            Kind::ResyncBlock => self.on_resync_block(now_us, &h, &frame.body, store, out),
            Kind::ResyncAck => self.on_resync_ack(now_us, &h, store, out),
            // The link hands control frames to the control plane; one reaching the core came
            // by another path and carries nothing for it.
            Kind::Control => self.counters.frames_foreign += 1,
            // The sync policy acknowledges on apply; durable acks and flush markers belong to
            // sync-received and async, which are not implemented yet.
            Kind::DurableAck | Kind::FlushMarker => {
                debug!(kind = ?h.kind, "frame kind unused by the sync policy");
            }
        }
    }

    /// Whether a mutation-carrying frame from the peer is fenced (DESIGN.md §4 "Fencing").
    fn fenced(&self, h: &Header) -> bool {
        self.cfg.fault != Fault::NoFencing
            && h.accept_epoch < self.map.fenced_before[usize::from(h.sender_site)]
    }

    fn on_mutation(
        &mut self,
        h: &Header,
        body: &[u8],
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
        self.hlc.observe(h.stamp);
        for i in 0..h.blocks as usize {
            let content = match h.kind {
                Kind::Write => Content::Data(&body[i * BLOCK_BYTES..][..BLOCK_BYTES]),
                _ => Content::Zero,
            };
            self.apply_rule(store, h.lba + i as u64, content, h.stamp);
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
        let Some(p) = self.take_pending(h) else {
            return;
        };
        for b in self.release_blocks(p.lba, p.blocks) {
            store.clear_dirty(b);
        }
        out.push(Action::AckClient {
            id: p.id,
            stamp: p.stamp,
        });
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
        // TCP's srtt smoothing (RFC 6298, alpha = 1/8).
        self.rtt_us_smoothed = Some(match self.rtt_us_smoothed {
            None => sample_us,
            Some(srtt) => srtt - srtt / 8 + sample_us / 8,
        });
        self.counters.rtt_samples += 1;
    }

    // ----- link and time -------------------------------------------------------------------

    fn on_tick(&mut self, now_us: u64, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        if !self.link_up {
            return;
        }
        if now_us >= self.next_heartbeat_due_us {
            let seq = self.next_heartbeat_seq;
            self.next_heartbeat_seq += 1;
            let mut h = self.header(Kind::Heartbeat);
            h.seq = seq;
            out.push(Action::SendFrame(Frame::new(h, Vec::new())));
            self.heartbeats.insert(seq, now_us);
            while self.heartbeats.len() > self.cfg.heartbeats_outstanding_max {
                self.heartbeats.pop_first();
            }
            self.next_heartbeat_due_us = now_us + self.cfg.heartbeat_interval_us;
        }
        let retransmit_after_us = self.cfg.retransmit_after_us;
        let due = |sent_us: u64| now_us.saturating_sub(sent_us) >= retransmit_after_us;
        let mut resend = Vec::new();
        for (seq, p) in self.pending.iter_mut() {
            if due(p.last_sent_us) {
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
        self.pump_resync(now_us, store, out);
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
                // Dirty blocks no pending write covers are left from a crash: push them, and
                // the apply rule at the peer keeps whichever version is newer.
                let to_send: BTreeSet<u64> = store
                    .dirty_blocks()
                    .into_iter()
                    .filter(|b| !self.block_pending.contains_key(b))
                    .collect();
                self.resync_out = Some(ResyncOut {
                    to_send,
                    ..ResyncOut::default()
                });
                self.pump_resync(now_us, store, out);
            }
            // The survivor waits for the loser's request: the loser must first discard its
            // divergent blocks, and only then may copies and live writes reach it.
            Role::Survivor => {}
            Role::Loser => self.send_resync_request(now_us, store, out),
        }
    }

    fn on_link_down(&mut self, now_us: u64, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        self.link_up = false;
        self.heartbeats.clear();
        self.resync_out = None;
        self.loser_progress_us = None;
        if self.map.role == Role::Survivor {
            // The peer was a sync target only while connected; the survivor carries on alone
            // and its writes stay dirty for the next resync.
            self.ack_pending_alone(out);
            self.drain_admission(now_us, store, out);
            self.serve_reads(store, out);
        }
    }

    fn ack_pending_alone(&mut self, out: &mut Vec<Action>) {
        for (_, p) in std::mem::take(&mut self.pending) {
            self.counters.writes_acked_alone += 1;
            out.push(Action::AckClient {
                id: p.id,
                stamp: p.stamp,
            });
        }
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
        self.map.epoch = new_epoch;
        self.map.fenced_before = fenced_before;
        self.resync_out = None;
        self.loser_progress_us = None;
        if survivor == self.cfg.site {
            info!(
                site = self.cfg.site,
                new_epoch, "detached the peer; serving alone"
            );
            self.map.role = Role::Survivor;
            self.ack_pending_alone(out);
        } else {
            info!(
                site = self.cfg.site,
                new_epoch, "detached; failing queued requests"
            );
            self.map.role = Role::Loser;
            // Fenced: whatever these writes did here is settled by resync; the clients learn
            // EIO and the request is never re-issued.
            for (_, p) in std::mem::take(&mut self.pending) {
                out.push(Action::FailClient {
                    id: p.id,
                    error: ClientError::Io,
                });
            }
            self.block_pending.clear();
            self.inflight_bytes = 0;
        }
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
        self.resync_out = None;
        self.loser_progress_us = None;
        self.serve_reads(store, out);
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
            }
            store.persist_resync_reset_epoch(self.map.epoch);
        }
        let dirty = store.dirty_blocks();
        let chunk_lbas = self.cfg.resync_request_lbas_max.max(1);
        let chunks: Vec<&[u64]> = if dirty.is_empty() {
            vec![&[][..]]
        } else {
            dirty.chunks(chunk_lbas).collect()
        };
        // One request is `blocks` chunks under one request id (`seq`), chunk index in `lba`:
        // the survivor counts distinct chunks, so a lost chunk is never mistaken for the end.
        let request_id = self.next_seq;
        self.next_seq += 1;
        let chunk_count = chunks.len() as u32;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut h = self.header(Kind::ResyncRequest);
            h.seq = request_id;
            h.lba = i as u64;
            h.blocks = chunk_count;
            let body: Vec<u8> = chunk.iter().flat_map(|b| b.to_le_bytes()).collect();
            out.push(Action::SendFrame(Frame::new(h, body)));
        }
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
        if self.map.role != Role::Survivor || h.accept_epoch != self.map.epoch || !self.link_up {
            return;
        }
        if self.resync_out.is_none() {
            info!(
                site = self.cfg.site,
                "peer catching up; it is a sync target from now on"
            );
            let to_send = store.dirty_blocks().into_iter().collect();
            self.resync_out = Some(ResyncOut {
                to_send,
                ..ResyncOut::default()
            });
        }
        let blocks = store.blocks();
        let Some(ro) = self.resync_out.as_mut() else {
            return;
        };
        for lba in body.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(lba);
            let lba = u64::from_le_bytes(b);
            if lba < blocks {
                ro.to_send.insert(lba);
            } else {
                self.counters.frames_foreign += 1;
            }
        }
        match ro.request_chunks.as_mut() {
            Some((id, _)) if *id > h.seq => {}
            Some((id, seen)) if *id == h.seq => {
                seen.insert(h.lba);
            }
            _ => ro.request_chunks = Some((h.seq, BTreeSet::from([h.lba]))),
        }
        if ro
            .request_chunks
            .as_ref()
            .is_some_and(|(_, seen)| seen.len() as u64 >= u64::from(h.blocks))
        {
            ro.request_complete = true;
        }
        self.pump_resync(now_us, store, out);
        self.check_resync_complete(store, out);
    }

    fn pump_resync(&mut self, now_us: u64, store: &mut dyn BlockStore, out: &mut Vec<Action>) {
        if !self.link_up {
            return;
        }
        let limit = self.cfg.resync_blocks_in_flight_max;
        let header = self.header(Kind::ResyncBlock);
        let Some(ro) = self.resync_out.as_mut() else {
            return;
        };
        let mut data = vec![0u8; BLOCK_BYTES];
        while ro.in_flight.len() < limit {
            let Some(lba) = ro.to_send.pop_first() else {
                break;
            };
            let stamp = store.read(lba, &mut data);
            let mut h = header;
            h.lba = lba;
            h.blocks = 1;
            h.stamp = stamp;
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
        self.hlc.observe(h.stamp);
        let content = if body.is_empty() {
            Content::Zero
        } else {
            Content::Data(body)
        };
        if self.apply_rule(store, h.lba, content, h.stamp) {
            self.counters.resync_blocks_applied += 1;
        }
        // A loser's block is settled by a copy sent in this epoch, i.e. after its divergent
        // version was discarded. Copies from before the detach settle nothing.
        if self.map.role == Role::Loser
            && h.accept_epoch == self.map.epoch
            && store.resync_reset_epoch() == self.map.epoch
        {
            store.clear_dirty(h.lba);
            self.loser_progress_us = Some(now_us);
        }
        out.push(Action::SendFrame(self.reply(Kind::ResyncAck, h)));
    }

    fn on_resync_ack(
        &mut self,
        now_us: u64,
        h: &Header,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let Some(ro) = self.resync_out.as_mut() else {
            return;
        };
        if ro
            .in_flight
            .get(&h.lba)
            .is_some_and(|(stamp, _)| *stamp == h.stamp)
        {
            ro.in_flight.remove(&h.lba);
            // The peer now holds this version or a newer one. The block here changed since
            // only by a peer write (which the peer has) or by a local write still pending
            // (whose own ack cleans the block), so it is clean unless a local write waits.
            if !self.block_pending.contains_key(&h.lba) {
                store.clear_dirty(h.lba);
            }
        }
        self.after_progress(now_us, store, out);
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
