//! The replication link: one TCP connection to the peer site, kept up by a tokio task.
//!
//! Who connects is fixed by configuration, so there is never a race of two connections: one
//! site listens ([`LinkMode::Listen`]), the other dials ([`LinkMode::Dial`]) and redials with
//! bounded exponential backoff. A listening site that accepts a new connection while one is
//! open replaces the old one: the peer restarted, and the old socket may be half dead.
//!
//! Each connection is a session: `LinkUp` when it starts, `LinkDown` when it ends, both as
//! events for the replica (the core resends what a lost session may have carried). A session
//! ends on a socket error, on silence longer than [`LinkConfig::idle_timeout_ms`] (the core
//! heartbeats every 10 ms, so silence means the peer or the path is gone), or on a header
//! that fails [`Header::decode`]: after a bad header the byte stream has no trustworthy frame
//! boundary left. A body that fails [`Header::check_body`] is dropped and counted, and the
//! session continues — its header, already checked, says where the next frame starts.
//!
//! Bounds: frame bodies are at most 32 MiB (`Header::decode` refuses more); a received frame
//! holds a share of an inbound byte budget until the replica thread has handled it, so a peer
//! cannot make this site buffer more than [`LinkConfig::inbound_bytes_max`]; outbound frames
//! go straight to the socket or wait in the bounded queue of [`outbound_queue`].

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::core::Event;
use crate::driver::Input;
use crate::frame::{Frame, Header, Kind, RejectCounters, BODY_BYTES_MAX, HEADER_BYTES};

/// Which end of the link this site is.
pub enum LinkMode {
    /// Accept the peer's connections on this listener.
    Listen(TcpListener),
    /// Connect to the peer (or to a link emulator in front of it) at this address.
    Dial(SocketAddr),
}

/// Limits and timers of the link.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub cluster_id: u64,
    /// A connection silent this long is closed.
    pub idle_timeout_ms: u64,
    /// First and largest wait between dial attempts.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    pub connect_timeout_ms: u64,
    /// Bytes of received frames not yet handled by the replica thread; at least one largest
    /// frame.
    pub inbound_bytes_max: usize,
    /// Where bodies of [`Kind::Control`] frames go (the control plane's lease heartbeats).
    /// Without it, control frames are counted and dropped. The queue is bounded by its
    /// sender; a full queue drops the frame (a heartbeat is resent on its own timer, and a
    /// lost one only lets a lease run out sooner, which is the safe direction).
    pub control_in: Option<mpsc::Sender<Vec<u8>>>,
}

impl LinkConfig {
    pub fn new(cluster_id: u64) -> LinkConfig {
        LinkConfig {
            cluster_id,
            idle_timeout_ms: 3_000,
            backoff_min_ms: 20,
            backoff_max_ms: 1_000,
            connect_timeout_ms: 2_000,
            inbound_bytes_max: 2 * (BODY_BYTES_MAX as usize + HEADER_BYTES),
            control_in: None,
        }
    }
}

/// Counters of the link, for metrics, logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub sessions: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// `writev` calls that carried `frames_out` (frames per call = batching).
    pub write_calls: u64,
    /// Frames refused by `Header::decode` or `check_body`, by reason.
    pub rejects: RejectCounters,
    pub dial_failures: u64,
    /// Control frames dropped: no control plane attached, or its queue was full.
    pub control_dropped: u64,
    /// Heartbeat round trips timed at the socket (from just before the write that carried the
    /// heartbeat to the reader taking its echo off the socket): the path's RTT without this
    /// site's replica-thread queueing, which the core's own sample includes. It still includes
    /// the peer's (its reader, replica thread and writer echo the heartbeat).
    pub rtt_samples: u64,
    pub rtt_us_last: u64,
    pub rtt_us_min: u64,
    pub rtt_us_smoothed: u64,
}

impl LinkStats {
    fn record_rtt(&mut self, rtt_us: u64) {
        self.rtt_samples += 1;
        self.rtt_us_last = rtt_us;
        self.rtt_us_min = if self.rtt_us_min == 0 {
            rtt_us
        } else {
            self.rtt_us_min.min(rtt_us)
        };
        // TCP's srtt smoothing (RFC 6298, alpha = 1/8), as the core's.
        self.rtt_us_smoothed = if self.rtt_samples == 1 {
            rtt_us
        } else {
            self.rtt_us_smoothed - self.rtt_us_smoothed / 8 + rtt_us / 8
        };
    }
}

