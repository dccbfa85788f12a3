//! The 8250 UART at COM1 (vm-superio) and the console log it writes to: a
//! file with a size cap, readable while the VM runs.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// An eventfd (registered as an irqfd) that vm-superio raises.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console bytes go: a capped log file (moved to `<log>.1` when full)
/// and optionally stdout.
pub struct ConsoleLog {
    path: Option<PathBuf>,
    file: Option<File>,
    written: u64,
    cap: u64,
    stdout: bool,
    /// Bytes the guest wrote to the console.
    pub total: u64,
}

impl ConsoleLog {
    /// Opens (truncates) the log file.
    ///
    /// A previous log is moved aside and deleted on another thread: freeing
    /// its blocks can take milliseconds (ext4 mounted with `discard` trims
    /// them synchronously), which would delay the boot.
    pub fn new(path: Option<&Path>, cap: u64, stdout: bool) -> io::Result<Self> {
        let file = match path {
            Some(p) => {
                if std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0) {
                    let mut stale = p.as_os_str().to_owned();
                    stale.push(format!(".stale-{}", std::process::id()));
                    let stale = PathBuf::from(stale);
                    if std::fs::rename(p, &stale).is_ok() {
                        let _ = std::thread::Builder::new().name("log-cleanup".into()).spawn(move || {
                            // Filtered like every VMM thread: it only unlinks.
                            if crate::seccomp::vmm_filter().and_then(|f| crate::seccomp::apply(&f)).is_ok() {
                                let _ = std::fs::remove_file(stale);
                            }
                        });
                    }
                }
                Some(OpenOptions::new().create(true).write(true).truncate(true).open(p)?)
            }
            None => None,
        };
        Ok(ConsoleLog { path: path.map(Path::to_path_buf), file, written: 0, cap: cap.max(1024), stdout, total: 0 })
    }

    /// Reopens the log for appending (after a restore).
    pub fn append(path: Option<&Path>, cap: u64, stdout: bool) -> io::Result<Self> {
        let (file, written) = match path {
            Some(p) => {
                let f = OpenOptions::new().create(true).append(true).open(p)?;
                let n = f.metadata()?.len();
                (Some(f), n)
            }
            None => (None, 0),
        };
        Ok(ConsoleLog { path: path.map(Path::to_path_buf), file, written, cap: cap.max(1024), stdout, total: 0 })
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(p) = &self.path {
            let old = rotated_path(p);
            std::fs::rename(p, old)?;
            self.file = Some(OpenOptions::new().create(true).write(true).truncate(true).open(p)?);
            self.written = 0;
        }
        Ok(())
    }
}

/// The previous generation of a console log.
pub fn rotated_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// The last `max` bytes of console output (previous generation first).
pub fn read_tail(p: &Path, max: u64) -> io::Result<Vec<u8>> {
    let cur = std::fs::read(p)?;
    let mut out = Vec::new();
    if (cur.len() as u64) < max {
        if let Ok(old) = std::fs::read(rotated_path(p)) {
            let want = (max - cur.len() as u64) as usize;
            out.extend_from_slice(&old[old.len().saturating_sub(want)..]);
        }
    }
    out.extend_from_slice(&cur[cur.len().saturating_sub(max as usize)..]);
    Ok(out)
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.total == 0 {
            crate::timing::mark(&crate::timing::FIRST_SERIAL_BYTE);
        }
        if buf.contains(&b'\n') {
            crate::timing::mark(&crate::timing::FIRST_SERIAL_LINE);
        }
        self.total += buf.len() as u64;
        if self.file.is_some() && self.written + buf.len() as u64 > self.cap {
            self.rotate()?;
        }
        if let Some(f) = &mut self.file {
            f.write_all(buf)?;
            self.written += buf.len() as u64;
        }
        if self.stdout {
            let _ = io::stdout().write_all(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.stdout {
            io::stdout().flush()?;
        }
        Ok(())
    }
}

/// COM1.
pub struct SerialDevice {
    inner: Serial<EventFdTrigger, NoEvents, ConsoleLog>,
}

/// Saved UART registers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// The eleven registers and pending input, as vm-superio keeps them.
    pub regs: [u8; 9],
    /// Pending input bytes.
    pub input: Vec<u8>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleLog) -> Self {
        SerialDevice { inner: Serial::new(EventFdTrigger(irq), out) }
    }

    /// A UART restored from a snapshot.
    pub fn restore(irq: EventFd, out: ConsoleLog, s: &SerialSnapshot) -> Result<Self, String> {
        let st = SerialState {
            baud_divisor_low: s.regs[0],
            baud_divisor_high: s.regs[1],
            interrupt_enable: s.regs[2],
            interrupt_identification: s.regs[3],
            line_control: s.regs[4],
            line_status: s.regs[5],
            modem_control: s.regs[6],
            modem_status: s.regs[7],
            scratch: s.regs[8],
            in_buffer: s.input.clone(),
        };
        let inner = Serial::from_state(&st, EventFdTrigger(irq), NoEvents, out)
            .map_err(|e| format!("Invalid serial state: {e:?}"))?;
        Ok(SerialDevice { inner })
    }

    /// The registers, for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            input: s.in_buffer,
        }
    }

    /// Bytes the guest has written.
    pub fn bytes_written(&self) -> u64 {
        self.inner.writer().total
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.inner.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // A failed log write must not stop the guest; the byte is lost.
            let _ = self.inner.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_rotates_at_its_cap_and_tail_reads_both_files() {
        let p = std::env::temp_dir().join(format!("vmm-console-{}", std::process::id()));
        let mut log = ConsoleLog::new(Some(&p), 1024, false).unwrap();
        for i in 0..1500u32 {
            log.write_all(&[b'a' + (i % 26) as u8]).unwrap();
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1500 - 1024);
        assert_eq!(std::fs::metadata(rotated_path(&p)).unwrap().len(), 1024);
        let tail = read_tail(&p, 600).unwrap();
        assert_eq!(tail.len(), 600);
        assert_eq!(*tail.last().unwrap(), b'a' + (1499 % 26) as u8);
        std::fs::remove_file(&p).unwrap();
        std::fs::remove_file(rotated_path(&p)).unwrap();
    }
}
