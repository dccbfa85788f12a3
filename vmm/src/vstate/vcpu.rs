//! vCPU threads: the KVM_RUN loop, port and MMIO exits, pause and resume by
//! a signal kick, and the per-vCPU state a snapshot saves.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::{msr, regs};
use crate::devices::bus::Bus;

/// Errors configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("Cannot create vCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    /// A vCPU ioctl failed.
    #[error("vCPU ioctl {0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    /// Register set-up failed.
    #[error("Cannot set up vCPU registers: {0}")]
    Regs(#[from] regs::RegsError),
    /// The thread could not be started.
    #[error("Cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("Cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

fn ioctl<T>(name: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
    r.map_err(|e| VcpuError::Ioctl(name, e))
}

/// Why the VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The guest reset the machine (i8042) or asked KVM for a system event.
    GuestReset,
    /// The guest triple-faulted.
    TripleFault,
    /// KVM could not run the guest.
    Error(String),
}

/// The legacy FPU state (kvm_fpu has no serde support of its own).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: Vec<[u8; 16]>,
    /// Control, status, tag words and last opcode.
    pub words: [u16; 4],
    /// Last instruction and data pointers.
    pub last: [u64; 2],
    /// XMM registers.
    pub xmm: Vec<[u8; 16]>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl FpuState {
    fn from_kvm(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            words: [f.fcw, f.fsw, u16::from(f.ftwx), f.last_opcode],
            last: [f.last_ip, f.last_dp],
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu::default();
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f.fcw = self.words[0];
        f.fsw = self.words[1];
        f.ftwx = self.words[2] as u8;
        f.last_opcode = self.words[3];
        f.last_ip = self.last[0];
        f.last_dp = self.last[1];
        f.mxcsr = self.mxcsr;
        f
    }
}

/// Everything a snapshot keeps of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU state (used when XSAVE is unavailable).
    pub fpu: FpuState,
    /// Extended state, when KVM offers it.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// MSRs from [`msr::SAVED_MSRS`] that KVM could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending events.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Run state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
}

/// Counters of one vCPU.
#[derive(Default)]
pub struct VcpuCounters {
    /// KVM_RUN exits.
    pub exits: AtomicU64,
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Accesses to addresses where no device lives.
    pub unhandled: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    Run,
    Pause,
    Exit,
}

struct Control {
    want: Want,
    paused: bool,
    exited: bool,
}

/// State shared between a vCPU thread and the VMM.
pub struct VcpuShared {
    ctl: Mutex<Control>,
    cond: Condvar,
    /// The vCPU fd; the thread holds the lock while in KVM_RUN.
    pub fd: Mutex<VcpuFd>,
    /// Exit counters.
    pub counters: VcpuCounters,
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set before
        // the first KVM_RUN and valid while the thread lives (its VcpuFd is
        // kept alive by the Arc the thread holds). A single-byte volatile
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = register_signal_handler(SIGRTMIN(), kick_handler).map_err(VcpuError::Signal);
    });
    res
}