/// Heartbeats on the wire, by seq, for the link's own RTT samples.
#[derive(Default)]
struct Probes {
    sent_at: VecDeque<(u64, Instant)>,
}

/// Heartbeats remembered at most; older ones (their echo lost) are forgotten.
const PROBES_MAX: usize = 64;

impl Probes {
    fn sent(&mut self, seq: u64, at: Instant) {
        if self.sent_at.len() >= PROBES_MAX {
            self.sent_at.pop_front();
        }
        self.sent_at.push_back((seq, at));
    }

    /// The round trip of the heartbeat `seq`, in microseconds, if this session sent it.
    fn echoed(&mut self, seq: u64) -> Option<u64> {
        let i = self.sent_at.iter().position(|&(s, _)| s == seq)?;
        let (_, at) = self.sent_at.remove(i)?;
        u64::try_from(at.elapsed().as_micros()).ok()
    }
}

/// Frames gathered into one `writev` at most.
const WRITE_BATCH_FRAMES_MAX: usize = 64;

/// The outbound side of the link, shared by the replica thread (and the control plane's
/// sender) and the link's writer task.
///
/// A frame leaves by the shortest way that keeps frames whole and in order: when the socket
/// is up and nothing is queued, the caller writes it at once with a non-blocking `writev`
/// (no hand-off to the writer task: that wake-up sat on every write's critical path, twice
/// per round trip). Whatever the socket does not take at once (a full send buffer, a partial
/// write) is queued, and the writer task sends the queue when the socket is writable again;
/// while anything is queued, new frames queue behind it. The caller therefore never blocks
/// on the link (driver.rs, "never block on the link"). All writes happen under the state's
/// lock, so two writers never interleave bytes of different frames.
#[derive(Clone)]
pub struct Outbound {
    shared: Arc<OutShared>,
}

/// The link's handle on the outbound side.
pub struct OutboundRx {
    shared: Arc<OutShared>,
}

struct OutShared {
    state: Mutex<OutState>,
    /// Wakes the writer task when frames are queued.
    queued: tokio::sync::Notify,
    bytes_max: usize,
    frames_max: usize,
    cluster_id: u64,
    stats: Arc<Mutex<LinkStats>>,
}

#[derive(Default)]
struct OutState {
    /// The current session's socket; `None` while the link is down (frames then queue).
    socket: Option<Arc<OwnedWriteHalf>>,
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    /// Bytes of `queue[0]` already on the socket.
    head_sent: usize,
    probes: Probes,
}

/// The outbound side of a link: at most `frames_max` frames and `bytes_max` bytes queued.
pub fn outbound_queue(
    frames_max: usize,
    bytes_max: usize,
    cluster_id: u64,
    stats: Arc<Mutex<LinkStats>>,
) -> (Outbound, OutboundRx) {
    let shared = Arc::new(OutShared {
        state: Mutex::new(OutState::default()),
        queued: tokio::sync::Notify::new(),
        bytes_max,
        frames_max: frames_max.max(1),
        cluster_id,
        stats,
    });
    (
        Outbound {
            shared: shared.clone(),
        },
        OutboundRx { shared },
    )
}

impl Outbound {
    /// Sends or queues one frame without waiting; false if it was dropped (queue full).
    pub(crate) fn try_push(&self, frame: Vec<u8>) -> bool {
        let mut frames = vec![frame];
        self.push_all(&mut frames) == 1
    }

