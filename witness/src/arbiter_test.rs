use super::*;
use crate::map::{AckPolicy, Preference};

const CFG: ArbiterConfig = ArbiterConfig {
    lease: LeaseConfig {
        lease_us: 100_000,
        rho_ppm: 10_000,
        delta_us: 2_000,
    },
    peer_timeout_us: 40_000,
    heartbeat_interval_us: 10_000,
    read_index_interval_us: 50_000,
    preference_delay_us: 20_000,
    propose_retry_us: 30_000,
    on_lapse: LapsePolicy::Eio,
};

const CG: CgId = 7;

fn map_preferring(site: Site) -> ClusterMap {
    let mut map = ClusterMap::new();
    map.apply(&Command::VolumeCreate {
        volume: 1,
        cg: CG,
        size_bytes: 4096,
        policy: AckPolicy::Sync,
        preference: Preference::Pinned(site),
    });
    map
}

/// An arbiter at `site` that has read the map and holds a lease from a heartbeat sent at 0.
fn started(site: Site, map: &ClusterMap) -> Arbiter {
    let mut arb = Arbiter::new(site, CFG, 1, 0);
    let actions = arb.tick(0);
    let Some(Action::SendHeartbeat(hb)) = actions.first().cloned() else {
        panic!("first tick sends a heartbeat: {actions:?}")
    };
    let Some(Action::ReadIndex { id }) = actions.get(1).cloned() else {
        panic!("first tick reads the map: {actions:?}")
    };
    assert_eq!(
        arb.serve(CG, 0),
        Serve::Hold,
        "DESIGN §6: nothing served before a ReadIndex"
    );
    arb.on_read_index(id, 1, map, 1_000);
    let e = map.cg(CG).unwrap().epoch;
    // The heartbeat went out before the map was known, so it named no CG; echo a fresh one.
    assert!(hb.epochs.is_empty());
    let hb = arb.tick(10_000).into_iter().find_map(|a| match a {
        Action::SendHeartbeat(hb) => Some(hb),
        _ => None,
    });
    let hb = hb.expect("heartbeat due at 10 ms");
    assert_eq!(hb.epochs, vec![(CG, e)]);
    arb.on_echo(
        &Echo {
            seq: hb.seq,
            granted: vec![(CG, e)],
        },
        12_000,
    );
    arb
}

