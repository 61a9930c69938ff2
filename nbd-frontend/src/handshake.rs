//! Fixed-newstyle option negotiation (NBD proto.md "Option haggling").
//!
//! Every option's data is read in full before it is answered (NBD.md §5, "Option framing"),
//! with a cap checked before allocating; an error reply never ends negotiation except where
//! the spec leaves no other way (EXPORT_NAME cannot carry an error).

use std::io;

use stretch_engine::BlockDevice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::*;
use crate::server::Server;

/// Option data this server reads into memory. Large enough for INFO/GO with a 4096-byte name
/// and every info type, and for meta-context requests with a handful of 4096-byte queries.
const OPTION_BYTES_MAX: u32 = 64 * 1024;
/// Larger option data is read and discarded up to this bound (then ERR_TOO_BIG); beyond it the
/// client is not negotiating in good faith and the connection is closed.
const OPTION_DRAIN_BYTES_MAX: u32 = 1024 * 1024;
/// Options answered per connection; a client looping forever hits this (or the timeout).
const OPTIONS_MAX: u32 = 1024;
/// Queries in one meta-context request that are looked at.
const META_QUERIES_MAX: u32 = 128;

/// What negotiation decided for the transmission phase.
#[derive(Clone, Debug)]
pub struct Session {
    /// Index into the server's exports.
    pub export: usize,
    pub structured: bool,
    /// The id the client got for `base:allocation`, when it selected it for this export.
    pub base_allocation_id: Option<u32>,
    /// Advertised size in bytes (a multiple of the block size).
    pub size_bytes: u64,
    pub block_bytes: u32,
    pub read_only: bool,
}

pub enum Outcome {
    Transmission(Session),
    Aborted,
}

/// The id this server gives `base:allocation` in SET_META_CONTEXT (LIST uses 0, as the spec
/// asks).
const BASE_ALLOCATION_ID: u32 = 1;

struct State {
    no_zeroes: bool,
    structured: bool,
    /// Export name and whether base:allocation was selected by the last SET_META_CONTEXT.
    meta: Option<(Vec<u8>, bool)>,
}

