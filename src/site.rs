//! `stretch site`: one site of a stretched volume — the local engine volume, replication to
//! the peer site under the volume's ack policy (`--policy`), and NBD for the hypervisor
//! (DESIGN.md §1).
//!
//! With `--raft-listen` (or `[control]`) the site joins the witness group and the cluster map
//! moves: detach, resync and rejoin are decided there (src/control.rs). Without it the map is
//! fixed: both sites in sync at epoch 1, nothing fenced, and a site that loses its peer keeps
//! every write waiting (never acknowledging one the peer has not applied) until the link
//! returns or the request times out with EIO.
//!
//! Output: `repl://ADDR` (listening site only), `admin http://ADDR` (the site admin API,
//! src/admin.rs) and then one `nbd://ADDR/VOLUME` per NBD listener on stdout, once
//! listening; logs go to stderr (with resync progress every ~2 s while one runs).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tracing::info;

use crate::cli::SiteArgs;
use crate::config::{parse_size, Config};
use crate::control::{ControlPlane, ControlSettings};
use crate::serve::NbdListeners;
use stretch_engine::{BlockDevice, IoEngineKind, Volume, VolumeConfig};
use stretch_nbd::Export;
use stretch_replicator::core::{AckPolicy, Config as ReplicaConfig, MapView, Policy, Role};
use stretch_replicator::driver::DriverConfig;
use stretch_replicator::link::{LinkConfig, LinkMode};
use stretch_replicator::{ReplicatedOptions, ReplicatedVolume};
use stretch_witness::map::Site;

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
    /// Where the site admin API listens (`stretch status`, `stretch verify`).
    pub(crate) admin: SocketAddr,
    /// The witness group; `None` runs with the fixed map (no arbitration).
    pub(crate) control: Option<ControlSettings>,
    /// The ack policy and its bounds (with a witness, the map's policy and writer win).
    pub(crate) policy: Policy,
}

/// The ack policy from flags over `[replication]`, with defaults for the rest.
fn policy_settings(
    args: &SiteArgs,
    repl: Option<&crate::config::ReplicationConfig>,
) -> anyhow::Result<Policy> {
    let mut policy = Policy::default();
    if let Some(text) = args
        .policy
        .clone()
        .or_else(|| repl.and_then(|r| r.policy.clone()))
    {
        policy.ack = AckPolicy::parse(&text).with_context(|| {
            format!("the policy must be sync, sync-received, async or adaptive, not {text:?}")
        })?;
    }
    if let Some(text) = args
        .active_site
        .clone()
        .or_else(|| repl.and_then(|r| r.active_site.clone()))
    {
        policy.active_site = match text.as_str() {
            "a" => 0,
            "b" => 1,
            other => bail!("the active site must be a or b, not {other:?}"),
        };
    }
    if let Some(bytes) = args
        .lag_bytes_max
        .or_else(|| repl.and_then(|r| r.lag_bytes_max))
    {
        if bytes < 4096 {
            bail!("lag_bytes_max must allow at least one block (4096 bytes), not {bytes}");
        }
        policy.lag_bytes_max = bytes;
    }
    if let Some(ms) = args.lag_ms_max.or_else(|| repl.and_then(|r| r.lag_ms_max)) {
        if ms == 0 {
            bail!("lag_ms_max must be above 0");
        }
        policy.lag_us_max = ms.saturating_mul(1_000);
    }
    if let Some(ms) = args
        .sync_rtt_max_ms
        .or_else(|| repl.and_then(|r| r.sync_rtt_max_ms))
    {
        if !(ms.is_finite() && ms > 0.0) {
            bail!("sync_rtt_max_ms must be a positive number of milliseconds, not {ms}");
        }
        policy.sync_rtt_max_us = (ms * 1_000.0) as u64;
    }
    Ok(policy)
}

