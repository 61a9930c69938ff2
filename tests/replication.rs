//! Two `stretch site` processes, one on 127.0.0.1 and one on 127.0.0.2, joined through the
//! link emulator, driven by real NBD clients (qemu-io, qemu-img). DESIGN.md §4, §5 (`sync`)
//! and the invariants of §7.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{have_tool, Site};
use stretch_bench::link::LinkEmulator;

const CLUSTER_ID: &str = "7";
/// Every client command below must finish within this.
const CLIENT_LIMIT: Duration = Duration::from_secs(90);

/// Runs a client to completion within `CLIENT_LIMIT` (killed and failed beyond), returning
/// its status and stdout+stderr.
fn run_bounded(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    wait_bounded(&mut child, &format!("{cmd:?}"));
    let out = child
        .wait_with_output()
        .expect("collect the client's output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// Waits for `child` to exit within `CLIENT_LIMIT`; kills it and fails the test beyond.
fn wait_bounded(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + CLIENT_LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("poll the client") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {CLIENT_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-io -f raw URI -c CMD...`, asserting success and no failed pattern check, bounded in
/// time.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let (status, out) = run_bounded(&mut cmd);
    assert!(status.success(), "qemu-io {cmds:?} failed: {out}");
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?} reported a failure: {out}"
    );
    out
}

/// Site A listens for the link; site B dials it through `link` (the emulator).
fn site_a(dir: &Path) -> Site {
    common::pair_site_a(dir, CLUSTER_ID, None)
}

fn site_b(dir: &Path, link: &LinkEmulator) -> Site {
    common::pair_site_b(dir, CLUSTER_ID, &link.listen_addr().to_string())
}

struct Cluster {
    a: Site,
    b: Site,
    link: LinkEmulator,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn cluster(rtt: Duration) -> Cluster {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = site_a(da.path());
    let repl = a.repl.clone().expect("site a prints its repl:// address");
    let link = LinkEmulator::start("127.0.0.1:0", &repl).expect("start the link emulator");
    link.set_rtt(rtt);
    let b = site_b(db.path(), &link);
    Cluster {
        a,
        b,
        link,
        _dirs: (da, db),
    }
}

/// `qemu-img compare` of the two sites over NBD: exit 0 means identical content.
fn assert_sites_identical(a: &str, b: &str) {
    let (status, out) =
        run_bounded(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]));
    assert!(status.success(), "sites differ: {out}");
}

fn data_file(site: &Site) -> std::path::PathBuf {
    site.data_dir.join("vol.img")
}

// DESIGN.md §5 `sync`: a write is acknowledged once applied at both sites, so a read at B
// right after qemu-io's write at A returns its pattern (§7 invariant 4).
#[test]
fn write_at_a_reads_back_at_b() {
    if !have_tool("qemu-io", "write_at_a_reads_back_at_b") {
        return;
    }
    let c = cluster(Duration::from_millis(2));
    let (ua, ub) = (c.a.uri("vol"), c.b.uri("vol"));
    assert!(
        ub.starts_with("nbd://127.0.0.2:"),
        "site b serves on 127.0.0.2: {ub}"
    );
    qemu_io(&ua, &["write -P 0xab 0 1M", "write -P 0xcd 3M 64k"]);
    qemu_io(
        &ub,
        &[
            "read -P 0xab 0 1M",
            "read -P 0xcd 3M 64k",
            "read -P 0 1M 2M",
        ],
    );
    // And the other way round.
    qemu_io(&ub, &["write -P 0x5a 8M 256k"]);
    qemu_io(&ua, &["read -P 0x5a 8M 256k"]);
    assert!(
        c.link.proxy().connection_count() >= 1,
        "traffic went through the emulator"
    );
    assert_sites_identical(&ua, &ub);
}

// DESIGN.md §4 "Apply rule": overlapping concurrent writes from both sites end the same at
// both (§7 invariant 1); checked over NBD and then on the data files at rest.
#[test]
fn overlapping_concurrent_writes_converge() {
    if !have_tool("qemu-io", "overlapping_concurrent_writes_converge") {
        return;
    }
    let c = cluster(Duration::from_millis(1));
    let (ua, ub) = (c.a.uri("vol"), c.b.uri("vol"));
    let writer = |uri: &str, seed: u8| {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", uri]);
        // Each site writes the same 2 MiB window many times, at offsets that overlap the
        // other's, with aio so several writes are in flight at once.
        for round in 0..24u32 {
            let offset_k = (round * 96 + u32::from(seed) * 32) % 1536;
            cmd.args([
                "-c",
                &format!(
                    "aio_write -P {} {offset_k}k 512k",
                    seed.wrapping_add(round as u8)
                ),
            ]);
        }
        cmd.args(["-c", "aio_flush"]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().expect("spawn qemu-io")
    };
    let wa = writer(&ua, 0x10);
    let wb = writer(&ub, 0x80);
    for (name, mut child) in [("a", wa), ("b", wb)] {
        wait_bounded(&mut child, &format!("the writer at {name}"));
        let out = child.wait_with_output().expect("collect qemu-io's output");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("failed") && !text.contains("error"),
            "writer at {name} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every write was acknowledged, so each is applied or superseded at both sites.
    assert_sites_identical(&ua, &ub);
    let (a, b) = (c.a, c.b);
    let (fa, fb) = (data_file(&a), data_file(&b));
    assert!(a.stop().success(), "site a exits cleanly");
    assert!(b.stop().success(), "site b exits cleanly");
    let (da, db) = (std::fs::read(&fa).unwrap(), std::fs::read(&fb).unwrap());
    assert_eq!(da.len(), db.len());
    let first_diff = da.iter().zip(&db).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "data files differ at rest");
    assert!(
        da[..2 << 20].iter().any(|&x| x != 0),
        "the writes reached the files"
    );
}

// DESIGN.md §4 "Resync in the same epoch" and §7 invariant 2: site B is killed with SIGKILL
// in the middle of A's write stream; A's writes wait for it (sync never acknowledges alone
// without a detach), B restarts, the sites settle, and every acknowledged write is present
// at both.
#[test]
fn kill9_of_the_peer_mid_stream_loses_no_acknowledged_write() {
    if !have_tool(
        "qemu-io",
        "kill9_of_the_peer_mid_stream_loses_no_acknowledged_write",
    ) {
        return;
    }
    let c = cluster(Duration::from_millis(1));
    let (ua, ub) = (c.a.uri("vol"), c.b.uri("vol"));
    let writes = 48u32;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &ua]);
    for i in 0..writes {
        cmd.args(["-c", &format!("write -P {} {}k 128k", 1 + i % 200, i * 128)]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu-io");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Kill B once a few writes have been acknowledged: mid-stream by construction.
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked < 8 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("wrote ") => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("qemu-io made no progress before the kill: {e}"),
        }
    }
    let b_dir = c.b.data_dir.clone();
    c.b.kill9();
    let b = site_b(&b_dir, &c.link);
    let ub2 = b.uri("vol");
    assert_ne!(ub, ub2, "the restarted site listens on a new port");
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < writes {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("wrote ") => acked += 1,
            Ok(line) => assert!(!line.contains("failed"), "qemu-io: {line}"),
            Err(e) => panic!("qemu-io stalled after the restart at {acked}/{writes}: {e}"),
        }
    }
    assert!(wait_bounded(&mut child, "the write stream").success());
    // Every acknowledged write, read back at both sites.
    for uri in [&ua, &ub2] {
        let reads: Vec<String> = (0..writes)
            .map(|i| format!("read -P {} {}k 128k", 1 + i % 200, i * 128))
            .collect();
        let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
        qemu_io(uri, &reads);
    }
    assert_sites_identical(&ua, &ub2);
}

// DESIGN.md §4 "After a crash, stamps of blocks in the activity log are untrusted and are
// settled from the peer", §7 invariant 2. Acknowledgements do not wait for a flush, so
// killing the site that took the writes loses their block records there (an unflushed
// block reads as a checksum error after the restart). The restarted site must take every
// acknowledged write back from its peer: read back at both sites afterwards.
#[test]
fn kill9_of_the_writing_site_settles_its_acknowledged_writes_from_the_peer() {
    if !have_tool(
        "qemu-io",
        "kill9_of_the_writing_site_settles_its_acknowledged_writes_from_the_peer",
    ) || !have_tool(
        "stdbuf",
        "kill9_of_the_writing_site_settles_its_acknowledged_writes_from_the_peer",
    ) {
        return;
    }
    let c = cluster(Duration::from_millis(1));
    let (ua, ub) = (c.a.uri("vol"), c.b.uri("vol"));
    let writes = 64u32;
    // First a flushed version of every block (qemu-io flushes when it closes the image), so
    // that the overwrites below leave records on disk that no longer match the data.
    qemu_io(&ub, &[&format!("write -P 0xee 0 {}k", writes * 64)]);
    // Line-buffered, so each "wrote" line arrives as its write completes (a pipe would hold
    // them until qemu-io exits — after its closing flush).
    let mut cmd = Command::new("stdbuf");
    // Writeback caching: qemu-io's default, writethrough, flushes after every write.
    cmd.args(["-oL", "qemu-io", "-t", "writeback", "-f", "raw", &ub]);
    for i in 0..writes {
        cmd.args(["-c", &format!("write -P {} {}k 64k", 1 + i % 200, i * 64)]);
    }
    // The writer must still be connected when B dies: qemu-io flushes when it closes.
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-io");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = 0u32;
    while acked < 16 {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("wrote ") => acked += 1,
            Some(Ok(_)) => {}
            other => panic!("qemu-io stopped before the kill: {other:?}"),
        }
    }
    let b_dir = c.b.data_dir.clone();
    c.b.kill9();
    // Writes acknowledged before the kill may be more than counted; those are checked.
    let _ = wait_bounded(&mut child, "the writer at b");
    let b = site_b(&b_dir, &c.link);
    let ub2 = b.uri("vol");
    let reads: Vec<String> = (0..acked)
        .map(|i| format!("read -P {} {}k 64k", 1 + i % 200, i * 64))
        .collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    for uri in [&ub2, &ua] {
        qemu_io(uri, &reads);
    }
    // And a FLUSH through the restarted site completes (it waits until B has settled).
    qemu_io(&ub2, &["write -P 0x77 4M 64k", "flush"]);
    assert_sites_identical(&ua, &ub2);
}

// DESIGN.md §5 `sync` and §7 invariant 3: with the link partitioned, a write at A is not
// acknowledged (no detach has been committed, so A may not acknowledge alone); once the link
// heals, the sessions come back, the write completes and B has it.
#[test]
fn partitioned_write_waits_for_the_peer_and_completes_after_heal() {
    if !have_tool(
        "qemu-io",
        "partitioned_write_waits_for_the_peer_and_completes_after_heal",
    ) {
        return;
    }
    let c = cluster(Duration::from_millis(1));
    let (ua, ub) = (c.a.uri("vol"), c.b.uri("vol"));
    qemu_io(&ua, &["write -P 0x11 0 64k"]);
    c.link.partition(stretch_bench::link::Direction::Both);
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw", &ua, "-c", "write -P 0x22 1M 64k"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-io");
    // A negative property needs an observation window: for 1.5 s, while nothing passes the
    // link, the write must stay unacknowledged.
    let window_end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < window_end {
        assert!(
            writer.try_wait().expect("poll qemu-io").is_none(),
            "a write was acknowledged while the peer was unreachable"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.link.heal();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = writer.try_wait().expect("poll qemu-io") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the write did not complete after heal"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the write failed after heal");
    qemu_io(&ub, &["read -P 0x11 0 64k", "read -P 0x22 1M 64k"]);
    assert_sites_identical(&ua, &ub);
}

// ----- a detached survivor and a damaged block (DESIGN.md §4 "Repair", §7 invariant 6) -----

/// A `stretch witness` process, killed on drop.
struct Witness(std::process::Child);

impl Witness {
    fn start(dir: &Path, listen: &str, a: &str, b: &str) -> Witness {
        let mut child = Command::new(common::stretch_bin())
            .arg("witness")
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--listen",
                listen,
                "--bootstrap",
                "--site-a",
                a,
                "--site-b",
                b,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn stretch witness");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
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
        assert!(line.starts_with("raft://"), "witness printed {line:?}");
        Witness(child)
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr(ip: [u8; 4]) -> String {
    let l = std::net::TcpListener::bind((std::net::Ipv4Addr::from(ip), 0)).expect("bind");
    l.local_addr().expect("local addr").to_string()
}

/// `stretch status --json` of one site.
fn site_status(site: &Site) -> serde_json::Value {
    let url = format!("http://{}", site.admin.clone().expect("admin address"));
    let out = common::stretch(&["status", "--site", &url, "--json"]);
    let list: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    list[0].clone()
}

/// Waits (bounded) until `cond` holds for the status of `site`.
fn wait_status(site: &Site, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = site_status(site);
        if cond(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within 60 s: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// A survivor has no in-sync peer to repair from: a read of a block that fails its checksum
// there gets EIO (never the damaged bytes, never a hang), and the block is never copied to
// the catching-up loser (the survivor's copies win unconditionally, so it would spread). The
// resync does not complete while the block is left, and status counts it; once the operator
// writes the block, it is copied and the loser rejoins.
#[test]
fn a_detached_survivor_never_returns_or_copies_a_damaged_block() {
    if !have_tool(
        "qemu-io",
        "a_detached_survivor_never_returns_or_copies_a_damaged_block",
    ) {
        return;
    }
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let (raft_a, raft_b) = (free_addr([127, 0, 0, 1]), free_addr([127, 0, 0, 2]));
    let raft_w = free_addr([127, 0, 0, 3]);
    let repl_a = free_addr([127, 0, 0, 1]);
    let link = LinkEmulator::start("127.0.0.1:0", &repl_a).expect("start the link emulator");
    link.set_rtt(Duration::from_millis(1));
    let _witness = Witness::start(dirs[2].path(), &raft_w, &raft_a, &raft_b);
    let peer = link.listen_addr().to_string();
    let args = |site: &str, repl: [&str; 2], raft: &str, ip: &str| -> Vec<String> {
        let (nbd, admin) = (format!("{ip}:0"), format!("{ip}:0"));
        [
            "--site",
            site,
            "--cluster-id",
            CLUSTER_ID,
            repl[0],
            repl[1],
            "--volume",
            "vol",
            "--size",
            common::PAIR_SIZE,
            "--listen",
            &nbd,
            "--admin",
            &admin,
            "--buffered-io",
            "--request-timeout-ms",
            common::PAIR_REQUEST_TIMEOUT_MS,
            "--raft-listen",
            raft,
            "--preferred",
            "a",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args_a = args("a", ["--repl-listen", &repl_a], &raft_a, "127.0.0.1");
    let args_b = args("b", ["--peer", &peer], &raft_b, "127.0.0.2");
    // Together: a site that waits long for its peer would detach it first.
    let start = |dir: &Path, args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Site::stretch_site(dir, &args)
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| start(dirs[0].path(), &args_a));
        let b = s.spawn(|| start(dirs[1].path(), &args_b));
        (a.join().expect("site a"), b.join().expect("site b"))
    });
    let settled = |s: &serde_json::Value| {
        s["replication"]["role"] == "in-sync"
            && s["replication"]["link_up"] == true
            && s["replication"]["dirty_blocks"] == 0
    };
    wait_status(&a, "a in sync", settled);
    wait_status(&b, "b in sync", settled);
    qemu_io(&a.uri("vol"), &["write -P 0x5a 1M 256k"]);
    wait_status(&b, "b settled", settled);
    wait_status(&a, "a settled", settled);

    link.partition(stretch_bench::link::Direction::Both);
    wait_status(&a, "a survives", |s| s["replication"]["role"] == "survivor");
    // Acknowledged by A alone (and flushed: a survivor is the only copy), then damaged.
    qemu_io(&a.uri("vol"), &["write -P 0x6b 1040k 4k"]);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(dirs[0].path().join("vol.img"))
        .expect("open a's data file");
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(260 * 4096 + 100)).expect("seek");
    std::io::Write::write_all(&mut file, &[0xee; 64]).expect("damage");
    file.sync_all().expect("sync");
    drop(file);
    let (_, out) = run_bounded(Command::new("qemu-io").args([
        "-f",
        "raw",
        &a.uri("vol"),
        "-c",
        "read -P 0x6b 1040k 4k",
    ]));
    assert!(
        out.contains("Input/output error") && !out.contains("read 4096/4096"),
        "the survivor's read of its damaged block must fail with EIO: {out}"
    );
    qemu_io(&a.uri("vol"), &["read -P 0x5a 1044k 16k"]);

    link.heal();
    wait_status(&a, "a withholds the damaged copy", |s| {
        s["replication"]["unrecoverable_blocks"] == 1
            && s["driver"]["replica"]["copies_withheld_unreadable"].as_u64() >= Some(1)
    });
    std::thread::sleep(Duration::from_millis(2000));
    let sb = site_status(&b);
    assert_eq!(sb["replication"]["role"], "loser", "no rejoin: {sb}");
    // B still holds the version from before the detach, never the damaged bytes.
    let b_data = std::fs::read(dirs[1].path().join("vol.img")).expect("read b's data file");
    let block = &b_data[260 * 4096..261 * 4096];
    assert!(
        block.iter().all(|&x| x == 0x5a),
        "the loser's block 260 is not the pre-detach data"
    );

    // The operator restores the block by writing it: it is copied, and B rejoins.
    qemu_io(&a.uri("vol"), &["write -P 0x7c 1040k 4k"]);
    wait_status(&a, "a back in sync", settled);
    wait_status(&b, "b back in sync", settled);
    assert_eq!(site_status(&a)["replication"]["unrecoverable_blocks"], 0);
    qemu_io(
        &b.uri("vol"),
        &["read -P 0x7c 1040k 4k", "read -P 0x5a 1044k 16k"],
    );
}
