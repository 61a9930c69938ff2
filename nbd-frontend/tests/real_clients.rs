//! Real NBD clients nobody here wrote, against the in-process server (NBD.md §4): qemu-io,
//! qemu-img, nbdinfo, nbdcopy, fio's nbd engine and nbdsh. Tools a fresh machine may lack print
//! `SKIPPED: <tool> not installed` and pass, unless STRETCH_REQUIRE_TOOLS=1.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{pattern, require_nbdsh, require_tool, run, run_ok, TestServer};
use stretch_engine::BlockDevice;
use stretch_nbd::ServerConfig;

const MIB: u64 = 1 << 20;
const TOOL_LIMIT: Duration = Duration::from_secs(120);

fn block_on<F: std::future::Future>(t: &TestServer<stretch_nbd::MemDevice>, f: F) -> F::Output {
    t.runtime().block_on(f)
}

/// qemu-io output reports failed commands in text; the exit status alone is not enough.
fn assert_qemu_io_clean(out: &str) {
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("fail") && !lower.contains("error"),
        "qemu-io reported a failure:\n{out}"
    );
}

#[test]
fn qemu_io_data_path_with_fua_zero_fast_zero_discard_flush() {
    let (t, devs) = TestServer::mem(ServerConfig::default(), &[("vol", 64 * MIB, false)]);
    let dev = &devs[0];
    for uri in [t.uri("vol"), t.unix_uri("vol")] {
        // NBD.md §4 "Data path + flags", each write read back with its pattern.
        let out = run_ok(
            Command::new("qemu-io").args([
                "-f",
                "raw",
                &uri,
                "-c",
                "write -P 0xab 0 1M",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "write -f -P 1 1M 4k", // FUA
                "-c",
                "read -P 1 1M 4k",
                "-c",
                "write -P 0xcd 2M 1M",
                "-c",
                "write -z 2M 1M", // NO_HOLE
                "-c",
                "read -P 0 2M 1M",
                "-c",
                "write -P 0xcd 3M 1M",
                "-c",
                "write -z -u 3M 1M", // may unmap
                "-c",
                "read -P 0 3M 1M",
                "-c",
                "write -z -n 4M 1M", // FAST_ZERO
                "-c",
                "read -P 0 4M 1M",
                "-c",
                "write -P 0xee 5M 64k",
                "-c",
                "discard 5M 64k",
                "-c",
                "read -P 0 5M 64k",
                "-c",
                "read -v 100 7", // unaligned read is served
                "-c",
                "flush",
            ]),
            TOOL_LIMIT,
        );
        assert_qemu_io_clean(&out);
        assert_eq!(out.matches("wrote ").count(), 8, "{out}");
    }
    // The writes really reached the device, and FLUSH reached it too.
    let got = block_on(&t, dev.read(0, 4096)).expect("read");
    assert!(got.iter().all(|&b| b == 0xab));
    let got = block_on(&t, dev.read(MIB, 4096)).expect("read");
    assert!(got.iter().all(|&b| b == 1));
    assert!(dev.flush_count() >= 2);
    // Zero with unmap and discard punched holes; zero without unmap (NO_HOLE) kept blocks.
    let st = block_on(&t, dev.block_status(2 * MIB, 4 * MIB)).expect("status");
    assert!(
        !st[0].hole && st[0].zero,
        "NO_HOLE zero must stay allocated: {st:?}"
    );
    let st = block_on(&t, dev.block_status(3 * MIB, MIB)).expect("status");
    assert!(st[0].hole, "zero with unmap should punch a hole: {st:?}");
}

#[test]
fn qemu_img_convert_compare_and_map() {
    let (t, _) = TestServer::mem(ServerConfig::default(), &[("vol", 16 * MIB, false)]);
    let uri = t.uri("vol");
    // A source image with data at 0..4 MiB and 8..9 MiB, holes elsewhere.
    let src = t.dir.path().join("src.img");
    let mut img = vec![0u8; 16 * MIB as usize];
    img[..4 * MIB as usize].copy_from_slice(&pattern(4 * MIB as usize, 1));
    img[8 * MIB as usize..9 * MIB as usize].copy_from_slice(&pattern(MIB as usize, 2));
    std::fs::write(&src, &img).expect("write src");

    let src_s = src.to_str().expect("utf8 path");
    run_ok(
        Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri]),
        TOOL_LIMIT,
    );
    let out = run_ok(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", src_s, &uri]),
        TOOL_LIMIT,
    );
    assert!(out.contains("identical"), "{out}");

    // Block status through QEMU's client (REQ_ONE, 4096-aligned extents).
    let out = run_ok(
        Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]),
        TOOL_LIMIT,
    );
    let map: serde_json::Value = serde_json::from_str(&out).expect("map json");
    let data_at = |off: u64| {
        map.as_array()
            .expect("array")
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().expect("start");
                s <= off && off < s + e["length"].as_u64().expect("length")
            })
            .map(|e| e["data"].as_bool().expect("data"))
            .expect("extent covering offset")
    };
    assert!(data_at(0));
    assert!(data_at(8 * MIB));
    assert!(!data_at(5 * MIB), "{out}");
    assert!(!data_at(15 * MIB), "{out}");

    // And back out to a file.
    let back = t.dir.path().join("back.img");
    run_ok(
        Command::new("qemu-img").args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            back.to_str().expect("utf8"),
        ]),
        TOOL_LIMIT,
    );
    assert!(std::fs::read(&back).expect("read back") == img);
}

