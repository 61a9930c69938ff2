//! Unit tests of [`Replica`] driven event by event (the simulator covers the combinations).

use stretch_engine::{Stamp, BLOCK_SIZE};

use super::{Action, BlockStore, ClientError, Config, Event, MapView, Replica, Role};
use crate::frame::{Frame, Header, Kind};
use crate::sim::MemStore;
use crate::stamp::StampParts;

const CLUSTER: u64 = 77;
const BLOCK_BYTES: usize = BLOCK_SIZE as usize;

fn in_sync(epoch: u32) -> MapView {
    MapView {
        role: Role::InSync,
        epoch,
        fenced_before: [0, 0],
    }
}

fn start(site: u8, map: MapView) -> (Replica, MemStore) {
    let mut store = MemStore::new(8);
    let replica = Replica::start(Config::new(site, CLUSTER, 1, 1), 1_000, map, &mut store);
    (replica, store)
}

fn step(r: &mut Replica, store: &mut MemStore, now_us: u64, event: Event) -> Vec<Action> {
    let mut out = Vec::new();
    r.step(now_us, event, store, &mut out);
    out
}

fn frames(actions: &[Action]) -> Vec<Frame> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendFrame(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn write_frame(from: u8, epoch: u32, hlc: u64, lba: u64, fill: u8) -> Frame {
    let mut h = Header::new(Kind::Write);
    h.sender_site = from;
    h.cluster_id = CLUSTER;
    h.cg_id = 1;
    h.volume_id = 1;
    h.accept_epoch = epoch;
    h.seq = hlc;
    h.lba = lba;
    h.blocks = 1;
    h.stamp = StampParts {
        accept_epoch: epoch,
        hlc,
        origin_site: from,
    }
    .encode();
    Frame::new(h, vec![fill; BLOCK_BYTES])
}

fn first_byte(store: &MemStore, lba: u64) -> u8 {
    let mut b = vec![0u8; BLOCK_BYTES];
    store.read(lba, &mut b);
    b[0]
}

// DESIGN.md §4 "Fencing": a receiver refuses a write iff accept_epoch < fenced_before[origin].
#[test]
fn fenced_write_is_refused_nacked_and_not_applied() {
    let map = MapView {
        role: Role::Survivor,
        epoch: 2,
        fenced_before: [2, 0],
    };
    let (mut r, mut store) = start(1, map);
    step(&mut r, &mut store, 2_000, Event::LinkUp);
    let out = step(
        &mut r,
        &mut store,
        2_000,
        Event::FrameReceived(write_frame(0, 1, 5, 3, 9)),
    );
    let sent = frames(&out);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header.kind, Kind::WriteNack);
    assert_eq!(store.stamp(3), Stamp::ZERO);
    assert_eq!(r.counters().mutations_fenced, 1);
    // The same write in the current epoch is applied: the check is the epoch, not the site.
    let out = step(
        &mut r,
        &mut store,
        2_000,
        Event::FrameReceived(write_frame(0, 2, 5, 3, 9)),
    );
    assert_eq!(frames(&out)[0].header.kind, Kind::WriteAck);
    assert_eq!(first_byte(&store, 3), 9);
}

// DESIGN.md §4 "Apply rule": the newer stamp wins whatever the arrival order.
#[test]
fn apply_rule_keeps_the_newer_stamp_in_either_order() {
    let older = write_frame(0, 1, 100, 2, 1);
    let newer = write_frame(0, 1, 200, 2, 2);
    for order in [
        [older.clone(), newer.clone()],
        [newer.clone(), older.clone()],
    ] {
        let (mut r, mut store) = start(1, in_sync(1));
        for f in order {
            let out = step(&mut r, &mut store, 2_000, Event::FrameReceived(f));
            // Both are acked: a superseded write is as final as an applied one.
            assert_eq!(frames(&out)[0].header.kind, Kind::WriteAck);
        }
        assert_eq!(first_byte(&store, 2), 2);
        assert_eq!(store.stamp(2), newer.header.stamp);
    }
}

