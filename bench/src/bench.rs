//! `stretch bench`: runs workloads against NBD targets, optionally behind the in-process
//! link emulator at several RTTs, optionally against servers it starts itself (Stretch,
//! qemu-nbd, nbdkit) for a side-by-side comparison, and writes the report.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tokio::process::{Child, Command};

use crate::link::LinkEmulator;
use crate::plot;
use crate::report::{summary_line, CaseResult, Machine, Percentiles, Report};
use crate::units::{parse_block_size, parse_duration, parse_size_bytes};
use crate::workload::{self, Endpoint, Progress, Rw, Workload};

/// Servers `stretch bench --peer` can start by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// `stretch serve` on a fresh volume (binary from --stretch-bin or next to this one).
    Stretch,
    /// `qemu-nbd` on a raw file.
    QemuNbd,
    /// `nbdkit file` on a raw file.
    Nbdkit,
}

impl Peer {
    pub fn label(self) -> &'static str {
        match self {
            Peer::Stretch => "stretch",
            Peer::QemuNbd => "qemu-nbd",
            Peer::Nbdkit => "nbdkit",
        }
    }
}

/// How started peers use the host page cache, so the comparison is like for like.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum PeerCache {
    /// Everyone through the page cache: `stretch serve --buffered-io`, `qemu-nbd` default
    /// (`--cache=writeback --aio=threads`), `nbdkit file` default.
    #[default]
    Cached,
    /// Around the page cache: `stretch serve` default (O_DIRECT),
    /// `qemu-nbd --cache=none --aio=io_uring` (O_DIRECT), `nbdkit file cache=none` (nbdkit 1.32
    /// has no O_DIRECT; `cache=none` evicts pages after each request instead).
    Direct,
}

impl PeerCache {
    pub fn label(self) -> &'static str {
        match self {
            PeerCache::Cached => "cached",
            PeerCache::Direct => "direct",
        }
    }
}

/// `stretch bench`: what the binary puts under its `Bench` subcommand.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// An NBD export to measure: nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH, or
    /// LABEL=URI (repeatable; the first is the reference for ratios).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Start this server and measure it too (repeatable, in order: the first is the
    /// reference). Default workloads then: randread,randwrite at qd 1,32.
    #[arg(long = "peer", value_enum)]
    pub peers: Vec<Peer>,
    /// The `stretch` binary for --peer stretch; default: next to the running executable.
    #[arg(long)]
    pub stretch_bin: Option<PathBuf>,
    /// Size of each started peer's volume or file.
    #[arg(long, default_value = "256MiB", value_parser = parse_size_bytes)]
    pub peer_size: u64,
    /// Caching mode of every started peer (the same for all, so the comparison is fair).
    #[arg(long, value_enum, default_value_t = PeerCache::Cached)]
    pub peer_cache: PeerCache,
    /// Directory for the peers' files; default: a fresh one under the system temp dir.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// I/O patterns, comma-separated (default randread).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub rw: Vec<Rw>,
    /// Read percentage of randrw and rw.
    #[arg(long, default_value_t = 70)]
    pub rwmix_read: u8,
    /// Block size of every request.
    #[arg(long, default_value = "4K", value_parser = parse_block_size)]
    pub bs: u32,
    /// Queue depths per connection, comma-separated (default 1).
    #[arg(long, value_delimiter = ',')]
    pub qd: Vec<u32>,
    /// Connections per target.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// Length of each case.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop each case after this many ops (whichever comes first with --duration).
    #[arg(long)]
    pub ops: Option<u64>,
    /// Fixed offered load in ops/s (latency then counts from each op's intended start).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Emulated round-trip times, comma-separated (e.g. 0,1ms,5ms,10ms,20ms): each case runs
    /// once per RTT through an in-process link emulator; RTT 0 (direct) always runs too, as
    /// the local latency of the floor.
    #[arg(long, value_delimiter = ',', value_parser = parse_duration)]
    pub rtt: Vec<Duration>,
    /// Keep offsets below this many bytes (default: the whole export).
    #[arg(long, value_parser = parse_size_bytes)]
    pub range: Option<u64>,
    /// Write the whole range once before measuring (always done for started peers).
    #[arg(long)]
    pub prefill: bool,
    /// Write report.json, report.md and the SVG plots here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the offsets and data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Measure failover instead: cut the link through this link-emulator admin API (e.g.
    /// `stretch up`'s 127.0.0.1:8474) while writing to --target, and time the pause until the
    /// surviving site acknowledges alone.
    #[arg(long, value_name = "ADMIN")]
    pub failover: Option<String>,
    /// With --failover: the other site's URI; each run waits until it serves again (resynced
    /// and rejoined) before cutting.
    #[arg(long)]
    pub standby: Option<String>,
    /// With --failover: how many cuts.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// With --failover: the emulator's proxy name.
    #[arg(long, default_value = "link")]
    pub proxy: String,
}

