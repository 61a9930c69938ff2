//! The arbitration simulation (DESIGN §6), checked against DESIGN §7 invariant 3.
//!
//! `STRETCH_WITNESS_SIM_SEEDS=N` runs N seeds instead of the default; a failure prints the seed
//! and the command that replays it (`STRETCH_WITNESS_SIM_SEED=S ... replay_one_seed`).

use std::time::Instant;

use stretch_witness::sim::{run, Broken, SimConfig, SimReport};

const DEFAULT_SEEDS: u64 = 10_000;

fn seeds_from_env(default: u64) -> u64 {
    match std::env::var("STRETCH_WITNESS_SIM_SEEDS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("STRETCH_WITNESS_SIM_SEEDS={v:?} is not a number")),
        Err(_) => default,
    }
}

/// A base for this run's seeds: fixed unless `STRETCH_WITNESS_SIM_BASE` is set, so CI is
/// reproducible and longer local runs can explore new seeds.
fn base_seed() -> u64 {
    std::env::var("STRETCH_WITNESS_SIM_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// Reference: DESIGN §7 invariant 3 (no split brain), §6 leases, detach and loser rules.
#[test]
fn no_split_brain_across_seeds() {
    let seeds = seeds_from_env(DEFAULT_SEEDS);
    let base = base_seed();
    let start = Instant::now();
    let mut total = SimReport::default();
    for seed in base..base + seeds {
        match run(&SimConfig::for_seed(seed)) {
            Ok(r) => {
                total.events += r.events;
                total.commits += r.commits;
                total.detaches += r.detaches;
                total.reads_served += r.reads_served;
                total.writes_acked += r.writes_acked;
                total.writes_acked_alone += r.writes_acked_alone;
                total.writes_failed += r.writes_failed;
                total.crashes += r.crashes;
                total.pauses += r.pauses;
                total.partitions += r.partitions;
            }
            Err(v) => panic!("{v}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{seeds} seeds in {secs:.1} s ({:.0} seeds/s): {total:?}",
        seeds as f64 / secs
    );
    // The faults must have happened for the run to mean anything.
    assert!(total.detaches > seeds / 4, "too few detaches: {total:?}");
    assert!(total.writes_acked_alone > 0 && total.reads_served > 0 && total.crashes > 0);
}

#[test]
fn replay_one_seed() {
    let Ok(seed) = std::env::var("STRETCH_WITNESS_SIM_SEED") else {
        return;
    };
    let seed: u64 = seed.parse().expect("STRETCH_WITNESS_SIM_SEED is a number");
    match run(&SimConfig::for_seed(seed)) {
        Ok(r) => eprintln!("seed {seed} passed: {r:?}"),
        Err(v) => panic!("{v}"),
    }
}

#[test]
fn same_seed_same_run() {
    for seed in 0..20 {
        assert_eq!(
            run(&SimConfig::for_seed(seed)),
            run(&SimConfig::for_seed(seed))
        );
    }
}

/// Runs a broken variant until the checker objects; returns how many seeds it took.
fn seeds_to_catch(broken: Broken, limit: u64) -> u64 {
    for seed in 0..limit {
        let cfg = SimConfig {
            broken: Some(broken),
            ..SimConfig::for_seed(seed)
        };
        if let Err(v) = run(&cfg) {
            assert!(
                v.what.contains("inv. 3"),
                "caught for the wrong reason: {v}"
            );
            return seed + 1;
        }
    }
    panic!("{broken:?} not caught within {limit} seeds: the checker is blind to it");
}

// Check the checker. Reference: DESIGN §6, "the survivor acknowledges no unreplicated write
// until L·(1+ρ) + δ after ...".
#[test]
fn checker_catches_survivor_not_waiting() {
    let n = seeds_to_catch(Broken::SurvivorSkipsWait, 200);
    eprintln!("SurvivorSkipsWait caught after {n} seeds");
}

// Check the checker. Reference: DESIGN §6, "Unsolicited messages never renew a lease".
#[test]
fn checker_catches_unsolicited_renewal() {
    let n = seeds_to_catch(Broken::UnsolicitedRenewal, 200);
    eprintln!("UnsolicitedRenewal caught after {n} seeds");
}

// Check the checker. Reference: DESIGN §6, "A lease starts at the holder's CLOCK_BOOTTIME
// *send* time of the request whose reply grants it".
#[test]
fn checker_catches_lease_counted_from_arrival() {
    let n = seeds_to_catch(Broken::LeaseFromArrival, 200);
    eprintln!("LeaseFromArrival caught after {n} seeds");
}
