//! Live migration of lab VMs: iterative pre-copy with the KVM dirty log on
//! the source ([`MigrationSource`], a [`RunObserver`] that migrates the VM it
//! watches), and the receiving side ([`receive`], then [`Incoming::run`]).
//!
//! The wire protocol and its sequence are documented in `rdma::proto`. The
//! source keeps its VM until the destination says `Running`; any failure
//! before that resumes the VM on the source. The destination discards its
//! VM on any failure before `Complete`.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma::{
    Control, PageRun, PageSink, PendingIncoming, TcpTransport, Transport, TransportError,
    VmDescriptor, proto,
};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vm::{
    LabDeviceState, LabVm, LabVmConfig, RunObserver, RunReport, VcpuControl, VcpuState,
};
use crate::workload::Workload;
use crate::{PAGE_SIZE, VmmError};

/// Pages read at once when scanning all of guest memory (1 MiB).
const SCAN_WINDOW_PAGES: u64 = 256;

/// A 4 KiB page in bytes, as a length.
const PAGE_BYTES: usize = 4096;

/// What went wrong in a migration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The channel failed.
    #[error("migration transport")]
    Transport(#[from] TransportError),
    /// KVM or the VM failed.
    #[error("VM")]
    Vm(#[from] VmmError),
    /// The peer refused or abandoned the migration.
    #[error("peer aborted the migration: {0}")]
    PeerAborted(String),
    /// The peer's messages do not follow the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The VM offered does not fit this host.
    #[error("incompatible VM: {0}")]
    Incompatible(String),
}

/// How the source migrates.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    /// Destination `HOST:PORT`.
    pub to: String,
    /// Bulk TCP connections for page data.
    pub streams: u32,
    /// Longest acceptable pause of the guest.
    pub downtime: Duration,
    /// Most pre-copy rounds before stopping the guest anyway.
    pub max_rounds: u32,
    /// How long after ready to start.
    pub after: Duration,
    /// Socket and pause timeout.
    pub timeout: Duration,
}

impl MigrationOptions {
    /// Defaults: 4 streams, 50 ms downtime target, 30 rounds, start at ready.
    pub fn new(to: impl Into<String>) -> Self {
        MigrationOptions {
            to: to.into(),
            streams: 4,
            downtime: Duration::from_millis(50),
            max_rounds: 30,
            after: Duration::ZERO,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The companion's order to migrate a running VM (see
/// [`MigrationSource::on_request`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationOrder {
    /// Destination `HOST:PORT` (a labvm waiting with `--incoming`).
    pub to: String,
    /// The downtime budget.
    pub downtime: Duration,
}

/// What a migration did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationReport {
    /// The destination, `HOST:PORT` (source only).
    pub to: String,
    /// Connect to `Running` (source) or to `Complete` (destination), ms.
    pub total_ms: f64,
    /// Guest paused to `Running` received, ms (source only).
    pub downtime_ms: f64,
    /// Guest paused to `Complete` sent (everything handed to the network),
    /// ms: what QEMU reports as downtime (source only).
    pub downtime_sent_ms: f64,
    /// Bytes of frames sent (source only).
    pub bytes: u64,
    /// Pages sent with data.
    pub pages: u64,
    /// Zero pages skipped (round 0) or sent as zero runs.
    pub zero_pages: u64,
    /// Rounds, the last (stop-and-copy) included.
    pub rounds: u32,
    /// Pages sent in each round.
    pub round_pages: Vec<u64>,
    /// Bandwidth measured in pre-copy, MB/s.
    pub bandwidth_mb_s: f64,
    /// The guest's counter at the switch-over (Dirty workloads).
    pub counter: Option<u64>,
    /// Heartbeats the source had seen when the migration ended.
    pub heartbeats_at_end: u64,
    /// Failure, if any (the VM then kept running on the source).
    pub error: Option<String>,
}

/// The VM configuration as it travels in `Hello`.
#[derive(Serialize, Deserialize)]
struct WireConfig {
    ram_mib: u64,
    vcpus: u32,
    workload: Workload,
    stamp: u64,
}

fn descriptor(config: &LabVmConfig) -> VmDescriptor {
    let wire = WireConfig {
        ram_mib: config.ram_mib,
        vcpus: config.vcpus,
        workload: config.workload.clone(),
        stamp: config.stamp,
    };
    VmDescriptor {
        ram_bytes: config.ram_mib << 20,
        vcpus: config.vcpus,
        workload: config.workload.name(),
        config: serde_json::to_string(&wire).unwrap_or_default(),
    }
}

/// A [`RunObserver`] that migrates the VM it watches once it is ready
/// (wrapping another observer, which still sees every callback).
pub struct MigrationSource<'a> {
    opts: MigrationOptions,
    /// Migrate only when `inner` hands over an order (the companion's),
    /// with `opts` as the template for everything the order leaves out.
    on_request: bool,
    inner: &'a mut dyn RunObserver,
    ready_seen: Option<Instant>,
    done: bool,
    /// The outcome, once the migration ran.
    pub report: Option<MigrationReport>,
}

