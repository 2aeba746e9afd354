//! Live migration driven by the companion, end to end: two real
//! `prescient serve` processes (a source host's and a destination host's,
//! on loopback), real `labvm` processes on real KVM, `prescient host
//! drain`, and the destination companion's slot listener on a real socket.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Server, free_port};
use labvm::testing::{kvm_or_skip, required};
use vmm_hooks::{Event, EventKind, HookReply, LifecycleHook, RunStatus, VmIdentity, VmSpec};

/// The labvm binary beside this test's prescient (built by `cargo test
/// --workspace`); `None` (with a SKIP line) when it was not built.
#[allow(clippy::print_stdout)]
fn labvm_bin(test: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_BIN_EXE_prescient")).with_file_name("labvm");
    if p.exists() {
        // `cargo test -p prescient` does not rebuild it: a binary older
        // than this test's flags is a setup error, said plainly.
        let help = Command::new(&p).arg("--help").output().unwrap();
        assert!(
            text(&help.stdout).contains("--migrate-transport"),
            "{test}: {} is older than this test (run cargo build -p labvm, or cargo test --workspace)",
            p.display()
        );
        return Some(p);
    }
    assert!(
        !required("kvm"),
        "{test}: {} is missing (build it with cargo build -p labvm, or run cargo test --workspace)",
        p.display()
    );
    println!(
        "SKIP {test}: {} not built (cargo build -p labvm)",
        p.display()
    );
    None
}

/// A destination companion: `[migration] listen` on a free loopback port,
/// starting `labvm` (which runs `run_for` seconds once received).
fn destination(labvm: &Path, run_for: &str) -> (Server, String, tempfile::TempDir) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("dest.toml");
    std::fs::write(
        &cfg,
        format!(
            "[migration]\nlisten = \"127.0.0.1:{port}\"\nlabvm = \"{}\"\nlabvm_args = [\"--run-for\", \"{run_for}\", \"--poll-ms\", \"200\"]\n",
            labvm.display()
        ),
    )
    .unwrap();
    let server = Server::start_args(false, &["--config", cfg.to_str().unwrap()]);
    let addr = format!("127.0.0.1:{port}");
    let t = Instant::now();
    while TcpStream::connect(&addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "slot listener never came up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, addr, dir)
}

/// A dirtying lab guest reporting to `server` as `vm_id`, polling every
/// 200 ms and measuring its dirty rate every 0.5 s.
fn source_labvm(labvm: &Path, server: &Server, vm_id: &str, run_for: &str) -> Child {
    source_labvm_with(labvm, server, vm_id, run_for, &[])
}

