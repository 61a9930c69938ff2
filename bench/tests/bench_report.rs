//! The shape of `stretch bench`'s output: JSON fields, Markdown columns, well-formed SVG,
//! floors and ratios. Runs tiny op counts against an in-process NBD server (and, where
//! installed, qemu-nbd and nbdkit); it checks what the report says, never how fast.

mod common;

use std::process::Command;
use std::sync::Arc;

use clap::Parser;
use common::tool_available;
use serde_json::Value;
use stretch_bench::bench::{run_bench_report, write_outputs};
use stretch_bench::report::Report;
use stretch_bench::BenchArgs;
use stretch_nbd::{Export, MemDevice, Server, ServerConfig};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

fn args(list: &[&str]) -> BenchArgs {
    Cli::try_parse_from(std::iter::once("bench").chain(list.iter().copied()))
        .unwrap_or_else(|e| panic!("parse {list:?}: {e}"))
        .bench
}

async fn mem_server(size_bytes: u64) -> (std::net::SocketAddr, Arc<Server<MemDevice>>) {
    let export = Export {
        name: "vol".into(),
        description: "bench test".into(),
        device: Arc::new(MemDevice::new(size_bytes)),
        read_only: false,
    };
    let server = Server::new(ServerConfig::default(), vec![export]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let s = server.clone();
    tokio::spawn(async move {
        let _ = s.serve_tcp(listener).await;
    });
    (addr, server)
}

/// A minimal XML well-formedness check: every tag closes in order, attributes are quoted,
/// text holds no raw '<' or stray '&'.
fn assert_well_formed_xml(doc: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = doc.trim();
    assert!(rest.starts_with("<svg"), "does not start with <svg");
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        for (i, _) in text.match_indices('&') {
            let ent = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| ent.starts_with(e)),
                "bare & in text: {text:?}"
            );
        }
        let close = rest[open..].find('>').expect("unterminated tag") + open;
        let tag = &rest[open + 1..close];
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in <{tag}>"
        );
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack
                .pop()
                .unwrap_or_else(|| panic!("</{name}> closes nothing"));
            assert_eq!(top, name.trim(), "</{name}> closes <{top}>");
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().expect("tag name").to_string();
            stack.push(name);
        }
        rest = &rest[close + 1..];
    }
    assert!(stack.is_empty(), "unclosed tags: {stack:?}");
}

