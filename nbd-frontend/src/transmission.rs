//! The transmission phase: pipelined requests, completed out of order.
//!
//! One reader (this function's loop) decodes requests, checks them completely before touching
//! the device, reads WRITE payloads straight into [`AlignedBuf`]s and spawns one task per
//! request. Tasks send their whole reply (every chunk of it) as one message to the single
//! writer task, so replies and chunks never interleave on the socket (NBD.md §5, nbd #43).
//!
//! Bounds: a request holds one of `requests_inflight_max` permits and, for READ and WRITE,
//! permits for its payload bytes out of `inflight_bytes_max`, from before its payload is read
//! until its reply is on the socket. So memory per connection is bounded, and when the bound
//! is reached the reader stops reading and TCP pushes back on the client.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use stretch_engine::{AlignedBuf, BlockDevice, BlockError, Extent, ZeroFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::handshake::Session;
use crate::proto::*;
use crate::server::{wait_shutdown, Server};

/// Extents in one BLOCK_STATUS reply (the spec allows 2^20; this keeps a reply under 64 KiB).
const EXTENTS_MAX: usize = 8192;
/// The largest extent length that fits the 32-bit field and stays block-aligned.
const EXTENT_BYTES_MAX: u64 = 0xFFFF_F000;

/// Requests up to this size are polled once by the reader before (if still pending) getting
/// their own task.
const INLINE_POLL_BYTES_MAX: u32 = 128 * 1024;

/// One reply, written to the socket in one piece.
struct Outgoing {
    parts: Vec<Part>,
    data: Option<AlignedBuf>,
    /// Released only after the reply is written: the bytes bound covers queued replies too.
    _permits: Permits,
}

enum Part {
    Bytes(Vec<u8>),
    /// A range of `Outgoing::data`.
    Data(Range<usize>),
}

#[derive(Default)]
struct Permits {
    _request: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// A request refused before it reaches the device.
struct Reject {
    errno: u32,
    message: &'static str,
}

fn reject(errno: u32, message: &'static str) -> Reject {
    Reject { errno, message }
}

/// Runs transmission until DISC, EOF, a broken stream, or the end of the shutdown grace period;
/// always lets in-flight requests finish and their replies go out before returning.
pub async fn run<D, R, W>(
    server: Arc<Server<D>>,
    session: Session,
    mut r: BufReader<R>,
    w: W,
) -> io::Result<()>
where
    D: BlockDevice,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let config = server.config().clone();
    // Clamped so that a configuration mistake cannot make Semaphore::new panic.
    let requests_max = config.requests_inflight_max.clamp(1, 1 << 20);
    let bytes_max = config.inflight_bytes_max.clamp(1, Semaphore::MAX_PERMITS);
    let request_slots = Arc::new(Semaphore::new(requests_max));
    let byte_slots = Arc::new(Semaphore::new(bytes_max));
    // Every sender holds a request permit first, so the channel never holds more than
    // `requests_max` replies and `send` never waits on capacity.
    let (tx, rx) = mpsc::channel::<Outgoing>(requests_max);
    // Aborted if this future is dropped (the server's shutdown deadline), so a client that
    // never reads cannot keep a writer task and its socket alive.
    let mut writer = AbortOnDrop(tokio::spawn(writer_loop(w, rx)));
    let ctx = Arc::new(Ctx {
        device: server.exports[session.export].device.clone(),
        session,
    });

