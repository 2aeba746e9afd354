//! The RDMA transport on a real device: page runs move from an mmap'd
//! source region into an mmap'd destination region over a loopback RC
//! connection on the first device; bad runs are refused before they are
//! posted; a peer that closes mid-stream is an error on the other side.
//! Without a device these tests print `SKIP` (and fail under
//! `PRESCIENT_REQUIRE=rdma`), except the one that checks the no-device
//! answer itself.
#![cfg(feature = "rdma")]
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::net::TcpListener;
use std::thread::JoinHandle;
use std::time::Duration;

use rdma::proto::PROTOCOL_VERSION;
use rdma::rdma_wire::RunError;
use rdma::testing::rdma_device_or_skip;
use rdma::verbs::{GuestRam, RdmaOptions, RdmaTransport, list_devices};
use rdma::{
    Control, PageOut, PageRun, PendingIncoming, TcpTransport, Transport, TransportError,
    VmDescriptor,
};

const PAGE: usize = 4096;
/// Guest RAM of the tests: small enough to stay under the default 8 MiB
/// RLIMIT_MEMLOCK with the staging ring and receive buffers registered too.
const RAM: usize = 4 << 20;
const T: Duration = Duration::from_secs(20);

/// The tests run one at a time: registered memory counts against the
/// process's RLIMIT_MEMLOCK, and each test pins about 6 MiB.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    fn new(len: usize, fill: u8) -> Self {
        // SAFETY: an anonymous private read-write mapping at an address the
        // kernel picks; no file, no fixed address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes failed");
        let m = Mapping {
            addr: p as usize,
            len,
        };
        m.write(0, &vec![fill; len]);
        m
    }

    fn ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: off + len is inside the mapping (asserted), and `data` is
        // a separate slice; no reference into the mapping is alive.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr().wrapping_add(off), data.len())
        };
    }

    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        let mut v = vec![0u8; len];
        // SAFETY: off + len is inside the mapping (asserted); called only
        // once the transport that writes into it has waited for its frames.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr().wrapping_add(off), v.as_mut_ptr(), len) };
        v
    }

    /// Guest RAM over the whole mapping.
    fn guest_ram(&self) -> GuestRam {
        // SAFETY: the mapping lives until the end of the test, after every
        // transport built on it is dropped (each test joins its destination
        // thread, which drops the transport, before the mapping goes).
        unsafe { GuestRam::new(self.ptr(), self.len) }.unwrap()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly what mmap returned; unmapped once.
        unsafe { libc::munmap(self.ptr().cast(), self.len) };
    }
}

fn hello(session: u64, ram: usize, bulk: u32) -> Control {
    Control::Hello {
        version: PROTOCOL_VERSION,
        vm: VmDescriptor {
            ram_bytes: ram as u64,
            vcpus: 1,
            workload: "w".into(),
            config: String::new(),
        },
        bulk,
        session,
    }
}

/// Source options: 32 slots of 64 KiB, so the ring wraps, a 1 MiB run is
/// split into 16 writes, and the source can have twice as many frames in
/// flight as the destination has receives posted (receiver-not-ready
/// retries).
fn source_opts() -> RdmaOptions {
    RdmaOptions {
        slots: 32,
        slot_bytes: 64 << 10,
        ..RdmaOptions::default()
    }
}

/// Destination options: 16 receives posted.
fn dest_opts() -> RdmaOptions {
    RdmaOptions {
        recv_depth: 16,
        ..RdmaOptions::default()
    }
}

/// Destination thread: accepts, registers `mem`, answers Accept, then runs
/// `body` with the transport.
fn destination<R: Send + 'static>(
    listener: TcpListener,
    mem: std::sync::Arc<Mapping>,
    body: impl FnOnce(&mut RdmaTransport) -> R + Send + 'static,
) -> JoinHandle<R> {
    std::thread::spawn(move || {
        let (pending, h) = PendingIncoming::accept(listener, T).unwrap();
        assert!(pending.wants_rdma(), "{h:?}");
        let mut tr = pending.attach_rdma(mem.guest_ram(), &dest_opts()).unwrap();
        tr.send_control(&Control::Accept).unwrap();
        let r = body(&mut tr);
        drop(tr);
        r
    })
}

