//! The cluster map: the state machine behind the Raft group (DESIGN §6).
//!
//! Every command here is a control command; block data never enters the log. `apply` is a
//! pure, deterministic function of the map and the command, so every replica that applies the
//! same log reaches the same map and returns the same typed result to the proposer. All maps
//! are `BTreeMap`s so that iteration order (snapshots, `DetachMany` results) is the same on
//! every replica and on every replay.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A consistency group id. CG ids are never reused: a CG's record outlives its volumes so
/// that its epoch can never go back (a recreated CG at epoch 1 would let a frame accepted in
/// the old CG's epoch 1 pass the fencing check).
pub type CgId = u64;
/// A volume id, unique in the cluster and never reused.
pub type VolumeId = u64;

/// Most consistency groups one map holds. Bounds the map's size, snapshot and apply time.
pub const CGS_MAX: usize = 65_536;
/// Most volumes one map holds.
pub const VOLUMES_MAX: usize = 65_536;
/// Most CGs in one `DetachMany` entry: one link cut is one entry, and an entry stays small.
pub const DETACH_BATCH_MAX: usize = 4_096;

/// One of the two data sites. The witness is not a site: it holds no data and never serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Site {
    A,
    B,
}

impl Site {
    pub const BOTH: [Site; 2] = [Site::A, Site::B];

    /// The other data site.
    pub fn peer(self) -> Site {
        match self {
            Site::A => Site::B,
            Site::B => Site::A,
        }
    }

    /// Index into per-site arrays.
    pub fn idx(self) -> usize {
        match self {
            Site::A => 0,
            Site::B => 1,
        }
    }
}

/// A CG epoch, compared as `(generation, n)`. `generation` only moves on `force-survivor`
/// (DESIGN §6), which restarts the group with one voter; every epoch of a new generation is
/// greater than every epoch of the old one, so frames of the abandoned history stay fenced.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Epoch {
    pub generation: u64,
    pub n: u64,
}

impl Epoch {
    /// The first epoch of a CG created in `generation`.
    pub fn first(generation: u64) -> Epoch {
        Epoch { generation, n: 1 }
    }

    /// The next epoch in the same generation, or `None` on overflow (never in practice:
    /// 2^64 detaches; rejecting is still better than wrapping to an old epoch).
    pub fn next(self) -> Option<Epoch> {
        Some(Epoch {
            generation: self.generation,
            n: self.n.checked_add(1)?,
        })
    }
}

/// A site's state within one CG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SiteState {
    /// Holds every acknowledged write of the CG; may serve (under a lease, §6).
    InSync,
    /// Lost arbitration; fenced; serves nothing until it has resynced and rejoined.
    Detached,
    /// Catching up from the survivor: a sync target, but serves nothing of its own (§4).
    Resyncing,
}

/// Ack policy of a volume (DESIGN §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckPolicy {
    Sync,
    SyncReceived,
    Async,
    Adaptive,
}

/// Which site wins a plain link cut: the other waits a preference delay before proposing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preference {
    /// Set by the admin; workload-driven changes are refused while pinned.
    Pinned(Site),
    /// Follows the site that writes most; the proposer applies the hysteresis (§6).
    Workload(Site),
}

impl Preference {
    pub fn site(self) -> Site {
        match self {
            Preference::Pinned(s) | Preference::Workload(s) => s,
        }
    }
}

/// The map's record of one consistency group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgState {
    pub epoch: Epoch,
    /// Indexed by `Site::idx`.
    pub sites: [SiteState; 2],
    /// A receiver rejects a write from `site` iff its accept epoch is below this (§4).
    pub fenced_before: [Epoch; 2],
    pub preference: Preference,
    /// The one writer under `async` (§5). A detach moves it to the survivor.
    pub active_site: Site,
    /// Volumes currently in the CG. The CG record stays when this drops to zero.
    pub volume_count: u32,
}

impl CgState {
    pub fn state(&self, site: Site) -> SiteState {
        self.sites[site.idx()]
    }

    pub fn fenced_before(&self, site: Site) -> Epoch {
        self.fenced_before[site.idx()]
    }
}

/// The map's record of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub cg: CgId,
    pub size_bytes: u64,
    pub policy: AckPolicy,
}

