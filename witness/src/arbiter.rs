//! One site's arbitration logic (DESIGN §6), sans-IO: events in, decisions and actions out.
//!
//! The arbiter owns, per consistency group, the site's lease from its peer, its grants to the
//! peer, and its view of the committed map. The daemon feeds it messages and time (the site's
//! `CLOCK_BOOTTIME` in µs), carries out the returned [`Action`]s, and asks it before every
//! reply whether the reply may go out ([`Arbiter::serve`], [`Arbiter::may_ack_alone`]).
//!
//! The decisions, in the order they happen after a link cut:
//! 1. No renewal from the peer for `peer_timeout_us` on a CG where both sites are in sync: the
//!    site stops granting on that CG (so the peer's lease runs out) and only then proposes a
//!    detach naming itself survivor: at once if it is the CG's preferred site, after
//!    `preference_delay_us` if not, so a plain cut has a predictable winner.
//! 2. Its own lease lapses `L` after the send time of its last granted request: from then on it
//!    serves nothing on the CG (EIO or suspend, [`LapsePolicy`]).
//! 3. The detach commits for one site. The winner learns it and acknowledges nothing alone until
//!    `L·(1+ρ) + δ` after the later of its last grant and that moment. The loser, when it
//!    learns, fails every queued request with EIO and closes its connections.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lease::{alone_ok_at_us, Grants, Heartbeats, Lease, LeaseConfig};
use crate::map::{CgId, CgState, ClusterMap, Command, Epoch, Site, SiteState, DETACH_BATCH_MAX};

/// What a site does with requests once its lease has lapsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LapsePolicy {
    /// Fail them with EIO at once.
    Eio,
    /// Hold them; they resume only if the site is still in sync in the same epoch.
    Suspend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArbiterConfig {
    pub lease: LeaseConfig,
    /// No renewal from the peer for this long on a CG: the peer is lost for that CG. Shorter
    /// than `lease.lease_us`, so the detach is under way while leases run out.
    pub peer_timeout_us: u64,
    pub heartbeat_interval_us: u64,
    /// How often a site reads the map through a ReadIndex (which also renews its lease).
    pub read_index_interval_us: u64,
    /// How long the non-preferred site waits before proposing a detach.
    pub preference_delay_us: u64,
    /// How long a proposal may go unanswered before it is proposed again.
    pub propose_retry_us: u64,
    pub on_lapse: LapsePolicy,
}

/// A heartbeat: the sender's epochs for every CG where it holds (or wants) a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub seq: u64,
    pub epochs: Vec<(CgId, Epoch)>,
}

/// The echo of a heartbeat, naming the CGs (at the sender's epoch) the echo grants a lease on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    pub seq: u64,
    pub granted: Vec<(CgId, Epoch)>,
}

/// What the arbiter asks the daemon to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    SendHeartbeat(Heartbeat),
    /// Start a ReadIndex read of the map; hand the reply to [`Arbiter::on_read_index`] with `id`.
    ReadIndex {
        id: u64,
    },
    /// Propose a command to the Raft group.
    Propose(Command),
    /// This site lost arbitration in `cg`: fail every queued request with EIO, close the CG's
    /// NBD connections, never re-issue them.
    Detached {
        cg: CgId,
    },
    /// The lease on `cg` lapsed: apply `policy` to queued and new requests.
    LeaseLapsed {
        cg: CgId,
        policy: LapsePolicy,
    },
}

/// Whether a reply may go out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Serve {
    Yes,
    /// Hold the request: it may still be served (lease renewed in the same epoch, or the
    /// survivor's wait is over).
    Hold,
    /// Fail it with EIO.
    Eio,
}

/// Per-CG arbitration state.
#[derive(Debug, Clone)]
struct CgArb {
    view: CgState,
    lease: Lease,
    grants: Grants,
    /// Local time of the last renewal by the peer itself (echo or write ack). ReadIndex
    /// renewals do not count: they show the witness alive, not the peer.
    last_peer_renewal_us: u64,
    /// When the peer was found lost (grants stopped), for the preference delay.
    lost_at_us: Option<u64>,
    /// The last detach this site proposed: the epoch it expected and when.
    proposed: Option<(Epoch, u64)>,
    /// As survivor in the current epoch: when it may acknowledge writes alone.
    alone_ok_at_us: Option<u64>,
    /// As survivor: a `Rejoin` proposed at this epoch, and when. Until a new epoch is learned
    /// the survivor serves nothing, because the rejoin may have committed unheard, after which
    /// the peer can win a detach without ever having granted this site a lease.
    rejoin_proposed: Option<(Epoch, u64)>,
    lapse_reported: bool,
}

