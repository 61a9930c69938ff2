//! Repair of blocks that fail their checksum (DESIGN.md §4 "Repair"; §7 invariant 6: corrupt
//! data is never returned).
//!
//! A block fails its checksum when a crash tore it (new record, old data) or when its bytes
//! were damaged at rest. Its content is then worthless here, and only a peer that is in sync
//! at the current epoch holds a version that is known to be right: it has applied every
//! write this site acknowledged (§4 `sync`). So:
//!
//! - **Read repair.** A read that meets such a block at an in-sync site with the link up asks
//!   the peer for it (a `RepairRequest`), waits (bounded: `REPAIR_TIMEOUT_RETRANSMITS`
//!   retransmit intervals), applies the answer (`RepairBlock`) and serves the read from the
//!   repaired block. Anywhere else — a survivor, a loser, the link down, the peer's copy bad
//!   too, a timeout — the read fails with EIO. Never a hang, never the damaged bytes.
//! - **Which version wins.** The peer's copy replaces the local block unconditionally only
//!   while the local block still fails its checksum: then no write has touched it since the
//!   damage was found (every write replaces a whole block and its checksum), so there is
//!   nothing here to lose, and the stamp the damaged record carries means nothing. Once the
//!   block reads correctly again, a write raced the repair (a local write, or the peer's) and
//!   the apply rule decides as for any version from the peer: the copy is taken only if its
//!   stamp is greater. So a local write racing the repair is never overwritten by the older
//!   copy, and a copy newer than the local block (a write of the peer still on the wire) is
//!   harmless, because that write arrives afterwards and is superseded by equal stamps.
//!   `verify --repair --from SITE` may also take a copy with an equal stamp (`force`): the
//!   operator's choice when both sites hold the same stamp over different data.
//! - **The answering side** sends its version only while it is in sync at the requester's
//!   epoch, the block is settled here and it passes its checksum; otherwise it answers
//!   "cannot" (`FLAG_UNREADABLE`, no data), so the requester fails at once.
//! - **Copies.** A resync copy or a push of a block that fails its checksum is never sent
//!   (the survivor's copies win unconditionally at the loser, so a damaged block would
//!   spread). It is recorded as *unrecoverable*, counted, retried every retransmit interval
//!   (a client write may have replaced it), and while any is left the survivor does not
//!   report its resync complete: the rejoin waits for the operator (status shows the count;
//!   writing the block — e.g. restoring it from a backup — makes it copyable). In sync, the
//!   block is asked from the peer instead, and the push is tried again once repaired.
//!
//! Repair frames are their own kinds rather than flagged resync frames: a repair changes no
//! resync state at either end (no `ResyncAck`, no dirty bit cleared at the sender), and the
//! answer may say "cannot", which a resync copy must never mean.

use std::collections::{BTreeMap, BTreeSet};

use stretch_engine::Stamp;
use tracing::{info, warn};

use super::{Replica, WaitingRead, BLOCK_BYTES};
use crate::core::{Action, BlockStore, ClientError, ClientOpId, Content, Fault, Role};
use crate::frame::{Frame, Header, Kind, FLAG_UNREADABLE};

/// A block asked from the peer and unanswered for this many retransmit intervals fails what
/// waits on it with EIO (5 s in the daemon). TCP loses no frame while the link is up, and
/// link loss fails every repair at once, so this bounds only a peer that stopped answering.
const REPAIR_TIMEOUT_RETRANSMITS: u64 = 5;

/// Repairs in progress at one site; bounded by the replica's `Config` (see each field).
#[derive(Debug, Default)]
pub(super) struct RepairState {
    /// The time of the step being handled (this site's clock).
    pub(super) now_us: u64,
    /// Blocks asked from the peer: at most `resync_request_lbas_max`.
    asked: BTreeMap<u64, Asked>,
    /// Reads waiting for repairs: at most `reads_waiting_max`.
    reads: Vec<ParkedRead>,
    /// `ClientRepair` operations waiting: at most `admission_queue_max`.
    ops: BTreeMap<ClientOpId, RepairOp>,
    /// Blocks that fail their checksum and so could not be copied to the peer.
    pub(super) unrecoverable: BTreeSet<u64>,
    unrecoverable_retry_us: u64,
}

