//! Helpers shared by the migration and drain tests: real destination
//! companions, real labvm guests, the `prescient host` commands, and a VMM
//! that speaks the hooks protocol through the real socket client.

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use labvm::testing::required;
use vmm_hooks::{Event, EventKind, HookReply, LifecycleHook, RunStatus, VmIdentity, VmSpec};

use super::{Server, free_port};

/// Bytes as text, for messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The labvm binary beside this test's prescient (built by `cargo test
/// --workspace`); `None` (with a SKIP line) when it was not built.
#[allow(clippy::print_stdout)]
pub fn labvm_bin(test: &str) -> Option<PathBuf> {
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

/// For tests that run a guest: `/dev/kvm` (see `kvm_or_skip`) and the
/// labvm binary ([`labvm_bin`]); `None` (with a SKIP line) without either.
pub fn labvm_on_kvm(test: &str) -> Option<PathBuf> {
    if !labvm::testing::kvm_or_skip(test) {
        return None;
    }
    labvm_bin(test)
}

/// A destination companion: `[migration] listen` on a free loopback port,
/// starting `labvm` (which runs `run_for` seconds once received).
pub fn destination(labvm: &Path, run_for: &str) -> (Server, String, tempfile::TempDir) {
    destination_on(labvm, run_for, free_port())
}

/// [`destination`] listening on `port`.
pub fn destination_on(
    labvm: &Path,
    run_for: &str,
    port: u16,
) -> (Server, String, tempfile::TempDir) {
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
pub fn source_labvm(labvm: &Path, server: &Server, vm_id: &str, run_for: &str) -> Child {
    source_labvm_with(labvm, server, vm_id, run_for, &[])
}

/// [`source_labvm`] with extra labvm arguments.
pub fn source_labvm_with(
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
pub fn wait_events(server: &Server, vm: &str, kind: &str, n: usize) -> Vec<Event> {
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

/// `prescient host drain --to D…` against `server`, followed for at most
/// 120 s.
pub fn drain(server: &Server, to: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prescient"));
    cmd.args(["host", "drain", "--timeout-s", "120", "--socket"])
        .arg(&server.socket);
    for d in to {
        cmd.args(["--to", d]);
    }
    cmd.output().unwrap()
}

/// `prescient host undrain` against `server`.
pub fn undrain(server: &Server) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prescient"))
        .args(["host", "undrain", "--socket"])
        .arg(&server.socket)
        .output()
        .unwrap()
}

/// `prescient status [--json]` against `server`: its standard output.
pub fn status_cli(server: &Server, json: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prescient"));
    cmd.args(["status", "--socket"]).arg(&server.socket);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The daemon's status, asked through the library.
pub fn status(server: &Server) -> prescient::DaemonStatus {
    prescient::query_status(&server.socket, Duration::from_secs(5)).unwrap()
}

/// Waits until every move of `server` is over; returns the status.
pub fn wait_moves_final(server: &Server) -> prescient::DaemonStatus {
    let t = Instant::now();
    loop {
        let s = status(server);
        if s.migrations.iter().all(|m| m.state.is_final()) {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "moves not over after 60 s: {:?}",
            s.migrations
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A VMM that reports its VMs through the real hooks client
/// (`vmm_hooks::SocketHook`), numbering each VM's events; `features` are
/// announced in its `hello`.
pub struct HookVmm {
    socket: PathBuf,
    features: Vec<String>,
    hook: vmm_hooks::SocketHook,
    seq: HashMap<String, u64>,
}

/// The name the test VMM gives in `hello` and in its VM specs.
const TEST_VMM: &str = "test-vmm 1.0";

impl HookVmm {
    /// Connects to `server` (on first event).
    pub fn new(server: &Server, features: &[&str]) -> HookVmm {
        let features: Vec<String> = features.iter().map(ToString::to_string).collect();
        HookVmm {
            socket: server.socket.clone(),
            hook: Self::hook(&server.socket, &features),
            features,
            seq: HashMap::new(),
        }
    }

    fn hook(socket: &Path, features: &[String]) -> vmm_hooks::SocketHook {
        let mut hc = vmm_hooks::SocketHookConfig::new(socket, TEST_VMM);
        hc.timeout = Duration::from_secs(5);
        hc.features = features.to_vec();
        vmm_hooks::SocketHook::new(hc)
    }

    /// Connects again (the companion restarted on the same socket), as a
    /// VMM does after its retry interval; the VMs' numbering goes on.
    pub fn reconnect(&mut self) {
        self.hook = Self::hook(&self.socket, &self.features);
    }

    /// Sends one event of `vm`; returns the companion's reply.
    pub fn send(&mut self, vm: &str, kind: EventKind) -> HookReply {
        let seq = self.seq.entry(vm.to_string()).or_insert(0);
        let e = Event {
            vm: VmIdentity {
                vm_id: vm.into(),
                image_digest: "i".into(),
                package_digest: "p".into(),
            },
            seq: *seq,
            at_unix_ms: 1,
            kind,
        };
        *seq += 1;
        self.hook.on_event(&e)
    }

    /// `created` of a 1-vCPU VM of `mib` MiB.
    pub fn created(&mut self, vm: &str, mib: u64) -> HookReply {
        self.send(
            vm,
            EventKind::Created {
                spec: VmSpec {
                    vcpus: 1,
                    memory_mib: mib,
                    vmm: TEST_VMM.into(),
                    priority: 0,
                    interruptible: false,
                },
            },
        )
    }

    /// `before-boot` of a 1-vCPU VM of `mib` MiB.
    pub fn before_boot(&mut self, vm: &str, mib: u64) -> HookReply {
        self.send(
            vm,
            EventKind::BeforeBoot {
                vcpu_tids: vec![1],
                ram: vmm_hooks::GuestRange {
                    start: 0,
                    len: mib << 20,
                },
                admission: vmm_hooks::Admission::default(),
            },
        )
    }

    /// A `poll` of a running VM of `mib` MiB that says it can migrate.
    pub fn poll(&mut self, vm: &str, mib: u64) -> HookReply {
        self.send(
            vm,
            EventKind::Poll(RunStatus {
                ram_mib: mib,
                resident_mib: mib / 4,
                dirty_pages_per_s: Some(10.0),
                migratable: true,
            }),
        )
    }
}
