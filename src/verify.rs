//! `stretch verify VOLUME --site ADMIN_URL --site ADMIN_URL`: compares the two sites of a
//! volume block by block — the CRC-32 of each block's data and its stamp — through their
//! admin APIs (src/admin.rs), and reports every block that differs (DESIGN.md §7 invariant 1:
//! in sync and settled, both sites hold the same data and stamps).
//!
//! A block can differ for a moment while a write is in flight or a resync has not reached it
//! yet, so a differing block is read again a few times, with a short pause, before it is
//! reported. Reads are throttled (`--rate-mib-s`, per site) so that verifying a live volume
//! does not starve its clients.
//!
//! Exit status: 0 identical, 1 differences remain, 2 the comparison could not be made (a site
//! unreachable, different volumes or sizes, a bad reply, `--repair` refused).
//!
//! `--repair` (DESIGN.md §4 "Repair") repairs each batch's differences as they are found,
//! through the site's `POST /v1/repair`, and reads the repaired blocks again to report the
//! result. Both sites must be in sync at the same epoch, linked, with no resync running and
//! nothing unsettled; otherwise it refuses. Which side is repaired (see [`plan`]):
//! - a block that fails its checksum at one site takes the other site's good copy;
//! - a stamp difference: the site with the smaller stamp takes the peer's version, the one
//!   the apply rule keeps at both;
//! - equal stamps over different data: which copy is right cannot be known; it is reported
//!   and repaired only with `--from SITE` (the other site takes SITE's copy);
//! - unreadable at both sites, or a block still dirty (resync pending): reported, not
//!   repaired.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use stretch_engine::Stamp;
use stretch_replicator::stamp::StampParts;

use crate::admin::BLOCKS_PER_CALL_MAX;
use crate::admin_client::{AdminClient, BlockEntry};
use crate::progress::format_eta;

const BLOCK_BYTES: u64 = stretch_engine::BLOCK_SIZE as u64;
const MIB: f64 = 1024.0 * 1024.0;
/// How many times a differing block is read again before it is reported.
const RECHECKS: u32 = 5;
/// The pause before each re-read: longer than a write's round trip at stretched distances.
const RECHECK_PAUSE: Duration = Duration::from_millis(200);
/// A failed admin call is retried this many times in all, a second apart, before verify
/// gives up (a site restarting, a connection refused under load).
const CALL_ATTEMPTS: u32 = 3;
const CALL_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Differences printed one by one; beyond, only counted.
const DIFFERENCES_SHOWN_MAX: usize = 1000;
/// How often progress goes to stderr.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The volume to compare (both sites must serve it).
    pub volume: String,
    /// A site's admin API as `stretch site` prints it (`http://HOST:PORT`); give it twice,
    /// once per site.
    #[arg(long = "site", required = true)]
    pub sites: Vec<String>,
    /// Blocks compared per request (1 to 4096).
    #[arg(long, default_value_t = 1024)]
    pub batch_blocks: u64,
    /// Read at most this many MiB/s at each site.
    #[arg(long, default_value_t = 256.0)]
    pub rate_mib_s: f64,
    /// Repair the differences from the in-sync peer (both sites must be in sync at the same
    /// epoch), then read the repaired blocks again and report the result.
    #[arg(long)]
    pub repair: bool,
    /// With --repair: for blocks with equal stamps but different data, keep this site's copy
    /// (a or b). Without it such blocks are only reported.
    #[arg(long = "from", value_name = "SITE", requires = "repair")]
    pub from: Option<String>,
}

/// Why `stretch verify` exits non-zero; main turns it into the exit status.
#[derive(Debug)]
pub(crate) struct ExitStatus(pub(crate) u8);

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitStatus {}

pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    match verify(args).await {
        Ok(0) => Ok(()),
        Ok(_) => Err(ExitStatus(1).into()),
        Err(err) => {
            eprintln!("stretch verify: error: {err:#}");
            Err(ExitStatus(2).into())
        }
    }
}

