//! `prescient libvirt-hook` and `prescient install-libvirt-hook` as libvirt
//! would run them, against a real `prescient serve` and against daemons
//! that are down, silent or speak garbage. No libvirt needed.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use prescient::libvirt::AgentRecord;
use vmm_hooks::{EventKind, LibvirtOperation};

const XML: &str = "<domain type='qemu'><name>dom-1</name><uuid>0f0e0d0c-0b0a-0908-0706-050403020100</uuid>\
<memory unit='MiB'>256</memory><vcpu>2</vcpu><devices><memballoon model='virtio'/></devices></domain>";

/// A hung hook would hold a domain's start forever; this is the hang
/// detector, far above the hook's own bound.
const HANG: Duration = Duration::from_secs(30);

struct HookRun {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn run_hook(socket: &Path, args: &[&str], stdin: &str) -> HookRun {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["libvirt-hook", "--timeout-ms", "1000", "--socket"])
        .arg(socket)
        .arg("--")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_string();
    // The hook may stop reading early; a broken pipe here is fine.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            panic!("the hook hung (more than {HANG:?}) with args {args:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = start.elapsed();
    let _ = writer.join();
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    HookRun {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr,
        took,
    }
}

#[test]
fn libvirt_hook_events_arrive_in_order_with_xml_and_bad_xml_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("libvirt.jsonl");
    let server = Server::start_args(false, &["--libvirt-record", record.to_str().unwrap()]);
    let calls = [
        ("prepare", "begin", XML.to_string()),
        ("start", "begin", XML.to_string()),
        ("started", "begin", "<domain><name>".to_string()),
        ("stopped", "end", XML.to_string()),
        ("release", "end", XML.to_string()),
    ];
    for (op, sub, xml) in &calls {
        let r = run_hook(&server.socket, &["dom-1", op, sub, "-"], xml);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(
            r.stdout.is_empty(),
            "the hook must not write to stdout: {}",
            r.stdout
        );
    }
    let events = server.events();
    let ops: Vec<(LibvirtOperation, &str)> = events
        .iter()
        .map(|r| match &r.event.kind {
            EventKind::Libvirt(c) => (c.operation, c.sub_operation.as_str()),
            other => panic!("not a libvirt event: {other:?}"),
        })
        .collect();
    assert_eq!(
        ops,
        [
            (LibvirtOperation::Prepare, "begin"),
            (LibvirtOperation::Start, "begin"),
            (LibvirtOperation::Started, "begin"),
            (LibvirtOperation::Stopped, "end"),
            (LibvirtOperation::Release, "end"),
        ]
    );
    for r in &events {
        assert_eq!(r.event.vm.vm_id, "dom-1");
        assert!(r.peer.starts_with("prescient-libvirt-hook "), "{}", r.peer);
    }
    let EventKind::Libvirt(first) = &events[0].event.kind else {
        unreachable!()
    };
    assert_eq!(first.domain_xml, XML);
    let d = first.domain.as_ref().unwrap();
    assert_eq!((d.vcpus, d.memory_kib), (2, 256 * 1024));
    assert_eq!(first.xml_error, None);
    let EventKind::Libvirt(bad) = &events[2].event.kind else {
        unreachable!()
    };
    assert!(bad.domain.is_none());
    assert!(bad.xml_error.as_deref().unwrap().contains("never closed"));
    let log = server.stop();
    assert!(log.contains("could not read the domain XML"), "{log}");
    // The agent did nothing for the started call with bad XML, and said so.
    let text = std::fs::read_to_string(&record).unwrap();
    let records: Vec<AgentRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{text}");
    assert!(
        matches!(&records[0], AgentRecord::Failed { vm, error, .. } if vm == "dom-1" && error.contains("nothing done"))
    );
}

#[test]
fn libvirt_hook_lets_an_incoming_migration_through_unchanged() {
    // On a migration's destination libvirt calls `migrate begin -` with
    // the incoming XML and takes anything on stdout as a replacement XML;
    // a non-zero exit fails the migration. Then the domain's prepare,
    // start and started follow as for any start.
    let server = Server::start_with(false);
    for (op, sub) in [
        ("migrate", "begin"),
        ("prepare", "begin"),
        ("start", "begin"),
        ("started", "begin"),
    ] {
        let r = run_hook(&server.socket, &["dom-1", op, sub, "-"], XML);
        assert_eq!(r.code, 0, "{op}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{op} wrote to stdout: {}", r.stdout);
    }
    let events = server.events();
    let EventKind::Libvirt(m) = &events[0].event.kind else {
        panic!("not a libvirt event: {:?}", events[0]);
    };
    assert_eq!(m.operation, LibvirtOperation::Migrate);
    assert_eq!(
        (m.sub_operation.as_str(), m.domain_xml.as_str()),
        ("begin", XML)
    );
    assert_eq!(m.xml_error, None);
    let names: Vec<&str> = events.iter().map(|r| r.event.kind.name()).collect();
    assert_eq!(
        names,
        [
            "libvirt-migrate",
            "libvirt-prepare",
            "libvirt-start",
            "libvirt-started"
        ]
    );
    let log = server.stop();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn libvirt_hook_returns_zero_when_daemon_is_down_silent_or_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["dom-1", "start", "begin", "-"];

    // Down: no socket at all.
    let r = run_hook(&dir.path().join("none.sock"), &args, XML);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.is_empty());
    assert!(r.stderr.contains("did not take the call"), "{}", r.stderr);
    eprintln!("daemon down: the hook returned in {:?}", r.took);

    // Silent: accepts, reads, never answers.
    let silent = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&silent).unwrap();
    let hold = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    let r = run_hook(&silent, &args, XML);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("did not take the call"), "{}", r.stderr);
    eprintln!("daemon silent: the hook returned in {:?}", r.took);
    hold.join().unwrap();

    // Garbage: answers with bytes that are not a frame.
    let garbage = dir.path().join("garbage.sock");
    let listener = UnixListener::bind(&garbage).unwrap();
    let talk = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let r = run_hook(&garbage, &args, XML);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("did not take the call"), "{}", r.stderr);
    talk.join().unwrap();

    // Bad arguments: still exit 0, with the reason.
    let r = run_hook(&garbage, &["only-one"], "");
    assert_eq!(r.code, 0);
    assert!(
        r.stderr.contains("expected DOMAIN OPERATION"),
        "{}",
        r.stderr
    );
}

#[test]
fn install_libvirt_hook_is_idempotent_and_refuses_a_foreign_hook() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks");
    let install = |force: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_prescient"));
        c.args(["install-libvirt-hook", "--hooks-dir"])
            .arg(&hooks)
            .args(["--socket", "/run/prescient/hooks.sock"]);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let o = install(false);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("installed the libvirt hook"));
    let o = install(false);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("unchanged"));
    std::fs::write(hooks.join("qemu"), "#!/bin/sh\nexit 0\n").unwrap();
    let o = install(false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(
        std::fs::read_to_string(hooks.join("qemu")).unwrap(),
        "#!/bin/sh\nexit 0\n"
    );
    let o = install(true);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("replaced"));

    // The installed wrapper runs the hook: with the daemon down it exits 0.
    let out = Command::new(hooks.join("qemu"))
        .args(["dom-1", "prepare", "begin", "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
}
