//! Seeded random input, bounded in count and time: whatever the peer sends, the server never
//! panics (a panicking request task would leave its reply missing and this test would time out),
//! answers every well-framed request with a code from NBD.md §1.6, and keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::TestServer;
use stretch_nbd::proto::*;
use stretch_nbd::{MemDevice, ServerConfig};

const SIZE: u64 = 8 << 20;
const SEED: u64 = 0x5eed_0003;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).expect("server stopped answering");
    b
}

fn option(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).expect("send option");
}

/// Skips option replies until (and including) the one of type `until`.
fn skip_replies_until(s: &mut TcpStream, until: u32) {
    loop {
        let h = read_n(s, OPTION_REPLY_HEADER_BYTES);
        let data_len = be_u32(&h, 16) as usize;
        read_n(s, data_len);
        if be_u32(&h, 12) == until {
            return;
        }
    }
}

fn open(t: &TestServer<MemDevice>, structured: bool) -> TcpStream {
    let mut s = TcpStream::connect(t.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    read_n(&mut s, GREETING_BYTES);
    s.write_all(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes())
        .expect("flags");
    if structured {
        option(&mut s, OPT_STRUCTURED_REPLY, &[]);
        skip_replies_until(&mut s, REP_ACK);
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        option(&mut s, OPT_SET_META_CONTEXT, &d);
        skip_replies_until(&mut s, REP_ACK);
    }
    let mut d = 3u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"vol");
    d.extend_from_slice(&0u16.to_be_bytes());
    option(&mut s, OPT_GO, &d);
    skip_replies_until(&mut s, REP_ACK);
    s
}

/// Reads one reply to `cookie` and returns its errno.
fn reply_errno(s: &mut TcpStream, cookie: u64, read_len: usize) -> u32 {
    let magic = be_u32(&read_n(s, 4), 0);
    if magic == SIMPLE_REPLY_MAGIC {
        let h = read_n(s, 12);
        assert_eq!(be_u64(&h, 4), cookie);
        let e = be_u32(&h, 0);
        if e == 0 {
            read_n(s, read_len);
        }
        return e;
    }
    assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "bad reply magic");
    let mut errno = 0;
    let mut first = true;
    loop {
        if !first {
            assert_eq!(be_u32(&read_n(s, 4), 0), STRUCTURED_REPLY_MAGIC);
        }
        first = false;
        let h = read_n(s, CHUNK_HEADER_BYTES - 4);
        assert_eq!(be_u64(&h, 4), cookie);
        let payload = read_n(s, be_u32(&h, 12) as usize);
        let kind = be_u16(&h, 2);
        if kind == CHUNK_ERROR || kind == CHUNK_ERROR_OFFSET {
            errno = be_u32(&payload, 0);
            assert!(payload.len() <= 6 + 900, "error chunk too long");
        }
        if be_u16(&h, 0) & CHUNK_FLAG_DONE != 0 {
            return errno;
        }
    }
}

#[test]
fn random_requests_get_valid_errnos_and_never_break_the_connection() {
    let (t, _) = TestServer::mem(ServerConfig::default(), &[("vol", SIZE, false)]);
    let mut rng = Rng(SEED);
    for structured in [true, false] {
        let mut s = open(&t, structured);
        for cookie in 0..1500u64 {
            let kind = [0u16, 1, 3, 4, 5, 6, 7, 8, 9, 200][rng.below(10) as usize];
            let flags = match rng.below(4) {
                0 => 0,
                1 => 1 << rng.below(16),
                _ => rng.next() as u16 & 0x3f,
            };
            let offset = match rng.below(6) {
                0 => 0,
                1 => rng.below(SIZE / 4096) * 4096,
                2 => rng.below(SIZE),
                3 => SIZE - 4096 * rng.below(3),
                4 => u64::MAX - rng.below(1 << 20),
                _ => rng.next(),
            };
            let len = match rng.below(6) {
                0 => 0,
                1 => 4096 * (1 + rng.below(64)) as u32,
                2 => rng.below(1 << 20) as u32,
                3 => 1,
                4 if kind != 1 => rng.next() as u32,
                _ => 4096,
            };
            let req = Request {
                flags,
                kind,
                cookie,
                offset,
                len,
            };
            s.write_all(&req.encode()).expect("send");
            if kind == CMD_WRITE {
                s.write_all(&vec![cookie as u8; len as usize])
                    .expect("payload");
            }
            let read_len = if kind == CMD_READ { len as usize } else { 0 };
            let e = reply_errno(&mut s, cookie, read_len);
            assert!(
                [0, EINVAL, ENOSPC, EOVERFLOW, EPERM].contains(&e),
                "request {req:?} got errno {e} (seed {SEED:#x})"
            );
        }
    }
}

#[test]
fn random_handshake_garbage_never_stops_the_server() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let (t, _) = TestServer::mem(config, &[("vol", SIZE, false)]);
    // Four threads of 50 connections each; a connection that waits for more bytes is closed
    // by the handshake timeout, so this is bounded by 50 × 100 ms per thread.
    std::thread::scope(|scope| {
        for thread in 0..4u64 {
            let addr = t.addr;
            scope.spawn(move || {
                let mut rng = Rng(SEED ^ (0xabc + thread));
                for _ in 0..50 {
                    send_garbage(addr, &mut rng);
                }
            });
        }
    });
    let mut s = open(&t, true);
    let req = Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 1,
        offset: 0,
        len: 4096,
    };
    s.write_all(&req.encode()).expect("send");
    assert_eq!(reply_errno(&mut s, 1, 4096), 0);
}

fn send_garbage(addr: std::net::SocketAddr, rng: &mut Rng) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut junk = Vec::new();
    if rng.below(2) == 0 {
        // Mostly well-framed: valid flags and option magic, random option and length.
        junk.extend_from_slice(&(rng.below(4) as u32).to_be_bytes());
        junk.extend_from_slice(&IHAVEOPT.to_be_bytes());
        junk.extend_from_slice(&(rng.below(16) as u32).to_be_bytes());
        junk.extend_from_slice(&(rng.below(8192) as u32).to_be_bytes());
    }
    for _ in 0..rng.below(512) {
        junk.push(rng.next() as u8);
    }
    // The server may close before reading everything; a failed write is fine.
    let _ = s.write_all(&junk);
    let mut sink = [0u8; 4096];
    // Read until the server closes (error, bad framing or the handshake timeout).
    while let Ok(n) = s.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}