    let mut shutdown = server.shutdown_signal();
    let mut close = server.close_signal();
    let mut close_at: Option<Instant> = None;
    let mut header = [0u8; REQUEST_HEADER_BYTES];
    let mut filled = 0usize;
    let result: io::Result<()> = loop {
        // Read the header with cancel-safe `read`, so that a shutdown signal arriving mid-header
        // loses no bytes.
        tokio::select! {
            n = r.read(&mut header[filled..]) => match n {
                Ok(0) if filled == 0 => break Ok(()), // Closed without DISC: same as DISC.
                Ok(0) => break Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e) => break Err(e),
            },
            _ = tx.closed() => break Err(io::Error::other("reply writer stopped")),
            _ = wait_shutdown(&mut shutdown), if close_at.is_none() => {
                close_at = Some(Instant::now() + config.shutdown_grace);
            }
            _ = sleep_until(close_at), if close_at.is_some() => break Ok(()),
            // Server::close_connections: stop reading; requests already running still get
            // their replies below.
            // (An error means the server is gone: closing is right then too.)
            _ = close.changed() => break Ok(()),
        }
        if filled < REQUEST_HEADER_BYTES {
            continue;
        }
        filled = 0;
        let Some(req) = Request::decode(&header) else {
            // NBD.md §5: after a bad magic the stream cannot be trusted; hard disconnect.
            break Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request magic",
            ));
        };
        if req.kind == CMD_DISC {
            break Ok(()); // NBD proto.md: DISC has no reply; finish outstanding, then close.
        }
        let Ok(request_permit) = request_slots.clone().acquire_owned().await else {
            break Err(io::Error::other("request semaphore closed"));
        };
        let mut permits = Permits {
            _request: Some(request_permit),
            _bytes: None,
        };
        if let Err(rej) = check(&req, &ctx.session, close_at.is_some()) {
            if req.kind == CMD_WRITE {
                // The payload follows the header whatever we think of it; it must be consumed
                // to find the next header, or the connection closed (NBD.md §5).
                if req.len > config.oversized_drain_bytes_max {
                    let out = error_reply(&ctx.session, &req, rej.errno, rej.message, permits);
                    let _ = tx.send(out).await;
                    break Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WRITE payload too large to drain",
                    ));
                }
                if let Err(e) = drain(&mut r, u64::from(req.len)).await {
                    break Err(e);
                }
            }
            let out = error_reply(&ctx.session, &req, rej.errno, rej.message, permits);
            if tx.send(out).await.is_err() {
                break Err(io::Error::other("reply writer stopped"));
            }
            continue;
        }
        let cost = match req.kind {
            CMD_READ | CMD_WRITE => (req.len as usize).min(bytes_max),
            _ => 0,
        };
        if cost > 0 {
            // `check` capped len at REQUEST_BYTES_MAX, so the cost fits u32.
            let cost = u32::try_from(cost).unwrap_or(u32::MAX);
            match byte_slots.clone().acquire_many_owned(cost).await {
                Ok(p) => permits._bytes = Some(p),
                Err(_) => break Err(io::Error::other("byte semaphore closed")),
            }
        }
        let payload = if req.kind == CMD_WRITE {
            let mut buf = AlignedBuf::zeroed(req.len as usize);
            if let Err(e) = r.read_exact(&mut buf).await {
                break Err(e); // Disconnected mid-payload: nothing to answer.
            }
            Some(buf)
        } else {
            None
        };
        let inline = req.len <= INLINE_POLL_BYTES_MAX;
        let ctx = ctx.clone();
        let tx = tx.clone();
        let mut task = Box::pin(async move {
            let out = execute(&ctx, req, payload, permits).await;
            // A send error means the writer is gone (socket dead); nothing left to tell.
            // (The request permit guarantees channel capacity, so this never waits.)
            let _ = tx.send(out).await;
        });
        // Poll the request once right here: one that completes at once (a page-cache hit, an
        // already-dirty region) then costs no task spawn and no wake-up. One that has to wait
        // continues in its own task, so the reader goes on reading pipelined requests. Large
        // requests (checksumming megabytes) go straight to a task, in parallel with the reader.
        let finished = inline
            && std::future::poll_fn(|cx| {
                std::task::Poll::Ready(std::future::Future::poll(task.as_mut(), cx).is_ready())
            })
            .await;
        if !finished {
            tokio::spawn(task);
        }
    };
    // In-flight tasks hold sender clones; the writer ends after their replies are written.
    drop(tx);
    let written = match (&mut writer.0).await {
        Ok(w) => w,
        Err(e) => Err(io::Error::other(e)),
    };
    result.and(written)
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort(); // A no-op once the task has finished.
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn drain<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> io::Result<()> {
    let mut scratch = vec![0u8; 64 * 1024];
    while n > 0 {
        let take = n.min(scratch.len() as u64) as usize;
        r.read_exact(&mut scratch[..take]).await?;
        n -= take as u64;
    }
    Ok(())
}

async fn writer_loop<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::Receiver<Outgoing>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    while let Some(out) = rx.recv().await {
        write_out(&mut w, &out).await?;
        drop(out);
        // Batch whatever else is ready into the same flush; bounded by the channel capacity.
        while let Ok(out) = rx.try_recv() {
            write_out(&mut w, &out).await?;
        }
        w.flush().await?;
    }
    w.flush().await?;
    w.shutdown().await
}

