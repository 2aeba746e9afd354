//! A real libvirtd and QEMU (TCG) started by the test, a real
//! `prescient serve`, and the hook installed by `prescient
//! install-libvirt-hook`: a Debian cloud kernel with a busybox initramfs
//! (scripts/guest-image) boots, the daemon receives the hook calls in order
//! with the domain XML, pins the vCPU threads and moves the guest's balloon;
//! with the daemon down the hook returns and the next domain still starts.
//!
//! libvirtd runs in a private mount namespace in which the test's own
//! directories stand in for /etc/libvirt (configuration and hooks),
//! /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt,
//! so the machine's libvirt configuration and hooks are never touched.
//! Needs root, libvirt and QEMU (scripts/setup-libvirt) and the guest image
//! (scripts/guest-image); otherwise the test prints `SKIP` (or fails when
//! PRESCIENT_REQUIRE contains `libvirt`).
#![allow(clippy::unwrap_used, clippy::print_stdout)] // test helpers outside #[test] functions; SKIP lines go to stdout

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::libvirt::{
    Libvirtd, LibvirtdOptions, console_says_ready, domain_xml, guest_memtotals, one_at_a_time,
    records, tools_or_skip, unpin, vcpu_affinity, vcpu_tids, wait_for,
};
use common::{Server, scrape};
use prescient::libvirt::AgentRecord;
use vmm_hooks::{EventKind, LibvirtOperation};

/// Bounds that only catch a hang; nothing is asserted about speed.
const BOOT_HANG: Duration = Duration::from_secs(180);
const ACT_HANG: Duration = Duration::from_secs(120);

