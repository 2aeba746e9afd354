//! Live migration between two lab VMs in this process, over loopback TCP,
//! on real KVM. Each test prints `SKIP` and returns when /dev/kvm is absent,
//! unless `PRESCIENT_REQUIRE=kvm` makes that a failure.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test helpers outside #[test] functions; test arithmetic on small sizes

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use labvm::testing::{Heartbeats, Nothing, RunOnAfter, kvm_or_skip};
use labvm::{
    LabVm, LabVmConfig, MigrationOptions, MigrationSource, RunObserver, StopReason, VcpuControl,
    Workload, receive,
};
use rdma::{Control, PageSink, PendingIncoming, Transport};
use vm_memory::{Bytes, GuestAddress};

const RAM_MIB: u64 = 64;

fn dirty_config() -> LabVmConfig {
    LabVmConfig::new(
        RAM_MIB,
        Workload::Dirty {
            pages_per_sec: 5000,
            region_mib: 16,
            heartbeat_ms: 20,
        },
    )
}

fn memory(vm: &LabVm) -> Vec<u8> {
    let mut m = vec![0u8; usize::try_from(RAM_MIB << 20).unwrap()];
    vm.memory().read_slice(&mut m, GuestAddress(0)).unwrap();
    m
}

fn options(to: String) -> MigrationOptions {
    let mut o = MigrationOptions::new(to);
    o.after = Duration::from_millis(300);
    o.streams = 3;
    o.timeout = Duration::from_secs(20);
    o
}

#[test]
fn hw_kvm_migrate_dirty_guest_keeps_counting_and_every_page_matches() {
    if !kvm_or_skip("hw_kvm_migrate_dirty_guest_keeps_counting_and_every_page_matches") {
        return;
    }
    // Three connections: round 0 goes out on three lanes at once.
    dirty_guest_migrates_whole(3);
}

#[test]
fn hw_kvm_migrate_over_one_connection_every_page_matches() {
    if !kvm_or_skip("hw_kvm_migrate_over_one_connection_every_page_matches") {
        return;
    }
    // One connection: every round is sent from the migration thread.
    dirty_guest_migrates_whole(1);
}

fn dirty_guest_migrates_whole(streams: u32) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let mut inc = receive(listener, Duration::from_secs(20)).unwrap();
        let at_switch = memory(&inc.vm);
        let switch_counter = inc.report.counter;
        let report = inc.run(&mut Heartbeats::new(10)).unwrap();
        (at_switch, switch_counter, report)
    });
    let mut vm = LabVm::create(dirty_config(), Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut opts = options(to);
    opts.streams = streams;
    let mut obs = RunOnAfter::new(MigrationSource::new(opts, &mut nothing), 1_000_000);
    let src_report = vm.run(&mut obs).unwrap();
    let mig = obs.mig.report.clone().unwrap();
    assert_eq!(mig.error, None);
    assert_eq!(src_report.stop, StopReason::Stopped);
    let src_mem = memory(&vm);
    let (dst_mem, dst_switch_counter, dst_report) = dest.join().unwrap();
    eprintln!(
        "source: {mig:?}\ndestination counter at end: {:?}",
        dst_report.counter
    );

    // Every page equal at the switch-over.
    let differing: Vec<usize> = src_mem
        .chunks(4096)
        .zip(dst_mem.chunks(4096))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .take(10)
        .collect();
    assert!(differing.is_empty(), "pages differ: {differing:?}");
    // The counter is continuous: the destination starts from the source's
    // last value and keeps counting.
    let last_src = src_report.counter.unwrap();
    assert_eq!(mig.counter, Some(last_src));
    assert_eq!(dst_switch_counter, Some(last_src));
    assert_eq!(dst_report.stop, StopReason::Stopped);
    assert!(dst_report.counter.unwrap() > last_src);
    // Heartbeats carried over and new ones arrived on the destination.
    assert!(dst_report.heartbeats >= src_report.heartbeats + 10);
    assert!(mig.rounds >= 2);
    assert!(mig.zero_pages > 0);
}

