//! A small async NBD client, cheap to share across tasks and built for deep queues.
//!
//! ```text
//! pub struct Client;                                   // Clone: an Arc inside; share freely
//! pub struct ClientOptions { pub export: String, pub structured_replies: bool,
//!                            pub requests_inflight_max: usize }   // impl Default (export "")
//! pub enum ClientError { Io(io::Error), Protocol(String), Server { errno: u32, message: String },
//!                        Closed, Poisoned }
//!
//! impl Client {
//!     pub async fn connect_tcp(addr: impl ToSocketAddrs, export: &str) -> Result<Client, ClientError>;
//!     pub async fn connect_unix(path: impl AsRef<Path>, export: &str) -> Result<Client, ClientError>;
//!     pub async fn connect_tcp_with(addr: impl ToSocketAddrs, options: &ClientOptions) -> Result<..>;
//!     pub async fn connect_unix_with(path: impl AsRef<Path>, options: &ClientOptions) -> Result<..>;
//!     pub fn size_bytes(&self) -> u64;
//!     pub fn transmission_flags(&self) -> u16;
//!     pub fn block_sizes(&self) -> BlockSizes;          // min / preferred / max payload bytes
//!     pub fn structured_replies(&self) -> bool;
//!     pub async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, ClientError>;
//!     pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError>;
//!     pub async fn flush(&self) -> Result<(), ClientError>;
//!     pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ClientError>;
//!     pub async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), ClientError>;
//!     pub async fn cache(&self, offset: u64, len: u32) -> Result<(), ClientError>;
//!     pub async fn block_status(&self, offset: u64, len: u32, req_one: bool) -> Result<Vec<Extent>, ClientError>;
//!     pub async fn disconnect(&self) -> Result<(), ClientError>;   // DISC after in-flight replies
//! }
//! ```
//!
//! How it works: every method takes `&self`, so any number of tasks issue requests on one
//! connection at once. A request takes a slot from a semaphore (at most
//! `requests_inflight_max`, default 512), registers its cookie in a pending table with a
//! oneshot sender, writes its header (and payload) under an async mutex on the socket's write
//! half, then awaits the oneshot. One reader task decodes replies (simple or structured, in any
//! order) and completes the matching oneshot; READ data goes straight from the socket into the
//! result's [`AlignedBuf`]. Errors the server reports come back as
//! [`ClientError::Server`] with the NBD errno and the connection stays usable.
//!
//! Cancellation: dropping a request future before or after its bytes are sent is harmless (a
//! late reply is discarded; the request keeps its slot until then). Dropping it while its bytes are half-written would desynchronise
//! the stream, so the connection is then marked poisoned and every later request fails with
//! [`ClientError::Poisoned`].
//!
//! Negotiation: fixed newstyle (NO_ZEROES when offered), STRUCTURED_REPLY (unless disabled),
//! SET_META_CONTEXT `base:allocation`, then GO asking for NAME and BLOCK_SIZE.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use stretch_engine::{AlignedBuf, Extent, ZeroFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tokio::sync::{oneshot, Mutex, OwnedSemaphorePermit, Semaphore};

use crate::proto::*;

/// What can go wrong with a client request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error talking to the NBD server: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol (or negotiation failed); the connection is unusable.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The server answered this request with an error; the connection stays usable.
    #[error("NBD server error {errno}: {message}")]
    Server { errno: u32, message: String },
    /// The connection is closed (by either side, or after a protocol error).
    #[error("NBD connection closed")]
    Closed,
    /// A request future was dropped mid-send, so the stream can no longer be trusted.
    #[error("NBD connection poisoned by a request cancelled mid-send")]
    Poisoned,
}

impl ClientError {
    /// The NBD errno when the server reported one.
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Block size constraints the server advertised (defaults from the spec when it did not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    pub min_bytes: u32,
    pub preferred_bytes: u32,
    pub max_bytes: u32,
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Export name ("" is the server's default export).
    pub export: String,
    /// Ask for structured replies (needed for block status and sparse reads).
    pub structured_replies: bool,
    /// Requests this client keeps in flight at most; further callers wait for a slot.
    pub requests_inflight_max: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            export: String::new(),
            structured_replies: true,
            requests_inflight_max: 512,
        }
    }
}

