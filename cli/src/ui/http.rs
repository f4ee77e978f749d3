//! The smallest HTTP/1.1 server the web UI needs: `GET` and `HEAD` only, one request per
//! connection (`Connection: close`), bounded everywhere (request head size, time to read it,
//! time to write the answer, connections at once).
//!
//! A hand-written server instead of hyper: the pages are read-only and polled, so the protocol
//! needed is a request line, a `Host` header and a response with a length; hyper's server
//! features would change the feature set of the hyper that iroh already builds and so rebuild
//! the dependency tree under every crate of the workspace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The longest request head (request line and headers) read.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The longest request target (path and query).
pub const MAX_TARGET_BYTES: usize = 4 * 1024;
/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// Time to read a request head, and time to write a response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET` or `HEAD`.
    pub head_only: bool,
    /// The path, percent-decoded.
    pub path: String,
    /// Query parameters, percent-decoded (`+` is a space), in order.
    pub query: Vec<(String, String)>,
}

impl Request {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, content type, body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
        }
    }

    /// A JSON document.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"null".to_vec());
        Response::new(status, "application/json; charset=utf-8", body)
    }

    /// A JSON error `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }
}

/// Why a request was refused before it reached the pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not HTTP, or a head we do not read (status 400, 414 or 431).
    Malformed(u16, &'static str),
    /// A method other than GET or HEAD.
    Method,
    /// A `Host` that is not an IP address or `localhost`: a page on another site reaching this
    /// server through a DNS name it controls (DNS rebinding).
    Host,
}

