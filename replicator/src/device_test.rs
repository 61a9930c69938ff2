//! Two [`ReplicatedVolume`]s over real engine volumes and a real loopback TCP link, in one
//! process: the daemon's data path without the NBD server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stretch_engine::{AlignedBuf, BlockDevice, Volume, VolumeConfig};
use tokio::io::AsyncWriteExt;

use crate::core::{Config, MapView, Role};
use crate::device::{ReplicatedOptions, ReplicatedVolume};
use crate::driver::DriverConfig;
use crate::link::{LinkConfig, LinkMode};

const CLUSTER_ID: u64 = 0x5354_5245;
const VOLUME_BYTES: u64 = 8 << 20;

struct Pair {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    a: Arc<ReplicatedVolume>,
    b: Arc<ReplicatedVolume>,
    a_addr: std::net::SocketAddr,
}

fn volume(dir: &std::path::Path) -> Arc<Volume> {
    let cfg = VolumeConfig {
        direct_io: false,
        ..VolumeConfig::default()
    };
    Arc::new(Volume::create(dir, "vol", VOLUME_BYTES, &cfg).expect("create volume"))
}

fn replicated(vol: Arc<Volume>, site: u8, mode: LinkMode) -> Arc<ReplicatedVolume> {
    let map = MapView {
        role: Role::InSync,
        epoch: 1,
        fenced_before: [0, 0],
    };
    let divergent = vol.info().data_path.with_extension("divergent");
    let options = ReplicatedOptions::new(DriverConfig::new(divergent), LinkConfig::new(CLUSTER_ID));
    let cfg = Config::new(site, CLUSTER_ID, 1, 1);
    Arc::new(ReplicatedVolume::start(vol, cfg, map, mode, options).expect("start replication"))
}

async fn pair() -> Pair {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_addr = listener.local_addr().unwrap();
    let a = replicated(volume(da.path()), 0, LinkMode::Listen(listener));
    let b = replicated(volume(db.path()), 1, LinkMode::Dial(a_addr));
    Pair {
        _dirs: (da, db),
        a,
        b,
        a_addr,
    }
}

fn pattern(seed: u8, len: usize) -> AlignedBuf {
    let data: Vec<u8> = (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 7) as u8))
        .collect();
    AlignedBuf::from_slice(&data)
}

/// Waits (bounded) until both sites have nothing dirty and the link is up.
async fn settle(p: &Pair) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (sa, sb) = (p.a.driver_stats(), p.b.driver_stats());
        if sa.dirty_blocks == 0 && sb.dirty_blocks == 0 && sa.link_up && sb.link_up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sites did not settle: a={sa:?} b={sb:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Invariant 1 (convergence): every block's data and stamp identical at both sites.
async fn assert_identical(p: &Pair) {
    let chunk: u32 = 1 << 20;
    let mut offset = 0;
    while offset < VOLUME_BYTES {
        let (da, sa) = p.a.volume().read_with_stamps(offset, chunk).await.unwrap();
        let (db, sb) = p.b.volume().read_with_stamps(offset, chunk).await.unwrap();
        assert!(da[..] == db[..], "data differs in [{offset}, +{chunk})");
        assert_eq!(sa, sb, "stamps differ in [{offset}, +{chunk})");
        offset += u64::from(chunk);
    }
}

// DESIGN.md §5 `sync`: a write is acknowledged once applied (visible) at both sites, so a
// read at the peer right after the reply returns it (§7 invariant 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_at_a_is_visible_at_b_when_acknowledged() {
    let p = pair().await;
    for i in 0..8u8 {
        let offset = u64::from(i) * 192 * 1024;
        let data = pattern(i, 64 * 1024);
        p.a.write(offset, data.clone(), false).await.unwrap();
        let read = p.b.read(offset, 64 * 1024).await.unwrap();
        assert!(
            read[..] == data[..],
            "write {i} not visible at b after its ack"
        );
    }
    // An unaligned read at b returns the same bytes as at a.
    let ra = p.a.read(4097, 10_000).await.unwrap();
    let rb = p.b.read(4097, 10_000).await.unwrap();
    assert!(ra[..] == rb[..]);
    settle(&p).await;
    assert_identical(&p).await;
}

// DESIGN.md §4 "Apply rule": concurrent overlapping writes from both sites end the same at
// both (§7 invariant 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_from_both_sites_converge() {
    let p = pair().await;
    let mut tasks = Vec::new();
    for (site, dev) in [(0u8, p.a.clone()), (1u8, p.b.clone())] {
        for writer in 0..4u8 {
            let dev = dev.clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..20u8 {
                    // Every writer hammers the same 64 KiB window with shifted offsets.
                    let offset = u64::from((round + writer) % 8) * 8192;
                    let seed = site * 100 + writer * 20 + round;
                    dev.write(offset, pattern(seed, 16 * 1024), false)
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Trims and zeroes replicate too.
    p.a.trim(8192, 8192, false).await.unwrap();
    p.b.write_zeroes(32768, 4096, Default::default())
        .await
        .unwrap();
    settle(&p).await;
    assert_identical(&p).await;
    let zeroes = p.a.read(8192, 8192).await.unwrap();
    assert!(zeroes.iter().all(|&b| b == 0));
}

// DESIGN.md §7 invariant 7: garbage frames are rejected and counted; the site keeps serving,
// and the real peer reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_link_is_counted_and_the_peer_reconnects() {
    let p = pair().await;
    p.a.write(0, pattern(1, 4096), false).await.unwrap();
    let mut rogue = tokio::net::TcpStream::connect(p.a_addr).await.unwrap();
    rogue.write_all(&[0xAB; 128]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.a.link_stats().rejects.bad_magic == 0 {
        assert!(Instant::now() < deadline, "garbage header was not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(rogue);
    // The rogue connection displaced b's session; b redials and replication carries on.
    p.a.write(4096, pattern(2, 4096), false).await.unwrap();
    let read = p.b.read(4096, 4096).await.unwrap();
    assert!(read[..] == pattern(2, 4096)[..]);
    assert!(p.a.link_stats().sessions >= 2);
    settle(&p).await;
    assert_identical(&p).await;
}
