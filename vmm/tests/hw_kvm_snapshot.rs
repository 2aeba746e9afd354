//! Interrupting a lab VM: pause, save to a file, restore from it and resume,
//! on real KVM. Each test prints `SKIP` and returns when /dev/kvm is absent,
//! unless `PRESCIENT_REQUIRE=kvm` makes that a failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use labvm::testing::{Heartbeats, kvm_or_skip};
use labvm::{
    BalloonConfig, LabVm, LabVmConfig, RunObserver, SaveReport, SnapshotError, StopReason,
    VcpuControl, Workload, restore_from_file, save_to_file,
};
use vm_memory::{Bytes, GuestAddress};

fn dirty_config() -> LabVmConfig {
    let mut c = LabVmConfig::new(
        64,
        Workload::Dirty {
            pages_per_sec: 5000,
            region_mib: 16,
            heartbeat_ms: 20,
        },
    );
    c.balloon = Some(BalloonConfig::default());
    c
}

/// Saves the VM to `path` after `after` heartbeats, then stops it.
struct SaveAfter<'a> {
    path: &'a Path,
    after: u64,
    report: Option<SaveReport>,
}

impl RunObserver for SaveAfter<'_> {
    fn tick(&mut self, vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        if vcpus.heartbeats() < self.after {
            return false;
        }
        self.report = Some(save_to_file(vm, vcpus, self.path, Duration::from_secs(20)).unwrap());
        true
    }
}

fn memory(vm: &LabVm) -> Vec<u8> {
    let mut m = vec![0u8; 64 << 20];
    vm.memory().read_slice(&mut m, GuestAddress(0)).unwrap();
    m
}

#[test]
fn hw_kvm_saved_dirty_guest_restores_and_keeps_counting() {
    if !kvm_or_skip("hw_kvm_saved_dirty_guest_restores_and_keeps_counting") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.state");
    let mut vm = LabVm::create(dirty_config(), Instant::now()).unwrap();
    vm.balloon().unwrap().set_target_mib(8).unwrap();
    let mut obs = SaveAfter {
        path: &path,
        after: 10,
        report: None,
    };
    let src = vm.run(&mut obs).unwrap();
    assert_eq!(src.stop, StopReason::Stopped);
    let saved = obs.report.unwrap();
    let at_save = memory(&vm);
    eprintln!("{saved:?}");
    // The guest did not run after the save: its counter is the saved one.
    assert_eq!(saved.counter, src.counter);
    assert!(saved.pages > 0 && saved.bytes > saved.pages * 4096);
    assert!(!dir.path().join("vm.state.tmp").exists());

    let restored = restore_from_file(&path).unwrap();
    assert_eq!(restored.counter, saved.counter);
    let mut vm2 = restored.vm;
    // Every page as it was when saved.
    assert!(memory(&vm2) == at_save, "memory differs after restore");
    // The balloon came back with its target.
    assert_eq!(vm2.balloon().unwrap().target_mib(), 8);
    let dst = vm2.run(&mut Heartbeats::new(10)).unwrap();
    assert_eq!(dst.stop, StopReason::Stopped);
    // The counter continued from the saved value, and heartbeats carried on.
    assert!(dst.counter.unwrap() > saved.counter.unwrap(), "{dst:?}");
    assert!(dst.heartbeats >= src.heartbeats + 10);
}

fn corrupt(path: &Path, at: usize, bytes: &[u8]) -> std::path::PathBuf {
    let mut data = std::fs::read(path).unwrap();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    let out = path.with_extension("bad");
    std::fs::write(&out, data).unwrap();
    out
}

#[test]
fn hw_kvm_damaged_state_files_are_refused_with_the_reason() {
    if !kvm_or_skip("hw_kvm_damaged_state_files_are_refused_with_the_reason") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.state");
    let mut vm = LabVm::create(dirty_config(), Instant::now()).unwrap();
    let mut obs = SaveAfter {
        path: &path,
        after: 3,
        report: None,
    };
    vm.run(&mut obs).unwrap();
    let data = std::fs::read(&path).unwrap();
    let hlen = u32::from_le_bytes(data[12..16].try_into().unwrap()) as usize;
    let first_run = 16 + hlen;
    let reason = |p: &Path| match restore_from_file(p) {
        Err(SnapshotError::Format { reason, .. }) => reason,
        other => panic!("expected a format error, got {other:?}"),
    };
    // A page run outside guest RAM.
    let p = corrupt(&path, first_run, &(1u64 << 40).to_le_bytes());
    assert!(reason(&p).contains("outside"), "{}", reason(&p));
    // A run that is not page aligned.
    let p = corrupt(&path, first_run, &7u64.to_le_bytes());
    assert!(reason(&p).contains("bad page run"));
    // Truncated inside the page data.
    let t = dir.path().join("truncated");
    std::fs::write(&t, &data[..data.len() - 100]).unwrap();
    assert!(reason(&t).contains("truncated"));
    // Bytes after the end marker.
    let x = dir.path().join("trailing");
    let mut f = std::fs::File::create(&x).unwrap();
    f.write_all(&data).unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    assert!(reason(&x).contains("after the end"));
}
