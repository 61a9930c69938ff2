//! The site admin API, `stretch verify` and `stretch status`, against two real `stretch site`
//! processes (127.0.0.1 and 127.0.0.2) joined through the link emulator. DESIGN.md §7
//! invariant 1 (in sync and settled, both sites hold the same blocks and stamps), invariant 2
//! (`status` says when durability is single-copy), invariant 7 (bad input never stops a
//! daemon) and §8 (`status`, `verify`).

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{have_tool, qemu_io, stretch_bin, Site};
use serde_json::Value;
use stretch_bench::link::LinkEmulator;

const CLUSTER_ID: &str = "11";
/// Blocks of the volume (common::PAIR_SIZE).
const BLOCKS: u64 = 4096;
/// Every `stretch verify` / `stretch status` run must finish within this.
const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// Site A: configured by file, including `[replication] admin`.
fn site_a(dir: &Path) -> Site {
    common::pair_site_a(dir, CLUSTER_ID, None)
}

/// Site A with its log (stderr) going to `stderr`.
fn site_a_logged(dir: &Path, stderr: Stdio) -> Site {
    common::pair_site_a(dir, CLUSTER_ID, Some(stderr))
}

/// Site B: configured by flags, including `--admin`.
fn site_b(dir: &Path, link: &LinkEmulator) -> Site {
    common::pair_site_b(dir, CLUSTER_ID, &link.listen_addr().to_string())
}

struct Cluster {
    a: Site,
    b: Site,
    link: LinkEmulator,
    dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn cluster() -> Cluster {
    cluster_logged(None)
}

/// A cluster whose site A logs to the file `a_log`, if given.
fn cluster_logged(a_log: Option<&Path>) -> Cluster {
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let a = match a_log {
        Some(path) => site_a_logged(
            da.path(),
            Stdio::from(std::fs::File::create(path).expect("create the log file")),
        ),
        None => site_a(da.path()),
    };
    let repl = a.repl.clone().expect("site a prints its repl:// address");
    let link = LinkEmulator::start("127.0.0.1:0", &repl).expect("start the link emulator");
    link.set_rtt(Duration::from_millis(1));
    let b = site_b(db.path(), &link);
    Cluster {
        a,
        b,
        link,
        dirs: (da, db),
    }
}

fn admin(site: &Site) -> String {
    site.admin
        .clone()
        .expect("stretch site prints `admin http://ADDR`")
}

/// One HTTP/1.1 request with a raw request text, answered within 10 s: (status, JSON body).
fn http_raw(addr: &str, request: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("write timeout");
    // The server may answer and close before reading a body it refuses; that is fine.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .unwrap_or_else(|e| panic!("read the answer from {addr}: {e}"));
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let json = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body {body:?} is not JSON: {e}"))
    };
    (status, json)
}

