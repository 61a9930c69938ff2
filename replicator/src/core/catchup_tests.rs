//! Unit tests of a catching-up loser serving reads (DESIGN.md §4 "Resync"): two replicas
//! driven by hand, frame by frame, so each rule shows on its own. The simulator checks the
//! combinations (reordering, loss, crashes) against invariant 4.

use std::collections::VecDeque;

use stretch_engine::BLOCK_SIZE;

use super::{Action, BlockStore, ClientError, Config, Content, Event, MapView, Replica, Role};
use crate::frame::{Frame, Kind, FLAG_LEASE, FLAG_PLAN, FLAG_PRIORITY};
use crate::sim::MemStore;
use crate::stamp::StampParts;

const CLUSTER: u64 = 77;
const BLOCK_BYTES: usize = BLOCK_SIZE as usize;
const SURVIVOR: usize = 0;
const LOSER: usize = 1;

/// Two replicas and the frames each has sent and the other not yet received.
struct Pair {
    replicas: Vec<Replica>,
    stores: Vec<MemStore>,
    /// Frames sent by site i, oldest first.
    wire: [VecDeque<Frame>; 2],
    /// Everything but frames, per site, oldest first.
    client: [Vec<Action>; 2],
    next_id: u64,
}

impl Pair {
    /// Both sites in sync at epoch 1, copies sent one at a time (so "first" is observable).
    fn new() -> Pair {
        let mut stores = vec![MemStore::new(8), MemStore::new(8)];
        let map = MapView {
            role: Role::InSync,
            epoch: 1,
            fenced_before: [0, 0],
        };
        let replicas = (0..2u8)
            .map(|site| {
                let mut cfg = Config::new(site, CLUSTER, 1, 1);
                cfg.resync_blocks_in_flight_max = 1;
                Replica::start(cfg, 1_000, map, &mut stores[usize::from(site)])
            })
            .collect();
        Pair {
            replicas,
            stores,
            wire: [VecDeque::new(), VecDeque::new()],
            client: [Vec::new(), Vec::new()],
            next_id: 1,
        }
    }

    fn step(&mut self, site: usize, now_us: u64, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        self.replicas[site].step(now_us, event, &mut self.stores[site], &mut out);
        let mut client = Vec::new();
        for a in out {
            match a {
                Action::SendFrame(f) => self.wire[site].push_back(f),
                other => client.push(other),
            }
        }
        self.client[site].extend(client.iter().cloned());
        client
    }

    fn both(&mut self, now_us: u64, event: Event) {
        self.step(SURVIVOR, now_us, event.clone());
        self.step(LOSER, now_us, event);
    }

    /// Delivers the frames sent by `from` that `pass` accepts, in order, and every frame
    /// they cause in either direction that `pass` accepts too, until none is left. Frames
    /// `pass` refuses stay on the wire, in order.
    fn deliver(&mut self, now_us: u64, pass: impl Fn(usize, &Frame) -> bool) {
        // Bounded: the exchanges here are a few dozen frames.
        for _ in 0..10_000 {
            let mut moved = false;
            for from in [SURVIVOR, LOSER] {
                let Some(i) = self.wire[from].iter().position(|f| pass(from, f)) else {
                    continue;
                };
                let Some(frame) = self.wire[from].remove(i) else {
                    continue;
                };
                self.step(1 - from, now_us, Event::FrameReceived(frame));
                moved = true;
            }
            if !moved {
                return;
            }
        }
        panic!("frames kept flowing");
    }

    fn drop_wire(&mut self) {
        self.wire = [VecDeque::new(), VecDeque::new()];
    }

    fn write(&mut self, site: usize, now_us: u64, lba: u64, fill: u8) -> (u64, Vec<Action>) {
        let id = self.next_id;
        self.next_id += 1;
        let out = self.step(
            site,
            now_us,
            Event::ClientWrite {
                id,
                lba,
                data: vec![fill; BLOCK_BYTES],
                fua: false,
            },
        );
        (id, out)
    }

