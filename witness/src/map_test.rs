use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn one_cg_map() -> (ClusterMap, Epoch) {
    let mut map = ClusterMap::new();
    let r = map.apply(&Command::VolumeCreate {
        volume: 1,
        cg: 10,
        size_bytes: 1 << 20,
        policy: AckPolicy::Sync,
        preference: Preference::Pinned(Site::A),
    });
    assert_eq!(
        r,
        ApplyResult::One(Outcome::Applied {
            epoch: Epoch::first(0)
        })
    );
    (map, Epoch::first(0))
}

// Reference: DESIGN §6, "exactly one site can win".
// DESIGN §6 "Preference": the admin's pin is never moved by the workload.
#[test]
fn workload_never_moves_a_pinned_preference() {
    let (mut map, _) = one_cg_map();
    let cg = *map.cgs.keys().next().expect("one cg");
    let set = |p| Command::SetPreference { cg, preference: p };
    // one_cg_map pins A.
    assert_eq!(
        map.apply(&set(Preference::Workload(Site::B))),
        ApplyResult::One(Outcome::Rejected {
            reason: Reject::PreferencePinned
        })
    );
    assert_eq!(
        map.cg(cg).map(|c| c.preference),
        Some(Preference::Pinned(Site::A))
    );
    // The admin may re-pin.
    assert!(matches!(
        map.apply(&set(Preference::Pinned(Site::B))),
        ApplyResult::One(Outcome::Applied { .. })
    ));
    assert_eq!(
        map.cg(cg).map(|c| c.preference),
        Some(Preference::Pinned(Site::B))
    );
}

#[test]
fn two_detaches_racing_on_one_epoch_have_one_winner() {
    let (mut map, e) = one_cg_map();
    let a = map.apply(&Command::Detach {
        cg: 10,
        survivor: Site::A,
        expected_epoch: e,
    });
    let b = map.apply(&Command::Detach {
        cg: 10,
        survivor: Site::B,
        expected_epoch: e,
    });
    let next = e.next().unwrap();
    assert_eq!(a, ApplyResult::One(Outcome::Applied { epoch: next }));
    assert_eq!(
        b,
        ApplyResult::One(Outcome::Rejected {
            reason: Reject::EpochMismatch { current: next }
        })
    );
    let cg = map.cg(10).unwrap();
    assert_eq!(cg.state(Site::A), SiteState::InSync);
    assert_eq!(cg.state(Site::B), SiteState::Detached);
    assert_eq!(cg.fenced_before(Site::B), next);
    assert_eq!(cg.fenced_before(Site::A), Epoch::default());
}

// Reference: DESIGN §6, "a detached site can never be crowned by a later detach".
#[test]
fn detached_site_is_not_crowned_even_with_the_right_epoch() {
    let (mut map, e) = one_cg_map();
    map.apply(&Command::Detach {
        cg: 10,
        survivor: Site::A,
        expected_epoch: e,
    });
    let now = map.cg(10).unwrap().epoch;
    let r = map.apply(&Command::Detach {
        cg: 10,
        survivor: Site::B,
        expected_epoch: now,
    });
    assert_eq!(
        r,
        ApplyResult::One(Outcome::Rejected {
            reason: Reject::SurvivorNotInSync
        })
    );
    // Nor while it is resyncing.
    map.apply(&Command::StartResync {
        cg: 10,
        site: Site::B,
        expected_epoch: now,
    });
    let r = map.apply(&Command::Detach {
        cg: 10,
        survivor: Site::B,
        expected_epoch: now,
    });
    assert_eq!(
        r,
        ApplyResult::One(Outcome::Rejected {
            reason: Reject::SurvivorNotInSync
        })
    );
    // A link cut during resync detaches the resyncing site again, in a new epoch.
    let r = map.apply(&Command::Detach {
        cg: 10,
        survivor: Site::A,
        expected_epoch: now,
    });
    assert_eq!(
        r,
        ApplyResult::One(Outcome::Applied {
            epoch: now.next().unwrap()
        })
    );
}

