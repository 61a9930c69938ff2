//! The failure matrix of DESIGN.md §6 with real processes: a `stretch witness` on 127.0.0.3,
//! two `stretch site` daemons on 127.0.0.1 and 127.0.0.2 joined through the link emulator,
//! writers at both sites recording every acknowledged write, and `kill -9`.
//!
//! After each case: no acknowledged write is lost, at most one site acknowledged writes while
//! the sites were apart, the loser served nothing once the survivor acknowledged alone, and
//! after heal both sites hold identical data.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{have_tool, stretch_bin, Site};
use stretch_bench::link::{Direction, LinkEmulator};
use stretch_nbd::Client;

const CLUSTER_ID: &str = "11";
const SIZE: &str = "16MiB";
const BLOCK: usize = 4096;
/// Blocks each writer cycles through (its own range, so every block has one writer).
const WRITER_BLOCKS: u64 = 256;
/// The failover target is 2 s (issue 6); the assertion leaves room for a loaded CI machine,
/// and the measured figure is printed (the benchmark reports it properly).
const FAILOVER_LIMIT: Duration = Duration::from_secs(4);

fn free_addr(ip: [u8; 4]) -> SocketAddr {
    let l = std::net::TcpListener::bind((std::net::Ipv4Addr::from(ip), 0)).expect("bind");
    l.local_addr().expect("local addr")
}

/// A `stretch witness` process, killed on drop.
struct Witness {
    child: Child,
}

