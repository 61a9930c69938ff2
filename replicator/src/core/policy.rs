//! Ack policies (DESIGN.md §5): what a volume's writes wait for before they are
//! acknowledged, and the mode in force.
//!
//! The *policy* is configuration, committed in the cluster map and handed to both sites by
//! [`super::Event::SetPolicy`]. The *mode* is what the sites currently do. Sites move between
//! modes only through an in-band switch on the replication link: the site that leads
//! switches (the policy's `active_site`, or the current async writer while it hands over)
//! sends a `ModeSwitch` frame at one seq of its stream and the peer answers it, so both
//! sites agree on the point where the mode changes. Each write frame also carries its
//! origin's mode (`FLAG_ACK_ON_RECEIVE`), so a receiver never has to guess how to ack it.
//!
//! Switching into `async` makes the peer the passive site, which refuses client I/O (its
//! copy lags by design); the peer agrees only when it has no write of its own in flight,
//! and under `adaptive` only when it wrote nothing for a quiet period (one site alone is
//! writing). Switching out of `async` first drains the lag: new writes wait until every
//! async write is durable at the peer. A failing link never leads to `async`: the switch
//! needs the peer's answer, and `adaptive` decides on fresh RTT samples only.

use crate::stamp::SiteId;

/// A volume's ack policy, as committed in the cluster map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AckPolicy {
    /// Acknowledged once applied (visible) at both sites.
    Sync,
    /// Acknowledged once applied here and received by the peer, where reads see it.
    SyncReceived,
    /// Acknowledged once applied here; shipped in order with a bounded lag; one writer.
    Async,
    /// `sync` while the smoothed RTT stays under `sync_rtt_max_us`; `async` above it, only
    /// while one site alone writes.
    Adaptive,
}

impl AckPolicy {
    pub fn name(self) -> &'static str {
        match self {
            AckPolicy::Sync => "sync",
            AckPolicy::SyncReceived => "sync-received",
            AckPolicy::Async => "async",
            AckPolicy::Adaptive => "adaptive",
        }
    }

    pub fn parse(s: &str) -> Option<AckPolicy> {
        [
            AckPolicy::Sync,
            AckPolicy::SyncReceived,
            AckPolicy::Async,
            AckPolicy::Adaptive,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }
}

/// `adaptive`: after a switch, the next one waits at least this long (a burst of RTT
/// samples must not flap the mode).
pub(crate) const ADAPTIVE_DWELL_US: u64 = 1_000_000;

/// A volume's policy with its bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub ack: AckPolicy,
    /// The one writer under `async`, and the site that leads mode switches.
    pub active_site: SiteId,
    /// `async`: bytes of writes not yet durable at the peer beyond which new writes wait.
    pub lag_bytes_max: u64,
    /// `async`: age of the oldest write not yet durable at the peer beyond which new
    /// writes wait.
    pub lag_us_max: u64,
    /// `adaptive`: the smoothed RTT above which the mode may become `async`.
    pub sync_rtt_max_us: u64,
    /// `adaptive`: the passive site must have written nothing for this long before it
    /// agrees to `async` (one site alone is writing).
    pub single_writer_quiet_us: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            ack: AckPolicy::Sync,
            active_site: 0,
            lag_bytes_max: 64 * 1024 * 1024,
            lag_us_max: 2_000_000,
            sync_rtt_max_us: 5_000,
            single_writer_quiet_us: 2_000_000,
        }
    }
}

/// The mode in force at both sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Sync,
    SyncReceived,
    /// Only `active` serves client I/O; the other site refuses it.
    Async {
        active: SiteId,
    },
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::SyncReceived => "sync-received",
            Mode::Async { .. } => "async",
        }
    }

    /// Wire encoding in a `ModeSwitch` frame's `lba` field.
    pub(crate) fn encode(self) -> u64 {
        match self {
            Mode::Sync => 1,
            Mode::SyncReceived => 2,
            Mode::Async { active } => 3 | (u64::from(active) << 8),
        }
    }

    pub(crate) fn decode(wire: u64) -> Option<Mode> {
        match (wire & 0xff, wire >> 8) {
            (1, 0) => Some(Mode::Sync),
            (2, 0) => Some(Mode::SyncReceived),
            (3, site @ 0..=1) => Some(Mode::Async {
                active: site as SiteId,
            }),
            _ => None,
        }
    }
}

