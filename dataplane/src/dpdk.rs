//! The DPDK ethdev port (cargo feature `dpdk`): any DPDK device (a NIC bound
//! to vfio-pci, or a virtual device such as net_tap or net_ring) as a
//! datapath port. Bindings are declared here against Debian's libdpdk 22.11;
//! DPDK's static inline functions (burst I/O, mbuf accessors) go through the
//! small C shim in `dpdk_shim.c`, built by build.rs with pkg-config's flags.
//!
//! The environment abstraction layer is initialised once per process
//! ([`Eal::init`]); its arguments choose memory (hugepages, or `--no-huge`)
//! and devices. A port has one receive and one transmit queue.

use std::ffi::{c_char, c_int, c_void, CString};
use std::os::fd::RawFd;
use std::sync::OnceLock;

use crate::ports::BurstPort;

#[repr(C)]
struct RteMempool {
    _opaque: [u8; 0],
}

#[repr(C)]
struct RteMbuf {
    _opaque: [u8; 0],
}

extern "C" {
    fn dp_eal_init(argc: c_int, argv: *mut *mut c_char) -> c_int;
    fn dp_thread_register() -> c_int;
    fn dp_pool_create(name: *const c_char, n: u32) -> *mut RteMempool;
    fn dp_vdev_create(name: *const c_char, args: *const c_char) -> c_int;
    fn dp_port_by_name(name: *const c_char, port: *mut u16) -> c_int;
    fn dp_port_start(port: u16, descs: u16, mp: *mut RteMempool) -> c_int;
    fn dp_port_close(port: u16);
    fn dp_rx_burst(port: u16, pkts: *mut *mut RteMbuf, n: u16) -> u16;
    fn dp_tx_burst(port: u16, pkts: *mut *mut RteMbuf, n: u16) -> u16;
    fn dp_mbuf_copy_out(m: *mut RteMbuf, buf: *mut c_void, cap: u32) -> c_int;
    fn dp_mbuf_from(mp: *mut RteMempool, data: *const c_void, len: u16) -> *mut RteMbuf;
    fn dp_mbuf_free(m: *mut RteMbuf);
    fn dp_mbuf_alloc_bulk(mp: *mut RteMempool, m: *mut *mut RteMbuf, data: *mut *mut c_void, n: u32, room: *mut u16) -> u32;
    fn dp_tx_filled(port: u16, m: *mut *mut RteMbuf, lens: *const u16, n: u16) -> u16;
}

/// Errors of the DPDK port.
#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    /// rte_eal_init failed (or was already tried and failed).
    #[error("DPDK EAL initialisation failed: {0}")]
    Eal(String),
    /// The EAL is not initialised yet.
    #[error("DPDK EAL is not initialised")]
    NoEal,
    /// A device could not be created or found.
    #[error("DPDK device '{0}' not found or not created")]
    Device(String),
    /// Configuring or starting the port failed with this (negative errno) code.
    #[error("DPDK port '{name}' could not start: error {code}")]
    Start {
        /// The device.
        name: String,
        /// DPDK's return code.
        code: i32,
    },
    /// The mbuf pool could not be created.
    #[error("DPDK mbuf pool '{0}' could not be created")]
    Pool(String),
}

struct EalState {
    pool: usize,
}

static EAL: OnceLock<Result<EalState, String>> = OnceLock::new();

/// The process's DPDK environment.
pub struct Eal;

