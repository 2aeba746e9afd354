//! labvm on real KVM: lab guests touch real guest memory, fault, miss
//! deadlines and run several vCPUs. Each test prints `SKIP` and returns when
//! /dev/kvm is absent, unless `PRESCIENT_REQUIRE=kvm` makes that a failure.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::HashSet;
use std::time::{Duration, Instant};

use labvm::testing::kvm_or_skip;
use labvm::{
    LabVm, LabVmConfig, PAGE_SIZE, RunObserver, StopReason, Trace, VmmError, Workload, stamp_value,
};
use vm_memory::{Bytes, GuestAddress};

struct Quiet;
impl RunObserver for Quiet {}

fn read(vm: &LabVm, gpa: u64) -> u64 {
    vm.memory().read_obj(GuestAddress(gpa)).unwrap()
}

#[test]
fn hw_kvm_random_touch_64mib_every_touched_page_holds_its_stamp() {
    if !kvm_or_skip("hw_kvm_random_touch_64mib_every_touched_page_holds_its_stamp") {
        return;
    }
    let config = LabVmConfig::new(
        256,
        Workload::Random {
            touch_mib: 64,
            seed: 11,
            vary_pct: 0,
            nonce: 0,
        },
    );
    let stamp = config.stamp;
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let report = vm.run(&mut Quiet).unwrap();
    assert_eq!(report.stop, StopReason::Exited(0));
    assert!(report.time_to_ready.is_some());
    let touched = vm.touched_pages();
    assert_eq!(touched.len() as u64, 64 * (1 << 20) / PAGE_SIZE);
    assert_eq!(report.progress.iter().sum::<u64>(), touched.len() as u64);
    for &gpa in &touched {
        assert_eq!(read(&vm, gpa), stamp_value(gpa, stamp), "page {gpa:#x}");
    }
    // Pages the list does not name were not written.
    let set: HashSet<u64> = touched.iter().copied().collect();
    let untouched: Vec<u64> = (0..)
        .map(|i| vm.workload_area_start() + i * PAGE_SIZE)
        .take_while(|&p| p < 256 << 20)
        .filter(|p| !set.contains(p))
        .collect();
    assert!(!untouched.is_empty());
    for &gpa in untouched.iter().step_by(97) {
        assert_eq!(read(&vm, gpa), 0, "untouched page {gpa:#x} was written");
    }
    assert_eq!(report.log, vec!["lab guest: started".to_string()]);
}

#[test]
fn hw_kvm_two_vcpus_both_run_their_share() {
    if !kvm_or_skip("hw_kvm_two_vcpus_both_run_their_share") {
        return;
    }
    let mut config = LabVmConfig::new(64, Workload::Sequential { touch_mib: 16 });
    config.vcpus = 2;
    let stamp = config.stamp;
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let report = vm.run(&mut Quiet).unwrap();
    assert_eq!(report.stop, StopReason::Exited(0));
    assert_eq!(report.vcpu_tids.len(), 2);
    assert_ne!(report.vcpu_tids[0], report.vcpu_tids[1]);
    // Each vCPU reported its own half from its own thread.
    assert_eq!(report.progress, vec![2048, 2048]);
    for gpa in vm.touched_pages() {
        assert_eq!(read(&vm, gpa), stamp_value(gpa, stamp));
    }
}

