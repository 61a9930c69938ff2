//! The site's control plane (DESIGN.md §6): this site's voter in the witness group, its
//! [`Arbiter`], and the glue that turns their decisions into what the data path does.
//!
//! - **Start.** The site joins the Raft group as voter A (1) or B (2) and serves nothing until
//!   a linearizable read of the map (forwarded to the leader) tells it where it stands. If the
//!   map has no record of the volume yet, the site proposes its creation (both sites may; the
//!   second proposal is refused as a duplicate). The replica then starts in the role that map
//!   gives it.
//! - **Leases.** The arbiter's heartbeats and echoes travel the replication link as
//!   `Kind::Control` frames, so a lease lapses exactly when that link stops carrying writes.
//!   The replicated volume asks the [`ServeGate`] before every request and again before a
//!   read's data leaves; the gate is `Arbiter::serve`.
//! - **Detach.** The arbiter proposes it; the map moving is seen in this node's applied map.
//!   The loser's replica learns it at once (fails every queued request with EIO). The
//!   survivor's replica learns it only once the survivor's wait `L·(1+ρ)+δ` is over, because
//!   learning it makes the replica acknowledge its pending writes alone.
//! - **Resync and rejoin.** The survivor proposes `StartResync` once it hears the detached
//!   site again, and `Rejoin` once its replica reports the resync complete in the current
//!   epoch (`DriverStats::resync_complete_epoch`).
//!
//! Time is `CLOCK_BOOTTIME` (it keeps counting across a suspend, so a suspended site cannot
//! wake up believing its lease is still young).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use stretch_replicator::core::{AckPolicy as ReplAck, Event, MapView, Policy as ReplPolicy, Role};
use stretch_replicator::{GateAnswer, ReplicatedVolume, ServeGate};
use stretch_witness::arbiter::{
    Action, Arbiter, ArbiterConfig, Echo, Heartbeat, LapsePolicy, Serve,
};
use stretch_witness::lease::LeaseConfig;
use stretch_witness::map::{
    AckPolicy, ApplyResult, CgState, ClusterMap, Command, Epoch, Outcome, Preference, Site,
    SiteState,
};
use stretch_witness::preference::{PreferenceConfig, PreferenceTracker};
use stretch_witness::raft::generation::{
    discard_unrecorded, generation_dir, has_raft_state, read_generation, write_generation,
};
use stretch_witness::raft::network::PeerAddrs;
use stretch_witness::raft::node::WitnessNode;
use stretch_witness::raft::{node_id, BasicNode, Member, GENERATION_MAX};

/// How often the control loop runs its timers.
const TICK: Duration = Duration::from_millis(5);
/// Deadline of one proposal or forwarded read.
const RAFT_DEADLINE: Duration = Duration::from_secs(2);
/// Proposals in flight at once; a timer that wants more waits for its next turn.
const PROPOSALS_IN_FLIGHT_MAX: usize = 4;
/// The survivor re-proposes `StartResync` this often while the peer stays detached.
const START_RESYNC_RETRY: Duration = Duration::from_secs(1);
/// Control frames queued from the link before the loop takes them.
pub(crate) const CONTROL_QUEUE_MAX: usize = 256;

/// Control-plane settings of a site.
#[derive(Clone, Debug)]
pub(crate) struct ControlSettings {
    /// Where this site's Raft voter listens (the witness and the peer site dial it).
    pub(crate) raft_listen: SocketAddr,
    /// Where this site dials the other site's voter, if not at its membership address: in a
    /// stretched cluster the two sites' Raft traffic crosses the inter-site link (in tests and
    /// `stretch up`, the link emulator), while the witness reaches each site directly.
    pub(crate) raft_peer: Option<SocketAddr>,
    /// Raft log, vote, snapshots and the incarnation counter.
    pub(crate) dir: PathBuf,
    pub(crate) arbiter: ArbiterConfig,
    /// How long start waits for the witness group to answer before giving up.
    pub(crate) join_timeout: Duration,
    /// The preferred site written into the map when this site creates the volume's record.
    pub(crate) preference: Site,
    /// How the preference follows the workload.
    pub(crate) workload: PreferenceConfig,
    /// The ack policy written into the map when this site creates the volume's record, and
    /// the local bounds (lag, RTT limit) that go with whatever policy the map holds.
    pub(crate) policy: ReplPolicy,
}

fn to_map_policy(ack: ReplAck) -> AckPolicy {
    match ack {
        ReplAck::Sync => AckPolicy::Sync,
        ReplAck::SyncReceived => AckPolicy::SyncReceived,
        ReplAck::Async => AckPolicy::Async,
        ReplAck::Adaptive => AckPolicy::Adaptive,
    }
}

/// The replica's policy from the committed map: its ack policy and async writer, with this
/// site's local bounds.
fn policy_from_map(ack: AckPolicy, active: Site, local: &ReplPolicy) -> ReplPolicy {
    ReplPolicy {
        ack: match ack {
            AckPolicy::Sync => ReplAck::Sync,
            AckPolicy::SyncReceived => ReplAck::SyncReceived,
            AckPolicy::Async => ReplAck::Async,
            AckPolicy::Adaptive => ReplAck::Adaptive,
        },
        active_site: site_idx(active),
        ..*local
    }
}

/// Timers tuned for a failover within 2 s (DESIGN §6: detection + preference delay +
/// election + `L·(1+ρ)+δ`): the peer is declared lost after 300 ms without a renewal; a
/// lease lasts 600 ms; ρ allows 0.1% rate difference; δ 50 ms of pause.
pub(crate) fn default_arbiter_config() -> ArbiterConfig {
    ArbiterConfig {
        lease: LeaseConfig {
            lease_us: 600_000,
            rho_ppm: 1_000,
            delta_us: 50_000,
        },
        peer_timeout_us: 300_000,
        heartbeat_interval_us: 50_000,
        read_index_interval_us: 250_000,
        preference_delay_us: 300_000,
        propose_retry_us: 500_000,
        on_lapse: LapsePolicy::Eio,
    }
}

/// What travels in a `Kind::Control` frame.
#[derive(Debug, Serialize, Deserialize)]
enum ControlMsg {
    Heartbeat(Heartbeat),
    Echo(Echo),
    /// Bytes of client writes the sender acknowledged in its last preference window.
    Workload {
        window_bytes: u64,
    },
}