fn proposals(actions: &[Action]) -> Vec<Command> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Propose(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

// Reference: DESIGN §6, lease from the send time; "now + δ < expiry"; lapse -> EIO.
#[test]
fn lease_from_echo_runs_from_the_heartbeat_send_time() {
    let map = map_preferring(Site::A);
    let arb = started(Site::A, &map);
    // The ReadIndex sent at 0 granted until 100 ms, the heartbeat sent at 10 ms until 110 ms.
    assert_eq!(arb.serve(CG, 107_999), Serve::Yes);
    assert_eq!(arb.serve(CG, 108_000), Serve::Eio);
}

// Reference: DESIGN §6, "unsolicited messages never renew a lease".
#[test]
fn echo_of_a_heartbeat_never_sent_renews_nothing() {
    let map = map_preferring(Site::A);
    let mut arb = started(Site::A, &map);
    let e = map.cg(CG).unwrap().epoch;
    arb.on_echo(
        &Echo {
            seq: 999,
            granted: vec![(CG, e)],
        },
        105_000,
    );
    assert_eq!(arb.serve(CG, 108_000), Serve::Eio);
    // Granting to the peer does not renew this site's own lease either.
    assert!(arb.on_peer_write(CG, e, 105_000));
    assert_eq!(arb.serve(CG, 108_000), Serve::Eio);
}

// Reference: DESIGN §6, "stops granting renewals before it proposes a detach"; preference.
#[test]
fn preferred_site_stops_granting_then_proposes_and_the_other_waits() {
    let map = map_preferring(Site::A);
    let e = map.cg(CG).unwrap().epoch;
    let mut a = started(Site::A, &map);
    let mut b = started(Site::B, &map);
    // Last peer renewal at 12 ms; lost at 52 ms.
    assert!(proposals(&a.tick(51_000)).is_empty());
    let pa = proposals(&a.tick(52_000));
    assert_eq!(
        pa,
        vec![Command::Detach {
            cg: CG,
            survivor: Site::A,
            expected_epoch: e
        }]
    );
    let hb = Heartbeat {
        seq: 5,
        epochs: vec![(CG, e)],
    };
    assert!(
        a.on_heartbeat(&hb, 52_500).granted.is_empty(),
        "no grant once lost"
    );
    assert!(!a.on_peer_write(CG, e, 52_500));
    // B is not preferred: it stops granting at once but proposes only after the delay.
    assert!(proposals(&b.tick(52_000)).is_empty());
    assert!(b.on_heartbeat(&hb, 52_500).granted.is_empty());
    assert!(proposals(&b.tick(71_999)).is_empty());
    assert_eq!(proposals(&b.tick(72_000)).len(), 1);
    // Retries are spaced, not one per tick.
    assert!(proposals(&a.tick(60_000)).is_empty());
    assert_eq!(proposals(&a.tick(82_000)).len(), 1);
}

// Reference: DESIGN §6, the survivor waits L·(1+ρ)+δ after the later of last grant and commit;
// the loser fails queued I/O and closes connections.
#[test]
fn winner_waits_and_loser_fails_io_on_learning() {
    let mut map = map_preferring(Site::A);
    let e = map.cg(CG).unwrap().epoch;
    let mut a = started(Site::A, &map);
    let mut b = started(Site::B, &map);
    // A grants B a renewal at 30 ms, then loses B.
    let echo = a.on_heartbeat(
        &Heartbeat {
            seq: 1,
            epochs: vec![(CG, e)],
        },
        30_000,
    );
    assert_eq!(echo.granted, vec![(CG, e)]);
    a.tick(52_000);
    map.apply(&Command::Detach {
        cg: CG,
        survivor: Site::A,
        expected_epoch: e,
    });
    assert!(a.on_map(2, &map, 60_000).is_empty());
    let wait_us = CFG.lease.survivor_wait_us();
    assert_eq!(wait_us, 103_000);
    assert!(!a.may_ack_alone(CG, 60_000 + wait_us - 1));
    assert_eq!(a.serve(CG, 60_000 + wait_us - 1), Serve::Hold);
    assert!(a.may_ack_alone(CG, 60_000 + wait_us));
    assert_eq!(a.serve(CG, 60_000 + wait_us), Serve::Yes);
    assert_eq!(b.on_map(2, &map, 61_000), vec![Action::Detached { cg: CG }]);
    assert_eq!(b.serve(CG, 61_000), Serve::Eio);
    assert!(!b.may_ack_alone(CG, u64::MAX));
    // An older map arriving late changes nothing.
    assert!(b.on_map(1, &map_preferring(Site::A), 62_000).is_empty());
    assert_eq!(b.serve(CG, 62_000), Serve::Eio);
}

// Reference: DESIGN §4 "Resync": a catching-up site serves reads (its replica decides by the
// survivor's read lease and what is resynced); writes there still fail; a detached one serves
// nothing.
#[test]
fn a_resyncing_site_lets_reads_through_to_its_replica_but_not_writes() {
    let mut map = map_preferring(Site::A);
    let e = map.cg(CG).unwrap().epoch;
    let mut b = started(Site::B, &map);
    map.apply(&Command::Detach {
        cg: CG,
        survivor: Site::A,
        expected_epoch: e,
    });
    b.on_map(2, &map, 61_000);
    assert_eq!(b.serve_read(CG, 61_000), Serve::Eio, "detached: nothing");
    let e2 = map.cg(CG).unwrap().epoch;
    map.apply(&Command::StartResync {
        cg: CG,
        site: Site::B,
        expected_epoch: e2,
    });
    assert_eq!(map.cg(CG).unwrap().state(Site::B), SiteState::Resyncing);
    b.on_map(3, &map, 62_000);
    assert_eq!(b.serve_read(CG, 62_000), Serve::Yes);
    assert_eq!(b.serve(CG, 62_000), Serve::Eio, "writes still fail");
    assert_eq!(b.accept_epoch(CG, 62_000), None);
    // The survivor's answers are unchanged by the read path.
    let mut a = started(Site::A, &map_preferring(Site::A));
    a.on_map(3, &map, 62_000);
    assert_eq!(a.serve_read(CG, 62_000), a.serve(CG, 62_000));
}

// Reference: DESIGN §6, a flap: the peer is back before the detach commits; granting resumes,
// and once the commit is learned the survivor grants nothing more and waits from then.
#[test]
fn flap_resumes_grants_until_the_commit_is_learned() {
    let mut map = map_preferring(Site::A);
    let e = map.cg(CG).unwrap().epoch;
    let mut a = started(Site::A, &map);
    let hb_b = Heartbeat {
        seq: 3,
        epochs: vec![(CG, e)],
    };
    assert_eq!(proposals(&a.tick(52_000)).len(), 1);
    assert!(a.on_heartbeat(&hb_b, 53_000).granted.is_empty());
    let hb = a.tick(62_000).into_iter().find_map(|x| match x {
        Action::SendHeartbeat(hb) => Some(hb),
        _ => None,
    });
    let hb = hb.expect("heartbeat due at 62 ms");
    a.on_echo(
        &Echo {
            seq: hb.seq,
            granted: vec![(CG, e)],
        },
        80_000,
    );
    assert_eq!(a.on_heartbeat(&hb_b, 85_000).granted, vec![(CG, e)]);
    map.apply(&Command::Detach {
        cg: CG,
        survivor: Site::A,
        expected_epoch: e,
    });
    a.on_map(2, &map, 86_000);
    assert!(a.on_heartbeat(&hb_b, 87_000).granted.is_empty());
    assert!(!a.on_peer_write(CG, e, 87_000));
    assert!(!a.may_ack_alone(CG, 86_000 + CFG.lease.survivor_wait_us() - 1));
    assert!(a.may_ack_alone(CG, 86_000 + CFG.lease.survivor_wait_us()));
}

// Reference: DESIGN §6, loser lapse policy "EIO, or suspend — configurable".
#[test]
fn suspend_policy_holds_instead_of_failing() {
    let map = map_preferring(Site::A);
    let mut arb = Arbiter::new(
        Site::B,
        ArbiterConfig {
            on_lapse: LapsePolicy::Suspend,
            ..CFG
        },
        1,
        0,
    );
    let id = arb.tick(0).into_iter().find_map(|a| match a {
        Action::ReadIndex { id } => Some(id),
        _ => None,
    });
    arb.on_read_index(id.expect("read index"), 1, &map, 500);
    assert_eq!(arb.serve(CG, 97_999), Serve::Yes);
    assert_eq!(arb.serve(CG, 98_000), Serve::Hold);
    let lapsed = arb.tick(98_000);
    assert!(lapsed.contains(&Action::LeaseLapsed {
        cg: CG,
        policy: LapsePolicy::Suspend
    }));
    assert!(!arb
        .tick(99_000)
        .iter()
        .any(|a| matches!(a, Action::LeaseLapsed { .. })));
}

// A rejoin moves the epoch and revokes every lease: until the first renewal in the new epoch
// the site holds requests rather than failing them (a lapse after a lease existed still
// fails them, per `on_lapse`).
#[test]
fn no_lease_yet_holds_but_a_lapsed_lease_fails() {
    let mut map = map_preferring(Site::A);
    let mut arb = started(Site::A, &map);
    let e1 = map.cg(CG).unwrap().epoch;
    map.apply(&Command::Detach {
        cg: CG,
        survivor: Site::A,
        expected_epoch: e1,
    });
    let e2 = map.cg(CG).unwrap().epoch;
    map.apply(&Command::StartResync {
        cg: CG,
        site: Site::B,
        expected_epoch: e2,
    });
    map.apply(&Command::Rejoin {
        cg: CG,
        expected_epoch: e2,
    });
    let t = 20_000;
    arb.on_map(5, &map, t);
    assert_eq!(
        arb.serve(CG, t),
        Serve::Hold,
        "no lease yet in the new epoch"
    );
    let hb = arb
        .tick(t + CFG.heartbeat_interval_us)
        .into_iter()
        .find_map(|a| match a {
            Action::SendHeartbeat(hb) => Some(hb),
            _ => None,
        })
        .expect("a heartbeat");
    let sent = t + CFG.heartbeat_interval_us;
    arb.on_echo(
        &Echo {
            seq: hb.seq,
            granted: vec![(CG, map.cg(CG).unwrap().epoch)],
        },
        sent + 1_000,
    );
    assert_eq!(arb.serve(CG, sent + 1_000), Serve::Yes);
    let after = sent + CFG.lease.lease_us + 1;
    assert_eq!(
        arb.serve(CG, after),
        Serve::Eio,
        "a lapsed lease fails requests"
    );
}
