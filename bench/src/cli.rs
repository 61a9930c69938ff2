//! The `stretch link ...` command line (and, in `bench_cli`, `stretch bench`). The lead's
//! binary only wires these clap types into its subcommands.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::link::{http, Direction, LinkEmulator, Stream, DEFAULT_ADMIN_ADDR};
use crate::units::{parse_duration, parse_rate_bytes_per_s};

/// `stretch link ...`: what the binary puts under its `Link` subcommand.
#[derive(Debug, Args)]
pub struct LinkArgs {
    #[command(subcommand)]
    pub command: LinkCommand,
}

/// `stretch link <command>`.
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Run a link emulator: a proxy from --listen to --upstream, plus the Toxiproxy API.
    Serve(ServeArgs),
    /// Change delay, jitter or bandwidth of a running emulator through its API.
    Set(SetArgs),
    /// Hold all traffic in one or both directions (nothing passes, nothing is lost).
    Partition(PartitionArgs),
    /// Remove every partition and timeout toxic.
    Heal(TargetArgs),
    /// Print the proxies and their toxics as JSON.
    Status(TargetArgs),
}

/// Which running emulator and proxy a command talks to.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Admin API address of the running emulator.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin: String,
    /// Proxy name in the admin API.
    #[arg(long, default_value = "link")]
    pub proxy: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address clients connect to, e.g. 127.0.0.1:10810.
    #[arg(long)]
    pub listen: String,
    /// Address the proxy forwards to, e.g. 127.0.0.1:10809.
    #[arg(long)]
    pub upstream: String,
    /// Admin API (Toxiproxy-compatible) address.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin: String,
    /// Proxy name in the admin API.
    #[arg(long, default_value = "link")]
    pub name: String,
    /// Initial round-trip time, half each way (e.g. 5ms, 250us).
    #[arg(long, value_parser = parse_duration)]
    pub rtt: Option<Duration>,
    /// Initial jitter each way (uniform +/-).
    #[arg(long, value_parser = parse_duration)]
    pub jitter: Option<Duration>,
    /// Initial bandwidth cap each way (e.g. 100MB/s, 1Gbit).
    #[arg(long, value_parser = parse_rate_bytes_per_s)]
    pub rate: Option<u64>,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Round-trip time, half each way; 0 removes the delay.
    #[arg(long, value_parser = parse_duration)]
    pub rtt: Option<Duration>,
    /// One-way delay client -> upstream (overrides the half of --rtt).
    #[arg(long, value_parser = parse_duration)]
    pub up_delay: Option<Duration>,
    /// One-way delay upstream -> client (overrides the half of --rtt).
    #[arg(long, value_parser = parse_duration)]
    pub down_delay: Option<Duration>,
    /// Jitter each way (uniform +/-); needs a delay to ride on.
    #[arg(long, value_parser = parse_duration)]
    pub jitter: Option<Duration>,
    /// Bandwidth cap each way (e.g. 100MB/s); "0" removes it.
    #[arg(long)]
    pub rate: Option<String>,
}

#[derive(Debug, Args)]
pub struct PartitionArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Which direction stops: up (client -> upstream), down, or both.
    #[arg(long, value_enum, default_value = "both")]
    pub direction: Direction,
}

/// Runs one `stretch link` command.
pub async fn run_link(args: LinkArgs) -> anyhow::Result<()> {
    match args.command {
        LinkCommand::Serve(a) => serve(a).await,
        LinkCommand::Set(a) => set(a).await,
        LinkCommand::Partition(a) => {
            partition_link(&a.target.admin, &a.target.proxy, a.direction).await
        }
        LinkCommand::Heal(t) => heal_link(&t.admin, &t.proxy).await,
        LinkCommand::Status(t) => {
            let (code, resp) =
                http::call(&t.admin, "GET", &format!("/proxies/{}", t.proxy), None).await?;
            if code != 200 {
                bail!("HTTP {code}: {resp}");
            }
            println!("{}", serde_json::to_string_pretty(&resp)?);
            Ok(())
        }
    }
}

/// Cuts `proxy` in `direction` through the Toxiproxy admin API at `admin`.
pub async fn partition_link(admin: &str, proxy: &str, direction: Direction) -> anyhow::Result<()> {
    for &s in direction.streams() {
        let body = json!({"name": format!("partition_{}", s.as_str()), "type": "partition", "stream": s.as_str()});
        let (code, resp) = http::call(admin, "POST", &toxics_path(proxy), Some(&body)).await?;
        // 409: already partitioned that way, which is the state asked for.
        if code != 200 && code != 409 {
            bail!("partition {}: HTTP {code}: {resp}", s.as_str());
        }
    }
    Ok(())
}

