//! Stamps and the hybrid logical clock that issues them (DESIGN.md §4 "Stamps", "HLC").
//!
//! A stamp is `(accept_epoch, hlc, origin_site)`, compared in that order. It is encoded
//! big-endian into the engine's opaque 16-byte [`Stamp`] so that the engine's byte-wise
//! comparison is exactly the tuple comparison:
//!
//! ```text
//! bytes 0..4   accept_epoch  u32 BE
//! bytes 4..12  hlc           u64 BE (microseconds, hybrid: never behind physical time)
//! byte  12     origin_site   u8
//! bytes 13..16 zero
//! ```
//!
//! The epoch is 32 bits so the whole tuple fits the engine's 16 bytes with the HLC kept at
//! full 64-bit width. The `force-survivor` generation (§6) is to be folded into the epoch's
//! high bits when it lands.

use stretch_engine::Stamp;

/// Identifies one of the two sites of a stretched volume.
pub type SiteId = u8;

/// The decoded parts of a [`Stamp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StampParts {
    pub accept_epoch: u32,
    pub hlc: u64,
    pub origin_site: SiteId,
}

impl StampParts {
    pub fn encode(self) -> Stamp {
        let mut b = [0u8; Stamp::LEN];
        b[0..4].copy_from_slice(&self.accept_epoch.to_be_bytes());
        b[4..12].copy_from_slice(&self.hlc.to_be_bytes());
        b[12] = self.origin_site;
        Stamp(b)
    }

    /// Decodes any 16 bytes; the three trailing bytes are ignored (zero in every stamp this
    /// crate writes), so decoding never fails on input from the wire or the disk.
    pub fn decode(stamp: Stamp) -> StampParts {
        let b = stamp.0;
        let mut hlc = [0u8; 8];
        hlc.copy_from_slice(&b[4..12]);
        StampParts {
            accept_epoch: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            hlc: u64::from_be_bytes(hlc),
            origin_site: b[12],
        }
    }
}

/// How far ahead of the clock the persisted high-water mark is written. Persisting ahead
/// means one metadata write per `HLC_PERSIST_AHEAD_US` of clock progress instead of one per
/// stamp, and a restart still starts above every stamp issued before the crash. A minute,
/// not a second: each persist is an fdatasync on the replica thread, which stalls every
/// replicated write behind it (95-128 ms on the reference VM's disk, once a second, was
/// the whole p99.9 of replicated writes, docs/benchmarks.md). The cost is that a restarted
/// site's HLC starts up to a minute ahead of the wall clock, which orders nothing wrongly:
/// stamps only need to grow.
pub const HLC_PERSIST_AHEAD_US: u64 = 60_000_000;

/// A hybrid logical clock in microseconds. Time is always passed in (`now_us`); the clock
/// never reads the system, so the simulator can skew and replay it.
#[derive(Clone, Debug)]
pub struct Hlc {
    /// The last value issued or observed; every issued value is strictly greater.
    last: u64,
    /// The high-water mark known to be persisted; issuing past it requires a new persist.
    persisted_high_water: u64,
}

impl Hlc {
    /// DESIGN.md §4: at start, `hlc = max(physical time, persisted high-water, largest stamp
    /// on disk)`. Any of the three alone can be behind: the clock can step back, the
    /// high-water may be missing on a fresh volume, and stamps received from a peer whose
    /// clock runs ahead can exceed both.
    pub fn start(now_us: u64, persisted_high_water: u64, largest_stamp_on_disk: Stamp) -> Hlc {
        let on_disk = StampParts::decode(largest_stamp_on_disk).hlc;
        Hlc {
            last: now_us.max(persisted_high_water).max(on_disk),
            persisted_high_water,
        }
    }

    /// The latest value issued or observed.
    pub fn current(&self) -> u64 {
        self.last
    }

    /// Every stamp seen (local, received, resync) advances the clock past it.
    pub fn observe(&mut self, stamp: Stamp) {
        self.last = self.last.max(StampParts::decode(stamp).hlc);
    }

    /// Advances the clock to at least `value` (a sequence number this site is about to use):
    /// so the persisted high-water mark also bounds every seq issued, and a restarted site's
    /// seqs, which start at its clock, never repeat one of its earlier life.
    pub fn advance_to(&mut self, value: u64) {
        self.last = self.last.max(value);
    }

    /// A value greater than the clock, than `now_us`, and than the HLC of every stamp in
    /// `covered` that is in `epoch` (stamps of older epochs are already smaller, and a
    /// newer epoch cannot be on disk while this site writes in `epoch`: the caller checks).
    /// So a local write's stamp exceeds the current stamp of every block it covers.
    pub fn next_for(&mut self, now_us: u64, epoch: u32, covered: &[Stamp]) -> u64 {
        let mut floor = self.last.max(now_us.saturating_sub(1));
        for stamp in covered {
            let parts = StampParts::decode(*stamp);
            if parts.accept_epoch == epoch {
                floor = floor.max(parts.hlc);
            }
        }
        // Saturation at u64::MAX would take ~580,000 years of microseconds; it is still
        // handled so that a corrupt stamp from disk cannot panic the daemon.
        self.last = floor.saturating_add(1);
        self.last
    }

