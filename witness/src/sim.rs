//! A seeded, deterministic simulation of arbitration (DESIGN §6) checked against DESIGN §7
//! invariant 3 at every step.
//!
//! Two sites (each an [`Arbiter`] plus a client writing and reading, a set of applied writes and
//! a bounded queue of writes waiting for their ack) and a witness. Raft is replaced by a
//! linearizable log with Raft's availability rule: a proposal or ReadIndex commits or is
//! served only if its origin reaches a majority of {A, B, W} (itself plus one other node, both
//! directions up) at that instant. One seed picks everything: clock rates within ρ, message
//! delays and losses, partitions (full, one-way, witness or site isolated), process pauses,
//! crashes and restarts. After a chaos phase, a calm phase heals everything and checks that
//! every CG is served again (liveness).
//!
//! The checker (invariant 3, per CG):
//! - at no time have both sites acknowledged writes the other has not applied;
//! - a site that lost arbitration serves nothing (no read reply, no write ack) after the
//!   winner has acknowledged anything alone.
//!
//! Time: the simulator's clock is real time in µs; each site sees its own `CLOCK_BOOTTIME`
//! running at `1 + r` times real time with `r` in `[0, ρ]`, so any two sites' rates differ
//! by at most `1 + ρ`, the bound [`LeaseConfig::rho_ppm`] states. A reply is checked, then
//! leaves up to δ/2 later (the pause allowance at work); whole-process pauses defer all of a
//! site's work, including its timers, but never a reply already checked.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::arbiter::{Action, Arbiter, ArbiterConfig, Echo, Heartbeat, LapsePolicy, Serve};
use crate::lease::LeaseConfig;
use crate::map::{AckPolicy, CgId, ClusterMap, Command, Epoch, Preference, Site};

/// A deliberate bug in the simulated sites, to show the checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// The survivor acknowledges alone as soon as it learns the detach, without waiting
    /// `L·(1+ρ) + δ`.
    SurvivorSkipsWait,
    /// Any message from the peer (its heartbeats, its writes) renews the lease from its
    /// arrival time, as if it had been a reply.
    UnsolicitedRenewal,
    /// A granted echo renews the lease from the echo's arrival instead of the heartbeat's send
    /// time, so network delay stretches the lease past what the granter waits for.
    LeaseFromArrival,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Length of the chaos phase, in simulated µs.
    pub chaos_us: u64,
    /// Length of the calm phase (no faults) at whose end every CG must be served again.
    pub calm_us: u64,
    /// Consistency groups simulated; preferences alternate between the sites.
    pub cgs: u64,
    pub broken: Option<Broken>,
}

impl SimConfig {
    /// The configuration tests run for a seed.
    pub fn for_seed(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            chaos_us: 1_000_000,
            calm_us: 600_000,
            cgs: 2,
            broken: None,
        }
    }
}

/// What one run did, to show the faults really happened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub events: u64,
    pub commits: u64,
    pub detaches: u64,
    pub reads_served: u64,
    pub writes_acked: u64,
    pub writes_acked_alone: u64,
    pub writes_failed: u64,
    pub crashes: u64,
    pub pauses: u64,
    pub partitions: u64,
}

/// A broken invariant, with what is needed to replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub seed: u64,
    pub time_us: u64,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} at {} µs: {}\nreplay: STRETCH_WITNESS_SIM_SEED={} cargo test -p stretch-witness --test sim replay_one_seed -- --nocapture",
            self.seed, self.time_us, self.what, self.seed
        )
    }
}

/// Events allowed in the queue at once; a run that exceeds it is a bug in the simulator.
const EVENTS_MAX: usize = 100_000;
/// Writes a site's client keeps waiting for an ack; it issues none beyond this (back-pressure).
const PENDING_WRITES_MAX: usize = 32;
const TICK_US: u64 = 2_000;
/// A write not acked within this long (local time) fails with EIO: a lost frame is not resent.
const WRITE_TIMEOUT_US: u64 = 300_000;
/// Spacing of resync proposals and copies.
const RESYNC_RETRY_US: u64 = 30_000;
const NODES: usize = 3;
const W: usize = 2;