pub struct Arbiter {
    site: Site,
    cfg: ArbiterConfig,
    cgs: BTreeMap<CgId, CgArb>,
    /// The log index of the newest map applied; older maps arriving late are ignored.
    map_index: Option<u64>,
    /// Set by the first ReadIndex reply: before it, the site serves nothing (DESIGN §6).
    read_index_done: bool,
    heartbeats: Heartbeats,
    read_indexes: Heartbeats,
    next_heartbeat_us: u64,
    next_read_index_us: u64,
}

impl Arbiter {
    /// `incarnation` must differ on every process start (e.g. a persisted boot counter): it
    /// keeps heartbeat and ReadIndex ids of different incarnations apart.
    pub fn new(site: Site, cfg: ArbiterConfig, incarnation: u32, now_us: u64) -> Arbiter {
        let base = u64::from(incarnation) << 32;
        Arbiter {
            site,
            cfg,
            cgs: BTreeMap::new(),
            map_index: None,
            read_index_done: false,
            heartbeats: Heartbeats::starting_at(base),
            read_indexes: Heartbeats::starting_at(base),
            next_heartbeat_us: now_us,
            next_read_index_us: now_us,
        }
    }

    pub fn site(&self) -> Site {
        self.site
    }

    pub fn config(&self) -> &ArbiterConfig {
        &self.cfg
    }

    /// The CG's epoch in this site's view of the map.
    pub fn epoch(&self, cg: CgId) -> Option<Epoch> {
        self.cgs.get(&cg).map(|c| c.view.epoch)
    }

    /// The CG as this site last learned it.
    pub fn view(&self, cg: CgId) -> Option<&CgState> {
        self.cgs.get(&cg).map(|c| &c.view)
    }

    /// When this site's lease on `cg` ends (its own clock), if it holds one in this epoch.
    pub fn lease_expiry_us(&self, cg: CgId) -> Option<u64> {
        self.cgs.get(&cg).and_then(|c| c.lease.expiry_us())
    }

    /// As survivor: when it may (or could) acknowledge alone.
    pub fn alone_ok_at_us(&self, cg: CgId) -> Option<u64> {
        self.cgs.get(&cg).and_then(|c| c.alone_ok_at_us)
    }

    /// Timers: heartbeats, ReadIndex reads, peer-loss detection and detach proposals.
    pub fn tick(&mut self, now_us: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if now_us >= self.next_heartbeat_us {
            self.next_heartbeat_us = now_us.saturating_add(self.cfg.heartbeat_interval_us);
            let seq = self.heartbeats.send(now_us);
            let epochs = self
                .cgs
                .iter()
                .filter(|(_, c)| both_in_sync(&c.view))
                .map(|(id, c)| (*id, c.view.epoch))
                .collect();
            actions.push(Action::SendHeartbeat(Heartbeat { seq, epochs }));
        }
        if now_us >= self.next_read_index_us {
            self.next_read_index_us = now_us.saturating_add(self.cfg.read_index_interval_us);
            let id = self.read_indexes.send(now_us);
            actions.push(Action::ReadIndex { id });
        }
        let me = self.site;
        let mut due: Vec<(CgId, Epoch)> = Vec::new();
        for (id, c) in self.cgs.iter_mut() {
            if let Some((e, at_us)) = c.rejoin_proposed {
                // The rejoin is unanswered: settle it with a detach of the still-resyncing
                // peer at the same epoch. Exactly one of the two commits (both are CAS on
                // `e`), and either way a new epoch ends the ambiguity.
                if e == c.view.epoch && now_us >= at_us.saturating_add(self.cfg.propose_retry_us) {
                    c.rejoin_proposed = Some((e, now_us));
                    due.push((*id, e));
                }
                continue;
            }
            if !both_in_sync(&c.view) {
                continue;
            }
            let silent_us = now_us.saturating_sub(c.last_peer_renewal_us);
            if silent_us >= self.cfg.peer_timeout_us && c.lost_at_us.is_none() {
                // Stop granting first: the peer's lease must be running out before any
                // detach naming this site survivor can commit.
                c.grants.stop();
                c.lost_at_us = Some(now_us);
            }
            if let Some(lost_at_us) = c.lost_at_us {
                let delay_us = if c.view.preference.site() == me {
                    0
                } else {
                    self.cfg.preference_delay_us
                };
                let retry_due = match c.proposed {
                    Some((e, at_us)) => {
                        e != c.view.epoch
                            || now_us >= at_us.saturating_add(self.cfg.propose_retry_us)
                    }
                    None => true,
                };
                if now_us >= lost_at_us.saturating_add(delay_us) && retry_due {
                    debug_assert!(c.grants.is_stopped());
                    c.proposed = Some((c.view.epoch, now_us));
                    due.push((*id, c.view.epoch));
                }
            }
            // Reported once per lapse, and only for a lease that existed: a site that never
            // held one has nothing queued under it.
            let lapsed =
                c.lease.expiry_us().is_some() && !c.lease.may_reply(now_us, &self.cfg.lease);
            if lapsed && !c.lapse_reported {
                c.lapse_reported = true;
                actions.push(Action::LeaseLapsed {
                    cg: *id,
                    policy: self.cfg.on_lapse,
                });
            }
        }
        // One link cut, one entry per batch of CGs (DESIGN §6).
        for chunk in due.chunks(DETACH_BATCH_MAX) {
            let cmd = match chunk {
                [(cg, expected_epoch)] => Command::Detach {
                    cg: *cg,
                    survivor: me,
                    expected_epoch: *expected_epoch,
                },
                _ => Command::DetachMany {
                    survivor: me,
                    cgs: chunk.to_vec(),
                },
            };
            actions.push(Action::Propose(cmd));
        }
        actions
    }

