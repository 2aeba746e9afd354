//! The virtio-balloon device in labvm, driven by the lab guest's own
//! virtio-balloon driver on real KVM. Each test prints `SKIP` and returns
//! when /dev/kvm is absent, unless `PRESCIENT_REQUIRE=kvm` makes that a
//! failure. Residency is read with mincore on the VM's own mapping, so
//! tests running beside each other in this process do not disturb it; the
//! process-RSS test runs labvm as a child (`hw_kvm_balloon_rss.rs`).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test arithmetic on small sizes

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use balloon::{BALLOON_PAGE, BalloonHandle, BalloonState, resident_pages};
use labvm::testing::kvm_or_skip;
use labvm::{
    BalloonConfig, HookReporter, LabVm, LabVmConfig, RunObserver, StopReason, Workload, stamp_value,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_hooks::{BootPlan, BootReport, Event, EventKind, HookReply, LifecycleHook, VmIdentity};

const MIB: u64 = 1 << 20;
const PAGES_PER_MIB: u32 = (MIB / BALLOON_PAGE) as u32;
/// Upper bound on any run: a test that does not reach its end state fails
/// by its assertions, it does not hang.
const LIMIT: Duration = Duration::from_secs(90);

/// Runs `step` every controller tick after ready until it returns true.
struct Script<F> {
    handle: BalloonHandle,
    ready: bool,
    done: bool,
    step: F,
}

impl<F: FnMut(&BalloonHandle) -> bool> RunObserver for Script<F> {
    fn ready(&mut self, _: Duration, _: &BootReport) {
        self.ready = true;
    }
    fn should_stop(&mut self) -> bool {
        if self.ready && !self.done {
            self.done = (self.step)(&self.handle);
        }
        self.done
    }
}

fn balloon_vm(ram_mib: u64, workload: Workload, initial_target_mib: u64) -> LabVm {
    let mut config = LabVmConfig::new(ram_mib, workload);
    config.run_for = Some(LIMIT);
    config.balloon = Some(BalloonConfig {
        initial_target_mib,
        stats_interval: Duration::from_millis(100),
        grace: Duration::from_millis(500),
    });
    LabVm::create(config, Instant::now()).unwrap()
}

fn run_script<F: FnMut(&BalloonHandle) -> bool>(vm: &mut LabVm, step: F) -> BalloonHandle {
    let handle = vm.balloon().unwrap();
    let mut script = Script {
        handle: handle.clone(),
        ready: false,
        done: false,
        step,
    };
    let report = vm.run(&mut script).unwrap();
    assert_eq!(report.stop, StopReason::Stopped);
    assert!(script.done, "the script did not finish within {LIMIT:?}");
    handle
}

fn resident_count(h: &BalloonHandle, from: u64, to: u64) -> usize {
    resident_pages(h.memory(), from, to - from)
        .unwrap()
        .into_iter()
        .filter(|&r| r)
        .count()
}

#[test]
fn hw_kvm_balloon_inflate_returns_pages_and_deflate_lets_guest_use_them_again() {
    if !kvm_or_skip("hw_kvm_balloon_inflate_returns_pages_and_deflate_lets_guest_use_them_again") {
        return;
    }
    let ram = 256 * MIB;
    let mut vm = balloon_vm(256, Workload::from_spec("balloon:200:32", 0).unwrap(), 0);
    let stamp = vm.config().stamp;
    let mut phase = 0;
    let mut resident_before = 0;
    let mut resident_inflated = usize::MAX;
    let handle = run_script(&mut vm, |h| {
        let r = h.report();
        match phase {
            0 => {
                // Touched pages of the top half are resident before inflation.
                resident_before = resident_count(h, 128 * MIB, 204 * MIB);
                h.set_target_mib(128).unwrap();
                phase = 1;
            }
            1 if r.actual_pages == 128 * PAGES_PER_MIB => {
                resident_inflated = resident_count(h, 128 * MIB, ram);
                h.set_target_mib(0).unwrap();
                phase = 2;
            }
            2 if r.actual_pages == 0 => return true,
            _ => {}
        }
        false
    });
    assert_eq!(resident_before, 76 * MIB as usize / 4096);
    assert_eq!(resident_inflated, 0, "inflated pages still resident");
    let c = handle.report().counters;
    assert_eq!(c.inflated_pages, 128 * MIB / BALLOON_PAGE);
    assert_eq!(c.deflated_pages, 128 * MIB / BALLOON_PAGE);
    assert_eq!(c.skipped_chains + c.skipped_pages, 0);
    // After deflation the guest wrote its stamp into every page it got back.
    let mem = handle.memory();
    let mut gpa = 128 * MIB;
    while gpa < ram {
        let v: u64 = mem.read_obj(GuestAddress(gpa)).unwrap();
        assert_eq!(v, stamp_value(gpa, stamp), "deflated page {gpa:#x}");
        gpa += BALLOON_PAGE;
    }
    assert_eq!(
        resident_count(&handle, 128 * MIB, ram),
        (128 * MIB / 4096) as usize
    );
}

#[test]
fn hw_kvm_balloon_statistics_arrive_and_track_the_balloon() {
    if !kvm_or_skip("hw_kvm_balloon_statistics_arrive_and_track_the_balloon") {
        return;
    }
    let mut vm = balloon_vm(128, Workload::from_spec("balloon:64:16", 0).unwrap(), 32);
    let mut seen = 0;
    let handle = run_script(&mut vm, |h| {
        let r = h.report();
        // Wait for a few answered statistics requests after reaching the target.
        if r.actual_pages == 32 * PAGES_PER_MIB {
            if seen == 0 {
                seen = r.counters.stats_updates;
            }
            return r.counters.stats_updates >= seen + 2;
        }
        false
    });
    let r = handle.report();
    let stat = |name: &str| r.stats.iter().find(|(n, _)| n == name).map(|&(_, v)| v);
    assert_eq!(stat("total-memory"), Some((128 - 32) * MIB));
    // Pool: RAM minus 2 MiB lists and 2 MiB driver area; 16 MiB kept.
    assert_eq!(stat("free-memory"), Some((128 - 4 - 16 - 32) * MIB));
    assert_eq!(stat("available-memory"), stat("free-memory"));
    assert!(r.counters.stats_updates >= 3, "{:?}", r.counters);
}

#[test]
fn hw_kvm_balloon_pre_balloon_keeps_forecast_unused_memory_off_the_host() {
    if !kvm_or_skip("hw_kvm_balloon_pre_balloon_keeps_forecast_unused_memory_off_the_host") {
        return;
    }
    // The guest touches all the memory it has; 96 MiB were ballooned
    // before it ran, so they were never committed.
    let mut vm = balloon_vm(256, Workload::from_spec("balloon:252:32", 0).unwrap(), 96);
    let handle = run_script(&mut vm, |_| true);
    let r = handle.report();
    assert_eq!(r.actual_pages, 96 * PAGES_PER_MIB);
    assert_eq!(resident_count(&handle, 160 * MIB, 256 * MIB), 0);
    assert_eq!(
        resident_count(&handle, 4 * MIB, 160 * MIB),
        (156 * MIB / 4096) as usize
    );
}

#[test]
fn hw_kvm_balloon_free_page_reporting_returns_free_pages() {
    if !kvm_or_skip("hw_kvm_balloon_free_page_reporting_returns_free_pages") {
        return;
    }
    let mut vm = balloon_vm(
        256,
        Workload::from_spec("balloon:200:60:report", 0).unwrap(),
        0,
    );
    let handle = run_script(&mut vm, |h| h.report().counters.reported_pages > 0);
    // In use: [4, 64) MiB; free and reported: [64, 256) MiB in 2 MiB blocks.
    let r = handle.report();
    assert_eq!(r.counters.reported_pages, 192 * MIB / BALLOON_PAGE);
    assert_eq!(resident_count(&handle, 64 * MIB, 256 * MIB), 0);
    assert_eq!(
        resident_count(&handle, 4 * MIB, 64 * MIB),
        (60 * MIB / 4096) as usize
    );
}

/// A companion linked in-process: records events, answers acks.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Event>>>);

impl LifecycleHook for Recorder {
    fn on_event(&mut self, event: &Event) -> HookReply {
        self.0.lock().unwrap().push(event.clone());
        HookReply::Ack
    }
}

/// Runs the hook reporter and stops once `done` holds for the recorded events.
struct Reporting<'a, 'b> {
    reporter: &'b mut HookReporter<'a>,
    events: Recorder,
    done: fn(&[Event]) -> bool,
}

impl RunObserver for Reporting<'_, '_> {
    fn before_boot(&mut self, vm: &LabVm, tids: &[i32]) -> BootPlan {
        self.reporter.before_boot(vm, tids)
    }
    fn ready(&mut self, e: Duration, r: &BootReport) {
        self.reporter.ready(e, r);
    }
    fn should_stop(&mut self) -> bool {
        let _ = self.reporter.should_stop();
        (self.done)(&self.events.0.lock().unwrap())
    }
}

#[test]
fn hw_kvm_balloon_guest_ignoring_target_is_detected_and_reported() {
    if !kvm_or_skip("hw_kvm_balloon_guest_ignoring_target_is_detected_and_reported") {
        return;
    }
    let mut vm = balloon_vm(
        128,
        Workload::from_spec("balloon:64:16:ignore", 0).unwrap(),
        64,
    );
    let handle = vm.balloon().unwrap();
    let events = Recorder::default();
    let mut hook = events.clone();
    let identity = VmIdentity {
        vm_id: "ignorer".into(),
        image_digest: "i".into(),
        package_digest: "p".into(),
    };
    let mut reporter = HookReporter::new(&mut hook, identity)
        .with_balloon(handle.clone(), Duration::from_millis(100));
    let mut obs = Reporting {
        reporter: &mut reporter,
        events: events.clone(),
        done: |ev| {
            ev.iter()
                .any(|e| matches!(e.kind, EventKind::BalloonUnresponsive { .. }))
        },
    };
    let report = vm.run(&mut obs).unwrap();
    assert_eq!(report.stop, StopReason::Stopped);
    let ev = events.0.lock().unwrap();
    let unresponsive: Vec<_> = ev
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::BalloonUnresponsive {
                target_mib,
                actual_mib,
                stalled_ms,
            } => Some((*target_mib, *actual_mib, *stalled_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(unresponsive.len(), 1, "{unresponsive:?}");
    let (target, actual, stalled) = unresponsive[0];
    assert_eq!((target, actual), (64, 0));
    assert!(
        stalled >= 500,
        "reported after {stalled} ms, grace is 500 ms"
    );
    // The periodic status says so too, and the driver did set up the device.
    let last = ev
        .iter()
        .rev()
        .find_map(|e| match &e.kind {
            EventKind::Balloon(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert!(last.driver_ok);
    assert_eq!((last.target_mib, last.actual_mib), (64, 0));
    assert!(handle.report().unresponsive);
}

#[test]
fn hw_kvm_balloon_state_round_trips_and_restored_device_keeps_serving() {
    if !kvm_or_skip("hw_kvm_balloon_state_round_trips_and_restored_device_keeps_serving") {
        return;
    }
    let mut vm = balloon_vm(128, Workload::from_spec("balloon:64:16", 0).unwrap(), 48);
    let handle = run_script(&mut vm, |h| {
        let r = h.report();
        r.actual_pages == 48 * PAGES_PER_MIB && r.counters.stats_updates >= 2
    });
    let state = handle.state();
    assert!(state.activated);
    assert_eq!(state.actual, 48 * PAGES_PER_MIB);
    let json = serde_json::to_string(&state).unwrap();
    let back: BalloonState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    let restored = BalloonHandle::from_state(&back, Arc::clone(handle.memory()), 500).unwrap();
    assert_eq!(restored.state(), state);
    // The restored device still holds the guest's statistics buffer and can
    // hand it back on the queues the guest set up.
    assert_eq!(restored.request_stats(), state.stats_head.is_some());
    // A state from another version is refused.
    let mut other = state.clone();
    other.version += 1;
    assert!(BalloonHandle::from_state(&other, Arc::clone(handle.memory()), 500).is_err());
}

#[test]
fn hw_kvm_balloon_lazy_deflate_frees_pages_without_faulting_them_in() {
    if !kvm_or_skip("hw_kvm_balloon_lazy_deflate_frees_pages_without_faulting_them_in") {
        return;
    }
    let mut vm = balloon_vm(
        128,
        Workload::from_spec("balloon:124:16:lazy", 0).unwrap(),
        64,
    );
    let mut asked = false;
    let handle = run_script(&mut vm, |h| {
        if !asked {
            h.set_target_mib(0).unwrap();
            asked = true;
        }
        h.report().actual_pages == 0
    });
    let c = handle.report().counters;
    assert_eq!(c.inflated_pages, 64 * MIB / BALLOON_PAGE);
    assert_eq!(c.deflated_pages, 64 * MIB / BALLOON_PAGE);
    // Back in the guest's free pool, never touched: still not on the host.
    assert_eq!(resident_count(&handle, 64 * MIB, 128 * MIB), 0);
}

#[test]
fn hw_kvm_balloon_deflate_on_oom_guest_takes_balloon_pages_under_pressure() {
    if !kvm_or_skip("hw_kvm_balloon_deflate_on_oom_guest_takes_balloon_pages_under_pressure") {
        return;
    }
    // Pool: 124 MiB; 16 in use, 96 pre-ballooned, 12 free. 200 ms after
    // ready the guest needs 64 MiB more: 12 free + 52 from the balloon.
    let mut vm = balloon_vm(
        128,
        Workload::from_spec("balloon:124:16:grow=64", 0).unwrap(),
        96,
    );
    let stamp = vm.config().stamp;
    let mut seen = None;
    let handle = run_script(&mut vm, |h| {
        let r = h.report();
        let free = r
            .stats
            .iter()
            .find(|(n, _)| n == "free-memory")
            .map(|&(_, v)| v);
        if r.actual_pages == 44 * PAGES_PER_MIB && free == Some(0) && seen.is_none() {
            seen = Some(r.counters.stats_updates);
        }
        // Run on for 10 more statistics requests (100 ms apart: past the
        // 500 ms grace period) before looking at the monitor.
        seen.is_some_and(|s| r.counters.stats_updates >= s + 10)
    });
    let r = handle.report();
    assert_eq!(r.target_pages, 96 * PAGES_PER_MIB, "the target stays");
    assert!(r.deflated_on_oom, "{r:?}");
    assert!(
        !r.unresponsive,
        "a DEFLATE_ON_OOM guest below its target is not ignoring it"
    );
    assert_eq!(r.counters.deflated_pages, 52 * MIB / BALLOON_PAGE);
    // The grown working set, [20, 84) MiB, holds the guest's stamps.
    let mem = handle.memory();
    for gpa in (20 * MIB..84 * MIB).step_by(BALLOON_PAGE as usize) {
        let v: u64 = mem.read_obj(GuestAddress(gpa)).unwrap();
        assert_eq!(v, stamp_value(gpa, stamp), "page {gpa:#x}");
    }
}