    fn read(&mut self, site: usize, now_us: u64, lba: u64) -> (u64, Vec<Action>) {
        let id = self.next_id;
        self.next_id += 1;
        let out = self.step(site, now_us, Event::ClientRead { id, lba, blocks: 1 });
        (id, out)
    }

    /// What the client of `site` learnt about `id` so far.
    fn outcome(&self, site: usize, id: u64) -> Option<&Action> {
        self.client[site].iter().find(|a| match a {
            Action::AckClient { id: i, .. }
            | Action::ReadDone { id: i, .. }
            | Action::FailClient { id: i, .. } => *i == id,
            _ => false,
        })
    }

    fn read_fill(&self, site: usize, id: u64) -> Option<u8> {
        match self.outcome(site, id) {
            Some(Action::ReadDone { data, .. }) => data.first().copied(),
            _ => None,
        }
    }
}

fn is_io_failure(a: Option<&Action>) -> bool {
    matches!(
        a,
        Some(Action::FailClient {
            error: ClientError::Io,
            ..
        })
    )
}

fn everything(_: usize, _: &Frame) -> bool {
    true
}

/// In sync: block 5 written (0x55, current at both). Cut, detach (site 0 survives), the
/// survivor writes blocks 1, 2 and 3 alone (0xA1..0xA3), heal. The loser's resync request
/// reaches the survivor; nothing else is delivered yet. Time is 100_000 us.
fn catching_up() -> Pair {
    let mut p = Pair::new();
    p.both(2_000, Event::LinkUp);
    p.deliver(2_000, everything);
    let (w, _) = p.write(SURVIVOR, 3_000, 5, 0x55);
    p.deliver(3_000, everything);
    assert!(matches!(
        p.outcome(SURVIVOR, w),
        Some(Action::AckClient { .. })
    ));
    p.both(10_000, Event::LinkDown);
    p.drop_wire();
    p.both(
        20_000,
        Event::Detach {
            survivor: 0,
            new_epoch: 2,
            fenced_before: [0, 2],
        },
    );
    for lba in 1..=3u64 {
        let (id, _) = p.write(SURVIVOR, 30_000, lba, 0xA0 + lba as u8);
        assert!(
            matches!(p.outcome(SURVIVOR, id), Some(Action::AckClient { .. })),
            "no lease was ever granted: the survivor acknowledges alone at once"
        );
    }
    p.both(100_000, Event::LinkUp);
    p.deliver(100_000, |from, f| {
        from == LOSER && f.header.kind == Kind::ResyncRequest
    });
    assert_eq!(p.replicas[LOSER].role(), Role::Loser);
    p
}

/// Sends a heartbeat from the loser and delivers it and its (lease) echo.
fn grant_lease(p: &mut Pair, now_us: u64) {
    p.step(LOSER, now_us, Event::Tick);
    p.deliver(now_us, |_, f| {
        matches!(f.header.kind, Kind::Heartbeat | Kind::HeartbeatEcho)
    });
}

fn is_plan(f: &Frame) -> bool {
    f.header.kind == Kind::ResyncRequest && f.header.flags & FLAG_PLAN != 0
}

// §4 "Resync": it serves nothing until it knows which of its blocks are stale (the plan),
// and only under a lease.
#[test]
fn no_read_is_served_before_the_plan_and_a_lease() {
    let mut p = catching_up();
    let (before_plan, _) = p.read(LOSER, 100_100, 5);
    assert!(is_io_failure(p.outcome(LOSER, before_plan)));
    // A lease alone is not enough: the plan has not arrived.
    grant_lease(&mut p, 100_200);
    let (lease_no_plan, _) = p.read(LOSER, 100_300, 5);
    assert!(
        is_io_failure(p.outcome(LOSER, lease_no_plan)),
        "{:?}",
        p.outcome(LOSER, lease_no_plan)
    );
    // The plan without a lease is not enough either: a fresh pair, the plan only.
    let mut q = catching_up();
    q.deliver(100_100, |from, f| from == SURVIVOR && is_plan(f));
    let (plan_no_lease, _) = q.read(LOSER, 100_200, 5);
    assert!(is_io_failure(q.outcome(LOSER, plan_no_lease)));
    // Both: block 5 is current here and is served locally.
    grant_lease(&mut q, 100_300);
    let (served, out) = q.read(LOSER, 100_400, 5);
    assert!(!out.is_empty(), "served in the same step, locally");
    assert_eq!(q.read_fill(LOSER, served), Some(0x55));
    assert_eq!(q.replicas[LOSER].counters().catchup_reads_local, 1);
}

