//! The reservation ledger on real SQLite files: persistence across reopen,
//! exclusivity across two connections, reconciliation with the inventory
//! read from the real recordings, release on stop and on a failed restart.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use accel::{
    Demand, Enforcement, FixtureSource, Inventory, Ledger, LedgerError, NodeDistances,
    PlacementError, ReleaseReason, Reservation, STORE_APPLICATION_ID, SlotKind,
};
use common::{A100, T4, fixture};
use rusqlite::Connection;

const T4_UUID: &str = "GPU-d37e67a5-91dd-3774-a5cb-99096249601a";
const A100_UUID: &str = "GPU-513536b6-7d19-9063-b049-1e69664bb298";

/// A host with the recorded A100 (MIG, node 1) and the recorded T4 (node 0).
fn host() -> Inventory {
    let mut a100 = Inventory::read(&FixtureSource::load(&fixture(A100)).unwrap()).unwrap();
    let t4 = Inventory::read(&FixtureSource::load(&fixture(T4)).unwrap()).unwrap();
    a100.gpus[0].numa_node = Some(1);
    let mut t4g = t4.gpus[0].clone();
    t4g.numa_node = Some(0);
    t4g.index = 1;
    a100.gpus.push(t4g);
    a100.source = "fixtures".to_string();
    a100
}

/// An empty file marked as a Prescient store, as `ProfileStore::open`
/// leaves it (the cross-crate test in the root package uses the real one).
fn store_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("prescient.db");
    let c = Connection::open(&p).unwrap();
    c.pragma_update(None, "application_id", STORE_APPLICATION_ID)
        .unwrap();
    c.pragma_update(None, "user_version", 1).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    p
}

fn demand(vm: &str, mem: u64, node: Option<u32>, exclusive: bool) -> Demand {
    Demand {
        vm: vm.to_string(),
        mem_mib: mem,
        numa_node: node,
        exclusive,
    }
}

fn at(s: u64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_365_586 + s)
}

#[test]
fn reservations_survive_reopen_and_leave_the_store_version_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_file(dir.path());
    let inv = host();
    let d = NodeDistances::from_rows(vec![vec![10, 21], vec![21, 10]]);
    {
        let mut l = Ledger::open(&path).unwrap();
        // Near node 1, fits a MIG instance: the A100's first instance.
        let r = l
            .reserve(
                &inv,
                &demand("train-1", 12_000, Some(1), true),
                None,
                &d,
                at(0),
            )
            .unwrap();
        assert_eq!(r.device_id, format!("{A100_UUID}/gi3/ci0"));
        assert_eq!(r.kind, SlotKind::Mig);
        assert_eq!(r.numa_node, Some(1));
        assert_eq!(r.created_at, "2026-11-22T16:39:46Z");
        // Near node 0: the T4 (13939 MiB free), shared, with a vGPU profile.
        let r = l
            .reserve(
                &inv,
                &demand("infer-1", 4_000, Some(0), false),
                Some("nvidia-222"),
                &d,
                at(1),
            )
            .unwrap();
        assert_eq!(r.device_id, T4_UUID);
        assert_eq!(r.mdev_profile.as_deref(), Some("nvidia-222"));
    }
    let l = Ledger::open(&path).unwrap();
    let rs = l.reservations().unwrap();
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0].vm, "infer-1");
    assert_eq!(rs[0].mem_mib, 4_000);
    assert!(!rs[0].exclusive);
    assert_eq!(rs[1].vm, "train-1");
    assert!(rs[1].exclusive);
    let c = Connection::open(&path).unwrap();
    let v: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(
        v, 1,
        "the store's schema version is not the ledger's to change"
    );
    let mode: String = c
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn two_connections_never_hold_the_same_device_exclusively() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_file(dir.path());
    // Only the T4.
    let mut inv = host();
    inv.gpus.remove(0);
    let d = NodeDistances::default();
    let mut a = Ledger::open(&path).unwrap();
    let mut b = Ledger::open(&path).unwrap();
    a.reserve(&inv, &demand("vm-a", 1_000, None, true), None, &d, at(0))
        .unwrap();
    let e = b
        .reserve(&inv, &demand("vm-b", 1_000, None, true), None, &d, at(1))
        .unwrap_err();
    match e {
        LedgerError::Placement {
            vm,
            source: PlacementError::NoFit {
                exclusive: true, ..
            },
        } => {
            assert_eq!(vm, "vm-b");
        }
        other => panic!("{other:?}"),
    }
    // A shared demand is refused as well: the holder is exclusive.
    assert!(
        b.reserve(&inv, &demand("vm-c", 10, None, false), None, &d, at(2))
            .is_err()
    );
    // An explicit hold that overlaps is a conflict naming the holder.
    let manual = Reservation {
        vm: "vm-d".to_string(),
        device_id: T4_UUID.to_string(),
        parent_uuid: T4_UUID.to_string(),
        kind: SlotKind::Gpu,
        exclusive: false,
        mem_mib: 1,
        mdev_profile: None,
        numa_node: None,
        created_at: "2026-11-22T00:00:00Z".to_string(),
    };
    match b.hold(&manual).unwrap_err() {
        LedgerError::Conflict {
            holder, exclusive, ..
        } => {
            assert_eq!(holder, "vm-a");
            assert!(exclusive);
        }
        other => panic!("{other:?}"),
    }
    // Stopping vm-a frees the device for the other connection.
    let gone = a.release("vm-a", ReleaseReason::Stopped).unwrap();
    assert_eq!(gone.len(), 1);
    b.reserve(&inv, &demand("vm-b", 1_000, None, true), None, &d, at(3))
        .unwrap();
    assert_eq!(a.reservations().unwrap()[0].vm, "vm-b");
}

