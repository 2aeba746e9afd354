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
//! The raw verbs calls live in the private `Verbs` type below; each unsafe
//! block holds one operation and says why it is sound.

use std::alloc::Layout;
use std::ffi::CStr;
use std::io::Write;
use std::net::TcpStream;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdma_sys as ib;

use crate::proto::{self, Control, Frame, PAGE_SIZE, PageRun};
use crate::rdma_wire::{self, QpEndpoint, RemoteRegion};
use crate::tcp::{connect_control, frame_name, io, read_frame, session_id};
use crate::{PendingIncoming, Transport, TransportError};

/// Names of the RDMA devices on this host (e.g. `mlx5_0`, `rxe0`).
pub fn list_devices() -> Result<Vec<String>, TransportError> {
    let list = DeviceList::get()?;
    Ok(list.names())
}

/// Linux's ENOSYS: the verbs library found no kernel RDMA support.
const ENOSYS: i32 = 38;
/// `IBV_LINK_LAYER_ETHERNET` (an anonymous enum rdma-sys does not bind).
const LINK_LAYER_ETHERNET: u8 = 2;
/// Bytes per receive buffer on the destination (a zero-run message is 16;
/// a longer SEND shows as a wrong byte count, not as a buffer overrun).
const RECV_SLOT: usize = 64;
/// [`RECV_SLOT`] as a verbs length.
const RECV_SLOT_LEN: u32 = 64;
/// Longest single wait on the completion channel, so that a closed control
/// connection or a stop request is noticed within this time.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// Completions taken from the CQ per poll.
const POLL_BATCH: usize = 32;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The device list from `ibv_get_device_list`, freed on drop.
struct DeviceList {
    list: *mut *mut ib::ibv_device,
    count: usize,
}

impl DeviceList {
    fn get() -> Result<Self, TransportError> {
        let mut n: i32 = 0;
        // SAFETY: `n` is a valid out-pointer for the device count; the list
        // the call returns is freed once, in Drop.
        let list = unsafe { ib::ibv_get_device_list(&mut n) };
        if list.is_null() {
            let errno = errno();
            // ENOSYS: the verbs library found no kernel support at all.
            return if errno == ENOSYS || errno == 0 {
                Ok(DeviceList { list, count: 0 })
            } else {
                Err(TransportError::Rdma {
                    op: "ibv_get_device_list",
                    errno,
                })
            };
        }
        Ok(DeviceList {
            list,
            count: usize::try_from(n).unwrap_or(0),
        })
    }

    /// The live devices with their names.
    fn devices(&self) -> Vec<(*mut ib::ibv_device, String)> {
        let mut out = Vec::with_capacity(self.count);
        for i in 0..self.count {
            // SAFETY: `list` holds `count` device pointers (ibv_get_device_list's
            // contract), so offset `i < count` stays inside the array.
            let slot = unsafe { self.list.add(i) };
            // SAFETY: `slot` points at element `i` of the live array (above).
            let dev = unsafe { *slot };
            if dev.is_null() {
                continue;
            }
            // SAFETY: `dev` is a live device from the list, not yet freed.
            let name = unsafe { ib::ibv_get_device_name(dev) };
            if name.is_null() {
                continue;
            }
            // SAFETY: ibv_get_device_name returns a NUL-terminated string
            // owned by the device, valid until the list is freed (in Drop,
            // after this copy).
            let s = unsafe { CStr::from_ptr(name) };
            out.push((dev, s.to_string_lossy().into_owned()));
        }
        out
    }

    fn names(&self) -> Vec<String> {
        self.devices().into_iter().map(|(_, n)| n).collect()
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        if !self.list.is_null() {
            // SAFETY: `list` came from ibv_get_device_list and is freed once;
            // contexts opened from it stay valid (libibverbs' contract).
            unsafe { ib::ibv_free_device_list(self.list) };
        }
    }
}

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

