//! [`ReplicatedVolume`]: a [`BlockDevice`] whose writes are replicated to the peer site under
//! the `sync` policy (DESIGN.md §4, §5). The NBD server serves it like a local volume.
//!
//! Every request becomes a client event for the replica thread ([`crate::driver`]) and its
//! reply waits for the core's answer:
//! - **write / trim / write_zeroes** reply once the core acknowledges them: applied (visible)
//!   at both sites, not necessarily durable (or at this site alone, durable, if it is the
//!   survivor of a detach). A crash of one site loses nothing acknowledged: the restarted
//!   site settles what it lost from the peer (`core::replica`).
//! - **FUA** on a write travels in its frame: the peer flushes before its ack, and this site
//!   before the reply. TRIM and WRITE_ZEROES with FUA are followed by a FLUSH (stronger, and
//!   rare enough not to need a flag of their own).
//! - **read** is served locally, waiting while a covered block has a write still waiting for
//!   the peer or is not yet settled after a crash (§4 "Reads"). A block that fails its
//!   checksum is repaired from the peer while both are in sync, else the read gets EIO
//!   (`core::repair`); the fast path leaves every engine error to the core.
//! - **repair_blocks** (`verify --repair`) asks the core to repair named blocks from the
//!   in-sync peer.
//! - **flush** goes through the core: every mutation completed before it becomes durable at
//!   both sites (the peer flushes on a FlushMarker and answers DurableAck), so after a FLUSH
//!   reply it survives the power loss of both sites (§7 invariant 2). Like a write, it waits
//!   while the peer is unreachable.
//! - **block_status** reports the local volume's allocation; while in sync, the peer's is the
//!   same for every settled block.
//! - WRITE_ZEROES always punches a hole, even with NO_HOLE (the replicated zero is a stamped
//!   tombstone, the same at both sites); NO_HOLE is a hint in the NBD protocol, and reads of
//!   the range return zeroes either way.
//!
//! Back-pressure: a request holds a permit while it is with the core. There are as many
//! mutation permits as the core's admission queue holds, so the core never answers `Busy`;
//! beyond, NBD requests wait here, the NBD server stops reading its socket, and the pressure
//! reaches the client. Requests longer than the core's frame limit (32 MiB) are split.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

use stretch_engine::{
    AlignedBuf, BlockDevice, BlockError, Extent, Volume, ZeroFlags, BLOCK_SIZE, REQUEST_BYTES_MAX,
};

use crate::core::{ClientError, ClientOpId, Config, Event, MapView};
use crate::driver::{self, Clock, DriverConfig, DriverStats, Input, Reply};
use crate::frame::{Frame, Header, Kind, CONTROL_BODY_BYTES_MAX};
use crate::link::{self, LinkConfig, LinkMode, LinkStats};
use crate::shadow::DirtyShadow;
use crate::store::EngineStore;

const BLOCK_BYTES: u64 = BLOCK_SIZE as u64;
/// The largest piece of one request sent to the core (the frame body limit).
const PIECE_BYTES_MAX: u64 = REQUEST_BYTES_MAX as u64;
/// Blocks one repair operation hands the core; longer lists go in pieces (the core bounds
/// the blocks it has asked the peer for at once).
pub const REPAIR_BLOCKS_PER_OP_MAX: usize = 1024;

/// Options of a replicated volume besides the core's [`Config`].
#[derive(Clone, Debug)]
pub struct ReplicatedOptions {
    pub driver: DriverConfig,
    pub link: LinkConfig,
    /// Inputs queued for the replica thread (client requests, frames, ticks).
    pub inputs_max: usize,
    /// How often the replica gets a Tick (heartbeats, retransmissions).
    pub tick_interval_ms: u64,
    /// A request the core has not answered by then fails with EIO (outcome unknown). While
    /// the peer is unreachable and no witness can detach it, writes wait for it: this bounds
    /// the wait a client sees.
    pub request_timeout_ms: u64,
}

impl ReplicatedOptions {
    pub fn new(driver: DriverConfig, link: LinkConfig) -> ReplicatedOptions {
        ReplicatedOptions {
            driver,
            link,
            inputs_max: 1024,
            tick_interval_ms: 5,
            request_timeout_ms: 60_000,
        }
    }
}

