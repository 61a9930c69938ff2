//! stretch-bench: the link emulator (a Toxiproxy-compatible TCP fault proxy) and the NBD
//! latency benchmark behind `stretch link` and `stretch bench`, and the minimal HTTP server
//! ([`http`]) that carries both the emulator's admin API and the site admin API.

pub mod bench;
pub mod cli;
pub mod failover;
pub mod http;
pub mod link;
pub mod plot;
pub mod report;
pub mod units;
pub mod workload;

pub use bench::{run_bench, BenchArgs};
pub use cli::{run_link, LinkArgs, LinkCommand};
