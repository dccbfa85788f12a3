//! Boot-time stamps (microseconds since the Unix epoch, 0 until reached),
//! for the benchmark and the API's describe.

use std::sync::atomic::{AtomicU64, Ordering};

/// `main` started.
pub static MAIN_START: AtomicU64 = AtomicU64::new(0);
/// The config was read and checked; the build starts.
pub static BUILD_START: AtomicU64 = AtomicU64::new(0);
/// The KVM VM exists with its irqchip, PIT and memory slots.
pub static VM_READY: AtomicU64 = AtomicU64::new(0);
/// The kernel and boot tables are in guest memory and devices are built.
pub static GUEST_LOADED: AtomicU64 = AtomicU64::new(0);
/// The vCPU threads were started.
pub static VCPUS_STARTED: AtomicU64 = AtomicU64::new(0);
/// vCPU 0's thread began to run.
pub static VCPU_THREAD_RUNNING: AtomicU64 = AtomicU64::new(0);
/// vCPU 0's thread installed its seccomp filter.
pub static VCPU_FILTERED: AtomicU64 = AtomicU64::new(0);
/// The deferred ioeventfd registrations are done.
pub static IOEVENTFDS_READY: AtomicU64 = AtomicU64::new(0);
/// vCPU 0 entered KVM_RUN for the first time (the guest's first instruction).
pub static FIRST_KVM_RUN: AtomicU64 = AtomicU64::new(0);
/// The guest wrote its first serial byte.
pub static FIRST_SERIAL_BYTE: AtomicU64 = AtomicU64::new(0);
/// The guest finished its first serial line.
pub static FIRST_SERIAL_LINE: AtomicU64 = AtomicU64::new(0);

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Records `stamp` once.
pub fn mark(stamp: &AtomicU64) {
    if stamp.load(Ordering::Relaxed) == 0 {
        let _ = stamp.compare_exchange(0, now_us(), Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// All stamps as JSON.
pub fn json() -> serde_json::Value {
    serde_json::json!({
        "main_start_us": MAIN_START.load(Ordering::Relaxed),
        "build_start_us": BUILD_START.load(Ordering::Relaxed),
        "vm_ready_us": VM_READY.load(Ordering::Relaxed),
        "guest_loaded_us": GUEST_LOADED.load(Ordering::Relaxed),
        "vcpus_started_us": VCPUS_STARTED.load(Ordering::Relaxed),
        "ioeventfds_ready_us": IOEVENTFDS_READY.load(Ordering::Relaxed),
        "vcpu_thread_running_us": VCPU_THREAD_RUNNING.load(Ordering::Relaxed),
        "vcpu_filtered_us": VCPU_FILTERED.load(Ordering::Relaxed),
        "first_kvm_run_us": FIRST_KVM_RUN.load(Ordering::Relaxed),
        "first_serial_byte_us": FIRST_SERIAL_BYTE.load(Ordering::Relaxed),
        "first_serial_line_us": FIRST_SERIAL_LINE.load(Ordering::Relaxed),
    })
}