    /// If the clock has passed the persisted high-water mark, the new mark to persist
    /// (before any stamp above the old mark leaves this site). `None` when nothing to do.
    pub fn high_water_to_persist(&mut self) -> Option<u64> {
        if self.last < self.persisted_high_water {
            return None;
        }
        self.persisted_high_water = self.last.saturating_add(HLC_PERSIST_AHEAD_US);
        Some(self.persisted_high_water)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_parts() -> impl Strategy<Value = StampParts> {
        (any::<u32>(), any::<u64>(), any::<u8>()).prop_map(|(accept_epoch, hlc, origin_site)| {
            StampParts {
                accept_epoch,
                hlc,
                origin_site,
            }
        })
    }

    proptest! {
        // DESIGN.md §4 "Stamps": compared as (accept_epoch, hlc, origin_site), and the engine
        // compares bytes; the encoding must make the two orders one.
        #[test]
        fn encoded_order_is_tuple_order(a in arb_parts(), b in arb_parts()) {
            prop_assert_eq!(a.encode().cmp(&b.encode()), a.cmp(&b));
        }

        #[test]
        fn encode_decode_round_trip(a in arb_parts()) {
            prop_assert_eq!(StampParts::decode(a.encode()), a);
        }

        // DESIGN.md §4 "HLC": a local write's stamp exceeds the current stamp of every block
        // it covers, whatever those stamps and the local clock say.
        #[test]
        fn next_for_exceeds_every_covered_block(
            start in 0u64..1_000_000, now in 0u64..2_000_000, epoch in 1u32..4,
            covered in proptest::collection::vec(arb_parts(), 0..6), origin in 0u8..2,
        ) {
            let mut hlc = Hlc::start(start, 0, Stamp::ZERO);
            let covered: Vec<StampParts> = covered
                .into_iter()
                .map(|mut p| { p.accept_epoch %= epoch + 1; p.hlc %= 1 << 40; p })
                .collect();
            let stamps: Vec<Stamp> = covered.iter().map(|p| p.encode()).collect();
            let value = hlc.next_for(now, epoch, &stamps);
            let mine = StampParts { accept_epoch: epoch, hlc: value, origin_site: origin };
            for p in &covered {
                prop_assert!(mine > *p, "{mine:?} not above {p:?}");
            }
            prop_assert!(value >= now);
        }
    }

    #[test]
    fn start_takes_the_largest_of_clock_high_water_and_disk() {
        let disk = StampParts {
            accept_epoch: 1,
            hlc: 900,
            origin_site: 1,
        }
        .encode();
        assert_eq!(Hlc::start(100, 500, disk).current(), 900);
        assert_eq!(Hlc::start(1000, 500, disk).current(), 1000);
        assert_eq!(Hlc::start(100, 5000, disk).current(), 5000);
    }

    #[test]
    fn issued_values_strictly_increase_even_when_the_clock_steps_back() {
        let mut hlc = Hlc::start(1_000, 0, Stamp::ZERO);
        let a = hlc.next_for(1_000, 1, &[]);
        let b = hlc.next_for(10, 1, &[]);
        let c = hlc.next_for(10, 1, &[]);
        assert!(a < b && b < c);
    }

    #[test]
    fn observed_stamps_advance_the_clock() {
        let mut hlc = Hlc::start(10, 0, Stamp::ZERO);
        hlc.observe(
            StampParts {
                accept_epoch: 1,
                hlc: 77_000,
                origin_site: 0,
            }
            .encode(),
        );
        assert!(hlc.next_for(10, 1, &[]) > 77_000);
    }

    #[test]
    fn high_water_is_persisted_ahead_and_only_when_passed() {
        let mut hlc = Hlc::start(10, 0, Stamp::ZERO);
        let mark = hlc
            .high_water_to_persist()
            .expect("fresh clock must persist");
        assert_eq!(mark, 10 + HLC_PERSIST_AHEAD_US);
        hlc.next_for(20, 1, &[]);
        assert_eq!(hlc.high_water_to_persist(), None);
        hlc.next_for(mark, 1, &[]);
        assert!(hlc.high_water_to_persist().is_some_and(|m| m > mark));
        // A restart from the persisted mark starts above everything issued before it.
        let restarted = Hlc::start(0, mark, Stamp::ZERO);
        assert!(restarted.current() >= mark);
    }
}