impl std::fmt::Debug for MigrationSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationSource")
            .field("opts", &self.opts)
            .field("report", &self.report)
            .finish()
    }
}

impl<'a> MigrationSource<'a> {
    /// Migrates with `opts`, passing callbacks on to `inner`.
    pub fn new(opts: MigrationOptions, inner: &'a mut dyn RunObserver) -> Self {
        MigrationSource {
            opts,
            on_request: false,
            inner,
            ready_seen: None,
            done: false,
            report: None,
        }
    }
}

impl<'a> MigrationSource<'a> {
    /// Migrates whenever `inner` hands over an order
    /// ([`RunObserver::take_migration_order`], e.g. the companion's
    /// `migrate` reply), with `template`'s streams and timeouts. After a
    /// failed attempt the VM runs on here and a later order is obeyed.
    pub fn on_request(template: MigrationOptions, inner: &'a mut dyn RunObserver) -> Self {
        let mut s = MigrationSource::new(template, inner);
        s.on_request = true;
        s
    }

    /// Runs one migration with `self.opts`; true when the VM now runs on
    /// the destination (stop it here).
    fn run_migration(&mut self, vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        let to = self.opts.to.clone();
        self.inner
            .migration_phase(vmm_hooks::MigratePhase::Started, &to, None);
        let mut report = MigrationReport {
            to: to.clone(),
            ..MigrationReport::default()
        };
        let started = Instant::now();
        let result = migrate(vm, vcpus, &self.opts, &mut report);
        report.total_ms = started.elapsed().as_secs_f64() * 1e3;
        report.heartbeats_at_end = vcpus.heartbeats();
        let moved = match result {
            Ok(()) => {
                tracing::info!(
                    to = %to,
                    total_ms = report.total_ms,
                    downtime_ms = report.downtime_ms,
                    bytes = report.bytes,
                    "migrated; stopping the VM here"
                );
                true
            }
            Err(e) => {
                let msg = vmm_hooks::error_chain(&e);
                tracing::error!(to = %to, "migration failed, the VM keeps running here: {msg}");
                report.error = Some(msg);
                false
            }
        };
        let outcome = vmm_hooks::MigrateOutcome {
            total_ms: report.total_ms,
            downtime_ms: report.downtime_ms,
            bytes: report.bytes,
            error: report.error.clone(),
        };
        let phase = if moved {
            vmm_hooks::MigratePhase::Completed
        } else {
            vmm_hooks::MigratePhase::Aborted
        };
        self.inner.migration_phase(phase, &to, Some(outcome));
        self.report = Some(report);
        moved
    }
}