/// Removes every partition and timeout toxic of `proxy`.
pub async fn heal_link(admin: &str, proxy: &str) -> anyhow::Result<()> {
    let (code, list) = http::call(admin, "GET", &toxics_path(proxy), None).await?;
    if code != 200 {
        bail!("list toxics: HTTP {code}: {list}");
    }
    for toxic in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        let kind = toxic["type"].as_str().unwrap_or("");
        if kind == "partition" || kind == "timeout" {
            let name = toxic["name"].as_str().unwrap_or("");
            let path = format!("{}/{name}", toxics_path(proxy));
            let (code, resp) = http::call(admin, "DELETE", &path, None).await?;
            if code != 204 && code != 404 {
                bail!("remove {name}: HTTP {code}: {resp}");
            }
        }
    }
    Ok(())
}

fn toxics_path(proxy: &str) -> String {
    format!("/proxies/{proxy}/toxics")
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let mut link = LinkEmulator::start_named(&a.name, &a.listen, &a.upstream)?;
    link.serve_admin(&a.admin).await?;
    if let Some(rtt) = a.rtt {
        link.set_delay(Direction::Both, rtt / 2, a.jitter.unwrap_or_default());
    } else if let Some(j) = a.jitter {
        link.set_delay(Direction::Both, Duration::ZERO, j);
    }
    if let Some(rate) = a.rate {
        link.set_rate(Direction::Both, Some(rate));
    }
    eprintln!(
        "stretch link: {} -> {} (admin API http://{}, proxy {:?}); Ctrl-C stops",
        link.listen_addr(),
        a.upstream,
        link.admin_addr().map(|x| x.to_string()).unwrap_or_default(),
        a.name
    );
    tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
    Ok(())
}

/// Creates or replaces the toxic `<type>_<stream>` through the API; None removes it.
async fn put_toxic(
    t: &TargetArgs,
    type_name: &str,
    s: Stream,
    attrs: Option<Value>,
) -> anyhow::Result<()> {
    let name = format!("{type_name}_{}", s.as_str());
    let path = format!("{}/{name}", toxics_path(&t.proxy));
    let (code, resp) = http::call(&t.admin, "DELETE", &path, None).await?;
    if code != 204 && code != 404 {
        bail!("remove {name}: HTTP {code}: {resp}");
    }
    if let Some(attributes) = attrs {
        let body = json!({"name": name, "type": type_name, "stream": s.as_str(), "attributes": attributes});
        let (code, resp) =
            http::call(&t.admin, "POST", &toxics_path(&t.proxy), Some(&body)).await?;
        if code != 200 {
            bail!("add {name}: HTTP {code}: {resp}");
        }
    }
    Ok(())
}

async fn set(a: SetArgs) -> anyhow::Result<()> {
    let half = a.rtt.map(|r| r / 2);
    for (s, one_way) in [
        (Stream::Upstream, a.up_delay.or(half)),
        (Stream::Downstream, a.down_delay.or(half)),
    ] {
        if one_way.is_none() && a.jitter.is_none() {
            continue;
        }
        // Jitter alone keeps the delay that is set now.
        let delay_ms = match one_way {
            Some(d) => d.as_secs_f64() * 1e3,
            None => current_latency_ms(&a.target, s).await?,
        };
        let jitter_ms = a.jitter.map(|j| j.as_secs_f64() * 1e3).unwrap_or(0.0);
        let attrs = (delay_ms > 0.0 || jitter_ms > 0.0)
            .then(|| json!({"latency": delay_ms, "jitter": jitter_ms}));
        put_toxic(&a.target, "latency", s, attrs).await?;
    }
    if let Some(rate) = &a.rate {
        let attrs = if rate.trim() == "0" {
            None
        } else {
            let r = parse_rate_bytes_per_s(rate).map_err(anyhow::Error::msg)?;
            Some(json!({"rate": r.div_ceil(1000)}))
        };
        for s in [Stream::Upstream, Stream::Downstream] {
            put_toxic(&a.target, "bandwidth", s, attrs.clone()).await?;
        }
    }
    Ok(())
}

async fn current_latency_ms(t: &TargetArgs, s: Stream) -> anyhow::Result<f64> {
    let path = format!("{}/latency_{}", toxics_path(&t.proxy), s.as_str());
    let (code, resp) = http::call(&t.admin, "GET", &path, None).await?;
    Ok(if code == 200 {
        resp["attributes"]["latency"].as_f64().unwrap_or(0.0)
    } else {
        0.0
    })
}

pub use crate::bench::{run_bench, BenchArgs};