// DESIGN.md §4 "Reads" and §5 `sync`: the origin acks only after the peer applied, and a
// read of a block whose write waits for the peer waits too; other blocks are served.
#[test]
fn origin_read_waits_for_its_write_pending_at_the_peer() {
    let (mut r, mut store) = start(0, in_sync(1));
    step(&mut r, &mut store, 2_000, Event::LinkUp);
    let out = step(
        &mut r,
        &mut store,
        2_000,
        Event::ClientWrite {
            id: 1,
            lba: 4,
            data: vec![7; BLOCK_BYTES],
            fua: false,
        },
    );
    let write = frames(&out).pop().expect("write sent to the peer");
    assert!(!out.iter().any(|a| matches!(a, Action::AckClient { .. })));
    let out = step(
        &mut r,
        &mut store,
        2_001,
        Event::ClientRead {
            id: 2,
            lba: 4,
            blocks: 1,
        },
    );
    assert!(
        out.is_empty(),
        "read of a block pending at the peer must wait: {out:?}"
    );
    let out = step(
        &mut r,
        &mut store,
        2_002,
        Event::ClientRead {
            id: 3,
            lba: 5,
            blocks: 1,
        },
    );
    assert!(matches!(out[..], [Action::ReadDone { id: 3, .. }]));
    let mut ack = write.header;
    ack.kind = Kind::WriteAck;
    ack.sender_site = 1;
    let out = step(
        &mut r,
        &mut store,
        2_003,
        Event::FrameReceived(Frame::new(ack, Vec::new())),
    );
    assert!(matches!(out[0], Action::AckClient { id: 1, .. }), "{out:?}");
    assert!(
        matches!(&out[1], Action::ReadDone { id: 2, data, .. } if data[0] == 7),
        "{out:?}"
    );
    assert!(!store.is_dirty(4));
}

// DESIGN.md §4 "Fencing" and §6: at a detach the survivor acknowledges its pending writes
// alone (they stay dirty for resync); the loser fails them with EIO and keeps them dirty.
#[test]
fn detach_acks_pending_at_the_survivor_and_fails_them_at_the_loser() {
    for (site, survivor) in [(0u8, 0u8), (0, 1)] {
        let (mut r, mut store) = start(site, in_sync(1));
        step(&mut r, &mut store, 2_000, Event::LinkUp);
        step(&mut r, &mut store, 2_000, Event::LinkDown);
        let data = vec![3; BLOCK_BYTES];
        let out = step(
            &mut r,
            &mut store,
            2_000,
            Event::ClientWrite {
                id: 9,
                lba: 1,
                data,
                fua: false,
            },
        );
        assert!(out.is_empty(), "sync: no ack while the peer is unreachable");
        let loser = 1 - survivor;
        let mut fenced_before = [0, 0];
        fenced_before[usize::from(loser)] = 2;
        let out = step(
            &mut r,
            &mut store,
            3_000,
            Event::Detach {
                survivor,
                new_epoch: 2,
                fenced_before,
            },
        );
        if site == survivor {
            assert!(
                matches!(out[..], [Action::AckClient { id: 9, .. }]),
                "{out:?}"
            );
            assert_eq!(r.role(), Role::Survivor);
        } else {
            let expected = Action::FailClient {
                id: 9,
                error: ClientError::Io,
            };
            assert_eq!(out, vec![expected]);
            let out = step(
                &mut r,
                &mut store,
                3_001,
                Event::ClientRead {
                    id: 10,
                    lba: 0,
                    blocks: 1,
                },
            );
            assert_eq!(
                out,
                vec![Action::FailClient {
                    id: 10,
                    error: ClientError::Io
                }]
            );
        }
        assert!(
            store.is_dirty(1),
            "the block differs from the peer until resync"
        );
    }
}

// DESIGN.md §4 "Alignment": mutations are whole blocks inside the volume, else EINVAL.
#[test]
fn unaligned_empty_and_out_of_range_mutations_are_invalid() {
    let (mut r, mut store) = start(0, in_sync(1));
    let bad = [
        Event::ClientWrite {
            id: 1,
            lba: 0,
            data: vec![1; 100],
            fua: false,
        },
        Event::ClientWrite {
            id: 2,
            lba: 0,
            data: Vec::new(),
            fua: false,
        },
        Event::ClientWrite {
            id: 3,
            lba: 7,
            data: vec![1; 2 * BLOCK_BYTES],
            fua: false,
        },
        Event::ClientTrim {
            id: 4,
            lba: u64::MAX,
            blocks: 2,
        },
        Event::ClientRead {
            id: 5,
            lba: 8,
            blocks: 1,
        },
        Event::ClientWriteZeroes {
            id: 6,
            lba: 0,
            blocks: 0,
        },
    ];
    for (i, ev) in bad.into_iter().enumerate() {
        let out = step(&mut r, &mut store, 2_000, ev);
        let expected = Action::FailClient {
            id: i as u64 + 1,
            error: ClientError::Invalid,
        };
        assert_eq!(out, vec![expected]);
    }
    assert!(store.dirty_blocks().is_empty());
}