/// Serves rounds until the last one; returns the rounds acknowledged.
fn serve_rounds(tr: &mut RdmaTransport) -> Result<u32, TransportError> {
    let mut rounds = 0;
    loop {
        match tr.recv_control()? {
            Control::RoundEnd {
                round,
                frames,
                last,
            } => {
                tr.wait_pages(frames)?;
                tr.send_control(&Control::RoundAck { round })?;
                rounds += 1;
                if last {
                    return Ok(rounds);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn source(addr: &str, ram: usize) -> RdmaTransport {
    let mut src = RdmaTransport::connect(addr, &source_opts(), T).unwrap();
    src.send_control(&hello(src.session(), ram, 0)).unwrap();
    src.open_data_path(ram as u64).unwrap();
    assert_eq!(src.recv_control().unwrap(), Control::Accept);
    src
}

fn end_round(src: &mut RdmaTransport, round: u32, frames: u64, last: bool) {
    src.flush().unwrap();
    src.send_control(&Control::RoundEnd {
        round,
        frames,
        last,
    })
    .unwrap();
    assert_eq!(src.recv_control().unwrap(), Control::RoundAck { round });
}

fn pattern(page: usize, round: u8) -> Vec<u8> {
    let mut v = vec![0u8; PAGE];
    for (i, b) in v.iter_mut().enumerate() {
        *b = u8::try_from((page * 31 + i * 7 + usize::from(round) * 101) % 251).unwrap() | 1;
    }
    v
}

#[test]
fn hw_rdma_page_runs_land_in_the_destination_mapping_over_loopback_rc() {
    if rdma_device_or_skip("hw_rdma_page_runs_land_in_the_destination_mapping_over_loopback_rc")
        .is_none()
    {
        return;
    }
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dst = std::sync::Arc::new(Mapping::new(RAM, 0xEE));
    let dest = destination(listener, dst.clone(), serve_rounds);

    let src_mem = Mapping::new(RAM, 0);
    let mut expect = vec![0xEEu8; RAM];
    let mut src = source(&addr, RAM);

    // Round 0: one 1 MiB run (16 writes of 64 KiB), 300 single pages (the
    // 32-slot ring wraps, and up to 32 frames chase 16 posted receives),
    // one zero run.
    let mut frames = 0u64;
    for p in 0..256 {
        src_mem.write(p * PAGE, &pattern(p, 0));
    }
    src.send_run(PageRun::Data {
        gpa: 0,
        data: &src_mem.read(0, 256 * PAGE),
    })
    .unwrap();
    expect[..256 * PAGE].copy_from_slice(&src_mem.read(0, 256 * PAGE));
    frames += 1;
    for p in 256..556 {
        let data = pattern(p, 0);
        src_mem.write(p * PAGE, &data);
        src.send_run(PageRun::Data {
            gpa: (p * PAGE) as u64,
            data: &data,
        })
        .unwrap();
        expect[p * PAGE..(p + 1) * PAGE].copy_from_slice(&data);
        frames += 1;
    }
    src.send_run(PageRun::Zero {
        gpa: (600 * PAGE) as u64,
        pages: 100,
    })
    .unwrap();
    expect[600 * PAGE..700 * PAGE].fill(0);
    frames += 1;
    end_round(&mut src, 0, frames, false);

    // Round 1: some pages change, some become zero (a zero run over data
    // written in round 0), the last page of RAM is written.
    let mut frames = 0u64;
    for p in (0..556).step_by(37) {
        let data = pattern(p, 1);
        src.send_run(PageRun::Data {
            gpa: (p * PAGE) as u64,
            data: &data,
        })
        .unwrap();
        expect[p * PAGE..(p + 1) * PAGE].copy_from_slice(&data);
        frames += 1;
    }
    src.send_run(PageRun::Zero {
        gpa: (300 * PAGE) as u64,
        pages: 20,
    })
    .unwrap();
    expect[300 * PAGE..320 * PAGE].fill(0);
    frames += 1;
    let last = RAM / PAGE - 1;
    let data = pattern(last, 1);
    src.send_run(PageRun::Data {
        gpa: (last * PAGE) as u64,
        data: &data,
    })
    .unwrap();
    expect[last * PAGE..].copy_from_slice(&data);
    frames += 1;
    end_round(&mut src, 1, frames, true);

    assert_eq!(dest.join().unwrap().unwrap(), 2);
    let got = dst.read(0, RAM);
    let first_diff = got.iter().zip(&expect).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "destination differs at byte {first_diff:?}"
    );
}

#[test]
fn hw_rdma_out_of_range_runs_are_refused_and_nothing_is_written() {
    if rdma_device_or_skip("hw_rdma_out_of_range_runs_are_refused_and_nothing_is_written").is_none()
    {
        return;
    }
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dst = std::sync::Arc::new(Mapping::new(RAM, 0xEE));
    let dest = destination(listener, dst.clone(), serve_rounds);
    let mut src = source(&addr, RAM);

    let page = [0x5Au8; PAGE];
    let ram = RAM as u64;
    let refused = [
        src.send_run(PageRun::Data {
            gpa: ram,
            data: &page,
        }),
        src.send_run(PageRun::Data {
            gpa: ram - PAGE as u64,
            data: &[1u8; 2 * PAGE],
        }),
        src.send_run(PageRun::Data {
            gpa: u64::MAX - 4095,
            data: &page,
        }),
        src.send_run(PageRun::Data {
            gpa: 100,
            data: &page,
        }),
        src.send_run(PageRun::Data {
            gpa: 0,
            data: &page[..100],
        }),
        src.send_run(PageRun::Zero {
            gpa: ram - PAGE as u64,
            pages: 2,
        }),
        src.send_run(PageRun::Zero { gpa: 0, pages: 0 }),
    ];
    for r in &refused {
        assert!(matches!(r, Err(TransportError::Run { .. })), "{r:?}");
    }
    assert!(matches!(
        &refused[0],
        Err(TransportError::Run {
            source: RunError::OutOfRange { .. },
            ..
        })
    ));
    // The transport is still good: a run inside RAM goes through.
    src.send_run(PageRun::Data {
        gpa: ram - PAGE as u64,
        data: &page,
    })
    .unwrap();
    end_round(&mut src, 0, 1, true);
    assert_eq!(dest.join().unwrap().unwrap(), 1);
    assert!(dst.read(0, RAM - PAGE).iter().all(|&b| b == 0xEE));
    assert_eq!(dst.read(RAM - PAGE, PAGE), page);
}

#[test]
fn hw_rdma_region_of_another_size_is_refused_by_the_source() {
    if rdma_device_or_skip("hw_rdma_region_of_another_size_is_refused_by_the_source").is_none() {
        return;
    }
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dst = std::sync::Arc::new(Mapping::new(RAM, 0));
    let dest = destination(listener, dst, |tr: &mut RdmaTransport| tr.recv_control());
    let mut src = RdmaTransport::connect(&addr, &source_opts(), T).unwrap();
    src.send_control(&hello(src.session(), RAM, 0)).unwrap();
    // The source's VM has twice the RAM the destination registered.
    let r = src.open_data_path(2 * RAM as u64);
    assert!(
        matches!(&r, Err(TransportError::Unexpected { what, .. }) if what.contains("where the VM has")),
        "{r:?}"
    );
    drop(src);
    // Closed, or reset: the source closed with `Accept` still unread.
    let r = dest.join().unwrap();
    assert!(
        matches!(
            r,
            Err(TransportError::Closed { .. } | TransportError::Io { .. })
        ),
        "{r:?}"
    );
}

#[test]
fn hw_rdma_source_closing_mid_round_is_an_error_at_the_destination() {
    if rdma_device_or_skip("hw_rdma_source_closing_mid_round_is_an_error_at_the_destination")
        .is_none()
    {
        return;
    }
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dst = std::sync::Arc::new(Mapping::new(RAM, 0));
    let dest = destination(listener, dst.clone(), serve_rounds);
    let mut src = source(&addr, RAM);
    for p in 0..10 {
        src.send_run(PageRun::Data {
            gpa: (p * PAGE) as u64,
            data: &pattern(p, 0),
        })
        .unwrap();
    }
    end_round(&mut src, 0, 10, false);
    for p in 10..15 {
        src.send_run(PageRun::Data {
            gpa: (p * PAGE) as u64,
            data: &pattern(p, 0),
        })
        .unwrap();
    }
    src.flush().unwrap();
    // Announce 40 frames, send none of the rest, and go away.
    src.send_control(&Control::RoundEnd {
        round: 1,
        frames: 40,
        last: false,
    })
    .unwrap();
    drop(src);
    let r = dest.join().unwrap();
    assert!(matches!(r, Err(TransportError::Closed { .. })), "{r:?}");
    for p in 0..10 {
        assert_eq!(dst.read(p * PAGE, PAGE), pattern(p, 0), "page {p}");
    }
}

#[test]
fn hw_rdma_destination_closing_mid_stream_fails_the_source() {
    if rdma_device_or_skip("hw_rdma_destination_closing_mid_stream_fails_the_source").is_none() {
        return;
    }
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dst = std::sync::Arc::new(Mapping::new(RAM, 0));
    // The destination serves one round, then drops its transport (QP,
    // memory region and control connection go).
    let dest = destination(listener, dst, |tr: &mut RdmaTransport| {
        match tr.recv_control().unwrap() {
            Control::RoundEnd { round, frames, .. } => {
                tr.wait_pages(frames).unwrap();
                tr.send_control(&Control::RoundAck { round }).unwrap();
            }
            other => panic!("unexpected {other:?}"),
        }
    });
    let mut src = source(&addr, RAM);
    src.send_run(PageRun::Data {
        gpa: 0,
        data: &pattern(0, 0),
    })
    .unwrap();
    end_round(&mut src, 0, 1, false);
    dest.join().unwrap();
    let mut failed = None;
    for p in 0..(RAM / PAGE) {
        let r = src
            .send_run(PageRun::Data {
                gpa: (p * PAGE) as u64,
                data: &pattern(p, 1),
            })
            .and_then(|()| src.flush());
        if let Err(e) = r {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("writes to a destination that closed all succeeded");
    assert!(
        matches!(
            e,
            TransportError::Closed { .. }
                | TransportError::Completion { .. }
                | TransportError::PeerAborted { .. }
        ),
        "{e:?}"
    );
}

#[test]
fn hw_rdma_writes_after_complete_do_not_reach_the_running_guest() {
    if rdma_device_or_skip("hw_rdma_writes_after_complete_do_not_reach_the_running_guest").is_none()
    {
        return;
    }
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dst = std::sync::Arc::new(Mapping::new(RAM, 0xEE));
    let dest = destination(listener, dst.clone(), |tr: &mut RdmaTransport| {
        serve_rounds(tr).unwrap();
        assert_eq!(tr.recv_control().unwrap(), Control::Complete);
        tr.send_control(&Control::Running).unwrap();
        // Wait for the source to go; the guest "runs" meanwhile.
        tr.recv_control()
    });
    let mut src = source(&addr, RAM);
    src.send_run(PageRun::Data {
        gpa: 0,
        data: &pattern(0, 0),
    })
    .unwrap();
    end_round(&mut src, 0, 1, true);
    src.send_control(&Control::Complete).unwrap();
    assert_eq!(src.recv_control().unwrap(), Control::Running);
    // A late write: the destination's queue pair no longer accepts it.
    let r = src
        .send_run(PageRun::Data {
            gpa: PAGE as u64,
            data: &[0x77u8; PAGE],
        })
        .and_then(|()| src.flush());
    assert!(matches!(r, Err(TransportError::Completion { .. })), "{r:?}");
    drop(src);
    assert!(dest.join().unwrap().is_err());
    assert_eq!(dst.read(0, PAGE), pattern(0, 0));
    assert!(dst.read(PAGE, PAGE).iter().all(|&b| b == 0xEE));
}

#[test]
fn hw_rdma_without_a_device_the_destination_tells_the_source() {
    let devices = list_devices().unwrap();
    if !devices.is_empty() {
        #[allow(clippy::print_stdout)]
        {
            println!(
                "SKIP hw_rdma_without_a_device_the_destination_tells_the_source: this host has RDMA devices {devices:?}"
            );
        }
        return;
    }
    assert!(
        !rdma::testing::required("rdma"),
        "RDMA required (PRESCIENT_REQUIRE) but no device found"
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let (pending, _) = PendingIncoming::accept(listener, T).unwrap();
        assert!(pending.wants_rdma());
        let mem = Mapping::new(1 << 20, 0);
        let r = pending.attach_rdma(mem.guest_ram(), &RdmaOptions::default());
        r.map(|_| ())
    });
    // The source side over plain TCP: Hello asking for RDMA (no bulk).
    let mut src = TcpTransport::connect(&addr, T).unwrap();
    src.send_control(&hello(src.session(), 1 << 20, 0)).unwrap();
    let answer = src.recv_control().unwrap();
    assert!(
        matches!(&answer, Control::Abort { reason } if reason.contains("no RDMA device")),
        "{answer:?}"
    );
    assert!(matches!(
        dest.join().unwrap(),
        Err(TransportError::NoRdmaDevice)
    ));
}
