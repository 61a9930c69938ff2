//! Abuse from a raw-socket client: every malformed or hostile input gets the error code NBD.md
//! §1.6 names, and the connection (where the spec allows) and the server keep serving.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::TestServer;
use stretch_nbd::proto::*;
use stretch_nbd::ServerConfig;

const SIZE: u64 = 16 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A blocking raw NBD client that can send anything.
struct Raw {
    s: TcpStream,
}

#[derive(Debug, PartialEq)]
enum Reply {
    /// (errno, data) of a simple reply.
    Simple(u32, Vec<u8>),
    /// The chunks (type, payload) of a structured reply, ending with DONE.
    Chunks(Vec<(u16, Vec<u8>)>),
}

impl Reply {
    /// The errno the reply carries (0 for success).
    fn errno(&self) -> u32 {
        match self {
            Reply::Simple(e, _) => *e,
            Reply::Chunks(c) => c
                .iter()
                .find(|(k, _)| *k == CHUNK_ERROR || *k == CHUNK_ERROR_OFFSET)
                .map(|(_, p)| be_u32(p, 0))
                .unwrap_or(0),
        }
    }
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        Raw { s }
    }

    /// Greeting and client flags, then stays in option haggling.
    fn greet(addr: SocketAddr) -> Raw {
        let mut r = Raw::connect(addr);
        let g = r.read_n(GREETING_BYTES);
        assert_eq!(be_u64(&g, 0), NBDMAGIC);
        assert_eq!(be_u64(&g, 8), IHAVEOPT);
        assert_eq!(be_u16(&g, 16), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        r.send(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes());
        r
    }

    /// A full handshake: optional structured replies and base:allocation, then GO.
    fn open(addr: SocketAddr, export: &str, structured: bool) -> Raw {
        let mut r = Raw::greet(addr);
        if structured {
            r.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.option_reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
            r.option(
                OPT_SET_META_CONTEXT,
                &meta_request(export, &["base:allocation"]),
            );
            let (kind, data) = r.option_reply(OPT_SET_META_CONTEXT);
            assert_eq!(kind, REP_META_CONTEXT);
            assert_eq!(&data[4..], b"base:allocation");
            assert_eq!(r.option_reply(OPT_SET_META_CONTEXT).0, REP_ACK);
        }
        r.option(OPT_GO, &go_request(export.as_bytes()));
        let replies = r.go_replies();
        assert_eq!(
            replies.last().map(|x| x.0),
            Some(REP_ACK),
            "GO failed: {replies:?}"
        );
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read");
        b
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn option_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let h = self.read_n(OPTION_REPLY_HEADER_BYTES);
        assert_eq!(be_u64(&h, 0), OPTION_REPLY_MAGIC);
        assert_eq!(be_u32(&h, 8), opt);
        let len = be_u32(&h, 16) as usize;
        (be_u32(&h, 12), self.read_n(len))
    }

    /// Replies to INFO/GO up to and including the final ACK or error.
    fn go_replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let (k, d) = self.option_reply(OPT_GO);
            let end = k != REP_INFO;
            v.push((k, d));
            if end {
                return v;
            }
        }
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.send(&r.encode());
    }

    /// Reads one reply; `read_len` is how many data bytes a successful simple READ carries.
    fn reply(&mut self, cookie: u64, read_len: usize) -> Reply {
        let magic = be_u32(&self.read_n(4), 0);
        if magic == SIMPLE_REPLY_MAGIC {
            let h = self.read_n(12);
            assert_eq!(be_u64(&h, 4), cookie, "cookie");
            let err = be_u32(&h, 0);
            let data = if err == 0 {
                self.read_n(read_len)
            } else {
                Vec::new()
            };
            return Reply::Simple(err, data);
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
        let mut chunks = Vec::new();
        let mut first = true;
        loop {
            if !first {
                assert_eq!(be_u32(&self.read_n(4), 0), STRUCTURED_REPLY_MAGIC);
            }
            first = false;
            let h = self.read_n(CHUNK_HEADER_BYTES - 4);
            assert_eq!(be_u64(&h, 4), cookie, "cookie");
            let flags = be_u16(&h, 0);
            let payload = self.read_n(be_u32(&h, 12) as usize);
            chunks.push((be_u16(&h, 2), payload));
            if flags & CHUNK_FLAG_DONE != 0 {
                return Reply::Chunks(chunks);
            }
        }
    }

    /// True when the server closed the connection (EOF) within the read timeout.
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// A round trip proving the connection still works: write 4 KiB and read it back.
    fn assert_serving(&mut self, structured: bool) {
        let data = vec![0x5a; 4096];
        self.request(0, CMD_WRITE, 9000, 0, 4096);
        self.send(&data);
        assert_eq!(self.reply(9000, 0).errno(), 0);
        self.request(0, CMD_READ, 9001, 0, 4096);
        let got = self.reply(9001, 4096);
        match got {
            Reply::Simple(0, d) => assert_eq!(d, data),
            Reply::Chunks(c) if structured => {
                assert_eq!(c.len(), 1);
                assert_eq!(c[0].0, CHUNK_OFFSET_DATA);
                assert_eq!(&c[0].1[8..], &data[..]);
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
}

fn go_request(name: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn server() -> TestServer<stretch_nbd::MemDevice> {
    TestServer::mem(
        ServerConfig::default(),
        &[("vol", SIZE, false), ("ro", SIZE, true)],
    )
    .0
}

#[test]
fn oversized_lengths_get_errors_and_the_connection_survives() {
    let t = server();
    let mut c = Raw::open(t.addr, "vol", true);
    // NBD.md §1.6: "EOVERFLOW ... an oversized command that has no payload".
    c.request(0, CMD_READ, 1, 0, (32 << 20) + 4096);
    assert_eq!(c.reply(1, 0).errno(), EOVERFLOW);
    // NBD.md §5: an oversized WRITE's payload is drained, then EINVAL; the stream stays framed.
    let len = (32 << 20) + 4096;
    c.request(0, CMD_WRITE, 2, 0, len);
    c.send(&vec![0u8; len as usize]);
    assert_eq!(c.reply(2, 0).errno(), EINVAL);
    c.assert_serving(true);

    // Beyond the drain bound the server replies and then closes ("or the connection closed
    // as the spec allows"); other connections are unaffected.
    let mut c2 = Raw::open(t.addr, "vol", false);
    c2.request(0, CMD_WRITE, 3, 0, u32::MAX);
    assert_eq!(c2.reply(3, 0).errno(), EINVAL);
    assert!(c2.closed_by_server());
    c.assert_serving(true);
}

#[test]
fn past_eof_requests_get_einval_or_enospc() {
    let t = server();
    for structured in [true, false] {
        let mut c = Raw::open(t.addr, "vol", structured);
        // NBD.md §1.6: READ past EOF → EINVAL; WRITE / WRITE_ZEROES past EOF → ENOSPC.
        c.request(0, CMD_READ, 1, SIZE - 4096, 8192);
        assert_eq!(c.reply(1, 0).errno(), EINVAL);
        c.request(0, CMD_WRITE, 2, SIZE, 4096);
        c.send(&[1u8; 4096]);
        assert_eq!(c.reply(2, 0).errno(), ENOSPC);
        c.request(0, CMD_WRITE_ZEROES, 3, SIZE - 4096, 8192);
        assert_eq!(c.reply(3, 0).errno(), ENOSPC);
        c.request(0, CMD_TRIM, 4, SIZE + 4096, 4096);
        assert_eq!(c.reply(4, 0).errno(), EINVAL);
        c.request(0, CMD_CACHE, 5, SIZE, 1);
        assert_eq!(c.reply(5, 0).errno(), EINVAL);
        // NBD.md §5: "Never compute offset + len unchecked" — this offset would wrap.
        c.request(0, CMD_READ, 6, u64::MAX - 100, 4096);
        assert_eq!(c.reply(6, 0).errno(), EINVAL);
        c.request(0, CMD_WRITE, 7, u64::MAX - 4095, 4096);
        c.send(&[1u8; 4096]);
        assert_eq!(c.reply(7, 0).errno(), ENOSPC);
        if structured {
            c.request(0, CMD_BLOCK_STATUS, 8, SIZE, 4096);
            assert_eq!(c.reply(8, 0).errno(), EINVAL);
        }
        c.assert_serving(structured);
    }
}

#[test]
fn zero_length_requests_are_answered() {
    let t = server();
    let mut c = Raw::open(t.addr, "vol", true);
    // NBD.md §1.4: zero-length behaviour is unspecified, "but the server SHOULD NOT
    // disconnect"; we answer success (nothing to do).
    c.request(0, CMD_READ, 1, 4096, 0);
    assert_eq!(c.reply(1, 0), Reply::Chunks(vec![(CHUNK_NONE, vec![])]));
    c.request(0, CMD_WRITE, 2, 4096, 0);
    assert_eq!(c.reply(2, 0).errno(), 0);
    c.request(0, CMD_TRIM, 3, 4096, 0);
    assert_eq!(c.reply(3, 0).errno(), 0);
    c.request(0, CMD_WRITE_ZEROES, 4, 4096, 0);
    assert_eq!(c.reply(4, 0).errno(), 0);
    // A zero-length block status cannot have the required non-zero extent: EINVAL.
    c.request(0, CMD_BLOCK_STATUS, 5, 0, 0);
    assert_eq!(c.reply(5, 0).errno(), EINVAL);
    c.assert_serving(true);
}

#[test]
fn unknown_commands_and_misplaced_flags_get_einval() {
    let t = server();
    for structured in [true, false] {
        let mut c = Raw::open(t.addr, "vol", structured);
        // NBD.md §1.6: EINVAL for "Unknown command or flag, or a flag on the wrong command".
        c.request(0, 42, 1, 0, 4096);
        assert_eq!(c.reply(1, 0).errno(), EINVAL);
        c.request(0x40, CMD_READ, 2, 0, 4096);
        assert_eq!(c.reply(2, 0).errno(), EINVAL);
        c.request(CMD_FLAG_REQ_ONE, CMD_READ, 3, 0, 4096);
        assert_eq!(c.reply(3, 0).errno(), EINVAL);
        // A WRITE with a bad flag still has its payload consumed.
        c.request(CMD_FLAG_NO_HOLE, CMD_WRITE, 4, 0, 4096);
        c.send(&[7u8; 4096]);
        assert_eq!(c.reply(4, 0).errno(), EINVAL);
        c.request(CMD_FLAG_FAST_ZERO, CMD_TRIM, 5, 0, 4096);
        assert_eq!(c.reply(5, 0).errno(), EINVAL);
        c.request(CMD_FLAG_DF, CMD_WRITE_ZEROES, 6, 0, 4096);
        assert_eq!(c.reply(6, 0).errno(), EINVAL);
        if !structured {
            // DF is only valid once structured replies are negotiated (SEND_DF unset).
            c.request(CMD_FLAG_DF, CMD_READ, 7, 0, 4096);
            assert_eq!(c.reply(7, 0).errno(), EINVAL);
            // BLOCK_STATUS needs structured replies and a selected context.
            c.request(0, CMD_BLOCK_STATUS, 8, 0, 4096);
            assert_eq!(c.reply(8, 0).errno(), EINVAL);
        }
        // NBD.md §1.4: "FUA 0x1: allowed on any command".
        for (i, kind) in [CMD_READ, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES]
            .into_iter()
            .enumerate()
        {
            let cookie = 100 + i as u64;
            let len = if kind == CMD_FLUSH { 0 } else { 4096 };
            c.request(CMD_FLAG_FUA, kind, cookie, 8192, len);
            let read_len = if kind == CMD_READ { 4096 } else { 0 };
            assert_eq!(c.reply(cookie, read_len).errno(), 0, "FUA on {kind}");
        }
        c.assert_serving(structured);
    }
}

#[test]
fn unaligned_mutations_get_einval_and_unaligned_reads_are_served() {
    let t = server();
    let mut c = Raw::open(t.addr, "vol", false);
    // DESIGN.md §4 Alignment: a WRITE, TRIM or WRITE_ZEROES not aligned to 4096 gets EINVAL.
    c.request(0, CMD_WRITE, 1, 512, 4096);
    c.send(&[1u8; 4096]);
    assert_eq!(c.reply(1, 0).errno(), EINVAL);
    c.request(0, CMD_WRITE, 2, 0, 1000);
    c.send(&[1u8; 1000]);
    assert_eq!(c.reply(2, 0).errno(), EINVAL);
    c.request(0, CMD_TRIM, 3, 4096, 512);
    assert_eq!(c.reply(3, 0).errno(), EINVAL);
    c.request(0, CMD_WRITE_ZEROES, 4, 100, 4096);
    assert_eq!(c.reply(4, 0).errno(), EINVAL);
    // "Reads may have any alignment."
    let data = common::pattern(8192, 3);
    c.request(0, CMD_WRITE, 5, 8192, 8192);
    c.send(&data);
    assert_eq!(c.reply(5, 0).errno(), 0);
    c.request(0, CMD_READ, 6, 8192 + 100, 1000);
    assert_eq!(c.reply(6, 1000), Reply::Simple(0, data[100..1100].to_vec()));
    c.assert_serving(false);
}

#[test]
fn read_only_export_refuses_mutations_with_eperm() {
    let t = server();
    let mut c = Raw::open(t.addr, "ro", true);
    // NBD.md §1.3: READ_ONLY — "Writes MUST fail (EPERM)".
    c.request(0, CMD_WRITE, 1, 0, 4096);
    c.send(&[1u8; 4096]);
    assert_eq!(c.reply(1, 0).errno(), EPERM);
    c.request(0, CMD_TRIM, 2, 0, 4096);
    assert_eq!(c.reply(2, 0).errno(), EPERM);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096);
    assert_eq!(c.reply(3, 0).errno(), EPERM);
    c.request(0, CMD_READ, 4, 0, 4096);
    assert_eq!(c.reply(4, 0).errno(), 0);
}

#[test]
fn bad_request_magic_disconnects_only_that_client() {
    let t = server();
    let mut other = Raw::open(t.addr, "vol", true);
    let mut c = Raw::open(t.addr, "vol", true);
    let mut h = Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 1,
        offset: 0,
        len: 4096,
    }
    .encode();
    h[0] ^= 0xff;
    c.send(&h);
    // NBD.md §5 allows a hard disconnect once framing is lost.
    assert!(c.closed_by_server());
    other.assert_serving(true);
    Raw::open(t.addr, "vol", false).assert_serving(false);
}

#[test]
fn export_names_up_to_4096_bytes_work_and_longer_get_err_invalid() {
    let long = "n".repeat(4096);
    let (t, _) = TestServer::mem(ServerConfig::default(), &[(&long, SIZE, false)]);
    // NBD.md §1: strings "MUST be accepted up to 4096 B".
    Raw::open(t.addr, &long, true).assert_serving(true);

    // NBD.md §5 (CVE-2017-15118): longer → ERR_INVALID, and negotiation goes on.
    let mut c = Raw::greet(t.addr);
    c.option(OPT_GO, &go_request("x".repeat(5000).as_bytes()));
    let r = c.go_replies();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, REP_ERR_INVALID);
    c.option(OPT_INFO, &go_request(b"nosuch"));
    assert_eq!(c.option_reply(OPT_INFO).0, REP_ERR_UNKNOWN);
    c.option(OPT_GO, &go_request(long.as_bytes()));
    assert_eq!(c.go_replies().last().map(|x| x.0), Some(REP_ACK));
    c.assert_serving(false);
}

#[test]
fn unknown_and_unsupported_options_get_err_unsup_and_negotiation_continues() {
    let t = server();
    let mut c = Raw::greet(t.addr);
    // NBD.md §1.2: "Unknown options MUST get ERR_UNSUP, and the server must keep parsing".
    c.option(77, b"some data the server must drain");
    assert_eq!(c.option_reply(77).0, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_reply(OPT_STARTTLS).0, REP_ERR_UNSUP);
    // QEMU >= 8.2 and libnbd >= 1.18 ask for this first; the refusal must be clean.
    c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.option_reply(OPT_EXTENDED_HEADERS).0, REP_ERR_UNSUP);
    // "SET before structured replies → ERR_INVALID".
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_request("vol", &["base:allocation"]),
    );
    assert_eq!(c.option_reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.option_reply(OPT_LIST).0, REP_ERR_INVALID);
    c.option(OPT_LIST, &[]);
    let (k1, d1) = c.option_reply(OPT_LIST);
    assert_eq!(k1, REP_SERVER);
    assert_eq!(&d1[4..7], b"vol");
    assert_eq!(c.option_reply(OPT_LIST).0, REP_SERVER);
    assert_eq!(c.option_reply(OPT_LIST).0, REP_ACK);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    // LIST with the "base:" wildcard lists base:allocation with id 0; unknown names ignored.
    c.option(
        OPT_LIST_META_CONTEXT,
        &meta_request("vol", &["base:", "qemu:nosuch"]),
    );
    assert_eq!(
        c.option_reply(OPT_LIST_META_CONTEXT),
        (
            REP_META_CONTEXT,
            [&[0u8, 0, 0, 0][..], b"base:allocation"].concat()
        )
    );
    assert_eq!(c.option_reply(OPT_LIST_META_CONTEXT).0, REP_ACK);
    c.option(OPT_GO, &go_request(b"vol"));
    let replies = c.go_replies();
    let export = replies
        .iter()
        .find(|(k, d)| *k == REP_INFO && be_u16(d, 0) == INFO_EXPORT)
        .expect("INFO_EXPORT");
    assert_eq!(be_u64(&export.1, 2), SIZE);
    let flags = be_u16(&export.1, 10);
    assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
    assert_ne!(flags & TFLAG_SEND_DF, 0);
    let bs = replies
        .iter()
        .find(|(k, d)| *k == REP_INFO && be_u16(d, 0) == INFO_BLOCK_SIZE)
        .expect("INFO_BLOCK_SIZE");
    // Issue 3: min = preferred = 4096, max 32 MiB.
    assert_eq!(
        (be_u32(&bs.1, 2), be_u32(&bs.1, 6), be_u32(&bs.1, 10)),
        (4096, 4096, 32 << 20)
    );
    c.assert_serving(true);
}