/// A target to measure: given by URI, or a server this run starts.
enum TargetSpec {
    Uri { label: String, endpoint: Endpoint },
    Peer(Peer),
}

/// A server process started for the comparison; killed when dropped.
struct PeerServer {
    child: Child,
    endpoint: Endpoint,
}

impl PeerServer {
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    // The port is free when we look; the server binds it a moment later. A clash shows as
    // a failed readiness wait, never as a wrong measurement.
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?.port())
}

fn stretch_binary(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.stretch_bin {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("locate the running executable")?;
    let candidate = exe.with_file_name("stretch");
    if candidate.exists() {
        return Ok(candidate);
    }
    bail!(
        "no stretch binary next to {}: pass --stretch-bin",
        exe.display()
    )
}

async fn run_checked(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .with_context(|| format!("{what} did not finish within 60 s"))?
        .with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn start_peer(peer: Peer, args: &BenchArgs, dir: &Path) -> anyhow::Result<PeerServer> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let export = "vol".to_string();
    let peer_dir = dir.join(peer.label());
    // Every run starts from a fresh file: what an earlier run left in this peer's own
    // subdirectory (a Stretch volume would make `volume create` fail) is removed first.
    match std::fs::remove_dir_all(&peer_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("clear {}", peer_dir.display())),
    }
    std::fs::create_dir_all(&peer_dir).with_context(|| format!("create {}", peer_dir.display()))?;
    let raw_file = || -> anyhow::Result<PathBuf> {
        let path = peer_dir.join("disk.img");
        let f =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        f.set_len(args.peer_size).context("size the raw file")?;
        Ok(path)
    };
    let mut cmd = match peer {
        Peer::Stretch => {
            let bin = stretch_binary(args)?;
            run_checked(
                Command::new(&bin)
                    .args([
                        "volume",
                        "create",
                        &export,
                        "--size",
                        &args.peer_size.to_string(),
                        "--data-dir",
                    ])
                    .arg(&peer_dir),
                "stretch volume create",
            )
            .await?;
            let mut c = Command::new(&bin);
            c.arg("serve")
                .arg("--data-dir")
                .arg(&peer_dir)
                .args(["--listen", &addr]);
            if args.peer_cache == PeerCache::Cached {
                c.arg("--buffered-io");
            }
            c
        }
        Peer::QemuNbd => {
            let img = raw_file()?;
            let mut c = Command::new("qemu-nbd");
            c.args([
                "--format=raw",
                "--persistent",
                "--shared=64",
                "--bind=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--export-name={export}"));
            if args.peer_cache == PeerCache::Direct {
                c.args(["--cache=none", "--aio=io_uring"]);
            }
            c.arg(img);
            c
        }
        Peer::Nbdkit => {
            let img = raw_file()?;
            let mut c = Command::new("nbdkit");
            c.args([
                "--foreground",
                "--exit-with-parent",
                "--ipaddr",
                "127.0.0.1",
                "--port",
            ])
            .arg(port.to_string())
            .arg("file")
            .arg(format!("file={}", img.display()));
            if args.peer_cache == PeerCache::Direct {
                c.arg("cache=none");
            }
            c
        }
    };
    cmd.kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {} (is it installed?)", peer.label()))?;
    let endpoint = Endpoint::Tcp { addr, export };
    // Ready means an NBD handshake succeeds; poll for it, bounded.
    let ready_by = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{} exited before serving: {status}", peer.label());
        }
        if let Ok(c) = endpoint.connect(1).await {
            let _ = c.disconnect().await;
            break;
        }
        if Instant::now() >= ready_by {
            let _ = child.start_kill();
            bail!(
                "{} did not serve {} within 15 s",
                peer.label(),
                endpoint.uri()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(PeerServer { child, endpoint })
}

fn parse_target(text: &str) -> anyhow::Result<TargetSpec> {
    let (label, uri) = match text.split_once('=') {
        Some((l, u)) if !l.contains("://") => (l.to_string(), u),
        _ => (text.to_string(), text),
    };
    Ok(TargetSpec::Uri {
        label,
        endpoint: Endpoint::parse(uri)?,
    })
}

/// The progress line: once a second on stderr while a case runs.
fn spawn_progress(
    label: String,
    progress: Arc<Progress>,
    quiet: bool,
) -> Option<tokio::task::JoinHandle<()>> {
    if quiet {
        return None;
    }
    Some(tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut last_ops = 0u64;
        loop {
            tick.tick().await;
            let ops = progress.ops_done.load(Ordering::Relaxed);
            let errors = progress.errors.load(Ordering::Relaxed);
            eprintln!(
                "{label}: {:.0} s, {ops} ops, {} IOPS in the last second, {errors} errors",
                start.elapsed().as_secs_f64(),
                ops - last_ops
            );
            last_ops = ops;
        }
    }))
}

