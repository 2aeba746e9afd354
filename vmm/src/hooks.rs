//! Reporting a lab VM's lifecycle to the companion through `vmm-hooks`.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use balloon::BalloonHandle;

use sha2::{Digest, Sha256};
use vmm_hooks::{
    Admission, BalloonStatus, BootPlan, BootReport, Event, EventKind, GuestRange, HookReply,
    LifecycleHook, MigrateOutcome, MigratePhase, RunStatus, StopStatus, VmIdentity, VmSpec,
};

use crate::migrate::MigrationOrder;
use crate::snapshot::{self, SaveReport};
use crate::vm::{LabVm, RunObserver, RunReport, StopReason, VcpuControl};
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
    balloon: Option<BalloonPoll>,
    admission: Admission,
    admission_limit: Duration,
    admission_waited: Duration,
    on_interrupt: Option<OnInterrupt>,
    interrupt_requested: Option<String>,
    interrupted: Option<Interruption>,
    restored: bool,
    run_poll: Option<RunPoll>,
    migrate_requested: Option<MigrationOrder>,
}

/// Run status to the companion (`poll` events, or `run` in `balloon`
/// events) and its migration orders.
#[derive(Debug)]
struct RunPoll {
    every: Duration,
    /// The last `poll` sent, or (with a balloon) the last refresh of
    /// `status`.
    last: Option<Instant>,
    dirty: DirtySampler,
    /// With a balloon: the run status its balloon events carry.
    status: Option<RunStatus>,
}

/// Measures the guest's dirty rate now and then: dirty logging on for a
/// short window, the pages written counted, logging off again (logging
/// costs a write fault per page written in the window, so it is brief).
#[derive(Debug)]
struct DirtySampler {
    /// How often (`None`: never).
    every: Option<Duration>,
    window: Duration,
    state: SamplerState,
    rate: Option<f64>,
}

#[derive(Clone, Copy, Debug)]
enum SamplerState {
    /// Waiting for the VM to be ready.
    NotReady,
    /// The next window opens at this time.
    Idle(Instant),
    /// Logging since this time.
    Sampling(Instant),
}

impl DirtySampler {
    /// One step on the controller thread.
    fn step(&mut self, vm: &LabVm, ready: bool, now: Instant) {
        let Some(every) = self.every else {
            return;
        };
        match self.state {
            SamplerState::NotReady if ready => self.state = SamplerState::Idle(now + every),
            SamplerState::Idle(at) if now >= at => {
                // The first read clears what logging may have collected
                // before (a boot profile's window).
                let on = vm
                    .set_dirty_logging(true)
                    .and_then(|()| vm.take_dirty_log().map(drop));
                match on {
                    Ok(()) => self.state = SamplerState::Sampling(now),
                    Err(e) => self.give_up(vm, &e),
                }
            }
            SamplerState::Sampling(since)
                if now.saturating_duration_since(since) >= self.window =>
            {
                let bitmap = vm.take_dirty_log();
                let elapsed = now.saturating_duration_since(since).as_secs_f64();
                if let Err(e) = vm.set_dirty_logging(false) {
                    self.give_up(vm, &e);
                    return;
                }
                match bitmap {
                    Ok(words) => {
                        let pages: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
                        #[allow(clippy::cast_precision_loss)]
                        let rate = pages as f64 / elapsed.max(1e-3);
                        self.rate = Some(rate);
                        self.state = SamplerState::Idle(now + every);
                    }
                    Err(e) => self.give_up(vm, &e),
                }
            }
            _ => {}
        }
    }

    fn give_up(&mut self, vm: &LabVm, e: &VmmError) {
        let _ = vm.set_dirty_logging(false);
        tracing::warn!(
            "cannot measure the dirty rate; not trying again: {}",
            vmm_hooks::error_chain(e)
        );
        self.every = None;
    }
}

/// What a lab VM does when the companion interrupts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Pause, save its state to this file (restart: `labvm --restore`).
    Save(PathBuf),
    /// Stop without saving (restart: a cold boot).
    Stop,
}

