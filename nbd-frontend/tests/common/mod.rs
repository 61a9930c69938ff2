//! Shared test scaffolding: an in-process server on a background runtime, tool detection, and
//! bounded subprocess runs.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stretch_engine::BlockDevice;
use stretch_nbd::{Export, MemDevice, Server, ServerConfig};

/// A server listening on 127.0.0.1:random and on a private Unix socket, run by its own
/// runtime so that blocking tools and blocking test code can talk to it.
pub struct TestServer<D: BlockDevice> {
    pub server: Arc<Server<D>>,
    pub addr: SocketAddr,
    pub unix_path: PathBuf,
    pub dir: tempfile::TempDir,
    rt: Option<tokio::runtime::Runtime>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer<MemDevice> {
    /// Exports of MemDevices: (name, size in bytes, read-only).
    pub fn mem(config: ServerConfig, exports: &[(&str, u64, bool)]) -> (Self, Vec<Arc<MemDevice>>) {
        let devices: Vec<_> = exports
            .iter()
            .map(|(_, size, _)| Arc::new(MemDevice::new(*size)))
            .collect();
        let exports = exports
            .iter()
            .zip(&devices)
            .map(|((name, _, ro), d)| Export {
                name: name.to_string(),
                description: format!("test export {name}"),
                device: d.clone(),
                read_only: *ro,
            })
            .collect();
        (TestServer::start(config, exports), devices)
    }
}

impl<D: BlockDevice> TestServer<D> {
    pub fn start(config: ServerConfig, exports: Vec<Export<D>>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let unix_path = dir.path().join("nbd.sock");
        let server = Server::new(config, exports);
        let (addr, tasks) = rt.block_on(async {
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind tcp");
            let addr = tcp.local_addr().expect("local addr");
            let unix = tokio::net::UnixListener::bind(&unix_path).expect("bind unix");
            let t1 = tokio::spawn(server.clone().serve_tcp(tcp));
            let t2 = tokio::spawn(server.clone().serve_unix(unix));
            (addr, vec![t1, t2])
        });
        TestServer {
            server,
            addr,
            unix_path,
            dir,
            rt: Some(rt),
            tasks,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.addr.port())
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix_path.display())
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime")
    }

    /// Shuts down and checks that both listeners return within `limit`.
    pub fn shutdown_and_join(mut self, limit: Duration) {
        self.server.shutdown();
        let tasks = std::mem::take(&mut self.tasks);
        let rt = self.rt.take().expect("runtime");
        rt.block_on(async {
            for t in tasks {
                let r = tokio::time::timeout(limit, t)
                    .await
                    .expect("listener did not finish after shutdown");
                r.expect("listener task").expect("listener result");
            }
        });
    }
}

impl<D: BlockDevice> Drop for TestServer<D> {
    fn drop(&mut self) {
        self.server.shutdown();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// True when `tool` can be run. When it cannot: prints a loud SKIPPED line and returns false,
/// unless STRETCH_REQUIRE_TOOLS=1, in which case the test fails.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    require(tool, found)
}

/// nbdsh is `python3 -m nbd`; NBD.md §4 says to run it with /usr/bin/python3 because another
/// python3 on PATH may lack the module, so that is what has to work.
pub fn require_nbdsh() -> bool {
    let found = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    require("nbdsh (/usr/bin/python3 with the nbd module)", found)
}

fn require(tool: &str, found: bool) -> bool {
    if found {
        return true;
    }
    if std::env::var("STRETCH_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{tool} not installed and STRETCH_REQUIRE_TOOLS=1");
    }
    eprintln!("SKIPPED: {tool} not installed");
    false
}

/// Runs a command to completion within `limit` (killed and failed beyond it).
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let deadline = Instant::now() + limit;
    // Drain pipes on threads so a chatty tool cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().expect("stdout thread"),
        stderr: t_err.join().expect("stderr thread"),
    }
}

/// Runs and asserts success, returning stdout as text.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, limit);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