    /// A committed map at log index `index` (pushed by the Raft state machine).
    pub fn on_map(&mut self, index: u64, map: &ClusterMap, now_us: u64) -> Vec<Action> {
        if self.map_index.is_some_and(|i| index < i) {
            return Vec::new();
        }
        self.map_index = Some(index);
        let me = self.site;
        let mut actions = Vec::new();
        for (id, state) in &map.cgs {
            let Some(c) = self.cgs.get_mut(id) else {
                let fresh = CgArb::new(state.clone(), now_us);
                if fresh.view.state(me) == SiteState::Detached {
                    actions.push(Action::Detached { cg: *id });
                }
                // A site (re)starting as survivor waits as if it had just learned the detach:
                // it may have granted before a restart, and L·(1+ρ)+δ from now covers that.
                let mut fresh = fresh;
                if is_survivor(&fresh.view, me) {
                    fresh.alone_ok_at_us = Some(alone_ok_at_us(None, now_us, &self.cfg.lease));
                }
                self.cgs.insert(*id, fresh);
                continue;
            };
            if state.epoch < c.view.epoch {
                continue;
            }
            let epoch_moved = state.epoch > c.view.epoch;
            let was_detached = c.view.state(me) == SiteState::Detached;
            c.view = state.clone();
            if !epoch_moved {
                continue;
            }
            // Every lease and grant was for the old epoch.
            c.lease.revoke();
            c.lost_at_us = None;
            c.proposed = None;
            c.rejoin_proposed = None;
            c.lapse_reported = false;
            c.last_peer_renewal_us = now_us;
            match (c.view.state(me), c.view.state(me.peer())) {
                (SiteState::InSync, SiteState::InSync) => {
                    c.grants = Grants::default();
                    c.alone_ok_at_us = None;
                }
                (SiteState::InSync, _) => {
                    c.grants.stop();
                    c.alone_ok_at_us = Some(alone_ok_at_us(
                        c.grants.last_grant_us(),
                        now_us,
                        &self.cfg.lease,
                    ));
                }
                (mine, _) => {
                    c.grants.stop();
                    c.alone_ok_at_us = None;
                    if mine == SiteState::Detached && !was_detached {
                        actions.push(Action::Detached { cg: *id });
                    }
                }
            }
        }
        actions
    }

    /// A ReadIndex reply: the map as of a linearizable read started by request `id`. It renews
    /// the lease on every CG where the map shows both sites in sync at the site's epoch.
    pub fn on_read_index(
        &mut self,
        id: u64,
        index: u64,
        map: &ClusterMap,
        now_us: u64,
    ) -> Vec<Action> {
        let Some(sent_us) = self.read_indexes.echoed(id) else {
            return Vec::new();
        };
        let actions = self.on_map(index, map, now_us);
        self.read_index_done = true;
        for (id, state) in &map.cgs {
            if let Some(c) = self.cgs.get_mut(id) {
                if both_in_sync(state) && state.epoch == c.view.epoch {
                    c.lease.renew(sent_us, &self.cfg.lease);
                    c.lapse_reported = false;
                }
            }
        }
        actions
    }

