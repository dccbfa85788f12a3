//! The metadata service (169.254.169.254:80) as the datapath serves it.
//!
//! The datapath redirects each local port's TCP traffic to 169.254.169.254:80
//! into an internal tap that lives in a network namespace of its own, where a
//! small HTTP/1.x server listens. On the way the source address is translated
//! 1:1 to an address that names the logical port ([`client_addr`]), so the
//! server knows which port asked even when tenants use the same addresses;
//! replies are translated back. What to answer is up to a [`MetadataHandler`],
//! which the agent implements (instance metadata, user data, keys).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::mac::MacAddr;
use crate::ports::{self, PortError, Tap};

/// The well-known metadata address.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The metadata TCP port.
pub const METADATA_PORT: u16 = 80;
/// The MAC of the service's tap interface.
pub const TAP_MAC: MacAddr = MacAddr([0x0a, 0x58, 0xa9, 0xfe, 0xa9, 0xfd]);
/// The MAC the datapath answers with for the translated client addresses.
pub const PEER_MAC: MacAddr = MacAddr([0x0a, 0x58, 0xa9, 0xfe, 0x00, 0x01]);
/// Name of the tap inside the service's namespace.
pub const TAP_NAME: &str = "meta0";

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;
const MAX_CONNECTIONS: usize = 64;

/// The address a logical port's metadata requests arrive from (169.254.1.0 and up;
/// logical port ids stay below 0x8000, so 169.254.169.254 is never produced).
pub fn client_addr(logical_port: u32) -> Ipv4Addr {
    Ipv4Addr::new(169, 254, (1 + logical_port / 256) as u8, (logical_port % 256) as u8)
}

/// Who sent a metadata request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataClient {
    /// The logical port.
    pub port_id: String,
    /// Its network.
    pub network_id: String,
    /// Its IPv4 address (the one the request came from).
    pub fixed_ip: Ipv4Addr,
}

/// One HTTP request to the metadata service.
#[derive(Debug, Clone)]
pub struct MetadataRequest {
    /// Who asked.
    pub client: MetadataClient,
    /// HTTP method.
    pub method: String,
    /// Request target (path and query).
    pub path: String,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body (empty for GET).
    pub body: Vec<u8>,
}

/// The answer to a [`MetadataRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataResponse {
    /// HTTP status code.
    pub status: u16,
    /// Content-Type header.
    pub content_type: String,
    /// Body.
    pub body: Vec<u8>,
}

impl MetadataResponse {
    /// 200 with a body.
    pub fn ok(content_type: &str, body: impl Into<Vec<u8>>) -> MetadataResponse {
        MetadataResponse { status: 200, content_type: content_type.to_string(), body: body.into() }
    }

    /// An error status with a short text body.
    pub fn error(status: u16, text: &str) -> MetadataResponse {
        MetadataResponse { status, content_type: "text/plain".into(), body: format!("{text}\n").into_bytes() }
    }
}

/// What answers metadata requests; the agent implements it.
pub trait MetadataHandler: Send + Sync {
    /// Answers one request.
    fn handle(&self, req: &MetadataRequest) -> MetadataResponse;
}

/// A handler that serves files: `DIR/<port id>/<path>`, for operators and tests.
#[derive(Debug, Clone)]
pub struct StaticMetadata {
    dir: PathBuf,
}

impl StaticMetadata {
    /// Serves files below `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> StaticMetadata {
        StaticMetadata { dir: dir.into() }
    }
}

impl MetadataHandler for StaticMetadata {
    fn handle(&self, req: &MetadataRequest) -> MetadataResponse {
        if req.method != "GET" && req.method != "HEAD" {
            return MetadataResponse::error(405, "Only GET is served");
        }
        let path = req.path.split('?').next().unwrap_or("");
        let rel = Path::new(path.trim_start_matches('/'));
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return MetadataResponse::error(400, "Bad path");
        }
        let file = self.dir.join(&req.client.port_id).join(rel);
        match std::fs::read(&file) {
            Ok(body) => MetadataResponse::ok("text/plain", body),
            Err(_) => MetadataResponse::error(404, "Not found"),
        }
    }
}

/// Errors starting the metadata service.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// Creating the namespace, tap or address failed.
    #[error("Cannot set up the metadata namespace: {0}")]
    Setup(#[from] PortError),
    /// Binding the listener failed.
    #[error("Cannot listen on {METADATA_IP}:{METADATA_PORT}: {0}")]
    Listen(io::Error),
}

/// Translated client address to the port behind it.
pub type Clients = Arc<RwLock<HashMap<Ipv4Addr, MetadataClient>>>;

/// The running service: its namespace, listener thread and client map.
pub struct MetadataService {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _netns: File,
    /// Which port each translated address stands for (kept current by the control API).
    pub clients: Clients,
}

