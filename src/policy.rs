//! `stretch volume policy` and `stretch volume handoff`: change a stretched volume's ack
//! policy live, and move the `async` writer (DESIGN.md §5), through a site's admin API.
//!
//! With a witness the change is committed in the cluster map, and both sites pick it up;
//! the replicas then switch their mode in-band. Without one, each site is told on its own:
//! give both sites (`--site` and `--peer-site`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use crate::admin_client::AdminClient;

#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// sync, sync-received, async or adaptive.
    pub policy: String,
    /// A site's admin API (`admin http://...` as `stretch site` prints it).
    #[arg(long)]
    pub site: String,
    /// The other site's admin API: needed only without a witness, where each site is told
    /// on its own.
    #[arg(long)]
    pub peer_site: Option<String>,
}

#[derive(Debug, Args)]
pub struct HandoffArgs {
    /// The site that becomes the async writer: a or b.
    pub to: String,
    /// A site's admin API.
    #[arg(long)]
    pub site: String,
    /// The other site's admin API (without a witness).
    #[arg(long)]
    pub peer_site: Option<String>,
    /// Give up waiting for the handover after this long (the writer keeps draining).
    #[arg(long, default_value = "60s", value_parser = stretch_bench::units::parse_duration)]
    pub timeout: Duration,
}

/// Sends the change to the site (and the peer site without a witness).
async fn post_policy(site: &str, peer_site: Option<&str>, body: &Value) -> anyhow::Result<()> {
    let mut sites = vec![site];
    sites.extend(peer_site);
    for url in sites {
        let client = AdminClient::parse(url)?;
        let reply = client.post("/v1/policy", body).await?;
        println!(
            "{url}: {}",
            reply["outcome"].as_str().unwrap_or("policy set")
        );
    }
    Ok(())
}

pub async fn run_policy(args: PolicyArgs) -> anyhow::Result<()> {
    if stretch_replicator::core::AckPolicy::parse(&args.policy).is_none() {
        bail!(
            "the policy must be sync, sync-received, async or adaptive, not {:?}",
            args.policy
        );
    }
    post_policy(
        &args.site,
        args.peer_site.as_deref(),
        &json!({"policy": args.policy}),
    )
    .await
}

/// Commits the new writer, then waits until the site reports it as the writer with no lag
/// (the old writer drained its lag until the new one is durable, then handed over).
pub async fn run_handoff(args: HandoffArgs) -> anyhow::Result<()> {
    if !matches!(args.to.as_str(), "a" | "b") {
        bail!("the new writer is a or b, not {:?}", args.to);
    }
    post_policy(
        &args.site,
        args.peer_site.as_deref(),
        &json!({"active_site": args.to}),
    )
    .await?;
    let client = AdminClient::parse(&args.site)?;
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let status = client.status().await.context("read the site's status")?;
        let repl = &status["replication"];
        let writer = repl["async_writer"].as_str();
        let mode = repl["mode"].as_str().unwrap_or("unknown");
        if mode != "async" {
            println!("the volume runs {mode}, not async: the writer takes effect when it next goes async");
            return Ok(());
        }
        if writer == Some(args.to.as_str()) {
            println!(
                "handed over in {:.1} s: site {} is the async writer",
                started.elapsed().as_secs_f64(),
                args.to
            );
            return Ok(());
        }
        if started.elapsed() >= args.timeout {
            bail!(
                "site {} is not the writer after {:?} (lag {} bytes): the old writer is still draining",
                args.to,
                args.timeout,
                repl["lag_bytes"]
            );
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            println!(
                "draining: writer {}, lag {} bytes, oldest {} ms",
                writer.unwrap_or("-"),
                repl["lag_bytes"],
                repl["lag_us"].as_u64().unwrap_or(0) / 1000
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