pub async fn negotiate<D, R, W>(server: &Server<D>, r: &mut R, w: &mut W) -> io::Result<Outcome>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; GREETING_BYTES];
    greeting[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    // NBD proto.md: "If the client sends an unknown client flag, the server MUST close".
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(invalid(format!("unknown client flags {client_flags:#x}")));
    }
    let mut st = State {
        no_zeroes: client_flags & CLIENT_FLAG_NO_ZEROES != 0,
        structured: false,
        meta: None,
    };

    for _ in 0..OPTIONS_MAX {
        let mut h = [0u8; OPTION_HEADER_BYTES];
        r.read_exact(&mut h).await?;
        if be_u64(&h, 0) != IHAVEOPT {
            return Err(invalid("bad option magic".into()));
        }
        let opt = be_u32(&h, 8);
        let len = be_u32(&h, 12);
        if len > OPTION_BYTES_MAX {
            if opt == OPT_EXPORT_NAME || len > OPTION_DRAIN_BYTES_MAX {
                return Err(invalid(format!("option {opt} with {len} bytes of data")));
            }
            drain(r, u64::from(len)).await?;
            reply_error(w, opt, REP_ERR_TOO_BIG, "option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                // No error is possible here: an unknown export means a hard disconnect.
                if data.len() > STRING_BYTES_MAX {
                    return Err(invalid("EXPORT_NAME longer than 4096 bytes".into()));
                }
                let Some(export) = server.export(&data) else {
                    return Err(invalid("EXPORT_NAME of an unknown export".into()));
                };
                let session = session(server, &st, export);
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&session.size_bytes.to_be_bytes());
                b.extend_from_slice(&transmission_flags(&session).to_be_bytes());
                if !st.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b).await?;
                w.flush().await?;
                return Ok(Outcome::Transmission(session));
            }
            OPT_ABORT => {
                // The client may already have closed; failing to send the ACK is fine.
                let _ = reply(w, opt, REP_ACK, &[]).await;
                return Ok(Outcome::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_error(w, opt, REP_ERR_INVALID, "LIST takes no data").await?;
                    continue;
                }
                for e in &server.exports {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    reply(w, opt, REP_SERVER, &d).await?;
                }
                reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                if let Some(session) = info_or_go(server, &st, w, opt, &data).await? {
                    if opt == OPT_GO {
                        return Ok(Outcome::Transmission(session));
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_error(w, opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data").await?;
                } else if st.structured {
                    reply_error(w, opt, REP_ERR_INVALID, "structured replies already on").await?;
                } else {
                    st.structured = true;
                    reply(w, opt, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(server, &mut st, w, opt, &data).await?;
            }
            OPT_STARTTLS => {
                reply_error(w, opt, REP_ERR_UNSUP, "TLS is not supported by this server").await?;
            }
            OPT_EXTENDED_HEADERS => {
                reply_error(w, opt, REP_ERR_UNSUP, "extended headers are not supported").await?;
            }
            _ => {
                // NBD proto.md: unknown options MUST get ERR_UNSUP, and negotiation goes on.
                reply_error(w, opt, REP_ERR_UNSUP, "unknown option").await?;
            }
        }
    }
    Err(invalid("too many options".into()))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

async fn drain<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> io::Result<()> {
    let mut scratch = [0u8; 8192];
    while n > 0 {
        let take = n.min(scratch.len() as u64) as usize;
        r.read_exact(&mut scratch[..take]).await?;
        n -= take as u64;
    }
    Ok(())
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = Vec::with_capacity(OPTION_REPLY_HEADER_BYTES + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await
}

async fn reply_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    msg: &str,
) -> io::Result<()> {
    reply(w, opt, kind, clip_message(msg).as_bytes()).await
}

fn session<D: BlockDevice>(server: &Server<D>, st: &State, export: usize) -> Session {
    let e = &server.exports[export];
    // NBD proto.md: min_block is a power of two no larger than 64 KiB. A device reporting
    // anything else is a bug; fall back to the engine's block size rather than divide by it.
    let block_bytes = match e.device.block_size() {
        b if b.is_power_of_two() && (512..=65536).contains(&b) => b,
        other => {
            tracing::warn!(export = %e.name, block_size = other, "device reports an invalid block size");
            stretch_engine::BLOCK_SIZE
        }
    };
    // The QEMU client refuses an export whose size is not a multiple of min_block.
    let size_bytes = e.device.size_bytes() / u64::from(block_bytes) * u64::from(block_bytes);
    // Contexts were selected for a name; they apply only if GO picks that same export.
    let base_allocation_id = match &st.meta {
        Some((meta_name, true)) if st.structured && server.export(meta_name) == Some(export) => {
            Some(BASE_ALLOCATION_ID)
        }
        _ => None,
    };
    Session {
        export,
        structured: st.structured,
        base_allocation_id,
        size_bytes,
        block_bytes,
        read_only: e.read_only || !e.device.is_writable(),
    }
}

pub fn transmission_flags(s: &Session) -> u16 {
    // FLUSH and FUA are export-wide in every BlockDevice (one shared cache or none), which is
    // what CAN_MULTI_CONN promises.
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE;
    if s.read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if s.structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// Answers INFO or GO; returns the session when the export exists (the caller enters
/// transmission for GO).
async fn info_or_go<D: BlockDevice, W: AsyncWrite + Unpin>(
    server: &Server<D>,
    st: &State,
    w: &mut W,
    opt: u32,
    data: &[u8],
) -> io::Result<Option<Session>> {
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let name_len = c.u32()? as usize;
        let name = c.take(name_len)?;
        let n = c.u16()?;
        let mut infos = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            infos.push(c.u16()?);
        }
        (c.remaining() == 0).then_some((name, infos))
    })();
    let Some((name, infos)) = parsed else {
        reply_error(w, opt, REP_ERR_INVALID, "malformed INFO/GO request").await?;
        return Ok(None);
    };
    if name.len() > STRING_BYTES_MAX {
        reply_error(
            w,
            opt,
            REP_ERR_INVALID,
            "export name longer than 4096 bytes",
        )
        .await?;
        return Ok(None);
    }
    let Some(export) = server.export(name) else {
        reply_error(w, opt, REP_ERR_UNKNOWN, "no such export").await?;
        return Ok(None);
    };
    let s = session(server, st, export);
    let e = &server.exports[export];

    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&s.size_bytes.to_be_bytes());
    d.extend_from_slice(&transmission_flags(&s).to_be_bytes());
    reply(w, opt, REP_INFO, &d).await?;
    if infos.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(e.name.as_bytes());
        reply(w, opt, REP_INFO, &d).await?;
    }
    if infos.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(e.description.as_bytes());
        reply(w, opt, REP_INFO, &d).await?;
    }
    // Sent even when not asked for, as QEMU does: min is our real alignment, so a client that
    // ignores it gets clean EINVALs rather than surprises.
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&s.block_bytes.to_be_bytes());
    d.extend_from_slice(&s.block_bytes.max(4096).to_be_bytes());
    d.extend_from_slice(&stretch_engine::REQUEST_BYTES_MAX.to_be_bytes());
    reply(w, opt, REP_INFO, &d).await?;
    reply(w, opt, REP_ACK, &[]).await?;
    Ok(Some(s))
}

