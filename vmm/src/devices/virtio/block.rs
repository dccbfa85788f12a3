//! virtio-blk on a raw file: read, write, flush, discard, get-id, with an
//! optional read-only flag and rate limit.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT};

use super::rate_limiter::RateLimiter;
use super::{add_used, check_chain, next_chain, DeviceError, VirtioDevice, Work, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::config::RateLimitConfig;
use crate::vstate::memory::GuestMemoryMmap;

const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_SEG_MAX: u64 = 1 << 2;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Largest single request accepted (bytes); bigger ones are I/O errors.
const MAX_REQUEST: u64 = 4 << 20;
const MAX_DISCARD_SEGS: u32 = 16;

/// Errors opening the disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("Cannot open disk image {0}: {1}")]
    Open(PathBuf, std::io::Error),
}

/// Per-disk counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BlockCounters {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Discards.
    pub discards: u64,
    /// Bytes read from the image.
    pub read_bytes: u64,
    /// Bytes written to the image.
    pub write_bytes: u64,
    /// Requests answered with an I/O error.
    pub io_errors: u64,
    /// Requests of an unknown type.
    pub unsupported: u64,
    /// Times the rate limiter held requests back.
    pub throttled: u64,
}

/// The disk.
pub struct Block {
    file: File,
    path: PathBuf,
    read_only: bool,
    sectors: u64,
    id: String,
    limiter: RateLimiter,
    counters: BlockCounters,
    buf: Vec<u8>,
}