fn sim_arbiter_config(on_lapse: LapsePolicy) -> ArbiterConfig {
    ArbiterConfig {
        lease: LeaseConfig {
            lease_us: 100_000,
            rho_ppm: 20_000,
            delta_us: 2_000,
        },
        peer_timeout_us: 40_000,
        heartbeat_interval_us: 10_000,
        read_index_interval_us: 30_000,
        preference_delay_us: 20_000,
        propose_retry_us: 30_000,
        on_lapse,
    }
}

#[derive(Debug, Clone)]
enum Msg {
    Heartbeat(Heartbeat),
    Echo(Echo),
    Write {
        id: u64,
        cg: CgId,
        epoch: Epoch,
    },
    WriteAck {
        id: u64,
        cg: CgId,
        epoch: Epoch,
    },
    Map {
        index: u64,
        map: ClusterMap,
    },
    ReadIndexReply {
        id: u64,
        index: u64,
        map: ClusterMap,
    },
    /// Resync (DESIGN §4, reduced to what arbitration needs): the survivor's writes of a CG.
    ResyncCopy {
        cg: CgId,
        epoch: Epoch,
        ids: Vec<u64>,
    },
    ResyncDone {
        cg: CgId,
        epoch: Epoch,
        ids: Vec<u64>,
    },
}

#[derive(Debug, Clone)]
enum Reply {
    Read {
        cg: CgId,
        view_epoch: Epoch,
    },
    Ack {
        id: u64,
        cg: CgId,
        view_epoch: Epoch,
        alone: bool,
    },
}

#[derive(Debug, Clone)]
enum Ev {
    Tick {
        site: Site,
        incarnation: u32,
    },
    Client {
        site: Site,
        incarnation: u32,
    },
    Deliver {
        to: Site,
        from: usize,
        msg: Msg,
    },
    /// A proposal reaches the log.
    Propose {
        from: Site,
        cmd: Command,
    },
    /// A ReadIndex reaches the leader.
    ReadIndex {
        from: Site,
        id: u64,
    },
    /// A checked reply leaves the site.
    Emit {
        site: Site,
        incarnation: u32,
        reply: Reply,
    },
    Fault,
    Restart {
        site: Site,
    },
}

#[derive(Debug, Clone)]
struct Pending {
    cg: CgId,
    sent_local_us: u64,
    epoch: Epoch,
    peer_acked: bool,
}

struct SimSite {
    arb: Arbiter,
    incarnation: u32,
    rate_ppm: u64,
    offset_us: u64,
    up: bool,
    paused_until_us: u64,
    /// Writes applied here (durable: they survive a crash).
    applied: BTreeSet<u64>,
    pending: BTreeMap<u64, Pending>,
    /// Local time a heartbeat from the peer last arrived: the survivor resyncs a peer it hears.
    peer_heard_local_us: Option<u64>,
    /// Local time of the last resync step per CG (a proposal or a copy), for spacing retries.
    resync_step_local_us: BTreeMap<CgId, u64>,
}

impl SimSite {
    fn local_us(&self, now_us: u64) -> u64 {
        self.offset_us + now_us + now_us * self.rate_ppm / 1_000_000
    }
}

struct Sim {
    cfg: SimConfig,
    rng: SmallRng,
    now_us: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    sites: [SimSite; 2],
    /// `link_up[from][to]` over nodes A=0, B=1, W=2.
    link_up: [[bool; NODES]; NODES],
    map: ClusterMap,
    log_index: u64,
    next_write_id: u64,
    arb_cfg: ArbiterConfig,
    chaos: bool,
    report: SimReport,
    // Checker state, per CG.
    /// Writes acknowledged by a site that the other site has not applied.
    unreplicated_acked: BTreeMap<(CgId, Site), BTreeSet<u64>>,
    /// Earliest real time of an alone ack per (CG, epoch of the survivor's view).
    first_alone_ack_us: BTreeMap<(CgId, Epoch), u64>,
    write_cg: BTreeMap<u64, CgId>,
}

/// Runs one seed. `Err` carries the first violation.
pub fn run(cfg: &SimConfig) -> Result<SimReport, Violation> {
    let mut sim = Sim::new(cfg.clone());
    sim.run()
}

fn node(site: Site) -> usize {
    site.idx()
}

