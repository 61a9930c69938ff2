//! The replica thread: runs one [`Replica`] over an [`EngineStore`] for the real daemon.
//!
//! Everything that happens to the replica — client requests from the NBD side, frames and
//! link changes from [`crate::link`], timer ticks — arrives as an [`Input`] on one bounded
//! channel and is handled on one dedicated OS thread, in arrival order. The thread is not a
//! tokio worker: the store waits for the engine there (see [`crate::store`]).
//!
//! Inputs are handled in batches: the thread steps the replica through every input already
//! queued (up to [`DriverConfig::batch_inputs_max`]), submits the batch's gathered engine
//! writes, and then lets the batch's actions out — frames to the peer, replies to clients.
//! An ack does not wait for a flush: "applied" means visible to every later read (DESIGN.md
//! §4), and durability comes from the peer (a restarted site settles what its crash lost
//! from the peer, see `core::replica`) and from FLUSH and FUA, which the core turns into
//! flushes at both sites. The core flushes inside its step, so a flush always precedes the
//! actions that depend on it.
//!
//! Frames go to the socket from this thread when nothing is queued before them (a
//! non-blocking `writev` of the batch's frames, see [`crate::link::Outbound`]): a hand-off to
//! the link's writer task would put one more thread wake-up on every write's path, at both
//! sites. What the socket does not take at once waits in the bounded outbound queue for the
//! writer task.
//!
//! The thread never blocks on the link: a frame that does not fit the bounded outbound queue,
//! or is produced while the link is down, is dropped and counted. The core resends every
//! unacknowledged write and copy on a timer and on link-up, and applying one twice is
//! harmless under the apply rule, so a drop costs time, never data. Blocking here instead
//! could deadlock two sites that each wait for the other to drain.

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use crate::core::{
    Action, ClientError, ClientOpId, Config, Counters, Event, MapView, Mode, Policy, Replica, Role,
};
use crate::frame::{Kind, FLAG_RECEIVED, FLAG_UNREADABLE};
use crate::store::EngineStore;

/// The replica's clock: wall-clock microseconds at start, advanced by a monotonic clock, so
/// stamps are close to real time across restarts (the HLC needs that) while timers and RTT
/// samples never see the wall clock jump.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall_at_start_us: u64,
    start: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        let wall_at_start_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Clock {
            wall_at_start_us,
            start: Instant::now(),
        }
    }

    pub fn now_us(&self) -> u64 {
        let elapsed_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.wall_at_start_us.saturating_add(elapsed_us)
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

/// The outcome of a client request, sent back to the waiting NBD request.
#[derive(Debug)]
pub enum Reply {
    Done,
    Data(Vec<u8>),
    Failed(ClientError),
}

/// What the replica thread receives.
pub enum Input {
    /// A client request; its id is inside the event.
    Client {
        event: Event,
        reply: oneshot::Sender<Reply>,
    },
    /// A frame from the peer, holding its share of the inbound byte budget until handled.
    Frame {
        event: Event,
        _budget: Option<OwnedSemaphorePermit>,
    },
    /// LinkUp, LinkDown or Tick.
    Peer(Event),
}

/// Limits of the replica thread.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Inputs stepped before one group commit.
    pub batch_inputs_max: usize,
    /// Bytes of frames queued for the link writer; beyond, frames are dropped (and resent).
    pub outbound_bytes_max: usize,
    /// Frames queued for the link writer.
    pub outbound_frames_max: usize,
    /// How often regions with no dirty block left are cleared in the engine (each clear
    /// flushes the volume, so not after every ack). A region is cleared only once it has
    /// been clean and unmarked for a whole interval, and the volume quiet for it or the
    /// region clean for 20 intervals (see `EngineStore::clear_clean_regions`).
    pub region_clear_interval_us: u64,
    /// Where a loser's divergent blocks are appended (DESIGN.md §4 "Resync").
    pub divergent_path: PathBuf,
}

impl DriverConfig {
    pub fn new(divergent_path: PathBuf) -> DriverConfig {
        DriverConfig {
            batch_inputs_max: 256,
            outbound_bytes_max: 128 * 1024 * 1024,
            outbound_frames_max: 8192,
            region_clear_interval_us: 500_000,
            divergent_path,
        }
    }
}

