//! Datapath ports: AF_PACKET with memory-mapped TPACKET_V2 rings (any kernel
//! interface: veth, tap, uplink NIC) and the VXLAN tunnel port (a UDP socket
//! on the underlay). Sockets can be opened inside another network namespace.
//! Ports with rings of their own (vhost-user, DPDK ethdev) implement
//! [`BurstPort`].

use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::packet::{parse_vxlan, write_vxlan, VXLAN_HEADER_LEN, VXLAN_PORT};

/// A port with rings of its own that the engine polls in bursts (vhost-user,
/// DPDK ethdev). Implementations allocate nothing per packet.
pub trait BurstPort: Send {
    /// Receives up to `bufs.len()` frames: frame i is copied into `bufs[i]`
    /// and its length stored in `lens[i]`. Returns how many were received.
    fn recv_burst(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> usize;
    /// Transmits a burst: the frames go onto the port's ring in order, are
    /// published together and the peer is notified at most once. Returns how
    /// many were queued; the rest were dropped (no room).
    fn send_burst(&mut self, frames: &[&[u8]]) -> usize;
    /// Transmits `n` frames written straight into the port's own buffers:
    /// `fill(i, buf)` writes frame i at the start of `buf` and returns its
    /// length (None skips it). Returns how many went, or None when the port
    /// has no buffers of its own to lend (then the caller builds frames
    /// itself and uses [`BurstPort::send_burst`]).
    fn send_filled(&mut self, n: usize, fill: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>) -> Option<usize> {
        let _ = (n, fill);
        None
    }
    /// Like [`BurstPort::recv_burst`], but a port may leave the end of a
    /// large frame where it is (in the sending guest's memory): `bufs[i]`
    /// then holds only the first `lens[i] - tails[i].len` bytes and
    /// `tails[i]` points at the rest. Tails stay valid, and the guest does
    /// not get those buffers back, until [`BurstPort::rx_done`].
    fn recv_burst_split(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize], tails: &mut [Tail]) -> usize {
        let n = self.recv_burst(bufs, lens);
        tails[..n].fill(Tail::NONE);
        n
    }
    /// Ends the last [`BurstPort::recv_burst_split`]: its tails are no longer used.
    fn rx_done(&mut self) {}
    /// Whether [`BurstPort::send_burst_split`] takes frames in two parts
    /// without first joining them.
    fn supports_split(&self) -> bool {
        false
    }
    /// Transmits frames given as (head, tail) pairs, one frame each; only
    /// called when [`BurstPort::supports_split`].
    fn send_burst_split(&mut self, frames: &[(&[u8], &[u8])]) -> usize {
        let mut sent = 0;
        let mut joined = Vec::new();
        for (head, tail) in frames {
            joined.clear();
            joined.extend_from_slice(head);
            joined.extend_from_slice(tail);
            sent += self.send_burst(&[&joined[..]]);
        }
        sent
    }
    /// A descriptor that turns readable when frames may be waiting (for poll(2)), or -1.
    fn fd(&self) -> RawFd;
}

/// The end of a received frame left in the sending guest's memory (see
/// [`BurstPort::recv_burst_split`]).
#[derive(Clone, Copy, Debug)]
pub struct Tail {
    /// Where the bytes are.
    pub ptr: *const u8,
    /// How many; 0 when the whole frame was copied.
    pub len: usize,
}

impl Tail {
    /// No tail: the frame was copied whole.
    pub const NONE: Tail = Tail { ptr: std::ptr::null(), len: 0 };

    /// The bytes.
    ///
    /// # Safety
    /// The port that produced the tail must not have seen `rx_done` since.
    pub unsafe fn bytes<'a>(&self) -> &'a [u8] {
        if self.len == 0 {
            &[]
        } else {
            // SAFETY: the caller keeps the producing port's receive burst open, so
            // ptr..ptr+len stays mapped and owned by us (the port checked the range).
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

// SAFETY: a tail is an address inside a guest memory mapping kept alive by
// its port; it moves between threads only inside the worker that owns the
// receive burst it belongs to.
unsafe impl Send for Tail {}

/// Most datagrams the VXLAN port moves per system call.
pub const TUNNEL_BATCH: usize = 64;

/// Errors opening or using a port.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// A system call failed.
    #[error("{what} failed: {source}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The interface does not exist.
    #[error("Interface '{0}' not found")]
    NoInterface(String),
    /// Entering the network namespace failed.
    #[error("Cannot enter network namespace {path}: {source}")]
    Netns {
        /// Namespace path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn sys(what: &'static str) -> PortError {
    PortError::Sys { what, source: io::Error::last_os_error() }
}

/// Runs `f` on a short-lived thread that has entered the network namespace at `netns`.
pub fn in_netns<T: Send + 'static>(netns: Option<&Path>, f: impl FnOnce() -> Result<T, PortError> + Send + 'static) -> Result<T, PortError> {
    let Some(path) = netns.map(Path::to_path_buf) else { return f() };
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).map_err(|source| PortError::Netns { path: path.clone(), source })?;
        // SAFETY: setns on a valid namespace fd only changes this (private, short-lived) thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(PortError::Netns { path, source: io::Error::last_os_error() });
        }
        f()
    })
    .join()
    .unwrap_or_else(|_| Err(PortError::Sys { what: "netns thread", source: io::Error::other("Thread panicked") }))
}

const SOL_PACKET: libc::c_int = 263;
const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
const PACKET_RX_RING: libc::c_int = 5;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_TX_RING: libc::c_int = 13;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const TPACKET_V2: libc::c_int = 1;
const PACKET_MR_PROMISC: libc::c_ushort = 1;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_SENDING: u32 = 2;
const TP_STATUS_WRONG_FORMAT: u32 = 4;
const TP_STATUS_CSUMNOTREADY: u32 = 8;
const TP_STATUS_VLAN_VALID: u32 = 0x10;
const HDR_LEN: usize = 32; // TPACKET_ALIGN(sizeof(struct tpacket2_hdr))
const FRAME_SIZE: usize = 2048;
const BLOCK_SIZE: usize = 1 << 16;
const BLOCKS: usize = 8;
const FRAMES: usize = BLOCK_SIZE / FRAME_SIZE * BLOCKS;

#[repr(C)]
struct TpacketReq {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
}

#[repr(C)]
struct PacketMreq {
    ifindex: libc::c_int,
    kind: libc::c_ushort,
    alen: libc::c_ushort,
    address: [u8; 8],
}

/// An AF_PACKET socket with RX and TX rings mapped into our memory.
pub struct AfPacket {
    fd: OwnedFd,
    ring: *mut u8,
    ring_len: usize,
    rx_next: usize,
    tx_next: usize,
    tx_pending: bool,
    /// The interface name.
    pub ifname: String,
}

// SAFETY: the ring mapping is owned by this value alone and only touched through &mut self.
unsafe impl Send for AfPacket {}

