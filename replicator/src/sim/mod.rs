//! The seeded, deterministic simulator: two [`Replica`]s over in-memory stores, a network
//! that delays, reorders, drops, duplicates, corrupts and partitions, skewed clocks,
//! crashes and restarts, an ideal control plane (detach and rejoin), and clients at both
//! sites. One `u64` seed sets every parameter and every choice (turmoil/VOPR style), so a
//! failure replays exactly. Invariants are checked after every step (DESIGN.md §7: 1
//! convergence, 2/5 no acknowledged write lost, 4 per-block linearizability).
//!
//! The control plane is modelled as ideal: a committed detach reaches both sites in the same
//! step. That is what the leases of §6 guarantee (the loser stops serving before the
//! survivor acknowledges alone); the leases themselves belong to the witness crate. It never
//! makes a site with untrusted blocks (restarted, not yet settled) the survivor: such a site
//! is not in sync.
//!
//! Crashes lose what was not flushed ([`MemStore::crash`]); sites flush only when the
//! protocol asks (FLUSH, FUA, a survivor's writes) and now and then in the background (the
//! daemon's region clears). A crash loses data only while the other site is up and settled:
//! two overlapping crashes may lose acknowledged writes that no FLUSH covered, which the
//! contract allows (§7 inv. 2), and the checker does not model that case.
//!
//! Blocks rot at rest ([`MemStore::rot`]: the bytes fail their checksum, the stamp stays) at
//! random times, only at a site in sync with a settled peer whose copy is good: reads must
//! repair them from the peer or fail, never return them (§7 invariant 6). A crash is not
//! combined with rot (a crash event is skipped while a block is rotten): a damaged copy and
//! an unsettled one of the same block is a double failure that may lose an acknowledged
//! write. After the chaos phase an operator repairs what is left (`Event::ClientRepair`, as
//! `verify --repair`), and writes over a survivor's rotten blocks that no peer can repair (as
//! an operator restoring them from a backup), so the system can settle.
//!
//! Frames in flight survive link outages (delivered in a later session), but not a restart
//! of either end: a frame of a dead process's session is processed before that session's
//! LinkDown at the receiver, or lost with the receiver's memory (the link driver delivers a
//! session's frames and its LinkDown in order on one queue).

mod checker;
mod store;

pub use checker::{block_pattern, Checker, Outcome};
pub use store::{Loss, MemStore};

use std::collections::BTreeMap;
use std::fmt;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use stretch_engine::BLOCK_SIZE;

use crate::core::{AckPolicy, Action, ClientOpId, Config, Event, Fault, MapView, Replica, Role};
use crate::frame::{Frame, Kind, RejectCounters, HEADER_BYTES};
use crate::stamp::SiteId;

const CLUSTER_ID: u64 = 0x0053_5452_4554_4348;
/// Trace lines kept for a failure report (the most recent ones).
const SIM_TRACE_LINES_MAX: usize = 100_000;

/// Every knob of a run. [`SimOptions::from_seed`] draws them all from the seed.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub volume_blocks: u64,
    /// Length of the phase with faults and client load.
    pub chaos_us: u64,
    /// Afterwards, faults stop and the system must converge within this time.
    pub liveness_us: u64,
    pub tick_us: u64,
    pub net_delay_us_min: u64,
    pub net_delay_us_max: u64,
    /// Probabilities in parts per thousand, per frame.
    pub drop_per_mille: u32,
    pub dup_per_mille: u32,
    pub corrupt_per_mille: u32,
    /// A frame that survives link outages and may arrive in a later link session, or after
    /// a detach and a rejoin (the fencing test of §4).
    pub stale_per_mille: u32,
    /// Per site: how far its clock runs ahead of simulated time.
    pub clock_skew_us: [u64; 2],
    pub partitions: u32,
    pub crashes: u32,
    /// The control plane detaches after the link has been down this long.
    pub detach_after_us: u64,
    pub ops_outstanding_max: usize,
    pub op_gap_us_max: u64,
    /// Blocks damaged at rest during the chaos phase (see the module documentation).
    pub corruptions: u32,
    /// Generate client load and faults automatically (off for scripted regressions).
    pub auto: bool,
    pub fault: Fault,
    pub trace: bool,
    /// The volume's ack policy: `sync`, or `sync-received` (whose receive queue is applied
    /// in a later step, so crashes land between a receipt's ack and its apply).
    pub ack_policy: AckPolicy,
}

impl SimOptions {
    /// A scripted world: no automatic load or faults, a clean network.
    pub fn scripted() -> SimOptions {
        SimOptions {
            volume_blocks: 8,
            chaos_us: 0,
            liveness_us: 5_000_000,
            tick_us: 5_000,
            net_delay_us_min: 500,
            net_delay_us_max: 500,
            drop_per_mille: 0,
            dup_per_mille: 0,
            corrupt_per_mille: 0,
            stale_per_mille: 0,
            clock_skew_us: [0, 0],
            partitions: 0,
            crashes: 0,
            detach_after_us: 100_000,
            ops_outstanding_max: 0,
            op_gap_us_max: 1,
            corruptions: 0,
            auto: false,
            fault: Fault::None,
            trace: false,
            ack_policy: AckPolicy::Sync,
        }
    }