    /// Granter side: the peer's heartbeat. The echo grants exactly the CGs where this site
    /// sees both sites in sync at the peer's epoch and still grants.
    pub fn on_heartbeat(&mut self, hb: &Heartbeat, now_us: u64) -> Echo {
        let mut granted = Vec::new();
        for (id, epoch) in &hb.epochs {
            if let Some(c) = self.cgs.get_mut(id) {
                if both_in_sync(&c.view) && c.view.epoch == *epoch && c.grants.try_grant(now_us) {
                    granted.push((*id, *epoch));
                }
            }
        }
        Echo {
            seq: hb.seq,
            granted,
        }
    }

    /// Holder side: an echo of one of this site's heartbeats.
    pub fn on_echo(&mut self, echo: &Echo, now_us: u64) {
        let Some(sent_us) = self.heartbeats.echoed(echo.seq) else {
            return;
        };
        for (id, epoch) in &echo.granted {
            self.renew_from_peer(*id, *epoch, sent_us, now_us);
        }
    }

    /// Granter side: a replicated write from the peer, accepted in `accept_epoch`. Returns
    /// whether to apply and acknowledge it — an ack renews the peer's lease, so it is a grant.
    pub fn on_peer_write(&mut self, cg: CgId, accept_epoch: Epoch, now_us: u64) -> bool {
        let Some(c) = self.cgs.get_mut(&cg) else {
            return false;
        };
        if accept_epoch < c.view.fenced_before(self.site.peer()) || accept_epoch != c.view.epoch {
            return false;
        }
        let me = self.site;
        match (c.view.state(me), c.view.state(me.peer())) {
            (SiteState::InSync, SiteState::InSync) => c.grants.try_grant(now_us),
            // A resyncing site is a sync target of the survivor (DESIGN §4): it applies the
            // survivor's live writes. The survivor holds no lease, so the ack grants nothing.
            (SiteState::Resyncing, SiteState::InSync) => true,
            _ => false,
        }
    }

    /// Holder side: the peer acknowledged a write this site sent at `sent_us` (its own record)
    /// in `epoch`.
    pub fn on_write_acked(&mut self, cg: CgId, epoch: Epoch, sent_us: u64, now_us: u64) {
        self.renew_from_peer(cg, epoch, sent_us, now_us);
    }

    fn renew_from_peer(&mut self, cg: CgId, epoch: Epoch, sent_us: u64, now_us: u64) {
        let Some(c) = self.cgs.get_mut(&cg) else {
            return;
        };
        if c.view.epoch != epoch || !both_in_sync(&c.view) {
            return;
        }
        c.lease.renew(sent_us, &self.cfg.lease);
        c.lapse_reported = false;
        c.last_peer_renewal_us = c.last_peer_renewal_us.max(now_us);
        // The peer is back before any detach committed: granting again is safe, because a
        // detach still in flight makes the survivor wait from its last grant (DESIGN §6).
        if c.lost_at_us.is_some() && c.lease.may_reply(now_us, &self.cfg.lease) {
            c.lost_at_us = None;
            c.grants.resume();
        }
    }

    /// The epoch to stamp a new local write with, or `None` if the site may not accept one.
    pub fn accept_epoch(&self, cg: CgId, now_us: u64) -> Option<Epoch> {
        match self.serve(cg, now_us) {
            Serve::Eio => None,
            Serve::Yes | Serve::Hold => self.epoch(cg),
        }
    }

