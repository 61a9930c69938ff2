//! One workload against one NBD export: random or sequential reads, writes or a mix, at a
//! block size, a queue depth per connection, over several connections, for a duration or an
//! op count, closed-loop or at a fixed rate.
//!
//! Latency goes into hdrhistograms in nanoseconds. In fixed-rate mode each op's latency is
//! measured from the time it was *meant* to start (start + i / rate), not from when a free
//! slot let it start, so a stalled server shows as latency instead of silently lowering the
//! offered load (coordinated omission).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use stretch_nbd::{Client, ClientError, ClientOptions};

/// Highest latency the histograms hold; slower ops are clamped to it.
pub const LATENCY_NS_MAX: u64 = 60_000_000_000;
/// A task gives up after this many failed requests, so a dead server ends the run.
const ERRORS_PER_TASK_MAX: u64 = 1000;
/// Longest a workload may be asked to run, so no run is unbounded.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);

/// Where an NBD export is.
#[derive(Clone, Debug, PartialEq)]
pub enum Endpoint {
    Tcp { addr: String, export: String },
    Unix { path: PathBuf, export: String },
}

impl Endpoint {
    /// Parses `nbd://host[:port][/export]` and `nbd+unix:///export?socket=PATH`.
    pub fn parse(uri: &str) -> anyhow::Result<Endpoint> {
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path_part, query) = rest
                .split_once('?')
                .context("nbd+unix URI needs ?socket=PATH")?;
            let export = path_part.trim_start_matches('/').to_string();
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .context("nbd+unix URI needs ?socket=PATH")?;
            return Ok(Endpoint::Unix {
                path: PathBuf::from(socket),
                export,
            });
        }
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            if hostport.is_empty() {
                bail!("no host in {uri:?}");
            }
            let addr = if hostport
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                hostport.to_string()
            } else {
                format!("{hostport}:10809")
            };
            return Ok(Endpoint::Tcp {
                addr,
                export: export.to_string(),
            });
        }
        bail!("not an NBD URI: {uri:?} (want nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
    }

    pub fn uri(&self) -> String {
        match self {
            Endpoint::Tcp { addr, export } => format!("nbd://{addr}/{export}"),
            Endpoint::Unix { path, export } => {
                format!("nbd+unix:///{export}?socket={}", path.display())
            }
        }
    }

    /// The same export reached through another TCP address (a link emulator in front).
    pub fn via(&self, addr: &str) -> anyhow::Result<Endpoint> {
        match self {
            Endpoint::Tcp { export, .. } => Ok(Endpoint::Tcp {
                addr: addr.into(),
                export: export.clone(),
            }),
            Endpoint::Unix { .. } => {
                bail!("a Unix-socket target cannot be put behind the link emulator")
            }
        }
    }

    pub async fn connect(&self, requests_inflight_max: usize) -> Result<Client, ClientError> {
        let export = match self {
            Endpoint::Tcp { export, .. } | Endpoint::Unix { export, .. } => export.clone(),
        };
        let options = ClientOptions {
            export,
            structured_replies: true,
            requests_inflight_max,
        };
        match self {
            Endpoint::Tcp { addr, .. } => Client::connect_tcp_with(addr.as_str(), &options).await,
            Endpoint::Unix { path, .. } => Client::connect_unix_with(path, &options).await,
        }
    }
}

/// The I/O pattern, named as fio names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Rw {
    Randread,
    Randwrite,
    /// Random, mixed by `--rwmix-read`.
    Randrw,
    Read,
    Write,
    /// Sequential, mixed by `--rwmix-read`.
    Rw,
}

impl Rw {
    pub fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Randrw => "randrw",
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Rw => "rw",
        }
    }

    fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }

    /// Percentage of ops that read.
    fn read_pct(self, mix_read_pct: u8) -> u8 {
        match self {
            Rw::Randread | Rw::Read => 100,
            Rw::Randwrite | Rw::Write => 0,
            Rw::Randrw | Rw::Rw => mix_read_pct.min(100),
        }
    }
}

/// One workload's settings.
#[derive(Clone, Debug)]
pub struct Workload {
    pub rw: Rw,
    pub rwmix_read_pct: u8,
    pub block_size_bytes: u32,
    /// Requests in flight per connection.
    pub queue_depth: u32,
    pub connections: u32,
    /// The run stops at this time or at `ops_max`, whichever comes first.
    pub duration: Duration,
    pub ops_max: Option<u64>,
    /// Fixed offered load; None runs closed-loop (each slot issues as soon as it is free).
    pub rate_ops_per_s: Option<u64>,
    /// Offsets stay below this (and below the export size).
    pub range_bytes: Option<u64>,
    pub seed: u64,
}

