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

/// What the companion's interruption coordinator needs to know of a VM
/// before it boots (carried in [`EventKind::BeforeBoot`]).
///
/// Defaults (also for VMMs that send none): priority 0, not interruptible,
/// a fresh boot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Admission {
    /// Priority; higher wins. A VM may only cause the interruption of VMs
    /// of strictly lower priority.
    #[serde(default)]
    pub priority: i32,
    /// Whether the companion may interrupt this VM (pause, save its state
    /// and stop it) to make room for a higher-priority one.
    #[serde(default)]
    pub interruptible: bool,
    /// This boot restarts a VM the companion interrupted (restored from its
    /// saved state, or cold-booted again): the companion grants it the
    /// reservation it pre-calculated at the interruption.
    #[serde(default)]
    pub restart: bool,
}

impl Admission {
    /// A fresh boot with this priority and interruptibility.
    pub fn new(priority: i32, interruptible: bool) -> Self {
        Admission {
            priority,
            interruptible,
            restart: false,
        }
    }

    /// The same, marked as the restart of an interrupted VM.
    pub fn restarting(mut self) -> Self {
        self.restart = true;
        self
    }
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
    /// The source committed but never heard that the destination runs the
    /// VM: the source keeps its copy paused and saved (the outcome's error
    /// names the file) and stops; the VM may run on the destination. Check
    /// there before restoring the saved copy. (Added to protocol 1; a
    /// companion that does not know it rejects the event.)
    InDoubt,
}

/// How a migration went, as the source reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateOutcome {
    /// Start of pre-copy to the destination running, in milliseconds.
    pub total_ms: f64,
    /// Guest paused on the source, in milliseconds.
    pub downtime_ms: f64,
    /// Bytes sent.
    pub bytes: u64,
    /// Why it failed (the VM then runs on, on the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A running VM's periodic status, for the companion's migration
/// decisions (see [`EventKind::Poll`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// Guest RAM, in MiB.
    pub ram_mib: u64,
    /// Guest memory resident on the host, in MiB.
    pub resident_mib: u64,
    /// Guest pages written per second, measured over a short dirty-log
    /// window since the last status (absent when not measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_pages_per_s: Option<f64>,
    /// Whether the VMM can migrate this VM when told to.
    #[serde(default)]
    pub migratable: bool,
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
        /// Priority, interruptibility and whether this boot restarts an
        /// interrupted VM (absent from older VMMs: priority 0, not
        /// interruptible, a fresh boot).
        #[serde(default)]
        admission: Admission,
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
        /// The destination (`HOST:PORT`), where the VMM knows it (absent
        /// from older VMMs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        /// How it went (with `completed` and `aborted`; absent otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome: Option<MigrateOutcome>,
    },
    /// The periodic status of a running VM without a balloon device (sent
    /// every poll interval by a VMM that announced
    /// [`crate::proto::FEATURE_MIGRATE`]; a VMM with a balloon sends
    /// [`EventKind::Balloon`] instead, with the same fields in
    /// [`BalloonStatus::run`]). The companion may answer with
    /// [`HookReply::Migrate`].
    Poll(RunStatus),
    /// The VM is gone.
    Stopped {
        /// How it ended.
        status: StopStatus,
    },
    /// The balloon's periodic status (sent every balloon poll interval by a
    /// VMM with a balloon device). The companion may answer with
    /// [`HookReply::BalloonTarget`] to move the balloon.
    Balloon(BalloonStatus),
    /// The guest has not moved its balloon toward the target for longer
    /// than the VMM's grace period (sent once per episode).
    BalloonUnresponsive {
        /// The target the guest was asked for, in MiB.
        target_mib: u64,
        /// What the guest reports in its balloon, in MiB.
        actual_mib: u64,
        /// How long the guest has not moved toward the target, in milliseconds.
        stalled_ms: u64,
    },
    /// A libvirt QEMU hook call, forwarded by `prescient libvirt-hook`
    /// (added to protocol 1; see [`crate::proto`] for how operations map
    /// onto the lifecycle above).
    Libvirt(Box<LibvirtHookCall>),
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
            EventKind::Balloon(_) => "balloon",
            EventKind::Poll(_) => "poll",
            EventKind::BalloonUnresponsive { .. } => "balloon-unresponsive",
            EventKind::Libvirt(call) => call.operation.event_name(),
        }
    }
}

