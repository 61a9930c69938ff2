//! The async client against the in-process server: every command, pipelining with
//! out-of-order completion, errors that keep the connection usable, and graceful shutdown.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, TestServer};
use stretch_engine::{AlignedBuf, BlockDevice, BlockError, Extent, ZeroFlags};
use stretch_nbd::proto::{EINVAL, ENOSPC, ESHUTDOWN, TFLAG_CAN_MULTI_CONN};
use stretch_nbd::{Client, ClientOptions, Export, MemDevice, ServerConfig};

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(30);

/// A MemDevice whose reads at offset 0 take `delay`: lets a test hold one request in flight
/// while others pass it.
struct SlowAtZero {
    inner: MemDevice,
    delay: Duration,
}

impl BlockDevice for SlowAtZero {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, BlockError> {
        if offset == 0 {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), BlockError> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        self.inner.block_status(offset, len).await
    }
}

fn slow_server(delay: Duration, config: ServerConfig) -> TestServer<SlowAtZero> {
    TestServer::start(
        config,
        vec![Export {
            name: "vol".into(),
            description: String::new(),
            device: Arc::new(SlowAtZero {
                inner: MemDevice::new(16 * MIB),
                delay,
            }),
            read_only: false,
        }],
    )
}

#[test]
fn every_command_round_trips_over_tcp_and_unix() {
    let (t, _) = TestServer::mem(ServerConfig::default(), &[("vol", 16 * MIB, false)]);
    let (addr, path) = (t.addr, t.unix_path.clone());
    t.runtime().block_on(async move {
        let tcp = Client::connect_tcp(addr, "vol").await.expect("connect tcp");
        let unix = Client::connect_unix(&path, "vol")
            .await
            .expect("connect unix");
        for c in [&tcp, &unix] {
            assert_eq!(c.size_bytes(), 16 * MIB);
            assert!(c.structured_replies());
            assert_ne!(c.transmission_flags() & TFLAG_CAN_MULTI_CONN, 0);
            assert_eq!(c.block_sizes().min_bytes, 4096);
        }
        let data = pattern(256 * 1024, 11);
        tcp.write(MIB, &data, true).await.expect("write fua");
        tcp.flush().await.expect("flush");
        // CAN_MULTI_CONN: a write acknowledged and flushed on one connection is visible on
        // another (NBD.md §1.7).
        let got = unix.read(MIB, data.len() as u32).await.expect("read");
        assert_eq!(&got[..], &data[..]);
        let got = unix.read(MIB + 100, 1000).await.expect("unaligned read");
        assert_eq!(&got[..], &data[100..1100]);
        unix.cache(0, 4096).await.expect("cache");

        let ext = tcp
            .block_status(0, (2 * MIB) as u32, false)
            .await
            .expect("status");
        assert_eq!((ext[0].len_bytes, ext[0].hole), (MIB, true));
        assert_eq!(
            (ext[1].len_bytes, ext[1].hole, ext[1].zero),
            (256 * 1024, false, false)
        );

        tcp.trim(MIB, 4096, false).await.expect("trim");
        let nh = ZeroFlags {
            no_hole: true,
            ..ZeroFlags::default()
        };
        tcp.write_zeroes(MIB + 4096, 4096, nh).await.expect("zero");
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        tcp.write_zeroes(MIB + 8192, 4096, fast)
            .await
            .expect("fast zero");
        let got = unix.read(MIB, 3 * 4096).await.expect("read zeroes");
        assert!(got.iter().all(|&b| b == 0));
        let ext = unix
            .block_status(MIB, 3 * 4096, true)
            .await
            .expect("req one");
        assert_eq!(ext.len(), 1);
        assert!(ext[0].hole && ext[0].len_bytes == 4096);
        tcp.disconnect().await.expect("disconnect");
        unix.disconnect().await.expect("disconnect");
    });
}

#[test]
fn server_errors_keep_the_connection_usable() {
    let (t, _) = TestServer::mem(ServerConfig::default(), &[("vol", 16 * MIB, false)]);
    let addr = t.addr;
    t.runtime().block_on(async move {
        for structured_replies in [true, false] {
            let options = ClientOptions {
                export: "vol".into(),
                structured_replies,
                ..ClientOptions::default()
            };
            let c = Client::connect_tcp_with(addr, &options)
                .await
                .expect("connect");
            assert_eq!(c.structured_replies(), structured_replies);
            let e = c
                .write(512, &[1u8; 4096], false)
                .await
                .expect_err("unaligned");
            assert_eq!(e.errno(), Some(EINVAL));
            let e = c
                .write(16 * MIB, &[1u8; 4096], false)
                .await
                .expect_err("past EOF");
            assert_eq!(e.errno(), Some(ENOSPC));
            let e = c.read(16 * MIB, 1).await.expect_err("read past EOF");
            assert_eq!(e.errno(), Some(EINVAL));
            if structured_replies {
                // Structured error chunks carry the server's message.
                match e {
                    stretch_nbd::ClientError::Server { message, .. } => {
                        assert!(message.contains("beyond"), "{message}")
                    }
                    other => panic!("{other}"),
                }
            } else {
                assert!(c.block_status(0, 4096, false).await.is_err());
            }
            c.write(0, &[9u8; 4096], false)
                .await
                .expect("write after errors");
            assert_eq!(&c.read(0, 4096).await.expect("read")[..], &[9u8; 4096][..]);
        }
        let e = Client::connect_tcp(addr, "nosuch")
            .await
            .err()
            .expect("unknown export");
        assert!(e.to_string().contains("GO refused"), "{e}");
    });
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    let t = slow_server(Duration::from_millis(500), ServerConfig::default());
    let addr = t.addr;
    t.runtime().block_on(async move {
        let c = Client::connect_tcp(addr, "vol").await.expect("connect");
        c.write(0, &[1u8; 4096], false).await.expect("write");
        c.write(4096, &[2u8; 4096], false).await.expect("write");
        let started = Instant::now();
        let slow = {
            let c = c.clone();
            tokio::spawn(async move {
                let r = c.read(0, 4096).await;
                (r, Instant::now())
            })
        };
        // Give the slow request a head start so it is surely sent first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        // NBD proto.md: replies may come in any order; 64 fast reads sent after the slow one
        // all complete while it is still in flight.
        let mut fast = Vec::new();
        for _ in 0..64 {
            let c = c.clone();
            fast.push(tokio::spawn(async move { c.read(4096, 4096).await }));
        }
        for f in fast {
            let got = f.await.expect("join").expect("fast read");
            assert!(got.iter().all(|&b| b == 2));
        }
        let fast_done = Instant::now();
        let (r, slow_done) = slow.await.expect("join");
        assert!(r.expect("slow read").iter().all(|&b| b == 1));
        assert!(fast_done < slow_done, "fast reads waited for the slow one");
        assert!(started.elapsed() < LIMIT);
    });
}

