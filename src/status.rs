//! `stretch status --site ADMIN_URL [--site ADMIN_URL] [--json]`: each site's view of its
//! volume, from the site admin API (src/admin.rs) — role, epoch, link, RTT, dirty blocks and
//! resync progress — with a loud warning whenever the volume has a single copy (DESIGN.md §7
//! invariant 2: "while a site is detached, durability is single-copy, and `status` says so").
//!
//! A site that does not answer is shown as unreachable; the command fails only if no site
//! answered. `--json` prints an array with one entry per `--site`, in order: the site's raw
//! `GET /v1/status` object, or `{"admin": ADDR, "unreachable": true, "error": MESSAGE}`.

use anyhow::bail;
use clap::Args;
use serde_json::{json, Value};

use crate::admin_client::AdminClient;
use crate::progress::format_eta;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A site's admin API as `stretch site` prints it (`http://HOST:PORT`); repeat it for
    /// each site.
    #[arg(long = "site", required = true)]
    pub sites: Vec<String>,
    /// Print the raw status objects as a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Sites asked at once; more `--site` flags than this are refused.
const SITES_MAX: usize = 16;

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    if args.sites.len() > SITES_MAX {
        bail!("at most {SITES_MAX} --site flags");
    }
    let clients = args
        .sites
        .iter()
        .map(|s| AdminClient::parse(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let answers = status_of_all(&clients).await;
    let answered = answers.iter().filter(|a| a.is_ok()).count();
    if args.json {
        let list: Vec<Value> = clients
            .iter()
            .zip(&answers)
            .map(|(c, a)| match a {
                Ok(status) => status.clone(),
                Err(err) => {
                    json!({"admin": c.addr, "unreachable": true, "error": format!("{err:#}")})
                }
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&Value::Array(list))?);
    } else {
        print_table(&clients, &answers);
    }
    if answered == 0 {
        bail!("no site answered");
    }
    Ok(())
}

/// Every site's status, asked concurrently (each call bounded by its own timeout).
async fn status_of_all(clients: &[AdminClient]) -> Vec<anyhow::Result<Value>> {
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|c| tokio::spawn(async move { c.status().await }))
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(match task.await {
            Ok(answer) => answer,
            Err(err) => Err(anyhow::anyhow!("status task failed: {err}")),
        });
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn rtt(v: &Value) -> String {
    match v.as_u64() {
        Some(us) if us >= 10_000 => format!("{:.0} ms", us as f64 / 1000.0),
        Some(us) => format!("{:.2} ms", us as f64 / 1000.0),
        None => "-".into(),
    }
}

fn resync(status: &Value) -> String {
    let r = &status["resync"];
    let left = r["blocks_left"].as_u64().unwrap_or(0);
    if left == 0 {
        return "-".into();
    }
    if r["active"].as_bool() != Some(true) {
        // Link up without a resync: the dirty blocks are writes waiting for the peer's ack.
        return match status["replication"]["link_up"].as_bool() {
            Some(false) => format!("{left} blocks waiting for the link"),
            _ => "-".into(),
        };
    }
    let rate = r["rate_blocks_per_s"].as_f64().unwrap_or(0.0);
    let eta = format_eta(r["eta_s"].as_f64());
    format!("{left} blocks left, {rate:.0} blocks/s, ETA {eta}")
}

/// A control-plane field, or "-" for a site without a witness.
fn control_text(v: &Value) -> String {
    match v.as_str() {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => "-".into(),
    }
}

/// The Raft leader's node id as a name: voters a (1), b (2), witness (3).
fn leader(v: &Value) -> String {
    match v.as_u64() {
        Some(1) => "a".into(),
        Some(2) => "b".into(),
        Some(3) => "witness".into(),
        Some(n) => format!("node {n}"),
        None => "-".into(),
    }
}

/// `policy (mode)` from the replica's status: the mode is shown when it differs from the
/// policy's name, with the async writer.
fn policy_text(repl: &Value) -> String {
    let policy = repl["policy"].as_str().unwrap_or("-");
    let mode = match (repl["mode"].as_str(), repl["async_writer"].as_str()) {
        (Some("async"), Some(writer)) => format!("async {writer}"),
        (Some(mode), _) => mode.to_string(),
        (None, _) => "mode unknown".to_string(),
    };
    if mode == policy {
        policy.to_string()
    } else {
        format!("{policy} ({mode})")
    }
}

fn print_table(clients: &[AdminClient], answers: &[anyhow::Result<Value>]) {
    let mut rows = vec![[
        "SITE", "ADMIN", "VOLUME", "ROLE", "EPOCH", "LINK", "RTT", "LAG", "DIRTY", "RESYNC",
        "POLICY", "SERVING", "LEASE", "LEADER",
    ]
    .map(String::from)];
    let mut warnings = Vec::new();
    for (client, answer) in clients.iter().zip(answers) {
        let status = match answer {
            Ok(status) => status,
            Err(err) => {
                rows.push([
                    "?".into(),
                    client.addr.clone(),
                    "-".into(),
                    "UNREACHABLE".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                warnings.push(format!("site at {}: unreachable: {err:#}", client.addr));
                continue;
            }
        };
        let site = text(&status["site"]);
        let volume = text(&status["volume"]["name"]);
        let repl = &status["replication"];
        let role = text(&repl["role"]);
        let link = match repl["link_up"].as_bool() {
            Some(true) => "up",
            Some(false) => "DOWN",
            None => "-",
        };
        rows.push([
            site.clone(),
            client.addr.clone(),
            volume.clone(),
            role.clone(),
            text(&repl["epoch"]),
            link.into(),
            rtt(&repl["rtt_us_smoothed"]),
            match repl["lag_bytes"].as_u64() {
                Some(b) if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
                Some(b) => format!("{} KiB", b.div_ceil(1024)),
                None => "-".into(),
            },
            text(&repl["dirty_blocks"]),
            resync(status),
            // The replica's policy and the mode in force (`adaptive (async a)`: adaptive,
            // currently async with site a writing).
            policy_text(repl),
            control_text(&status["control"]["serving"]),
            match status["control"]["lease_left_ms"].as_u64() {
                Some(ms) => format!("{ms} ms"),
                None => "-".into(),
            },
            leader(&status["control"]["raft_leader"]),
        ]);
        warnings.extend(site_warnings(&site, &volume, &role, repl));
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    for w in warnings {
        println!("{w}");
    }
}

/// The loud lines under the table for one site: anything that puts data at risk or stops
/// service, so that an operator scanning the output cannot miss it.
fn site_warnings(site: &str, volume: &str, role: &str, repl: &Value) -> Vec<String> {
    let mut warnings = Vec::new();
    if role == "survivor" || repl["single_copy"].as_bool() == Some(true) {
        warnings.push(format!(
            "WARNING: SINGLE COPY: site {site} serves volume {volume} alone (the other site is detached); losing site {site} now loses data"
        ));
    } else if role == "loser" {
        warnings.push(format!(
            "WARNING: SINGLE COPY: site {site} is detached from volume {volume}: it serves no writes until resync and rejoin (reads only while it catches up), and the volume's only current copy is at the other site"
        ));
    }
    if repl["failed"].as_bool() == Some(true) {
        warnings.push(format!(
            "WARNING: site {site}: replication stopped after a disk error; every request fails with EIO until a restart"
        ));
    }
    // Blocks that failed their checksum here with no in-sync peer to repair them: reads of
    // them fail with EIO and a catching-up peer does not get them (docs/operations.md).
    if let Some(n) = repl["unrecoverable_blocks"].as_u64().filter(|&n| n > 0) {
        warnings.push(format!(
            "WARNING: site {site}: {n} block(s) of volume {volume} are damaged with no in-sync copy to repair them from; reads of them fail with EIO until they are written again (docs/operations.md, \"Damaged blocks\")"
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn warnings_name_every_risk_to_data() {
        let healthy = json!({"single_copy": false, "failed": false, "unrecoverable_blocks": 0});
        assert!(site_warnings("a", "vol", "in-sync", &healthy).is_empty());

        let w = site_warnings("a", "vol", "survivor", &healthy);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("SINGLE COPY") && w[0].contains("site a"),
            "{w:?}"
        );

        let w = site_warnings("b", "vol", "loser", &healthy);
        assert!(w[0].contains("detached"), "{w:?}");

        let damaged = json!({"failed": true, "unrecoverable_blocks": 3});
        let w = site_warnings("a", "vol", "in-sync", &damaged);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("disk error"), "{w:?}");
        assert!(w[1].contains("3 block(s)") && w[1].contains("EIO"), "{w:?}");
    }
}
