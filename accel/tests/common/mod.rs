//! The GPU source contract, written once: run against the recorded
//! fixtures in every test run and against the live NVML backend in the
//! `hw_gpu_` tests. Every check only reads.
#![allow(dead_code, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use accel::{
    FixtureSource, GpuSource, Inventory, InventoryError, NvmlSource, SlotKind, record, sysfs_bdf,
};

/// The fixtures shipped with the crate.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

pub const A100: &str = "a100-sxm4-80gb-mig.xml";
pub const T4: &str = "tesla-t4.xml";

/// True when `PRESCIENT_REQUIRE` (comma-separated) names `what`.
pub fn required(what: &str) -> bool {
    std::env::var("PRESCIENT_REQUIRE").is_ok_and(|v| v.split(',').any(|r| r.trim() == what))
}

/// The live NVML backend, or `None` after printing `SKIP <test>: no NVIDIA
/// driver (...)`; with `PRESCIENT_REQUIRE=gpu` a missing driver fails.
pub fn nvml_or_skip(test: &str) -> Option<NvmlSource> {
    match NvmlSource::open() {
        Ok(n) => Some(n),
        Err(e @ InventoryError::NoDriver { .. }) => {
            assert!(
                !required("gpu"),
                "{test}: a GPU is required (PRESCIENT_REQUIRE=gpu) but: {e}"
            );
            println!("SKIP {test}: {e}");
            None
        }
        Err(e) => panic!("{test}: NVML is present but failed: {e:?}"),
    }
}

/// Everything a `GpuSource` must satisfy.
pub fn contract(source: &dyn GpuSource) {
    let label = source.label();
    assert!(!label.is_empty());

    let system = source.system().unwrap();
    assert!(
        !system.driver_version.is_empty(),
        "{label}: empty driver version"
    );

    let gpus = source.gpus().unwrap();
    for (i, g) in gpus.iter().enumerate() {
        let at = format!("{label} GPU {i}");
        assert_eq!(g.index as usize, i, "{at}: indices in order");
        assert!(g.uuid.starts_with("GPU-"), "{at}: UUID {:?}", g.uuid);
        assert!(!g.name.is_empty(), "{at}: no name");
        assert_eq!(
            sysfs_bdf(&g.pci_bus_id).unwrap(),
            g.pci_bus_id,
            "{at}: PCI address in sysfs form"
        );
        let m = g.memory;
        assert!(m.total_mib > 0, "{at}: no memory");
        assert!(
            m.used_mib <= m.total_mib && m.free_mib <= m.total_mib,
            "{at}: {m:?}"
        );
        assert!(
            m.used_mib + m.free_mib <= m.total_mib,
            "{at}: used + free > total: {m:?}"
        );
        if let Some(u) = g.utilisation {
            assert!(u.gpu_pct <= 100 && u.memory_pct <= 100, "{at}: {u:?}");
        }
        if !g.mig_enabled() {
            assert!(
                g.mig_instances.is_empty(),
                "{at}: MIG instances with MIG off"
            );
        }
        let mig_total: u64 = g.mig_instances.iter().map(|i| i.memory.total_mib).sum();
        assert!(
            mig_total <= m.total_mib,
            "{at}: MIG instances exceed the GPU"
        );
        for inst in &g.mig_instances {
            let im = inst.memory;
            assert!(
                im.used_mib + im.free_mib <= im.total_mib,
                "{at}: MIG {im:?}"
            );
        }
        for p in &g.processes {
            assert!(p.pid > 0, "{at}: pid 0");
            if let Some(mib) = p.used_mib {
                assert!(mib <= m.total_mib, "{at}: process {} uses {mib} MiB", p.pid);
            }
        }
        if let Some(ecc) = g.ecc {
            // Retired pages and remapped rows are only counted with ECC on.
            if !ecc.current {
                assert!(
                    g.retired_pages
                        .is_none_or(|r| r.single_bit + r.double_bit == 0)
                );
            }
        }
        // A fresh process reading of the same GPU works.
        source.processes(&g.uuid).unwrap();
    }
    let mut uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
    uuids.sort_unstable();
    uuids.dedup();
    assert_eq!(uuids.len(), gpus.len(), "{label}: duplicate UUIDs");

    // An unknown GPU is an error naming it, not an empty list.
    match source.processes("GPU-00000000-0000-0000-0000-000000000000") {
        Err(InventoryError::UnknownGpu { uuid }) => assert!(uuid.ends_with("0000")),
        other => panic!("{label}: unknown GPU gave {other:?}"),
    }

    // Identity is stable between readings.
    let again = source.gpus().unwrap();
    let ident = |v: &[accel::GpuReading]| -> Vec<(String, String, String)> {
        v.iter()
            .map(|g| (g.uuid.clone(), g.name.clone(), g.pci_bus_id.clone()))
            .collect()
    };
    assert_eq!(ident(&gpus), ident(&again), "{label}: identity changed");

    // The inventory offers each GPU whole, or its MIG instances.
    let inv = Inventory::read(source).unwrap();
    let slots = inv.slots();
    let expected: usize = gpus
        .iter()
        .map(|g| {
            if g.mig_enabled() {
                g.mig_instances.len()
            } else {
                1
            }
        })
        .sum();
    assert_eq!(slots.len(), expected, "{label}: slots");
    for s in &slots {
        assert!(s.free_mib <= s.total_mib);
        assert_eq!(s.kind == SlotKind::Mig, s.id != s.parent_uuid);
    }
    assert!(inv.summary().contains(&system.driver_version) || gpus.is_empty());

    // Recording it gives a fixture that serves the same readings.
    let now = UNIX_EPOCH + Duration::from_secs(1_795_365_586);
    let f = record(source, now, Some("contract-host".to_string())).unwrap();
    assert_eq!(f.provenance.recorded_at, "2026-11-22T16:39:46Z");
    assert_eq!(f.provenance.driver_version, system.driver_version);
    assert_eq!(f.provenance.gpu_models.len(), gpus.len());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fixture.json");
    std::fs::write(&path, f.to_json()).unwrap();
    let replay = FixtureSource::load(&path).unwrap();
    assert_eq!(replay.system().unwrap(), system);
    assert_eq!(ident(&replay.gpus().unwrap()), ident(&gpus));
    assert_eq!(
        replay.fixture().provenance.hostname.as_deref(),
        Some("contract-host")
    );
}