/// What one run measured.
pub struct Measured {
    pub ops_read: u64,
    pub ops_write: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency_all_ns: Histogram<u64>,
    pub latency_read_ns: Histogram<u64>,
    pub latency_write_ns: Histogram<u64>,
}

pub fn new_histogram() -> Histogram<u64> {
    // Three significant figures over 1 ns .. 60 s: a few hundred KiB, fixed up front.
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("static histogram bounds are valid")
}

/// Live counters the progress line reads.
#[derive(Default)]
pub struct Progress {
    pub ops_done: AtomicU64,
    pub errors: AtomicU64,
}

struct TaskResult {
    all: Histogram<u64>,
    read: Histogram<u64>,
    write: Histogram<u64>,
    ops_read: u64,
    ops_write: u64,
    errors: u64,
}

/// Waits until `at` precisely: tokio's timer fires on millisecond ticks (late by up to 1 ms),
/// so sleep to just before and yield for the rest. Used only in fixed-rate mode, where the
/// start time is part of the measurement.
async fn wait_until(at: Instant) {
    let coarse = at.checked_sub(Duration::from_micros(1500));
    if let Some(c) = coarse {
        if c > Instant::now() {
            tokio::time::sleep_until(c.into()).await;
        }
    }
    while Instant::now() < at {
        tokio::task::yield_now().await;
    }
}

/// Runs `w` against `endpoint`.
pub async fn run(
    endpoint: &Endpoint,
    w: &Workload,
    progress: Arc<Progress>,
) -> anyhow::Result<Measured> {
    if w.block_size_bytes == 0 || w.queue_depth == 0 || w.connections == 0 {
        bail!("block size, queue depth and connections must be positive");
    }
    let duration = w.duration.min(DURATION_MAX);
    let mut clients = Vec::with_capacity(w.connections as usize);
    for _ in 0..w.connections {
        let c = endpoint
            .connect(w.queue_depth as usize)
            .await
            .with_context(|| format!("connect to {}", endpoint.uri()))?;
        clients.push(c);
    }
    let size_bytes = clients[0].size_bytes();
    let range_bytes = w.range_bytes.unwrap_or(size_bytes).min(size_bytes);
    let blocks = range_bytes / u64::from(w.block_size_bytes);
    if blocks == 0 {
        bail!(
            "export {} ({size_bytes} bytes) is smaller than one block",
            endpoint.uri()
        );
    }
    // Incompressible, non-zero data: servers that detect zero blocks must not get a free ride.
    let mut payload = vec![0u8; w.block_size_bytes as usize];
    SmallRng::seed_from_u64(w.seed).fill(&mut payload[..]);
    let payload: Arc<[u8]> = payload.into();

    let read_pct = w.rw.read_pct(w.rwmix_read_pct);
    let start = Instant::now();
    let deadline = start + duration;
    let tickets = Arc::new(AtomicU64::new(0));
    let seq_cursor = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let interval_ns = w.rate_ops_per_s.map(|r| 1_000_000_000 / r.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for (ci, client) in clients.iter().enumerate() {
        for qi in 0..w.queue_depth {
            let client = client.clone();
            let (tickets, seq_cursor, stop, progress, payload) = (
                tickets.clone(),
                seq_cursor.clone(),
                stop.clone(),
                progress.clone(),
                payload.clone(),
            );
            let (w, seed) = (w.clone(), w.seed ^ ((ci as u64) << 32 | u64::from(qi)));
            tasks.spawn(async move {
                let mut rng = SmallRng::seed_from_u64(seed);
                let mut r = TaskResult {
                    all: new_histogram(),
                    read: new_histogram(),
                    write: new_histogram(),
                    ops_read: 0,
                    ops_write: 0,
                    errors: 0,
                };
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let ticket = tickets.fetch_add(1, Ordering::Relaxed);
                    if w.ops_max.is_some_and(|m| ticket >= m) {
                        break;
                    }
                    let intended = match interval_ns {
                        Some(ns) => {
                            let at = start + Duration::from_nanos(ticket.saturating_mul(ns));
                            if at >= deadline {
                                break;
                            }
                            wait_until(at).await;
                            at
                        }
                        None => Instant::now(),
                    };
                    if Instant::now() >= deadline {
                        break;
                    }
                    let block = if w.rw.random() {
                        rng.random_range(0..blocks)
                    } else {
                        seq_cursor.fetch_add(1, Ordering::Relaxed) % blocks
                    };
                    let offset = block * u64::from(w.block_size_bytes);
                    let is_read = rng.random_range(0..100u8) < read_pct;
                    let result = if is_read {
                        client.read(offset, w.block_size_bytes).await.map(|buf| {
                            debug_assert_eq!(buf.len(), w.block_size_bytes as usize);
                        })
                    } else {
                        client.write(offset, &payload, false).await
                    };
                    let latency_ns =
                        u64::try_from(intended.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let latency_ns = latency_ns.clamp(1, LATENCY_NS_MAX);
                    match result {
                        Ok(()) => {
                            r.all.saturating_record(latency_ns);
                            if is_read {
                                r.read.saturating_record(latency_ns);
                                r.ops_read += 1;
                            } else {
                                r.write.saturating_record(latency_ns);
                                r.ops_write += 1;
                            }
                            progress.ops_done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            r.errors += 1;
                            progress.errors.fetch_add(1, Ordering::Relaxed);
                            let fatal = !matches!(e, ClientError::Server { .. });
                            if fatal || r.errors >= ERRORS_PER_TASK_MAX {
                                break;
                            }
                        }
                    }
                }
                r
            });
        }
    }
    let mut m = Measured {
        ops_read: 0,
        ops_write: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_all_ns: new_histogram(),
        latency_read_ns: new_histogram(),
        latency_write_ns: new_histogram(),
    };
    // Every task checks the deadline before each op; the extra grace only bounds a server
    // that stops answering mid-request.
    let hard_stop = deadline + Duration::from_secs(30);
    loop {
        let next = tokio::time::timeout_at(hard_stop.into(), tasks.join_next()).await;
        match next {
            Ok(Some(Ok(r))) => {
                m.ops_read += r.ops_read;
                m.ops_write += r.ops_write;
                m.errors += r.errors;
                m.latency_all_ns.add(&r.all).context("merge histograms")?;
                m.latency_read_ns.add(&r.read).context("merge histograms")?;
                m.latency_write_ns
                    .add(&r.write)
                    .context("merge histograms")?;
            }
            Ok(Some(Err(e))) => bail!("workload task failed: {e}"),
            Ok(None) => break,
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                tasks.abort_all();
                bail!(
                    "{} stopped answering: requests still open 30 s after the deadline",
                    endpoint.uri()
                );
            }
        }
    }
    // Ops in flight at the deadline finish after it and are counted, so the rate divides by
    // the time until the last one finished.
    m.elapsed = start.elapsed();
    for c in &clients {
        let _ = c.disconnect().await;
    }
    Ok(m)
}

