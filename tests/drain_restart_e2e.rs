//! A drain outlives its daemon: real `prescient serve` processes on a real
//! SQLite store, stopped with SIGTERM and killed with SIGKILL mid-drain and
//! started again on the same store; real destination companions; on KVM, a
//! real labvm guest that moves once the restarted daemon resumes the drain.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::migration::{
    HookVmm, destination_on, drain, labvm_on_kvm, source_labvm, status, status_cli, text, undrain,
    wait_events, wait_moves_final,
};
use common::{Server, free_port};
use prescient::migration::{DRAIN_STATE_KEY, DrainRecord, MoveState};
use prescient::{ProfileStore, StorePolicy};
use vmm_hooks::HookReply;
use vmm_hooks::proto::{FEATURE_INTERRUPT, FEATURE_MIGRATE};

/// The drain the store at `path` records, as its raw value.
fn recorded(path: &Path) -> Option<String> {
    ProfileStore::open(path, StorePolicy::default())
        .unwrap()
        .state(DRAIN_STATE_KEY)
        .unwrap()
}

/// Asserts that a new VM's boot is deferred because the host drains.
fn boot_is_deferred(vmm: &mut HookVmm, vm: &str) {
    vmm.created(vm, 64);
    match vmm.before_boot(vm, 64) {
        HookReply::Defer { reason, .. } => assert!(reason.contains("draining"), "{reason}"),
        other => panic!("{vm}: a boot on a draining host got {other:?}"),
    }
}

/// One slot request line to the companion listening at `addr`; its answer.
fn slot_request(addr: &str, vm: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(
        format!("{{\"version\":1,\"vm_id\":\"{vm}\",\"ram_mib\":64,\"vcpus\":1}}\n").as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn a_drain_survives_sigterm_and_sigkill_and_ends_only_on_undrain() {
    // This host also takes migrations: while it drains, it refuses them.
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("src.toml");
    let listen = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &cfg,
        format!("[migration]\nlisten = \"{listen}\"\nlabvm = \"/nonexistent/labvm\"\n"),
    )
    .unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let src = Server::start_args(true, &args);
    let mut vmm = HookVmm::new(&src, &[FEATURE_INTERRUPT]);
    // A VM whose VMM cannot migrate: the drain lists it and begins.
    vmm.created("old", 64);
    let to = ["127.0.0.1:9", "127.0.0.1:10"];
    let out = drain(&src, &to);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("NOT recorded"), "{stderr}");
    let first = status(&src).drain.unwrap();
    assert_eq!(first.destinations, to);
    assert!(first.recorded && !first.resumed, "{first:?}");
    let since = first.since_unix_ms.unwrap();
    // The store holds it before the drain's answer comes back.
    let rec = DrainRecord::parse(&recorded(&src.store).unwrap()).unwrap();
    assert_eq!(
        (rec.destinations.clone(), rec.since_unix_ms),
        (first.destinations, since)
    );

    // SIGTERM, then SIGKILL: each daemon on the same store starts cordoned.
    let (src, _) = src.restart();
    let (src, log) = {
        vmm.reconnect();
        let s = status(&src);
        assert!(s.draining);
        let d = s.drain.unwrap();
        assert_eq!(d.destinations, to);
        assert_eq!(d.since_unix_ms, Some(since));
        assert!(d.resumed && d.recorded && d.unreadable.is_none(), "{d:?}");
        boot_is_deferred(&mut vmm, "after-sigterm");
        let refused = slot_request(&listen, "incoming-1");
        assert_eq!(refused["ok"], false, "{refused}");
        assert!(
            refused["error"].as_str().unwrap().contains("draining"),
            "{refused}"
        );
        src.crash_and_restart_logged()
    };
    // The daemon that resumed logged it once, in words.
    assert!(
        log.contains("resuming drain begun at 20") && log.contains("to 127.0.0.1:9, 127.0.0.1:10"),
        "{log}"
    );
    vmm.reconnect();
    let d = status(&src).drain.unwrap();
    assert_eq!(d.destinations, to);
    assert_eq!(d.since_unix_ms, Some(since));
    assert!(d.resumed);
    boot_is_deferred(&mut vmm, "after-sigkill");
    let table = status_cli(&src, false);
    assert!(
        table.contains("DRAINING since 20")
            && table.contains("to 127.0.0.1:9, 127.0.0.1:10 (resumed after a restart)"),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&status_cli(&src, true)).unwrap();
    assert_eq!(json["draining"], true);
    assert_eq!(json["drain"]["destinations"], serde_json::json!(to));
    assert_eq!(json["drain"]["since_unix_ms"], since);

    // Undrain removes the record: no later daemon is draining.
    let out = undrain(&src);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(recorded(&src.store), None);
    assert!(status(&src).drain.is_none());
    let (src, log) = src.restart();
    assert!(log.contains("drain ended"), "{log}");
    vmm.reconnect();
    let s = status(&src);
    assert!(!s.draining && s.drain.is_none(), "{:?}", s.drain);
    assert!(matches!(
        vmm.before_boot("after-sigkill", 64),
        HookReply::Plan(_)
    ));
    let src = src.crash_and_restart();
    assert!(!status(&src).draining);
    assert!(!status_cli(&src, false).contains("DRAINING"));
    let log = src.stop();
    assert!(!log.contains("resuming drain"), "{log}");
}