impl AfPacket {
    /// Opens interface `ifname` (inside `netns` when given).
    pub fn open(ifname: &str, netns: Option<&Path>) -> Result<AfPacket, PortError> {
        let name = ifname.to_string();
        let fd = in_netns(netns, move || open_packet_socket(&name))?;
        Self::map(fd, ifname)
    }

    fn map(fd: OwnedFd, ifname: &str) -> Result<AfPacket, PortError> {
        let raw = fd.as_raw_fd();
        let ring_len = BLOCK_SIZE * BLOCKS * 2;
        // SAFETY: mapping the socket's RX+TX rings (configured in open_packet_socket) shared, with the kernel-chosen address.
        let ring = unsafe { libc::mmap(std::ptr::null_mut(), ring_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_LOCKED, raw, 0) };
        let ring = if ring == libc::MAP_FAILED {
            // SAFETY: as above, without MAP_LOCKED (which may exceed RLIMIT_MEMLOCK).
            let r = unsafe { libc::mmap(std::ptr::null_mut(), ring_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, raw, 0) };
            if r == libc::MAP_FAILED {
                return Err(sys("mmap of packet ring"));
            }
            r
        } else {
            ring
        };
        Ok(AfPacket { fd, ring: ring as *mut u8, ring_len, rx_next: 0, tx_next: 0, tx_pending: false, ifname: ifname.to_string() })
    }

    fn frame(&self, tx: bool, i: usize) -> *mut u8 {
        let base = if tx { BLOCK_SIZE * BLOCKS } else { 0 };
        // SAFETY: i < FRAMES so the offset stays inside the mapping of ring_len bytes.
        unsafe { self.ring.add(base + i * FRAME_SIZE) }
    }

    /// Receives one frame into `out` (returns its length), or None when the ring is empty.
    pub fn recv(&mut self, out: &mut [u8]) -> Option<usize> {
        let f = self.frame(false, self.rx_next);
        // SAFETY: f points at a tpacket2_hdr inside the mapped ring; the status word is shared
        // with the kernel, so it is read volatile and with acquire ordering.
        let status = unsafe { std::ptr::read_volatile(f as *const u32) };
        if status & TP_STATUS_USER == 0 {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        // SAFETY: the kernel handed this frame to us (TP_STATUS_USER); header fields lie within it.
        let (snaplen, mac, tci) = unsafe { (std::ptr::read(f.add(8) as *const u32) as usize, std::ptr::read(f.add(12) as *const u16) as usize, std::ptr::read(f.add(24) as *const u16)) };
        let mut n = 0;
        if mac + snaplen <= FRAME_SIZE {
            // SAFETY: mac+snaplen is inside the frame (checked); the kernel does not write it while we own it.
            let data = unsafe { std::slice::from_raw_parts(f.add(mac), snaplen) };
            if status & TP_STATUS_VLAN_VALID != 0 && snaplen >= 12 && snaplen + 4 <= out.len() {
                out[..12].copy_from_slice(&data[..12]);
                out[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
                out[14..16].copy_from_slice(&tci.to_be_bytes());
                out[16..snaplen + 4].copy_from_slice(&data[12..]);
                n = snaplen + 4;
            } else if snaplen <= out.len() {
                out[..snaplen].copy_from_slice(data);
                n = snaplen;
            }
            if status & TP_STATUS_CSUMNOTREADY != 0 {
                crate::packet::fill_partial_checksum(&mut out[..n]);
            }
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: giving the frame back to the kernel by writing its status word.
        unsafe { std::ptr::write_volatile(f as *mut u32, 0) };
        self.rx_next = (self.rx_next + 1) % FRAMES;
        Some(n)
    }

    /// Queues one frame on the TX ring; false if the ring is full (dropped).
    pub fn send(&mut self, data: &[u8]) -> bool {
        if data.len() > FRAME_SIZE - HDR_LEN {
            return false;
        }
        let f = self.frame(true, self.tx_next);
        // SAFETY: f is a TX frame header in the mapping; status is shared with the kernel.
        let status = unsafe { std::ptr::read_volatile(f as *const u32) };
        if status & (TP_STATUS_SEND_REQUEST | TP_STATUS_SENDING) != 0 {
            self.flush();
            return false;
        }
        if status & TP_STATUS_WRONG_FORMAT != 0 {
            // The kernel rejected an earlier frame here; reclaim the slot.
        }
        // SAFETY: the slot is ours (status available); we write the payload and length
        // inside the frame, then publish it with a release fence and the status word.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), f.add(HDR_LEN), data.len());
            std::ptr::write(f.add(4) as *mut u32, data.len() as u32);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            std::ptr::write_volatile(f as *mut u32, TP_STATUS_SEND_REQUEST);
        }
        self.tx_next = (self.tx_next + 1) % FRAMES;
        self.tx_pending = true;
        true
    }

    /// Asks the kernel to transmit queued frames.
    pub fn flush(&mut self) {
        if !self.tx_pending {
            return;
        }
        self.tx_pending = false;
        // SAFETY: a zero-length send on our own socket kicks TX ring processing.
        unsafe { libc::send(self.fd.as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT) };
    }

    /// The socket, for poll().
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for AfPacket {
    fn drop(&mut self) {
        // SAFETY: unmapping the region mapped in `map`, which nothing refers to any more.
        unsafe { libc::munmap(self.ring as *mut libc::c_void, self.ring_len) };
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T, what: &'static str) -> Result<(), PortError> {
    // SAFETY: val is a valid T for the duration of the call and its size is passed.
    let rc = unsafe { libc::setsockopt(fd, level, name, val as *const T as *const libc::c_void, std::mem::size_of::<T>() as libc::socklen_t) };
    if rc != 0 {
        return Err(sys(what));
    }
    Ok(())
}

fn open_packet_socket(ifname: &str) -> Result<OwnedFd, PortError> {
    let cname = CString::new(ifname).map_err(|_| PortError::NoInterface(ifname.to_string()))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(PortError::NoInterface(ifname.to_string()));
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto as libc::c_int) };
    if raw < 0 {
        return Err(sys("socket(AF_PACKET)"));
    }
    // SAFETY: raw is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setsockopt(raw, SOL_PACKET, PACKET_VERSION, &TPACKET_V2, "PACKET_VERSION")?;
    let one: libc::c_int = 1;
    // Older kernels lack it; then our own transmissions show up and are filtered by pkttype below.
    let _ = setsockopt(raw, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, "PACKET_IGNORE_OUTGOING");
    let req = TpacketReq { block_size: BLOCK_SIZE as u32, block_nr: BLOCKS as u32, frame_size: FRAME_SIZE as u32, frame_nr: FRAMES as u32 };
    setsockopt(raw, SOL_PACKET, PACKET_RX_RING, &req, "PACKET_RX_RING")?;
    setsockopt(raw, SOL_PACKET, PACKET_TX_RING, &req, "PACKET_TX_RING")?;
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid starting value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: binding our socket to a properly initialised sockaddr_ll of the right size.
    let rc = unsafe { libc::bind(raw, &sll as *const libc::sockaddr_ll as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t) };
    if rc != 0 {
        return Err(sys("bind(AF_PACKET)"));
    }
    let mreq = PacketMreq { ifindex: ifindex as i32, kind: PACKET_MR_PROMISC, alen: 0, address: [0; 8] };
    setsockopt(raw, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mreq, "PACKET_ADD_MEMBERSHIP")?;
    Ok(fd)
}

/// The VXLAN tunnel port: a UDP socket on the underlay address.
pub struct Tunnel {
    sock: std::net::UdpSocket,
}

impl Tunnel {
    /// Binds `local`:4789 (inside `netns` when given).
    pub fn open(local: Ipv4Addr, netns: Option<&Path>) -> Result<Tunnel, PortError> {
        let sock = in_netns(netns, move || std::net::UdpSocket::bind(SocketAddrV4::new(local, VXLAN_PORT)).map_err(|source| PortError::Sys { what: "bind of VXLAN socket", source }))?;
        sock.set_nonblocking(true).map_err(|source| PortError::Sys { what: "set_nonblocking", source })?;
        // Room for bursts: a batch of sendmmsg must not find the socket buffer full.
        let size: libc::c_int = 8 << 20;
        let _ = setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, &size, "SO_SNDBUF");
        let _ = setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, &size, "SO_RCVBUF");
        Ok(Tunnel { sock })
    }

