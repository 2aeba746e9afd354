//! The socket client against real Unix sockets: absent, slow and
//! misbehaving companions never fail the VM.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use vmm_hooks::proto::{self, Message};
use vmm_hooks::{
    BootPlan, Event, EventKind, GuestRange, HookReply, LifecycleHook, SocketHook, SocketHookConfig,
    VmIdentity,
};

fn event(seq: u64, kind: EventKind) -> Event {
    Event {
        vm: VmIdentity {
            vm_id: "t".into(),
            image_digest: "i".into(),
            package_digest: "p".into(),
        },
        seq,
        at_unix_ms: 0,
        kind,
    }
}

fn before_boot() -> Event {
    event(
        1,
        EventKind::BeforeBoot {
            vcpu_tids: vec![1],
            ram: GuestRange {
                start: 0,
                len: 4096,
            },
            admission: Default::default(),
        },
    )
}

fn config(path: &std::path::Path) -> SocketHookConfig {
    let mut c = SocketHookConfig::new(path, "test");
    c.timeout = Duration::from_millis(200);
    c.retry_after = Duration::from_millis(50);
    c
}

#[test]
fn client_without_companion_falls_back_to_empty_plan() {
    let dir = tempfile::tempdir().unwrap();
    let mut hook = SocketHook::new(config(&dir.path().join("absent.sock")));
    assert_eq!(
        hook.on_event(&before_boot()),
        HookReply::Plan(BootPlan::empty())
    );
    assert_eq!(hook.on_event(&event(2, EventKind::Paused)), HookReply::Ack);
    assert!(!hook.is_connected());
}

#[test]
fn client_with_silent_companion_times_out_and_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        // Accept and read, never answer; hold the connection open a while.
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        std::thread::sleep(Duration::from_millis(600));
    });
    let mut hook = SocketHook::new(config(&path));
    let t = Instant::now();
    let reply = hook.on_event(&before_boot());
    assert_eq!(reply, HookReply::Plan(BootPlan::empty()));
    assert!(!hook.is_connected());
    // Bounded by the configured timeout (generous margin, not a benchmark).
    assert!(t.elapsed() < Duration::from_secs(5));
    server.join().unwrap();
}

#[test]
fn client_disconnects_on_garbage_reply_and_reconnects_later() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        // First connection: answer the event with garbage.
        let (mut s, _) = listener.accept().unwrap();
        assert!(matches!(
            proto::read_message(&mut s).unwrap(),
            Message::Hello { .. }
        ));
        assert!(matches!(
            proto::read_message(&mut s).unwrap(),
            Message::Event(_)
        ));
        s.write_all(b"this is not a frame at all").unwrap();
        drop(s);
        // Second connection: behave.
        let (mut s, _) = listener.accept().unwrap();
        assert!(matches!(
            proto::read_message(&mut s).unwrap(),
            Message::Hello { .. }
        ));
        let Message::Event(e) = proto::read_message(&mut s).unwrap() else {
            panic!("expected an event");
        };
        proto::write_message(&mut s, &Message::Reply(HookReply::Ack)).unwrap();
        e.seq
    });
    let mut hook = SocketHook::new(config(&path));
    assert_eq!(
        hook.on_event(&before_boot()),
        HookReply::Plan(BootPlan::empty())
    );
    assert!(!hook.is_connected());
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(hook.on_event(&event(7, EventKind::Resumed)), HookReply::Ack);
    assert!(hook.is_connected());
    assert_eq!(server.join().unwrap(), 7);
}

#[test]
fn client_rejects_error_message_from_companion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("err.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = proto::read_message(&mut s).unwrap();
        let _ = proto::read_message(&mut s).unwrap();
        proto::write_message(
            &mut s,
            &Message::Error {
                message: "unknown VM".into(),
            },
        )
        .unwrap();
    });
    let mut hook = SocketHook::new(config(&path));
    assert_eq!(hook.on_event(&event(0, EventKind::Paused)), HookReply::Ack);
    assert!(!hook.is_connected());
    server.join().unwrap();
}
