//! 4 KiB random read and write at queue depth 1 and 32 through the Stretch engines (io_uring,
//! psync) and through `fio` on the same data file, printed as one Markdown table.
//!
//! Run: `cargo bench -p stretch-engine` (about two minutes).
//! Knobs: `STRETCH_BENCH_DIR` (where the 1 GiB volume goes; default the temp dir — put it on
//! the disk you care about), `STRETCH_BENCH_SIZE_MIB` (default 1024), `STRETCH_BENCH_SECS` per
//! cell (default 4), `STRETCH_BENCH_ROUNDS` (default 1: with N, each cell runs N times, the
//! runners taking turns, and the table shows medians — for a noisy shared disk); for
//! profiling, `STRETCH_BENCH_FILTER` (workloads containing it, e.g. `randread`),
//! `STRETCH_BENCH_QD` (1 or 32) and `STRETCH_BENCH_RUNNERS` (a comma list of `stretch-uring`,
//! `stretch-psync`, `fio-io_uring`, `fio-psync`). Without fio the engine rows still run and a
//! loud SKIPPED line says so;
//! with `STRETCH_REQUIRE_TOOLS=1` a missing fio is a failure.
//!
//! Each Stretch cell runs QD tasks on a current-thread tokio runtime; every task loops: pick a
//! uniformly random block, read or write it (full path: locks, checksum, records), record the
//! latency. Writes are plain writes (no FUA), like fio's `--direct=1` writes without fsync.
//! Reads run before writes, because fio's writes change the file behind the engine's back and
//! would (rightly) fail its checksums.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use stretch_engine::{AlignedBuf, BlockDevice, IoEngineKind, Volume, VolumeConfig};

