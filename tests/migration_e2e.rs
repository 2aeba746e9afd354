//! Live migration driven by the companion, end to end: two real
//! `prescient serve` processes (a source host's and a destination host's,
//! on loopback), real `labvm` processes on real KVM, `prescient host
//! drain`, and the destination companion's slot listener on a real socket.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::migration::{
    HookVmm, destination, drain, labvm_bin, labvm_on_kvm, source_labvm, source_labvm_with, text,
    undrain, wait_events,
};
use common::{Server, free_port};
use vmm_hooks::{EventKind, HookReply, RunStatus};

#[test]
fn hw_kvm_drain_moves_a_running_guest_to_the_other_companion() {
    const TEST: &str = "hw_kvm_drain_moves_a_running_guest_to_the_other_companion";
    let Some(labvm) = labvm_on_kvm(TEST) else {
        return;
    };
    let (dest, dest_addr, _cfg) = destination(&labvm, "3");
    let src = Server::start_with(false);
    let guest = source_labvm(&labvm, &src, "drain-1", "60");
    // Two dirty-rate measurements have reached the source companion.
    let polls = wait_events(&src, "drain-1", "poll", 1);
    assert!(polls[0].seq > 0);
    let t = Instant::now();
    let rates = loop {
        let rates: Vec<f64> = src
            .events()
            .into_iter()
            .filter_map(|r| match r.event.kind {
                EventKind::Poll(RunStatus {
                    dirty_pages_per_s: Some(d),
                    ..
                }) if r.event.vm.vm_id == "drain-1" => Some(d),
                _ => None,
            })
            .collect();
        if rates.len() >= 2 {
            break rates;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no dirty rate reported"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // The guest dirties 2000 pages a second; the measurement sees that
    // order of magnitude (the window is short, so not exactly).
    assert!(
        rates.iter().all(|&r| (500.0..8000.0).contains(&r)),
        "dirty rates {rates:?} for a guest dirtying 2000 pages/s"
    );

    let out = drain(&src, &[&dest_addr]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "drain failed: {stdout}\n{stderr}");
    assert!(stderr.contains("1 of 1 moved"), "{stderr}");
    assert!(
        stdout.contains("drain-1") && stdout.contains("moved"),
        "{stdout}"
    );

    // The source labvm stopped its copy after the destination ran it.
    let done = guest.wait_with_output().unwrap();
    let gout = text(&done.stdout);
    assert!(done.status.success(), "{gout}\n{}", text(&done.stderr));
    assert!(gout.contains("migrated to 127.0.0.1:"), "{gout}");

    // The source companion saw the order carried out, with the budget it
    // derived from the measured dirty rate, and released the VM.
    let status = prescient::query_status(&src.socket, Duration::from_secs(5)).unwrap();
    let m = status
        .migrations
        .iter()
        .find(|m| m.vm == "drain-1")
        .unwrap();
    assert_eq!(m.state, prescient::migration::MoveState::Moved, "{m:?}");
    let budget = m.budget.as_ref().unwrap();
    assert!(budget.why.contains("dirty rate"), "{budget:?}");
    let outcome = m.outcome.as_ref().unwrap();
    assert!(outcome.bytes > 0 && outcome.error.is_none(), "{outcome:?}");
    let kinds: Vec<String> = src
        .events()
        .into_iter()
        .filter(|r| r.event.vm.vm_id == "drain-1")
        .filter_map(|r| match r.event.kind {
            EventKind::Migrate { phase, .. } => Some(format!("migrate-{phase:?}")),
            EventKind::Stopped { .. } => Some("stopped".into()),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["migrate-Started", "migrate-Completed", "stopped"]);
    assert!(
        status.vms.iter().all(|v| v.vm_id != "drain-1"),
        "{:?}",
        status.vms
    );

    // The destination companion met the VM as a restored one, under the
    // same id, and it runs there (it reports its status).
    wait_events(&dest, "drain-1", "restarted", 1);
    let created = wait_events(&dest, "drain-1", "created", 1);
    assert!(matches!(created[0].kind, EventKind::Created { .. }));
    wait_events(&dest, "drain-1", "poll", 3);
    // It ran its 3 s there and stopped cleanly.
    wait_events(&dest, "drain-1", "stopped", 1);
}

#[test]
fn hw_kvm_drain_to_an_unreachable_companion_leaves_the_vm_running_here() {
    const TEST: &str = "hw_kvm_drain_to_an_unreachable_companion_leaves_the_vm_running_here";
    let Some(labvm) = labvm_on_kvm(TEST) else {
        return;
    };
    let src = Server::start_with(false);
    let mut guest = source_labvm(&labvm, &src, "stay-1", "60");
    wait_events(&src, "stay-1", "poll", 1);
    // Nothing listens on this port.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = drain(&src, &[&nowhere]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stay-1: failed"), "{stderr}");
    assert!(
        stderr.contains("cannot reach the destination companion"),
        "{stderr}"
    );
    assert!(stderr.contains("0 of 1 moved"), "{stderr}");
    // The guest runs on here: it keeps reporting, and was never told to move.
    let before = wait_events(&src, "stay-1", "poll", 1).len();
    wait_events(&src, "stay-1", "poll", before + 5);
    assert!(guest.try_wait().unwrap().is_none(), "the guest stopped");
    assert!(
        src.events()
            .iter()
            .all(|r| !matches!(r.event.kind, EventKind::Migrate { .. })),
        "a migration started"
    );
    guest.kill().unwrap();
    guest.wait().unwrap();
}

/// A VMM that does not announce the migrate feature (an older labvm, or
/// another VMM) is listed as unsupported and never sent `migrate`.
#[test]
fn a_vmm_without_the_migrate_feature_is_never_ordered_to_migrate() {
    let src = Server::start_with(false);
    let mut vmm = HookVmm::new(&src, &[]);
    vmm.created("old-1", 128);
    assert_eq!(vmm.poll("old-1", 128), HookReply::Ack);
    let out = drain(&src, &["127.0.0.1:9"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("old-1: unsupported"), "{stderr}");
    for _ in 0..5 {
        assert_eq!(vmm.poll("old-1", 128), HookReply::Ack);
    }
}

#[test]
fn drain_without_vms_or_with_a_bad_destination_says_so() {
    let src = Server::start_with(false);
    let out = drain(&src, &["127.0.0.1:9"]);
    assert!(out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no VMs on this host"), "{stderr}");
    // Without a store the drain cannot outlive the daemon, and says so.
    assert!(stderr.contains("NOT recorded"), "{stderr}");
    let out = drain(&src, &["no-port-here"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("HOST:PORT"),
        "{}",
        text(&out.stderr)
    );
}

/// Sends one line to the slot listener; returns the answer line.
fn slot_exchange(addr: &str, line: &[u8]) -> serde_json::Value {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(line).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn the_slot_listener_refuses_bad_requests_and_keeps_serving() {
    // A labvm that does not exist: the requests below are refused before
    // or at the start, and nothing runs.
    let (dest, addr, _cfg) = destination(Path::new("/nonexistent/labvm"), "1");
    for (line, says) in [
        (&b"garbage\n"[..], "not a slot request"),
        (&[0xffu8, 0xfe, b'\n'][..], "cannot read the request"),
        (
            &br#"{"version":9,"vm_id":"a","ram_mib":128,"vcpus":1}
"#[..],
            "version 9",
        ),
        (
            &br#"{"version":1,"vm_id":"../etc","ram_mib":128,"vcpus":1}
"#[..],
            "vm_id",
        ),
        (
            &br#"{"version":1,"vm_id":"huge","ram_mib":16000000,"vcpus":1}
"#[..],
            "no room on this host",
        ),
        (
            &br#"{"version":1,"vm_id":"ok-1","ram_mib":128,"vcpus":1}
"#[..],
            "cannot start /nonexistent/labvm",
        ),
    ] {
        let a = slot_exchange(&addr, line);
        assert_eq!(a["ok"], false, "{a}");
        let e = a["error"].as_str().unwrap();
        assert!(e.contains(says), "{}: {e}", text(line));
    }
    // A line that never ends is cut off at its limit, not buffered forever.
    let big = vec![b'x'; 1 << 20];
    let mut s = TcpStream::connect(&addr).unwrap();
    let _ = s.write_all(&big);
    drop(s);
    let a = slot_exchange(&addr, b"garbage\n");
    assert_eq!(a["ok"], false);
    drop(dest);
}

/// With destinations configured, the companion moves a VM on its own when
/// the VMs' forecast memory would overload this host.
#[test]
fn hw_kvm_a_predicted_overload_moves_a_vm_without_an_operator() {
    const TEST: &str = "hw_kvm_a_predicted_overload_moves_a_vm_without_an_operator";
    let Some(labvm) = labvm_on_kvm(TEST) else {
        return;
    };
    let (dest, dest_addr, _d) = destination(&labvm, "2");
    // A host with 8 MiB for VMs: a guest's resident memory (its labvm
    // process, tens of MiB) is forecast over 95 % of it. Boots are let in
    // without a reservation so that the guest runs at all.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("src.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pool]\nmemory_mib = 8\nreserved_memory_mib = 0\nmemory_overcommit = 1.0\n\n[allocator]\non_shortfall = \"boot-lazily\"\n\n[migration]\ndestinations = [\"{dest_addr}\"]\nwindow = 3\n"
        ),
    )
    .unwrap();
    let src = Server::start_args(false, &["--config", cfg.to_str().unwrap()]);
    let guest = source_labvm(&labvm, &src, "hot-1", "60");
    let done = guest.wait_with_output().unwrap();
    let gout = text(&done.stdout);
    assert!(done.status.success(), "{gout}\n{}", text(&done.stderr));
    assert!(gout.contains("migrated to 127.0.0.1:"), "{gout}");
    let status = prescient::query_status(&src.socket, Duration::from_secs(5)).unwrap();
    let m = status.migrations.iter().find(|m| m.vm == "hot-1").unwrap();
    assert_eq!(m.state, prescient::migration::MoveState::Moved, "{m:?}");
    assert!(m.reason.contains("predicted overload"), "{}", m.reason);
    wait_events(&dest, "hot-1", "restarted", 1);
}

/// At most four labvms wait for incoming VMs at once, one per VM id.
#[test]
fn the_slot_listener_bounds_the_labvms_it_starts() {
    const TEST: &str = "the_slot_listener_bounds_the_labvms_it_starts";
    let Some(labvm) = labvm_bin(TEST) else {
        return;
    };
    // Each labvm started waits 30 s for its VM, then exits by itself.
    let (_dest, addr, _cfg) = destination(&labvm, "1");
    let req =
        |id: &str| format!("{{\"version\":1,\"vm_id\":\"{id}\",\"ram_mib\":64,\"vcpus\":1}}\n");
    let first = slot_exchange(&addr, req("w-0").as_bytes());
    assert_eq!(first["ok"], true, "{first}");
    let port: std::net::SocketAddr = first["addr"].as_str().unwrap().parse().unwrap();
    assert!(port.ip().is_loopback() && port.port() != 0, "{port}");
    let again = slot_exchange(&addr, req("w-0").as_bytes());
    assert_eq!(again["ok"], false);
    assert!(
        again["error"].as_str().unwrap().contains("already waits"),
        "{again}"
    );
    for i in 1..4 {
        let a = slot_exchange(&addr, req(&format!("w-{i}")).as_bytes());
        assert_eq!(a["ok"], true, "{a}");
    }
    let fifth = slot_exchange(&addr, req("w-4").as_bytes());
    assert_eq!(fifth["ok"], false);
    assert!(
        fifth["error"].as_str().unwrap().contains("already waiting"),
        "{fifth}"
    );
}

/// A drain holds new VMs off the host (their boots are deferred) until
/// `prescient host undrain`.
#[test]
fn a_drained_host_defers_new_boots_until_undrain() {
    let src = Server::start_with(false);
    let mut vmm = HookVmm::new(&src, &[vmm_hooks::proto::FEATURE_INTERRUPT]);
    // One VM runs (its VMM cannot migrate): the drain leaves it, but begins.
    vmm.created("old", 64);
    let out = drain(&src, &["127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let status = prescient::query_status(&src.socket, Duration::from_secs(5)).unwrap();
    assert!(status.draining);
    vmm.created("new", 64);
    match vmm.before_boot("new", 64) {
        HookReply::Defer { reason, .. } => assert!(reason.contains("draining"), "{reason}"),
        other => panic!("a boot on a draining host got {other:?}"),
    }
    let out = undrain(&src);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !prescient::query_status(&src.socket, Duration::from_secs(5))
            .unwrap()
            .draining
    );
    assert!(matches!(vmm.before_boot("new", 64), HookReply::Plan(_)));
}

/// A guest with a balloon reports its run status inside its balloon
/// events; it drains the same way, and its balloon goes with it.
#[test]
fn hw_kvm_drain_moves_a_ballooned_guest() {
    const TEST: &str = "hw_kvm_drain_moves_a_ballooned_guest";
    let Some(labvm) = labvm_on_kvm(TEST) else {
        return;
    };
    let (dest, dest_addr, _cfg) = destination(&labvm, "3");
    let src = Server::start_with(false);
    let guest = source_labvm_with(
        &labvm,
        &src,
        "balloon-1",
        "60",
        &["--balloon", "--balloon-poll-ms", "200"],
    );
    // Its status rides in balloon events (no poll events).
    let t = Instant::now();
    while !src.events().iter().any(|r| {
        matches!(&r.event.kind, EventKind::Balloon(b) if b.run.as_ref().is_some_and(|r| r.migratable))
    }) {
        assert!(t.elapsed() < Duration::from_secs(30), "no run status in balloon events");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        src.events()
            .iter()
            .all(|r| !matches!(r.event.kind, EventKind::Poll(_))),
        "a ballooned guest sent poll events"
    );
    let out = drain(&src, &[&dest_addr]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done = guest.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(text(&done.stdout).contains("migrated to"));
    // On the destination the guest's balloon device reports on.
    wait_events(&dest, "balloon-1", "restarted", 1);
    wait_events(&dest, "balloon-1", "balloon", 2);
}
