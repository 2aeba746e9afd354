//! The GPU contract against the live driver (NVML). On a host without the
//! NVIDIA driver each test prints `SKIP hw_gpu_…: no NVIDIA driver (…)`;
//! with `PRESCIENT_REQUIRE=gpu` that is a failure. Only reads: no setter is
//! called (compute mode, clocks, persistence, MIG, ECC, reset).
//!
//! On a GPU host: `PRESCIENT_REQUIRE=gpu cargo test -p accel --test hw_gpu -- --nocapture`
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::SystemTime;

use accel::{FixtureSource, GpuSource, Inventory, InventoryError, NvmlSource, record};
use common::{contract, nvml_or_skip};

#[test]
fn hw_gpu_nvml_backend_meets_the_contract() {
    let Some(nvml) = nvml_or_skip("hw_gpu_nvml_backend_meets_the_contract") else {
        return;
    };
    contract(&nvml);
    let inv = Inventory::read(&nvml).unwrap();
    println!("{}", inv.table());
}

#[test]
fn hw_gpu_probe_reads_every_gpu() {
    let Some(nvml) = nvml_or_skip("hw_gpu_probe_reads_every_gpu") else {
        return;
    };
    let inv = Inventory::probe().unwrap();
    assert_eq!(inv.source, "nvml");
    assert_eq!(inv.gpus.len(), nvml.gpus().unwrap().len());
    println!("{}", inv.summary());
}

/// The live reading and `nvidia-smi -q -x` (read through the fixture
/// loader) agree on what does not change between two reads.
#[test]
fn hw_gpu_nvml_agrees_with_nvidia_smi_xml() {
    let test = "hw_gpu_nvml_agrees_with_nvidia_smi_xml";
    let Some(nvml) = nvml_or_skip(test) else {
        return;
    };
    let out = match std::process::Command::new("nvidia-smi")
        .args(["-q", "-x"])
        .output()
    {
        Ok(o) if o.status.success() => o.stdout,
        other => {
            println!("SKIP {test}: nvidia-smi did not run ({other:?})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpu.xml");
    std::fs::write(&path, out).unwrap();
    let smi = FixtureSource::load(&path).unwrap();
    let live = nvml.gpus().unwrap();
    let xml = smi.gpus().unwrap();
    assert_eq!(live.len(), xml.len());
    for (l, x) in live.iter().zip(&xml) {
        assert_eq!(l.uuid, x.uuid);
        assert_eq!(l.name, x.name);
        assert_eq!(l.pci_bus_id, x.pci_bus_id);
        assert_eq!(l.memory.total_mib, x.memory.total_mib);
        assert_eq!(l.compute_mode, x.compute_mode);
        assert_eq!(l.mig_mode.current, x.mig_mode.current);
        assert_eq!(l.mig_instances.len(), x.mig_instances.len());
        assert_eq!(l.ecc.map(|e| e.current), x.ecc.map(|e| e.current));
    }
    assert_eq!(
        nvml.system().unwrap().driver_version,
        smi.system().unwrap().driver_version
    );
}

/// What `prescient gpu record` does: a recording of this host, printed so
/// it can be kept as a fixture.
#[test]
fn hw_gpu_record_this_host() {
    let Some(nvml) = nvml_or_skip("hw_gpu_record_this_host") else {
        return;
    };
    let f = record(&nvml, SystemTime::now(), accel::hostname()).unwrap();
    assert_eq!(f.snapshot.gpus.len(), f.provenance.gpu_models.len());
    assert!(f.provenance.nvml_version.is_some());
    println!("{}", f.to_json());
}

/// Without the driver the probe says so in one line, and nothing else
/// fails (this runs everywhere; on a GPU host it checks the opposite).
#[test]
fn probe_without_driver_is_one_clear_line() {
    match NvmlSource::open() {
        Err(e @ InventoryError::NoDriver { .. }) => {
            let msg = e.to_string();
            assert!(msg.starts_with("no NVIDIA driver ("), "{msg}");
            assert!(!msg.contains('\n'));
            assert_eq!(Inventory::probe().unwrap_err().to_string(), msg);
            if std::path::Path::new("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1").exists() {
                assert!(msg.contains("driver is not loaded"), "{msg}");
            } else {
                assert_eq!(msg, "no NVIDIA driver (libnvidia-ml.so.1 not found)");
            }
        }
        Ok(n) => assert!(!n.system().unwrap().driver_version.is_empty()),
        Err(e) => panic!("NVML present but failing: {e:?}"),
    }
}
