//! Two replicas wired back to back, event by event: the ack policies of DESIGN.md §5 and
//! the in-band mode switch.

use std::collections::VecDeque;

use stretch_engine::BLOCK_SIZE;

use super::{
    AckPolicy, Action, BlockStore, ClientError, ClientOpId, Config, Event, MapView, Mode, Policy,
    Replica, Role,
};
use crate::frame::{Frame, Kind};
use crate::sim::Loss;
use crate::sim::MemStore;

const BLOCK_BYTES: usize = BLOCK_SIZE as usize;
const HB_US: u64 = 10_000;

/// Both sites, a one-way delay of zero (frames are handed over by `pump`), and what each
/// site's clients were told.
struct Pair {
    r: [Replica; 2],
    s: [MemStore; 2],
    now_us: u64,
    /// Frames on the wire, per destination, in order.
    wire: [VecDeque<Frame>; 2],
    acked: Vec<ClientOpId>,
    failed: Vec<(ClientOpId, ClientError)>,
    reads: Vec<(ClientOpId, Vec<u8>)>,
    flushed: Vec<ClientOpId>,
    /// `ApplyReceived` asked for and not yet stepped, per site.
    apply_due: [bool; 2],
}

impl Pair {
    fn new(policy: Policy) -> Pair {
        let map = MapView {
            role: Role::InSync,
            epoch: 1,
            fenced_before: [0, 0],
        };
        let mut s = [MemStore::new(16), MemStore::new(16)];
        let cfg = |site| {
            let mut c = Config::new(site, 7, 1, 1);
            c.heartbeat_interval_us = HB_US;
            c.policy = policy;
            c
        };
        let r0 = Replica::start(cfg(0), 1_000, map, &mut s[0]);
        let r1 = Replica::start(cfg(1), 1_000, map, &mut s[1]);
        let mut p = Pair {
            r: [r0, r1],
            s,
            now_us: 1_000,
            wire: [VecDeque::new(), VecDeque::new()],
            acked: Vec::new(),
            failed: Vec::new(),
            reads: Vec::new(),
            flushed: Vec::new(),
            apply_due: [false, false],
        };
        p.step(0, Event::LinkUp);
        p.step(1, Event::LinkUp);
        // The leader's announcement of the mode, and its answer.
        p.pump(true);
        p
    }

    fn step(&mut self, site: usize, event: Event) {
        let mut out = Vec::new();
        self.r[site].step(self.now_us, event, &mut self.s[site], &mut out);
        for a in out {
            match a {
                Action::SendFrame(f) => self.wire[1 - site].push_back(f),
                Action::AckClient { id, .. } => self.acked.push(id),
                Action::FailClient { id, error } => self.failed.push((id, error)),
                Action::ReadDone { id, data, .. } => self.reads.push((id, data)),
                Action::FlushDone { id } => self.flushed.push(id),
                Action::ApplyReceived => self.apply_due[site] = true,
                Action::SaveDivergent { .. } | Action::ResyncComplete { .. } => {}
            }
        }
    }