/// The site's `CLOCK_BOOTTIME` in µs.
pub(crate) fn boottime_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call; clock_gettime only
    // writes into it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        // Linux has had CLOCK_BOOTTIME since 2.6.39; failing here means a broken sandbox.
        // Time standing still makes leases lapse and nothing be served: the safe side.
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000)
}

/// The replicator's 32-bit accept epoch of a map epoch: the `force-survivor` generation in
/// the top 8 bits, the epoch number in the low 24 (docs/design-witness.md). Ordered like the
/// map's epochs while both fit, which `epoch_u32` checks.
pub(crate) fn epoch_u32(e: Epoch) -> anyhow::Result<u32> {
    if e.generation >= 1 << 8 || e.n >= 1 << 24 {
        bail!(
            "epoch {}.{} does not fit the replicator's 32-bit accept epoch",
            e.generation,
            e.n
        );
    }
    Ok(((e.generation as u32) << 24) | e.n as u32)
}

fn site_idx(site: Site) -> u8 {
    site.idx() as u8
}

/// The replica's view of a CG as the map has it.
pub(crate) fn map_view(cg: &CgState, me: Site) -> anyhow::Result<MapView> {
    let role = match (cg.state(me), cg.state(me.peer())) {
        (SiteState::InSync, SiteState::InSync) => Role::InSync,
        (SiteState::InSync, _) => Role::Survivor,
        _ => Role::Loser,
    };
    Ok(MapView {
        role,
        epoch: epoch_u32(cg.epoch)?,
        fenced_before: [
            epoch_u32(cg.fenced_before[0])?,
            epoch_u32(cg.fenced_before[1])?,
        ],
    })
}

/// A bounded counter of a persisted start number: heartbeat ids of different incarnations
/// of this site must never collide (see `Arbiter::new`).
fn next_incarnation(dir: &std::path::Path) -> anyhow::Result<u32> {
    let path = dir.join("incarnation");
    let previous = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u32>()
            .with_context(|| format!("{} is not a number", path.display()))?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => 0,
        Err(err) => return Err(err).with_context(|| format!("read {}", path.display())),
    };
    let next = previous.wrapping_add(1);
    let tmp = dir.join("incarnation.tmp");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{next}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(next)
}

/// What `stretch status` shows of the control plane.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ControlStatus {
    pub(crate) raft_node: u64,
    pub(crate) raft_leader: Option<u64>,
    pub(crate) raft_term: u64,
    pub(crate) cg: u64,
    pub(crate) epoch: String,
    pub(crate) site_states: [String; 2],
    pub(crate) preference: String,
    pub(crate) policy: String,
    /// What the gate answers now: serve, hold or fail.
    pub(crate) serving: String,
    /// Survivor only: the other site is detached and every write has one copy.
    pub(crate) single_copy: bool,
    /// In sync: how long this site's lease still runs (0 once lapsed; none before the first).
    pub(crate) lease_left_ms: Option<u64>,
    /// Survivor: how long until it may acknowledge alone (0 once it may).
    pub(crate) alone_in_ms: Option<u64>,
    pub(crate) proposals: u64,
    pub(crate) last_error: Option<String>,
}

/// What the control plane runs when this site learns it lost arbitration.
type OnDetached = Box<dyn Fn() + Send + Sync>;

struct Shared {
    /// Closes the site's NBD connections (DESIGN §6 "The loser"); set once NBD listens.
    on_detached: std::sync::OnceLock<OnDetached>,
    me: Site,
    cg: u64,
    volume_id: u64,
    /// This site's voter. `force-survivor` replaces it with a voter of a new generation.
    node: Mutex<Arc<WitnessNode>>,
    /// The replicated volume, set when the control loop starts.
    device: std::sync::OnceLock<Arc<ReplicatedVolume>>,
    arbiter: Mutex<Arbiter>,
    status: Mutex<ControlStatus>,
    settings: ControlSettings,
    /// One `force-survivor` or `readmit` at a time.
    membership_busy: tokio::sync::Mutex<()>,
}

impl Shared {
    /// The replica's counters, once the control loop runs.
    fn device_stats(&self) -> Option<stretch_replicator::driver::DriverStats> {
        self.device.get().map(|d| d.driver_stats())
    }

    fn arbiter(&self) -> MutexGuard<'_, Arbiter> {
        // The arbiter's state stays consistent even if a holder panicked: every method
        // leaves it whole.
        self.arbiter.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn node(&self) -> Arc<WitnessNode> {
        self.node.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn member(site: Site) -> Member {
    match site {
        Site::A => Member::A,
        Site::B => Member::B,
    }
}

/// The other site's voter is dialed at `raft_peer` when one is set.
fn peer_addrs(s: &ControlSettings, me: Site) -> PeerAddrs {
    s.raft_peer
        .map(|addr| PeerAddrs::from([(member(me.peer()), addr.to_string())]))
        .unwrap_or_default()
}

/// Binds the Raft address, retrying briefly: a voter just stopped may still hold it.
async fn bind_raft(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let mut tries = 0;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 40 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("listen for Raft on {addr}")),
        }
    }
}

struct Gate(Arc<Shared>);

impl ServeGate for Gate {
    fn check(&self) -> GateAnswer {
        gate_answer(self.0.arbiter().serve(self.0.cg, boottime_us()))
    }

    fn check_read(&self) -> GateAnswer {
        gate_answer(self.0.arbiter().serve_read(self.0.cg, boottime_us()))
    }
}

fn gate_answer(serve: Serve) -> GateAnswer {
    match serve {
        Serve::Yes => GateAnswer::Serve,
        Serve::Hold => GateAnswer::Hold,
        Serve::Eio => GateAnswer::Fail,
    }
}