    pub fn from_seed(seed: u64) -> SimOptions {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x0B7E_C7ED_5EED);
        let delay_min = rng.random_range(50..2_000);
        let mut opts = SimOptions {
            volume_blocks: rng.random_range(4..16),
            chaos_us: rng.random_range(300_000..1_200_000),
            liveness_us: 5_000_000,
            tick_us: rng.random_range(1_000..10_000),
            net_delay_us_min: delay_min,
            net_delay_us_max: delay_min + rng.random_range(0..5_000),
            drop_per_mille: rng.random_range(0..30),
            dup_per_mille: rng.random_range(0..30),
            corrupt_per_mille: rng.random_range(0..10),
            stale_per_mille: rng.random_range(0..200),
            clock_skew_us: [
                rng.random_range(0..2_000_000),
                rng.random_range(0..2_000_000),
            ],
            partitions: rng.random_range(0..4),
            crashes: rng.random_range(0..3),
            detach_after_us: rng.random_range(20_000..200_000),
            ops_outstanding_max: rng.random_range(1..5),
            op_gap_us_max: rng.random_range(500..20_000),
            // Drawn last, so the parameters above are those an older build drew for a seed.
            corruptions: rng.random_range(0..4),
            auto: true,
            fault: Fault::None,
            trace: false,
            ack_policy: AckPolicy::Sync,
        };
        // Drawn last, so every other option of a seed is what it was before policies existed.
        if rng.random_ratio(1, 2) {
            opts.ack_policy = AckPolicy::SyncReceived;
        }
        opts
    }
}

/// A failed run: what broke, and how to replay it.
#[derive(Clone, Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub at_us: u64,
    pub message: String,
    pub trace: Vec<String>,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulation failed: seed {} at t={}us: {}",
            self.seed, self.at_us, self.message
        )?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "replay: STRETCH_SIM_SEED={} cargo test -p stretch-replicator --test sim -- replay --nocapture",
            self.seed
        )
    }
}

/// What a finished run did, for throughput numbers and for tests that want coverage.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimReport {
    pub steps: u64,
    pub writes_acked: u64,
    pub reads_checked: u64,
    pub detaches: u32,
    pub rejoins: u32,
    pub crashes: u32,
    pub frames_rejected: u64,
    pub frames_fenced: u64,
    pub divergent_saved: u64,
    /// Blocks crashes took back to their flushed version.
    pub blocks_lost: u64,
    pub blocks_settled: u64,
    pub flushes_done: u64,
    /// `sync-received`: writes acknowledged as received before their apply.
    pub received_early: u64,
    /// Blocks damaged at rest, and repaired from the peer.
    pub blocks_rotted: u64,
    pub blocks_repaired: u64,
    /// Reads a catching-up loser served from resynced blocks, and reads that waited for
    /// blocks copied first (both checked like every read).
    pub catchup_reads_local: u64,
    pub catchup_reads_pulled: u64,
}

#[derive(Debug)]
enum Ev {
    Deliver {
        to: SiteId,
        bytes: Vec<u8>,
        stale_ok: bool,
        /// Both sites' incarnations when it was sent.
        lives: [u64; 2],
    },
    Tick(SiteId),
    ClientOp(SiteId),
    Partition(bool),
    Crash(SiteId),
    Restart(SiteId),
    /// `sync-received`: the site's receive queue is applied (if the site still runs the same
    /// incarnation).
    ApplyReceived(SiteId, u64),
    /// Damage a block at rest at a site.
    Rot(SiteId, u64),
}

struct Site {
    replica: Option<Replica>,
    /// Counts starts; frames of another incarnation are never delivered.
    incarnation: u64,
    store: MemStore,
    /// Ops this site's clients have outstanding (lost on a crash).
    ops: Vec<ClientOpId>,
}

/// The whole simulated system; see the module documentation.
pub struct World {
    seed: u64,
    opts: SimOptions,
    rng: SmallRng,
    now_us: u64,
    events: BTreeMap<(u64, u64), Ev>,
    next_ev_seq: u64,
    sites: [Site; 2],
    map: MapView2,
    partitioned: bool,
    link_connected: bool,
    link_down_since_us: Option<u64>,
    checker: Checker,
    next_op_id: ClientOpId,
    held: Option<Held>,
    rejoin_ready: Option<u32>,
    /// Repair operations outstanding (`Event::ClientRepair`), answered outside the checker.
    repair_ops: BTreeMap<ClientOpId, SiteId>,
    report: SimReport,
    rejects: RejectCounters,
    trace: std::collections::VecDeque<String>,
}

/// Frames of one kind from one site, kept aside: (from, kind, [(to, bytes, lives)]).
type Held = (SiteId, Kind, Vec<(SiteId, Vec<u8>, [u64; 2])>);

/// The committed cluster map of the one CG.
#[derive(Clone, Copy, Debug)]
struct MapView2 {
    epoch: u32,
    fenced_before: [u32; 2],
    role: [Role; 2],
}

impl MapView2 {
    fn view(&self, site: SiteId) -> MapView {
        MapView {
            role: self.role[usize::from(site)],
            epoch: self.epoch,
            fenced_before: self.fenced_before,
        }
    }
}

type SimResult<T> = Result<T, SimFailure>;

