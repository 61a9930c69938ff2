//! Serves one in-memory export over NBD, for trying clients by hand:
//! `cargo run --release -p stretch-nbd --example mem_server -- 127.0.0.1:10809 vol 1073741824`
//! then e.g. `nbdinfo nbd://127.0.0.1:10809/vol`. Ctrl-C stops it gracefully.

use std::sync::Arc;

use stretch_nbd::{Export, MemDevice, Server, ServerConfig};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let name = args.next().unwrap_or_else(|| "vol".into());
    let size_bytes: u64 = match args.next().map(|s| s.parse()) {
        None => 1 << 30,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("size must be a number of bytes: {e}");
            std::process::exit(2);
        }
    };
    let server = Server::new(
        ServerConfig::default(),
        vec![Export {
            name,
            description: "in-memory test export".into(),
            device: Arc::new(MemDevice::new(size_bytes)),
            read_only: false,
        }],
    );
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("serving on nbd://{addr}/");
    let serving = tokio::spawn(server.clone().serve_tcp(listener));
    tokio::signal::ctrl_c().await?;
    server.shutdown();
    serving.await.map_err(std::io::Error::other)?
}