/// A created, configured vCPU before its thread starts.
pub struct Vcpu {
    /// Index (and APIC id).
    pub id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` and sets its CPUID and MSRs.
    pub fn new(vm: &kvm_ioctls::VmFd, id: u8, cpuid: &CpuId) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|e| VcpuError::Create(id, e))?;
        ioctl("KVM_SET_CPUID2", fd.set_cpuid2(cpuid))?;
        ioctl("KVM_SET_MSRS", fd.set_msrs(&msr::boot_msrs()))?;
        Ok(Vcpu { id, fd })
    }

    /// Sets the boot state of the BSP (long mode or PVH's protected mode at
    /// the entry point), and LINT wiring for all.
    pub fn configure_boot(&self, entry: crate::arch::boot::BootEntry) -> Result<(), VcpuError> {
        use crate::arch::boot::BootEntry;
        regs::setup_lint(&self.fd)?;
        if self.id == 0 {
            match entry {
                BootEntry::Linux64(rip) => {
                    regs::setup_regs(&self.fd, rip)?;
                    regs::setup_sregs(&self.fd)?;
                }
                BootEntry::Pvh { entry, start_info } => {
                    regs::setup_regs_pvh(&self.fd, entry, start_info)?;
                    regs::setup_sregs_pvh(&self.fd)?;
                }
            }
            regs::setup_fpu(&self.fd)?;
        }
        Ok(())
    }

    /// Writes back a snapshot's state.
    pub fn restore(&self, s: &VcpuState) -> Result<(), VcpuError> {
        restore_state(&self.fd, s)
    }

    /// Starts the run loop on its own thread, paused when `paused`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        self,
        pio: Bus,
        mmio: Bus,
        exit_evt: EventFd,
        exit_reason: Arc<Mutex<Option<ExitReason>>>,
        paused: bool,
        pin: Option<usize>,
        seccomp: Option<crate::seccomp::Filter>,
    ) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let (mut handle, runner) = self.prepare(pio, mmio, exit_evt, exit_reason, paused, pin, seccomp)?;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || runner.run())
            .map_err(VcpuError::Thread)?;
        {
            use std::os::unix::thread::JoinHandleExt;
            handle.pthread = thread.as_pthread_t();
        }
        handle.thread = Some(thread);
        handle.kickable = true;
        Ok(handle)
    }

    /// Prepares the run loop for the calling thread, which must then call
    /// [`VcpuRunner::run`]: the thread that built the VM is already on a
    /// CPU, so the guest's first instruction waits for no thread start.
    #[allow(clippy::too_many_arguments)]
    pub fn run_on_current_thread(
        self,
        pio: Bus,
        mmio: Bus,
        exit_evt: EventFd,
        exit_reason: Arc<Mutex<Option<ExitReason>>>,
        paused: bool,
        pin: Option<usize>,
        seccomp: Option<crate::seccomp::Filter>,
    ) -> Result<(VcpuHandle, VcpuRunner), VcpuError> {
        let (mut handle, runner) = self.prepare(pio, mmio, exit_evt, exit_reason, paused, pin, seccomp)?;
        // SAFETY: pthread_self has no preconditions.
        handle.pthread = unsafe { libc::pthread_self() };
        handle.kickable = true;
        Ok((handle, runner))
    }

    #[allow(clippy::too_many_arguments)]
    fn prepare(
        self,
        pio: Bus,
        mmio: Bus,
        exit_evt: EventFd,
        exit_reason: Arc<Mutex<Option<ExitReason>>>,
        paused: bool,
        pin: Option<usize>,
        seccomp: Option<crate::seccomp::Filter>,
    ) -> Result<(VcpuHandle, VcpuRunner), VcpuError> {
        install_kick_handler()?;
        let id = self.id;
        let mut fd = self.fd;
        let run_ptr = fd.get_kvm_run() as *mut kvm_run as usize;
        let shared = Arc::new(VcpuShared {
            ctl: Mutex::new(Control {
                want: if paused { Want::Pause } else { Want::Run },
                paused: false,
                exited: false,
            }),
            cond: Condvar::new(),
            fd: Mutex::new(fd),
            counters: VcpuCounters::default(),
        });
        let runner = VcpuRunner { id, shared: shared.clone(), pio, mmio, exit_evt, exit_reason, run_ptr, pin, seccomp };
        // pthread and kickable are filled in by the caller.
        Ok((VcpuHandle { id, shared, thread: None, pthread: 0, kickable: false }, runner))
    }
}

/// A vCPU's run loop, ready to run on whichever thread calls [`VcpuRunner::run`].
pub struct VcpuRunner {
    id: u8,
    shared: Arc<VcpuShared>,
    pio: Bus,
    mmio: Bus,
    exit_evt: EventFd,
    exit_reason: Arc<Mutex<Option<ExitReason>>>,
    run_ptr: usize,
    pin: Option<usize>,
    seccomp: Option<crate::seccomp::Filter>,
}

impl VcpuRunner {
    /// Pins the thread, installs the seccomp filter and runs the guest
    /// until the VMM tells the vCPU to exit.
    pub fn run(self) {
        let VcpuRunner { id, shared: s, pio, mmio, exit_evt, exit_reason, run_ptr, pin, seccomp } = self;
        if id == 0 {
            crate::timing::mark(&crate::timing::VCPU_THREAD_RUNNING);
        }
        if let Some(cpu) = pin {
            if let Err(e) = pin_current_thread(cpu) {
                eprintln!("vmm: vcpu{id}: cannot pin to CPU {cpu}: {e}");
            }
        }
        KVM_RUN_PTR.with(|c| c.set(run_ptr as *mut kvm_run));
        let mut ok = true;
        if let Some(f) = seccomp {
            if let Err(e) = crate::seccomp::apply(&f) {
                eprintln!("vmm: vcpu{id}: {e}");
                *exit_reason.lock().unwrap() = Some(ExitReason::Error(e.to_string()));
                let _ = exit_evt.write(1);
                ok = false;
            }
        }
        if ok {
            if id == 0 {
                crate::timing::mark(&crate::timing::VCPU_FILTERED);
            }
            run_loop(&s, &pio, &mmio, &exit_evt, &exit_reason);
        } else {
            park_until_exit(&s);
        }
        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
        let mut c = s.ctl.lock().unwrap();
        c.exited = true;
        s.cond.notify_all();
    }
}

fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu is below CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: set is a valid cpu_set_t of the size passed; 0 means this thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn run_loop(
    s: &VcpuShared,
    pio: &Bus,
    mmio: &Bus,
    exit_evt: &EventFd,
    exit_reason: &Mutex<Option<ExitReason>>,
) {
    let stop = |r: ExitReason| {
        let mut g = exit_reason.lock().unwrap();
        if g.is_none() {
            *g = Some(r);
        }
        let _ = exit_evt.write(1);
    };
    loop {
        {
            let mut c = s.ctl.lock().unwrap();
            while c.want == Want::Pause {
                c.paused = true;
                s.cond.notify_all();
                c = s.cond.wait(c).unwrap();
            }
            c.paused = false;
            if c.want == Want::Exit {
                return;
            }
        }
        let mut fd = s.fd.lock().unwrap();
        if s.counters.exits.fetch_add(1, Ordering::Relaxed) == 0 {
            crate::timing::mark(&crate::timing::FIRST_KVM_RUN);
        }
        match fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    s.counters.pio.fetch_add(1, Ordering::Relaxed);
                    if !pio.write(u64::from(port), data) {
                        s.counters.unhandled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    s.counters.pio.fetch_add(1, Ordering::Relaxed);
                    if !pio.read(u64::from(port), data) {
                        data.fill(0xff);
                        s.counters.unhandled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    s.counters.mmio.fetch_add(1, Ordering::Relaxed);
                    if !mmio.write(addr, data) {
                        s.counters.unhandled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    s.counters.mmio.fetch_add(1, Ordering::Relaxed);
                    if !mmio.read(addr, data) {
                        data.fill(0xff);
                        s.counters.unhandled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                VcpuExit::Hlt => {
                    // With an in-kernel LAPIC a halt only exits when the
                    // guest halted with interrupts off: it is done.
                    drop(fd);
                    stop(ExitReason::GuestReset);
                    park_until_exit(s);
                    return;
                }
                VcpuExit::Shutdown => {
                    if let (Ok(r), Ok(sr)) = (fd.get_regs(), fd.get_sregs()) {
                        eprintln!(
                            "vmm: vcpu triple fault at rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                            r.rip, r.rsp, sr.cr0, sr.cr3, sr.cr4, sr.efer
                        );
                    }
                    drop(fd);
                    stop(ExitReason::TripleFault);
                    park_until_exit(s);
                    return;
                }
                VcpuExit::SystemEvent(_, _) => {
                    drop(fd);
                    stop(ExitReason::GuestReset);
                    park_until_exit(s);
                    return;
                }
                VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
                other => {
                    let msg = format!("Unexpected vCPU exit: {other:?}");
                    drop(fd);
                    stop(ExitReason::Error(msg));
                    park_until_exit(s);
                    return;
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                drop(fd);
                stop(ExitReason::Error(format!("KVM_RUN failed: {e}")));
                park_until_exit(s);
                return;
            }
        }
    }
}

/// After the guest stopped, the thread still answers pause requests (so a
/// snapshot or describe never hangs) until told to exit.
fn park_until_exit(s: &VcpuShared) {
    let mut c = s.ctl.lock().unwrap();
    loop {
        c.paused = true;
        s.cond.notify_all();
        if c.want == Want::Exit {
            return;
        }
        c = s.cond.wait(c).unwrap();
    }
}

/// The VMM's grip on a running vCPU thread.
pub struct VcpuHandle {
    /// Index.
    pub id: u8,
    /// Shared control and fd.
    pub shared: Arc<VcpuShared>,
    thread: Option<JoinHandle<()>>,
    /// The thread running the loop (a spawned one, or the one that built the VM).
    pthread: libc::pthread_t,
    /// `pthread` names a live thread.
    kickable: bool,
}

impl VcpuHandle {
    fn kick(&self) {
        if self.kickable {
            // SAFETY: the pthread_t names a thread that has not been joined
            // (kickable turns false before the join), so it is valid; the
            // signal has our handler installed.
            unsafe { libc::pthread_kill(self.pthread, SIGRTMIN()) };
        }
    }

    /// Stops the vCPU and waits until it is out of KVM_RUN.
    pub fn pause(&self) {
        let mut c = self.shared.ctl.lock().unwrap();
        if c.want == Want::Exit || c.exited {
            return;
        }
        c.want = Want::Pause;
        drop(c);
        loop {
            self.kick();
            let c = self.shared.ctl.lock().unwrap();
            let (c, _) = self
                .shared
                .cond
                .wait_timeout_while(c, std::time::Duration::from_millis(20), |c| !c.paused && !c.exited)
                .unwrap();
            if c.paused || c.exited {
                return;
            }
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut c = self.shared.ctl.lock().unwrap();
        if c.want == Want::Pause {
            c.want = Want::Run;
            self.shared.cond.notify_all();
        }
    }

    /// Ends the thread and joins it.
    pub fn exit(&mut self) {
        {
            let mut c = self.shared.ctl.lock().unwrap();
            c.want = Want::Exit;
            self.shared.cond.notify_all();
        }
        // SAFETY: pthread_self has no preconditions; pthread_equal compares two thread ids.
        if self.thread.is_none() && unsafe { libc::pthread_equal(self.pthread, libc::pthread_self()) } != 0 {
            // The loop is this thread's to run; it will see Exit when it starts.
            return;
        }
        loop {
            self.kick();
            let c = self.shared.ctl.lock().unwrap();
            let (c, _) = self
                .shared
                .cond
                .wait_timeout_while(c, std::time::Duration::from_millis(20), |c| !c.exited)
                .unwrap();
            if c.exited {
                break;
            }
        }
        self.kickable = false;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Reads the vCPU state; the vCPU must be paused.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let fd = self.shared.fd.lock().unwrap();
        save_state(&fd)
    }
}

fn save_state(fd: &VcpuFd) -> Result<VcpuState, VcpuError> {
    let mut msrs = Msrs::from_entries(
        &msr::SAVED_MSRS.iter().map(|i| kvm_msr_entry { index: *i, ..Default::default() }).collect::<Vec<_>>(),
    )
    .expect("Fixed MSR list fits");
    let n = ioctl("KVM_GET_MSRS", fd.get_msrs(&mut msrs))?;
    Ok(VcpuState {
        mp_state: ioctl("KVM_GET_MP_STATE", fd.get_mp_state())?,
        regs: ioctl("KVM_GET_REGS", fd.get_regs())?,
        sregs: ioctl("KVM_GET_SREGS", fd.get_sregs())?,
        fpu: FpuState::from_kvm(&ioctl("KVM_GET_FPU", fd.get_fpu())?),
        xsave: fd.get_xsave().ok(),
        xcrs: fd.get_xcrs().ok(),
        msrs: msrs.as_slice()[..n].to_vec(),
        lapic: ioctl("KVM_GET_LAPIC", fd.get_lapic())?,
        events: ioctl("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?,
        debugregs: ioctl("KVM_GET_DEBUGREGS", fd.get_debug_regs())?,
    })
}

fn restore_state(fd: &VcpuFd, s: &VcpuState) -> Result<(), VcpuError> {
    ioctl("KVM_SET_SREGS", fd.set_sregs(&s.sregs))?;
    ioctl("KVM_SET_REGS", fd.set_regs(&s.regs))?;
    match &s.xsave {
        // SAFETY: the buffer is a kvm_xsave read by KVM_GET_XSAVE from a vCPU
        // with the same CPUID, so its size matches what KVM expects.
        Some(x) => ioctl("KVM_SET_XSAVE", unsafe { fd.set_xsave(x) })?,
        None => ioctl("KVM_SET_FPU", fd.set_fpu(&s.fpu.to_kvm()))?,
    }
    if let Some(x) = &s.xcrs {
        ioctl("KVM_SET_XCRS", fd.set_xcrs(x))?;
    }
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VcpuError::Ioctl("KVM_SET_MSRS", kvm_ioctls::Error::new(libc::E2BIG)))?;
    ioctl("KVM_SET_MSRS", fd.set_msrs(&msrs))?;
    ioctl("KVM_SET_LAPIC", fd.set_lapic(&s.lapic))?;
    ioctl("KVM_SET_MP_STATE", fd.set_mp_state(s.mp_state))?;
    ioctl("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&s.events))?;
    ioctl("KVM_SET_DEBUGREGS", fd.set_debug_regs(&s.debugregs))?;
    Ok(())
}
