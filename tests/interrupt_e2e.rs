//! The interruption coordinator end to end: a real `prescient serve
//! --capacity-mib 208` and three lab VMs on real KVM, each reporting over
//! its own hooks connection as `labvm` does.
//!
//! * `low` (96 MiB, priority 0, interruptible, the long-running `dirty`
//!   workload whose counter lives in guest memory),
//! * `mid` (96 MiB, priority 5, not interruptible, the balloon workload:
//!   40 MiB free in its pool, so it can give 24 MiB above the headroom),
//! * `high` (128 MiB, priority 10), which does not fit beside them.
//!
//! Expected: `high` is deferred; `mid` is shrunk by 16 MiB first, then
//! `low` is interrupted (paused, saved to a file); `high` boots; `low`'s
//! restart from its file is deferred while `high` runs and gets its
//! pre-calculated reservation once `high` stops; its counter continues.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Server, free_port, scrape};
use labvm::testing::kvm_or_skip;
use labvm::{
    BalloonConfig, HookReporter, Interruption, LabVm, LabVmConfig, OnInterrupt, RunReport,
    StopReason, VMM_NAME, Workload, lab_identity, restore_from_file,
};
use prescient::EventRecord;
use vmm_hooks::{Admission, EventKind, SocketHook, SocketHookConfig};

struct Outcome {
    report: RunReport,
    interrupted: Option<Interruption>,
    waited: Duration,
}

/// Runs `vm` as `id` against the companion at `socket`, on its own thread.
fn run_vm(
    socket: &Path,
    id: &'static str,
    mut vm: LabVm,
    admission: Admission,
    save: Option<PathBuf>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Outcome> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let mut hc = SocketHookConfig::new(&socket, VMM_NAME);
        hc.timeout = Duration::from_secs(5);
        hc.features = vec![vmm_hooks::proto::FEATURE_INTERRUPT.to_string()];
        let mut hook = SocketHook::new(hc);
        let identity = lab_identity(id, &vm);
        let should_stop = move || stop.load(Ordering::SeqCst);
        let restart = admission.restart;
        let mut reporter = HookReporter::new(&mut hook, identity)
            .with_stop(&should_stop)
            .with_admission(admission, Duration::from_secs(120))
            .with_balloon(vm.balloon().unwrap(), Duration::from_millis(100));
        if let Some(path) = save {
            reporter = reporter.with_interrupt(OnInterrupt::Save(path));
        }
        if restart {
            // Every restart in this test is a restore from the saved file.
            reporter = reporter.restored();
        }
        reporter.created(&vm);
        let result = vm.run(&mut reporter);
        let interrupted = reporter.interrupted().cloned();
        let waited = reporter.admission_waited();
        reporter.stopped(&result);
        Outcome {
            report: result.unwrap(),
            interrupted,
            waited,
        }
    })
}

fn balloon_config() -> Option<BalloonConfig> {
    Some(BalloonConfig {
        stats_interval: Duration::from_millis(100),
        ..BalloonConfig::default()
    })
}

fn dirty(mib: u64, safety_s: u64) -> LabVm {
    let mut c = LabVmConfig::new(
        mib,
        Workload::Dirty {
            pages_per_sec: 2000,
            region_mib: 8,
            heartbeat_ms: 20,
        },
    );
    c.balloon = balloon_config();
    c.run_for = Some(Duration::from_secs(safety_s));
    LabVm::create(c, Instant::now()).unwrap()
}

