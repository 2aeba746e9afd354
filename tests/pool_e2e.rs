//! The resource pool and the predictive allocator in a real `prescient
//! serve`: reservations on boot, shortfalls named, release on stop,
//! unknown VMs rejected, `prescient status`, state across a SIGTERM restart
//! and a crash, reconciliation against VMs that no longer exist, and the
//! store's migration from schema version 1.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Server, free_port, scrape};
use prescient::{DaemonStatus, ProfileKey, ProfileStore, StorePolicy, VmRecord, VmSource, VmState};
use vmm_hooks::{
    BootReport, Event, EventKind, GuestRange, HookReply, LifecycleHook, Resource, Resources,
    ShortfallAction, SocketHook, SocketHookConfig, StopStatus, VmIdentity, VmSpec,
};

fn event(vm: &str, seq: u64, kind: EventKind) -> Event {
    Event {
        vm: VmIdentity {
            vm_id: vm.into(),
            image_digest: format!("img-{vm}"),
            package_digest: "pkg".into(),
        },
        seq,
        at_unix_ms: 1_800_000_000_000 + seq,
        kind,
    }
}

fn created(vm: &str, vcpus: u32, mib: u64) -> Event {
    event(
        vm,
        0,
        EventKind::Created {
            spec: VmSpec {
                vcpus,
                memory_mib: mib,
                vmm: "test".into(),
                priority: 0,
                interruptible: false,
            },
        },
    )
}

fn before_boot(vm: &str, seq: u64, vcpus: usize, mib: u64) -> Event {
    event(
        vm,
        seq,
        EventKind::BeforeBoot {
            vcpu_tids: (1..=vcpus).map(|i| i32::try_from(i).unwrap()).collect(),
            ram: GuestRange {
                start: 0,
                len: mib << 20,
            },
            admission: vmm_hooks::Admission::default(),
        },
    )
}

fn stopped(vm: &str, seq: u64) -> Event {
    event(
        vm,
        seq,
        EventKind::Stopped {
            status: StopStatus::Stopped,
        },
    )
}

