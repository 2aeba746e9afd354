//! `prescient gpu …` and the daemon's GPU probe, end to end: the real
//! binary, the real profile store file, the real recordings in
//! `accel/fixtures/`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Server;
use prescient::{ProfileStore, StorePolicy};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("accel/fixtures")
        .join(name)
}

fn gpu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prescient"))
        .arg("gpu")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn nvml_present() -> bool {
    accel::NvmlSource::open().is_ok()
}

#[test]
fn serve_logs_the_gpus_once_and_the_ledger_shares_its_store() {
    let server = Server::start();
    // One round trip first: SIGTERM before the daemon's signal handlers are
    // installed would kill it.
    let mut hook =
        vmm_hooks::SocketHook::new(vmm_hooks::SocketHookConfig::new(&server.socket, "test"));
    vmm_hooks::LifecycleHook::on_event(
        &mut hook,
        &vmm_hooks::Event {
            vm: vmm_hooks::VmIdentity {
                vm_id: "none".into(),
                image_digest: "img".into(),
                package_digest: "pkg".into(),
            },
            seq: 0,
            at_unix_ms: 1,
            kind: vmm_hooks::EventKind::Stopped {
                status: vmm_hooks::StopStatus::Stopped,
            },
        },
    );
    let log = server.stop();
    let gpu_lines: Vec<&str> = log.lines().filter(|l| l.contains("GPUs: ")).collect();
    assert_eq!(gpu_lines.len(), 1, "{log}");
    if !nvml_present() {
        assert!(
            gpu_lines[0].contains("INFO")
                && gpu_lines[0].ends_with("GPUs: no NVIDIA driver (libnvidia-ml.so.1 not found)"),
            "{}",
            gpu_lines[0]
        );
    }
    // A store as the daemon creates it.
    let kept = tempfile::tempdir().unwrap();
    let db = kept.path().join("store.db");
    drop(ProfileStore::open(&db, StorePolicy::default()).unwrap());
    let db_s = db.to_str().unwrap();
    let t4 = fixture("tesla-t4.xml");
    let t4_s = t4.to_str().unwrap();

    let out = stdout(&gpu(&[
        "reserve",
        "--store",
        db_s,
        "--vm",
        "web-1",
        "--mem-mib",
        "900",
        "--exclusive",
        "--mdev-profile",
        "nvidia-222",
        "--fixture",
        t4_s,
    ]));
    assert!(
        out.contains("GPU-d37e67a5-91dd-3774-a5cb-99096249601a"),
        "{out}"
    );
    assert!(out.contains("nvidia-222"), "{out}");
    assert!(out.contains("enforcement is off"), "{out}");
    // Enforcement asked for: refused, and nothing recorded.
    let enforced = gpu(&[
        "reserve",
        "--store",
        db_s,
        "--vm",
        "web-9",
        "--mem-mib",
        "1",
        "--enforce",
        "--fixture",
        t4_s,
    ]);
    assert!(!enforced.status.success());
    let err = String::from_utf8_lossy(&enforced.stderr);
    assert!(err.contains("GPU enforcement unsupported here"), "{err}");

    let second = gpu(&[
        "reserve",
        "--store",
        db_s,
        "--vm",
        "web-2",
        "--mem-mib",
        "900",
        "--fixture",
        t4_s,
    ]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("no GPU for VM web-2: no device has 900 MiB free"),
        "{err}"
    );

    let rs: serde_json::Value =
        serde_json::from_str(&stdout(&gpu(&["reservations", "--store", db_s, "--json"]))).unwrap();
    assert_eq!(rs.as_array().unwrap().len(), 1);
    assert_eq!(rs[0]["vm"], "web-1");
    assert_eq!(rs[0]["exclusive"], true);

    // The profile store still opens: same application id, same schema version.
    ProfileStore::open(&db, StorePolicy::default()).unwrap();

    let out = stdout(&gpu(&["release", "--store", db_s, "--vm", "web-1"]));
    assert!(out.contains("released 1 reservation(s) of web-1"), "{out}");
    let table = stdout(&gpu(&["reservations", "--store", db_s]));
    assert_eq!(table.lines().count(), 1, "only the header: {table}");
}