/// A site's control plane, joined and holding the map it started from.
pub(crate) struct ControlPlane {
    shared: Arc<Shared>,
    /// The map view the replica starts with.
    pub(crate) initial_view: MapView,
    /// The volume's policy in the map at join: the replica starts with it.
    pub(crate) initial_policy: ReplPolicy,
    workload: PreferenceConfig,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ControlPlane {
    /// Starts the voter, waits for a linearizable read of the map, and makes sure the
    /// volume has a record in it.
    pub(crate) async fn join(
        s: &ControlSettings,
        me: Site,
        volume_id: u64,
        size_bytes: u64,
    ) -> anyhow::Result<ControlPlane> {
        std::fs::create_dir_all(&s.dir).with_context(|| format!("create {}", s.dir.display()))?;
        let incarnation = next_incarnation(&s.dir)?;
        let listener = bind_raft(s.raft_listen).await?;
        // The generation `force-survivor` or `prepare-rejoin` recorded; 0 for a site that
        // never went through either.
        let generation = read_generation(&s.dir)
            .with_context(|| format!("read the generation in {}", s.dir.display()))?;
        let raft_dir = generation_dir(&s.dir, generation);
        let fresh = !has_raft_state(&raft_dir);
        let id = node_id(generation, member(me));
        let node = WitnessNode::start_with(id, &raft_dir, listener, peer_addrs(s, me))
            .await
            .map_err(|e| anyhow::anyhow!("start the Raft voter: {e}"))?;
        let node = Arc::new(node);
        if generation > 0 && fresh {
            info!(
                generation,
                node = id,
                "this site's voter is new in generation {generation}: it waits until the survivor adds it (`stretch readmit`)"
            );
        }
        let cg = volume_id;
        let deadline = tokio::time::Instant::now() + s.join_timeout;
        let mut created = false;
        let mut last_note = tokio::time::Instant::now();
        // Bounded by `join_timeout`.
        let (state, map_ack) = loop {
            match node.read_map_anywhere(RAFT_DEADLINE).await {
                Ok((_, map)) => match map.cg(cg) {
                    Some(state) => {
                        let ack = map.volumes.get(&volume_id).map(|v| v.policy);
                        break (state.clone(), ack);
                    }
                    None if !created => {
                        created = true;
                        let cmd = Command::VolumeCreate {
                            volume: volume_id,
                            cg,
                            size_bytes,
                            policy: to_map_policy(s.policy.ack),
                            preference: Preference::Workload(s.preference),
                        };
                        if let Err(e) = node.propose_anywhere(cmd, RAFT_DEADLINE).await {
                            warn!("proposing the volume's record: {e}");
                            created = false;
                        }
                        continue;
                    }
                    None => created = false,
                },
                Err(e) => {
                    if last_note.elapsed() >= Duration::from_secs(2) {
                        last_note = tokio::time::Instant::now();
                        info!(
                            "waiting for the witness group ({e}); is `stretch witness` running and bootstrapped (or, after a force-survivor, has the survivor readmitted this site)?"
                        );
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the witness group did not answer within {:?}: start `stretch witness --bootstrap ...` and both sites",
                    s.join_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let initial_view = map_view(&state, me)?;
        let initial_policy = policy_from_map(
            map_ack.unwrap_or(to_map_policy(s.policy.ack)),
            state.active_site,
            &s.policy,
        );
        info!(?initial_view, ?initial_policy, epoch = ?state.epoch, "joined the witness group");
        let arbiter = Arbiter::new(me, s.arbiter, incarnation, boottime_us());
        let shared = Arc::new(Shared {
            on_detached: std::sync::OnceLock::new(),
            me,
            cg,
            volume_id,
            node: Mutex::new(node),
            device: std::sync::OnceLock::new(),
            arbiter: Mutex::new(arbiter),
            status: Mutex::new(ControlStatus {
                raft_node: id,
                cg,
                ..ControlStatus::default()
            }),
            settings: s.clone(),
            membership_busy: tokio::sync::Mutex::new(()),
        });
        Ok(ControlPlane {
            shared,
            initial_view,
            initial_policy,
            workload: s.workload,
            task: None,
        })
    }

    /// Runs `f` every time this site learns it lost arbitration (set once, after NBD listens).
    pub(crate) fn on_detached(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.shared.on_detached.set(Box::new(f));
    }

    /// The gate the replicated volume asks before serving.
    pub(crate) fn gate(&self) -> Arc<dyn ServeGate> {
        Arc::new(Gate(self.shared.clone()))
    }

    /// Runs the control loop for `device` until [`ControlPlane::stop`].
    pub(crate) fn run(
        &mut self,
        device: Arc<ReplicatedVolume>,
        control_rx: mpsc::Receiver<Vec<u8>>,
    ) {
        let _ = self.shared.device.set(device.clone());
        let ctl = ControlLoop {
            node: self.shared.node(),
            shared: self.shared.clone(),
            device,
            replica_epoch: self.initial_view.epoch,
            map_index: 0,
            policy: String::new(),
            policy_told: self.initial_policy,
            read_index_busy: Arc::new(AtomicUsize::new(0)),
            proposals_busy: Arc::new(AtomicUsize::new(0)),
            last_start_resync_us: 0,
            rejoin_proposed_epoch: None,
            workload: PreferenceTracker::new(self.workload),
            window_started_us: boottime_us(),
            written_at_window_start: 0,
            peer_window: None,
            peer_heard_us: None,
        };
        self.task = Some(tokio::spawn(ctl.run(control_rx)));
    }

    /// What the admin API reports of the control plane (`stretch status`).
    pub(crate) fn view(&self) -> Arc<dyn crate::admin::ControlView> {
        Arc::new(ControlHandle {
            shared: self.shared.clone(),
        })
    }

    /// Stops the loop and the voter; its directory keeps the durable state.
    pub(crate) async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.shared.node().stop().await;
    }
}

/// Proposes a detach naming `survivor` at the CG's current epoch (`stretch detach`). The
/// map's compare-and-set decides: it commits only if the survivor is in sync and the epoch
/// has not moved; the loser is fenced, and the survivor acknowledges alone only after its
/// wait, as after any detach.
async fn detach(node: &WitnessNode, cg: u64, survivor: Site) -> anyhow::Result<String> {
    let (_, map) = node
        .read_map_anywhere(RAFT_DEADLINE)
        .await
        .map_err(|e| anyhow::anyhow!("read the map: {e}"))?;
    let Some(state) = map.cg(cg) else {
        bail!("the map has no record of this volume");
    };
    let cmd = Command::Detach {
        cg,
        survivor,
        expected_epoch: state.epoch,
    };
    let result = node
        .propose_anywhere(cmd, RAFT_DEADLINE)
        .await
        .map_err(|e| anyhow::anyhow!("propose the detach: {e}"))?;
    Ok(match result {
        ApplyResult::One(Outcome::Applied { epoch }) => format!(
            "detached: site {} carries on alone in epoch {}.{}",
            site_name(survivor),
            epoch.generation,
            epoch.n
        ),
        ApplyResult::One(Outcome::Rejected { reason }) => {
            // A proposal relayed after a slow direct attempt may be a duplicate of one that
            // committed: then the map shows exactly this detach, one epoch on.
            let (_, now) = node.read_map_anywhere(RAFT_DEADLINE).await.map_err(|e| {
                anyhow::anyhow!("the map refused the detach ({reason}); read it again: {e}")
            })?;
            let ours = now.cg(cg).is_some_and(|c| {
                Some(c.epoch) == state.epoch.next()
                    && c.state(survivor) == SiteState::InSync
                    && c.state(survivor.peer()) == SiteState::Detached
            });
            if !ours {
                bail!("the map refused the detach: {reason}")
            }
            let epoch = state.epoch.next().unwrap_or(state.epoch);
            format!(
                "detached: site {} carries on alone in epoch {}.{}",
                site_name(survivor),
                epoch.generation,
                epoch.n
            )
        }
        other => format!("{other:?}"),
    })
}

/// `stretch volume policy` / `handoff`: commits the volume's ack policy and/or the async
/// writer. The writer moves only between in-sync sites at the current epoch (the map
/// checks); the replicas then drain the lag and hand over in-band (DESIGN §5 `handoff`).
async fn set_policy(
    node: &WitnessNode,
    volume: u64,
    cg: u64,
    ack: Option<ReplAck>,
    active: Option<u8>,
) -> anyhow::Result<String> {
    let mut done = Vec::new();
    let refused = |what: &str, result: &ApplyResult| -> anyhow::Result<()> {
        match result {
            ApplyResult::One(Outcome::Rejected { reason }) => {
                bail!("the map refused the {what}: {reason}")
            }
            _ => Ok(()),
        }
    };
    if let Some(ack) = ack {
        let cmd = Command::VolumeSetPolicy {
            volume,
            policy: to_map_policy(ack),
        };
        let result = node
            .propose_anywhere(cmd, RAFT_DEADLINE)
            .await
            .map_err(|e| anyhow::anyhow!("propose the policy: {e}"))?;
        refused("policy", &result)?;
        done.push(format!("policy {}", ack.name()));
    }
    if let Some(site) = active {
        let (_, map) = node
            .read_map_anywhere(RAFT_DEADLINE)
            .await
            .map_err(|e| anyhow::anyhow!("read the map: {e}"))?;
        let Some(state) = map.cg(cg) else {
            bail!("the map has no record of this volume");
        };
        let site = if site == 0 { Site::A } else { Site::B };
        let cmd = Command::SetActiveSite {
            cg,
            site,
            expected_epoch: state.epoch,
        };
        let result = node
            .propose_anywhere(cmd, RAFT_DEADLINE)
            .await
            .map_err(|e| anyhow::anyhow!("propose the active site: {e}"))?;
        refused("active site", &result)?;
        done.push(format!("async writer {}", site_name(site)));
    }
    Ok(format!("committed: {}", done.join(", ")))
}

/// The admin API's handle on the control plane.
struct ControlHandle {
    shared: Arc<Shared>,
}

impl crate::admin::ControlView for ControlHandle {
    fn epoch(&self) -> u32 {
        self.shared
            .arbiter()
            .epoch(self.shared.cg)
            .and_then(|e| epoch_u32(e).ok())
            .unwrap_or(0)
    }

    fn status_json(&self) -> Option<serde_json::Value> {
        // The control loop refreshes it every tick (5 ms), leader and term included.
        let status = self.shared.status.lock().ok()?.clone();
        serde_json::to_value(status).ok()
    }

    fn detach(
        &self,
        survivor: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        let survivor = parse_site(survivor);
        Box::pin(async move {
            let survivor = survivor.map_err(|e| e.to_string())?;
            detach(&self.shared.node(), self.shared.cg, survivor)
                .await
                .map_err(|e| format!("{e:#}"))
        })
    }

    fn has_map(&self) -> bool {
        true
    }

    fn set_policy(
        &self,
        ack: Option<ReplAck>,
        active_site: Option<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(async move {
            set_policy(
                &self.shared.node(),
                self.shared.volume_id,
                self.shared.cg,
                ack,
                active_site,
            )
            .await
            .map_err(|e| format!("{e:#}"))
        })
    }
    fn force_survivor(&self, accept_data_loss: bool) -> crate::admin::BoxFuture<'_, ForceOutcome> {
        Box::pin(async move {
            force_survivor(&self.shared, accept_data_loss)
                .await
                .map_err(|e| format!("{e:#}"))
        })
    }

    fn readmit(
        &self,
        witness: Option<SocketAddr>,
        peer: Option<SocketAddr>,
    ) -> crate::admin::BoxFuture<'_, String> {
        Box::pin(async move {
            readmit(&self.shared, witness, peer)
                .await
                .map_err(|e| format!("{e:#}"))
        })
    }
}

/// What `force-survivor` reports: whether it acted, and the text for the operator.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ForceOutcome {
    pub(crate) acted: bool,
    pub(crate) report: String,
}

/// How long `force-survivor` tries a linearizable read before it believes nothing can commit.
const HEALTH_PROBE: Duration = Duration::from_secs(3);
/// How long `readmit` waits for the returning members to catch up.
const READMIT_DEADLINE: Duration = Duration::from_secs(60);

/// What this site knows when nothing can commit: the text `force-survivor` prints before it
/// acts (DESIGN §6: "it shows the site's last known epoch before acting").
fn force_report(shared: &Shared, map: &ClusterMap, node: &WitnessNode) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let me = shared.me;
    let Some(cg) = map.cg(shared.cg) else {
        bail!("this site's map has no record of its volume: nothing to carry on with");
    };
    let stats = shared.device_stats();
    let (dirty, untrusted) = stats
        .as_ref()
        .map(|s| (s.dirty_blocks, s.untrusted_blocks))
        .unwrap_or((0, 0));
    let mut t = String::new();
    let (mine, theirs) = (cg.state(me), cg.state(me.peer()));
    let _ = writeln!(
        t,
        "site {} (raft node {}, generation {}): last known epoch {}.{}; this site {}, site {} {}",
        site_name(me),
        node.id,
        node.generation,
        cg.epoch.generation,
        cg.epoch.n,
        state_name(mine),
        site_name(me.peer()),
        state_name(theirs),
    );
    let _ = writeln!(
        t,
        "blocks: {dirty} not known to match site {} (dirty), {untrusted} untrusted since a crash",
        site_name(me.peer())
    );
    let _ = writeln!(
        t,
        "what may be lost if site {} carries on alone:",
        site_name(me)
    );
    match mine {
        SiteState::InSync => {
            let _ = writeln!(
                t,
                "  - every write site {} acknowledged alone after epoch {}.{}, if it won a detach this site never learned of",
                site_name(me.peer()),
                cg.epoch.generation,
                cg.epoch.n
            );
        }
        SiteState::Detached | SiteState::Resyncing => {
            let _ = writeln!(
                t,
                "  - !!! THIS SITE LOST ARBITRATION (it is {}): every write site {} acknowledged alone since epoch {}.{} is NOT here and will be LOST",
                state_name(mine),
                site_name(me.peer()),
                cg.epoch.generation,
                cg.epoch.n
            );
        }
    }
    if untrusted > 0 {
        let _ = writeln!(
            t,
            "  - {untrusted} blocks written just before this site's last crash: they stay as they are here, which may be older than what site {} acknowledged",
            site_name(me.peer())
        );
    }
    let _ = writeln!(
        t,
        "  - site {}'s own writes that never reached this site: it comes back only through a full resync from this site, its divergent blocks saved to its side file",
        site_name(me.peer())
    );
    Ok(t)
}