#[test]
fn nbdinfo_reports_flags_sizes_contexts_and_map() {
    if !require_tool("nbdinfo") {
        return;
    }
    let (t, _) = TestServer::mem(
        ServerConfig::default(),
        &[("vol", 16 * MIB, false), ("ro", 8 * MIB, true)],
    );
    let uri = t.uri("vol");
    let out = run_ok(Command::new("nbdinfo").args(["--json", &uri]), TOOL_LIMIT);
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    let e = &j["exports"][0];
    assert_eq!(e["export-size"], 16 * MIB);
    assert_eq!(e["block_size_minimum"], 4096);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["description"], "test export vol");
    let contexts = e["contexts"].as_array().expect("contexts");
    assert!(contexts.iter().any(|c| c == "base:allocation"), "{out}");

    // NBD.md §4: `nbdinfo --can X` exits 0 for yes, 2 for no.
    for can in [
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "cache",
        "df",
        "multi-conn",
        "structured-reply",
    ] {
        let o = run(
            Command::new("nbdinfo").args(["--can", can, &uri]),
            TOOL_LIMIT,
        );
        assert_eq!(o.status.code(), Some(0), "--can {can}");
    }
    let o = run(
        Command::new("nbdinfo").args(["--is", "read-only", &uri]),
        TOOL_LIMIT,
    );
    assert_eq!(o.status.code(), Some(2));
    let o = run(
        Command::new("nbdinfo").args(["--is", "read-only", &t.uri("ro")]),
        TOOL_LIMIT,
    );
    assert_eq!(o.status.code(), Some(0));
    let o = run(
        Command::new("nbdinfo").args(["--can", "trim", &t.uri("ro")]),
        TOOL_LIMIT,
    );
    assert_eq!(o.status.code(), Some(2));
    let size = run_ok(
        Command::new("nbdinfo").args(["--size", &t.unix_uri("ro")]),
        TOOL_LIMIT,
    );
    assert_eq!(size.trim(), (8 * MIB).to_string());

    let list = run_ok(
        Command::new("nbdinfo").args(["--list", &format!("nbd://127.0.0.1:{}", t.addr.port())]),
        TOOL_LIMIT,
    );
    assert!(
        list.contains("export=\"vol\"") && list.contains("export=\"ro\""),
        "{list}"
    );

    // Write 1 MiB at 4 MiB, then the map shows exactly that as data.
    run_ok(
        Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 7 4M 1M"]),
        TOOL_LIMIT,
    );
    let map = run_ok(Command::new("nbdinfo").args(["--map", &uri]), TOOL_LIMIT);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{map}");
    assert_eq!(rows[0][..3], ["0", &(4 * MIB).to_string(), "3"]);
    assert_eq!(
        rows[1][..3],
        [&(4 * MIB).to_string()[..], &MIB.to_string(), "0"]
    );
    assert_eq!(
        rows[2][..3],
        [&(5 * MIB).to_string()[..], &(11 * MIB).to_string(), "3"]
    );
}

#[test]
fn nbdcopy_in_and_out_round_trips() {
    if !require_tool("nbdcopy") {
        return;
    }
    let (t, _) = TestServer::mem(ServerConfig::default(), &[("vol", 32 * MIB, false)]);
    let uri = t.uri("vol");
    let src = t.dir.path().join("src.img");
    let mut img = pattern(32 * MIB as usize, 5);
    img[10 * MIB as usize..20 * MIB as usize].fill(0); // a zero run nbdcopy may skip or zero
    std::fs::write(&src, &img).expect("write src");
    run_ok(
        Command::new("nbdcopy").args([
            "--flush",
            "-C",
            "4",
            "-R",
            "64",
            src.to_str().expect("utf8"),
            &uri,
        ]),
        TOOL_LIMIT,
    );
    let out = t.dir.path().join("out.img");
    run_ok(
        Command::new("nbdcopy").args([&t.unix_uri("vol"), out.to_str().expect("utf8")]),
        TOOL_LIMIT,
    );
    let copied = std::fs::read(&out).expect("read out");
    // The copy's checksum equals the source's (compared byte for byte).
    assert_eq!(copied.len(), img.len());
    assert!(copied == img, "nbdcopy round trip differs");
}

