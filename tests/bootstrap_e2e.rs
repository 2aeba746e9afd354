//! Bootstrap orchestration end to end: labvm guests on real KVM, a real
//! `prescient serve` with its SQLite profile store, the working-set model.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::collections::HashSet;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::Server;

use labvm::testing::kvm_or_skip;
use labvm::{
    HookReporter, LabVm, LabVmConfig, PAGE_SIZE, RunObserver, StopReason, VMM_NAME, Workload,
    lab_identity,
};
use prescient::{
    FrequencyModel, PlanPolicy, ProfileKey, ProfileStore, StorePolicy, WorkingSetModel,
    recall_precision,
};
use vmm_hooks::{
    BootPlan, BootReport, Event, EventKind, HookReply, LifecycleHook, ProfileRequest, SocketHook,
    SocketHookConfig, VmIdentity,
};

struct Quiet;
impl RunObserver for Quiet {}

fn rand_workload(nonce: u64) -> Workload {
    Workload::Random {
        touch_mib: 32,
        seed: 42,
        vary_pct: 3,
        nonce,
    }
}

#[test]
fn hw_kvm_profile_of_three_boots_predicts_the_fourth() {
    if !kvm_or_skip("hw_kvm_profile_of_three_boots_predicts_the_fourth") {
        return;
    }
    let mut model = FrequencyModel::new();
    let mut fourth = Vec::new();
    let mut area = 0;
    for nonce in 1..=4u64 {
        let mut config = LabVmConfig::new(256, rand_workload(nonce));
        config.plan = Some(BootPlan::made_by("test").with_profile(ProfileRequest {
            chunk_size: PAGE_SIZE,
            interval_ms: 5,
        }));
        let mut vm = LabVm::create(config, Instant::now()).unwrap();
        let report = vm.run(&mut Quiet).unwrap();
        assert_eq!(report.stop, StopReason::Exited(0));
        area = vm.workload_area_start() / PAGE_SIZE;
        let profile = report.boot.unwrap().profile.unwrap();
        if nonce < 4 {
            model.observe(&profile);
        } else {
            fourth = profile.touches().map(|(c, _)| c).collect();
        }
    }
    let plan = model.plan(&PlanPolicy::default()).unwrap();
    let predicted: Vec<u64> = plan
        .ranges
        .iter()
        .flat_map(|r| (r.start / PAGE_SIZE)..((r.start + r.len) / PAGE_SIZE))
        .filter(|&c| c >= area)
        .collect();
    let actual: Vec<u64> = fourth.into_iter().filter(|&c| c >= area).collect();
    let (recall, precision) = recall_precision(&predicted, &actual);
    assert!(recall >= 0.95, "recall {recall}");
    assert!(precision >= 0.9, "precision {precision}");
    // The rare chunks (seen in one boot of three) are offered as extension.
    let extend: HashSet<u64> = plan
        .extend
        .iter()
        .flat_map(|r| (r.start / PAGE_SIZE)..((r.start + r.len) / PAGE_SIZE))
        .collect();
    assert!(!extend.is_empty());
}

fn boot_through(hook: &mut dyn LifecycleHook, vm_id: &str, nonce: u64) -> (BootPlan, BootReport) {
    let mut vm =
        LabVm::create(LabVmConfig::new(256, rand_workload(nonce)), Instant::now()).unwrap();
    let mut reporter = HookReporter::new(hook, lab_identity(vm_id, &vm));
    reporter.created(&vm);
    let result = vm.run(&mut reporter);
    reporter.stopped(&result);
    let plan = reporter.plan().cloned().unwrap();
    (plan, result.unwrap().boot.unwrap())
}

#[test]
fn hw_kvm_companion_profiles_first_boots_then_plans_and_stores_every_boot() {
    if !kvm_or_skip("hw_kvm_companion_profiles_first_boots_then_plans_and_stores_every_boot") {
        return;
    }
    let mut server = Server::start();
    let mut hook = SocketHook::new(SocketHookConfig::new(&server.socket, VMM_NAME));
    // No history: the plan has no pre-fault part and the boot is lazy, but
    // the companion asks for a profile.
    let (plan, report) = boot_through(&mut hook, "vm-1", 1);
    assert!(plan.prefault.is_none(), "{plan:?}");
    assert!(plan.profile.is_some());
    assert!(report.prefault.is_none() && !report.plan_applied);
    assert!(report.profile.is_some());
    // From the second boot on, the model has a plan; the first three boots
    // are profiled; the fourth is not.
    let mut plans = Vec::new();
    for n in 2..=4 {
        let (plan, report) = boot_through(&mut hook, &format!("vm-{n}"), n);
        assert!(plan.prefault.is_some(), "boot {n}: {plan:?}");
        assert!(report.plan_applied, "boot {n}: {report:?}");
        plans.push((plan.profile.is_some(), report.profile.is_some()));
    }
    assert_eq!(plans, vec![(true, true), (true, true), (false, false)]);
    let log = server.kill();
    assert!(!log.contains("ERROR"), "{log}");
    let store = ProfileStore::open(&server.store, StorePolicy::default()).unwrap();
    assert_eq!(store.boot_rows().unwrap(), 4);
}