/// `stretch force-survivor SITE --accept-data-loss` (DESIGN §6, the double failure): this site
/// becomes a one-voter group of a new generation and carries on alone.
async fn force_survivor(shared: &Shared, accept: bool) -> anyhow::Result<ForceOutcome> {
    let _busy = shared.membership_busy.lock().await;
    let old = shared.node();
    // Only for when nothing can commit: if a linearizable read succeeds, a leader with a
    // majority exists and an ordinary detach decides safely.
    if let Ok((_, map)) = old.read_map_anywhere(HEALTH_PROBE).await {
        let epoch = map
            .cg(shared.cg)
            .map(|c| format!("{}.{}", c.epoch.generation, c.epoch.n))
            .unwrap_or_default();
        bail!(
            "the witness group can commit (a leader answered a linearizable read, epoch {epoch}): nothing is stalled; use `stretch detach --survivor {}` instead",
            site_name(shared.me)
        );
    }
    let map = old.local_map();
    let mut report = force_report(shared, &map, &old)?;
    let generation = map.generation.max(old.generation) + 1;
    if generation > GENERATION_MAX {
        bail!("generation {generation} is beyond the last one ({GENERATION_MAX}) the replicator's epochs can carry");
    }
    let first = Epoch::first(generation);
    let epoch = epoch_u32(first)?;
    if !accept {
        report.push_str(&format!(
            "
nothing done. With --accept-data-loss, site {} becomes a one-voter group of generation {generation} (epoch {generation}.1), fences site {} and serves alone.
",
            site_name(shared.me),
            site_name(shared.me.peer())
        ));
        return Ok(ForceOutcome {
            acted: false,
            report,
        });
    }
    warn!(
        "force-survivor accepted with data loss:
{report}"
    );
    let s = &shared.settings;
    old.stop().await;
    let new = match start_generation(shared, generation, map).await {
        Ok(node) => node,
        Err(e) => {
            // Back to the old generation's voter, so the site is where it was.
            let back = async {
                let listener = bind_raft(s.raft_listen).await?;
                let raft_dir = generation_dir(&s.dir, old.generation);
                WitnessNode::start_with(old.id, &raft_dir, listener, peer_addrs(s, shared.me))
                    .await
                    .map_err(|e| anyhow::anyhow!("restart the old voter: {e}"))
            };
            match back.await {
                Ok(node) => *shared.node.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(node),
                Err(e2) => warn!("after a failed force-survivor: {e2:#}"),
            }
            return Err(e.context("force-survivor failed; the site is still in its old generation"));
        }
    };
    let id = new.id;
    *shared.node.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    let peer = site_name(shared.me.peer());
    report.push_str(&format!(
        "
site {me} now carries on alone: generation {generation}, raft node {id}, epoch {generation}.1 (replicator epoch {epoch}); site {peer} is fenced.
         It serves once its lease wait is over. To bring the others back (docs/operations.md, \"After force-survivor\"):
           1. the witness: stop it; start it with --generation {generation} (no --bootstrap)
           2. site {peer}: stop it; run `stretch prepare-rejoin --data-dir DIR --site {peer} --volume NAME --generation {generation}`; start it
           3. `stretch readmit --site http://THIS_ADMIN --witness W_RAFT_ADDR --peer {peer}_RAFT_ADDR`
         Site {peer} then resyncs every block from this site and rejoins.
",
        me = site_name(shared.me),
    ));
    Ok(ForceOutcome {
        acted: true,
        report,
    })
}

/// Starts this site's voter of `generation` alone, commits the `ForceSurvivor` entry carrying
/// `map`, and records the generation; returns the running voter.
async fn start_generation(
    shared: &Shared,
    generation: u64,
    map: ClusterMap,
) -> anyhow::Result<WitnessNode> {
    let s = &shared.settings;
    // A force-survivor interrupted before it recorded this generation left its state half
    // made; it never served, so it is started afresh.
    discard_unrecorded(&s.dir, generation)
        .with_context(|| format!("clear generation {generation}'s directory"))?;
    let raft_dir = generation_dir(&s.dir, generation);
    let id = node_id(generation, member(shared.me));
    let listener = bind_raft(s.raft_listen).await?;
    let node = WitnessNode::start_with(id, &raft_dir, listener, peer_addrs(s, shared.me))
        .await
        .map_err(|e| anyhow::anyhow!("start generation {generation}'s voter: {e}"))?;
    let work = async {
        node.bootstrap(std::collections::BTreeMap::from([(
            id,
            BasicNode::new(s.raft_listen.to_string()),
        )]))
        .await
        .map_err(|e| anyhow::anyhow!("make the one-voter group: {e}"))?;
        let cmd = Command::ForceSurvivor {
            survivor: shared.me,
            generation,
            carried: Some(Box::new(map)),
        };
        // Bounded: the one voter elects itself within an election timeout.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let result = loop {
            match node.propose(cmd.clone()).await {
                Ok(r) => break r,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    bail!("commit the ForceSurvivor entry: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        match result {
            ApplyResult::One(Outcome::Applied { .. }) => {}
            other => bail!("the new group refused the ForceSurvivor entry: {other:?}"),
        }
        // Only now is the new generation the site's: a crash before this restarts it in the
        // old one, as if force-survivor had not run.
        write_generation(&s.dir, generation)
            .with_context(|| format!("record generation {generation}"))?;
        Ok(())
    };
    match work.await {
        Ok(()) => Ok(node),
        Err(e) => {
            node.stop().await;
            Err(e)
        }
    }
}

/// `stretch readmit`: the survivor of a force-survivor adds the witness and the other site,
/// each already running under this generation, as voters again.
async fn readmit(
    shared: &Shared,
    witness: Option<SocketAddr>,
    peer: Option<SocketAddr>,
) -> anyhow::Result<String> {
    let _busy = shared.membership_busy.lock().await;
    let node = shared.node();
    if node.leader().0 != Some(node.id) {
        bail!(
            "this site's voter (node {}) is not the leader of its group: run readmit at the survivor of the force-survivor",
            node.id
        );
    }
    let generation = node.generation;
    let mut learners = std::collections::BTreeMap::new();
    if let Some(w) = witness {
        learners.insert(
            node_id(generation, Member::W),
            BasicNode::new(w.to_string()),
        );
    }
    if let Some(p) = peer {
        learners.insert(
            node_id(generation, member(shared.me.peer())),
            BasicNode::new(p.to_string()),
        );
    }
    if learners.is_empty() {
        bail!("name the members to readmit: --witness ADDR and/or --peer ADDR");
    }
    let mut voters: std::collections::BTreeSet<u64> = node.voters().into_iter().collect();
    voters.extend(learners.keys().copied());
    let added: Vec<String> = learners.keys().map(|id| id.to_string()).collect();
    node.add_voters(learners, voters.clone(), READMIT_DEADLINE)
        .await
        .map_err(|e| anyhow::anyhow!("{e} (are they running with --generation {generation}?)"))?;
    Ok(format!(
        "generation {generation}: voters are now {voters:?} (added {})",
        added.join(", ")
    ))
}

struct ControlLoop {
    node: Arc<WitnessNode>,
    shared: Arc<Shared>,
    device: Arc<ReplicatedVolume>,
    /// The epoch the replica was last told about.
    replica_epoch: u32,
    map_index: u64,
    /// The volume's ack policy in the last map seen.
    policy: String,
    /// The policy the replica was last given.
    policy_told: ReplPolicy,
    read_index_busy: Arc<AtomicUsize>,
    proposals_busy: Arc<AtomicUsize>,
    last_start_resync_us: u64,
    rejoin_proposed_epoch: Option<u32>,
    workload: PreferenceTracker,
    window_started_us: u64,
    written_at_window_start: u64,
    /// The peer's last reported window: (bytes, when it arrived).
    peer_window: Option<(u64, u64)>,
    /// When the last control frame from the peer arrived: the peer is heard, not merely
    /// connected (a TCP session outlives a partition by its idle timeout).
    peer_heard_us: Option<u64>,
}

/// The survivor starts a resync only with a peer heard this recently (heartbeats flow every
/// 50 ms whatever the site's state).
const PEER_HEARD_US: u64 = 250_000;

/// A ReadIndex reply for the loop.
struct ReadIndexDone {
    id: u64,
    index: u64,
    map: ClusterMap,
}

impl ControlLoop {
    async fn run(mut self, mut control_rx: mpsc::Receiver<Vec<u8>>) {
        let (ri_tx, mut ri_rx) = mpsc::channel::<ReadIndexDone>(4);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            self.follow_generation();
            let mut actions = Vec::new();
            tokio::select! {
                _ = tick.tick() => {}
                body = control_rx.recv() => {
                    let Some(body) = body else { return };
                    self.on_control(&body);
                    continue;
                }
                done = ri_rx.recv() => {
                    let Some(done) = done else { return };
                    let now = boottime_us();
                    actions.extend(self.shared.arbiter().on_read_index(
                        done.id, done.index, &done.map, now,
                    ));
                }
            }
            let now = boottime_us();
            actions.extend(self.shared.arbiter().tick(now));
            // The map is copied only when the log moved (this runs every 5 ms).
            if self.node.local_applied_index() > self.map_index {
                let (index, map) = self.node.local_indexed_map();
                self.map_index = index;
                self.policy = map
                    .volumes
                    .get(&self.shared.volume_id)
                    .map(|v| format!("{:?}", v.policy).to_lowercase())
                    .unwrap_or_default();
                actions.extend(self.shared.arbiter().on_map(index, &map, now));
                self.sync_policy(&map).await;
            }
            for action in actions {
                self.act(action, &ri_tx);
            }
            if let Err(e) = self.sync_replica(now).await {
                self.note_error(format!("{e:#}"));
            }
            self.drive_resync(now);
            self.follow_workload(now);
            self.publish(now);
        }
    }

    /// After a `force-survivor` swapped the voter: a fresh arbiter (new incarnation, no lease,
    /// serving nothing before its first ReadIndex of the new group), and the map followed from
    /// the new voter's log, whose indexes start again from 1.
    fn follow_generation(&mut self) {
        let node = self.shared.node();
        if Arc::ptr_eq(&node, &self.node) {
            return;
        }
        let incarnation = match next_incarnation(&self.shared.settings.dir) {
            Ok(i) => i,
            Err(e) => {
                // Without a new incarnation, heartbeat ids of the old arbiter could be
                // mistaken for the new one's: keep the old arbiter (it serves nothing, its
                // epoch is gone) and try again next tick.
                self.note_error(format!("new arbiter after force-survivor: {e:#}"));
                return;
            }
        };
        info!(
            generation = node.generation,
            node = node.id,
            "following the new generation's voter"
        );
        *self.shared.arbiter() = Arbiter::new(
            self.shared.me,
            self.shared.settings.arbiter,
            incarnation,
            boottime_us(),
        );
        if let Ok(mut s) = self.shared.status.lock() {
            s.raft_node = node.id;
        }
        self.node = node;
        self.map_index = 0;
        self.rejoin_proposed_epoch = None;
        self.last_start_resync_us = 0;
    }

    fn on_control(&mut self, body: &[u8]) {
        let Ok(msg) = postcard::from_bytes::<ControlMsg>(body) else {
            warn!("undecodable control frame from the peer; dropped");
            return;
        };
        let now = boottime_us();
        self.peer_heard_us = Some(now);
        match msg {
            ControlMsg::Heartbeat(hb) => {
                let echo = self.shared.arbiter().on_heartbeat(&hb, now);
                self.send(&ControlMsg::Echo(echo));
            }
            ControlMsg::Echo(echo) => self.shared.arbiter().on_echo(&echo, now),
            ControlMsg::Workload { window_bytes } => self.peer_window = Some((window_bytes, now)),
        }
    }

    /// At the end of each window: tell the peer what this site wrote, and claim the
    /// preference if this site has dominated the workload long enough (DESIGN §6).
    fn follow_workload(&mut self, now: u64) {
        let window_us = self.workload.config().window_us;
        if now.saturating_sub(self.window_started_us) < window_us {
            return;
        }
        self.window_started_us = now;
        let written = self.device.written_bytes();
        let mine = written.saturating_sub(self.written_at_window_start);
        self.written_at_window_start = written;
        self.send(&ControlMsg::Workload { window_bytes: mine });
        // A report older than two windows says nothing about this one.
        let peer = match self.peer_window {
            Some((bytes, at)) if now.saturating_sub(at) <= 2 * window_us => bytes,
            _ => 0,
        };
        let Some(current) = self
            .shared
            .arbiter()
            .view(self.shared.cg)
            .map(|v| v.preference)
        else {
            return;
        };
        if let Some(cmd) =
            self.workload
                .on_window(now, self.shared.cg, self.shared.me, current, mine, peer)
        {
            info!(mine, peer, "this site writes most: claiming the preference");
            self.propose(cmd);
        }
    }

    fn send(&self, msg: &ControlMsg) {
        match postcard::to_stdvec(msg) {
            // A dropped heartbeat or echo only lets a lease run out sooner: the safe side.
            Ok(body) => {
                self.device.send_control(&body);
            }
            Err(e) => warn!("encode a control message: {e}"),
        }
    }

    fn act(&mut self, action: Action, ri_tx: &mpsc::Sender<ReadIndexDone>) {
        match action {
            Action::SendHeartbeat(hb) => self.send(&ControlMsg::Heartbeat(hb)),
            Action::ReadIndex { id } => {
                // One at a time: the arbiter asks again at its next interval.
                if self.read_index_busy.fetch_add(1, Ordering::SeqCst) > 0 {
                    self.read_index_busy.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                let (node, busy, tx) = (
                    self.node.clone(),
                    self.read_index_busy.clone(),
                    ri_tx.clone(),
                );
                tokio::spawn(async move {
                    if let Ok((index, map)) = node.read_map_anywhere(RAFT_DEADLINE).await {
                        let _ = tx.send(ReadIndexDone { id, index, map }).await;
                    }
                    busy.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Action::Propose(cmd) => {
                // A site restarted after a crash holds blocks it has not settled from its
                // peer yet; crowning it could lose writes the peer acknowledged. It waits
                // (the arbiter proposes again) until they are settled, or an operator acts.
                let crowns_me = match &cmd {
                    Command::Detach { survivor, .. } | Command::DetachMany { survivor, .. } => {
                        *survivor == self.shared.me
                    }
                    _ => false,
                };
                let untrusted = self.device.driver_stats().untrusted_blocks;
                if crowns_me && untrusted > 0 {
                    self.note_error(format!(
                        "not proposing to carry on alone: {untrusted} blocks are not yet settled from the peer since a crash"
                    ));
                    return;
                }
                self.propose(cmd)
            }
            Action::Detached { cg } => {
                warn!(
                    cg,
                    "this site lost arbitration: failing its queued requests with EIO and closing its NBD connections"
                );
                // Clients reconnect elsewhere (or here, to EIO); none re-issues a request
                // to this site on a connection that outlived the detach.
                if let Some(close) = self.shared.on_detached.get() {
                    close();
                }
            }
            Action::LeaseLapsed { cg, policy } => {
                warn!(
                    cg,
                    ?policy,
                    "lease lapsed: this site stops serving the volume"
                );
            }
        }
    }

    fn propose(&mut self, cmd: Command) {
        if self.proposals_busy.fetch_add(1, Ordering::SeqCst) >= PROPOSALS_IN_FLIGHT_MAX {
            self.proposals_busy.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        if let Ok(mut s) = self.shared.status.lock() {
            s.proposals += 1;
        }
        let (node, busy, shared) = (
            self.node.clone(),
            self.proposals_busy.clone(),
            self.shared.clone(),
        );
        info!(?cmd, "proposing");
        tokio::spawn(async move {
            match node.propose_anywhere(cmd.clone(), RAFT_DEADLINE).await {
                Ok(result) => info!(?cmd, ?result, "proposal decided"),
                Err(e) => {
                    let text = format!("proposal {cmd:?}: {e}");
                    warn!("{text}");
                    if let Ok(mut s) = shared.status.lock() {
                        s.last_error = Some(text);
                    }
                }
            }
            busy.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Tells the replica when the map changed the volume's ack policy or async writer
    /// (DESIGN §5: "changeable live"); the replica switches its mode in-band with the peer.
    async fn sync_policy(&mut self, map: &ClusterMap) {
        let Some(volume) = map.volumes.get(&self.shared.volume_id) else {
            return;
        };
        let Some(cg) = map.cg(self.shared.cg) else {
            return;
        };
        let policy = policy_from_map(volume.policy, cg.active_site, &self.policy_told);
        if policy == self.policy_told {
            return;
        }
        info!(?policy, "the map changed the volume's ack policy");
        match self.device.control(Event::SetPolicy(policy)).await {
            Ok(()) => self.policy_told = policy,
            Err(e) => self.note_error(format!("tell the replica its policy: {e}")),
        }
    }

    /// Tells the replica about a new epoch, when it may know it (module documentation).
    async fn sync_replica(&mut self, now: u64) -> anyhow::Result<()> {
        let (view, serve) = {
            let arb = self.shared.arbiter();
            let Some(view) = arb.view(self.shared.cg).cloned() else {
                return Ok(());
            };
            (view, arb.serve(self.shared.cg, now))
        };
        let epoch = epoch_u32(view.epoch)?;
        if epoch <= self.replica_epoch {
            return Ok(());
        }
        let me = self.shared.me;
        let target = map_view(&view, me)?;
        let event = match target.role {
            Role::InSync => Event::Rejoin { new_epoch: epoch },
            // Learning it lets the replica acknowledge alone: only after the wait.
            Role::Survivor if serve != Serve::Yes => return Ok(()),
            Role::Survivor => Event::Detach {
                survivor: site_idx(me),
                new_epoch: epoch,
                fenced_before: target.fenced_before,
            },
            Role::Loser => Event::Detach {
                survivor: site_idx(me.peer()),
                new_epoch: epoch,
                fenced_before: target.fenced_before,
            },
        };
        info!(?event, "the replica learns the new epoch");
        self.device
            .control(event)
            .await
            .map_err(|e| anyhow::anyhow!("tell the replica: {e}"))?;
        self.replica_epoch = epoch;
        Ok(())
    }

    /// Survivor: bring the detached site back (DESIGN §4 "Resync", §6 "Rejoin").
    fn drive_resync(&mut self, now: u64) {
        let (view, is_survivor) = {
            let arb = self.shared.arbiter();
            let Some(view) = arb.view(self.shared.cg).cloned() else {
                return;
            };
            (view, arb.is_survivor(self.shared.cg))
        };
        let Ok(epoch) = epoch_u32(view.epoch) else {
            return;
        };
        if !is_survivor || self.replica_epoch != epoch {
            return;
        }
        let stats = self.device.driver_stats();
        let peer = self.shared.me.peer();
        let heard = self
            .peer_heard_us
            .is_some_and(|t| now.saturating_sub(t) <= PEER_HEARD_US);
        match view.state(peer) {
            SiteState::Detached if stats.link_up && heard => {
                let retry_us = START_RESYNC_RETRY.as_micros() as u64;
                if now.saturating_sub(self.last_start_resync_us) >= retry_us {
                    self.last_start_resync_us = now;
                    self.propose(Command::StartResync {
                        cg: self.shared.cg,
                        site: peer,
                        expected_epoch: view.epoch,
                    });
                }
            }
            SiteState::Resyncing
                if stats.resync_complete_epoch == Some(epoch)
                    && self.rejoin_proposed_epoch != Some(epoch) =>
            {
                let cmd = self.shared.arbiter().propose_rejoin(self.shared.cg, now);
                if let Some(cmd) = cmd {
                    self.rejoin_proposed_epoch = Some(epoch);
                    self.propose(cmd);
                }
            }
            _ => {}
        }
    }

    fn note_error(&self, text: String) {
        warn!("{text}");
        if let Ok(mut s) = self.shared.status.lock() {
            s.last_error = Some(text);
        }
    }

    fn publish(&self, now: u64) {
        let (leader, term) = self.node.leader();
        let arb = self.shared.arbiter();
        let serving = match arb.serve(self.shared.cg, now) {
            Serve::Yes => "serve",
            Serve::Hold => "hold",
            Serve::Eio => "fail",
        };
        let view = arb.view(self.shared.cg).cloned();
        let left_ms = |t: Option<u64>| t.map(|t| t.saturating_sub(now) / 1_000);
        let lease_left_ms = left_ms(arb.lease_expiry_us(self.shared.cg));
        let alone_in_ms = left_ms(arb.alone_ok_at_us(self.shared.cg));
        drop(arb);
        if let Ok(mut s) = self.shared.status.lock() {
            s.raft_leader = leader;
            s.raft_term = term;
            s.serving = serving.into();
            s.policy = self.policy.clone();
            s.lease_left_ms = lease_left_ms;
            s.alone_in_ms = alone_in_ms;
            if let Some(v) = view {
                s.epoch = format!("{}.{}", v.epoch.generation, v.epoch.n);
                s.site_states = [state_name(v.sites[0]), state_name(v.sites[1])];
                s.preference = match v.preference {
                    Preference::Pinned(site) => format!("pinned {}", site_name(site)),
                    Preference::Workload(site) => format!("workload {}", site_name(site)),
                };
                s.single_copy = v.state(self.shared.me) == SiteState::InSync
                    && v.state(self.shared.me.peer()) != SiteState::InSync;
            }
        }
    }
}

fn state_name(s: SiteState) -> String {
    match s {
        SiteState::InSync => "in-sync",
        SiteState::Detached => "detached",
        SiteState::Resyncing => "resyncing",
    }
    .into()
}

pub(crate) fn site_name(s: Site) -> &'static str {
    match s {
        Site::A => "a",
        Site::B => "b",
    }
}

/// Parses `a` or `b`.
pub(crate) fn parse_site(text: &str) -> anyhow::Result<Site> {
    match text {
        "a" | "A" => Ok(Site::A),
        "b" | "B" => Ok(Site::B),
        other => bail!("a site is a or b, not {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The replicator compares accept epochs as u32: the mapping must keep the map's order,
    // generation first, and refuse what it cannot represent rather than wrap.
    #[test]
    fn epoch_mapping_keeps_order_and_refuses_overflow() {
        let e = |generation, n| Epoch { generation, n };
        let pairs = [(e(0, 1), e(0, 2)), (e(0, 99), e(1, 1)), (e(1, 5), e(2, 1))];
        for (lo, hi) in pairs {
            assert!(
                epoch_u32(lo).unwrap() < epoch_u32(hi).unwrap(),
                "{lo:?} < {hi:?}"
            );
        }
        assert!(epoch_u32(e(0, 1 << 24)).is_err());
        assert!(epoch_u32(e(256, 1)).is_err());
    }

    #[test]
    fn map_view_roles() {
        let mut cg = CgState {
            epoch: Epoch {
                generation: 0,
                n: 3,
            },
            sites: [SiteState::InSync, SiteState::Detached],
            fenced_before: [
                Epoch::default(),
                Epoch {
                    generation: 0,
                    n: 3,
                },
            ],
            preference: Preference::Workload(Site::A),
            active_site: Site::A,
            volume_count: 1,
        };
        let a = map_view(&cg, Site::A).unwrap();
        assert_eq!(
            (a.role, a.epoch, a.fenced_before),
            (Role::Survivor, 3, [0, 3])
        );
        assert_eq!(map_view(&cg, Site::B).unwrap().role, Role::Loser);
        cg.sites[1] = SiteState::Resyncing;
        assert_eq!(map_view(&cg, Site::B).unwrap().role, Role::Loser);
        cg.sites[1] = SiteState::InSync;
        assert_eq!(map_view(&cg, Site::B).unwrap().role, Role::InSync);
    }
}