#[test]
fn hw_kvm_migrate_destination_gone_mid_stream_leaves_source_running() {
    if !kvm_or_skip("hw_kvm_migrate_destination_gone_mid_stream_leaves_source_running") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    // A destination that takes some pages, then vanishes.
    struct Count(AtomicU64);
    impl PageSink for Count {
        fn write(&self, _gpa: u64, _data: &[u8]) -> Result<(), String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn zero(&self, _gpa: u64, _pages: u64) -> Result<(), String> {
            Ok(())
        }
    }
    let dest = std::thread::spawn(move || {
        let (pending, _) = PendingIncoming::accept(listener, Duration::from_secs(20)).unwrap();
        let sink = Arc::new(Count(AtomicU64::new(0)));
        let mut tr = pending.attach(sink.clone()).unwrap();
        tr.send_control(&Control::Accept).unwrap();
        while sink.0.load(Ordering::SeqCst) < 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        tr.close();
    });
    let mut vm = LabVm::create(dirty_config(), Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut obs = RunOnAfter::new(MigrationSource::new(options(to), &mut nothing), 10);
    let report = vm.run(&mut obs).unwrap();
    dest.join().unwrap();
    let mig = obs.mig.report.clone().unwrap();
    assert!(mig.error.is_some());
    // The guest kept running here after the failure.
    assert_eq!(report.stop, StopReason::Stopped);
    assert!(report.heartbeats >= mig.heartbeats_at_end + 10);
}

/// Forwards connections to `to`, flipping one byte at `offset` of the
/// second connection's client-to-server stream (a bulk connection).
fn corrupting_proxy(to: String, offset: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for (i, c) in l.incoming().enumerate() {
            let Ok(client) = c else { return };
            let Ok(server) = TcpStream::connect(&to) else {
                return;
            };
            let corrupt = (i == 1).then_some(offset);
            pipe(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                corrupt,
            );
            pipe(server, client, None);
        }
    });
    addr
}

fn pipe(mut from: TcpStream, mut to: TcpStream, corrupt: Option<usize>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut seen = 0usize;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(at) = corrupt
                && at >= seen
                && at < seen + n
            {
                buf[at - seen] ^= 0x5A;
            }
            seen += n;
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
        let _ = from.shutdown(std::net::Shutdown::Read);
    });
}

#[test]
fn hw_kvm_migrate_corrupted_bulk_byte_aborts_both_sides_and_source_runs_on() {
    if !kvm_or_skip("hw_kvm_migrate_corrupted_bulk_byte_aborts_both_sides_and_source_runs_on") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let real = listener.local_addr().unwrap().to_string();
    let dest_err: Arc<Mutex<Option<String>>> = Arc::default();
    let d = Arc::clone(&dest_err);
    let dest = std::thread::spawn(move || {
        let r = receive(listener, Duration::from_secs(20));
        *d.lock().unwrap() = match r {
            Ok(_) => None,
            Err(e) => Some(vmm_hooks::error_chain(&e)),
        };
    });
    let to = corrupting_proxy(real, 300_000);
    let mut vm = LabVm::create(dirty_config(), Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut obs = RunOnAfter::new(MigrationSource::new(options(to), &mut nothing), 10);
    let report = vm.run(&mut obs).unwrap();
    dest.join().unwrap();
    let mig = obs.mig.report.clone().unwrap();
    let src_err = mig.error.clone().unwrap();
    assert!(src_err.contains("aborted"), "{src_err}");
    let dest_err = dest_err.lock().unwrap().clone().unwrap();
    assert!(dest_err.contains("checksum"), "{dest_err}");
    assert_eq!(report.stop, StopReason::Stopped);
    assert!(report.heartbeats >= mig.heartbeats_at_end + 10);
}

/// Starts `cmd` (a `labvm --incoming 127.0.0.1:0 …`) with its stdout piped
/// and reads the address it listens on from its first line. The reader
/// comes back too: keep it while the child runs, which prints more.
fn spawn_incoming(
    cmd: &mut std::process::Command,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
    String,
) {
    use std::io::BufRead;
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("incoming: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, out, addr)
}

#[test]
fn hw_kvm_migrate_two_labvm_processes_over_loopback() {
    use std::process::Command;
    if !kvm_or_skip("hw_kvm_migrate_two_labvm_processes_over_loopback") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_labvm");
    let (mut dest, _out, addr) = spawn_incoming(
        Command::new(bin)
            .args(["--incoming", "127.0.0.1:0", "--run-for", "0.5"])
            .arg("--report-json")
            .arg(dir.path().join("dest.json"))
            .arg("--migration-report")
            .arg(dir.path().join("dest-mig.json")),
    );
    let src = Command::new(bin)
        .args(["--mem", "64", "--workload", "dirty:5000:16"])
        .args(["--migrate-to", &addr, "--migrate-after", "0.3"])
        .arg("--report-json")
        .arg(dir.path().join("src.json"))
        .arg("--migration-report")
        .arg(dir.path().join("src-mig.json"))
        .output()
        .unwrap();
    assert!(
        src.status.success(),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(dest.wait().unwrap().success());
    let read = |n: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.path().join(n)).unwrap()).unwrap()
    };
    let (s, sm, d, dm) = (
        read("src.json"),
        read("src-mig.json"),
        read("dest.json"),
        read("dest-mig.json"),
    );
    assert!(sm["error"].is_null(), "{sm}");
    let switch = sm["counter"].as_u64().unwrap();
    assert_eq!(s["counter"].as_u64(), Some(switch));
    assert_eq!(dm["counter"].as_u64(), Some(switch));
    assert!(d["counter"].as_u64().unwrap() > switch);
}