// §4 "Resync": a block the survivor wrote alone is stale here until its copy lands; a read
// of it is answered with the survivor's version, copied ahead of the rest of the resync.
#[test]
fn a_stale_block_is_pulled_ahead_of_the_resync_and_served_with_the_survivors_version() {
    let mut p = catching_up();
    p.deliver(100_100, |from, f| from == SURVIVOR && is_plan(f));
    grant_lease(&mut p, 100_200);
    for lba in 1..=3 {
        assert!(p.stores[LOSER].is_dirty(lba), "block {lba} is in the plan");
    }
    // One copy in flight (block 1): block 3 would come last.
    let copies: Vec<u64> = p.wire[SURVIVOR]
        .iter()
        .filter(|f| f.header.kind == Kind::ResyncBlock)
        .map(|f| f.header.lba)
        .collect();
    assert_eq!(copies, vec![1]);
    let (read, out) = p.read(LOSER, 100_300, 3);
    assert!(
        out.is_empty(),
        "block 3 is stale here: the read waits, it does not return the old version"
    );
    assert!(p.wire[LOSER]
        .iter()
        .any(|f| f.header.kind == Kind::ResyncRequest && f.header.flags & FLAG_PRIORITY != 0));
    // The priority request reaches the survivor; block 1's copy and its ack go round; the
    // next copy is block 3, not block 2.
    p.deliver(100_400, |_, f| {
        f.header.kind == Kind::ResyncRequest || f.header.kind == Kind::ResyncAck
    });
    p.deliver(100_500, |from, f| {
        from == SURVIVOR && f.header.kind == Kind::ResyncBlock && f.header.lba == 1
    });
    p.deliver(100_600, |_, f| f.header.kind == Kind::ResyncAck);
    let next: Vec<u64> = p.wire[SURVIVOR]
        .iter()
        .filter(|f| f.header.kind == Kind::ResyncBlock)
        .map(|f| f.header.lba)
        .collect();
    assert_eq!(next, vec![3], "the block a read waits for is copied first");
    p.deliver(100_700, |from, f| {
        from == SURVIVOR && f.header.kind == Kind::ResyncBlock
    });
    assert_eq!(p.read_fill(LOSER, read), Some(0xA3));
    assert!(
        p.stores[LOSER].is_dirty(2),
        "served before the resync reached block 2"
    );
    assert_eq!(p.replicas[LOSER].counters().catchup_reads_pulled, 1);
    // Writes at the catching-up site still fail: it commits nothing until rejoin.
    let (w, _) = p.write(LOSER, 100_800, 6, 0x66);
    assert!(is_io_failure(p.outcome(LOSER, w)));
}

// The lease runs from the heartbeat's send time; once it lapsed, reads fail until the next.
#[test]
fn reads_fail_once_the_lease_lapsed() {
    let mut p = catching_up();
    p.deliver(100_100, |from, f| from == SURVIVOR && is_plan(f));
    grant_lease(&mut p, 100_200);
    let lease_us = Config::new(0, CLUSTER, 1, 1).read_lease_us;
    let (inside, _) = p.read(LOSER, 100_200 + lease_us - 1, 5);
    assert_eq!(p.read_fill(LOSER, inside), Some(0x55));
    // A read waiting for a stale block when the lease lapses fails then.
    let (waiting, out) = p.read(LOSER, 100_200 + lease_us - 1, 2);
    assert!(out.is_empty());
    p.step(LOSER, 100_200 + lease_us, Event::Tick);
    assert!(is_io_failure(p.outcome(LOSER, waiting)));
    let (after, _) = p.read(LOSER, 100_200 + lease_us + 1, 5);
    assert!(is_io_failure(p.outcome(LOSER, after)));
    // A new grant: served again.
    p.drop_wire();
    grant_lease(&mut p, 120_000 + lease_us);
    let (again, _) = p.read(LOSER, 120_100 + lease_us, 5);
    assert_eq!(p.read_fill(LOSER, again), Some(0x55));
}