#[test]
fn many_tasks_share_one_client_at_high_queue_depth() {
    let (t, devs) = TestServer::mem(ServerConfig::default(), &[("vol", 64 * MIB, false)]);
    let addr = t.addr;
    t.runtime().block_on(async move {
        let c = Client::connect_tcp(addr, "vol").await.expect("connect");
        // 256 concurrent writers of distinct 64 KiB blocks (more than the server's 128-request
        // minimum), then 256 concurrent readers verify them.
        let mut tasks = Vec::new();
        for i in 0..256u64 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let data = pattern(65536, i + 1);
                c.write(i * 65536, &data, false).await
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("write");
        }
        let mut tasks = Vec::new();
        for i in 0..256u64 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let got = c.read(i * 65536, 65536).await?;
                Ok::<bool, stretch_nbd::ClientError>(got[..] == pattern(65536, i + 1)[..])
            }));
        }
        for t in tasks {
            assert!(t.await.expect("join").expect("read"), "data mismatch");
        }
        c.disconnect().await.expect("disconnect");
    });
    assert_eq!(devs[0].allocated_blocks(), 256 * 16);
}

#[test]
fn byte_bound_applies_backpressure_without_deadlock() {
    // A 1 MiB in-flight byte budget with 4 MiB requests: each request's cost is clamped to the
    // budget, so requests run one at a time but all complete.
    let config = ServerConfig {
        inflight_bytes_max: MIB as usize,
        requests_inflight_max: 128,
        ..ServerConfig::default()
    };
    let (t, _) = TestServer::mem(config, &[("vol", 64 * MIB, false)]);
    let addr = t.addr;
    t.runtime().block_on(async move {
        let c = Client::connect_tcp(addr, "vol").await.expect("connect");
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let data = pattern(4 * MIB as usize, i + 100);
                c.write(i * 4 * MIB, &data, false).await?;
                let got = c.read(i * 4 * MIB, (4 * MIB) as u32).await?;
                Ok::<bool, stretch_nbd::ClientError>(got[..] == data[..])
            }));
        }
        for t in tasks {
            let ok = tokio::time::timeout(LIMIT, t).await.expect("deadlock?");
            assert!(ok.expect("join").expect("io"));
        }
    });
}

#[test]
fn shutdown_finishes_in_flight_requests_then_refuses_new_ones() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_secs(30),
        ..ServerConfig::default()
    };
    let t = slow_server(Duration::from_millis(400), config);
    let addr = t.addr;
    let server = t.server.clone();
    t.runtime().block_on(async move {
        let c = Client::connect_tcp(addr, "vol").await.expect("connect");
        c.write(0, &[5u8; 4096], false).await.expect("write");
        let slow = {
            let c = c.clone();
            tokio::spawn(async move { c.read(0, 4096).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.shutdown();
        // Graceful: the request in flight when shutdown began still completes with its data.
        let got = slow.await.expect("join").expect("in-flight read");
        assert!(got.iter().all(|&b| b == 5));
        // New requests get ESHUTDOWN (NBD.md §1.6) once the signal reached the connection.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match c.flush().await {
                Err(e) if e.errno() == Some(ESHUTDOWN) => break,
                Ok(()) => assert!(Instant::now() < deadline, "never refused"),
                Err(e) => panic!("unexpected {e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.disconnect().await.expect("soft disconnect");
    });
    t.shutdown_and_join(Duration::from_secs(10));
}

#[test]
fn abandoned_requests_do_not_break_the_connection() {
    let t = slow_server(Duration::from_millis(300), ServerConfig::default());
    let addr = t.addr;
    t.runtime().block_on(async move {
        let c = Client::connect_tcp(addr, "vol").await.expect("connect");
        c.write(4096, &[4u8; 4096], false).await.expect("write");
        // The caller gives up on a sent request; its reply arrives later and must be
        // discarded quietly, not treated as a reply to an unknown cookie.
        let abandoned = tokio::time::timeout(Duration::from_millis(50), c.read(0, 4096)).await;
        assert!(
            abandoned.is_err(),
            "the slow read should still be in flight"
        );
        tokio::time::sleep(Duration::from_millis(400)).await; // Its reply has come by now.
        for _ in 0..10 {
            let got = c
                .read(4096, 4096)
                .await
                .expect("read after abandoned request");
            assert!(got.iter().all(|&b| b == 4));
        }
        c.disconnect().await.expect("disconnect");
    });
}
