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
//! wait in the bounded queue of [`crate::driver::outbound_queue`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::core::Event;
use crate::driver::{Input, OutboundRx};
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
    /// Frames refused by `Header::decode` or `check_body`, by reason.
    pub rejects: RejectCounters,
    pub dial_failures: u64,
    /// Control frames dropped: no control plane attached, or its queue was full.
    pub control_dropped: u64,
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
    tokio::select! {
        end = read_loop(r, cfg, inputs, stats, budget) => end,
        end = write_loop(w, outbound, stats) => end,
        s = accept_replacement => End::Replaced(s),
    }
}

async fn read_loop(
    mut r: OwnedReadHalf,
    cfg: &LinkConfig,
    inputs: &mpsc::Sender<Input>,
    stats: &Mutex<LinkStats>,
    budget: &Arc<Semaphore>,
) -> End {
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
        if let Ok(mut s) = stats.lock() {
            s.frames_in += 1;
            s.bytes_in += (HEADER_BYTES + body_len) as u64;
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

async fn write_loop(
    mut w: OwnedWriteHalf,
    outbound: &mut OutboundRx,
    stats: &Mutex<LinkStats>,
) -> End {
    loop {
        let Some(bytes) = outbound.rx.recv().await else {
            return End::Shutdown;
        };
        outbound
            .queued_bytes
            .fetch_sub(bytes.len(), Ordering::SeqCst);
        // If the session ends mid-write the frame is lost with it; the core resends.
        if let Err(err) = w.write_all(&bytes).await {
            return End::Closed(format!("write: {err}"));
        }
        if let Ok(mut s) = stats.lock() {
            s.frames_out += 1;
            s.bytes_out += bytes.len() as u64;
        }
    }
}