// After a cut the survivor acknowledges alone only once every lease it granted has surely
// lapsed: lease × (1 + drift) + margin after its last grant.
#[test]
fn after_a_cut_the_survivor_acks_alone_only_once_its_lease_lapsed() {
    let mut p = catching_up();
    p.deliver(100_100, |from, f| from == SURVIVOR && is_plan(f));
    grant_lease(&mut p, 100_200);
    let cfg = Config::new(0, CLUSTER, 1, 1);
    let hold_us = cfg.read_lease_us
        + cfg.read_lease_us * cfg.lease_drift_ppm / 1_000_000
        + cfg.lease_margin_us;
    // The grant was at 100_200 (the survivor's clock). Cut.
    p.both(100_300, Event::LinkDown);
    p.drop_wire();
    let (w, out) = p.write(SURVIVOR, 100_400, 5, 0x5B);
    assert!(out.is_empty(), "held: the loser may still serve block 5");
    // The held write is not applied yet: a read here returns what the loser serves.
    let (old, _) = p.read(SURVIVOR, 100_500, 5);
    assert_eq!(p.read_fill(SURVIVOR, old), Some(0x55));
    p.step(SURVIVOR, 100_200 + hold_us - 1, Event::Tick);
    assert_eq!(p.outcome(SURVIVOR, w), None);
    p.step(SURVIVOR, 100_200 + hold_us, Event::Tick);
    assert!(matches!(
        p.outcome(SURVIVOR, w),
        Some(Action::AckClient { .. })
    ));
    let (r, _) = p.read(SURVIVOR, 100_200 + hold_us, 5);
    assert_eq!(p.read_fill(SURVIVOR, r), Some(0x5B));
    // The loser's lease lapsed well before, on its own clock.
    let (late, _) = p.read(LOSER, 100_200 + cfg.read_lease_us, 5);
    assert!(is_io_failure(p.outcome(LOSER, late)));
}

// A restarted survivor cannot know whether it granted a lease just before: it waits one out.
#[test]
fn a_restarted_survivor_waits_out_a_lease_it_may_have_granted() {
    let mut store = MemStore::new(8);
    let map = MapView {
        role: Role::Survivor,
        epoch: 2,
        fenced_before: [0, 2],
    };
    let cfg = Config::new(0, CLUSTER, 1, 1);
    let hold_us = cfg.read_lease_us
        + cfg.read_lease_us * cfg.lease_drift_ppm / 1_000_000
        + cfg.lease_margin_us;
    // Block 3 was written just before the crash, its copy to the catching-up peer maybe
    // not applied there: dirty here, and the peer may still serve its older version.
    store.mark_dirty(3);
    store.write(
        3,
        Content::Data(&[3; BLOCK_BYTES]),
        StampParts {
            accept_epoch: 2,
            hlc: 9,
            origin_site: 0,
        }
        .encode(),
    );
    let mut r = Replica::start(cfg, 1_000, map, &mut store);
    let mut out = Vec::new();
    r.step(
        1_500,
        Event::ClientRead {
            id: 2,
            lba: 3,
            blocks: 1,
        },
        &mut store,
        &mut out,
    );
    assert!(out.is_empty(), "{out:?}");
    r.step(
        2_000,
        Event::ClientWrite {
            id: 1,
            lba: 0,
            data: vec![1; BLOCK_BYTES],
            fua: false,
        },
        &mut store,
        &mut out,
    );
    assert!(out.is_empty(), "{out:?}");
    r.step(1_000 + hold_us - 1, Event::Tick, &mut store, &mut out);
    assert!(out.is_empty(), "{out:?}");
    r.step(1_000 + hold_us, Event::Tick, &mut store, &mut out);
    assert_eq!(out.len(), 2);
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::AckClient { id: 1, .. })));
    assert!(out.iter().any(|a| matches!(
        a,
        Action::ReadDone { id: 2, data, .. } if data[0] == 3
    )));
}