async fn write_out<W: AsyncWrite + Unpin>(w: &mut W, out: &Outgoing) -> io::Result<()> {
    for part in &out.parts {
        match part {
            Part::Bytes(b) => w.write_all(b).await?,
            Part::Data(range) => {
                let data = out
                    .data
                    .as_ref()
                    .and_then(|d| d.get(range.clone()))
                    .ok_or_else(|| io::Error::other("reply data range out of bounds"))?;
                w.write_all(data).await?;
            }
        }
    }
    Ok(())
}

struct Ctx<D> {
    device: Arc<D>,
    session: Session,
}

/// Flags each command accepts (NBD proto.md "Command flags"); FUA is valid on every command.
fn flags_allowed(kind: u16) -> u16 {
    CMD_FLAG_FUA
        | match kind {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Everything that can be decided from the header alone (NBD.md §1.6 error codes).
fn check(req: &Request, s: &Session, shutting_down: bool) -> Result<(), Reject> {
    let known = matches!(
        req.kind,
        CMD_READ
            | CMD_WRITE
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    );
    if !known {
        return Err(reject(EINVAL, "unknown command"));
    }
    if shutting_down {
        return Err(reject(ESHUTDOWN, "server is shutting down"));
    }
    if req.flags & !CMD_FLAGS_KNOWN != 0 {
        return Err(reject(EINVAL, "unknown command flags"));
    }
    if req.flags & !flags_allowed(req.kind) != 0 {
        return Err(reject(EINVAL, "flag not valid for this command"));
    }
    if req.flags & CMD_FLAG_DF != 0 && !s.structured {
        return Err(reject(EINVAL, "DF without structured replies"));
    }
    let mutation = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if mutation && s.read_only {
        return Err(reject(EPERM, "export is read-only"));
    }
    let max = stretch_engine::REQUEST_BYTES_MAX;
    if req.kind == CMD_READ && req.len > max {
        // NBD.md §1.6: EOVERFLOW for an oversized command without a payload.
        return Err(reject(EOVERFLOW, "read larger than the 32 MiB maximum"));
    }
    if req.kind == CMD_WRITE && req.len > max {
        return Err(reject(EINVAL, "write larger than the 32 MiB maximum"));
    }
    if req.kind == CMD_FLUSH {
        return Ok(()); // Offset and length carry no meaning for FLUSH.
    }
    let len = u64::from(req.len);
    // Never `offset + len`: an offset near u64::MAX would wrap (NBD.md §5).
    if req.offset > s.size_bytes || len > s.size_bytes - req.offset {
        return Err(if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            reject(ENOSPC, "range beyond the end of the export")
        } else {
            reject(EINVAL, "range beyond the end of the export")
        });
    }
    let block = u64::from(s.block_bytes);
    if mutation && (req.offset % block != 0 || len % block != 0) {
        return Err(reject(
            EINVAL,
            "mutation not aligned to the 4096-byte block size",
        ));
    }
    if req.kind == CMD_BLOCK_STATUS {
        if !s.structured || s.base_allocation_id.is_none() {
            return Err(reject(EINVAL, "no metadata context selected"));
        }
        if req.len == 0 {
            return Err(reject(EINVAL, "zero-length block status"));
        }
    }
    Ok(())
}

/// The one place a [`BlockError`] becomes an NBD errno (NBD.md §1.6).
pub fn errno_for(err: &BlockError, kind: u16, fast_zero: bool) -> u32 {
    match err {
        BlockError::OutOfRange { .. } if matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES) => ENOSPC,
        BlockError::OutOfRange { .. } => EINVAL,
        BlockError::Misaligned { .. } => EINVAL,
        // A payload-carrying command gets EINVAL; one without a payload EOVERFLOW.
        BlockError::TooLarge { .. } if kind == CMD_WRITE => EINVAL,
        BlockError::TooLarge { .. } => EOVERFLOW,
        BlockError::NoSpace => ENOSPC,
        BlockError::Checksum { .. } => EIO,
        // NBD proto.md: ENOTSUP only for FAST_ZERO; without the flag it must never appear.
        BlockError::NotFast if fast_zero => ENOTSUP,
        BlockError::NotFast => EIO,
        BlockError::ReadOnly => EPERM,
        BlockError::Shutdown => ESHUTDOWN,
        BlockError::Io(_) => EIO,
    }
}