#[test]
fn gpu_inventory_prints_a_recording_as_a_table_and_as_json() {
    let a100 = fixture("a100-sxm4-80gb-mig.xml");
    let table = stdout(&gpu(&["inventory", "--fixture", a100.to_str().unwrap()]));
    assert!(table.contains("NVIDIA A100-SXM4-80GB"), "{table}");
    assert!(table.contains("driver 535.54.03"), "{table}");
    assert_eq!(table.lines().filter(|l| l.starts_with("  mig ")).count(), 4);
    let json: serde_json::Value = serde_json::from_str(&stdout(&gpu(&[
        "inventory",
        "--fixture",
        a100.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(
        json["gpus"][0]["mig_instances"].as_array().unwrap().len(),
        4
    );
    assert_eq!(json["gpus"][0]["pci_bus_id"], "0000:01:00.0");
}

#[test]
fn gpu_record_turns_an_nvidia_smi_report_into_a_fixture_that_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t4.json");
    let t4 = fixture("tesla-t4.xml");
    let said = stdout(&gpu(&[
        "record",
        "--out",
        out.to_str().unwrap(),
        "--fixture",
        t4.to_str().unwrap(),
    ]));
    assert!(said.contains("recorded 1 GPU(s) (Tesla T4)"), "{said}");
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(recorded["format"], "prescient-gpu-fixture");
    assert_eq!(recorded["version"], 1);
    assert_eq!(recorded["provenance"]["driver_version"], "515.105.01");
    assert!(
        recorded["provenance"]["recorded_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let from_json: serde_json::Value = serde_json::from_str(&stdout(&gpu(&[
        "inventory",
        "--fixture",
        out.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    let from_xml: serde_json::Value = serde_json::from_str(&stdout(&gpu(&[
        "inventory",
        "--fixture",
        t4.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(from_json["gpus"], from_xml["gpus"]);
    assert_eq!(from_json["system"], from_xml["system"]);
}

#[test]
fn gpu_commands_fail_with_one_clear_line() {
    if !nvml_present() {
        let o = gpu(&["inventory"]);
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            "prescient gpu: no NVIDIA driver (libnvidia-ml.so.1 not found)\n"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.db");
    let o = gpu(&["reservations", "--store", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot use"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!missing.exists());
    let junk = dir.path().join("junk.xml");
    std::fs::write(&junk, "<nvidia_smi_log><gpu>").unwrap();
    let o = gpu(&["inventory", "--fixture", junk.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.starts_with("prescient gpu: bad fixture"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_vm_stopping_releases_its_gpus_in_the_running_daemon() {
    use vmm_hooks::{
        Event, EventKind, LifecycleHook, SocketHook, SocketHookConfig, StopStatus, VmIdentity,
    };
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start_args(true, &["--metrics-listen", &addr]);
    let db = server.store.to_str().unwrap().to_string();
    let t4 = fixture("tesla-t4.xml");
    let a100 = fixture("a100-sxm4-80gb-mig.xml");
    for (vm, f) in [("gpu-vm", &t4), ("other-vm", &a100)] {
        stdout(&gpu(&[
            "reserve",
            "--store",
            &db,
            "--vm",
            vm,
            "--mem-mib",
            "512",
            "--exclusive",
            "--fixture",
            f.to_str().unwrap(),
        ]));
    }
    let event = |vm: &str, kind| Event {
        vm: VmIdentity {
            vm_id: vm.into(),
            image_digest: "img".into(),
            package_digest: "pkg".into(),
        },
        seq: 0,
        at_unix_ms: 1,
        kind,
    };
    let mut hook = SocketHook::new(SocketHookConfig::new(&server.socket, "test"));
    // The reply comes after the daemon handled the event.
    hook.on_event(&event(
        "gpu-vm",
        EventKind::Stopped {
            status: StopStatus::Failed {
                reason: "restart failed".into(),
            },
        },
    ));
    let rs: serde_json::Value =
        serde_json::from_str(&stdout(&gpu(&["reservations", "--store", &db, "--json"]))).unwrap();
    let vms: Vec<&str> = rs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["vm"].as_str().unwrap())
        .collect();
    assert_eq!(vms, ["other-vm"]);
    let text = common::scrape(port);
    for needle in [
        r#"prescient_gpu_reservations_released_total{kind="failed"} 1"#,
        if nvml_present() {
            "prescient_gpus "
        } else {
            "prescient_gpus 0"
        },
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    let log = server.stop();
    assert!(log.contains("GPU reservation released"), "{log}");
}