/// Page-aligned heap memory registered with the NIC (staging ring, receive
/// buffers). Accessed through raw pointers only: the NIC writes it too.
struct DmaBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: DmaBuf owns its allocation; the raw pointer is only used by the
// transport that owns it (source) or by the receiver thread (destination).
unsafe impl Send for DmaBuf {}
// SAFETY: shared use reads the pointer; the memory is accessed through raw
// pointers by one thread at a time (see Send).
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    fn new(len: usize) -> Result<Self, TransportError> {
        let layout =
            Layout::from_size_align(len.max(1), 4096).map_err(|e| TransportError::RdmaSetup {
                device: "-".into(),
                reason: format!("buffer of {len} bytes: {e}"),
            })?;
        // SAFETY: the layout has a non-zero size (len.max(1)).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or_else(|| TransportError::RdmaSetup {
            device: "-".into(),
            reason: format!("cannot allocate {len} bytes of buffer"),
        })?;
        Ok(DmaBuf { ptr, layout })
    }

    fn len(&self) -> usize {
        self.layout.size()
    }

    /// Address of byte `off`, which the caller keeps below `len()`.
    fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(off < self.len());
        self.ptr.as_ptr().wrapping_add(off)
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from alloc_zeroed with this layout and is freed
        // once; its memory region was deregistered before (the transport
        // drops its `Verbs` first, see RdmaTransport's field order).
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// One opened device with a PD, a CQ on a completion channel, one RC QP and
/// its memory regions. Dropped in reverse order of creation.
struct Verbs {
    device: String,
    ctx: *mut ib::ibv_context,
    pd: *mut ib::ibv_pd,
    channel: *mut ib::ibv_comp_channel,
    cq: *mut ib::ibv_cq,
    qp: *mut ib::ibv_qp,
    mrs: Vec<*mut ib::ibv_mr>,
    port: u8,
    gid_index: u8,
    ethernet: bool,
    local: QpEndpoint,
}

// SAFETY: libibverbs objects may be used from any thread (the library is
// thread safe); each `Verbs` has one poster of sends (the source transport)
// or one poster of receives and poller (the destination's receiver thread).
unsafe impl Send for Verbs {}
// SAFETY: as for Send: concurrent calls on these objects are allowed by
// libibverbs, and this crate never polls one CQ from two threads.
unsafe impl Sync for Verbs {}

fn status_str(status: ib::ibv_wc_status::Type) -> String {
    // SAFETY: ibv_wc_status_str takes any status value and returns a
    // pointer to a static string ("unknown" for values it does not know).
    let s = unsafe { ib::ibv_wc_status_str(status) };
    if s.is_null() {
        return format!("status {status}");
    }
    // SAFETY: `s` is a static NUL-terminated string (above).
    let c = unsafe { CStr::from_ptr(s) };
    c.to_string_lossy().into_owned()
}

fn setup(device: &str, reason: impl Into<String>) -> TransportError {
    TransportError::RdmaSetup {
        device: device.into(),
        reason: reason.into(),
    }
}

fn verb_failed(op: &'static str, ret: i32) -> TransportError {
    // Verbs return a positive errno, or -1 with errno set.
    let errno = if ret > 0 { ret } else { errno() };
    TransportError::Rdma { op, errno }
}