impl Sim {
    fn new(cfg: SimConfig) -> Sim {
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let on_lapse = if rng.random_bool(0.5) {
            LapsePolicy::Eio
        } else {
            LapsePolicy::Suspend
        };
        let arb_cfg = sim_arbiter_config(on_lapse);
        let rho_ppm = arb_cfg.lease.rho_ppm;
        let mk = |site: Site, rng: &mut SmallRng| SimSite {
            arb: Arbiter::new(site, arb_cfg, 1, 0),
            incarnation: 1,
            rate_ppm: rng.random_range(0..=rho_ppm),
            offset_us: rng.random_range(0..1_000_000_000),
            up: true,
            paused_until_us: 0,
            applied: BTreeSet::new(),
            pending: BTreeMap::new(),
            peer_heard_local_us: None,
            resync_step_local_us: BTreeMap::new(),
        };
        let a = mk(Site::A, &mut rng);
        let b = mk(Site::B, &mut rng);
        let mut map = ClusterMap::new();
        for cg in 0..cfg.cgs {
            let site = if cg % 2 == 0 { Site::A } else { Site::B };
            let preference = if rng.random_bool(0.5) {
                Preference::Pinned(site)
            } else {
                Preference::Workload(site)
            };
            map.apply(&Command::VolumeCreate {
                volume: cg,
                cg,
                size_bytes: 1 << 30,
                policy: AckPolicy::Sync,
                preference,
            });
        }
        let mut sim = Sim {
            cfg,
            rng,
            now_us: 0,
            seq: 0,
            events: BTreeMap::new(),
            sites: [a, b],
            link_up: [[true; NODES]; NODES],
            map,
            log_index: 1,
            next_write_id: 0,
            arb_cfg,
            chaos: true,
            report: SimReport::default(),
            unreplicated_acked: BTreeMap::new(),
            first_alone_ack_us: BTreeMap::new(),
            write_cg: BTreeMap::new(),
        };
        // The sites start the way a daemon must: from a ReadIndex read of the map; the
        // sites' arbiters issue it on their first tick.
        for site in Site::BOTH {
            let d = sim.rng.random_range(0..TICK_US);
            sim.schedule(
                d,
                Ev::Tick {
                    site,
                    incarnation: 1,
                },
            );
            let d = sim.rng.random_range(0..5_000);
            sim.schedule(
                d,
                Ev::Client {
                    site,
                    incarnation: 1,
                },
            );
        }
        let d = sim.rng.random_range(50_000..200_000);
        sim.schedule(d, Ev::Fault);
        sim
    }

    fn schedule(&mut self, delay_us: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((self.now_us + delay_us, self.seq), ev);
    }

    fn violation(&self, what: String) -> Violation {
        Violation {
            seed: self.cfg.seed,
            time_us: self.now_us,
            what,
        }
    }

    fn run(&mut self) -> Result<SimReport, Violation> {
        let end_us = self.cfg.chaos_us + self.cfg.calm_us;
        while let Some(((at_us, _), ev)) = self.events.pop_first() {
            if at_us > end_us {
                break;
            }
            if self.events.len() > EVENTS_MAX {
                return Err(self.violation("simulator event queue overflow".into()));
            }
            self.now_us = at_us;
            self.report.events += 1;
            if self.chaos && self.now_us >= self.cfg.chaos_us {
                self.calm();
            }
            self.step(ev)?;
        }
        self.now_us = end_us;
        self.check_liveness()?;
        Ok(self.report.clone())
    }

    /// Ends the chaos: heal every link, end pauses, restart crashed sites.
    fn calm(&mut self) {
        self.chaos = false;
        self.link_up = [[true; NODES]; NODES];
        for site in Site::BOTH {
            if !self.sites[site.idx()].up {
                self.restart(site);
            }
        }
    }

    /// The site is paused: its work waits until the pause ends (replies already checked do not).
    fn deferred(&mut self, site: Site, ev: &Ev) -> bool {
        let until = self.sites[site.idx()].paused_until_us;
        if until > self.now_us {
            self.seq += 1;
            self.events.insert((until, self.seq), ev.clone());
            return true;
        }
        false
    }

