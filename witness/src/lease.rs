//! Serve leases (DESIGN §6), sans-IO: time is passed in as microseconds of the site's own
//! `CLOCK_BOOTTIME` (monotonic, counts suspend), never read here.
//!
//! A site may serve a CG while both sites are in sync only while it holds a lease on that CG
//! from its peer. The rules, and why each one is there:
//! - A lease starts at the holder's *send* time of the request whose reply grants it, not at
//!   the reply's arrival: the granter's grant happened after that send, so the lease ends no
//!   later (in real time, up to clock rate) than `L` after the grant. Counting from arrival
//!   would stretch it by the reply's network delay, which is unbounded.
//! - Only replies to the holder's own requests renew it: a write the peer acked, a heartbeat
//!   echoed by sequence number, a ReadIndex showing the holder in sync. The holder looks the
//!   send time up in its own records; nothing the peer sends unasked can extend a lease.
//! - The granter stops granting before it proposes a detach, and records its last grant.
//! - The holder re-checks `now + δ < expiry` before each reply, so a pause of up to δ between
//!   the check and the reply leaving cannot carry a reply past expiry.
//! - The survivor of a detach acknowledges nothing alone until `L·(1+ρ) + δ` after the later
//!   of its last grant and the detach commit: by then every lease the loser holds has lapsed
//!   even if the loser's clock runs slower than the survivor's by the full bound ρ.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Heartbeats a holder remembers waiting for their echo. Older ones are forgotten (their echo
/// then renews nothing); with one heartbeat per interval this covers 64 intervals of delay.
pub const HEARTBEATS_IN_FLIGHT_MAX: usize = 64;

/// Lease timing, the same at both sites (it comes from the cluster configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseConfig {
    /// `L`: how long a grant lets the holder serve, on the holder's clock.
    pub lease_us: u64,
    /// `ρ`: bound on the rate of one site's clock relative to another's, in parts per million:
    /// over any real interval, `elapsed_x <= elapsed_y * (1 + ρ)` for any two sites x, y.
    pub rho_ppm: u64,
    /// `δ`: the longest pause allowed between the holder's expiry check and its reply leaving.
    pub delta_us: u64,
}

impl LeaseConfig {
    /// `L·(1+ρ) + δ`, rounded up, saturating: how long the survivor waits (DESIGN §6).
    pub fn survivor_wait_us(&self) -> u64 {
        let stretched = u128::from(self.lease_us) * (1_000_000 + u128::from(self.rho_ppm));
        let stretched_us = stretched.div_ceil(1_000_000);
        u64::try_from(stretched_us)
            .unwrap_or(u64::MAX)
            .saturating_add(self.delta_us)
    }
}

/// The holder's side of one CG's lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lease {
    expiry_us: Option<u64>,
}

impl Lease {
    /// Renews from a reply to a request this site sent at `request_sent_us` (its own record).
    /// A lease only ever moves forward: an old reply arriving late cannot shorten it.
    pub fn renew(&mut self, request_sent_us: u64, cfg: &LeaseConfig) {
        let expiry = request_sent_us.saturating_add(cfg.lease_us);
        self.expiry_us = Some(self.expiry_us.map_or(expiry, |e| e.max(expiry)));
    }

    /// Whether a reply may go out now: `now + δ < expiry`.
    pub fn may_reply(&self, now_us: u64, cfg: &LeaseConfig) -> bool {
        self.expiry_us
            .is_some_and(|e| now_us.saturating_add(cfg.delta_us) < e)
    }

    pub fn expiry_us(&self) -> Option<u64> {
        self.expiry_us
    }

    /// Drops the lease: on learning the site was detached, or its epoch moved on.
    pub fn revoke(&mut self) {
        self.expiry_us = None;
    }
}

/// The granter's side of one CG's lease: whether it grants, and when it last did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    stopped: bool,
    last_grant_us: Option<u64>,
}

impl Grants {
    /// Called when about to reply to a peer request that would renew the peer's lease (ack a
    /// write, echo a heartbeat). Returns whether the reply may grant; if so, records it.
    pub fn try_grant(&mut self, now_us: u64) -> bool {
        if self.stopped {
            return false;
        }
        self.last_grant_us = Some(self.last_grant_us.map_or(now_us, |t| t.max(now_us)));
        true
    }

