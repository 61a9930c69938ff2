//! The command line: one binary, `stretch`, with a subcommand per job.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "stretch",
    version,
    about = "Active-active replicated block storage for stretched clusters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a ready-to-use local cluster and print its NBD URIs (Ctrl-C stops it).
    Up(UpArgs),
    /// Serve the volumes of one site over NBD.
    Serve(ServeArgs),
    /// Run one site of a stretched volume: replication to the peer site plus NBD.
    Site(SiteArgs),
    /// Run the witness: the third voter of the control plane, at a third site.
    Witness(WitnessArgs),
    /// Let one site carry on alone, fencing the other (through the witness group).
    Detach(crate::detach::DetachArgs),
    /// Create, list, grow or delete volumes in a data directory.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// The link emulator: a TCP proxy with RTT, jitter, bandwidth caps and partitions.
    Link(stretch_bench::LinkArgs),
    /// Latency and throughput benchmark over NBD, with hdrhistogram percentiles.
    Bench(stretch_bench::BenchArgs),
    /// Show each site's role, epoch, link, RTT, dirty blocks and resync progress.
    Status(crate::status::StatusArgs),
    /// Compare a volume's two sites block by block (data CRC and stamp); exit 0 identical,
    /// 1 differences, 2 errors.
    Verify(crate::verify::VerifyArgs),
    /// The double failure (link and witness lost): let one stalled site carry on alone in a
    /// new generation. Without --accept-data-loss it only shows what would be lost.
    ForceSurvivor(crate::force::ForceSurvivorArgs),
    /// After a force-survivor: prepare the other site (stopped) to come back under the new
    /// generation through a full resync.
    PrepareRejoin(crate::force::PrepareRejoinArgs),
    /// After a force-survivor: the survivor adds the witness and the other site back as voters.
    Readmit(crate::force::ReadmitArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (see docs/operations.md); flags below override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Data directory (required without --config).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// TCP listen address, e.g. 127.0.0.1:10809 (repeatable; port 0 picks one).
    #[arg(long)]
    pub listen: Vec<std::net::SocketAddr>,
    /// Also listen on this Unix socket.
    #[arg(long)]
    pub unix_socket: Option<PathBuf>,
    /// I/O engine: auto, uring or psync.
    #[arg(long)]
    pub io_engine: Option<String>,
    /// Use the page cache for volume data instead of O_DIRECT (FLUSH/FUA still fdatasync).
    #[arg(long)]
    pub buffered_io: bool,
}

