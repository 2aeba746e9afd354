//! The `labvm` binary as a user runs it.

use std::process::Command;

use labvm::linux::{Virtualisation, detect};
use labvm::testing::kvm_or_skip;

fn labvm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_labvm"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run labvm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_linux_boot_is_refused_with_reason_without_hardware_virtualisation() {
    let (code, _, err) = labvm(&["--kernel", "/nonexistent/bzImage", "--mem", "128"]);
    assert_ne!(code, 0);
    match detect() {
        Virtualisation::Hardware(_) => assert!(err.contains("cannot read"), "{err}"),
        _ => assert!(
            err.contains("cannot boot Linux on this host") && err.contains("VT-x or AMD-V"),
            "{err}"
        ),
    }
}

#[test]
fn cli_bad_workload_specs_are_rejected_with_exit_code_2() {
    for spec in [
        "bogus",
        "seq",
        "seq:x",
        "rand:8:1:2:3",
        "trace:/nonexistent",
    ] {
        let (code, _, err) = labvm(&["--workload", spec]);
        assert_eq!(code, 2, "{spec}: {err}");
        assert!(err.starts_with("labvm: "), "{spec}: {err}");
    }
}

#[test]
fn hw_kvm_cli_runs_guest_and_writes_report() {
    if !kvm_or_skip("hw_kvm_cli_runs_guest_and_writes_report") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let (code, out, err) = labvm(&[
        "--workload",
        "seq:8",
        "--mem",
        "32",
        "--vcpus",
        "2",
        "--report-json",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ready after"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["stop"]["exited"], 0);
    assert_eq!(json["vcpu_tids"].as_array().unwrap().len(), 2);
    assert!(json["time_to_ready"].as_f64().unwrap() > 0.0);

    let (code, _, err) = labvm(&["--workload", "fault-pf", "--mem", "16"]);
    assert_eq!(code, 1);
    assert!(err.contains("#PF page fault"), "{err}");
}

#[test]
fn cli_bad_balloon_workloads_and_targets_are_rejected_with_the_reason() {
    for spec in [
        "balloon",
        "balloon:x",
        "balloon:64:16:bogus",
        "balloon:64:16:grow=x",
    ] {
        let (code, _, err) = labvm(&["--workload", spec]);
        assert_eq!(code, 2, "{spec}: {err}");
        assert!(err.starts_with("labvm: "), "{spec}: {err}");
    }
    // Keeping more than it touches, or a target larger than RAM: refused
    // before the guest runs.
    let (code, _, err) = labvm(&["--mem", "64", "--workload", "balloon:16:32"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("keeps 32 MiB but touches only 16 MiB"),
        "{err}"
    );
    if kvm_or_skip("cli_bad_balloon_workloads_and_targets_are_rejected_with_the_reason") {
        let (code, _, err) = labvm(&[
            "--mem",
            "64",
            "--workload",
            "balloon:16:8",
            "--balloon-target-mib",
            "65",
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("exceeds the guest's 64 MiB"), "{err}");
    }
}

#[test]
fn cli_interruptible_without_a_save_file_is_refused_with_exit_code_2() {
    let (code, _, err) = labvm(&["--interruptible", "--workload", "dirty:100"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--save-on-interrupt"), "{err}");
}

#[test]
fn cli_restore_from_a_file_that_is_not_a_state_file_fails_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.state");
    std::fs::write(&bad, b"this is not a saved VM").expect("write");
    let (code, _, err) = labvm(&["--restore", bad.to_str().expect("utf-8 path")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a usable labvm state file"), "{err}");
    assert!(err.contains("wrong magic"), "{err}");
}