/// One side of the comparison.
struct Side {
    client: AdminClient,
    /// The site's name ("a" or "b"), from its status.
    name: String,
}

/// How two reports of one block differ, or None if they agree.
fn difference(a: &BlockEntry, b: &BlockEntry) -> Option<String> {
    let unreadable = |e: &BlockEntry| e.state != "ok" || e.crc32.is_none();
    match (unreadable(a), unreadable(b)) {
        (true, true) => return Some("unreadable at both sites".into()),
        (true, false) => return Some("unreadable (checksum failure) at the first site".into()),
        (false, true) => return Some("unreadable (checksum failure) at the second site".into()),
        (false, false) => {}
    }
    let data = a.crc32 != b.crc32;
    let stamp = a.stamp != b.stamp;
    match (data, stamp) {
        (false, false) => None,
        (true, false) => Some("data differs (same stamp)".into()),
        (false, true) => Some("stamp differs (same data)".into()),
        (true, true) => Some("data and stamp differ".into()),
    }
}

/// What `--repair` does about one differing block.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// The first site (`at_first`) or the second pulls the other's copy; `force` takes an
    /// equal stamp too.
    Pull {
        at_first: bool,
        force: bool,
    },
    Skip(&'static str),
}

/// Which side of a difference is repaired (module documentation); `from` is the `--from`
/// site name and `names` the two sites' names.
fn plan(a: &BlockEntry, b: &BlockEntry, from: Option<&str>, names: (&str, &str)) -> Plan {
    if a.dirty || b.dirty {
        return Plan::Skip("resync pending (dirty): run verify again once it settles");
    }
    let unreadable = |e: &BlockEntry| e.state != "ok" || e.crc32.is_none();
    match (unreadable(a), unreadable(b)) {
        (true, true) => return Plan::Skip("unreadable at both sites: no good copy to repair from"),
        (true, false) => {
            return Plan::Pull {
                at_first: true,
                force: false,
            }
        }
        (false, true) => {
            return Plan::Pull {
                at_first: false,
                force: false,
            }
        }
        (false, false) => {}
    }
    if a.stamp != b.stamp {
        // Equal-length lowercase hex of big-endian stamps: string order is stamp order.
        return Plan::Pull {
            at_first: a.stamp < b.stamp,
            force: false,
        };
    }
    match from {
        Some(site) if site == names.0 => Plan::Pull {
            at_first: false,
            force: true,
        },
        Some(site) if site == names.1 => Plan::Pull {
            at_first: true,
            force: true,
        },
        _ => Plan::Skip(
            "SAME STAMP, DIFFERENT DATA: which copy is right is unknown; give --from SITE to keep one",
        ),
    }
}

/// Totals of `--repair`.
#[derive(Debug, Default)]
struct RepairTotals {
    /// Blocks that differ no longer after their repair.
    repaired: u64,
    /// Blocks a repair was tried for that still differ.
    failed: u64,
    /// Blocks not repaired (see [`Plan::Skip`]).
    skipped: u64,
}

