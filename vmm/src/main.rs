//! The `vmm` binary: one process per VM. A thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use vmm::config::{ApiConfig, VmConfig};
use vmm::machine::StopReason;
use vmm::vstate::vcpu::ExitReason;

const HELP: &str = "\
vmm - run one virtual machine

USAGE:
    vmm --config FILE [OPTIONS]
    vmm --restore DIR [OPTIONS]

OPTIONS:
    --config FILE        VM configuration, JSON (or TOML if FILE ends in .toml);
                         see docs/vmm.md for every field
    --restore DIR        Restore the snapshot in DIR (snapshot.json + memory.bin)
                         instead of booting; the VM comes up paused unless --resume
    --resume             With --restore: start running right away
    --api-socket PATH    Serve the control API on this unix socket (overrides
                         the config's [api] socket); the state file is
                         PATH.state.json
    --serial-log PATH    Write the serial console here (overrides the config)
    --paused             Create the VM but do not run its vCPUs until resumed
    --no-seccomp         Do not install the per-thread seccomp filters
    -h, --help           Print this help

EXIT STATUS:
    0  the guest powered off or reset, or power-off was requested
    1  the VM could not be created (bad config, missing KVM, ...)
    2  the guest crashed (triple fault) or KVM failed to run it
";

struct Args {
    config: Option<PathBuf>,
    restore: Option<PathBuf>,
    api_socket: Option<PathBuf>,
    serial_log: Option<PathBuf>,
    paused: bool,
    resume: bool,
    no_seccomp: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut a = Args {
        config: None,
        restore: None,
        api_socket: None,
        serial_log: None,
        paused: false,
        resume: false,
        no_seccomp: false,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        let arg = arg.to_string_lossy().to_string();
        let mut value = |name: &str| it.next().map(PathBuf::from).ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--config" => a.config = Some(value("--config")?),
            "--restore" => a.restore = Some(value("--restore")?),
            "--api-socket" => a.api_socket = Some(value("--api-socket")?),
            "--serial-log" => a.serial_log = Some(value("--serial-log")?),
            "--paused" => a.paused = true,
            "--resume" => a.resume = true,
            "--no-seccomp" => a.no_seccomp = true,
            other => return Err(format!("Unknown argument {other:?}; see --help")),
        }
    }
    if a.config.is_none() == a.restore.is_none() {
        return Err("Give exactly one of --config and --restore; see --help".into());
    }
    Ok(Some(a))
}

fn main() -> ExitCode {
    vmm::timing::mark(&vmm::timing::MAIN_START);
    let code = run();
    if std::env::var_os("VMM_TIMING").is_some() {
        eprintln!("vmm: timing {}", vmm::timing::json());
    }
    code
}

fn run() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(1);
        }
    };
    let snapshot = match &args.restore {
        Some(dir) => match vmm::snapshot::load(dir) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("vmm: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let mut cfg = match (&args.config, &snapshot) {
        (Some(path), _) => match VmConfig::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("vmm: {e}");
                return ExitCode::from(1);
            }
        },
        (None, Some(s)) => s.config.clone(),
        (None, None) => unreachable!("parse_args demands one of them"),
    };
    if let Some(s) = &args.api_socket {
        cfg.api = Some(ApiConfig { socket: s.clone() });
    }
    if let Some(l) = &args.serial_log {
        cfg.serial.log = Some(l.clone());
    }
    if args.no_seccomp {
        cfg.machine.seccomp = false;
    }
    let paused = args.paused || (snapshot.is_some() && !args.resume);
    let snap = snapshot.as_ref().zip(args.restore.as_deref());
    let (vm, vcpu0) = match vmm::builder::build(cfg, snap, paused) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(1);
        }
    };
    // This thread becomes vCPU 0 right away; the control API and the device
    // event loop move to a thread of their own.
    let vmm_thread = match std::thread::Builder::new().name("vmm-events".into()).spawn(move || serve_and_run(vm)) {
        Ok(t) => t,
        Err(e) => {
            // The Vmm was dropped with the closure, which told vCPU 0 to exit.
            eprintln!("vmm: cannot start the VMM thread: {e}");
            vcpu0.run();
            return ExitCode::from(1);
        }
    };
    vcpu0.run();
    vmm_thread.join().unwrap_or_else(|_| {
        eprintln!("vmm: the VMM thread panicked");
        ExitCode::from(2)
    })
}

/// The VMM thread: control API, seccomp filter, device event loop.
fn serve_and_run(mut vm: vmm::machine::Vmm) -> ExitCode {
    let socket = vm.config.api.as_ref().map(|a| a.socket.clone());
    if let Some(s) = &socket {
        if let Err(e) = vmm::api::serve(&mut vm, s) {
            eprintln!("vmm: {e}");
            vm.power_off();
            vm.run();
            return ExitCode::from(1);
        }
    }
    if vm.config.machine.seccomp {
        let applied = vmm::seccomp::vmm_filter().and_then(|f| vmm::seccomp::apply(&f));
        if let Err(e) = applied {
            eprintln!("vmm: {e}");
            vm.power_off();
            vm.run();
            return ExitCode::from(1);
        }
    }
    let reason = vm.run();
    if let Some(s) = &socket {
        vmm::api::cleanup(s);
    }
    match reason {
        StopReason::PowerOff | StopReason::Guest(ExitReason::GuestReset) => {
            eprintln!("vmm: guest stopped ({reason:?})");
            ExitCode::SUCCESS
        }
        StopReason::Guest(r) => {
            eprintln!("vmm: guest failed: {r:?}");
            ExitCode::from(2)
        }
    }
}
