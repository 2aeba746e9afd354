//! `labvm --interruptible` and `labvm --restore` as an operator runs them:
//! labvm is a child process, this test is its companion on a real hooks
//! socket. It defers the boot once, interrupts the running VM with an
//! `interrupt` reply to a `balloon` event, checks the exit status (75) and
//! the saved file, then restores the VM from the file and checks that the
//! guest's counter continued.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use labvm::testing::kvm_or_skip;
use vmm_hooks::proto::{FEATURE_INTERRUPT, Message, read_message, write_message};
use vmm_hooks::{BootPlan, Event, EventKind, HookReply};

fn start(sock: &Path, args: &[&str]) -> (Child, UnixStream) {
    let listener = UnixListener::bind(sock).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_labvm"))
        .args(args)
        .args(["--vm-id", "low", "--balloon-poll-ms", "50"])
        .args(["--hooks-timeout-ms", "20000"])
        .arg("--hooks-socket")
        .arg(sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (conn, _) = listener.accept().unwrap();
    // A test that goes wrong fails on a read timeout instead of hanging.
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    (child, conn)
}

fn hello(conn: &mut UnixStream) {
    match read_message(conn).unwrap() {
        Message::Hello { features, .. } => {
            assert!(
                features.iter().any(|f| f == FEATURE_INTERRUPT),
                "{features:?}"
            );
        }
        other => panic!("expected hello, got {other:?}"),
    }
}

fn event(conn: &mut UnixStream) -> Event {
    match read_message(conn).unwrap() {
        Message::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn reply(conn: &mut UnixStream, r: HookReply) {
    write_message(conn, &Message::Reply(r)).unwrap();
}

/// Waits for the child and returns its exit code and standard output.
fn finish(mut child: Child) -> (i32, String) {
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (status.code().unwrap_or(-1), out)
}

/// The number after `counter Some(` in labvm's output.
fn counter_in(out: &str, line_start: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("no line starting {line_start:?} in {out:?}"));
    let at = line.find("counter Some(").unwrap() + "counter Some(".len();
    line[at..].split(')').next().unwrap().parse().unwrap()
}

#[test]
fn hw_kvm_cli_interrupted_vm_exits_75_and_restores_with_its_counter() {
    if !kvm_or_skip("hw_kvm_cli_interrupted_vm_exits_75_and_restores_with_its_counter") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("low.state");
    let (child, mut conn) = start(
        &dir.path().join("a.sock"),
        &[
            "--mem",
            "64",
            "--workload",
            "dirty:2000:8",
            "--priority",
            "3",
            "--interruptible",
            "--save-on-interrupt",
            state.to_str().unwrap(),
            "--run-for",
            "120",
        ],
    );
    hello(&mut conn);
    assert!(matches!(event(&mut conn).kind, EventKind::Created { .. }));
    reply(&mut conn, HookReply::Ack);
    // The first before-boot is deferred; labvm asks again.
    let mut asks = 0;
    loop {
        let e = event(&mut conn);
        let EventKind::BeforeBoot { admission, .. } = e.kind else {
            panic!("expected before-boot, got {:?}", e.kind);
        };
        assert_eq!(
            (
                admission.priority,
                admission.interruptible,
                admission.restart
            ),
            (3, true, false)
        );
        asks += 1;
        if asks == 1 {
            reply(
                &mut conn,
                HookReply::Defer {
                    reason: "test".into(),
                    retry_after_ms: 20,
                    missing_mib: 64,
                },
            );
        } else {
            reply(&mut conn, HookReply::Plan(BootPlan::empty()));
            break;
        }
    }
    // Run until ready and a few balloon polls, then interrupt.
    let mut ready = false;
    let mut polls = 0;
    loop {
        let e = event(&mut conn);
        match e.kind {
            EventKind::Ready { .. } => ready = true,
            EventKind::Balloon(_) if ready => polls += 1,
            _ => {}
        }
        if polls == 5 {
            reply(
                &mut conn,
                HookReply::Interrupt {
                    reason: "make room".into(),
                },
            );
            break;
        }
        reply(&mut conn, HookReply::Ack);
    }
    let e = event(&mut conn);
    assert!(
        matches!(e.kind, EventKind::Interrupted { ref reason } if reason == "make room"),
        "{:?}",
        e.kind
    );
    reply(&mut conn, HookReply::Ack);
    let e = event(&mut conn);
    assert!(matches!(e.kind, EventKind::Stopped { .. }), "{:?}", e.kind);
    reply(&mut conn, HookReply::Ack);
    let (code, out) = finish(child);
    assert_eq!(code, i32::from(labvm::EXIT_INTERRUPTED), "{out}");
    assert!(state.exists());
    let saved = counter_in(&out, "interrupted (make room): saved to");
    assert!(saved > 0);

    // Restart from the file.
    let report = dir.path().join("restored.json");
    let (child, mut conn) = start(
        &dir.path().join("b.sock"),
        &[
            "--restore",
            state.to_str().unwrap(),
            "--run-for",
            "0.5",
            "--report-json",
            report.to_str().unwrap(),
        ],
    );
    hello(&mut conn);
    let mut kinds = Vec::new();
    loop {
        let e = event(&mut conn);
        let name = e.kind.name();
        match &e.kind {
            EventKind::BeforeBoot { admission, .. } => {
                assert!(admission.restart, "a restore is a restart");
                reply(&mut conn, HookReply::Plan(BootPlan::empty()));
            }
            _ => reply(&mut conn, HookReply::Ack),
        }
        // Balloon and poll events are periodic status reports (poll: the
        // run status labvm reports to a companion that may order a
        // migration); whether one falls in a short run is timing.
        if name != "balloon" && name != "poll" {
            kinds.push(name);
        }
        if name == "stopped" {
            break;
        }
    }
    assert_eq!(kinds, ["created", "before-boot", "restarted", "stopped"]);
    let (code, out) = finish(child);
    assert_eq!(code, 0, "{out}");
    assert_eq!(counter_in(&out, "restored from"), saved);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let end = json["counter"].as_u64().unwrap();
    assert!(end > saved, "counter {end} after restore from {saved}");
}

#[test]
fn hw_kvm_cli_stop_mode_exits_75_without_a_file_and_cold_restart_boots_again() {
    if !kvm_or_skip("hw_kvm_cli_stop_mode_exits_75_without_a_file_and_cold_restart_boots_again") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (child, mut conn) = start(
        &dir.path().join("a.sock"),
        &[
            "--mem",
            "64",
            "--workload",
            "dirty:2000:8",
            "--interruptible",
            "--interrupt-mode",
            "stop",
            "--run-for",
            "120",
        ],
    );
    hello(&mut conn);
    let mut ready = false;
    loop {
        let e = event(&mut conn);
        match e.kind {
            EventKind::BeforeBoot { .. } => {
                reply(&mut conn, HookReply::Plan(BootPlan::empty()));
                continue;
            }
            EventKind::Ready { .. } => ready = true,
            EventKind::Balloon(_) if ready => {
                reply(
                    &mut conn,
                    HookReply::Interrupt {
                        reason: "room".into(),
                    },
                );
                break;
            }
            _ => {}
        }
        reply(&mut conn, HookReply::Ack);
    }
    let e = event(&mut conn);
    assert!(
        matches!(e.kind, EventKind::Interrupted { .. }),
        "{:?}",
        e.kind
    );
    reply(&mut conn, HookReply::Ack);
    let e = event(&mut conn);
    assert!(matches!(e.kind, EventKind::Stopped { .. }), "{:?}", e.kind);
    reply(&mut conn, HookReply::Ack);
    let (code, out) = finish(child);
    assert_eq!(code, i32::from(labvm::EXIT_INTERRUPTED), "{out}");
    assert!(out.contains("interrupted (room): stopped"), "{out}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only the socket"
    );

    // The cold restart boots from scratch and says it is a restart.
    let (child, mut conn) = start(
        &dir.path().join("b.sock"),
        &[
            "--mem",
            "64",
            "--workload",
            "dirty:2000:8",
            "--restart",
            "--run-for",
            "0.3",
        ],
    );
    hello(&mut conn);
    let mut kinds = Vec::new();
    loop {
        let e = event(&mut conn);
        let name = e.kind.name();
        match &e.kind {
            EventKind::BeforeBoot { admission, .. } => {
                assert!(admission.restart);
                reply(&mut conn, HookReply::Plan(BootPlan::empty()));
            }
            _ => reply(&mut conn, HookReply::Ack),
        }
        // Balloon and poll events are periodic status reports (poll: the
        // run status labvm reports to a companion that may order a
        // migration); whether one falls in a short run is timing.
        if name != "balloon" && name != "poll" {
            kinds.push(name);
        }
        if name == "stopped" {
            break;
        }
    }
    assert_eq!(
        kinds,
        [
            "created",
            "before-boot",
            "ready",
            "boot-report",
            "restarted",
            "stopped"
        ]
    );
    let (code, out) = finish(child);
    assert_eq!(code, 0, "{out}");
}