async fn meta_context<D: BlockDevice, W: AsyncWrite + Unpin>(
    server: &Server<D>,
    st: &mut State,
    w: &mut W,
    opt: u32,
    data: &[u8],
) -> io::Result<()> {
    // NBD proto.md: SET_META_CONTEXT before structured replies MUST fail with ERR_INVALID.
    if !st.structured {
        return reply_error(
            w,
            opt,
            REP_ERR_INVALID,
            "negotiate structured replies first",
        )
        .await;
    }
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let name_len = c.u32()? as usize;
        let name = c.take(name_len)?;
        let n = c.u32()?;
        if n > META_QUERIES_MAX {
            return None;
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let q_len = c.u32()? as usize;
            queries.push(c.take(q_len)?);
        }
        (c.remaining() == 0).then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply_error(w, opt, REP_ERR_INVALID, "malformed meta context request").await;
    };
    if name.len() > STRING_BYTES_MAX || queries.iter().any(|q| q.len() > STRING_BYTES_MAX) {
        return reply_error(w, opt, REP_ERR_INVALID, "name longer than 4096 bytes").await;
    }
    if server.export(name).is_none() {
        return reply_error(w, opt, REP_ERR_UNKNOWN, "no such export").await;
    }
    let base = CONTEXT_BASE_ALLOCATION.as_bytes();
    if opt == OPT_LIST_META_CONTEXT {
        // An empty query list, or the namespace wildcard "base:", lists every context.
        let list_all = queries.is_empty() || queries.iter().any(|q| *q == b"base:");
        let exact = queries.contains(&base);
        if list_all || exact {
            let mut d = 0u32.to_be_bytes().to_vec(); // NBD proto.md: LIST ids are 0.
            d.extend_from_slice(base);
            reply(w, opt, REP_META_CONTEXT, &d).await?;
        }
    } else {
        // SET replaces the previous selection; echo exactly the name asked for.
        let selected = queries.contains(&base);
        if selected {
            let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            d.extend_from_slice(base);
            reply(w, opt, REP_META_CONTEXT, &d).await?;
        }
        st.meta = Some((name.to_vec(), selected));
    }
    reply(w, opt, REP_ACK, &[]).await
}