impl Witness {
    fn start(dir: &Path, listen: SocketAddr, a: SocketAddr, b: SocketAddr) -> Witness {
        let mut child = Command::new(stretch_bin())
            .arg("witness")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", &listen.to_string(), "--bootstrap"])
            .args(["--site-a", &a.to_string(), "--site-b", &b.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn stretch witness");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the witness prints raft://ADDR once listening");
        assert!(
            line.starts_with("raft://"),
            "unexpected witness output {line:?}"
        );
        Witness { child }
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything needed to (re)start a site with the same identity and addresses.
struct SiteSpec {
    dir: PathBuf,
    args: Vec<String>,
}

impl SiteSpec {
    fn start(&self) -> Site {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Site::stretch_site(&self.dir, &args)
    }
}

struct Cluster {
    a: Option<Site>,
    b: Option<Site>,
    witness: Option<Witness>,
    link: LinkEmulator,
    spec_a: SiteSpec,
    spec_b: SiteSpec,
    _dirs: [tempfile::TempDir; 3],
}

fn site_args(site: &str, repl: (&str, SocketAddr), raft: SocketAddr, nbd_ip: &str) -> Vec<String> {
    [
        "--site",
        site,
        "--cluster-id",
        CLUSTER_ID,
        repl.0,
        &repl.1.to_string(),
        "--volume",
        "vol",
        "--size",
        SIZE,
        "--listen",
        &format!("{nbd_ip}:0"),
        "--buffered-io",
        "--request-timeout-ms",
        "20000",
        "--raft-listen",
        &raft.to_string(),
        "--preferred",
        "a",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Cluster {
    /// Witness, emulator (5 ms RTT) and both sites, started together; returns once both
    /// sites serve in sync.
    fn start() -> Cluster {
        let dirs = [
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        ];
        let (raft_a, raft_b) = (free_addr([127, 0, 0, 1]), free_addr([127, 0, 0, 2]));
        let raft_w = free_addr([127, 0, 0, 3]);
        let repl_a = free_addr([127, 0, 0, 1]);
        let link = LinkEmulator::start("127.0.0.1:0", &repl_a.to_string()).expect("emulator");
        link.set_rtt(Duration::from_millis(5));
        let witness = Witness::start(dirs[2].path(), raft_w, raft_a, raft_b);
        let spec_a = SiteSpec {
            dir: dirs[0].path().to_path_buf(),
            args: site_args("a", ("--repl-listen", repl_a), raft_a, "127.0.0.1"),
        };
        let spec_b = SiteSpec {
            dir: dirs[1].path().to_path_buf(),
            args: site_args("b", ("--peer", link.listen_addr()), raft_b, "127.0.0.2"),
        };
        // Together: a site that waits long for its peer would detach it first.
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| spec_a.start());
            let b = s.spawn(|| spec_b.start());
            (a.join().expect("site a"), b.join().expect("site b"))
        });
        let c = Cluster {
            a: Some(a),
            b: Some(b),
            witness: Some(witness),
            link,
            spec_a,
            spec_b,
            _dirs: dirs,
        };
        c.wait_both_serving(Duration::from_secs(30));
        c
    }

    fn a(&self) -> &Site {
        self.a.as_ref().expect("site a runs")
    }

    fn b(&self) -> &Site {
        self.b.as_ref().expect("site b runs")
    }

    /// Both sites serve reads: only possible with both in sync and holding leases.
    fn wait_both_serving(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let (ua, ub) = (self.a().uri("vol"), self.b().uri("vol"));
        while Instant::now() < deadline {
            if probe_read(&ua).is_ok() && probe_read(&ub).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the sites did not both serve within {limit:?}");
    }
}

fn addr_of(uri: &str) -> SocketAddr {
    let rest = uri.strip_prefix("nbd://").expect("tcp uri");
    rest.split('/')
        .next()
        .expect("host:port")
        .parse()
        .expect("socket addr")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// One 4 KiB read at offset 0 over a fresh connection.
fn probe_read(uri: &str) -> Result<(), String> {
    let addr = addr_of(uri);
    runtime().block_on(async {
        let client = tokio::time::timeout(Duration::from_secs(2), Client::connect_tcp(addr, "vol"))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let r = tokio::time::timeout(Duration::from_secs(2), client.read(0, BLOCK as u32)).await;
        let _ = client.disconnect().await;
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("read timed out".into()),
        }
    })
}

fn block_data(lba: u64, seq: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    for chunk in data.chunks_exact_mut(16) {
        chunk[..8].copy_from_slice(&seq.to_le_bytes());
        chunk[8..].copy_from_slice(&lba.to_le_bytes());
    }
    data
}

fn decode_block(data: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(data[..8].try_into().ok()?);
    let lba = u64::from_le_bytes(data[8..16].try_into().ok()?);
    let whole = block_data(lba, seq);
    (whole == data).then_some((lba, seq))
}

/// What a writer saw: every write it attempted and when each acknowledged one returned.
#[derive(Default)]
struct WriteLog {
    /// (lba, seq, acknowledged at)
    acked: Vec<(u64, u64, Instant)>,
    /// When each acknowledged write was sent, in the order of `acked`.
    sent: Vec<Instant>,
    /// (lba, seq) of every write sent, acknowledged or not.
    attempted: Vec<(u64, u64)>,
    failures: u64,
}

/// Writes blocks `first..first+WRITER_BLOCKS` round robin at QD1 until `until`, recording
/// acknowledgements. Bounded by `until` and by the request timeout of each write.
fn writer(uri: String, first: u64, seq_base: u64, until: Instant) -> WriteLog {
    let addr = addr_of(&uri);
    runtime().block_on(async move {
        let mut log = WriteLog::default();
        let mut client: Option<Client> = None;
        let mut seq = seq_base;
        while Instant::now() < until {
            if client.is_none() {
                match Client::connect_tcp(addr, "vol").await {
                    Ok(c) => client = Some(c),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let Some(c) = client.as_ref() else { continue };
            let lba = first + seq % WRITER_BLOCKS;
            seq += 1;
            log.attempted.push((lba, seq));
            let sent = Instant::now();
            let left = until.saturating_duration_since(sent) + Duration::from_secs(5);
            match tokio::time::timeout(
                left,
                c.write(lba * BLOCK as u64, &block_data(lba, seq), false),
            )
            .await
            {
                Ok(Ok(())) => {
                    log.acked.push((lba, seq, Instant::now()));
                    log.sent.push(sent);
                }
                Ok(Err(e)) => {
                    log.failures += 1;
                    if e.errno().is_none() {
                        client = None; // the connection broke; reconnect
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => {
                    log.failures += 1;
                    client = None;
                }
            }
        }
        log
    })
}

/// Reads blocks `first..first+WRITER_BLOCKS` at `uri` and checks each holds the last
/// acknowledged write of `log` or a later attempted one (a write whose reply never came may
/// or may not have happened, but nothing acknowledged may be missing).
fn assert_no_acknowledged_write_lost(uri: &str, first: u64, log: &WriteLog) {
    let addr = addr_of(uri);
    let mut last_acked = std::collections::BTreeMap::new();
    for (lba, seq, _) in &log.acked {
        last_acked.insert(*lba, *seq);
    }
    let attempted: std::collections::BTreeSet<(u64, u64)> = log.attempted.iter().copied().collect();
    let data = runtime().block_on(async {
        let c = Client::connect_tcp(addr, "vol")
            .await
            .expect("connect for verification");
        let d = c
            .read(
                first * BLOCK as u64,
                (WRITER_BLOCKS as usize * BLOCK) as u32,
            )
            .await
            .expect("read the writer's range");
        let _ = c.disconnect().await;
        d.to_vec()
    });
    for (i, block) in data.chunks_exact(BLOCK).enumerate() {
        let lba = first + i as u64;
        let Some(&acked) = last_acked.get(&lba) else {
            continue;
        };
        let Some((got_lba, got_seq)) = decode_block(block) else {
            panic!("{uri}: block {lba} holds no write of ours; its last acknowledged write was seq {acked}");
        };
        assert_eq!(
            got_lba, lba,
            "{uri}: block {lba} holds block {got_lba}'s data"
        );
        assert!(
            got_seq >= acked && attempted.contains(&(lba, got_seq)),
            "{uri}: block {lba} holds seq {got_seq}, older than its acknowledged seq {acked}"
        );
    }
}

fn assert_sites_identical(c: &Cluster) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(c.a().uri("vol"))
        .arg(c.b().uri("vol"))
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "sites differ: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How long after `from` the first write sent at or after `from` was acknowledged: with the
/// peer gone at `from`, the survivor's first acknowledgement alone.
fn first_ack_after(log: &WriteLog, from: Instant) -> Option<Duration> {
    log.acked
        .iter()
        .zip(&log.sent)
        .find(|(_, sent)| **sent >= from)
        .map(|((_, _, at), _)| at.duration_since(from))
}

/// Writes in flight at a cut may still be acknowledged by both sites just after it.
const IN_FLIGHT_SLACK: Duration = Duration::from_millis(200);

// DESIGN.md §6 "Link lost": the preferred site (A) carries on alone within the failover
// budget, B stops serving, B's writes are never acknowledged while apart, and after heal B
// resyncs, rejoins and holds every acknowledged write.
#[test]
fn link_cut_preferred_site_survives_then_resyncs() {
    if !have_tool("qemu-img", "link_cut_preferred_site_survives_then_resyncs") {
        return;
    }
    cut_and_heal(Direction::Both);
}

// A one-way cut B -> A: A hears nothing from B, B hears A but its echoes are lost. Neither
// lease is renewed, so the same rule decides: the preferred site survives, exactly once.
#[test]
fn one_way_cut_b_to_a_preferred_site_survives() {
    if !have_tool("qemu-img", "one_way_cut_b_to_a_preferred_site_survives") {
        return;
    }
    cut_and_heal(Direction::Up);
}

// The other direction, A -> B.
#[test]
fn one_way_cut_a_to_b_preferred_site_survives() {
    if !have_tool("qemu-img", "one_way_cut_a_to_b_preferred_site_survives") {
        return;
    }
    cut_and_heal(Direction::Down);
}

fn cut_and_heal(direction: Direction) {
    let c = Cluster::start();
    let start = Instant::now();
    let until = start + Duration::from_secs(7);
    let (ua, ub) = (c.a().uri("vol"), c.b().uri("vol"));
    let (wa, wb) = {
        let (ua, ub) = (ua.clone(), ub.clone());
        (
            std::thread::spawn(move || writer(ua, 0, 0, until)),
            std::thread::spawn(move || writer(ub, WRITER_BLOCKS, 1 << 40, until)),
        )
    };
    // A client connected to B before the cut: B must close it once it learns it lost.
    let rt = runtime();
    let old_b = rt
        .block_on(Client::connect_tcp(addr_of(&ub), "vol"))
        .expect("connect to B");
    std::thread::sleep(Duration::from_millis(1500));
    let cut = Instant::now();
    c.link.partition(direction);
    std::thread::sleep(Duration::from_millis(2500));
    let loser_read = probe_read(&ub);
    // DESIGN.md §6 "The loser": once detached, B closes its NBD connections, so no client
    // re-issues a request to it on a connection that outlived the detach.
    let on_old = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), old_b.read(0, BLOCK as u32)).await
    });
    match on_old {
        Ok(Err(e)) => assert!(
            e.errno().is_none(),
            "B answered on a connection that outlived its detach ({e}) instead of closing it"
        ),
        Ok(Ok(_)) => panic!("B served a read on a connection that outlived its detach"),
        Err(_) => panic!("B neither answered nor closed the old connection"),
    }
    // `stretch status` tells the operator: A alone, single copy, B detached, a new epoch.
    let admin_a = format!(
        "http://{}",
        c.a().admin.clone().expect("site a prints its admin API")
    );
    let out = common::stretch(&["status", "--site", &admin_a, "--json"]);
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    let control = &status[0]["control"];
    assert_eq!(control["single_copy"], true, "status at A: {status}");
    let b_state = control["site_states"][1]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        control["site_states"][0], "in-sync",
        "status at A: {status}"
    );
    // Fully cut, B is detached; cut one way, A may still hear B and start its resync (B
    // then waits as a sync target that the cut direction keeps from catching up).
    match direction {
        Direction::Both => assert_eq!(b_state, "detached", "status at A: {status}"),
        _ => assert!(
            matches!(b_state.as_str(), "detached" | "resyncing"),
            "status at A: {status}"
        ),
    }
    assert_eq!(control["serving"], "serve");
    let table = common::stretch(&["status", "--site", &admin_a]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("SINGLE COPY"),
        "the table warns of the single copy"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let healed = Instant::now();
    c.link.heal();
    let (la, lb) = (wa.join().expect("writer a"), wb.join().expect("writer b"));

    let failover = first_ack_after(&la, cut).expect("A acknowledged writes after the cut");
    eprintln!("failover: first write acknowledged at A {failover:?} after the cut");
    assert!(
        failover <= FAILOVER_LIMIT,
        "A paused {failover:?} after the cut"
    );
    // The survivor pauses but never fails a write: not at the cut, not at the rejoin.
    assert_eq!(la.failures, 0, "the surviving site A failed writes");
    assert!(
        loser_read.is_err(),
        "B served a read while cut off and detached"
    );
    // At most one site acknowledged writes while apart: apart from writes in flight at the
    // cut, B acknowledged nothing until the heal. (After the heal B resyncs and rejoins, and
    // then acknowledges again, rightly.)
    for (lba, seq, at) in lb.acked.iter().filter(|(_, _, at)| *at < healed) {
        assert!(
            *at < cut + IN_FLIGHT_SLACK,
            "B acknowledged write {seq} (block {lba}) {:?} after the cut, while A acknowledged alone",
            at.duration_since(cut)
        );
    }
    c.wait_both_serving(Duration::from_secs(30));
    assert_no_acknowledged_write_lost(&ub, 0, &la);
    assert_no_acknowledged_write_lost(&ua, WRITER_BLOCKS, &lb);
    assert_no_acknowledged_write_lost(&ua, 0, &la);
    assert_sites_identical(&c);
}

// DESIGN.md §6 "A site lost": site B killed -> A carries on with the witness; B restarts,
// resyncs only what changed and rejoins.
#[test]
fn site_b_killed_a_survives_and_b_rejoins() {
    if !have_tool("qemu-img", "site_b_killed_a_survives_and_b_rejoins") {
        return;
    }
    let mut c = Cluster::start();
    let until = Instant::now() + Duration::from_secs(5);
    let ua = c.a().uri("vol");
    let wa = std::thread::spawn(move || writer(ua, 0, 0, until));
    std::thread::sleep(Duration::from_millis(1000));
    let cut = Instant::now();
    c.b.take().expect("b").kill9();
    let la = wa.join().expect("writer a");
    let failover = first_ack_after(&la, cut).expect("A acknowledged writes after B died");
    eprintln!("failover after kill -9 of B: {failover:?}");
    assert!(failover <= FAILOVER_LIMIT, "A paused {failover:?}");
    assert_eq!(la.failures, 0, "the surviving site A failed writes");
    c.b = Some(c.spec_b.start());
    c.wait_both_serving(Duration::from_secs(30));
    assert_no_acknowledged_write_lost(&c.b().uri("vol"), 0, &la);
    assert_sites_identical(&c);
}

// DESIGN.md §6: site A (preferred) killed -> B wins after its preference delay.
#[test]
fn site_a_killed_b_survives() {
    if !have_tool("qemu-img", "site_a_killed_b_survives") {
        return;
    }
    let mut c = Cluster::start();
    let until = Instant::now() + Duration::from_secs(6);
    let ub = c.b().uri("vol");
    let wb = std::thread::spawn(move || writer(ub, WRITER_BLOCKS, 1 << 40, until));
    std::thread::sleep(Duration::from_millis(1000));
    let cut = Instant::now();
    c.a.take().expect("a").kill9();
    let lb = wb.join().expect("writer b");
    let failover = first_ack_after(&lb, cut).expect("B acknowledged writes after A died");
    eprintln!("failover after kill -9 of A: {failover:?}");
    assert!(failover <= FAILOVER_LIMIT, "B paused {failover:?}");
    c.a = Some(c.spec_a.start());
    c.wait_both_serving(Duration::from_secs(30));
    assert_no_acknowledged_write_lost(&c.a().uri("vol"), WRITER_BLOCKS, &lb);
    assert_sites_identical(&c);
}

// DESIGN.md §6 "witness lost alone -> nothing changes": A and B are a majority, leases keep
// being renewed by each other, and both keep serving without a pause.
#[test]
fn witness_killed_nothing_changes() {
    if !have_tool("qemu-img", "witness_killed_nothing_changes") {
        return;
    }
    let mut c = Cluster::start();
    c.witness.take().expect("witness").kill9();
    let until = Instant::now() + Duration::from_secs(3);
    let (ua, ub) = (c.a().uri("vol"), c.b().uri("vol"));
    let wa = std::thread::spawn(move || writer(ua, 0, 0, until));
    let wb = std::thread::spawn(move || writer(ub, WRITER_BLOCKS, 1 << 40, until));
    let (la, lb) = (wa.join().expect("writer a"), wb.join().expect("writer b"));
    for (name, log) in [("A", &la), ("B", &lb)] {
        assert_eq!(
            log.failures, 0,
            "site {name} failed writes with the witness gone"
        );
        assert!(
            log.acked.len() > 20,
            "site {name} acknowledged only {} writes",
            log.acked.len()
        );
    }
    assert_no_acknowledged_write_lost(&c.b().uri("vol"), 0, &la);
    assert_no_acknowledged_write_lost(&c.a().uri("vol"), WRITER_BLOCKS, &lb);
    assert_sites_identical(&c);
}

// DESIGN.md §6: the survivor killed after a detach -> the detached site is never crowned;
// it serves nothing even once the link is back, until an operator acts.
#[test]
fn detached_site_is_never_crowned_when_the_survivor_dies() {
    if !have_tool(
        "qemu-img",
        "detached_site_is_never_crowned_when_the_survivor_dies",
    ) {
        return;
    }
    let mut c = Cluster::start();
    let ub = c.b().uri("vol");
    c.link.partition(Direction::Both);
    // A detaches B and serves alone (the survivor's wait is well under 3 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe_read(&ub).is_ok() {
        assert!(Instant::now() < deadline, "B kept serving after the cut");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    c.a.take().expect("a").kill9();
    c.link.heal();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(
            probe_read(&ub).is_err(),
            "the detached site B served after the survivor died"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let lb = writer(
        ub,
        WRITER_BLOCKS,
        1 << 40,
        Instant::now() + Duration::from_secs(1),
    );
    assert!(
        lb.acked.is_empty(),
        "the detached site B acknowledged a write"
    );
}

// A flapping link: cut and healed every few hundred ms while both sites write. Whatever the
// control plane decides in between, no acknowledged write is lost and the sites converge.
#[test]
fn flapping_link_loses_nothing_and_converges() {
    if !have_tool("qemu-img", "flapping_link_loses_nothing_and_converges") {
        return;
    }
    let c = Cluster::start();
    let until = Instant::now() + Duration::from_secs(6);
    let (ua, ub) = (c.a().uri("vol"), c.b().uri("vol"));
    let wa = std::thread::spawn(move || writer(ua, 0, 0, until));
    let wb = std::thread::spawn(move || writer(ub, WRITER_BLOCKS, 1 << 40, until));
    // Bounded: 10 flaps of 200-500 ms.
    for i in 0..10u64 {
        c.link.partition(Direction::Both);
        std::thread::sleep(Duration::from_millis(200 + 30 * i));
        c.link.heal();
        std::thread::sleep(Duration::from_millis(250));
    }
    let (la, lb) = (wa.join().expect("writer a"), wb.join().expect("writer b"));
    assert!(!la.acked.is_empty(), "A acknowledged nothing");
    c.wait_both_serving(Duration::from_secs(30));
    for uri in [c.a().uri("vol"), c.b().uri("vol")] {
        assert_no_acknowledged_write_lost(&uri, 0, &la);
        assert_no_acknowledged_write_lost(&uri, WRITER_BLOCKS, &lb);
    }
    assert_sites_identical(&c);
}

// DESIGN.md §4 "Peer loss": `stretch detach --survivor b` lets B carry on alone while both
// are up, fencing A: A serves nothing, B acknowledges alone, then the survivor brings A back
// through resync and rejoin, with every write B acknowledged alone present at A.
#[test]
fn operator_detach_then_resync_and_rejoin() {
    if !have_tool("qemu-img", "operator_detach_then_resync_and_rejoin") {
        return;
    }
    let c = Cluster::start();
    let admin_b = format!(
        "http://{}",
        c.b().admin.clone().expect("site b prints its admin API")
    );
    // A refused detach is reported, not swallowed.
    let bad = common::stretch(&["detach", "--survivor", "c", "--site", &admin_b]);
    assert!(
        !bad.status.success(),
        "a survivor other than a|b was accepted"
    );
    // Partition first, so B's solo writes must reach A by resync, not by live replication.
    c.link.partition(Direction::Both);
    let out = common::stretch(&["detach", "--survivor", "b", "--site", &admin_b]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // The preferred site A may have detached B first (the link is cut): then the map refuses
    // this detach (B is no longer in sync) and the test has nothing to show.
    assert!(out.status.success(), "stretch detach failed: {text}");
    assert!(
        text.contains("detached: site b"),
        "unexpected output: {text}"
    );
    let ub = c.b().uri("vol");
    let lb = writer(
        ub,
        WRITER_BLOCKS,
        1 << 40,
        Instant::now() + Duration::from_secs(2),
    );
    assert!(
        !lb.acked.is_empty(),
        "B acknowledged nothing alone after the detach"
    );
    assert!(
        probe_read(&c.a().uri("vol")).is_err(),
        "the detached site A served a read"
    );
    c.link.heal();
    c.wait_both_serving(Duration::from_secs(30));
    assert_no_acknowledged_write_lost(&c.a().uri("vol"), WRITER_BLOCKS, &lb);
    assert_sites_identical(&c);
}