    /// May a reply on `cg` (a read, or the ack of a write the peer applied) go out now?
    pub fn serve(&self, cg: CgId, now_us: u64) -> Serve {
        let Some(c) = self.cgs.get(&cg) else {
            return if self.read_index_done {
                Serve::Eio
            } else {
                Serve::Hold
            };
        };
        if !self.read_index_done {
            return Serve::Hold;
        }
        let me = self.site;
        match (c.view.state(me), c.view.state(me.peer())) {
            (SiteState::InSync, SiteState::InSync) => {
                if c.lease.may_reply(now_us, &self.cfg.lease) {
                    Serve::Yes
                } else if c.lease.expiry_us().is_none() {
                    // No lease yet in this epoch (just started, or the epoch just moved, as on
                    // every rejoin): the first echo is a heartbeat away. Holding is always
                    // safe, and failing here would hand clients an EIO for every rejoin.
                    Serve::Hold
                } else {
                    match self.cfg.on_lapse {
                        LapsePolicy::Eio => Serve::Eio,
                        LapsePolicy::Suspend => Serve::Hold,
                    }
                }
            }
            (SiteState::InSync, _) => {
                if self.survivor_wait_over(c, now_us) {
                    Serve::Yes
                } else {
                    Serve::Hold
                }
            }
            _ => Serve::Eio,
        }
    }

    /// May a read on `cg` be served now? As [`Self::serve`], except at a site catching up
    /// (Resyncing, its peer in sync): there the replica decides, by the read lease its
    /// survivor granted on the data link and by the blocks already resynced (DESIGN §4
    /// "Resync"). Writes there still get [`Self::serve`]'s answer: EIO.
    pub fn serve_read(&self, cg: CgId, now_us: u64) -> Serve {
        let catching_up = self.read_index_done
            && self.cgs.get(&cg).is_some_and(|c| {
                c.view.state(self.site) == SiteState::Resyncing
                    && c.view.state(self.site.peer()) == SiteState::InSync
            });
        if catching_up {
            Serve::Yes
        } else {
            self.serve(cg, now_us)
        }
    }

    /// May this site acknowledge a write on `cg` that the peer has not applied? Only as the
    /// survivor, once its wait is over (DESIGN §6), and not while the peer resyncs: a
    /// resyncing site is a sync target, so live writes wait for its ack (DESIGN §4).
    pub fn may_ack_alone(&self, cg: CgId, now_us: u64) -> bool {
        let Some(c) = self.cgs.get(&cg) else {
            return false;
        };
        c.view.state(self.site.peer()) == SiteState::Detached && self.survivor_wait_over(c, now_us)
    }

    fn survivor_wait_over(&self, c: &CgArb, now_us: u64) -> bool {
        self.read_index_done
            && c.rejoin_proposed.is_none()
            && is_survivor(&c.view, self.site)
            && c.alone_ok_at_us.is_some_and(|t| now_us >= t)
    }

    /// The survivor's `Rejoin` of its resynced peer (the caller has checked the resync is
    /// complete, DESIGN §4). From the call on, the survivor serves nothing in the current
    /// epoch; see `CgArb::rejoin_proposed`. `None` if this site is not the survivor of a
    /// resyncing peer.
    pub fn propose_rejoin(&mut self, cg: CgId, now_us: u64) -> Option<Command> {
        let me = self.site;
        let c = self.cgs.get_mut(&cg)?;
        if c.view.state(me) != SiteState::InSync || c.view.state(me.peer()) != SiteState::Resyncing
        {
            return None;
        }
        c.rejoin_proposed = Some((c.view.epoch, now_us));
        Some(Command::Rejoin {
            cg,
            expected_epoch: c.view.epoch,
        })
    }

    /// The arbiter's whole state for `cg`, for failure reports.
    pub fn debug_cg(&self, cg: CgId) -> String {
        format!(
            "read_index_done={} {:?}",
            self.read_index_done,
            self.cgs.get(&cg)
        )
    }

    /// Whether this site is the survivor of `cg` in its current view (waiting or not).
    pub fn is_survivor(&self, cg: CgId) -> bool {
        self.cgs
            .get(&cg)
            .is_some_and(|c| is_survivor(&c.view, self.site))
    }
}

impl CgArb {
    fn new(view: CgState, now_us: u64) -> CgArb {
        let mut grants = Grants::default();
        if !both_in_sync(&view) {
            grants.stop();
        }
        CgArb {
            view,
            lease: Lease::default(),
            grants,
            last_peer_renewal_us: now_us,
            lost_at_us: None,
            proposed: None,
            alone_ok_at_us: None,
            rejoin_proposed: None,
            lapse_reported: false,
        }
    }
}

fn both_in_sync(view: &CgState) -> bool {
    view.sites == [SiteState::InSync; 2]
}

fn is_survivor(view: &CgState, me: Site) -> bool {
    view.state(me) == SiteState::InSync && view.state(me.peer()) != SiteState::InSync
}

#[cfg(test)]
#[path = "arbiter_test.rs"]
mod tests;
