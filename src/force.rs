//! The double failure (DESIGN.md §6): the inter-site link and the witness are lost together,
//! nothing can commit and both sites stall. Three operator commands get the volume served
//! again, with the data loss stated before anything is done (docs/operations.md, "After
//! force-survivor"):
//!
//! - `stretch force-survivor SITE --site ADMIN [--accept-data-loss]`: the stalled site SITE
//!   becomes a one-voter group of a new generation (new node id), its map carried over with
//!   every CG at epoch `(generation, 1)`, the other site detached and fenced below it. Without
//!   `--accept-data-loss` it prints the last known epoch, the site's state and what may be
//!   lost, and exits 1 without acting. Refused while the group can still commit.
//! - `stretch prepare-rejoin --data-dir DIR --site B --generation G` (the other site, stopped):
//!   records generation G (its old Raft state stays on disk, never read again) and marks every
//!   block of its volume dirty, so that when it starts it asks the survivor for every block:
//!   a full resync, its own blocks saved to its side file first.
//! - `stretch readmit --site ADMIN --witness ADDR --peer ADDR`: the survivor adds the
//!   witness and the other site, each running under generation G, back as voters.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use stretch_engine::{Volume, VolumeConfig};
use stretch_witness::raft::generation::{discard_unrecorded, read_generation, write_generation};
use stretch_witness::raft::GENERATION_MAX;

use crate::admin_client::AdminClient;

#[derive(Debug, Args)]
pub struct ForceSurvivorArgs {
    /// The site that carries on alone: a or b. It must be the site whose admin API --site names.
    pub survivor: String,
    /// That site's admin API (`admin http://...` as `stretch site` prints it).
    #[arg(long)]
    pub site: String,
    /// Act. Without it, only show the last known epoch and what may be lost.
    #[arg(long)]
    pub accept_data_loss: bool,
}

#[derive(Debug, Args)]
pub struct PrepareRejoinArgs {
    /// The site's data directory (as given to `stretch site --data-dir`).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Which site this is: a or b.
    #[arg(long)]
    pub site: String,
    /// The volume the site replicates.
    #[arg(long, default_value = "vol0")]
    pub volume: String,
    /// The generation `force-survivor` started (it prints it).
    #[arg(long)]
    pub generation: u64,
    /// The site's control directory; default DATA_DIR/control-SITE (what `stretch site` uses).
    #[arg(long)]
    pub control_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReadmitArgs {
    /// The survivor's admin API.
    #[arg(long)]
    pub site: String,
    /// The witness's Raft address (`stretch witness --listen`), running with --generation G.
    #[arg(long)]
    pub witness: Option<SocketAddr>,
    /// The other site's Raft address (its --raft-listen), started after `prepare-rejoin`.
    #[arg(long)]
    pub peer: Option<SocketAddr>,
}

pub async fn force_survivor(args: ForceSurvivorArgs) -> anyhow::Result<()> {
    if !matches!(args.survivor.as_str(), "a" | "b") {
        bail!("the survivor is a or b, not {:?}", args.survivor);
    }
    let client = AdminClient::parse(&args.site)?;
    // The site acts on itself: naming the wrong one must not crown the other.
    let status = client.status().await?;
    let name = status["site"].as_str().unwrap_or_default();
    if name != args.survivor {
        bail!(
            "{} is site {name:?}'s admin API, not site {:?}'s",
            args.site,
            args.survivor
        );
    }
    let reply = client
        .post(
            "/v1/force-survivor",
            &json!({"accept_data_loss": args.accept_data_loss}),
        )
        .await?;
    print!("{}", reply["report"].as_str().unwrap_or_default());
    if reply["acted"].as_bool() != Some(true) {
        return Err(crate::verify::ExitStatus(1).into());
    }
    Ok(())
}

pub async fn prepare_rejoin(args: PrepareRejoinArgs) -> anyhow::Result<()> {
    if !matches!(args.site.as_str(), "a" | "b") {
        bail!("--site is a or b, not {:?}", args.site);
    }
    if args.generation == 0 || args.generation > GENERATION_MAX {
        bail!("--generation is between 1 and {GENERATION_MAX}");
    }
    let control = args
        .control_dir
        .unwrap_or_else(|| args.data_dir.join(format!("control-{}", args.site)));
    let current = read_generation(&control)
        .with_context(|| format!("read the generation in {}", control.display()))?;
    if current >= args.generation {
        bail!(
            "{} is already in generation {current}: prepare-rejoin runs once, before the site first starts in generation {}",
            control.display(),
            args.generation
        );
    }
    // Every block dirty, durably, before the generation is recorded: a crash in between
    // leaves the site in its old generation, and running this again is harmless.
    let (dir, name) = (args.data_dir.clone(), args.volume.clone());
    let blocks = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let cfg = VolumeConfig {
            direct_io: false,
            ..VolumeConfig::default()
        };
        let volume = Volume::open(&dir, &name, &cfg)
            .with_context(|| format!("open volume {name:?} in {}", dir.display()))?;
        let size = stretch_engine::BlockDevice::size_bytes(&volume);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .context("a runtime to mark the volume dirty")?;
        rt.block_on(volume.mark_dirty(0, size))
            .map_err(|e| anyhow::anyhow!("mark every block dirty: {e}"))?;
        Ok(size / u64::from(stretch_engine::BLOCK_SIZE))
    })
    .await
    .context("mark the volume dirty")??;
    std::fs::create_dir_all(&control).with_context(|| format!("create {}", control.display()))?;
    discard_unrecorded(&control, args.generation)
        .with_context(|| format!("clear generation {}'s directory", args.generation))?;
    write_generation(&control, args.generation)
        .with_context(|| format!("record generation {}", args.generation))?;
    println!(
        "site {}: generation {} recorded in {} (the old generation's Raft state stays there, unused); all {blocks} blocks of {:?} marked for a full resync.",
        args.site,
        args.generation,
        control.display(),
        args.volume
    );
    println!(
        "Start the site as before; then, at the survivor: stretch readmit --site ADMIN --peer THIS_SITE_RAFT_ADDR"
    );
    Ok(())
}

pub async fn readmit(args: ReadmitArgs) -> anyhow::Result<()> {
    let client = AdminClient::parse(&args.site)?;
    let reply = client
        .post(
            "/v1/readmit",
            &json!({
                "witness": args.witness.map(|a| a.to_string()),
                "peer": args.peer.map(|a| a.to_string()),
            }),
        )
        .await?;
    println!("{}", reply["outcome"].as_str().unwrap_or("readmitted"));
    Ok(())
}
