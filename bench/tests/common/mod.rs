//! Helpers shared by the link emulator tests: loopback servers and a tool gate.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// An echo server on 127.0.0.1; each connection echoes until EOF. Threads end with the
/// test process.
pub fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let addr = l.local_addr().expect("local addr");
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 65536];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A server that sends `total_bytes` to every connection, then closes it.
pub fn source_server(total_bytes: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind source server");
    let addr = l.local_addr().expect("local addr");
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let buf = vec![0x5au8; 64 * 1024];
                let mut left = total_bytes;
                while left > 0 {
                    let n = left.min(buf.len());
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    addr
}

/// Median round trip of `samples` 64-byte ping-pongs over `s`.
pub fn median_rtt(s: &mut TcpStream, samples: usize) -> Duration {
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut rtts = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = Instant::now();
        s.write_all(&msg).expect("write ping");
        s.read_exact(&mut back).expect("read pong");
        rtts.push(t0.elapsed());
        assert_eq!(back, msg, "echo returned other bytes");
    }
    rtts.sort();
    rtts[samples / 2]
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect through proxy");
    s.set_nodelay(true).expect("nodelay");
    // Every read in these tests is bounded in time: a stuck proxy fails the test.
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s
}

/// True when `tool` can run here. Otherwise prints a loud SKIPPED line and returns false,
/// or panics when STRETCH_REQUIRE_TOOLS=1 (CI, where the tool must be installed).
pub fn tool_available(tool: &str, probe: &mut std::process::Command) -> bool {
    let ok = probe
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("STRETCH_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{tool} is required (STRETCH_REQUIRE_TOOLS=1) but not installed");
        }
        eprintln!("SKIPPED: {tool} not installed");
    }
    ok
}