#[test]
fn hw_kvm_faulting_guest_yields_error_naming_the_fault() {
    if !kvm_or_skip("hw_kvm_faulting_guest_yields_error_naming_the_fault") {
        return;
    }
    let mut vm = LabVm::create(
        LabVmConfig::new(16, Workload::FaultInvalidOpcode),
        Instant::now(),
    )
    .unwrap();
    let err = vm.run(&mut Quiet).unwrap_err();
    match &err {
        VmmError::GuestFault {
            vcpu, vector, rip, ..
        } => {
            assert_eq!((*vcpu, *vector), (0, 6));
            assert!(*rip > 0x10_0000, "rip {rip:#x} is not in the guest program");
        }
        other => panic!("expected a guest fault, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("#UD invalid opcode") && msg.contains("RIP 0x"),
        "{msg}"
    );

    let mut vm = LabVm::create(
        LabVmConfig::new(16, Workload::FaultPageFault),
        Instant::now(),
    )
    .unwrap();
    let err = vm.run(&mut Quiet).unwrap_err();
    assert!(
        matches!(
            err,
            VmmError::GuestFault {
                vector: 14,
                cr2: 0x80_0000_0000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("address 0x8000000000"), "{err}");
}

#[test]
fn hw_kvm_guest_that_never_signals_ready_is_stopped_at_deadline() {
    if !kvm_or_skip("hw_kvm_guest_that_never_signals_ready_is_stopped_at_deadline") {
        return;
    }
    let mut config = LabVmConfig::new(16, Workload::NeverReady);
    config.ready_deadline = Duration::from_millis(300);
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let err = vm.run(&mut Quiet).unwrap_err();
    assert!(
        matches!(err, VmmError::ReadyDeadline { deadline_ms: 300 }),
        "{err}"
    );
    // The VM ran once; it cannot be run again.
    assert!(matches!(vm.run(&mut Quiet), Err(VmmError::Config(_))));
}

#[test]
fn hw_kvm_dirtying_guest_keeps_counter_and_dirties_pages_until_stopped() {
    if !kvm_or_skip("hw_kvm_dirtying_guest_keeps_counter_and_dirties_pages_until_stopped") {
        return;
    }
    let mut config = LabVmConfig::new(
        64,
        Workload::Dirty {
            pages_per_sec: 20_000,
            region_mib: 4,
            heartbeat_ms: 20,
        },
    );
    config.run_for = Some(Duration::from_millis(300));
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let area = vm.workload_area_start();
    let report = vm.run(&mut Quiet).unwrap();
    assert_eq!(report.stop, StopReason::Stopped);
    let counter = report.counter.unwrap();
    assert!(counter > 0);
    assert_eq!(read(&vm, area), counter);
    // The first dirty page holds a counter value written before the end.
    let first = read(&vm, area + PAGE_SIZE);
    assert!(first > 0 && first <= counter, "{first} vs {counter}");
}

#[test]
fn hw_kvm_trace_workload_touches_the_trace_pages_in_the_area() {
    if !kvm_or_skip("hw_kvm_trace_workload_touches_the_trace_pages_in_the_area") {
        return;
    }
    let trace = Trace::parse("t", "0x0 2 10\n0x100000 1\n0x3000 1 5\n").unwrap();
    let config = LabVmConfig::new(32, Workload::Trace(trace));
    let stamp = config.stamp;
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let report = vm.run(&mut Quiet).unwrap();
    assert_eq!(report.stop, StopReason::Exited(0));
    let area = vm.workload_area_start();
    for off in [0u64, 0x1000, 0x100000, 0x3000] {
        assert_eq!(read(&vm, area + off), stamp_value(area + off, stamp));
    }
    assert_eq!(read(&vm, area + 0x2000), 0);
}

#[test]
fn labvm_invalid_configurations_are_rejected_before_kvm() {
    let bad = [
        LabVmConfig {
            vcpus: 0,
            ..LabVmConfig::new(16, Workload::NeverReady)
        },
        LabVmConfig {
            vcpus: 33,
            ..LabVmConfig::new(16, Workload::NeverReady)
        },
        LabVmConfig::new(2, Workload::NeverReady),
        LabVmConfig::new(17, Workload::NeverReady),
        LabVmConfig::new(16, Workload::Sequential { touch_mib: 64 }),
    ];
    for c in bad {
        let err = LabVm::create(c, Instant::now()).unwrap_err();
        assert!(
            matches!(err, VmmError::Config(_) | VmmError::WorkloadTooLarge { .. }),
            "{err}"
        );
    }
}