impl Verbs {
    /// Opens the device, its PD, a CQ and an RC QP in INIT (remote writes
    /// allowed when `remote_write`), with room for `send_wr` sends and
    /// `recv_wr` receives.
    fn open(
        opts: &RdmaOptions,
        send_wr: u32,
        recv_wr: u32,
        remote_write: bool,
    ) -> Result<Self, TransportError> {
        let list = DeviceList::get()?;
        let devices = list.devices();
        if devices.is_empty() {
            return Err(TransportError::NoRdmaDevice);
        }
        let (dev, name) = match &opts.device {
            None => devices[0].clone(),
            Some(want) => devices
                .iter()
                .find(|(_, n)| n == want)
                .cloned()
                .ok_or_else(|| {
                    setup(
                        want,
                        format!(
                            "no such device (this host has {:?})",
                            devices.iter().map(|(_, n)| n).collect::<Vec<_>>()
                        ),
                    )
                })?,
        };
        // SAFETY: `dev` is a live device of `list`, which is still alive
        // here; the context stays valid after the list is freed (below), as
        // libibverbs documents.
        let ctx = unsafe { ib::ibv_open_device(dev) };
        drop(list);
        if ctx.is_null() {
            return Err(verb_failed("ibv_open_device", -1));
        }
        let mut v = Verbs {
            device: name,
            ctx,
            pd: std::ptr::null_mut(),
            channel: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            qp: std::ptr::null_mut(),
            mrs: Vec::new(),
            port: opts.port,
            gid_index: 0,
            ethernet: false,
            local: QpEndpoint {
                lid: 0,
                qpn: 0,
                psn: 0,
                gid: [0; 16],
                mtu: 1,
            },
        };
        // From here on `v`'s Drop frees whatever exists if a step fails.
        let port = v.query_port()?;
        if port.state != ib::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(setup(
                &v.device,
                format!("port {} is not active (state {})", opts.port, port.state),
            ));
        }
        v.ethernet = port.link_layer == LINK_LAYER_ETHERNET;
        let (gid_index, gid) = v.pick_gid(opts.gid_index, port.gid_tbl_len)?;
        if v.ethernet && gid == [0; 16] {
            return Err(setup(
                &v.device,
                format!(
                    "RoCE port {} has no GID (is an IP address configured on its network interface?)",
                    opts.port
                ),
            ));
        }
        v.gid_index = gid_index;
        let caps = v.query_device()?;
        let max_wr = u32::try_from(caps.max_qp_wr).unwrap_or(0);
        let max_cqe = u32::try_from(caps.max_cqe).unwrap_or(0);
        let send_wr = send_wr.max(1);
        let recv_wr = recv_wr.max(1);
        if send_wr > max_wr || recv_wr > max_wr || send_wr + recv_wr > max_cqe {
            return Err(setup(
                &v.device,
                format!(
                    "{send_wr} sends and {recv_wr} receives do not fit (device: {max_wr} work requests per queue, {max_cqe} CQ entries); use fewer slots or a smaller receive depth"
                ),
            ));
        }
        // SAFETY: `ctx` is the open context above.
        v.pd = unsafe { ib::ibv_alloc_pd(v.ctx) };
        if v.pd.is_null() {
            return Err(verb_failed("ibv_alloc_pd", -1));
        }
        // SAFETY: `ctx` is the open context above.
        v.channel = unsafe { ib::ibv_create_comp_channel(v.ctx) };
        if v.channel.is_null() {
            return Err(verb_failed("ibv_create_comp_channel", -1));
        }
        let cqe = i32::try_from(send_wr + recv_wr).unwrap_or(i32::MAX);
        // SAFETY: `ctx` and `channel` are live (above); no CQ context
        // pointer is used; completion vector 0 always exists.
        v.cq = unsafe { ib::ibv_create_cq(v.ctx, cqe, std::ptr::null_mut(), v.channel, 0) };
        if v.cq.is_null() {
            return Err(verb_failed("ibv_create_cq", -1));
        }
        // SAFETY: ibv_qp_init_attr is pointers and integers; all zero is a
        // valid value (null SRQ and context, zero caps), filled in below.
        let mut init: ib::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = v.cq;
        init.recv_cq = v.cq;
        init.qp_type = ib::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = send_wr;
        init.cap.max_recv_wr = recv_wr;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: `pd` and `cq` are live (above); `init` is a filled
        // ibv_qp_init_attr that the call reads (and updates with the caps).
        v.qp = unsafe { ib::ibv_create_qp(v.pd, &mut init) };
        if v.qp.is_null() {
            return Err(verb_failed("ibv_create_qp", -1));
        }
        // SAFETY: `qp` is the live QP just created; qp_num is set by the
        // provider on creation and never changes.
        let qpn = unsafe { (*v.qp).qp_num };
        v.local = QpEndpoint {
            lid: port.lid,
            qpn,
            psn: first_psn(),
            gid,
            mtu: u8::try_from(port.active_mtu).unwrap_or(1).clamp(1, 5),
        };
        v.to_init(remote_write)?;
        tracing::info!(
            device = %v.device,
            port = v.port,
            gid_index = v.gid_index,
            ethernet = v.ethernet,
            qpn,
            "RDMA queue pair created"
        );
        Ok(v)
    }

    fn query_port(&self) -> Result<ib::ibv_port_attr, TransportError> {
        // SAFETY: ibv_port_attr is integers only; all zero is valid.
        let mut attr: ib::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `attr` is a writable ibv_port_attr of the
        // size the call is given.
        let r = unsafe { ib::___ibv_query_port(self.ctx, self.port, &mut attr) };
        if r != 0 {
            return Err(setup(
                &self.device,
                format!(
                    "cannot query port {} (errno {})",
                    self.port,
                    if r > 0 { r } else { errno() }
                ),
            ));
        }
        Ok(attr)
    }

    fn query_device(&self) -> Result<ib::ibv_device_attr, TransportError> {
        // SAFETY: ibv_device_attr is integers and a byte array; all zero is valid.
        let mut attr: ib::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `attr` is a writable ibv_device_attr.
        let r = unsafe { ib::ibv_query_device(self.ctx, &mut attr) };
        if r != 0 {
            return Err(verb_failed("ibv_query_device", r));
        }
        Ok(attr)
    }

    fn gid(&self, index: u8) -> Result<[u8; 16], TransportError> {
        let mut gid = ib::ibv_gid { raw: [0; 16] };
        // SAFETY: `ctx` is open; `gid` is a writable ibv_gid.
        let r = unsafe { ib::ibv_query_gid(self.ctx, self.port, i32::from(index), &mut gid) };
        if r != 0 {
            return Err(setup(
                &self.device,
                format!("cannot read GID {index} of port {}", self.port),
            ));
        }
        // SAFETY: every bit pattern is a valid [u8; 16]; `raw` covers the union.
        Ok(unsafe { gid.raw })
    }

    fn pick_gid(&self, want: Option<u8>, table: i32) -> Result<(u8, [u8; 16]), TransportError> {
        if let Some(i) = want {
            if i32::from(i) >= table {
                return Err(setup(
                    &self.device,
                    format!("GID index {i} past the table of {table}"),
                ));
            }
            return Ok((i, self.gid(i)?));
        }
        let last = u8::try_from(table.clamp(0, 255)).unwrap_or(u8::MAX);
        for i in 0..last {
            // Unused entries read as zero (or fail on some providers).
            if let Ok(g) = self.gid(i)
                && g != [0; 16]
            {
                return Ok((i, g));
            }
        }
        // InfiniBand works by LID alone; RoCE needs a GID.
        Ok((0, [0; 16]))
    }

    fn modify(
        &self,
        attr: &mut ib::ibv_qp_attr,
        mask: ib::ibv_qp_attr_mask,
        what: &'static str,
    ) -> Result<(), TransportError> {
        let mask = i32::try_from(mask.0).unwrap_or(i32::MAX);
        // SAFETY: `qp` is live; `attr` is a filled ibv_qp_attr for the
        // fields `mask` names.
        let r = unsafe { ib::ibv_modify_qp(self.qp, attr, mask) };
        if r != 0 {
            return Err(verb_failed(what, r));
        }
        Ok(())
    }

    fn to_init(&self, remote_write: bool) -> Result<(), TransportError> {
        use ib::ibv_qp_attr_mask as M;
        // SAFETY: ibv_qp_attr is integers and plain structs; all zero is valid.
        let mut a: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ib::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = self.port;
        a.qp_access_flags = if remote_write {
            (ib::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                | ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE)
                .0
        } else {
            ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
        };
        self.modify(
            &mut a,
            M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )
    }

    /// Moves the QP to the error state: the NIC accepts no more requests on it.
    fn to_error(&self) -> Result<(), TransportError> {
        // SAFETY: ibv_qp_attr is integers and plain structs; all zero is valid.
        let mut a: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ib::ibv_qp_state::IBV_QPS_ERR;
        self.modify(
            &mut a,
            ib::ibv_qp_attr_mask::IBV_QP_STATE,
            "ibv_modify_qp(ERR)",
        )
    }

    /// Connects the QP to `remote` (checked by the caller): RTR, then RTS
    /// when this side sends.
    fn connect(&self, remote: &QpEndpoint, rts: bool) -> Result<(), TransportError> {
        use ib::ibv_qp_attr_mask as M;
        // SAFETY: ibv_qp_attr is integers and plain structs; all zero is valid.
        let mut a: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ib::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = u32::from(rdma_wire::path_mtu(self.local.mtu, remote.mtu));
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 1;
        // 0.64 ms before the peer retries a send that found no receive.
        a.min_rnr_timer = 12;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = self.port;
        if remote.needs_grh(self.ethernet) {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = ib::ibv_gid { raw: remote.gid };
            a.ah_attr.grh.sgid_index = self.gid_index;
            a.ah_attr.grh.hop_limit = 64;
            a.ah_attr.grh.traffic_class = 0;
            a.ah_attr.grh.flow_label = 0;
        }
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;
        if !rts {
            return Ok(());
        }
        // SAFETY: as above.
        let mut a: ib::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ib::ibv_qp_state::IBV_QPS_RTS;
        // 4.096 us * 2^14 = 67 ms per transport retry, 7 retries.
        a.timeout = 14;
        a.retry_cnt = 7;
        // 7: retry receiver-not-ready without limit; the destination's
        // receiver thread reposts continuously, and flush has a timeout.
        a.rnr_retry = 7;
        a.sq_psn = self.local.psn;
        a.max_rd_atomic = 1;
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )
    }

    /// Registers `len` bytes at `addr`; returns (lkey, rkey).
    ///
    /// # Safety
    ///
    /// `addr..addr + len` must be mapped and stay mapped until `self` is
    /// dropped (which deregisters it).
    unsafe fn register(
        &mut self,
        addr: *mut u8,
        len: usize,
        remote_write: bool,
    ) -> Result<(u32, u32), TransportError> {
        let mut access = ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote_write {
            access |= ib::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        }
        let access = i32::try_from(access.0).unwrap_or(0);
        // SAFETY: `pd` is live; the caller vouches that the range stays
        // mapped for as long as the registration (deregistered in Drop).
        let mr = unsafe { ib::ibv_reg_mr(self.pd, addr.cast(), len, access) };
        if mr.is_null() {
            let e = errno();
            return Err(setup(
                &self.device,
                format!(
                    "cannot register {len} bytes of memory (errno {e}; is RLIMIT_MEMLOCK high enough?)"
                ),
            ));
        }
        self.mrs.push(mr);
        // SAFETY: `mr` is the live region just registered; lkey and rkey
        // are set on registration and never change.
        let mr = unsafe { &*mr };
        Ok((mr.lkey, mr.rkey))
    }

    /// Posts one signalled send work request of `len` bytes at `local`.
    fn post_send(
        &self,
        wr_id: u64,
        opcode: ib::ibv_wr_opcode::Type,
        sge: (u64, u32, u32),
        remote: Option<(u64, u32)>,
        imm: Option<u32>,
    ) -> Result<(), TransportError> {
        let mut sg = ib::ibv_sge {
            addr: sge.0,
            length: sge.1,
            lkey: sge.2,
        };
        // SAFETY: ibv_send_wr is integers, pointers and unions of those; all
        // zero is a valid value (null next, no SGEs), filled in below.
        let mut wr: ib::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.next = std::ptr::null_mut();
        wr.sg_list = &mut sg;
        wr.num_sge = 1;
        wr.opcode = opcode;
        wr.send_flags = ib::ibv_send_flags::IBV_SEND_SIGNALED.0;
        if let Some(imm) = imm {
            wr.imm_data_invalidated_rkey_union =
                ib::imm_data_invalidated_rkey_union_t { imm_data: imm };
        }
        if let Some((remote_addr, rkey)) = remote {
            wr.wr = ib::wr_t {
                rdma: ib::rdma_t { remote_addr, rkey },
            };
        }
        let mut bad: *mut ib::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: `qp` is live and in RTS; `wr` is one complete work request
        // whose SGE names registered memory (the caller's staging slot,
        // lkey of its MR) that is not reused before the completion; the
        // provider copies the request before returning.
        let r = unsafe { ib::ibv_post_send(self.qp, &mut wr, &mut bad) };
        if r != 0 {
            return Err(verb_failed("ibv_post_send", r));
        }
        Ok(())
    }

    /// Posts one receive of `len` bytes at `addr` (registered, `lkey`).
    fn post_recv(&self, wr_id: u64, addr: u64, len: u32, lkey: u32) -> Result<(), TransportError> {
        let mut sg = ib::ibv_sge {
            addr,
            length: len,
            lkey,
        };
        let mut wr = ib::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sg,
            num_sge: 1,
        };
        let mut bad: *mut ib::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: `qp` is live; `wr` is one complete receive request whose
        // SGE names a registered receive slot that is not reposted before
        // its completion; the provider copies the request before returning.
        let r = unsafe { ib::ibv_post_recv(self.qp, &mut wr, &mut bad) };
        if r != 0 {
            return Err(verb_failed("ibv_post_recv", r));
        }
        Ok(())
    }

    /// Takes up to `wcs.len()` completions. When there are none, arms the
    /// CQ and waits at most `wait` for its event; returns 0 then.
    fn poll(&self, wcs: &mut [ib::ibv_wc], wait: Duration) -> Result<usize, TransportError> {
        let n = self.poll_once(wcs)?;
        if n > 0 {
            return Ok(n);
        }
        // SAFETY: `cq` is live and was created on `channel`.
        let r = unsafe { ib::ibv_req_notify_cq(self.cq, 0) };
        if r != 0 {
            return Err(verb_failed("ibv_req_notify_cq", r));
        }
        // A completion that came between the poll and the arming raises no
        // event: poll once more before sleeping.
        let n = self.poll_once(wcs)?;
        if n > 0 {
            return Ok(n);
        }
        // SAFETY: `channel` is live; its fd is set at creation and never changes.
        let fd = unsafe { (*self.channel).fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is one valid pollfd, and 1 is the array's length.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready > 0 {
            let mut ev_cq: *mut ib::ibv_cq = std::ptr::null_mut();
            let mut ev_ctx: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: `channel` is live and readable (poll said so), so the
            // call does not block; both out-pointers are valid.
            let r = unsafe { ib::ibv_get_cq_event(self.channel, &mut ev_cq, &mut ev_ctx) };
            if r == 0 {
                // SAFETY: `ev_cq` is our CQ (the only one on this channel);
                // every event is acknowledged, so ibv_destroy_cq will not wait.
                unsafe { ib::ibv_ack_cq_events(ev_cq, 1) };
            }
        } else if ready < 0 && errno() != libc::EINTR {
            return Err(verb_failed("poll(completion channel)", -1));
        }
        Ok(0)
    }

    fn poll_once(&self, wcs: &mut [ib::ibv_wc]) -> Result<usize, TransportError> {
        let max = i32::try_from(wcs.len()).unwrap_or(i32::MAX);
        // SAFETY: `cq` is live; `wcs` has room for `max` completions.
        let n = unsafe { ib::ibv_poll_cq(self.cq, max, wcs.as_mut_ptr()) };
        // ibv_poll_cq never returns more than asked; the min keeps slicing
        // by the result in bounds whatever a provider does.
        usize::try_from(n)
            .map(|n| n.min(wcs.len()))
            .map_err(|_| verb_failed("ibv_poll_cq", n))
    }
}

