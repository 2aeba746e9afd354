//! libvirt integration.
//!
//! Two sides, apart: the hook client (`prescient libvirt-hook`, run by
//! libvirt as `/etc/libvirt/hooks/qemu`, and its installer), which forwards
//! each hook call with the domain XML to the daemon and returns within a
//! bound; and the daemon's agent, which acts on a running domain from
//! outside once its hook call has been answered (pins the vCPU threads,
//! sets the balloon, samples usage). The domain XML reader and the
//! decisions are pure; `/proc`, `sched_setaffinity` and `virsh` sit in
//! `sys`.

mod agent;
mod domain;
mod hook;
mod install;
mod sys;

use std::path::PathBuf;

pub use agent::{AgentConfig, AgentRecord, LibvirtAgent, VcpuPin, balloon_target_kib, pin_plan};
pub use domain::{MAX_DOMAIN_XML, METADATA_NS, identity, parse_cpu_list, parse_domain};
pub use hook::{HOOK_PEER, HookArgs, HookConfig, HookOutcome, build_event, read_bounded, run_hook};
pub use install::{InstallConfig, Installed, MARKER, hook_script, install};
pub(crate) use sys::find_qemu_pid;
pub use sys::{Virsh, thread_cpus};

/// What can go wrong in the libvirt integration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LibvirtError {
    /// The domain XML is not usable; the message says why.
    #[error("bad domain XML: {0}")]
    DomainXml(String),
    /// The hook was called with arguments libvirt would not pass.
    #[error("bad hook arguments: {0}")]
    HookArgs(String),
    /// Standard input could not be read.
    #[error("cannot read the domain XML from standard input: {0}")]
    Stdin(String),
    /// A CPU list is malformed.
    #[error("bad CPU list {list:?}: {why}")]
    CpuList {
        /// The list.
        list: String,
        /// Why.
        why: String,
    },
    /// Installing the hook failed or was refused.
    #[error("libvirt hook {path}: {why}")]
    Install {
        /// The hook file or directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A `/proc` file could not be read or understood.
    #[error("{0}")]
    Proc(String),
    /// A thread could not be pinned.
    #[error("cannot set the CPU affinity of thread {tid}: {why}")]
    Affinity {
        /// The thread.
        tid: i32,
        /// Why.
        why: String,
    },
    /// A `virsh` call failed.
    #[error("virsh {command}: {why}")]
    Virsh {
        /// The virsh command (`setmem`, …).
        command: String,
        /// Why.
        why: String,
    },
    /// A `virsh` call did not finish in its time and was killed.
    #[error("virsh {command}: no answer within {secs} s; killed")]
    VirshTimeout {
        /// The virsh command.
        command: String,
        /// Its time, s.
        secs: u64,
    },
    /// A QMP answer was not understood.
    #[error("{0}")]
    Qmp(String),
    /// The record file could not be opened.
    #[error("cannot open the libvirt record file {path}: {why}")]
    Record {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}
