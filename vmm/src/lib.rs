//! labvm: the reference rust-vmm VMM of Prescient.
//!
//! labvm creates a KVM virtual machine with N vCPUs and M MiB of guest RAM
//! and runs a *lab guest* in it: a small x86-64 program kept in this crate
//! (`guest/lab.S`) that labvm enters in 64-bit long mode at CPL3 with
//! identity-mapped user pages. Only CPL3 code runs natively on software-
//! virtualised (PVM) KVM hosts, so lab guests work on any KVM. The guest talks
//! to the host through MMIO writes to the lab device page (ready, progress,
//! exit status, log strings, heartbeats, faults). labvm times start request
//! to ready, exposes each vCPU's thread id, stops guests that fault or miss
//! their deadline with an error that names what happened, and reports the
//! VM's lifecycle to the companion through `vmm-hooks`.
//!
//! Linux guests ([`linux`]) boot only where KVM has hardware virtualisation;
//! elsewhere labvm refuses them with the reason.
//!
//! labvm does not decide policy: it applies plans the companion sends.

mod boot;
mod cpu;
mod devices;
mod guest;
mod hooks;
mod labdev;
mod layout;
pub mod linux;
mod migrate;
mod snapshot;
mod sys;
pub mod testing;
mod vm;
mod workload;

pub use devices::BalloonConfig;
pub use guest::stamp_value;
pub use hooks::{
    EXIT_INTERRUPTED, HookReporter, Interruption, OnInterrupt, VMM_NAME, lab_identity,
};
pub use labdev::exception_name;
pub use layout::{
    BALLOON_MMIO_BASE, LABDEV_BASE, LARGE_PAGE, MAX_RAM_MIB, MAX_VCPUS, MIN_RAM_MIB, PAGE_SIZE,
};
pub use migrate::{
    DowntimePhases, EXIT_MIGRATION_IN_DOUBT, InDoubt, Incoming, MigrateError, MigrationOptions,
    MigrationOrder, MigrationReport, MigrationSource, TransportKind, receive,
};
pub use snapshot::{
    Restored, SAVE_MAGIC, SAVE_VERSION, SaveReport, SnapshotError, restore as restore_from_file,
    save as save_to_file,
};
pub use sys::process_rss_bytes;
pub use vm::{
    LabDeviceState, LabVm, LabVmConfig, RunObserver, RunReport, STATE_VERSION, StopReason,
    VcpuControl, VcpuState,
};
pub use workload::{TouchRun, Trace, Workload};

use std::path::PathBuf;

/// Everything that can go wrong in labvm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm ({0}); load the kvm module and make sure this user may read and write /dev/kvm (e.g. add it to the kvm group)"
    )]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configuration is not one labvm can run.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// The companion's allocator found no room for the VM on this host and
    /// its policy is to refuse the boot; the guest did not run.
    #[error(
        "the companion refused the boot: this host cannot hold the VM's forecast demand ({shortfall})"
    )]
    NotAdmitted {
        /// Which resources fall short, by how much.
        shortfall: String,
    },
    /// Guest memory could not be allocated or accessed.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// The built-in guest program is malformed.
    #[error("guest program: {0}")]
    GuestProgram(String),
    /// The workload does not fit in guest RAM.
    #[error("workload {workload} needs {need_mib} MiB but the workload area has {have_mib} MiB")]
    WorkloadTooLarge {
        /// The workload's name.
        workload: String,
        /// What it needs.
        need_mib: u64,
        /// What the guest has.
        have_mib: u64,
    },
    /// A trace file could not be read.
    #[error("cannot read trace {path}")]
    TraceRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A trace file is malformed.
    #[error("trace {path}, line {line}: {reason}")]
    TraceParse {
        /// The file.
        path: PathBuf,
        /// 1-based line (0: the whole file).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The guest raised a CPU exception.
    #[error(
        "guest fault on vCPU {vcpu}: {name} (vector {vector}) at RIP {rip:#x}, error code {error_code:#x}{}",
        if *vector == 14 { format!(", address {cr2:#x}") } else { String::new() }
    )]
    GuestFault {
        /// The vCPU that faulted.
        vcpu: u32,
        /// Exception vector.
        vector: u64,
        /// Exception name.
        name: &'static str,
        /// Instruction pointer of the fault.
        rip: u64,
        /// Error code pushed by the CPU (0 where none).
        error_code: u64,
        /// Faulting address (page faults).
        cr2: u64,
    },
    /// The guest shut down (triple fault).
    #[error("guest shut down (triple fault) on vCPU {vcpu} at RIP {rip:#x}")]
    Shutdown {
        /// The vCPU.
        vcpu: u32,
        /// Its RIP after the shutdown.
        rip: u64,
    },
    /// The guest did not signal ready in time.
    #[error("guest did not signal ready within {deadline_ms} ms; stopped")]
    ReadyDeadline {
        /// The deadline.
        deadline_ms: u128,
    },
    /// Every vCPU parked but none reported an exit status.
    #[error("every vCPU parked without an exit status")]
    AllParked,
    /// A vCPU left KVM_RUN for a reason labvm does not handle.
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    UnexpectedExit {
        /// The vCPU.
        vcpu: u32,
        /// The exit, as KVM reported it.
        exit: String,
    },
    /// A thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    /// Linux cannot be booted on this host.
    #[error(transparent)]
    Linux(#[from] linux::LinuxError),
}