// DESIGN.md §7 invariant 7: frames for another CG or volume, or claiming the wrong origin,
// are counted and never applied.
#[test]
fn foreign_frames_are_counted_not_applied() {
    let (mut r, mut store) = start(1, in_sync(1));
    let mut other_cg = write_frame(0, 1, 5, 0, 1);
    other_cg.header.cg_id = 2;
    let mut from_self = write_frame(1, 1, 5, 0, 1);
    from_self.header.sender_site = 1;
    let mut wrong_origin = write_frame(0, 1, 5, 0, 1);
    wrong_origin.header.stamp = StampParts {
        accept_epoch: 1,
        hlc: 5,
        origin_site: 1,
    }
    .encode();
    let mut short = write_frame(0, 1, 5, 0, 1);
    short.header.blocks = 2;
    for f in [other_cg, from_self, wrong_origin, short] {
        assert!(step(&mut r, &mut store, 2_000, Event::FrameReceived(f)).is_empty());
    }
    assert_eq!(r.counters().frames_foreign, 4);
    assert_eq!(store.stamp(0), Stamp::ZERO);
}

// DESIGN.md §4 "HLC": a local write's stamp exceeds the block's current stamp even when it
// came from a peer whose clock runs far ahead.
#[test]
fn local_stamp_exceeds_a_block_stamped_by_a_clock_far_ahead() {
    let (mut r, mut store) = start(1, in_sync(1));
    step(&mut r, &mut store, 2_000, Event::LinkUp);
    let ahead = write_frame(0, 1, 50_000_000_000, 6, 1);
    step(
        &mut r,
        &mut store,
        2_000,
        Event::FrameReceived(ahead.clone()),
    );
    step(
        &mut r,
        &mut store,
        2_001,
        Event::ClientWrite {
            id: 1,
            lba: 6,
            data: vec![2; BLOCK_BYTES],
            fua: false,
        },
    );
    assert!(store.stamp(6) > ahead.header.stamp);
    assert_eq!(first_byte(&store, 6), 2);
    assert!(
        store.hlc_high_water() > 50_000_000_000,
        "the clock's high-water mark follows"
    );
}

mod hostile_frames {
    use super::*;
    use proptest::prelude::*;

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            (
                0..Kind::ALL.len(),
                0u8..3,
                any::<u32>(),
                0u32..5,
                any::<u64>(),
            ),
            (
                0u64..12,
                0u32..4,
                any::<[u8; 16]>(),
                0usize..3,
                any::<bool>(),
            ),
        )
            .prop_map(
                |((k, sender, flags, epoch, seq), (lba, blocks, stamp, body_blocks, cg))| {
                    let mut h = Header::new(Kind::ALL[k]);
                    h.sender_site = sender;
                    h.flags = flags;
                    h.cluster_id = CLUSTER;
                    h.cg_id = if cg { 1 } else { 2 };
                    h.volume_id = 1;
                    h.accept_epoch = epoch;
                    h.seq = seq;
                    h.lba = lba;
                    h.blocks = blocks;
                    h.stamp = Stamp(stamp);
                    // Bodies of any block count, matching the header or not: the core must not
                    // trust a Frame built by someone other than Frame::decode.
                    Frame::new(h, vec![0xEE; body_blocks * BLOCK_BYTES])
                },
            )
    }

    proptest! {
        // DESIGN.md §7 invariant 7: bad input never crashes the daemon, whatever the role.
        #[test]
        fn arbitrary_frames_never_panic(
            frames in proptest::collection::vec(arb_frame(), 1..20),
            role in 0usize..3,
            link_up: bool,
        ) {
            let role = [Role::InSync, Role::Survivor, Role::Loser][role];
            let map = MapView { role, epoch: 2, fenced_before: [1, 2] };
            let (mut r, mut store) = start(0, map);
            if link_up {
                step(&mut r, &mut store, 2_000, Event::LinkUp);
            }
            for (i, f) in frames.into_iter().enumerate() {
                step(&mut r, &mut store, 2_000 + i as u64, Event::FrameReceived(f));
                step(&mut r, &mut store, 2_000 + i as u64, Event::Tick);
            }
            // Nothing beyond the volume was touched (MemStore asserts on every write).
            prop_assert!(store.dirty_blocks().iter().all(|&b| b < 8));
        }
    }
}