#[test]
fn export_name_option_and_abort() {
    let t = server();
    let mut c = Raw::greet(t.addr);
    c.option(OPT_EXPORT_NAME, b"vol");
    // NO_ZEROES negotiated: exactly size + flags, no padding.
    let r = c.read_n(10);
    assert_eq!(be_u64(&r, 0), SIZE);
    c.assert_serving(false);

    // EXPORT_NAME cannot carry an error: an unknown export is a hard disconnect.
    let mut c = Raw::greet(t.addr);
    c.option(OPT_EXPORT_NAME, b"nosuch");
    assert!(c.closed_by_server());

    let mut c = Raw::greet(t.addr);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply(OPT_ABORT).0, REP_ACK);
    assert!(c.closed_by_server());
}

#[test]
fn stalled_handshake_times_out_while_others_are_served() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let (t, _) = TestServer::mem(config, &[("vol", SIZE, false)]);
    let started = Instant::now();
    let mut stalled = Raw::greet(t.addr); // ... and then says nothing.
    let mut good = Raw::open(t.addr, "vol", true);
    // NBD.md §5 (CVE-2024-7409): the idle handshake is closed by the timeout.
    assert!(stalled.closed_by_server());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "closed too late: {waited:?}"
    );
    good.assert_serving(true);
}

