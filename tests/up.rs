//! The README's first command: `stretch up` starts two sites joined through the link emulator
//! and prints both URIs; a write acknowledged at A reads back at B.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{qemu_io, run_ok};

fn next_line_with(rx: &mpsc::Receiver<String>, needle: &str, deadline: Instant) -> String {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("stretch up printed no line with {needle:?} within 60 s"));
        if line.contains(needle) {
            return line;
        }
    }
}

#[test]
fn up_starts_two_sites_and_a_write_at_a_reads_back_at_b() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::stretch_bin())
        .args(["up", "--listen", "127.0.0.1:0", "--listen-b", "127.0.0.2:0"])
        .args([
            "--link-admin",
            "127.0.0.1:0",
            "--rtt",
            "2ms",
            "--size",
            "64MiB",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let uri_of = |line: String| line[line.find("nbd://").unwrap()..].trim().to_string();
    let uri_a = uri_of(next_line_with(&rx, "site A  nbd://", deadline));
    let uri_b = uri_of(next_line_with(&rx, "site B  nbd://", deadline));
    assert!(
        uri_a.ends_with("/vol0") && uri_b.ends_with("/vol0"),
        "{uri_a} {uri_b}"
    );
    assert!(
        uri_b.starts_with("nbd://127.0.0.2:"),
        "site B is another loopback address: {uri_b}"
    );
    let admin_line = next_line_with(&rx, "Toxiproxy API on ", deadline);
    let admin = admin_line
        .split("Toxiproxy API on ")
        .nth(1)
        .unwrap()
        .trim_end_matches("):");

    qemu_io(&uri_a, &["write -P 0xa1 0 1M"]);
    qemu_io(&uri_b, &["read -P 0xa1 0 1M", "write -P 0xb2 1M 1M"]);
    qemu_io(&uri_a, &["read -P 0xb2 1M 1M"]);

    // The printed admin address drives the emulator between the sites.
    let status =
        run_ok(Command::new(common::stretch_bin()).args(["link", "status", "--admin", admin]));
    assert!(
        status.contains("latency"),
        "the 2 ms RTT is a latency toxic: {status}"
    );

    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "stretch up must exit cleanly on SIGTERM: {status}"
    );
}