/// A lab VM's interruption, as it happened.
#[derive(Clone, Debug)]
pub struct Interruption {
    /// Why the companion interrupted it.
    pub reason: String,
    /// The save, when the VM was saved.
    pub save: Option<SaveReport>,
}

/// labvm's exit status when the companion interrupted the VM (its state
/// saved, or stopped when configured to cold-boot): `EX_TEMPFAIL`.
pub const EXIT_INTERRUPTED: u8 = 75;

/// Balloon control over the hooks: a status event every `every`, whose
/// reply may set a new target.
#[derive(Debug)]
struct BalloonPoll {
    handle: BalloonHandle,
    every: Duration,
    last: Option<Instant>,
    told_unresponsive: bool,
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
            balloon: None,
            admission: Admission::default(),
            admission_limit: Duration::from_secs(600),
            admission_waited: Duration::ZERO,
            on_interrupt: None,
            interrupt_requested: None,
            interrupted: None,
            restored: false,
            run_poll: None,
            migrate_requested: None,
        }
    }

    /// Reports the VM's run status every `every` (in `balloon` events when
    /// it has a balloon, else `poll` events), measuring its dirty rate for
    /// `window` every `sample_every` (`None`: never), and obeys the
    /// companion's `migrate` replies (through a
    /// [`crate::MigrationSource::on_request`] wrapping this reporter).
    /// Announce [`vmm_hooks::proto::FEATURE_MIGRATE`] in `hello` with it.
    pub fn with_migration(
        mut self,
        every: Duration,
        sample_every: Option<Duration>,
        window: Duration,
    ) -> Self {
        self.run_poll = Some(RunPoll {
            every,
            last: None,
            dirty: DirtySampler {
                every: sample_every,
                window,
                state: SamplerState::NotReady,
                rate: None,
            },
            status: None,
        });
        self
    }

    /// Updates the run status (and the dirty-rate sampler); sends `poll`
    /// when it is due and the VM has no balloon (whose events carry it).
    fn poll_run(&mut self, vm: &LabVm, ready: bool) {
        let has_balloon = self.balloon.is_some();
        let Some(poll) = self.run_poll.as_mut() else {
            return;
        };
        let now = Instant::now();
        poll.dirty.step(vm, ready, now);
        // Once a poll interval: a `poll` event once the guest is ready, or,
        // with a balloon, the status its next balloon event carries.
        let due = poll
            .last
            .is_none_or(|at| now.saturating_duration_since(at) >= poll.every);
        if !due || !(ready || has_balloon) {
            return;
        }
        poll.last = Some(now);
        let status = RunStatus {
            ram_mib: vm.config().ram_mib,
            resident_mib: crate::sys::process_rss_bytes().unwrap_or(0) >> 20,
            dirty_pages_per_s: poll.dirty.rate,
            migratable: true,
        };
        if has_balloon {
            poll.status = Some(status);
            return;
        }
        let reply = self.send(EventKind::Poll(status));
        self.obey(reply);
    }

    /// Takes a `migrate` order from a reply.
    fn obey(&mut self, reply: HookReply) {
        if let HookReply::Migrate {
            to,
            downtime_ms,
            reason,
        } = reply
        {
            if self.run_poll.is_none() {
                tracing::warn!(
                    reason,
                    "the companion ordered a migration this VM cannot do; ignored"
                );
                return;
            }
            tracing::info!(
                to,
                downtime_ms,
                reason,
                "the companion orders this VM migrated"
            );
            self.migrate_requested = Some(MigrationOrder {
                to,
                downtime: Duration::from_millis(downtime_ms.max(1)),
            });
        }
    }

    /// The VM was restored from a saved state (it resumes instead of
    /// booting): `restarted` is sent instead of `ready` and `boot-report`.
    pub fn restored(mut self) -> Self {
        self.restored = true;
        self
    }

    /// Sends this admission (priority, interruptible, restart) in
    /// before-boot; while the companion defers the boot, asks again as it
    /// says, for at most `limit` (then boots anyway, with a warning).
    pub fn with_admission(mut self, admission: Admission, limit: Duration) -> Self {
        self.admission = admission;
        self.admission_limit = limit;
        self
    }

    /// What to do when the companion interrupts this VM (without this, an
    /// `interrupt` reply is ignored with a warning).
    pub fn with_interrupt(mut self, on: OnInterrupt) -> Self {
        self.on_interrupt = Some(on);
        self
    }

    /// The interruption, once the VM was interrupted.
    pub fn interrupted(&self) -> Option<&Interruption> {
        self.interrupted.as_ref()
    }

    /// How long the companion kept the VM waiting before boot.
    pub fn admission_waited(&self) -> Duration {
        self.admission_waited
    }

    /// Reports the balloon to the companion every `every` (a `balloon`
    /// event) and applies the target it answers with; reports a guest that
    /// ignores its target (`balloon-unresponsive`, once per episode). (A
    /// boot plan's pre-balloon target is applied by the VM itself, whatever
    /// the observer.)
    pub fn with_balloon(mut self, handle: BalloonHandle, every: Duration) -> Self {
        self.balloon = Some(BalloonPoll {
            handle,
            every,
            last: None,
            told_unresponsive: false,
        });
        self
    }

    /// The balloon's status as the hooks carry it.
    pub fn balloon_status(handle: &BalloonHandle) -> BalloonStatus {
        let r = handle.report();
        let mut s = BalloonStatus::new(handle.memory_mib());
        s.target_mib = r.target_mib();
        s.actual_mib = r.actual_mib();
        s.driver_ok = r.driver_ok;
        s.inflated_pages = r.counters.inflated_pages;
        s.deflated_pages = r.counters.deflated_pages;
        s.prefaulted_pages = r.counters.prefaulted_pages;
        s.reported_pages = r.counters.reported_pages;
        s.stats_updates = r.counters.stats_updates;
        s.guest_stats = r.stats;
        s.unresponsive = r.unresponsive;
        s.deflated_on_oom = r.deflated_on_oom;
        s
    }

    fn poll_balloon(&mut self) {
        let Some(poll) = self.balloon.as_mut() else {
            return;
        };
        let now = Instant::now();
        if poll
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < poll.every)
        {
            return;
        }
        poll.last = Some(now);
        let handle = poll.handle.clone();
        let stalled_ms = handle.report().stalled_ms;
        let mut status = Self::balloon_status(&handle);
        status.run = self.run_poll.as_ref().and_then(|p| p.status.clone());
        let unresponsive = status.unresponsive;
        let (target_mib, actual_mib) = (status.target_mib, status.actual_mib);
        let reply = self.send(EventKind::Balloon(status));
        match reply {
            HookReply::BalloonTarget {
                target_mib: t,
                prefault_mib,
            } => {
                // The budget goes in first: the guest may deflate as soon as
                // it sees the new target.
                handle.prefault_deflated_mib(prefault_mib);
                match handle.set_target_mib(t) {
                    Ok(()) => tracing::debug!(
                        target_mib = t,
                        prefault_mib,
                        "balloon target from the companion"
                    ),
                    Err(e) => {
                        handle.prefault_deflated_mib(0);
                        tracing::warn!("companion's balloon target refused: {e}");
                    }
                }
            }
            HookReply::Interrupt { reason } => {
                tracing::info!(reason, "the companion interrupts this VM");
                self.interrupt_requested = Some(reason);
            }
            other @ HookReply::Migrate { .. } => self.obey(other),
            _ => {}
        }
        let told = self.balloon.as_ref().is_some_and(|p| p.told_unresponsive);
        if unresponsive && !told {
            self.send(EventKind::BalloonUnresponsive {
                target_mib,
                actual_mib,
                stalled_ms,
            });
        }
        if let Some(p) = self.balloon.as_mut() {
            p.told_unresponsive = unresponsive;
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
        let asked = Instant::now();
        let mut deferred = false;
        let plan = loop {
            let reply = self.send(EventKind::BeforeBoot {
                vcpu_tids: vcpu_tids.to_vec(),
                ram: GuestRange {
                    start: 0,
                    len: vm.config().ram_mib << 20,
                },
                admission: self.admission.clone(),
            });
            let HookReply::Defer {
                reason,
                retry_after_ms,
                missing_mib,
            } = reply
            else {
                break reply.into_plan();
            };
            deferred = true;
            if asked.elapsed() >= self.admission_limit {
                tracing::warn!(
                    reason,
                    waited_s = asked.elapsed().as_secs_f64(),
                    "the companion still defers this VM; booting without its admission"
                );
                break BootPlan::empty();
            }
            if self.stop.is_some_and(|f| f()) {
                break BootPlan::empty();
            }
            tracing::info!(
                reason,
                missing_mib,
                retry_after_ms,
                "the companion defers the boot"
            );
            std::thread::sleep(Duration::from_millis(retry_after_ms.clamp(10, 10_000)));
        };
        if deferred {
            self.admission_waited = asked.elapsed();
        }
        if !plan.made_by.is_empty() {
            tracing::info!(made_by = plan.made_by, "boot plan received");
        }
        match &plan.allocation {
            Some(a) if a.admitted => tracing::info!(
                demand = %a.demand,
                by = a.forecast_by,
                "the companion reserved this VM's forecast demand"
            ),
            Some(a) if plan.refuses_boot() => tracing::error!(
                demand = %a.demand,
                by = a.forecast_by,
                "the companion has no room for this VM on this host: {}; refusing to boot (policy: refuse)",
                a.shortfall_text()
            ),
            Some(a) => tracing::warn!(
                demand = %a.demand,
                by = a.forecast_by,
                "the companion has no room for this VM on this host: {}; booting lazily without a reservation (policy: boot-lazily)",
                a.shortfall_text()
            ),
            None => {}
        }
        self.plan = Some(plan.clone());
        plan
    }

    fn ready(&mut self, elapsed: Duration, report: &BootReport) {
        if self.restored {
            // A restored VM did not boot: nothing to measure or learn from.
            self.send(EventKind::Restarted);
            return;
        }
        self.send(EventKind::Ready {
            time_to_ready_ms: elapsed.as_secs_f64() * 1e3,
        });
        self.send(EventKind::BootReport(report.clone()));
        if self.admission.restart {
            // A cold boot that restarts an interrupted VM.
            self.send(EventKind::Restarted);
        }
    }

    fn admission_wait(&self) -> Duration {
        self.admission_waited
    }

    fn should_stop(&mut self) -> bool {
        self.poll_balloon();
        self.stop.is_some_and(|f| f())
    }

    fn take_migration_order(&mut self) -> Option<MigrationOrder> {
        let order = self.migrate_requested.take()?;
        if let Some(p) = self.run_poll.as_mut()
            && let SamplerState::Sampling(_) = p.dirty.state
        {
            // The migration owns dirty logging from here (and turns it off
            // if it fails); the window is abandoned.
            p.dirty.state = SamplerState::Idle(Instant::now() + p.dirty.every.unwrap_or_default());
        }
        Some(order)
    }

    fn migration_phase(&mut self, phase: MigratePhase, to: &str, outcome: Option<MigrateOutcome>) {
        self.send(EventKind::Migrate {
            phase,
            to: Some(to.to_string()),
            outcome,
        });
    }

    fn tick(&mut self, vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        self.poll_run(vm, vcpus.ready());
        let Some(reason) = self.interrupt_requested.take() else {
            return false;
        };
        let save = match &self.on_interrupt {
            None => {
                tracing::warn!(
                    reason,
                    "the companion asked to interrupt a VM that is not interruptible; ignored"
                );
                return false;
            }
            Some(OnInterrupt::Stop) => None,
            Some(OnInterrupt::Save(path)) => {
                match snapshot::save(vm, vcpus, path, Duration::from_secs(30)) {
                    Ok(r) => {
                        tracing::info!(
                            file = %r.path.display(),
                            bytes = r.bytes,
                            pages = r.pages,
                            ms = r.ms,
                            counter = r.counter,
                            "VM paused and saved"
                        );
                        Some(r)
                    }
                    Err(e) => {
                        tracing::error!(
                            "cannot save the VM; it keeps running: {}",
                            vmm_hooks::error_chain(&e)
                        );
                        return false;
                    }
                }
            }
        };
        self.send(EventKind::Interrupted {
            reason: reason.clone(),
        });
        self.interrupted = Some(Interruption { reason, save });
        true
    }
}