impl World {
    pub fn new(seed: u64, opts: SimOptions) -> World {
        let blocks = opts.volume_blocks;
        let map = MapView2 {
            epoch: 1,
            fenced_before: [0, 0],
            role: [Role::InSync, Role::InSync],
        };
        let mut world = World {
            seed,
            rng: SmallRng::seed_from_u64(seed),
            now_us: 0,
            events: BTreeMap::new(),
            next_ev_seq: 0,
            sites: [
                Site {
                    replica: None,
                    incarnation: 0,
                    store: MemStore::new(blocks),
                    ops: Vec::new(),
                },
                Site {
                    replica: None,
                    incarnation: 0,
                    store: MemStore::new(blocks),
                    ops: Vec::new(),
                },
            ],
            map,
            partitioned: false,
            link_connected: false,
            link_down_since_us: Some(0),
            checker: Checker::new(blocks),
            next_op_id: 1,
            held: None,
            rejoin_ready: None,
            repair_ops: BTreeMap::new(),
            report: SimReport::default(),
            rejects: RejectCounters::default(),
            trace: std::collections::VecDeque::new(),
            opts,
        };
        for site in 0..2 {
            world.start_site(site);
            world.schedule(world.opts.tick_us, Ev::Tick(site));
        }
        // The link comes up as the first event, through the same path as every heal.
        world.schedule(0, Ev::Partition(false));
        if world.opts.auto {
            world.schedule_faults();
            for site in 0..2 {
                world.schedule(1, Ev::ClientOp(site));
            }
        }
        world
    }

    fn config(&self, site: SiteId) -> Config {
        let mut cfg = Config::new(site, CLUSTER_ID, 1, 1);
        cfg.fault = self.opts.fault;
        cfg.heartbeat_interval_us = 10_000;
        cfg.retransmit_after_us = 30_000;
        // Small bounds so the simulator reaches them.
        cfg.writes_in_flight_max = 4;
        cfg.resync_blocks_in_flight_max = 3;
        cfg.resync_request_lbas_max = 3;
        cfg.heartbeats_outstanding_max = 4;
        cfg.policy.ack = self.opts.ack_policy;
        cfg
    }

    fn clock(&self, site: SiteId) -> u64 {
        self.now_us + self.opts.clock_skew_us[usize::from(site)]
    }

    fn schedule(&mut self, delay_us: u64, ev: Ev) {
        self.next_ev_seq += 1;
        self.events
            .insert((self.now_us + delay_us, self.next_ev_seq), ev);
    }

    fn schedule_faults(&mut self) {
        let chaos = self.opts.chaos_us.max(1);
        for _ in 0..self.opts.partitions {
            let at = self.rng.random_range(0..chaos);
            // Some partitions heal before a detach, some outlast it.
            let len = self.rng.random_range(1_000..self.opts.detach_after_us * 3);
            self.schedule(at, Ev::Partition(true));
            self.schedule(at + len, Ev::Partition(false));
        }
        for _ in 0..self.opts.crashes {
            let at = self.rng.random_range(0..chaos);
            let site = self.rng.random_range(0..2);
            let down = self.rng.random_range(1_000..self.opts.detach_after_us * 2);
            self.schedule(at, Ev::Crash(site));
            self.schedule(at + down, Ev::Restart(site));
        }
        // Rot comes from its own stream, so the draws above are those of an older build.
        let mut rot_rng = SmallRng::seed_from_u64(self.seed ^ 0x0B10_C4ED);
        for _ in 0..self.opts.corruptions {
            let at = rot_rng.random_range(0..chaos);
            let site = rot_rng.random_range(0..2);
            let lba = rot_rng.random_range(0..self.opts.volume_blocks);
            self.schedule(at, Ev::Rot(site, lba));
        }
    }

    /// Damages `lba` at `site` at rest if the peer holds a good, settled copy (module
    /// documentation); false if the conditions do not hold and nothing was done.
    pub fn rot(&mut self, site: SiteId, lba: u64) -> bool {
        use crate::core::BlockStore as _;
        let peer = &self.sites[usize::from(1 - site)];
        let here = &self.sites[usize::from(site)];
        let settled = |s: &Site| {
            s.replica
                .as_ref()
                .is_some_and(|r| r.untrusted_blocks() == 0)
        };
        let ok = self.map.role == [Role::InSync, Role::InSync]
            && settled(peer)
            && settled(here)
            && !peer.store.is_rotten(lba)
            && !peer.store.is_dirty(lba)
            && !here.store.is_dirty(lba);
        if !ok || !self.sites[usize::from(site)].store.rot(lba) {
            return false;
        }
        self.report.blocks_rotted += 1;
        self.note(|| format!("site {site} block {lba} ROTTED"));
        true
    }

    /// Damages `lba` at `site` at rest whatever the state of the sites (scripted tests); false
    /// if the block was written since the last flush.
    pub fn damage(&mut self, site: SiteId, lba: u64) -> bool {
        let done = self.sites[usize::from(site)].store.rot(lba);
        if done {
            self.report.blocks_rotted += 1;
            self.note(|| format!("site {site} block {lba} DAMAGED"));
        }
        done
    }

    fn any_rotten(&self) -> bool {
        self.sites
            .iter()
            .any(|s| !s.store.rotten_blocks().is_empty())
    }