// Reference: DESIGN §4 resync and §6 rejoin.
#[test]
fn rejoin_needs_resync_and_moves_the_epoch() {
    let (mut map, e) = one_cg_map();
    map.apply(&Command::Detach {
        cg: 10,
        survivor: Site::B,
        expected_epoch: e,
    });
    let e2 = map.cg(10).unwrap().epoch;
    let r = map.apply(&Command::Rejoin {
        cg: 10,
        expected_epoch: e2,
    });
    assert_eq!(
        r,
        ApplyResult::One(Outcome::Rejected {
            reason: Reject::NotResyncing
        })
    );
    map.apply(&Command::StartResync {
        cg: 10,
        site: Site::A,
        expected_epoch: e2,
    });
    let r = map.apply(&Command::Rejoin {
        cg: 10,
        expected_epoch: e2,
    });
    let e3 = e2.next().unwrap();
    assert_eq!(r, ApplyResult::One(Outcome::Applied { epoch: e3 }));
    let cg = map.cg(10).unwrap();
    assert_eq!(cg.sites, [SiteState::InSync; 2]);
    // Fencing stays: writes A accepted before its detach are still refused.
    assert_eq!(cg.fenced_before(Site::A), e2);
}

// Reference: DESIGN §6, "Many CGs' detaches after one link cut are batched into one entry".
#[test]
fn detach_many_decides_each_cg_on_its_own() {
    let mut map = ClusterMap::new();
    for (vol, cg) in [(1, 1), (2, 2), (3, 3)] {
        map.apply(&Command::VolumeCreate {
            volume: vol,
            cg,
            size_bytes: 4096,
            policy: AckPolicy::Sync,
            preference: Preference::Workload(Site::A),
        });
    }
    let e = Epoch::first(0);
    // CG 2 was already won by B; CG 3 is named with a stale epoch.
    map.apply(&Command::Detach {
        cg: 2,
        survivor: Site::B,
        expected_epoch: e,
    });
    let stale = Epoch {
        generation: 0,
        n: 0,
    };
    let r = map.apply(&Command::DetachMany {
        survivor: Site::A,
        cgs: vec![(1, e), (2, map.cg(2).unwrap().epoch), (3, stale), (99, e)],
    });
    let e2 = e.next().unwrap();
    assert_eq!(
        r,
        ApplyResult::Many(vec![
            (1, Outcome::Applied { epoch: e2 }),
            (
                2,
                Outcome::Rejected {
                    reason: Reject::SurvivorNotInSync
                }
            ),
            (
                3,
                Outcome::Rejected {
                    reason: Reject::EpochMismatch { current: e }
                }
            ),
            (
                99,
                Outcome::Rejected {
                    reason: Reject::NoSuchCg
                }
            ),
        ])
    );
}

#[test]
fn oversized_batch_is_refused_whole() {
    let (mut map, e) = one_cg_map();
    let cgs = vec![(10, e); DETACH_BATCH_MAX + 1];
    let before = map.clone();
    let r = map.apply(&Command::DetachMany {
        survivor: Site::A,
        cgs,
    });
    let ApplyResult::Many(results) = r else {
        panic!("batch result expected")
    };
    assert!(results.iter().all(|(_, o)| *o
        == Outcome::Rejected {
            reason: Reject::LimitReached
        }));
    assert_eq!(map, before);
}

// Reference: DESIGN §6 force-survivor: epochs become (generation, n) and grow.
#[test]
fn force_survivor_starts_a_greater_generation() {
    let (mut map, e) = one_cg_map();
    map.apply(&Command::Detach {
        cg: 10,
        survivor: Site::A,
        expected_epoch: e,
    });
    let r = map.apply(&Command::ForceSurvivor {
        survivor: Site::B,
        generation: 1,
        carried: None,
    });
    let g1 = Epoch::first(1);
    assert_eq!(r, ApplyResult::One(Outcome::Applied { epoch: g1 }));
    let cg = map.cg(10).unwrap();
    assert!(
        cg.epoch
            > Epoch {
                generation: 0,
                n: u64::MAX
            }
    );
    assert_eq!(cg.state(Site::A), SiteState::Detached);
    assert_eq!(cg.fenced_before(Site::A), g1);
    let r = map.apply(&Command::ForceSurvivor {
        survivor: Site::A,
        generation: 1,
        carried: None,
    });
    assert_eq!(
        r,
        ApplyResult::One(Outcome::Rejected {
            reason: Reject::StaleGeneration
        })
    );
}

