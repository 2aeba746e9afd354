//! Helpers shared by the end-to-end tests: a real `prescient serve` process.
#![allow(dead_code, clippy::unwrap_used)] // each test crate uses part of this

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prescient::EventRecord;

pub mod libvirt;
pub mod migration;

/// A `prescient serve` child process in its own temporary directory, with
/// an event log and, unless asked otherwise, a profile store. Killed on drop.
pub struct Server {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub store: PathBuf,
    with_store: bool,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts `prescient serve` with a store and an event log.
    pub fn start() -> Server {
        Server::start_with(true)
    }

    /// Starts it with or without a profile store.
    pub fn start_with(store: bool) -> Server {
        Server::start_args(store, &[])
    }

    /// Starts it with or without a store and with extra arguments.
    pub fn start_args(store: bool, extra: &[&str]) -> Server {
        Server::start_in(tempfile::tempdir().unwrap(), store, extra)
    }

    /// Starts it in `dir` (its store is `dir/store.db`, which may exist).
    pub fn start_in(dir: tempfile::TempDir, store: bool, extra: &[&str]) -> Server {
        let socket = dir.path().join("hooks.sock");
        let log = dir.path().join("events.jsonl");
        let store_path = dir.path().join("store.db");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_prescient"));
        cmd.args(["serve", "--socket"])
            .arg(&socket)
            .arg("--event-log")
            .arg(&log);
        if store {
            cmd.arg("--store").arg(&store_path);
        } else {
            cmd.arg("--no-store");
        }
        cmd.args(extra);
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server {
            child,
            socket,
            log,
            store: store_path,
            with_store: store,
            extra: extra.iter().map(ToString::to_string).collect(),
            dir,
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory holding the socket, store and event log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// SIGTERM (a clean shutdown), then a new server on the same
    /// directory, store and arguments; returns it and what the old one logged.
    pub fn restart(self) -> (Server, String) {
        let (store, extra) = (self.with_store, self.extra.clone());
        let (log, dir) = self.stop_keep_dir();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        (Server::start_in(dir, store, &extra), log)
    }

    /// SIGKILL (no shutdown path runs), then a new server on the same
    /// directory; returns it.
    pub fn crash_and_restart(self) -> Server {
        self.crash_and_restart_logged().0
    }

    /// [`crash_and_restart`](Self::crash_and_restart), also returning
    /// what the killed server logged.
    pub fn crash_and_restart_logged(mut self) -> (Server, String) {
        let log = self.kill();
        let (store, extra) = (self.with_store, self.extra.clone());
        let dir = self.take_dir();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        (Server::start_in(dir, store, &extra), log)
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// SIGTERM, wait for a clean exit; returns what it logged and its
    /// directory (kept, with the store).
    pub fn stop_keep_dir(mut self) -> (String, tempfile::TempDir) {
        let err = self.sigterm_and_wait();
        (err, self.take_dir())
    }

    fn sigterm_and_wait(&mut self) -> String {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill with the pid of our own live child and a valid signal.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let err = self.stderr();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve exited with {status}: {err}");
        assert!(!self.socket.exists(), "socket left behind after shutdown");
        err
    }

    /// The events the server logged so far.
    pub fn events(&self) -> Vec<EventRecord> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, wait for a clean exit, return what it logged.
    pub fn stop(mut self) -> String {
        self.sigterm_and_wait()
    }

    /// SIGKILL (no shutdown path runs), return what it logged.
    pub fn kill(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr()
    }

    fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics` from 127.0.0.1:`port`, waiting for the endpoint to come up;
/// returns the whole HTTP response.
pub fn scrape(port: u16) -> String {
    let t = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            return body;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "metrics endpoint never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a lab guest with a balloon device (statistics every 200 ms, polled
/// every 100 ms) for 7 s, reporting to `server` as `vm_id`; asserts that
/// it ran to its end.
pub fn run_balloon_labvm(server: &Server, vm_id: &str, ram_mib: u64, workload: labvm::Workload) {
    let mut config = labvm::LabVmConfig::new(ram_mib, workload);
    config.run_for = Some(Duration::from_secs(7));
    config.balloon = Some(labvm::BalloonConfig {
        stats_interval: Duration::from_millis(200),
        ..labvm::BalloonConfig::default()
    });
    let mut vm = labvm::LabVm::create(config, Instant::now()).unwrap();
    let mut hc = vmm_hooks::SocketHookConfig::new(&server.socket, labvm::VMM_NAME);
    hc.timeout = Duration::from_secs(5);
    let mut hook = vmm_hooks::SocketHook::new(hc);
    let identity = labvm::lab_identity(vm_id, &vm);
    let mut reporter = labvm::HookReporter::new(&mut hook, identity)
        .with_balloon(vm.balloon().unwrap(), Duration::from_millis(100));
    reporter.created(&vm);
    let result = vm.run(&mut reporter);
    reporter.stopped(&result);
    assert_eq!(result.unwrap().stop, labvm::StopReason::Stopped);
}
