//! `stretch site`: one site of a stretched volume — the local engine volume, replication to
//! the peer site under the `sync` policy, and NBD for the hypervisor (DESIGN.md §1).
//!
//! Until the witness lands the cluster map is fixed: both sites in sync at epoch 1, nothing
//! fenced. A site that loses its peer keeps every write waiting (never acknowledging one the
//! peer has not applied) until the link returns or the request times out with EIO; only a
//! committed detach may let one site carry on alone.
//!
//! Output: `repl://ADDR` (listening site only) and then one `nbd://ADDR/VOLUME` per NBD
//! listener on stdout, once listening; logs go to stderr.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tracing::info;

use crate::cli::SiteArgs;
use crate::config::{parse_size, Config};
use crate::serve::NbdListeners;
use stretch_engine::{BlockDevice, IoEngineKind, Volume, VolumeConfig};
use stretch_nbd::Export;
use stretch_replicator::core::{Config as ReplicaConfig, MapView, Role};
use stretch_replicator::driver::DriverConfig;
use stretch_replicator::link::{LinkConfig, LinkMode};
use stretch_replicator::{ReplicatedOptions, ReplicatedVolume};

/// The epoch both sites start in while the cluster map is fixed (no witness yet).
const FIXED_EPOCH: u32 = 1;

/// Everything `stretch site` runs with: the config file, overridden by flags.
pub(crate) struct Settings {
    pub(crate) site_name: String,
    pub(crate) site: u8,
    pub(crate) cluster_id: u64,
    /// `Ok(listen)`: this site accepts the link; `Err(peer)`: it dials.
    pub(crate) link: Result<SocketAddr, SocketAddr>,
    pub(crate) data_dir: std::path::PathBuf,
    pub(crate) volume: String,
    pub(crate) size_bytes: Option<u64>,
    pub(crate) nbd: crate::config::NbdConfig,
    pub(crate) volume_config: VolumeConfig,
    pub(crate) request_timeout_ms: u64,
}

fn settings(args: SiteArgs) -> anyhow::Result<Settings> {
    let config = match (&args.config, &args.data_dir) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(dir)) => Config::with_data_dir(dir.clone()),
        (None, None) => bail!("stretch site needs --config FILE or --data-dir DIR"),
    };
    let repl = config.replication.as_ref();
    let Some(site_name) = args.site.or_else(|| repl.map(|r| r.site.clone())) else {
        bail!("give the site with --site a|b or [replication] site");
    };
    let site: u8 = match site_name.as_str() {
        "a" => 0,
        "b" => 1,
        other => bail!("the site must be a or b, not {other:?}"),
    };
    let Some(cluster_id) = args.cluster_id.or_else(|| repl.map(|r| r.cluster_id)) else {
        bail!("give the cluster id with --cluster-id or [replication] cluster_id");
    };
    // Flags for the link replace the config's as a pair, so a flag never mixes with the
    // other mode from the file.
    let (listen, peer) = if args.repl_listen.is_some() || args.peer.is_some() {
        (args.repl_listen, args.peer)
    } else {
        (repl.and_then(|r| r.listen), repl.and_then(|r| r.peer))
    };
    let link = match (listen, peer) {
        (Some(listen), None) => Ok(listen),
        (None, Some(peer)) => Err(peer),
        _ => bail!(
            "give exactly one of --repl-listen (this site accepts the link) or --peer (this site dials it)"
        ),
    };
    if config.volumes.len() > 1 {
        bail!(
            "a site replicates one volume; the config lists {}",
            config.volumes.len()
        );
    }
    let configured = config.volumes.first();
    let volume = args
        .volume
        .or_else(|| configured.map(|v| v.name.clone()))
        .unwrap_or_else(|| "vol0".into());
    let size_bytes = match (&args.size, configured.and_then(|v| v.size.as_ref())) {
        (Some(text), _) => Some(parse_size(text)?),
        (None, Some(size)) => Some(size.bytes()?),
        (None, None) => None,
    };
    let mut nbd = config.nbd.clone();
    if !args.listen.is_empty() {
        nbd.listen = args.listen;
    }
    let io_engine: IoEngineKind = args
        .io_engine
        .unwrap_or_else(|| config.engine.io_engine.clone())
        .parse()
        .map_err(|err| anyhow::anyhow!("io engine: {err}"))?;
    let volume_config = VolumeConfig {
        io_engine,
        direct_io: config.engine.direct_io && !args.buffered_io,
        ..VolumeConfig::default()
    };
    let request_timeout_ms = args
        .request_timeout_ms
        .or_else(|| repl.map(|r| r.request_timeout_ms))
        .unwrap_or(60_000);
    Ok(Settings {
        site_name,
        site,
        cluster_id,
        link,
        data_dir: args.data_dir.unwrap_or(config.data_dir),
        volume,
        size_bytes,
        nbd,
        volume_config,
        request_timeout_ms,
    })
}