    /// Sends or queues every frame of `frames` (drained), in order, without waiting. Returns
    /// how many were accepted; the rest did not fit the queue and were dropped.
    pub(crate) fn push_all(&self, frames: &mut Vec<Vec<u8>>) -> usize {
        if frames.is_empty() {
            return 0;
        }
        let sh = &*self.shared;
        let Ok(mut st) = sh.state.lock() else {
            frames.clear();
            return 0;
        };
        let total = frames.len();
        let mut pending = frames.drain(..);
        let mut accepted = 0;
        if st.queue.is_empty() {
            if let Some(socket) = st.socket.clone() {
                // Write straight away, up to a batch per call, while the socket takes
                // everything; the first frame it does not take whole is queued with its
                // written part remembered.
                let mut batch: Vec<Vec<u8>> = Vec::with_capacity(WRITE_BATCH_FRAMES_MAX);
                loop {
                    batch.extend(pending.by_ref().take(WRITE_BATCH_FRAMES_MAX));
                    if batch.is_empty() {
                        break;
                    }
                    // An error leaves the rest queued: the reader ends the session, and the
                    // frames go on the next one or are resent by the core.
                    let at = Instant::now();
                    let w = try_write_frames(&socket, &batch, 0);
                    let written = w.bytes;
                    let sent = note_sent(sh, &mut st, &batch, written, w.calls, at);
                    accepted += sent;
                    if sent < batch.len() {
                        st.head_sent = written - batch[..sent].iter().map(Vec::len).sum::<usize>();
                        for frame in batch.drain(sent..) {
                            st.queued_bytes += frame.len();
                            st.queue.push_back(frame);
                            accepted += 1;
                        }
                        break;
                    }
                    batch.clear();
                }
            }
        }
        for frame in pending {
            if st.queue.len() >= sh.frames_max || st.queued_bytes + frame.len() > sh.bytes_max {
                continue;
            }
            st.queued_bytes += frame.len();
            st.queue.push_back(frame);
            accepted += 1;
        }
        let queued = !st.queue.is_empty();
        drop(st);
        if queued {
            sh.queued.notify_one();
        }
        debug_assert!(accepted <= total);
        accepted
    }
}

/// What non-blocking writes of a batch achieved.
struct Written {
    bytes: usize,
    calls: u64,
    /// The socket failed (not "would block").
    error: Option<std::io::Error>,
}

/// Writes `frames` (the first from byte `skip`) with non-blocking `writev`s until all is
/// written, the socket would block, or it fails.
fn try_write_frames(socket: &OwnedWriteHalf, frames: &[Vec<u8>], skip: usize) -> Written {
    let mut written = 0;
    let mut calls = 0;
    let mut error = None;
    let mut slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut left: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut left, skip);
    // Bounded: each round writes at least one byte or stops.
    while !left.is_empty() {
        calls += 1;
        match socket.try_write_vectored(left) {
            Ok(0) => {
                error = Some(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the replication socket accepted no bytes",
                ));
                break;
            }
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut left, n);
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(err) => {
                error = Some(err);
                break;
            }
        }
    }
    Written {
        bytes: written,
        calls,
        error,
    }
}

/// Counts the frames of `batch` that `written` bytes completed, notes heartbeats among them
/// for the link's RTT sample (as sent at `at`, just before the write: a thread preempted
/// right after it must not shorten the sample), and returns how many completed.
fn note_sent(
    sh: &OutShared,
    st: &mut OutState,
    batch: &[Vec<u8>],
    written: usize,
    calls: u64,
    at: Instant,
) -> usize {
    let mut done = 0;
    let mut bytes = 0;
    for frame in batch {
        if bytes + frame.len() > written {
            break;
        }
        bytes += frame.len();
        done += 1;
        // Timed from the write to the socket, so the sample leaves out this site's replica
        // thread and queue (it still includes the peer's).
        if let Some(seq) = heartbeat_seq(frame, sh.cluster_id) {
            st.probes.sent(seq, at);
        }
    }
    if let Ok(mut s) = sh.stats.lock() {
        s.frames_out += done as u64;
        s.bytes_out += bytes as u64;
        s.write_calls += calls;
    }
    done
}

impl OutboundRx {
    /// A new session's socket: frames queued while the link was down go out on it. A frame
    /// half written on the old socket is dropped (the new stream starts at a frame boundary;
    /// the core resends what a lost session carried).
    fn attach(&self, socket: Arc<OwnedWriteHalf>) {
        if let Ok(mut st) = self.shared.state.lock() {
            drop_partial_head(&mut st);
            st.socket = Some(socket);
            st.probes = Probes::default();
        }
        self.shared.queued.notify_one();
    }

    fn detach(&self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.socket = None;
            drop_partial_head(&mut st);
        }
    }

    fn echoed(&self, seq: u64) -> Option<u64> {
        self.shared.state.lock().ok()?.probes.echoed(seq)
    }
}

fn drop_partial_head(st: &mut OutState) {
    if st.head_sent > 0 {
        if let Some(frame) = st.queue.pop_front() {
            st.queued_bytes -= frame.len();
        }
        st.head_sent = 0;
    }
}