/// Repairs one batch's differences, then reads the repaired blocks again.
async fn repair_batch(
    a: &Side,
    b: &Side,
    differences: &BTreeMap<u64, (BlockEntry, BlockEntry)>,
    from: Option<&str>,
    totals: &mut RepairTotals,
) -> anyhow::Result<()> {
    let mut pulls: BTreeMap<(bool, bool), Vec<u64>> = BTreeMap::new();
    for (lba, (ea, eb)) in differences {
        match plan(ea, eb, from, (&a.name, &b.name)) {
            Plan::Pull { at_first, force } => {
                pulls.entry((at_first, force)).or_default().push(*lba)
            }
            Plan::Skip(why) => {
                totals.skipped += 1;
                println!("lba {lba}: not repaired: {why}");
            }
        }
    }
    let mut attempted = BTreeMap::new();
    for ((at_first, force), lbas) in &pulls {
        let (to, source) = if *at_first { (a, b) } else { (b, a) };
        match to.client.repair(lbas, *force).await {
            Ok(()) => println!(
                "repair: {} block(s) at site {} from site {}{}",
                lbas.len(),
                to.name,
                source.name,
                if *force { " (forced: --from)" } else { "" }
            ),
            // Reported, and counted below when the blocks are read again.
            Err(err) => println!(
                "repair: {} block(s) at site {} from site {} failed: {err:#}",
                lbas.len(),
                to.name,
                source.name
            ),
        }
        for lba in lbas {
            if let Some(entries) = differences.get(lba) {
                attempted.insert(*lba, entries.clone());
            }
        }
    }
    let tried = attempted.len() as u64;
    let still = recheck(a, b, attempted).await?;
    for (lba, (ea, eb)) in &still {
        println!(
            "lba {lba}: still differs after repair: {}",
            difference(ea, eb).unwrap_or_default()
        );
    }
    totals.failed += still.len() as u64;
    totals.repaired += tried - still.len() as u64;
    Ok(())
}

/// `--repair` needs both sites in sync at the same epoch, linked, settled and not resyncing.
fn check_repairable(statuses: [(&serde_json::Value, &str); 2]) -> anyhow::Result<()> {
    let mut epochs = Vec::new();
    for (status, addr) in statuses {
        let r = &status["replication"];
        let site = status["site"].as_str().unwrap_or("?");
        if r["role"] != "in-sync" || r["link_up"] != true {
            bail!(
                "--repair refused: site {site} ({addr}) is {} with the link {}; repair takes data only from a peer in sync at the current epoch",
                r["role"].as_str().unwrap_or("?"),
                if r["link_up"] == true { "up" } else { "down" }
            );
        }
        if status["resync"]["active"] == true || r["untrusted_blocks"].as_u64() != Some(0) {
            bail!("--repair refused: site {site} ({addr}) is resyncing or settling; run it once `stretch status` shows no resync");
        }
        epochs.push(r["epoch"].as_u64());
    }
    if epochs[0] != epochs[1] || epochs[0].is_none() {
        bail!(
            "--repair refused: the sites report different epochs ({:?} and {:?})",
            epochs[0],
            epochs[1]
        );
    }
    Ok(())
}

/// "epoch 1, hlc 1712345678901234, origin a" for a stamp's hex, or the hex alone if it does
/// not parse.
fn describe_stamp(hex: &str) -> String {
    let mut bytes = [0u8; Stamp::LEN];
    let parsed = hex.len() == 2 * Stamp::LEN
        && bytes.iter_mut().enumerate().all(|(i, b)| {
            u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16)
                .map(|v| *b = v)
                .is_ok()
        });
    if !parsed {
        return format!("{hex} (not a stamp)");
    }
    let stamp = Stamp(bytes);
    if stamp == Stamp::ZERO {
        return format!("{hex} (never written)");
    }
    let p = StampParts::decode(stamp);
    let origin = match p.origin_site {
        0 => "a".to_string(),
        1 => "b".to_string(),
        other => format!("site {other}"),
    };
    format!(
        "{hex} (epoch {}, hlc {}, origin {origin})",
        p.accept_epoch, p.hlc
    )
}

/// Blocks `[lba, lba + count)` from both sites, each call retried a few times.
async fn fetch_pair(
    a: &Side,
    b: &Side,
    lba: u64,
    count: u64,
) -> anyhow::Result<(Vec<BlockEntry>, Vec<BlockEntry>)> {
    let mut last_err = None;
    for attempt in 0..CALL_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(CALL_RETRY_PAUSE).await;
        }
        match tokio::try_join!(a.client.blocks(lba, count), b.client.blocks(lba, count)) {
            Ok(pair) => return Ok(pair),
            Err(err) => last_err = Some(err),
        }
    }
    Err(last_err
        .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
        .context(format!(
            "read blocks {lba}+{count} ({CALL_ATTEMPTS} attempts)"
        )))
}