#[derive(Debug, Args)]
pub struct SiteArgs {
    /// TOML config file with a [replication] section (see src/config.rs); flags override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// This site: a or b.
    #[arg(long)]
    pub site: Option<String>,
    /// Cluster id; both sites must agree (frames of another cluster are refused).
    #[arg(long)]
    pub cluster_id: Option<u64>,
    /// Accept the replication link on this address (one site listens...).
    #[arg(long)]
    pub repl_listen: Option<std::net::SocketAddr>,
    /// ...and the other dials the peer (or a link emulator in front of it) here.
    #[arg(long)]
    pub peer: Option<std::net::SocketAddr>,
    /// Data directory (required without --config).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The replicated volume's name, the same at both sites (default: the config's only
    /// [[volume]], else vol0).
    #[arg(long)]
    pub volume: Option<String>,
    /// Size to create the volume with if it does not exist (the same at both sites).
    #[arg(long)]
    pub size: Option<String>,
    /// NBD listen address (repeatable; port 0 picks one; default: the config's, else
    /// 127.0.0.1:10809).
    #[arg(long)]
    pub listen: Vec<std::net::SocketAddr>,
    /// I/O engine: auto, uring or psync.
    #[arg(long)]
    pub io_engine: Option<String>,
    /// Use the page cache for volume data instead of O_DIRECT.
    #[arg(long)]
    pub buffered_io: bool,
    /// A request replication has not answered by then fails with EIO (outcome unknown).
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// Serve the site admin API (`stretch status`, `stretch verify`) here; default: the
    /// config's [replication] admin, else 127.0.0.1:0 (the chosen port is printed).
    #[arg(long)]
    pub admin: Option<std::net::SocketAddr>,
    /// Join the witness group: this site's Raft voter listens here (enables arbitration;
    /// see `stretch witness`).
    #[arg(long)]
    pub raft_listen: Option<std::net::SocketAddr>,
    /// With --raft-listen: the site that wins a plain link cut (a or b), written into the
    /// map when the volume's record is created.
    #[arg(long)]
    pub preferred: Option<String>,
    /// Ack policy (DESIGN.md §5): sync, sync-received, async or adaptive. With a witness it
    /// is written into the map when the volume's record is created (change it live with
    /// `stretch volume policy`).
    #[arg(long)]
    pub policy: Option<String>,
    /// The one writer under async, and the site that leads mode switches (a or b).
    #[arg(long)]
    pub active_site: Option<String>,
    /// async: bytes of writes not yet durable at the peer beyond which new writes wait.
    #[arg(long)]
    pub lag_bytes_max: Option<u64>,
    /// async: age of the oldest write not yet durable at the peer beyond which new writes
    /// wait.
    #[arg(long)]
    pub lag_ms_max: Option<u64>,
    /// adaptive: the smoothed RTT above which the mode may become async.
    #[arg(long)]
    pub sync_rtt_max_ms: Option<f64>,
    /// With --raft-listen: dial the other site's Raft voter here instead of at its address in
    /// the group (e.g. through the inter-site link, which the witness does not cross).
    #[arg(long)]
    pub raft_peer: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct WitnessArgs {
    /// Where the witness keeps its vote, Raft log and cluster map (never block data).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Raft listen address of the witness.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// Initialise a fresh group of site A, site B and this witness (a no-op if the group
    /// already exists). Needs --site-a and --site-b.
    #[arg(long)]
    pub bootstrap: bool,
    /// Site A's Raft address (its --raft-listen).
    #[arg(long)]
    pub site_a: Option<std::net::SocketAddr>,
    /// Site B's Raft address.
    #[arg(long)]
    pub site_b: Option<std::net::SocketAddr>,
    /// After a `force-survivor`: run as the witness of this generation (a new voter under a
    /// new id, waiting for the survivor's `stretch readmit`). Default: the generation last
    /// recorded in --data-dir, else 0.
    #[arg(long)]
    pub generation: Option<u64>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory (site A and site B get a folder each); default: a fresh directory under
    /// the system temp dir.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// NBD listen address of site A.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: std::net::SocketAddr,
    /// NBD listen address of site B (another loopback address: another "site").
    #[arg(long, default_value = "127.0.0.2:10809")]
    pub listen_b: std::net::SocketAddr,
    /// Round-trip time the link emulator adds between the sites.
    #[arg(long, default_value = "5ms", value_parser = stretch_bench::units::parse_duration)]
    pub rtt: std::time::Duration,
    /// Where the link emulator serves its Toxiproxy-compatible admin API (`stretch link ...`).
    #[arg(long, default_value = "127.0.0.1:8474")]
    pub link_admin: String,
    /// Address the witness's Raft voter binds (a third loopback address: a third "site").
    #[arg(long, default_value = "127.0.0.3")]
    pub witness_ip: std::net::IpAddr,
    /// Name of the volume to create.
    #[arg(long, default_value = "vol0")]
    pub volume: String,
    /// Size of the volume.
    #[arg(long, default_value = "1GiB")]
    pub size: String,
    /// I/O engine: auto, uring or psync.
    #[arg(long, default_value = "auto")]
    pub io_engine: String,
    /// The volume's ack policy: sync, sync-received, async or adaptive (DESIGN.md §5);
    /// change it live with `stretch volume policy`.
    #[arg(long, default_value = "sync")]
    pub policy: String,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Change a stretched volume's ack policy live: sync, sync-received, async or adaptive
    /// (through a site's admin API; see docs/operations.md).
    Policy(crate::policy::PolicyArgs),
    /// Move the async writer to site a or b: the old writer drains its lag until the new one
    /// is durable, then hands over (planned VM migration).
    Handoff(crate::policy::HandoffArgs),
    /// Create a volume (sparse; its size a multiple of 4096 bytes).
    Create {
        name: String,
        /// Size, e.g. 20GiB, 512M or a byte count.
        #[arg(long)]
        size: String,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// List the volumes in a data directory.
    List {
        #[arg(long)]
        data_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume (shrinking is refused: it would destroy data).
    Grow {
        name: String,
        #[arg(long)]
        size: String,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Delete a volume and its metadata.
    Delete {
        name: String,
        #[arg(long)]
        data_dir: PathBuf,
        /// Required: deleting a volume destroys its data.
        #[arg(long)]
        yes: bool,
    },
}
