//! The inventory served from real recordings: the GPU contract on both
//! fixtures, and what each recording is known to hold.
#![allow(clippy::unwrap_used)]

mod common;

use accel::{
    ComputeMode, FixtureSource, GpuSource, Inventory, InventoryError, SlotKind, mig_slot_id,
};
use common::{A100, T4, contract, fixture};

#[test]
fn contract_holds_for_the_a100_mig_recording() {
    contract(&FixtureSource::load(&fixture(A100)).unwrap());
}

#[test]
fn contract_holds_for_the_tesla_t4_recording() {
    contract(&FixtureSource::load(&fixture(T4)).unwrap());
}

#[test]
fn a100_recording_reads_as_published() {
    let src = FixtureSource::load(&fixture(A100)).unwrap();
    let p = &src.fixture().provenance;
    assert_eq!(p.driver_version, "535.54.03");
    assert_eq!(p.cuda_driver_version.as_deref(), Some("12.2"));
    assert_eq!(p.recorded_at, "Fri Aug  4 11:44:30 2023");
    assert_eq!(p.gpu_models, vec!["NVIDIA A100-SXM4-80GB".to_string()]);
    assert!(
        p.notes.iter().any(|n| n.contains("attached_gpus")),
        "{:?}",
        p.notes
    );
    let gpus = src.gpus().unwrap();
    assert_eq!(gpus.len(), 1);
    let g = &gpus[0];
    assert_eq!(g.uuid, "GPU-513536b6-7d19-9063-b049-1e69664bb298");
    assert_eq!(g.pci_bus_id, "0000:01:00.0");
    assert_eq!(g.numa_node, None);
    assert_eq!(
        (g.memory.total_mib, g.memory.used_mib, g.memory.free_mib),
        (81920, 50, 80999)
    );
    assert_eq!(g.utilisation, None, "N/A in MIG mode");
    assert_eq!(g.compute_mode, ComputeMode::Default);
    assert!(g.mig_enabled());
    assert_eq!(g.mig_mode.pending, Some(true));
    assert_eq!(g.mig_instances.len(), 4);
    for (i, m) in g.mig_instances.iter().enumerate() {
        assert_eq!(m.index as usize, i);
        assert_eq!(m.memory.total_mib, 19968);
        assert_eq!(m.memory.free_mib, 19955);
        assert_eq!(m.multiprocessor_count, Some(14));
    }
    assert_eq!(
        g.mig_instances
            .iter()
            .map(|m| m.gpu_instance_id)
            .collect::<Vec<_>>(),
        vec![Some(3), Some(4), Some(5), Some(6)]
    );
    assert_eq!(
        mig_slot_id(&g.uuid, &g.mig_instances[0]),
        "GPU-513536b6-7d19-9063-b049-1e69664bb298/gi3/ci0"
    );
    assert!(g.ecc.unwrap().current);
    assert_eq!(g.retired_pages, None, "N/A on Ampere");
    assert_eq!(g.remapped_rows, None, "N/A in this report");
    assert!(g.processes.is_empty());

    let inv = Inventory::read(&src).unwrap();
    let slots = inv.slots();
    assert_eq!(slots.len(), 4);
    assert!(slots.iter().all(|s| s.kind == SlotKind::Mig));
}

#[test]
fn t4_recording_reads_as_published() {
    let src = FixtureSource::load(&fixture(T4)).unwrap();
    let gpus = src.gpus().unwrap();
    assert_eq!(gpus.len(), 1);
    let g = &gpus[0];
    assert_eq!(g.name, "Tesla T4");
    assert_eq!(g.uuid, "GPU-d37e67a5-91dd-3774-a5cb-99096249601a");
    assert_eq!(
        g.pci_bus_id, "0000:00:1e.0",
        "upper-case 1E mapped to sysfs form"
    );
    assert_eq!(
        (g.memory.total_mib, g.memory.used_mib, g.memory.free_mib),
        (15360, 1032, 13939)
    );
    let u = g.utilisation.unwrap();
    assert_eq!((u.gpu_pct, u.memory_pct), (0, 0));
    assert_eq!(g.mig_mode.current, None, "no MIG on Turing");
    assert!(g.mig_instances.is_empty());
    let ecc = g.ecc.unwrap();
    assert!(ecc.current && ecc.pending);
    let r = g.retired_pages.unwrap();
    assert_eq!((r.single_bit, r.double_bit, r.pending), (0, 0, false));
    let procs: Vec<(u32, Option<u64>, Option<&str>)> = g
        .processes
        .iter()
        .map(|p| (p.pid, p.used_mib, p.kind.as_deref()))
        .collect();
    assert_eq!(
        procs,
        vec![(675, Some(22), Some("G")), (5762, Some(1005), Some("C"))]
    );
    assert_eq!(g.processes[1].name.as_deref(), Some("python"));
    assert_eq!(src.system().unwrap().driver_version, "515.105.01");
}