/// Reads the differing `suspects` again up to `RECHECKS` times; returns those that still
/// differ with both sides' latest reports.
async fn recheck(
    a: &Side,
    b: &Side,
    mut suspects: BTreeMap<u64, (BlockEntry, BlockEntry)>,
) -> anyhow::Result<BTreeMap<u64, (BlockEntry, BlockEntry)>> {
    for _ in 0..RECHECKS {
        let (Some(&lo), Some(&hi)) = (suspects.keys().next(), suspects.keys().next_back()) else {
            break;
        };
        tokio::time::sleep(RECHECK_PAUSE).await;
        // One call per side covers every suspect of the batch (at most a batch wide).
        let (xa, xb) = fetch_pair(a, b, lo, hi - lo + 1).await?;
        suspects.retain(|lba, entries| {
            let i = (lba - lo) as usize;
            match (xa.get(i), xb.get(i)) {
                (Some(ea), Some(eb)) if difference(ea, eb).is_some() => {
                    *entries = (ea.clone(), eb.clone());
                    true
                }
                _ => false,
            }
        });
    }
    Ok(suspects)
}

async fn verify(args: VerifyArgs) -> anyhow::Result<u64> {
    if args.sites.len() != 2 {
        bail!(
            "give --site exactly twice (one admin URL per site), not {} times",
            args.sites.len()
        );
    }
    if args.batch_blocks == 0 || args.batch_blocks > BLOCKS_PER_CALL_MAX {
        bail!("--batch-blocks must be between 1 and {BLOCKS_PER_CALL_MAX}");
    }
    if !(args.rate_mib_s.is_finite() && args.rate_mib_s > 0.0) {
        bail!("--rate-mib-s must be a positive number");
    }
    let clients = [
        AdminClient::parse(&args.sites[0])?,
        AdminClient::parse(&args.sites[1])?,
    ];
    let (sa, sb) = tokio::join!(clients[0].status(), clients[1].status());
    let sa = sa.with_context(|| format!("site at {} is unreachable", clients[0].addr))?;
    let sb = sb.with_context(|| format!("site at {} is unreachable", clients[1].addr))?;
    let volume_of = |s: &serde_json::Value| s["volume"]["name"].as_str().map(str::to_owned);
    for (status, client) in [(&sa, &clients[0]), (&sb, &clients[1])] {
        let served = volume_of(status).unwrap_or_else(|| "no volume".into());
        if served != args.volume {
            bail!(
                "the site at {} serves {served:?}, not volume {:?}",
                client.addr,
                args.volume
            );
        }
    }
    let size_a = sa["volume"]["size_bytes"]
        .as_u64()
        .context("status without a size")?;
    let size_b = sb["volume"]["size_bytes"]
        .as_u64()
        .context("status without a size")?;
    if size_a != size_b {
        bail!("the volume is {size_a} bytes at one site and {size_b} at the other");
    }
    let name_of = |s: &serde_json::Value| s["site"].as_str().unwrap_or("?").to_owned();
    let [ca, cb] = clients;
    let a = Side {
        client: ca,
        name: name_of(&sa),
    };
    let b = Side {
        client: cb,
        name: name_of(&sb),
    };
    if a.name == b.name {
        bail!(
            "both admin URLs are site {:?}: give one URL per site",
            a.name
        );
    }
    if let Some(from) = &args.from {
        if from != &a.name && from != &b.name {
            bail!(
                "--from {from:?} names neither site ({} nor {})",
                a.name,
                b.name
            );
        }
    }
    if args.repair {
        check_repairable([(&sa, &a.client.addr), (&sb, &b.client.addr)])?;
    }
    let blocks_total = size_a / BLOCK_BYTES;
    eprintln!(
        "verify {}: {blocks_total} blocks, site {} ({}) against site {} ({})",
        args.volume, a.name, a.client.addr, b.name, b.client.addr
    );

    let started = Instant::now();
    let mut last_progress = started;
    let mut done_blocks = 0u64;
    let mut differing = 0u64;
    let mut differing_dirty = 0u64;
    let mut repairs = RepairTotals::default();
    let mut lba = 0u64;
    // One pass over the volume, one batch per iteration: bounded by the volume's size.
    while lba < blocks_total {
        let count = args.batch_blocks.min(blocks_total - lba);
        let batch_started = Instant::now();
        let (xa, xb) = fetch_pair(&a, &b, lba, count).await?;
        let suspects: BTreeMap<u64, (BlockEntry, BlockEntry)> = xa
            .into_iter()
            .zip(xb)
            .filter(|(ea, eb)| difference(ea, eb).is_some())
            .map(|(ea, eb)| (ea.lba, (ea, eb)))
            .collect();
        let remaining = recheck(&a, &b, suspects).await?;
        for (block, (ea, eb)) in &remaining {
            differing += 1;
            let dirty = ea.dirty || eb.dirty;
            if dirty {
                differing_dirty += 1;
            }
            if differing as usize <= DIFFERENCES_SHOWN_MAX {
                let what = difference(ea, eb).unwrap_or_default();
                let what = what
                    .replace("the first site", &format!("site {}", a.name))
                    .replace("the second site", &format!("site {}", b.name));
                let crc = |e: &BlockEntry| {
                    e.crc32
                        .map(|c| format!("{c:08x}"))
                        .unwrap_or_else(|| "unreadable".into())
                };
                println!(
                    "lba {block}: {what}{}",
                    if dirty {
                        " [dirty: resync pending]"
                    } else {
                        ""
                    }
                );
                println!(
                    "    {}: crc32 {} stamp {}",
                    a.name,
                    crc(ea),
                    describe_stamp(&ea.stamp)
                );
                println!(
                    "    {}: crc32 {} stamp {}",
                    b.name,
                    crc(eb),
                    describe_stamp(&eb.stamp)
                );
            }
        }
        if args.repair && !remaining.is_empty() {
            repair_batch(&a, &b, &remaining, args.from.as_deref(), &mut repairs).await?;
        }
        lba += count;
        done_blocks += count;
        // Throttle: a batch may take no less than its bytes at the chosen rate.
        let batch_min =
            Duration::from_secs_f64((count * BLOCK_BYTES) as f64 / (args.rate_mib_s * MIB));
        if let Some(rest) = batch_min.checked_sub(batch_started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        if last_progress.elapsed() >= PROGRESS_INTERVAL || lba >= blocks_total {
            last_progress = Instant::now();
            let elapsed_s = started.elapsed().as_secs_f64().max(1e-3);
            let rate_mib_s = (done_blocks * BLOCK_BYTES) as f64 / MIB / elapsed_s;
            let blocks_per_s = done_blocks as f64 / elapsed_s;
            let eta_s =
                (blocks_per_s > 0.0).then(|| (blocks_total - done_blocks) as f64 / blocks_per_s);
            let repaired = if args.repair {
                format!(", {} repaired", repairs.repaired)
            } else {
                String::new()
            };
            eprintln!(
                "verify {}: {done_blocks}/{blocks_total} blocks ({:.1}%), {rate_mib_s:.1} MiB/s, ETA {}, {differing} differing{repaired}",
                args.volume,
                100.0 * done_blocks as f64 / blocks_total.max(1) as f64,
                format_eta(eta_s)
            );
        }
    }
    if differing as usize > DIFFERENCES_SHOWN_MAX {
        println!(
            "... and {} more differing blocks",
            differing as usize - DIFFERENCES_SHOWN_MAX
        );
    }
    if differing == 0 {
        println!(
            "verify {}: identical: {blocks_total} blocks compared (data CRC-32 and stamp) between site {} and site {}",
            args.volume, a.name, b.name
        );
    } else {
        println!(
            "verify {}: {differing} of {blocks_total} blocks differ between site {} and site {} ({differing_dirty} of them dirty, i.e. resync pending)",
            args.volume, a.name, b.name
        );
    }
    if !args.repair || differing == 0 {
        return Ok(differing);
    }
    let left = repairs.failed + repairs.skipped;
    if left == 0 {
        println!(
            "verify {}: after repair: identical: all {} differing blocks repaired and read again",
            args.volume, repairs.repaired
        );
    } else {
        println!(
            "verify {}: after repair: {} repaired, {} still differ ({} failed, {} not repaired)",
            args.volume, repairs.repaired, left, repairs.failed, repairs.skipped
        );
    }
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(crc32: Option<u32>, stamp: &str) -> BlockEntry {
        BlockEntry {
            lba: 7,
            state: if crc32.is_some() { "ok" } else { "unreadable" }.into(),
            crc32,
            stamp: stamp.into(),
            dirty: false,
        }
    }

    #[test]
    fn differences_name_what_differs() {
        let s1 = "00000001000000000000000100000000";
        let s2 = "00000001000000000000000200000000";
        assert_eq!(difference(&entry(Some(1), s1), &entry(Some(1), s1)), None);
        assert_eq!(
            difference(&entry(Some(1), s1), &entry(Some(2), s1)).as_deref(),
            Some("data differs (same stamp)")
        );
        assert_eq!(
            difference(&entry(Some(1), s1), &entry(Some(1), s2)).as_deref(),
            Some("stamp differs (same data)")
        );
        assert!(difference(&entry(None, s1), &entry(Some(1), s1))
            .is_some_and(|d| d.contains("first site")));
    }

    // The repair plan of the module documentation: the unreadable side takes the good copy,
    // the smaller stamp takes the greater, equal stamps only with --from, and nothing dirty
    // or unreadable at both is touched.
    #[test]
    fn repair_plan_picks_the_side_the_apply_rule_would() {
        let s1 = "00000001000000000000000100000000";
        let s2 = "00000001000000000000000200000000";
        let names = ("a", "b");
        let pull = |at_first, force| Plan::Pull { at_first, force };
        assert_eq!(
            plan(&entry(None, s2), &entry(Some(1), s1), None, names),
            pull(true, false)
        );
        assert_eq!(
            plan(&entry(Some(1), s1), &entry(None, s1), Some("b"), names),
            pull(false, false),
            "--from never picks an unreadable copy"
        );
        assert_eq!(
            plan(&entry(Some(1), s1), &entry(Some(2), s2), None, names),
            pull(true, false)
        );
        assert_eq!(
            plan(&entry(Some(1), s2), &entry(Some(2), s1), None, names),
            pull(false, false)
        );
        assert!(matches!(
            plan(&entry(Some(1), s1), &entry(Some(2), s1), None, names),
            Plan::Skip(_)
        ));
        assert_eq!(
            plan(&entry(Some(1), s1), &entry(Some(2), s1), Some("a"), names),
            pull(false, true)
        );
        assert!(matches!(
            plan(&entry(None, s1), &entry(None, s1), Some("a"), names),
            Plan::Skip(_)
        ));
        let mut dirty = entry(Some(1), s1);
        dirty.dirty = true;
        assert!(matches!(
            plan(&dirty, &entry(Some(2), s2), None, names),
            Plan::Skip(_)
        ));
    }

    #[test]
    fn stamps_are_decoded_for_people() {
        let parts = StampParts {
            accept_epoch: 3,
            hlc: 42,
            origin_site: 1,
        };
        let hex = crate::admin::stamp_hex(&parts.encode());
        assert_eq!(
            describe_stamp(&hex),
            format!("{hex} (epoch 3, hlc 42, origin b)")
        );
        assert!(describe_stamp("zz").contains("not a stamp"));
        assert!(describe_stamp(&"0".repeat(32)).contains("never written"));
    }
}