/// A config file: 4 CPUs, 4608 MiB of which 512 kept for the host, CPU
/// over-committed 2x (capacity 8000 millicores, 4096 MiB).
fn config(dir: &Path, on_shortfall: &str) -> String {
    let path = dir.join("pool.toml");
    std::fs::write(
        &path,
        format!(
            "[pool]\ncpus = 4\nmemory_mib = 4608\nreserved_memory_mib = 512\ncpu_overcommit = 2.0\n\
             [allocator]\non_shortfall = \"{on_shortfall}\"\nmin_samples = 3\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn status(socket: &Path) -> DaemonStatus {
    let out = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn vm<'a>(s: &'a DaemonStatus, id: &str) -> Option<&'a VmRecord> {
    s.vms.iter().find(|v| v.vm_id == id)
}

fn plan_of(r: HookReply) -> vmm_hooks::BootPlan {
    match r {
        HookReply::Plan(p) => p,
        other => panic!("expected a plan, got {other:?}"),
    }
}

#[test]
fn boots_reserve_shortfalls_are_named_stops_release_and_sigterm_keeps_the_books() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let server = Server::start_args(
        true,
        &[
            "--config",
            &config(cfg_dir.path(), "refuse"),
            "--metrics-listen",
            &metrics,
        ],
    );
    let mut hook = SocketHook::new(SocketHookConfig::new(&server.socket, "test"));

    // A fits: its declared size (cold start) is reserved.
    assert_eq!(hook.on_event(&created("a", 2, 1024)), HookReply::Ack);
    let plan = plan_of(hook.on_event(&before_boot("a", 1, 2, 1024)));
    let a = plan.allocation.clone().unwrap();
    assert!(a.admitted, "{a:?}");
    assert!(!plan.refuses_boot());
    assert_eq!(
        (a.demand.cpu_millis, a.demand.memory_mib),
        (2000, 1024),
        "{a:?}"
    );
    assert_eq!(a.forecast_by, "declared size (cold start)");
    assert!((a.quantile - 0.9).abs() < 1e-12);

    // B does not: memory short by 4096 - (4096 - 1024) = 1024 MiB, CPU by
    // 8000 - (8000 - 2000) = 2000 millicores; refused, pre-faulting dropped.
    assert_eq!(hook.on_event(&created("b", 8, 4096)), HookReply::Ack);
    let plan = plan_of(hook.on_event(&before_boot("b", 1, 8, 4096)));
    let b = plan.allocation.clone().unwrap();
    assert!(!b.admitted);
    assert!(plan.refuses_boot());
    assert!(plan.prefault.is_none() && plan.profile.is_none());
    assert_eq!(b.on_shortfall, ShortfallAction::Refuse);
    let short: Vec<(Resource, u64, u64)> = b
        .short
        .iter()
        .map(|s| (s.resource, s.short_by, s.free))
        .collect();
    assert_eq!(
        short,
        vec![(Resource::Cpu, 2000, 6000), (Resource::Memory, 1024, 3072)]
    );
    assert!(
        b.shortfall_text()
            .contains("memory short by 1024 MiB (wanted 4096 MiB, 3072 MiB free)"),
        "{}",
        b.shortfall_text()
    );

    // An event of a VM the daemon never saw boot is rejected, not recorded.
    let logged_before = server.events().len();
    match hook.on_event(&event(
        "ghost",
        3,
        EventKind::Ready {
            time_to_ready_ms: 1.0,
        },
    )) {
        HookReply::Rejected { reason } => assert!(reason.contains("unknown VM"), "{reason}"),
        other => panic!("ghost event answered {other:?}"),
    }
    assert!(
        hook.is_connected(),
        "a rejection must not close the connection"
    );
    assert_eq!(server.events().len(), logged_before);

    // `prescient status`: JSON and the table.
    let s = status(&server.socket);
    assert_eq!(s.pool.capacity.cpu_millis, 8000);
    assert_eq!(s.pool.capacity.memory_mib, 4096);
    assert_eq!(s.pool.allocated.memory_mib, 1024);
    assert_eq!(s.pool.free.memory_mib, 3072);
    assert_eq!(vm(&s, "a").unwrap().state, VmState::Reserved);
    let rec_b = vm(&s, "b").unwrap();
    assert_eq!(rec_b.state, VmState::Refused);
    assert!(rec_b.shortfall.contains("cpu short by 2000"), "{rec_b:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["status", "--socket"])
        .arg(&server.socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("a "))
        .unwrap_or_else(|| panic!("no row for a in\n{table}"));
    for cell in [
        "reserved",
        "default",
        "p90",
        "2000",
        "1024",
        "declared size",
    ] {
        assert!(row.contains(cell), "{cell} missing in {row:?}\n{table}");
    }
    // Aligned: the header's "state" starts where each row's state does.
    let header = table.lines().find(|l| l.starts_with("vm ")).unwrap();
    let col = header.find("state").unwrap();
    assert_eq!(&row[col..col + 8], "reserved", "{table}");

    // SIGTERM, then a new daemon on the same store: the same books, not
    // twice the reservation; a's events are still known.
    drop(hook);
    let (server, old_log) = server.restart();
    assert!(old_log.contains("state persisted"), "{old_log}");
    let s = status(&server.socket);
    assert_eq!(s.pool.allocated.memory_mib, 1024, "{s:?}");
    assert_eq!(s.pool.reservations, 1);
    assert_eq!(vm(&s, "a").unwrap().state, VmState::Reserved);
    assert_eq!(vm(&s, "a").unwrap().last_seq, Some(1));
    assert_eq!(vm(&s, "b").unwrap().state, VmState::Refused);
    let mut hook = SocketHook::new(SocketHookConfig::new(&server.socket, "test"));
    assert_eq!(
        hook.on_event(&event(
            "a",
            2,
            EventKind::Ready {
                time_to_ready_ms: 5.0
            }
        )),
        HookReply::Ack
    );
    assert_eq!(
        hook.on_event(&event("a", 3, EventKind::BootReport(BootReport::new(5.0)))),
        HookReply::Ack
    );
    // Stops release; now B's demand fits.
    assert_eq!(hook.on_event(&stopped("a", 4)), HookReply::Ack);
    assert_eq!(hook.on_event(&stopped("b", 2)), HookReply::Ack);
    let s = status(&server.socket);
    assert!(s.vms.is_empty(), "{s:?}");
    assert_eq!(s.pool.allocated, Resources::ZERO);
    let plan = plan_of(hook.on_event(&before_boot("c", 0, 2, 4096)));
    assert!(plan.allocation.unwrap().admitted);
    // A stopped VM is forgotten: its later events are unknown.
    assert!(matches!(
        hook.on_event(&event("a", 5, EventKind::Paused)),
        HookReply::Rejected { .. }
    ));
    drop(hook);
    let server = {
        // Metrics of the second daemon (its own port).
        let text = scrape(port);
        // The first daemon's port was released at its shutdown; the new
        // one was started with the same flags, so it serves there.
        for needle in [
            r#"prescient_allocator_decisions_total{kind="restored"} 2"#,
            r#"prescient_allocator_decisions_total{kind="released"} 1"#,
            r#"prescient_allocator_decisions_total{kind="fit"} 1"#,
            r#"prescient_pool_allocated{resource="memory"} 4096"#,
            r#"prescient_pool_capacity{resource="cpu"} 8000"#,
            "prescient_pool_reservations 1",
            r#"prescient_rejected_total{kind="unknown-vm"} 1"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        server
    };
    server.stop();
}

#[test]
fn first_daemon_counts_fits_shortfalls_and_short_resources() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start_args(
        true,
        &[
            "--config",
            &config(cfg_dir.path(), "boot-lazily"),
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let mut hook = SocketHook::new(SocketHookConfig::new(&server.socket, "test"));
    assert!(
        plan_of(hook.on_event(&before_boot("x", 0, 1, 3000)))
            .allocation
            .unwrap()
            .admitted
    );
    // Boot lazily: not admitted, but not refused either.
    let plan = plan_of(hook.on_event(&before_boot("y", 0, 1, 3000)));
    let y = plan.allocation.clone().unwrap();
    assert!(!y.admitted && !plan.refuses_boot());
    assert_eq!(y.on_shortfall, ShortfallAction::BootLazily);
    assert_eq!(
        status(&server.socket).vms[1].state,
        VmState::Unreserved,
        "y runs without a reservation"
    );
    let text = scrape(port);
    for needle in [
        r#"prescient_allocator_decisions_total{kind="fit"} 1"#,
        r#"prescient_allocator_decisions_total{kind="short"} 1"#,
        r#"prescient_allocator_short_total{resource="memory"} 1"#,
        r#"prescient_pool_allocated{resource="memory"} 3000"#,
        r#"prescient_boot_plans_total{kind="not-admitted"} 1"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    server.stop();
}

#[test]
fn forecasts_follow_the_keys_history_at_the_class_quantile() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[pool]\ncpus = 64\nmemory_mib = 65536\n\
         [[allocator.class]]\nname = \"web\"\nvm_prefix = \"web-\"\nquantile = 0.5\nnet_mbps = 0\n",
    )
    .unwrap();
    let server = Server::start_args(true, &["--config", cfg.to_str().unwrap()]);
    let mut hook = SocketHook::new(SocketHookConfig::new(&server.socket, "test"));
    // Five boots of one key (web-N share image and package), each using
    // (100 x N) MiB resident and N/4 CPUs during a 100 ms bootstrap.
    for n in 1..=5u64 {
        let id = format!("web-{n}");
        let mut e = before_boot(&id, 0, 4, 2048);
        e.vm.image_digest = "img-web".into();
        let plan = plan_of(hook.on_event(&e));
        let a = plan.allocation.unwrap();
        if n <= 3 {
            // Fewer than min_samples (3) boots before this one: declared size.
            assert_eq!(a.demand.memory_mib, 2048, "boot {n}: {a:?}");
        } else {
            // p50 of the boots so far (class quantile).
            let want = 100 * ((n - 1).div_ceil(2));
            assert_eq!(a.demand.memory_mib, want, "boot {n}: {a:?}");
            assert_eq!(a.forecast_by, format!("empirical p50 of {} boots", n - 1));
        }
        let mut report = BootReport::new(100.0);
        report.rss_kib = 100 * n * 1024;
        report.vcpu_cpu_ms = 25.0 * n as f64;
        let mut r = event(&id, 1, EventKind::BootReport(report));
        r.vm.image_digest = "img-web".into();
        assert_eq!(hook.on_event(&r), HookReply::Ack);
        let mut s = stopped(&id, 2);
        s.vm.image_digest = "img-web".into();
        assert_eq!(hook.on_event(&s), HookReply::Ack);
    }
    server.stop();
}

#[test]
fn reservations_of_vms_that_are_gone_are_released_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store.db");
    // One record whose VMM process has exited, one of this (live) process,
    // one of this pid with another start time (a reused pid).
    let mut child = Command::new("true").spawn().unwrap();
    let dead = i32::try_from(child.id()).unwrap();
    child.wait().unwrap();
    let own = i32::try_from(std::process::id()).unwrap();
    let own_start = prescient::process_start(own).unwrap();
    {
        let store = ProfileStore::open(&store_path, StorePolicy::default()).unwrap();
        for (id, pid, start) in [
            ("dead", dead, Some(1)),
            ("alive", own, Some(own_start)),
            ("reused", own, Some(own_start + 1)),
        ] {
            store
                .pool_put(&VmRecord {
                    vm_id: id.into(),
                    key: ProfileKey {
                        image: "i".into(),
                        package: "p".into(),
                    },
                    source: VmSource::Vmm,
                    pid: Some(pid),
                    pid_start: start,
                    state: VmState::Reserved,
                    demand: Resources {
                        cpu_millis: 1000,
                        memory_mib: 256,
                        ..Resources::ZERO
                    },
                    quantile: 0.9,
                    forecast_by: "test".into(),
                    class: "default".into(),
                    shortfall: String::new(),
                    last_seq: Some(1),
                    updated_unix_ms: 0,
                })
                .unwrap();
        }
    }
    let server = Server::start_in(dir, true, &[]);
    let s = status(&server.socket);
    let ids: Vec<&str> = s.vms.iter().map(|v| v.vm_id.as_str()).collect();
    assert_eq!(ids, vec!["alive"]);
    assert_eq!(s.pool.allocated.memory_mib, 256);
    let store_path = server.store.clone();
    let (log, _dir) = server.stop_keep_dir();
    assert!(log.contains("has exited"), "{log}");
    assert!(log.contains("is another process now"), "{log}");
    let store = ProfileStore::open(&store_path, StorePolicy::default()).unwrap();
    let left: Vec<String> = store
        .pool_records()
        .unwrap()
        .into_iter()
        .map(|r| r.vm_id)
        .collect();
    assert_eq!(left, vec!["alive".to_string()]);
}

#[test]
fn a_libvirt_domain_reserves_at_start_and_is_reconciled_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("libvirt-run");
    std::fs::create_dir_all(run_dir.join("qemu")).unwrap();
    let server = Server::start_args(
        true,
        &[
            "--libvirt-run-dir",
            run_dir.to_str().unwrap(),
            "--libvirt-sample-ms",
            "100000",
        ],
    );
    let xml = "<domain type='qemu'><name>dom-1</name><vcpu>2</vcpu>\
               <memory unit='KiB'>524288</memory><currentMemory unit='KiB'>524288</currentMemory></domain>";
    let mut hook = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["libvirt-hook", "--socket"])
        .arg(&server.socket)
        .args(["--", "dom-1", "start", "begin", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    hook.stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    assert!(hook.wait().unwrap().success());
    let s = status(&server.socket);
    let d = vm(&s, "dom-1").unwrap();
    assert_eq!((d.source, d.state), (VmSource::Libvirt, VmState::Reserved));
    assert_eq!(
        (d.demand.cpu_millis, d.demand.memory_mib),
        (2000, 512),
        "{d:?}"
    );
    // The daemon dies without shutting down; the domain's QEMU is not
    // running (no pid file, no process): the restarted daemon releases it.
    let server = server.crash_and_restart();
    let s = status(&server.socket);
    assert!(s.vms.is_empty(), "{s:?}");
    assert_eq!(s.pool.allocated, Resources::ZERO);
    let log = server.stop();
    assert!(log.contains("did not shut down cleanly"), "{log}");
    assert!(log.contains("no QEMU process of the domain"), "{log}");
}

#[test]
fn a_schema_version_1_store_is_migrated_and_keeps_its_boots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    // Written by the previous Prescient (schema 1: `prescient bench load`
    // on main before the pool existed): 20 boots over 10 keys.
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/store-v1.db"),
        &path,
    )
    .unwrap();
    let version = |p: &Path| -> i64 {
        rusqlite::Connection::open(p)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    };
    assert_eq!(version(&path), 1);
    {
        let store = ProfileStore::open(&path, StorePolicy::default()).unwrap();
        assert_eq!(store.boot_rows().unwrap(), 20);
        assert!(store.pool_records().unwrap().is_empty());
        let key = ProfileKey {
            image: "image-0".into(),
            package: "pkg".into(),
        };
        assert_eq!(store.summary(&key).unwrap().boots, 2);
        assert_eq!(store.boot_usage(&key, 10).unwrap().len(), 2);
        assert_eq!(store.sample_rows().unwrap(), 0);
    }
    // Migrated through version 2 (the pool) to version 3 (samples).
    assert_eq!(version(&path), 3);
    // The daemon runs on it and uses it.
    let server = Server::start_in(dir, true, &[]);
    let mut hook = SocketHook::new(SocketHookConfig::new(&server.socket, "test"));
    let plan = plan_of(hook.on_event(&before_boot("m", 0, 1, 64)));
    assert!(plan.allocation.unwrap().admitted);
    assert_eq!(status(&server.socket).vms.len(), 1);
    drop(hook);
    let path = server.store.clone();
    let (_, _dir) = server.stop_keep_dir();
    let store = ProfileStore::open(&path, StorePolicy::default()).unwrap();
    assert_eq!(store.boot_rows().unwrap(), 20);
    assert_eq!(store.pool_records().unwrap().len(), 1);
}

