//! The TCP transport: one control connection and `bulk` connections that
//! carry page runs, each served by its own thread on both sides.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::proto::{self, Control, Frame, HEADER_LEN, PageRun, ProtocolError};
use crate::{PageOut, PageSink, SinkReadError, Transport, TransportError};

/// Frames queued per bulk connection before `send_run` blocks (two keep
/// its socket busy while the next frame is gathered).
const QUEUE_DEPTH: usize = 2;

/// Page buffers kept for reuse after their frame was written: enough for
/// every frame that can be in flight with the most bulk connections
/// `Hello` allows at this depth (queued, being written, being gathered),
/// so buffers are not freed and faulted in again frame after frame. A
/// pool never holds more buffers than were in flight at once.
const POOL_MAX: usize = 64 * (QUEUE_DEPTH + 1) + 1;

/// Written page buffers, handed back to the source for its next frames
/// (a fresh multi-MiB buffer costs an allocation and a page fault per
/// 4 KiB on first use).
type Pool = Arc<Mutex<Vec<Vec<u8>>>>;

enum Job {
    /// Page data at a guest-physical address: the sender thread frames it
    /// (checksum included), so that work is spread over the bulk threads.
    Pages(u64, Vec<u8>),
    Frame(Vec<u8>),
    Flush(SyncSender<Result<(), String>>),
}

/// Destination's view of the bulk connections: frames landed, first error.
#[derive(Debug, Default)]
struct Landed {
    frames: u64,
    error: Option<String>,
}

#[derive(Debug, Default)]
struct RecvState {
    landed: Mutex<Landed>,
    cv: Condvar,
}

/// A migration channel over TCP.
pub struct TcpTransport {
    peer: String,
    control: TcpStream,
    timeout: Duration,
    /// Source: one queue and thread per bulk connection.
    senders: Vec<SyncSender<Job>>,
    /// Source: which senders were given work since the last flush.
    busy: Vec<bool>,
    /// Source: page runs are written on the caller's thread.
    inline: bool,
    next: usize,
    /// Destination: what the bulk readers stored.
    recv: Arc<RecvState>,
    consumed: u64,
    bulk: Vec<TcpStream>,
    threads: Vec<JoinHandle<()>>,
    session: u64,
    pool: Pool,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("peer", &self.peer)
            .field("bulk", &self.bulk.len())
            .field("session", &self.session)
            .finish()
    }
}

pub(crate) fn io<'a>(
    peer: &'a str,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> TransportError + 'a {
    move |source| TransportError::Io {
        peer: peer.to_string(),
        op,
        source,
    }
}

/// Reads one frame; `Closed` when the peer closed between frames.
pub(crate) fn read_frame(
    s: &mut TcpStream,
    peer: &str,
    timeout: Duration,
) -> Result<Frame, TransportError> {
    let header = read_header(s, peer, timeout)?;
    let mut payload = vec![0u8; header.payload_len()];
    read_rest(s, &mut payload, 0, peer)?;
    proto::decode_payload(header, payload).map_err(|source| TransportError::Protocol {
        peer: peer.into(),
        source,
    })
}

/// Reads and checks one frame header; `Closed` when the peer closed
/// between frames.
fn read_header(
    s: &mut TcpStream,
    peer: &str,
    timeout: Duration,
) -> Result<proto::Header, TransportError> {
    let mut h = [0u8; HEADER_LEN];
    if let Err(e) = s.read_exact(&mut h[..1]) {
        return Err(match e.kind() {
            std::io::ErrorKind::UnexpectedEof => TransportError::Closed { peer: peer.into() },
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                TransportError::Timeout {
                    peer: peer.into(),
                    what: "a frame",
                    after: timeout,
                }
            }
            _ => io(peer, "read")(e),
        });
    }
    read_rest(s, &mut h, 1, peer)?;
    proto::decode_header(&h).map_err(|source| TransportError::Protocol {
        peer: peer.into(),
        source,
    })
}