#[test]
fn hw_kvm_migrate_two_vcpus_parked_one_stays_parked_and_counter_continues() {
    if !kvm_or_skip("hw_kvm_migrate_two_vcpus_parked_one_stays_parked_and_counter_continues") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let mut inc = receive(listener, Duration::from_secs(20)).unwrap();
        inc.run(&mut Heartbeats::new(5)).unwrap()
    });
    let mut config = dirty_config();
    config.vcpus = 2;
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut obs = RunOnAfter::new(MigrationSource::new(options(to), &mut nothing), 1_000_000);
    let src = vm.run(&mut obs).unwrap();
    assert_eq!(obs.mig.report.clone().unwrap().error, None);
    let dst = dest.join().unwrap();
    // vCPU 1 parked on the source (the dirty workload runs on vCPU 0 only)
    // and stayed parked; vCPU 0 kept counting.
    assert_eq!(dst.stop, StopReason::Stopped);
    assert!(dst.counter.unwrap() > src.counter.unwrap());
    assert_eq!(dst.vcpu_tids.len(), 2);
}

/// What the control-stream proxy does to one control message.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Drops the control connection (both directions) instead of
    /// forwarding the message.
    Cut,
    /// Swallows the message and keeps the connection open.
    Swallow,
}

/// Forwards connections to `to`; on the first (control) connection it
/// parses frames and applies `fault` to the first message of type `kind`
/// (e.g. "go") in either direction. Bulk connections pass untouched.
fn control_proxy(to: String, kind: &'static str, fault: Fault) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for (i, c) in l.incoming().enumerate() {
            let Ok(client) = c else { return };
            let Ok(server) = TcpStream::connect(&to) else {
                return;
            };
            if i > 0 {
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    None,
                );
                pipe(server, client, None);
                continue;
            }
            let all = Arc::new([client.try_clone().unwrap(), server.try_clone().unwrap()]);
            for (from, dst) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server.try_clone().unwrap(), client.try_clone().unwrap()),
            ] {
                let all = Arc::clone(&all);
                std::thread::spawn(move || framed_pipe(from, dst, kind, fault, &all));
            }
        }
    });
    addr
}