/// The mode the leader wants now. `rtt_us` is a fresh smoothed RTT (`None`: no recent
/// sample, which never leads to `async`), `peer_quiet` whether the peer wrote nothing for
/// the quiet period.
pub(crate) fn desired_mode(
    policy: &Policy,
    current: Mode,
    rtt_us: Option<u64>,
    peer_quiet: bool,
) -> Mode {
    let active = policy.active_site;
    match policy.ack {
        AckPolicy::Sync => Mode::Sync,
        AckPolicy::SyncReceived => Mode::SyncReceived,
        AckPolicy::Async => Mode::Async { active },
        AckPolicy::Adaptive => match (current, rtt_us) {
            // Back to sync once under the limit (the drain happens before the switch), with
            // a 10% band so an RTT hovering at the limit does not flap between the modes.
            (Mode::Async { .. }, Some(rtt)) if rtt <= policy.sync_rtt_max_us / 10 * 9 => Mode::Sync,
            // Without a fresh sample the link may be failing: stay where we are, and never
            // enter async.
            (Mode::Async { .. }, _) => Mode::Async { active },
            (_, Some(rtt)) if rtt > policy.sync_rtt_max_us && peer_quiet => Mode::Async { active },
            _ => Mode::Sync,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_wire_encoding_round_trips_and_rejects_garbage() {
        for m in [
            Mode::Sync,
            Mode::SyncReceived,
            Mode::Async { active: 0 },
            Mode::Async { active: 1 },
        ] {
            assert_eq!(Mode::decode(m.encode()), Some(m));
        }
        for garbage in [0, 4, 1 | (1 << 8), 3 | (2 << 8), u64::MAX] {
            assert_eq!(Mode::decode(garbage), None, "{garbage:#x}");
        }
    }

    #[test]
    fn policy_names_parse_back() {
        for p in [
            AckPolicy::Sync,
            AckPolicy::SyncReceived,
            AckPolicy::Async,
            AckPolicy::Adaptive,
        ] {
            assert_eq!(AckPolicy::parse(p.name()), Some(p));
        }
        assert_eq!(AckPolicy::parse("fast"), None);
    }

    #[test]
    fn adaptive_goes_async_only_on_fresh_high_rtt_with_a_quiet_peer() {
        let p = Policy {
            ack: AckPolicy::Adaptive,
            ..Policy::default()
        };
        let high = Some(p.sync_rtt_max_us + 1);
        let low = Some(p.sync_rtt_max_us / 10 * 9);
        let at_limit = Some(p.sync_rtt_max_us);
        let async0 = Mode::Async { active: 0 };
        assert_eq!(desired_mode(&p, Mode::Sync, high, true), async0);
        // The peer writes too: both sites write, so sync.
        assert_eq!(desired_mode(&p, Mode::Sync, high, false), Mode::Sync);
        // No fresh sample (a stalled or failing link): never async.
        assert_eq!(desired_mode(&p, Mode::Sync, None, true), Mode::Sync);
        assert_eq!(desired_mode(&p, Mode::Sync, low, true), Mode::Sync);
        // In async: back to sync under the limit; stay without a sample.
        assert_eq!(desired_mode(&p, async0, low, true), Mode::Sync);
        // Inside the band: no flapping either way.
        assert_eq!(desired_mode(&p, Mode::Sync, at_limit, true), Mode::Sync);
        assert_eq!(desired_mode(&p, async0, at_limit, true), async0);
        assert_eq!(desired_mode(&p, async0, None, true), async0);
        assert_eq!(desired_mode(&p, async0, high, false), async0);
    }
}