fn error_reply(s: &Session, req: &Request, errno: u32, msg: &str, permits: Permits) -> Outgoing {
    let parts = if s.structured {
        // With structured replies, every READ reply (even an early error) must be chunks;
        // using the error chunk for every command also carries the message to the client.
        let msg = clip_message(msg).as_bytes();
        let mut b = Vec::with_capacity(CHUNK_HEADER_BYTES + 6 + msg.len());
        b.extend_from_slice(&chunk_header(
            req.cookie,
            CHUNK_FLAG_DONE,
            CHUNK_ERROR,
            6 + msg.len() as u32,
        ));
        b.extend_from_slice(&errno.to_be_bytes());
        b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        b.extend_from_slice(msg);
        vec![Part::Bytes(b)]
    } else {
        vec![Part::Bytes(simple_reply(req.cookie, errno).to_vec())]
    };
    Outgoing {
        parts,
        data: None,
        _permits: permits,
    }
}

fn ok_reply(s: &Session, req: &Request, permits: Permits) -> Outgoing {
    let head = if s.structured && req.kind == CMD_READ {
        // A zero-length READ: no content to send, only the final chunk.
        chunk_header(req.cookie, CHUNK_FLAG_DONE, CHUNK_NONE, 0).to_vec()
    } else {
        simple_reply(req.cookie, 0).to_vec()
    };
    Outgoing {
        parts: vec![Part::Bytes(head)],
        data: None,
        _permits: permits,
    }
}

async fn execute<D: BlockDevice>(
    ctx: &Ctx<D>,
    req: Request,
    payload: Option<AlignedBuf>,
    permits: Permits,
) -> Outgoing {
    let s = &ctx.session;
    let dev = &*ctx.device;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
    let len = u64::from(req.len);
    let result: Result<Option<Outgoing>, BlockError> = match req.kind {
        // Zero-length requests are answered without bothering the device (NBD.md §1.4).
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE if req.len == 0 => Ok(None),
        CMD_READ => match dev.read(req.offset, req.len).await {
            Ok(buf) if buf.len() == req.len as usize => {
                return read_reply(s, &req, buf, permits);
            }
            // A short buffer from the device would desynchronise the stream: refuse it.
            Ok(_) => Err(BlockError::Io(io::Error::other(
                "device returned a short read",
            ))),
            Err(e) => Err(e),
        },
        CMD_WRITE => match payload {
            Some(buf) => dev.write(req.offset, buf, fua).await.map(|()| None),
            None => Err(BlockError::Io(io::Error::other("WRITE without payload"))),
        },
        CMD_FLUSH => dev.flush().await.map(|()| None),
        CMD_TRIM => dev.trim(req.offset, len, fua).await.map(|()| None),
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                fast,
                fua,
            };
            dev.write_zeroes(req.offset, len, flags)
                .await
                .map(|()| None)
        }
        // A prefetch hint; the device has no cache to warm, and data semantics must not change.
        CMD_CACHE => Ok(None),
        CMD_BLOCK_STATUS => match dev.block_status(req.offset, len).await {
            Ok(extents) => return block_status_reply(s, &req, &extents, permits),
            Err(e) => Err(e),
        },
        _ => Err(BlockError::Io(io::Error::other("unknown command"))),
    };
    match result {
        Ok(Some(out)) => out,
        Ok(None) => ok_reply(s, &req, permits),
        Err(e) => {
            let errno = errno_for(&e, req.kind, fast);
            if errno == EIO {
                tracing::warn!(error = %e, offset = req.offset, len = req.len, kind = req.kind, "NBD request failed");
            }
            error_reply(s, &req, errno, &e.to_string(), permits)
        }
    }
}