#[test]
fn client_disconnecting_mid_payload_does_not_disturb_the_server() {
    let t = server();
    let mut c = Raw::open(t.addr, "vol", true);
    c.request(0, CMD_WRITE, 1, 0, 1 << 20);
    c.send(&[3u8; 1000]);
    drop(c);
    let mut c = Raw::open(t.addr, "vol", true);
    c.assert_serving(true);
}

#[test]
fn connection_cap_refuses_extra_connections() {
    let config = ServerConfig {
        connections_max: 2,
        ..ServerConfig::default()
    };
    let (t, _) = TestServer::mem(config, &[("vol", SIZE, false)]);
    let mut a = Raw::open(t.addr, "vol", false);
    let _b = Raw::open(t.addr, "vol", false);
    let mut c = Raw::connect(t.addr);
    assert!(c.closed_by_server(), "third connection should be refused");
    a.assert_serving(false);
    drop(a);
    // The slot is released when the connection ends; retry for a bounded time.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = Raw::connect(t.addr);
        let mut g = [0u8; GREETING_BYTES];
        if d.s.read_exact(&mut g).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "slot never released");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn error_chunks_carry_short_messages() {
    let t = server();
    let mut c = Raw::open(t.addr, "vol", true);
    c.request(0, CMD_READ, 1, SIZE, 4096);
    let Reply::Chunks(chunks) = c.reply(1, 0) else {
        panic!("structured reply expected");
    };
    // NBD proto.md: once structured replies are on, every READ reply is structured, "even an
    // early EINVAL"; the QEMU client drops a non-data chunk over 1000 bytes.
    assert_eq!(chunks.len(), 1);
    let (kind, payload) = &chunks[0];
    assert_eq!(*kind, CHUNK_ERROR);
    let msg_len = be_u16(payload, 4) as usize;
    assert_eq!(payload.len(), 6 + msg_len);
    assert!(msg_len > 0 && msg_len <= 900);
}