/// Counters of the replica thread, for metrics, logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    pub role: Option<Role>,
    pub link_up: bool,
    pub rtt_us_smoothed: Option<u64>,
    pub replica: Counters,
    pub frames_queued: u64,
    pub frames_dropped_link_down: u64,
    pub frames_dropped_queue_full: u64,
    pub batches: u64,
    pub regions_cleared: u64,
    pub unreadable_blocks: u64,
    /// Blocks dirty at this site (may differ from the peer); 0 when settled.
    pub dirty_blocks: u64,
    /// The replica stopped after an engine error; every request now fails with EIO.
    pub failed: bool,
    /// Replication lag: bytes of local writes sent to the peer and not yet acknowledged.
    pub lag_bytes: u64,
    /// Blocks left unsettled since a crash (their content here is not trusted until the peer
    /// has sent its version): such a site must not become a survivor.
    pub untrusted_blocks: u64,
    /// Survivor: the epoch in which the catching-up peer's resync last completed; the
    /// control plane may then commit its rejoin (DESIGN.md §4 "Resync").
    pub resync_complete_epoch: Option<u32>,
    /// The volume's ack policy and the mode in force (`None` while this site waits to hear
    /// it from the leader), DESIGN.md §5.
    pub policy: Policy,
    pub mode: Option<Mode>,
    /// `async`: age of the oldest local write not yet durable at the peer.
    pub lag_us: u64,
    /// The read fast path may serve a clean range here (not the passive site of `async`,
    /// not a site that does not know its mode yet).
    pub local_reads: bool,
    /// Blocks that fail their checksum here and could not be copied to the peer (a survivor's
    /// resync waits on them; DESIGN.md §4 "Repair", `core::repair`).
    pub unrecoverable_blocks: u64,
}

pub use crate::link::{outbound_queue, Outbound, OutboundRx};

struct PendingOp {
    reply: oneshot::Sender<Reply>,
    /// For reads: the blocks read, to fail the read if one of them was unreadable.
    read_blocks: Option<(u64, u32)>,
}

fn client_op(event: &Event) -> Option<(ClientOpId, Option<(u64, u32)>)> {
    match event {
        Event::ClientWrite { id, .. }
        | Event::ClientTrim { id, .. }
        | Event::ClientWriteZeroes { id, .. }
        | Event::ClientFlush { id }
        | Event::ClientRepair { id, .. } => Some((*id, None)),
        Event::ClientRead { id, lba, blocks } => Some((*id, Some((*lba, *blocks)))),
        _ => None,
    }
}

/// The channels a replica thread is wired to.
pub struct Plumbing {
    pub inputs: mpsc::Receiver<Input>,
    pub outbound: Outbound,
    pub stats: Arc<Mutex<DriverStats>>,
}

/// Starts the replica thread. It runs until every sender of `plumbing.inputs` is dropped.
pub fn spawn(
    cfg: Config,
    map: MapView,
    store: EngineStore,
    driver: DriverConfig,
    plumbing: Plumbing,
    clock: Clock,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let Plumbing {
        inputs,
        outbound,
        stats,
    } = plumbing;
    std::thread::Builder::new()
        .name(format!("replica-{}", cfg.volume_id))
        .spawn(move || {
            ReplicaThread {
                store,
                driver,
                outbound,
                stats,
                clock,
                pending: HashMap::new(),
                frames_out: Vec::new(),
                link_up: false,
                local: DriverStats::default(),
            }
            .run(cfg, map, inputs)
        })
}

struct ReplicaThread {
    store: EngineStore,
    driver: DriverConfig,
    outbound: Outbound,
    stats: Arc<Mutex<DriverStats>>,
    clock: Clock,
    pending: HashMap<ClientOpId, PendingOp>,
    /// Encoded frames of the current step or batch, sent together by [`Self::send_frames`].
    frames_out: Vec<Vec<u8>>,
    link_up: bool,
    local: DriverStats,
}