fn framed_pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    kind: &str,
    fault: Fault,
    all: &[TcpStream; 2],
) {
    let needle = format!("\"type\":\"{kind}\"");
    loop {
        let mut h = [0u8; 16];
        if from.read_exact(&mut h).is_err() {
            break;
        }
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        let mut payload = vec![0u8; len];
        if from.read_exact(&mut payload).is_err() {
            break;
        }
        if String::from_utf8_lossy(&payload).contains(&needle) {
            match fault {
                Fault::Cut => {
                    for s in all {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    return;
                }
                Fault::Swallow => continue,
            }
        }
        if to
            .write_all(&h)
            .and_then(|()| to.write_all(&payload))
            .is_err()
        {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Source and destination in this process, the control stream through a
/// proxy that applies `fault` to the message `kind`. Returns the source's
/// run and migration reports, and the destination's outcome (its run
/// report, or its error).
fn migrate_through(
    kind: &'static str,
    fault: Fault,
    dest_timeout: Duration,
    in_doubt: &std::path::Path,
) -> (
    labvm::RunReport,
    labvm::MigrationReport,
    Result<labvm::RunReport, String>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let real = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || match receive(listener, dest_timeout) {
        Ok(mut inc) => Ok(inc.run(&mut Heartbeats::new(10)).unwrap()),
        Err(e) => Err(vmm_hooks::error_chain(&e)),
    });
    let to = control_proxy(real, kind, fault);
    let mut vm = LabVm::create(dirty_config(), Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut opts = options(to);
    opts.in_doubt_save = Some(in_doubt.to_path_buf());
    let mut obs = RunOnAfter::new(MigrationSource::new(opts, &mut nothing), 10);
    let src = vm.run(&mut obs).unwrap();
    let mig = obs.mig.report.clone().unwrap();
    (src, mig, dest.join().unwrap())
}

#[test]
fn hw_kvm_migrate_loaded_lost_source_resumes_and_destination_discards() {
    if !kvm_or_skip("hw_kvm_migrate_loaded_lost_source_resumes_and_destination_discards") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("doubt.state");
    let (src, mig, dest) = migrate_through("loaded", Fault::Cut, Duration::from_secs(20), &file);
    // Before Go: the source resumed and its guest counted on.
    assert!(mig.in_doubt.is_none(), "{mig:?}");
    assert!(mig.error.is_some());
    assert!(src.counter.unwrap() > mig.counter.unwrap());
    assert!(src.heartbeats >= mig.heartbeats_at_end + 10);
    assert!(!file.exists());
    // The destination never ran it.
    let err = dest.unwrap_err();
    assert!(err.contains("no commit"), "{err}");
}

#[test]
fn hw_kvm_migrate_go_lost_source_saves_in_doubt_and_destination_discards() {
    if !kvm_or_skip("hw_kvm_migrate_go_lost_source_saves_in_doubt_and_destination_discards") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("doubt.state");
    let (src, mig, dest) = migrate_through("go", Fault::Cut, Duration::from_secs(20), &file);
    // After Go the source never resumed: its counter stopped at the switch.
    let doubt = mig.in_doubt.clone().expect("in doubt");
    assert_eq!(src.stop, StopReason::Stopped);
    assert_eq!(src.counter, mig.counter);
    assert_eq!(doubt.saved.as_ref().unwrap().path, file);
    // The destination discarded its copy: neither side runs the guest...
    let err = dest.unwrap_err();
    assert!(err.contains("no commit"), "{err}");
    // ...and it is not lost: the saved VM restores and counts on.
    let mut restored = labvm::restore_from_file(&file).unwrap();
    assert_eq!(restored.counter, mig.counter);
    let run = restored.vm.run(&mut Heartbeats::new(5)).unwrap();
    assert!(run.counter.unwrap() > mig.counter.unwrap());
}

#[test]
fn hw_kvm_migrate_running_lost_destination_runs_and_source_stays_paused() {
    if !kvm_or_skip("hw_kvm_migrate_running_lost_destination_runs_and_source_stays_paused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("doubt.state");
    let (src, mig, dest) = migrate_through("running", Fault::Cut, Duration::from_secs(20), &file);
    let doubt = mig.in_doubt.clone().expect("in doubt");
    // The source did not resume (its counter stopped at the switch) and
    // saved the VM; the destination runs the guest from the same counter.
    assert_eq!(src.counter, mig.counter);
    assert!(doubt.saved.is_some());
    assert!(file.exists());
    let dest = dest.unwrap();
    assert_eq!(dest.stop, StopReason::Stopped);
    assert!(dest.counter.unwrap() > mig.counter.unwrap());
    assert!(dest.heartbeats >= src.heartbeats + 10);
}

#[test]
fn hw_kvm_migrate_go_never_arrives_destination_times_out_and_source_resumes() {
    if !kvm_or_skip("hw_kvm_migrate_go_never_arrives_destination_times_out_and_source_resumes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("doubt.state");
    // The proxy swallows Go; the destination gives up after its timeout,
    // says so (Abort), and the source, told the guest did not start there,
    // resumes.
    let (src, mig, dest) = migrate_through("go", Fault::Swallow, Duration::from_secs(3), &file);
    let err = dest.unwrap_err();
    assert!(err.contains("no commit"), "{err}");
    assert!(mig.in_doubt.is_none(), "{mig:?}");
    let e = mig.error.clone().unwrap();
    assert!(e.contains("aborted"), "{e}");
    assert!(src.counter.unwrap() > mig.counter.unwrap());
    assert!(src.heartbeats >= mig.heartbeats_at_end + 10);
    assert!(!file.exists());
}

#[test]
fn migrate_version_1_peer_is_refused_naming_both_versions() {
    // No KVM needed: the destination refuses before building a VM.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || receive(listener, Duration::from_secs(5)));
    let mut c = TcpStream::connect(addr).unwrap();
    // A version 1 hello frame, as a labvm before the two-phase commit sent it.
    let body = br#"{"type":"hello","version":1,"vm":{"ram_bytes":67108864,"vcpus":1,"workload":"x","config":"{}"},"bulk":1,"session":1}"#;
    let mut frame = b"PMIG".to_vec();
    frame.extend_from_slice(&1u16.to_le_bytes());
    frame.extend_from_slice(&[1, 0]);
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
    frame.extend_from_slice(&rdma::proto::crc32(body).to_le_bytes());
    frame.extend_from_slice(body);
    c.write_all(&frame).unwrap();
    let err = vmm_hooks::error_chain(&dest.join().unwrap().unwrap_err());
    assert!(err.contains("version 1"), "{err}");
    assert!(err.contains("speaks 2"), "{err}");
    // The answer is an Abort naming both versions (in a version 2 frame,
    // which an old peer's decoder reports as "unsupported version 2").
    // The destination closes with our payload unread (a reset may follow
    // its answer): read exactly one frame.
    let mut reply = vec![0u8; 16];
    c.read_exact(&mut reply).unwrap();
    let len = rdma::proto::decode_header(&reply).unwrap().payload_len();
    reply.resize(16 + len, 0);
    c.read_exact(&mut reply[16..]).unwrap();
    let (frame, _) = rdma::proto::decode_frame(&reply).unwrap();
    let rdma::proto::Frame::Control(Control::Abort { reason }) = frame else {
        panic!("expected abort, got {frame:?}");
    };
    assert!(reason.contains("version 1"), "{reason}");
    assert!(reason.contains("speaks 2"), "{reason}");
}

#[test]
fn hw_kvm_migrate_processes_running_lost_source_exits_in_doubt_with_saved_state() {
    use std::process::Command;
    if !kvm_or_skip("hw_kvm_migrate_processes_running_lost_source_exits_in_doubt_with_saved_state")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_labvm");
    let (mut dest, _out, addr) = spawn_incoming(
        Command::new(bin)
            .args(["--incoming", "127.0.0.1:0", "--run-for", "0.5"])
            .arg("--report-json")
            .arg(dir.path().join("dest.json")),
    );
    let proxy = control_proxy(addr, "running", Fault::Cut);
    let saved = dir.path().join("doubt.state");
    let src = Command::new(bin)
        .args(["--mem", "64", "--workload", "dirty:5000:16"])
        .args(["--migrate-to", &proxy, "--migrate-after", "0.3"])
        .arg("--in-doubt-save")
        .arg(&saved)
        .arg("--migration-report")
        .arg(dir.path().join("src-mig.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&src.stdout);
    assert_eq!(
        src.status.code(),
        Some(i32::from(labvm::EXIT_MIGRATION_IN_DOUBT)),
        "{stdout}\n{}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(stdout.contains("IN DOUBT"), "{stdout}");
    assert!(saved.exists());
    assert!(dest.wait().unwrap().success());
    let sm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("src-mig.json")).unwrap()).unwrap();
    let d: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("dest.json")).unwrap()).unwrap();
    assert!(d["counter"].as_u64().unwrap() > sm["counter"].as_u64().unwrap());
}

const MIB: u64 = 1 << 20;
const PAGES_PER_MIB: u32 = 256;

fn resident_mib_pages(mem: &vm_memory::GuestMemoryMmap, ram: u64) -> usize {
    balloon::resident_pages(mem, 0, ram)
        .unwrap()
        .into_iter()
        .filter(|&r| r)
        .count()
}

/// Source side: after ready, inflates the balloon to `inflate_mib`, then
/// lets the migration run.
struct InflateThenMigrate<'a> {
    mig: MigrationSource<'a>,
    inflate_mib: u64,
    phase: u8,
    resident_before: usize,
}

impl RunObserver for InflateThenMigrate<'_> {
    fn tick(&mut self, vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        let h = vm.balloon().unwrap();
        match self.phase {
            0 if vcpus.ready() => {
                self.resident_before = resident_mib_pages(vm.memory(), vm.config().ram_mib * MIB);
                h.set_target_mib(self.inflate_mib).unwrap();
                self.phase = 1;
                false
            }
            1 if h.report().actual_pages == self.inflate_mib as u32 * PAGES_PER_MIB => {
                self.phase = 2;
                false
            }
            2 => self.mig.tick(vm, vcpus),
            _ => false,
        }
    }
}

/// Destination side: deflates to 0, then inflates to `again_mib`.
struct DeflateThenInflate {
    handle: balloon::BalloonHandle,
    again_mib: u64,
    phase: u8,
}

impl RunObserver for DeflateThenInflate {
    fn should_stop(&mut self) -> bool {
        let r = self.handle.report();
        match self.phase {
            0 => {
                self.handle.set_target_mib(0).unwrap();
                self.phase = 1;
            }
            1 if r.actual_pages == 0 => {
                self.handle.set_target_mib(self.again_mib).unwrap();
                self.phase = 2;
            }
            2 if r.actual_pages == self.again_mib as u32 * PAGES_PER_MIB => self.phase = 3,
            _ => {}
        }
        self.phase == 3
    }
}

#[test]
fn hw_kvm_migrate_ballooned_guest_keeps_its_balloon_and_driver_on_the_destination() {
    if !kvm_or_skip(
        "hw_kvm_migrate_ballooned_guest_keeps_its_balloon_and_driver_on_the_destination",
    ) {
        return;
    }
    const RAM: u64 = 128;
    const INFLATE: u64 = 64;
    // A run that does not reach its end state fails, it does not hang.
    const LIMIT: Duration = Duration::from_secs(60);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let mut inc = receive(listener, Duration::from_secs(20)).unwrap();
        let handle = inc
            .vm
            .balloon()
            .expect("the destination rebuilt the balloon");
        let arrived = handle.report();
        let resident = resident_mib_pages(inc.vm.memory(), RAM * MIB);
        inc.vm.set_run_for(Some(LIMIT));
        let mut script = DeflateThenInflate {
            handle: handle.clone(),
            again_mib: 32,
            phase: 0,
        };
        let run = inc.run(&mut script).unwrap();
        (arrived, resident, script.phase, handle.report(), run)
    });
    let mut config = LabVmConfig::new(RAM, Workload::from_spec("balloon:100:16", 0).unwrap());
    config.run_for = Some(LIMIT);
    config.balloon = Some(labvm::BalloonConfig {
        initial_target_mib: 0,
        stats_interval: Duration::from_millis(100),
        grace: Duration::from_millis(500),
    });
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut opts = options(to);
    opts.after = Duration::ZERO;
    let mut obs = InflateThenMigrate {
        mig: MigrationSource::new(opts, &mut nothing),
        inflate_mib: INFLATE,
        phase: 0,
        resident_before: 0,
    };
    vm.run(&mut obs).unwrap();
    let mig = obs.mig.report.clone().expect("the migration ran");
    assert_eq!(mig.error, None);
    let src_state = vm.balloon().unwrap().state();
    let (arrived, resident, phase, after, run) = dest.join().unwrap();

    // The device arrived as it was: same target and actual size.
    assert_eq!(arrived.actual_pages, INFLATE as u32 * PAGES_PER_MIB);
    assert_eq!(arrived.target_pages, src_state.num_pages);
    assert!(arrived.driver_ok);
    // The guest had touched more than the balloon leaves it; the inflated
    // pages were not sent, so they hold no memory on the destination.
    assert!(obs.resident_before > ((RAM - INFLATE) * MIB / 4096) as usize);
    assert!(
        resident <= ((RAM - INFLATE) * MIB / 4096) as usize,
        "{resident} pages resident on arrival"
    );
    // The guest's driver carried on: it deflated and inflated again.
    assert_eq!(phase, 3, "the destination's balloon did not follow");
    assert_eq!(run.stop, StopReason::Stopped);
    assert_eq!(after.actual_pages, 32 * PAGES_PER_MIB);
    assert_eq!(
        after.counters.deflated_pages,
        src_state.counters.deflated_pages + INFLATE * MIB / 4096
    );
    assert_eq!(
        after.counters.skipped_chains + after.counters.skipped_pages,
        0
    );
}

#[test]
fn hw_kvm_migrate_processes_go_swallowed_destination_exits_1_and_source_runs_on() {
    use std::process::Command;
    if !kvm_or_skip("hw_kvm_migrate_processes_go_swallowed_destination_exits_1_and_source_runs_on")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_labvm");
    let (dest, _out, addr) = spawn_incoming(
        Command::new(bin)
            .args(["--incoming", "127.0.0.1:0", "--migrate-timeout", "2"])
            .stderr(std::process::Stdio::piped()),
    );
    let proxy = control_proxy(addr, "go", Fault::Swallow);
    let saved = dir.path().join("doubt.state");
    let src = Command::new(bin)
        .args(["--mem", "64", "--workload", "dirty:5000:16"])
        .args([
            "--migrate-to",
            &proxy,
            "--migrate-after",
            "0.3",
            "--run-for",
            "5",
        ])
        .arg("--in-doubt-save")
        .arg(&saved)
        .arg("--report-json")
        .arg(dir.path().join("src.json"))
        .arg("--migration-report")
        .arg(dir.path().join("src-mig.json"))
        .output()
        .unwrap();
    let dest = dest.wait_with_output().unwrap();
    let dest_err = String::from_utf8_lossy(&dest.stderr);
    // The destination never got Go: it discarded the VM and failed.
    assert_eq!(dest.status.code(), Some(1), "{dest_err}");
    assert!(dest_err.contains("no commit"), "{dest_err}");
    // Its Abort told the source, which resumed and ran on.
    let stdout = String::from_utf8_lossy(&src.stdout);
    assert!(src.status.success(), "{stdout}");
    assert!(
        stdout.contains("migration failed, the VM ran on here"),
        "{stdout}"
    );
    assert!(!saved.exists());
    let read = |n: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.path().join(n)).unwrap()).unwrap()
    };
    let (s, sm) = (read("src.json"), read("src-mig.json"));
    assert!(s["counter"].as_u64().unwrap() > sm["counter"].as_u64().unwrap());
}

