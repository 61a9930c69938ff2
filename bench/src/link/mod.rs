//! The link emulator: a TCP proxy that adds delay, jitter, bandwidth caps, loss-as-stall,
//! partitions and resets between a listen address and an upstream, changed live through a
//! Toxiproxy-compatible HTTP API (`api.rs`, served by [`crate::http`]) or from Rust
//! (`LinkEmulator`).
//!
//! Every fault is a toxic on a proxy (`toxic.rs`); `LinkEmulator` only names toxics the way
//! Toxiproxy's defaults would (`latency_upstream`, ...), so a Toxiproxy client sees and can
//! change what the Rust API set.

pub mod api;
pub mod http;
pub mod proxy;
pub mod toxic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

pub use api::Registry;
pub use http::AdminServer;
pub use proxy::{Proxy, ProxyConfig};
pub use toxic::Stream;

/// Default admin API address, Toxiproxy's.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:8474";

/// Which direction(s) of the link an operation applies to. `Up` is client -> upstream
/// (Toxiproxy's `upstream` stream), `Down` is upstream -> client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    Up,
    Down,
    Both,
}

impl Direction {
    pub fn streams(self) -> &'static [Stream] {
        match self {
            Direction::Up => &[Stream::Upstream],
            Direction::Down => &[Stream::Downstream],
            Direction::Both => &[Stream::Upstream, Stream::Downstream],
        }
    }
}

/// One emulated link (one proxy), optionally with the admin API in front of it.
pub struct LinkEmulator {
    registry: Arc<Registry>,
    proxy: Arc<Proxy>,
    name: String,
    admin: Option<AdminServer>,
}

impl LinkEmulator {
    /// Starts a proxy named "link" from `listen` (e.g. "127.0.0.1:0") to `upstream`, without
    /// admin API.
    pub fn start(listen: &str, upstream: &str) -> anyhow::Result<LinkEmulator> {
        LinkEmulator::start_named("link", listen, upstream)
    }

    /// Like `start`, with the proxy's name in the admin API chosen.
    pub fn start_named(name: &str, listen: &str, upstream: &str) -> anyhow::Result<LinkEmulator> {
        let registry = Registry::new();
        let proxy = registry
            .create(ProxyConfig {
                name: name.into(),
                listen: listen.into(),
                upstream: upstream.into(),
                enabled: true,
            })
            .map_err(|e| anyhow::anyhow!("start link {listen} -> {upstream}: {}", e.message))?;
        Ok(LinkEmulator {
            registry,
            proxy,
            name: name.into(),
            admin: None,
        })
    }

    /// Like `start`, and serves the Toxiproxy API on `admin` (e.g. "127.0.0.1:8474").
    pub async fn start_with_admin(
        listen: &str,
        upstream: &str,
        admin: &str,
    ) -> anyhow::Result<LinkEmulator> {
        let mut link = LinkEmulator::start(listen, upstream)?;
        link.serve_admin(admin).await?;
        Ok(link)
    }

    /// Serves the Toxiproxy API for this emulator on `admin`; returns the bound address.
    pub async fn serve_admin(&mut self, admin: &str) -> anyhow::Result<SocketAddr> {
        let server = AdminServer::start(self.registry.clone(), admin)
            .await
            .map_err(|e| anyhow::anyhow!("bind admin API on {admin}: {e}"))?;
        let addr = server.addr();
        self.admin = Some(server);
        Ok(addr)
    }

    /// The address clients connect to.
    pub fn listen_addr(&self) -> SocketAddr {
        // The proxy was started enabled and only the admin API can disable it.
        self.proxy
            .listen_addr()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::addr)
    }

    /// The proxy's name in the admin API.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Replaces (or removes, when `attributes` is None) the toxic `<type>_<stream>`.
    fn put_toxic(&self, type_name: &str, stream: Stream, attributes: Option<serde_json::Value>) {
        let name = format!("{type_name}_{}", stream.as_str());
        // Removing a toxic that is not there is not an error here: the goal is a state.
        let _ = self.registry.remove_toxic(&self.name, &name);
        if let Some(attributes) = attributes {
            let body = json!({"name": name, "type": type_name, "stream": stream.as_str(), "attributes": attributes});
            if let Err(e) = self.registry.add_toxic(&self.name, &body) {
                // Bodies built here are valid by construction; a failure is a bug.
                panic!("link emulator refused its own toxic {body}: {}", e.message);
            }
        }
    }

    /// Sets the one-way delay and jitter of `dir`; zero removes the latency toxic.
    pub fn set_delay(&self, dir: Direction, delay: Duration, jitter: Duration) {
        for &s in dir.streams() {
            let attrs = (!delay.is_zero() || !jitter.is_zero()).then(|| {
                json!({"latency": delay.as_secs_f64() * 1e3, "jitter": jitter.as_secs_f64() * 1e3})
            });
            self.put_toxic("latency", s, attrs);
        }
    }

    /// Sets a round-trip time, half in each direction.
    pub fn set_rtt(&self, rtt: Duration) {
        self.set_delay(Direction::Both, rtt / 2, Duration::ZERO);
    }

    /// Caps `dir` at `rate_bytes_per_s` (KB/s granularity, as Toxiproxy); None uncaps.
    pub fn set_rate(&self, dir: Direction, rate_bytes_per_s: Option<u64>) {
        for &s in dir.streams() {
            let attrs = rate_bytes_per_s.map(|r| json!({"rate": r.div_ceil(1000)}));
            self.put_toxic("bandwidth", s, attrs);
        }
    }

    /// Loses each 1448-byte segment with `probability`, each loss stalling the stream by
    /// `stall` (a retransmission timeout); probability 0 removes it.
    pub fn set_loss(&self, dir: Direction, probability: f64, stall: Duration) {
        for &s in dir.streams() {
            let attrs = (probability > 0.0).then(
                || json!({"probability": probability.min(1.0), "stall": stall.as_secs_f64() * 1e3}),
            );
            self.put_toxic("loss", s, attrs);
        }
    }

    /// Holds every byte in `dir`: nothing passes until `heal`, nothing is lost.
    pub fn partition(&self, dir: Direction) {
        for &s in dir.streams() {
            self.put_toxic("partition", s, Some(json!({})));
        }
    }

    /// Removes every partition and timeout toxic, in both directions.
    pub fn heal(&self) {
        let names: Vec<String> = self.proxy.toxics.with(|all| {
            all.iter()
                .filter(|t| {
                    matches!(
                        t.kind,
                        toxic::ToxicKind::Partition | toxic::ToxicKind::Timeout { .. }
                    )
                })
                .map(|t| t.name.clone())
                .collect()
        });
        for n in names {
            let _ = self.registry.remove_toxic(&self.name, &n);
        }
    }

    /// Removes every toxic: the link passes bytes as fast as it can.
    pub fn clear(&self) {
        self.proxy.toxics.with_mut(Vec::clear);
        self.proxy.toxics_changed();
    }

    /// Resets every live connection with a TCP RST; new connections are accepted.
    pub fn reset_connections(&self) {
        self.proxy.reset_connections(true);
    }

    pub fn connection_count(&self) -> usize {
        self.proxy.connection_count()
    }
}