impl ReplicaThread {
    fn run(mut self, cfg: Config, map: MapView, mut inputs: mpsc::Receiver<Input>) {
        let mut replica = Replica::start(cfg, self.clock.now_us(), map, &mut self.store);
        let mut step_out = Vec::new();
        // (action, whether the link was up when the core produced it)
        let mut actions: Vec<(Action, bool)> = Vec::new();
        let mut last_region_clear_us = self.clock.now_us();
        let mut apply_received = false;
        self.publish(&replica);
        while self.store.failure().is_none() {
            let Some(first) = inputs.blocking_recv() else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < self.driver.batch_inputs_max {
                match inputs.try_recv() {
                    Ok(input) => batch.push(input),
                    Err(_) => break,
                }
            }
            for input in batch {
                let event = match input {
                    Input::Client { event, reply } => {
                        let Some((id, read_blocks)) = client_op(&event) else {
                            continue;
                        };
                        self.pending.insert(id, PendingOp { reply, read_blocks });
                        event
                    }
                    Input::Frame { event, .. } => event,
                    Input::Peer(event) => {
                        match event {
                            Event::LinkUp => self.link_up = true,
                            Event::LinkDown => self.link_up = false,
                            _ => {}
                        }
                        event
                    }
                };
                replica.step(self.clock.now_us(), event, &mut self.store, &mut step_out);
                // Turning passive (async) must reach the read fast path before the answer
                // that lets the writer go on leaves this thread.
                if self.local.local_reads && !replica.serves_local_reads() {
                    self.publish(&replica);
                }
                for action in step_out.drain(..) {
                    // Two kinds of frame go before the batch's engine writes rather than after:
                    // - heartbeats claim nothing about data, so the engine wait does not
                    //   inflate the RTT sample (the rest of the batch's steps still do; the
                    //   link times heartbeats at the socket too, see `LinkStats`);
                    // - this site's own mutations: the peer applies them while this site's
                    //   gathered engine writes are submitted below, so the local write hides
                    //   inside the round trip. Safe because the peer's ack is handled only in
                    //   a later batch, after the submit, and the blocks are dirty here
                    //   meanwhile (reads of them wait). Acks of received writes still wait for
                    //   the submit: they say "applied here".
                    // - sync-received's acks of receipt: they claim "received", not "applied",
                    //   which is the point of the policy (the apply follows below).
                    let now = matches!(
                        &action,
                        Action::SendFrame(f)
                            if matches!(
                                f.header.kind,
                                Kind::Heartbeat
                                    | Kind::HeartbeatEcho
                                    | Kind::Write
                                    | Kind::Trim
                                    | Kind::WriteZeroes
                            ) || (f.header.kind == Kind::WriteAck
                                && f.header.flags & FLAG_RECEIVED != 0)
                    );
                    if matches!(action, Action::ApplyReceived) {
                        apply_received = true;
                    } else if now {
                        self.dispatch(action, self.link_up, &BTreeSet::new());
                    } else {
                        actions.push((action, self.link_up));
                    }
                }
                if self.store.failure().is_some() {
                    break;
                }
            }
            // sync-received: the batch's received writes, acknowledged as received above, are
            // applied with the rest of the batch's engine writes.
            if std::mem::take(&mut apply_received) {
                replica.step(
                    self.clock.now_us(),
                    Event::ApplyReceived,
                    &mut self.store,
                    &mut step_out,
                );
                actions.extend(step_out.drain(..).map(|a| (a, self.link_up)));
            }
            if self.store.failure().is_some() {
                break;
            }
            // The batch's immediate frames leave together, in one write, before its engine
            // writes are submitted.
            self.send_frames();
            // The gathered writes reach the engine before any action reports them, so a
            // checksum failure among the batch's reads is known below.
            self.store.submit();
            if self.store.failure().is_some() {
                break;
            }
            let unreadable = self.store.take_unreadable();
            self.local.unreadable_blocks += unreadable.len() as u64;
            for (action, link_up) in actions.drain(..) {
                self.dispatch(action, link_up, &unreadable);
            }
            self.send_frames();
            let now_us = self.clock.now_us();
            if now_us.saturating_sub(last_region_clear_us) >= self.driver.region_clear_interval_us {
                last_region_clear_us = now_us;
                self.local.regions_cleared += self.store.clear_clean_regions() as u64;
            }
            self.local.batches += 1;
            self.publish(&replica);
        }
        // Fail-stop: the engine failed, so nothing this replica decided after the failure may
        // leave, and every request from now on fails with EIO. A restart recovers from disk.
        self.local.failed = true;
        self.publish(&replica);
        for (_, op) in self.pending.drain() {
            let _ = op.reply.send(Reply::Failed(ClientError::Io));
        }
        // Bounded by the senders: the loop ends when the device and the link drop theirs.
        while let Some(input) = inputs.blocking_recv() {
            if let Input::Client { reply, .. } = input {
                let _ = reply.send(Reply::Failed(ClientError::Io));
            }
        }
    }

