//! `stretch serve`: one site's volumes over NBD (no replication yet).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tracing::info;

use crate::cli::ServeArgs;
use crate::config::{Config, NbdConfig};
use stretch_engine::{list_volumes, BlockDevice, IoEngineKind, Volume, VolumeConfig};
use stretch_nbd::{Export, Server, ServerConfig};

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match (&args.config, &args.data_dir) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(dir)) => Config::with_data_dir(dir.clone()),
        (None, None) => bail!("stretch serve needs --config FILE or --data-dir DIR"),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if !args.listen.is_empty() {
        config.nbd.listen = args.listen;
    }
    if args.unix_socket.is_some() {
        config.nbd.unix_socket = args.unix_socket;
    }
    if let Some(engine) = args.io_engine {
        config.engine.io_engine = engine;
    }
    if args.buffered_io {
        config.engine.direct_io = false;
    }
    let running = start(&config).await?;
    running.print_endpoints();
    wait_for_shutdown_signal().await;
    running.stop().await;
    Ok(())
}

/// Where an NBD listener accepts clients.
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Endpoint {
    /// The URI a client uses for `export` here (the NBD URI spec: the export is the path, and
    /// a Unix socket goes in the `socket` query parameter).
    pub fn uri(&self, export: &str) -> String {
        match self {
            Endpoint::Tcp(addr) => format!("nbd://{addr}/{export}"),
            Endpoint::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
        }
    }
}

/// A daemon's NBD server and the listeners it serves on, as `[nbd]` configures them. `stretch
/// serve` and `stretch site` both run one.
pub struct NbdListeners<D: BlockDevice> {
    server: Arc<Server<D>>,
    pub endpoints: Vec<Endpoint>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl<D: BlockDevice> NbdListeners<D> {
    /// Closes every open NBD connection and keeps listening (see
    /// [`Server::close_connections`]); a handle that outlives `self`.
    pub fn closer(&self) -> impl Fn() + Send + Sync + 'static {
        let server = self.server.clone();
        move || server.close_connections()
    }

    /// Binds every configured TCP address and the Unix socket, and serves `exports` on each.
    pub async fn start(nbd: &NbdConfig, exports: Vec<Export<D>>) -> anyhow::Result<Self> {
        let server_config = ServerConfig {
            handshake_timeout: Duration::from_millis(nbd.handshake_timeout_ms),
            connections_max: nbd.connections_max,
            inflight_bytes_max: nbd.inflight_bytes_max,
            ..ServerConfig::default()
        };
        let server = Server::new(server_config, exports);
        let mut endpoints = Vec::new();
        let mut tasks = Vec::new();
        for addr in &nbd.listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listen for NBD on {addr}"))?;
            let local = listener
                .local_addr()
                .context("read the NBD listen address")?;
            endpoints.push(Endpoint::Tcp(local));
            let server = server.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(err) = server.serve_tcp(listener).await {
                    tracing::error!(%local, "NBD listener stopped: {err}");
                }
            }));
        }
        if let Some(path) = &nbd.unix_socket {
            let listener = bind_unix(path)?;
            endpoints.push(Endpoint::Unix(path.clone()));
            let server = server.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(err) = server.serve_unix(listener).await {
                    tracing::error!("NBD unix listener stopped: {err}");
                }
            }));
        }
        Ok(NbdListeners {
            server,
            endpoints,
            tasks,
        })
    }

    /// Stops accepting, lets in-flight requests finish, then returns.
    pub async fn stop(self) {
        info!("shutting down: finishing in-flight requests");
        self.server.shutdown();
        for task in self.tasks {
            // A listener task that panicked has nothing left to finish; keep shutting down.
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }
}

/// A serving site: its volumes' NBD listeners.
pub struct Running {
    nbd: NbdListeners<Volume>,
    pub export_names: Vec<String>,
}

impl Running {
    /// Prints one URI per export and endpoint; tests and scripts parse these lines.
    pub fn print_endpoints(&self) {
        for endpoint in &self.nbd.endpoints {
            for name in &self.export_names {
                println!("{}", endpoint.uri(name));
            }
        }
    }

    /// Stops accepting, lets in-flight requests finish, then returns.
    pub async fn stop(self) {
        self.nbd.stop().await;
    }
}

/// Opens (or creates) the configured volumes and starts listening.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    let io_engine: IoEngineKind = config
        .engine
        .io_engine
        .parse()
        .map_err(|err| anyhow::anyhow!("[engine] io_engine: {err}"))?;
    let volume_config = VolumeConfig {
        io_engine,
        direct_io: config.engine.direct_io,
        ..VolumeConfig::default()
    };
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
    let exports = open_exports(config, &volume_config)?;
    if exports.is_empty() {
        bail!(
            "no volumes to serve in {}: create one with `stretch volume create NAME --size 1GiB --data-dir {}` or list it in the config",
            config.data_dir.display(),
            config.data_dir.display()
        );
    }
    let export_names: Vec<String> = exports.iter().map(|e| e.name.clone()).collect();
    for export in &exports {
        info!(volume = %export.name, size_bytes = export.device.size_bytes(), io_engine = export.device.io_engine_name(), "exporting volume");
    }
    let nbd = NbdListeners::start(&config.nbd, exports).await?;
    Ok(Running { nbd, export_names })
}

fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    // A socket file left by a previous run would make bind fail; remove only sockets, never a
    // regular file someone put there by mistake.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)
                .with_context(|| format!("remove stale socket {}", path.display()))?;
        } else {
            bail!("{} exists and is not a socket", path.display());
        }
    }
    tokio::net::UnixListener::bind(path)
        .with_context(|| format!("listen for NBD on unix socket {}", path.display()))
}

fn open_exports(
    config: &Config,
    volume_config: &VolumeConfig,
) -> anyhow::Result<Vec<Export<Volume>>> {
    let dir = &config.data_dir;
    let mut exports = Vec::new();
    if config.volumes.is_empty() {
        for info in
            list_volumes(dir).with_context(|| format!("list volumes in {}", dir.display()))?
        {
            let volume = Volume::open(dir, &info.name, volume_config)
                .with_context(|| format!("open volume {:?}", info.name))?;
            exports.push(export(info.name.clone(), String::new(), volume, false));
        }
        return Ok(exports);
    }
    for v in &config.volumes {
        let volume = match Volume::open(dir, &v.name, volume_config) {
            Ok(volume) => volume,
            Err(stretch_engine::EngineError::NotFound { .. }) => {
                let Some(size) = &v.size else {
                    bail!(
                        "volume {:?} does not exist and the config gives no size to create it",
                        v.name
                    );
                };
                let size_bytes = size.bytes()?;
                info!(volume = %v.name, size_bytes, "creating volume");
                Volume::create(dir, &v.name, size_bytes, volume_config)
                    .with_context(|| format!("create volume {:?}", v.name))?
            }
            Err(err) => return Err(err).with_context(|| format!("open volume {:?}", v.name)),
        };
        exports.push(export(
            v.name.clone(),
            v.description.clone().unwrap_or_default(),
            volume,
            v.read_only,
        ));
    }
    Ok(exports)
}

fn export(name: String, description: String, volume: Volume, read_only: bool) -> Export<Volume> {
    Export {
        name,
        description,
        device: Arc::new(volume),
        read_only,
    }
}

/// Resolves on Ctrl-C or SIGTERM (what systemd and `kill` send).
pub async fn wait_for_shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(err) => {
            tracing::warn!("cannot watch SIGTERM ({err}); only Ctrl-C stops the daemon");
            let _ = ctrl_c.await;
        }
    }
}
