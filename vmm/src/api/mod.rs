//! The control API: HTTP/JSON on a unix socket (described in vmm/openapi.yaml),
//! served from the VMM's event loop, plus the state file beside the socket.

pub mod http;

use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Request, Response};

use crate::machine::{OpError, Vmm};
use crate::state_file::{self, VmmStateFile};

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be bound.
    #[error("Cannot listen on {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    /// A live VMM already owns the socket.
    #[error("Socket {0} belongs to running VMM pid {1}")]
    InUse(PathBuf, u32),
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] state_file::StateFileError),
}

/// Binds the socket, writes the state file and hooks the API into the VM's event loop.
pub fn serve(vmm: &mut Vmm, socket: &Path) -> Result<(), ApiError> {
    let state_path = state_file::path_for(socket);
    if let Ok(s) = VmmStateFile::read(&state_path) {
        if s.is_alive() && s.pid != std::process::id() {
            return Err(ApiError::InUse(socket.into(), s.pid));
        }
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|e| ApiError::Bind(socket.into(), e))?;
    listener.set_nonblocking(true).map_err(|e| ApiError::Bind(socket.into(), e))?;
    VmmStateFile::for_self(socket, &vmm.config).write(&state_path)?;
    let fd = listener.as_raw_fd();
    vmm.set_api(
        fd,
        Box::new(move |vmm: &mut Vmm| {
            while let Ok((mut conn, _)) = listener.accept() {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                let resp = match http::read_request(&mut conn) {
                    Ok(req) => handle(vmm, &req),
                    Err(http::HttpError::TooLarge) => Response::error(413, "Request too large"),
                    Err(e) => Response::error(400, e.to_string()),
                };
                let _ = http::write_response(&mut conn, &resp);
            }
        }),
    )
    .map_err(|e| ApiError::Bind(socket.into(), e))?;
    Ok(())
}

/// Removes the socket and state file (on a clean exit).
pub fn cleanup(socket: &Path) {
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(state_file::path_for(socket));
}

fn op(r: Result<(), OpError>) -> Response {
    match r {
        Ok(()) => Response::no_content(),
        Err(e) => op_error(e),
    }
}

fn op_error(e: OpError) -> Response {
    match e {
        OpError::State(m) => Response::error(409, m),
        OpError::BadRequest(m) => Response::error(400, m),
        OpError::Internal(m) => Response::error(500, m),
    }
}

fn query_u64(q: &str, key: &str) -> Option<u64> {
    q.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn body_json(req: &Request) -> Result<serde_json::Value, Response> {
    serde_json::from_slice(&req.body).map_err(|e| Response::error(400, format!("Body is not valid JSON: {e}")))
}

/// Routes one request. Every error leaves the VM as it was.
pub fn handle(vmm: &mut Vmm, req: &Request) -> Response {
    let m = req.method.as_str();
    match (m, req.path.as_str()) {
        ("GET", "/" | "/vm") => Response::json(200, &vmm.describe()),
        ("GET", "/vm/counters") => Response::json(200, &vmm.counters()),
        ("GET", "/vm/console") => {
            let max = query_u64(&req.query, "bytes").unwrap_or(64 * 1024).min(16 << 20);
            match &vmm.config.serial.log {
                Some(p) => match crate::devices::serial::read_tail(p, max) {
                    Ok(b) => Response { status: 200, content_type: "text/plain; charset=utf-8", body: b },
                    Err(e) => Response::error(500, format!("Cannot read console log: {e}")),
                },
                None => Response::error(404, "This VM has no console log configured"),
            }
        }
        ("PUT", "/vm/pause") => op(vmm.pause()),
        ("PUT", "/vm/resume") => op(vmm.resume()),
        ("PUT", "/vm/shutdown") => op(vmm.request_shutdown()),
        ("PUT", "/vm/power-off") => {
            vmm.power_off();
            Response::no_content()
        }
        ("PUT", "/vm/snapshot") => {
            let v = match body_json(req) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let Some(dir) = v.get("dir").and_then(|d| d.as_str()) else {
                return Response::error(400, "Body needs \"dir\": the directory to write the snapshot to");
            };
            let t = std::time::Instant::now();
            match crate::snapshot::create(vmm, Path::new(dir)) {
                Ok(()) => Response::json(200, &serde_json::json!({"dir": dir, "took_ms": t.elapsed().as_millis() as u64})),
                Err(crate::snapshot::SnapshotError::NotPaused) => Response::error(409, "The VM must be paused to take a snapshot"),
                Err(e @ crate::snapshot::SnapshotError::ExternalBackend(_)) => Response::error(409, e.to_string()),
                Err(e) => Response::error(500, e.to_string()),
            }
        }
        ("PUT", "/vm/dirty-log") => {
            let v = match body_json(req) {
                Ok(v) => v,
                Err(r) => return r,
            };
            match v.get("enabled").and_then(|e| e.as_bool()) {
                Some(on) => op(vmm.set_dirty_log(on)),
                None => Response::error(400, "Body needs \"enabled\": true or false"),
            }
        }
        ("GET", "/vm/dirty-pages") => match vmm.dirty_pages() {
            Ok(v) => Response::json(200, &v),
            Err(e) => op_error(e),
        },
        (_, "/" | "/vm" | "/vm/counters" | "/vm/console" | "/vm/dirty-pages") => {
            Response::error(405, format!("{m} is not allowed on {}", req.path))
        }
        (_, "/vm/pause" | "/vm/resume" | "/vm/shutdown" | "/vm/power-off" | "/vm/snapshot" | "/vm/dirty-log") => {
            Response::error(405, format!("{m} is not allowed on {}; use PUT", req.path))
        }
        _ => Response::error(404, format!("No such resource: {}", req.path)),
    }
}
