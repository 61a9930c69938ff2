//! The failure matrix of DESIGN.md §6 with real processes: a `stretch witness` on 127.0.0.3,
//! two `stretch site` daemons on 127.0.0.1 and 127.0.0.2 joined through the link emulator,
//! writers at both sites recording every acknowledged write, and `kill -9`.
//!
//! As in a real stretched cluster, everything between the two sites crosses "the link": the
//! replication connection and the sites' Raft traffic to each other (`--raft-peer`, through
//! two more emulated proxies), while the witness reaches each site directly. So cutting the
//! link with the witness gone leaves no majority anywhere (the double failure).
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
        let bootstrap = [
            "--bootstrap",
            "--site-a",
            &a.to_string(),
            "--site-b",
            &b.to_string(),
        ]
        .map(String::from);
        Witness::spawn(dir, listen, &bootstrap)
    }

    fn spawn(dir: &Path, listen: SocketAddr, extra: &[String]) -> Witness {
        let mut child = Command::new(stretch_bin())
            .arg("witness")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", &listen.to_string()])
            .args(extra)
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
    /// The replication link: B dials A through it (`Up` is B -> A).
    link: LinkEmulator,
    /// The sites' Raft routes to each other: A dials B through `[0]`, B dials A through `[1]`.
    raft_links: [LinkEmulator; 2],
    /// The sites' own Raft addresses (the witness dials these directly).
    raft: [SocketAddr; 2],
    spec_a: SiteSpec,
    spec_b: SiteSpec,
    _dirs: [tempfile::TempDir; 3],
}

