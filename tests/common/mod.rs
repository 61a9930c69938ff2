//! Shared helpers for the end-to-end tests: real `stretch` processes, real clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `stretch` binary cargo built for these tests.
pub fn stretch_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stretch"))
}

/// Runs `stretch ARGS` to completion.
pub fn stretch(args: &[&str]) -> Output {
    Command::new(stretch_bin())
        .args(args)
        .output()
        .expect("run the stretch binary")
}

/// True if `tool` is on PATH. A missing tool prints a loud SKIPPED line; with
/// STRETCH_REQUIRE_TOOLS=1 (set by .ci/run) it fails the test instead.
pub fn have_tool(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("STRETCH_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{test}: required tool {tool} is not installed (STRETCH_REQUIRE_TOOLS=1)");
        }
        eprintln!("\n========== SKIPPED: {test}: {tool} not installed ==========\n");
    }
    found
}

/// A `stretch serve` process on a free port, killed on drop.
pub struct Site {
    pub child: Child,
    pub uris: Vec<String>,
    /// The replication listen address a listening `stretch site` printed.
    pub repl: Option<String>,
    /// The site admin API's address (`HOST:PORT`) a `stretch site` printed.
    pub admin: Option<String>,
    pub data_dir: PathBuf,
    stdout_lines: mpsc::Receiver<String>,
}

impl Site {
    /// Starts `stretch serve` with `extra` arguments and waits until it prints its URIs.
    pub fn serve(data_dir: &Path, extra: &[&str]) -> Site {
        let mut cmd = Command::new(stretch_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra);
        Site::spawn(cmd, data_dir, "stretch serve")
    }

    /// Starts `stretch site --data-dir DATA_DIR ARGS` and waits until it prints its URIs
    /// (and, for the listening site, its `repl://` address first).
    pub fn stretch_site(data_dir: &Path, args: &[&str]) -> Site {
        let mut cmd = Command::new(stretch_bin());
        cmd.arg("site").arg("--data-dir").arg(data_dir).args(args);
        Site::spawn(cmd, data_dir, "stretch site")
    }

    /// Like `stretch_site`, with the daemon's log (stderr) going to `stderr` (e.g. a file a
    /// test reads) instead of the test's own stderr.
    pub fn stretch_site_logged(data_dir: &Path, args: &[&str], stderr: Stdio) -> Site {
        let mut cmd = Command::new(stretch_bin());
        cmd.arg("site").arg("--data-dir").arg(data_dir).args(args);
        // Whoever reads this log looks for info lines, whatever RUST_LOG the tests run under.
        cmd.env("RUST_LOG", "info,openraft=warn");
        cmd.stderr(stderr);
        Site::spawn(cmd, data_dir, "stretch site")
    }

    /// Spawns a daemon and collects the `nbd://`, `nbd+unix://`, `repl://` and
    /// `admin http://` lines it prints once listening.
    fn spawn(mut cmd: Command, data_dir: &Path, what: &str) -> Site {
        // A stderr the caller chose is kept (`Command` remembers it); otherwise it is inherited.
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut uris = Vec::new();
        let mut repl = None;
        let mut admin = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        // The server prints every URI at once after binding; the first line proves it listens,
        // and a short quiet period collects the rest.
        while Instant::now() < deadline {
            let wait = if uris.is_empty() {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(200)
            };
            match rx.recv_timeout(wait) {
                Ok(line) if line.starts_with("nbd://") || line.starts_with("nbd+unix://") => {
                    uris.push(line)
                }
                Ok(line) if line.starts_with("repl://") => {
                    repl = Some(line["repl://".len()..].to_string())
                }
                Ok(line) if line.starts_with("admin http://") => {
                    admin = Some(line["admin http://".len()..].to_string())
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) if !uris.is_empty() => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("{what} exited early with {status}");
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait for the daemon");
                    panic!("{what} exited before printing URIs: {status}");
                }
            }
        }
        assert!(!uris.is_empty(), "{what} printed no NBD URI within 30 s");
        Site {
            child,
            uris,
            repl,
            admin,
            data_dir: data_dir.to_path_buf(),
            stdout_lines: rx,
        }
    }

    /// The TCP URI of `volume`.
    pub fn uri(&self, volume: &str) -> String {
        self.uris
            .iter()
            .find(|u| u.starts_with("nbd://") && u.ends_with(&format!("/{volume}")))
            .unwrap_or_else(|| panic!("no URI for {volume} in {:?}", self.uris))
            .clone()
    }

    /// Kills the process with SIGKILL (a crash: no flush, no goodbye) and reaps it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the daemon") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command, returning its output; panics with stderr if it fails to start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

/// Runs a command and asserts success, returning stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io -f raw URI -c CMD...`, asserting success and no "Pattern verification failed".
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd);
    assert!(!out.contains("failed"), "qemu-io reported a failure: {out}");
    out
}

/// The volume every two-site test serves: its name is `vol`.
pub const PAIR_SIZE: &str = "16MiB";
/// Sites fail a request replication cannot finish by then (EIO) instead of waiting 60 s, so a
/// broken build fails the two-site tests quickly rather than hanging them.
pub const PAIR_REQUEST_TIMEOUT_MS: &str = "20000";

/// Site A of a two-site test: it listens for the replication link and is configured by a TOML
/// file (the `[replication]` section, admin API included), so the file path is exercised too.
/// With `log`, its stderr goes there (at info level); otherwise it is inherited.
pub fn pair_site_a(dir: &Path, cluster_id: &str, log: Option<Stdio>) -> Site {
    let config = dir.join("site.toml");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = "{}"
[nbd]
listen = ["127.0.0.1:0"]
[engine]
direct_io = false
[[volume]]
name = "vol"
size = "{PAIR_SIZE}"
[replication]
site = "a"
cluster_id = {cluster_id}
listen = "127.0.0.1:0"
request_timeout_ms = {PAIR_REQUEST_TIMEOUT_MS}
admin = "127.0.0.1:0"
"#,
            dir.display()
        ),
    )
    .expect("write site a's config");
    let args = ["--config", config.to_str().expect("utf-8 path")];
    match log {
        Some(stderr) => Site::stretch_site_logged(dir, &args, stderr),
        None => Site::stretch_site(dir, &args),
    }
}

/// Site B of a two-site test: it dials `peer` (the link emulator in front of site A) and is
/// configured by flags only.
pub fn pair_site_b(dir: &Path, cluster_id: &str, peer: &str) -> Site {
    pair_site_b_with(dir, cluster_id, peer, &[])
}

/// [`pair_site_b`] with `extra` flags (e.g. `--policy async`).
pub fn pair_site_b_with(dir: &Path, cluster_id: &str, peer: &str, extra: &[&str]) -> Site {
    let mut args = vec![
        "--site",
        "b",
        "--cluster-id",
        cluster_id,
        "--peer",
        peer,
        "--volume",
        "vol",
        "--size",
        PAIR_SIZE,
        "--listen",
        "127.0.0.2:0",
        "--admin",
        "127.0.0.2:0",
        "--buffered-io",
        "--request-timeout-ms",
        PAIR_REQUEST_TIMEOUT_MS,
    ];
    args.extend_from_slice(extra);
    Site::stretch_site(dir, &args)
}