#[test]
fn a_resumed_drain_moves_the_vms_that_report_in_to_the_recorded_destinations() {
    // Two VMs run here, on a VMM that can migrate.
    let src = Server::start();
    let mut vmm = HookVmm::new(&src, &[FEATURE_INTERRUPT, FEATURE_MIGRATE]);
    for vm in ["m-1", "m-2"] {
        vmm.created(vm, 64);
        assert!(matches!(vmm.before_boot(vm, 64), HookReply::Plan(_)));
        assert_eq!(vmm.poll(vm, 64), HookReply::Ack);
    }
    // The drain begins while no destination companion listens yet: both
    // moves fail and the VMs run on here.
    let (p1, p2) = (free_port(), free_port());
    let to = [format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}")];
    let out = drain(&src, &[&to[0], &to[1]]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("0 of 2 moved"), "{stderr}");
    // The daemon dies; the destinations come up; a new daemon starts on
    // the store.
    let src = src.crash_and_restart();
    // Real companions whose labvm cannot start: their refusal, in the
    // moves' errors, shows which companion each VM was sent to.
    let (_d1, a1, _c1) = destination_on(Path::new("/nonexistent/labvm"), "1", p1);
    let (_d2, a2, _c2) = destination_on(Path::new("/nonexistent/labvm"), "1", p2);
    assert_eq!([a1, a2], to);
    assert!(status(&src).migrations.is_empty());
    vmm.reconnect();
    // The VMs report in: each moves, to the recorded destinations in turn.
    for vm in ["m-1", "m-2"] {
        assert_eq!(vmm.poll(vm, 64), HookReply::Ack);
    }
    let s = wait_moves_final(&src);
    assert_eq!(s.migrations.len(), 2, "{:?}", s.migrations);
    for (m, dest) in s.migrations.iter().zip(&to) {
        assert_eq!(m.reason, "drain");
        assert_eq!(&m.destination, dest, "{m:?}");
        assert_eq!(m.state, MoveState::Failed, "{m:?}");
        let e = m.error.as_deref().unwrap();
        assert!(
            e.contains(&format!("the destination companion at {dest} refused")),
            "{e}"
        );
        assert!(e.contains("cannot start /nonexistent/labvm"), "{e}");
    }
    // Once per drain: reporting again does not start them over.
    for _ in 0..3 {
        for vm in ["m-1", "m-2"] {
            assert_eq!(vmm.poll(vm, 64), HookReply::Ack);
        }
    }
    let again = status(&src);
    assert_eq!(again.migrations, s.migrations);
    // New VMs stay off the host meanwhile.
    boot_is_deferred(&mut vmm, "newcomer");
}

