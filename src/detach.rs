//! `stretch detach --survivor SITE --site ADMIN_URL`: the operator lets one site carry on
//! alone, fencing the other (DESIGN.md §4 "Peer loss", §6 "Detach"). The site's control
//! plane proposes the detach through the witness group at the current epoch; the map's
//! compare-and-set decides, exactly as for an automatic detach, and the survivor acknowledges
//! alone only after its lease wait. The detached site comes back through resync and rejoin.

use clap::Args;
use serde_json::json;

use crate::admin_client::AdminClient;

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The site that carries on alone: a or b.
    #[arg(long)]
    pub survivor: String,
    /// Any site's admin API (`admin http://...` as `stretch site` prints it).
    #[arg(long)]
    pub site: String,
}

pub async fn run(args: DetachArgs) -> anyhow::Result<()> {
    if !matches!(args.survivor.as_str(), "a" | "b") {
        anyhow::bail!("--survivor is a or b, not {:?}", args.survivor);
    }
    let client = AdminClient::parse(&args.site)?;
    let reply = client
        .post("/v1/detach", &json!({"survivor": args.survivor}))
        .await?;
    println!(
        "{}",
        reply["outcome"].as_str().unwrap_or("detach committed")
    );
    Ok(())
}