    fn dispatch(&mut self, action: Action, link_up: bool, unreadable: &BTreeSet<u64>) {
        match action {
            Action::SendFrame(frame) => {
                let copy = match frame.header.kind {
                    Kind::ResyncBlock => true,
                    Kind::RepairBlock => frame.header.flags & FLAG_UNREADABLE == 0,
                    _ => false,
                };
                if copy && unreadable.contains(&frame.header.lba) {
                    // Never send a block that failed its checksum. The core already withholds
                    // such copies (`read_checked`); this is the second line.
                    return;
                }
                if link_up {
                    self.frames_out.push(frame.encode());
                } else {
                    self.local.frames_dropped_link_down += 1;
                }
            }
            Action::AckClient { id, .. } | Action::FlushDone { id } => self.reply(id, Reply::Done),
            Action::ReadDone { id, data, .. } => {
                let bad = self
                    .pending
                    .get(&id)
                    .and_then(|op| op.read_blocks)
                    .is_some_and(|(lba, blocks)| {
                        unreadable
                            .range(lba..lba + u64::from(blocks))
                            .next()
                            .is_some()
                    });
                if bad {
                    self.reply(id, Reply::Failed(ClientError::Io));
                } else {
                    self.reply(id, Reply::Data(data));
                }
            }
            Action::FailClient { id, error } => self.reply(id, Reply::Failed(error)),
            Action::SaveDivergent { lba, data, stamp } => {
                if unreadable.contains(&lba) {
                    tracing::warn!(lba, "divergent block unreadable; not saved");
                } else if let Err(err) = self.save_divergent(lba, &data, stamp) {
                    tracing::error!(lba, "cannot save a divergent block: {err}");
                }
            }
            // Handled in the batch loop, which steps the apply before the engine submit.
            Action::ApplyReceived => {}
            Action::ResyncComplete { epoch } => {
                self.local.resync_complete_epoch = Some(epoch);
                tracing::info!(
                    epoch,
                    "resync complete; the control plane may commit rejoin"
                );
            }
        }
    }

    /// Hands the gathered frames to the link: written to the socket at once when nothing is
    /// queued before them (no hand-off to the link's writer task), queued otherwise.
    fn send_frames(&mut self) {
        let count = self.frames_out.len();
        if count == 0 {
            return;
        }
        let accepted = self.outbound.push_all(&mut self.frames_out);
        self.local.frames_queued += accepted as u64;
        self.local.frames_dropped_queue_full += (count - accepted) as u64;
    }

    fn reply(&mut self, id: ClientOpId, reply: Reply) {
        if let Some(op) = self.pending.remove(&id) {
            // The request may have timed out and gone; nothing is waiting then.
            let _ = op.reply.send(reply);
        }
    }

    /// Appends `lba (u64 LE) | stamp (16) | data (4096)` to the side file.
    fn save_divergent(
        &self,
        lba: u64,
        data: &[u8],
        stamp: stretch_engine::Stamp,
    ) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.driver.divergent_path)?;
        let mut record = Vec::with_capacity(8 + 16 + data.len());
        record.extend_from_slice(&lba.to_le_bytes());
        record.extend_from_slice(&stamp.0);
        record.extend_from_slice(data);
        f.write_all(&record)?;
        f.sync_data()
    }

    fn publish(&mut self, replica: &Replica) {
        self.local.role = Some(replica.role());
        self.local.link_up = self.link_up;
        self.local.rtt_us_smoothed = replica.rtt_us_smoothed();
        self.local.replica = replica.counters();
        self.local.dirty_blocks = self.store.dirty_count();
        self.local.untrusted_blocks = replica.untrusted_blocks() as u64;
        self.local.unrecoverable_blocks = replica.unrecoverable_blocks() as u64;
        self.local.lag_bytes = replica.inflight_bytes() as u64;
        self.local.lag_us = replica.async_lag(self.clock.now_us()).1;
        self.local.policy = replica.policy();
        self.local.mode = replica.mode();
        self.local.local_reads = replica.serves_local_reads();
        if let Ok(mut stats) = self.stats.lock() {
            *stats = self.local;
        }
    }
}