    fn step(&mut self, ev: Ev) -> Result<(), Violation> {
        match ev {
            Ev::Tick { site, incarnation } => {
                let s = &self.sites[site.idx()];
                if !s.up || s.incarnation != incarnation {
                    return Ok(());
                }
                if self.deferred(site, &Ev::Tick { site, incarnation }) {
                    return Ok(());
                }
                let now = self.local(site);
                let actions = self.sites[site.idx()].arb.tick(now);
                self.act(site, actions);
                self.resync_step(site, now);
                self.try_ack(site);
                self.schedule(TICK_US, Ev::Tick { site, incarnation });
            }
            Ev::Client { site, incarnation } => {
                let s = &self.sites[site.idx()];
                if !s.up || s.incarnation != incarnation {
                    return Ok(());
                }
                if self.deferred(site, &Ev::Client { site, incarnation }) {
                    return Ok(());
                }
                self.client_op(site);
                let d = self.rng.random_range(500..6_000);
                self.schedule(d, Ev::Client { site, incarnation });
            }
            Ev::Deliver { to, from, msg } => {
                if !self.sites[to.idx()].up {
                    return Ok(());
                }
                let ev = Ev::Deliver { to, from, msg };
                if self.deferred(to, &ev) {
                    return Ok(());
                }
                let Ev::Deliver { msg, .. } = ev else {
                    unreachable!()
                };
                self.deliver(to, msg);
                self.try_ack(to);
            }
            Ev::Propose { from, cmd } => self.propose(from, cmd),
            Ev::ReadIndex { from, id } => {
                if self.majority_reachable(node(from)) {
                    let map = self.map.clone();
                    let index = self.log_index;
                    self.send_from_log(from, Msg::ReadIndexReply { id, index, map });
                }
            }
            Ev::Emit {
                site,
                incarnation,
                reply,
            } => {
                let s = &self.sites[site.idx()];
                if s.up && s.incarnation == incarnation {
                    self.emit(site, reply)?;
                }
            }
            Ev::Fault => {
                if self.chaos {
                    self.fault();
                    let d = self.rng.random_range(20_000..300_000);
                    self.schedule(d, Ev::Fault);
                }
            }
            Ev::Restart { site } => {
                if !self.sites[site.idx()].up {
                    self.restart(site);
                }
            }
        }
        Ok(())
    }

    fn local(&self, site: Site) -> u64 {
        self.sites[site.idx()].local_us(self.now_us)
    }

    fn alive(&self, n: usize) -> bool {
        n == W || self.sites[n].up
    }

    /// Both directions up and both ends alive: what Raft needs between two voters.
    fn reachable(&self, x: usize, y: usize) -> bool {
        x == y || (self.link_up[x][y] && self.link_up[y][x] && self.alive(x) && self.alive(y))
    }

    fn majority_reachable(&self, x: usize) -> bool {
        self.alive(x) && (0..NODES).filter(|&y| self.reachable(x, y)).count() >= 2
    }

    fn net_delay(&mut self) -> u64 {
        // The calm phase has no tail delays and no loss: liveness is checked on a good network.
        if self.chaos && self.rng.random_bool(0.02) {
            self.rng.random_range(5_000..80_000)
        } else {
            self.rng.random_range(200..5_000)
        }
    }

    /// Sends a message over a link; lost if the link is down now, or at random.
    fn send(&mut self, from: usize, to: Site, msg: Msg) {
        if !self.link_up[from][node(to)] || (self.chaos && self.rng.random_bool(0.01)) {
            return;
        }
        let d = self.net_delay();
        self.schedule(d, Ev::Deliver { to, from, msg });
    }

    /// A message from the Raft group (the leader) to a site: from any node the site reaches.
    fn send_from_log(&mut self, to: Site, msg: Msg) {
        let via = (0..NODES).find(|&n| n != node(to) && self.reachable(n, node(to)));
        // A site that reaches no node hears nothing from the group; its lease covers it.
        if let Some(n) = via {
            self.send(n, to, msg);
        }
    }