fn event(key: &str, seq: u64, kind: EventKind) -> Event {
    Event {
        vm: VmIdentity {
            vm_id: format!("vm-{seq}"),
            image_digest: key.into(),
            package_digest: "pkg".into(),
        },
        seq: 0,
        at_unix_ms: 1_800_000_000_000 + seq,
        kind,
    }
}

#[test]
fn killing_the_companion_loses_no_acknowledged_boot() {
    let mut server = Server::start();
    let mut hook = SocketHook::new(SocketHookConfig::new(&server.socket, "test"));
    for seq in 0..50 {
        // The companion answers only events of VMs it saw created or booted.
        let spec = vmm_hooks::VmSpec {
            vcpus: 1,
            memory_mib: 64,
            vmm: "test".into(),
            priority: 0,
            interruptible: false,
        };
        assert_eq!(
            hook.on_event(&event("img", seq, EventKind::Created { spec })),
            HookReply::Ack
        );
        let reply = hook.on_event(&event(
            "img",
            seq,
            EventKind::BootReport(BootReport::new(seq as f64)),
        ));
        assert_eq!(reply, HookReply::Ack);
        assert!(
            hook.is_connected(),
            "boot {seq} was not acknowledged by the companion"
        );
    }
    // SIGKILL: no shutdown path runs.
    server.kill();
    let store = ProfileStore::open(&server.store, StorePolicy::default()).unwrap();
    let key = ProfileKey {
        image: "img".into(),
        package: "pkg".into(),
    };
    let boots = store.boots(&key).unwrap();
    assert_eq!(boots.len(), 50);
    let ttr: Vec<f64> = boots.iter().map(|b| b.report.time_to_ready_ms).collect();
    assert_eq!(ttr, (0..50).map(|i| i as f64).collect::<Vec<_>>());
    assert_eq!(store.summary(&key).unwrap().boots, 50);
}

fn serve_with_store(store: &Path) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["serve", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--store")
        .arg(store)
        .output()
        .unwrap()
}

#[test]
fn corrupt_or_foreign_store_files_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x5au8; 8192]).unwrap();
    let err = ProfileStore::open(&garbage, StorePolicy::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a Prescient store"), "{err}");
    assert_eq!(
        std::fs::read(&garbage).unwrap(),
        vec![0x5au8; 8192],
        "garbage file changed"
    );

    let foreign = dir.path().join("foreign.db");
    {
        let c = rusqlite::Connection::open(&foreign).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let err = ProfileStore::open(&foreign, StorePolicy::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("another application"), "{err}");

    // The daemon refuses to start on them, with the reason, and no socket.
    for f in [&garbage, &foreign] {
        let out = serve_with_store(f);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("is not a Prescient store"), "{stderr}");
    }

    // A store from a future schema version is refused too.
    let future = dir.path().join("future.db");
    drop(ProfileStore::open(&future, StorePolicy::default()).unwrap());
    {
        let c = rusqlite::Connection::open(&future).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = ProfileStore::open(&future, StorePolicy::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("schema version 99"), "{err}");
}

#[test]
fn store_keeps_the_newest_boots_and_profiles_first_then_samples() {
    let dir = tempfile::tempdir().unwrap();
    let policy = StorePolicy {
        retain_boots: 5,
        initial_profiles: 2,
        sample_every: 4,
        ..StorePolicy::default()
    };
    let mut store = ProfileStore::open(&dir.path().join("s.db"), policy).unwrap();
    let key = ProfileKey {
        image: "i".into(),
        package: "p".into(),
    };
    let mut decisions = Vec::new();
    for i in 0..12 {
        let summary = store.summary(&key).unwrap();
        let profile = store.should_profile(&summary);
        decisions.push(profile);
        let mut report = BootReport::new(f64::from(i));
        if profile {
            let mut p = vmm_hooks::BootProfile::new(4096, 1 << 20);
            p.windows = vec![vmm_hooks::TouchWindow {
                at_ms: 1.0,
                runs: vec![[3, 2]],
            }];
            report.profile = Some(p);
        }
        store
            .record_boot(&key, "vm", i64::from(i), &report)
            .unwrap();
    }
    // Boots 0 and 1 (initial), then every 4th boot: numbers 3, 7, 11.
    let profiled: Vec<usize> = decisions
        .iter()
        .enumerate()
        .filter(|(_, p)| **p)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(profiled, vec![0, 1, 3, 7, 11]);
    let boots = store.boots(&key).unwrap();
    assert_eq!(boots.len(), 5);
    assert_eq!(boots[0].report.time_to_ready_ms, 7.0);
    let summary = store.summary(&key).unwrap();
    assert_eq!((summary.boots, summary.profiled), (12, 5));
    let plan = summary.plan.unwrap();
    assert_eq!(
        plan.ranges,
        vec![vmm_hooks::GuestRange {
            start: 3 * 4096,
            len: 2 * 4096
        }]
    );
}
