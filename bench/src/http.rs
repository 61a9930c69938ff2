//! A minimal HTTP/1.1 server and client for admin APIs: one request per connection
//! (`Connection: close`), `Content-Length` bodies only, JSON in and out. That is all the
//! link emulator's Toxiproxy clients and the site admin API need, and it spares the build a
//! web framework.
//!
//! The server carries any router: a [`Handler`] turns a [`Request`] into a [`Response`].
//! Everything a client sends is bounded — header bytes, body bytes, the time to send the
//! request, the connections served at once — and a handler that panics or overruns its time
//! answers 500 or 503 without taking the server down. Errors the server makes itself have the
//! shape `{"error": message, "status": code}` (Toxiproxy's, also used by the site admin API).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Request and response bodies larger than this are refused.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
/// A client that does not finish sending its request (or reading the answer) in this time is
/// dropped; a `call` that gets no full answer in this time fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A handler that has not answered by then gets the client a 503.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once; more wait in the listen backlog.
const CONNECTIONS_MAX: usize = 64;

/// One request, as the handler sees it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The request target: path and optional `?query`.
    pub target: String,
    pub body: Vec<u8>,
}

impl Request {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The raw query string after `?` (empty when there is none).
    pub fn query(&self) -> &str {
        self.target.split_once('?').map(|(_, q)| q).unwrap_or("")
    }

    /// The value of query parameter `key` (first occurrence; no percent-decoding, which the
    /// numeric and simple parameters of the admin APIs do not need).
    pub fn query_param(&self, key: &str) -> Option<&str> {
        self.query()
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// One answer: a status and an optional JSON body (none for 204).
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Value>,
}

impl Response {
    pub fn json(status: u16, body: Value) -> Response {
        Response {
            status,
            body: Some(body),
        }
    }

    pub fn empty(status: u16) -> Response {
        Response { status, body: None }
    }

    /// An error in the shared shape `{"error": message, "status": code}`.
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        Response::json(status, error_json(status, &message.into()))
    }
}

/// The shared error shape.
pub fn error_json(status: u16, message: &str) -> Value {
    json!({"error": message, "status": status})
}

/// A boxed future, for handlers.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A router: called once per request, on a task of its own.
pub type Handler = Arc<dyn Fn(Request) -> BoxFuture<Response> + Send + Sync>;

/// Wraps an async function as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Why a message could not be read: the status the server answers with.
#[derive(Debug)]
struct ReadError {
    status: u16,
    message: String,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ReadError {}

fn read_error(status: u16, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(ReadError {
        status,
        message: message.into(),
    })
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
            return Err(read_error(431, "header too large"));
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
                return Err(read_error(
                    413,
                    format!("body of {len} bytes exceeds the limit of {BODY_BYTES_MAX}"),
                ));
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
    let target = first.next().context("no path")?.to_string();
    Ok(Request {
        method,
        target,
        body,
    })
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
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

async fn write_response(stream: &mut TcpStream, response: Response) -> std::io::Result<()> {
    let text = response.body.map(|b| format!("{b}\n")).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        text.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(text.as_bytes()).await?;
    stream.shutdown().await
}

async fn serve_one(mut stream: TcpStream, handler: Handler) {
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let status = e.downcast_ref::<ReadError>().map_or(400, |r| r.status);
            let response = Response::error(status, format!("bad request: {e}"));
            let _ =
                tokio::time::timeout(REQUEST_TIMEOUT, write_response(&mut stream, response)).await;
            return;
        }
        Err(_) => return,
    };
    // The handler runs on a task of its own so that a panic in it becomes a 500 for this
    // client instead of ending the server.
    let task = tokio::spawn(handler(req));
    let abort = task.abort_handle();
    let response = match tokio::time::timeout(HANDLER_TIMEOUT, task).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => Response::error(500, format!("the handler failed: {e}")),
        Err(_) => {
            abort.abort();
            Response::error(
                503,
                format!("no answer within {} s", HANDLER_TIMEOUT.as_secs()),
            )
        }
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, write_response(&mut stream, response)).await;
}

/// An HTTP server running `handler`; it stops accepting when dropped.
pub struct HttpServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Binds `addr` (port 0 picks one) and serves every request with `handler`.
    pub async fn start(addr: &str, handler: Handler) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    serve_one(stream, handler).await;
                    drop(permit);
                });
            }
        });
        Ok(HttpServer { addr, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One call to an admin API at `addr` (`HOST:PORT`): returns the status and the parsed JSON
/// body (Null when empty). Bounded by a 10 s timeout.
pub async fn call(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    call_with_timeout(addr, method, path, body, REQUEST_TIMEOUT).await
}

/// Like [`call`], with the time limit chosen (for calls whose answer takes a while, such as a
/// repair).
pub async fn call_with_timeout(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> anyhow::Result<(u16, Value)> {
    let fut = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to the admin API at {addr}"))?;
        let text = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: stretch\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
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
    tokio::time::timeout(timeout, fut)
        .await
        .with_context(|| format!("the admin API at {addr} did not answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_by_name() {
        let req = Request {
            method: "GET".into(),
            target: "/v1/blocks?lba=5&count=7&flag".into(),
            body: Vec::new(),
        };
        assert_eq!(req.path(), "/v1/blocks");
        assert_eq!(req.query_param("lba"), Some("5"));
        assert_eq!(req.query_param("count"), Some("7"));
        assert_eq!(req.query_param("flag"), Some(""));
        assert_eq!(req.query_param("nosuch"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_handler_gets_500_and_the_server_keeps_serving() {
        let server = HttpServer::start(
            "127.0.0.1:0",
            handler(|req: Request| async move {
                if req.path() == "/panic" {
                    panic!("handler bug");
                }
                Response::json(200, json!({"path": req.path()}))
            }),
        )
        .await
        .expect("bind");
        let addr = server.addr().to_string();
        let (code, body) = call(&addr, "GET", "/panic", None).await.expect("call");
        assert_eq!(code, 500);
        assert_eq!(body["status"], json!(500));
        let (code, body) = call(&addr, "GET", "/ok?x=1", None).await.expect("call");
        assert_eq!((code, body), (200, json!({"path": "/ok"})));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_body_gets_413() {
        let server = HttpServer::start(
            "127.0.0.1:0",
            handler(|_req: Request| async move { Response::empty(204) }),
        )
        .await
        .expect("bind");
        let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
        let head = format!(
            "POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            BODY_BYTES_MAX + 1
        );
        stream.write_all(head.as_bytes()).await.expect("send");
        let (head, _) = read_message(&mut stream, true).await.expect("answer");
        assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
    }
}