/// [`source_labvm`] with extra labvm arguments.
fn source_labvm_with(
    labvm: &Path,
    server: &Server,
    vm_id: &str,
    run_for: &str,
    extra: &[&str],
) -> Child {
    Command::new(labvm)
        .args(extra)
        .args([
            "--mem",
            "128",
            "--workload",
            "dirty:2000:16",
            "--vm-id",
            vm_id,
        ])
        .args([
            "--poll-ms",
            "200",
            "--dirty-sample-s",
            "0.5",
            "--run-for",
            run_for,
        ])
        .arg("--hooks-socket")
        .arg(&server.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `server` has logged `n` events of `kind` for `vm`.
fn wait_events(server: &Server, vm: &str, kind: &str, n: usize) -> Vec<Event> {
    let t = Instant::now();
    loop {
        let evs: Vec<Event> = server
            .events()
            .into_iter()
            .map(|r| r.event)
            .filter(|e| e.vm.vm_id == vm && e.kind.name() == kind)
            .collect();
        if evs.len() >= n {
            return evs;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{vm}: {} {kind} events of {n} after 60 s",
            evs.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn drain(server: &Server, to: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["host", "drain", "--timeout-s", "120", "--socket"])
        .arg(&server.socket)
        .args(["--to", to])
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn hw_kvm_drain_moves_a_running_guest_to_the_other_companion() {
    const TEST: &str = "hw_kvm_drain_moves_a_running_guest_to_the_other_companion";
    if !kvm_or_skip(TEST) {
        return;
    }
    let Some(labvm) = labvm_bin(TEST) else {
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

    let out = drain(&src, &dest_addr);
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
    if !kvm_or_skip(TEST) {
        return;
    }
    let Some(labvm) = labvm_bin(TEST) else {
        return;
    };
    let src = Server::start_with(false);
    let mut guest = source_labvm(&labvm, &src, "stay-1", "60");
    wait_events(&src, "stay-1", "poll", 1);
    // Nothing listens on this port.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = drain(&src, &nowhere);
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
    let mut hc = vmm_hooks::SocketHookConfig::new(&src.socket, "old-vmm 1.0");
    hc.timeout = Duration::from_secs(5);
    let mut hook = vmm_hooks::SocketHook::new(hc);
    let vm = VmIdentity {
        vm_id: "old-1".into(),
        image_digest: "i".into(),
        package_digest: "p".into(),
    };
    let mut seq = 0;
    let mut send = |kind: EventKind| {
        let e = Event {
            vm: vm.clone(),
            seq,
            at_unix_ms: 1,
            kind,
        };
        seq += 1;
        hook.on_event(&e)
    };
    send(EventKind::Created {
        spec: VmSpec {
            vcpus: 1,
            memory_mib: 128,
            vmm: "old-vmm 1.0".into(),
            priority: 0,
            interruptible: false,
        },
    });
    let poll = RunStatus {
        ram_mib: 128,
        resident_mib: 20,
        dirty_pages_per_s: Some(10.0),
        migratable: true,
    };
    assert_eq!(send(EventKind::Poll(poll.clone())), HookReply::Ack);
    let out = drain(&src, "127.0.0.1:9");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("old-1: unsupported"), "{stderr}");
    for _ in 0..5 {
        assert_eq!(send(EventKind::Poll(poll.clone())), HookReply::Ack);
    }
}

#[test]
fn drain_without_vms_or_with_a_bad_destination_says_so() {
    let src = Server::start_with(false);
    let out = drain(&src, "127.0.0.1:9");
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("no VMs on this host"));
    let out = drain(&src, "no-port-here");
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
    if !kvm_or_skip(TEST) {
        return;
    }
    let Some(labvm) = labvm_bin(TEST) else {
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
    let mut hc = vmm_hooks::SocketHookConfig::new(&src.socket, "labvm-like 1.0");
    hc.timeout = Duration::from_secs(5);
    hc.features = vec![vmm_hooks::proto::FEATURE_INTERRUPT.into()];
    let mut hook = vmm_hooks::SocketHook::new(hc);
    let vm = |id: &str| VmIdentity {
        vm_id: id.into(),
        image_digest: "i".into(),
        package_digest: "p".into(),
    };
    let created = EventKind::Created {
        spec: VmSpec {
            vcpus: 1,
            memory_mib: 64,
            vmm: "labvm-like 1.0".into(),
            priority: 0,
            interruptible: false,
        },
    };
    let before_boot = EventKind::BeforeBoot {
        vcpu_tids: vec![1],
        ram: vmm_hooks::GuestRange {
            start: 0,
            len: 64 << 20,
        },
        admission: vmm_hooks::Admission::default(),
    };
    let ev = |id: &str, seq: u64, kind: EventKind| Event {
        vm: vm(id),
        seq,
        at_unix_ms: 1,
        kind,
    };
    // One VM runs (its VMM cannot migrate): the drain leaves it, but begins.
    hook.on_event(&ev("old", 0, created.clone()));
    let out = drain(&src, "127.0.0.1:9");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let status = prescient::query_status(&src.socket, Duration::from_secs(5)).unwrap();
    assert!(status.draining);
    hook.on_event(&ev("new", 0, created));
    match hook.on_event(&ev("new", 1, before_boot.clone())) {
        HookReply::Defer { reason, .. } => assert!(reason.contains("draining"), "{reason}"),
        other => panic!("a boot on a draining host got {other:?}"),
    }
    let out = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["host", "undrain", "--socket"])
        .arg(&src.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !prescient::query_status(&src.socket, Duration::from_secs(5))
            .unwrap()
            .draining
    );
    assert!(matches!(
        hook.on_event(&ev("new", 2, before_boot)),
        HookReply::Plan(_)
    ));
}

/// A guest with a balloon reports its run status inside its balloon
/// events; it drains the same way, and its balloon goes with it.
#[test]
fn hw_kvm_drain_moves_a_ballooned_guest() {
    const TEST: &str = "hw_kvm_drain_moves_a_ballooned_guest";
    if !kvm_or_skip(TEST) {
        return;
    }
    let Some(labvm) = labvm_bin(TEST) else {
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
    let out = drain(&src, &dest_addr);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done = guest.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(text(&done.stdout).contains("migrated to"));
    // On the destination the guest's balloon device reports on.
    wait_events(&dest, "balloon-1", "restarted", 1);
    wait_events(&dest, "balloon-1", "balloon", 2);
}