#[test]
fn shared_reservations_add_up_to_at_most_the_free_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_file(dir.path());
    let mut inv = host();
    inv.gpus.remove(0);
    let d = NodeDistances::default();
    let mut l = Ledger::open(&path).unwrap();
    // The T4 has 13939 MiB free.
    l.reserve(&inv, &demand("a", 8_000, None, false), None, &d, at(0))
        .unwrap();
    l.reserve(&inv, &demand("b", 5_939, None, false), None, &d, at(1))
        .unwrap();
    let e = l
        .reserve(&inv, &demand("c", 1, None, false), None, &d, at(2))
        .unwrap_err();
    assert!(
        matches!(
            &e,
            LedgerError::Placement {
                source: PlacementError::NoFit {
                    largest_free_mib: 0,
                    ..
                },
                ..
            }
        ),
        "{e:?}"
    );
    // Holding the same device twice for one VM is refused.
    let again = l.reservations().unwrap()[0].clone();
    assert!(matches!(
        l.hold(&again),
        Err(LedgerError::AlreadyHeld { .. })
    ));
    // A second reservation of a VM goes to another device: the A100's MIG
    // instances, though the T4 it holds is on its node.
    l.release("b", ReleaseReason::Operator).unwrap();
    let full = host();
    l.reserve(&full, &demand("a", 100, Some(0), false), None, &d, at(3))
        .unwrap();
    let held: Vec<String> = l
        .reservations()
        .unwrap()
        .into_iter()
        .filter(|r| r.vm == "a")
        .map(|r| r.device_id)
        .collect();
    assert_eq!(held.len(), 2);
    assert_eq!(held[0], format!("{A100_UUID}/gi3/ci0"));
    assert_eq!(held[1], T4_UUID);
}

#[test]
fn reconcile_drops_vanished_devices_and_reports_unknown_vms() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_file(dir.path());
    let inv = host();
    let d = NodeDistances::default();
    {
        let mut l = Ledger::open(&path).unwrap();
        l.reserve(
            &inv,
            &demand("mig-vm", 10_000, Some(1), false),
            None,
            &d,
            at(0),
        )
        .unwrap();
        l.reserve(
            &inv,
            &demand("t4-vm", 13_000, Some(0), true),
            None,
            &d,
            at(1),
        )
        .unwrap();
        l.reserve(
            &inv,
            &demand("gone-vm", 100, Some(1), false),
            None,
            &d,
            at(2),
        )
        .unwrap();
    }
    // After a restart of the host: the T4 is gone, and gone-vm did not come back.
    let mut after = inv.clone();
    after.gpus.retain(|g| g.uuid != T4_UUID);
    let mut l = Ledger::open(&path).unwrap();
    let report = l.reconcile(&after, Some(&["mig-vm", "t4-vm"])).unwrap();
    assert_eq!(report.dropped.len(), 1);
    assert_eq!(report.dropped[0].0.vm, "t4-vm");
    assert!(
        report.dropped[0].1.contains("gone from the host"),
        "{}",
        report.dropped[0].1
    );
    assert_eq!(
        report
            .unknown_vms
            .iter()
            .map(|r| r.vm.as_str())
            .collect::<Vec<_>>(),
        ["gone-vm"]
    );
    assert_eq!(
        report
            .kept
            .iter()
            .map(|r| r.vm.as_str())
            .collect::<Vec<_>>(),
        ["mig-vm"]
    );
    drop(l);
    // The drop is persistent; the unknown VM's reservation is kept.
    let l = Ledger::open(&path).unwrap();
    let vms: Vec<String> = l
        .reservations()
        .unwrap()
        .into_iter()
        .map(|r| r.vm)
        .collect();
    assert_eq!(vms, ["gone-vm", "mig-vm"]);

    // MIG turned off on the A100: its instances are gone though the GPU is not.
    let mut no_mig = inv.clone();
    no_mig.gpus[0].mig_mode.current = Some(false);
    no_mig.gpus[0].mig_instances.clear();
    let mut l = Ledger::open(&path).unwrap();
    let report = l.reconcile(&no_mig, None).unwrap();
    assert_eq!(report.dropped.len(), 2);
    assert!(
        report.dropped[0].1.contains("MIG layout changed"),
        "{}",
        report.dropped[0].1
    );
    assert!(l.reservations().unwrap().is_empty());
}