impl Drop for Verbs {
    fn drop(&mut self) {
        if !self.qp.is_null() {
            // SAFETY: `qp` is live and destroyed once; no thread posts to it
            // any more (the receiver thread is joined before the last Arc
            // of Verbs goes).
            let r = unsafe { ib::ibv_destroy_qp(self.qp) };
            if r != 0 {
                tracing::warn!(device = %self.device, r, "ibv_destroy_qp failed");
            }
        }
        for mr in self.mrs.drain(..) {
            // SAFETY: `mr` is a live region registered on this PD,
            // deregistered once, after the QP that could use it is gone.
            let r = unsafe { ib::ibv_dereg_mr(mr) };
            if r != 0 {
                tracing::warn!(device = %self.device, r, "ibv_dereg_mr failed");
            }
        }
        if !self.cq.is_null() {
            // SAFETY: `cq` is live, no QP uses it any more, and every CQ
            // event was acknowledged in `poll`.
            let r = unsafe { ib::ibv_destroy_cq(self.cq) };
            if r != 0 {
                tracing::warn!(device = %self.device, r, "ibv_destroy_cq failed");
            }
        }
        if !self.channel.is_null() {
            // SAFETY: `channel` is live and its only CQ is destroyed.
            let r = unsafe { ib::ibv_destroy_comp_channel(self.channel) };
            if r != 0 {
                tracing::warn!(device = %self.device, r, "ibv_destroy_comp_channel failed");
            }
        }
        if !self.pd.is_null() {
            // SAFETY: `pd` is live and nothing allocated on it remains.
            let r = unsafe { ib::ibv_dealloc_pd(self.pd) };
            if r != 0 {
                tracing::warn!(device = %self.device, r, "ibv_dealloc_pd failed");
            }
        }
        // SAFETY: `ctx` is the open context (never null once Verbs exists),
        // closed once, after everything created on it.
        let r = unsafe { ib::ibv_close_device(self.ctx) };
        if r != 0 {
            tracing::warn!(device = %self.device, r, "ibv_close_device failed");
        }
    }
}