#[test]
fn shutdown_answers_eshutdown_then_closes() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_secs(30),
        ..ServerConfig::default()
    };
    let (t, _) = TestServer::mem(config, &[("vol", SIZE, false)]);
    let mut c = Raw::open(t.addr, "vol", false);
    c.assert_serving(false);
    t.server.shutdown();
    // NBD.md §1.6: ESHUTDOWN "during server shutdown; the client must then soft-disconnect".
    // The signal reaches the connection asynchronously; poll with a bounded loop.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut cookie = 1;
    loop {
        c.request(0, CMD_FLUSH, cookie, 0, 0);
        let e = c.reply(cookie, 0).errno();
        if e == ESHUTDOWN {
            break;
        }
        assert_eq!(e, 0);
        assert!(Instant::now() < deadline, "never saw ESHUTDOWN");
        cookie += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    c.request(0, CMD_DISC, 999, 0, 0);
    assert!(c.closed_by_server());
    t.shutdown_and_join(Duration::from_secs(5));
}

#[test]
fn block_status_reports_allocation_with_req_one() {
    let t = server();
    let mut c = Raw::open(t.addr, "vol", true);
    c.request(0, CMD_WRITE, 1, 8192, 8192);
    c.send(&[1u8; 8192]);
    assert_eq!(c.reply(1, 0).errno(), 0);
    c.request(0, CMD_BLOCK_STATUS, 2, 0, 65536);
    let Reply::Chunks(ch) = c.reply(2, 0) else {
        panic!("structured")
    };
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].0, CHUNK_BLOCK_STATUS);
    let p = &ch[0].1;
    assert_eq!(be_u32(p, 0), 1, "the id SET_META_CONTEXT gave");
    let ext: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|e| (be_u32(e, 0), be_u32(e, 4)))
        .collect();
    assert_eq!(ext[0], (8192, STATE_HOLE | STATE_ZERO));
    assert_eq!(ext[1], (8192, 0));
    // Extents are multiples of the block size (NBD.md §1.5).
    assert!(ext.iter().all(|(l, _)| l % 4096 == 0 && *l > 0));
    // NBD.md §1.5: "With REQ_ONE: exactly one extent, no longer than the request".
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 3, 0, 4096);
    let Reply::Chunks(ch) = c.reply(3, 0) else {
        panic!("structured")
    };
    assert_eq!(ch[0].1.len(), 4 + 8);
    assert_eq!(be_u32(&ch[0].1, 4), 4096);
}

