//! virtio-vsock served in userspace, with AF_UNIX sockets on the host side
//! (the scheme Firecracker uses, no vhost-vsock module needed):
//!
//! - host to guest: a host program connects to `uds_path` and writes
//!   `CONNECT <port>\n`; the VMM asks the guest to accept on that port and,
//!   once it does, answers `OK <host port>\n` on the same stream, which then
//!   carries the connection's bytes both ways;
//! - guest to host: a guest connect to CID 2, port P reaches whoever listens
//!   on the unix socket `<uds_path>_P`.
//!
//! Flow control is virtio-vsock's credit scheme: the VMM never sends the
//! guest more than the buffer space it announced, and tells the guest how
//! much it may send (`BUF_ALLOC`, `fwd_cnt`).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::Serialize;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{add_used, check_chain, next_chain, DeviceError, VirtioDevice, Work, TYPE_VSOCK, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemoryMmap;

/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Bytes of the packet header.
pub const HDR_LEN: usize = 44;
/// Receive buffer space the VMM announces per connection.
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload read from a host stream per packet.
const MAX_PKT_DATA: usize = 64 * 1024;
/// Control packets waiting for receive buffers, at most.
const MAX_PENDING: usize = 1024;
/// First port handed to host-initiated connections.
const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_HANDSHAKE: usize = 32;
const QUEUE_SIZE: u16 = 256;
const TYPE_STREAM: u16 = 1;

const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;

/// Packet operations.
mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
/// SHUTDOWN flags: the sender will receive no more, send no more.
const SHUT_RCV: u32 = 1;
const SHUT_SEND: u32 = 2;

const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_PENDING: u64 = 1 << 63;

/// Errors setting the device up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host socket could not be created.
    #[error("Cannot listen on {0}: {1}")]
    Listen(PathBuf, io::Error),
    /// epoll could not be set up.
    #[error("Cannot set up vsock event polling: {0}")]
    Epoll(io::Error),
}

