//! Booting Linux guests: only where KVM has hardware virtualisation.
//!
//! On a software-virtualised KVM (PVM, shadow paging) guest code at CPL0 is
//! emulated one instruction at a time, so a Linux kernel does not boot in
//! any useful time; labvm detects that and refuses with the reason.

use std::path::Path;

/// Why Linux cannot be booted, or what went wrong booting it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinuxError {
    /// This host's KVM cannot run a Linux guest.
    #[error("cannot boot Linux on this host: {0}")]
    Unsupported(String),
}

/// What this host's KVM is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Virtualisation {
    /// Intel VT-x or AMD-V: guests run at every privilege level natively.
    Hardware(&'static str),
    /// Software virtualisation (PVM): only CPL3 guest code runs natively.
    Pvm,
    /// Neither CPU flag nor PVM module: nested or unknown.
    Unknown,
}

/// Detects the kind of virtualisation from `/proc/cpuinfo` and `/sys/module`.
pub fn detect() -> Virtualisation {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify(&cpuinfo, Path::new("/sys/module/kvm_pvm").exists())
}

/// Pure part of [`detect`].
pub fn classify(cpuinfo: &str, pvm_module: bool) -> Virtualisation {
    if pvm_module {
        return Virtualisation::Pvm;
    }
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    if has("vmx") {
        Virtualisation::Hardware("vmx")
    } else if has("svm") {
        Virtualisation::Hardware("svm")
    } else {
        Virtualisation::Unknown
    }
}

/// Refuses a Linux boot unless the host has hardware virtualisation.
pub fn require_hardware_virtualisation() -> Result<&'static str, LinuxError> {
    match detect() {
        Virtualisation::Hardware(f) => Ok(f),
        Virtualisation::Pvm => Err(LinuxError::Unsupported(
            "KVM here is PVM (software virtualisation, module kvm_pvm): guest kernel code is \
             emulated one instruction at a time and a Linux kernel does not boot; lab guests \
             (CPL3 workloads) run, Linux needs a host with VT-x or AMD-V"
                .into(),
        )),
        Virtualisation::Unknown => Err(LinuxError::Unsupported(
            "the CPU reports neither vmx nor svm, so KVM has no hardware virtualisation here; \
             Linux needs a host with VT-x or AMD-V"
                .into(),
        )),
    }
}
