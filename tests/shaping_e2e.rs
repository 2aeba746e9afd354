//! A real `prescient serve --shape-interval-s 1` and a VMM speaking the
//! hooks protocol over the real socket: the VMM reports its balloon status
//! with guest statistics the way labvm does every poll; the shaping loop
//! forecasts the guest's memory in use from them and answers a status with
//! a balloon target that leaves the guest the forecast plus its margin.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Server, free_port, scrape};
use vmm_hooks::{
    BalloonStatus, Event, EventKind, HookReply, LifecycleHook, SocketHook, SocketHookConfig,
    StopStatus, VmIdentity, VmSpec,
};

fn event(seq: u64, kind: EventKind) -> Event {
    Event {
        vm: VmIdentity {
            vm_id: "shape-1".into(),
            image_digest: "img".into(),
            package_digest: "pkg".into(),
        },
        seq,
        at_unix_ms: 1,
        kind,
    }
}

/// A 1024 MiB guest that uses 300 MiB, with its balloon at `target`.
fn status(target: u64) -> BalloonStatus {
    let mut s = BalloonStatus::new(1024);
    s.target_mib = target;
    s.actual_mib = target;
    s.driver_ok = true;
    s.stats_updates = 1;
    s.guest_stats = vec![
        ("total-memory".into(), 1024 << 20),
        ("available-memory".into(), (1024 - 300) << 20),
    ];
    s
}

/// The value of one sample line of the exposition, if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn shaping_loop_sets_a_balloon_target_from_the_forecast_over_the_socket() {
    let port = free_port();
    let server = Server::start_args(
        false,
        &[
            "--shape-interval-s",
            "1",
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let mut hc = SocketHookConfig::new(&server.socket, "test-vmm");
    hc.timeout = Duration::from_secs(5);
    let mut hook = SocketHook::new(hc);
    let created = hook.on_event(&event(
        0,
        EventKind::Created {
            spec: VmSpec {
                vcpus: 2,
                memory_mib: 1024,
                vmm: "test-vmm".into(),
                priority: 0,
                interruptible: false,
            },
        },
    ));
    assert_eq!(created, HookReply::Ack);
    // The VMM polls its balloon every 200 ms, as labvm does with
    // --balloon-poll-ms; the loop needs two intervals of samples first.
    let mut seq = 1;
    let start = Instant::now();
    let target = loop {
        let reply = hook.on_event(&event(seq, EventKind::Balloon(status(0))));
        seq += 1;
        if let HookReply::BalloonTarget { target_mib, .. } = reply {
            break target_mib;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no balloon target from the shaping loop"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Forecast: 300 MiB in use; the guest keeps that plus the margin (the
    // tuner's margins go up to 100 %).
    let grant = 1024 - target;
    assert!((300..=600).contains(&grant), "grant {grant} MiB");
    // The VMM now reports the new target: nothing more to ask.
    let reply = hook.on_event(&event(seq, EventKind::Balloon(status(target))));
    seq += 1;
    assert_eq!(reply, HookReply::Ack);
    let text = scrape(port);
    assert_eq!(
        sample(
            &text,
            r#"prescient_shape_forecast_mib{vm="shape-1",quantile="p90"}"#
        ),
        Some(300.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"prescient_shape_actual_mib{vm="shape-1"}"#),
        Some(300.0),
        "{text}"
    );
    let granted = sample(&text, r#"prescient_shape_grant_mib{vm="shape-1"}"#).unwrap();
    assert!((300.0..=600.0).contains(&granted), "{text}");
    assert!(sample(&text, "prescient_shape_margin").is_some(), "{text}");
    assert!(
        sample(&text, r#"prescient_shape_vm_margin{vm="shape-1"}"#).is_some(),
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"prescient_shape_actions_total{kind="balloon-target"}"#
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"prescient_balloon_targets_total{kind="inflate"}"#),
        Some(1.0),
        "{text}"
    );
    hook.on_event(&event(
        seq,
        EventKind::Stopped {
            status: StopStatus::Stopped,
        },
    ));
    let text = scrape(port);
    assert!(!text.contains(r#"vm="shape-1""#), "{text}");
    let log = server.stop();
    assert!(log.contains("shaping loop on"), "{log}");
}

#[test]
fn bad_shaping_settings_are_refused_before_the_socket_exists() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    for args in [
        vec!["--shape-interval-s", "1", "--shape-policy", "fastest"],
        vec!["--shape-interval-s", "1", "--shape-lambda=-3"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_prescient"))
            .args(["serve", "--no-store", "--socket"])
            .arg(&socket)
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("fastest") || err.contains("shaping.lambda"),
            "{args:?}: {err}"
        );
        assert!(!socket.exists());
    }
}