struct Cell {
    workload: &'static str,
    qd: u32,
    runner: String,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing we need.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let size_bytes = env_u64("STRETCH_BENCH_SIZE_MIB", 1024) * 1024 * 1024;
    let secs = env_u64("STRETCH_BENCH_SECS", 4);
    let rounds = env_u64("STRETCH_BENCH_ROUNDS", 1).max(1);
    let base = std::env::var_os("STRETCH_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).expect("create bench dir");
    let fio = fio_available();
    if !fio {
        if std::env::var("STRETCH_REQUIRE_TOOLS").as_deref() == Ok("1") {
            eprintln!("FAILED: fio not installed and STRETCH_REQUIRE_TOOLS=1");
            std::process::exit(1);
        }
        eprintln!("\n*** SKIPPED: fio not installed — only the Stretch rows will run ***\n");
    }

    let prefill_cfg = VolumeConfig {
        io_engine: IoEngineKind::Auto,
        ..VolumeConfig::default()
    };
    let vol = Volume::create(dir.path(), "bench", size_bytes, &prefill_cfg).expect("create");
    let data_path = vol.info().data_path;
    let direct = vol.is_direct_io();
    eprintln!(
        "prefilling {} MiB at {} (O_DIRECT: {direct}) ...",
        size_bytes >> 20,
        data_path.display()
    );
    // With the I/O driver the io_uring engine reaps completions on this thread (an eventfd in
    // the runtime's epoll set), like fio's single thread, instead of through its ring thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    rt.block_on(prefill(&vol, size_bytes));
    drop(vol);

    // STRETCH_BENCH_FILTER=randread (a substring of the workload) runs only matching cells.
    let filter = std::env::var("STRETCH_BENCH_FILTER").unwrap_or_default();
    // STRETCH_BENCH_RUNNERS=stretch-uring,fio-io_uring runs only those (for profiling).
    let runners_env = std::env::var("STRETCH_BENCH_RUNNERS")
        .unwrap_or_else(|_| "stretch-uring,stretch-psync,fio-io_uring,fio-psync".into());
    let runners: Vec<&str> = runners_env.split(',').map(str::trim).collect();
    let qd_only: Option<u32> = std::env::var("STRETCH_BENCH_QD")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut cells = Vec::new();
    for workload in ["randread", "randwrite"] {
        if !workload.contains(filter.as_str()) {
            continue;
        }
        for qd in [1u32, 32] {
            if qd_only.is_some_and(|only| only != qd) {
                continue;
            }
            // Rounds alternate the runners, so a drift in the shared disk's latency (other
            // I/O on the machine) hits them alike; each figure is the median over rounds.
            for round in 0..rounds {
                if rounds > 1 {
                    eprintln!("{workload} qd{qd} round {}/{rounds}", round + 1);
                }
                for kind in [IoEngineKind::Uring, IoEngineKind::Psync] {
                    if !runners.contains(&format!("stretch-{kind}").as_str()) {
                        continue;
                    }
                    let cfg = VolumeConfig {
                        io_engine: kind,
                        ..VolumeConfig::default()
                    };
                    let vol = Arc::new(Volume::open(dir.path(), "bench", &cfg).expect("open"));
                    let name = format!("stretch {}", vol.io_engine_name());
                    let (iops, p50_us, p99_us) =
                        rt.block_on(run_engine(vol, workload, qd, size_bytes, secs));
                    eprintln!("{workload} qd{qd} {name}: {iops:.0} IOPS p50 {p50_us:.1} us p99 {p99_us:.1} us");
                    cells.push(Cell {
                        workload,
                        qd,
                        runner: name,
                        iops,
                        p50_us,
                        p99_us,
                    });
                }
                if fio {
                    for ioengine in ["io_uring", "psync"] {
                        if !runners.contains(&format!("fio-{ioengine}").as_str()) {
                            continue;
                        }
                        match run_fio(&data_path, workload, qd, ioengine, size_bytes, secs, direct)
                        {
                            Ok((iops, p50_us, p99_us)) => {
                                eprintln!("{workload} qd{qd} fio {ioengine}: {iops:.0} IOPS p50 {p50_us:.1} us p99 {p99_us:.1} us");
                                cells.push(Cell {
                                    workload,
                                    qd,
                                    runner: format!("fio {ioengine}"),
                                    iops,
                                    p50_us,
                                    p99_us,
                                });
                            }
                            Err(err) => eprintln!("fio {ioengine} {workload} qd{qd} failed: {err}"),
                        }
                    }
                }
            }
        }
    }
    print_table(&median_over_rounds(&cells), secs, direct, rounds);
}

/// One cell per workload, depth and runner: the median IOPS, p50 and p99 over its rounds.
fn median_over_rounds(samples: &[Cell]) -> Vec<Cell> {
    let mut out: Vec<Cell> = Vec::new();
    for s in samples {
        if out
            .iter()
            .any(|c| c.workload == s.workload && c.qd == s.qd && c.runner == s.runner)
        {
            continue;
        }
        let same: Vec<&Cell> = samples
            .iter()
            .filter(|c| c.workload == s.workload && c.qd == s.qd && c.runner == s.runner)
            .collect();
        let median = |f: fn(&Cell) -> f64| {
            let mut v: Vec<f64> = same.iter().map(|c| f(c)).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        out.push(Cell {
            workload: s.workload,
            qd: s.qd,
            runner: s.runner.clone(),
            iops: median(|c| c.iops),
            p50_us: median(|c| c.p50_us),
            p99_us: median(|c| c.p99_us),
        });
    }
    out
}

async fn prefill(vol: &Volume, size_bytes: u64) {
    const CHUNK_BYTES: u64 = 1024 * 1024;
    let mut offset = 0;
    while offset < size_bytes {
        let mut buf = AlignedBuf::zeroed(CHUNK_BYTES as usize);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (offset as usize + i).wrapping_mul(2_654_435_761) as u8 | 1;
        }
        vol.write(offset, buf, false).await.expect("prefill write");
        offset += CHUNK_BYTES;
    }
    vol.flush().await.expect("prefill flush");
}

async fn run_engine(
    vol: Arc<Volume>,
    workload: &'static str,
    qd: u32,
    size_bytes: u64,
    secs: u64,
) -> (f64, f64, f64) {
    let blocks = size_bytes / 4096;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..qd {
        let vol = vol.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (u64::from(t) << 32);
            let mut ops = 0u64;
            while Instant::now() < deadline {
                // xorshift: cheap, and good enough to spread offsets uniformly.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let offset = (rng % blocks) * 4096;
                let t0 = Instant::now();
                if workload == "randread" {
                    vol.read(offset, 4096).await.expect("bench read");
                } else {
                    let buf = AlignedBuf::from_slice(&[(ops as u8) | 1; 4096]);
                    vol.write(offset, buf, false).await.expect("bench write");
                }
                hist.record(t0.elapsed().as_nanos() as u64).expect("record");
                ops += 1;
            }
            (ops, hist)
        }));
    }
    let mut total = 0;
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    for task in tasks {
        let (ops, h) = task.await.expect("bench task");
        total += ops;
        hist.add(h).expect("merge histograms");
    }
    let elapsed = started.elapsed().as_secs_f64();
    (
        total as f64 / elapsed,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
    )
}

