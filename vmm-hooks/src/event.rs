//! Lifecycle events, plans, reports and the in-process hook trait.

use serde::{Deserialize, Serialize};

/// Who a VM is: its id on this host and the digests that key its profiles.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmIdentity {
    /// Unique on this host (e.g. a libvirt domain name or `labvm-<pid>`).
    pub vm_id: String,
    /// Digest of the software image (for lab guests: of the guest program).
    pub image_digest: String,
    /// Digest of the bootstrap package (for lab guests: of the workload
    /// and its parameters or trace).
    pub package_digest: String,
}

/// The VM's shape, as created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Which VMM runs it (e.g. `labvm 0.1.0`).
    pub vmm: String,
    /// Priority (higher wins); 0 by default.
    #[serde(default)]
    pub priority: i32,
    /// Whether the companion may interrupt it.
    #[serde(default)]
    pub interruptible: bool,
}

/// A range of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum StopStatus {
    /// The guest exited with this status.
    Exited {
        /// The guest's status.
        status: u64,
    },
    /// The host stopped it.
    Stopped,
    /// It failed; the message says why.
    Failed {
        /// What happened.
        reason: String,
    },
}

/// Phases of a live migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MigratePhase {
    /// Pre-copy started.
    Started,
    /// The VM runs on the destination.
    Completed,
    /// The migration failed; the VM stays on the source.
    Aborted,
}

/// What happened to a VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum EventKind {
    /// The VM exists (memory allocated, vCPUs created), nothing runs yet.
    Created {
        /// Its shape.
        spec: VmSpec,
    },
    /// The vCPU threads exist and wait; the companion may answer with a plan.
    BeforeBoot {
        /// Kernel thread id of each vCPU thread, by vCPU index.
        vcpu_tids: Vec<i32>,
        /// Guest RAM.
        ram: GuestRange,
    },
    /// The guest signalled ready.
    Ready {
        /// From the start request to ready, in milliseconds.
        time_to_ready_ms: f64,
    },
    /// What the bootstrap really did.
    BootReport(BootReport),
    /// The VM was paused.
    Paused,
    /// The VM was resumed.
    Resumed,
    /// The VM was interrupted (its state saved, its resources released).
    Interrupted {
        /// Why.
        reason: String,
    },
    /// An interrupted VM was started again.
    Restarted,
    /// A snapshot was taken.
    Snapshot,
    /// The VM was restored from a snapshot.
    Restore,
    /// A live-migration phase.
    Migrate {
        /// Which phase.
        phase: MigratePhase,
    },
    /// The VM is gone.
    Stopped {
        /// How it ended.
        status: StopStatus,
    },
}

impl EventKind {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Created { .. } => "created",
            EventKind::BeforeBoot { .. } => "before-boot",
            EventKind::Ready { .. } => "ready",
            EventKind::BootReport(_) => "boot-report",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::Interrupted { .. } => "interrupted",
            EventKind::Restarted => "restarted",
            EventKind::Snapshot => "snapshot",
            EventKind::Restore => "restore",
            EventKind::Migrate { .. } => "migrate",
            EventKind::Stopped { .. } => "stopped",
        }
    }
}

/// One lifecycle event of one VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The VM.
    pub vm: VmIdentity,
    /// Position in this VM's event sequence, from 0.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// What happened.
    pub kind: EventKind,
}

/// What the companion asks the VMM to do before boot. Empty means boot as
/// usual (lazy faulting, no pinning).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BootPlan {
    /// What made the plan (e.g. a profile key and model), for the record.
    #[serde(default)]
    pub made_by: String,
}

impl BootPlan {
    /// The plan that changes nothing.
    pub fn empty() -> Self {
        BootPlan::default()
    }

    /// An empty plan that says who made it.
    pub fn made_by(who: impl Into<String>) -> Self {
        BootPlan {
            made_by: who.into(),
        }
    }
}

/// What a bootstrap really did, measured by the VMM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BootReport {
    /// From the start request to ready, in milliseconds.
    pub time_to_ready_ms: f64,
    /// CPU time of all vCPU threads until ready, in milliseconds.
    pub vcpu_cpu_ms: f64,
    /// Minor page faults of the VMM process until ready.
    pub minor_faults: u64,
    /// Major page faults of the VMM process until ready.
    pub major_faults: u64,
    /// Resident set of the VMM process at ready, in KiB.
    pub rss_kib: u64,
    /// Whether the plan was applied (false: rolled back, or no plan).
    pub plan_applied: bool,
}

impl BootReport {
    /// A report with the given time to ready and everything else zero.
    pub fn new(time_to_ready_ms: f64) -> Self {
        BootReport {
            time_to_ready_ms,
            ..BootReport::default()
        }
    }
}

/// The companion's answer to an event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[non_exhaustive]
pub enum HookReply {
    /// Noted.
    Ack,
    /// The plan for a before-boot event.
    Plan(BootPlan),
}

impl HookReply {
    /// The plan in this reply, or the empty plan.
    pub fn into_plan(self) -> BootPlan {
        match self {
            HookReply::Plan(p) => p,
            HookReply::Ack => BootPlan::empty(),
        }
    }
}

/// A companion linked into the VMM. One method; the event says what happened.
///
/// Implementations must return promptly: the VMM calls them on its control
/// path. They must not fail the VM: on trouble, log and answer
/// [`HookReply::Ack`] (or an empty plan).
pub trait LifecycleHook: Send {
    /// Handles one event.
    fn on_event(&mut self, event: &Event) -> HookReply;
}

/// The hook used when no companion is configured: acknowledges everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCompanion;

impl LifecycleHook for NoCompanion {
    fn on_event(&mut self, _event: &Event) -> HookReply {
        HookReply::Ack
    }
}