#[test]
fn sparse_read_uses_hole_chunks_and_df_forces_one_data_chunk() {
    let t = server();
    let mut c = Raw::open(t.addr, "vol", true);
    let data = common::pattern(4096, 9);
    c.request(0, CMD_WRITE, 1, 4096, 4096);
    c.send(&data);
    assert_eq!(c.reply(1, 0).errno(), 0);
    c.request(0, CMD_READ, 2, 0, 3 * 4096);
    let Reply::Chunks(ch) = c.reply(2, 0) else {
        panic!("structured")
    };
    let kinds: Vec<u16> = ch.iter().map(|x| x.0).collect();
    assert_eq!(
        kinds,
        [CHUNK_OFFSET_HOLE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE]
    );
    assert_eq!(be_u64(&ch[1].1, 0), 4096);
    assert_eq!(&ch[1].1[8..], &data[..]);
    // NBD.md §1.5: "With DF: exactly one content chunk".
    c.request(CMD_FLAG_DF, CMD_READ, 3, 0, 3 * 4096);
    let Reply::Chunks(ch) = c.reply(3, 0) else {
        panic!("structured")
    };
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].0, CHUNK_OFFSET_DATA);
    assert_eq!(&ch[0].1[8 + 4096..8 + 8192], &data[..]);
}

