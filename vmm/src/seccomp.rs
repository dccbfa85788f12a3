//! Seccomp filters installed per thread before the guest runs.

/// A compiled BPF program.
pub type Filter = seccompiler::BpfProgram;

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built.
    #[error("Cannot build seccomp filter: {0}")]
    Build(String),
    /// The kernel refused the filter.
    #[error("Cannot install seccomp filter: {0}")]
    Apply(seccompiler::Error),
}

/// Installs `f` on the calling thread.
pub fn apply(f: &Filter) -> Result<(), SeccompError> {
    seccompiler::apply_filter(f).map_err(SeccompError::Apply)
}

use std::collections::BTreeMap;
use std::convert::TryInto;

use seccompiler::{SeccompAction, SeccompFilter, TargetArch};

/// System calls a vCPU thread makes: KVM ioctls, console and eventfd writes,
/// log rotation, memory allocation, futexes and signals, and the vhost-user
/// messages a driver's DRIVER_OK or reset triggers (sendmsg/recvmsg on the
/// already connected backend socket).
const VCPU_SYSCALLS: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_recvfrom,
    libc::SYS_fcntl,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
];

/// The filter for vCPU threads: anything outside [`VCPU_SYSCALLS`] kills the process.
pub fn vcpu_filter() -> Result<Filter, SeccompError> {
    build(VCPU_SYSCALLS)
}

/// System calls of the VMM thread (device event loop and control API) once
/// the VM is built: epoll, socket accept and I/O, disk I/O, tap I/O and
/// offload ioctls, KVM state ioctls for snapshots, snapshot files, vCPU kicks.
const VMM_SYSCALLS: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_connect,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_getrandom,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
];

fn build(list: &[i64]) -> Result<Filter, SeccompError> {
    build_with(list, BTreeMap::new())
}

fn build_with(list: &[i64], extra: BTreeMap<i64, Vec<seccompiler::SeccompRule>>) -> Result<Filter, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = list.iter().map(|s| (*s, vec![])).collect();
    rules.extend(extra);
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))
}

/// The filter for the VMM thread: anything outside [`VMM_SYSCALLS`] kills
/// the process, and new sockets may only be unix sockets (a guest's vsock
/// connect to the host reaches a unix socket).
pub fn vmm_filter() -> Result<Filter, SeccompError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let unix_only = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    build_with(VMM_SYSCALLS, BTreeMap::from([(libc::SYS_socket, vec![unix_only])]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_a_filtered_thread_keeps_working() {
        assert!(!vcpu_filter().unwrap().is_empty());
        let v = vmm_filter().unwrap();
        let ok = std::thread::spawn(move || {
            apply(&v).unwrap();
            std::fs::metadata("/").is_ok() && std::fs::read("/proc/self/stat").is_ok()
        })
        .join()
        .unwrap();
        assert!(ok);
    }
}