/// A shareable NBD connection. Clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

type Writer = Pin<Box<dyn AsyncWrite + Send>>;
type Reader = Pin<Box<dyn AsyncRead + Send>>;

struct Inner {
    writer: Mutex<WriterState>,
    /// Shared with the reader task, which must not keep `Inner` (and so itself) alive.
    shared: Arc<Shared>,
    /// Request slots. A slot travels with its [`Waiter`] and is released when the reply
    /// arrives (or the connection fails), not when the caller stops waiting, so the pending
    /// table never exceeds `slots_max` entries even with abandoned requests.
    slots: Arc<Semaphore>,
    cookie_next: AtomicU64,
    size_bytes: u64,
    transmission_flags: u16,
    block_sizes: BlockSizes,
    structured: bool,
    /// The context id the server gave `base:allocation`, if it selected it.
    base_allocation_id: Option<u32>,
    reader_task: StdMutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The socket's write half. `poisoned` is only read and written under the lock, so a request
/// being written by another task never looks like a cancelled one.
struct WriterState {
    stream: Writer,
    poisoned: bool,
}

struct Shared {
    pending: StdMutex<Pending>,
    /// The slot semaphore's size (it does not expose it); bounds the pending table.
    slots_max: u32,
}

/// The pending table: cookie → what the reply should produce. `closed` is set (with the
/// reason) when the reader stops, so no request waits forever.
struct Pending {
    map: HashMap<u64, Waiter>,
    closed: Option<String>,
}

struct Waiter {
    kind: u16,
    len: u32,
    offset: u64,
    tx: oneshot::Sender<Result<Response, ClientError>>,
    _slot: OwnedSemaphorePermit,
}

enum Response {
    Done,
    Data(AlignedBuf),
    Extents(Vec<Extent>),
}

impl Client {
    /// Connects over TCP (TCP_NODELAY) to `export` with structured replies.
    pub async fn connect_tcp(
        addr: impl ToSocketAddrs,
        export: &str,
    ) -> Result<Client, ClientError> {
        let options = ClientOptions {
            export: export.to_string(),
            ..ClientOptions::default()
        };
        Self::connect_tcp_with(addr, &options).await
    }

    /// Connects over a Unix socket to `export` with structured replies.
    pub async fn connect_unix(path: impl AsRef<Path>, export: &str) -> Result<Client, ClientError> {
        let options = ClientOptions {
            export: export.to_string(),
            ..ClientOptions::default()
        };
        Self::connect_unix_with(path, &options).await
    }

    pub async fn connect_tcp_with(
        addr: impl ToSocketAddrs,
        options: &ClientOptions,
    ) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Self::start(Box::pin(r), Box::pin(w), options).await
    }

