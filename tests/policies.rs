//! Ack policies end to end (DESIGN.md §5): two `stretch site` daemons joined through the
//! link emulator, policies set at start and changed live through the admin API.

mod common;

use std::time::{Duration, Instant};

use common::{qemu_io, Site, PAIR_REQUEST_TIMEOUT_MS, PAIR_SIZE};
use serde_json::Value;
use stretch_bench::link::LinkEmulator;

fn site_a(dir: &std::path::Path, policy: &str) -> Site {
    Site::stretch_site(
        dir,
        &[
            "--site",
            "a",
            "--cluster-id",
            "41",
            "--repl-listen",
            "127.0.0.1:0",
            "--volume",
            "vol",
            "--size",
            PAIR_SIZE,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--buffered-io",
            "--request-timeout-ms",
            PAIR_REQUEST_TIMEOUT_MS,
            "--policy",
            policy,
            "--active-site",
            "a",
        ],
    )
}

fn site_b(dir: &std::path::Path, peer: &str, policy: &str) -> Site {
    common::pair_site_b_with(dir, "41", peer, &["--policy", policy, "--active-site", "a"])
}

struct Pair {
    a: Site,
    b: Site,
    _link: LinkEmulator,
    _dirs: [tempfile::TempDir; 2],
}

fn pair(policy: &str, rtt: Duration) -> Pair {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = site_a(dirs[0].path(), policy);
    let repl = a.repl.clone().expect("site a prints its repl address");
    let link = LinkEmulator::start("127.0.0.1:0", &repl).expect("start the link emulator");
    link.set_rtt(rtt);
    let b = site_b(dirs[1].path(), &link.listen_addr().to_string(), policy);
    Pair {
        a,
        b,
        _link: link,
        _dirs: dirs,
    }
}

fn admin(site: &Site) -> String {
    format!("http://{}", site.admin.as_ref().expect("admin address"))
}

fn status(site: &Site) -> Value {
    let out = common::stretch(&["status", "--json", "--site", &admin(site)]);
    assert!(out.status.success(), "{out:?}");
    let all: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    all.as_array()
        .and_then(|a| a.first().cloned())
        .unwrap_or(all)
}

/// Polls a site's replication status until `check` holds (bounded).
fn wait_for(site: &Site, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(site);
        if check(&s["replication"]) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: last status {s:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn volume(args: &[&str]) -> std::process::Output {
    let mut all = vec!["volume"];
    all.extend_from_slice(args);
    common::stretch(&all)
}

// sync-received: a write acknowledged at A is read back at B (it is visible there from its
// receipt on), in both directions, and the sites end identical.
#[test]
fn sync_received_writes_are_read_back_at_the_other_site() {
    let p = pair("sync-received", Duration::from_millis(2));
    wait_for(&p.a, "A runs sync-received", |r| {
        r["policy"] == "sync-received" && r["mode"] == "sync-received"
    });
    qemu_io(&p.a.uri("vol"), &["write -P 0x5a 0 1M"]);
    qemu_io(&p.b.uri("vol"), &["read -P 0x5a 0 1M"]);
    qemu_io(&p.b.uri("vol"), &["write -P 0x6b 1M 512k"]);
    qemu_io(&p.a.uri("vol"), &["read -P 0x6b 1M 512k"]);
    let a = wait_for(&p.a, "B's receipt acks counted at A", |r| {
        r["dirty_blocks"] == 0
    });
    assert_eq!(a["replication"]["policy"], "sync-received");
    let out = common::stretch(&[
        "verify",
        "vol",
        "--site",
        &admin(&p.a),
        "--site",
        &admin(&p.b),
    ]);
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// async: the writer acknowledges alone and the passive site refuses I/O; a handoff drains
// the lag and moves the writer, after which the new writer holds every write and serves.
#[test]
fn async_passive_site_refuses_io_and_handoff_moves_the_writer() {
    let p = pair("async", Duration::from_millis(10));
    wait_for(&p.b, "B is passive", |r| {
        r["mode"] == "async" && r["async_writer"] == "a"
    });
    qemu_io(&p.a.uri("vol"), &["write -P 0x11 0 2M"]);
    // The passive site refuses reads and writes (EIO), the daemon keeps serving.
    let refused = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &p.b.uri("vol"), "-c", "read 0 4k"])
        .output()
        .expect("run qemu-io");
    let text = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() || text.contains("Input/output error"),
        "a read at the passive site must fail: {text}"
    );
    let out = volume(&[
        "handoff",
        "b",
        "--site",
        &admin(&p.a),
        "--peer-site",
        &admin(&p.b),
        "--timeout",
        "20s",
    ]);
    assert!(
        out.status.success(),
        "handoff: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(&p.b, "B is the writer", |r| {
        r["mode"] == "async" && r["async_writer"] == "b"
    });
    // Every write A acknowledged is at B, and B now writes.
    qemu_io(&p.b.uri("vol"), &["read -P 0x11 0 2M"]);
    qemu_io(&p.b.uri("vol"), &["write -P 0x22 2M 1M"]);
    wait_for(&p.b, "B's lag drains", |r| r["lag_bytes"] == 0);
    let a = status(&p.a);
    assert_eq!(a["replication"]["async_writer"], "b");
    assert!(a["replication"]["mode_switches"].as_u64().unwrap_or(0) >= 2);
}

// The policy changes live: sync -> async (with the writer at A) -> sync, while the volume
// stays attached; each switch is counted at both sites.
#[test]
fn policy_changes_live_and_every_switch_is_counted() {
    let p = pair("sync", Duration::from_millis(2));
    qemu_io(&p.a.uri("vol"), &["write -P 0x01 0 256k"]);
    let set = |policy: &str| {
        let out = volume(&[
            "policy",
            policy,
            "--site",
            &admin(&p.a),
            "--peer-site",
            &admin(&p.b),
        ]);
        assert!(
            out.status.success(),
            "set {policy}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    set("async");
    wait_for(&p.b, "B passive", |r| {
        r["mode"] == "async" && r["async_writer"] == "a"
    });
    qemu_io(&p.a.uri("vol"), &["write -P 0x02 256k 256k"]);
    set("sync");
    wait_for(&p.b, "B back in sync", |r| r["mode"] == "sync");
    qemu_io(
        &p.b.uri("vol"),
        &["read -P 0x02 256k 256k", "write -P 0x03 0 4k"],
    );
    qemu_io(&p.a.uri("vol"), &["read -P 0x03 0 4k"]);
    for site in [&p.a, &p.b] {
        let s = status(site);
        assert_eq!(s["replication"]["mode_switches"], 2, "{s:#}");
    }
    // A bad policy is refused with a clear error, and nothing changes.
    let out = volume(&["policy", "fast", "--site", &admin(&p.a)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sync-received"));
}