#[derive(Clone, Copy, Debug)]
struct Asked {
    asked_us: u64,
    /// Take a copy with a stamp equal to the local one too (`verify --repair --from`).
    force: bool,
}

#[derive(Debug)]
struct ParkedRead {
    read: WaitingRead,
    /// One of its blocks could not be repaired: it fails with EIO.
    failed: bool,
}

#[derive(Debug)]
struct RepairOp {
    waiting: BTreeSet<u64>,
    failed: bool,
}

impl RepairState {
    pub(super) fn is_idle(&self) -> bool {
        self.asked.is_empty() && self.reads.is_empty() && self.ops.is_empty()
    }
}

fn covers(read: &WaitingRead, lba: u64) -> bool {
    (read.lba..read.lba + u64::from(read.blocks)).contains(&lba)
}

impl Replica {
    /// Blocks that fail their checksum here and could not be copied to the peer (status).
    pub fn unrecoverable_blocks(&self) -> usize {
        self.repair.unrecoverable.len()
    }

    /// Blocks asked from the peer and not answered yet.
    pub fn repairs_in_progress(&self) -> usize {
        self.repair.asked.len()
    }

    /// Repair takes data only from a peer in sync at the current epoch (DESIGN.md §4).
    fn may_repair(&self) -> bool {
        self.link_up
            && (self.map.role == Role::InSync || self.cfg.fault == Fault::RepairFromAnyPeer)
    }

    fn repair_blocks_max(&self) -> usize {
        self.cfg.resync_request_lbas_max.max(1)
    }

    /// Serves a read whose blocks may be served now, repairing any that fails its checksum
    /// (module documentation); a read that cannot be repaired fails with EIO.
    pub(super) fn serve_checked(
        &mut self,
        read: WaitingRead,
        store: &dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        self.serve_or_park(read, false, store, out);
    }