    /// `Event::ClientRepair` at `site` (what `verify --repair` sends).
    pub fn client_repair(
        &mut self,
        site: SiteId,
        lbas: Vec<u64>,
        force: bool,
    ) -> SimResult<ClientOpId> {
        let id = self.new_op(site);
        self.repair_ops.insert(id, site);
        self.step_site(site, Event::ClientRepair { id, lbas, force })?;
        Ok(id)
    }

    /// After the chaos phase: repair rotten blocks of an in-sync site from its peer, and write
    /// over a survivor's (module documentation). One operation per site at a time.
    fn operator(&mut self) -> SimResult<()> {
        for site in 0..2u8 {
            let s = &self.sites[usize::from(site)];
            if s.replica.is_none() || !s.ops.is_empty() {
                continue;
            }
            let rotten = s.store.rotten_blocks();
            let Some(&first) = rotten.first() else {
                continue;
            };
            match self.map.role[usize::from(site)] {
                Role::InSync if self.link_connected => {
                    let max = self.config(site).resync_request_lbas_max;
                    let lbas = rotten.into_iter().take(max).collect();
                    self.client_repair(site, lbas, false)?;
                }
                Role::Survivor => {
                    self.client_write(site, first, 1)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn fail(&self, message: String) -> SimFailure {
        SimFailure {
            seed: self.seed,
            at_us: self.now_us,
            message,
            trace: self.trace.iter().cloned().collect(),
        }
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if self.opts.trace {
            let line = format!("t={} {}", self.now_us, line());
            self.trace.push_back(line);
            if self.trace.len() > SIM_TRACE_LINES_MAX {
                self.trace.pop_front();
            }
        }
    }

    // ----- accessors for scripted tests ----------------------------------------------------

    pub fn store(&self, site: SiteId) -> &MemStore {
        &self.sites[usize::from(site)].store
    }

    pub fn replica(&self, site: SiteId) -> Option<&Replica> {
        self.sites[usize::from(site)].replica.as_ref()
    }

    pub fn role(&self, site: SiteId) -> Role {
        self.map.role[usize::from(site)]
    }

    pub fn epoch(&self) -> u32 {
        self.map.epoch
    }

    pub fn outcome(&self, id: ClientOpId) -> Option<Outcome> {
        self.checker.outcome(id)
    }

    pub fn report(&self) -> SimReport {
        let mut r = self.report;
        r.writes_acked = self.checker.writes_acked;
        r.reads_checked = self.checker.reads_checked;
        r.frames_rejected = self.rejects.total();
        for replica in self.sites.iter().filter_map(|s| s.replica.as_ref()) {
            let c = replica.counters();
            r.frames_fenced += c.mutations_fenced;
            r.blocks_settled += c.blocks_settled;
            r.flushes_done += c.flushes_done;
            r.received_early += c.writes_received_early;
            r.blocks_repaired += c.blocks_repaired;
            r.catchup_reads_local += c.catchup_reads_local;
            r.catchup_reads_pulled += c.catchup_reads_pulled;
        }
        r
    }

    pub fn now_us(&self) -> u64 {
        self.now_us
    }

    // ----- sites, link, control plane ------------------------------------------------------

    fn start_site(&mut self, site: SiteId) {
        let cfg = self.config(site);
        let now = self.clock(site);
        let view = self.map.view(site);
        let s = &mut self.sites[usize::from(site)];
        s.incarnation += 1;
        s.replica = Some(Replica::start(cfg, now, view, &mut s.store));
        self.note(|| format!("site {site} started {view:?}"));
    }

    pub fn crash(&mut self, site: SiteId) -> SimResult<()> {
        // Lossy only while the other site holds a settled copy (module documentation).
        let lossy = self.sites[usize::from(1 - site)]
            .replica
            .as_ref()
            .is_some_and(|r| r.untrusted_blocks() == 0);
        self.crash_with(site, lossy, false)
    }

    /// A crash that loses every block written at `site` since its last flush (a power loss),
    /// whatever the other site's state (scripted tests).
    pub fn power_loss(&mut self, site: SiteId) -> SimResult<()> {
        self.crash_with(site, true, true)
    }

    fn crash_with(&mut self, site: SiteId, lossy: bool, all: bool) -> SimResult<()> {
        let s = &mut self.sites[usize::from(site)];
        let Some(replica) = s.replica.take() else {
            return Ok(());
        };
        s.incarnation += 1;
        let before = s.store.blocks_lost;
        s.store.crash(match (lossy, all) {
            (false, _) => Loss::Nothing,
            (true, false) => Loss::Random(&mut self.rng),
            (true, true) => Loss::All,
        });
        let lost = s.store.blocks_lost - before;
        self.report.frames_fenced += replica.counters().mutations_fenced;
        self.report.blocks_settled += replica.counters().blocks_settled;
        self.report.flushes_done += replica.counters().flushes_done;
        self.report.blocks_repaired += replica.counters().blocks_repaired;
        self.report.catchup_reads_local += replica.counters().catchup_reads_local;
        self.report.catchup_reads_pulled += replica.counters().catchup_reads_pulled;
        self.report.blocks_lost += lost;
        let ops = std::mem::take(&mut s.ops);
        self.checker.on_crash(&ops);
        self.report.crashes += 1;
        self.note(|| {
            format!(
                "site {site} crashed (lossy {lossy}, {lost} blocks lost), {} ops lost",
                ops.len()
            )
        });
        self.update_link()
    }

    /// A background flush at `site` (the daemon's periodic region clears flush the volume).
    pub fn flush_store(&mut self, site: SiteId) {
        let s = &mut self.sites[usize::from(site)];
        if s.replica.is_some() {
            crate::core::BlockStore::flush(&mut s.store);
        }
    }

    pub fn restart(&mut self, site: SiteId) -> SimResult<()> {
        if self.sites[usize::from(site)].replica.is_some() {
            return Ok(());
        }
        self.start_site(site);
        self.update_link()
    }

    pub fn set_partition(&mut self, partitioned: bool) -> SimResult<()> {
        self.partitioned = partitioned;
        self.note(|| format!("partition {partitioned}"));
        self.update_link()
    }

    /// While held, frames of `kind` sent by `from` are kept aside instead of sent
    /// (scripted tests).
    pub fn hold_frames(&mut self, from: SiteId, kind: Kind) {
        self.held = Some((from, kind, Vec::new()));
    }

    /// Sends every held frame now, whatever happened since (a frame accepted long ago and
    /// delivered late).
    pub fn release_held(&mut self) -> usize {
        let Some((_, _, frames)) = self.held.take() else {
            return 0;
        };
        let n = frames.len();
        for (to, bytes, lives) in frames {
            self.schedule(
                1,
                Ev::Deliver {
                    to,
                    bytes,
                    stale_ok: true,
                    lives,
                },
            );
        }
        n
    }

    fn update_link(&mut self) -> SimResult<()> {
        let connected = !self.partitioned && self.sites.iter().all(|s| s.replica.is_some());
        if connected == self.link_connected {
            return Ok(());
        }
        self.link_connected = connected;
        self.link_down_since_us = if connected { None } else { Some(self.now_us) };
        if !connected {
            // Frames already in the receiver's socket buffer when the link breaks may still
            // be processed, and a paused receiver may process them much later: after a
            // detach, or even after a rejoin (the fencing case of DESIGN.md §4).
            for ev in self.events.values_mut() {
                if let Ev::Deliver { stale_ok, .. } = ev {
                    *stale_ok |= self.rng.random_bool(0.5);
                }
            }
        }
        let ev = if connected {
            Event::LinkUp
        } else {
            Event::LinkDown
        };
        self.note(|| format!("link {ev:?}"));
        for site in 0..2 {
            self.step_site(site, ev.clone())?;
        }
        Ok(())
    }

    /// The ideal control plane: detach after the link stays down, rejoin when the survivor
    /// reports its resync complete.
    fn control_plane(&mut self) -> SimResult<()> {
        if let Some(epoch) = self.rejoin_ready.take() {
            self.commit_rejoin(epoch)?;
        }
        let Some(since) = self.link_down_since_us else {
            return Ok(());
        };
        if self.map.role != [Role::InSync, Role::InSync]
            || self.now_us < since + self.opts.detach_after_us
        {
            return Ok(());
        }
        // §6: only an in-sync site can survive; a restarted one is not until it has settled.
        let up: Vec<SiteId> = (0..2)
            .filter(|&s| {
                self.sites[usize::from(s)]
                    .replica
                    .as_ref()
                    .is_some_and(|r| r.untrusted_blocks() == 0)
            })
            .collect();
        let survivor = match up.as_slice() {
            [] => return Ok(()),
            [only] => *only,
            _ => self.rng.random_range(0..2),
        };
        self.detach(survivor)
    }

    /// Commits `Detach { survivor }` and tells both sites in the same step (§6 leases).
    pub fn detach(&mut self, survivor: SiteId) -> SimResult<()> {
        let loser = 1 - survivor;
        let new_epoch = self.map.epoch + 1;
        self.map.epoch = new_epoch;
        self.map.fenced_before[usize::from(loser)] = new_epoch;
        self.map.role[usize::from(survivor)] = Role::Survivor;
        self.map.role[usize::from(loser)] = Role::Loser;
        self.report.detaches += 1;
        self.note(|| format!("DETACH survivor {survivor} epoch {new_epoch}"));
        let fenced_before = self.map.fenced_before;
        for site in [survivor, loser] {
            self.step_site(
                site,
                Event::Detach {
                    survivor,
                    new_epoch,
                    fenced_before,
                },
            )?;
        }
        Ok(())
    }

    fn commit_rejoin(&mut self, epoch: u32) -> SimResult<()> {
        let survivor_is_set = self.map.role.contains(&Role::Survivor);
        if epoch != self.map.epoch || !survivor_is_set || !self.link_connected {
            return Ok(());
        }
        let loser = if self.map.role[0] == Role::Loser {
            0
        } else {
            1
        };
        if let Some(lba) = self.sites[loser].store.dirty_blocks_first() {
            return Err(self.fail(format!(
                "invariant 5: rejoin committed while the loser's block {lba} is still dirty"
            )));
        }
        let new_epoch = epoch + 1;
        self.map.epoch = new_epoch;
        self.map.role = [Role::InSync, Role::InSync];
        self.report.rejoins += 1;
        self.note(|| format!("REJOIN epoch {new_epoch}"));
        for site in 0..2 {
            self.step_site(site, Event::Rejoin { new_epoch })?;
        }
        Ok(())
    }

    // ----- stepping ------------------------------------------------------------------------

    fn step_site(&mut self, site: SiteId, event: Event) -> SimResult<()> {
        let now = self.clock(site);
        let s = &mut self.sites[usize::from(site)];
        let Some(replica) = s.replica.as_mut() else {
            return Ok(());
        };
        let mut out = Vec::new();
        if self.opts.trace {
            let line = format!("site {site} <- {}", short_event(&event));
            self.trace.push_back(format!("t={} {line}", self.now_us));
        }
        replica.step(now, event, &mut s.store, &mut out);
        self.report.steps += 1;
        for action in out {
            self.on_action(site, action)?;
        }
        Ok(())
    }

    fn on_action(&mut self, site: SiteId, action: Action) -> SimResult<()> {
        self.note(|| format!("site {site} -> {}", short_action(&action)));
        let result = match action {
            Action::SendFrame(frame) => {
                self.send(site, &frame);
                Ok(())
            }
            Action::AckClient { id, .. } | Action::FailClient { id, .. }
                if self.repair_ops.remove(&id).is_some() =>
            {
                self.op_done(site, id);
                Ok(())
            }
            Action::AckClient { id, stamp } => {
                self.op_done(site, id);
                self.checker.on_ack(id, stamp)
            }
            Action::FlushDone { id } => {
                self.op_done(site, id);
                self.checker.on_flush_done(id)
            }
            Action::FailClient { id, .. } => {
                self.op_done(site, id);
                self.checker.on_fail(id)
            }
            Action::ReadDone { id, data, stamps } => {
                self.op_done(site, id);
                let role = self.map.role[usize::from(site)];
                self.checker
                    .on_read_done(id, &data, &stamps, role, self.map.epoch)
            }
            Action::SaveDivergent { .. } => {
                self.report.divergent_saved += 1;
                Ok(())
            }
            Action::ResyncComplete { epoch } => {
                self.rejoin_ready = Some(epoch);
                Ok(())
            }
            Action::ApplyReceived => {
                let delay_us = self.rng.random_range(0..2_000);
                let life = self.sites[usize::from(site)].incarnation;
                self.schedule(delay_us, Ev::ApplyReceived(site, life));
                Ok(())
            }
        };
        result.map_err(|m| self.fail(m))
    }

    fn op_done(&mut self, site: SiteId, id: ClientOpId) {
        self.sites[usize::from(site)].ops.retain(|&o| o != id);
    }

    fn send(&mut self, from: SiteId, frame: &Frame) {
        let to = 1 - from;
        let mut bytes = frame.encode();
        let lives = [self.sites[0].incarnation, self.sites[1].incarnation];
        if let Some((held_from, kind, frames)) = self.held.as_mut() {
            if *held_from == from && *kind == frame.header.kind {
                frames.push((to, bytes, lives));
                return;
            }
        }
        if !self.link_connected || self.rng.random_ratio(self.opts.drop_per_mille, 1000) {
            return;
        }
        if self.rng.random_ratio(self.opts.corrupt_per_mille, 1000) {
            let bit = self.rng.random_range(0..bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
        }
        let copies = if self.rng.random_ratio(self.opts.dup_per_mille, 1000) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self
                .rng
                .random_range(self.opts.net_delay_us_min..=self.opts.net_delay_us_max);
            let stale_ok = self.rng.random_ratio(self.opts.stale_per_mille, 1000);
            self.schedule(
                delay,
                Ev::Deliver {
                    to,
                    bytes: bytes.clone(),
                    stale_ok,
                    lives,
                },
            );
        }
    }

    fn deliver(
        &mut self,
        to: SiteId,
        bytes: Vec<u8>,
        stale_ok: bool,
        lives: [u64; 2],
    ) -> SimResult<()> {
        if lives != [self.sites[0].incarnation, self.sites[1].incarnation] {
            // An end restarted since: see the module documentation.
            return Ok(());
        }
        if !self.link_connected {
            if stale_ok {
                let later = self.rng.random_range(10_000..1_000_000);
                self.schedule(
                    later,
                    Ev::Deliver {
                        to,
                        bytes,
                        stale_ok,
                        lives,
                    },
                );
            }
            return Ok(());
        }
        match Frame::decode(&bytes, CLUSTER_ID) {
            Ok((frame, used)) if used == bytes.len() => {
                self.step_site(to, Event::FrameReceived(frame))
            }
            Ok(_) => Err(self.fail("a frame decoded with bytes left over".into())),
            Err(e) => {
                // DESIGN.md §7 invariant 7: damaged frames are rejected and counted.
                self.rejects.record(&e);
                self.note(|| format!("site {to} rejected frame: {e}"));
                Ok(())
            }
        }
    }

    fn client_op(&mut self, site: SiteId) -> SimResult<()> {
        if self.now_us < self.opts.chaos_us {
            let gap = self.rng.random_range(1..=self.opts.op_gap_us_max);
            self.schedule(gap, Ev::ClientOp(site));
        }
        let s = &self.sites[usize::from(site)];
        if s.replica.is_none() || s.ops.len() >= self.opts.ops_outstanding_max {
            return Ok(());
        }
        let blocks = self
            .rng
            .random_range(1..=3u32)
            .min(self.opts.volume_blocks as u32);
        let lba = self
            .rng
            .random_range(0..=self.opts.volume_blocks - u64::from(blocks));
        match self.rng.random_range(0..100) {
            0..45 => self.client_write(site, lba, blocks).map(drop),
            45..50 => self.client_write_fua(site, lba, blocks, true).map(drop),
            50..58 => self.client_trim(site, lba, blocks, false).map(drop),
            58..62 => self.client_trim(site, lba, blocks, true).map(drop),
            62..66 => self.client_flush(site).map(drop),
            _ => self.client_read(site, lba, blocks).map(drop),
        }
    }

    fn new_op(&mut self, site: SiteId) -> ClientOpId {
        let id = self.next_op_id;
        self.next_op_id += 1;
        self.sites[usize::from(site)].ops.push(id);
        id
    }

    pub fn client_write(&mut self, site: SiteId, lba: u64, blocks: u32) -> SimResult<ClientOpId> {
        self.client_write_fua(site, lba, blocks, false)
    }

    /// NBD FLUSH at `site`.
    pub fn client_flush(&mut self, site: SiteId) -> SimResult<ClientOpId> {
        let id = self.new_op(site);
        self.checker.start_flush(id);
        self.step_site(site, Event::ClientFlush { id })?;
        Ok(id)
    }

    pub fn client_write_fua(
        &mut self,
        site: SiteId,
        lba: u64,
        blocks: u32,
        fua: bool,
    ) -> SimResult<ClientOpId> {
        let id = self.new_op(site);
        let mut data = Vec::with_capacity(blocks as usize * BLOCK_SIZE as usize);
        for b in lba..lba + u64::from(blocks) {
            data.extend_from_slice(&block_pattern(id, b));
        }
        self.checker.start_write(id, lba, blocks, false);
        self.step_site(site, Event::ClientWrite { id, lba, data, fua })?;
        Ok(id)
    }

    /// TRIM, or WRITE_ZEROES when `zeroes`.
    pub fn client_trim(
        &mut self,
        site: SiteId,
        lba: u64,
        blocks: u32,
        zeroes: bool,
    ) -> SimResult<ClientOpId> {
        let id = self.new_op(site);
        self.checker.start_write(id, lba, blocks, true);
        let ev = if zeroes {
            Event::ClientWriteZeroes { id, lba, blocks }
        } else {
            Event::ClientTrim { id, lba, blocks }
        };
        self.step_site(site, ev)?;
        Ok(id)
    }

    pub fn client_read(&mut self, site: SiteId, lba: u64, blocks: u32) -> SimResult<ClientOpId> {
        let id = self.new_op(site);
        self.checker
            .start_read(id, site, lba, blocks, self.map.epoch);
        self.step_site(site, Event::ClientRead { id, lba, blocks })?;
        Ok(id)
    }

    /// Processes the next event; `false` when there is none.
    fn next_event(&mut self) -> SimResult<bool> {
        let Some(((at, _), ev)) = self.events.pop_first() else {
            return Ok(false);
        };
        self.now_us = self.now_us.max(at);
        match ev {
            Ev::Deliver {
                to,
                bytes,
                stale_ok,
                lives,
            } => self.deliver(to, bytes, stale_ok, lives)?,
            Ev::Tick(site) => {
                self.schedule(self.opts.tick_us, Ev::Tick(site));
                if self.rng.random_ratio(1, 32) {
                    self.flush_store(site);
                }
                self.step_site(site, Event::Tick)?;
            }
            Ev::ClientOp(site) => self.client_op(site)?,
            Ev::Partition(on) => self.set_partition(on)?,
            // Not combined with rot (module documentation).
            Ev::Crash(site) if self.any_rotten() => {
                self.note(|| format!("site {site} crash skipped: a block is rotten"))
            }
            Ev::Crash(site) => self.crash(site)?,
            Ev::Rot(site, lba) => {
                self.rot(site, lba);
            }
            Ev::Restart(site) => self.restart(site)?,
            Ev::ApplyReceived(site, life) => {
                if self.sites[usize::from(site)].incarnation == life {
                    self.step_site(site, Event::ApplyReceived)?;
                }
            }
        }
        self.control_plane()?;
        self.check_invariants()?;
        Ok(true)
    }

    /// Runs every event up to `now + duration_us`.
    pub fn run_for(&mut self, duration_us: u64) -> SimResult<()> {
        let until = self.now_us + duration_us;
        while self
            .events
            .first_key_value()
            .is_some_and(|((at, _), _)| *at <= until)
        {
            self.next_event()?;
        }
        self.now_us = self.now_us.max(until);
        Ok(())
    }

    /// Both sites in sync, up, connected, quiescent and nothing on the wire.
    pub fn settled(&self) -> bool {
        self.map.role == [Role::InSync, Role::InSync]
            && self.link_connected
            && !self
                .events
                .values()
                .any(|e| matches!(e, Ev::Deliver { .. }))
            && self.held.is_none()
            && !self.any_rotten()
            && self.sites.iter().all(|s| {
                s.replica.as_ref().is_some_and(|r| r.is_quiescent(&s.store)) && s.ops.is_empty()
            })
    }

    /// Heals every fault and runs until [`World::settled`], or fails after `max_us`.
    pub fn heal_and_settle(&mut self, max_us: u64) -> SimResult<()> {
        self.opts.drop_per_mille = 0;
        self.opts.dup_per_mille = 0;
        self.opts.corrupt_per_mille = 0;
        self.opts.stale_per_mille = 0;
        self.events
            .retain(|_, e| !matches!(e, Ev::Partition(_) | Ev::Crash(_) | Ev::Restart(_)));
        self.set_partition(false)?;
        for site in 0..2 {
            self.restart(site)?;
        }
        let until = self.now_us + max_us;
        while !self.settled() {
            self.operator()?;
            if self.now_us > until || !self.next_event()? {
                let roles = self.map.role;
                let detail: Vec<String> = self
                    .sites
                    .iter()
                    .map(|s| {
                        format!(
                            "ops={:?} dirty={:?} rotten={:?} quiescent={:?}",
                            s.ops,
                            s.store.dirty_blocks_first(),
                            s.store.rotten_blocks(),
                            s.replica.as_ref().map(|r| r.is_quiescent(&s.store))
                        )
                    })
                    .collect();
                return Err(self.fail(format!(
                    "liveness: not settled within {max_us}us after healing: roles {roles:?}, {detail:?}"
                )));
            }
        }
        Ok(())
    }

    /// DESIGN.md §7, after every step.
    fn check_invariants(&self) -> SimResult<()> {
        // Invariants 2 and 5: every copy that counts holds every acknowledged write and
        // every version a checked read returned (or a newer one).
        for site in 0..2u8 {
            if self.map.role[usize::from(site)] == Role::Loser {
                continue;
            }
            let s = &self.sites[usize::from(site)];
            let store = &s.store;
            for lba in 0..self.opts.volume_blocks {
                // A block a crash may have lost is no copy until settled from the peer, which
                // holds it (a lossy crash needs a settled peer; see `crash`). Down, the
                // persistent dirty map is what the restart will distrust.
                let untrusted = match s.replica.as_ref() {
                    Some(r) => r.is_untrusted(lba),
                    None => crate::core::BlockStore::is_dirty(store, lba),
                };
                if untrusted {
                    continue;
                }
                let need = self.checker.required_stamp(lba);
                // sync-received: a write received and acknowledged as received counts where
                // it waits to be applied (it is lost with the process, and then the block is
                // in the activity log and untrusted).
                let stored = crate::core::BlockStore::stamp(store, lba);
                let received = s.replica.as_ref().and_then(|r| r.received_stamp(lba));
                let have = received.map_or(stored, |r| r.max(stored));
                if have < need {
                    return Err(self.fail(format!(
                        "invariant 2/5: site {site} ({:?}) block {lba} has {have:?}, an acknowledged \
                         or read version {need:?} is lost",
                        self.map.role[usize::from(site)]
                    )));
                }
            }
        }
        // Invariant 1: convergence once everything is settled.
        if self.settled() {
            let (a, b) = (&self.sites[0].store, &self.sites[1].store);
            if let Some(lba) = a.same_blocks_as(b) {
                return Err(self.fail(format!(
                    "invariant 1: sites differ at block {lba} when in sync and idle: {:?} vs {:?}",
                    a.block(lba).1,
                    b.block(lba).1
                )));
            }
            for lba in 0..self.opts.volume_blocks {
                let (data, stamp) = a.block(lba);
                self.checker
                    .check_block(lba, data, stamp)
                    .map_err(|m| self.fail(m))?;
            }
        }
        Ok(())
    }

    /// The full run: chaos with load, then healing and convergence.
    pub fn run(&mut self) -> SimResult<SimReport> {
        self.run_for(self.opts.chaos_us)?;
        self.heal_and_settle(self.opts.liveness_us)?;
        Ok(self.report())
    }
}

/// Runs one seed with options drawn from it (and `fault`, for checking the checker).
pub fn run_seed(seed: u64, fault: Fault, trace: bool) -> SimResult<SimReport> {
    let mut opts = SimOptions::from_seed(seed);
    opts.fault = fault;
    opts.trace = trace;
    World::new(seed, opts).run()
}

fn short_event(e: &Event) -> String {
    match e {
        Event::ClientWrite { id, lba, data, fua } => format!(
            "write#{id} lba {lba} x{}{}",
            data.len() / BLOCK_SIZE as usize,
            if *fua { " fua" } else { "" }
        ),
        Event::FrameReceived(f) => short_frame(f),
        other => format!("{other:?}"),
    }
}

fn short_action(a: &Action) -> String {
    match a {
        Action::SendFrame(f) => format!("send {}", short_frame(f)),
        Action::ReadDone { id, stamps, .. } => format!("read#{id} done {stamps:?}"),
        Action::SaveDivergent { lba, stamp, .. } => format!("save divergent {lba} {stamp:?}"),
        other => format!("{other:?}"),
    }
}

fn short_frame(f: &Frame) -> String {
    let h = &f.header;
    format!(
        "{:?}{} seq {} lba {} x{} epoch {} stamp {:?} ({}B)",
        h.kind,
        match h.flags {
            0 => String::new(),
            f => format!(" flags {f:#x}"),
        },
        h.seq,
        h.lba,
        h.blocks,
        h.accept_epoch,
        crate::stamp::StampParts::decode(h.stamp),
        HEADER_BYTES + f.body.len()
    )
}