#[test]
fn hw_libvirt_hook_events_pin_vcpus_and_move_the_balloon() {
    let test = "hw_libvirt_hook_events_pin_vcpus_and_move_the_balloon";
    let Some(tools) = tools_or_skip(test) else {
        return;
    };
    let _serial = one_at_a_time();
    let mut libvirtd = Libvirtd::prepare(&tools.virsh);
    let record = libvirtd.path("prescient-libvirt.jsonl");
    let run_dir = libvirtd.path("run");
    let uri = libvirtd.uri();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let server = Server::start_args(
        false,
        &[
            "--metrics-listen",
            &metrics_addr,
            "--libvirt-uri",
            &uri,
            "--libvirt-run-dir",
            run_dir.to_str().unwrap(),
            "--libvirt-record",
            record.to_str().unwrap(),
            "--libvirt-sample-ms",
            "300",
            "--virsh",
            tools.virsh.to_str().unwrap(),
        ],
    );

    // Install the hook into the test's libvirt configuration, twice.
    let install = || {
        let o = Command::new(env!("CARGO_BIN_EXE_prescient"))
            .args(["install-libvirt-hook", "--hooks-dir"])
            .arg(libvirtd.path("etc/hooks"))
            .arg("--socket")
            .arg(&server.socket)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(install().contains("installed the libvirt hook"));
    assert!(install().contains("unchanged"));
    libvirtd.start(&tools);

    // Pin both vCPUs to the last CPU this process may use.
    let own = prescient::libvirt::thread_cpus(std::process::id().try_into().unwrap()).unwrap();
    let pin_cpu = *own.last().unwrap();
    let name = format!("prescient-e2e-{}", std::process::id());
    let console = libvirtd.path("console-a.log");
    let xml_path = libvirtd.path("domain-a.xml");
    std::fs::write(&xml_path, domain_xml(&name, &tools, &console, pin_cpu)).unwrap();
    libvirtd.virsh_ok(&["create", xml_path.to_str().unwrap()]);
    wait_for(BOOT_HANG, "the guest to boot", || {
        console_says_ready(&console).then_some(())
    });
    let before = wait_for(BOOT_HANG, "the guest's first MemTotal", || {
        guest_memtotals(&console).first().copied()
    });

    // The daemon acted: pinned both vCPU threads and set the balloon.
    let acted = wait_for(ACT_HANG, "the daemon to act on the domain", || {
        records(&record)
            .into_iter()
            .find(|r| matches!(r, AgentRecord::Acted { vm, .. } if *vm == name))
    });
    let AgentRecord::Acted {
        qemu_pid,
        vcpus,
        balloon_target_kib,
        balloon_error,
        ..
    } = acted
    else {
        unreachable!()
    };
    assert_eq!(balloon_error, None);
    assert_eq!(balloon_target_kib, Some(256 * 1024));
    assert_eq!(qemu_pid, libvirtd.qemu_pid(&name));
    assert_eq!(vcpus.len(), 2, "{vcpus:?}");
    assert!(
        vcpus
            .iter()
            .all(|p| p.cpus == [pin_cpu] && p.note.is_none()),
        "{vcpus:?}"
    );

    // Independently, from /proc: the vCPU threads may run on that CPU only.
    let affinity = vcpu_affinity(qemu_pid);
    assert_eq!(affinity.len(), 2, "{affinity:?}");
    for (comm, allowed) in &affinity {
        assert_eq!(allowed, &pin_cpu.to_string(), "{comm}");
    }
    eprintln!("vCPU threads of QEMU {qemu_pid}: {affinity:?}");

    // The balloon really moved: QEMU reports it, and the guest sees less memory.
    let actual = wait_for(ACT_HANG, "QMP query-balloon to reach 256 MiB", || {
        let out = libvirtd.virsh_ok(&[
            "qemu-monitor-command",
            &name,
            r#"{"execute":"query-balloon"}"#,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let actual = v["return"]["actual"].as_u64()?;
        (actual == 256 << 20).then_some(actual)
    });
    // A 512 MiB guest without a balloon shows about 470 MiB; at 256 MiB it
    // shows about 220-250 MiB. (The first line printed may already be
    // ballooned a little: the daemon can set the target before the guest
    // has booted.)
    let after = wait_for(
        ACT_HANG,
        "the guest's MemTotal to drop under 300 MiB",
        || {
            guest_memtotals(&console)
                .last()
                .copied()
                .filter(|&m| m <= 300 * 1024)
        },
    );
    eprintln!("balloon: QMP actual {actual} bytes; guest MemTotal {before} kB -> {after} kB");

    // Usage is recorded, with the balloon's size as libvirt reports it.
    let usage = wait_for(ACT_HANG, "a usage sample after the balloon moved", || {
        records(&record).into_iter().find(|r| {
            matches!(r, AgentRecord::Usage { vm, cpu_ms, rss_kib, balloon_actual_kib, .. }
                if *vm == name && *cpu_ms > 0.0 && *rss_kib > 0 && *balloon_actual_kib == Some(256 * 1024))
        })
    });
    eprintln!("usage: {usage:?}");

    // libvirtd restarts with the domain running: the `reconnect` hook makes
    // the daemon act again. Undo the pinning first so that we see it redone.
    for (_, tid) in vcpu_tids(qemu_pid) {
        unpin(tid, &own);
    }
    if own.len() > 1 {
        let affinity = vcpu_affinity(qemu_pid);
        assert!(
            affinity.iter().all(|(_, a)| *a != pin_cpu.to_string()),
            "{affinity:?}"
        );
    }
    libvirtd.restart(&tools);
    wait_for(ACT_HANG, "the daemon to act again after reconnect", || {
        let n = records(&record)
            .iter()
            .filter(|r| matches!(r, AgentRecord::Acted { vm, .. } if *vm == name))
            .count();
        (n >= 2).then_some(())
    });
    let affinity = vcpu_affinity(qemu_pid);
    assert!(
        affinity.iter().all(|(_, a)| *a == pin_cpu.to_string()),
        "{affinity:?}"
    );
    assert_eq!(
        libvirtd.qemu_pid(&name),
        qemu_pid,
        "the domain kept running"
    );

    // The hook calls reached the daemon in libvirt's order, with the XML.
    let events = server.events();
    let mine: Vec<_> = events.iter().filter(|r| r.event.vm.vm_id == name).collect();
    let ops: Vec<LibvirtOperation> = mine
        .iter()
        .map(|r| match &r.event.kind {
            EventKind::Libvirt(c) => c.operation,
            other => panic!("not a libvirt event: {other:?}"),
        })
        .collect();
    assert_eq!(
        ops,
        [
            LibvirtOperation::Prepare,
            LibvirtOperation::Start,
            LibvirtOperation::Started,
            LibvirtOperation::Reconnect,
        ],
        "{mine:#?}"
    );
    for r in &mine {
        let EventKind::Libvirt(c) = &r.event.kind else {
            unreachable!()
        };
        assert_eq!(c.sub_operation, "begin");
        assert!(
            c.domain_xml.contains(&format!("<name>{name}</name>")),
            "{}",
            c.domain_xml
        );
        assert_eq!(c.xml_error, None);
        let d = c.domain.as_ref().unwrap();
        assert_eq!((d.vcpus, d.memory_kib), (2, 512 * 1024));
        assert_eq!(d.prescient.balloon_target_mib, Some(256));
    }

    // Stop the domain: the daemon hears stopped and release.
    libvirtd.virsh_ok(&["destroy", &name]);
    let ops = wait_for(ACT_HANG, "stopped and release to reach the daemon", || {
        let ops: Vec<String> = server
            .events()
            .iter()
            .filter(|r| r.event.vm.vm_id == name)
            .map(|r| r.event.kind.name().to_string())
            .collect();
        (ops.len() >= 6).then_some(ops)
    });
    assert_eq!(
        ops,
        [
            "libvirt-prepare",
            "libvirt-start",
            "libvirt-started",
            "libvirt-reconnect",
            "libvirt-stopped",
            "libvirt-release"
        ]
    );

    // What the daemon did is counted: two vCPUs pinned twice (started,
    // reconnect), the balloon set twice, usage sampled.
    let text = scrape(port);
    for want in [
        r#"prescient_libvirt_actions_total{kind="vcpu-pinned"} 4"#,
        r#"prescient_libvirt_actions_total{kind="balloon-set"} 2"#,
        r#"prescient_events_total{kind="libvirt-started"} "#,
        r#"prescient_events_total{kind="libvirt-reconnect"} "#,
    ] {
        assert!(text.contains(want), "{want} not in:\n{text}");
    }
    assert!(text.contains(r#"prescient_libvirt_actions_total{kind="usage-sampled"}"#));
    assert!(!text.contains(r#"kind="pin-failed""#), "{text}");
    assert!(!text.contains(r#"kind="balloon-failed""#), "{text}");

    // The daemon goes down. The installed hook returns at once with 0 ...
    let socket = server.socket.clone();
    let log = server.stop();
    assert!(!log.contains("panicked"), "{log}");
    let t = Instant::now();
    let mut hook = Command::new(libvirtd.path("etc/hooks/qemu"))
        .args([name.as_str(), "started", "begin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = hook.stdin.take().unwrap();
        let _ = stdin.write_all(domain_xml(&name, &tools, &console, pin_cpu).as_bytes());
    }
    let status = loop {
        if let Some(s) = hook.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the hook hung with the daemon down"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = t.elapsed();
    let mut out = String::new();
    hook.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    hook.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("did not take the call"), "{err}");
    assert!(!socket.exists());
    eprintln!("hook with the daemon down returned 0 in {took:?}");

    // ... and a domain still starts and boots.
    let name_b = format!("{name}-b");
    let console_b = libvirtd.path("console-b.log");
    let xml_b = libvirtd.path("domain-b.xml");
    std::fs::write(&xml_b, domain_xml(&name_b, &tools, &console_b, pin_cpu)).unwrap();
    let t = Instant::now();
    libvirtd.virsh_ok(&["create", xml_b.to_str().unwrap()]);
    eprintln!("virsh create with the daemon down took {:?}", t.elapsed());
    wait_for(
        BOOT_HANG,
        "the second guest to boot with the daemon down",
        || console_says_ready(&console_b).then_some(()),
    );
    let state = libvirtd.virsh_ok(&["domstate", &name_b]);
    assert_eq!(state.trim(), "running");

    // A daemon that accepts and never answers: every hook call waits out
    // its bound (2 s) and returns 0, and the domain starts all the same.
    // (The stopped daemon's directory is gone: point the hook elsewhere,
    // which the installer reports as an update.)
    let silent_path = libvirtd.path("silent.sock");
    let o = Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["install-libvirt-hook", "--hooks-dir"])
        .arg(libvirtd.path("etc/hooks"))
        .arg("--socket")
        .arg(&silent_path)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("updated"));
    let silent = SilentDaemon::bind(&silent_path);
    let name_c = format!("{name}-c");
    let console_c = libvirtd.path("console-c.log");
    let xml_c = libvirtd.path("domain-c.xml");
    std::fs::write(&xml_c, domain_xml(&name_c, &tools, &console_c, pin_cpu)).unwrap();
    let t = Instant::now();
    libvirtd.virsh_ok(&["create", xml_c.to_str().unwrap()]);
    eprintln!(
        "virsh create with a silent daemon took {:?} ({} hook connections held unanswered)",
        t.elapsed(),
        silent.accepted()
    );
    assert!(
        silent.accepted() >= 3,
        "prepare, start and started each connected"
    );
    wait_for(
        BOOT_HANG,
        "the third guest to boot with a silent daemon",
        || console_says_ready(&console_c).then_some(()),
    );
    assert_eq!(libvirtd.virsh_ok(&["domstate", &name_c]).trim(), "running");
    drop(silent);
    drop(libvirtd);
}

/// A hooks socket that accepts connections and never answers.
struct SilentDaemon {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentDaemon {
    fn bind(path: &Path) -> SilentDaemon {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        held.push(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        SilentDaemon {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for SilentDaemon {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bound on one live migration of the 512 MiB TCG guest over loopback;
/// only catches a hang.
const MIGRATE_HANG: Duration = Duration::from_secs(300);

/// The move of `vm` in `server`'s status, once it is over.
fn final_move(server: &Server, vm: &str) -> prescient::migration::MoveRecord {
    wait_for(MIGRATE_HANG, "the libvirt domain's move to end", || {
        common::migration::status(server)
            .migrations
            .into_iter()
            .find(|m| m.vm == vm && m.state.is_final())
    })
}

/// Runs `server`'s installed hook by hand as libvirt does for an incoming
/// migration (`DOMAIN migrate begin -`, the XML on stdin); returns its
/// exit status, stdout and stderr.
fn run_migrate_hook(
    hook: &Path,
    name: &str,
    xml: &str,
) -> (std::process::ExitStatus, String, String) {
    use std::io::Write;
    let mut child = Command::new(hook)
        .args([name, "migrate", "begin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    let out = wait_for(ACT_HANG, "the migrate hook to return", || {
        child.try_wait().unwrap()
    });
    let mut o = String::new();
    child.stdout.take().unwrap().read_to_string(&mut o).unwrap();
    let mut e = String::new();
    child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
    (out, o, e)
}

#[test]
fn hw_libvirt_drain_live_migrates_a_domain_to_the_destination_libvirtd() {
    let test = "hw_libvirt_drain_live_migrates_a_domain_to_the_destination_libvirtd";
    let Some(tools) = tools_or_skip(test) else {
        return;
    };
    let _serial = one_at_a_time();
    // Two libvirtds on this machine, told apart by their host UUIDs; the
    // destination listens on TCP for the source's peer-to-peer migration.
    let mut src = Libvirtd::prepare_with(
        &tools.virsh,
        &LibvirtdOptions {
            host_uuid: Some("5a1e0000-0000-4000-8000-00000000a001".into()),
            tcp_port: None,
        },
    );
    let dst_libvirt_port = common::free_port();
    let mut dst = Libvirtd::prepare_with(
        &tools.virsh,
        &LibvirtdOptions {
            host_uuid: Some("5a1e0000-0000-4000-8000-00000000b002".into()),
            tcp_port: Some(dst_libvirt_port),
        },
    );
    let dst_uri = dst.tcp_uri().unwrap();

    // The destination companion, whose migration listener a drain names.
    let dst_companion = format!("127.0.0.1:{}", common::free_port());
    let dst_cfg = dst.path("prescient.toml");
    std::fs::write(
        &dst_cfg,
        format!("[migration]\nlisten = \"{dst_companion}\"\n"),
    )
    .unwrap();
    let virsh = tools.virsh.to_str().unwrap();
    let (dst_libvirt_uri, dst_run) = (dst.uri(), dst.path("run"));
    let dst_server = Server::start_args(
        true,
        &[
            "--config",
            dst_cfg.to_str().unwrap(),
            "--libvirt-uri",
            &dst_libvirt_uri,
            "--libvirt-run-dir",
            dst_run.to_str().unwrap(),
            "--virsh",
            virsh,
        ],
    );
    // The source companion moves domains to `{host}` of the drain's
    // destination, on the destination libvirtd's port.
    let metrics_port = common::free_port();
    let (src_libvirt_uri, src_run) = (src.uri(), src.path("run"));
    let template = format!("qemu+tcp://{{host}}:{dst_libvirt_port}/system");
    let src_server = Server::start_args(
        true,
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--libvirt-uri",
            &src_libvirt_uri,
            "--libvirt-run-dir",
            src_run.to_str().unwrap(),
            "--virsh",
            virsh,
            "--libvirt-migrate-uri",
            &template,
        ],
    );
    for (l, server) in [(&src, &src_server), (&dst, &dst_server)] {
        let o = Command::new(env!("CARGO_BIN_EXE_prescient"))
            .args(["install-libvirt-hook", "--hooks-dir"])
            .arg(l.path("etc/hooks"))
            .arg("--socket")
            .arg(&server.socket)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    src.start(&tools);

    // One persistent domain on the source, booted.
    let own = prescient::libvirt::thread_cpus(std::process::id().try_into().unwrap()).unwrap();
    let name = format!("prescient-move-{}", std::process::id());
    let console = src.path("console.log");
    let xml = domain_xml(&name, &tools, &console, *own.last().unwrap());
    let xml_path = src.path("domain.xml");
    std::fs::write(&xml_path, &xml).unwrap();
    src.virsh_ok(&["define", xml_path.to_str().unwrap()]);
    src.virsh_ok(&["start", &name]);
    wait_for(BOOT_HANG, "the guest to boot", || {
        console_says_ready(&console).then_some(())
    });
    let src_pid = src.qemu_pid(&name);

    // 1. The destination libvirtd is not running: virsh migrate fails, the
    // record says why (virsh's error), and the domain runs on here.
    let to = [dst_companion.as_str()];
    let out = common::migration::drain(&src_server, &to);
    eprintln!(
        "drain with the destination libvirtd down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = final_move(&src_server, &name);
    assert_eq!(
        failed.state,
        prescient::migration::MoveState::Failed,
        "{failed:?}"
    );
    assert_eq!(failed.addr.as_deref(), Some(dst_uri.as_str()));
    let why = failed.error.clone().unwrap();
    assert!(
        why.contains("virsh migrate") && why.contains(&dst_libvirt_port.to_string()),
        "{why}"
    );
    assert_eq!(src.virsh_ok(&["domstate", &name]).trim(), "running");
    assert_eq!(src.qemu_pid(&name), src_pid);
    assert!(Path::new(&format!("/proc/{src_pid}")).exists());

    // 2. The destination libvirtd runs, and the source companion restarts
    // (as the OS update it drains for restarts it): the drain resumes from
    // the store, the domain (known from the store's records; libvirt calls
    // no hook for it) is taken up again and moves there, live.
    dst.start(&tools);
    let (src_server, log) = src_server.restart();
    assert!(!log.contains("panicked"), "{log}");
    let moved = final_move(&src_server, &name);
    assert_eq!(
        moved.state,
        prescient::migration::MoveState::Moved,
        "{moved:?}\nsource libvirtd:\n{}\ndestination libvirtd:\n{}",
        src.log(),
        dst.log()
    );
    assert_eq!(moved.destination, dst_companion);
    assert_eq!(moved.addr.as_deref(), Some(dst_uri.as_str()));
    assert_eq!(moved.reason, "drain");

    // Gone from the source (its QEMU exited, its definition undefined) ...
    wait_for(ACT_HANG, "the source QEMU to exit", || {
        (!Path::new(&format!("/proc/{src_pid}")).exists()).then_some(())
    });
    let left = src.virsh_ok(&["list", "--all", "--name"]);
    assert!(!left.lines().any(|l| l.trim() == name), "{left}");
    // ... running on the destination, persistent there, its guest alive:
    // the destination's QEMU is the only one left to write the console.
    assert_eq!(dst.virsh_ok(&["domstate", &name]).trim(), "running");
    let info = dst.virsh_ok(&["dominfo", &name]);
    assert!(
        info.lines()
            .any(|l| l.starts_with("Persistent:") && l.trim_end().ends_with("yes")),
        "{info}"
    );
    let dst_pid = dst.qemu_pid(&name);
    assert_ne!(dst_pid, src_pid);
    let cmdline = std::fs::read(format!("/proc/{dst_pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&format!("guest={name}")),
        "destination QEMU {dst_pid}"
    );
    let lines_then = guest_memtotals(&console).len();
    let size_then = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
    wait_for(ACT_HANG, "the migrated guest to print again", || {
        let size = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
        (size > size_then && !guest_memtotals(&console).is_empty()).then_some(())
    });
    eprintln!(
        "guest on the destination (QEMU {dst_pid}) prints on: {lines_then} MemTotal lines, then more"
    );

    // The destination's hook saw libvirt's `migrate begin` first (with the
    // domain XML) and let the migration through; then the incoming
    // domain's prepare, start and started.
    let ops: Vec<String> = dst_server
        .events()
        .iter()
        .filter(|r| r.event.vm.vm_id == name)
        .map(|r| r.event.kind.name().to_string())
        .collect();
    assert_eq!(
        ops.get(..4),
        Some(
            &[
                "libvirt-migrate",
                "libvirt-prepare",
                "libvirt-start",
                "libvirt-started"
            ]
            .map(String::from)[..]
        ),
        "{ops:?}"
    );
    let migrate_call = dst_server
        .events()
        .into_iter()
        .find_map(|r| match r.event.kind {
            EventKind::Libvirt(c)
                if r.event.vm.vm_id == name && c.operation == LibvirtOperation::Migrate =>
            {
                Some(c)
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(migrate_call.sub_operation, "begin");
    assert_eq!(migrate_call.xml_error, None);
    assert!(
        migrate_call
            .domain_xml
            .contains(&format!("<name>{name}</name>"))
    );
    // The same call by hand: exit 0 and nothing on stdout (libvirt would
    // take anything printed there as a replacement domain XML).
    let (status, stdout, stderr) =
        run_migrate_hook(&dst.path("etc/hooks/qemu"), &name, &migrate_call.domain_xml);
    assert!(status.success(), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    // The source heard its domain stop; the moves are counted.
    wait_for(ACT_HANG, "the source's stopped and release hooks", || {
        let ops: Vec<String> = src_server
            .events()
            .iter()
            .filter(|r| r.event.vm.vm_id == name)
            .map(|r| r.event.kind.name().to_string())
            .collect();
        ops.iter().any(|o| o == "libvirt-release").then_some(())
    });
    let text = scrape(metrics_port);
    for want in [
        r#"prescient_migrations_total{kind="ordered"} 1"#,
        r#"prescient_migrations_total{kind="moved"} 1"#,
    ] {
        assert!(text.contains(want), "{want} not in:\n{text}");
    }
    assert!(
        !text.contains(r#"prescient_migrations_total{kind="failed"}"#),
        "{text}"
    );
    let log = src_server.stop();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("resuming drain"), "{log}");
    drop(dst_server);
    drop(dst);
    drop(src);
}