impl RunObserver for MigrationSource<'_> {
    fn before_boot(&mut self, vm: &LabVm, tids: &[i32]) -> vmm_hooks::BootPlan {
        self.inner.before_boot(vm, tids)
    }
    fn ready(&mut self, elapsed: Duration, report: &vmm_hooks::BootReport) {
        self.inner.ready(elapsed, report);
    }
    fn admission_wait(&self) -> Duration {
        self.inner.admission_wait()
    }
    fn should_stop(&mut self) -> bool {
        self.inner.should_stop()
    }
    fn tick(&mut self, vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        if self.inner.tick(vm, vcpus) {
            return true;
        }
        if self.done || !vcpus.ready() {
            return false;
        }
        if self.on_request {
            let Some(order) = self.inner.take_migration_order() else {
                return false;
            };
            tracing::info!(to = %order.to, downtime_ms = order.downtime.as_millis(), "the companion orders a live migration");
            self.opts.to = order.to;
            self.opts.downtime = order.downtime;
            // Done only when the VM moved: a failed attempt leaves it
            // running here, open to the next order.
            self.done = self.run_migration(vm, vcpus);
            return self.done;
        }
        let seen = *self.ready_seen.get_or_insert_with(Instant::now);
        if seen.elapsed() < self.opts.after {
            return false;
        }
        self.done = true;
        self.run_migration(vm, vcpus)
    }
    fn take_migration_order(&mut self) -> Option<MigrationOrder> {
        self.inner.take_migration_order()
    }
    fn migration_phase(
        &mut self,
        phase: vmm_hooks::MigratePhase,
        to: &str,
        outcome: Option<vmm_hooks::MigrateOutcome>,
    ) {
        self.inner.migration_phase(phase, to, outcome);
    }
}

fn expect(
    tr: &mut dyn Transport,
    what: &str,
    ok: impl Fn(&Control) -> bool,
) -> Result<(), MigrateError> {
    match tr.recv_control()? {
        c if ok(&c) => Ok(()),
        Control::Abort { reason } => Err(MigrateError::PeerAborted(reason)),
        other => Err(MigrateError::Protocol(format!(
            "expected {what}, got {other:?}"
        ))),
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.chunks_exact(8)
        .all(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) == 0)
}

/// Sends the pages `pages` yields (ascending page numbers) as runs; with
/// `skip_zero`, zero pages are left out, else sent as zero runs. Returns
/// frames sent.
fn send_pages(
    tr: &mut dyn Transport,
    mem: &GuestMemoryMmap,
    pages: impl Iterator<Item = u64>,
    scan: Option<&[u64]>,
    report: &mut MigrationReport,
) -> Result<(u64, u64), MigrateError> {
    let max = usize::try_from(proto::MAX_RUN_PAGES).unwrap_or(1);
    let page = PAGE_BYTES;
    let mut frames = 0u64;
    let mut bytes = 0u64;
    let mut sent_pages = 0u64;
    // Pending data run: first page and the bytes gathered.
    let mut run_start = 0u64;
    let mut buf: Vec<u8> = Vec::with_capacity(max * page);
    let mut zero_start = 0u64;
    let mut zeros = 0u64;
    let mut tmp = vec![0u8; page];
    // Full scans (round 0) read guest memory a window at a time.
    let mut win: Vec<u8> = Vec::new();
    let mut win_start = 0u64;
    let mut win_pages = 0u64;
    let mut zero_frames = 0u64;
    let read_err = |gpa: u64, e: vm_memory::GuestMemoryError| {
        VmmError::GuestMemory(format!("reading guest memory at {gpa:#x}: {e}"))
    };
    for p in pages {
        let data: &[u8] = if let Some(populated) = scan {
            if p < win_start || p >= win_start + win_pages {
                // The window covers populated pages only: reading an
                // unpopulated one would fault it in for nothing.
                let set = |q: u64| {
                    populated
                        .get(usize::try_from(q / 64).unwrap_or(usize::MAX))
                        .is_some_and(|w| w & (1 << (q % 64)) != 0)
                };
                win_pages = (1..SCAN_WINDOW_PAGES).take_while(|&k| set(p + k)).count() as u64 + 1;
                win.resize(usize::try_from(win_pages).unwrap_or(1) * page, 0);
                mem.read_slice(&mut win, GuestAddress(p * PAGE_SIZE))
                    .map_err(|e| read_err(p * PAGE_SIZE, e))?;
                win_start = p;
            }
            let off = usize::try_from(p - win_start).unwrap_or(0) * page;
            &win[off..off + page]
        } else {
            mem.read_slice(&mut tmp, GuestAddress(p * PAGE_SIZE))
                .map_err(|e| read_err(p * PAGE_SIZE, e))?;
            &tmp
        };
        if is_zero(data) {
            report.zero_pages += 1;
            if !buf.is_empty() {
                flush_data(tr, run_start, &mut buf, &mut frames, &mut bytes)?;
            }
            if scan.is_some() {
                continue;
            }
            if zeros > 0 && zero_start + zeros == p {
                zeros += 1;
            } else {
                if zeros > 0 {
                    tr.send_run(PageRun::Zero {
                        gpa: zero_start * PAGE_SIZE,
                        pages: zeros,
                    })?;
                    zero_frames += 1;
                }
                zero_start = p;
                zeros = 1;
            }
            continue;
        }
        if zeros > 0 {
            tr.send_run(PageRun::Zero {
                gpa: zero_start * PAGE_SIZE,
                pages: zeros,
            })?;
            zero_frames += 1;
            zeros = 0;
        }
        let contiguous = !buf.is_empty() && run_start + (buf.len() / page) as u64 == p;
        if !contiguous || buf.len() >= max * page {
            flush_data(tr, run_start, &mut buf, &mut frames, &mut bytes)?;
            run_start = p;
        }
        buf.extend_from_slice(data);
        sent_pages += 1;
    }
    flush_data(tr, run_start, &mut buf, &mut frames, &mut bytes)?;
    if zeros > 0 {
        tr.send_run(PageRun::Zero {
            gpa: zero_start * PAGE_SIZE,
            pages: zeros,
        })?;
        zero_frames += 1;
    }
    report.pages += sent_pages;
    report.round_pages.push(sent_pages);
    let total = frames + zero_frames;
    let total_bytes = bytes + zero_frames * (proto::HEADER_LEN as u64 + 16);
    report.bytes += total_bytes;
    Ok((total, total_bytes))
}

