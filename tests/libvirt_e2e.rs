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
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use prescient::libvirt::AgentRecord;
use vmm_hooks::{EventKind, LibvirtOperation};

/// Bounds that only catch a hang; nothing is asserted about speed.
const BOOT_HANG: Duration = Duration::from_secs(180);
const ACT_HANG: Duration = Duration::from_secs(120);

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

struct Tools {
    libvirtd: PathBuf,
    virtlogd: PathBuf,
    virsh: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

fn tools_or_skip(test: &str) -> Option<Tools> {
    let image = std::env::var_os("PRESCIENT_GUEST_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest-image"));
    let found = (|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (libvirtd, mount namespaces)".to_string());
        }
        let prog = |n: &str| {
            find_program(n).ok_or_else(|| format!("{n} not installed (run scripts/setup-libvirt)"))
        };
        for p in ["qemu-system-x86_64", "unshare", "mount"] {
            prog(p)?;
        }
        let kernel = image.join("vmlinuz");
        let initrd = image.join("initrd.cpio.gz");
        if !kernel.is_file() || !initrd.is_file() {
            return Err(format!(
                "no guest image in {} (run scripts/guest-image)",
                image.display()
            ));
        }
        Ok(Tools {
            libvirtd: prog("libvirtd")?,
            virtlogd: prog("virtlogd")?,
            virsh: prog("virsh")?,
            kernel,
            initrd,
        })
    })();
    match found {
        Ok(t) => Some(t),
        Err(why) if labvm::testing::required("libvirt") => {
            panic!("{test}: {why}, and PRESCIENT_REQUIRE asks for libvirt")
        }
        Err(why) => {
            println!("SKIP {test}: {why}");
            None
        }
    }
}

/// libvirtd and virtlogd in a private mount namespace over the test's
/// directories. Stopped (domains destroyed first) on drop.
struct Libvirtd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    virsh: PathBuf,
}