// Reference: DESIGN §6 force-survivor: a new one-voter group starts with an empty map; its
// first entry carries the survivor's last map over, so the CGs, their volumes and their
// epochs survive into the new generation, every epoch of which is above the old ones.
#[test]
fn force_survivor_carries_the_old_map_into_a_new_group() {
    let (mut old, e) = one_cg_map();
    // The old history: A won a detach, then B resynced and rejoined, then A lost one.
    old.apply(&Command::Detach {
        cg: 10,
        survivor: Site::A,
        expected_epoch: e,
    });
    let last = old.cg(10).unwrap().epoch;
    let mut fresh = ClusterMap::new();
    let force = Command::ForceSurvivor {
        survivor: Site::B,
        generation: 1,
        carried: Some(Box::new(old.clone())),
    };
    let r = fresh.apply(&force);
    let g1 = Epoch::first(1);
    assert_eq!(r, ApplyResult::One(Outcome::Applied { epoch: g1 }));
    assert_eq!(fresh.generation, 1);
    assert_eq!(fresh.volumes, old.volumes);
    let cg = fresh.cg(10).unwrap();
    assert!(cg.epoch > last, "{:?} <= {last:?}", cg.epoch);
    // The detached site B is crowned: only this explicit override can do that.
    assert_eq!(cg.state(Site::B), SiteState::InSync);
    assert_eq!(cg.state(Site::A), SiteState::Detached);
    // A is fenced below the new epoch: every frame it accepted in generation 0 is refused.
    assert_eq!(cg.fenced_before(Site::A), g1);
    assert_eq!(cg.active_site, Site::B);
    // New CGs are created in the new generation.
    fresh.apply(&Command::VolumeCreate {
        volume: 2,
        cg: 11,
        size_bytes: 1 << 20,
        policy: AckPolicy::Sync,
        preference: Preference::Workload(Site::B),
    });
    assert_eq!(fresh.cg(11).unwrap().epoch, g1);
    // A carried map never overwrites a live map, and a generation never repeats.
    let before = fresh.clone();
    assert_eq!(
        fresh.apply(&Command::ForceSurvivor {
            survivor: Site::A,
            generation: 2,
            carried: Some(Box::new(old.clone())),
        }),
        ApplyResult::One(Outcome::Rejected {
            reason: Reject::MapNotEmpty
        })
    );
    assert_eq!(fresh, before);
    let mut again = old.clone();
    again.generation = 3;
    assert_eq!(
        ClusterMap::new().apply(&Command::ForceSurvivor {
            survivor: Site::A,
            generation: 3,
            carried: Some(Box::new(again)),
        }),
        ApplyResult::One(Outcome::Rejected {
            reason: Reject::StaleGeneration
        })
    );
}

#[test]
fn deleted_cg_keeps_its_epoch() {
    let (mut map, e) = one_cg_map();
    map.apply(&Command::Detach {
        cg: 10,
        survivor: Site::A,
        expected_epoch: e,
    });
    map.apply(&Command::VolumeDelete { volume: 1 });
    map.apply(&Command::VolumeCreate {
        volume: 2,
        cg: 10,
        size_bytes: 4096,
        policy: AckPolicy::Sync,
        preference: Preference::Pinned(Site::B),
    });
    assert_eq!(map.cg(10).unwrap().epoch, e.next().unwrap());
}

/// A command chosen without knowing the map; the epoch is resolved against it at apply time so
/// that CAS commands hit the current epoch often enough to matter.
#[derive(Debug, Clone)]
enum EpochSel {
    Current,
    Offset(i8),
    Raw(u64, u64),
}

#[derive(Debug, Clone)]
enum Spec {
    Create {
        volume: u64,
        cg: u64,
        pin: bool,
        site: Site,
    },
    Delete {
        volume: u64,
    },
    Detach {
        cg: u64,
        survivor: Site,
        epoch: EpochSel,
    },
    DetachMany {
        survivor: Site,
        cgs: Vec<(u64, EpochSel)>,
    },
    StartResync {
        cg: u64,
        site: Site,
        epoch: EpochSel,
    },
    Rejoin {
        cg: u64,
        epoch: EpochSel,
    },
    Preference {
        cg: u64,
        pin: bool,
        site: Site,
    },
    Active {
        cg: u64,
        site: Site,
        epoch: EpochSel,
    },
    Force {
        survivor: Site,
        generation: u64,
    },
}

fn site() -> impl Strategy<Value = Site> {
    prop_oneof![Just(Site::A), Just(Site::B)]
}

