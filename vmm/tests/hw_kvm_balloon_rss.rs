//! Ballooning seen from the host: labvm runs as a child process with the
//! balloon workload, this test is its companion on a real hooks socket
//! (sets targets in its replies to `balloon` events), and the child's
//! resident set is read from /proc. A child process keeps other tests of
//! this crate from disturbing the RSS reading.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use labvm::testing::kvm_or_skip;
use vmm_hooks::proto::{Message, read_message, write_message};
use vmm_hooks::{BalloonStatus, BootPlan, EventKind, HookReply};

const MIB: u64 = 1 << 20;

/// Resident set of a process, in bytes (VmRSS of /proc/PID/status).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

struct Labvm {
    child: Child,
    conn: UnixStream,
    _dir: tempfile::TempDir,
}

impl Labvm {
    /// Starts labvm with the balloon workload and accepts its connection.
    fn start(mem_mib: u64, workload: &str) -> Labvm {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("hooks.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_labvm"))
            .args(["--mem", &mem_mib.to_string(), "--workload", workload])
            .args(["--balloon-poll-ms", "50", "--balloon-stats-ms", "200"])
            .args(["--hooks-timeout-ms", "20000", "--run-for", "120"])
            .arg("--hooks-socket")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (conn, _) = listener.accept().unwrap();
        // A test that goes wrong fails on a read timeout instead of hanging.
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Labvm {
            child,
            conn,
            _dir: dir,
        }
    }

    /// Answers events until `f` returns a reply for a `balloon` event.
    fn next_balloon(&mut self) -> BalloonStatus {
        loop {
            match read_message(&mut self.conn).unwrap() {
                Message::Hello { .. } => {}
                Message::Event(e) => match e.kind {
                    EventKind::Balloon(s) => return s,
                    EventKind::BeforeBoot { .. } => self.reply(HookReply::Plan(BootPlan::empty())),
                    _ => self.reply(HookReply::Ack),
                },
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn reply(&mut self, r: HookReply) {
        write_message(&mut self.conn, &Message::Reply(r)).unwrap();
    }

    /// Answers `balloon` events with `reply` until `until` holds.
    fn drive(&mut self, reply: HookReply, until: impl Fn(&BalloonStatus) -> bool) -> BalloonStatus {
        loop {
            let s = self.next_balloon();
            if until(&s) {
                return s;
            }
            self.reply(reply.clone());
        }
    }
}

impl Drop for Labvm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn hw_kvm_balloon_inflate_256mib_drops_labvm_rss_and_deflate_brings_it_back() {
    if !kvm_or_skip("hw_kvm_balloon_inflate_256mib_drops_labvm_rss_and_deflate_brings_it_back") {
        return;
    }
    // A 512 MiB guest touches its whole page pool (RAM above 4 MiB) and
    // keeps 64 MiB of it in use; the balloon takes free pages from the top.
    let mut vm = Labvm::start(512, "balloon:508:64");
    let pid = vm.child.id();
    // Ready and touched: the driver is up and statistics flow.
    let s = vm.drive(HookReply::Ack, |s| s.driver_ok && s.stats_updates >= 2);
    assert_eq!((s.target_mib, s.actual_mib), (0, 0));
    let before = rss_bytes(pid);
    assert!(before >= 508 * MIB, "RSS {before} before inflating");
    vm.reply(HookReply::BalloonTarget {
        target_mib: 256,
        prefault_mib: 0,
    });
    let s = vm.drive(HookReply::Ack, |s| s.actual_mib == 256);
    let inflated = rss_bytes(pid);
    assert_eq!(s.target_mib, 256);
    assert_eq!(s.inflated_pages, 256 * MIB / 4096);
    assert!(
        before.saturating_sub(inflated) >= 240 * MIB,
        "RSS fell by only {} MiB ({} -> {} MiB)",
        before.saturating_sub(inflated) / MIB,
        before / MIB,
        inflated / MIB
    );
    // Deflate: the guest takes the pages back and writes to each one.
    vm.reply(HookReply::BalloonTarget {
        target_mib: 0,
        prefault_mib: 0,
    });
    let s = vm.drive(HookReply::Ack, |s| s.actual_mib == 0);
    let deflated = rss_bytes(pid);
    assert_eq!(s.deflated_pages, 256 * MIB / 4096);
    assert!(
        deflated >= inflated + 240 * MIB,
        "RSS after deflation {} MiB, inflated {} MiB",
        deflated / MIB,
        inflated / MIB
    );
    eprintln!(
        "labvm RSS: {} MiB touched, {} MiB after inflating 256 MiB, {} MiB after deflating",
        before / MIB,
        inflated / MIB,
        deflated / MIB
    );
    vm.reply(HookReply::Ack);
}

#[test]
fn hw_kvm_balloon_deflate_with_prefault_makes_the_forecast_growth_resident_before_use() {
    if !kvm_or_skip(
        "hw_kvm_balloon_deflate_with_prefault_makes_the_forecast_growth_resident_before_use",
    ) {
        return;
    }
    // A guest that takes deflated pages back without touching them
    // (`lazy`): whatever RSS the deflation brings is the host's pre-fault.
    let mut vm = Labvm::start(512, "balloon:508:64:lazy");
    let pid = vm.child.id();
    vm.drive(HookReply::Ack, |s| s.driver_ok && s.stats_updates >= 2);
    vm.reply(HookReply::BalloonTarget {
        target_mib: 256,
        prefault_mib: 0,
    });
    vm.drive(HookReply::Ack, |s| s.actual_mib == 256);
    let inflated = rss_bytes(pid);
    // Predicted growth of 96 MiB: deflate 128 MiB, pre-fault 96 of it.
    vm.reply(HookReply::BalloonTarget {
        target_mib: 128,
        prefault_mib: 96,
    });
    let s = vm.drive(HookReply::Ack, |s| s.actual_mib == 128);
    let deflated = rss_bytes(pid);
    assert_eq!(s.deflated_pages, 128 * MIB / 4096);
    assert_eq!(s.prefaulted_pages, 96 * MIB / 4096);
    let grew = deflated.saturating_sub(inflated);
    assert!(
        (90 * MIB..=110 * MIB).contains(&grew),
        "RSS grew by {} MiB on a deflate of 128 MiB with 96 MiB pre-faulted",
        grew / MIB
    );
    // Without a budget the next deflate brings nothing in.
    vm.reply(HookReply::BalloonTarget {
        target_mib: 0,
        prefault_mib: 0,
    });
    let s = vm.drive(HookReply::Ack, |s| s.actual_mib == 0);
    assert_eq!(s.prefaulted_pages, 96 * MIB / 4096);
    let after = rss_bytes(pid);
    assert!(
        after.saturating_sub(deflated) < 16 * MIB,
        "RSS grew by {} MiB on a lazy deflate",
        after.saturating_sub(deflated) / MIB
    );
    vm.reply(HookReply::Ack);
}