    pub async fn connect_unix_with(
        path: impl AsRef<Path>,
        options: &ClientOptions,
    ) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).await?;
        let (r, w) = stream.into_split();
        Self::start(Box::pin(r), Box::pin(w), options).await
    }

    async fn start(
        r: Reader,
        mut w: Writer,
        options: &ClientOptions,
    ) -> Result<Client, ClientError> {
        let mut r: Reader = Box::pin(BufReader::with_capacity(256 * 1024, r));
        let n = negotiate(&mut r, &mut w, options).await?;
        let slots_max =
            u32::try_from(options.requests_inflight_max.clamp(1, 1 << 20)).unwrap_or(1 << 20);
        let shared = Arc::new(Shared {
            pending: StdMutex::new(Pending {
                map: HashMap::new(),
                closed: None,
            }),
            slots_max,
        });
        let inner = Arc::new(Inner {
            writer: Mutex::new(WriterState {
                stream: w,
                poisoned: false,
            }),
            shared: shared.clone(),
            slots: Arc::new(Semaphore::new(slots_max as usize)),
            cookie_next: AtomicU64::new(1),
            size_bytes: n.size_bytes,
            transmission_flags: n.transmission_flags,
            block_sizes: n.block_sizes,
            structured: n.structured,
            base_allocation_id: n.base_allocation_id,
            reader_task: StdMutex::new(None),
        });
        // The reader task ends when the socket closes, failing every waiter; dropping the
        // last Client aborts it (Inner's Drop).
        let task = tokio::spawn(reader_loop(r, shared));
        if let Ok(mut slot) = inner.reader_task.lock() {
            *slot = Some(task);
        }
        Ok(Client { inner })
    }

    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes
    }

    pub fn transmission_flags(&self) -> u16 {
        self.inner.transmission_flags
    }

    pub fn block_sizes(&self) -> BlockSizes {
        self.inner.block_sizes
    }

    pub fn structured_replies(&self) -> bool {
        self.inner.structured
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, ClientError> {
        match self.request(CMD_READ, 0, offset, len, None).await? {
            Response::Data(buf) => Ok(buf),
            _ => Err(ClientError::Protocol("READ reply without data".into())),
        }
    }

    /// Writes `data` at `offset`; with `fua` the server persists it before replying.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol("write larger than 4 GiB".into()))?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, len, Some(data))
            .await
            .map(|_| ())
    }

    pub async fn flush(&self) -> Result<(), ClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, None).await.map(|_| ())
    }

    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_TRIM, flags, offset, len, None)
            .await
            .map(|_| ())
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    ) -> Result<(), ClientError> {
        let mut f = 0;
        if flags.fua {
            f |= CMD_FLAG_FUA;
        }
        if flags.no_hole {
            f |= CMD_FLAG_NO_HOLE;
        }
        if flags.fast {
            f |= CMD_FLAG_FAST_ZERO;
        }
        self.request(CMD_WRITE_ZEROES, f, offset, len, None)
            .await
            .map(|_| ())
    }

    pub async fn cache(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(CMD_CACHE, 0, offset, len, None)
            .await
            .map(|_| ())
    }

    /// `base:allocation` extents from `offset`; needs structured replies.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
        req_one: bool,
    ) -> Result<Vec<Extent>, ClientError> {
        if self.inner.base_allocation_id.is_none() {
            return Err(ClientError::Protocol(
                "base:allocation was not negotiated".into(),
            ));
        }
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        match self
            .request(CMD_BLOCK_STATUS, flags, offset, len, None)
            .await?
        {
            Response::Extents(e) => Ok(e),
            _ => Err(ClientError::Protocol(
                "BLOCK_STATUS reply without extents".into(),
            )),
        }
    }

    /// Waits for every request in flight, then sends DISC and closes the write side.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        // Taking every slot waits for in-flight requests (their slots free on completion).
        let _all = self
            .inner
            .slots
            .acquire_many(self.inner.shared.slots_max)
            .await
            .map_err(|_| ClientError::Closed)?;
        let header = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: self.inner.cookie_next.fetch_add(1, Ordering::Relaxed),
            offset: 0,
            len: 0,
        }
        .encode();
        let mut w = self.inner.writer.lock().await;
        if w.poisoned {
            return Err(ClientError::Poisoned);
        }
        w.stream.write_all(&header).await?;
        w.stream.flush().await?;
        w.stream.shutdown().await?;
        self.inner.slots.close();
        Ok(())
    }

    async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let inner = &*self.inner;
        let slot = inner
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Closed)?;
        let cookie = inner.cookie_next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = inner
                .shared
                .pending
                .lock()
                .map_err(|_| ClientError::Closed)?;
            if let Some(reason) = &p.closed {
                return Err(ClientError::Protocol(reason.clone()));
            }
            p.map.insert(
                cookie,
                Waiter {
                    kind,
                    len,
                    offset,
                    tx,
                    _slot: slot,
                },
            );
        }
        // If this future is dropped before the request is on the wire, the guard removes the
        // cookie again. Once sent, the entry stays until its reply arrives, so a late reply
        // finds its (abandoned) waiter and is discarded instead of looking like a protocol
        // error.
        let mut guard = PendingGuard {
            inner,
            cookie,
            armed: true,
        };
        let header = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        }
        .encode();
        {
            let mut w = inner.writer.lock().await;
            if w.poisoned {
                return Err(ClientError::Poisoned);
            }
            // Poisoned until the whole request is out: a cancellation in between leaves a
            // half-written request on the wire.
            w.poisoned = true;
            let sent = write_all_vectored(&mut w.stream, &header, payload.unwrap_or(&[])).await;
            let sent = match sent {
                Ok(()) => w.stream.flush().await,
                Err(e) => Err(e),
            };
            sent?;
            w.poisoned = false;
            guard.armed = false;
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }
}