    fn act(&mut self, site: Site, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendHeartbeat(hb) => self.send(node(site), site.peer(), Msg::Heartbeat(hb)),
                Action::ReadIndex { id } => {
                    let d = self.net_delay();
                    self.schedule(d, Ev::ReadIndex { from: site, id });
                }
                Action::Propose(cmd) => {
                    let d = self.net_delay();
                    self.schedule(d, Ev::Propose { from: site, cmd });
                }
                Action::Detached { cg } => self.fail_pending(site, Some(cg)),
                Action::LeaseLapsed { cg, policy } => {
                    if policy == LapsePolicy::Eio {
                        self.fail_pending(site, Some(cg));
                    }
                }
            }
        }
    }

    fn fail_pending(&mut self, site: Site, cg: Option<CgId>) {
        let s = &mut self.sites[site.idx()];
        let before = s.pending.len();
        s.pending.retain(|_, p| cg.is_some_and(|c| c != p.cg));
        self.report.writes_failed += (before - s.pending.len()) as u64;
    }

    fn propose(&mut self, from: Site, cmd: Command) {
        if !self.majority_reachable(node(from)) {
            return;
        }
        let result = self.map.apply(&cmd);
        self.log_index += 1;
        self.report.commits += 1;
        if let crate::map::ApplyResult::One(crate::map::Outcome::Applied { .. }) = result {
            if matches!(cmd, Command::Detach { .. }) {
                self.report.detaches += 1;
            }
        }
        if let crate::map::ApplyResult::Many(rs) = &result {
            self.report.detaches += rs
                .iter()
                .filter(|(_, o)| matches!(o, crate::map::Outcome::Applied { .. }))
                .count() as u64;
        }
        // The state machine pushes the new map to every site it reaches.
        for site in Site::BOTH {
            let (index, map) = (self.log_index, self.map.clone());
            self.send_from_log(site, Msg::Map { index, map });
        }
    }

    fn deliver(&mut self, to: Site, msg: Msg) {
        let now = self.local(to);
        let broken_renewal = self.cfg.broken == Some(Broken::UnsolicitedRenewal);
        match msg {
            Msg::Heartbeat(hb) => {
                self.sites[to.idx()].peer_heard_local_us = Some(now);
                if broken_renewal {
                    self.renew_unsolicited(to, now);
                }
                let echo = self.sites[to.idx()].arb.on_heartbeat(&hb, now);
                self.send(node(to), to.peer(), Msg::Echo(echo));
            }
            Msg::Echo(echo) => {
                if self.cfg.broken == Some(Broken::LeaseFromArrival) {
                    for (cg, epoch) in &echo.granted {
                        self.sites[to.idx()]
                            .arb
                            .on_write_acked(*cg, *epoch, now, now);
                    }
                }
                self.sites[to.idx()].arb.on_echo(&echo, now);
            }
            Msg::Write { id, cg, epoch } => {
                if broken_renewal {
                    self.renew_unsolicited(to, now);
                }
                if self.sites[to.idx()].arb.on_peer_write(cg, epoch, now) {
                    self.apply_at(to, id);
                    self.send(node(to), to.peer(), Msg::WriteAck { id, cg, epoch });
                }
            }
            Msg::WriteAck { id, cg, epoch } => {
                let s = &mut self.sites[to.idx()];
                if let Some(p) = s.pending.get_mut(&id) {
                    p.peer_acked = true;
                    let sent = p.sent_local_us;
                    s.arb.on_write_acked(cg, epoch, sent, now);
                }
            }
            Msg::Map { index, map } => {
                let actions = self.sites[to.idx()].arb.on_map(index, &map, now);
                self.act(to, actions);
            }
            Msg::ReadIndexReply { id, index, map } => {
                let actions = self.sites[to.idx()].arb.on_read_index(id, index, &map, now);
                self.act(to, actions);
            }
            Msg::ResyncCopy { cg, epoch, ids } => {
                let resyncing = self.sites[to.idx()].arb.view(cg).is_some_and(|v| {
                    v.epoch == epoch && v.state(to) == crate::map::SiteState::Resyncing
                });
                if resyncing {
                    for id in &ids {
                        self.apply_at(to, *id);
                    }
                    self.send(node(to), to.peer(), Msg::ResyncDone { cg, epoch, ids });
                }
            }
            Msg::ResyncDone { cg, epoch, ids } => self.resync_done(to, cg, epoch, ids, now),
        }
    }

    /// Applies write `id` at `site`: it is then no longer unreplicated for the other site.
    fn apply_at(&mut self, site: Site, id: u64) {
        self.sites[site.idx()].applied.insert(id);
        if let Some(cg) = self.write_cg.get(&id) {
            if let Some(set) = self.unreplicated_acked.get_mut(&(*cg, site.peer())) {
                set.remove(&id);
            }
        }
    }

    /// The survivor's resync driver: start a resync of a peer it hears, copy, then rejoin.
    fn resync_step(&mut self, site: Site, now: u64) {
        let s = &self.sites[site.idx()];
        let hears_peer = s
            .peer_heard_local_us
            .is_some_and(|t| now.saturating_sub(t) < 30_000);
        let mut actions = Vec::new();
        for cg in 0..self.cfg.cgs {
            if !s.arb.is_survivor(cg) || !hears_peer {
                continue;
            }
            if s.resync_step_local_us
                .get(&cg)
                .is_some_and(|t| now.saturating_sub(*t) < RESYNC_RETRY_US)
            {
                continue;
            }
            let Some(view) = s.arb.view(cg) else { continue };
            match view.state(site.peer()) {
                crate::map::SiteState::Detached => actions.push((
                    cg,
                    Some(Command::StartResync {
                        cg,
                        site: site.peer(),
                        expected_epoch: view.epoch,
                    }),
                    view.epoch,
                )),
                crate::map::SiteState::Resyncing => actions.push((cg, None, view.epoch)),
                crate::map::SiteState::InSync => {}
            }
        }
        for (cg, cmd, epoch) in actions {
            self.sites[site.idx()].resync_step_local_us.insert(cg, now);
            match cmd {
                Some(cmd) => self.act(site, vec![Action::Propose(cmd)]),
                None => {
                    let ids = self.cg_writes_at(site, cg);
                    self.send(node(site), site.peer(), Msg::ResyncCopy { cg, epoch, ids });
                }
            }
        }
    }

    fn cg_writes_at(&self, site: Site, cg: CgId) -> Vec<u64> {
        self.sites[site.idx()]
            .applied
            .iter()
            .filter(|id| self.write_cg.get(id) == Some(&cg))
            .copied()
            .collect()
    }

    /// The resyncing peer applied `ids`. Rejoin once it holds every write of the CG the
    /// survivor has, except writes still waiting for its ack (live writes reach it directly).
    fn resync_done(&mut self, site: Site, cg: CgId, epoch: Epoch, ids: Vec<u64>, now: u64) {
        let s = &self.sites[site.idx()];
        let current = s.arb.view(cg).is_some_and(|v| {
            v.epoch == epoch && v.state(site.peer()) == crate::map::SiteState::Resyncing
        });
        if !s.arb.is_survivor(cg) || !current {
            return;
        }
        let copied: BTreeSet<u64> = ids.into_iter().collect();
        let complete = self
            .cg_writes_at(site, cg)
            .iter()
            .all(|id| copied.contains(id) || s.pending.contains_key(id));
        let s = &mut self.sites[site.idx()];
        for (id, p) in s.pending.iter_mut() {
            if p.cg == cg && copied.contains(id) {
                p.peer_acked = true;
            }
        }
        if complete {
            s.resync_step_local_us.insert(cg, now);
            if let Some(cmd) = s.arb.propose_rejoin(cg, now) {
                self.act(site, vec![Action::Propose(cmd)]);
            }
        }
    }

    /// The `UnsolicitedRenewal` bug: treat a message's arrival as a renewing reply.
    fn renew_unsolicited(&mut self, site: Site, now: u64) {
        let s = &mut self.sites[site.idx()];
        let cgs: Vec<(CgId, Epoch)> = (0..self.cfg.cgs)
            .filter_map(|cg| Some((cg, s.arb.epoch(cg)?)))
            .collect();
        for (cg, epoch) in cgs {
            s.arb.on_write_acked(cg, epoch, now, now);
        }
    }

    fn client_op(&mut self, site: Site) {
        let now = self.local(site);
        let cg = self.rng.random_range(0..self.cfg.cgs);
        let reply_pause_us = self.rng.random_range(0..=self.arb_cfg.lease.delta_us / 2);
        let incarnation = self.sites[site.idx()].incarnation;
        if self.rng.random_bool(0.5) {
            let arb = &self.sites[site.idx()].arb;
            if arb.serve(cg, now) == Serve::Yes {
                let view_epoch = arb.epoch(cg).unwrap_or_default();
                let reply = Reply::Read { cg, view_epoch };
                self.schedule(
                    reply_pause_us,
                    Ev::Emit {
                        site,
                        incarnation,
                        reply,
                    },
                );
            }
            return;
        }
        if self.sites[site.idx()].pending.len() >= PENDING_WRITES_MAX {
            return;
        }
        let Some(epoch) = self.sites[site.idx()].arb.accept_epoch(cg, now) else {
            self.report.writes_failed += 1;
            return;
        };
        let id = self.next_write_id;
        self.next_write_id += 1;
        self.write_cg.insert(id, cg);
        let s = &mut self.sites[site.idx()];
        s.applied.insert(id);
        s.pending.insert(
            id,
            Pending {
                cg,
                sent_local_us: now,
                epoch,
                peer_acked: false,
            },
        );
        // The peer gets live writes while in sync, and as a sync target while it resyncs.
        let peer_target = s.arb.view(cg).is_some_and(|v| {
            v.state(site.peer()) == crate::map::SiteState::InSync
                || (v.state(site) == crate::map::SiteState::InSync
                    && v.state(site.peer()) == crate::map::SiteState::Resyncing)
        });
        if peer_target {
            self.send(node(site), site.peer(), Msg::Write { id, cg, epoch });
        }
        self.try_ack(site);
    }

    /// Acks every pending write that may be acked now; the ack leaves within δ/2.
    fn try_ack(&mut self, site: Site) {
        if !self.sites[site.idx()].up {
            return;
        }
        let now = self.local(site);
        let skip_wait = self.cfg.broken == Some(Broken::SurvivorSkipsWait);
        let before = self.sites[site.idx()].pending.len();
        self.sites[site.idx()]
            .pending
            .retain(|_, p| now.saturating_sub(p.sent_local_us) < WRITE_TIMEOUT_US);
        self.report.writes_failed += (before - self.sites[site.idx()].pending.len()) as u64;
        let s = &self.sites[site.idx()];
        let mut acks = Vec::new();
        for (id, p) in &s.pending {
            let view_epoch = s.arb.epoch(p.cg).unwrap_or_default();
            if view_epoch != p.epoch && !s.arb.is_survivor(p.cg) {
                continue;
            }
            let alone_ok = s.arb.may_ack_alone(p.cg, now) || (skip_wait && s.arb.is_survivor(p.cg));
            if p.peer_acked && s.arb.serve(p.cg, now) == Serve::Yes {
                acks.push((*id, p.cg, view_epoch, false));
            } else if alone_ok {
                acks.push((*id, p.cg, view_epoch, true));
            }
        }
        let incarnation = s.incarnation;
        for (id, cg, view_epoch, alone) in acks {
            self.sites[site.idx()].pending.remove(&id);
            let pause = self.rng.random_range(0..=self.arb_cfg.lease.delta_us / 2);
            let reply = Reply::Ack {
                id,
                cg,
                view_epoch,
                alone,
            };
            self.schedule(
                pause,
                Ev::Emit {
                    site,
                    incarnation,
                    reply,
                },
            );
        }
    }

    /// A reply leaves `site`: check invariant 3 (DESIGN §7).
    fn emit(&mut self, site: Site, reply: Reply) -> Result<(), Violation> {
        let (cg, view_epoch) = match &reply {
            Reply::Read { cg, view_epoch } | Reply::Ack { cg, view_epoch, .. } => {
                (*cg, *view_epoch)
            }
        };
        // A site fenced beyond its view lost a detach it may not know of yet: it must have
        // stopped serving before the winner acknowledged anything alone.
        if let Some(state) = self.map.cg(cg) {
            let fence = state.fenced_before(site);
            if fence > view_epoch {
                let winner_alone = self
                    .first_alone_ack_us
                    .range(
                        (cg, fence)
                            ..=(
                                cg,
                                Epoch {
                                    generation: u64::MAX,
                                    n: u64::MAX,
                                },
                            ),
                    )
                    .map(|(_, t)| *t)
                    .min();
                if let Some(t) = winner_alone {
                    return Err(self.violation(format!(
                        "DESIGN §7 inv. 3: {site:?} lost cg {cg} (fenced before {fence:?}, its view \
                         {view_epoch:?}) and served {reply:?} after the winner acked alone at {t} µs"
                    )));
                }
            }
        }
        match reply {
            Reply::Read { .. } => self.report.reads_served += 1,
            Reply::Ack {
                id,
                cg,
                view_epoch,
                alone,
            } => {
                self.report.writes_acked += 1;
                if alone {
                    self.report.writes_acked_alone += 1;
                    self.first_alone_ack_us
                        .entry((cg, view_epoch))
                        .or_insert(self.now_us);
                }
                if !self.sites[site.peer().idx()].applied.contains(&id) {
                    self.unreplicated_acked
                        .entry((cg, site))
                        .or_default()
                        .insert(id);
                }
                let mine = self
                    .unreplicated_acked
                    .get(&(cg, site))
                    .is_some_and(|s| !s.is_empty());
                let theirs = self
                    .unreplicated_acked
                    .get(&(cg, site.peer()))
                    .is_some_and(|s| !s.is_empty());
                if mine && theirs {
                    return Err(self.violation(format!(
                        "DESIGN §7 inv. 3: both sites acked writes of cg {cg} the other has not applied"
                    )));
                }
            }
        }
        Ok(())
    }

    fn fault(&mut self) {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=24 => {
                self.link_up = [[true; NODES]; NODES];
            }
            25..=69 => {
                self.report.partitions += 1;
                self.link_up = [[true; NODES]; NODES];
                let (a, b) = (node(Site::A), node(Site::B));
                match self.rng.random_range(0..6) {
                    0 => {
                        self.link_up[a][b] = false;
                        self.link_up[b][a] = false;
                    }
                    1 => self.link_up[a][b] = false,
                    2 => self.link_up[b][a] = false,
                    3 => {
                        // The witness alone is lost.
                        for n in [a, b] {
                            self.link_up[n][W] = false;
                            self.link_up[W][n] = false;
                        }
                    }
                    4 => {
                        // The link and the witness together: nothing can commit.
                        for (x, y) in [(a, b), (a, W), (b, W)] {
                            self.link_up[x][y] = false;
                            self.link_up[y][x] = false;
                        }
                    }
                    _ => {
                        // One site isolated from everyone, possibly one way only.
                        let x = if self.rng.random_bool(0.5) { a } else { b };
                        let one_way = self.rng.random_bool(0.3);
                        for y in 0..NODES {
                            if y != x {
                                self.link_up[x][y] = false;
                                if !one_way {
                                    self.link_up[y][x] = false;
                                }
                            }
                        }
                    }
                }
            }
            70..=87 => {
                self.report.pauses += 1;
                let site = if self.rng.random_bool(0.5) {
                    Site::A
                } else {
                    Site::B
                };
                let d = self.rng.random_range(1_000..250_000);
                let s = &mut self.sites[site.idx()];
                s.paused_until_us = s.paused_until_us.max(self.now_us + d);
            }
            _ => {
                let site = if self.rng.random_bool(0.5) {
                    Site::A
                } else {
                    Site::B
                };
                if self.sites[site.idx()].up {
                    self.report.crashes += 1;
                    self.sites[site.idx()].up = false;
                    let d = self.rng.random_range(10_000..400_000);
                    self.schedule(d, Ev::Restart { site });
                }
            }
        }
    }

    /// A new process: volatile state (arbiter, queued writes) is gone; applied data stays.
    fn restart(&mut self, site: Site) {
        let now = self.local(site);
        let s = &mut self.sites[site.idx()];
        self.report.writes_failed += s.pending.len() as u64;
        s.pending.clear();
        s.incarnation += 1;
        s.up = true;
        s.paused_until_us = 0;
        s.arb = Arbiter::new(site, self.arb_cfg, s.incarnation, now);
        let incarnation = s.incarnation;
        self.schedule(0, Ev::Tick { site, incarnation });
        self.schedule(1_000, Ev::Client { site, incarnation });
    }

    /// After the calm phase every CG must be served by some site again.
    fn check_liveness(&self) -> Result<(), Violation> {
        for cg in 0..self.cfg.cgs {
            let served = Site::BOTH.into_iter().any(|site| {
                let s = &self.sites[site.idx()];
                s.up && s.arb.serve(cg, s.local_us(self.now_us)) == Serve::Yes
            });
            if !served {
                let views: Vec<_> = Site::BOTH
                    .into_iter()
                    .map(|s| {
                        let site = &self.sites[s.idx()];
                        (site.up, site.local_us(self.now_us), site.arb.debug_cg(cg))
                    })
                    .collect();
                return Err(self.violation(format!(
                    "liveness: cg {cg} is served by no site after the calm phase; map {:?}, views {views:?}",
                    self.map.cg(cg)
                )));
            }
        }
        Ok(())
    }
}