#[test]
fn status_says_clearly_when_no_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["status", "--socket"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the daemon"), "{err}");
}

/// Runs a 64 MiB, 1-vCPU lab guest on real KVM reporting to `socket`.
fn run_lab_vm(socket: &Path, vm_id: &str) -> Result<labvm::RunReport, labvm::VmmError> {
    let config = labvm::LabVmConfig::new(
        64,
        labvm::Workload::Random {
            touch_mib: 8,
            seed: 5,
            vary_pct: 0,
            nonce: 0,
        },
    );
    let mut vm = labvm::LabVm::create(config, std::time::Instant::now()).unwrap();
    let mut hook = SocketHook::new(SocketHookConfig::new(socket, labvm::VMM_NAME));
    let mut reporter = labvm::HookReporter::new(&mut hook, labvm::lab_identity(vm_id, &vm));
    reporter.created(&vm);
    let result = vm.run(&mut reporter);
    reporter.stopped(&result);
    result
}

#[test]
fn hw_kvm_labvm_boots_when_its_demand_fits_and_is_refused_when_it_does_not() {
    if !labvm::testing::kvm_or_skip(
        "hw_kvm_labvm_boots_when_its_demand_fits_and_is_refused_when_it_does_not",
    ) {
        return;
    }
    // 96 MiB for VMs: one 64 MiB lab VM fits, and while its reservation is
    // held by a second (fake) VM, another does not.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[pool]\ncpus = 1\nmemory_mib = 608\nreserved_memory_mib = 512\n",
    )
    .unwrap();
    let server = Server::start_args(true, &["--config", cfg.to_str().unwrap()]);
    let report = run_lab_vm(&server.socket, "lab-1").unwrap();
    assert_eq!(report.stop, labvm::StopReason::Exited(0));
    // Released on stop: nothing left.
    assert!(status(&server.socket).vms.is_empty());

    // Another VM holds 64 MiB now; the lab VM's 64 MiB do not fit in the
    // 32 left: refused, its guest never runs, and it is reported stopped.
    let mut other = SocketHook::new(SocketHookConfig::new(&server.socket, "test"));
    assert!(
        plan_of(other.on_event(&before_boot("holder", 0, 1, 64)))
            .allocation
            .unwrap()
            .admitted
    );
    let err = run_lab_vm(&server.socket, "lab-2").unwrap_err();
    let text = vmm_hooks::error_chain(&err);
    assert!(matches!(err, labvm::VmmError::NotAdmitted { .. }), "{text}");
    assert!(
        text.contains("memory short by 32 MiB (wanted 64 MiB, 32 MiB free)"),
        "{text}"
    );
    let kinds: Vec<String> = server
        .events()
        .iter()
        .filter(|e| e.event.vm.vm_id == "lab-2")
        .map(|e| e.event.kind.name().to_string())
        .collect();
    assert_eq!(kinds, vec!["created", "before-boot", "stopped"]);
    let s = status(&server.socket);
    assert_eq!(
        s.vms.iter().map(|v| v.vm_id.as_str()).collect::<Vec<_>>(),
        vec!["holder"]
    );
    server.stop();
}