impl Refused {
    pub fn response(&self) -> Response {
        match self {
            Refused::Malformed(status, why) => Response::error(*status, why),
            Refused::Method => Response::error(405, "read-only: GET and HEAD only"),
            Refused::Host => Response::error(
                403,
                "the Host header must be an IP address or localhost (DNS rebinding defence)",
            ),
        }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `s` (and `+` as a space when `plus`); None when the bytes are not UTF-8.
pub fn percent_decode(s: &str, plus: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex_value(b[i + 1]), hex_value(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Whether a `Host` header names this machine by address or as localhost.
fn host_allowed(host: &str) -> bool {
    let host = host.trim();
    if host.parse::<SocketAddr>().is_ok() || host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    // `[::1]` without a port.
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    let name = match host.rsplit_once(':') {
        Some((n, port)) if port.bytes().all(|c| c.is_ascii_digit()) => n,
        _ => host,
    };
    name.eq_ignore_ascii_case("localhost")
}

/// Parses a request head (everything before the blank line).
pub fn parse_head(head: &[u8]) -> Result<Request, Refused> {
    let text =
        std::str::from_utf8(head).map_err(|_| Refused::Malformed(400, "the head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refused::Malformed(400, "not an HTTP request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Refused::Malformed(400, "HTTP/1.x only"));
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(Refused::Method),
    };
    if target.len() > MAX_TARGET_BYTES {
        return Err(Refused::Malformed(414, "the request target is too long"));
    }
    if !target.starts_with('/') {
        return Err(Refused::Malformed(400, "the request target must be a path"));
    }
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("host")
            && !host_allowed(value)
        {
            return Err(Refused::Host);
        }
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let path =
        percent_decode(raw_path, false).ok_or(Refused::Malformed(400, "the path is not UTF-8"))?;
    let mut query = Vec::new();
    for pair in raw_query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (percent_decode(k, true), percent_decode(v, true)) else {
            return Err(Refused::Malformed(400, "a query parameter is not UTF-8"));
        };
        query.push((k, v));
    }
    Ok(Request {
        head_only,
        path,
        query,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The response's bytes: status line, headers (no caching, no sniffing, a content security
/// policy that allows only this server's own scripts and styles), body.
pub fn encode(r: &Response, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n\
         X-Frame-Options: DENY\r\nContent-Security-Policy: default-src 'none'; script-src 'self'; \
         style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; \
         frame-ancestors 'none'\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(&r.body);
    }
    out
}

/// Reads one request head from `stream`, at most [`MAX_HEAD_BYTES`].
async fn read_head(stream: &mut TcpStream) -> Result<Request, Refused> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return parse_head(&buf[..end]);
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(Refused::Malformed(431, "the request head is too long"));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| Refused::Malformed(400, "reading the request"))?;
        if n == 0 {
            return Err(Refused::Malformed(400, "the request ended early"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Something that answers requests.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        request: Request,
    ) -> impl std::future::Future<Output = Response> + Send;
}

async fn connection<H: Handler>(handler: Arc<H>, mut stream: TcpStream) {
    let (response, head_only) = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await
    {
        Err(_) => (Response::error(400, "timed out reading the request"), false),
        Ok(Err(refused)) => (refused.response(), false),
        Ok(Ok(request)) => {
            let head_only = request.head_only;
            (handler.handle(request).await, head_only)
        }
    };
    let bytes = encode(&response, head_only);
    let _ = tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
}

/// Accepts connections until the task is dropped, each served on a task of its own, at most
/// [`MAX_CONNECTIONS`] at once.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "ui: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let h = handler.clone();
        tokio::spawn(async move {
            connection(h, stream).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_and_bad_ones_are_refused() {
        let r = parse_head(
            b"GET /api/forest/ensemble?text=a+b%3Cc%3E&tokens=5 HTTP/1.1\r\nHost: 127.0.0.1:8080",
        )
        .unwrap();
        assert_eq!(r.path, "/api/forest/ensemble");
        assert_eq!(r.param("text"), Some("a b<c>"));
        assert_eq!(r.param("tokens"), Some("5"));
        assert!(!r.head_only);
        assert!(parse_head(b"HEAD / HTTP/1.0").unwrap().head_only);
        assert_eq!(parse_head(b"POST / HTTP/1.1"), Err(Refused::Method));
        assert!(matches!(
            parse_head(b"GET / SPDY/3"),
            Err(Refused::Malformed(400, _))
        ));
        assert!(matches!(
            parse_head(b"GET http://x/ HTTP/1.1"),
            Err(Refused::Malformed(400, _))
        ));
        assert!(matches!(
            parse_head(b"GET /?x=%ff HTTP/1.1"),
            Err(Refused::Malformed(400, _))
        ));
        let long = format!("GET /{} HTTP/1.1", "a".repeat(MAX_TARGET_BYTES));
        assert!(matches!(
            parse_head(long.as_bytes()),
            Err(Refused::Malformed(414, _))
        ));
        assert!(matches!(
            parse_head(&[0xff, 0xfe]),
            Err(Refused::Malformed(400, _))
        ));
    }

    #[test]
    fn only_addresses_and_localhost_are_accepted_as_host() {
        for ok in [
            "127.0.0.1:80",
            "127.0.0.1",
            "[::1]:8080",
            "[::1]",
            "localhost:7",
            "LOCALHOST",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nhOsT: rebind.example:80"),
            Err(Refused::Host)
        );
    }

    #[test]
    fn percent_decoding_keeps_broken_escapes_as_text() {
        assert_eq!(percent_decode("%41%4", false).as_deref(), Some("A%4"));
        assert_eq!(percent_decode("%zz+", false).as_deref(), Some("%zz+"));
        assert_eq!(percent_decode("%", true).as_deref(), Some("%"));
        assert_eq!(percent_decode("%e2%82%ac", true).as_deref(), Some("€"));
    }

    #[test]
    fn responses_carry_length_and_a_content_security_policy() {
        let r = Response::new(200, "text/plain", "hi");
        let text = String::from_utf8(encode(&r, false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("script-src 'self'"));
        assert!(text.ends_with("\r\n\r\nhi"));
        assert!(
            String::from_utf8(encode(&r, true))
                .unwrap()
                .ends_with("\r\n\r\n")
        );
    }
}