impl Libvirtd {
    /// Lays out the directories and configuration; starts nothing.
    fn prepare(virsh: &Path) -> Libvirtd {
        let dir = tempfile::Builder::new()
            .prefix("prescient-libvirt-")
            .tempdir()
            .unwrap();
        for d in ["etc/hooks", "run", "lib", "log", "cache"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let etc = dir.path().join("etc");
        std::fs::write(
            etc.join("libvirtd.conf"),
            "unix_sock_rw_perms = \"0700\"\nauth_unix_rw = \"none\"\n",
        )
        .unwrap();
        // As PLATFORM.md says: QEMU as root, no security driver; no cgroups,
        // so the test touches no cgroup of the machine.
        std::fs::write(
            etc.join("qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\ncgroup_controllers = [ ]\n",
        )
        .unwrap();
        std::fs::write(etc.join("virtlogd.conf"), "").unwrap();
        Libvirtd {
            dir,
            child: None,
            virsh: virsh.to_path_buf(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.path("run/libvirt-sock").display()
        )
    }

    fn start(&mut self, tools: &Tools) {
        let d = self.dir.path().display().to_string();
        let script = format!(
            "set -e
             for m in /etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do mkdir -p $m; done
             mount --bind '{d}/etc' /etc/libvirt
             mount --bind '{d}/run' /run/libvirt
             mount --bind '{d}/lib' /var/lib/libvirt
             mount --bind '{d}/log' /var/log/libvirt
             mount --bind '{d}/cache' /var/cache/libvirt
             # Already running after a libvirtd restart: keep that one.
             '{virtlogd}' -d -p '{d}/virtlogd.pid' || true
             exec '{libvirtd}' -p '{d}/libvirtd.pid'",
            virtlogd = tools.virtlogd.display(),
            libvirtd = tools.libvirtd.display(),
        );
        let log = std::fs::File::create(self.path("libvirtd.log")).unwrap();
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        loop {
            if UnixStream::connect(self.path("run/libvirt-sock")).is_ok()
                && self.virsh(&["list", "--all"]).status.success()
            {
                break;
            }
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("libvirtd exited with {s}: {}", self.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "libvirtd did not answer: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops libvirtd (its domains keep running) and starts it again; it
    /// reconnects to them and runs the `reconnect` hook for each.
    fn restart(&mut self, tools: &Tools) {
        let mut c = self.child.take().unwrap();
        let pid = i32::try_from(c.id()).unwrap();
        // SAFETY: kill with the pid of our own child (libvirtd).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = wait_for(Duration::from_secs(60), "libvirtd to stop", || {
            c.try_wait().unwrap()
        });
        eprintln!("libvirtd stopped ({status}); starting it again");
        self.start(tools);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("libvirtd.log")).unwrap_or_default()
    }

    fn virsh(&self, args: &[&str]) -> Output {
        Command::new(&self.virsh)
            .args(["-q", "-c", &self.uri()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn virsh_ok(&self, args: &[&str]) -> String {
        let o = self.virsh(args);
        assert!(
            o.status.success(),
            "virsh {args:?}: {}\nlibvirtd log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn qemu_pid(&self, name: &str) -> i32 {
        std::fs::read_to_string(self.path(&format!("run/qemu/{name}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let names = self.virsh(&["list", "--name"]);
        for n in String::from_utf8_lossy(&names.stdout)
            .lines()
            .filter(|l| !l.is_empty())
        {
            let _ = self.virsh(&["destroy", n]);
        }
        if let Some(mut c) = self.child.take() {
            let pid = i32::try_from(c.id()).unwrap();
            // SAFETY: kill with the pid of our own child (libvirtd, exec'd by sh).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = std::fs::read_to_string(self.path("virtlogd.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|&p| p > 1)
        {
            // SAFETY: kill with the pid virtlogd wrote for itself in our directory.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

fn domain_xml(name: &str, tools: &Tools, console: &Path, pin_cpu: usize) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <metadata>
    <prescient:vm xmlns:prescient='urn:prescient:libvirt:1'>
      <prescient:balloon-target-mib>256</prescient:balloon-target-mib>
      <prescient:cpus>{pin_cpu}</prescient:cpus>
    </prescient:vm>
  </metadata>
  <memory unit='MiB'>512</memory>
  <currentMemory unit='MiB'>512</currentMemory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='virtio'/>
  </devices>
</domain>
",
        kernel = tools.kernel.display(),
        initrd = tools.initrd.display(),
        console = console.display(),
    )
}

/// Waits until `f` returns something, or fails with `what` after `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The guest's MemTotal lines (KiB) on its serial console, in order.
fn guest_memtotals(console: &Path) -> Vec<u64> {
    let bytes = std::fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("MemTotal:"))
        .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .collect()
}

fn console_says_ready(console: &Path) -> bool {
    String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default())
        .contains("prescient-guest: ready")
}

fn records(path: &Path) -> Vec<AgentRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// vCPU threads of a QEMU process from /proc, with their allowed CPUs as
/// the kernel lists them.
fn vcpu_affinity(pid: i32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let p = e.unwrap().path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if !comm.starts_with("CPU ") {
            continue;
        }
        let status = std::fs::read_to_string(p.join("status")).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        v.push((comm.trim().to_string(), allowed));
    }
    v.sort();
    v
}

/// The daemon's /metrics text.
fn scrape(port: u16) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// vCPU thread ids of a QEMU process (by name, from /proc).
fn vcpu_tids(pid: i32) -> Vec<(String, i32)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let comm = std::fs::read_to_string(p.join("comm")).ok()?;
            let tid = p.file_name()?.to_str()?.parse().ok()?;
            comm.starts_with("CPU ")
                .then(|| (comm.trim().to_string(), tid))
        })
        .collect()
}

/// Lets a thread run on every CPU in `cpus` again.
fn unpin(tid: i32, cpus: &[usize]) {
    // SAFETY: all zeros is the empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: c is a CPU this process may use, below 1024: inside the set.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: set is initialised and its size is passed; the kernel only reads it.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn hw_libvirt_hook_events_pin_vcpus_and_move_the_balloon() {
    let test = "hw_libvirt_hook_events_pin_vcpus_and_move_the_balloon";
    let Some(tools) = tools_or_skip(test) else {
        return;
    };
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