fn fio_available() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run_fio(
    path: &Path,
    workload: &str,
    qd: u32,
    ioengine: &str,
    size_bytes: u64,
    secs: u64,
    direct: bool,
) -> Result<(f64, f64, f64), String> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bench",
        &format!("--filename={}", path.display()),
        &format!("--rw={workload}"),
        "--bs=4k",
        &format!("--ioengine={ioengine}"),
        &format!("--direct={}", u8::from(direct)),
        &format!("--size={size_bytes}"),
        "--time_based",
        &format!("--runtime={secs}"),
        "--norandommap",
        "--randrepeat=0",
        "--lat_percentiles=1",
        "--output-format=json",
    ]);
    if ioengine == "psync" {
        // psync is synchronous: queue depth N means N threads, like the psync engine's pool.
        cmd.args([
            "--iodepth=1",
            &format!("--numjobs={qd}"),
            "--thread",
            "--group_reporting",
        ]);
    } else {
        cmd.arg(format!("--iodepth={qd}"));
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("fio json: {e}"))?;
    let side = if workload == "randread" {
        "read"
    } else {
        "write"
    };
    let job = &json["jobs"][0][side];
    let iops = job["iops"].as_f64().ok_or("no iops in fio output")?;
    let lat = if job["lat_ns"]["percentile"].is_object() {
        &job["lat_ns"]["percentile"]
    } else {
        &job["clat_ns"]["percentile"]
    };
    let p = |k: &str| lat[k].as_f64().map(|ns| ns / 1000.0).unwrap_or(f64::NAN);
    Ok((iops, p("50.000000"), p("99.000000")))
}

fn print_table(cells: &[Cell], secs: u64, direct: bool, rounds: u64) {
    println!();
    println!(
        "4 KiB random I/O, {secs} s per cell and round, {rounds} round(s) (medians), \
         O_DIRECT={direct}. Ratios: stretch io_uring vs fio io_uring, stretch psync vs fio psync \
         (IOPS: higher is better; p50: lower is better)."
    );
    println!();
    println!("| workload | QD | runner | IOPS | p50 µs | p99 µs | IOPS / fio | p50 / fio |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    for c in cells {
        let reference = match c.runner.as_str() {
            "stretch io_uring" => Some("fio io_uring"),
            "stretch psync" => Some("fio psync"),
            _ => None,
        }
        .and_then(|r| {
            cells
                .iter()
                .find(|f| f.runner == r && f.workload == c.workload && f.qd == c.qd)
        });
        let (iops_ratio, p50_ratio) = match reference {
            Some(f) => (
                format!("{:.2}x", c.iops / f.iops),
                format!("{:.2}x", c.p50_us / f.p50_us),
            ),
            None => ("".into(), "".into()),
        };
        println!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} |",
            c.workload, c.qd, c.runner, c.iops, c.p50_us, c.p99_us, iops_ratio, p50_ratio
        );
    }
}