/// The control plane's answer to "may a request be served now?" (DESIGN.md §6: leases, the
/// survivor's wait, the loser).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateAnswer {
    Serve,
    /// Not now, perhaps soon (a lease being renewed, the survivor's wait): the request waits.
    Hold,
    /// Fail it with EIO.
    Fail,
}

/// Asked before every request goes to the replica and again before a read's data goes back.
pub trait ServeGate: Send + Sync {
    fn check(&self) -> GateAnswer;
    /// The answer for a read. A site catching up may be let through here though it may not
    /// take writes: its replica then decides by the survivor's read lease and the blocks
    /// already resynced (DESIGN.md §4 "Resync").
    fn check_read(&self) -> GateAnswer {
        self.check()
    }
}

/// Which of the gate's answers a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GateFor {
    Read,
    Mutation,
}

fn ask(gate: &dyn ServeGate, what: GateFor) -> GateAnswer {
    match what {
        GateFor::Read => gate.check_read(),
        GateFor::Mutation => gate.check(),
    }
}

/// How often a held request asks the gate again.
const GATE_POLL: Duration = Duration::from_millis(5);

/// A volume replicated to the peer site; see the module documentation.
pub struct ReplicatedVolume {
    volume: Arc<Volume>,
    inputs: mpsc::Sender<Input>,
    /// For control frames, which bypass the replica thread.
    outbound: driver::Outbound,
    site: u8,
    cluster_id: u64,
    gate: std::sync::OnceLock<Arc<dyn ServeGate>>,
    mutation_permits: Semaphore,
    read_permits: Semaphore,
    next_id: AtomicU64,
    /// Bytes of client writes acknowledged here (the control plane's workload measure).
    written_bytes: AtomicU64,
    /// The store's dirty set, mirrored for the read fast path.
    shadow: Arc<DirtyShadow>,
    /// Reads served by the fast path / by the replica thread.
    fast_reads: AtomicU64,
    slow_reads: AtomicU64,
    request_timeout: Duration,
    driver_stats: Arc<Mutex<DriverStats>>,
    link_stats: Arc<Mutex<LinkStats>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ReplicatedVolume {
    /// Starts replication of `volume`: the replica thread, the link task and the ticker. Call
    /// from inside a tokio runtime. The volume must not be mutated by anyone else afterwards
    /// (the apply rule relies on the replica thread being its only writer; see
    /// [`crate::store`]).
    pub fn start(
        volume: Arc<Volume>,
        cfg: Config,
        map: MapView,
        mode: LinkMode,
        options: ReplicatedOptions,
    ) -> Result<ReplicatedVolume, String> {
        let handle = tokio::runtime::Handle::current();
        let store = EngineStore::open(volume.clone(), handle)?;
        let shadow = store.shadow();
        let (inputs_tx, inputs_rx) = mpsc::channel(options.inputs_max.max(1));
        let driver_stats = Arc::new(Mutex::new(DriverStats::default()));
        let link_stats = Arc::new(Mutex::new(LinkStats::default()));
        let (outbound, outbound_rx) = driver::outbound_queue(
            options.driver.outbound_frames_max,
            options.driver.outbound_bytes_max,
            cfg.cluster_id,
            link_stats.clone(),
        );
        let mutation_permits = Semaphore::new(cfg.admission_queue_max.max(1));
        let read_permits = Semaphore::new(cfg.reads_waiting_max.max(1));
        let (site, cluster_id) = (cfg.site, cfg.cluster_id);
        driver::spawn(
            cfg,
            map,
            store,
            options.driver.clone(),
            driver::Plumbing {
                inputs: inputs_rx,
                outbound: outbound.clone(),
                stats: driver_stats.clone(),
            },
            Clock::new(),
        )
        .map_err(|e| format!("start the replica thread: {e}"))?;
        let link_task = tokio::spawn(link::run(
            mode,
            options.link.clone(),
            inputs_tx.clone(),
            outbound_rx,
            link_stats.clone(),
        ));
        let ticker_inputs = inputs_tx.clone();
        let tick = Duration::from_millis(options.tick_interval_ms.max(1));
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                interval.tick().await;
                if ticker_inputs.send(Input::Peer(Event::Tick)).await.is_err() {
                    return;
                }
            }
        });
        Ok(ReplicatedVolume {
            volume,
            inputs: inputs_tx,
            outbound,
            site,
            cluster_id,
            gate: std::sync::OnceLock::new(),
            mutation_permits,
            read_permits,
            next_id: AtomicU64::new(1),
            written_bytes: AtomicU64::new(0),
            shadow,
            fast_reads: AtomicU64::new(0),
            slow_reads: AtomicU64::new(0),
            request_timeout: Duration::from_millis(options.request_timeout_ms),
            driver_stats,
            link_stats,
            tasks: vec![link_task, ticker],
        })
    }

    /// Reads served straight from the engine, and through the replica thread.
    pub fn read_paths(&self) -> (u64, u64) {
        (
            self.fast_reads.load(Ordering::Relaxed),
            self.slow_reads.load(Ordering::Relaxed),
        )
    }

    /// The read fast path (see [`crate::shadow`]): a range with no dirty block, at a site
    /// that serves, is read straight from the engine, concurrently with everything else.
    /// `None` sends the read through the replica thread (a dirty block, a write racing the
    /// read, a role that needs the core's judgement, or an engine error the core may repair).
    async fn read_fast(&self, offset: u64, len: u32) -> Option<AlignedBuf> {
        let stats = self.driver_stats();
        if !stats.local_reads || stats.failed {
            return None;
        }
        let first = offset / BLOCK_BYTES;
        let blocks = (offset + u64::from(len)).div_ceil(BLOCK_BYTES) - first;
        let generation = self.shadow.generation();
        if !self.shadow.range_clean(first, blocks) {
            return None;
        }
        let data = self.volume.read(offset, len).await.ok()?;
        // A block turned dirty while we read: its new data may be in `data` before the peer
        // has it. Let the core decide.
        (self.shadow.generation() == generation).then_some(data)
    }

    /// Repairs `lbas` from the peer (`verify --repair`, DESIGN.md §4 "Repair"): each block takes
    /// the peer's version if it fails its checksum here or the peer's stamp is greater
    /// (`force`: or equal, for the operator's `--from`). Fails if the peer is not in sync at
    /// the current epoch, or if any block could not be repaired (the error says how many).
    pub async fn repair_blocks(&self, lbas: &[u64], force: bool) -> Result<(), BlockError> {
        let blocks = self.volume.size_bytes() / BLOCK_BYTES;
        if let Some(&lba) = lbas.iter().find(|&&lba| lba >= blocks) {
            return Err(BlockError::OutOfRange {
                offset: lba.saturating_mul(BLOCK_BYTES),
                len: BLOCK_BYTES,
                size: self.volume.size_bytes(),
            });
        }
        let mut failed = 0usize;
        // Bounded: one call per piece of the caller's (bounded) list.
        for piece in lbas.chunks(REPAIR_BLOCKS_PER_OP_MAX) {
            let event = |id| Event::ClientRepair {
                id,
                lbas: piece.to_vec(),
                force,
            };
            match self.call(&self.read_permits, event).await? {
                Reply::Done => {}
                Reply::Failed(ClientError::Io) => failed += piece.len(),
                Reply::Failed(error) => return Err(client_error(error)),
                Reply::Data(_) => {
                    return Err(BlockError::Io(std::io::Error::other(
                        "replica answered a repair with data",
                    )))
                }
            }
        }
        if failed > 0 {
            return Err(BlockError::Io(std::io::Error::other(format!(
                "{failed} of {} blocks could not be repaired (peer not in sync, or its copy \
                 fails its checksum too)",
                lbas.len()
            ))));
        }
        Ok(())
    }

    /// Bytes of client writes acknowledged at this site since start.
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes.load(Ordering::Relaxed)
    }

    pub fn driver_stats(&self) -> DriverStats {
        self.driver_stats.lock().map(|s| *s).unwrap_or_default()
    }

    pub fn link_stats(&self) -> LinkStats {
        self.link_stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// The local volume (for its name and paths).
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Hands a control-plane event (`Detach`, `Rejoin`) to the replica, in order with
    /// everything else it handles.
    pub async fn control(&self, event: Event) -> Result<(), BlockError> {
        self.inputs
            .send(Input::Peer(event))
            .await
            .map_err(|_| BlockError::Shutdown)
    }

    /// Sends a control-plane message to the peer over the replication link, without going
    /// through the replica. False if the link is down or its queue is full: the message is
    /// dropped, and the control plane's own timers resend.
    pub fn send_control(&self, body: &[u8]) -> bool {
        if !self.driver_stats().link_up || body.len() > CONTROL_BODY_BYTES_MAX as usize {
            return false;
        }
        let mut h = Header::new(Kind::Control);
        h.sender_site = self.site;
        h.cluster_id = self.cluster_id;
        self.outbound
            .try_push(Frame::new(h, body.to_vec()).encode())
    }

    /// Installs the control plane's gate; until then every request is served. Set it before
    /// any client connects. A second call is ignored (false).
    pub fn set_gate(&self, gate: Arc<dyn ServeGate>) -> bool {
        self.gate.set(gate).is_ok()
    }

    /// Waits until the gate lets requests through, up to the request timeout.
    async fn admit(&self, what: GateFor) -> Result<(), BlockError> {
        let Some(gate) = self.gate.get() else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        // Bounded by the request timeout.
        loop {
            match ask(gate.as_ref(), what) {
                GateAnswer::Serve => return Ok(()),
                GateAnswer::Fail => return Err(not_serving()),
                GateAnswer::Hold if tokio::time::Instant::now() >= deadline => {
                    return Err(not_serving())
                }
                GateAnswer::Hold => tokio::time::sleep(GATE_POLL).await,
            }
        }
    }

    /// Re-checked before a read's data goes out: a lease may have lapsed while it waited.
    /// "Hold" waits (a short while, bounded by the request timeout) rather than failing:
    /// a read admitted at a catching-up site may complete just as the rejoin moves the
    /// epoch, whose first lease is a heartbeat away.
    async fn may_reply(&self) -> Result<(), BlockError> {
        let Some(gate) = self.gate.get() else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        // Bounded by the request timeout.
        loop {
            match gate.check_read() {
                GateAnswer::Serve => return Ok(()),
                GateAnswer::Fail => return Err(not_serving()),
                GateAnswer::Hold if tokio::time::Instant::now() >= deadline => {
                    return Err(not_serving())
                }
                GateAnswer::Hold => tokio::time::sleep(GATE_POLL).await,
            }
        }
    }

    /// Hands one request to the replica thread and waits for its answer. The caller has
    /// passed the gate ([`Self::admit`]).
    async fn call(
        &self,
        permits: &Semaphore,
        make: impl FnOnce(ClientOpId) -> Event,
    ) -> Result<Reply, BlockError> {
        let _permit = permits.acquire().await.map_err(|_| BlockError::Shutdown)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inputs
            .send(Input::Client {
                event: make(id),
                reply: tx,
            })
            .await
            .map_err(|_| BlockError::Shutdown)?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Err(_) => Err(BlockError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "replication did not answer in time; outcome unknown",
            ))),
            Ok(Err(_)) => Err(BlockError::Shutdown),
            Ok(Ok(reply)) => Ok(reply),
        }
    }

    async fn mutation(&self, make: impl FnOnce(ClientOpId) -> Event) -> Result<(), BlockError> {
        self.admit(GateFor::Mutation).await?;
        match self.call(&self.mutation_permits, make).await? {
            Reply::Done => Ok(()),
            Reply::Data(_) => Err(BlockError::Io(std::io::Error::other(
                "replica answered a mutation with data",
            ))),
            Reply::Failed(error) => Err(client_error(error)),
        }
    }

    fn check_mutation(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        stretch_engine::check_aligned(offset, len)?;
        self.check_range(offset, len)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        stretch_engine::check_range(offset, len, self.volume.size_bytes())
    }

    /// TRIM and WRITE_ZEROES in pieces the core accepts.
    async fn zero_range(&self, offset: u64, len: u64, trim: bool) -> Result<(), BlockError> {
        self.check_mutation(offset, len)?;
        if len > stretch_engine::ZERO_BYTES_MAX {
            return Err(BlockError::TooLarge {
                len,
                max: stretch_engine::ZERO_BYTES_MAX,
            });
        }
        let mut done = 0;
        // Bounded: at most ZERO_BYTES_MAX / PIECE_BYTES_MAX = 128 pieces.
        while done < len {
            let piece = (len - done).min(PIECE_BYTES_MAX);
            let lba = (offset + done) / BLOCK_BYTES;
            let blocks = (piece / BLOCK_BYTES) as u32;
            self.mutation(|id| {
                if trim {
                    Event::ClientTrim { id, lba, blocks }
                } else {
                    Event::ClientWriteZeroes { id, lba, blocks }
                }
            })
            .await?;
            done += piece;
        }
        Ok(())
    }
}