/// A libvirt QEMU hook operation (the second argument libvirt passes to
/// `/etc/libvirt/hooks/qemu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LibvirtOperation {
    /// `prepare begin`: resources are about to be allocated (lifecycle: created).
    Prepare,
    /// `start begin`: QEMU is about to be executed (lifecycle: before boot).
    Start,
    /// `started begin`: QEMU runs and its vCPU threads exist (lifecycle:
    /// running; the companion acts on the process from here).
    Started,
    /// `stopped end`: QEMU has exited (lifecycle: stopped).
    Stopped,
    /// `release end`: libvirt released the domain's resources (lifecycle:
    /// gone).
    Release,
    /// `migrate begin`: an incoming migration is about to start here
    /// (lifecycle: migrate started).
    Migrate,
    /// `restore begin`: the domain is about to be restored from a saved
    /// state (lifecycle: restore).
    Restore,
    /// `reconnect begin`: libvirtd restarted and found the domain running
    /// (lifecycle: running, seen again).
    Reconnect,
    /// `attach begin`: libvirt attached to a QEMU it did not start
    /// (lifecycle: running, seen again).
    Attach,
    /// An operation this version does not know; the raw name is in
    /// [`LibvirtHookCall::operation_name`].
    #[serde(other)]
    Other,
}

impl LibvirtOperation {
    /// The operation named as libvirt names it.
    pub fn from_name(name: &str) -> Self {
        match name {
            "prepare" => LibvirtOperation::Prepare,
            "start" => LibvirtOperation::Start,
            "started" => LibvirtOperation::Started,
            "stopped" => LibvirtOperation::Stopped,
            "release" => LibvirtOperation::Release,
            "migrate" => LibvirtOperation::Migrate,
            "restore" => LibvirtOperation::Restore,
            "reconnect" => LibvirtOperation::Reconnect,
            "attach" => LibvirtOperation::Attach,
            _ => LibvirtOperation::Other,
        }
    }

    /// The event's name in logs and metrics, e.g. `libvirt-started`.
    pub fn event_name(self) -> &'static str {
        match self {
            LibvirtOperation::Prepare => "libvirt-prepare",
            LibvirtOperation::Start => "libvirt-start",
            LibvirtOperation::Started => "libvirt-started",
            LibvirtOperation::Stopped => "libvirt-stopped",
            LibvirtOperation::Release => "libvirt-release",
            LibvirtOperation::Migrate => "libvirt-migrate",
            LibvirtOperation::Restore => "libvirt-restore",
            LibvirtOperation::Reconnect => "libvirt-reconnect",
            LibvirtOperation::Attach => "libvirt-attach",
            LibvirtOperation::Other => "libvirt-other",
        }
    }

    /// True when QEMU runs after this operation and the companion may act
    /// on it from outside (started, reconnect, attach).
    pub fn vm_runs(self) -> bool {
        matches!(
            self,
            LibvirtOperation::Started | LibvirtOperation::Reconnect | LibvirtOperation::Attach
        )
    }

    /// True when the domain's QEMU is gone after this operation (stopped,
    /// release).
    pub fn vm_gone(self) -> bool {
        matches!(self, LibvirtOperation::Stopped | LibvirtOperation::Release)
    }
}

/// One call of the libvirt QEMU hook, as `prescient libvirt-hook` forwards
/// it: the arguments libvirt gave, the domain XML it wrote on the hook's
/// standard input, and what the hook could read from that XML.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LibvirtHookCall {
    /// The operation, mapped.
    pub operation: LibvirtOperation,
    /// The operation as libvirt named it (kept for operations this version
    /// does not know).
    pub operation_name: String,
    /// `begin` or `end` (libvirt's sub-operation; `-` when none).
    pub sub_operation: String,
    /// libvirt's extra argument (`-` when none).
    pub extra: String,
    /// The domain XML, as received (empty when libvirt wrote none or it
    /// could not be read in time).
    pub domain_xml: String,
    /// What the hook read from the XML; `None` when it was missing or bad.
    #[serde(default)]
    pub domain: Option<LibvirtDomain>,
    /// Why the XML could not be read, if it could not.
    #[serde(default)]
    pub xml_error: Option<String>,
}

impl LibvirtHookCall {
    /// A call with its arguments and the XML as received; no summary yet.
    pub fn new(operation_name: &str, sub_operation: &str, extra: &str, domain_xml: String) -> Self {
        LibvirtHookCall {
            operation: LibvirtOperation::from_name(operation_name),
            operation_name: operation_name.to_string(),
            sub_operation: sub_operation.to_string(),
            extra: extra.to_string(),
            domain_xml,
            domain: None,
            xml_error: None,
        }
    }
}

