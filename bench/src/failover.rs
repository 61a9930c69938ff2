//! `stretch bench --failover ADMIN`: how long writes pause at the surviving site when the link
//! between the sites is cut (DESIGN.md §6; issue 6 targets at most 2 s with default timers).
//!
//! Each run: wait until the standby site serves (both sites in sync again), write 4 KiB at
//! QD1 to the target for a moment, cut the link through the link emulator's Toxiproxy API,
//! and time the pause from the last acknowledgement before the cut, and from the cut itself,
//! to the first acknowledgement after it — the survivor acknowledging alone. Then heal, and
//! let the standby resync and rejoin before the next run.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use stretch_nbd::Client;

use crate::cli::{heal_link, partition_link};
use crate::link::Direction;

/// Writes run this long before each cut, so the sites are in steady state.
const WARMUP: Duration = Duration::from_millis(700);
/// A run whose survivor has not acknowledged by then is reported as a failure.
const PAUSE_LIMIT: Duration = Duration::from_secs(15);
/// How long to wait for the standby to serve again after a heal.
const REJOIN_LIMIT: Duration = Duration::from_secs(60);
/// Blocks the writer cycles through.
const BLOCKS: u64 = 1024;

/// One failover, measured at the survivor.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverRun {
    /// From the cut to the first write acknowledged after it.
    pub pause_from_cut_ms: f64,
    /// From the last acknowledgement before the cut to the first after it (what an
    /// application sees as its longest write).
    pub pause_between_acks_ms: f64,
    /// Writes that failed at the target during the run (none expected at a survivor).
    pub failed_writes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    pub target: String,
    pub runs: Vec<FailoverRun>,
}

impl FailoverReport {
    pub fn to_markdown(&self) -> String {
        let mut pauses: Vec<f64> = self.runs.iter().map(|r| r.pause_from_cut_ms).collect();
        pauses.sort_by(f64::total_cmp);
        let mut out = format!(
            "failover at {} ({} runs)\n\n| run | pause from cut (ms) | longest write (ms) | failed writes |\n|---|---|---|---|\n",
            self.target,
            self.runs.len()
        );
        for (i, r) in self.runs.iter().enumerate() {
            out.push_str(&format!(
                "| {} | {:.0} | {:.0} | {} |\n",
                i + 1,
                r.pause_from_cut_ms,
                r.pause_between_acks_ms,
                r.failed_writes
            ));
        }
        if let (Some(min), Some(max)) = (pauses.first(), pauses.last()) {
            let median = pauses[pauses.len() / 2];
            out.push_str(&format!(
                "\npause from cut: min {min:.0} ms, median {median:.0} ms, max {max:.0} ms\n"
            ));
        }
        out
    }
}

fn addr_and_export(uri: &str) -> anyhow::Result<(String, String)> {
    let rest = uri
        .strip_prefix("nbd://")
        .with_context(|| format!("{uri}: only nbd://HOST:PORT/EXPORT targets are supported"))?;
    let (addr, export) = rest
        .split_once('/')
        .with_context(|| format!("{uri}: no export name"))?;
    Ok((addr.to_string(), export.to_string()))
}

async fn connect(uri: &str) -> anyhow::Result<Client> {
    let (addr, export) = addr_and_export(uri)?;
    Client::connect_tcp(addr.as_str(), &export)
        .await
        .with_context(|| format!("connect to {uri}"))
}

/// Waits until one read at `uri` succeeds (a standby serves only once in sync).
async fn wait_serving(uri: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(c) = connect(uri).await {
            let ok = tokio::time::timeout(Duration::from_secs(2), c.read(0, 4096))
                .await
                .is_ok_and(|r| r.is_ok());
            let _ = c.disconnect().await;
            if ok {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("{uri} did not serve within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `runs` failovers of `target` by cutting proxy `proxy` at `admin`.
pub async fn run_failover(
    target: &str,
    standby: Option<&str>,
    admin: &str,
    proxy: &str,
    runs: u32,
    quiet: bool,
) -> anyhow::Result<FailoverReport> {
    let mut report = FailoverReport {
        target: target.to_string(),
        runs: Vec::new(),
    };
    // Start from a healed link whatever state an earlier run left.
    heal_link(admin, proxy).await?;
    for run in 0..runs {
        if let Some(standby) = standby {
            wait_serving(standby, REJOIN_LIMIT).await?;
        }
        // Leases are renewed and the map settled on both sides.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let client = connect(target).await?;
        let data = vec![0x5Au8; 4096];
        let started = Instant::now();
        let mut cut_at: Option<Instant> = None;
        let mut last_ack_before_cut: Option<Instant> = None;
        let mut failed_writes = 0u64;
        let mut seq = 0u64;
        let measured = loop {
            if cut_at.is_none() && started.elapsed() >= WARMUP {
                partition_link(admin, proxy, Direction::Both).await?;
                cut_at = Some(Instant::now());
            }
            if let Some(cut) = cut_at {
                if cut.elapsed() > PAUSE_LIMIT {
                    heal_link(admin, proxy).await?;
                    bail!(
                        "run {}: no write acknowledged within {PAUSE_LIMIT:?} of the cut",
                        run + 1
                    );
                }
            }
            let offset = (seq % BLOCKS) * 4096;
            seq += 1;
            let sent = Instant::now();
            match tokio::time::timeout(PAUSE_LIMIT, client.write(offset, &data, false)).await {
                Ok(Ok(())) => {
                    let now = Instant::now();
                    match cut_at {
                        // Sent after the cut: the survivor acknowledged alone.
                        Some(cut) if sent >= cut => break (cut, now),
                        _ => last_ack_before_cut = Some(now),
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    failed_writes += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let (cut, first_after) = measured;
        let _ = client.disconnect().await;
        heal_link(admin, proxy).await?;
        let r = FailoverRun {
            pause_from_cut_ms: first_after.duration_since(cut).as_secs_f64() * 1e3,
            pause_between_acks_ms: first_after
                .duration_since(last_ack_before_cut.unwrap_or(cut))
                .as_secs_f64()
                * 1e3,
            failed_writes,
        };
        if !quiet {
            eprintln!(
                "run {}/{runs}: first solo ack {:.0} ms after the cut (longest write {:.0} ms)",
                run + 1,
                r.pause_from_cut_ms,
                r.pause_between_acks_ms
            );
        }
        report.runs.push(r);
    }
    Ok(report)
}