/// A command in the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates a volume in `cg`, creating the CG (both sites in sync) if it is new.
    VolumeCreate {
        volume: VolumeId,
        cg: CgId,
        size_bytes: u64,
        policy: AckPolicy,
        preference: Preference,
    },
    VolumeDelete {
        volume: VolumeId,
    },
    VolumeSetPolicy {
        volume: VolumeId,
        policy: AckPolicy,
    },
    /// Compare-and-set: commits only if the epoch is still `expected_epoch` and the survivor
    /// is in sync (§6).
    Detach {
        cg: CgId,
        survivor: Site,
        expected_epoch: Epoch,
    },
    /// One link cut, one entry: each CG is decided on its own, as if it were a `Detach`.
    DetachMany {
        survivor: Site,
        cgs: Vec<(CgId, Epoch)>,
    },
    /// A detached site starts catching up; it becomes a sync target but serves nothing.
    StartResync {
        cg: CgId,
        site: Site,
        expected_epoch: Epoch,
    },
    /// The resyncing site is complete (checked by the proposer, §4); both are in sync again.
    Rejoin {
        cg: CgId,
        expected_epoch: Epoch,
    },
    SetPreference {
        cg: CgId,
        preference: Preference,
    },
    /// `stretch volume handoff`: the new active site must be in sync.
    SetActiveSite {
        cg: CgId,
        site: Site,
        expected_epoch: Epoch,
    },
    /// The first entry of the one-voter group that `force-survivor` creates: every CG moves
    /// to the first epoch of `generation`, `survivor` is in sync and the other site is
    /// detached and fenced at that epoch, so it comes back only through a full resync.
    /// `carried` is the survivor's last applied map of the old generation: a new group starts
    /// with an empty map, and this entry installs the carried one first (refused on a map
    /// that is not empty, so it can never overwrite a live group's history).
    ForceSurvivor {
        survivor: Site,
        generation: u64,
        carried: Option<Box<ClusterMap>>,
    },
}

/// Why a command did not change the map. Rejection is a normal, deterministic result (a lost
/// CAS race is expected), not an error of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Reject {
    #[error("no such consistency group")]
    NoSuchCg,
    #[error("no such volume")]
    NoSuchVolume,
    #[error("volume already exists")]
    VolumeExists,
    #[error("epoch moved on: the map is at {current:?}")]
    EpochMismatch { current: Epoch },
    #[error("the proposed survivor is not in sync")]
    SurvivorNotInSync,
    #[error("the peer is already detached")]
    PeerAlreadyDetached,
    #[error("the site is not detached")]
    NotDetached,
    #[error("no site is resyncing")]
    NotResyncing,
    #[error("the site is not in sync")]
    NotInSync,
    #[error("preference is pinned by the admin")]
    PreferencePinned,
    #[error("a limit was reached")]
    LimitReached,
    #[error("the generation does not grow")]
    StaleGeneration,
    #[error("epoch counter exhausted")]
    EpochExhausted,
    #[error("a carried map is installed only into an empty map")]
    MapNotEmpty,
}

/// The result of applying one command (or one CG of a `DetachMany`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The map changed; `epoch` is the CG's epoch after the command (for `ForceSurvivor`, the
    /// new generation's first epoch).
    Applied {
        epoch: Epoch,
    },
    Rejected {
        reason: Reject,
    },
}

/// What `apply` returns to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyResult {
    One(Outcome),
    /// One outcome per CG of a `DetachMany`, in the command's order.
    Many(Vec<(CgId, Outcome)>),
    /// A Raft-internal entry (blank or membership) that carried no command.
    Internal,
}

/// The whole cluster map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// The generation new CGs are created in; only `ForceSurvivor` raises it.
    pub generation: u64,
    pub cgs: BTreeMap<CgId, CgState>,
    pub volumes: BTreeMap<VolumeId, VolumeEntry>,
}

fn applied(epoch: Epoch) -> Outcome {
    Outcome::Applied { epoch }
}

fn rejected(reason: Reject) -> Outcome {
    Outcome::Rejected { reason }
}

impl ClusterMap {
    pub fn new() -> ClusterMap {
        ClusterMap::default()
    }

    pub fn cg(&self, cg: CgId) -> Option<&CgState> {
        self.cgs.get(&cg)
    }