/// What Prescient reads from a libvirt domain XML.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LibvirtDomain {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`, if given.
    #[serde(default)]
    pub uuid: Option<String>,
    /// The running domain's id (`<domain id='N'>`), if it has one.
    #[serde(default)]
    pub id: Option<u32>,
    /// `<domain type=…>` (`kvm`, `qemu`).
    pub domain_type: String,
    /// vCPUs at start (`<vcpu current=…>` or `<vcpu>`).
    pub vcpus: u32,
    /// `<memory>` in KiB (the most the guest can have).
    pub memory_kib: u64,
    /// `<currentMemory>` in KiB (what the balloon leaves the guest at start).
    pub current_memory_kib: u64,
    /// The memory balloon model (`virtio`, or `none`), if one is described.
    #[serde(default)]
    pub balloon_model: Option<String>,
    /// vCPUs that the domain pins itself (`<cputune><vcpupin vcpu=…>`); the
    /// companion leaves their affinity alone.
    #[serde(default)]
    pub pinned_by_libvirt: Vec<u32>,
    /// Settings for Prescient in the domain's `<metadata>`.
    #[serde(default)]
    pub prescient: LibvirtPrescientSettings,
}

/// The `<prescient:vm>` element of a domain's `<metadata>` (namespace
/// `urn:prescient:libvirt:1`): what the operator asks of the companion.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LibvirtPrescientSettings {
    /// Balloon the guest to this many MiB once it runs.
    #[serde(default)]
    pub balloon_target_mib: Option<u64>,
    /// Host CPUs the vCPU threads may be pinned to (a list like `2-5,8`).
    #[serde(default)]
    pub cpus: Option<String>,
    /// Priority (higher wins).
    #[serde(default)]
    pub priority: Option<i32>,
    /// Whether the companion may interrupt the domain.
    #[serde(default)]
    pub interruptible: Option<bool>,
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
/// usual (lazy faulting, no profiling).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BootPlan {
    /// What made the plan (e.g. a profile key and model), for the record.
    #[serde(default)]
    pub made_by: String,
    /// Pre-balloon: start the VM with its balloon inflated to this many MiB
    /// (the part of its memory the forecast says it will not use). Ignored
    /// by a VMM without a balloon device; absent in plans from older
    /// companions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_target_mib: Option<u64>,
    /// Guest memory to pre-fault, if any.
    #[serde(default)]
    pub prefault: Option<PrefaultPlan>,
    /// Whether (and how finely) to record this bootstrap's memory touches.
    #[serde(default)]
    pub profile: Option<ProfileRequest>,
    /// The allocator's decision: the forecast demand it reserved in the
    /// host's pool, or which resources fall short and what the VMM must do
    /// then. Absent in plans from companions without a pool (an addition to
    /// protocol 1: older VMMs ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<crate::resources::Allocation>,
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
            ..BootPlan::default()
        }
    }

    /// Sets the pre-fault part.
    pub fn with_prefault(mut self, p: PrefaultPlan) -> Self {
        self.prefault = Some(p);
        self
    }

    /// This plan with a pre-balloon target.
    pub fn with_balloon_target_mib(mut self, mib: u64) -> Self {
        self.balloon_target_mib = Some(mib);
        self
    }

    /// This plan with the allocator's decision.
    pub fn with_allocation(mut self, a: crate::resources::Allocation) -> Self {
        self.allocation = Some(a);
        self
    }

    /// True when the allocator found that the demand does not fit and asks
    /// the VMM not to run the guest.
    pub fn refuses_boot(&self) -> bool {
        self.allocation.as_ref().is_some_and(|a| {
            !a.admitted && a.on_shortfall == crate::resources::ShortfallAction::Refuse
        })
    }

    /// Asks for a profile of this bootstrap.
    pub fn with_profile(mut self, p: ProfileRequest) -> Self {
        self.profile = Some(p);
        self
    }

    /// True when the plan asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.prefault
            .as_ref()
            .is_none_or(|p| p.ranges.is_empty() && p.mode != PrefaultMode::Full)
            && self.profile.is_none()
    }
}

/// When and how the VMM pre-faults guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PrefaultMode {
    /// Nothing is pre-faulted: the guest faults its memory in itself.
    #[default]
    Lazy,
    /// The planned ranges are populated before the vCPUs start.
    Before,
    /// A prefetch thread populates the planned ranges in predicted
    /// first-touch order while the guest boots, and extends to the next
    /// likely chunks when the guest touches memory outside the plan.
    Concurrent,
    /// All of guest RAM is populated before the vCPUs start (like QEMU's
    /// `-mem-prealloc`); the ranges are ignored.
    Full,
}