/// A packet header (virtio_vsock_hdr), little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes.
    pub len: u32,
    /// Socket type (1: stream).
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl Header {
    /// Parses the wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The wire form.
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Counters for the API.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VsockCounters {
    /// Connections the host opened (CONNECT accepted by the guest).
    pub host_connections: u64,
    /// Connections the guest opened to a host socket.
    pub guest_connections: u64,
    /// Connections open now.
    pub active: u64,
    /// Packets handed to the guest.
    pub rx_packets: u64,
    /// Payload bytes handed to the guest.
    pub rx_bytes: u64,
    /// Packets from the guest.
    pub tx_packets: u64,
    /// Payload bytes from the guest.
    pub tx_bytes: u64,
    /// Resets sent to the guest.
    pub resets_sent: u64,
    /// Guest packets dropped (wrong address, type or unknown connection).
    pub dropped: u64,
    /// Guest connects to a port nobody listens on.
    pub refused: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting,
    /// Bytes flow.
    Established,
    /// The host closed its end; waiting for the guest's RST.
    Closing,
}

struct Conn {
    stream: UnixStream,
    state: ConnState,
    /// Guest's receive buffer size and consumed count.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes from the guest written to the host stream.
    fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    fwd_cnt_told: u32,
    /// Guest bytes the host stream did not take yet.
    out: Vec<u8>,
    /// The host stream wants write readiness.
    want_out: bool,
    /// The host stream hit end of file.
    host_eof: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState) -> Self {
        Conn {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            out: Vec::new(),
            want_out: false,
            host_eof: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// (host port, guest port).
type Key = (u32, u32);

/// The device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// Host streams that have not sent their CONNECT line yet.
    pending: HashMap<u64, (UnixStream, Vec<u8>)>,
    next_pending: u64,
    conns: HashMap<Key, Conn>,
    next_local_port: u32,
    /// Control packets for the guest, oldest first.
    ctrl: VecDeque<Header>,
    /// Tell the guest its connections are gone (after a restore).
    reset_pending: bool,
    buf: Vec<u8>,
    counters: VsockCounters,
}

fn key_token(k: Key) -> u64 {
    (u64::from(k.0) << 32) | u64::from(k.1)
}

impl Vsock {
    /// A device for guest `cid` whose host side lives at `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(uds_path).is_ok_and(|m| m.file_type().is_socket()) {
            // A stale socket from an earlier run of this VM.
            let _ = std::fs::remove_file(uds_path);
        }
        let listener = UnixListener::bind(uds_path).map_err(|e| VsockError::Listen(uds_path.into(), e))?;
        listener.set_nonblocking(true).map_err(|e| VsockError::Listen(uds_path.into(), e))?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_LISTENER))
            .map_err(VsockError::Epoll)?;
        Ok(Vsock {
            cid,
            uds_path: uds_path.into(),
            listener,
            epoll,
            pending: HashMap::new(),
            next_pending: 0,
            conns: HashMap::new(),
            next_local_port: LOCAL_PORT_BASE,
            ctrl: VecDeque::new(),
            reset_pending: false,
            buf: vec![0; MAX_PKT_DATA],
            counters: VsockCounters::default(),
        })
    }

    fn header(&self, k: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = self.conns.get(&k).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: k.0,
            dst_port: k.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn queue_ctrl(&mut self, h: Header) {
        if self.ctrl.len() < MAX_PENDING {
            self.ctrl.push_back(h);
        }
    }

    fn reset_to_guest(&mut self, src_port: u32, dst_port: u32) {
        self.counters.resets_sent += 1;
        let h = self.header((src_port, dst_port), op::RST, 0, 0);
        self.queue_ctrl(h);
    }

    fn remove(&mut self, k: Key) {
        if let Some(c) = self.conns.remove(&k) {
            let _ = self.epoll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
            self.counters.active = self.conns.len() as u64;
        }
    }

    fn watch(&self, fd: RawFd, token: u64, out: bool) {
        let mut set = EventSet::IN;
        if out {
            set |= EventSet::OUT;
        }
        let ev = EpollEvent::new(set, token);
        if self.epoll.ctl(ControlOperation::Modify, fd, ev).is_err() {
            let _ = self.epoll.ctl(ControlOperation::Add, fd, ev);
        }
    }

    /// Guest packets: connection requests, data, credit, shutdown and reset.
    fn tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let mut work = Work::default();
        while let Some(chain) = next_chain(q, mem)? {
            let head = chain.head_index();
            let (r, _) = check_chain(&chain, mem)?;
            if (r as usize) < HDR_LEN {
                return Err(DeviceError::MalformedChain(format!("vsock packet {head} is shorter than its header")));
            }
            let mut reader = chain.clone().reader(mem).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            let mut hb = [0u8; HDR_LEN];
            reader.read_exact(&mut hb).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            let h = Header::from_bytes(&hb);
            let len = (h.len as usize).min(reader.available_bytes()).min(self.buf.len());
            reader.read_exact(&mut self.buf[..len]).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            add_used(q, mem, head, 0)?;
            work.used = true;
            self.counters.tx_packets += 1;
            self.packet_from_guest(h, len);
        }
        Ok(work)
    }

    fn packet_from_guest(&mut self, h: Header, len: usize) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            self.counters.dropped += 1;
            if h.op != op::RST && h.dst_cid == HOST_CID && h.src_cid == self.cid {
                self.reset_to_guest(h.dst_port, h.src_port);
            }
            return;
        }
        let k: Key = (h.dst_port, h.src_port);
        if h.op == op::REQUEST {
            self.guest_connect(k, h);
            return;
        }
        let Some(c) = self.conns.get_mut(&k) else {
            self.counters.dropped += 1;
            if h.op != op::RST {
                self.reset_to_guest(k.0, k.1);
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RESPONSE if c.state == ConnState::Connecting => {
                c.state = ConnState::Established;
                let line = format!("OK {}\n", k.0);
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.remove(k);
                    self.reset_to_guest(k.0, k.1);
                    return;
                }
                self.counters.host_connections += 1;
            }
            op::RW if c.state != ConnState::Connecting => {
                self.counters.tx_bytes += len as u64;
                c.out.extend_from_slice(&self.buf[..len]);
                self.flush(k);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                let h = self.header(k, op::CREDIT_UPDATE, 0, 0);
                if let Some(c) = self.conns.get_mut(&k) {
                    c.fwd_cnt_told = c.fwd_cnt;
                }
                self.queue_ctrl(h);
            }
            op::SHUTDOWN => {
                // The guest sends no more (SEND) or reads no more (RCV):
                // pass the first on as end of file, and once both hold the
                // connection is done.
                if h.flags & SHUT_SEND != 0 {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
                if h.flags & (SHUT_SEND | SHUT_RCV) == SHUT_SEND | SHUT_RCV {
                    self.remove(k);
                    self.reset_to_guest(k.0, k.1);
                }
            }
            op::RST => self.remove(k),
            _ => {
                self.counters.dropped += 1;
                self.remove(k);
                self.reset_to_guest(k.0, k.1);
            }
        }
    }

    /// The guest connects to host port `k.0`: reach `<uds_path>_<port>`.
    fn guest_connect(&mut self, k: Key, h: Header) {
        if self.conns.contains_key(&k) {
            self.counters.dropped += 1;
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), k.0);
        let stream = match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(s) => s,
            Err(_) => {
                self.counters.refused += 1;
                self.reset_to_guest(k.0, k.1);
                return;
            }
        };
        self.watch(stream.as_raw_fd(), key_token(k), false);
        let mut c = Conn::new(stream, ConnState::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        self.conns.insert(k, c);
        self.counters.guest_connections += 1;
        self.counters.active = self.conns.len() as u64;
        let r = self.header(k, op::RESPONSE, 0, 0);
        self.queue_ctrl(r);
    }

    /// Writes what the guest sent to the host stream, as far as it takes it.
    fn flush(&mut self, k: Key) {
        let Some(c) = self.conns.get_mut(&k) else { return };
        let mut broken = false;
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => {
                    c.out.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            self.remove(k);
            self.reset_to_guest(k.0, k.1);
            return;
        }
        let want_out = !c.out.is_empty();
        if want_out != c.want_out {
            c.want_out = want_out;
            let fd = c.stream.as_raw_fd();
            self.watch(fd, key_token(k), want_out);
        }
        // Tell the guest about freed space before it runs out.
        let c = &self.conns[&k];
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUF_ALLOC / 4 {
            let h = self.header(k, op::CREDIT_UPDATE, 0, 0);
            if let Some(c) = self.conns.get_mut(&k) {
                c.fwd_cnt_told = c.fwd_cnt;
            }
            self.queue_ctrl(h);
        }
    }

    /// New host streams, and CONNECT lines from those already accepted.
    fn host_side(&mut self) {
        while let Ok((s, _)) = self.listener.accept() {
            if s.set_nonblocking(true).is_err() {
                continue;
            }
            let t = TOKEN_PENDING | self.next_pending;
            self.next_pending += 1;
            self.watch(s.as_raw_fd(), t, false);
            self.pending.insert(t, (s, Vec::new()));
        }
        let tokens: Vec<u64> = self.pending.keys().copied().collect();
        for t in tokens {
            let Some((s, line)) = self.pending.get_mut(&t) else { continue };
            let mut b = [0u8; 1];
            let mut done = None;
            loop {
                match s.read(&mut b) {
                    Ok(0) => {
                        done = Some(None);
                        break;
                    }
                    Ok(_) if b[0] == b'\n' => {
                        let text = String::from_utf8_lossy(line).to_string();
                        done = Some(text.strip_prefix("CONNECT ").and_then(|p| p.trim().parse::<u32>().ok()));
                        break;
                    }
                    Ok(_) if line.len() >= MAX_HANDSHAKE => {
                        done = Some(None);
                        break;
                    }
                    Ok(_) => line.push(b[0]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        done = Some(None);
                        break;
                    }
                }
            }
            let Some(port) = done else { continue };
            let Some((stream, _)) = self.pending.remove(&t) else { continue };
            let _ = self.epoll.ctl(ControlOperation::Delete, stream.as_raw_fd(), EpollEvent::default());
            let Some(port) = port else { continue };
            let local = self.alloc_local_port(port);
            let k = (local, port);
            self.watch(stream.as_raw_fd(), key_token(k), false);
            self.conns.insert(k, Conn::new(stream, ConnState::Connecting));
            self.counters.active = self.conns.len() as u64;
            let h = self.header(k, op::REQUEST, 0, 0);
            self.queue_ctrl(h);
        }
    }

    fn alloc_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(LOCAL_PORT_BASE);
            if !self.conns.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    /// Hands queued control packets to the guest while it has buffers.
    fn rx_ctrl(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let mut work = Work::default();
        while let Some(mut h) = self.ctrl.front().copied() {
            let Some(chain) = next_chain(q, mem)? else { break };
            self.ctrl.pop_front();
            // Control packets carry the fwd_cnt of the moment they leave.
            if let Some(c) = self.conns.get(&(h.src_port, h.dst_port)) {
                h.fwd_cnt = c.fwd_cnt;
            }
            let head = chain.head_index();
            let (r, w) = check_chain(&chain, mem)?;
            if r != 0 || (w as usize) < HDR_LEN {
                return Err(DeviceError::MalformedChain(format!("vsock receive buffer {head} cannot hold a header")));
            }
            let mut writer = chain.writer(mem).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            writer.write_all(&h.to_bytes()).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            add_used(q, mem, head, HDR_LEN as u32)?;
            self.counters.rx_packets += 1;
            work.used = true;
        }
        Ok(work)
    }

    /// Moves host stream data into receive buffers, as far as each
    /// connection's guest credit allows; a closed host stream becomes a
    /// SHUTDOWN for the guest.
    fn rx_data(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let mut work = Work::default();
        let keys: Vec<Key> =
            self.conns.iter().filter(|(_, c)| c.state == ConnState::Established && !c.host_eof).map(|(k, _)| *k).collect();
        for k in keys {
            loop {
                let free = self.conns.get(&k).map_or(0, |c| c.peer_free()) as usize;
                if free == 0 {
                    break;
                }
                let Some(chain) = next_chain(q, mem)? else { return Ok(work) };
                let head = chain.head_index();
                let (r, w) = check_chain(&chain, mem)?;
                if r != 0 || (w as usize) < HDR_LEN {
                    return Err(DeviceError::MalformedChain(format!("vsock receive buffer {head} cannot hold a header")));
                }
                let room = (w as usize - HDR_LEN).min(free).min(self.buf.len());
                let c = self.conns.get_mut(&k).expect("key taken from the map");
                let n = match c.stream.read(&mut self.buf[..room]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                        q.go_to_previous_position();
                        break;
                    }
                    Err(_) => 0,
                };
                if n == 0 {
                    q.go_to_previous_position();
                    c.host_eof = true;
                    c.state = ConnState::Closing;
                    let h = self.header(k, op::SHUTDOWN, SHUT_RCV | SHUT_SEND, 0);
                    self.queue_ctrl(h);
                    break;
                }
                c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                c.fwd_cnt_told = c.fwd_cnt;
                let h = self.header(k, op::RW, 0, n as u32);
                let mut writer = chain.writer(mem).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
                writer.write_all(&h.to_bytes()).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
                writer.write_all(&self.buf[..n]).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
                add_used(q, mem, head, (HDR_LEN + n) as u32)?;
                self.counters.rx_packets += 1;
                self.counters.rx_bytes += n as u64;
                work.used = true;
            }
        }
        Ok(work)
    }

    /// Fills receive buffers: control packets first, then data, then the
    /// control packets that data movement produced.
    fn rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let a = self.rx_ctrl(q, mem)?;
        let b = self.rx_data(q, mem)?;
        let c = self.rx_ctrl(q, mem)?;
        Ok(Work { used: a.used || b.used || c.used })
    }

    /// Tells the guest that every connection is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).
    fn event_reset(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let Some(chain) = next_chain(q, mem)? else { return Ok(Work::default()) };
        let head = chain.head_index();
        let mut writer = chain.writer(mem).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
        writer.write_all(&0u32.to_le_bytes()).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
        add_used(q, mem, head, 4)?;
        self.reset_pending = false;
        Ok(Work { used: true })
    }

    fn pump(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let mut work = Work::default();
        if self.reset_pending && queues[EVT].ready() {
            work.used |= self.event_reset(&mut queues[EVT], mem)?.used;
        }
        self.host_side();
        let flush: Vec<Key> = self.conns.iter().filter(|(_, c)| !c.out.is_empty()).map(|(k, _)| *k).collect();
        for k in flush {
            self.flush(k);
        }
        if queues[RX].ready() {
            work.used |= self.rx(&mut queues[RX], mem)?.used;
        }
        Ok(work)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self, _acked: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reset(&mut self) {
        // The driver is gone, and with it every connection.
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.ctrl.clear();
    }
    fn process_queue(&mut self, q: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let mut work = Work::default();
        if q == TX {
            work.used |= self.tx(&mut queues[TX], mem)?.used;
        }
        // New receive buffers, fresh credit or replies to send: move data.
        work.used |= self.pump(queues, mem)?.used;
        Ok(work)
    }
    fn event_fds(&self) -> Vec<(RawFd, u32)> {
        vec![(self.epoll.as_raw_fd(), 0)]
    }
    fn process_event(&mut self, _token: u32, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        // Every new event on a host socket wakes the event loop through the
        // inner epoll; which socket it was does not matter, pump() looks at all.
        self.pump(queues, mem)
    }
    fn next_timer_ms(&self) -> Option<u64> {
        // After a restore, tell the guest at once, without waiting for it to kick.
        self.reset_pending.then_some(0)
    }
    fn process_timer(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let w = self.pump(queues, mem)?;
        if self.reset_pending && !queues[EVT].ready() {
            self.reset_pending = false;
        }
        Ok(w)
    }
    fn shutdown(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
    fn counters(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.counters).unwrap_or_default();
        v["guest_cid"] = self.cid.into();
        v["uds_path"] = self.uds_path.display().to_string().into();
        v
    }
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        // Host streams do not survive a snapshot: tell the guest.
        self.reset_pending = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_wire_order() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5000,
            len: 7,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn credit_never_goes_negative() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, ConnState::Established);
        c.peer_buf_alloc = 100;
        c.rx_cnt = 150;
        c.peer_fwd_cnt = 20;
        assert_eq!(c.peer_free(), 0);
        c.peer_fwd_cnt = 100;
        assert_eq!(c.peer_free(), 50);
    }
}
