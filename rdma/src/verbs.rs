//! RDMA verbs through rdma-sys (cargo feature `rdma`): the RDMA transport.
//!
//! One RC queue pair per migration, connected with the parameters both
//! sides send over the TCP control connection (`RdmaConnect` /
//! `RdmaAccept`, see `proto.rs`). The destination registers its guest RAM
//! as one memory region and tells the source its address, length and rkey;
//! the source copies each page run into a registered staging ring and
//! writes it with RDMA WRITE (WITH IMMEDIATE on a run's last piece, the
//! immediate being the frame number), straight into the destination's
//! guest RAM at `region.addr + gpa`. Zero runs travel as 16-byte RDMA SENDs
//! that the destination checks and applies itself. A receiver thread on the
//! destination consumes the completions (one per frame), reposts receives
//! and counts frames for [`Transport::wait_pages`].
//!
//! Where the host has no RDMA device, [`RdmaTransport::connect`] and
//! [`PendingIncoming::attach_rdma`] fail with
//! [`TransportError::NoRdmaDevice`] before anything else happens.
//!
//! The raw verbs calls live in the private `sys` module (`verbs/sys.rs`);
//! here only guest RAM (zeroing a checked range) and the registrations
//! (whose lifetime rule is the caller's) are unsafe. Each unsafe block holds
//! one operation and says why it is sound.

use std::io::Write;
use std::net::TcpStream;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdma_sys as ib;

mod sys;

use sys::{DeviceList, DmaBuf, Verbs, status_str, wc_imm, zeroed_wcs};

use crate::proto::{self, Control, Frame, PAGE_SIZE, PageRun};
use crate::rdma_wire::{self, RemoteRegion};
use crate::tcp::{connect_control, frame_name, io, read_frame, session_id};
use crate::{PageOut, PendingIncoming, Transport, TransportError};

/// Names of the RDMA devices on this host (e.g. `mlx5_0`, `rxe0`).
pub fn list_devices() -> Result<Vec<String>, TransportError> {
    let list = DeviceList::get()?;
    Ok(list.names())
}

/// Bytes per receive buffer on the destination (a zero-run message is 16;
/// a longer SEND shows as a wrong byte count, not as a buffer overrun).
const RECV_SLOT: usize = 64;
/// [`RECV_SLOT`] as a verbs length.
const RECV_SLOT_LEN: u32 = 64;
/// Longest single wait on the completion channel, so that a closed control
/// connection or a stop request is noticed within this time.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// How to use the RDMA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdmaOptions {
    /// Device name (`mlx5_0`, `rxe0`); `None`: the first device.
    pub device: Option<String>,
    /// Port number (from 1).
    pub port: u8,
    /// GID table index; `None`: the first non-zero GID of the port (on
    /// RoCE pick the RoCE v2 entry explicitly where routing needs it).
    pub gid_index: Option<u8>,
    /// Source: staging slots, i.e. most RDMA writes in flight.
    pub slots: u32,
    /// Source: bytes per staging slot (a multiple of 4 KiB); longer runs go
    /// out as several writes, the last one with the immediate.
    pub slot_bytes: u32,
    /// Destination: receives kept posted (frames the source may have in
    /// flight before it waits for receiver-not-ready retries).
    pub recv_depth: u32,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        RdmaOptions {
            device: None,
            port: 1,
            gid_index: None,
            slots: 64,
            slot_bytes: 256 << 10,
            recv_depth: 512,
        }
    }
}

impl RdmaOptions {
    /// Checks the sizes; `Err` names the wrong one.
    pub fn check(&self) -> Result<(), TransportError> {
        let bad = |reason: String| TransportError::RdmaSetup {
            device: self.device.clone().unwrap_or_else(|| "(first)".into()),
            reason,
        };
        if self.port == 0 {
            return Err(bad("port 0 (ports count from 1)".into()));
        }
        if !(1..=4096).contains(&self.slots) {
            return Err(bad(format!("{} staging slots (1 to 4096)", self.slots)));
        }
        if self.slot_bytes == 0
            || !u64::from(self.slot_bytes).is_multiple_of(PAGE_SIZE)
            || self.slot_bytes > 16 << 20
        {
            return Err(bad(format!(
                "staging slot of {} bytes (a multiple of 4 KiB up to 16 MiB)",
                self.slot_bytes
            )));
        }
        if !(1..=16384).contains(&self.recv_depth) {
            return Err(bad(format!(
                "receive depth {} (1 to 16384)",
                self.recv_depth
            )));
        }
        Ok(())
    }
}

/// The destination's guest RAM: one mapping the NIC writes into.
#[derive(Debug)]
pub struct GuestRam {
    base: NonNull<u8>,
    size: usize,
}

