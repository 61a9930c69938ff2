//! DESIGN.md §3: the psync engine is "chosen automatically when io_uring cannot start (log
//! why)". Here io_uring really cannot start: the daemon runs under a seccomp filter that makes
//! io_uring_setup(2) fail with ENOSYS, as it does on kernels built without io_uring or with
//! `kernel.io_uring_disabled=2`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// io_uring_setup's number, the same on every architecture (syscalls added since 5.1 share
/// one numbering).
const SYS_IO_URING_SETUP: u32 = 425;

/// Installs a seccomp filter: io_uring_setup fails with ENOSYS, everything else is allowed.
fn deny_io_uring() -> std::io::Result<()> {
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS: load the syscall number
    const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    let filter = [
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        }, // seccomp_data.nr
        libc::sock_filter {
            code: BPF_JEQ_K,
            jt: 0,
            jf: 1,
            k: SYS_IO_URING_SETUP,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: prctl with these arguments only changes this (child) process's own seccomp state;
    // `prog` and `filter` outlive the call, which copies the program into the kernel.
    let rc = unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            -1
        } else {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const _,
            )
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn auto_engine_falls_back_to_psync_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(
        common::stretch(&["volume", "create", "v", "--size", "16MiB", "--data-dir", d])
            .status
            .success()
    );
    let mut cmd = Command::new(common::stretch_bin());
    cmd.args([
        "serve",
        "--data-dir",
        d,
        "--listen",
        "127.0.0.1:0",
        "--io-engine",
        "auto",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and makes only prctl(2) calls,
    // which are async-signal-safe.
    unsafe {
        cmd.pre_exec(deny_io_uring);
    }
    let mut child = cmd.spawn().expect("spawn stretch serve under seccomp");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let uri = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("nbd://") => break line,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                let _ = stderr.read_to_string(&mut err);
                panic!("stretch serve printed no URI under seccomp; stderr:\n{err}");
            }
        }
    };
    // The fallback engine must actually serve data.
    common::qemu_io(&uri, &["write -P 0x3c 0 1M", "flush", "read -P 0x3c 0 1M"]);
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    assert!(
        err.contains("io_uring cannot start") && err.contains("falling back to the psync"),
        "the fallback and its reason must be logged; stderr:\n{err}"
    );
    assert!(
        err.contains("io_engine=\"psync\""),
        "the volume must run on psync; stderr:\n{err}"
    );
}
