//! A real libvirtd (and virtlogd) in a private mount namespace over a
//! test's own directories, the guest image and the waits the libvirt
//! end-to-end tests share. Needs root, libvirt and QEMU
//! (scripts/setup-libvirt) and the guest image (scripts/guest-image):
//! [`tools_or_skip`] says `SKIP` without them (or fails when
//! PRESCIENT_REQUIRE contains `libvirt`).
#![allow(clippy::print_stdout)] // SKIP lines go to stdout

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use prescient::libvirt::AgentRecord;

pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub struct Tools {
    pub libvirtd: PathBuf,
    pub virtlogd: PathBuf,
    pub virsh: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn tools_or_skip(test: &str) -> Option<Tools> {
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

/// Held by each libvirt test while it runs: one TCG guest at a time on
/// the test machine's few CPUs (two at once slow each other past their
/// hang bounds).
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// libvirtd and virtlogd in a private mount namespace over the test's
/// directories. Stopped (domains destroyed first) on drop.
pub struct Libvirtd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    virsh: PathBuf,
    /// The TCP port it listens on for other libvirtds (migrations).
    tcp_port: Option<u16>,
}

/// How a [`Libvirtd`] differs from the default one.
#[derive(Clone, Debug, Default)]
pub struct LibvirtdOptions {
    /// `host_uuid` in libvirtd.conf: two instances on one machine need
    /// different ones, or libvirt refuses a migration between them as
    /// "to the same host".
    pub host_uuid: Option<String>,
    /// Listen on 127.0.0.1:PORT for other libvirtds (`listen_tcp`, no
    /// authentication).
    pub tcp_port: Option<u16>,
}

impl Libvirtd {
    /// Lays out the directories and configuration; starts nothing.
    pub fn prepare(virsh: &Path) -> Libvirtd {
        Libvirtd::prepare_with(virsh, &LibvirtdOptions::default())
    }

    /// [`prepare`](Self::prepare), with `options`.
    pub fn prepare_with(virsh: &Path, options: &LibvirtdOptions) -> Libvirtd {
        let dir = tempfile::Builder::new()
            .prefix("prescient-libvirt-")
            .tempdir()
            .unwrap();
        for d in ["etc/hooks", "run", "lib", "log", "cache"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let etc = dir.path().join("etc");
        let mut conf = String::from("unix_sock_rw_perms = \"0700\"\nauth_unix_rw = \"none\"\n");
        if let Some(u) = &options.host_uuid {
            conf.push_str(&format!("host_uuid = \"{u}\"\n"));
        }
        if let Some(port) = options.tcp_port {
            conf.push_str(&format!(
                "listen_tls = 0\nlisten_tcp = 1\nlisten_addr = \"127.0.0.1\"\ntcp_port = \"{port}\"\nauth_tcp = \"none\"\n"
            ));
            // QEMU's incoming migrations keep libvirt's defaults (any
            // address; the machine's host name, which libvirt refuses to
            // replace with a loopback address).
        }
        std::fs::write(etc.join("libvirtd.conf"), conf).unwrap();
        // As PLATFORM.md says: QEMU as root, no security driver; no cgroups,
        // so the test touches no cgroup of the machine.
        std::fs::write(
            etc.join("qemu.conf"),
            String::from("user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\ncgroup_controllers = [ ]\n"),
        )
        .unwrap();
        std::fs::write(etc.join("virtlogd.conf"), "").unwrap();
        Libvirtd {
            dir,
            child: None,
            virsh: virsh.to_path_buf(),
            tcp_port: options.tcp_port,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.path("run/libvirt-sock").display()
        )
    }

    pub fn start(&mut self, tools: &Tools) {
        let d = self.dir.path().display().to_string();
        let script = format!(
            "set -e
             for m in /etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do mkdir -p $m; done
             mount --bind '{d}/etc' /etc/libvirt
             mount --bind '{d}/run' /run/libvirt
             mount --bind '{d}/lib' /var/lib/libvirt
             mount --bind '{d}/log' /var/log/libvirt
             mount --bind '{d}/cache' /var/cache/libvirt
             # libvirt sends migration data to the destination host's name:
             # make this host's name resolve here, whatever /etc/hosts says.
             {{ echo '127.0.0.1 localhost'; echo 127.0.0.1 $(hostname); }} > '{d}/hosts'
             mount --bind '{d}/hosts' /etc/hosts
             # Already running after a libvirtd restart: keep that one.
             '{virtlogd}' -d -p '{d}/virtlogd.pid' || true
             exec '{libvirtd}' {listen} -p '{d}/libvirtd.pid'",
            virtlogd = tools.virtlogd.display(),
            libvirtd = tools.libvirtd.display(),
            listen = if self.tcp_port.is_some() { "--listen" } else { "" },
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
    pub fn restart(&mut self, tools: &Tools) {
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

    /// The URI other libvirtds reach this one on (with a `tcp_port`).
    pub fn tcp_uri(&self) -> Option<String> {
        self.tcp_port
            .map(|p| format!("qemu+tcp://127.0.0.1:{p}/system"))
    }

    /// Whether it was started and has not been stopped.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops libvirtd and virtlogd (domains destroyed first); it can be
    /// started again.
    pub fn stop(&mut self) {
        self.shut_down();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("libvirtd.log")).unwrap_or_default()
    }

    pub fn virsh(&self, args: &[&str]) -> Output {
        Command::new(&self.virsh)
            .args(["-q", "-c", &self.uri()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let o = self.virsh(args);
        assert!(
            o.status.success(),
            "virsh {args:?}: {}\nlibvirtd log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn qemu_pid(&self, name: &str) -> i32 {
        std::fs::read_to_string(self.path(&format!("run/qemu/{name}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl Libvirtd {
    fn shut_down(&mut self) {
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

pub fn domain_xml(name: &str, tools: &Tools, console: &Path, pin_cpu: usize) -> String {
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
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
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
pub fn guest_memtotals(console: &Path) -> Vec<u64> {
    let bytes = std::fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("MemTotal:"))
        .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .collect()
}

pub fn console_says_ready(console: &Path) -> bool {
    String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default())
        .contains("prescient-guest: ready")
}

pub fn records(path: &Path) -> Vec<AgentRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// vCPU threads of a QEMU process from /proc, with their allowed CPUs as
/// the kernel lists them.
pub fn vcpu_affinity(pid: i32) -> Vec<(String, String)> {
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

/// vCPU thread ids of a QEMU process (by name, from /proc).
pub fn vcpu_tids(pid: i32) -> Vec<(String, i32)> {
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
pub fn unpin(tid: i32, cpus: &[usize]) {
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
