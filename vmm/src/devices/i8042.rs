//! A minimal i8042 keyboard controller: the guest resets (powers off) the
//! machine through it, and the host sends Ctrl-Alt-Del through it.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_RESET_CPU: u8 = 0xfe;
const SB_OUT_FULL: u8 = 0x01;
const SB_SYS: u8 = 0x04;
const SB_CMD: u8 = 0x08;
/// Ctrl, Alt, Del pressed then released (scan code set 2).
const CTRL_ALT_DEL: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];

/// The controller.
pub struct I8042 {
    reset_evt: EventFd,
    irq: EventFd,
    buf: VecDeque<u8>,
    control: u8,
    status: u8,
    expect_ctr: bool,
    /// Number of resets the guest asked for.
    pub resets: u64,
}

/// Saved controller state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct I8042Snapshot {
    /// Pending output bytes.
    pub buf: Vec<u8>,
    /// Controller configuration byte.
    pub control: u8,
    /// Status byte.
    pub status: u8,
}

impl I8042 {
    /// A controller that signals `reset_evt` on reset and raises `irq` for keys.
    pub fn new(reset_evt: EventFd, irq: EventFd) -> Self {
        I8042 { reset_evt, irq, buf: VecDeque::new(), control: 0x01, status: SB_SYS, expect_ctr: false, resets: 0 }
    }

    /// Queues the Ctrl-Alt-Del key sequence and interrupts the guest.
    pub fn ctrl_alt_del(&mut self) -> std::io::Result<()> {
        self.buf.extend(CTRL_ALT_DEL);
        self.irq.write(1)
    }

    /// State for a snapshot.
    pub fn snapshot(&self) -> I8042Snapshot {
        I8042Snapshot { buf: self.buf.iter().copied().collect(), control: self.control, status: self.status }
    }

    /// Restores `snapshot` state.
    pub fn restore(&mut self, s: &I8042Snapshot) {
        self.buf = s.buf.iter().copied().collect();
        self.control = s.control;
        self.status = s.status;
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            OFS_STATUS => self.status | if self.buf.is_empty() { 0 } else { SB_OUT_FULL },
            OFS_DATA => {
                let v = self.buf.pop_front().unwrap_or(0);
                if !self.buf.is_empty() {
                    let _ = self.irq.write(1);
                }
                v
            }
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        let v = data[0];
        match offset {
            OFS_STATUS => {
                self.status |= SB_CMD;
                match v {
                    CMD_RESET_CPU => {
                        self.resets += 1;
                        let _ = self.reset_evt.write(1);
                    }
                    CMD_READ_CTR => self.buf.push_back(self.control),
                    CMD_WRITE_CTR => self.expect_ctr = true,
                    CMD_SELF_TEST => self.buf.push_back(0x55),
                    CMD_KBD_TEST => self.buf.push_back(0x00),
                    _ => {}
                }
            }
            OFS_DATA => {
                self.status &= !SB_CMD;
                if self.expect_ctr {
                    self.control = v;
                    self.expect_ctr = false;
                } else {
                    // Keyboard commands: acknowledge them all.
                    self.buf.push_back(0xfa);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_ctrl_alt_del_is_readable() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap());
        d.write(OFS_STATUS, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
        d.ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() >= 1);
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            d.read(OFS_STATUS, &mut b);
            if b[0] & SB_OUT_FULL == 0 {
                break;
            }
            d.read(OFS_DATA, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL);
    }
}