impl Eal {
    /// Initialises the EAL with `args` (program name first, as for a main)
    /// and creates the shared mbuf pool of `mbufs` buffers. Later calls
    /// return the first call's outcome.
    pub fn init(args: &[&str], mbufs: u32) -> Result<(), DpdkError> {
        let r = EAL.get_or_init(|| {
            let owned: Vec<CString> = args.iter().map(|a| CString::new(*a).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
            // rte_eal_init may permute argv, so hand it pointers we own and keep alive.
            let mut argv: Vec<*mut c_char> = owned.iter().map(|c| c.as_ptr() as *mut c_char).collect();
            // SAFETY: argv holds argc valid NUL-terminated strings that outlive the call (owned lives on,
            // leaked below, because DPDK may keep pointers into argv).
            let rc = unsafe { dp_eal_init(argv.len() as c_int, argv.as_mut_ptr()) };
            std::mem::forget(owned);
            std::mem::forget(argv);
            if rc < 0 {
                return Err(format!("rte_eal_init returned {rc}"));
            }
            let name = CString::new("dp_mbufs").expect("static name");
            // SAFETY: the EAL is initialised; name is a valid C string.
            let pool = unsafe { dp_pool_create(name.as_ptr(), mbufs) };
            if pool.is_null() {
                return Err("mbuf pool creation failed".into());
            }
            Ok(EalState { pool: pool as usize })
        });
        r.as_ref().map(|_| ()).map_err(|e| DpdkError::Eal(e.clone()))
    }

    fn pool() -> Result<*mut RteMempool, DpdkError> {
        match EAL.get() {
            Some(Ok(s)) => Ok(s.pool as *mut RteMempool),
            Some(Err(e)) => Err(DpdkError::Eal(e.clone())),
            None => Err(DpdkError::NoEal),
        }
    }
}

const BURST: usize = 32;

thread_local! {
    static REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Registers the calling thread with the EAL once: a thread DPDK did not
/// start has no lcore id, and without one every mbuf allocation and free
/// goes to the shared pool ring instead of the per-lcore cache.
fn register_thread() {
    REGISTERED.with(|r| {
        if !r.get() {
            r.set(true);
            // SAFETY: the EAL is initialised (an EthPort exists); registering only
            // assigns this thread an lcore id. A failure (no free id) leaves it uncached.
            unsafe { dp_thread_register() };
        }
    });
}

/// A DPDK ethdev as a datapath port: frames are copied between mbufs and the
/// engine's buffers; transmissions are batched until [`BurstPort::flush`].
pub struct EthPort {
    port: u16,
    name: String,
    pool: *mut RteMempool,
    pending: [*mut RteMbuf; BURST],
    npending: usize,
}

// SAFETY: the port id and pool pointer are usable from any thread; the engine
// serialises access to one EthPort (one queue) through its port lock.
unsafe impl Send for EthPort {}

impl EthPort {
    /// Opens device `name`; with `args`, first creates it as a virtual
    /// device (e.g. `net_tap0` with `iface=dp0`, or `net_ring0` with "").
    pub fn open(name: &str, args: Option<&str>) -> Result<EthPort, DpdkError> {
        let pool = Eal::pool()?;
        let cname = CString::new(name).map_err(|_| DpdkError::Device(name.into()))?;
        if let Some(a) = args {
            let cargs = CString::new(a).map_err(|_| DpdkError::Device(name.into()))?;
            // SAFETY: EAL initialised; both strings are valid C strings.
            if unsafe { dp_vdev_create(cname.as_ptr(), cargs.as_ptr()) } < 0 {
                return Err(DpdkError::Device(name.into()));
            }
        }
        let mut port = 0u16;
        // SAFETY: writes the port id into our local.
        if unsafe { dp_port_by_name(cname.as_ptr(), &mut port) } != 0 {
            return Err(DpdkError::Device(name.into()));
        }
        // SAFETY: a valid port id and the pool created at init.
        let rc = unsafe { dp_port_start(port, 1024, pool) };
        if rc < 0 {
            return Err(DpdkError::Start { name: name.into(), code: rc });
        }
        Ok(EthPort { port, name: name.to_string(), pool, pending: [std::ptr::null_mut(); BURST], npending: 0 })
    }

    /// The DPDK port id.
    pub fn port_id(&self) -> u16 {
        self.port
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl EthPort {
    /// Queues one frame in an mbuf; false when it was dropped.
    fn queue(&mut self, frame: &[u8]) -> bool {
        if self.npending == BURST {
            self.flush();
            if self.npending == BURST {
                return false;
            }
        }
        if frame.len() > u16::MAX as usize {
            return false;
        }
        // SAFETY: pool is the EAL's pool; frame is readable for its length.
        let m = unsafe { dp_mbuf_from(self.pool, frame.as_ptr() as *const c_void, frame.len() as u16) };
        if m.is_null() {
            return false;
        }
        self.pending[self.npending] = m;
        self.npending += 1;
        true
    }

    /// Like [`EthPort::flush`], returning how many the driver took.
    fn flush_count(&mut self) -> usize {
        let before = self.npending;
        if before == 0 {
            return 0;
        }
        // SAFETY: pending[..npending] are mbufs we own; DPDK takes those it sends.
        let sent = unsafe { dp_tx_burst(self.port, self.pending.as_mut_ptr(), before as u16) } as usize;
        for m in &self.pending[sent..before] {
            // SAFETY: not taken by the driver, still ours.
            unsafe { dp_mbuf_free(*m) };
        }
        self.npending = 0;
        sent
    }

    /// Hands the queued mbufs to the driver; those it refuses are freed.
    fn flush(&mut self) {
        if self.npending == 0 {
            return;
        }
        // SAFETY: pending[..npending] are mbufs we own; DPDK takes those it sends.
        let sent = unsafe { dp_tx_burst(self.port, self.pending.as_mut_ptr(), self.npending as u16) } as usize;
        for m in &self.pending[sent..self.npending] {
            // SAFETY: not taken by the driver, still ours.
            unsafe { dp_mbuf_free(*m) };
        }
        self.npending = 0;
    }

}

impl BurstPort for EthPort {
    fn recv_burst(&mut self, bufs: &mut [&mut [u8]], lens: &mut [usize]) -> usize {
        register_thread();
        let want = bufs.len().min(BURST);
        let mut mbufs = [std::ptr::null_mut::<RteMbuf>(); BURST];
        // SAFETY: mbufs has room for `want` pointers.
        let n = unsafe { dp_rx_burst(self.port, mbufs.as_mut_ptr(), want as u16) } as usize;
        let mut got = 0;
        for m in mbufs.iter().take(n) {
            let buf = &mut *bufs[got];
            // SAFETY: m is an mbuf DPDK just handed us; buf is writable for its length.
            let len = unsafe { dp_mbuf_copy_out(*m, buf.as_mut_ptr() as *mut c_void, buf.len() as u32) };
            // SAFETY: we own m and free it once.
            unsafe { dp_mbuf_free(*m) };
            if len >= 0 {
                lens[got] = len as usize;
                got += 1;
            }
        }
        got
    }

    fn send_filled(&mut self, n: usize, fill: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>) -> Option<usize> {
        register_thread();
        // Frames queued by send_burst go first, keeping the order.
        let mut sent = self.flush_count();
        let mut i = 0;
        while i < n {
            let k = (n - i).min(BURST);
            let mut mbufs = [std::ptr::null_mut::<RteMbuf>(); BURST];
            let mut data = [std::ptr::null_mut::<c_void>(); BURST];
            let mut lens = [0u16; BURST];
            let mut room = 0u16;
            // SAFETY: mbufs and data have room for k entries; pool is the EAL's pool.
            if unsafe { dp_mbuf_alloc_bulk(self.pool, mbufs.as_mut_ptr(), data.as_mut_ptr(), k as u32, &mut room) } == 0 {
                break;
            }
            for j in 0..k {
                // SAFETY: data[j] points at `room` writable bytes of mbufs[j], ours until sent.
                let buf = unsafe { std::slice::from_raw_parts_mut(data[j] as *mut u8, room as usize) };
                lens[j] = match fill(i + j, buf) {
                    Some(len) if len > 0 && len <= room as usize => len as u16,
                    _ => 0,
                };
            }
            // SAFETY: mbufs[..k] are ours; the shim sends or frees every one.
            sent += unsafe { dp_tx_filled(self.port, mbufs.as_mut_ptr(), lens.as_ptr(), k as u16) } as usize;
            i += k;
        }
        Some(sent)
    }

    fn send_burst(&mut self, frames: &[&[u8]]) -> usize {
        register_thread();
        let mut sent = 0;
        for f in frames {
            if self.queue(f) {
                sent += 1;
            }
        }
        self.flush();
        sent
    }

    fn fd(&self) -> RawFd {
        -1
    }
}

impl Drop for EthPort {
    fn drop(&mut self) {
        self.flush();
        // SAFETY: stopping and closing the port we started; nothing uses it afterwards.
        unsafe { dp_port_close(self.port) };
    }
}
