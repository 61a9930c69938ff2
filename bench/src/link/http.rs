//! A minimal HTTP/1.1 server and client for the admin API: one request per connection
//! (`Connection: close`), `Content-Length` bodies only. That is all Toxiproxy's clients
//! need, and it spares the build a web framework.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::api::{route, ApiError, Registry};

const HEAD_BYTES_MAX: usize = 16 * 1024;
const BODY_BYTES_MAX: usize = 1024 * 1024;
/// A client that does not finish its request in this time is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once; more wait in the listen backlog.
const ADMIN_CONNECTIONS_MAX: usize = 64;

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Reads the head and the `Content-Length` body of one message. Returns the head text and
/// the body.
async fn read_message(
    stream: &mut TcpStream,
    until_eof: bool,
) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > HEAD_BYTES_MAX {
            bail!("header too large");
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed inside the header");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut length: Option<usize> = None;
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.trim().parse().context("bad Content-Length")?);
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && !v.trim().eq_ignore_ascii_case("identity")
            {
                bail!("chunked bodies are not supported");
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    match length {
        Some(len) => {
            if len > BODY_BYTES_MAX {
                bail!("body too large");
            }
            while body.len() < len {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("connection closed inside the body");
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None if until_eof => loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            if body.len() + n > BODY_BYTES_MAX {
                bail!("body too large");
            }
            body.extend_from_slice(&chunk[..n]);
        },
        None => body.clear(),
    }
    Ok((head, body))
}

async fn read_request(stream: &mut TcpStream) -> anyhow::Result<Request> {
    let (head, body) = read_message(stream, false).await?;
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let method = first.next().context("no method")?.to_string();
    let path = first.next().context("no path")?.to_string();
    Ok(Request { method, path, body })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        _ => "Internal Server Error",
    }
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    body: Option<Value>,
) -> std::io::Result<()> {
    let text = body.map(|b| format!("{b}\n")).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        text.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(text.as_bytes()).await?;
    stream.shutdown().await
}

async fn serve_one(mut stream: TcpStream, registry: Arc<Registry>) {
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let err = ApiError {
                status: 400,
                message: format!("bad request: {e}"),
            };
            let _ = write_response(&mut stream, 400, Some(err.to_json())).await;
            return;
        }
        Err(_) => return,
    };
    // Proxy changes bind or shut sockets; brief, but blocking, so keep them off the
    // reactor threads.
    let answer =
        tokio::task::spawn_blocking(move || route(&registry, &req.method, &req.path, &req.body))
            .await;
    let (status, body) = match answer {
        Ok(a) => a,
        Err(e) => (
            500,
            Some(
                ApiError {
                    status: 500,
                    message: e.to_string(),
                }
                .to_json(),
            ),
        ),
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, write_response(&mut stream, status, body)).await;
}

/// The admin API server; it stops when dropped.
pub struct AdminServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    pub async fn start(registry: Arc<Registry>, addr: &str) -> std::io::Result<AdminServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS_MAX));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let reg = registry.clone();
                tokio::spawn(async move {
                    serve_one(stream, reg).await;
                    drop(permit);
                });
            }
        });
        Ok(AdminServer { addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One admin API call from the CLI: returns the status and the parsed JSON body (Null when
/// empty).
pub async fn call(
    admin: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let fut = async {
        let mut stream = TcpStream::connect(admin)
            .await
            .with_context(|| format!("connect to admin API at {admin}"))?;
        let text = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nUser-Agent: stretch-link\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        );
        stream.write_all(req.as_bytes()).await?;
        let (head, body) = read_message(&mut stream, true).await?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("malformed status line")?;
        let json = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&body).context("response body is not JSON")?
        };
        Ok::<_, anyhow::Error>((status, json))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .context("admin API call timed out")?
}