fn read_rest(
    s: &mut TcpStream,
    buf: &mut [u8],
    from: usize,
    peer: &str,
) -> Result<(), TransportError> {
    let mut got = from;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(TransportError::Protocol {
                    peer: peer.into(),
                    source: ProtocolError::Truncated {
                        got,
                        want: buf.len(),
                    },
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(peer, "read")(e)),
        }
    }
    Ok(())
}

pub(crate) fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (u64::try_from(t & u128::from(u64::MAX)).unwrap_or(0) ^ (u64::from(std::process::id()) << 40))
        | 1
}

/// Connects the control connection (no Nagle, reads time out after `timeout`).
pub(crate) fn connect_control(
    addr: &str,
    timeout: Duration,
) -> Result<(TcpStream, String), TransportError> {
    let sa: SocketAddr = addr
        .to_socket_addrs()
        .map_err(io(addr, "resolve"))?
        .next()
        .ok_or_else(|| TransportError::Io {
            peer: addr.into(),
            op: "resolve",
            source: std::io::Error::other("no address"),
        })?;
    let control = TcpStream::connect_timeout(&sa, timeout).map_err(io(addr, "connect"))?;
    control.set_nodelay(true).map_err(io(addr, "configure"))?;
    control
        .set_read_timeout(Some(timeout))
        .map_err(io(addr, "configure"))?;
    Ok((control, sa.to_string()))
}

impl TcpTransport {
    /// Source: connects the control connection to `addr`. Send `Hello` (with
    /// [`session`](Self::session) and the bulk count) next, then call
    /// [`open_bulk`](Self::open_bulk).
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, TransportError> {
        let (control, peer) = connect_control(addr, timeout)?;
        Ok(TcpTransport {
            peer,
            control,
            timeout,
            senders: Vec::new(),
            busy: Vec::new(),
            inline: false,
            next: 0,
            recv: Arc::new(RecvState::default()),
            consumed: 0,
            bulk: Vec::new(),
            threads: Vec::new(),
            session: session_id(),
            pool: Pool::default(),
        })
    }

    /// The session id the bulk connections present.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Source: opens `n` bulk connections, each with a sending thread.
    pub fn open_bulk(&mut self, n: u32) -> Result<(), TransportError> {
        let sa = self
            .control
            .peer_addr()
            .map_err(io(&self.peer, "peer address"))?;
        for i in 0..n.max(1) {
            let mut s = TcpStream::connect_timeout(&sa, self.timeout)
                .map_err(io(&self.peer, "connect bulk"))?;
            // A frame goes out as two writes (header, data): no Nagle wait.
            s.set_nodelay(true).map_err(io(&self.peer, "configure"))?;
            s.write_all(&proto::encode_join(self.session, i))
                .map_err(io(&self.peer, "join"))?;
            let (tx, rx) = sync_channel::<Job>(QUEUE_DEPTH);
            let w = s.try_clone().map_err(io(&self.peer, "clone socket"))?;
            let pool = Arc::clone(&self.pool);
            let t = std::thread::Builder::new()
                .name(format!("migrate-tx{i}"))
                .spawn(move || bulk_sender(w, &rx, &pool))
                .map_err(io(&self.peer, "spawn sender"))?;
            self.bulk.push(s);
            self.senders.push(tx);
            self.busy.push(false);
            self.threads.push(t);
        }
        Ok(())
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Hands a job to the next bulk connection's sender (round-robin), or
    /// writes it on this thread once [`Transport::send_inline`] was asked.
    fn queue(&mut self, job: Job) -> Result<(), TransportError> {
        if self.senders.is_empty() {
            return Err(TransportError::Unexpected {
                peer: self.peer.clone(),
                what: "page run before the bulk connections were opened".into(),
            });
        }
        let i = self.next % self.senders.len();
        self.next = self.next.wrapping_add(1);
        if self.inline {
            // The sender threads are idle (flushed) and get no more work,
            // so this thread is the connection's only writer.
            return write_job(&self.bulk[i], &self.pool, job).map_err(io(&self.peer, "send pages"));
        }
        if let Some(b) = self.busy.get_mut(i) {
            *b = true;
        }
        self.senders[i]
            .send(job)
            .map_err(|_| TransportError::Closed {
                peer: self.peer.clone(),
            })
    }
}

/// Writes one `pages` frame (checksummed here) for `data` at `gpa`.
fn write_pages(mut s: &TcpStream, gpa: u64, data: &[u8]) -> std::io::Result<()> {
    let (head, gpa) = proto::pages_header(gpa, data);
    let mut first = [0u8; HEADER_LEN + 8];
    first[..HEADER_LEN].copy_from_slice(&head);
    first[HEADER_LEN..].copy_from_slice(&gpa);
    s.write_all(&first)?;
    s.write_all(data)
}

/// Writes a queued job's frame on `s`; a page buffer then goes back to
/// the pool. (`Flush` is the sender thread's to answer: nothing to write.)
fn write_job(s: &TcpStream, pool: &Mutex<Vec<Vec<u8>>>, job: Job) -> std::io::Result<()> {
    match job {
        Job::Pages(gpa, data) => {
            let r = write_pages(s, gpa, &data);
            recycle(pool, data);
            r
        }
        Job::Frame(f) => (&mut &*s).write_all(&f),
        Job::Flush(_) => Ok(()),
    }
}

/// A bulk connection written by the thread holding it, its sender
/// thread idle (see [`Transport::lanes`]).
struct TcpLane<'a> {
    stream: &'a TcpStream,
    pool: &'a Pool,
    peer: &'a str,
}