    /// Stops granting. Called before proposing a detach of the peer.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// Resumes granting. Safe at any time before learning a detach committed, because the
    /// survivor's wait counts from the later of its last grant and the commit.
    pub fn resume(&mut self) {
        self.stopped = false;
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    pub fn last_grant_us(&self) -> Option<u64> {
        self.last_grant_us
    }
}

/// When the survivor may acknowledge writes alone: `L·(1+ρ) + δ` after the later of its last
/// grant and the local time it learned the detach committed (which is after the commit).
pub fn alone_ok_at_us(
    last_grant_us: Option<u64>,
    detach_learned_us: u64,
    cfg: &LeaseConfig,
) -> u64 {
    let from_us = last_grant_us.map_or(detach_learned_us, |g| g.max(detach_learned_us));
    from_us.saturating_add(cfg.survivor_wait_us())
}

/// Outstanding heartbeats of one holder, matched to echoes by sequence number.
#[derive(Debug, Clone, Default)]
pub struct Heartbeats {
    next_seq: u64,
    /// `(seq, sent_us)`, oldest first, at most `HEARTBEATS_IN_FLIGHT_MAX`.
    in_flight: VecDeque<(u64, u64)>,
}

impl Heartbeats {
    /// A tracker whose first sequence number is `first_seq`. Callers start each process
    /// incarnation in its own range, so an echo of a heartbeat sent before a restart can never
    /// match one sent after it (and lend the new, later send time to an old grant).
    pub fn starting_at(first_seq: u64) -> Heartbeats {
        Heartbeats {
            next_seq: first_seq,
            in_flight: VecDeque::new(),
        }
    }

    /// Records a heartbeat sent now and returns its sequence number.
    pub fn send(&mut self, now_us: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        if self.in_flight.len() == HEARTBEATS_IN_FLIGHT_MAX {
            self.in_flight.pop_front();
        }
        self.in_flight.push_back((seq, now_us));
        seq
    }

    /// The send time of heartbeat `seq` if this site sent it and has not matched it yet. An
    /// echo of a sequence number never sent (or forgotten) yields nothing.
    pub fn echoed(&mut self, seq: u64) -> Option<u64> {
        let pos = self.in_flight.iter().position(|(s, _)| *s == seq)?;
        let (_, sent_us) = self.in_flight[pos];
        // Echoes of older heartbeats are worth less than this one; drop them with it.
        self.in_flight.drain(..=pos);
        Some(sent_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: LeaseConfig = LeaseConfig {
        lease_us: 1_000_000,
        rho_ppm: 1_000,
        delta_us: 10_000,
    };

    // Reference: DESIGN §6, "lasts L" from the request's send time; "now + δ < expiry".
    #[test]
    fn lease_counts_from_send_time_and_keeps_delta_margin() {
        let mut lease = Lease::default();
        assert!(!lease.may_reply(0, &CFG));
        lease.renew(100, &CFG);
        assert_eq!(lease.expiry_us(), Some(1_000_100));
        assert!(lease.may_reply(990_099, &CFG));
        assert!(!lease.may_reply(990_100, &CFG));
        // A late reply to an older request does not shorten the lease.
        lease.renew(50, &CFG);
        assert_eq!(lease.expiry_us(), Some(1_000_100));
        lease.revoke();
        assert!(!lease.may_reply(0, &CFG));
    }

    // Reference: DESIGN §6, "L·(1+ρ) + δ after the later of its last grant and the commit".
    #[test]
    fn survivor_waits_from_the_later_of_grant_and_commit() {
        assert_eq!(CFG.survivor_wait_us(), 1_000_000 + 1_000 + 10_000);
        assert_eq!(alone_ok_at_us(Some(5_000), 2_000, &CFG), 5_000 + 1_011_000);
        assert_eq!(alone_ok_at_us(Some(1_000), 2_000, &CFG), 2_000 + 1_011_000);
        assert_eq!(alone_ok_at_us(None, 2_000, &CFG), 2_000 + 1_011_000);
        let huge = LeaseConfig {
            lease_us: u64::MAX,
            rho_ppm: 1,
            delta_us: 1,
        };
        assert_eq!(huge.survivor_wait_us(), u64::MAX);
    }

    // Reference: DESIGN §6, "a site stops granting renewals before it proposes a detach".
    #[test]
    fn stopped_granter_grants_nothing_and_keeps_its_last_grant() {
        let mut g = Grants::default();
        assert!(g.try_grant(10));
        g.stop();
        assert!(!g.try_grant(20));
        assert_eq!(g.last_grant_us(), Some(10));
        g.resume();
        assert!(g.try_grant(30));
        assert_eq!(g.last_grant_us(), Some(30));
    }

    // Reference: DESIGN §6, "a heartbeat the peer echoes by sequence number".
    #[test]
    fn only_echoes_of_own_heartbeats_give_a_send_time() {
        let mut hb = Heartbeats::default();
        let s0 = hb.send(100);
        let s1 = hb.send(200);
        assert_eq!(hb.echoed(12345), None);
        assert_eq!(hb.echoed(s1), Some(200));
        // s0 was older than the matched s1 and is gone; a duplicate echo renews nothing.
        assert_eq!(hb.echoed(s0), None);
        assert_eq!(hb.echoed(s1), None);
        for i in 0..(HEARTBEATS_IN_FLIGHT_MAX as u64 + 10) {
            hb.send(1_000 + i);
        }
        assert_eq!(hb.in_flight.len(), HEARTBEATS_IN_FLIGHT_MAX);
    }
}