/// Measures one case and turns it into a result row.
async fn run_case(
    label: &str,
    endpoint: &Endpoint,
    w: &Workload,
    rtt: Duration,
    counter: &str,
    quiet: bool,
) -> anyhow::Result<CaseResult> {
    let progress = Arc::new(Progress::default());
    let case_label = format!(
        "{counter} {label} {} {} qd{} rtt={}ms",
        w.rw.name(),
        crate::report::size_label(w.block_size_bytes),
        w.queue_depth,
        rtt.as_secs_f64() * 1e3
    );
    let ticker = spawn_progress(case_label, progress.clone(), quiet);
    let m = workload::run(endpoint, w, progress).await;
    if let Some(t) = ticker {
        t.abort();
    }
    let m = m?;
    let ops = m.ops_read + m.ops_write;
    let secs = m.elapsed.as_secs_f64().max(1e-9);
    let iops = ops as f64 / secs;
    Ok(CaseResult {
        target: label.to_string(),
        uri: endpoint.uri(),
        rw: w.rw.name().to_string(),
        block_size_bytes: w.block_size_bytes,
        queue_depth: w.queue_depth,
        connections: w.connections,
        rtt_us: rtt.as_micros() as u64,
        rate_ops_per_s: w.rate_ops_per_s,
        ops,
        errors: m.errors,
        elapsed_s: secs,
        iops,
        mb_per_s: iops * f64::from(w.block_size_bytes) / 1e6,
        latency_us: Percentiles::from_histogram_ns(&m.latency_all_ns),
        read_latency_us: Percentiles::from_histogram_ns(&m.latency_read_ns),
        write_latency_us: Percentiles::from_histogram_ns(&m.latency_write_ns),
        floor: None,
    })
}

