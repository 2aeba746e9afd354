//! Live migration between two lab VMs in this process, over loopback TCP,
//! on real KVM. Each test prints `SKIP` and returns when /dev/kvm is absent,
//! unless `PRESCIENT_REQUIRE=kvm` makes that a failure.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use labvm::testing::kvm_or_skip;
use labvm::{
    LabVm, LabVmConfig, MigrateError, MigrationOptions, MigrationSource, RunObserver, StopReason,
    VcpuControl, Workload, receive,
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

/// Stops the VM once it has received `more` heartbeats beyond those seen
/// when the wrapped migration ended (or at once after moving away).
struct RunOnAfter<'a> {
    mig: MigrationSource<'a>,
    more: u64,
    stop_at: Option<u64>,
}

impl RunObserver for RunOnAfter<'_> {
    fn tick(&mut self, vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        if self.mig.tick(vm, vcpus) {
            return true;
        }
        if let Some(r) = &self.mig.report
            && self.stop_at.is_none()
        {
            self.stop_at = Some(r.heartbeats_at_end + self.more);
        }
        self.stop_at.is_some_and(|at| vcpus.heartbeats() >= at)
    }
}

struct Nothing;
impl RunObserver for Nothing {}

/// Stops after `n` more heartbeats than at the first tick.
struct Heartbeats {
    n: u64,
    from: Option<u64>,
}
impl RunObserver for Heartbeats {
    fn tick(&mut self, _vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        let from = *self.from.get_or_insert(vcpus.heartbeats());
        vcpus.heartbeats() >= from + self.n
    }
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
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let mut inc = receive(listener, Duration::from_secs(20)).unwrap();
        let at_switch = memory(&inc.vm);
        let switch_counter = inc.report.counter;
        let report = inc.run(&mut Heartbeats { n: 10, from: None }).unwrap();
        (at_switch, switch_counter, report)
    });
    let mut vm = LabVm::create(dirty_config(), Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut obs = RunOnAfter {
        mig: MigrationSource::new(options(to), &mut nothing),
        more: 1_000_000,
        stop_at: None,
    };
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
    let mut obs = RunOnAfter {
        mig: MigrationSource::new(options(to), &mut nothing),
        more: 10,
        stop_at: None,
    };
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
            Err(e) => Some(vmm_hooks_chain(&e)),
        };
    });
    let to = corrupting_proxy(real, 300_000);
    let mut vm = LabVm::create(dirty_config(), Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut obs = RunOnAfter {
        mig: MigrationSource::new(options(to), &mut nothing),
        more: 10,
        stop_at: None,
    };
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

fn vmm_hooks_chain(e: &MigrateError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn hw_kvm_migrate_two_labvm_processes_over_loopback() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    if !kvm_or_skip("hw_kvm_migrate_two_labvm_processes_over_loopback") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_labvm");
    let mut dest = Command::new(bin)
        .args(["--incoming", "127.0.0.1:0", "--run-for", "0.5"])
        .arg("--report-json")
        .arg(dir.path().join("dest.json"))
        .arg("--migration-report")
        .arg(dir.path().join("dest-mig.json"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(dest.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("incoming: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
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
        inc.run(&mut Heartbeats { n: 5, from: None }).unwrap()
    });
    let mut config = dirty_config();
    config.vcpus = 2;
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let mut nothing = Nothing;
    let mut obs = RunOnAfter {
        mig: MigrationSource::new(options(to), &mut nothing),
        more: 1_000_000,
        stop_at: None,
    };
    let src = vm.run(&mut obs).unwrap();
    assert_eq!(obs.mig.report.clone().unwrap().error, None);
    let dst = dest.join().unwrap();
    // vCPU 1 parked on the source (the dirty workload runs on vCPU 0 only)
    // and stayed parked; vCPU 0 kept counting.
    assert_eq!(dst.stop, StopReason::Stopped);
    assert!(dst.counter.unwrap() > src.counter.unwrap());
    assert_eq!(dst.vcpu_tids.len(), 2);
}
