//! A host tap device opened with a virtio-net header, the backend of virtio-net.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

/// Errors opening or configuring the tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun could not be opened.
    #[error("Cannot open /dev/net/tun: {0}")]
    Open(io::Error),
    /// An ioctl on the tap failed.
    #[error("Tap {0} ioctl {1} failed: {2}")]
    Ioctl(String, &'static str, io::Error),
    /// The name is too long.
    #[error("Tap name {0} is longer than 15 bytes")]
    Name(String),
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Offload flags for [`Tap::set_offload`].
pub const TUN_F_CSUM: u32 = 1;
/// TSO for IPv4.
pub const TUN_F_TSO4: u32 = 2;
/// TSO for IPv6.
pub const TUN_F_TSO6: u32 = 4;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates) tap `name` with a `hdr_len`-byte virtio-net header, non-blocking.
    pub fn open(name: &str, hdr_len: i32) -> Result<Self, TapError> {
        if name.len() > 15 {
            return Err(TapError::Name(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tap = Tap { file, name: name.into() };
        // SAFETY: TUNSETIFF reads an ifreq; req is a properly sized, initialized ifreq.
        tap.ioctl("TUNSETIFF", TUNSETIFF, &mut req as *mut IfReq as libc::c_ulong)?;
        let mut sz: libc::c_int = hdr_len;
        // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer we pass.
        tap.ioctl("TUNSETVNETHDRSZ", TUNSETVNETHDRSZ, &mut sz as *mut libc::c_int as libc::c_ulong)?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn ioctl(&self, name: &'static str, req: libc::c_ulong, arg: libc::c_ulong) -> Result<(), TapError> {
        // SAFETY: each caller passes a request code with the argument it expects
        // (a pointer to a live, correctly typed value, or a plain integer).
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req, arg) };
        if r < 0 {
            return Err(TapError::Ioctl(self.name.clone(), name, io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Tells the kernel which offloads the guest accepts on receive.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        self.ioctl("TUNSETOFFLOAD", TUNSETOFFLOAD, libc::c_ulong::from(flags))
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its virtio-net header); WouldBlock when none.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (with its virtio-net header).
    pub fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    /// The fd to poll.
    pub fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