fn flush_data(
    tr: &mut dyn Transport,
    start: u64,
    buf: &mut Vec<u8>,
    frames: &mut u64,
    bytes: &mut u64,
) -> Result<(), MigrateError> {
    if !buf.is_empty() {
        tr.send_run(PageRun::Data {
            gpa: start * PAGE_SIZE,
            data: buf,
        })?;
        *frames += 1;
        *bytes += buf.len() as u64 + proto::HEADER_LEN as u64 + 8;
        buf.clear();
    }
    Ok(())
}

fn dirty_pages(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(w, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let b = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            Some(w as u64 * 64 + b)
        })
    })
}

fn round(tr: &mut dyn Transport, n: u32, frames: u64, last: bool) -> Result<(), MigrateError> {
    tr.flush()?;
    tr.send_control(&Control::RoundEnd {
        round: n,
        frames,
        last,
    })?;
    expect(
        tr,
        "round-ack",
        |c| matches!(c, Control::RoundAck { round } if *round == n),
    )
}

fn migrate(
    vm: &LabVm,
    vcpus: &VcpuControl<'_>,
    opts: &MigrationOptions,
    report: &mut MigrationReport,
) -> Result<(), MigrateError> {
    let mut tr = TcpTransport::connect(&opts.to, opts.timeout)?;
    let hello = Control::Hello {
        version: proto::PROTOCOL_VERSION,
        vm: descriptor(vm.config()),
        bulk: opts.streams.max(1),
        session: tr.session(),
    };
    tr.send_control(&hello)?;
    tr.open_bulk(opts.streams.max(1))?;
    expect(&mut tr, "accept", |c| matches!(c, Control::Accept))?;
    vm.set_dirty_logging(true)?;
    let result = precopy_and_switch(vm, vcpus, opts, &mut tr, report);
    if let Err(e) = vm.set_dirty_logging(false) {
        tracing::warn!("cannot stop dirty logging: {}", vmm_hooks::error_chain(&e));
    }
    if let Err(e) = &result {
        // Tell the destination, if it still listens; the VM stays here.
        let _ = tr.send_control(&Control::Abort {
            reason: vmm_hooks::error_chain(e),
        });
    }
    tr.close();
    result
}