// SAFETY: GuestRam is an address range, not an owner; `GuestRam::new`'s
// caller promised the range stays mapped for the transport's life, and the
// only writes through it (the receiver thread zeroing checked ranges) never
// overlap the pages the NIC writes in the same round.
unsafe impl Send for GuestRam {}
// SAFETY: as for Send; shared use only reads the two fields.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Guest RAM at `base`, `size` bytes (guest-physical 0 is `base`).
    ///
    /// # Safety
    ///
    /// `base..base + size` must be one readable and writable mapping that
    /// stays mapped (not unmapped, not remapped) until the transport built
    /// from it has been dropped. While the transport lives, the NIC and the
    /// transport's receiver thread write into it: nothing may rely on the
    /// contents of a page the migration moves until [`Transport::wait_pages`]
    /// has returned for the round that moved it (labvm's destination does
    /// not run the guest before `Complete`).
    pub unsafe fn new(base: *mut u8, size: usize) -> Result<Self, TransportError> {
        let base = NonNull::new(base).ok_or_else(|| TransportError::RdmaSetup {
            device: "-".into(),
            reason: "guest RAM at a null address".into(),
        })?;
        if size == 0 || !(size as u64).is_multiple_of(PAGE_SIZE) {
            return Err(TransportError::RdmaSetup {
                device: "-".into(),
                reason: format!("guest RAM of {size} bytes (whole pages, more than none)"),
            });
        }
        Ok(GuestRam { base, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Zeroes `bytes` bytes at `gpa`, which [`rdma_wire::check_zero_run`]
    /// has checked against [`size`](Self::size).
    fn zero_checked(&self, gpa: u64, bytes: u64) -> Result<(), String> {
        let start = usize::try_from(gpa).map_err(|e| e.to_string())?;
        let len = usize::try_from(bytes).map_err(|e| e.to_string())?;
        if start.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(format!("{bytes} bytes at {gpa:#x} outside guest RAM"));
        }
        // SAFETY: start + len <= size (checked above), so the offset stays
        // inside the one mapping `new`'s caller vouched for.
        let p = unsafe { self.base.as_ptr().add(start) };
        // SAFETY: `p..p + len` lies inside the live, writable mapping
        // (above); no Rust reference to guest RAM exists in this crate, and
        // the NIC writes other pages in this round (one page per round).
        unsafe { std::ptr::write_bytes(p, 0, len) };
        Ok(())
    }
}

/// What the destination's receiver thread reports.
#[derive(Debug, Default)]
struct Landed {
    frames: u64,
    error: Option<RecvFailure>,
}

/// Why the receiver thread stopped.
#[derive(Clone, Debug)]
enum RecvFailure {
    /// A receive completed with an error status.
    Completion(Failure),
    /// Anything else (a bad frame number, a zero run out of range, a verb).
    Other(String),
}

impl From<String> for RecvFailure {
    fn from(s: String) -> Self {
        RecvFailure::Other(s)
    }
}

#[derive(Debug, Default)]
struct RecvShared {
    landed: Mutex<Landed>,
    cv: Condvar,
}

/// The destination's receiving side: the thread and what it shares.
struct Receiver {
    shared: Arc<RecvShared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The source's staging ring: `slots` slots of `slot_bytes`, one per work
/// request in flight. RC completes sends in order and every send is
/// signalled, so slot `k % slots` is free again once completion `k` came.
struct Ring {
    buf: DmaBuf,
    lkey: u32,
    slots: u64,
    slot_bytes: usize,
    /// Work requests posted so far.
    posted: u64,
    /// Completions seen so far.
    done: u64,
    /// Frame number of the next frame (the immediate data).
    seq: u32,
    /// What each slot's request is, for error messages.
    ops: Vec<&'static str>,
}

/// The first failed completion; every later call reports it.
#[derive(Clone, Debug)]
struct Failure {
    op: &'static str,
    status: String,
    vendor_err: u32,
}

/// A migration channel over RDMA: control messages on the TCP control
/// connection, page data by RDMA WRITE into the destination's guest RAM.
pub struct RdmaTransport {
    // Fields drop in this order: the receiver thread is joined in Drop
    // (close) first, then the verbs objects (QP, MRs, CQ, PD, context), and
    // only then the buffers those MRs covered.
    verbs: Arc<Verbs>,
    ring: Option<Ring>,
    /// Destination: the receive buffers, held (not read) until `verbs`
    /// has deregistered them.
    _recv_buf: Option<Arc<DmaBuf>>,
    receiver: Option<Receiver>,
    region: Option<RemoteRegion>,
    failure: Option<Failure>,
    control: TcpStream,
    /// A control message read while waiting for completions.
    stashed: Option<Control>,
    peer: String,
    timeout: Duration,
    session: u64,
    consumed: u64,
    closed: bool,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("peer", &self.peer)
            .field("device", &self.verbs.device)
            .field("local", &self.verbs.local)
            .field("region", &self.region)
            .field("session", &self.session)
            .finish()
    }
}

impl RdmaTransport {
    /// Source: opens the RDMA device (the first, or `opts.device`) with its
    /// queue pair and registered staging ring, then connects the control
    /// connection to `addr`. Fails with [`TransportError::NoRdmaDevice`],
    /// before connecting, on hosts without a device. Send `Hello` with
    /// `bulk: 0` and [`session`](Self::session) next, then call
    /// [`open_data_path`](Self::open_data_path).
    pub fn connect(
        addr: &str,
        opts: &RdmaOptions,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        opts.check()?;
        let slot_bytes = opts.slot_bytes as usize;
        // Allocated before the verbs objects so that, on any early return,
        // the registration goes before the memory does.
        let buf = DmaBuf::new(opts.slots as usize * slot_bytes)?;
        let mut verbs = Verbs::open(opts, opts.slots, 1, false)?;
        // SAFETY: `buf` is a live allocation of `buf.len()` bytes that the
        // transport drops only after `verbs` (field order), so it outlives
        // the registration.
        let (lkey, _) = unsafe { verbs.register(buf.as_mut_ptr(), buf.len(), false)? };
        let (control, peer) = connect_control(addr, timeout)?;
        Ok(RdmaTransport {
            verbs: Arc::new(verbs),
            ring: Some(Ring {
                buf,
                lkey,
                slots: u64::from(opts.slots),
                slot_bytes,
                posted: 0,
                done: 0,
                seq: 0,
                ops: vec![""; opts.slots as usize],
            }),
            _recv_buf: None,
            receiver: None,
            region: None,
            failure: None,
            control,
            stashed: None,
            peer,
            timeout,
            session: session_id(),
            consumed: 0,
            closed: false,
        })
    }

    /// The session id to put in `Hello`.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The RDMA device in use.
    pub fn device(&self) -> &str {
        &self.verbs.device
    }

    /// Source, after `Hello`: sends this side's queue pair (`RdmaConnect`),
    /// takes the destination's queue pair and guest RAM region
    /// (`RdmaAccept`), checks them (the region must be exactly `ram_bytes`,
    /// the RAM size `Hello` announced) and connects the queue pair. An
    /// `Abort` from the destination is [`TransportError::PeerAborted`].
    pub fn open_data_path(&mut self, ram_bytes: u64) -> Result<(), TransportError> {
        if self.ring.is_none() || self.region.is_some() {
            return Err(self.unexpected("open_data_path on a destination or twice"));
        }
        self.send_control(&Control::RdmaConnect {
            qp: self.verbs.local,
        })?;
        let (qp, region) = match self.recv_control()? {
            Control::RdmaAccept { qp, region } => (qp, region),
            Control::Abort { reason } => {
                return Err(TransportError::PeerAborted {
                    peer: self.peer.clone(),
                    reason,
                });
            }
            other => {
                return Err(
                    self.unexpected(&format!("control message {other:?} instead of rdma-accept"))
                );
            }
        };
        qp.check()
            .map_err(|e| self.unexpected(&format!("queue pair in rdma-accept: {e}")))?;
        region
            .check(ram_bytes)
            .map_err(|e| self.unexpected(&format!("region in rdma-accept: {e}")))?;
        self.verbs.connect(&qp, true)?;
        tracing::info!(peer = %self.peer, remote_qpn = qp.qpn, ?region, "RDMA data path open");
        self.region = Some(region);
        Ok(())
    }

    /// Destination: stops the receiver thread and moves the queue pair to
    /// the error state, so that no later RDMA write lands in guest RAM
    /// (the NIC refuses them; the source sees a completion error). Done on
    /// `Complete`, on `Abort` and on close. Nothing to do on a source.
    fn seal(&mut self) {
        let Some(r) = self.receiver.as_mut() else {
            return;
        };
        let Some(t) = r.thread.take() else {
            return;
        };
        r.stop.store(true, Ordering::Release);
        if t.join().is_err() {
            tracing::error!("the RDMA receiver thread panicked");
        }
        if let Err(e) = self.verbs.to_error() {
            // Dropping the transport destroys the QP; until then a late
            // write could still land: say so.
            tracing::warn!(peer = %self.peer, "cannot move the RDMA queue pair to the error state: {e}");
        }
    }

    fn unexpected(&self, what: &str) -> TransportError {
        TransportError::Unexpected {
            peer: self.peer.clone(),
            what: what.into(),
        }
    }

    fn failed(&self) -> Result<(), TransportError> {
        if self.closed {
            return Err(TransportError::Closed {
                peer: self.peer.clone(),
            });
        }
        match &self.failure {
            None => Ok(()),
            Some(f) => Err(TransportError::Completion {
                peer: self.peer.clone(),
                op: f.op,
                status: f.status.clone(),
                vendor_err: f.vendor_err,
            }),
        }
    }

    /// Looks at the control connection without waiting: `Closed` when the
    /// peer closed it, `PeerAborted` on `Abort`; any other message is kept
    /// for the next [`Transport::recv_control`].
    fn check_control(&mut self) -> Result<(), TransportError> {
        if self.stashed.is_some() {
            return Ok(());
        }
        self.control
            .set_nonblocking(true)
            .map_err(io(&self.peer, "configure"))?;
        let mut b = [0u8; 1];
        let peeked = self.control.peek(&mut b);
        self.control
            .set_nonblocking(false)
            .map_err(io(&self.peer, "configure"))?;
        match peeked {
            Ok(0) => Err(TransportError::Closed {
                peer: self.peer.clone(),
            }),
            Ok(_) => {
                match read_frame(&mut self.control, &self.peer, self.timeout)? {
                    Frame::Control(Control::Abort { reason }) => Err(TransportError::PeerAborted {
                        peer: self.peer.clone(),
                        reason,
                    }),
                    Frame::Control(c) => {
                        self.stashed = Some(c);
                        Ok(())
                    }
                    other => Err(self
                        .unexpected(&format!("{} on the control connection", frame_name(&other)))),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(io(&self.peer, "read")(e)),
        }
    }

    /// Source: takes send completions until at most `keep` requests are in
    /// flight; times out after `timeout` without progress.
    fn reap(&mut self, keep: u64) -> Result<(), TransportError> {
        let mut wcs = zeroed_wcs();
        let mut deadline = Instant::now() + self.timeout;
        let mut next_check = Instant::now() + WAIT_SLICE;
        loop {
            self.failed()?;
            let Some(ring) = self.ring.as_mut() else {
                return Err(self.unexpected("send on a destination"));
            };
            if ring.posted - ring.done <= keep {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::Timeout {
                    peer: self.peer.clone(),
                    what: "RDMA send completions",
                    after: self.timeout,
                });
            }
            let n = self.verbs.poll(&mut wcs, WAIT_SLICE.min(deadline - now))?;
            let ring = self.ring.as_mut().ok_or(TransportError::Closed {
                peer: self.peer.clone(),
            })?;
            for wc in &wcs[..n] {
                let slot = usize::try_from(ring.done % ring.slots).unwrap_or(0);
                let op = ring.ops.get(slot).copied().unwrap_or("RDMA send");
                if wc.status != ib::ibv_wc_status::IBV_WC_SUCCESS {
                    let f = Failure {
                        op,
                        status: status_str(wc.status),
                        vendor_err: wc.vendor_err,
                    };
                    tracing::error!(peer = %self.peer, op, status = %f.status, "RDMA completion failed");
                    self.failure = Some(f);
                    break;
                }
                if wc.wr_id != ring.done {
                    self.failure = Some(Failure {
                        op,
                        status: format!(
                            "completion for request {} where {} was next",
                            wc.wr_id, ring.done
                        ),
                        vendor_err: 0,
                    });
                    break;
                }
                ring.done += 1;
            }
            if n > 0 {
                deadline = Instant::now() + self.timeout;
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + WAIT_SLICE;
                self.check_control()?;
            }
        }
    }

    /// Source: copies `data` into the next free slot and posts it.
    fn post(
        &mut self,
        op: &'static str,
        opcode: ib::ibv_wr_opcode::Type,
        data: &[u8],
        remote: Option<(u64, u32)>,
        imm: Option<u32>,
    ) -> Result<(), TransportError> {
        let slots = self.ring.as_ref().map_or(1, |r| r.slots);
        self.reap(slots - 1)?;
        let ring = self.ring.as_mut().ok_or(TransportError::Closed {
            peer: self.peer.clone(),
        })?;
        let wr_id = ring.posted;
        let slot = usize::try_from(wr_id % ring.slots).unwrap_or(0);
        let off = slot * ring.slot_bytes;
        if data.len() > ring.slot_bytes {
            return Err(self.unexpected("a piece larger than a staging slot"));
        }
        // Slot `slot` is free: reap left at most slots - 1 requests in
        // flight, and they hold the other slots.
        ring.buf.write_at(off, data)?;
        let dst = ring.buf.at(off);
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        ring.ops[slot] = op;
        let lkey = ring.lkey;
        match self
            .verbs
            .post_send(wr_id, opcode, (dst as u64, len, lkey), remote, imm)
        {
            Ok(()) => {
                ring.posted += 1;
                Ok(())
            }
            Err(e) => {
                // A run may be half posted: nothing later may go out.
                self.failure = Some(Failure {
                    op,
                    status: e.to_string(),
                    vendor_err: 0,
                });
                Err(e)
            }
        }
    }
}

impl PendingIncoming {
    /// Destination, for a source whose `Hello` had `bulk: 0`
    /// ([`wants_rdma`](Self::wants_rdma)): registers `ram` (which must be
    /// exactly the RAM size `Hello` announced) as one memory region,
    /// connects a queue pair to the source's (`RdmaConnect`), posts
    /// receives, answers `RdmaAccept` and starts the receiver thread. On
    /// failure the source is sent `Abort` with the reason.
    pub fn attach_rdma(
        self,
        ram: GuestRam,
        opts: &RdmaOptions,
    ) -> Result<RdmaTransport, TransportError> {
        if !self.wants_rdma() {
            return Err(TransportError::Unexpected {
                peer: self.peer().to_string(),
                what: "hello with TCP bulk connections (this destination uses RDMA)".into(),
            });
        }
        let (mut control, peer, timeout, session, ram_bytes) = self.into_control();
        match accept_rdma(&mut control, &peer, timeout, ram, ram_bytes, opts) {
            Ok((verbs, recv_buf, receiver)) => Ok(RdmaTransport {
                verbs,
                ring: None,
                _recv_buf: Some(recv_buf),
                receiver: Some(receiver),
                region: None,
                failure: None,
                control,
                stashed: None,
                peer,
                timeout,
                session,
                consumed: 0,
                closed: false,
            }),
            Err(e) => {
                // The source waits for rdma-accept: tell it why not.
                let reason = format!("destination cannot receive over RDMA: {e}");
                let _ = control.write_all(&proto::encode_control(&Control::Abort { reason }));
                Err(e)
            }
        }
    }
}

fn accept_rdma(
    control: &mut TcpStream,
    peer: &str,
    timeout: Duration,
    ram: GuestRam,
    ram_bytes: u64,
    opts: &RdmaOptions,
) -> Result<(Arc<Verbs>, Arc<DmaBuf>, Receiver), TransportError> {
    if ram.size() as u64 != ram_bytes {
        return Err(TransportError::Unexpected {
            peer: peer.into(),
            what: format!(
                "hello for {ram_bytes} bytes of RAM where this VM has {}",
                ram.size()
            ),
        });
    }
    opts.check()?;
    let depth = opts.recv_depth as usize;
    // Allocated before the verbs objects so that, on any early return, the
    // registration goes before the memory does.
    let recv_buf = Arc::new(DmaBuf::new(depth * RECV_SLOT)?);
    let mut verbs = Verbs::open(opts, 1, opts.recv_depth, true)?;
    // SAFETY: GuestRam::new's caller vouched that the range stays mapped
    // until the transport (which owns `verbs`) is dropped.
    let (_, rkey) = unsafe { verbs.register(ram.base.as_ptr(), ram.size(), true)? };
    // SAFETY: `recv_buf` is dropped after `verbs` (RdmaTransport's field
    // order; the receiver thread holds both and drops `verbs` first).
    let (lkey, _) = unsafe { verbs.register(recv_buf.as_mut_ptr(), recv_buf.len(), false)? };
    let remote = match read_frame(control, peer, timeout)? {
        Frame::Control(Control::RdmaConnect { qp }) => qp,
        Frame::Control(Control::Abort { reason }) => {
            return Err(TransportError::PeerAborted {
                peer: peer.into(),
                reason,
            });
        }
        other => {
            return Err(TransportError::Unexpected {
                peer: peer.into(),
                what: format!("{} instead of rdma-connect", frame_name(&other)),
            });
        }
    };
    remote.check().map_err(|e| TransportError::Unexpected {
        peer: peer.into(),
        what: format!("queue pair in rdma-connect: {e}"),
    })?;
    for i in 0..depth {
        verbs.post_recv(
            i as u64,
            recv_buf.at(i * RECV_SLOT) as u64,
            RECV_SLOT_LEN,
            lkey,
        )?;
    }
    verbs.connect(&remote, false)?;
    let region = RemoteRegion {
        addr: ram.base.as_ptr() as u64,
        len: ram_bytes,
        rkey,
    };
    let verbs = Arc::new(verbs);
    control
        .write_all(&proto::encode_control(&Control::RdmaAccept {
            qp: verbs.local,
            region,
        }))
        .map_err(io(peer, "write"))?;
    let shared = Arc::new(RecvShared::default());
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = RecvCtx {
        verbs: Arc::clone(&verbs),
        buf: Arc::clone(&recv_buf),
        lkey,
        ram,
        shared: Arc::clone(&shared),
        stop: Arc::clone(&stop),
    };
    let thread = std::thread::Builder::new()
        .name("migrate-rdma-rx".into())
        .spawn(move || ctx.run())
        .map_err(io(peer, "spawn receiver"))?;
    tracing::info!(
        peer,
        remote_qpn = remote.qpn,
        ?region,
        "RDMA receive path open"
    );
    Ok((
        verbs,
        recv_buf,
        Receiver {
            shared,
            stop,
            thread: Some(thread),
        },
    ))
}

/// What the destination's receiver thread owns.
struct RecvCtx {
    // Dropped in this order: verbs (deregisters) before buf.
    verbs: Arc<Verbs>,
    buf: Arc<DmaBuf>,
    lkey: u32,
    ram: GuestRam,
    shared: Arc<RecvShared>,
    stop: Arc<AtomicBool>,
}

impl RecvCtx {
    fn run(self) {
        let mut wcs = zeroed_wcs();
        let mut expected: u32 = 0;
        while !self.stop.load(Ordering::Acquire) {
            let n = match self.verbs.poll(&mut wcs, WAIT_SLICE) {
                Ok(n) => n,
                Err(e) => return self.fail(e.to_string().into()),
            };
            for wc in &wcs[..n] {
                if let Err(e) = self.handle(wc, expected) {
                    return self.fail(e);
                }
                expected = expected.wrapping_add(1);
                {
                    let mut l = self
                        .shared
                        .landed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    l.frames += 1;
                }
                self.shared.cv.notify_all();
                // `handle` checked that wr_id names one of our slots.
                let slot = usize::try_from(wc.wr_id).unwrap_or(0);
                let r = self.verbs.post_recv(
                    wc.wr_id,
                    self.buf.at(slot * RECV_SLOT) as u64,
                    RECV_SLOT_LEN,
                    self.lkey,
                );
                if let Err(e) = r {
                    return self.fail(e.to_string().into());
                }
            }
        }
    }

    /// One receive completion: a page run that landed (write with
    /// immediate) or a zero run to apply (send with immediate).
    fn handle(&self, wc: &ib::ibv_wc, expected: u32) -> Result<(), RecvFailure> {
        if wc.status != ib::ibv_wc_status::IBV_WC_SUCCESS {
            return Err(RecvFailure::Completion(Failure {
                op: "receive",
                status: status_str(wc.status),
                vendor_err: wc.vendor_err,
            }));
        }
        let slot = usize::try_from(wc.wr_id).unwrap_or(usize::MAX);
        if slot >= self.buf.len() / RECV_SLOT {
            return Err(format!("completion for unknown receive {}", wc.wr_id).into());
        }
        if wc.wc_flags & ib::ibv_wc_flags::IBV_WC_WITH_IMM.0 == 0 {
            return Err(RecvFailure::Other(
                "a frame without its frame number (no immediate data)".into(),
            ));
        }
        rdma_wire::check_imm(wc_imm(wc), expected)?;
        match wc.opcode {
            ib::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => Ok(()),
            ib::ibv_wc_opcode::IBV_WC_RECV => {
                if wc.byte_len as usize != rdma_wire::ZERO_MSG_LEN {
                    return Err(RecvFailure::Other(format!(
                        "zero-run message of {} bytes ({} expected)",
                        wc.byte_len,
                        rdma_wire::ZERO_MSG_LEN
                    )));
                }
                let mut m = [0u8; rdma_wire::ZERO_MSG_LEN];
                // The NIC finished writing the slot (this completion), and
                // it is reposted only after this copy.
                self.buf
                    .read_at(slot * RECV_SLOT, &mut m)
                    .map_err(|e| RecvFailure::Other(e.to_string()))?;
                let (gpa, pages) = rdma_wire::decode_zero(&m)?;
                let bytes = rdma_wire::check_zero_run(gpa, pages, self.ram.size() as u64)
                    .map_err(|e| format!("zero run refused: {e}"))?;
                Ok(self.ram.zero_checked(gpa, bytes)?)
            }
            other => Err(format!("unexpected completion opcode {other}").into()),
        }
    }

    fn fail(&self, e: RecvFailure) {
        tracing::error!(error = ?e, "RDMA receive failed");
        {
            let mut l = self
                .shared
                .landed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if l.error.is_none() {
                l.error = Some(e);
            }
        }
        self.shared.cv.notify_all();
    }
}

impl Transport for RdmaTransport {
    fn send_control(&mut self, msg: &Control) -> Result<(), TransportError> {
        if self.closed {
            return Err(TransportError::Closed {
                peer: self.peer.clone(),
            });
        }
        self.control
            .write_all(&proto::encode_control(msg))
            .map_err(io(&self.peer, "write"))
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.reap(0)
    }

    fn recv_control(&mut self) -> Result<Control, TransportError> {
        if let Some(c) = self.stashed.take() {
            return Ok(c);
        }
        if self.closed {
            return Err(TransportError::Closed {
                peer: self.peer.clone(),
            });
        }
        let c = match read_frame(&mut self.control, &self.peer, self.timeout)? {
            Frame::Control(c) => c,
            other => {
                return Err(
                    self.unexpected(&format!("{} on the control connection", frame_name(&other)))
                );
            }
        };
        // Destination: after `Complete` (every page is in) or `Abort`, no
        // RDMA write may touch guest RAM any more, since the guest may run.
        if matches!(c, Control::Complete | Control::Abort { .. }) {
            self.seal();
        }
        Ok(c)
    }

    fn wait_pages(&mut self, frames: u64) -> Result<(), TransportError> {
        let Some(r) = self.receiver.as_ref() else {
            return Err(self.unexpected("wait_pages on a source"));
        };
        if r.thread.is_none() {
            return Err(self.unexpected("page data after Complete or Abort"));
        }
        let shared = Arc::clone(&r.shared);
        if self.closed {
            return Err(TransportError::Closed {
                peer: self.peer.clone(),
            });
        }
        let want = self.consumed.saturating_add(frames);
        let deadline = Instant::now() + self.timeout;
        loop {
            {
                let l = shared.landed.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                let l = if l.error.is_none() && l.frames < want && now < deadline {
                    shared
                        .cv
                        .wait_timeout(l, WAIT_SLICE.min(deadline - now))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0)
                } else {
                    l
                };
                match &l.error {
                    None => {}
                    Some(RecvFailure::Completion(f)) => {
                        return Err(TransportError::Completion {
                            peer: self.peer.clone(),
                            op: f.op,
                            status: f.status.clone(),
                            vendor_err: f.vendor_err,
                        });
                    }
                    Some(RecvFailure::Other(e)) => {
                        return Err(self.unexpected(&format!("RDMA data ({e})")));
                    }
                }
                if l.frames > want {
                    return Err(self.unexpected(&format!(
                        "{} page frames where the round announced {want}",
                        l.frames
                    )));
                }
                if l.frames == want {
                    self.consumed = want;
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout {
                    peer: self.peer.clone(),
                    what: "page data",
                    after: self.timeout,
                });
            }
            // A source that closed or aborted sends no more frames.
            self.check_control()?;
        }
    }

    fn close(&mut self) {
        self.seal();
        let _ = self.control.shutdown(std::net::Shutdown::Both);
        self.closed = true;
    }
}

impl PageOut for RdmaTransport {
    fn send_run(&mut self, run: PageRun<'_>) -> Result<(), TransportError> {
        self.failed()?;
        let Some(region) = self.region else {
            return Err(self.unexpected("page run before open_data_path"));
        };
        let run_err = |source| TransportError::Run {
            peer: self.peer.clone(),
            source,
        };
        match run {
            PageRun::Data { gpa, data } => {
                rdma_wire::check_data_run(gpa, data.len() as u64, region.len).map_err(run_err)?;
                let slot = self.ring.as_ref().map_or(0, |r| r.slot_bytes);
                let seq = self.ring.as_ref().map_or(0, |r| r.seq);
                let pieces: Vec<_> = rdma_wire::chunks(data.len(), slot).collect();
                let last = pieces.len().saturating_sub(1);
                for (i, (off, len)) in pieces.into_iter().enumerate() {
                    // In range: gpa + data.len() <= region.len (checked), and
                    // region.addr + region.len does not overflow (checked at open).
                    let remote = region.addr + gpa + off as u64;
                    let piece = &data[off..off + len];
                    let r = if i == last {
                        self.post(
                            "RDMA write with immediate",
                            ib::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
                            piece,
                            Some((remote, region.rkey)),
                            Some(rdma_wire::imm_for(seq)),
                        )
                    } else {
                        self.post(
                            "RDMA write",
                            ib::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                            piece,
                            Some((remote, region.rkey)),
                            None,
                        )
                    };
                    if let Err(e) = r {
                        if i > 0 && self.failure.is_none() {
                            // Part of the run is out without its frame
                            // number: nothing later may follow it.
                            self.failure = Some(Failure {
                                op: "RDMA write",
                                status: format!("run at {gpa:#x} only partly sent: {e}"),
                                vendor_err: 0,
                            });
                        }
                        return Err(e);
                    }
                }
            }
            PageRun::Zero { gpa, pages } => {
                rdma_wire::check_zero_run(gpa, pages, region.len).map_err(run_err)?;
                let seq = self.ring.as_ref().map_or(0, |r| r.seq);
                self.post(
                    "send (zero run)",
                    ib::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
                    &rdma_wire::encode_zero(gpa, pages),
                    None,
                    Some(rdma_wire::imm_for(seq)),
                )?;
            }
        }
        if let Some(r) = self.ring.as_mut() {
            r.seq = r.seq.wrapping_add(1);
        }
        Ok(())
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_pass_their_check() {
        assert!(RdmaOptions::default().check().is_ok());
    }

    #[test]
    fn options_with_bad_sizes_are_refused() {
        let d = RdmaOptions::default();
        for bad in [
            RdmaOptions {
                port: 0,
                ..d.clone()
            },
            RdmaOptions {
                slots: 0,
                ..d.clone()
            },
            RdmaOptions {
                slots: 5000,
                ..d.clone()
            },
            RdmaOptions {
                slot_bytes: 0,
                ..d.clone()
            },
            RdmaOptions {
                slot_bytes: 1000,
                ..d.clone()
            },
            RdmaOptions {
                slot_bytes: 32 << 20,
                ..d.clone()
            },
            RdmaOptions {
                recv_depth: 0,
                ..d.clone()
            },
        ] {
            assert!(
                matches!(bad.check(), Err(TransportError::RdmaSetup { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn guest_ram_refuses_null_and_partial_pages() {
        let mut v = vec![0u8; 8192];
        // SAFETY: null is refused before anything is used.
        assert!(unsafe { GuestRam::new(std::ptr::null_mut(), 4096) }.is_err());
        // SAFETY: `v` outlives `r`, and nothing is registered.
        assert!(unsafe { GuestRam::new(v.as_mut_ptr(), 100) }.is_err());
        // SAFETY: as above.
        assert!(unsafe { GuestRam::new(v.as_mut_ptr(), 0) }.is_err());
        // SAFETY: as above.
        let r = unsafe { GuestRam::new(v.as_mut_ptr(), 8192) }.unwrap();
        assert_eq!(r.size(), 8192);
    }

    #[test]
    fn guest_ram_zeroes_inside_and_refuses_outside() {
        let mut v = vec![0xAAu8; 3 * 4096];
        {
            // SAFETY: `v` outlives `r`; only `zero_checked` writes through
            // it, and `v` is not touched while `r` is used.
            let r = unsafe { GuestRam::new(v.as_mut_ptr(), v.len()) }.unwrap();
            assert!(r.zero_checked(4096, 4096).is_ok());
            assert!(r.zero_checked(8192, 8192).is_err());
            assert!(r.zero_checked(u64::MAX - 10, 20).is_err());
        }
        assert!(v[..4096].iter().all(|&b| b == 0xAA));
        assert!(v[4096..8192].iter().all(|&b| b == 0));
        assert!(v[8192..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn status_strings_name_the_status() {
        assert_eq!(status_str(ib::ibv_wc_status::IBV_WC_SUCCESS), "success");
        assert!(
            status_str(ib::ibv_wc_status::IBV_WC_REM_ACCESS_ERR)
                .to_lowercase()
                .contains("remote access")
        );
    }

    #[test]
    fn hw_rdma_without_a_device_connect_says_so_before_connecting() {
        match list_devices() {
            Ok(d) if d.is_empty() => {
                // CI on an RDMA host sets PRESCIENT_REQUIRE=rdma: no device is a failure there.
                assert!(
                    !crate::testing::required("rdma"),
                    "RDMA required (PRESCIENT_REQUIRE) but no device found"
                );
                // Port 9 on loopback: nothing listens, and nothing is dialled,
                // since the device is opened first.
                let r = RdmaTransport::connect(
                    "127.0.0.1:9",
                    &RdmaOptions::default(),
                    Duration::from_secs(1),
                );
                assert!(matches!(r, Err(TransportError::NoRdmaDevice)), "{r:?}");
            }
            Ok(d) => {
                // With a device the data path is exercised by tests/hw_rdma_verbs.rs.
                let r = RdmaTransport::connect(
                    "127.0.0.1:9",
                    &RdmaOptions {
                        device: Some("no-such-device".into()),
                        ..RdmaOptions::default()
                    },
                    Duration::from_secs(1),
                );
                assert!(
                    matches!(&r, Err(TransportError::RdmaSetup { reason, .. }) if reason.contains(&d[0])),
                    "{r:?}"
                );
            }
            Err(e) => panic!("listing RDMA devices failed: {e}"),
        }
    }
}
