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
/// log rotation, memory allocation, futexes and signals.
const VCPU_SYSCALLS: &[i64] = &[
    libc::SYS_ioctl,
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
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = VCPU_SYSCALLS.iter().map(|s| (*s, vec![])).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(e.to_string()))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))
}