/// True when every byte is zero; the inner fold vectorises, the outer `all` exits early on the
/// first non-zero 64 bytes (so real data costs almost nothing to scan).
fn is_zero(s: &[u8]) -> bool {
    s.chunks(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

fn read_reply(s: &Session, req: &Request, buf: AlignedBuf, permits: Permits) -> Outgoing {
    let n = buf.len();
    if !s.structured {
        return Outgoing {
            parts: vec![
                Part::Bytes(simple_reply(req.cookie, 0).to_vec()),
                Part::Data(0..n),
            ],
            data: Some(buf),
            _permits: permits,
        };
    }
    // Runs of (is_hole, range in buf), split at absolute block boundaries. With DF the reply
    // must be one content chunk, so no holes then.
    let mut runs: Vec<(bool, Range<usize>)> = Vec::new();
    let block = s.block_bytes as usize;
    if req.flags & CMD_FLAG_DF != 0 || n < block {
        runs.push((false, 0..n));
    } else {
        let mut pos = 0usize;
        while pos < n {
            let abs = req.offset + pos as u64;
            let end = (pos + block - (abs % block as u64) as usize).min(n);
            let hole = is_zero(&buf[pos..end]);
            match runs.last_mut() {
                Some((h, r)) if *h == hole => r.end = end,
                _ => runs.push((hole, pos..end)),
            }
            pos = end;
        }
    }
    let last = runs.len() - 1;
    let mut parts = Vec::with_capacity(runs.len() * 2);
    for (i, (hole, range)) in runs.into_iter().enumerate() {
        let flags = if i == last { CHUNK_FLAG_DONE } else { 0 };
        let offset = req.offset + range.start as u64;
        let size = (range.end - range.start) as u32;
        if hole {
            let mut b = chunk_header(req.cookie, flags, CHUNK_OFFSET_HOLE, 12).to_vec();
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&size.to_be_bytes());
            parts.push(Part::Bytes(b));
        } else {
            let mut b = chunk_header(req.cookie, flags, CHUNK_OFFSET_DATA, 8 + size).to_vec();
            b.extend_from_slice(&offset.to_be_bytes());
            parts.push(Part::Bytes(b));
            parts.push(Part::Data(range));
        }
    }
    Outgoing {
        parts,
        data: Some(buf),
        _permits: permits,
    }
}

/// Shapes device extents into a spec-conforming BLOCK_STATUS chunk: no zero lengths, 32-bit
/// lengths, at most [`EXTENTS_MAX`], exactly one no longer than the request with REQ_ONE, and
/// at least one (status 0 covering the request is always a safe answer).
fn block_status_reply(
    s: &Session,
    req: &Request,
    extents: &[Extent],
    permits: Permits,
) -> Outgoing {
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let len = u64::from(req.len);
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if e.len_bytes == 0 {
            continue;
        }
        let state = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        let clipped = e.len_bytes > EXTENT_BYTES_MAX;
        let n = e.len_bytes.min(EXTENT_BYTES_MAX);
        match out.last_mut() {
            Some((l, st)) if *st == state && *l + n <= EXTENT_BYTES_MAX => *l += n,
            _ => out.push((n, state)),
        }
        covered += n;
        // After a clipped extent the next one would start at the wrong offset; and a reply
        // may always cover less than asked.
        if clipped || req_one || covered >= len || out.len() >= EXTENTS_MAX {
            break;
        }
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    if req_one {
        out.truncate(1);
        out[0].0 = out[0].0.min(len);
    }
    let id = s.base_allocation_id.unwrap_or(0);
    let payload_len = 4 + 8 * out.len() as u32;
    let mut b = chunk_header(req.cookie, CHUNK_FLAG_DONE, CHUNK_BLOCK_STATUS, payload_len).to_vec();
    b.extend_from_slice(&id.to_be_bytes());
    for (l, st) in out {
        // l ≤ EXTENT_BYTES_MAX, or ≤ the request's u32 length.
        b.extend_from_slice(&(l.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        b.extend_from_slice(&st.to_be_bytes());
    }
    Outgoing {
        parts: vec![Part::Bytes(b)],
        data: None,
        _permits: permits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_errors_map_to_the_nbd_errnos_of_nbd_md_1_6() {
        let oor = || BlockError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        // NBD.md §1.6: ENOSPC for "WRITE / WRITE_ZEROES past EOF", EINVAL for the rest.
        assert_eq!(errno_for(&oor(), CMD_WRITE, false), ENOSPC);
        assert_eq!(errno_for(&oor(), CMD_WRITE_ZEROES, false), ENOSPC);
        assert_eq!(errno_for(&oor(), CMD_READ, false), EINVAL);
        assert_eq!(errno_for(&oor(), CMD_TRIM, false), EINVAL);
        let mis = BlockError::Misaligned { offset: 1, len: 1 };
        assert_eq!(errno_for(&mis, CMD_WRITE, false), EINVAL);
        let big = || BlockError::TooLarge { len: 1, max: 0 };
        assert_eq!(errno_for(&big(), CMD_WRITE, false), EINVAL);
        assert_eq!(errno_for(&big(), CMD_READ, false), EOVERFLOW);
        assert_eq!(errno_for(&BlockError::NoSpace, CMD_WRITE, false), ENOSPC);
        assert_eq!(
            errno_for(&BlockError::Checksum { lba: 3 }, CMD_READ, false),
            EIO
        );
        // "ENOTSUP only for WRITE_ZEROES with FAST_ZERO".
        assert_eq!(
            errno_for(&BlockError::NotFast, CMD_WRITE_ZEROES, true),
            ENOTSUP
        );
        assert_ne!(
            errno_for(&BlockError::NotFast, CMD_WRITE_ZEROES, false),
            ENOTSUP
        );
        assert_eq!(errno_for(&BlockError::ReadOnly, CMD_TRIM, false), EPERM);
        assert_eq!(errno_for(&BlockError::Shutdown, CMD_READ, false), ESHUTDOWN);
        let io = BlockError::Io(io::Error::other("disk"));
        assert_eq!(errno_for(&io, CMD_FLUSH, false), EIO);
    }

    fn session(structured: bool) -> Session {
        Session {
            export: 0,
            structured,
            base_allocation_id: Some(1),
            size_bytes: 1 << 20,
            block_bytes: 4096,
            read_only: false,
        }
    }

    fn extents_of(out: &Outgoing) -> Vec<(u32, u32)> {
        let Part::Bytes(b) = &out.parts[0] else {
            panic!("bytes expected")
        };
        b[CHUNK_HEADER_BYTES + 4..]
            .chunks(8)
            .map(|e| (be_u32(e, 0), be_u32(e, 4)))
            .collect()
    }

    #[test]
    fn block_status_reply_is_shaped_to_the_spec() {
        let req = |flags, len| Request {
            flags,
            kind: CMD_BLOCK_STATUS,
            cookie: 1,
            offset: 0,
            len,
        };
        let e = |len_bytes, hole| Extent {
            len_bytes,
            hole,
            zero: hole,
        };
        let s = session(true);
        // Zero-length extents dropped, equal neighbours merged.
        let devs = [e(4096, true), e(0, false), e(4096, true), e(8192, false)];
        let out = block_status_reply(&s, &req(0, 16384), &devs, Permits::default());
        assert_eq!(extents_of(&out), vec![(8192, 3), (8192, 0)]);
        // NBD proto.md REQ_ONE: exactly one extent, no longer than the request.
        let out = block_status_reply(&s, &req(CMD_FLAG_REQ_ONE, 4096), &devs, Permits::default());
        assert_eq!(extents_of(&out), vec![(4096, 3)]);
        // An extent longer than 32 bits is clipped to an aligned length and ends the reply.
        let huge = [e(1 << 40, true), e(4096, false)];
        let out = block_status_reply(&s, &req(0, u32::MAX), &huge, Permits::default());
        assert_eq!(extents_of(&out), vec![(0xFFFF_F000, 3)]);
        // No extents from the device: one extent of status 0 is "always a safe answer".
        let out = block_status_reply(&s, &req(0, 4096), &[], Permits::default());
        assert_eq!(extents_of(&out), vec![(4096, 0)]);
    }

    #[test]
    fn checks_reject_before_any_allocation() {
        let s = session(true);
        let r = |kind, flags, offset, len| Request {
            flags,
            kind,
            cookie: 1,
            offset,
            len,
        };
        let errno = |req: Request| check(&req, &s, false).err().map(|e| e.errno);
        assert_eq!(errno(r(CMD_READ, 0, 0, u32::MAX)), Some(EOVERFLOW));
        assert_eq!(errno(r(CMD_WRITE, 0, 0, u32::MAX)), Some(EINVAL));
        assert_eq!(errno(r(CMD_WRITE, 0, u64::MAX, 4096)), Some(ENOSPC));
        assert_eq!(errno(r(CMD_READ, 0, 1 << 20, 0)), None);
        assert_eq!(errno(r(CMD_READ, 0, (1 << 20) + 1, 0)), Some(EINVAL));
        assert_eq!(errno(r(CMD_FLUSH, CMD_FLAG_FUA, 0, 0)), None);
        let shutting = check(&r(CMD_READ, 0, 0, 1), &s, true);
        assert_eq!(shutting.err().map(|e| e.errno), Some(ESHUTDOWN));
    }
}
