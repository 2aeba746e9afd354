//! The TCP transport on loopback: page runs land in the sink, rounds are
//! counted, and a peer that lies or vanishes is reported, not trusted.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdma::{
    Control, PageOut, PageRun, PageSink, PendingIncoming, TcpTransport, Transport, TransportError,
    VmDescriptor,
};

struct Mem(Mutex<Vec<u8>>);

impl PageSink for Mem {
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let mut m = self.0.lock().unwrap();
        let start = usize::try_from(gpa).map_err(|e| e.to_string())?;
        let end = start
            .checked_add(data.len())
            .filter(|&e| e <= m.len())
            .ok_or("outside memory")?;
        m[start..end].copy_from_slice(data);
        Ok(())
    }
    fn zero(&self, gpa: u64, pages: u64) -> Result<(), String> {
        let mut m = self.0.lock().unwrap();
        let start = usize::try_from(gpa).map_err(|e| e.to_string())?;
        let len = usize::try_from(pages * 4096).map_err(|e| e.to_string())?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= m.len())
            .ok_or("outside memory")?;
        m[start..end].fill(0);
        Ok(())
    }
}

fn hello(session: u64, bulk: u32) -> Control {
    Control::Hello {
        version: rdma::proto::PROTOCOL_VERSION,
        vm: VmDescriptor {
            ram_bytes: 1 << 20,
            vcpus: 1,
            workload: "w".into(),
            config: String::new(),
        },
        bulk,
        session,
    }
}

#[test]
fn tcp_pages_over_three_connections_land_in_the_sink_queued_or_inline() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = Duration::from_secs(10);
    let dest = std::thread::spawn(move || {
        let (pending, h) = PendingIncoming::accept(listener, t).unwrap();
        assert!(matches!(h, Control::Hello { bulk: 3, .. }));
        let mem = Arc::new(Mem(Mutex::new(vec![0xFFu8; 1 << 20])));
        let mut tr = pending.attach(mem.clone()).unwrap();
        tr.send_control(&Control::Accept).unwrap();
        let Control::RoundEnd { frames, .. } = tr.recv_control().unwrap() else {
            panic!()
        };
        tr.wait_pages(frames).unwrap();
        tr.send_control(&Control::RoundAck { round: 0 }).unwrap();
        mem.0.lock().unwrap().clone()
    });
    let mut src = TcpTransport::connect(&addr, t).unwrap();
    src.send_control(&hello(src.session(), 3)).unwrap();
    src.open_bulk(3).unwrap();
    assert_eq!(src.recv_control().unwrap(), Control::Accept);
    let mut expect = vec![0xFFu8; 1 << 20];
    for p in 0..200u64 {
        let page = vec![u8::try_from(p % 251).unwrap(); 4096];
        if p == 100 {
            // The second half (and the zero run) go out on this thread,
            // as in stop-and-copy.
            src.send_inline().unwrap();
        }
        if p % 2 == 0 {
            src.send_run(PageRun::Data {
                gpa: p * 4096,
                data: &page,
            })
            .unwrap();
        } else {
            // Owned buffers travel without a copy; a recycled one may
            // still hold an earlier frame's bytes.
            let mut b = src.page_buffer();
            b.clear();
            b.extend_from_slice(&page);
            src.send_data(p * 4096, b).unwrap();
        }
        let s = usize::try_from(p * 4096).unwrap();
        expect[s..s + 4096].copy_from_slice(&page);
    }
    src.send_run(PageRun::Zero {
        gpa: 210 * 4096,
        pages: 5,
    })
    .unwrap();
    expect[210 * 4096..215 * 4096].fill(0);
    src.flush().unwrap();
    src.send_control(&Control::RoundEnd {
        round: 0,
        frames: 201,
        last: false,
    })
    .unwrap();
    assert_eq!(src.recv_control().unwrap(), Control::RoundAck { round: 0 });
    assert!(dest.join().unwrap() == expect);
}

#[test]
fn tcp_page_outside_the_sink_is_an_error_not_a_write() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = Duration::from_secs(10);
    let dest = std::thread::spawn(move || {
        let (pending, _) = PendingIncoming::accept(listener, t).unwrap();
        let mem = Arc::new(Mem(Mutex::new(vec![0u8; 1 << 20])));
        let mut tr = pending.attach(mem.clone()).unwrap();
        tr.send_control(&Control::Accept).unwrap();
        let Control::RoundEnd { frames, .. } = tr.recv_control().unwrap() else {
            panic!()
        };
        let r = tr.wait_pages(frames);
        let untouched = mem.0.lock().unwrap().iter().all(|&b| b == 0);
        (r, untouched)
    });
    let mut src = TcpTransport::connect(&addr, t).unwrap();
    src.send_control(&hello(src.session(), 1)).unwrap();
    src.open_bulk(1).unwrap();
    assert_eq!(src.recv_control().unwrap(), Control::Accept);
    src.send_run(PageRun::Data {
        gpa: 1 << 20,
        data: &[1u8; 4096],
    })
    .unwrap();
    src.flush().unwrap();
    src.send_control(&Control::RoundEnd {
        round: 0,
        frames: 1,
        last: false,
    })
    .unwrap();
    let (r, untouched) = dest.join().unwrap();
    assert!(matches!(r, Err(TransportError::Unexpected { .. })), "{r:?}");
    assert!(untouched);
}

#[test]
fn tcp_source_that_vanishes_is_reported_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = Duration::from_secs(10);
    let dest = std::thread::spawn(move || {
        let (pending, _) = PendingIncoming::accept(listener, t).unwrap();
        let mem = Arc::new(Mem(Mutex::new(vec![0u8; 1 << 20])));
        let mut tr = pending.attach(mem).unwrap();
        tr.send_control(&Control::Accept).unwrap();
        tr.recv_control()
    });
    let mut src = TcpTransport::connect(&addr, t).unwrap();
    src.send_control(&hello(src.session(), 2)).unwrap();
    src.open_bulk(2).unwrap();
    assert_eq!(src.recv_control().unwrap(), Control::Accept);
    src.close();
    drop(src);
    assert!(matches!(
        dest.join().unwrap(),
        Err(TransportError::Closed { .. })
    ));
}

#[test]
fn tcp_destination_refuses_a_source_that_wants_rdma() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = Duration::from_secs(10);
    let dest = std::thread::spawn(move || {
        let (pending, _) = PendingIncoming::accept(listener, t).unwrap();
        assert!(pending.wants_rdma());
        let mem = Arc::new(Mem(Mutex::new(vec![0u8; 1 << 20])));
        pending.attach(mem).map(|_| ())
    });
    let mut src = TcpTransport::connect(&addr, t).unwrap();
    src.send_control(&hello(src.session(), 0)).unwrap();
    let r = dest.join().unwrap();
    assert!(
        matches!(&r, Err(TransportError::Unexpected { what, .. }) if what.contains("RDMA")),
        "{r:?}"
    );
}

#[test]
fn tcp_hello_with_too_many_bulk_connections_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = Duration::from_secs(10);
    let dest = std::thread::spawn(move || PendingIncoming::accept(listener, t).map(|_| ()));
    let mut src = TcpTransport::connect(&addr, t).unwrap();
    src.send_control(&hello(src.session(), 65)).unwrap();
    assert!(matches!(
        dest.join().unwrap(),
        Err(TransportError::Unexpected { .. })
    ));
}