    /// Receives up to `bufs.len()` VXLAN packets with one `recvmmsg`: the
    /// inner frame of packet i lands in `bufs[i]` (the VXLAN header goes to a
    /// scratch array, not copied), `meta[i]` is (length, VNI, remote).
    /// Datagrams that are not VXLAN or were truncated are skipped.
    pub fn recv_burst(&mut self, bufs: &mut [&mut [u8]], meta: &mut [(usize, u32, Ipv4Addr)]) -> usize {
        let n = bufs.len().min(meta.len()).min(TUNNEL_BATCH);
        if n == 0 {
            return 0;
        }
        let mut hdrs = [[0u8; VXLAN_HEADER_LEN]; TUNNEL_BATCH];
        // SAFETY: sockaddr_in, iovec and mmsghdr are plain data; zeroed is a valid value for each.
        let mut addrs: [libc::sockaddr_in; TUNNEL_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut iovs: [[libc::iovec; 2]; TUNNEL_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; TUNNEL_BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            iovs[i][0] = libc::iovec { iov_base: hdrs[i].as_mut_ptr() as *mut libc::c_void, iov_len: VXLAN_HEADER_LEN };
            iovs[i][1] = libc::iovec { iov_base: bufs[i].as_mut_ptr() as *mut libc::c_void, iov_len: bufs[i].len() };
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = &mut addrs[i] as *mut libc::sockaddr_in as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = iovs[i].as_mut_ptr();
            h.msg_iovlen = 2;
        }
        // SAFETY: msgs[..n] point at iovecs, addresses and buffers that outlive the call,
        // each of the length given.
        let got = unsafe { libc::recvmmsg(self.sock.as_raw_fd(), msgs.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
        if got <= 0 {
            return 0;
        }
        let mut out = 0;
        for i in 0..got as usize {
            let len = msgs[i].msg_len as usize;
            let truncated = msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let Some(vni) = parse_vxlan(&hdrs[i]) else { continue };
            if truncated || len < VXLAN_HEADER_LEN || addrs[i].sin_family != libc::AF_INET as u16 {
                continue;
            }
            if out != i {
                // Keep the burst dense: move this frame down into slot `out`.
                let (lo, hi) = bufs.split_at_mut(i);
                lo[out][..len - VXLAN_HEADER_LEN].copy_from_slice(&hi[0][..len - VXLAN_HEADER_LEN]);
            }
            meta[out] = (len - VXLAN_HEADER_LEN, vni, Ipv4Addr::from(u32::from_be(addrs[i].sin_addr.s_addr)));
            out += 1;
        }
        out
    }

    /// Sends a burst of frames, each to its (VNI, remote), with `sendmmsg`
    /// (one system call per [`TUNNEL_BATCH`] frames). Returns how many the kernel took.
    pub fn send_burst(&mut self, frames: &[(&[u8], u32, Ipv4Addr)]) -> usize {
        let mut sent = 0;
        for chunk in frames.chunks(TUNNEL_BATCH) {
            let mut hdrs = [[0u8; VXLAN_HEADER_LEN]; TUNNEL_BATCH];
            // SAFETY: sockaddr_in, iovec and mmsghdr are plain data; zeroed is a valid value for each.
            let mut addrs: [libc::sockaddr_in; TUNNEL_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut iovs: [[libc::iovec; 2]; TUNNEL_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut msgs: [libc::mmsghdr; TUNNEL_BATCH] = unsafe { std::mem::zeroed() };
            for (i, (frame, vni, remote)) in chunk.iter().enumerate() {
                write_vxlan(&mut hdrs[i], *vni);
                addrs[i] = libc::sockaddr_in { sin_family: libc::AF_INET as u16, sin_port: VXLAN_PORT.to_be(), sin_addr: libc::in_addr { s_addr: u32::from(*remote).to_be() }, sin_zero: [0; 8] };
                iovs[i][0] = libc::iovec { iov_base: hdrs[i].as_mut_ptr() as *mut libc::c_void, iov_len: VXLAN_HEADER_LEN };
                iovs[i][1] = libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() };
                let h = &mut msgs[i].msg_hdr;
                h.msg_name = &mut addrs[i] as *mut libc::sockaddr_in as *mut libc::c_void;
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_iov = iovs[i].as_mut_ptr();
                h.msg_iovlen = 2;
            }
            // SAFETY: msgs[..chunk.len()] point at headers, addresses and frames that outlive
            // the call; the kernel only reads the iovecs of a send.
            let n = unsafe { libc::sendmmsg(self.sock.as_raw_fd(), msgs.as_mut_ptr(), chunk.len() as u32, libc::MSG_DONTWAIT) };
            if n <= 0 {
                break;
            }
            sent += n as usize;
            if (n as usize) < chunk.len() {
                break;
            }
        }
        sent
    }

    /// The socket, for poll().
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` with the members we use (name, then flags or a hardware address).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(ifname: &str) -> Result<IfReq, PortError> {
        if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains('/') {
            return Err(PortError::Sys { what: "interface name", source: io::Error::new(io::ErrorKind::InvalidInput, format!("Bad interface name '{ifname}' (1 to 15 characters)")) });
        }
        let mut r = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        r.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        Ok(r)
    }
}

/// An internal tap port: a tap interface the datapath owns (for host services,
/// router and test namespaces). The interface exists while the port does.
pub struct Tap {
    fd: OwnedFd,
    /// The interface name.
    pub ifname: String,
}

impl Tap {
    /// Creates tap interface `ifname` (inside `netns` when given), sets its MAC
    /// when given and brings it up.
    pub fn create(ifname: &str, mac: Option<crate::mac::MacAddr>, netns: Option<&Path>) -> Result<Tap, PortError> {
        let name = ifname.to_string();
        let fd = in_netns(netns, move || create_tap(&name, mac))?;
        Ok(Tap { fd, ifname: ifname.to_string() })
    }

    /// Creates the tap in the calling thread's network namespace.
    pub fn create_here(ifname: &str, mac: Option<crate::mac::MacAddr>) -> Result<Tap, PortError> {
        Ok(Tap { fd: create_tap(ifname, mac)?, ifname: ifname.to_string() })
    }

    /// Receives one frame into `out`, or None when nothing is waiting.
    pub fn recv(&mut self, out: &mut [u8]) -> Option<usize> {
        // SAFETY: reading into a buffer we own, of the length passed.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), out.as_mut_ptr() as *mut libc::c_void, out.len()) };
        (n > 0).then_some(n as usize)
    }

    /// Sends one frame; false if the kernel refused it.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        // SAFETY: writing from a slice we borrow, of its length.
        unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr() as *const libc::c_void, frame.len()) == frame.len() as isize }
    }

    /// The tap's file descriptor, for poll().
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn create_tap(ifname: &str, mac: Option<crate::mac::MacAddr>) -> Result<OwnedFd, PortError> {
    let mut req = IfReq::new(ifname)?;
    // SAFETY: opening a device node by a NUL-terminated path.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(sys("open(/dev/net/tun)"));
    }
    // SAFETY: raw is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    req.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out (40 bytes).
    if unsafe { libc::ioctl(raw, TUNSETIFF as _, &mut req as *mut IfReq) } != 0 {
        return Err(sys("TUNSETIFF"));
    }
    if let Some(mac) = mac {
        let mut r = IfReq::new(ifname)?;
        r.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        r.data[2..8].copy_from_slice(&mac.0);
        if_ioctl(libc::SIOCSIFHWADDR, &mut r, "SIOCSIFHWADDR")?;
    }
    set_up(ifname)?;
    Ok(fd)
}

/// Runs an interface ioctl on a throw-away socket in the calling thread's namespace.
fn if_ioctl(request: libc::c_ulong, req: &mut IfReq, what: &'static str) -> Result<(), PortError> {
    // SAFETY: plain socket creation.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(sys("socket(AF_INET)"));
    }
    // SAFETY: s is a fresh fd we own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: interface ioctls read/write a struct ifreq, which IfReq lays out.
    if unsafe { libc::ioctl(s.as_raw_fd(), request as _, req as *mut IfReq) } != 0 {
        return Err(sys(what));
    }
    Ok(())
}

/// Brings interface `ifname` up (in the calling thread's namespace).
pub fn set_up(ifname: &str) -> Result<(), PortError> {
    let mut r = IfReq::new(ifname)?;
    if_ioctl(libc::SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS")?;
    let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    if_ioctl(libc::SIOCSIFFLAGS, &mut r, "SIOCSIFFLAGS")
}

/// Gives interface `ifname` the IPv4 address `addr` with prefix `prefix_len`
/// (in the calling thread's namespace); the kernel adds the on-link route.
pub fn set_ipv4(ifname: &str, addr: Ipv4Addr, prefix_len: u8) -> Result<(), PortError> {
    let sin = |a: Ipv4Addr| {
        let mut d = [0u8; 24];
        d[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        d[4..8].copy_from_slice(&a.octets());
        d
    };
    let mut r = IfReq::new(ifname)?;
    r.data = sin(addr);
    if_ioctl(libc::SIOCSIFADDR, &mut r, "SIOCSIFADDR")?;
    let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len.min(32)) };
    let mut r = IfReq::new(ifname)?;
    r.data = sin(Ipv4Addr::from(mask));
    if_ioctl(libc::SIOCSIFNETMASK, &mut r, "SIOCSIFNETMASK")
}

/// A VXLAN endpoint as the engine sees it: bursts of inner frames in and out,
/// each with its VNI and remote endpoint.
pub trait Encap: Send {
    /// Receives up to `bufs.len()` inner frames into `bufs`; `meta[i]` is
    /// (length, VNI, remote endpoint).
    fn recv_burst(&mut self, bufs: &mut [&mut [u8]], meta: &mut [(usize, u32, Ipv4Addr)]) -> usize;
    /// Sends inner frames, each to its (VNI, remote); returns how many went.
    fn send_burst(&mut self, frames: &[(&[u8], u32, Ipv4Addr)]) -> usize;
    /// Whether [`Encap::send_burst_split`] takes frames in two parts without joining them.
    fn supports_split(&self) -> bool {
        false
    }
    /// Sends inner frames given as (head, tail); only called when [`Encap::supports_split`].
    fn send_burst_split(&mut self, frames: &[(&[u8], &[u8], u32, Ipv4Addr)]) -> usize {
        let mut sent = 0;
        for &(head, tail, vni, remote) in frames {
            let joined = [head, tail].concat();
            sent += self.send_burst(&[(&joined[..], vni, remote)]);
        }
        sent
    }
    /// A descriptor for poll(2), or -1.
    fn fd(&self) -> RawFd;
}

impl Encap for Tunnel {
    fn recv_burst(&mut self, bufs: &mut [&mut [u8]], meta: &mut [(usize, u32, Ipv4Addr)]) -> usize {
        Tunnel::recv_burst(self, bufs, meta)
    }
    fn send_burst(&mut self, frames: &[(&[u8], u32, Ipv4Addr)]) -> usize {
        Tunnel::send_burst(self, frames)
    }
    fn fd(&self) -> RawFd {
        Tunnel::fd(self)
    }
}

impl BurstPort for AfPacket {
    fn recv_burst(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> usize {
        let mut n = 0;
        while n < bufs.len() {
            let Some(l) = self.recv(&mut *bufs[n]) else { break };
            lens[n] = l;
            n += 1;
        }
        n
    }
    fn send_burst(&mut self, frames: &[&[u8]]) -> usize {
        let sent = frames.iter().filter(|f| self.send(f)).count();
        self.flush();
        sent
    }
    fn fd(&self) -> RawFd {
        AfPacket::fd(self)
    }
}

/// Outer Ethernet + IPv4 + UDP + VXLAN.
const OUTER_LEN: usize = 14 + 20 + 8 + VXLAN_HEADER_LEN;

/// VXLAN with the encapsulation done in the datapath: we write the outer
/// Ethernet, IPv4, UDP and VXLAN headers ourselves and move whole frames
/// through a frame port on the underlay (an AF_PACKET ring on the uplink, or
/// a DPDK NIC) in bursts, instead of one kernel UDP socket operation per
/// packet. The next hop of each remote endpoint comes from a neighbour table
/// given at setup (the kernel's, read by [`read_neighbors`]) or
/// [`VxlanUnderlay::set_neighbor`].
pub struct VxlanUnderlay {
    port: Box<dyn BurstPort>,
    local_ip: Ipv4Addr,
    local_mac: [u8; 6],
    neighbors: Vec<(Ipv4Addr, [u8; 6])>,
    /// Remotes outside `local_ip/prefix` are reached through this router.
    gateway: Option<(u8, Ipv4Addr)>,
    /// When an ARP request last went out, per address being resolved.
    asked: Vec<(Ipv4Addr, Instant)>,
    /// ARP frames to send at the end of the current call.
    arp_out: Vec<Vec<u8>>,
    /// Encapsulation buffers, reused every burst.
    out: Vec<Box<[u8]>>,
    /// Outer Ethernet/IPv4/UDP headers for the last (remote, next-hop MAC),
    /// with the IPv4 header's checksum summed without its length.
    template: Option<(Ipv4Addr, [u8; 6], [u8; 42], u32)>,
    /// Frames dropped because the remote's MAC was unknown.
    pub no_neighbor: u64,
    /// ARP requests sent for remotes (or the gateway) with no known MAC.
    pub arp_requests: u64,
    /// ARP requests for our address answered.
    pub arp_replies: u64,
}

/// Most underlay neighbours remembered.
const MAX_UNDERLAY_NEIGHBORS: usize = 4096;
/// At most one ARP request per address per this long.
const ARP_RETRY: Duration = Duration::from_secs(1);

/// A hash of bytes 6..38 of a frame (source MAC, ethertype and, for IPv4,
/// the addresses and ports): four word loads and multiplies, where a byte
/// loop costs a chain of 32 dependent multiplies per packet.
#[inline]
fn flow_entropy(f: &[u8]) -> u32 {
    let w = |o: usize| f.get(o..o + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let h = w(6).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ w(14).wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ w(22).wrapping_mul(0x1656_67b1_9e37_79f9) ^ w(30).wrapping_mul(0x27d4_eb2f_1656_67c5);
    (h ^ (h >> 29) ^ (h >> 47)) as u32
}

impl VxlanUnderlay {
    /// An endpoint on `local_ip` with MAC `local_mac`, sending through `port`.
    pub fn new(port: Box<dyn BurstPort>, local_ip: Ipv4Addr, local_mac: [u8; 6], neighbors: Vec<(Ipv4Addr, [u8; 6])>) -> VxlanUnderlay {
        VxlanUnderlay { port, local_ip, local_mac, neighbors, gateway: None, asked: Vec::new(), arp_out: Vec::new(), out: Vec::new(), template: None, no_neighbor: 0, arp_requests: 0, arp_replies: 0 }
    }

    /// Sends traffic for remotes outside `local_ip/prefix_len` to `gateway`
    /// (whose MAC is resolved like any neighbour's).
    pub fn set_gateway(&mut self, prefix_len: u8, gateway: Ipv4Addr) {
        self.gateway = Some((prefix_len.min(32), gateway));
    }

    /// The address whose MAC a frame to `remote` goes to.
    fn next_hop(&self, remote: Ipv4Addr) -> Ipv4Addr {
        match self.gateway {
            Some((len, gw)) => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
                if u32::from(remote) & mask == u32::from(self.local_ip) & mask {
                    remote
                } else {
                    gw
                }
            }
            None => remote,
        }
    }

    /// The MAC for frames to `remote`; when unknown, asks for it (at most
    /// once a second per address) and counts the drop.
    fn resolve(&mut self, remote: Ipv4Addr) -> Option<[u8; 6]> {
        let hop = self.next_hop(remote);
        if let Some(m) = self.neighbor(hop) {
            return Some(m);
        }
        self.no_neighbor += 1;
        let now = Instant::now();
        match self.asked.iter_mut().find(|(ip, _)| *ip == hop) {
            Some((_, t)) if now.duration_since(*t) < ARP_RETRY => return None,
            Some((_, t)) => *t = now,
            None => {
                if self.asked.len() >= MAX_UNDERLAY_NEIGHBORS {
                    self.asked.remove(0);
                }
                self.asked.push((hop, now));
            }
        }
        let mut f = vec![0u8; 60];
        let n = crate::packet::write_arp_request(&mut f, crate::mac::MacAddr(self.local_mac), self.local_ip.octets(), hop.octets(), 0);
        f.truncate(n.max(60));
        self.arp_out.push(f);
        self.arp_requests += 1;
        None
    }

    /// Handles an ARP frame from the underlay: learns the sender when the
    /// frame is for us (or the sender is known already) and answers requests
    /// for our address. Returns false when `f` is not ARP.
    fn handle_arp(&mut self, f: &[u8]) -> bool {
        if f.len() < 42 || f[12..14] != [0x08, 0x06] {
            return false;
        }
        let a = &f[14..42];
        if a[0..2] != [0, 1] || a[2..4] != [8, 0] || a[4] != 6 || a[5] != 4 {
            return true;
        }
        let op = u16::from_be_bytes([a[6], a[7]]);
        let sha: [u8; 6] = a[8..14].try_into().unwrap_or([0; 6]);
        let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
        let tpa = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
        if sha[0] & 1 != 0 || spa.is_unspecified() || spa == self.local_ip {
            return true;
        }
        let known = self.neighbor(spa).is_some();
        if tpa == self.local_ip || known {
            self.set_neighbor(spa, sha);
            self.asked.retain(|(ip, _)| *ip != spa);
        }
        if op == 1 && tpa == self.local_ip {
            let mut r = vec![0u8; 60];
            r[0..6].copy_from_slice(&sha);
            r[6..12].copy_from_slice(&self.local_mac);
            r[12..14].copy_from_slice(&[0x08, 0x06]);
            r[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
            r[22..28].copy_from_slice(&self.local_mac);
            r[28..32].copy_from_slice(&self.local_ip.octets());
            r[32..38].copy_from_slice(&sha);
            r[38..42].copy_from_slice(&spa.octets());
            self.arp_out.push(r);
            self.arp_replies += 1;
        }
        true
    }

    /// Sends the ARP frames gathered during this call.
    fn flush_arp(&mut self) {
        if self.arp_out.is_empty() {
            return;
        }
        let out = std::mem::take(&mut self.arp_out);
        let refs: Vec<&[u8]> = out.iter().map(|f| &f[..]).collect();
        self.port.send_burst(&refs);
    }

    /// Sets the underlay MAC of a remote endpoint (or of the next hop toward it).
    pub fn set_neighbor(&mut self, ip: Ipv4Addr, mac: [u8; 6]) {
        match self.neighbors.iter_mut().find(|(i, _)| *i == ip) {
            Some(n) => n.1 = mac,
            None => {
                if self.neighbors.len() >= MAX_UNDERLAY_NEIGHBORS {
                    self.neighbors.remove(0);
                }
                self.neighbors.push((ip, mac))
            }
        }
    }

    fn neighbor(&self, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.neighbors.iter().find(|(i, _)| *i == ip).map(|(_, m)| *m)
    }

    /// Outer headers toward `remote` via `dst_mac` with the length, the
    /// checksum, the UDP source port and VNI left to fill; and the
    /// one's-complement sum of the IPv4 header as it stands.
    fn build_template(&self, remote: Ipv4Addr, dst_mac: [u8; 6]) -> ([u8; 42], u32) {
        let mut h = [0u8; 42];
        h[0..6].copy_from_slice(&dst_mac);
        h[6..12].copy_from_slice(&self.local_mac);
        h[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        // Version/IHL, DF set (so the identification may stay 0, RFC 6864), TTL 64, UDP.
        h[14] = 0x45;
        h[20..22].copy_from_slice(&0x4000u16.to_be_bytes());
        h[22] = 64;
        h[23] = 17;
        h[26..30].copy_from_slice(&self.local_ip.octets());
        h[30..34].copy_from_slice(&remote.octets());
        h[36..38].copy_from_slice(&VXLAN_PORT.to_be_bytes());
        // UDP checksum 0: allowed over IPv4.
        let sum = h[14..34].chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u32).sum();
        (h, sum)
    }

    /// Writes the encapsulation of the inner frame `head` + `tail` toward
    /// `remote` into `out`; returns the frame length.
    fn encapsulate(&mut self, out: &mut [u8], head: &[u8], tail: &[u8], vni: u32, remote: Ipv4Addr, dst_mac: [u8; 6]) -> Option<usize> {
        let inner_len = head.len() + tail.len();
        let total = OUTER_LEN + inner_len;
        if total > out.len() || total - 14 > u16::MAX as usize {
            return None;
        }
        let (hdr, sum) = match self.template {
            Some((r, m, h, s)) if r == remote && m == dst_mac => (h, s),
            _ => {
                let (h, s) = self.build_template(remote, dst_mac);
                self.template = Some((remote, dst_mac, h, s));
                (h, s)
            }
        };
        out[..42].copy_from_slice(&hdr);
        let ip_len = (total - 14) as u16;
        out[16..18].copy_from_slice(&ip_len.to_be_bytes());
        let mut c = sum + ip_len as u32;
        c = (c & 0xffff) + (c >> 16);
        c = (c & 0xffff) + (c >> 16);
        out[24..26].copy_from_slice(&(!(c as u16)).to_be_bytes());
        // Source port from the inner addresses: the underlay's ECMP and RSS spread flows.
        let sport = 49152 + (flow_entropy(head) % 16384) as u16;
        out[34..36].copy_from_slice(&sport.to_be_bytes());
        out[38..40].copy_from_slice(&((total - 34) as u16).to_be_bytes());
        let mut vx = [0u8; VXLAN_HEADER_LEN];
        write_vxlan(&mut vx, vni);
        out[42..OUTER_LEN].copy_from_slice(&vx);
        out[OUTER_LEN..OUTER_LEN + head.len()].copy_from_slice(head);
        out[OUTER_LEN + head.len()..total].copy_from_slice(tail);
        Some(total)
    }

    /// Encapsulates inner frames given as (head, tail), each to its (VNI,
    /// remote): straight into the port's buffers (a NIC's mbufs) when it
    /// lends them, so a frame is copied once, from the guest to the NIC.
    fn send_split(&mut self, frames: &[(&[u8], &[u8], u32, Ipv4Addr)]) -> usize {
        let mut port = std::mem::replace(&mut self.port, Box::new(NoPort));
        let direct = port.send_filled(frames.len(), &mut |i, buf| {
            let (head, tail, vni, remote) = frames[i];
            let mac = self.resolve(remote)?;
            self.encapsulate(buf, head, tail, vni, remote, mac)
        });
        self.port = port;
        if let Some(sent) = direct {
            self.flush_arp();
            return sent;
        }
        let mut sent = 0;
        for chunk in frames.chunks(TUNNEL_BATCH) {
            while self.out.len() < chunk.len() {
                self.out.push(vec![0u8; 8192 + OUTER_LEN].into_boxed_slice());
            }
            let mut out = std::mem::take(&mut self.out);
            let mut lens = [0usize; TUNNEL_BATCH];
            let mut m = 0;
            for &(head, tail, vni, remote) in chunk {
                let Some(mac) = self.resolve(remote) else { continue };
                if let Some(l) = self.encapsulate(&mut out[m], head, tail, vni, remote, mac) {
                    lens[m] = l;
                    m += 1;
                }
            }
            let refs: [&[u8]; TUNNEL_BATCH] = std::array::from_fn(|i| if i < m { &out[i][..lens[i]] } else { &[][..] });
            sent += self.port.send_burst(&refs[..m]);
            self.out = out;
        }
        self.flush_arp();
        sent
    }

    /// The inner frame's offset, VNI and outer source of a received VXLAN frame for us.
    fn decapsulate(&self, f: &[u8]) -> Option<(usize, u32, Ipv4Addr)> {
        if f.len() < OUTER_LEN || f[12..14] != [0x08, 0x00] || f[14] & 0xf0 != 0x40 || f[23] != 17 {
            return None;
        }
        let ihl = (f[14] & 0x0f) as usize * 4;
        if ihl < 20 || f[30..34] != self.local_ip.octets() || u16::from_be_bytes([f[20], f[21]]) & 0x3fff != 0 {
            return None;
        }
        let udp = 14 + ihl;
        let vx = udp + 8;
        if f.len() < vx + VXLAN_HEADER_LEN || u16::from_be_bytes([f[udp + 2], f[udp + 3]]) != VXLAN_PORT {
            return None;
        }
        let vni = parse_vxlan(&f[vx..])?;
        Some((vx + VXLAN_HEADER_LEN, vni, Ipv4Addr::new(f[26], f[27], f[28], f[29])))
    }
}

impl Encap for VxlanUnderlay {
    fn recv_burst(&mut self, bufs: &mut [&mut [u8]], meta: &mut [(usize, u32, Ipv4Addr)]) -> usize {
        let n = bufs.len().min(meta.len()).min(TUNNEL_BATCH);
        let mut lens = [0usize; TUNNEL_BATCH];
        let got = self.port.recv_burst(&mut bufs[..n], &mut lens[..n]);
        let mut out = 0;
        for i in 0..got {
            if bufs[i][12..14] == [0x08, 0x06] && self.handle_arp(&bufs[i][..lens[i]]) {
                continue;
            }
            let Some((off, vni, remote)) = self.decapsulate(&bufs[i][..lens[i]]) else { continue };
            let len = lens[i] - off;
            if out == i {
                bufs[i].copy_within(off..off + len, 0);
            } else {
                let (lo, hi) = bufs.split_at_mut(i);
                lo[out][..len].copy_from_slice(&hi[0][off..off + len]);
            }
            meta[out] = (len, vni, remote);
            out += 1;
        }
        self.flush_arp();
        out
    }

    fn send_burst(&mut self, frames: &[(&[u8], u32, Ipv4Addr)]) -> usize {
        let mut sent = 0;
        for chunk in frames.chunks(TUNNEL_BATCH) {
            let mut split: [(&[u8], &[u8], u32, Ipv4Addr); TUNNEL_BATCH] = [(&[], &[], 0, Ipv4Addr::UNSPECIFIED); TUNNEL_BATCH];
            for (s, &(f, vni, remote)) in split.iter_mut().zip(chunk) {
                *s = (f, &[], vni, remote);
            }
            sent += self.send_split(&split[..chunk.len()]);
        }
        sent
    }

    fn supports_split(&self) -> bool {
        true
    }

    fn send_burst_split(&mut self, frames: &[(&[u8], &[u8], u32, Ipv4Addr)]) -> usize {
        self.send_split(frames)
    }

    fn fd(&self) -> RawFd {
        self.port.fd()
    }
}

/// Stands in for a [`VxlanUnderlay`]'s port while the port lends it buffers.
struct NoPort;

impl BurstPort for NoPort {
    fn recv_burst(&mut self, _: &mut [&mut [u8]], _: &mut [usize]) -> usize {
        0
    }
    fn send_burst(&mut self, _: &[&[u8]]) -> usize {
        0
    }
    fn fd(&self) -> RawFd {
        -1
    }
}

/// The MAC of interface `ifname` (in the calling thread's namespace).
pub fn interface_mac(ifname: &str) -> Result<[u8; 6], PortError> {
    let mut r = IfReq::new(ifname)?;
    if_ioctl(libc::SIOCGIFHWADDR, &mut r, "SIOCGIFHWADDR")?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&r.data[2..8]);
    Ok(mac)
}

/// The kernel's IPv4 neighbours that are complete, in the calling thread's
/// namespace (/proc/thread-self: /proc/net shows the main thread's).
pub fn read_neighbors() -> Vec<(Ipv4Addr, [u8; 6])> {
    let text = std::fs::read_to_string("/proc/thread-self/net/arp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ip: Ipv4Addr = f.first()?.parse().ok()?;
            let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
            let mac: crate::mac::MacAddr = f.get(3)?.parse().ok()?;
            (flags & 0x2 != 0).then_some((ip, mac.0))
        })
        .collect()
}

#[cfg(test)]
mod underlay_tests {
    use super::*;

    /// A frame port that keeps what it is given and hands it back on receive.
    #[derive(Default)]
    struct Loop(std::collections::VecDeque<Vec<u8>>);

    impl BurstPort for Loop {
        fn recv_burst(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> usize {
            let mut n = 0;
            while n < bufs.len() {
                let Some(f) = self.0.pop_front() else { break };
                bufs[n][..f.len()].copy_from_slice(&f);
                lens[n] = f.len();
                n += 1;
            }
            n
        }
        fn send_burst(&mut self, frames: &[&[u8]]) -> usize {
            self.0.extend(frames.iter().map(|f| f.to_vec()));
            frames.len()
        }
        fn fd(&self) -> RawFd {
            -1
        }
    }

    /// A port that lends buffers of its own (as a NIC's mbufs) and keeps what was written.
    #[derive(Default, Clone)]
    struct Lend(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

    impl BurstPort for Lend {
        fn recv_burst(&mut self, _: &mut [&mut [u8]], _: &mut [usize]) -> usize {
            0
        }
        fn send_burst(&mut self, frames: &[&[u8]]) -> usize {
            // Only the underlay's own ARP frames may come this way.
            assert!(frames.iter().all(|f| f[12..14] == [0x08, 0x06]), "tunnel frames must be written into lent buffers");
            frames.len()
        }
        fn send_filled(&mut self, n: usize, fill: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>) -> Option<usize> {
            let mut sent = 0;
            for i in 0..n {
                let mut buf = vec![0u8; 2048];
                if let Some(l) = fill(i, &mut buf) {
                    buf.truncate(l);
                    self.0.lock().unwrap().push(buf);
                    sent += 1;
                }
            }
            Some(sent)
        }
        fn fd(&self) -> RawFd {
            -1
        }
    }

    #[test]
    fn encapsulation_into_lent_buffers_matches_the_copying_path() {
        let (a, b) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
        let inner: Vec<u8> = (0..100u8).collect();
        let lend = Lend::default();
        let mut lent = VxlanUnderlay::new(Box::new(lend.clone()), a, [2, 0, 0, 0, 0, 1], vec![(b, [2, 0, 0, 0, 0, 2])]);
        let mut copied = VxlanUnderlay::new(Box::new(Loop::default()), a, [2, 0, 0, 0, 0, 1], vec![(b, [2, 0, 0, 0, 0, 2])]);
        let frames = [(&inner[..], 5, Ipv4Addr::new(192, 0, 2, 7)), (&inner[..], 5, b)];
        assert_eq!(lent.send_burst(&frames), 1);
        assert_eq!(copied.send_burst(&frames), 1);
        assert_eq!((lent.no_neighbor, copied.no_neighbor), (1, 1));
        let mut raw = [0u8; 256];
        let mut len = [0usize];
        assert_eq!(copied.port.recv_burst(&mut [&mut raw[..]], &mut len), 1);
        let kept = lend.0.lock().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0], raw[..len[0]].to_vec(), "the same frame either way");
        assert_eq!(kept[0].len(), OUTER_LEN + inner.len());
    }

    #[test]
    fn encapsulated_frames_come_back_decapsulated() {
        let a = Ipv4Addr::new(192, 0, 2, 1);
        let b = Ipv4Addr::new(192, 0, 2, 2);
        let mut tx = VxlanUnderlay::new(Box::new(Loop::default()), a, [2, 0, 0, 0, 0, 1], vec![(b, [2, 0, 0, 0, 0, 2])]);
        let inner: Vec<u8> = (0..60u8).collect();
        let unknown = Ipv4Addr::new(192, 0, 2, 9);
        assert_eq!(tx.send_burst(&[(&inner, 100, b), (&inner[..20], 7, b), (&inner, 1, unknown)]), 2);
        assert_eq!(tx.no_neighbor, 1, "no MAC for 192.0.2.9: dropped and counted");
        // What went onto the wire: outer headers toward b, a valid IPv4 checksum.
        let wire = tx.port.as_mut();
        let mut raw = [[0u8; 256]; 2];
        let mut lens = [0usize; 2];
        {
            let [r0, r1] = &mut raw;
            assert_eq!(wire.recv_burst(&mut [&mut r0[..], &mut r1[..]], &mut lens), 2);
        }
        let f = &raw[0][..lens[0]];
        assert_eq!(lens[0], OUTER_LEN + 60);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 2]);
        assert_eq!(&f[30..34], &b.octets());
        assert_eq!(crate::packet::checksum(&f[14..34], 0), 0);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), VXLAN_PORT);
        // Received by b's endpoint: the inner frames, their VNIs and the sender.
        let mut rx = VxlanUnderlay::new(Box::new(Loop(raw.iter().zip(lens).map(|(r, l)| r[..l].to_vec()).collect())), b, [2, 0, 0, 0, 0, 2], vec![]);
        let mut bufs = [[0u8; 256]; 2];
        let mut meta = [(0usize, 0u32, Ipv4Addr::UNSPECIFIED); 2];
        let n = {
            let [b0, b1] = &mut bufs;
            rx.recv_burst(&mut [&mut b0[..], &mut b1[..]], &mut meta)
        };
        assert_eq!(n, 2);
        assert_eq!((meta[0], &bufs[0][..60]), ((60, 100, a), &inner[..]));
        assert_eq!((meta[1], &bufs[1][..20]), ((20, 7, a), &inner[..20]));
        // An endpoint with another address ignores them.
        let mut other = VxlanUnderlay::new(Box::new(Loop(raw.iter().zip(lens).map(|(r, l)| r[..l].to_vec()).collect())), unknown, [0; 6], vec![]);
        let [b0, b1] = &mut bufs;
        assert_eq!(other.recv_burst(&mut [&mut b0[..], &mut b1[..]], &mut meta), 0);
    }

    /// Frames the underlay put on its wire (a Loop port), oldest first.
    fn wire(u: &mut VxlanUnderlay) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let mut raw = [0u8; 2048];
            let mut len = [0usize];
            if u.port.recv_burst(&mut [&mut raw[..]], &mut len) == 0 {
                return out;
            }
            out.push(raw[..len[0]].to_vec());
        }
    }

    fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&sha);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f[14..20].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
        f[20..22].copy_from_slice(&op.to_be_bytes());
        f[22..28].copy_from_slice(&sha);
        f[28..32].copy_from_slice(&spa.octets());
        f[38..42].copy_from_slice(&tpa.octets());
        f
    }

    #[test]
    fn the_underlay_resolves_remotes_and_answers_for_itself() {
        let (a, b) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
        let (a_mac, b_mac) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let mut u = VxlanUnderlay::new(Box::new(Loop::default()), a, a_mac, vec![]);
        let inner: Vec<u8> = (0..60u8).collect();
        // Unknown remote: dropped, counted, one ARP request for it; no second one within a second.
        assert_eq!(u.send_burst(&[(&inner, 5, b), (&inner, 5, b)]), 0);
        assert_eq!(u.send_burst(&[(&inner, 5, b)]), 0);
        assert_eq!((u.no_neighbor, u.arp_requests), (3, 1));
        let w = wire(&mut u);
        assert_eq!(w.len(), 1);
        assert_eq!(&w[0][0..6], &[0xff; 6]);
        assert_eq!(&w[0][12..14], &[0x08, 0x06]);
        assert_eq!(&w[0][28..32], &a.octets(), "asked by us");
        assert_eq!(&w[0][38..42], &b.octets(), "for b");
        // b's reply teaches us its MAC; then frames go out.
        u.port.send_burst(&[&arp(2, b_mac, b, a)]);
        let mut buf = [0u8; 256];
        let mut meta = [(0usize, 0u32, Ipv4Addr::UNSPECIFIED)];
        assert_eq!(u.recv_burst(&mut [&mut buf[..]], &mut meta), 0, "ARP is not a tunnel frame");
        assert_eq!(u.send_burst(&[(&inner, 5, b)]), 1);
        let w = wire(&mut u);
        assert_eq!(w.len(), 1);
        assert_eq!(&w[0][0..6], &b_mac);
        // A request for our address is answered, and its sender learned.
        let c = Ipv4Addr::new(192, 0, 2, 3);
        let c_mac = [2, 0, 0, 0, 0, 3];
        u.port.send_burst(&[&arp(1, c_mac, c, a)]);
        assert_eq!(u.recv_burst(&mut [&mut buf[..]], &mut meta), 0);
        let w = wire(&mut u);
        assert_eq!(w.len(), 1);
        let r = &w[0];
        assert_eq!((&r[0..6], &r[6..12], &r[20..22]), (&c_mac[..], &a_mac[..], &[0u8, 2][..]));
        assert_eq!((&r[22..28], &r[28..32], &r[32..38], &r[38..42]), (&a_mac[..], &a.octets()[..], &c_mac[..], &c.octets()[..]));
        assert_eq!(u.arp_replies, 1);
        assert_eq!(u.send_burst(&[(&inner, 5, c)]), 1, "c was learned from its request");
        // A request for someone else from a stranger teaches nothing.
        let d = Ipv4Addr::new(192, 0, 2, 4);
        u.port.send_burst(&[&arp(1, [2, 0, 0, 0, 0, 4], d, c)]);
        let _ = wire(&mut u);
        u.port.send_burst(&[&arp(1, [2, 0, 0, 0, 0, 4], d, c)]);
        assert_eq!(u.recv_burst(&mut [&mut buf[..]], &mut meta), 0);
        assert!(wire(&mut u).is_empty(), "no reply for another address");
        assert!(u.neighbor(d).is_none());
    }

    #[test]
    fn remotes_off_the_local_subnet_go_through_the_gateway() {
        let a = Ipv4Addr::new(192, 0, 2, 1);
        let gw = Ipv4Addr::new(192, 0, 2, 254);
        let far = Ipv4Addr::new(198, 51, 100, 7);
        let gw_mac = [2, 0, 0, 0, 0, 0xfe];
        let mut u = VxlanUnderlay::new(Box::new(Loop::default()), a, [2, 0, 0, 0, 0, 1], vec![]);
        u.set_gateway(24, gw);
        let inner: Vec<u8> = (0..60u8).collect();
        assert_eq!(u.send_burst(&[(&inner, 5, far)]), 0);
        let w = wire(&mut u);
        assert_eq!(&w[0][38..42], &gw.octets(), "the gateway is resolved, not the far endpoint");
        u.set_neighbor(gw, gw_mac);
        assert_eq!(u.send_burst(&[(&inner, 5, far)]), 1);
        let w = wire(&mut u);
        assert_eq!(&w[0][0..6], &gw_mac);
        assert_eq!(&w[0][30..34], &far.octets(), "still addressed to the far endpoint");
    }
}
