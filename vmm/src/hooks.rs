//! Reporting a lab VM's lifecycle to the companion through `vmm-hooks`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use vmm_hooks::{
    BootPlan, BootReport, Event, EventKind, GuestRange, HookReply, LifecycleHook, StopStatus,
    VmIdentity, VmSpec,
};

use crate::vm::{LabVm, RunObserver, RunReport, StopReason};
use crate::{VmmError, guest};

/// The VMM's name and version, as sent in `hello` and in `created`.
pub const VMM_NAME: &str = concat!("labvm ", env!("CARGO_PKG_VERSION"));

/// The identity of a lab VM: the image is the guest program, the bootstrap
/// package is the workload with its parameters (or trace) and the VM shape.
pub fn lab_identity(vm_id: &str, vm: &LabVm) -> VmIdentity {
    let c = vm.config();
    let mut pkg = Sha256::new();
    pkg.update(c.workload.identity());
    pkg.update(c.ram_mib.to_le_bytes());
    pkg.update(c.vcpus.to_le_bytes());
    VmIdentity {
        vm_id: vm_id.to_string(),
        image_digest: hex(&Sha256::digest(guest::PROGRAM)),
        package_digest: hex(&pkg.finalize()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends a lab VM's events through a [`LifecycleHook`], in order, and
/// remembers the plan the companion returned.
pub struct HookReporter<'a> {
    hook: &'a mut dyn LifecycleHook,
    identity: VmIdentity,
    seq: u64,
    plan: Option<BootPlan>,
    stop: Option<&'a dyn Fn() -> bool>,
}

impl std::fmt::Debug for HookReporter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookReporter")
            .field("identity", &self.identity)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl<'a> HookReporter<'a> {
    /// A reporter for the VM with this identity.
    pub fn new(hook: &'a mut dyn LifecycleHook, identity: VmIdentity) -> Self {
        HookReporter {
            hook,
            identity,
            seq: 0,
            plan: None,
            stop: None,
        }
    }

    /// Stops the run when `stop` returns true (checked about every 100 ms).
    pub fn with_stop(mut self, stop: &'a dyn Fn() -> bool) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The plan received before boot, if any.
    pub fn plan(&self) -> Option<&BootPlan> {
        self.plan.as_ref()
    }

    /// Sends one event.
    pub fn send(&mut self, kind: EventKind) -> HookReply {
        let event = Event {
            vm: self.identity.clone(),
            seq: self.seq,
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            kind,
        };
        self.seq += 1;
        self.hook.on_event(&event)
    }

    /// Sends `created` for a VM about to run.
    pub fn created(&mut self, vm: &LabVm) {
        let c = vm.config();
        self.send(EventKind::Created {
            spec: VmSpec {
                vcpus: c.vcpus,
                memory_mib: c.ram_mib,
                vmm: VMM_NAME.into(),
                priority: 0,
                interruptible: false,
            },
        });
    }

    /// Sends `stopped` with the run's outcome.
    pub fn stopped(&mut self, result: &Result<RunReport, VmmError>) {
        let status = match result {
            Ok(r) => match r.stop {
                StopReason::Exited(status) => StopStatus::Exited { status },
                StopReason::Stopped => StopStatus::Stopped,
            },
            Err(e) => StopStatus::Failed {
                reason: vmm_hooks::error_chain(e),
            },
        };
        self.send(EventKind::Stopped { status });
    }
}

impl RunObserver for HookReporter<'_> {
    fn before_boot(&mut self, vm: &LabVm, vcpu_tids: &[i32]) -> BootPlan {
        let plan = self
            .send(EventKind::BeforeBoot {
                vcpu_tids: vcpu_tids.to_vec(),
                ram: GuestRange {
                    start: 0,
                    len: vm.config().ram_mib << 20,
                },
            })
            .into_plan();
        if !plan.made_by.is_empty() {
            tracing::info!(made_by = plan.made_by, "boot plan received");
        }
        self.plan = Some(plan.clone());
        plan
    }

    fn ready(&mut self, elapsed: Duration, report: &BootReport) {
        self.send(EventKind::Ready {
            time_to_ready_ms: elapsed.as_secs_f64() * 1e3,
        });
        self.send(EventKind::BootReport(report.clone()));
    }

    fn should_stop(&mut self) -> bool {
        self.stop.is_some_and(|f| f())
    }
}