impl PageOut for TcpLane<'_> {
    fn send_run(&mut self, run: PageRun<'_>) -> Result<(), TransportError> {
        write_job(self.stream, self.pool, Job::Frame(proto::encode_run(run)))
            .map_err(io(self.peer, "send pages"))
    }

    fn send_data(&mut self, gpa: u64, data: Vec<u8>) -> Result<(), TransportError> {
        write_job(self.stream, self.pool, Job::Pages(gpa, data))
            .map_err(io(self.peer, "send pages"))
    }

    fn page_buffer(&mut self) -> Vec<u8> {
        take_buffer(self.pool)
    }
}

/// A buffer from the pool, or a new one.
fn take_buffer(pool: &Mutex<Vec<Vec<u8>>>) -> Vec<u8> {
    let reused = pool
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pop();
    // Its length is the last frame's: callers set the length they fill.
    reused.unwrap_or_default()
}

/// Keeps a written page buffer for reuse.
fn recycle(pool: &Mutex<Vec<Vec<u8>>>, data: Vec<u8>) {
    let mut p = pool
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if p.len() < POOL_MAX {
        p.push(data);
    }
}

fn bulk_sender(mut s: TcpStream, rx: &Receiver<Job>, pool: &Mutex<Vec<Vec<u8>>>) {
    let mut failed: Option<String> = None;
    while let Ok(job) = rx.recv() {
        match job {
            Job::Flush(ack) => {
                let r = match &failed {
                    Some(e) => Err(e.clone()),
                    None => s.flush().map_err(|e| e.to_string()),
                };
                // The flusher may have given up; nothing to tell then.
                let _ = ack.send(r);
            }
            // After a failure later frames are dropped: the flush reports it.
            job => {
                if failed.is_none()
                    && let Err(e) = write_job(&s, pool, job)
                {
                    failed = Some(e.to_string());
                }
            }
        }
    }
}

/// Destination, after the control connection's `Hello`: accepts the bulk
/// connections once the VM's memory (the sink) exists.
#[derive(Debug)]
pub struct PendingIncoming {
    listener: TcpListener,
    control: TcpStream,
    peer: String,
    timeout: Duration,
    session: u64,
    bulk: u32,
    ram_bytes: u64,
}

