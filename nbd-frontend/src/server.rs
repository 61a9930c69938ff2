//! The NBD server: listeners, connection admission, and graceful shutdown.
//!
//! One task per connection runs the handshake (bounded by `handshake_timeout`) and then the
//! transmission phase. Connections are admitted through a semaphore of `connections_max`
//! permits shared by every listener; a permit is an owned guard dropped when the connection
//! task ends, however it ends, so slots cannot leak (NBD.md §5, nbd #126).

use std::sync::Arc;
use std::time::Duration;

use stretch_engine::BlockDevice;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::handshake::{self, Outcome};
use crate::transmission;

/// Tunables of a server. Every bound is explicit.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// A client that has not finished negotiating by then is disconnected (QEMU's
    /// `handshake-max-seconds` defaults to 10 s too; CVE-2024-7409).
    pub handshake_timeout: Duration,
    /// Connections open at once (handshaking or transmitting); more are closed at accept.
    pub connections_max: usize,
    /// Payload bytes in flight per connection (write payloads read but not yet answered, plus
    /// read data not yet sent). Reading from the socket pauses while this is exhausted.
    pub inflight_bytes_max: usize,
    /// Requests in flight per connection (at least 128: the kernel client uses 128 tags).
    pub requests_inflight_max: usize,
    /// A WRITE too large to accept has its payload read and discarded up to this many bytes,
    /// so the connection survives; beyond it the connection is closed after the error reply.
    pub oversized_drain_bytes_max: u32,
    /// After `shutdown()`, how long a connection keeps answering new requests with ESHUTDOWN
    /// (so the client can disconnect softly) before it is closed.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            connections_max: 256,
            inflight_bytes_max: 64 * 1024 * 1024,
            requests_inflight_max: 256,
            oversized_drain_bytes_max: 64 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// One named volume the server offers.
pub struct Export<D> {
    pub name: String,
    pub description: String,
    pub device: Arc<D>,
    /// Refuse every mutation with EPERM (also advertised as READ_ONLY).
    pub read_only: bool,
}

/// An NBD server over a set of exports of one device type.
pub struct Server<D: BlockDevice> {
    pub(crate) config: ServerConfig,
    pub(crate) exports: Vec<Export<D>>,
    connection_slots: Arc<Semaphore>,
    shutdown_tx: watch::Sender<bool>,
    /// Bumped by [`Server::close_connections`]: every connection open at that moment ends.
    close_tx: watch::Sender<u64>,
}

impl<D: BlockDevice> Server<D> {
    /// A server offering `exports`; the empty export name selects the first one.
    pub fn new(config: ServerConfig, exports: Vec<Export<D>>) -> Arc<Self> {
        let (shutdown_tx, _) = watch::channel(false);
        let (close_tx, _) = watch::channel(0);
        Arc::new(Server {
            close_tx,
            connection_slots: Arc::new(Semaphore::new(
                config.connections_max.min(Semaphore::MAX_PERMITS),
            )),
            config,
            exports,
            shutdown_tx,
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Finds an export by name; "" is the default (first) export.
    pub(crate) fn export(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports.iter().position(|e| e.name.as_bytes() == name)
    }

    /// Stops accepting, answers new requests with ESHUTDOWN, lets in-flight requests finish,
    /// then closes every connection. `serve_*` return once their connections are closed.
    pub fn shutdown(&self) {
        self.shutdown_tx.send_replace(true);
    }

    /// Closes every open connection (after the replies of requests already running) but keeps
    /// listening: a site that lost arbitration drops its clients so that none re-issues a
    /// request to it (DESIGN.md §6 "The loser"), while a later client gets whatever the
    /// device answers then (EIO until the site has rejoined).
    pub fn close_connections(&self) {
        self.close_tx.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub(crate) fn close_signal(&self) -> watch::Receiver<u64> {
        let mut rx = self.close_tx.subscribe();
        rx.mark_unchanged();
        rx
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown_tx.borrow()
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// Serves TCP connections (TCP_NODELAY) until [`Server::shutdown`]; then waits for this
    /// listener's connections to close.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut shutdown = self.shutdown_signal();
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Per-connection failures (ECONNABORTED, EMFILE) must not end the
                            // listener; a short pause avoids spinning on EMFILE.
                            tracing::warn!(error = %e, "NBD accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY failed");
                    }
                    let (r, w) = stream.into_split();
                    self.clone().admit(&mut conns, r, w, peer.to_string());
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = wait_shutdown(&mut shutdown) => break,
            }
        }
        drop(listener);
        while conns.join_next().await.is_some() {}
        Ok(())
    }

    /// Serves Unix-socket connections until [`Server::shutdown`]; then waits for them to close.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) -> std::io::Result<()> {
        let mut shutdown = self.shutdown_signal();
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "NBD accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let (r, w) = stream.into_split();
                    self.clone().admit(&mut conns, r, w, "unix".to_string());
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = wait_shutdown(&mut shutdown) => break,
            }
        }
        drop(listener);
        while conns.join_next().await.is_some() {}
        Ok(())
    }

    fn admit<R, W>(self: Arc<Self>, conns: &mut JoinSet<()>, r: R, w: W, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(slot) = self.connection_slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = self.config.connections_max, "NBD connection refused: at the connection cap");
            return; // Dropping the halves closes the socket.
        };
        conns.spawn(async move {
            self.serve_connection(r, w, &peer).await;
            drop(slot);
        });
    }

    /// Runs one connection to the end: handshake, then transmission. For custom transports;
    /// it does not count against `connections_max` (the `serve_*` listeners do that).
    pub async fn serve_connection<R, W>(self: Arc<Self>, r: R, w: W, peer: &str)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut r = tokio::io::BufReader::with_capacity(64 * 1024, r);
        let mut w = w;
        let mut shutdown = self.shutdown_signal();
        let negotiated = tokio::select! {
            n = tokio::time::timeout(
                self.config.handshake_timeout,
                handshake::negotiate(&self, &mut r, &mut w),
            ) => n,
            _ = wait_shutdown(&mut shutdown) => {
                tracing::debug!(%peer, "NBD handshake cut short by shutdown");
                return;
            }
        };
        let session = match negotiated {
            Err(_) => {
                tracing::info!(%peer, "NBD handshake timed out");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "NBD handshake ended");
                return;
            }
            Ok(Ok(Outcome::Aborted)) => return,
            Ok(Ok(Outcome::Transmission(s))) => s,
        };
        tracing::debug!(%peer, export = %self.exports[session.export].name, "NBD transmission");
        // Transmission ends by itself within the grace period after shutdown unless the client
        // stalls mid-payload or stops reading replies; the hard deadline (twice the grace)
        // covers those, so shutdown always completes.
        let grace = self.config.shutdown_grace;
        let hard_deadline = async {
            wait_shutdown(&mut shutdown).await;
            tokio::time::sleep(grace.saturating_mul(2)).await;
        };
        tokio::select! {
            result = transmission::run(self.clone(), session, r, w) => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "NBD connection ended");
                }
            }
            _ = hard_deadline => {
                tracing::info!(%peer, "NBD connection closed at the shutdown deadline");
            }
        }
    }
}

/// Resolves once shutdown is requested (immediately if it already was).
pub(crate) async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens when the server is dropped:
    // treat it as shutdown too.
    let _ = rx.wait_for(|&s| s).await;
}