// The lease is granted only by a survivor whose peer is a sync target in the current epoch.
#[test]
fn only_a_survivor_resyncing_its_peer_grants_a_lease() {
    // The lease flag of the survivor's echo to the loser's next heartbeat.
    fn echo_lease(p: &mut Pair, now_us: u64) -> Option<u32> {
        p.step(LOSER, now_us, Event::Tick);
        p.deliver(now_us, |_, f| f.header.kind == Kind::Heartbeat);
        p.wire[SURVIVOR]
            .iter()
            .find(|f| f.header.kind == Kind::HeartbeatEcho)
            .map(|f| f.header.flags & FLAG_LEASE)
    }
    let mut p = Pair::new();
    p.both(2_000, Event::LinkUp);
    assert_eq!(echo_lease(&mut p, 3_000), Some(0), "in sync: no lease");
    let mut q = catching_up();
    assert_eq!(echo_lease(&mut q, 100_200), Some(FLAG_LEASE));
}

// A long round trip (400 ms: more heartbeats on their way than the replica tracks) still
// grants leases: the replica sends fewer heartbeats instead of forgetting the ones whose
// echoes are coming.
#[test]
fn the_lease_holds_at_a_round_trip_longer_than_the_heartbeats_tracked() {
    let mut p = catching_up();
    p.deliver(100_100, |from, f| from == SURVIVOR && is_plan(f));
    let one_way_us = 200_000;
    // (due time, destination, frame), delivered in order of due time.
    let mut in_flight: VecDeque<(u64, usize, Frame)> = VecDeque::new();
    let mut now_us = 100_200;
    // Bounded: two seconds of 10 ms ticks.
    for _ in 0..200 {
        now_us += 10_000;
        p.step(LOSER, now_us, Event::Tick);
        p.step(SURVIVOR, now_us, Event::Tick);
        for from in [SURVIVOR, LOSER] {
            while let Some(f) = p.wire[from].pop_front() {
                if matches!(f.header.kind, Kind::Heartbeat | Kind::HeartbeatEcho) {
                    in_flight.push_back((now_us + one_way_us, 1 - from, f));
                }
            }
        }
        while in_flight.front().is_some_and(|(due, _, _)| *due <= now_us) {
            if let Some((_, to, f)) = in_flight.pop_front() {
                p.step(to, now_us, Event::FrameReceived(f));
            }
        }
    }
    let (read, _) = p.read(LOSER, now_us, 5);
    assert_eq!(
        p.read_fill(LOSER, read),
        Some(0x55),
        "{:?}",
        p.outcome(LOSER, read)
    );
    assert!(p.replicas[LOSER].counters().rtt_samples > 0);
}

// A plan chunk no list of this volume can have (its index not below its count, or a count
// beyond what the volume's blocks need) marks nothing and is counted as foreign; the real
// plan still completes.
#[test]
fn a_garbage_plan_chunk_marks_nothing() {
    let mut p = catching_up();
    let plan = p.wire[SURVIVOR]
        .iter()
        .find(|f| is_plan(f))
        .cloned()
        .expect("the survivor sent its plan");
    let foreign_before = p.replicas[LOSER].counters().frames_foreign;
    for (index, count) in [
        (plan.header.blocks as u64, plan.header.blocks),
        (0, u32::MAX),
    ] {
        let mut h = plan.header;
        h.lba = index;
        h.blocks = count;
        // Block 6 is in no real plan: a garbage chunk must not make it stale.
        let body = 6u64.to_le_bytes().to_vec();
        p.step(LOSER, 100_050, Event::FrameReceived(Frame::new(h, body)));
    }
    assert!(!p.stores[LOSER].is_dirty(6));
    assert_eq!(
        p.replicas[LOSER].counters().frames_foreign,
        foreign_before + 2
    );
    p.deliver(100_100, |from, f| from == SURVIVOR && is_plan(f));
    grant_lease(&mut p, 100_200);
    let (read, _) = p.read(LOSER, 100_300, 5);
    assert_eq!(p.read_fill(LOSER, read), Some(0x55));
}
