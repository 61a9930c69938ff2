//! `stretch up`: a ready-to-use local stretched cluster — site A and site B, each serving the
//! same volume over NBD, replicating synchronously through the link emulator with an emulated
//! RTT (default 5 ms) — printing both URIs and how to cut the link.
//!
//! The witness is not part of it yet: a cut link makes writes wait (never acknowledged at one
//! site only) until the link heals or the request times out.

use std::path::PathBuf;

use anyhow::Context;

use crate::cli::UpArgs;
use crate::config::{check_volume_size, parse_size, NbdConfig};
use crate::site::{self, Settings};
use stretch_bench::link::LinkEmulator;
use stretch_engine::{IoEngineKind, VolumeConfig};

/// Both sites must agree on it; frames of another cluster are refused.
const UP_CLUSTER_ID: u64 = 1;

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let size_bytes = parse_size(&args.size)?;
    check_volume_size(size_bytes)?;
    let io_engine: IoEngineKind = args
        .io_engine
        .parse()
        .map_err(|err| anyhow::anyhow!("--io-engine: {err}"))?;
    let base = match args.data_dir {
        Some(dir) => dir,
        None => fresh_data_dir()?,
    };
    let settings = |name: &str, site: u8, link, listen| Settings {
        site_name: name.into(),
        site,
        cluster_id: UP_CLUSTER_ID,
        link,
        data_dir: base.join(format!("site-{name}")),
        volume: args.volume.clone(),
        size_bytes: Some(size_bytes),
        nbd: NbdConfig {
            listen: vec![listen],
            ..NbdConfig::default()
        },
        volume_config: VolumeConfig {
            io_engine,
            ..VolumeConfig::default()
        },
        request_timeout_ms: 60_000,
    };
    // Site A accepts the replication link; the emulator sits in front of it; B dials the
    // emulator. So every replication byte between the sites crosses the emulated distance.
    let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let site_a = site::start(settings("a", 0, Ok(any_port), args.listen))
        .await
        .context("start site A")?;
    let repl_a = site_a.repl.context("site A has no replication listener")?;
    let mut link = LinkEmulator::start("127.0.0.1:0", &repl_a.to_string())
        .context("start the link emulator")?;
    link.set_rtt(args.rtt);
    let admin = link
        .serve_admin(&args.link_admin)
        .await
        .with_context(|| format!("serve the link emulator's admin API on {}", args.link_admin))?;
    let site_b = site::start(settings("b", 1, Err(link.listen_addr()), args.listen_b))
        .await
        .context("start site B")?;

    let uri_a = &site_a.uris[0];
    let uri_b = &site_b.uris[0];
    let rtt_ms = args.rtt.as_secs_f64() * 1000.0;
    println!(
        "stretch is up: two sites, {rtt_ms} ms RTT between them, data in {}",
        base.display()
    );
    println!();
    println!("  site A  {uri_a}");
    println!("  site B  {uri_b}");
    println!();
    println!("a write at either site is acknowledged once both sites have it:");
    println!("  qemu-io -f raw {uri_a} -c 'write -P 0xab 0 1M'");
    println!("  qemu-io -f raw {uri_b} -c 'read -P 0xab 0 1M'");
    println!();
    println!("the link between the sites (Toxiproxy API on {admin}):");
    println!("  stretch link set --rtt 20ms --admin {admin}");
    println!("  stretch link partition --admin {admin}   # writes wait: none is acknowledged at one site only");
    println!("  stretch link heal --admin {admin}");
    println!();
    println!("Ctrl-C stops it (the data directory is kept).");
    crate::serve::wait_for_shutdown_signal().await;
    site_b.stop().await;
    site_a.stop().await;
    drop(link);
    Ok(())
}

fn fresh_data_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..1000u32 {
        let dir = base.join(format!("stretch-up-{}-{attempt}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => {
                return Err(err).with_context(|| format!("create data directory {}", dir.display()))
            }
        }
    }
    anyhow::bail!(
        "could not create a fresh data directory under {}",
        base.display()
    )
}