    /// Delivers every frame on the wire (and whatever they cause), but applies received
    /// writes only if `apply` is set: sync-received's window between receipt and apply.
    fn pump(&mut self, apply: bool) {
        loop {
            let mut moved = false;
            for site in 0..2 {
                if let Some(f) = self.wire[site].pop_front() {
                    self.step(site, Event::FrameReceived(f));
                    moved = true;
                }
                if apply && std::mem::take(&mut self.apply_due[site]) {
                    self.step(site, Event::ApplyReceived);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Time passes in heartbeat steps; every frame is delivered and applied.
    fn run_us(&mut self, us: u64) {
        let end = self.now_us + us;
        while self.now_us < end {
            self.now_us += HB_US / 2;
            self.step(0, Event::Tick);
            self.step(1, Event::Tick);
            self.pump(true);
        }
    }

    fn write(&mut self, site: usize, id: ClientOpId, lba: u64, fill: u8) {
        self.step(
            site,
            Event::ClientWrite {
                id,
                lba,
                data: vec![fill; BLOCK_BYTES],
                fua: false,
            },
        );
    }

    fn read(&mut self, site: usize, id: ClientOpId, lba: u64) {
        self.step(site, Event::ClientRead { id, lba, blocks: 1 });
    }

    fn read_byte(&self, id: ClientOpId) -> Option<u8> {
        self.reads.iter().find(|(i, _)| *i == id).map(|(_, d)| d[0])
    }

    fn is_failed(&self, id: ClientOpId) -> bool {
        self.failed
            .iter()
            .any(|(i, e)| *i == id && *e == ClientError::Io)
    }
}

fn policy(ack: AckPolicy) -> Policy {
    Policy {
        ack,
        ..Policy::default()
    }
}

// §5 sync-received: the ack waits for the peer's receipt, not its apply; the write is
// visible to reads at the peer from the receipt on; the origin's dirty bit clears only
// with the apply's ack.
#[test]
fn sync_received_acks_on_receipt_and_the_peer_reads_it_after_the_apply() {
    let mut p = Pair::new(policy(AckPolicy::SyncReceived));
    p.write(0, 1, 3, 0xAB);
    assert!(p.acked.is_empty(), "nothing acks before the peer has it");
    let frame = p.wire[1].front().expect("the write is on the wire").clone();
    assert_eq!(frame.header.kind, Kind::Write);
    // Received at B, not applied yet: the origin's ack goes out, B's store is unchanged.
    p.pump(false);
    assert_eq!(p.acked, vec![1]);
    assert_eq!(p.r[1].counters().writes_received_early, 1);
    let mut buf = vec![0u8; BLOCK_BYTES];
    p.s[1].read(3, &mut buf);
    assert_eq!(buf[0], 0, "not applied yet");
    assert!(
        p.s[0].is_dirty(3),
        "dirty at the origin until the peer applied it"
    );
    // A read at B that starts now must see the write: it waits for the apply.
    p.read(1, 10, 3);
    assert!(
        p.read_byte(10).is_none(),
        "the read waits for the received write"
    );
    p.step(1, Event::ApplyReceived);
    assert_eq!(p.read_byte(10), Some(0xAB));
    p.pump(true);
    assert!(
        !p.s[0].is_dirty(3) && !p.s[1].is_dirty(3),
        "both clean once applied"
    );
    assert_eq!(p.acked, vec![1], "acknowledged exactly once");
}

// The receipt ack is marked as such on the wire, so a sync origin never takes it as an
// apply; and a FUA write under sync-received waits for the durable apply.
#[test]
fn sync_received_fua_write_is_acked_only_after_the_apply() {
    let mut p = Pair::new(policy(AckPolicy::SyncReceived));
    p.step(
        0,
        Event::ClientWrite {
            id: 1,
            lba: 2,
            data: vec![1; BLOCK_BYTES],
            fua: true,
        },
    );
    p.pump(false);
    assert_eq!(p.acked, vec![1]);
    assert_eq!(p.r[1].counters().writes_received_early, 0);
    let mut buf = vec![0u8; BLOCK_BYTES];
    p.s[1].read(2, &mut buf);
    assert_eq!(buf[0], 1, "a FUA write is applied before its ack");
}

// A crash of the receiver between receipt and apply: the origin still holds the write
// pending (dirty), resends it after the restart, and the receiver ends with it.
#[test]
fn sync_received_write_lost_by_the_receivers_crash_is_resent() {
    let mut p = Pair::new(policy(AckPolicy::SyncReceived));
    p.write(0, 1, 5, 0x5A);
    p.pump(false);
    assert_eq!(p.acked, vec![1]);
    // B crashes before applying: the queue is gone, the dirty mark is persistent.
    p.step(0, Event::LinkDown);
    assert!(
        p.s[1].is_dirty(5),
        "the receipt put the block in B's activity log"
    );
    let map = p.r[1].map();
    let mut cfg = Config::new(1, 7, 1, 1);
    cfg.heartbeat_interval_us = HB_US;
    cfg.policy = policy(AckPolicy::SyncReceived);
    p.s[1].crash(Loss::All);
    p.r[1] = Replica::start(cfg, p.now_us, map, &mut p.s[1]);
    p.wire = [VecDeque::new(), VecDeque::new()];
    p.step(0, Event::LinkUp);
    p.step(1, Event::LinkUp);
    p.run_us(200_000);
    let mut buf = vec![0u8; BLOCK_BYTES];
    p.s[1].read(5, &mut buf);
    assert_eq!(
        buf[0], 0x5A,
        "B holds the acknowledged write after its restart"
    );
    assert!(!p.s[0].is_dirty(5) && !p.s[1].is_dirty(5));
}

fn async_pair() -> Pair {
    let mut p = Pair::new(policy(AckPolicy::Async));
    p.run_us(50_000);
    assert_eq!(p.r[0].mode(), Some(Mode::Async { active: 0 }));
    assert_eq!(p.r[1].mode(), Some(Mode::Async { active: 0 }));
    p
}

// §5 async: one writer acks at once; the passive site refuses I/O; FLUSH is local.
#[test]
fn async_writer_acks_at_once_and_the_passive_site_refuses_io() {
    let mut p = async_pair();
    p.write(0, 1, 1, 0x11);
    assert_eq!(p.acked, vec![1], "acked before the peer has it");
    p.write(1, 2, 2, 0x22);
    assert!(p.is_failed(2), "the passive site refuses writes");
    p.read(1, 3, 1);
    assert!(p.is_failed(3), "and reads: its copy lags by design");
    p.step(0, Event::ClientFlush { id: 4 });
    assert_eq!(p.flushed, vec![4], "FLUSH is local only under async");
    assert!(p.r[1].counters().requests_refused_passive >= 2);
    // Shipped behind the ack, and released from the lag once durable at the peer.
    assert!(p.r[0].async_lag(p.now_us).0 > 0);
    p.run_us(100_000);
    let mut buf = vec![0u8; BLOCK_BYTES];
    p.s[1].read(1, &mut buf);
    assert_eq!(buf[0], 0x11);
    assert_eq!(p.r[0].async_lag(p.now_us), (0, 0));
    assert!(!p.s[0].is_dirty(1));
}

// §5 async: "lag bounded by max_lag (bytes and time) ... beyond which writes wait".
#[test]
fn async_lag_bound_holds_writes_until_the_peer_is_durable() {
    let mut p = Pair::new(Policy {
        ack: AckPolicy::Async,
        lag_bytes_max: 3 * (BLOCK_BYTES as u64 + 128),
        ..Policy::default()
    });
    p.run_us(50_000);
    for id in 1..=5 {
        p.write(0, id, id, id as u8);
    }
    assert_eq!(
        p.acked,
        vec![1, 2, 3],
        "three writes fill the lag; the rest wait"
    );
    let (lag_bytes, _) = p.r[0].async_lag(p.now_us);
    assert!(lag_bytes <= 3 * (BLOCK_BYTES as u64 + 128));
    p.run_us(100_000);
    assert_eq!(
        p.acked,
        vec![1, 2, 3, 4, 5],
        "the durable acks let the rest through"
    );
}

// The time bound: with the link stalled, the oldest write ages past lag_us_max and new
// writes wait instead of being acknowledged.
#[test]
fn async_lag_time_bound_holds_writes_while_the_link_is_stalled() {
    let mut p = Pair::new(Policy {
        ack: AckPolicy::Async,
        lag_us_max: 100_000,
        ..Policy::default()
    });
    p.run_us(50_000);
    p.write(0, 1, 1, 1);
    assert_eq!(p.acked, vec![1]);
    // Nothing reaches the peer any more.
    p.step(0, Event::LinkDown);
    p.step(1, Event::LinkDown);
    p.now_us += 150_000;
    p.step(0, Event::Tick);
    p.write(0, 2, 2, 2);
    assert_eq!(p.acked, vec![1], "the lag is too old: the write waits");
    p.wire = [VecDeque::new(), VecDeque::new()];
    p.step(0, Event::LinkUp);
    p.step(1, Event::LinkUp);
    p.run_us(100_000);
    assert_eq!(p.acked, vec![1, 2]);
}

// The switch into async needs the peer's agreement: it refuses while it has a write of
// its own in flight, and the leader tries again.
#[test]
fn switch_into_async_waits_until_the_peer_stops_writing() {
    let mut p = Pair::new(policy(AckPolicy::Sync));
    p.run_us(20_000);
    // B has a write in flight (not delivered) when the policy becomes async.
    p.write(1, 1, 4, 4);
    let held = p.wire[0].pop_front().expect("B's write");
    p.step(0, Event::SetPolicy(policy(AckPolicy::Async)));
    p.step(1, Event::SetPolicy(policy(AckPolicy::Async)));
    p.pump(true);
    assert_eq!(p.r[0].counters().mode_switches_refused, 1);
    assert_eq!(p.r[0].mode(), Some(Mode::Sync));
    // The write completes; the retry succeeds.
    p.wire[0].push_back(held);
    p.run_us(400_000);
    assert_eq!(p.acked, vec![1]);
    assert_eq!(p.r[0].mode(), Some(Mode::Async { active: 0 }));
    assert_eq!(p.r[1].mode(), Some(Mode::Async { active: 0 }));
    assert_eq!(p.r[0].counters().mode_switches, 1);
    assert_eq!(p.r[1].counters().mode_switches, 1);
}

// `stretch volume handoff`: the writer drains its lag, then hands the writer role over
// in-band; the old writer refuses I/O from then on, and the new one has every write.
#[test]
fn handoff_drains_the_lag_then_moves_the_writer() {
    let mut p = async_pair();
    p.write(0, 1, 6, 0x66);
    let b_active = Policy {
        ack: AckPolicy::Async,
        active_site: 1,
        ..Policy::default()
    };
    p.step(0, Event::SetPolicy(b_active));
    p.step(1, Event::SetPolicy(b_active));
    // Draining: A takes no new write until its lag is durable at B.
    p.write(0, 2, 7, 0x77);
    assert_eq!(p.acked, vec![1]);
    p.run_us(100_000);
    assert_eq!(p.r[0].mode(), Some(Mode::Async { active: 1 }));
    assert_eq!(p.r[1].mode(), Some(Mode::Async { active: 1 }));
    assert!(
        p.is_failed(2),
        "the write held during the drain fails: A is passive now"
    );
    p.read(1, 3, 6);
    assert_eq!(
        p.read_byte(3),
        Some(0x66),
        "B has every write A acknowledged"
    );
    p.write(1, 4, 8, 0x88);
    assert!(p.acked.contains(&4));
}

// §5 adaptive: async only on a fresh RTT above the limit with one site writing; back to
// sync under the limit; a link without samples never goes async.
#[test]
fn adaptive_switches_on_measured_rtt_and_back() {
    let mut p = Pair::new(Policy {
        ack: AckPolicy::Adaptive,
        sync_rtt_max_us: 1_000,
        single_writer_quiet_us: 50_000,
        ..Policy::default()
    });
    p.run_us(100_000);
    assert_eq!(
        p.r[0].mode(),
        Some(Mode::Sync),
        "loopback RTT is under the limit"
    );
    // Heartbeat echoes now take 5 ms: hold them and deliver late.
    let slow = |p: &mut Pair, us: u64| {
        let end = p.now_us + us;
        while p.now_us < end {
            p.step(0, Event::Tick);
            p.step(1, Event::Tick);
            p.now_us += 5_000;
            p.pump(true);
        }
    };
    slow(&mut p, 300_000);
    assert_eq!(p.r[0].mode(), Some(Mode::Async { active: 0 }));
    assert_eq!(p.r[1].mode(), Some(Mode::Async { active: 0 }));
    // Fast again: back to sync, after the dwell that keeps adaptive from flapping.
    p.run_us(400_000);
    assert_eq!(p.r[0].mode(), Some(Mode::Async { active: 0 }), "dwelling");
    p.run_us(1_000_000);
    assert_eq!(p.r[0].mode(), Some(Mode::Sync));
    assert_eq!(p.r[1].mode(), Some(Mode::Sync));
    assert_eq!(p.r[0].counters().mode_switches, 2);
}

// A link that fails never turns adaptive into async: no samples, no switch.
#[test]
fn adaptive_never_goes_async_on_a_failing_link() {
    let mut p = Pair::new(Policy {
        ack: AckPolicy::Adaptive,
        sync_rtt_max_us: 1_000,
        single_writer_quiet_us: 0,
        ..Policy::default()
    });
    p.run_us(50_000);
    p.step(0, Event::LinkDown);
    p.step(1, Event::LinkDown);
    for _ in 0..100 {
        p.now_us += 10_000;
        p.step(0, Event::Tick);
    }
    assert_eq!(p.r[0].mode(), Some(Mode::Sync));
    assert!(p.wire[1].iter().all(|f| f.header.kind != Kind::ModeSwitch));
}

// Under adaptive the peer agrees to async only if it wrote nothing for the quiet period.
#[test]
fn adaptive_stays_sync_while_both_sites_write() {
    let mut p = Pair::new(Policy {
        ack: AckPolicy::Adaptive,
        sync_rtt_max_us: 1_000,
        single_writer_quiet_us: 1_000_000,
        ..Policy::default()
    });
    let mut id = 100;
    let end = p.now_us + 300_000;
    while p.now_us < end {
        id += 1;
        p.write(1, id, 9, 1);
        p.step(0, Event::Tick);
        p.step(1, Event::Tick);
        p.now_us += 5_000;
        p.pump(true);
    }
    assert_eq!(p.r[0].mode(), Some(Mode::Sync));
}

// A restarted site that does not lead an adaptive policy serves nothing until the leader
// tells it the mode: it might be the passive site of async.
#[test]
fn follower_of_adaptive_holds_requests_until_it_hears_the_mode() {
    let adaptive = Policy {
        ack: AckPolicy::Adaptive,
        ..Policy::default()
    };
    let mut p = Pair::new(adaptive);
    p.write(0, 1, 0, 0x42);
    p.run_us(50_000);
    assert_eq!(p.acked, vec![1]);
    let map = p.r[1].map();
    let mut cfg = Config::new(1, 7, 1, 1);
    cfg.heartbeat_interval_us = HB_US;
    cfg.policy = adaptive;
    p.r[1] = Replica::start(cfg, p.now_us, map, &mut p.s[1]);
    assert_eq!(p.r[1].mode(), None);
    p.read(1, 2, 0);
    assert!(
        p.read_byte(2).is_none() && !p.is_failed(2),
        "held, not served"
    );
    // The reconnect: the leader announces its mode and the held read is served.
    p.step(0, Event::LinkDown);
    p.wire = [VecDeque::new(), VecDeque::new()];
    p.step(0, Event::LinkUp);
    p.step(1, Event::LinkUp);
    p.pump(true);
    assert_eq!(p.r[1].mode(), Some(Mode::Sync));
    assert_eq!(p.read_byte(2), Some(0x42));
}