impl PrefaultMode {
    /// The mode's name as on the wire.
    pub fn name(self) -> &'static str {
        match self {
            PrefaultMode::Lazy => "lazy",
            PrefaultMode::Before => "before",
            PrefaultMode::Concurrent => "concurrent",
            PrefaultMode::Full => "full",
        }
    }
}

/// Guest memory to pre-fault, in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PrefaultPlan {
    /// How.
    pub mode: PrefaultMode,
    /// Ranges to populate, in predicted first-touch order.
    pub ranges: Vec<GuestRange>,
    /// Further ranges, most likely first, that the prefetch thread takes on
    /// when the guest touches memory outside `ranges` (concurrent mode).
    #[serde(default)]
    pub extend: Vec<GuestRange>,
    /// Ask for transparent huge pages on the guest mapping first.
    #[serde(default)]
    pub hugepages: bool,
    /// Concurrent mode: the share (percent) of the planned bytes populated
    /// before the vCPUs start, so the guest's first touches find memory
    /// ready and the prefetch thread starts ahead of it.
    #[serde(default = "default_head_start")]
    pub head_start_pct: u32,
}

fn default_head_start() -> u32 {
    25
}

impl PrefaultPlan {
    /// A plan of `mode` over `ranges`.
    pub fn new(mode: PrefaultMode, ranges: Vec<GuestRange>) -> Self {
        PrefaultPlan {
            mode,
            ranges,
            extend: Vec::new(),
            hugepages: false,
            head_start_pct: default_head_start(),
        }
    }

    /// Bytes the planned ranges cover.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// The companion asks the VMM to record which guest memory chunks the
/// bootstrap writes, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileRequest {
    /// Chunk size in bytes (a power of two, at least 4096).
    pub chunk_size: u64,
    /// How often to read the dirty log, in milliseconds.
    pub interval_ms: u64,
}

impl Default for ProfileRequest {
    fn default() -> Self {
        ProfileRequest {
            chunk_size: 2 << 20,
            interval_ms: 10,
        }
    }
}

/// Chunks first written within one interval of a bootstrap.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TouchWindow {
    /// Milliseconds from the start request to the end of this interval.
    pub at_ms: f64,
    /// Runs of consecutive chunk indices, as `[first, count]`.
    pub runs: Vec<[u64; 2]>,
}

/// Which chunks of guest memory a bootstrap wrote, and when (KVM dirty log).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BootProfile {
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// First writes, interval by interval, in time order.
    pub windows: Vec<TouchWindow>,
}

impl BootProfile {
    /// An empty profile.
    pub fn new(chunk_size: u64, ram_bytes: u64) -> Self {
        BootProfile {
            chunk_size,
            ram_bytes,
            windows: Vec::new(),
        }
    }

    /// Every touched chunk with the time of its window, in time order.
    pub fn touches(&self) -> impl Iterator<Item = (u64, f64)> + '_ {
        self.windows.iter().flat_map(|w| {
            w.runs.iter().flat_map(move |&[first, count]| {
                (first..first.saturating_add(count)).map(move |c| (c, w.at_ms))
            })
        })
    }

    /// Number of touched chunks.
    pub fn touched_chunks(&self) -> u64 {
        self.windows
            .iter()
            .flat_map(|w| w.runs.iter())
            .map(|r| r[1])
            .sum()
    }
}