fn settings(args: SiteArgs) -> anyhow::Result<Settings> {
    let config = match (&args.config, &args.data_dir) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(dir)) => Config::with_data_dir(dir.clone()),
        (None, None) => bail!("stretch site needs --config FILE or --data-dir DIR"),
    };
    let repl = config.replication.as_ref();
    let policy = policy_settings(&args, repl)?;
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
    let admin = args
        .admin
        .or_else(|| repl.and_then(|r| r.admin))
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let data_dir = args.data_dir.unwrap_or(config.data_dir);
    let control_file = config.control.as_ref();
    let control = match args
        .raft_listen
        .or_else(|| control_file.map(|c| c.raft_listen))
    {
        None => None,
        Some(raft_listen) => {
            let preferred = args
                .preferred
                .or_else(|| control_file.and_then(|c| c.preferred.clone()))
                .unwrap_or_else(|| "a".into());
            let mut arbiter = crate::control::default_arbiter_config();
            if control_file.and_then(|c| c.on_lapse.as_deref()) == Some("suspend") {
                arbiter.on_lapse = stretch_witness::arbiter::LapsePolicy::Suspend;
            }
            Some(ControlSettings {
                raft_listen,
                raft_peer: args
                    .raft_peer
                    .or_else(|| control_file.and_then(|c| c.raft_peer)),
                dir: data_dir.join(format!("control-{site_name}")),
                arbiter,
                join_timeout: std::time::Duration::from_secs(120),
                preference: crate::control::parse_site(&preferred)?,
                workload: stretch_witness::preference::PreferenceConfig::default(),
                policy,
            })
        }
    };
    Ok(Settings {
        site_name,
        site,
        cluster_id,
        link,
        data_dir,
        volume,
        size_bytes,
        nbd,
        volume_config,
        request_timeout_ms,
        admin,
        control,
        policy,
    })
}

pub async fn run(args: SiteArgs) -> anyhow::Result<()> {
    let site = start(settings(args)?).await?;
    if let Some(repl) = site.repl {
        println!("repl://{repl}");
    }
    println!("admin http://{}", site.admin.addr());
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
    /// The control plane, when the site runs with a witness.
    pub(crate) control: Option<ControlPlane>,
    /// Where this site accepts the replication link, if it is the listening side.
    pub(crate) repl: Option<SocketAddr>,
    /// The site admin API (stops with the site).
    pub(crate) admin: crate::admin::AdminServer,
    /// One URI of the volume per NBD listener (`nbd://ADDR/VOLUME`, `nbd+unix:///VOLUME?socket=`).
    pub(crate) uris: Vec<String>,
}

impl RunningSite {
    /// Stops accepting, lets in-flight requests finish, then returns.
    pub(crate) async fn stop(self) {
        self.nbd.stop().await;
        if let Some(control) = self.control {
            control.stop().await;
        }
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
    replica.policy = s.policy;
    // With a witness, the site serves nothing before a linearizable read of the map says
    // where it stands (DESIGN.md §6); without one, the map is fixed.
    let mut control = match &s.control {
        Some(c) => {
            let me = if s.site == 0 { Site::A } else { Site::B };
            Some(ControlPlane::join(c, me, id, volume.size_bytes()).await?)
        }
        None => None,
    };
    if let Some(c) = &control {
        replica.policy = c.initial_policy;
    }
    let map = match &control {
        Some(c) => c.initial_view,
        None => MapView {
            role: Role::InSync,
            epoch: FIXED_EPOCH,
            fenced_before: [0, 0],
        },
    };
    let data_path = volume.info().data_path;
    let mut link_config = LinkConfig::new(s.cluster_id);
    let control_rx = control.as_ref().map(|_| {
        let (tx, rx) = tokio::sync::mpsc::channel(crate::control::CONTROL_QUEUE_MAX);
        link_config.control_in = Some(tx);
        rx
    });
    let mut options = ReplicatedOptions::new(
        DriverConfig::new(data_path.with_extension("divergent")),
        link_config,
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
    if let (Some(c), Some(rx)) = (control.as_mut(), control_rx) {
        device.set_gate(c.gate());
        c.run(device.clone(), rx);
    }
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
    // The admin API starts before NBD, so a client that sees the NBD URIs can also ask the
    // site for its status.
    let admin = crate::admin::AdminServer::start(
        s.admin,
        crate::admin::AdminState::new(
            s.site_name.clone(),
            s.volume.clone(),
            device.clone(),
            map.epoch,
        ),
    )
    .await?;
    if let Some(c) = &control {
        admin.state.set_control(c.view());
    }
    let nbd = NbdListeners::start(&s.nbd, exports).await?;
    if let Some(c) = &control {
        c.on_detached(nbd.closer());
    }
    let uris = nbd.endpoints.iter().map(|e| e.uri(&s.volume)).collect();
    Ok(RunningSite {
        nbd,
        device,
        control,
        repl,
        admin,
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