#[test]
fn disc_finishes_in_flight_requests_then_closes() {
    let (t, devs) = TestServer::mem(ServerConfig::default(), &[("vol", SIZE, false)]);
    let mut c = Raw::open(t.addr, "vol", false);
    // 64 pipelined writes and a DISC in one burst, no reply awaited in between.
    let mut burst = Vec::new();
    for i in 0..64u64 {
        let r = Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: i,
            offset: i * 4096,
            len: 4096,
        };
        burst.extend_from_slice(&r.encode());
        burst.extend_from_slice(&[i as u8 + 1; 4096]);
    }
    let disc = Request {
        flags: 0,
        kind: CMD_DISC,
        cookie: 999,
        offset: 0,
        len: 0,
    };
    burst.extend_from_slice(&disc.encode());
    c.send(&burst);
    // NBD proto.md DISC: the server finishes outstanding requests (their replies still go
    // out, in any order), sends no reply to DISC itself, then closes.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let h = c.read_n(SIMPLE_REPLY_HEADER_BYTES);
        assert_eq!(be_u32(&h, 0), SIMPLE_REPLY_MAGIC);
        assert_eq!(be_u32(&h, 4), 0);
        assert!(seen.insert(be_u64(&h, 8)), "duplicate cookie");
    }
    assert_eq!(seen.len(), 64);
    assert!(c.closed_by_server());
    let dev = devs[0].clone();
    let got = t
        .runtime()
        .block_on(async move { stretch_engine::BlockDevice::read(&*dev, 63 * 4096, 4096).await })
        .expect("read");
    assert!(got.iter().all(|&b| b == 64));
}

#[test]
fn shutdown_completes_despite_a_client_stalled_mid_payload() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let (t, _) = TestServer::mem(config, &[("vol", SIZE, false)]);
    let mut c = Raw::open(t.addr, "vol", false);
    c.request(0, CMD_WRITE, 1, 0, 1 << 20);
    c.send(&[0u8; 1000]); // ... and the rest never comes.
    let started = Instant::now();
    // Graceful shutdown has a hard deadline (twice the grace), so a stalled client cannot
    // hold the server open.
    t.shutdown_and_join(Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(c.closed_by_server());
}