#[test]
fn vm_usage_attributes_gpu_processes_by_pid() {
    let src = FixtureSource::load(&fixture(T4)).unwrap();
    let inv = Inventory::read(&src).unwrap();
    // The CUDA process is the VM's (say, its QEMU process).
    let u = inv.vm_usage(&[5762, 99_999]);
    assert_eq!(u.mem_mib, 1005);
    assert_eq!(
        u.per_gpu,
        vec![("GPU-d37e67a5-91dd-3774-a5cb-99096249601a".to_string(), 1005)]
    );
    assert_eq!(
        u.sm_util_pct, None,
        "nvidia-smi XML has no per-process utilisation"
    );
    let both = inv.vm_usage(&[675, 5762]);
    assert_eq!(both.mem_mib, 1027);
    assert_eq!(inv.vm_usage(&[1]).mem_mib, 0);
    assert!(inv.vm_usage(&[1]).per_gpu.is_empty());
    // A fresh sample through the source agrees with the reading.
    assert_eq!(inv.sample_vm(&src, &[5762]).unwrap(), u);
}

#[test]
fn json_fixture_of_another_version_or_format_is_refused() {
    let src = FixtureSource::load(&fixture(T4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut f = src.fixture().clone();
    f.version = 99;
    let p = dir.path().join("v99.json");
    std::fs::write(&p, f.to_json()).unwrap();
    let e = FixtureSource::load(&p).unwrap_err().to_string();
    assert!(e.contains("version 99"), "{e}");

    let mut f = src.fixture().clone();
    f.format = "something-else".to_string();
    std::fs::write(&p, f.to_json()).unwrap();
    let e = FixtureSource::load(&p).unwrap_err().to_string();
    assert!(e.contains("something-else"), "{e}");

    let mut f = src.fixture().clone();
    f.snapshot.gpus[0].memory.used_mib = 1 << 40;
    std::fs::write(&p, f.to_json()).unwrap();
    let e = FixtureSource::load(&p).unwrap_err().to_string();
    assert!(e.contains("memory does not add up"), "{e}");

    let mut f = src.fixture().clone();
    let dup = f.snapshot.gpus[0].clone();
    f.snapshot.gpus.push(dup);
    std::fs::write(&p, f.to_json()).unwrap();
    let e = FixtureSource::load(&p).unwrap_err().to_string();
    assert!(e.contains("two GPUs"), "{e}");
}

#[test]
fn missing_fixture_file_names_the_path() {
    let e = FixtureSource::load(std::path::Path::new("/nonexistent/gpu.xml")).unwrap_err();
    assert!(matches!(e, InventoryError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/gpu.xml"), "{e}");
}

#[test]
fn inventory_table_shows_every_gpu_instance_and_process() {
    let a100 = Inventory::read(&FixtureSource::load(&fixture(A100)).unwrap()).unwrap();
    let t = a100.table();
    assert!(t.contains("NVIDIA A100-SXM4-80GB"), "{t}");
    assert_eq!(
        t.lines().filter(|l| l.starts_with("  mig ")).count(),
        4,
        "{t}"
    );
    let t4 = Inventory::read(&FixtureSource::load(&fixture(T4)).unwrap()).unwrap();
    let t = t4.table();
    assert!(t.contains("pid 5762"), "{t}");
    assert!(t.contains("0+0 pages"), "{t}");
    assert!(t4.summary().starts_with("1 GPU(s), driver 515.105.01"));
}