#[test]
fn hw_kvm_migrate_in_doubt_with_an_unwritable_path_saves_to_the_temp_dir() {
    if !kvm_or_skip("hw_kvm_migrate_in_doubt_with_an_unwritable_path_saves_to_the_temp_dir") {
        return;
    }
    let bad = std::path::Path::new("/proc/labvm-no-such-dir/doubt.state");
    let (src, mig, dest) = migrate_through("running", Fault::Cut, Duration::from_secs(20), bad);
    let doubt = mig.in_doubt.clone().expect("in doubt");
    let saved = doubt.saved.as_ref().expect("saved somewhere").path.clone();
    let fallback =
        std::env::temp_dir().join(format!("labvm-in-doubt-{}.state", std::process::id()));
    assert_eq!(saved, fallback);
    assert!(
        doubt
            .save_error
            .as_deref()
            .unwrap_or_default()
            .contains("labvm-no-such-dir"),
        "{doubt:?}"
    );
    // Still never lost and never twice: the saved VM restores with the
    // switch-over counter, and the source stopped there.
    let restored = labvm::restore_from_file(&saved).unwrap();
    assert_eq!(restored.counter, mig.counter);
    assert_eq!(src.counter, mig.counter);
    assert!(dest.is_ok());
    std::fs::remove_file(&saved).unwrap();
}