impl PendingIncoming {
    /// Accepts the control connection on `listener` and reads its first
    /// message, which must be `Hello`.
    pub fn accept(
        listener: TcpListener,
        timeout: Duration,
    ) -> Result<(Self, Control), TransportError> {
        let here = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let (mut control, addr) = listener.accept().map_err(io(&here, "accept"))?;
        let peer = addr.to_string();
        control
            .set_read_timeout(Some(timeout))
            .map_err(io(&peer, "configure"))?;
        control.set_nodelay(true).map_err(io(&peer, "configure"))?;
        let first = match read_frame(&mut control, &peer, timeout) {
            Err(TransportError::Protocol {
                peer,
                source: ProtocolError::Version(v),
            }) => {
                // An older (or newer) labvm: say which versions meet here.
                // A peer of another version cannot decode this frame's
                // header either, but its decoder then names our version.
                let reason = format!(
                    "migration protocol version {v} is not spoken here (this destination speaks {})",
                    proto::PROTOCOL_VERSION
                );
                let _ = control.write_all(&proto::encode_control(&Control::Abort { reason }));
                return Err(TransportError::Protocol {
                    peer,
                    source: ProtocolError::Version(v),
                });
            }
            other => other?,
        };
        let hello = match first {
            Frame::Control(c @ Control::Hello { .. }) => c,
            other => {
                return Err(TransportError::Unexpected {
                    peer,
                    what: format!("{} as first frame", frame_name(&other)),
                });
            }
        };
        let (session, bulk, ram_bytes) = match &hello {
            Control::Hello {
                session, bulk, vm, ..
            } => (*session, *bulk, vm.ram_bytes),
            _ => (0, 0, 0),
        };
        // 0 bulk connections: the source moves pages over RDMA instead.
        if bulk > 64 {
            return Err(TransportError::Unexpected {
                peer,
                what: format!("hello announcing {bulk} bulk connections (0 for RDMA, or 1 to 64)"),
            });
        }
        Ok((
            PendingIncoming {
                listener,
                control,
                peer,
                timeout,
                session,
                bulk,
                ram_bytes,
            },
            hello,
        ))
    }

    /// Sends a control message before the transport exists (e.g. `Abort`).
    pub fn send_control(&mut self, msg: &Control) -> Result<(), TransportError> {
        self.control
            .write_all(&proto::encode_control(msg))
            .map_err(io(&self.peer, "write"))
    }

    /// The source's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// True when the source's `Hello` announced no bulk connections: it
    /// moves page data over RDMA, so call `attach_rdma` (cargo feature
    /// `rdma`) instead of [`attach`](Self::attach).
    pub fn wants_rdma(&self) -> bool {
        self.bulk == 0
    }

    /// The control connection and what `Hello` said, for the RDMA transport.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn into_control(self) -> (TcpStream, String, Duration, u64, u64) {
        (
            self.control,
            self.peer,
            self.timeout,
            self.session,
            self.ram_bytes,
        )
    }

    /// Accepts the bulk connections and starts storing their frames in `sink`.
    pub fn attach(self, sink: Arc<dyn PageSink>) -> Result<TcpTransport, TransportError> {
        if self.bulk == 0 {
            return Err(TransportError::Unexpected {
                peer: self.peer,
                what: "hello with no bulk connections (the source wants the RDMA transport; \
                       this destination uses TCP)"
                    .into(),
            });
        }
        let recv = Arc::new(RecvState::default());
        let mut threads = Vec::new();
        let mut bulk = Vec::new();
        let mut seen = vec![false; self.bulk as usize];
        let deadline = Instant::now() + self.timeout;
        self.listener
            .set_nonblocking(true)
            .map_err(io(&self.peer, "configure"))?;
        while seen.iter().any(|s| !s) {
            let (mut s, addr) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(TransportError::Timeout {
                            peer: self.peer,
                            what: "bulk connections",
                            after: self.timeout,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(io(&self.peer, "accept bulk")(e)),
            };
            let peer = addr.to_string();
            s.set_nonblocking(false).map_err(io(&peer, "configure"))?;
            s.set_read_timeout(Some(self.timeout))
                .map_err(io(&peer, "configure"))?;
            match read_frame(&mut s, &peer, self.timeout)? {
                Frame::Join { session, index }
                    if session == self.session && seen.get(index as usize).is_some_and(|s| !s) =>
                {
                    seen[index as usize] = true;
                }
                other => {
                    return Err(TransportError::Unexpected {
                        peer,
                        what: format!(
                            "{} instead of a join for session {:#x}",
                            frame_name(&other),
                            self.session
                        ),
                    });
                }
            }
            let r = s.try_clone().map_err(io(&peer, "clone socket"))?;
            let state = Arc::clone(&recv);
            let sink = Arc::clone(&sink);
            let timeout = self.timeout;
            let t = std::thread::Builder::new()
                .name("migrate-rx".into())
                .spawn(move || bulk_receiver(r, &peer, timeout, sink.as_ref(), &state))
                .map_err(io(&self.peer, "spawn receiver"))?;
            bulk.push(s);
            threads.push(t);
        }
        Ok(TcpTransport {
            peer: self.peer,
            control: self.control,
            timeout: self.timeout,
            senders: Vec::new(),
            busy: Vec::new(),
            inline: false,
            next: 0,
            recv,
            consumed: 0,
            bulk,
            threads,
            session: self.session,
            pool: Pool::default(),
        })
    }
}