impl Block {
    /// Opens `path` (read-only when asked).
    pub fn new(id: &str, path: &Path, read_only: bool, limit: Option<RateLimitConfig>) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(path.into(), e))?;
        let len = file.metadata().map_err(|e| BlockError::Open(path.into(), e))?.len();
        Ok(Block {
            file,
            path: path.into(),
            read_only,
            sectors: len / SECTOR,
            id: id.to_string(),
            limiter: RateLimiter::new(limit),
            counters: BlockCounters::default(),
            buf: Vec::new(),
        })
    }

    fn in_range(&self, sector: u64, len: u64) -> bool {
        sector.checked_mul(SECTOR).and_then(|o| o.checked_add(len)).is_some_and(|end| end <= self.sectors * SECTOR)
    }

    fn discard(&mut self, segs: &[u8]) -> u8 {
        if self.read_only {
            return S_IOERR;
        }
        if !segs.len().is_multiple_of(16) || segs.len() / 16 > MAX_DISCARD_SEGS as usize {
            return S_UNSUPP;
        }
        for s in segs.chunks(16) {
            let sector = u64::from_le_bytes(s[0..8].try_into().unwrap());
            let num = u64::from(u32::from_le_bytes(s[8..12].try_into().unwrap()));
            let flags = u32::from_le_bytes(s[12..16].try_into().unwrap());
            if flags != 0 {
                return S_UNSUPP;
            }
            if !self.in_range(sector, num * SECTOR) {
                return S_IOERR;
            }
            // SAFETY: fallocate on our own open file descriptor with plain
            // integer arguments; it touches no memory of ours.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (sector * SECTOR) as libc::off_t,
                    (num * SECTOR) as libc::off_t,
                )
            };
            if r != 0 {
                return S_IOERR;
            }
        }
        S_OK
    }

    fn process(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        let mut work = Work::default();
        while let Some(chain) = next_chain(queue, mem)? {
            let head = chain.head_index();
            let (r, w) = check_chain(&chain, mem)?;
            if r < 16 {
                return Err(DeviceError::MalformedChain(format!("request {head} has a {r}-byte header, needs 16")));
            }
            if w < 1 {
                return Err(DeviceError::MalformedChain(format!("request {head} has no status byte")));
            }
            let data_len = (r - 16).max(w - 1);
            if !self.limiter.consume(data_len) {
                self.counters.throttled += 1;
                queue.go_to_previous_position();
                break;
            }
            let mut reader = chain.clone().reader(mem).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            let mut writer = chain.writer(mem).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            let mut status_w = writer
                .split_at(w as usize - 1)
                .map_err(|e| DeviceError::MalformedChain(e.to_string()))?;
            let mut hdr = [0u8; 16];
            reader.read_exact(&mut hdr).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
            let status = match ty {
                T_IN => {
                    self.counters.reads += 1;
                    let len = w - 1;
                    if len > MAX_REQUEST || !self.in_range(sector, len) {
                        S_IOERR
                    } else {
                        self.buf.resize(len as usize, 0);
                        match self.file.read_exact_at(&mut self.buf, sector * SECTOR) {
                            Ok(()) => {
                                writer.write_all(&self.buf).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
                                self.counters.read_bytes += len;
                                S_OK
                            }
                            Err(_) => S_IOERR,
                        }
                    }
                }
                T_OUT => {
                    self.counters.writes += 1;
                    let len = r - 16;
                    if self.read_only || len > MAX_REQUEST || !self.in_range(sector, len) {
                        S_IOERR
                    } else {
                        self.buf.resize(len as usize, 0);
                        reader.read_exact(&mut self.buf).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
                        match self.file.write_all_at(&self.buf, sector * SECTOR) {
                            Ok(()) => {
                                self.counters.write_bytes += len;
                                S_OK
                            }
                            Err(_) => S_IOERR,
                        }
                    }
                }
                T_FLUSH => {
                    self.counters.flushes += 1;
                    if self.read_only || self.file.sync_data().is_ok() {
                        S_OK
                    } else {
                        S_IOERR
                    }
                }
                T_GET_ID => {
                    let mut id = [0u8; 20];
                    let n = self.id.len().min(20);
                    id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                    let n = (w as usize - 1).min(20);
                    writer.write_all(&id[..n]).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
                    S_OK
                }
                T_DISCARD => {
                    self.counters.discards += 1;
                    let len = (r - 16).min(MAX_DISCARD_SEGS as u64 * 16 + 16) as usize;
                    let mut segs = vec![0u8; len];
                    reader.read_exact(&mut segs).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
                    self.discard(&segs)
                }
                _ => S_UNSUPP,
            };
            match status {
                S_IOERR => self.counters.io_errors += 1,
                S_UNSUPP => self.counters.unsupported += 1,
                _ => {}
            }
            status_w.write_all(&[status]).map_err(|e| DeviceError::BadAddress(e.to_string()))?;
            let written = writer.bytes_written() + 1;
            add_used(queue, mem, head, written as u32)?;
            work.used = true;
        }
        Ok(work)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | F_FLUSH | F_SEG_MAX;
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_DISCARD;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 60];
        cfg[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        cfg[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes()); // seg_max
        cfg[36..40].copy_from_slice(&(u32::MAX / 512).to_le_bytes()); // max_discard_sectors
        cfg[40..44].copy_from_slice(&MAX_DISCARD_SEGS.to_le_bytes());
        cfg[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(start + i).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self, _acked: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reset(&mut self) {
        self.limiter.clear();
    }
    fn process_queue(&mut self, _q: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        self.process(&mut queues[0], mem)
    }
    fn next_timer_ms(&self) -> Option<u64> {
        self.limiter.blocked_ms()
    }
    fn process_timer(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<Work, DeviceError> {
        self.limiter.clear();
        self.process(&mut queues[0], mem)
    }
    fn counters(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.counters).unwrap_or_default();
        v["path"] = serde_json::Value::String(self.path.display().to_string());
        v["read_only"] = serde_json::Value::Bool(self.read_only);
        v["sectors"] = self.sectors.into();
        v
    }
    fn save(&self) -> serde_json::Value {
        serde_json::json!({ "sectors": self.sectors })
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s = state["sectors"].as_u64().unwrap_or(self.sectors);
        if s != self.sectors {
            return Err(format!("Disk {} has {} sectors, the snapshot expected {s}", self.id, self.sectors));
        }
        Ok(())
    }
}