struct PendingGuard<'a> {
    inner: &'a Inner,
    cookie: u64,
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(mut p) = self.inner.shared.pending.lock() {
            p.map.remove(&self.cookie);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut t) = self.reader_task.lock() {
            if let Some(t) = t.take() {
                t.abort();
            }
        }
    }
}

/// Writes `header` then `payload` with as few syscalls as the socket allows.
async fn write_all_vectored(w: &mut Writer, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let total = header.len() + payload.len();
    let mut done = 0usize;
    while done < total {
        let n = if done < header.len() {
            let bufs = [IoSlice::new(&header[done..]), IoSlice::new(payload)];
            w.write_vectored(&bufs).await?
        } else {
            w.write(&payload[done - header.len()..]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

struct Negotiated {
    size_bytes: u64,
    transmission_flags: u16,
    block_sizes: BlockSizes,
    structured: bool,
    base_allocation_id: Option<u32>,
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

async fn send_option(w: &mut Writer, opt: u32, data: &[u8]) -> Result<(), ClientError> {
    let len = u32::try_from(data.len()).map_err(|_| protocol("option too long"))?;
    let mut b = Vec::with_capacity(OPTION_HEADER_BYTES + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one option reply: (reply type, data). Replies larger than 64 KiB are refused.
async fn read_option_reply(r: &mut Reader, opt: u32) -> Result<(u32, Vec<u8>), ClientError> {
    let mut h = [0u8; OPTION_REPLY_HEADER_BYTES];
    r.read_exact(&mut h).await?;
    if be_u64(&h, 0) != OPTION_REPLY_MAGIC {
        return Err(protocol("bad option reply magic"));
    }
    if be_u32(&h, 8) != opt {
        return Err(protocol(format!(
            "reply to option {} while waiting for {opt}",
            be_u32(&h, 8)
        )));
    }
    let kind = be_u32(&h, 12);
    let len = be_u32(&h, 16) as usize;
    if len > 64 * 1024 {
        return Err(protocol(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data).await?;
    Ok((kind, data))
}

async fn negotiate(
    r: &mut Reader,
    w: &mut Writer,
    options: &ClientOptions,
) -> Result<Negotiated, ClientError> {
    let mut g = [0u8; GREETING_BYTES];
    r.read_exact(&mut g).await?;
    if be_u64(&g, 0) != NBDMAGIC || be_u64(&g, 8) != IHAVEOPT {
        return Err(protocol("not a newstyle NBD server"));
    }
    let hflags = be_u16(&g, 16);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("server lacks fixed newstyle negotiation"));
    }
    let mut cflags = CLIENT_FLAG_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= CLIENT_FLAG_NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes()).await?;

    let mut structured = false;
    if options.structured_replies {
        send_option(w, OPT_STRUCTURED_REPLY, &[]).await?;
        let (kind, _) = read_option_reply(r, OPT_STRUCTURED_REPLY).await?;
        structured = kind == REP_ACK;
    }
    let name = options.export.as_bytes();
    let name_len = u32::try_from(name.len()).map_err(|_| protocol("export name too long"))?;
    let mut base_allocation_id = None;
    if structured {
        let ctx = CONTEXT_BASE_ALLOCATION.as_bytes();
        let mut d = Vec::new();
        d.extend_from_slice(&name_len.to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
        d.extend_from_slice(ctx);
        send_option(w, OPT_SET_META_CONTEXT, &d).await?;
        loop {
            let (kind, data) = read_option_reply(r, OPT_SET_META_CONTEXT).await?;
            match kind {
                REP_ACK => break,
                REP_META_CONTEXT if data.len() >= 4 => {
                    if &data[4..] == ctx {
                        base_allocation_id = Some(be_u32(&data, 0));
                    }
                }
                k if k & (1 << 31) != 0 => break, // No contexts; block status unavailable.
                _ => return Err(protocol("unexpected SET_META_CONTEXT reply")),
            }
        }
    }
    let mut d = Vec::new();
    d.extend_from_slice(&name_len.to_be_bytes());
    d.extend_from_slice(name);
    d.extend_from_slice(&2u16.to_be_bytes());
    d.extend_from_slice(&INFO_NAME.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(w, OPT_GO, &d).await?;
    let mut export = None;
    let mut block_sizes = BlockSizes {
        min_bytes: 1,
        preferred_bytes: 4096,
        max_bytes: 32 * 1024 * 1024,
    };
    loop {
        let (kind, data) = read_option_reply(r, OPT_GO).await?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => match be_u16(&data, 0) {
                INFO_EXPORT if data.len() == 12 => {
                    export = Some((be_u64(&data, 2), be_u16(&data, 10)));
                }
                INFO_BLOCK_SIZE if data.len() == 14 => {
                    block_sizes = BlockSizes {
                        min_bytes: be_u32(&data, 2),
                        preferred_bytes: be_u32(&data, 6),
                        max_bytes: be_u32(&data, 10),
                    };
                }
                _ => {}
            },
            k if k & (1 << 31) != 0 => {
                let msg = String::from_utf8_lossy(&data).into_owned();
                return Err(protocol(format!("GO refused (reply {k:#x}): {msg}")));
            }
            _ => return Err(protocol("unexpected GO reply")),
        }
    }
    let (size_bytes, transmission_flags) =
        export.ok_or_else(|| protocol("GO succeeded without INFO_EXPORT"))?;
    Ok(Negotiated {
        size_bytes,
        transmission_flags,
        block_sizes,
        structured,
        base_allocation_id,
    })
}

/// Decodes replies until the socket closes or the server breaks the protocol, then fails every
/// waiter so that no request hangs.
async fn reader_loop(mut r: Reader, inner: Arc<Shared>) {
    let reason = match read_replies(&mut r, &inner).await {
        Ok(()) => "server closed the connection".to_string(),
        Err(e) => e.to_string(),
    };
    let waiters = match inner.pending.lock() {
        Ok(mut p) => {
            p.closed = Some(reason.clone());
            std::mem::take(&mut p.map)
        }
        Err(_) => return,
    };
    for (_, w) in waiters {
        let _ = w.tx.send(Err(ClientError::Protocol(reason.clone())));
    }
}

/// State of a structured reply being assembled.
struct Partial {
    waiter: Waiter,
    data: Option<AlignedBuf>,
    extents: Vec<Extent>,
    error: Option<ClientError>,
}

async fn read_replies(r: &mut Reader, inner: &Shared) -> Result<(), ClientError> {
    // Structured replies of different cookies may interleave chunk by chunk.
    let mut partial: HashMap<u64, Partial> = HashMap::new();
    loop {
        let mut magic = [0u8; 4];
        match r.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                r.read_exact(&mut h).await?;
                let error = be_u32(&h, 0);
                let cookie = be_u64(&h, 4);
                let waiter = take_waiter(inner, cookie)?;
                let result = if error != 0 {
                    Err(ClientError::Server {
                        errno: error,
                        message: String::new(),
                    })
                } else if waiter.kind == CMD_READ {
                    let mut buf = AlignedBuf::zeroed(waiter.len as usize);
                    r.read_exact(&mut buf).await?;
                    Ok(Response::Data(buf))
                } else if waiter.kind == CMD_BLOCK_STATUS {
                    return Err(protocol("simple reply to BLOCK_STATUS"));
                } else {
                    Ok(Response::Done)
                };
                let _ = waiter.tx.send(result);
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; CHUNK_HEADER_BYTES - 4];
                r.read_exact(&mut h).await?;
                let flags = be_u16(&h, 0);
                let kind = be_u16(&h, 2);
                let cookie = be_u64(&h, 4);
                let len = be_u32(&h, 12);
                let entry = match partial.remove(&cookie) {
                    Some(p) => p,
                    None => {
                        let waiter = take_waiter(inner, cookie)?;
                        let data = (waiter.kind == CMD_READ)
                            .then(|| AlignedBuf::zeroed(waiter.len as usize));
                        Partial {
                            waiter,
                            data,
                            extents: Vec::new(),
                            error: None,
                        }
                    }
                };
                let mut entry = entry;
                read_chunk(r, &mut entry, kind, len).await?;
                if flags & CHUNK_FLAG_DONE != 0 {
                    let p = entry;
                    let result = match p.error {
                        Some(e) => Err(e),
                        None => match p.waiter.kind {
                            CMD_READ => match p.data {
                                Some(d) => Ok(Response::Data(d)),
                                None => Err(protocol("READ without buffer")),
                            },
                            CMD_BLOCK_STATUS if p.extents.is_empty() => {
                                Err(protocol("BLOCK_STATUS reply without extents"))
                            }
                            CMD_BLOCK_STATUS => Ok(Response::Extents(p.extents)),
                            _ => Ok(Response::Done),
                        },
                    };
                    let _ = p.waiter.tx.send(result);
                } else {
                    if partial.len() >= inner.slots_max as usize {
                        return Err(protocol("more partial replies than requests"));
                    }
                    partial.insert(cookie, entry);
                }
            }
            other => return Err(protocol(format!("bad reply magic {other:#x}"))),
        }
    }
}

fn take_waiter(inner: &Shared, cookie: u64) -> Result<Waiter, ClientError> {
    let mut p = inner.pending.lock().map_err(|_| ClientError::Closed)?;
    p.map
        .remove(&cookie)
        .ok_or_else(|| protocol(format!("reply for unknown cookie {cookie}")))
}

async fn read_chunk(
    r: &mut Reader,
    p: &mut Partial,
    kind: u16,
    len: u32,
) -> Result<(), ClientError> {
    let len = len as usize;
    match kind {
        CHUNK_NONE if len == 0 => Ok(()),
        CHUNK_OFFSET_DATA if len >= 8 => {
            let mut o = [0u8; 8];
            r.read_exact(&mut o).await?;
            let offset = u64::from_be_bytes(o);
            let n = len - 8;
            let start = offset
                .checked_sub(p.waiter.offset)
                .and_then(|s| usize::try_from(s).ok());
            let buf = p.data.as_mut();
            match (start, buf) {
                (Some(s), Some(buf)) if s.checked_add(n).is_some_and(|e| e <= buf.len()) => {
                    r.read_exact(&mut buf[s..s + n]).await?;
                    Ok(())
                }
                _ => Err(protocol("OFFSET_DATA outside the request")),
            }
        }
        CHUNK_OFFSET_HOLE if len == 12 => {
            let mut b = [0u8; 12];
            r.read_exact(&mut b).await?;
            let offset = be_u64(&b, 0);
            let size = be_u32(&b, 8) as u64;
            // Checked arithmetic: the offset comes from the server and may be anything.
            let inside = offset
                .checked_sub(p.waiter.offset)
                .and_then(|rel| rel.checked_add(size))
                .is_some_and(|end| end <= u64::from(p.waiter.len));
            // The buffer starts zeroed, so a hole needs no copy.
            if inside && p.data.is_some() {
                Ok(())
            } else {
                Err(protocol("OFFSET_HOLE outside the request"))
            }
        }
        CHUNK_BLOCK_STATUS if len >= 4 && (len - 4) % 8 == 0 && len <= 8 * (1 << 20) + 4 => {
            let mut b = vec![0u8; len];
            r.read_exact(&mut b).await?;
            for e in b[4..].chunks_exact(8) {
                let state = be_u32(e, 4);
                p.extents.push(Extent {
                    len_bytes: u64::from(be_u32(e, 0)),
                    hole: state & STATE_HOLE != 0,
                    zero: state & STATE_ZERO != 0,
                });
            }
            Ok(())
        }
        CHUNK_ERROR | CHUNK_ERROR_OFFSET if (6..=64 * 1024).contains(&len) => {
            let mut b = vec![0u8; len];
            r.read_exact(&mut b).await?;
            let errno = be_u32(&b, 0);
            let msg_len = be_u16(&b, 4) as usize;
            let message = b
                .get(6..6 + msg_len)
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            p.error = Some(ClientError::Server { errno, message });
            Ok(())
        }
        _ => Err(protocol(format!("bad chunk type {kind} of {len} bytes"))),
    }
}
