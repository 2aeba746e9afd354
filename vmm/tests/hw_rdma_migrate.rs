//! Live migration with page data over RDMA (labvm's `rdma` feature). Where
//! there is no RDMA device (or the feature is off) the migration fails
//! before it starts, says why, and the guest runs on; with a device, a
//! dirtying guest moves with every page equal and its counter continuous.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::time::{Duration, Instant};

use labvm::testing::{Nothing, RunOnAfter, kvm_or_skip};
use labvm::{
    LabVm, LabVmConfig, MigrationOptions, MigrationSource, StopReason, TransportKind, Workload,
};

fn dirty_config() -> LabVmConfig {
    LabVmConfig::new(
        64,
        Workload::Dirty {
            pages_per_sec: 5000,
            region_mib: 16,
            heartbeat_ms: 20,
        },
    )
}

fn rdma_options(to: String) -> MigrationOptions {
    let mut o = MigrationOptions::new(to);
    o.after = Duration::from_millis(300);
    o.timeout = Duration::from_secs(20);
    o.transport = TransportKind::Rdma;
    o
}

/// Whether this host has an RDMA device labvm could use.
fn has_rdma_device() -> bool {
    #[cfg(feature = "rdma")]
    {
        rdma::verbs::list_devices().is_ok_and(|d| !d.is_empty())
    }
    #[cfg(not(feature = "rdma"))]
    {
        false
    }
}

#[test]
fn hw_kvm_migrate_over_rdma_where_it_cannot_says_why_and_the_guest_runs_on() {
    const TEST: &str = "hw_kvm_migrate_over_rdma_where_it_cannot_says_why_and_the_guest_runs_on";
    if !kvm_or_skip(TEST) {
        return;
    }
    if has_rdma_device() {
        println!("SKIP {TEST}: this host has an RDMA device (the data-path test covers it)");
        return;
    }
    // Nothing listens: without a device (or the feature) labvm never dials.
    let to = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut vm = LabVm::create(dirty_config(), Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut obs = RunOnAfter::new(MigrationSource::new(rdma_options(to), &mut nothing), 10);
    let report = vm.run(&mut obs).unwrap();
    let mig = obs.mig.report.clone().unwrap();
    let error = mig.error.clone().unwrap();
    let expected = if cfg!(feature = "rdma") {
        "no RDMA device"
    } else {
        "built without RDMA"
    };
    assert!(error.contains(expected), "{error}");
    assert!(mig.in_doubt.is_none());
    // It ran on here: ten more heartbeats after the attempt.
    assert_eq!(report.stop, StopReason::Stopped);
    assert!(
        report.heartbeats >= mig.heartbeats_at_end + 10,
        "{report:?}"
    );
}

#[cfg(feature = "rdma")]
#[test]
fn hw_rdma_migrate_dirty_guest_every_page_matches_and_counter_continues() {
    use vm_memory::{Bytes, GuestAddress};
    const TEST: &str = "hw_rdma_migrate_dirty_guest_every_page_matches_and_counter_continues";
    if !kvm_or_skip(TEST) || rdma::testing::rdma_device_or_skip(TEST).is_none() {
        return;
    }
    let memory = |vm: &LabVm| {
        let mut m = vec![0u8; 64 << 20];
        vm.memory().read_slice(&mut m, GuestAddress(0)).unwrap();
        m
    };
    // The control connection is TCP on an address of the RDMA interface's
    // host; loopback carries it here.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let mut inc = labvm::receive(listener, Duration::from_secs(20)).unwrap();
        let at_switch = memory(&inc.vm);
        let switch_counter = inc.report.counter;
        let mut stop = labvm::testing::Heartbeats::new(10);
        let report = inc.run(&mut stop).unwrap();
        (at_switch, switch_counter, report)
    });
    let mut vm = LabVm::create(dirty_config(), Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut obs = RunOnAfter::new(
        MigrationSource::new(rdma_options(to), &mut nothing),
        1_000_000,
    );
    let src_report = vm.run(&mut obs).unwrap();
    let mig = obs.mig.report.clone().unwrap();
    assert_eq!(mig.error, None);
    let src_mem = memory(&vm);
    let (dst_mem, dst_counter, dst_report) = dest.join().unwrap();
    assert!(
        src_mem
            .chunks(4096)
            .zip(dst_mem.chunks(4096))
            .all(|(a, b)| a == b),
        "pages differ at the switch-over"
    );
    assert_eq!(dst_counter, src_report.counter);
    assert!(dst_report.counter.unwrap() > src_report.counter.unwrap());
}