fn http(addr: &str, method: &str, target: &str) -> (u16, Value) {
    http_raw(
        addr,
        format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
}

fn status_of(site: &Site) -> Value {
    let (code, body) = http(&admin(site), "GET", "/v1/status");
    assert_eq!(code, 200, "GET /v1/status: {body}");
    body
}

/// Waits (bounded) until both sites are in sync, linked and settled (no dirty block).
fn wait_settled(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (sa, sb) = (status_of(&c.a), status_of(&c.b));
        let settled = |s: &Value| {
            s["replication"]["role"] == "in-sync"
                && s["replication"]["link_up"] == true
                && s["replication"]["dirty_blocks"] == 0
        };
        if settled(&sa) && settled(&sb) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the sites did not settle within 60 s:\n{sa}\n{sb}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `stretch ARGS` within `COMMAND_LIMIT` (killed and failed beyond).
fn stretch_bounded(args: &[&str]) -> Output {
    let mut child = Command::new(stretch_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stretch");
    let deadline = Instant::now() + COMMAND_LIMIT;
    while child.try_wait().expect("poll stretch").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("stretch {args:?} did not finish within {COMMAND_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect stretch's output")
}

fn verify(c_a: &Site, c_b: &Site) -> (i32, String, String) {
    let (ua, ub) = (
        format!("http://{}", admin(c_a)),
        format!("http://{}", admin(c_b)),
    );
    let out = stretch_bounded(&[
        "verify",
        "vol",
        "--site",
        &ua,
        "--site",
        &ub,
        "--batch-blocks",
        "512",
    ]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// DESIGN.md §7 invariant 1 and §8: after writes at A, both sites settle and `stretch verify`
// finds every block identical (exit 0); `stretch status` shows both in sync with the link up.
#[test]
fn verify_finds_settled_sites_identical_and_status_shows_them_in_sync() {
    if !have_tool(
        "qemu-io",
        "verify_finds_settled_sites_identical_and_status_shows_them_in_sync",
    ) {
        return;
    }
    let c = cluster();
    qemu_io(
        &c.a.uri("vol"),
        &[
            "write -P 0xab 0 1M",
            "write -P 0x3c 5M 64k",
            "write -P 0x77 16380k 4k",
        ],
    );
    qemu_io(&c.b.uri("vol"), &["write -P 0x11 9M 128k"]);
    wait_settled(&c);

    let (code, stdout, stderr) = verify(&c.a, &c.b);
    assert_eq!(code, 0, "verify of identical sites:\n{stdout}\n{stderr}");
    assert!(stdout.contains("identical"), "{stdout}");
    assert!(
        stderr.contains(&format!("{BLOCKS}/{BLOCKS} blocks")),
        "progress reaches the end: {stderr}"
    );

    // The blocks a write covered carry the same non-zero stamp at both sites; a block never
    // written carries the zero stamp.
    let blocks = |site: &Site, lba: u64| {
        let (code, body) = http(
            &admin(site),
            "GET",
            &format!("/v1/blocks?lba={lba}&count=2"),
        );
        assert_eq!(code, 200, "{body}");
        body["blocks"].as_array().expect("blocks array").clone()
    };
    let (ba, bb) = (blocks(&c.a, 0), blocks(&c.b, 0));
    assert_eq!(ba, bb, "block reports agree");
    assert_ne!(ba[0]["stamp"], "0".repeat(32), "a written block is stamped");
    assert_eq!(ba[0]["state"], "ok");
    let never = blocks(&c.a, 300);
    assert_eq!(
        never[0]["stamp"],
        "0".repeat(32),
        "an unwritten block is not"
    );

    let (ua, ub) = (
        format!("http://{}", admin(&c.a)),
        format!("http://{}", admin(&c.b)),
    );
    let out = stretch_bounded(&["status", "--site", &ua, "--site", &ub, "--json"]);
    assert!(out.status.success(), "status --json: {out:?}");
    let list: Value = serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    let list = list.as_array().expect("an array");
    assert_eq!(list.len(), 2);
    for (entry, name) in list.iter().zip(["a", "b"]) {
        assert_eq!(entry["site"], name, "{entry}");
        assert_eq!(entry["volume"]["name"], "vol");
        assert_eq!(entry["volume"]["size_bytes"], 16 << 20);
        assert_eq!(entry["replication"]["role"], "in-sync", "{entry}");
        assert_eq!(entry["replication"]["link_up"], true, "{entry}");
        assert_eq!(entry["replication"]["epoch"], 1);
        assert_eq!(entry["replication"]["single_copy"], false);
        assert!(entry["replication"]["rtt_us_smoothed"].as_u64().is_some());
        assert!(entry["driver"]["batches"].as_u64().is_some());
        assert!(entry["link"]["sessions"].as_u64() >= Some(1));
    }

    // The table, and a site that does not answer: shown, but not a failure while another
    // site answers.
    let dead = "http://127.0.0.1:1";
    let out = stretch_bounded(&["status", "--site", &ua, "--site", dead]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "one site answered: {out:?}");
    assert!(
        table.contains("in-sync") && table.contains("UNREACHABLE"),
        "{table}"
    );
    assert!(!table.contains("SINGLE COPY"), "{table}");
    let out = stretch_bounded(&["status", "--site", dead]);
    assert!(!out.status.success(), "no site answered: {out:?}");

    // Errors exit 2: a volume neither site serves, a site that does not answer.
    let out = stretch_bounded(&["verify", "other", "--site", &ua, "--site", &ub]);
    assert_eq!(out.status.code(), Some(2), "wrong volume: {out:?}");
    let out = stretch_bounded(&["verify", "vol", "--site", &ua, "--site", dead]);
    assert_eq!(out.status.code(), Some(2), "unreachable site: {out:?}");
}

// DESIGN.md §7 invariants 1 and 6: a block whose bytes were changed behind the engine's back
// at one site fails its checksum there; verify reports it with both sides' stamps (exit 1)
// and the site keeps serving everything else.
#[test]
fn verify_reports_a_block_corrupted_at_one_site() {
    if !have_tool("qemu-io", "verify_reports_a_block_corrupted_at_one_site") {
        return;
    }
    let c = cluster();
    qemu_io(&c.a.uri("vol"), &["write -P 0x5a 1M 256k"]);
    wait_settled(&c);
    // The engine clears a settled dirty region lazily (about a second later). Stop B only once
    // it has, or B restarts with the whole region dirty and tries to push the corrupted block
    // to A, which it never does (a block that fails its checksum is never sent).
    // (A site that marks received writes dirty clears the region about a second after it
    // settles; one that does not has nothing to clear. Either way, 1.5 s after the last dirty
    // block is gone no dirty region is left.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_of(&c.b)["replication"]["dirty_blocks"].as_u64() != Some(0) {
        assert!(
            Instant::now() < deadline,
            "site b did not settle within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let Cluster { a, b, link, dirs } = c;
    let b_dir = b.data_dir.clone();
    assert!(b.stop().success(), "site b exits cleanly");
    // Block 260 (1 MiB + 16 KiB) now holds other bytes than its recorded checksum covers.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(b_dir.join("vol.img"))
        .expect("open b's data file");
    file.seek(SeekFrom::Start(260 * 4096 + 100)).expect("seek");
    file.write_all(&[0xee; 64]).expect("corrupt");
    file.sync_all().expect("sync");
    drop(file);
    let b = site_b(&b_dir, &link);
    let c = Cluster { a, b, link, dirs };
    wait_settled(&c);

    let (code, stdout, stderr) = verify(&c.a, &c.b);
    assert_eq!(code, 1, "verify of a corrupted block:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("lba 260: unreadable (checksum failure) at site b"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 of 4096 blocks differ"),
        "only the corrupted block differs: {stdout}"
    );
    assert!(
        stdout.contains("epoch 1"),
        "stamps are shown decoded: {stdout}"
    );
    // The neighbours of the bad block read fine at B, over the admin API and over NBD.
    let (code, body) = http(&admin(&c.b), "GET", "/v1/blocks?lba=259&count=3");
    assert_eq!(code, 200, "{body}");
    let states: Vec<&str> = body["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| b["state"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(states, ["ok", "unreadable", "ok"]);
    qemu_io(
        &c.b.uri("vol"),
        &["read -P 0x5a 1M 16k", "read -P 0x5a 1044k 200k"],
    );
}

// DESIGN.md §7 invariant 7: malformed or oversized admin requests get a 4xx JSON error and
// the site keeps serving the admin API and NBD.
#[test]
fn admin_api_refuses_bad_input_and_keeps_serving() {
    if !have_tool("qemu-io", "admin_api_refuses_bad_input_and_keeps_serving") {
        return;
    }
    let c = cluster();
    let addr = admin(&c.a);
    let refused = [
        ("GET", "/v1/nosuch", 404),
        ("GET", "/", 404),
        ("POST", "/v1/status", 405),
        ("GET", "/v1/blocks", 400),
        ("GET", "/v1/blocks?lba=0", 400),
        ("GET", "/v1/blocks?lba=abc&count=1", 400),
        ("GET", "/v1/blocks?lba=-1&count=1", 400),
        ("GET", "/v1/blocks?lba=0&count=0", 400),
        ("GET", "/v1/blocks?lba=0&count=4097", 400),
        ("GET", "/v1/blocks?lba=0&count=99999999999999999999999", 400),
        ("GET", "/v1/blocks?lba=4096&count=1", 400),
        ("GET", "/v1/blocks?lba=4095&count=2", 400),
        ("GET", "/v1/blocks?lba=18446744073709551615&count=4096", 400),
    ];
    for (method, target, want) in refused {
        let (code, body) = http(&addr, method, target);
        assert_eq!(code, want, "{method} {target}: {body}");
        assert_eq!(body["status"], want, "{method} {target}: {body}");
        assert!(body["error"].is_string(), "{method} {target}: {body}");
    }
    let (code, body) = http_raw(&addr, b"GARBAGE\r\n\r\n");
    assert_eq!(code, 400, "{body}");
    let (code, body) = http_raw(
        &addr,
        b"POST /v1/status HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n",
    );
    assert_eq!(code, 413, "a body over 1 MiB: {body}");
    // A client that connects and says nothing does not block others.
    let idle = TcpStream::connect(&addr).expect("connect");

    let (code, body) = http(&addr, "GET", "/v1/blocks?lba=0&count=4096");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["blocks"].as_array().map(Vec::len), Some(4096));
    let (code, body) = http(&addr, "GET", "/v1/blocks?lba=4095&count=1");
    assert_eq!(code, 200, "the last block: {body}");
    assert_eq!(status_of(&c.a)["site"], "a");
    qemu_io(&c.a.uri("vol"), &["write -P 0x42 0 64k"]);
    qemu_io(&c.b.uri("vol"), &["read -P 0x42 0 64k"]);
    drop(idle);
}

// docs/operations.md "Status, resync progress and verify": a write made while the link is down
// stays dirty at A; `status` shows it waiting for the link; once the link is back, A's log
// reports the resync complete, and the sites are identical again.
#[test]
fn a_healed_partition_shows_in_status_and_logs_the_resync() {
    if !have_tool(
        "qemu-io",
        "a_healed_partition_shows_in_status_and_logs_the_resync",
    ) {
        return;
    }
    let logs = tempfile::tempdir().expect("tempdir");
    let log = logs.path().join("a.log");
    let c = cluster_logged(Some(&log));
    wait_settled(&c);
    // Disabling the emulator's proxy (Toxiproxy's `enabled: false`) closes its connections and
    // refuses new ones, so A sees the link down for as long as it stays disabled.
    let set_link = |enabled: bool| {
        let body = format!(r#"{{"enabled":{enabled}}}"#);
        let path = format!("/proxies/{}", c.link.name());
        let (code, answer) =
            stretch_bench::link::api::route(c.link.registry(), "POST", &path, body.as_bytes());
        assert_eq!(code, 200, "set the link enabled={enabled}: {answer:?}");
    };
    set_link(false);
    // Under `sync` this write waits for B; it is applied at A and dirty there meanwhile.
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw", &c.a.uri("vol"), "-c", "write -P 0x22 2M 64k"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-io");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status_of(&c.a);
        if s["replication"]["link_up"] == false
            && s["replication"]["dirty_blocks"].as_u64() >= Some(16)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A did not see the link down with the write dirty: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = stretch_bounded(&["status", "--site", &format!("http://{}", admin(&c.a))]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("DOWN") && table.contains("waiting for the link"),
        "{table}"
    );

    // The site samples its dirty set every 500 ms; an outage it never sampled is not a resync
    // worth a log line, so keep the link down past one sample.
    std::thread::sleep(Duration::from_millis(1200));
    set_link(true);
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
    wait_settled(&c);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("resync complete") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's log does not report the resync:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, stdout, stderr) = verify(&c.a, &c.b);
    assert_eq!(code, 0, "after the resync:\n{stdout}\n{stderr}");
}

/// Overwrites 64 bytes inside block `lba` of a site's data file behind the engine's back, so
/// the block fails its checksum there (the sites use buffered I/O, so a running engine sees
/// it too).
fn damage_block(data_dir: &Path, lba: u64) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(data_dir.join("vol.img"))
        .expect("open the data file");
    file.seek(SeekFrom::Start(lba * 4096 + 100)).expect("seek");
    file.write_all(&[0xee; 64]).expect("damage");
    file.sync_all().expect("sync");
}

fn verify_with(c_a: &Site, c_b: &Site, extra: &[&str]) -> (i32, String, String) {
    let (ua, ub) = (
        format!("http://{}", admin(c_a)),
        format!("http://{}", admin(c_b)),
    );
    let mut args = vec![
        "verify",
        "vol",
        "--site",
        &ua,
        "--site",
        &ub,
        "--batch-blocks",
        "512",
    ];
    args.extend_from_slice(extra);
    let out = stretch_bounded(&args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn blocks_repaired(site: &Site) -> u64 {
    status_of(site)["driver"]["replica"]["blocks_repaired"]
        .as_u64()
        .expect("status counts repaired blocks")
}

/// Waits (bounded) until the site's repair counter exceeds `before`: the counters are
/// published just after the batch that answered the client.
fn wait_repaired_beyond(site: &Site, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while blocks_repaired(site) <= before {
        assert!(
            Instant::now() < deadline,
            "the repair was not counted: {}",
            status_of(site)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// DESIGN.md §4 "Repair" and §7 invariant 6: a block damaged at rest at B is repaired from the
// in-sync peer A by the first read that meets it (the read returns the right data and the
// repair is counted); a block damaged at A is found by `verify`, repaired by
// `verify --repair`, and verify then finds the sites identical. `--repair` refuses while the
// sites are not in sync.
#[test]
fn a_damaged_block_is_repaired_by_a_read_and_by_verify_repair() {
    if !have_tool(
        "qemu-io",
        "a_damaged_block_is_repaired_by_a_read_and_by_verify_repair",
    ) {
        return;
    }
    let c = cluster();
    qemu_io(&c.a.uri("vol"), &["write -P 0x5a 1M 256k"]);
    wait_settled(&c);
    // As in `verify_reports_a_block_corrupted_at_one_site`: restart B only once its dirty
    // region is cleared, or the restart settles the whole region from A (a repair too, but
    // not the read repair this test is about).
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_of(&c.b)["replication"]["dirty_blocks"].as_u64() != Some(0) {
        assert!(Instant::now() < deadline, "site b did not settle");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let Cluster { a, b, link, dirs } = c;
    let b_dir = b.data_dir.clone();
    assert!(b.stop().success(), "site b exits cleanly");
    damage_block(&b_dir, 260);
    let b = site_b(&b_dir, &link);
    let c = Cluster { a, b, link, dirs };
    wait_settled(&c);
    assert_eq!(blocks_repaired(&c.b), 0, "nothing repaired before the read");

    // The read covers the damaged block: repaired from A, the right data returned.
    qemu_io(&c.b.uri("vol"), &["read -P 0x5a 1M 256k"]);
    wait_repaired_beyond(&c.b, 0);
    let (code, body) = http(&admin(&c.b), "GET", "/v1/blocks?lba=260&count=1");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["blocks"][0]["state"], "ok", "{body}");
    let (code, stdout, stderr) = verify(&c.a, &c.b);
    assert_eq!(code, 0, "after the read repair:\n{stdout}\n{stderr}");

    // Now the other copy: damaged at A while it runs, found by verify, fixed by --repair.
    damage_block(c.dirs.0.path(), 300);
    let (code, stdout, stderr) = verify(&c.a, &c.b);
    assert_eq!(code, 1, "verify of a damaged block:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("lba 300: unreadable (checksum failure) at site a"),
        "{stdout}"
    );
    let before = blocks_repaired(&c.a);
    let (code, stdout, stderr) = verify_with(&c.a, &c.b, &["--repair"]);
    assert_eq!(code, 0, "verify --repair:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("repair: 1 block(s) at site a from site b"),
        "{stdout}"
    );
    assert!(stdout.contains("after repair: identical"), "{stdout}");
    wait_repaired_beyond(&c.a, before);
    let (code, stdout, stderr) = verify(&c.a, &c.b);
    assert_eq!(code, 0, "after verify --repair:\n{stdout}\n{stderr}");
    qemu_io(&c.a.uri("vol"), &["read -P 0x5a 1M 256k"]);

    // The repair API checks its input.
    let post = |body: &str| {
        http_raw(
            &admin(&c.a),
            format!(
                "POST /v1/repair HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    assert_eq!(post(r#"{"lbas":[4096]}"#).0, 400, "beyond the volume");
    assert_eq!(post(r#"{"ranges":[[0,5000]]}"#).0, 400, "too many blocks");
    assert_eq!(post(r#"{}"#).0, 400, "no blocks named");
    assert_eq!(post(r#"{"lbas":[1,2],"force":"yes"}"#).0, 400);
    let (code, body) = post(r#"{"lbas":[300],"ranges":[[256,4]]}"#);
    assert_eq!(code, 200, "a repair of good blocks changes nothing: {body}");

    // Not in sync (the link down): --repair refuses, and so does the API.
    let set_link = |enabled: bool| {
        let body = format!(r#"{{"enabled":{enabled}}}"#);
        let path = format!("/proxies/{}", c.link.name());
        let (code, answer) =
            stretch_bench::link::api::route(c.link.registry(), "POST", &path, body.as_bytes());
        assert_eq!(code, 200, "set the link enabled={enabled}: {answer:?}");
    };
    set_link(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_of(&c.a)["replication"]["link_up"] != false {
        assert!(Instant::now() < deadline, "A did not see the link down");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, stdout, stderr) = verify_with(&c.a, &c.b, &["--repair"]);
    assert_eq!(
        code, 2,
        "--repair without a linked peer:\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("--repair refused"), "{stderr}");
    assert_eq!(post(r#"{"lbas":[300]}"#).0, 409);
    set_link(true);
    wait_settled(&c);
}
