//! A real `prescient serve` process and real labvm guests on KVM, talking
//! over the hooks socket; plus hostile socket peers against the same server.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{Read, Write};

use common::Server;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use labvm::testing::kvm_or_skip;
use labvm::{HookReporter, LabVm, LabVmConfig, StopReason, VMM_NAME, Workload, lab_identity};
use vmm_hooks::proto::{self, MAGIC, Message, PROTOCOL_VERSION};
use vmm_hooks::{
    Event, EventKind, HookReply, LifecycleHook, SocketHook, SocketHookConfig, VmIdentity,
};

fn run_lab_vm(hook: &mut dyn LifecycleHook, vm_id: &str) -> StopReason {
    let mut config = LabVmConfig::new(
        64,
        Workload::Random {
            touch_mib: 8,
            seed: 5,
            vary_pct: 0,
            nonce: 0,
        },
    );
    config.vcpus = 2;
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let mut reporter = HookReporter::new(hook, lab_identity(vm_id, &vm));
    reporter.created(&vm);
    let result = vm.run(&mut reporter);
    reporter.stopped(&result);
    result.unwrap().stop
}

#[test]
fn hw_kvm_labvm_events_reach_prescient_serve_in_order() {
    if !kvm_or_skip("hw_kvm_labvm_events_reach_prescient_serve_in_order") {
        return;
    }
    let server = Server::start_with(false);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&server.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "hooks socket must be private to its owner"
    );
    let mut hook = SocketHook::new(SocketHookConfig::new(&server.socket, VMM_NAME));
    assert_eq!(run_lab_vm(&mut hook, "vm-a"), StopReason::Exited(0));
    assert_eq!(run_lab_vm(&mut hook, "vm-b"), StopReason::Exited(0));
    let events = server.events();
    for vm in ["vm-a", "vm-b"] {
        let mine: Vec<&Event> = events
            .iter()
            .map(|r| &r.event)
            .filter(|e| e.vm.vm_id == vm)
            .collect();
        let kinds: Vec<&str> = mine.iter().map(|e| e.kind.name()).collect();
        assert_eq!(
            kinds,
            ["created", "before-boot", "ready", "boot-report", "stopped"],
            "{vm}"
        );
        let seqs: Vec<u64> = mine.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        let EventKind::BeforeBoot { vcpu_tids, .. } = &mine[1].kind else {
            panic!("second event is not before-boot");
        };
        assert_eq!(vcpu_tids.len(), 2);
    }
    assert!(events.iter().all(|r| r.peer == VMM_NAME));
    let log = server.stop();
    assert!(log.contains("VM event"), "{log}");
}

#[test]
fn hw_kvm_labvm_runs_its_guest_when_nothing_listens() {
    if !kvm_or_skip("hw_kvm_labvm_runs_its_guest_when_nothing_listens") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut hook = SocketHook::new(SocketHookConfig::new(
        dir.path().join("nobody.sock"),
        VMM_NAME,
    ));
    assert_eq!(run_lab_vm(&mut hook, "vm-alone"), StopReason::Exited(0));
    assert!(!hook.is_connected());
}

fn header(version: u16, len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

/// Sends `bytes`, optionally half-closes, and reads what the server says
/// before it closes the connection.
fn poke(socket: &Path, bytes: &[u8], half_close: bool) -> Option<Message> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let reply = proto::read_message(&mut s).ok();
    // The server then closes: the next read sees end of stream.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    reply
}

fn is_error(m: Option<Message>, needle: &str) -> bool {
    matches!(m, Some(Message::Error { message }) if message.contains(needle))
}

#[test]
fn serve_disconnects_bad_peers_and_keeps_serving() {
    let mut server = Server::start_with(false);
    let s = server.socket.clone();
    assert!(is_error(
        poke(&s, b"GET / HTTP/1.1\r\n\r\n", false),
        "magic"
    ));
    assert!(is_error(
        poke(&s, &header(PROTOCOL_VERSION, u32::MAX), false),
        "exceeds"
    ));
    assert!(is_error(poke(&s, &header(7, 2), false), "version 7"));
    let mut bad_json = header(PROTOCOL_VERSION, 5);
    bad_json.extend_from_slice(b"{oops");
    assert!(is_error(poke(&s, &bad_json, false), "malformed"));
    // A frame cut short: header says 100 bytes, 10 arrive, then EOF.
    let mut short = header(PROTOCOL_VERSION, 100);
    short.extend_from_slice(&[b'{'; 10]);
    assert!(is_error(poke(&s, &short, true), "truncated"));
    // Only a few header bytes, then EOF.
    assert!(is_error(poke(&s, &MAGIC, true), "truncated"));
    // A well-formed frame of the wrong direction.
    let reply = proto::encode(&Message::Reply(HookReply::Ack)).unwrap();
    assert!(is_error(poke(&s, &reply, false), "unexpected reply"));
    assert!(server.alive(), "server died on bad input");

    // A good client is still served.
    let mut hook = SocketHook::new(SocketHookConfig::new(&s, "test"));
    let ev = Event {
        vm: VmIdentity {
            vm_id: "after".into(),
            image_digest: "i".into(),
            package_digest: "p".into(),
        },
        seq: 0,
        at_unix_ms: 0,
        kind: EventKind::Paused,
    };
    // A VM the companion never saw created or booted: rejected, not
    // recorded, and the connection stays.
    assert!(
        matches!(hook.on_event(&ev), HookReply::Rejected { ref reason } if reason.contains("unknown VM")),
    );
    assert!(hook.is_connected());
    assert_eq!(server.events().len(), 0);
    let created = Event {
        kind: EventKind::Created {
            spec: vmm_hooks::VmSpec {
                vcpus: 1,
                memory_mib: 64,
                vmm: "test".into(),
                priority: 0,
                interruptible: false,
            },
        },
        ..ev.clone()
    };
    assert_eq!(hook.on_event(&created), HookReply::Ack);
    let ev = Event { seq: 1, ..ev };
    assert_eq!(hook.on_event(&ev), HookReply::Ack);
    assert!(hook.is_connected());
    assert_eq!(server.events().len(), 2);
    let log = server.stop();
    assert!(log.contains("bad frame from VMM"), "{log}");
}

#[test]
fn serve_refuses_to_replace_a_live_socket_or_a_regular_file() {
    let server = Server::start_with(false);
    let out = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["serve", "--no-store", "--socket"])
        .arg(&server.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["serve", "--no-store", "--socket"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    server.stop();
}
