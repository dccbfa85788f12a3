//! Per-vCPU CPUID, derived from KVM_GET_SUPPORTED_CPUID.

use kvm_bindings::CpuId;

const ECX_HYPERVISOR: u32 = 1 << 31;

/// Adjusts the supported CPUID for vCPU `id` of `count`: APIC ids, logical
/// processor count, and the hypervisor bit.
pub fn for_vcpu(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count above is valid
                }
            }
            0xb | 0x1f => {
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 0x100; // level 0, SMT
                    }
                    1 => {
                        e.eax = 32 - u32::from(count.max(1) - 1).leading_zeros();
                        e.ebx = u32::from(count);
                        e.ecx = 0x201; // level 1, core
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}
