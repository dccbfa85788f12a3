//! Just enough HTTP/1.1 for a local control socket: one request per
//! connection, Content-Length bodies, a size limit.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest request accepted (headers plus body).
pub const MAX_REQUEST: usize = 64 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// GET, PUT, ...
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Query string after '?', if any.
    pub query: String,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, v: &serde_json::Value) -> Self {
        Response { status, content_type: "application/json", body: serde_json::to_vec(v).unwrap_or_default() }
    }

    /// A JSON error body: `{"error": {"code": N, "message": "..."}}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, &serde_json::json!({"error": {"code": status, "message": message.into()}}))
    }

    /// 204 No Content.
    pub fn no_content() -> Self {
        Response { status: 204, content_type: "application/json", body: Vec::new() }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Errors reading a request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Socket trouble or timeout.
    #[error("Connection error: {0}")]
    Io(#[from] io::Error),
    /// Not HTTP we understand.
    #[error("Malformed request: {0}")]
    Malformed(String),
    /// Over [`MAX_REQUEST`].
    #[error("Request too large")]
    TooLarge,
}

/// Reads one request from `s`.
pub fn read_request(s: &mut impl Read) -> Result<Request, HttpError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_REQUEST {
            return Err(HttpError::TooLarge);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(HttpError::Malformed("connection closed before the headers ended".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..header_end]).map_err(|_| HttpError::Malformed("headers are not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    if method.is_empty() || !target.starts_with('/') || !parts.next().unwrap_or("").starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!("bad request line {first:?}")));
    }
    let mut len = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().map_err(|_| HttpError::Malformed("bad Content-Length".into()))?;
            }
        }
    }
    if header_end + 4 + len > MAX_REQUEST {
        return Err(HttpError::TooLarge);
    }
    let mut body = buf[header_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(HttpError::Malformed("body shorter than Content-Length".into()));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Ok(Request { method, path, query, body })
}

/// Writes `r` and closes the exchange.
pub fn write_response(s: &mut impl Write, r: &Response) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(&r.body)?;
    s.flush()
}

/// A client call: sends one request to the VMM at `socket` and returns
/// (status, body). Used by the agent, the tests and the bench.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&serde_json::Value>) -> io::Result<(u16, Vec<u8>)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    s.write_all(&body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "No header end in response"))?;
    let head = String::from_utf8_lossy(&out[..end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "No status in response"))?;
    Ok((status, out[end + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_put_with_body_and_query() {
        let raw = b"PUT /vm/snapshot?x=1 HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"dir\":\"a\"}";
        let r = read_request(&mut &raw[..]).unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/vm/snapshot");
        assert_eq!(r.query, "x=1");
        assert_eq!(r.body, b"{\"dir\":\"a\"}");
        assert!(read_request(&mut &b"garbage\r\n\r\n"[..]).is_err());
        let big = format!("GET / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_REQUEST);
        assert!(matches!(read_request(&mut big.as_bytes()), Err(HttpError::TooLarge)));
    }
}