/// Runs `stretch bench`.
pub async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(admin) = &args.failover {
        let [target] = args.targets.as_slice() else {
            bail!("--failover measures one --target (the site expected to survive)");
        };
        let report = crate::failover::run_failover(
            target,
            args.standby.as_deref(),
            admin,
            &args.proxy,
            args.runs.max(1),
            args.quiet,
        )
        .await?;
        println!("\n{}", report.to_markdown());
        if let Some(dir) = &args.out {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            let p = dir.join("failover.json");
            std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("write {}", p.display()))?;
            eprintln!("wrote {}", p.display());
        }
        return Ok(());
    }
    let report = run_bench_report(&args).await?;
    println!("\n{}", report.to_markdown());
    if let Some(dir) = &args.out {
        let written = write_outputs(&report, dir)?;
        for p in written {
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}

/// Runs every case and returns the report without printing the table (tests use this).
pub async fn run_bench_report(args: &BenchArgs) -> anyhow::Result<Report> {
    let mut specs: Vec<TargetSpec> = args
        .targets
        .iter()
        .map(|t| parse_target(t))
        .collect::<anyhow::Result<_>>()?;
    specs.extend(args.peers.iter().map(|p| TargetSpec::Peer(*p)));
    if specs.is_empty() {
        bail!("nothing to measure: give --target URI and/or --peer stretch|qemu-nbd|nbdkit");
    }
    let peer_mode = !args.peers.is_empty();
    let rws = if !args.rw.is_empty() {
        args.rw.clone()
    } else if peer_mode {
        vec![Rw::Randread, Rw::Randwrite]
    } else {
        vec![Rw::Randread]
    };
    let qds = if !args.qd.is_empty() {
        args.qd.clone()
    } else if peer_mode {
        vec![1, 32]
    } else {
        vec![1]
    };
    let mut rtts = args.rtt.clone();
    if !rtts.is_empty() && !rtts.contains(&Duration::ZERO) {
        rtts.insert(0, Duration::ZERO);
    }
    if rtts.is_empty() {
        rtts.push(Duration::ZERO);
    }
    rtts.sort();
    rtts.dedup();

    let _tmp_holder;
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None if peer_mode => {
            let d = std::env::temp_dir().join(format!("stretch-bench-{}", std::process::id()));
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
            _tmp_holder = RemoveOnDrop(d.clone());
            d
        }
        None => PathBuf::new(),
    };

    let total = specs.len() * rtts.len() * rws.len() * qds.len();
    let mut done = 0usize;
    let mut cases = Vec::with_capacity(total);
    for spec in &specs {
        let (label, endpoint, server) = match spec {
            TargetSpec::Uri { label, endpoint } => (label.clone(), endpoint.clone(), None),
            TargetSpec::Peer(p) => {
                let s = start_peer(*p, args, &work_dir).await?;
                eprintln!(
                    "{}: started with page cache mode {}",
                    p.label(),
                    args.peer_cache.label()
                );
                (p.label().to_string(), s.endpoint.clone(), Some(s))
            }
        };
        let result = async {
            if args.prefill || server.is_some() {
                let bytes = workload::prefill(&endpoint, args.range).await?;
                eprintln!("{label}: prefilled {bytes} bytes");
            }
            for &rtt in &rtts {
                let link = if rtt.is_zero() {
                    None
                } else {
                    let Endpoint::Tcp { addr, .. } = &endpoint else {
                        bail!("{label}: a Unix-socket target cannot run behind the link emulator");
                    };
                    let link = LinkEmulator::start("127.0.0.1:0", addr)?;
                    link.set_rtt(rtt);
                    Some(link)
                };
                let ep = match &link {
                    Some(l) => endpoint.via(&l.listen_addr().to_string())?,
                    None => endpoint.clone(),
                };
                for &rw in &rws {
                    for &qd in &qds {
                        done += 1;
                        let w = Workload {
                            rw,
                            rwmix_read_pct: args.rwmix_read,
                            block_size_bytes: args.bs,
                            queue_depth: qd,
                            connections: args.connections,
                            duration: args.duration,
                            ops_max: args.ops,
                            rate_ops_per_s: args.rate,
                            range_bytes: args.range,
                            seed: args.seed,
                        };
                        let c = run_case(
                            &label,
                            &ep,
                            &w,
                            rtt,
                            &format!("[{done}/{total}]"),
                            args.quiet,
                        )
                        .await?;
                        println!("{}", summary_line(&c));
                        cases.push(c);
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Some(s) = server {
            s.stop().await;
        }
        result?;
    }
    let mut report = Report {
        tool: format!("stretch-bench {}", env!("CARGO_PKG_VERSION")),
        started_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: Machine::probe(),
        cases,
        ratios: Vec::new(),
    };
    report.compute_floors();
    report.compute_ratios();
    Ok(report)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes report.json, report.md and whichever plots apply; returns the paths written.
pub fn write_outputs(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut files = vec![
        ("report.json", Some(report.to_json())),
        ("report.md", Some(report.to_markdown())),
        ("latency_vs_rtt.svg", plot::latency_vs_rtt(report)),
        ("iops_vs_qd.svg", plot::iops_vs_qd(report)),
    ];
    let mut written = Vec::new();
    for (name, body) in files.drain(..) {
        if let Some(body) = body {
            let p = dir.join(name);
            std::fs::write(&p, body).with_context(|| format!("write {}", p.display()))?;
            written.push(p);
        }
    }
    Ok(written)
}