fn precopy_and_switch(
    vm: &LabVm,
    vcpus: &VcpuControl<'_>,
    opts: &MigrationOptions,
    tr: &mut TcpTransport,
    report: &mut MigrationReport,
) -> Result<(), MigrateError> {
    let mem = vm.memory();
    let ram_pages = (vm.config().ram_mib << 20) / PAGE_SIZE;
    // Clear what was logged before this point: everything is sent in round 0.
    vm.take_dirty_log()?;
    let t = Instant::now();
    // Pages never populated read as zeros: skip them without faulting them in.
    let populated = match vm.populated_pages() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("cannot read /proc/self/pagemap ({e}); scanning every page");
            vec![u64::MAX; usize::try_from(ram_pages.div_ceil(64)).unwrap_or(0)]
        }
    };
    let untouched = ram_pages
        - populated
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>()
            .min(ram_pages);
    report.zero_pages += untouched;
    let (frames, bytes) = send_pages(
        tr,
        mem,
        dirty_pages(&populated).filter(|&p| p < ram_pages),
        Some(&populated),
        report,
    )?;
    round(tr, 0, frames, false)?;
    let mut bw = bytes as f64 / t.elapsed().as_secs_f64().max(1e-6);
    let mut n = 1u32;
    let mut pending = vm.take_dirty_log()?;
    let mut prev_dirty = u64::MAX;
    let target = opts.downtime.as_secs_f64();
    loop {
        let dirty: u64 = pending.iter().map(|w| u64::from(w.count_ones())).sum();
        let est = (dirty * (PAGE_SIZE + 32)) as f64 / bw;
        // Under the target, one more round still pays while it halves the
        // dirty set (the guest dirties less during a shorter round): the
        // pause then holds only what the guest dirties in one short round.
        let fits = est <= target && (dirty.saturating_mul(2) > prev_dirty || dirty == 0);
        if fits || n >= opts.max_rounds {
            tracing::info!(round = n, dirty, est_ms = est * 1e3, "stop-and-copy");
            break;
        }
        let t = Instant::now();
        let (frames, bytes) = send_pages(tr, mem, dirty_pages(&pending), None, report)?;
        round(tr, n, frames, false)?;
        if bytes > 1 << 20 {
            bw = bytes as f64 / t.elapsed().as_secs_f64().max(1e-6);
        }
        tracing::debug!(round = n, dirty, mb_s = bw / 1e6, "pre-copy round");
        n += 1;
        prev_dirty = dirty;
        pending = vm.take_dirty_log()?;
    }
    report.bandwidth_mb_s = bw / 1e6;

    // Stop-and-copy: the guest is paused from here until Running or failure.
    let paused = Instant::now();
    let outcome = stop_and_copy(
        vm,
        vcpus,
        tr,
        &mut pending,
        n,
        (paused, opts.timeout),
        report,
    );
    report.downtime_ms = paused.elapsed().as_secs_f64() * 1e3;
    report.rounds = n + 1;
    match outcome {
        Ok(()) => Ok(()),
        Err(e) => {
            vcpus.resume();
            Err(e)
        }
    }
}

fn stop_and_copy(
    vm: &LabVm,
    vcpus: &VcpuControl<'_>,
    tr: &mut TcpTransport,
    pending: &mut [u64],
    n: u32,
    (paused, timeout): (Instant, Duration),
    report: &mut MigrationReport,
) -> Result<(), MigrateError> {
    let states = vcpus.pause(timeout)?;
    let last = vm.take_dirty_log()?;
    for (p, l) in pending.iter_mut().zip(&last) {
        *p |= *l;
    }
    let (frames, _) = send_pages(tr, vm.memory(), dirty_pages(pending), None, report)?;
    round(tr, n, frames, true)?;
    for (i, s) in states.iter().enumerate() {
        let state = serde_json::to_string(s)
            .map_err(|e| MigrateError::Protocol(format!("encoding vCPU {i}: {e}")))?;
        tr.send_control(&Control::Vcpu {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            state,
        })?;
    }
    let dev = serde_json::to_string(&vcpus.device_state())
        .map_err(|e| MigrateError::Protocol(format!("encoding device state: {e}")))?;
    tr.send_control(&Control::Device { state: dev })?;
    tr.send_control(&Control::Complete)?;
    report.downtime_sent_ms = paused.elapsed().as_secs_f64() * 1e3;
    report.counter = counter(vm);
    expect(tr, "running", |c| matches!(c, Control::Running))
}

fn counter(vm: &LabVm) -> Option<u64> {
    match vm.config().workload {
        Workload::Dirty { .. } => vm
            .memory()
            .read_obj::<u64>(GuestAddress(vm.workload_area_start()))
            .ok(),
        _ => None,
    }
}

/// Guest memory as the transport's page sink; checks every range.
struct GuestSink {
    mem: Arc<GuestMemoryMmap>,
    ram: u64,
}