    /// Applies one committed command. Deterministic: depends only on `self` and `cmd`.
    pub fn apply(&mut self, cmd: &Command) -> ApplyResult {
        match cmd {
            Command::DetachMany { survivor, cgs } => {
                if cgs.len() > DETACH_BATCH_MAX {
                    // Refused whole rather than truncated: a partial batch would silently
                    // leave CGs undecided.
                    return ApplyResult::Many(
                        cgs.iter()
                            .map(|(cg, _)| (*cg, rejected(Reject::LimitReached)))
                            .collect(),
                    );
                }
                ApplyResult::Many(
                    cgs.iter()
                        .map(|&(cg, expected_epoch)| {
                            (cg, self.detach(cg, *survivor, expected_epoch))
                        })
                        .collect(),
                )
            }
            other => ApplyResult::One(self.apply_one(other)),
        }
    }

    fn apply_one(&mut self, cmd: &Command) -> Outcome {
        match *cmd {
            Command::VolumeCreate {
                volume,
                cg,
                size_bytes,
                policy,
                preference,
            } => self.volume_create(volume, cg, size_bytes, policy, preference),
            Command::VolumeDelete { volume } => {
                let Some(entry) = self.volumes.remove(&volume) else {
                    return rejected(Reject::NoSuchVolume);
                };
                match self.cgs.get_mut(&entry.cg) {
                    Some(state) => {
                        state.volume_count = state.volume_count.saturating_sub(1);
                        applied(state.epoch)
                    }
                    None => rejected(Reject::NoSuchCg),
                }
            }
            Command::VolumeSetPolicy { volume, policy } => {
                let Some(entry) = self.volumes.get_mut(&volume) else {
                    return rejected(Reject::NoSuchVolume);
                };
                entry.policy = policy;
                match self.cgs.get(&entry.cg) {
                    Some(state) => applied(state.epoch),
                    None => rejected(Reject::NoSuchCg),
                }
            }
            Command::Detach {
                cg,
                survivor,
                expected_epoch,
            } => self.detach(cg, survivor, expected_epoch),
            Command::DetachMany { .. } => unreachable_batch(),
            Command::StartResync {
                cg,
                site,
                expected_epoch,
            } => {
                let state = match self.cg_at_epoch(cg, expected_epoch) {
                    Ok(state) => state,
                    Err(rejection) => return rejection,
                };
                if state.state(site) != SiteState::Detached {
                    return rejected(Reject::NotDetached);
                }
                // The source of the resync must hold the data; with one site detached the other
                // is in sync by construction (checked so a future command cannot break it).
                if state.state(site.peer()) != SiteState::InSync {
                    return rejected(Reject::SurvivorNotInSync);
                }
                state.sites[site.idx()] = SiteState::Resyncing;
                applied(state.epoch)
            }
            Command::Rejoin { cg, expected_epoch } => {
                let state = match self.cg_at_epoch(cg, expected_epoch) {
                    Ok(state) => state,
                    Err(rejection) => return rejection,
                };
                let resyncing = Site::BOTH
                    .into_iter()
                    .find(|s| state.state(*s) == SiteState::Resyncing);
                let Some(site) = resyncing else {
                    return rejected(Reject::NotResyncing);
                };
                if state.state(site.peer()) != SiteState::InSync {
                    return rejected(Reject::SurvivorNotInSync);
                }
                let Some(next) = state.epoch.next() else {
                    return rejected(Reject::EpochExhausted);
                };
                // A new epoch, so writes accepted by the survivor alone (old epoch) are told
                // apart from writes both sites accept from now on.
                state.epoch = next;
                state.sites = [SiteState::InSync; 2];
                applied(state.epoch)
            }
            Command::SetPreference { cg, preference } => {
                let Some(state) = self.cgs.get_mut(&cg) else {
                    return rejected(Reject::NoSuchCg);
                };
                // The admin's pin wins over the workload: once pinned, only another pin by the
                // admin moves the preference (DESIGN §6 "Preference").
                if matches!(state.preference, Preference::Pinned(_))
                    && matches!(preference, Preference::Workload(_))
                {
                    return rejected(Reject::PreferencePinned);
                }
                state.preference = preference;
                applied(state.epoch)
            }
            Command::SetActiveSite {
                cg,
                site,
                expected_epoch,
            } => {
                let state = match self.cg_at_epoch(cg, expected_epoch) {
                    Ok(state) => state,
                    Err(rejection) => return rejection,
                };
                if state.state(site) != SiteState::InSync {
                    return rejected(Reject::NotInSync);
                }
                state.active_site = site;
                applied(state.epoch)
            }
            Command::ForceSurvivor {
                survivor,
                generation,
                ref carried,
            } => {
                if let Some(carried) = carried {
                    if *self != ClusterMap::default() {
                        return rejected(Reject::MapNotEmpty);
                    }
                    if generation <= carried.generation {
                        return rejected(Reject::StaleGeneration);
                    }
                    *self = (**carried).clone();
                }
                if generation <= self.generation {
                    return rejected(Reject::StaleGeneration);
                }
                self.generation = generation;
                let epoch = Epoch::first(generation);
                let loser = survivor.peer();
                for state in self.cgs.values_mut() {
                    state.epoch = epoch;
                    state.sites[survivor.idx()] = SiteState::InSync;
                    state.sites[loser.idx()] = SiteState::Detached;
                    state.fenced_before[loser.idx()] = epoch;
                    state.active_site = survivor;
                }
                applied(epoch)
            }
        }
    }

