#![allow(clippy::unwrap_used)]
//! `prescient bench offload` and `--gpu` through the real binary: without a
//! GPU (the default build, or no adapter) the CPU column is measured and the
//! GPU column says why it is missing; with one, its outputs agree.

use std::process::Command;

#[test]
fn bench_offload_measures_cpu_and_reports_the_gpu_honestly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args([
            "bench",
            "offload",
            "--vms",
            "100,300",
            "--train-examples",
            "1024",
            "--batch",
            "256",
            "--hidden",
            "16",
            "--reps",
            "1",
            "--no-calibrate",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("| inference | 100 VMs |"), "{stdout}");
    assert!(stdout.contains("| inference | 300 VMs |"), "{stdout}");
    assert!(
        stdout.contains("training epoch (256/batch) | 1024 examples"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("offload.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        assert!(r["cpu_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    match models::open_gpu() {
        Err(why) => {
            assert!(
                stdout.contains(&format!("GPU: unsupported here: {why}")),
                "{stdout}"
            );
            assert!(stdout.contains("crossover: not measured (no GPU here)"));
            assert!(json["gpu"].is_null());
            for r in rows {
                assert!(r["gpu_ms"].is_null() && r["max_rel_err"].is_null(), "{r}");
            }
        }
        Ok(_) => {
            for r in rows {
                assert!(r["gpu_ms"].as_f64().unwrap() > 0.0, "{r}");
                assert!(r["max_rel_err"].as_f64().unwrap() < 1e-3, "{r}");
            }
        }
    }
}

#[test]
fn gpu_mode_other_than_auto_off_on_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["train", "--gpu", "maybe", "nothing.csv.gz"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected auto, off or on"), "{stderr}");
}