/// Reads one bulk frame into `buf` (reused from frame to frame, so page
/// data is neither allocated nor moved again) and stores it in `sink`.
fn receive_bulk(
    s: &mut TcpStream,
    peer: &str,
    timeout: Duration,
    sink: &dyn PageSink,
    buf: &mut Vec<u8>,
) -> Result<(), TransportError> {
    let header = read_header(s, peer, timeout)?;
    let bad = |source| TransportError::Protocol {
        peer: peer.into(),
        source,
    };
    if header.is_pages() {
        // Page data goes straight from the socket into guest memory.
        let mut g = [0u8; 8];
        read_rest(s, &mut g, 0, peer)?;
        let (gpa, len, mut crc) = proto::start_pages(header, g).map_err(bad)?;
        sink.receive_from(gpa, len, s, &mut crc)
            .map_err(|e| match e {
                SinkReadError::Closed { got } => bad(ProtocolError::Truncated {
                    got: got + 8,
                    want: len + 8,
                }),
                SinkReadError::Io(source) => io(peer, "read")(source),
                SinkReadError::Sink(reason) => TransportError::Sink { gpa, reason },
            })?;
        return proto::finish_pages(header, crc).map_err(bad);
    }
    let len = header.payload_len();
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let payload = &mut buf[..len];
    read_rest(s, payload, 0, peer)?;
    let frame =
        proto::decode_borrowed(header, payload).map_err(|source| TransportError::Protocol {
            peer: peer.into(),
            source,
        })?;
    match frame {
        proto::FrameRef::Pages { gpa, data } => sink
            .write(gpa, data)
            .map_err(|reason| TransportError::Sink { gpa, reason }),
        proto::FrameRef::Zero { gpa, pages } => sink
            .zero(gpa, pages)
            .map_err(|reason| TransportError::Sink { gpa, reason }),
        proto::FrameRef::Control(c) => Err(TransportError::Unexpected {
            peer: peer.into(),
            what: format!("{} on a bulk connection", frame_name(&Frame::Control(c))),
        }),
        proto::FrameRef::Join { .. } => Err(TransportError::Unexpected {
            peer: peer.into(),
            what: "join on a bulk connection after its first frame".into(),
        }),
    }
}

fn bulk_receiver(
    mut s: TcpStream,
    peer: &str,
    timeout: Duration,
    sink: &dyn PageSink,
    state: &RecvState,
) {
    let mut buf = Vec::new();
    loop {
        let stored = match receive_bulk(&mut s, peer, timeout, sink, &mut buf) {
            Ok(()) => Ok(()),
            // The source closes bulk connections when it is done.
            Err(TransportError::Closed { .. }) => return,
            // Idle bulk connections are normal while the source waits.
            Err(TransportError::Timeout { .. }) => continue,
            Err(e) => Err(e),
        };
        let mut l = state
            .landed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match stored {
            Ok(()) => l.frames += 1,
            Err(e) => {
                if l.error.is_none() {
                    l.error = Some(crate_error_chain(&e));
                }
                state.cv.notify_all();
                return;
            }
        }
        state.cv.notify_all();
    }
}

