//! Bootstrap profiling and pre-fault plans on real KVM.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::HashSet;
use std::time::Instant;

use labvm::testing::kvm_or_skip;
use labvm::{LabVm, LabVmConfig, PAGE_SIZE, RunObserver, StopReason, Workload, stamp_value};
use vm_memory::{Bytes, GuestAddress};
use vmm_hooks::{BootPlan, BootReport, GuestRange, PrefaultMode, PrefaultPlan, ProfileRequest};

struct Quiet;
impl RunObserver for Quiet {}

fn profile_4k() -> BootPlan {
    BootPlan::made_by("test").with_profile(ProfileRequest {
        chunk_size: PAGE_SIZE,
        interval_ms: 5,
    })
}

fn rand_workload(touch_mib: u64, vary_pct: u32, nonce: u64) -> Workload {
    Workload::Random {
        touch_mib,
        seed: 42,
        vary_pct,
        nonce,
    }
}

fn boot(config: LabVmConfig) -> (LabVm, BootReport) {
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let report = vm.run(&mut Quiet).unwrap();
    assert_eq!(report.stop, StopReason::Exited(0));
    let boot = report.boot.unwrap();
    (vm, boot)
}

#[test]
fn hw_kvm_dirty_log_profile_counts_exactly_the_pages_the_guest_writes() {
    if !kvm_or_skip("hw_kvm_dirty_log_profile_counts_exactly_the_pages_the_guest_writes") {
        return;
    }
    let mut config = LabVmConfig::new(128, rand_workload(16, 0, 0));
    config.plan = Some(profile_4k());
    let (vm, report) = boot(config);
    let profile = report.profile.unwrap();
    assert_eq!(profile.chunk_size, PAGE_SIZE);
    let area = vm.workload_area_start() / PAGE_SIZE;
    let profiled: HashSet<u64> = profile.touches().map(|(c, _)| c).collect();
    let in_area: HashSet<u64> = profiled.iter().copied().filter(|&c| c >= area).collect();
    let touched: HashSet<u64> = vm.touched_pages().iter().map(|p| p / PAGE_SIZE).collect();
    assert_eq!(
        in_area, touched,
        "profile of the workload area differs from the pages written"
    );
    // Below the area the guest writes only its stack and the parameter block
    // (vCPUs joining), never the program, tables or touch lists.
    let system: Vec<u64> = profiled.iter().copied().filter(|&c| c < area).collect();
    // (Shadow paging may also log pages of the guest's page tables and of the
    // 2 MiB guest page holding code and parameters when it maps them writable.)
    assert!(!system.is_empty() && system.len() <= 8, "{system:x?}");
    // Windows are in time order.
    let times: Vec<f64> = profile.windows.iter().map(|w| w.at_ms).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn hw_kvm_prefault_modes_populate_and_the_guest_still_writes_every_page() {
    if !kvm_or_skip("hw_kvm_prefault_modes_populate_and_the_guest_still_writes_every_page") {
        return;
    }
    for mode in [
        PrefaultMode::Before,
        PrefaultMode::Concurrent,
        PrefaultMode::Full,
    ] {
        let mut config = LabVmConfig::new(128, Workload::Sequential { touch_mib: 32 });
        let area = 4 << 20;
        config.plan = Some(BootPlan::made_by("test").with_prefault(PrefaultPlan::new(
            mode,
            vec![GuestRange {
                start: area,
                len: 32 << 20,
            }],
        )));
        let stamp = config.stamp;
        let (vm, report) = boot(config);
        assert_eq!(vm.workload_area_start(), area);
        let pf = report.prefault.unwrap();
        assert_eq!(pf.mode, mode);
        assert!(pf.rolled_back.is_none(), "{mode:?}: {:?}", pf.rolled_back);
        assert!(report.plan_applied);
        let expect = if mode == PrefaultMode::Full {
            128 << 20
        } else {
            32 << 20
        };
        if mode == PrefaultMode::Concurrent {
            assert!(pf.bytes <= expect + (8 << 20), "{mode:?}: {}", pf.bytes);
        } else {
            assert_eq!(pf.bytes, expect, "{mode:?}");
        }
        for gpa in vm.touched_pages() {
            let v: u64 = vm.memory().read_obj(GuestAddress(gpa)).unwrap();
            assert_eq!(v, stamp_value(gpa, stamp));
        }
    }
}

#[test]
fn hw_kvm_bad_plan_rolls_back_to_lazy_and_the_boot_succeeds() {
    if !kvm_or_skip("hw_kvm_bad_plan_rolls_back_to_lazy_and_the_boot_succeeds") {
        return;
    }
    for mode in [PrefaultMode::Before, PrefaultMode::Concurrent] {
        let mut config = LabVmConfig::new(64, Workload::Sequential { touch_mib: 8 });
        // Half of this range lies past the end of guest RAM.
        config.plan = Some(BootPlan::made_by("test").with_prefault(PrefaultPlan::new(
            mode,
            vec![GuestRange {
                start: 60 << 20,
                len: 8 << 20,
            }],
        )));
        let (_vm, report) = boot(config);
        let pf = report.prefault.unwrap();
        let why = pf.rolled_back.unwrap();
        assert!(
            why.contains("not a page-aligned part of guest RAM"),
            "{why}"
        );
        assert_eq!(pf.bytes, 0);
        assert!(!report.plan_applied);
    }
}

#[test]
fn hw_kvm_prewarmed_boot_counts_from_after_the_plan() {
    if !kvm_or_skip("hw_kvm_prewarmed_boot_counts_from_after_the_plan") {
        return;
    }
    let mut config = LabVmConfig::new(64, Workload::Sequential { touch_mib: 16 });
    config.plan = Some(BootPlan::made_by("test").with_prefault(PrefaultPlan::new(
        PrefaultMode::Before,
        vec![GuestRange {
            start: 4 << 20,
            len: 16 << 20,
        }],
    )));
    config.prewarm = true;
    let (_vm, report) = boot(config);
    let pf = report.prefault.clone().unwrap();
    // The populate happened before the start request, so it is not part of
    // the time to ready (both come from one clock; no timing threshold).
    assert!(pf.rolled_back.is_none());
    assert!(report.time_to_ready_ms > 0.0, "{report:?}");
}