impl GuestSink {
    fn check(&self, gpa: u64, len: u64) -> Result<(), String> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.ram => Ok(()),
            _ => Err(format!(
                "{len} bytes at {gpa:#x} fall outside {} bytes of guest RAM",
                self.ram
            )),
        }
    }
}

impl PageSink for GuestSink {
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        self.check(gpa, data.len() as u64)?;
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| e.to_string())
    }
    fn zero(&self, gpa: u64, pages: u64) -> Result<(), String> {
        let len = pages.checked_mul(PAGE_SIZE).ok_or("zero run too long")?;
        self.check(gpa, len)?;
        let zero = [0u8; PAGE_BYTES];
        for i in 0..pages {
            self.mem
                .write_slice(&zero, GuestAddress(gpa + i * PAGE_SIZE))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// A migrated VM on the destination, ready to run.
#[derive(Debug)]
pub struct Incoming {
    /// The VM, with memory and registers loaded.
    pub vm: LabVm,
    transport: TcpTransport,
    /// What the reception did.
    pub report: MigrationReport,
}

/// Destination: accepts one migration on `listener`, builds the VM the
/// source describes and loads its memory and state. On failure the source
/// is told (`Abort`) and nothing is kept.
pub fn receive(listener: TcpListener, timeout: Duration) -> Result<Incoming, MigrateError> {
    let started = Instant::now();
    let (mut pending, hello) = PendingIncoming::accept(listener, timeout)?;
    let config = match check_hello(&hello) {
        Ok(c) => c,
        Err(e) => {
            let _ = pending.send_control(&Control::Abort {
                reason: e.to_string(),
            });
            return Err(e);
        }
    };
    let mut vm = match LabVm::create_incoming(config) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = pending.send_control(&Control::Abort {
                reason: format!(
                    "destination cannot create the VM: {}",
                    vmm_hooks::error_chain(&e)
                ),
            });
            return Err(e.into());
        }
    };
    let sink = Arc::new(GuestSink {
        mem: vm.guest_memory_arc(),
        ram: vm.config().ram_mib << 20,
    });
    let mut tr = pending.attach(sink)?;
    let mut report = MigrationReport::default();
    match load(&mut vm, &mut tr, &mut report) {
        Ok(()) => {
            report.total_ms = started.elapsed().as_secs_f64() * 1e3;
            Ok(Incoming {
                vm,
                transport: tr,
                report,
            })
        }
        Err(e) => {
            if !matches!(e, MigrateError::PeerAborted(_)) {
                let _ = tr.send_control(&Control::Abort {
                    reason: vmm_hooks::error_chain(&e),
                });
            }
            tr.close();
            Err(e)
        }
    }
}

fn check_hello(hello: &Control) -> Result<LabVmConfig, MigrateError> {
    let Control::Hello { version, vm, .. } = hello else {
        return Err(MigrateError::Protocol("first message is not hello".into()));
    };
    if *version != proto::PROTOCOL_VERSION {
        return Err(MigrateError::Incompatible(format!(
            "protocol version {version}, this side speaks {}",
            proto::PROTOCOL_VERSION
        )));
    }
    let wire: WireConfig = serde_json::from_str(&vm.config)
        .map_err(|e| MigrateError::Incompatible(format!("unreadable VM configuration: {e}")))?;
    if wire.ram_mib.checked_shl(20) != Some(vm.ram_bytes)
        || (wire.ram_mib << 20) >> 20 != wire.ram_mib
    {
        return Err(MigrateError::Incompatible(format!(
            "RAM size {} bytes does not match the configuration's {} MiB",
            vm.ram_bytes, wire.ram_mib
        )));
    }
    if wire.vcpus != vm.vcpus {
        return Err(MigrateError::Incompatible(format!(
            "{} vCPUs announced, {} in the configuration",
            vm.vcpus, wire.vcpus
        )));
    }
    if wire.workload.name() != vm.workload {
        return Err(MigrateError::Incompatible(format!(
            "workload {} announced, {} in the configuration",
            vm.workload,
            wire.workload.name()
        )));
    }
    let mut config = LabVmConfig::new(wire.ram_mib, wire.workload);
    config.vcpus = wire.vcpus;
    config.stamp = wire.stamp;
    Ok(config)
}

