//! One proxy: a listener, and for every accepted connection a link to the upstream with two
//! pipes (one per direction) that apply the proxy's toxics live.
//!
//! The data path runs on plain threads with blocking sockets, two per direction (a reader
//! that stamps arrival times and a writer that releases bytes when due). Delays are timed by
//! futex/nanosleep, which is accurate to tens of microseconds, where tokio's timer wheel
//! rounds every sleep up to the next millisecond: at RTT 2 ms that would be a 25-50% error.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::toxic::{splitmix64, DirParams, Stream, Toxic};

/// Largest chunk a reader takes off the socket at once.
const CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Bytes a direction may hold between reader and writer before the reader stops reading
/// and TCP back-pressure reaches the sender. At 10 ms one-way delay this still carries
/// 400 MB/s, more than the loopback benchmarks need.
const QUEUE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Connections one proxy carries at once; further ones are closed on accept.
const CONNECTIONS_MAX: usize = 1024;
/// A bandwidth-paced write carries at most this much time's worth of bytes, so pacing
/// stays smooth at low rates (Toxiproxy splits at 100 ms; we are finer).
const PACE_SLICE_US: u64 = 5_000;
/// Lateness of the bandwidth pacer that may be made up later; bounds bursts to rate x this.
const PACE_CREDIT: Duration = Duration::from_millis(10);
/// Segment size used to turn a per-segment loss probability into a per-chunk one.
const SEGMENT_BYTES: usize = 1448;
/// How long before a release time the writer stops sleeping and spins instead.
const SPIN_BEFORE_RELEASE: Duration = Duration::from_micros(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const THREAD_STACK_BYTES: usize = 256 * 1024;

static NEXT_SALT: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another holder does not invalidate the plain data behind these locks.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The toxics of one proxy, shared by its connections' writers.
#[derive(Default)]
pub struct ToxicSet {
    toxics: RwLock<Vec<Toxic>>,
}

impl ToxicSet {
    pub fn snapshot(&self) -> Vec<Toxic> {
        self.toxics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn with<R>(&self, f: impl FnOnce(&[Toxic]) -> R) -> R {
        f(&self.toxics.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn with_mut<R>(&self, f: impl FnOnce(&mut Vec<Toxic>) -> R) -> R {
        f(&mut self.toxics.write().unwrap_or_else(|e| e.into_inner()))
    }

    fn params(&self, stream: Stream, salt: u64) -> DirParams {
        self.with(|t| DirParams::fold(t.iter(), stream, salt))
    }
}

struct Chunk {
    data: Vec<u8>,
    /// Where the unsent part starts; a paced chunk leaves in slices.
    sent: usize,
    arrival: Instant,
    /// Jitter and loss-stall drawn once, when the chunk first reaches the head of the
    /// queue, so a chunk's release time does not move each time the writer wakes.
    extra_us: Option<i64>,
}

#[derive(Default)]
struct PipeState {
    queue: VecDeque<Chunk>,
    queued_bytes: usize,
    /// The reader saw end of stream (or a read error): after the queue drains, half-close.
    eof: bool,
    /// The connection is being torn down: both threads leave.
    closed: bool,
}

/// One direction of one connection: a bounded queue between reader and writer threads.
#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
    /// Signalled on push, pop, close and on every toxic change.
    changed: Condvar,
}

/// One proxied connection.
struct Conn {
    salt: u64,
    client: TcpStream,
    server: TcpStream,
    up: Pipe,
    down: Pipe,
    /// Directions whose writer finished; the second one closes the sockets.
    writers_done: AtomicU64,
    closing: AtomicBool,
}

impl Conn {
    fn pipe(&self, stream: Stream) -> &Pipe {
        match stream {
            Stream::Upstream => &self.up,
            Stream::Downstream => &self.down,
        }
    }

    fn wake(&self) {
        for p in [&self.up, &self.down] {
            let _guard = lock(&p.state);
            p.changed.notify_all();
        }
    }

    /// Tears the connection down; with `reset`, the client and upstream see a TCP RST.
    fn close(&self, reset: bool) {
        // Only the first close acts: a writer that finishes while a reset is under way must
        // not get its FIN out before the RST.
        if self.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in [&self.client, &self.server] {
            if reset {
                abort_with_rst(s);
            }
            // Shutting down wakes the reader threads blocked in read().
            let _ = s.shutdown(Shutdown::Both);
        }
        for p in [&self.up, &self.down] {
            let mut st = lock(&p.state);
            st.closed = true;
            st.queue.clear();
            st.queued_bytes = 0;
            p.changed.notify_all();
        }
    }
}

/// Sends a TCP RST now, while other threads still hold clones of the socket: shutdown()
/// would send a FIN, and SO_LINGER=0 only resets on the last close(). Linux's
/// connect(AF_UNSPEC) disconnects an established socket with a RST and wakes blocked
/// readers with ECONNRESET.
fn abort_with_rst(s: &TcpStream) {
    // SAFETY: an all-zero sockaddr is a valid value of the plain C struct.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: the fd is owned by `s` and open for the duration of the call; the address
    // points at a live sockaddr of the stated size.
    unsafe {
        libc::connect(
            s.as_raw_fd(),
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        );
    }
}

/// Asks the kernel to fire this thread's timers on time: the default 50 us timer slack
/// would add up to 50 us to every emulated delay.
fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// The user-visible settings of a proxy, in Toxiproxy's terms.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub name: String,
    pub listen: String,
    pub upstream: String,
    pub enabled: bool,
}

struct Running {
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    bound: SocketAddr,
}

/// A proxy with its toxics and its live connections.
pub struct Proxy {
    config: Mutex<ProxyConfig>,
    pub toxics: Arc<ToxicSet>,
    running: Mutex<Option<Running>>,
    conns: Arc<Mutex<BTreeMap<u64, Arc<Conn>>>>,
}

impl Proxy {
    /// Creates the proxy and, if enabled, binds its listener (so `listen` "host:0" turns
    /// into the real port at once, as Toxiproxy reports it).
    pub fn new(config: ProxyConfig) -> io::Result<Arc<Proxy>> {
        let proxy = Arc::new(Proxy {
            config: Mutex::new(config.clone()),
            toxics: Arc::new(ToxicSet::default()),
            running: Mutex::new(None),
            conns: Arc::new(Mutex::new(BTreeMap::new())),
        });
        if config.enabled {
            proxy.start()?;
        }
        Ok(proxy)
    }

    pub fn config(&self) -> ProxyConfig {
        lock(&self.config).clone()
    }

    pub fn name(&self) -> String {
        lock(&self.config).name.clone()
    }

    /// The bound listen address while enabled.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        lock(&self.running).as_ref().map(|r| r.bound)
    }

    pub fn to_json(&self) -> Value {
        let c = self.config();
        let toxics: Vec<Value> = self.toxics.snapshot().iter().map(Toxic::to_json).collect();
        json!({
            "name": c.name,
            "listen": c.listen,
            "upstream": c.upstream,
            "enabled": c.enabled,
            "toxics": toxics,
        })
    }

    fn start(&self) -> io::Result<()> {
        let mut running = lock(&self.running);
        if running.is_some() {
            return Ok(());
        }
        let listen = lock(&self.config).listen.clone();
        let listener = Arc::new(TcpListener::bind(listen.as_str())?);
        let bound = listener.local_addr()?;
        lock(&self.config).listen = bound.to_string();
        let stopping = Arc::new(AtomicBool::new(false));
        let (l, stop, conns, toxics) = (
            listener.clone(),
            stopping.clone(),
            self.conns.clone(),
            self.toxics.clone(),
        );
        let upstream = lock(&self.config).upstream.clone();
        thread::Builder::new()
            .name("link-accept".into())
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || accept_loop(l, stop, upstream, conns, toxics))?;
        *running = Some(Running {
            listener,
            stopping,
            bound,
        });
        Ok(())
    }

    /// Stops listening and drops every connection, as disabling a Toxiproxy proxy does.
    pub fn stop(&self) {
        if let Some(r) = lock(&self.running).take() {
            r.stopping.store(true, Ordering::SeqCst);
            // SAFETY: the listener fd stays open while `r.listener` lives; shutdown() on a
            // listening socket makes a blocked accept() return on Linux, which std's API
            // cannot do.
            unsafe {
                libc::shutdown(r.listener.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        self.reset_connections(false);
    }

    /// Closes all live connections; `reset` sends RST instead of FIN.
    pub fn reset_connections(&self, reset: bool) {
        let conns: Vec<Arc<Conn>> = lock(&self.conns).values().cloned().collect();
        for c in conns {
            c.close(reset);
        }
    }

    pub fn connection_count(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Applies a new configuration: listen/upstream changes restart the listener (and drop
    /// connections), enabled toggles it.
    pub fn update(&self, new: ProxyConfig) -> io::Result<()> {
        let old = self.config();
        let moved = new.listen != old.listen || new.upstream != old.upstream;
        if moved || !new.enabled {
            self.stop();
        }
        {
            let mut c = lock(&self.config);
            c.listen = new.listen;
            c.upstream = new.upstream;
            c.enabled = new.enabled;
        }
        if new.enabled {
            self.start()?;
        }
        Ok(())
    }

    /// Wakes every writer so it re-reads the toxics; called after each change.
    pub fn toxics_changed(&self) {
        let conns: Vec<Arc<Conn>> = lock(&self.conns).values().cloned().collect();
        for c in conns {
            c.wake();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    upstream: String,
    conns: Arc<Mutex<BTreeMap<u64, Arc<Conn>>>>,
    toxics: Arc<ToxicSet>,
) {
    loop {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) if stopping.load(Ordering::SeqCst) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning on the error.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        if lock(&conns).len() >= CONNECTIONS_MAX {
            continue; // dropping `client` closes it
        }
        let (conns, toxics, upstream) = (conns.clone(), toxics.clone(), upstream.clone());
        // Connecting to the upstream may take up to CONNECT_TIMEOUT; do it off the accept
        // thread so one dead upstream does not stall other clients.
        let _ = thread::Builder::new()
            .name("link-connect".into())
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || {
                if let Err(_e) = open_link(client, &upstream, conns, toxics) {
                    // The client sees its connection closed, as with Toxiproxy.
                }
            });
    }
}

fn connect_upstream(upstream: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "upstream resolves to nothing");
    for addr in upstream.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn open_link(
    client: TcpStream,
    upstream: &str,
    conns: Arc<Mutex<BTreeMap<u64, Arc<Conn>>>>,
    toxics: Arc<ToxicSet>,
) -> io::Result<()> {
    let server = connect_upstream(upstream)?;
    // Latency is the whole point; Nagle would add up to 40 ms of its own.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let salt = splitmix64(NEXT_SALT.fetch_add(1, Ordering::Relaxed));
    let conn = Arc::new(Conn {
        salt,
        client,
        server,
        up: Pipe::default(),
        down: Pipe::default(),
        writers_done: AtomicU64::new(0),
        closing: AtomicBool::new(false),
    });
    lock(&conns).insert(salt, conn.clone());
    for stream in [Stream::Upstream, Stream::Downstream] {
        let (src, dst) = match stream {
            Stream::Upstream => (conn.client.try_clone()?, conn.server.try_clone()?),
            Stream::Downstream => (conn.server.try_clone()?, conn.client.try_clone()?),
        };
        let c = conn.clone();
        thread::Builder::new()
            .name("link-read".into())
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || reader(&c, stream, src))?;
        let (c, t, cs) = (conn.clone(), toxics.clone(), conns.clone());
        thread::Builder::new()
            .name("link-write".into())
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || {
                writer(&c, stream, dst, &t);
                if c.writers_done.fetch_add(1, Ordering::SeqCst) == 1 {
                    c.close(false);
                    lock(&cs).remove(&c.salt);
                }
            })?;
    }
    Ok(())
}

fn reader(conn: &Conn, stream: Stream, mut src: TcpStream) {
    let pipe = conn.pipe(stream);
    let mut buf = vec![0u8; CHUNK_BYTES_MAX];
    loop {
        let n = match src.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let arrival = Instant::now();
        let mut st = lock(&pipe.state);
        if n == 0 {
            st.eof = true;
            pipe.changed.notify_all();
            return;
        }
        while st.queued_bytes + n > QUEUE_BYTES_MAX && !st.closed {
            st = pipe.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.closed {
            return;
        }
        st.queued_bytes += n;
        st.queue.push_back(Chunk {
            data: buf[..n].to_vec(),
            sent: 0,
            arrival,
            extra_us: None,
        });
        pipe.changed.notify_all();
    }
}

/// What the writer does after looking at the queue and the toxics under the lock.
enum Step {
    SpinUntil(Instant),
    Write { bytes: Vec<u8>, close_after: bool },
    Finish { slow_close_ms: u64 },
    Close { reset: bool },
    Exit,
}

fn writer(conn: &Conn, stream: Stream, mut dst: TcpStream, toxics: &ToxicSet) {
    tighten_timer_slack();
    let pipe = conn.pipe(stream);
    let mut rng = SmallRng::seed_from_u64(conn.salt ^ stream as u64);
    // Release times never go backwards, so a shorter delay or jitter cannot reorder bytes.
    let mut last_release = Instant::now();
    // Bandwidth pacing: the earliest time the next byte may leave.
    let mut pace_free_at = Instant::now();
    let mut sent_bytes: u64 = 0;
    // Timers of the timeout and reset_peer toxics start when the writer first sees them.
    let mut drop_since: Option<Instant> = None;
    let mut reset_since: Option<Instant> = None;
    loop {
        let step = {
            let mut st = lock(&pipe.state);
            loop {
                if st.closed {
                    break Step::Exit;
                }
                let p = toxics.params(stream, conn.salt);
                let now = Instant::now();
                let mut wake_at: Option<Instant> = None;
                if let Some(ms) = p.reset_after_ms {
                    let at = *reset_since.get_or_insert(now) + Duration::from_millis(ms);
                    if now >= at {
                        break Step::Close { reset: true };
                    }
                    wake_at = Some(at);
                } else {
                    reset_since = None;
                }
                if let Some(ms) = p.drop_close_after_ms {
                    // Toxiproxy's timeout toxic: data is lost, not held.
                    if st.queued_bytes > 0 {
                        st.queue.clear();
                        st.queued_bytes = 0;
                        pipe.changed.notify_all();
                    }
                    let since = *drop_since.get_or_insert(now);
                    if ms > 0 {
                        let at = since + Duration::from_millis(ms);
                        if now >= at {
                            break Step::Close { reset: false };
                        }
                        wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
                    }
                    st = wait(pipe, st, wake_at);
                    continue;
                }
                drop_since = None;
                if p.hold {
                    st = wait(pipe, st, wake_at);
                    continue;
                }
                let Some(head) = st.queue.front_mut() else {
                    if st.eof {
                        break Step::Finish {
                            slow_close_ms: p.slow_close_ms,
                        };
                    }
                    st = wait(pipe, st, wake_at);
                    continue;
                };
                let extra_us = *head
                    .extra_us
                    .get_or_insert_with(|| draw_extra_us(&p, head.data.len(), &mut rng));
                let due_us = (p.delay_us as i64 + extra_us).max(0) as u64;
                let release = (head.arrival + Duration::from_micros(due_us)).max(last_release);
                if now < release {
                    // Timed waits wake tens of microseconds late (more on a busy machine):
                    // wake a little early and spin the rest off the lock.
                    let early = release.checked_sub(SPIN_BEFORE_RELEASE).unwrap_or(release);
                    if now < early {
                        st = wait(pipe, st, Some(wake_at.map_or(early, |w| w.min(early))));
                        continue;
                    }
                    break Step::SpinUntil(release);
                }
                if p.rate_bytes_per_s.is_some() && now < pace_free_at {
                    st = wait(
                        pipe,
                        st,
                        Some(wake_at.map_or(pace_free_at, |w| w.min(pace_free_at))),
                    );
                    continue;
                }
                last_release = release;
                let mut take = head.data.len() - head.sent;
                if let Some(rate) = p.rate_bytes_per_s {
                    let slice_bytes =
                        (rate.saturating_mul(PACE_SLICE_US) / 1_000_000).max(1) as usize;
                    take = take.min(slice_bytes);
                    let cost_us = (take as u64).saturating_mul(1_000_000) / rate;
                    // Credit for at most PACE_CREDIT of lateness: a writer that woke late may
                    // catch up (or the long-run rate would fall short on a busy machine), but
                    // an idle link does not bank a burst.
                    let floor = now.checked_sub(PACE_CREDIT).unwrap_or(now);
                    pace_free_at = pace_free_at.max(floor) + Duration::from_micros(cost_us);
                }
                let mut close_after = false;
                if let Some(limit) = p.limit_bytes {
                    let left = limit.saturating_sub(sent_bytes) as usize;
                    if take >= left {
                        take = left;
                        close_after = true;
                    }
                }
                let bytes = head.data[head.sent..head.sent + take].to_vec();
                head.sent += take;
                if head.sent == head.data.len() || close_after {
                    if let Some(done) = st.queue.pop_front() {
                        st.queued_bytes -= done.data.len();
                    }
                    pipe.changed.notify_all();
                }
                break Step::Write { bytes, close_after };
            }
        };
        match step {
            Step::Exit => return,
            Step::SpinUntil(at) => {
                while Instant::now() < at {
                    // Yield rather than burn: on a busy machine others need the core.
                    thread::yield_now();
                }
            }
            Step::Close { reset } => {
                conn.close(reset);
                return;
            }
            Step::Finish { slow_close_ms } => {
                if slow_close_ms > 0 {
                    thread::sleep(Duration::from_millis(slow_close_ms));
                }
                // Pass the half-close on: the peer reads EOF, the other direction goes on.
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Step::Write { bytes, close_after } => {
                if dst.write_all(&bytes).is_err() {
                    conn.close(false);
                    return;
                }
                sent_bytes += bytes.len() as u64;
                if close_after {
                    conn.close(false);
                    return;
                }
            }
        }
    }
}

fn wait<'a>(
    pipe: &Pipe,
    st: MutexGuard<'a, PipeState>,
    until: Option<Instant>,
) -> MutexGuard<'a, PipeState> {
    match until {
        None => pipe.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
        Some(at) => {
            let left = at.saturating_duration_since(Instant::now());
            pipe.changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0
        }
    }
}

/// Jitter (uniform in [-jitter, +jitter], as Toxiproxy's latency toxic) plus a stall if a
/// segment of this chunk is "lost".
fn draw_extra_us(p: &DirParams, len: usize, rng: &mut SmallRng) -> i64 {
    let mut extra = 0i64;
    if p.jitter_us > 0 {
        let j = p.jitter_us as i64;
        extra += rng.random_range(-j..=j);
    }
    if let Some((prob, stall_us)) = p.loss {
        let segments = len.div_ceil(SEGMENT_BYTES) as i32;
        let p_any = 1.0 - (1.0 - prob).powi(segments);
        if rng.random_bool(p_any.clamp(0.0, 1.0)) {
            extra += stall_us as i64;
        }
    }
    extra
}
