//! The /dev/kvm handle and the capabilities this VMM relies on.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Errors opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error("Cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    /// The API version is not 12.
    #[error("KVM API version {0} is not supported")]
    ApiVersion(i32),
    /// A capability the VMM needs is missing.
    #[error("KVM lacks capability {0:?}")]
    MissingCap(Cap),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Cannot read supported CPUID: {0}")]
    Cpuid(kvm_ioctls::Error),
}

/// Capabilities without which no VM is started.
const REQUIRED: &[Cap] = &[
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
    Cap::PitState2,
    Cap::AdjustClock,
    Cap::VcpuEvents,
    Cap::Debugregs,
    Cap::Xcrs,
    Cap::ExtCpuid,
    Cap::ImmediateExit,
];

/// An opened and checked /dev/kvm.
pub struct KvmContext {
    /// The handle.
    pub kvm: Kvm,
    /// What KVM_GET_SUPPORTED_CPUID reported.
    pub supported_cpuid: CpuId,
}

impl KvmContext {
    /// Opens /dev/kvm and checks the API version and required capabilities.
    pub fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(KvmError::ApiVersion(v));
        }
        for cap in REQUIRED {
            if !kvm.check_extension(*cap) {
                return Err(KvmError::MissingCap(*cap));
            }
        }
        let supported_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(KvmError::Cpuid)?;
        Ok(KvmContext { kvm, supported_cpuid })
    }
}

/// Why KVM is not usable here, or None when it is; tests print this when they skip.
pub fn unavailable_reason() -> Option<String> {
    match KvmContext::new() {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}