fn load(
    vm: &mut LabVm,
    tr: &mut TcpTransport,
    report: &mut MigrationReport,
) -> Result<(), MigrateError> {
    tr.send_control(&Control::Accept)?;
    let n = vm.config().vcpus as usize;
    let mut states: Vec<Option<VcpuState>> = vec![None; n];
    let mut device: Option<LabDeviceState> = None;
    let mut next_round = 0u32;
    let mut last_done = false;
    loop {
        match tr.recv_control()? {
            Control::RoundEnd {
                round,
                frames,
                last,
            } => {
                if round != next_round || last_done {
                    return Err(MigrateError::Protocol(format!(
                        "round {round} where round {next_round} was due"
                    )));
                }
                tr.wait_pages(frames)?;
                report.round_pages.push(frames);
                tr.send_control(&Control::RoundAck { round })?;
                next_round += 1;
                last_done = last;
            }
            Control::Vcpu { index, state } => {
                let slot = states
                    .get_mut(index as usize)
                    .filter(|s| s.is_none())
                    .ok_or_else(|| {
                        MigrateError::Protocol(format!("unexpected state for vCPU {index}"))
                    })?;
                *slot = Some(
                    serde_json::from_str(&state)
                        .map_err(|e| MigrateError::Protocol(format!("vCPU {index} state: {e}")))?,
                );
            }
            Control::Device { state } => {
                device = Some(
                    serde_json::from_str(&state)
                        .map_err(|e| MigrateError::Protocol(format!("device state: {e}")))?,
                );
            }
            Control::Complete => break,
            Control::Abort { reason } => return Err(MigrateError::PeerAborted(reason)),
            other => return Err(MigrateError::Protocol(format!("unexpected {other:?}"))),
        }
    }
    if !last_done {
        return Err(MigrateError::Protocol(
            "complete before the last round".into(),
        ));
    }
    let states: Vec<VcpuState> = states
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| MigrateError::Protocol(format!("no state for vCPU {i}"))))
        .collect::<Result<_, _>>()?;
    let device = device.ok_or_else(|| MigrateError::Protocol("no device state".into()))?;
    report.rounds = next_round;
    report.counter = counter(vm);
    vm.restore(&states, device)?;
    Ok(())
}

/// Tells the source `Running` as soon as the vCPUs run (the run marks a
/// migrated guest ready at once), then passes callbacks on.
struct Confirm<'a> {
    transport: &'a mut TcpTransport,
    inner: &'a mut dyn RunObserver,
    failed: bool,
}

impl RunObserver for Confirm<'_> {
    fn before_boot(&mut self, vm: &LabVm, tids: &[i32]) -> vmm_hooks::BootPlan {
        self.inner.before_boot(vm, tids)
    }
    fn admission_wait(&self) -> Duration {
        self.inner.admission_wait()
    }
    fn take_migration_order(&mut self) -> Option<MigrationOrder> {
        self.inner.take_migration_order()
    }
    fn migration_phase(
        &mut self,
        phase: vmm_hooks::MigratePhase,
        to: &str,
        outcome: Option<vmm_hooks::MigrateOutcome>,
    ) {
        self.inner.migration_phase(phase, to, outcome);
    }
    fn should_stop(&mut self) -> bool {
        self.failed || self.inner.should_stop()
    }
    fn ready(&mut self, elapsed: Duration, report: &vmm_hooks::BootReport) {
        if let Err(e) = self.transport.send_control(&Control::Running) {
            // The source did not hear that the guest runs here: it resumes
            // the guest itself, so this copy must stop.
            tracing::error!(
                "cannot confirm to the source; stopping this copy: {}",
                vmm_hooks::error_chain(&e)
            );
            self.failed = true;
        }
        self.transport.close();
        self.inner.ready(elapsed, report);
    }
    fn tick(&mut self, vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        self.failed || self.inner.tick(vm, vcpus)
    }
}

impl Incoming {
    /// Runs the migrated guest (confirming `Running` to the source first).
    pub fn run(&mut self, observer: &mut dyn RunObserver) -> Result<RunReport, VmmError> {
        let mut confirm = Confirm {
            transport: &mut self.transport,
            inner: observer,
            failed: false,
        };
        self.vm.run(&mut confirm)
    }
}