/// The seq of `frame` if it is a heartbeat (the replica's encoding, checked like any header).
fn heartbeat_seq(frame: &[u8], cluster_id: u64) -> Option<u64> {
    let head = frame.first_chunk::<HEADER_BYTES>()?;
    let header = Header::decode(head, cluster_id).ok()?;
    (header.kind == Kind::Heartbeat).then_some(header.seq)
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    Closed(String),
    Replaced(TcpStream),
    /// The replica thread is gone: stop the link.
    Shutdown,
}

/// Runs the link until the replica thread stops accepting inputs.
pub async fn run(
    mode: LinkMode,
    cfg: LinkConfig,
    inputs: mpsc::Sender<Input>,
    mut outbound: OutboundRx,
    stats: Arc<Mutex<LinkStats>>,
) {
    let budget = Arc::new(Semaphore::new(cfg.inbound_bytes_max));
    let mut backoff_ms = cfg.backoff_min_ms;
    let mut next: Option<TcpStream> = None;
    loop {
        let stream = match next.take() {
            Some(stream) => stream,
            None => match &mode {
                LinkMode::Listen(listener) => match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!("accept on the replication listener: {err}");
                        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                        backoff_ms = (backoff_ms * 2).min(cfg.backoff_max_ms);
                        continue;
                    }
                },
                LinkMode::Dial(addr) => {
                    let connect = TcpStream::connect(addr);
                    match tokio::time::timeout(
                        Duration::from_millis(cfg.connect_timeout_ms),
                        connect,
                    )
                    .await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(_)) | Err(_) => {
                            if let Ok(mut s) = stats.lock() {
                                s.dial_failures += 1;
                            }
                            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                            backoff_ms = (backoff_ms * 2).min(cfg.backoff_max_ms);
                            continue;
                        }
                    }
                }
            },
        };
        backoff_ms = cfg.backoff_min_ms;
        if let Err(err) = stream.set_nodelay(true) {
            tracing::warn!("set TCP_NODELAY on the replication link: {err}");
        }
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        if let Ok(mut s) = stats.lock() {
            s.sessions += 1;
        }
        if inputs.send(Input::Peer(Event::LinkUp)).await.is_err() {
            return;
        }
        tracing::info!(%peer, "replication link up");
        let listener = match &mode {
            LinkMode::Listen(l) => Some(l),
            LinkMode::Dial(_) => None,
        };
        let end = session(
            stream,
            listener,
            &cfg,
            &inputs,
            &mut outbound,
            &stats,
            &budget,
        )
        .await;
        if inputs.send(Input::Peer(Event::LinkDown)).await.is_err() {
            return;
        }
        match end {
            End::Closed(why) => tracing::warn!(%peer, "replication link down: {why}"),
            End::Replaced(stream) => {
                tracing::info!(%peer, "replication link replaced by a new connection");
                next = Some(stream);
            }
            End::Shutdown => return,
        }
        if matches!(mode, LinkMode::Dial(_)) && next.is_none() {
            // Do not redial in a tight loop against a peer that accepts and closes at once.
            tokio::time::sleep(Duration::from_millis(cfg.backoff_min_ms)).await;
        }
    }
}