fn site_args(
    site: &str,
    repl: (&str, SocketAddr),
    raft: SocketAddr,
    raft_peer: SocketAddr,
    nbd_ip: &str,
) -> Vec<String> {
    [
        "--raft-peer",
        &raft_peer.to_string(),
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
        let raft_links = [raft_b, raft_a].map(|to| {
            let l = LinkEmulator::start("127.0.0.1:0", &to.to_string()).expect("emulator");
            l.set_rtt(Duration::from_millis(5));
            l
        });
        let witness = Witness::start(dirs[2].path(), raft_w, raft_a, raft_b);
        let spec_a = SiteSpec {
            dir: dirs[0].path().to_path_buf(),
            args: site_args(
                "a",
                ("--repl-listen", repl_a),
                raft_a,
                raft_links[0].listen_addr(),
                "127.0.0.1",
            ),
        };
        let spec_b = SiteSpec {
            dir: dirs[1].path().to_path_buf(),
            args: site_args(
                "b",
                ("--peer", link.listen_addr()),
                raft_b,
                raft_links[1].listen_addr(),
                "127.0.0.2",
            ),
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
            raft_links,
            raft: [raft_a, raft_b],
            spec_a,
            spec_b,
            _dirs: dirs,
        };
        c.wait_both_serving(Duration::from_secs(30));
        c
    }

    /// Cuts the link between the sites in `direction` (`Up` is B -> A): replication and the
    /// sites' Raft traffic to each other alike.
    fn partition(&self, direction: Direction) {
        let flipped = match direction {
            Direction::Up => Direction::Down,
            Direction::Down => Direction::Up,
            Direction::Both => Direction::Both,
        };
        self.link.partition(direction);
        // A is the client of raft_links[0], so B -> A is its downstream.
        self.raft_links[0].partition(flipped);
        self.raft_links[1].partition(direction);
    }

    fn heal(&self) {
        self.link.heal();
        for l in &self.raft_links {
            l.heal();
        }
    }

    fn admin(&self, site: &Site) -> String {
        format!(
            "http://{}",
            site.admin.clone().expect("the site prints its admin API")
        )
    }

    fn a(&self) -> &Site {
        self.a.as_ref().expect("site a runs")
    }

    fn b(&self) -> &Site {
        self.b.as_ref().expect("site b runs")
    }

    /// Both sites are in sync and serve reads (holding leases). Reads alone do not say it:
    /// a catching-up site serves them too.
    fn wait_both_serving(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let (ua, ub) = (self.a().uri("vol"), self.b().uri("vol"));
        let in_sync = |site: &Site| {
            let out = common::stretch(&["status", "--site", &self.admin(site), "--json"]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s[0]["replication"]["role"] == "in-sync")
        };
        while Instant::now() < deadline {
            if in_sync(self.a())
                && in_sync(self.b())
                && probe_read(&ua).is_ok()
                && probe_read(&ub).is_ok()
            {
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
    c.partition(direction);
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
    c.heal();
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
    c.partition(Direction::Both);
    // A detaches B and serves alone (the survivor's wait is well under 3 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe_read(&ub).is_ok() {
        assert!(Instant::now() < deadline, "B kept serving after the cut");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    c.a.take().expect("a").kill9();
    c.heal();
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
        c.partition(Direction::Both);
        std::thread::sleep(Duration::from_millis(200 + 30 * i));
        c.heal();
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
    c.partition(Direction::Both);
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
    c.heal();
    c.wait_both_serving(Duration::from_secs(30));
    assert_no_acknowledged_write_lost(&c.a().uri("vol"), WRITER_BLOCKS, &lb);
    assert_sites_identical(&c);
}

// DESIGN.md §4 "Resync": the catching-up site serves reads while the resync runs — a block
// the resync has not reached yet (the survivor copies it first, on demand) and one already
// copied — with the survivor's data, and still fails writes. The survivor writes the whole
// volume alone, and the link's RTT is raised to 400 ms, so the resync takes seconds: its
// copies go in block order with a bounded number in flight per round trip.
#[test]
fn catching_up_site_serves_reads_with_the_survivors_data_during_resync() {
    if !have_tool(
        "qemu-img",
        "catching_up_site_serves_reads_with_the_survivors_data_during_resync",
    ) {
        return;
    }
    let c = Cluster::start();
    let (ua, ub) = (c.a().uri("vol"), c.b().uri("vol"));
    common::qemu_io(&ua, &["write -P 0x11 0 16M"]);
    c.partition(Direction::Both);
    // A is preferred: it detaches B, then acknowledges alone.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !qemu_io_ok(&ua, "write -P 0xab 0 16M") {
        assert!(Instant::now() < deadline, "A never acknowledged alone");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The partition held A's writes from before the detach on the old connection; drop them
    // with it, so the resync starts on a fresh one. 400 ms RTT: still inside the 600 ms read
    // lease the survivor grants with each heartbeat echo.
    c.link.reset_connections();
    c.link.set_rtt(Duration::from_millis(400));
    c.heal();
    let healed = Instant::now();
    // The last block is the one the resync reaches last. B serves it once it has the
    // survivor's copy plan and a read lease, by having it copied first.
    let last = 16 * 1024 * 1024 - BLOCK;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !qemu_io_ok(&ub, &format!("read -P 0xab {last} 4k")) {
        assert!(
            Instant::now() < deadline,
            "the catching-up site B never served a read"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Block 0 went in the first round of copies: served from B's own disk.
    common::qemu_io(&ub, &["read -P 0xab 0 4k"]);
    let admin_b = c.admin(c.b());
    let left = status_counter(&admin_b, &["replication", "dirty_blocks"]);
    let pulled = status_counter(&admin_b, &["replication", "catchup_reads_pulled"]);
    let local = status_counter(&admin_b, &["replication", "catchup_reads_local"]);
    eprintln!(
        "B served reads {:?} after the heal with {left} blocks still to copy \
         ({pulled} pulled first, {local} local)",
        healed.elapsed()
    );
    assert!(pulled >= 1, "no read waited for a block copied first");
    assert!(local >= 1, "no read was served from a resynced block");
    // Writes at the catching-up site still fail.
    assert!(
        !qemu_io_ok(&ub, "write -P 0xcd 4096 4k"),
        "the catching-up site B acknowledged a write"
    );
    c.link.set_rtt(Duration::from_millis(5));
    c.wait_both_serving(Duration::from_secs(60));
    common::qemu_io(&ub, &["read -P 0xab 0 16M"]);
    assert_sites_identical(&c);
}

/// `qemu-io -f raw URI -c CMD` succeeded and verified its pattern, if any.
fn qemu_io_ok(uri: &str, cmd: &str) -> bool {
    let out = common::run(Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]));
    out.status.success() && !text_of(&out).contains("failed")
}

fn text_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

// DESIGN.md §6 "Link and witness lost together -> nothing can commit; both sites stall", and
// "force-survivor SITE --accept-data-loss" (the double failure): the witness is killed, the
// link (replication and the sites' Raft traffic) is cut, and neither site acknowledges a
// write. `stretch force-survivor a` first only reports; with --accept-data-loss A becomes a
// one-voter group of generation 1 and serves alone. B and a fresh witness come back under
// generation 1's node ids (prepare-rejoin, readmit), B takes a full resync from A, and the
// sites end identical with no write lost that either acknowledged.
#[test]
fn witness_and_link_lost_both_stall_then_force_survivor_recovers() {
    if !have_tool(
        "qemu-img",
        "witness_and_link_lost_both_stall_then_force_survivor_recovers",
    ) {
        return;
    }
    let mut c = Cluster::start();
    let (ua, ub) = (c.a().uri("vol"), c.b().uri("vol"));
    let (admin_a, admin_b) = (c.admin(c.a()), c.admin(c.b()));
    // While the group can commit, force-survivor is refused: a detach decides safely.
    let healthy = common::stretch(&[
        "force-survivor",
        "a",
        "--site",
        &admin_a,
        "--accept-data-loss",
    ]);
    assert!(
        !healthy.status.success(),
        "force-survivor acted on a healthy group"
    );
    assert!(
        text_of(&healthy).contains("can commit"),
        "{}",
        text_of(&healthy)
    );

    let start = Instant::now();
    let until = start + Duration::from_secs(6);
    let (wa, wb) = {
        let (ua, ub) = (ua.clone(), ub.clone());
        (
            std::thread::spawn(move || writer(ua, 0, 0, until)),
            std::thread::spawn(move || writer(ub, WRITER_BLOCKS, 1 << 40, until)),
        )
    };
    std::thread::sleep(Duration::from_millis(1000));
    c.witness.take().expect("witness").kill9();
    let cut = Instant::now();
    c.partition(Direction::Both);
    // Bounded stall window: neither site may acknowledge anything (there is no majority to
    // detach the other, and no lease is renewed).
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        probe_read(&ua).is_err(),
        "A served a read with no majority and no lease"
    );
    assert!(
        probe_read(&ub).is_err(),
        "B served a read with no majority and no lease"
    );
    let dry = common::stretch(&["force-survivor", "a", "--site", &admin_a]);
    let dry_text = text_of(&dry);
    assert!(
        !dry.status.success(),
        "force-survivor acted without --accept-data-loss"
    );
    assert!(dry_text.contains("last known epoch 0."), "{dry_text}");
    assert!(dry_text.contains("may be lost"), "{dry_text}");
    assert!(dry_text.contains("nothing done"), "{dry_text}");
    // Naming one site at the other's admin API is refused.
    let wrong = common::stretch(&[
        "force-survivor",
        "a",
        "--site",
        &admin_b,
        "--accept-data-loss",
    ]);
    assert!(
        !wrong.status.success(),
        "force-survivor crowned the site it was not run at"
    );
    let forced_at = Instant::now();
    let forced = common::stretch(&[
        "force-survivor",
        "a",
        "--site",
        &admin_a,
        "--accept-data-loss",
    ]);
    assert!(
        forced.status.success(),
        "force-survivor failed: {}",
        text_of(&forced)
    );
    assert!(
        text_of(&forced).contains("generation 1"),
        "{}",
        text_of(&forced)
    );
    let (la, lb) = (wa.join().expect("writer a"), wb.join().expect("writer b"));
    for (name, log) in [("A", &la), ("B", &lb)] {
        for (lba, seq, at) in &log.acked {
            assert!(
                *at < cut + IN_FLIGHT_SLACK || *at >= forced_at,
                "{name} acknowledged write {seq} (block {lba}) {:?} after the cut, during the stall",
                at.duration_since(cut)
            );
        }
    }
    assert!(
        lb.acked
            .iter()
            .all(|(_, _, at)| *at < cut + IN_FLIGHT_SLACK),
        "B acknowledged a write after the cut"
    );
    // A serves alone in generation 1 (after its lease wait).
    let la2 = writer(
        ua.clone(),
        0,
        1 << 20,
        Instant::now() + Duration::from_secs(3),
    );
    assert!(
        la2.acked.len() > 10,
        "A acknowledged only {} writes alone",
        la2.acked.len()
    );
    let out = common::stretch(&["status", "--site", &admin_a, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let control = &status[0]["control"];
    assert_eq!(control["epoch"], "1.1", "status at A: {status}");
    assert_eq!(
        control["raft_node"], 257,
        "A runs under generation 1's id: {status}"
    );
    assert_eq!(
        control["site_states"][1], "detached",
        "status at A: {status}"
    );
    // A crash of A keeps it in generation 1: it restarts as the one voter, still survivor.
    c.a.take().expect("a").kill9();
    c.a = Some(c.spec_a.start());
    let (ua, admin_a) = (c.a().uri("vol"), c.admin(c.a()));
    let la3 = writer(
        ua.clone(),
        0,
        2 << 20,
        Instant::now() + Duration::from_secs(3),
    );
    assert!(
        !la3.acked.is_empty(),
        "A acknowledged nothing alone after its restart"
    );
    let out = common::stretch(&["status", "--site", &admin_a, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(
        status[0]["control"]["raft_node"], 257,
        "A after restart: {status}"
    );
    assert_eq!(
        status[0]["control"]["epoch"], "1.1",
        "A after restart: {status}"
    );

    // Bring the others back under generation 1 (docs/operations.md, "After force-survivor").
    c.b.take().expect("b").kill9();
    let prep = common::stretch(&[
        "prepare-rejoin",
        "--data-dir",
        c.spec_b.dir.to_str().expect("utf-8"),
        "--site",
        "b",
        "--volume",
        "vol",
        "--generation",
        "1",
    ]);
    assert!(prep.status.success(), "prepare-rejoin: {}", text_of(&prep));
    c.heal();
    let w_dir = tempfile::tempdir().unwrap();
    let w_addr = free_addr([127, 0, 0, 3]);
    let _w = Witness::spawn(w_dir.path(), w_addr, &["--generation".into(), "1".into()]);
    let raft_b = c.raft[1];
    let b = std::thread::scope(|s| {
        let b = s.spawn(|| c.spec_b.start());
        let out = common::stretch(&[
            "readmit",
            "--site",
            &admin_a,
            "--witness",
            &w_addr.to_string(),
            "--peer",
            &raft_b.to_string(),
        ]);
        assert!(out.status.success(), "readmit: {}", text_of(&out));
        b.join().expect("site b restarts")
    });
    c.b = Some(b);
    c.wait_both_serving(Duration::from_secs(60));
    let ub = c.b().uri("vol");
    // A's three writers wrote the same blocks one after the other (the seqs of each above
    // the one before): one log of all.
    let mut la_all = la;
    for later in [la2, la3] {
        la_all.acked.extend(later.acked);
        la_all.sent.extend(later.sent);
        la_all.attempted.extend(later.attempted);
    }
    for uri in [&ua, &ub] {
        assert_no_acknowledged_write_lost(uri, 0, &la_all);
        assert_no_acknowledged_write_lost(uri, WRITER_BLOCKS, &lb);
    }
    assert_sites_identical(&c);
    let verify = common::stretch(&[
        "verify",
        "vol",
        "--site",
        &admin_a,
        "--site",
        &c.admin(c.b()),
    ]);
    assert!(verify.status.success(), "verify: {}", text_of(&verify));
    // The full resync copied every block to B, not only the dirty ones (a copy of a block
    // never written is sent too; it changes nothing at B, whose blocks were reset first).
    let out = common::stretch(&["status", "--site", &admin_a, "--json"]);
    let status_a: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let blocks = status_a[0]["volume"]["blocks"].as_u64().expect("blocks");
    let sent = status_a[0]["driver"]["replica"]["resync_blocks_sent"]
        .as_u64()
        .expect("resync counter");
    assert!(
        sent >= blocks,
        "A sent {sent} resync copies for {blocks} blocks"
    );
    let out = common::stretch(&["status", "--site", &c.admin(c.b()), "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(
        status[0]["control"]["raft_node"], 258,
        "B rejoined under a new id: {status}"
    );
}

/// A counter from a site's `GET /v1/status` (`path` of JSON keys).
fn status_counter(admin: &str, path: &[&str]) -> u64 {
    let out = common::stretch(&["status", "--site", admin, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let mut v = &status[0];
    for key in path {
        v = &v[*key];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("no counter {path:?} in {status}"))
}

// DESIGN.md §4 "Fencing" with real processes: the link is cut one way, B -> A, and the
// emulator holds B's bytes instead of dropping them. A detaches B; B learns it lost and fails
// its writes with EIO. Then the link heals inside the same TCP session (before either end's
// idle timeout), and the write frames B sent in the old epoch reach A after the detach. A
// refuses every one of them as fenced (never applies them), the link carries on, B resyncs
// and rejoins, and the sites end identical with every acknowledged write in place.
//
// What this does not show: frames arriving after the *rejoin*. The emulator holds bytes per
// connection, in order, and the resync request that leads to the rejoin travels behind the
// held frames on the same connection; the replicator's simulator covers the later delivery.
#[test]
fn loser_frames_delivered_after_detach_are_fenced() {
    if !have_tool("qemu-img", "loser_frames_delivered_after_detach_are_fenced") {
        return;
    }
    let c = Cluster::start();
    let (ua, ub) = (c.a().uri("vol"), c.b().uri("vol"));
    let (admin_a, admin_b) = (c.admin(c.a()), c.admin(c.b()));
    let fenced_path = ["driver", "replica", "mutations_fenced"];
    assert_eq!(status_counter(&admin_a, &fenced_path), 0);
    let until = Instant::now() + Duration::from_secs(8);
    let wa = {
        let ua = ua.clone();
        std::thread::spawn(move || writer(ua, 0, 0, until))
    };
    // Four writers at B, each with one write in flight at any time, on blocks of their own.
    let wbs: Vec<_> = (1..=4u64)
        .map(|i| {
            let ub = ub.clone();
            std::thread::spawn(move || writer(ub, i * WRITER_BLOCKS, i << 40, until))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let cut = Instant::now();
    // Only the replication link, only B -> A: B's frames are held; Raft is untouched, so B
    // learns the detach at once.
    c.link.partition(Direction::Up);
    // Heal once A serves alone, but well inside the link's 3 s idle timeout, so the held
    // bytes are delivered on the same connection.
    let deadline = cut + Duration::from_millis(2500);
    loop {
        let out = common::stretch(&["status", "--site", &admin_a, "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        if status[0]["replication"]["role"] == "survivor" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A did not detach B within 2.5 s: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = common::stretch(&["status", "--site", &admin_b, "--json"]);
    let status_b: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status_b[0]["replication"]["role"], "loser", "B: {status_b}");
    let sessions = status_counter(&admin_a, &["link", "sessions"]);
    c.link.heal();
    let healed = Instant::now();
    let fenced_deadline = Instant::now() + Duration::from_secs(5);
    let fenced = loop {
        let n = status_counter(&admin_a, &fenced_path);
        if n > 0 {
            break n;
        }
        assert!(
            Instant::now() < fenced_deadline,
            "B's held frames never reached A, or A applied them"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("A refused {fenced} write frames B sent before it was detached");
    assert_eq!(
        status_counter(&admin_a, &["link", "sessions"]),
        sessions,
        "the held frames were to arrive on the session they were sent on"
    );
    let la = wa.join().expect("writer a");
    let lbs: Vec<WriteLog> = wbs
        .into_iter()
        .map(|w| w.join().expect("writer b"))
        .collect();
    for lb in &lbs {
        for (lba, seq, at) in &lb.acked {
            // Detached, B acknowledges nothing until it has resynced and rejoined after the
            // heal.
            assert!(
                *at < cut + IN_FLIGHT_SLACK || *at > healed,
                "B acknowledged write {seq} (block {lba}) {:?} after the cut, while detached",
                at.duration_since(cut)
            );
        }
    }
    c.wait_both_serving(Duration::from_secs(30));
    for uri in [&ua, &ub] {
        assert_no_acknowledged_write_lost(uri, 0, &la);
        for (i, lb) in lbs.iter().enumerate() {
            assert_no_acknowledged_write_lost(uri, (i as u64 + 1) * WRITER_BLOCKS, lb);
        }
    }
    assert_sites_identical(&c);
    // The link recovered: B acknowledges writes again, in sync.
    let after = writer(
        ub,
        5 * WRITER_BLOCKS,
        9 << 40,
        Instant::now() + Duration::from_secs(1),
    );
    assert!(
        !after.acked.is_empty(),
        "B acknowledged nothing after the rejoin"
    );
    assert_eq!(after.failures, 0, "B failed writes after the rejoin");
}
