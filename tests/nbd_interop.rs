//! Real NBD clients nobody here wrote, against a live `stretch serve` on the real engine
//! (the protocol layer is covered in depth by nbd-frontend/tests; this proves the daemon as a
//! user runs it). NBD.md §4 lists the commands.

mod common;

use std::process::Command;

use common::{have_tool, run, run_ok, stretch, Site};

fn site_with_volume(dir: &std::path::Path, size: &str, extra: &[&str]) -> Site {
    let d = dir.to_str().unwrap();
    let out = stretch(&["volume", "create", "vol", "--size", size, "--data-dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Site::serve(dir, extra)
}

#[test]
fn nbdinfo_reports_flags_sizes_and_map() {
    if !have_tool("nbdinfo", "nbdinfo_reports_flags_sizes_and_map") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let site = site_with_volume(dir.path(), "16MiB", &[]);
    let uri = site.uri("vol");
    // NBD proto.md: "nbdinfo --can FLAG" exits 0 for yes, 2 for no.
    for flag in [
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "df",
        "multi-conn",
        "structured-reply",
        "cache",
    ] {
        let st = run(Command::new("nbdinfo").args(["--can", flag, &uri])).status;
        assert_eq!(st.code(), Some(0), "stretch must advertise {flag}");
    }
    let st = run(Command::new("nbdinfo").args(["--is", "read-only", &uri])).status;
    assert_eq!(st.code(), Some(2), "a writable volume is not read-only");
    assert_eq!(
        run_ok(Command::new("nbdinfo").args(["--size", &uri])).trim(),
        (16u64 << 20).to_string()
    );
    common::qemu_io(&uri, &["write -P 0x5a 4M 1M"]);
    let map = run_ok(Command::new("nbdinfo").args(["--map", "--json", &uri]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let extents = map.as_array().unwrap();
    let data = extents
        .iter()
        .find(|e| e["offset"] == 4 << 20)
        .unwrap_or_else(|| panic!("an extent must start at the written range: {map}"));
    assert_eq!(
        data["type"], 0,
        "the written megabyte is allocated data: {map}"
    );
    assert!(
        extents
            .iter()
            .all(|e| e["length"].as_u64().unwrap() % 4096 == 0),
        "extents align to 4096: {map}"
    );
}

#[test]
fn nbdcopy_in_and_out_round_trips_the_bytes() {
    if !have_tool("nbdcopy", "nbdcopy_in_and_out_round_trips_the_bytes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let site = site_with_volume(dir.path(), "32MiB", &[]);
    let uri = site.uri("vol");
    let src = dir.path().join("src.raw");
    let out = dir.path().join("out.raw");
    // Pseudo-random content with a hole in the middle, so the copy exercises data and zeroes.
    let mut bytes = vec![0u8; 32 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        if (8 << 20..16 << 20).contains(&(i * 8)) {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&src, &bytes).unwrap();
    run_ok(Command::new("nbdcopy").args([
        "--flush",
        "-C",
        "4",
        "-R",
        "64",
        src.to_str().unwrap(),
        &uri,
    ]));
    run_ok(Command::new("nbdcopy").args([&uri, out.to_str().unwrap()]));
    let copied = std::fs::read(&out).unwrap();
    assert!(
        copied == bytes,
        "nbdcopy out must return exactly what nbdcopy in wrote"
    );
}

#[test]
fn fio_verified_random_io_over_four_connections() {
    if !have_tool("fio", "fio_verified_random_io_over_four_connections") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let site = site_with_volume(dir.path(), "64MiB", &[]);
    let uri = site.uri("vol");
    // Each job writes its own 16 MiB slice with crc32c verify headers, then reads it back.
    // fio saves verify state files in its working directory: keep them in the temp dir.
    let out = run_ok(Command::new("fio").current_dir(dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--numjobs=4",
        "--size=16M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let json_start = out.find('{').expect("fio prints JSON");
    let report: serde_json::Value = serde_json::from_str(&out[json_start..]).unwrap();
    for job in report["jobs"].as_array().unwrap() {
        assert_eq!(job["error"], 0, "fio job failed: {job}");
        assert!(
            job["write"]["io_bytes"].as_u64().unwrap() >= 16 << 20,
            "every byte written: {job}"
        );
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 16 << 20,
            "every byte verified: {job}"
        );
    }
}

/// NBD.md §4 "Abuse": with libnbd's strict mode off, bad requests reach the daemon; each gets
/// its errno and the same connection keeps working.
#[test]
fn daemon_answers_bad_requests_and_keeps_serving() {
    if !have_tool("nbdsh", "daemon_answers_bad_requests_and_keeps_serving") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let site = site_with_volume(dir.path(), "8MiB", &[]);
    let uri = site.uri("vol");
    let script = format!(
        r#"
import errno, nbd
h = nbd.NBD()
h.connect_uri("{uri}")
h.set_strict_mode(0)
size = h.get_size()
def expect(code, f):
    try:
        f()
    except nbd.Error as e:
        assert e.errnum == code, (e.errnum, code, str(e))
    else:
        raise AssertionError("expected errno %d" % code)
expect(errno.EINVAL, lambda: h.pread(512, size))            # read past EOF
expect(errno.ENOSPC, lambda: h.pwrite(b"x" * 4096, size))   # write past EOF
expect(errno.EINVAL, lambda: h.pwrite(b"x" * 512, 0))       # unaligned write
expect(errno.EINVAL, lambda: h.pwrite(b"x" * 4096, 100))    # misaligned offset
expect(errno.EINVAL, lambda: h.trim(512, 0))                # unaligned trim
h.pwrite(b"\xab" * 4096, 4096)
assert h.pread(4096, 4096) == b"\xab" * 4096
assert h.aio_is_ready()
print("ok")
"#
    );
    let out = run(Command::new("/usr/bin/python3").args(["-c", &script]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon still serves a new client after all that.
    common::qemu_io(&uri, &["read -P 0xab 4096 4096"]);
}