#[test]
fn an_unreadable_recorded_drain_keeps_the_host_cordoned_until_undrain() {
    for value in [
        "{not json".to_string(),
        r#"{"version":1,"destinations":[],"since_unix_ms":5}"#.to_string(),
    ] {
        // A store whose recorded drain is damaged.
        let (_, dir) = Server::start().stop_keep_dir();
        ProfileStore::open(&dir.path().join("store.db"), StorePolicy::default())
            .unwrap()
            .set_state(DRAIN_STATE_KEY, &value)
            .unwrap();
        let src = Server::start_in(dir, true, &[]);
        let s = status(&src);
        assert!(s.draining, "{value}");
        let d = s.drain.unwrap();
        assert!(d.destinations.is_empty() && d.since_unix_ms.is_none());
        let why = d.unreadable.unwrap();
        assert!(why.contains("bad drain"), "{why}");
        let mut vmm = HookVmm::new(&src, &[FEATURE_INTERRUPT, FEATURE_MIGRATE]);
        boot_is_deferred(&mut vmm, "new");
        // A VM that reports in is not moved (there is nowhere to move it).
        vmm.created("running", 64);
        assert_eq!(vmm.poll("running", 64), HookReply::Ack);
        assert!(status(&src).migrations.is_empty());
        let table = status_cli(&src, false);
        assert!(
            table.contains("recorded in the store is unreadable"),
            "{table}"
        );
        // The record is left for the operator, and the next daemon is
        // cordoned too; the one that met it said so, and exited cleanly.
        assert_eq!(recorded(&src.store).as_deref(), Some(value.as_str()));
        let (src, log) = src.restart();
        assert!(
            log.contains("the drain recorded in the store is unreadable")
                && log.contains("CORDONED")
                && log.contains("prescient host undrain"),
            "{log}"
        );
        assert!(status(&src).draining);
        // Undrain is the way out.
        let out = undrain(&src);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(recorded(&src.store), None);
        let src = src.crash_and_restart();
        assert!(!status(&src).draining);
        let mut vmm = HookVmm::new(&src, &[FEATURE_INTERRUPT]);
        vmm.created("new", 64);
        assert!(matches!(vmm.before_boot("new", 64), HookReply::Plan(_)));
    }
}

/// The whole story on real KVM: a guest runs, the drain's destination is
/// down, the companion is killed, the destination comes up, a new
/// companion resumes the drain and the guest moves when it reports in.
#[test]
fn hw_kvm_a_drain_resumed_after_a_crash_moves_the_running_guest() {
    const TEST: &str = "hw_kvm_a_drain_resumed_after_a_crash_moves_the_running_guest";
    let Some(labvm) = labvm_on_kvm(TEST) else {
        return;
    };
    let src = Server::start();
    let guest = source_labvm(&labvm, &src, "resume-1", "120");
    wait_events(&src, "resume-1", "poll", 1);
    let port = free_port();
    let to = format!("127.0.0.1:{port}");
    let out = drain(&src, &[&to]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let src = src.crash_and_restart();
    let (dest, dest_addr, _cfg) = destination_on(&labvm, "3", port);
    assert_eq!(dest_addr, to);
    // labvm reconnects to the new companion on its own and polls on.
    let done = guest.wait_with_output().unwrap();
    let gout = text(&done.stdout);
    assert!(done.status.success(), "{gout}\n{}", text(&done.stderr));
    assert!(gout.contains("migrated to 127.0.0.1:"), "{gout}");
    let s = status(&src);
    let m = s.migrations.iter().find(|m| m.vm == "resume-1").unwrap();
    assert_eq!(m.state, MoveState::Moved, "{m:?}");
    assert_eq!(m.destination, to);
    assert!(s.draining);
    wait_events(&dest, "resume-1", "restarted", 1);
    let log = src.stop();
    assert!(log.contains("resuming drain begun at"), "{log}");
}