fn first_psn() -> u32 {
    u32::try_from(session_id() & u64::from(rdma_wire::MAX_PSN)).unwrap_or(0)
}

fn zeroed_wcs() -> [ib::ibv_wc; POLL_BATCH] {
    // SAFETY: ibv_wc is integers and a union of two u32s; all zero is valid.
    unsafe { std::mem::zeroed() }
}

fn wc_imm(wc: &ib::ibv_wc) -> u32 {
    // SAFETY: both union members are u32, so any bit pattern reads as one.
    unsafe { wc.imm_data_invalidated_rkey_union.imm_data }
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
        let (lkey, _) = unsafe { verbs.register(buf.ptr.as_ptr(), buf.len(), false)? };
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
        let dst = ring.buf.at(off);
        // SAFETY: `dst..dst + data.len()` lies inside slot `slot` of the
        // staging buffer (data.len() <= slot_bytes, checked above), which no
        // request in flight uses (reap left at most slots - 1 in flight, and
        // they hold the other slots); `data` is a separate Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
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
    let (lkey, _) = unsafe { verbs.register(recv_buf.ptr.as_ptr(), recv_buf.len(), false)? };
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
                // SAFETY: slot < depth (checked above), so the slot's
                // RECV_SLOT (>= 16) bytes lie inside `buf`; the NIC finished
                // writing them (this completion), and nothing reposts the
                // slot before this copy; `m` is a separate local array.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.buf.at(slot * RECV_SLOT),
                        m.as_mut_ptr(),
                        m.len(),
                    );
                };
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