fn crate_error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub(crate) fn frame_name(f: &Frame) -> String {
    match f {
        Frame::Control(c) => format!("control message {c:?}").chars().take(80).collect(),
        Frame::Pages { .. } => "page data".into(),
        Frame::Zero { .. } => "zero run".into(),
        Frame::Join { .. } => "join".into(),
    }
}

impl Transport for TcpTransport {
    fn send_control(&mut self, msg: &Control) -> Result<(), TransportError> {
        self.control
            .write_all(&proto::encode_control(msg))
            .map_err(io(&self.peer, "write"))
    }

    fn send_inline(&mut self) -> Result<(), TransportError> {
        self.flush()?;
        self.inline = true;
        Ok(())
    }

    fn lanes(&mut self) -> Result<Vec<Box<dyn PageOut + '_>>, TransportError> {
        if self.senders.is_empty() {
            return Ok(Vec::new());
        }
        // Each connection's sender thread has written everything it was
        // given and waits: the lane is the connection's only writer.
        self.flush()?;
        let (bulk, pool, peer) = (&self.bulk, &self.pool, self.peer.as_str());
        Ok(bulk
            .iter()
            .map(|stream| Box::new(TcpLane { stream, pool, peer }) as Box<dyn PageOut + '_>)
            .collect())
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        let mut acks = Vec::new();
        // Only senders given work since the last flush have anything to
        // hand over (or a new error to report); the others are not woken.
        for (tx, busy) in self.senders.iter().zip(&mut self.busy) {
            if !std::mem::take(busy) {
                continue;
            }
            let (atx, arx) = sync_channel(1);
            tx.send(Job::Flush(atx))
                .map_err(|_| TransportError::Closed {
                    peer: self.peer.clone(),
                })?;
            acks.push(arx);
        }
        for a in acks {
            match a.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(TransportError::Io {
                        peer: self.peer.clone(),
                        op: "send pages",
                        source: std::io::Error::other(e),
                    });
                }
                Err(_) => {
                    return Err(TransportError::Closed {
                        peer: self.peer.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn recv_control(&mut self) -> Result<Control, TransportError> {
        match read_frame(&mut self.control, &self.peer, self.timeout)? {
            Frame::Control(c) => Ok(c),
            other => Err(TransportError::Unexpected {
                peer: self.peer.clone(),
                what: format!("{} on the control connection", frame_name(&other)),
            }),
        }
    }

    fn wait_pages(&mut self, frames: u64) -> Result<(), TransportError> {
        let want = self.consumed.saturating_add(frames);
        let deadline = Instant::now() + self.timeout;
        let mut l = self
            .recv
            .landed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(e) = &l.error {
                return Err(TransportError::Unexpected {
                    peer: self.peer.clone(),
                    what: format!("bulk data ({e})"),
                });
            }
            if l.frames > want {
                return Err(TransportError::Unexpected {
                    peer: self.peer.clone(),
                    what: format!("{} page frames where the round announced {want}", l.frames),
                });
            }
            if l.frames == want {
                self.consumed = want;
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::Timeout {
                    peer: self.peer.clone(),
                    what: "page data",
                    after: self.timeout,
                });
            }
            l = self
                .recv
                .cv
                .wait_timeout(l, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn close(&mut self) {
        self.senders.clear();
        let _ = self.control.shutdown(Shutdown::Both);
        for s in &self.bulk {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a migration transport thread panicked");
            }
        }
    }
}

impl PageOut for TcpTransport {
    fn send_run(&mut self, run: PageRun<'_>) -> Result<(), TransportError> {
        let job = match run {
            PageRun::Data { gpa, data } => {
                let mut buf = self.page_buffer();
                buf.clear();
                buf.extend_from_slice(data);
                Job::Pages(gpa, buf)
            }
            PageRun::Zero { .. } => Job::Frame(proto::encode_run(run)),
        };
        self.queue(job)
    }

    fn send_data(&mut self, gpa: u64, data: Vec<u8>) -> Result<(), TransportError> {
        self.queue(Job::Pages(gpa, data))
    }

    fn page_buffer(&mut self) -> Vec<u8> {
        take_buffer(&self.pool)
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.close();
    }
}
