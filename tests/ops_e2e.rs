//! Operating the daemon: configuration files, the Prometheus endpoint.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{Read, Write};
use std::process::Command;

use common::{Server, free_port, scrape};
use vmm_hooks::{
    BootReport, Event, EventKind, GuestRange, LifecycleHook, SocketHook, SocketHookConfig,
    VmIdentity,
};

fn event(seq: u64, kind: EventKind) -> Event {
    Event {
        vm: VmIdentity {
            vm_id: "m-1".into(),
            image_digest: "img".into(),
            package_digest: "pkg".into(),
        },
        seq,
        at_unix_ms: 1,
        kind,
    }
}

#[test]
fn metrics_endpoint_counts_events_plans_boots_and_rejections() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start_args(true, &["--metrics-listen", &addr]);
    let mut hook = SocketHook::new(SocketHookConfig::new(&server.socket, "test"));
    hook.on_event(&event(
        0,
        EventKind::BeforeBoot {
            vcpu_tids: vec![1],
            ram: GuestRange {
                start: 0,
                len: 1 << 20,
            },
            admission: Default::default(),
        },
    ));
    hook.on_event(&event(
        1,
        EventKind::Ready {
            time_to_ready_ms: 250.0,
        },
    ));
    hook.on_event(&event(2, EventKind::BootReport(BootReport::new(250.0))));
    // A peer that sends garbage.
    let mut s = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    s.write_all(b"XXXX\x01\x00\x00\x00\x00\x00\x00\x00")
        .unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let text = scrape(port);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for needle in [
        r#"prescient_events_total{kind="before-boot"} 1"#,
        r#"prescient_events_total{kind="ready"} 1"#,
        r#"prescient_boot_plans_total{kind="profile-only"} 1"#,
        "prescient_boots_recorded_total 1",
        r#"prescient_rejected_total{kind="bad-magic"} 1"#,
        "prescient_time_to_ready_seconds_count 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    server.stop();
}

#[test]
fn serve_reads_a_config_file_and_refuses_a_bad_one_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let store = dir.path().join("c.db");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[daemon]\nsocket = {:?}\n[store]\npath = {:?}\nprofile_chunk_kib = 4\n[plan]\nmode = \"before\"\n",
            sock, store
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["check-config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("profile_chunk_kib = 4") && shown.contains("mode = \"before\""),
        "{shown}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("[daemon]\nsocket = {sock:?}\n[store]\npath = {store:?}\n[plan]\nthreshold = 2\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plan.threshold"), "{err}");
    assert!(
        !sock.exists() && !store.exists(),
        "a rejected config touched the host"
    );
}
