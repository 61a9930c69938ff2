//! `stretch witness`: the third voter of the control plane (DESIGN.md §6), at a third site.
//! It stores only its vote, the Raft log and the small cluster map — never block data.
//!
//! `--bootstrap` initialises a fresh group of A (1), B (2) and W (3) with their addresses,
//! once; on a node whose log already holds the group it is a no-op, so a restart with the
//! same command line is safe. Prints `raft://ADDR` on stdout once listening.
//!
//! After a `force-survivor`, `--generation G` starts the witness as generation G's voter: a
//! new node id, its Raft state in `gen-G/` of the data directory (generation.rs), empty until
//! the survivor's `stretch readmit` adds it. The old generation's state stays unused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use tracing::info;

use stretch_witness::raft::generation::{generation_dir, read_generation, write_generation};
use stretch_witness::raft::node::WitnessNode;
use stretch_witness::raft::{node_id, BasicNode, Member, GENERATION_MAX, NODE_A, NODE_B, NODE_W};

use crate::cli::WitnessArgs;

/// A running witness voter.
pub(crate) struct RunningWitness {
    node: WitnessNode,
    pub(crate) addr: SocketAddr,
}

impl RunningWitness {
    pub(crate) async fn stop(self) {
        self.node.shutdown().await;
    }
}

/// The group's members: A and B from the arguments, W this node.
pub(crate) fn members(a: SocketAddr, b: SocketAddr, w: SocketAddr) -> BTreeMap<u64, BasicNode> {
    BTreeMap::from([
        (NODE_A, BasicNode::new(a.to_string())),
        (NODE_B, BasicNode::new(b.to_string())),
        (NODE_W, BasicNode::new(w.to_string())),
    ])
}

/// Starts the witness voter in `dir` on `listen`; bootstraps the group if `bootstrap` names
/// the two sites' Raft addresses and the log is empty.
pub(crate) async fn start(
    dir: PathBuf,
    listen: SocketAddr,
    bootstrap: Option<(SocketAddr, SocketAddr)>,
    generation: Option<u64>,
) -> anyhow::Result<RunningWitness> {
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let recorded = read_generation(&dir)
        .with_context(|| format!("read the generation in {}", dir.display()))?;
    let generation = match generation {
        None => recorded,
        Some(g) if g > GENERATION_MAX => bail!("--generation is at most {GENERATION_MAX}"),
        Some(g) if g < recorded => bail!(
            "{} is in generation {recorded}; a witness never goes back to generation {g}",
            dir.display()
        ),
        Some(g) => {
            if g > recorded {
                write_generation(&dir, g)
                    .with_context(|| format!("record generation {g} in {}", dir.display()))?;
                info!(generation = g, "the witness joins a new generation");
            }
            g
        }
    };
    if generation > 0 && bootstrap.is_some() {
        bail!("--bootstrap makes generation 0's group; a later generation's witness is added by `stretch readmit` at the survivor");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen for Raft on {listen}"))?;
    let addr = listener.local_addr().context("read the Raft address")?;
    let id = node_id(generation, Member::W);
    let node = WitnessNode::start(id, &generation_dir(&dir, generation), listener)
        .await
        .map_err(|e| anyhow::anyhow!("start the witness voter: {e}"))?;
    if let Some((a, b)) = bootstrap {
        let already = node.raft.is_initialized().await.unwrap_or(false);
        if already {
            info!("the group is already bootstrapped; --bootstrap ignored");
        } else {
            node.bootstrap(members(a, b, addr))
                .await
                .map_err(|e| anyhow::anyhow!("bootstrap the group: {e}"))?;
            info!(%a, %b, w = %addr, "bootstrapped the witness group");
        }
    }
    Ok(RunningWitness { node, addr })
}

pub async fn run(args: WitnessArgs) -> anyhow::Result<()> {
    let bootstrap = match (args.bootstrap, args.site_a, args.site_b) {
        (false, None, None) => None,
        (true, Some(a), Some(b)) => Some((a, b)),
        (true, _, _) => {
            bail!("--bootstrap needs --site-a ADDR and --site-b ADDR (their Raft addresses)")
        }
        (false, _, _) => bail!("--site-a/--site-b are only used with --bootstrap"),
    };
    let witness = start(args.data_dir, args.listen, bootstrap, args.generation).await?;
    println!("raft://{}", witness.addr);
    crate::serve::wait_for_shutdown_signal().await;
    witness.stop().await;
    Ok(())
}
