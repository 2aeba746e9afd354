//! The raw verbs calls of the RDMA transport: the device list, an opened
//! device with its PD, completion channel, CQ, one RC queue pair and memory
//! regions (`Verbs`), and page-aligned buffers the NIC reads and writes
//! (`DmaBuf`). Every unsafe block of the transport's verbs use is here, one
//! operation per block with the reason it is sound; `verbs.rs` builds the
//! protocol on these safe(ly wrapped) pieces.

use std::alloc::Layout;
use std::ffi::CStr;
use std::ptr::NonNull;
use std::time::Duration;

use rdma_sys as ib;

use super::RdmaOptions;
use crate::TransportError;
use crate::rdma_wire::{self, QpEndpoint};
use crate::tcp::session_id;

/// Linux's ENOSYS: the verbs library found no kernel RDMA support.
const ENOSYS: i32 = 38;
/// `IBV_LINK_LAYER_ETHERNET` (an anonymous enum rdma-sys does not bind).
const LINK_LAYER_ETHERNET: u8 = 2;
/// Completions taken from the CQ per poll.
pub(super) const POLL_BATCH: usize = 32;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The device list from `ibv_get_device_list`, freed on drop.
pub(super) struct DeviceList {
    list: *mut *mut ib::ibv_device,
    count: usize,
}

impl DeviceList {
    pub(super) fn get() -> Result<Self, TransportError> {
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

    pub(super) fn names(&self) -> Vec<String> {
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

/// Page-aligned heap memory registered with the NIC (staging ring, receive
/// buffers). Accessed through raw pointers only: the NIC writes it too.
pub(super) struct DmaBuf {
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
    pub(super) fn new(len: usize) -> Result<Self, TransportError> {
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

    pub(super) fn len(&self) -> usize {
        self.layout.size()
    }

    /// The buffer's start, for registration.
    pub(super) fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies `data` to byte `off`. The caller makes sure that the NIC does
    /// not use that range now (no request in flight names it).
    pub(super) fn write_at(&self, off: usize, data: &[u8]) -> Result<(), TransportError> {
        if off
            .checked_add(data.len())
            .is_none_or(|end| end > self.len())
        {
            return Err(setup(
                "-",
                format!(
                    "{} bytes at {off} past a buffer of {}",
                    data.len(),
                    self.len()
                ),
            ));
        }
        // SAFETY: off + data.len() <= len (checked above), so the range is
        // inside this allocation; `data` is a Rust slice, which cannot
        // overlap memory only reachable through this raw pointer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.at(off), data.len()) };
        Ok(())
    }

    /// Copies `out.len()` bytes from byte `off` (after the NIC's write to
    /// them completed).
    pub(super) fn read_at(&self, off: usize, out: &mut [u8]) -> Result<(), TransportError> {
        if off
            .checked_add(out.len())
            .is_none_or(|end| end > self.len())
        {
            return Err(setup(
                "-",
                format!(
                    "{} bytes at {off} past a buffer of {}",
                    out.len(),
                    self.len()
                ),
            ));
        }
        // SAFETY: off + out.len() <= len (checked above), so the range is
        // inside this allocation; `out` is a separate Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(self.at(off), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Address of byte `off`, which the caller keeps below `len()`.
    pub(super) fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(off <= self.len());
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
pub(super) struct Verbs {
    pub(super) device: String,
    ctx: *mut ib::ibv_context,
    pd: *mut ib::ibv_pd,
    channel: *mut ib::ibv_comp_channel,
    cq: *mut ib::ibv_cq,
    qp: *mut ib::ibv_qp,
    mrs: Vec<*mut ib::ibv_mr>,
    port: u8,
    gid_index: u8,
    ethernet: bool,
    pub(super) local: QpEndpoint,
}

// SAFETY: libibverbs objects may be used from any thread (the library is
// thread safe); each `Verbs` has one poster of sends (the source transport)
// or one poster of receives and poller (the destination's receiver thread).
unsafe impl Send for Verbs {}
// SAFETY: as for Send: concurrent calls on these objects are allowed by
// libibverbs, and this crate never polls one CQ from two threads.
unsafe impl Sync for Verbs {}

pub(super) fn status_str(status: ib::ibv_wc_status::Type) -> String {
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

pub(super) fn setup(device: &str, reason: impl Into<String>) -> TransportError {
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
    pub(super) fn open(
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
    pub(super) fn to_error(&self) -> Result<(), TransportError> {
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
    pub(super) fn connect(&self, remote: &QpEndpoint, rts: bool) -> Result<(), TransportError> {
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
    pub(super) unsafe fn register(
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
    pub(super) fn post_send(
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
    pub(super) fn post_recv(
        &self,
        wr_id: u64,
        addr: u64,
        len: u32,
        lkey: u32,
    ) -> Result<(), TransportError> {
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
    pub(super) fn poll(
        &self,
        wcs: &mut [ib::ibv_wc],
        wait: Duration,
    ) -> Result<usize, TransportError> {
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

pub(super) fn zeroed_wcs() -> [ib::ibv_wc; POLL_BATCH] {
    // SAFETY: ibv_wc is integers and a union of two u32s; all zero is valid.
    unsafe { std::mem::zeroed() }
}

pub(super) fn wc_imm(wc: &ib::ibv_wc) -> u32 {
    // SAFETY: both union members are u32, so any bit pattern reads as one.
    unsafe { wc.imm_data_invalidated_rkey_union.imm_data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_buffer_is_page_aligned_zeroed_and_bounds_checked() {
        let b = DmaBuf::new(3 * 4096).unwrap();
        assert_eq!(b.as_mut_ptr() as usize % 4096, 0);
        let mut out = [0xFFu8; 16];
        b.read_at(3 * 4096 - 16, &mut out).unwrap();
        assert_eq!(out, [0u8; 16]);
        b.write_at(4096, &[7u8; 16]).unwrap();
        b.read_at(4096, &mut out).unwrap();
        assert_eq!(out, [7u8; 16]);
        assert!(b.write_at(3 * 4096 - 15, &[1u8; 16]).is_err());
        assert!(b.read_at(usize::MAX - 4, &mut out).is_err());
        assert!(b.write_at(3 * 4096, &[]).is_ok());
    }
}