    fn serve_or_park(
        &mut self,
        read: WaitingRead,
        repaired_once: bool,
        store: &dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let mut data = vec![0u8; read.blocks as usize * BLOCK_BYTES];
        let mut stamps = Vec::with_capacity(read.blocks as usize);
        let mut bad = Vec::new();
        for (i, chunk) in data.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            let lba = read.lba + i as u64;
            match store.read_checked(lba, chunk) {
                Some(stamp) => stamps.push(stamp),
                None if self.cfg.fault == Fault::ServeUnreadable => {
                    stamps.push(store.read(lba, chunk))
                }
                None => {
                    stamps.push(Stamp::ZERO);
                    bad.push(lba);
                }
            }
        }
        if bad.is_empty() {
            out.push(Action::ReadDone {
                id: read.id,
                data,
                stamps,
            });
            return;
        }
        let parked = !repaired_once
            && self.may_repair()
            && self.repair.reads.len() < self.cfg.reads_waiting_max
            && self.ask(&bad, false, out);
        if parked {
            self.repair.reads.push(ParkedRead {
                read,
                failed: false,
            });
        } else {
            warn!(
                site = self.cfg.site,
                lba = bad[0],
                blocks = bad.len(),
                role = ?self.map.role,
                link_up = self.link_up,
                "read of a block that fails its checksum, with no in-sync peer to repair it from: EIO"
            );
            self.fail_unreadable_read(read.id, out);
        }
    }

    fn fail_unreadable_read(&mut self, id: ClientOpId, out: &mut Vec<Action>) {
        self.counters.reads_failed_unreadable += 1;
        out.push(Action::FailClient {
            id,
            error: ClientError::Io,
        });
    }

    /// Asks the peer for the blocks of `lbas` not asked yet; false (nothing sent) if that
    /// would exceed the bound on blocks being repaired.
    fn ask(&mut self, lbas: &[u64], force: bool, out: &mut Vec<Action>) -> bool {
        let fresh: BTreeSet<u64> = lbas
            .iter()
            .copied()
            .filter(|lba| !self.repair.asked.contains_key(lba))
            .collect();
        if self.repair.asked.len() + fresh.len() > self.repair_blocks_max() {
            return false;
        }
        for lba in lbas {
            if let Some(a) = self.repair.asked.get_mut(lba) {
                a.force |= force;
            }
        }
        if fresh.is_empty() {
            return true;
        }
        let now_us = self.repair.now_us;
        for &lba in &fresh {
            self.repair.asked.insert(
                lba,
                Asked {
                    asked_us: now_us,
                    force,
                },
            );
        }
        let mut h = self.header(Kind::RepairRequest);
        h.seq = self.alloc_seq();
        h.blocks = fresh.len() as u32;
        let body: Vec<u8> = fresh.iter().flat_map(|b| b.to_le_bytes()).collect();
        self.counters.repair_requests_sent += 1;
        info!(
            site = self.cfg.site,
            first_lba = fresh.first().copied().unwrap_or_default(),
            blocks = fresh.len(),
            "asking the in-sync peer to repair blocks"
        );
        out.push(Action::SendFrame(Frame::new(h, body)));
        true
    }

    /// `Event::ClientRepair` (`verify --repair`): see [`crate::core::Event::ClientRepair`].
    pub(super) fn client_repair(
        &mut self,
        id: ClientOpId,
        lbas: Vec<u64>,
        force: bool,
        store: &dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let blocks = store.blocks();
        let set: BTreeSet<u64> = lbas.into_iter().collect();
        if set.is_empty()
            || set.len() > self.repair_blocks_max()
            || set.iter().any(|&b| b >= blocks)
        {
            out.push(Action::FailClient {
                id,
                error: ClientError::Invalid,
            });
            return;
        }
        if !self.may_repair() {
            warn!(
                site = self.cfg.site,
                role = ?self.map.role,
                link_up = self.link_up,
                "repair refused: the peer is not in sync at the current epoch"
            );
            out.push(Action::FailClient {
                id,
                error: ClientError::Io,
            });
            return;
        }
        if self.repair.ops.len() >= self.cfg.admission_queue_max
            || self.repair.ops.contains_key(&id)
        {
            out.push(Action::FailClient {
                id,
                error: ClientError::Busy,
            });
            return;
        }
        let list: Vec<u64> = set.iter().copied().collect();
        if !self.ask(&list, force, out) {
            out.push(Action::FailClient {
                id,
                error: ClientError::Busy,
            });
            return;
        }
        self.repair.ops.insert(
            id,
            RepairOp {
                waiting: set,
                failed: false,
            },
        );
    }

    /// The peer asks for our version of blocks that fail their checksum there.
    pub(super) fn on_repair_request(
        &mut self,
        h: &Header,
        body: &[u8],
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        if body.len() % 8 != 0 {
            self.counters.frames_foreign += 1;
            return;
        }
        let any_peer = self.cfg.fault == Fault::RepairFromAnyPeer;
        let in_sync = self.link_up
            && h.accept_epoch == self.map.epoch
            && (self.map.role == Role::InSync || any_peer);
        let blocks = store.blocks();
        let mut data = vec![0u8; BLOCK_BYTES];
        // Bounded like the requester's own set; more is not answered (it times out there).
        for lba in crate::frame::body_lbas(body).take(self.repair_blocks_max()) {
            if lba >= blocks {
                self.counters.frames_foreign += 1;
                continue;
            }
            let mut reply = self.header(Kind::RepairBlock);
            reply.seq = h.seq;
            reply.lba = lba;
            reply.blocks = 1;
            // An unsettled block (after a crash) is no better than the requester's.
            let settled = !self.untrusted.contains_key(&lba);
            let version = if in_sync && settled {
                store.read_checked(lba, &mut data)
            } else {
                None
            };
            let frame = match version {
                Some(stamp) => {
                    reply.stamp = stamp;
                    let body = if data.iter().all(|&x| x == 0) {
                        Vec::new()
                    } else {
                        data.clone()
                    };
                    Frame::new(reply, body)
                }
                None => {
                    self.counters.repair_refusals_sent += 1;
                    reply.flags |= FLAG_UNREADABLE;
                    Frame::new(reply, Vec::new())
                }
            };
            out.push(Action::SendFrame(frame));
        }
    }

    /// The peer's answer for one block we asked to repair.
    pub(super) fn on_repair_block(
        &mut self,
        h: &Header,
        body: &[u8],
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let cannot = h.flags & FLAG_UNREADABLE != 0;
        if h.lba >= store.blocks()
            || h.blocks != 1
            || !(body.is_empty() || body.len() == BLOCK_BYTES)
            || (cannot && !body.is_empty())
        {
            self.counters.frames_foreign += 1;
            return;
        }
        let Some(asked) = self.repair.asked.get(&h.lba).copied() else {
            // A late or duplicate answer: what waited on it has been answered.
            return;
        };
        let from_sync_peer = h.accept_epoch == self.map.epoch
            && (self.map.role == Role::InSync || self.cfg.fault == Fault::RepairFromAnyPeer);
        let ok = if cannot || !from_sync_peer || self.untrusted.contains_key(&h.lba) {
            warn!(
                site = self.cfg.site,
                lba = h.lba,
                peer_cannot = cannot,
                "the peer could not repair a block that fails its checksum here"
            );
            false
        } else {
            self.observe(h.stamp, store);
            let content = if body.is_empty() {
                Content::Zero
            } else {
                Content::Data(body)
            };
            self.apply_repair(store, h.lba, content, h.stamp, asked.force);
            true
        };
        self.resolve(h.lba, ok, store, out);
    }

    /// The repair rule of the module documentation: the copy replaces a block that still
    /// fails its checksum; otherwise the apply rule decides (`force`: an equal stamp too).
    fn apply_repair(
        &mut self,
        store: &mut dyn BlockStore,
        lba: u64,
        content: Content<'_>,
        stamp: Stamp,
        force: bool,
    ) -> bool {
        let mut scratch = vec![0u8; BLOCK_BYTES];
        let damaged = store.read_checked(lba, &mut scratch).is_none();
        let local = store.stamp(lba);
        if !(damaged || stamp > local || (force && stamp == local)) {
            return false;
        }
        // In the activity log while written, like every version from the peer: a crash may
        // tear this write too. Clean afterwards, unless it was dirty before: the block now
        // holds the peer's version.
        let was_dirty = store.is_dirty(lba);
        if !was_dirty {
            store.mark_dirty(lba);
        }
        store.write(lba, content, stamp);
        if !was_dirty {
            store.clear_dirty(lba);
        }
        self.counters.blocks_repaired += 1;
        info!(
            site = self.cfg.site,
            lba, damaged, "block repaired from the in-sync peer"
        );
        true
    }

    /// One asked block is answered (`ok`: it holds a good version now), timed out or lost.
    fn resolve(&mut self, lba: u64, ok: bool, store: &dyn BlockStore, out: &mut Vec<Action>) {
        if self.repair.asked.remove(&lba).is_none() {
            return;
        }
        if !ok {
            self.counters.repairs_failed += 1;
        }
        for p in self.repair.reads.iter_mut() {
            if !ok && covers(&p.read, lba) {
                p.failed = true;
            }
        }
        for op in self.repair.ops.values_mut() {
            if op.waiting.remove(&lba) && !ok {
                op.failed = true;
            }
        }
        self.finish_repairs(store, out);
    }

    /// Answers the operations and reads no asked block holds back any more.
    fn finish_repairs(&mut self, store: &dyn BlockStore, out: &mut Vec<Action>) {
        let done: Vec<ClientOpId> = self
            .repair
            .ops
            .iter()
            .filter(|(_, op)| op.waiting.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            if let Some(op) = self.repair.ops.remove(&id) {
                out.push(if op.failed {
                    Action::FailClient {
                        id,
                        error: ClientError::Io,
                    }
                } else {
                    Action::AckClient {
                        id,
                        stamp: Stamp::ZERO,
                    }
                });
            }
        }
        let parked = std::mem::take(&mut self.repair.reads);
        for p in parked {
            let waiting = (p.read.lba..p.read.lba + u64::from(p.read.blocks))
                .any(|b| self.repair.asked.contains_key(&b));
            if waiting {
                self.repair.reads.push(p);
            } else if p.failed || self.map.role == Role::Loser {
                self.fail_unreadable_read(p.read.id, out);
            } else if self.can_serve(&p.read, store) {
                self.serve_or_park(p.read, true, store, out);
            } else if self.reads.len() < self.cfg.reads_waiting_max {
                // A write made a block dirty meanwhile: wait for it like any read (§4).
                self.reads.push_back(p.read);
            } else {
                out.push(Action::FailClient {
                    id: p.read.id,
                    error: ClientError::Busy,
                });
            }
        }
    }

    /// Timeouts of asked blocks, and the retry of withheld copies.
    pub(super) fn repair_tick(
        &mut self,
        now_us: u64,
        store: &mut dyn BlockStore,
        out: &mut Vec<Action>,
    ) {
        let timeout_us = self
            .cfg
            .retransmit_after_us
            .saturating_mul(REPAIR_TIMEOUT_RETRANSMITS);
        let expired: Vec<u64> = self
            .repair
            .asked
            .iter()
            .filter(|(_, a)| now_us.saturating_sub(a.asked_us) >= timeout_us)
            .map(|(lba, _)| *lba)
            .collect();
        for lba in expired {
            warn!(site = self.cfg.site, lba, "repair timed out");
            self.resolve(lba, false, store, out);
        }
        // A withheld copy is tried again: a client write may have replaced the block, or the
        // peer repaired it. Once a retransmit interval, so a block that stays bad costs little.
        if !self.repair.unrecoverable.is_empty()
            && now_us.saturating_sub(self.repair.unrecoverable_retry_us)
                >= self.cfg.retransmit_after_us
        {
            self.repair.unrecoverable_retry_us = now_us;
            if let Some(ro) = self.resync_out.as_mut() {
                for lba in &self.repair.unrecoverable {
                    if !ro.in_flight.contains_key(lba) {
                        ro.to_send.insert(*lba);
                    }
                }
            }
        }
    }

    /// The peer is no longer in sync at this epoch, or unreachable: nothing can be repaired,
    /// and everything waiting on a repair fails with EIO (never waits for a peer that cannot
    /// answer).
    pub(super) fn repair_abort(&mut self, why: &str, out: &mut Vec<Action>) {
        if self.repair.is_idle() {
            return;
        }
        warn!(
            site = self.cfg.site,
            blocks = self.repair.asked.len(),
            reads = self.repair.reads.len(),
            "repairs abandoned ({why}): what waits on them fails with EIO"
        );
        self.counters.repairs_failed += self.repair.asked.len() as u64;
        self.repair.asked.clear();
        for p in std::mem::take(&mut self.repair.reads) {
            self.fail_unreadable_read(p.read.id, out);
        }
        for (id, _) in std::mem::take(&mut self.repair.ops) {
            out.push(Action::FailClient {
                id,
                error: ClientError::Io,
            });
        }
    }

    /// Copies (resync, push) of blocks that fail their checksum here: withheld, recorded, and
    /// asked from the peer while in sync (module documentation).
    pub(super) fn copies_unreadable(&mut self, lbas: Vec<u64>, out: &mut Vec<Action>) {
        for &lba in &lbas {
            self.counters.copies_withheld_unreadable += 1;
            if self.repair.unrecoverable.insert(lba) {
                warn!(
                    site = self.cfg.site,
                    lba,
                    role = ?self.map.role,
                    "block fails its checksum: not copied to the peer"
                );
            }
        }
        if self.may_repair() {
            let _ = self.ask(&lbas, false, out);
        }
    }
}
