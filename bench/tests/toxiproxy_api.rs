//! The admin API against clients nobody here wrote (DESIGN.md §8: "speaks Toxiproxy's HTTP
//! API, so the chaos tools users already have drive it"), and the `stretch link` CLI.

mod common;

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use common::{connect, echo_server, median_rtt, tool_available};
use stretch_bench::link::toxic::ToxicKind;
use stretch_bench::link::LinkEmulator;
use stretch_bench::{run_link, LinkArgs};

const PYTHON: &str = "python3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toxiproxy_python_client_drives_the_api() {
    let probe_ok = tool_available(
        "toxiproxy-python (pip install toxiproxy-python requests)",
        Command::new(PYTHON).args(["-c", "import toxiproxy, requests"]),
    );
    if !probe_ok {
        return;
    }
    let upstream = echo_server();
    let link = LinkEmulator::start_with_admin("127.0.0.1:0", &upstream.to_string(), "127.0.0.1:0")
        .await
        .expect("start link with admin API");
    let port = link.admin_addr().expect("admin").port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/toxiproxy_client.py");
    let out = tokio::process::Command::new(PYTHON)
        .arg(script)
        .arg(port.to_string())
        .arg(upstream.to_string())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("python client finished within 120 s")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "toxiproxy-python script failed");
    assert!(stdout.contains("toxiproxy-python: OK"));
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    link: LinkArgs,
}

async fn cli(args: &[&str]) {
    let parsed = Cli::try_parse_from(std::iter::once("link").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("parse {args:?}: {e}"));
    run_link(parsed.link)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_set_partition_heal_change_a_running_link() {
    let link =
        LinkEmulator::start_with_admin("127.0.0.1:0", &echo_server().to_string(), "127.0.0.1:0")
            .await
            .expect("start link with admin API");
    let admin = link.admin_addr().expect("admin").to_string();
    let kinds = |link: &LinkEmulator| -> Vec<(String, ToxicKind)> {
        link.proxy()
            .toxics
            .snapshot()
            .into_iter()
            .map(|t| (t.name, t.kind))
            .collect()
    };

    cli(&["set", "--admin", &admin, "--rtt", "5ms"]).await;
    let mut got = kinds(&link);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let half = ToxicKind::Latency {
        delay_us: 2_500,
        jitter_us: 0,
    };
    assert_eq!(
        got,
        vec![
            ("latency_downstream".into(), half.clone()),
            ("latency_upstream".into(), half)
        ]
    );
    // The setting shows on the wire, not only in the registry.
    let addr = link.listen_addr();
    let rtt = tokio::task::spawn_blocking(move || median_rtt(&mut connect(addr), 20))
        .await
        .expect("measure");
    assert!(
        rtt >= Duration::from_millis(5),
        "rtt {rtt:?} below the 5 ms set"
    );

    cli(&[
        "set",
        "--admin",
        &admin,
        "--up-delay",
        "1ms",
        "--rate",
        "10MB/s",
    ])
    .await;
    let up = link.proxy().toxics.snapshot();
    assert!(up.iter().any(|t| t.name == "latency_upstream"
        && t.kind
            == ToxicKind::Latency {
                delay_us: 1_000,
                jitter_us: 0
            }));
    assert!(up.iter().any(|t| t.name == "bandwidth_downstream"
        && t.kind
            == ToxicKind::Bandwidth {
                rate_bytes_per_s: 10_000_000
            }));

    cli(&["partition", "--admin", &admin, "--direction", "up"]).await;
    let parts = |link: &LinkEmulator| {
        link.proxy()
            .toxics
            .snapshot()
            .iter()
            .filter(|t| t.kind == ToxicKind::Partition)
            .count()
    };
    assert_eq!(parts(&link), 1);
    cli(&["partition", "--admin", &admin]).await;
    assert_eq!(parts(&link), 2);
    cli(&["heal", "--admin", &admin]).await;
    assert_eq!(parts(&link), 0);
    cli(&["set", "--admin", &admin, "--rtt", "0", "--rate", "0"]).await;
    assert!(link.proxy().toxics.snapshot().is_empty());
    cli(&["status", "--admin", &admin]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_have_toxiproxy_shape() {
    let link =
        LinkEmulator::start_with_admin("127.0.0.1:0", &echo_server().to_string(), "127.0.0.1:0")
            .await
            .expect("start link with admin API");
    let admin = link.admin_addr().expect("admin").to_string();
    let call = stretch_bench::link::http::call;
    let (code, body) = call(&admin, "GET", "/proxies/nosuch", None)
        .await
        .expect("call");
    assert_eq!(code, 404);
    assert_eq!(
        body,
        serde_json::json!({"error": "proxy not found", "status": 404})
    );
    let (code, body) = call(&admin, "GET", "/version", None).await.expect("call");
    assert_eq!(code, 200);
    assert!(body["version"].is_string());
    let (code, _) = call(
        &admin,
        "POST",
        "/proxies/link/toxics",
        Some(&serde_json::json!({"type": "latency", "stream": "sideways"})),
    )
    .await
    .expect("call");
    assert_eq!(code, 400);
    let (code, _) = call(&admin, "PUT", "/proxies", None).await.expect("call");
    assert_eq!(code, 405);
}