pub async fn run(args: SiteArgs) -> anyhow::Result<()> {
    let site = start(settings(args)?).await?;
    if let Some(repl) = site.repl {
        println!("repl://{repl}");
    }
    for uri in &site.uris {
        println!("{uri}");
    }
    crate::serve::wait_for_shutdown_signal().await;
    site.stop().await;
    Ok(())
}

/// A running site: its replicated volume and NBD listeners.
pub(crate) struct RunningSite {
    nbd: NbdListeners<ReplicatedVolume>,
    device: Arc<ReplicatedVolume>,
    /// Where this site accepts the replication link, if it is the listening side.
    pub(crate) repl: Option<SocketAddr>,
    /// One URI of the volume per NBD listener (`nbd://ADDR/VOLUME`, `nbd+unix:///VOLUME?socket=`).
    pub(crate) uris: Vec<String>,
}

impl RunningSite {
    /// Stops accepting, lets in-flight requests finish, then returns.
    pub(crate) async fn stop(self) {
        self.nbd.stop().await;
        info!(
            driver = ?self.device.driver_stats(),
            link = ?self.device.link_stats(),
            "site stopped"
        );
    }
}

/// Opens (or creates) the volume, starts replication and the NBD listeners.
pub(crate) async fn start(s: Settings) -> anyhow::Result<RunningSite> {
    let (dir, name, size_bytes, volume_config) = (
        s.data_dir.clone(),
        s.volume.clone(),
        s.size_bytes,
        s.volume_config.clone(),
    );
    let volume = tokio::task::spawn_blocking(move || {
        open_or_create(&dir, &name, size_bytes, &volume_config)
    })
    .await
    .context("open the volume")??;
    let volume = Arc::new(volume);

    let id = volume_id(&s.volume);
    let mut replica = ReplicaConfig::new(s.site, s.cluster_id, id, id);
    replica.heartbeat_interval_us = 10_000;
    // Over TCP a frame is lost only with its connection, and the core resends everything
    // unacknowledged on every link-up; the timer only covers frames the driver dropped when
    // its outbound queue was full. A short timer would resend writes the peer is still
    // applying, and every resend costs a full write's bytes on the link.
    replica.retransmit_after_us = 1_000_000;
    let map = MapView {
        role: Role::InSync,
        epoch: FIXED_EPOCH,
        fenced_before: [0, 0],
    };
    let data_path = volume.info().data_path;
    let mut options = ReplicatedOptions::new(
        DriverConfig::new(data_path.with_extension("divergent")),
        LinkConfig::new(s.cluster_id),
    );
    options.request_timeout_ms = s.request_timeout_ms;
    let mut repl = None;
    let mode = match s.link {
        Ok(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listen for the replication link on {listen}"))?;
            let local = listener
                .local_addr()
                .context("read the replication listen address")?;
            repl = Some(local);
            LinkMode::Listen(listener)
        }
        Err(peer) => LinkMode::Dial(peer),
    };
    let device = ReplicatedVolume::start(volume.clone(), replica, map, mode, options)
        .map_err(|e| anyhow::anyhow!("start replication: {e}"))?;
    let device = Arc::new(device);
    info!(
        site = %s.site_name,
        volume = %s.volume,
        size_bytes = device.size_bytes(),
        io_engine = volume.io_engine_name(),
        "site started"
    );

    let exports = vec![Export {
        name: s.volume.clone(),
        description: format!("stretched volume, site {}", s.site_name),
        device: device.clone(),
        read_only: false,
    }];
    let nbd = NbdListeners::start(&s.nbd, exports).await?;
    let uris = nbd.endpoints.iter().map(|e| e.uri(&s.volume)).collect();
    Ok(RunningSite {
        nbd,
        device,
        repl,
        uris,
    })
}

fn open_or_create(
    dir: &Path,
    name: &str,
    size_bytes: Option<u64>,
    cfg: &VolumeConfig,
) -> anyhow::Result<Volume> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("create data directory {}", dir.display()))?;
    match Volume::open(dir, name, cfg) {
        Ok(volume) => {
            if let Some(size) = size_bytes {
                if size != volume.size_bytes() {
                    bail!(
                        "volume {name:?} is {} bytes, not the {size} given by --size",
                        volume.size_bytes()
                    );
                }
            }
            Ok(volume)
        }
        Err(stretch_engine::EngineError::NotFound { .. }) => {
            let Some(size) = size_bytes else {
                bail!(
                    "volume {name:?} does not exist in {}; give --size to create it",
                    dir.display()
                );
            };
            info!(volume = %name, size_bytes = size, "creating volume");
            Volume::create(dir, name, size, cfg).with_context(|| format!("create volume {name:?}"))
        }
        Err(err) => Err(err).with_context(|| format!("open volume {name:?}")),
    }
}

/// Both sites derive the volume and CG id from the name (FNV-1a), so they agree without a
/// control plane; frames for another volume are refused by the core.
fn volume_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
