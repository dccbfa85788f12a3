//! Port-I/O and MMIO buses: address ranges mapped to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus; offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors registering a device.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range overlaps a registered one.
    #[error("Bus range {0:#x}+{1:#x} overlaps another device")]
    Overlap(u64, u64),
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// Ranges to devices, looked up by address.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `base..base+len` to `dev`.
    pub fn insert(&mut self, dev: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        if self.devices.iter().any(|(b, (l, _))| base < b + l && *b < base + len) {
            return Err(BusError::Overlap(base, len));
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        if addr < base + len {
            Some((addr - base, dev))
        } else {
            None
        }
    }

    /// Dispatches a read; returns false when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().expect("Device lock poisoned").read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().expect("Device lock poisoned").write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = self.0 + offset as u8;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn lookups_hit_the_right_device() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 0x10).unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(50))), 0x110, 0x10).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x10f, 2).is_err());
        let mut b = [0u8];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 12);
        assert!(bus.read(0x110, &mut b));
        assert_eq!(b[0], 50);
        assert!(!bus.read(0x120, &mut b));
        assert!(bus.write(0x111, &[7]));
        bus.read(0x111, &mut b);
        assert_eq!(b[0], 8);
    }
}