async fn session(
    stream: TcpStream,
    listener: Option<&TcpListener>,
    cfg: &LinkConfig,
    inputs: &mpsc::Sender<Input>,
    outbound: &mut OutboundRx,
    stats: &Mutex<LinkStats>,
    budget: &Arc<Semaphore>,
) -> End {
    let (r, w) = stream.into_split();
    let w = Arc::new(w);
    outbound.attach(w.clone());
    let accept_replacement = async {
        match listener {
            Some(l) => loop {
                match l.accept().await {
                    Ok((s, _)) => return s,
                    Err(err) => {
                        tracing::warn!("accept on the replication listener: {err}");
                        tokio::time::sleep(Duration::from_millis(cfg.backoff_min_ms)).await;
                    }
                }
            },
            None => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        end = read_loop(r, cfg, inputs, stats, budget, outbound) => end,
        end = write_loop(&w, outbound) => end,
        s = accept_replacement => End::Replaced(s),
    };
    outbound.detach();
    end
}

/// Bytes the reader takes off the socket at once: a burst of frames (acks, 4 KiB writes at
/// queue depth 32) then costs one `read` rather than two per frame.
const READ_BUFFER_BYTES: usize = 256 * 1024;

async fn read_loop(
    r: OwnedReadHalf,
    cfg: &LinkConfig,
    inputs: &mpsc::Sender<Input>,
    stats: &Mutex<LinkStats>,
    budget: &Arc<Semaphore>,
    outbound: &OutboundRx,
) -> End {
    // A body larger than the buffer is read past it, straight into the frame's body.
    let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, r);
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    loop {
        let mut head = [0u8; HEADER_BYTES];
        match tokio::time::timeout(idle, r.read_exact(&mut head)).await {
            Err(_) => return End::Closed(format!("no frame for {} ms", cfg.idle_timeout_ms)),
            Ok(Err(err)) => return End::Closed(format!("read: {err}")),
            Ok(Ok(_)) => {}
        }
        let header = match Header::decode(&head, cfg.cluster_id) {
            Ok(h) => h,
            Err(err) => {
                if let Ok(mut s) = stats.lock() {
                    s.rejects.record(&err);
                }
                return End::Closed(format!("rejected frame header: {err}"));
            }
        };
        let body_len = header.body_len_bytes as usize;
        // decode() bounds body_len by BODY_BYTES_MAX, which fits the budget (see LinkConfig).
        let permit = if body_len == 0 {
            None
        } else {
            let Ok(n) = u32::try_from(body_len) else {
                return End::Closed("frame body length does not fit u32".into());
            };
            match budget.clone().acquire_many_owned(n).await {
                Ok(p) => Some(p),
                Err(_) => return End::Shutdown,
            }
        };
        let mut body = vec![0u8; body_len];
        match tokio::time::timeout(idle, r.read_exact(&mut body)).await {
            Err(_) => return End::Closed("frame body stalled".into()),
            Ok(Err(err)) => return End::Closed(format!("read: {err}")),
            Ok(Ok(_)) => {}
        }
        if let Err(err) = header.check_body(&body) {
            // The header was sound, so the stream is still in step: drop just this frame.
            tracing::warn!("rejected frame body: {err}");
            if let Ok(mut s) = stats.lock() {
                s.rejects.record(&err);
            }
            continue;
        }
        let rtt_us = if header.kind == Kind::HeartbeatEcho {
            outbound.echoed(header.seq)
        } else {
            None
        };
        if let Ok(mut s) = stats.lock() {
            s.frames_in += 1;
            s.bytes_in += (HEADER_BYTES + body_len) as u64;
            if let Some(rtt_us) = rtt_us {
                s.record_rtt(rtt_us);
            }
        }
        if header.kind == Kind::Control {
            // Never to the replica: control frames belong to the control plane.
            let delivered = cfg
                .control_in
                .as_ref()
                .is_some_and(|tx| tx.try_send(body).is_ok());
            if !delivered {
                if let Ok(mut s) = stats.lock() {
                    s.control_dropped += 1;
                }
            }
            continue;
        }
        let input = Input::Frame {
            event: Event::FrameReceived(Frame { header, body }),
            _budget: permit,
        };
        if inputs.send(input).await.is_err() {
            return End::Shutdown;
        }
    }
}

/// Sends what the callers of [`Outbound`] queued, whenever the socket is writable.
async fn write_loop(w: &OwnedWriteHalf, outbound: &OutboundRx) -> End {
    let sh = &*outbound.shared;
    loop {
        let waiting = sh
            .state
            .lock()
            .map(|st| st.queue.is_empty())
            .unwrap_or(true);
        if waiting {
            // notify_one keeps a permit when no one waits, so a frame queued between the
            // check and this wait is not missed.
            sh.queued.notified().await;
            continue;
        }
        if let Err(err) = w.writable().await {
            return End::Closed(format!("write: {err}"));
        }
        let Ok(mut st) = sh.state.lock() else {
            return End::Closed("outbound state poisoned".into());
        };
        let st = &mut *st;
        let n = st.queue.len().min(WRITE_BATCH_FRAMES_MAX);
        let batch: Vec<Vec<u8>> = st.queue.drain(..n).collect();
        let skip = st.head_sent;
        let at = Instant::now();
        let result = try_write_frames(w, &batch, skip);
        let written = result.bytes;
        let sent = note_sent(sh, st, &batch, skip + written, result.calls, at);
        let sent_bytes: usize = batch[..sent].iter().map(Vec::len).sum();
        st.queued_bytes -= sent_bytes;
        st.head_sent = skip + written - sent_bytes;
        // Put back what did not go, in order, in front of anything queued meanwhile.
        for frame in batch.into_iter().skip(sent).rev() {
            st.queue.push_front(frame);
        }
        if let Some(err) = result.error {
            return End::Closed(format!("write: {err}"));
        }
    }
}