/// Waits (bounded) until the server's event log satisfies `cond`.
fn wait_events(server: &Server, what: &str, cond: impl Fn(&[EventRecord]) -> bool) {
    let t = Instant::now();
    while !cond(&server.events()) {
        assert!(t.elapsed() < Duration::from_secs(60), "never saw: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn of<'a>(events: &'a [EventRecord], id: &str) -> Vec<&'a EventKind> {
    events
        .iter()
        .filter(|r| r.event.vm.vm_id == id)
        .map(|r| &r.event.kind)
        .collect()
}

fn position(events: &[EventRecord], id: &str, f: impl Fn(&EventKind) -> bool) -> usize {
    events
        .iter()
        .position(|r| r.event.vm.vm_id == id && f(&r.event.kind))
        .unwrap_or_else(|| panic!("no such event of {id}"))
}

fn metric(body: &str, kind: &str) -> u64 {
    let key = format!("prescient_interrupt_actions_total{{kind=\"{kind}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn hw_kvm_high_priority_vm_interrupts_low_one_which_restores_and_keeps_counting() {
    if !kvm_or_skip("hw_kvm_high_priority_vm_interrupts_low_one_which_restores_and_keeps_counting")
    {
        return;
    }
    let port = free_port();
    let server = Server::start_args(
        false,
        &[
            "--capacity-mib",
            "208",
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("low.state");
    let never = Arc::new(AtomicBool::new(false));

    // low: interruptible, priority 0. Its safety run time only bounds a
    // broken test; it is interrupted long before.
    let low = run_vm(
        &server.socket,
        "low",
        dirty(96, 120),
        Admission::new(0, true),
        Some(state.clone()),
        Arc::clone(&never),
    );
    wait_events(&server, "low polled", |e| {
        of(e, "low")
            .iter()
            .any(|k| matches!(k, EventKind::Balloon(_)))
    });

    // mid: not interruptible, priority 5, a balloon driver with free memory.
    let mut mc = LabVmConfig::new(96, Workload::from_spec("balloon:64:24", 0).unwrap());
    mc.balloon = balloon_config();
    mc.run_for = Some(Duration::from_secs(120));
    let mid_stop = Arc::new(AtomicBool::new(false));
    let mid = run_vm(
        &server.socket,
        "mid",
        LabVm::create(mc, Instant::now()).unwrap(),
        Admission::new(5, false),
        None,
        Arc::clone(&mid_stop),
    );
    wait_events(&server, "mid's free memory", |e| {
        of(e, "mid").iter().any(|k| {
            matches!(k, EventKind::Balloon(s)
                if s.driver_ok && s.guest_stat("free-memory").is_some_and(|f| f >= 32 << 20))
        })
    });

    // high: priority 10, does not fit beside low and mid.
    let high = run_vm(
        &server.socket,
        "high",
        dirty(128, 2),
        Admission::new(10, false),
        None,
        Arc::clone(&never),
    );

    // low is interrupted: paused, saved, stopped.
    let low = low.join().unwrap();
    let interruption = low.interrupted.expect("low was not interrupted");
    assert!(
        interruption.reason.contains("high"),
        "{}",
        interruption.reason
    );
    let saved = interruption.save.expect("low was not saved");
    assert_eq!(saved.path, state);
    assert!(state.exists());
    assert_eq!(low.report.stop, StopReason::Stopped);
    assert_eq!(saved.counter, low.report.counter);
    let saved_counter = saved.counter.unwrap();
    assert!(saved_counter > 0);

    // low restarts from its file while high still runs or after: it is
    // admitted only once high has stopped, with its reservation.
    let restored = restore_from_file(&state).unwrap();
    assert_eq!(restored.counter, Some(saved_counter));
    let mut vm = restored.vm;
    vm.set_run_for(Some(Duration::from_secs(1)));
    let low2 = run_vm(
        &server.socket,
        "low",
        vm,
        Admission::new(0, true).restarting(),
        Some(state.clone()),
        Arc::clone(&never),
    );

    let high = high.join().unwrap();
    assert!(high.interrupted.is_none());
    assert_eq!(high.report.stop, StopReason::Stopped);
    assert!(high.report.time_to_ready.is_some(), "high never booted");
    assert!(high.waited > Duration::ZERO, "high was never deferred");

    let low2 = low2.join().unwrap();
    assert!(low2.interrupted.is_none());
    assert_eq!(low2.report.stop, StopReason::Stopped);
    // The guest's counter continued from the saved value.
    let end = low2.report.counter.unwrap();
    assert!(end > saved_counter, "{end} after {saved_counter}");
    assert!(low2.report.heartbeats > low.report.heartbeats);

    eprintln!(
        "low saved: counter {saved_counter}, {} bytes, {} pages, {:.1} ms; high waited {:.0} ms; \
         low restored waited {:.0} ms and ended at counter {end}",
        saved.bytes,
        saved.pages,
        saved.ms,
        high.waited.as_secs_f64() * 1e3,
        low2.waited.as_secs_f64() * 1e3
    );
    mid_stop.store(true, Ordering::SeqCst);
    let mid = mid.join().unwrap();
    assert!(mid.interrupted.is_none(), "mid is not interruptible");

    let events = server.events();
    // mid was shrunk by the 16 MiB that interrupting low left short.
    assert!(
        of(&events, "mid")
            .iter()
            .any(|k| matches!(k, EventKind::Balloon(s) if s.target_mib == 16)),
        "mid's balloon never got the 16 MiB target"
    );
    // Only low was interrupted.
    let interrupted: Vec<&str> = events
        .iter()
        .filter(|r| matches!(r.event.kind, EventKind::Interrupted { .. }))
        .map(|r| r.event.vm.vm_id.as_str())
        .collect();
    assert_eq!(interrupted, ["low"]);
    // high booted after low was interrupted; low's restart came after
    // high stopped, and was announced as a restart.
    let low_interrupted = position(&events, "low", |k| {
        matches!(k, EventKind::Interrupted { .. })
    });
    let high_ready = position(&events, "high", |k| matches!(k, EventKind::Ready { .. }));
    let high_stopped = position(&events, "high", |k| matches!(k, EventKind::Stopped { .. }));
    let low_restarted = position(&events, "low", |k| matches!(k, EventKind::Restarted));
    assert!(low_interrupted < high_ready);
    assert!(high_stopped < low_restarted);
    let restart_asks = events
        .iter()
        .filter(|r| {
            r.event.vm.vm_id == "low"
                && matches!(&r.event.kind, EventKind::BeforeBoot { admission, .. } if admission.restart)
        })
        .count();
    assert!(restart_asks >= 1);

    let body = scrape(port);
    assert_eq!(metric(&body, "interrupt-ordered"), 1, "{body}");
    assert!(metric(&body, "interrupt-sent") >= 1, "{body}");
    assert!(metric(&body, "shrink-sent") >= 1, "{body}");
    assert_eq!(metric(&body, "interrupted"), 1, "{body}");
    assert_eq!(metric(&body, "restart-reserved"), 1, "{body}");
    assert_eq!(
        metric(&body, "admit") + metric(&body, "admit-after-shrink"),
        3,
        "low, mid, then high: {body}"
    );

    // The shrink went out before the interruption.
    let log = server.stop();
    let shrink_at = log
        .find("coordinator order: BalloonTarget")
        .expect("no shrink order logged");
    let interrupt_at = log
        .find("coordinator order: Interrupt")
        .expect("no interrupt order logged");
    assert!(shrink_at < interrupt_at, "{log}");
}
