//! `stretch up`: a ready-to-use local stretched cluster — site A and site B, each serving the
//! same volume over NBD, replicating synchronously through the link emulator with an emulated
//! RTT (default 5 ms), and a witness on 127.0.0.3 that arbitrates when the link is cut —
//! printing both URIs and how to cut the link.
//!
//! As in a real stretched cluster, both kinds of inter-site traffic cross the emulated link:
//! the replication link (which also carries the leases) through proxy `link`, and the two
//! sites' Raft voters to each other through proxies `raft-ab` (A dials B) and `raft-ba` (B
//! dials A), all with the same RTT and on the same Toxiproxy API. The witness reaches each
//! site directly. Cutting `link` alone is arbitrated: the preferred site (A) carries on alone
//! within about a second, B fails I/O with EIO, and a heal resyncs and rejoins B. Cutting all
//! three as well as stopping the witness is the double failure: both sites stall until
//! `stretch force-survivor`.

use std::path::PathBuf;

use anyhow::Context;

use crate::cli::UpArgs;
use crate::config::{check_volume_size, parse_size, NbdConfig};
use crate::control::ControlSettings;
use crate::site::{self, Settings};
use stretch_bench::link::{LinkEmulator, ProxyConfig};
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
    // The voters' addresses must be known before the group is bootstrapped: reserve ports.
    let raft_a = free_port(args.listen.ip())?;
    let raft_b = free_port(args.listen_b.ip())?;
    let witness = crate::witness::start(
        base.join("witness"),
        std::net::SocketAddr::new(args.witness_ip, 0),
        Some((raft_a, raft_b)),
        None,
    )
    .await
    .context("start the witness")?;
    let policy = stretch_replicator::core::Policy {
        ack: stretch_replicator::core::AckPolicy::parse(&args.policy).with_context(|| {
            format!(
                "the policy must be sync, sync-received, async or adaptive, not {:?}",
                args.policy
            )
        })?,
        ..stretch_replicator::core::Policy::default()
    };
    // Site A accepts the replication link; the emulator sits in front of it; B dials the
    // emulator. So every replication byte between the sites crosses the emulated distance.
    let repl_a = free_port(args.listen.ip())?;
    let mut link = LinkEmulator::start("127.0.0.1:0", &repl_a.to_string())
        .context("start the link emulator")?;
    link.set_rtt(args.rtt);
    let raft_ab = raft_proxy(&link, "raft-ab", raft_b, args.rtt)?;
    let raft_ba = raft_proxy(&link, "raft-ba", raft_a, args.rtt)?;
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
        // The admin API on the site's own address, port chosen at start.
        admin: std::net::SocketAddr::new(listen.ip(), 0),
        control: Some(ControlSettings {
            raft_listen: if site == 0 { raft_a } else { raft_b },
            raft_peer: Some(if site == 0 { raft_ab } else { raft_ba }),
            dir: base.join(format!("site-{name}")).join("control"),
            arbiter: crate::control::default_arbiter_config(),
            join_timeout: std::time::Duration::from_secs(30),
            preference: stretch_witness::map::Site::A,
            workload: stretch_witness::preference::PreferenceConfig::default(),
            policy,
        }),
        policy,
    };
    // Both sites start together: a site that waits long for its peer detaches it.
    let admin = link
        .serve_admin(&args.link_admin)
        .await
        .with_context(|| format!("serve the link emulator's admin API on {}", args.link_admin))?;
    let (site_a, site_b) = tokio::join!(
        site::start(settings("a", 0, Ok(repl_a), args.listen)),
        site::start(settings("b", 1, Err(link.listen_addr()), args.listen_b)),
    );
    let site_a = site_a.context("start site A")?;
    let site_b = site_b.context("start site B")?;

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
    println!(
        "  stretch link partition --admin {admin}   # A carries on alone in ~1 s; B fails I/O"
    );
    println!("  stretch link heal --admin {admin}        # B resyncs what changed, then rejoins");
    println!(
        "  (the sites' Raft traffic to each other crosses proxies raft-ab and raft-ba: --proxy raft-ab)"
    );
    println!();
    println!("the witness (Raft voter 3) is at {}", witness.addr);
    println!();
    println!("both sites' state, and a block-by-block comparison:");
    let (admin_a, admin_b) = (site_a.admin.addr(), site_b.admin.addr());
    println!("  stretch status --site http://{admin_a} --site http://{admin_b}");
    println!(
        "  stretch verify {} --site http://{admin_a} --site http://{admin_b}",
        args.volume
    );
    println!();
    println!("Ctrl-C stops it (the data directory is kept).");
    crate::serve::wait_for_shutdown_signal().await;
    site_b.stop().await;
    site_a.stop().await;
    witness.stop().await;
    drop(link);
    Ok(())
}

/// A proxy `name` on the emulator's admin API from a fresh port to `upstream`, with the link's
/// RTT: the route one site's Raft voter takes to the other's.
fn raft_proxy(
    link: &LinkEmulator,
    name: &str,
    upstream: std::net::SocketAddr,
    rtt: std::time::Duration,
) -> anyhow::Result<std::net::SocketAddr> {
    let proxy = link
        .registry()
        .create(ProxyConfig {
            name: name.into(),
            listen: "127.0.0.1:0".into(),
            upstream: upstream.to_string(),
            enabled: true,
        })
        .map_err(|e| anyhow::anyhow!("start proxy {name}: {}", e.message))?;
    let half_ms = rtt.as_secs_f64() * 1e3 / 2.0;
    if half_ms > 0.0 {
        for stream in ["upstream", "downstream"] {
            let body = serde_json::json!({
                "name": format!("latency_{stream}"),
                "type": "latency",
                "stream": stream,
                "attributes": {"latency": half_ms, "jitter": 0},
            });
            link.registry()
                .add_toxic(name, &body)
                .map_err(|e| anyhow::anyhow!("latency on proxy {name}: {}", e.message))?;
        }
    }
    proxy
        .listen_addr()
        .with_context(|| format!("proxy {name} has no listen address"))
}

/// A port free on `ip` right now (bound and released). Only `stretch up` uses this, on a
/// single machine, to name the voters before they start.
fn free_port(ip: std::net::IpAddr) -> anyhow::Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind((ip, 0))
        .with_context(|| format!("find a free port on {ip}"))?;
    l.local_addr().context("read a reserved port")
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