fn epoch_sel() -> impl Strategy<Value = EpochSel> {
    prop_oneof![
        6 => Just(EpochSel::Current),
        2 => (-2i8..=2).prop_map(EpochSel::Offset),
        1 => (0u64..3, 0u64..6).prop_map(|(g, n)| EpochSel::Raw(g, n)),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    let cg = 0u64..3;
    prop_oneof![
        2 => (0u64..4, cg.clone(), any::<bool>(), site())
            .prop_map(|(volume, cg, pin, site)| Spec::Create { volume, cg, pin, site }),
        1 => (0u64..4).prop_map(|volume| Spec::Delete { volume }),
        6 => (cg.clone(), site(), epoch_sel())
            .prop_map(|(cg, survivor, epoch)| Spec::Detach { cg, survivor, epoch }),
        3 => (site(), prop::collection::vec((cg.clone(), epoch_sel()), 0..4))
            .prop_map(|(survivor, cgs)| Spec::DetachMany { survivor, cgs }),
        3 => (cg.clone(), site(), epoch_sel())
            .prop_map(|(cg, site, epoch)| Spec::StartResync { cg, site, epoch }),
        3 => (cg.clone(), epoch_sel()).prop_map(|(cg, epoch)| Spec::Rejoin { cg, epoch }),
        1 => (cg.clone(), any::<bool>(), site())
            .prop_map(|(cg, pin, site)| Spec::Preference { cg, pin, site }),
        1 => (cg, site(), epoch_sel())
            .prop_map(|(cg, site, epoch)| Spec::Active { cg, site, epoch }),
        1 => (site(), 0u64..4).prop_map(|(survivor, generation)| Spec::Force { survivor, generation }),
    ]
}

fn resolve(map: &ClusterMap, cg: u64, sel: &EpochSel) -> Epoch {
    let cur = map.cg(cg).map(|c| c.epoch).unwrap_or_default();
    match *sel {
        EpochSel::Current => cur,
        EpochSel::Offset(d) => Epoch {
            generation: cur.generation,
            n: cur.n.saturating_add_signed(d.into()),
        },
        EpochSel::Raw(generation, n) => Epoch { generation, n },
    }
}

fn pref(pin: bool, site: Site) -> Preference {
    if pin {
        Preference::Pinned(site)
    } else {
        Preference::Workload(site)
    }
}

fn to_command(map: &ClusterMap, spec: &Spec) -> Command {
    match spec {
        Spec::Create {
            volume,
            cg,
            pin,
            site,
        } => Command::VolumeCreate {
            volume: *volume,
            cg: *cg,
            size_bytes: 4096,
            policy: AckPolicy::Sync,
            preference: pref(*pin, *site),
        },
        Spec::Delete { volume } => Command::VolumeDelete { volume: *volume },
        Spec::Detach {
            cg,
            survivor,
            epoch,
        } => Command::Detach {
            cg: *cg,
            survivor: *survivor,
            expected_epoch: resolve(map, *cg, epoch),
        },
        Spec::DetachMany { survivor, cgs } => Command::DetachMany {
            survivor: *survivor,
            cgs: cgs
                .iter()
                .map(|(cg, sel)| (*cg, resolve(map, *cg, sel)))
                .collect(),
        },
        Spec::StartResync { cg, site, epoch } => Command::StartResync {
            cg: *cg,
            site: *site,
            expected_epoch: resolve(map, *cg, epoch),
        },
        Spec::Rejoin { cg, epoch } => Command::Rejoin {
            cg: *cg,
            expected_epoch: resolve(map, *cg, epoch),
        },
        Spec::Preference { cg, pin, site } => Command::SetPreference {
            cg: *cg,
            preference: pref(*pin, *site),
        },
        Spec::Active { cg, site, epoch } => Command::SetActiveSite {
            cg: *cg,
            site: *site,
            expected_epoch: resolve(map, *cg, epoch),
        },
        Spec::Force {
            survivor,
            generation,
        } => Command::ForceSurvivor {
            survivor: *survivor,
            generation: *generation,
            carried: None,
        },
    }
}

/// Per-CG history the properties are checked against.
#[derive(Default)]
struct History {
    /// Who won each epoch a detach produced: at most one site per (cg, epoch).
    winners: BTreeMap<(CgId, Epoch), Site>,
    /// Sites that lost a detach and have not rejoined since.
    detached: BTreeMap<(CgId, Site), Epoch>,
}

fn check_step(
    before: &ClusterMap,
    after: &ClusterMap,
    cmd: &Command,
    result: &ApplyResult,
    h: &mut History,
) {
    // Epochs and fences only grow; no CG record ever disappears (DESIGN §4 fencing, §6).
    for (id, b) in &before.cgs {
        let a = after.cgs.get(id).expect("a CG record never disappears");
        assert!(a.epoch >= b.epoch, "epoch went back in cg {id}");
        for s in Site::BOTH {
            assert!(
                a.fenced_before(s) >= b.fenced_before(s),
                "fenced_before went back"
            );
        }
    }
    for (id, a) in &after.cgs {
        // Never both sites out of sync: some site always holds every acknowledged write.
        assert!(
            a.sites.contains(&SiteState::InSync),
            "cg {id} has no in-sync site: {a:?}"
        );
        // A site fenced in the current epoch is never in sync in it.
        for s in Site::BOTH {
            if a.fenced_before(s) > a.epoch {
                panic!("fence beyond the epoch in cg {id}");
            }
        }
    }
    let detaches: Vec<(CgId, Site, Outcome)> = match (cmd, result) {
        (Command::Detach { cg, survivor, .. }, ApplyResult::One(o)) => vec![(*cg, *survivor, *o)],
        (Command::DetachMany { survivor, .. }, ApplyResult::Many(rs)) => {
            rs.iter().map(|(cg, o)| (*cg, *survivor, *o)).collect()
        }
        (Command::DetachMany { .. }, _) | (Command::Detach { .. }, _) => {
            panic!("result shape does not match the command")
        }
        _ => Vec::new(),
    };
    for (cg, survivor, outcome) in detaches {
        if let Outcome::Applied { epoch } = outcome {
            // Reference: DESIGN §6 — one winner per epoch.
            if let Some(prev) = h.winners.insert((cg, epoch), survivor) {
                panic!("epoch {epoch:?} of cg {cg} won twice: {prev:?} then {survivor:?}");
            }
            // Reference: DESIGN §6 — a detached site is never crowned by a later detach.
            assert!(
                !h.detached.contains_key(&(cg, survivor)),
                "detached site {survivor:?} crowned in cg {cg}"
            );
            h.detached.insert((cg, survivor.peer()), epoch);
            let state = after.cg(cg).expect("applied detach on a CG that exists");
            assert_eq!(state.epoch, epoch);
            assert_eq!(state.fenced_before(survivor.peer()), epoch);
        }
    }
    match (cmd, result) {
        (Command::Rejoin { cg, .. }, ApplyResult::One(Outcome::Applied { .. })) => {
            for s in Site::BOTH {
                h.detached.remove(&(*cg, s));
            }
        }
        (Command::ForceSurvivor { survivor, .. }, ApplyResult::One(Outcome::Applied { .. })) => {
            // The admin's explicit data-loss override is the one way a loser can be crowned.
            let ids: Vec<CgId> = after.cgs.keys().copied().collect();
            for id in ids {
                h.detached.remove(&(id, *survivor));
                h.detached
                    .insert((id, survivor.peer()), after.cgs[&id].epoch);
            }
        }
        _ => {}
    }
    // A rejected command leaves the map untouched.
    let unchanged = match result {
        ApplyResult::One(Outcome::Rejected { .. }) => true,
        ApplyResult::Many(rs) => rs
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Rejected { .. })),
        _ => false,
    };
    if unchanged {
        assert_eq!(before, after, "a rejected command changed the map");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    // Reference: DESIGN §6 (detach CAS, epochs, fenced_before) and §7 invariant 3.
    #[test]
    fn no_command_sequence_breaks_the_map(specs in prop::collection::vec(spec(), 1..64)) {
        let mut map = ClusterMap::new();
        let mut replica = ClusterMap::new();
        let mut h = History::default();
        for spec in &specs {
            let cmd = to_command(&map, spec);
            let before = map.clone();
            let result = map.apply(&cmd);
            // Determinism: a second replica applying the same log gets the same result and map.
            let replica_result = replica.apply(&cmd);
            prop_assert_eq!(&result, &replica_result);
            prop_assert_eq!(&map, &replica);
            check_step(&before, &map, &cmd, &result, &mut h);
        }
        // The map survives a snapshot round trip unchanged.
        let bytes = postcard::to_stdvec(&map).expect("encode map");
        let back: ClusterMap = postcard::from_bytes(&bytes).expect("decode map");
        prop_assert_eq!(back, map);
    }
}