#[test]
fn fio_nbd_engine_verifies_crc32c_over_four_connections() {
    if !require_tool("fio") {
        return;
    }
    let (t, _) = TestServer::mem(ServerConfig::default(), &[("vol", 64 * MIB, false)]);
    let uri = t.uri("vol");
    // Each job (one connection each) owns a 16 MiB region, so verification is exact.
    let out = run_ok(
        Command::new("fio").current_dir(t.dir.path()).args([
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=64",
            "--numjobs=4",
            "--size=16m",
            "--offset_increment=16m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--group_reporting",
        ]),
        TOOL_LIMIT,
    );
    assert!(out.contains("err= 0"), "{out}");
    // Mixed random I/O for a short time, then verified.
    let out = run_ok(
        Command::new("fio").current_dir(t.dir.path()).args([
            "--name=m",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bsrange=4k-256k",
            "--iodepth=64",
            "--numjobs=4",
            "--size=16m",
            "--offset_increment=16m",
            "--runtime=3",
            "--time_based",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--group_reporting",
        ]),
        TOOL_LIMIT,
    );
    assert!(out.contains("err= 0"), "{out}");
}

/// NBD.md §4 "Abuse" and "Option negotiation", through libnbd's Python bindings.
const NBDSH_SCRIPT: &str = r#"
import errno, nbd
SIZE = h.get_size()
assert SIZE == 16 * 1024 * 1024
h.set_strict_mode(0)

def expect(fn, codes, what):
    try:
        fn()
    except nbd.Error as e:
        # libnbd's Python binding gives the errno as its name ("EINVAL").
        assert e.errno in [errno.errorcode[c] for c in codes if c], (what, e.errno, e.string)
    else:
        assert 0 in codes, (what, "succeeded")
    assert h.aio_is_ready(), (what, "connection not ready")

expect(lambda: h.pread(512, SIZE), [errno.EINVAL], "read past EOF")
expect(lambda: h.pread(0, 0), [0, errno.EINVAL], "zero-length read")
expect(lambda: h.pread(512, 0, 0x80), [errno.EINVAL], "unknown flag")
expect(lambda: h.pwrite(b"x" * 512, SIZE), [errno.ENOSPC], "write past EOF")
expect(lambda: h.pwrite(b"x" * 512, 0), [errno.EINVAL], "unaligned write")
expect(lambda: h.block_status(0, 0, lambda *a: 0), [errno.EINVAL], "zero-length block status")
expect(lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO), [0], "fast zero")
h.pwrite(b"y" * 4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == b"y" * 4096
h.flush()

seen = []
h.block_status(65536, 0, lambda ctx, off, ents, err: seen.append((ctx, off, list(ents))))
assert seen[0][0] == "base:allocation", seen
assert seen[0][2][:4] == [8192, 3, 4096, 0], seen

g = nbd.NBD()
g.set_opt_mode(True)
g.connect_uri(URI_BASE)  # sets the export name from the URI, so set it afterwards
g.set_export_name("nosuch")
try:
    g.opt_info()
except nbd.Error:
    pass
else:
    raise AssertionError("INFO of an unknown export succeeded")
g.set_export_name("vol")
g.set_request_block_size(True)
g.opt_info()
assert g.get_block_size(nbd.SIZE_MINIMUM) == 4096
assert g.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert g.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024
names = []
g.opt_list_meta_context(lambda name: names.append(name))
assert names == ["base:allocation"], names
g.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
g.opt_go()
assert g.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert g.can_multi_conn()
g.shutdown()
print("ALL OK")
"#;

#[test]
fn nbdsh_abuse_and_negotiation_checks() {
    if !require_nbdsh() {
        return;
    }
    let (t, _) = TestServer::mem(ServerConfig::default(), &[("vol", 16 * MIB, false)]);
    let base = format!("nbd://127.0.0.1:{}", t.addr.port());
    let script = format!("URI_BASE = {base:?}\n{NBDSH_SCRIPT}");
    // NBD.md §4: run nbdsh with /usr/bin/python3 (nbdsh is `python3 -m nbd`); the python3
    // first on PATH may lack the module.
    let out = run_ok(
        Command::new("/usr/bin/python3").args([
            "-m",
            "nbd",
            "--base-allocation",
            "-u",
            &t.uri("vol"),
            "-c",
            &script,
        ]),
        TOOL_LIMIT,
    );
    assert!(out.contains("ALL OK"), "{out}");
}

#[test]
fn qemu_nbd_lists_exports_with_block_sizes_and_contexts() {
    let (t, _) = TestServer::mem(
        ServerConfig::default(),
        &[("vol", 16 * MIB, false), ("ro", 8 * MIB, true)],
    );
    // NBD.md §4: `qemu-nbd -L` walks LIST, then INFO and LIST_META_CONTEXT per export.
    let out = run_ok(
        Command::new("qemu-nbd").args(["-L", "-b", "127.0.0.1", "-p", &t.addr.port().to_string()]),
        TOOL_LIMIT,
    );
    assert!(out.contains("exports available: 2"), "{out}");
    assert!(
        out.contains("export: 'vol'") && out.contains("export: 'ro'"),
        "{out}"
    );
    assert!(out.contains("description: test export vol"), "{out}");
    assert_eq!(out.matches("min block: 4096").count(), 2, "{out}");
    assert_eq!(out.matches("max block: 33554432").count(), 2, "{out}");
    assert!(out.contains("multi"), "{out}");
    assert_eq!(out.matches("base:allocation").count(), 2, "{out}");
    assert!(out.contains("readonly"), "{out}");
}
