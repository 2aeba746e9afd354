//! Helpers for tests that need real hardware, shared by every crate's
//! `hw_kvm_` tests, and the run observers the migration and snapshot
//! tests share.

/// True when `/dev/kvm` can be opened. Otherwise prints
/// `SKIP <test>: <reason>` and returns false, or panics when the
/// environment variable `PRESCIENT_REQUIRE` (a comma-separated list) names
/// `kvm`, as CI sets it: there a missing KVM is a failure, not a skip.
#[allow(clippy::print_stdout)]
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            assert!(
                !required("kvm"),
                "{test}: /dev/kvm is required (PRESCIENT_REQUIRE) but cannot be opened: {e}"
            );
            println!("SKIP {test}: /dev/kvm not present ({e})");
            false
        }
    }
}

/// True when `PRESCIENT_REQUIRE` names `what`.
pub fn required(what: &str) -> bool {
    std::env::var("PRESCIENT_REQUIRE").is_ok_and(|v| v.split(',').any(|r| r.trim() == what))
}

use crate::{LabVm, MigrationSource, RunObserver, VcpuControl};

/// An observer that does nothing (the run's own deadline and run time
/// decide when it stops).
#[derive(Debug)]
pub struct Nothing;

impl RunObserver for Nothing {}

/// Stops the VM `n` heartbeats after the first tick it sees.
#[derive(Debug)]
pub struct Heartbeats {
    n: u64,
    from: Option<u64>,
}

impl Heartbeats {
    /// Stops after `n` more heartbeats.
    pub fn new(n: u64) -> Self {
        Heartbeats { n, from: None }
    }
}

impl RunObserver for Heartbeats {
    fn tick(&mut self, _vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        let from = *self.from.get_or_insert(vcpus.heartbeats());
        vcpus.heartbeats() >= from + self.n
    }
}

/// Runs a migration source, then stops the VM once it has received
/// `more` heartbeats beyond those seen when the migration ended (or at once
/// after it moved away).
#[derive(Debug)]
pub struct RunOnAfter<'a> {
    /// The migration (its report is read after the run).
    pub mig: MigrationSource<'a>,
    more: u64,
    stop_at: Option<u64>,
}

impl<'a> RunOnAfter<'a> {
    /// Runs `mig`, then `more` heartbeats.
    pub fn new(mig: MigrationSource<'a>, more: u64) -> Self {
        RunOnAfter {
            mig,
            more,
            stop_at: None,
        }
    }
}

impl RunObserver for RunOnAfter<'_> {
    fn tick(&mut self, vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        if self.mig.tick(vm, vcpus) {
            return true;
        }
        if let Some(r) = &self.mig.report
            && self.stop_at.is_none()
        {
            self.stop_at = Some(r.heartbeats_at_end + self.more);
        }
        self.stop_at.is_some_and(|at| vcpus.heartbeats() >= at)
    }
}