impl Drop for ReplicatedVolume {
    fn drop(&mut self) {
        // The replica thread ends once every input sender is gone: ours goes with self, and
        // the link and ticker hold the others.
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn not_serving() -> BlockError {
    BlockError::Io(std::io::Error::other(
        "this site may not serve the volume now (lease lapsed, detached, or not yet arbitrated)",
    ))
}

fn client_error(error: ClientError) -> BlockError {
    match error {
        ClientError::Io => BlockError::Io(std::io::Error::other(
            "replication failed; this site may not serve (outcome unknown)",
        )),
        ClientError::Invalid => BlockError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "replica refused the request as invalid",
        )),
        ClientError::Busy => BlockError::Io(std::io::Error::other("replica queues are full")),
    }
}

impl BlockDevice for ReplicatedVolume {
    fn size_bytes(&self) -> u64 {
        self.volume.size_bytes()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, BlockError> {
        stretch_engine::check_read_len(len)?;
        let len64 = u64::from(len);
        self.check_range(offset, len64)?;
        if len == 0 {
            return Ok(AlignedBuf::zeroed(0));
        }
        self.admit(GateFor::Read).await?;
        if let Some(data) = self.read_fast(offset, len).await {
            self.may_reply().await?;
            self.fast_reads.fetch_add(1, Ordering::Relaxed);
            return Ok(data);
        }
        self.slow_reads.fetch_add(1, Ordering::Relaxed);
        let first = offset / BLOCK_BYTES;
        let end = (offset + len64).div_ceil(BLOCK_BYTES);
        let mut data = Vec::with_capacity(((end - first) * BLOCK_BYTES) as usize);
        let mut lba = first;
        // Bounded: an unaligned read of 32 MiB spans at most two pieces.
        while lba < end {
            let blocks = (end - lba).min(PIECE_BYTES_MAX / BLOCK_BYTES);
            let blocks32 = blocks as u32;
            match self
                .call(&self.read_permits, |id| Event::ClientRead {
                    id,
                    lba,
                    blocks: blocks32,
                })
                .await?
            {
                Reply::Data(piece) if piece.len() as u64 == blocks * BLOCK_BYTES => {
                    data.extend_from_slice(&piece)
                }
                Reply::Data(_) | Reply::Done => {
                    return Err(BlockError::Io(std::io::Error::other(
                        "replica answered a read with the wrong length",
                    )))
                }
                Reply::Failed(error) => return Err(client_error(error)),
            }
            lba += blocks;
        }
        self.may_reply().await?;
        let skip = (offset - first * BLOCK_BYTES) as usize;
        Ok(AlignedBuf::from_slice(&data[skip..skip + len as usize]))
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), BlockError> {
        let len = data.len() as u64;
        self.check_mutation(offset, len)?;
        if len > u64::from(REQUEST_BYTES_MAX) {
            return Err(BlockError::TooLarge {
                len,
                max: u64::from(REQUEST_BYTES_MAX),
            });
        }
        if len == 0 {
            return Ok(());
        }
        let lba = offset / BLOCK_BYTES;
        let bytes = data.to_vec();
        self.mutation(|id| Event::ClientWrite {
            id,
            lba,
            data: bytes,
            fua,
        })
        .await?;
        self.written_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    // NBD proto.md: FLUSH covers "all write requests that the server has completed".
    async fn flush(&self) -> Result<(), BlockError> {
        self.mutation(|id| Event::ClientFlush { id }).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.zero_range(offset, len, true).await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        self.zero_range(offset, len, false).await?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        self.volume.block_status(offset, len).await
    }
}

#[cfg(test)]
#[path = "device_test.rs"]
mod tests;