/// Writes the whole range once, sequentially in 256 KiB requests, so reads hit allocated
/// data on every server (a sparse file's holes read far faster than data).
pub async fn prefill(endpoint: &Endpoint, range_bytes: Option<u64>) -> anyhow::Result<u64> {
    const PREFILL_CHUNK_BYTES: u32 = 256 * 1024;
    const PREFILL_INFLIGHT: usize = 8;
    let client = endpoint
        .connect(PREFILL_INFLIGHT)
        .await
        .context("connect for prefill")?;
    let end = range_bytes.unwrap_or(u64::MAX).min(client.size_bytes());
    let mut data = vec![0u8; PREFILL_CHUNK_BYTES as usize];
    SmallRng::seed_from_u64(0x5eed).fill(&mut data[..]);
    let data: Arc<[u8]> = data.into();
    let mut offset = 0u64;
    let mut inflight = tokio::task::JoinSet::new();
    while offset < end {
        let len = (end - offset).min(u64::from(PREFILL_CHUNK_BYTES)) as usize;
        let (c, d, off) = (client.clone(), data.clone(), offset);
        inflight.spawn(async move { c.write(off, &d[..len], false).await });
        offset += len as u64;
        if inflight.len() >= PREFILL_INFLIGHT {
            if let Some(r) = inflight.join_next().await {
                r.context("prefill task")?.context("prefill write")?;
            }
        }
    }
    while let Some(r) = inflight.join_next().await {
        r.context("prefill task")?.context("prefill write")?;
    }
    client.flush().await.context("prefill flush")?;
    let _ = client.disconnect().await;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nbd_uris() {
        assert_eq!(
            Endpoint::parse("nbd://127.0.0.1:10809/vol").expect("valid"),
            Endpoint::Tcp {
                addr: "127.0.0.1:10809".into(),
                export: "vol".into()
            }
        );
        assert_eq!(
            Endpoint::parse("nbd://127.0.0.1").expect("valid"),
            Endpoint::Tcp {
                addr: "127.0.0.1:10809".into(),
                export: String::new()
            }
        );
        assert_eq!(
            Endpoint::parse("nbd+unix:///vol?socket=/tmp/s").expect("valid"),
            Endpoint::Unix {
                path: "/tmp/s".into(),
                export: "vol".into()
            }
        );
        assert!(Endpoint::parse("http://x").is_err());
        assert!(Endpoint::parse("nbd+unix:///vol").is_err());
    }
}