#[test]
fn release_on_restart_failure_frees_every_device_of_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_file(dir.path());
    let inv = host();
    let d = NodeDistances::default();
    let mut l = Ledger::open(&path).unwrap();
    l.reserve(&inv, &demand("big", 15_000, Some(1), true), None, &d, at(0))
        .unwrap();
    l.reserve(&inv, &demand("big", 15_000, Some(1), true), None, &d, at(1))
        .unwrap();
    l.reserve(&inv, &demand("other", 100, None, false), None, &d, at(2))
        .unwrap();
    let gone = l.release("big", ReleaseReason::Failed).unwrap();
    assert_eq!(gone.len(), 2);
    assert!(gone.iter().all(|r| r.kind == SlotKind::Mig));
    assert_eq!(l.reservations().unwrap().len(), 1);
    assert!(
        l.release("nobody", ReleaseReason::Operator)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_file_that_is_not_a_prescient_store_is_refused_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let e = Ledger::open(&missing).unwrap_err();
    assert!(matches!(e, LedgerError::NotAStore { .. }), "{e:?}");
    assert!(!missing.exists(), "opening must not create a file");

    let other = dir.path().join("other.db");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x INTEGER);")
        .unwrap();
    let e = Ledger::open(&other).unwrap_err().to_string();
    assert!(
        e.contains("not a Prescient store (application_id 0x0)"),
        "{e}"
    );

    let garbage = dir.path().join("garbage.db");
    std::fs::write(
        &garbage,
        b"this is not sqlite, just some bytes to read........",
    )
    .unwrap();
    let e = Ledger::open(&garbage).unwrap_err().to_string();
    assert!(e.contains("garbage.db"), "{e}");
}

#[test]
fn ledger_tables_of_another_version_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_file(dir.path());
    drop(Ledger::open(&path).unwrap());
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE gpu_ledger_meta SET value = 7 WHERE key = 'version'",
            [],
        )
        .unwrap();
    match Ledger::open(&path).unwrap_err() {
        LedgerError::Version {
            found: 7,
            expected: 1,
        } => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn corrupt_rows_are_reported_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_file(dir.path());
    let l = Ledger::open(&path).unwrap();
    let c = Connection::open(&path).unwrap();
    // The CHECK constraints refuse a bad kind or negative memory outright.
    assert!(
        c.execute(
            "INSERT INTO gpu_reservations VALUES ('v', 'd', 'p', 'tpu', 0, 1, NULL, NULL, 't')",
            []
        )
        .is_err()
    );
    c.execute(
        "INSERT INTO gpu_reservations VALUES ('v', 'd', 'p', 'gpu', 0, 1, NULL, -4, 't')",
        [],
    )
    .unwrap();
    let e = l.reservations().unwrap_err().to_string();
    assert!(e.contains("NUMA node"), "{e}");
}

#[test]
fn enforcement_is_off_unless_asked_and_then_unsupported() {
    let r = Reservation {
        vm: "vm".to_string(),
        device_id: T4_UUID.to_string(),
        parent_uuid: T4_UUID.to_string(),
        kind: SlotKind::Gpu,
        exclusive: true,
        mem_mib: 1,
        mdev_profile: None,
        numa_node: None,
        created_at: "t".to_string(),
    };
    let off = Enforcement::default().apply(&r).unwrap();
    assert!(off.starts_with("enforcement is off"), "{off}");
    let e = Enforcement { enabled: true }
        .apply(&r)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("GPU enforcement unsupported here"), "{e}");
}