impl MetadataService {
    /// Creates the namespace with its tap and listener and starts serving with
    /// `handler`. Returns the tap for the datapath to attach.
    pub fn start(handler: Arc<dyn MetadataHandler>) -> Result<(MetadataService, Tap), MetadataError> {
        let (netns, tap, listener) = std::thread::spawn(setup_namespace).join().unwrap_or_else(|_| Err(MetadataError::Listen(io::Error::other("Setup thread panicked"))))?;
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Clients = Arc::default();
        let thread = {
            let (stop, clients) = (stop.clone(), clients.clone());
            std::thread::Builder::new().name("dp-metadata".into()).spawn(move || serve(listener, handler, clients, stop)).map_err(MetadataError::Listen)?
        };
        Ok((MetadataService { stop, thread: Some(thread), _netns: netns, clients }, tap))
    }
}

impl Drop for MetadataService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs on a thread of its own: a fresh network namespace holding the tap
/// (169.254.169.254/16) and the listener. The namespace lives on through the
/// returned file and sockets after the thread ends.
fn setup_namespace() -> Result<(File, Tap, TcpListener), MetadataError> {
    // SAFETY: unshare(CLONE_NEWNET) moves only this thread, which ends after setup, into a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(PortError::Sys { what: "unshare(CLONE_NEWNET)", source: io::Error::last_os_error() }.into());
    }
    let netns = File::open("/proc/thread-self/ns/net").map_err(|source| PortError::Sys { what: "open of the namespace", source })?;
    ports::set_up("lo")?;
    let tap = Tap::create_here(TAP_NAME, Some(TAP_MAC))?;
    // Best effort: without IPv6 the tap stays quiet (no router solicitations).
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{TAP_NAME}/disable_ipv6"), "1");
    ports::set_ipv4(TAP_NAME, METADATA_IP, 16)?;
    let listener = TcpListener::bind((METADATA_IP, METADATA_PORT)).map_err(MetadataError::Listen)?;
    Ok((netns, tap, listener))
}

fn serve(listener: TcpListener, handler: Arc<dyn MetadataHandler>, clients: Clients, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 200) };
        let Ok((stream, peer)) = listener.accept() else { continue };
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            continue;
        }
        active.fetch_add(1, Ordering::Relaxed);
        let (handler, clients, done) = (handler.clone(), clients.clone(), active.clone());
        let spawned = std::thread::Builder::new().name("dp-metadata-conn".into()).spawn(move || {
            let _ = answer(stream, peer, &*handler, &clients);
            done.fetch_sub(1, Ordering::Relaxed);
        });
        if spawned.is_err() {
            // The closure (and its decrement) never ran.
            active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn answer(mut stream: TcpStream, peer: SocketAddr, handler: &dyn MetadataHandler, clients: &Clients) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > MAX_HEAD {
            return write_response(&mut stream, &MetadataResponse::error(431, "Request header too large"), false);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (Some(method), Some(path)) = (first.next(), first.next()) else {
        return write_response(&mut stream, &MetadataResponse::error(400, "Bad request line"), false);
    };
    let headers: Vec<(String, String)> = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let len = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse::<usize>().ok()).unwrap_or(0);
    if len > MAX_BODY {
        return write_response(&mut stream, &MetadataResponse::error(413, "Body too large"), false);
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    let SocketAddr::V4(peer) = peer else { return Ok(()) };
    let client = clients.read().map(|c| c.get(peer.ip()).cloned()).unwrap_or(None);
    let resp = match client {
        Some(client) => handler.handle(&MetadataRequest { client, method: method.to_string(), path: path.to_string(), headers, body }),
        None => MetadataResponse::error(404, "Unknown client"),
    };
    write_response(&mut stream, &resp, method == "HEAD")
}

fn write_response(stream: &mut TcpStream, r: &MetadataResponse, head_only: bool) -> io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let mut out = format!("HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", r.status, r.content_type, r.body.len()).into_bytes();
    if !head_only {
        out.extend_from_slice(&r.body);
    }
    stream.write_all(&out)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_unique_and_never_the_service() {
        let mut seen = std::collections::HashSet::new();
        for lp in 1..0x8000 {
            let a = client_addr(lp);
            assert_ne!(a, METADATA_IP);
            assert!(a.octets()[2] >= 1 && a.octets()[2] <= 128, "{a}");
            assert!(seen.insert(a));
        }
    }

    #[test]
    fn static_handler_refuses_escapes() {
        let dir = std::env::temp_dir().join(format!("dp-meta-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("p1/latest")).unwrap();
        std::fs::write(dir.join("p1/latest/hostname"), "vm-one").unwrap();
        let h = StaticMetadata::new(&dir);
        let req = |path: &str| MetadataRequest {
            client: MetadataClient { port_id: "p1".into(), network_id: "n".into(), fixed_ip: Ipv4Addr::new(10, 0, 0, 1) },
            method: "GET".into(),
            path: path.into(),
            headers: vec![],
            body: vec![],
        };
        assert_eq!(h.handle(&req("/latest/hostname")).body, b"vm-one");
        assert_eq!(h.handle(&req("/../p1/latest/hostname")).status, 400);
        assert_eq!(h.handle(&req("/nothing")).status, 404);
        let _ = std::fs::remove_dir_all(dir);
    }
}