fn check_report_files(
    report: &Report,
    dir: &std::path::Path,
    expect_rtt_plot: bool,
    expect_qd_plot: bool,
) {
    let written = write_outputs(report, dir).expect("write outputs");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).expect("json file"))
            .expect("report.json parses");
    for key in ["tool", "started_unix_s", "machine", "cases", "ratios"] {
        assert!(json.get(key).is_some(), "report.json lacks {key}");
    }
    for key in ["cpu_model", "cpus", "memory_bytes", "kernel"] {
        assert!(json["machine"].get(key).is_some(), "machine lacks {key}");
    }
    let case_keys = [
        "target",
        "uri",
        "rw",
        "block_size_bytes",
        "queue_depth",
        "connections",
        "rtt_us",
        "rate_ops_per_s",
        "ops",
        "errors",
        "elapsed_s",
        "iops",
        "mb_per_s",
        "latency_us",
        "read_latency_us",
        "write_latency_us",
        "floor",
    ];
    for case in json["cases"].as_array().expect("cases array") {
        for key in case_keys {
            assert!(case.get(key).is_some(), "case lacks {key}: {case}");
        }
        for key in ["p50", "p90", "p99", "p99_9", "max", "mean"] {
            assert!(
                case["latency_us"][key].as_f64().is_some(),
                "latency_us lacks {key}"
            );
        }
    }
    let md = std::fs::read_to_string(dir.join("report.md")).expect("md file");
    let header = md
        .lines()
        .find(|l| l.starts_with("| target"))
        .expect("cases table header");
    let cols: Vec<&str> = header.trim_matches('|').split('|').map(str::trim).collect();
    assert_eq!(cols, Report::CASE_COLUMNS.to_vec());
    let rows = md
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .count();
    assert!(
        rows > report.cases.len(),
        "markdown has {rows} rows for {} cases",
        report.cases.len()
    );
    for (name, expected) in [
        ("latency_vs_rtt.svg", expect_rtt_plot),
        ("iops_vs_qd.svg", expect_qd_plot),
    ] {
        let path = dir.join(name);
        assert_eq!(
            written.contains(&path),
            expected,
            "{name} written: {}",
            !expected
        );
        if expected {
            assert_well_formed_xml(&std::fs::read_to_string(&path).expect("svg"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtt_matrix_report_has_floors_ratios_and_plots() {
    let (addr, server) = mem_server(16 << 20).await;
    let uri = format!("nbd://{addr}/vol");
    let out = tempfile::tempdir().expect("tempdir");
    let a = args(&[
        "--target",
        &format!("a={uri}"),
        "--target",
        &format!("b={uri}"),
        "--rw",
        "randread,randwrite",
        "--qd",
        "1,4",
        "--rtt",
        "2ms",
        "--ops",
        "40",
        "--duration",
        "30s",
        "--quiet",
    ]);
    let report = run_bench_report(&a).await.expect("bench runs");
    // 2 targets x RTT {0, 2 ms} x 2 patterns x 2 queue depths.
    assert_eq!(report.cases.len(), 16);
    for c in &report.cases {
        assert_eq!(c.ops, 40, "{c:?}");
        assert_eq!(c.errors, 0);
        let p = c.latency_us.as_ref().expect("latency");
        assert!(p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p99_9 && p.p99_9 <= p.max * 1.001);
        if c.rtt_us > 0 {
            let f = c
                .floor
                .as_ref()
                .expect("floor beside every figure behind the link");
            assert!(f.p50_us >= 2000.0);
            // Every op crosses the emulated 2 ms RTT once at least.
            assert!(
                p.p50 >= 2000.0 * 0.95,
                "p50 {} µs below the 2 ms RTT",
                p.p50
            );
        } else {
            assert!(c.floor.is_none());
        }
        if c.rw == "randread" {
            assert!(c.write_latency_us.is_none() && c.read_latency_us.is_some());
        }
    }
    // b against a for each of the 8 workload x RTT cells.
    assert_eq!(report.ratios.len(), 8);
    assert!(report
        .ratios
        .iter()
        .all(|r| r.reference == "a" && r.other == "b" && r.iops_ratio > 0.0));
    check_report_files(&report, out.path(), true, true);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_rate_single_case_has_no_plots() {
    let (addr, server) = mem_server(4 << 20).await;
    let out = tempfile::tempdir().expect("tempdir");
    let a = args(&[
        "--target",
        &format!("nbd://{addr}/vol"),
        "--rw",
        "randrw",
        "--bs",
        "8K",
        "--rate",
        "2000",
        "--ops",
        "100",
        "--duration",
        "30s",
        "--quiet",
    ]);
    let report = run_bench_report(&a).await.expect("bench runs");
    assert_eq!(report.cases.len(), 1);
    let c = &report.cases[0];
    assert_eq!(
        (c.ops, c.rate_ops_per_s, c.block_size_bytes),
        (100, Some(2000), 8192)
    );
    // 100 ops offered at 2000/s take about 50 ms: the run must not end before the last
    // intended start, which the rate schedule fixes at 49.5 ms.
    assert!(c.elapsed_s >= 0.0495, "elapsed {} s", c.elapsed_s);
    assert!(c.read_latency_us.is_some() && c.write_latency_us.is_some());
    check_report_files(&report, out.path(), false, false);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_comparison_starts_qemu_nbd_and_nbdkit() {
    let have_qemu = tool_available("qemu-nbd", Command::new("qemu-nbd").arg("--version"));
    let have_nbdkit = tool_available("nbdkit", Command::new("nbdkit").arg("--version"));
    if !(have_qemu && have_nbdkit) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let a = args(&[
        "--peer",
        "qemu-nbd",
        "--peer",
        "nbdkit",
        "--peer-size",
        "8MiB",
        "--ops",
        "64",
        "--duration",
        "30s",
        "--quiet",
        "--work-dir",
        dir.path().to_str().expect("utf-8 path"),
    ]);
    let report = run_bench_report(&a).await.expect("bench runs");
    // Default peer workloads: randread and randwrite at qd 1 and 32, per server.
    assert_eq!(report.cases.len(), 8);
    let labels: Vec<&str> = report.cases.iter().map(|c| c.target.as_str()).collect();
    assert_eq!(&labels[..4], ["qemu-nbd"; 4]);
    assert_eq!(&labels[4..], ["nbdkit"; 4]);
    assert!(report.cases.iter().all(|c| c.errors == 0 && c.ops == 64));
    assert_eq!(report.ratios.len(), 4);
    check_report_files(&report, &dir.path().join("out"), false, true);
}