    fn volume_create(
        &mut self,
        volume: VolumeId,
        cg: CgId,
        size_bytes: u64,
        policy: AckPolicy,
        preference: Preference,
    ) -> Outcome {
        if self.volumes.contains_key(&volume) {
            return rejected(Reject::VolumeExists);
        }
        if self.volumes.len() >= VOLUMES_MAX {
            return rejected(Reject::LimitReached);
        }
        if !self.cgs.contains_key(&cg) && self.cgs.len() >= CGS_MAX {
            return rejected(Reject::LimitReached);
        }
        let generation = self.generation;
        let state = self.cgs.entry(cg).or_insert_with(|| CgState {
            epoch: Epoch::first(generation),
            sites: [SiteState::InSync; 2],
            fenced_before: [Epoch::default(); 2],
            preference,
            active_site: preference.site(),
            volume_count: 0,
        });
        state.volume_count = state.volume_count.saturating_add(1);
        let epoch = state.epoch;
        self.volumes.insert(
            volume,
            VolumeEntry {
                cg,
                size_bytes,
                policy,
            },
        );
        applied(epoch)
    }

    /// The detach compare-and-set (DESIGN §6).
    /// The CG a compare-and-set command names, if it exists and is still at `expected_epoch`;
    /// else the rejection to return.
    fn cg_at_epoch(&mut self, cg: CgId, expected_epoch: Epoch) -> Result<&mut CgState, Outcome> {
        let state = self.cgs.get_mut(&cg).ok_or(rejected(Reject::NoSuchCg))?;
        if state.epoch != expected_epoch {
            return Err(rejected(Reject::EpochMismatch {
                current: state.epoch,
            }));
        }
        Ok(state)
    }

    fn detach(&mut self, cg: CgId, survivor: Site, expected_epoch: Epoch) -> Outcome {
        let state = match self.cg_at_epoch(cg, expected_epoch) {
            Ok(state) => state,
            Err(rejection) => return rejection,
        };
        // A detached or resyncing site never wins: it may miss acknowledged writes.
        if state.state(survivor) != SiteState::InSync {
            return rejected(Reject::SurvivorNotInSync);
        }
        let loser = survivor.peer();
        if state.state(loser) == SiteState::Detached {
            return rejected(Reject::PeerAlreadyDetached);
        }
        let Some(next) = state.epoch.next() else {
            return rejected(Reject::EpochExhausted);
        };
        state.epoch = next;
        state.sites[loser.idx()] = SiteState::Detached;
        // `next` exceeds every epoch the map has held, so this only grows.
        state.fenced_before[loser.idx()] = next;
        state.active_site = survivor;
        applied(next)
    }
}

#[cold]
fn unreachable_batch() -> Outcome {
    // `apply` handles `DetachMany` before dispatching here; reaching this is a bug in this
    // file, reported as a rejection rather than a panic on a replicated path.
    debug_assert!(false, "DetachMany dispatched to apply_one");
    rejected(Reject::LimitReached)
}

#[cfg(test)]
#[path = "map_test.rs"]
mod tests;