/// What applying the pre-fault plan did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PrefaultReport {
    /// The mode used.
    pub mode: PrefaultMode,
    /// Bytes populated (planned and extended).
    pub bytes: u64,
    /// Bytes populated beyond the plan because the guest strayed from it.
    pub extended_bytes: u64,
    /// Milliseconds spent populating.
    pub ms: f64,
    /// Why the plan was abandoned for lazy faulting, if it was.
    pub rolled_back: Option<String>,
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
    /// Guest RAM resident in host memory at ready, in KiB.
    #[serde(default)]
    pub guest_resident_kib: u64,
    /// Whether a non-empty plan was applied (false: none, or rolled back).
    pub plan_applied: bool,
    /// What pre-faulting did, if the plan asked for it.
    #[serde(default)]
    pub prefault: Option<PrefaultReport>,
    /// The memory profile, if the plan asked for one.
    #[serde(default)]
    pub profile: Option<BootProfile>,
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
    /// Answer to a `balloon` event: move the balloon to this many MiB.
    BalloonTarget {
        /// The new balloon target, in MiB.
        target_mib: u64,
        /// Predicted growth: make up to this many MiB of what the guest
        /// deflates resident as it deflates them, before its first touch
        /// (0, and absent on the wire, for none; older VMMs ignore it).
        #[serde(default, skip_serializing_if = "is_zero")]
        prefault_mib: u64,
    },
    /// Interrupt this VM (answer to a `balloon` event, only to a VMM that
    /// announced [`crate::proto::FEATURE_INTERRUPT`]): pause it, save its
    /// state (or just stop it, when it is configured to cold-boot on
    /// restart), send `interrupted`, and exit. See [`crate::proto`].
    Interrupt {
        /// Why (for logs).
        reason: String,
    },
    /// Live-migrate this VM (answer to a `poll` or `balloon` event, only to
    /// a VMM that announced [`crate::proto::FEATURE_MIGRATE`]): pre-copy to
    /// `to`, pause for at most about `downtime_ms`, and stop here once the
    /// destination runs it; on any failure the VM runs on here. The VMM
    /// reports `migrate` events (started, then completed or aborted).
    Migrate {
        /// The destination labvm's migration address, `HOST:PORT`.
        to: String,
        /// The downtime budget, in milliseconds.
        downtime_ms: u64,
        /// Why (for logs).
        reason: String,
    },
    /// Answer to a `before-boot` event (only to a VMM that announced
    /// [`crate::proto::FEATURE_INTERRUPT`]): the host cannot take this VM
    /// now; do not start it, ask again with `before-boot` after
    /// `retry_after_ms`.
    Defer {
        /// Why (for logs).
        reason: String,
        /// When to ask again, in milliseconds.
        retry_after_ms: u64,
        /// Memory the host lacks for this VM, in MiB.
        missing_mib: u64,
    },
    /// The companion refuses the event and changed nothing (e.g. an event
    /// of a VM it never saw boot); the connection stays open.
    Rejected {
        /// Why.
        reason: String,
    },
}

impl HookReply {
    /// The plan in this reply, or the empty plan.
    pub fn into_plan(self) -> BootPlan {
        match self {
            HookReply::Plan(p) => p,
            HookReply::Ack
            | HookReply::BalloonTarget { .. }
            | HookReply::Interrupt { .. }
            | HookReply::Defer { .. }
            | HookReply::Migrate { .. }
            | HookReply::Rejected { .. } => BootPlan::empty(),
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

/// A balloon's state as the VMM sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BalloonStatus {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The balloon size the guest is asked for, in MiB.
    pub target_mib: u64,
    /// The balloon size the guest reports (its `actual`), in MiB.
    pub actual_mib: u64,
    /// Whether the guest driver has set the device up (DRIVER_OK).
    pub driver_ok: bool,
    /// Pages given back to the host by inflation so far.
    pub inflated_pages: u64,
    /// Pages the guest took back by deflation so far.
    pub deflated_pages: u64,
    /// Deflated pages the host made resident ahead of the guest (the
    /// `prefault_mib` of a balloon target) so far.
    #[serde(default)]
    pub prefaulted_pages: u64,
    /// Pages given back through free page reporting so far.
    pub reported_pages: u64,
    /// The guest's latest memory statistics (virtio-balloon stats tags by
    /// name, e.g. `free-memory`, `total-memory`, `available-memory`, in bytes).
    #[serde(default)]
    pub guest_stats: Vec<(String, u64)>,
    /// How many statistics updates the guest has sent.
    pub stats_updates: u64,
    /// Whether the guest currently ignores its target (see `BalloonUnresponsive`).
    pub unresponsive: bool,
    /// Whether the guest is below its target because it took pages back
    /// under memory pressure (`DEFLATE_ON_OOM`, allowed by the spec).
    #[serde(default)]
    pub deflated_on_oom: bool,
    /// The VM's run status (what a VMM without a balloon sends as
    /// [`EventKind::Poll`]); absent from older VMMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunStatus>,
}

impl BalloonStatus {
    /// A status for a balloon of a guest with `memory_mib` MiB.
    pub fn new(memory_mib: u64) -> Self {
        BalloonStatus {
            memory_mib,
            ..BalloonStatus::default()
        }
    }

    /// The value of one guest statistic, by name.
    pub fn guest_stat(&self, name: &str) -> Option<u64> {
        self.guest_stats
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
