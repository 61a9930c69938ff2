//! The link emulator's admin server: Toxiproxy's API (`api.rs`) carried by the shared
//! minimal HTTP server ([`crate::http`]).

use std::net::SocketAddr;
use std::sync::Arc;

use super::api::{route, Registry};
use crate::http::{handler, HttpServer, Request, Response};

pub use crate::http::call;

/// The Toxiproxy admin API server; it stops when dropped.
pub struct AdminServer {
    server: HttpServer,
}

impl AdminServer {
    pub async fn start(registry: Arc<Registry>, addr: &str) -> std::io::Result<AdminServer> {
        let serve = handler(move |req: Request| {
            let registry = registry.clone();
            async move {
                // Proxy changes bind or shut sockets; brief, but blocking, so keep them off
                // the reactor threads.
                let answer = tokio::task::spawn_blocking(move || {
                    route(&registry, &req.method, &req.target, &req.body)
                })
                .await;
                match answer {
                    Ok((status, body)) => Response { status, body },
                    Err(e) => Response::error(500, e.to_string()),
                }
            }
        });
        let server = HttpServer::start(addr, serve).await?;
        Ok(AdminServer { server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
}
