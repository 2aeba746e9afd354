//! Live migration of lab VMs: iterative pre-copy with the KVM dirty log on
//! the source ([`MigrationSource`], a [`RunObserver`] that migrates the VM it
//! watches), and the receiving side ([`receive`], then [`Incoming::run`]).
//!
//! The wire protocol and its sequence are documented in `rdma::proto`. The
//! switch-over is two-phase: the destination loads everything and answers
//! `Loaded`; the source then sends `Go` (its commit point) and the
//! destination starts the vCPUs and answers `Running`. Any failure before
//! `Go` resumes the VM on the source and discards it on the destination.
//! After `Go` the source never resumes its copy: without `Running` (or an
//! `Abort` saying the destination discarded the VM) the migration is in
//! doubt, and the source keeps the VM paused, saves it to a state file
//! ([`MigrationOptions::in_doubt_save`]) and stops, so the guest never runs
//! on both hosts and is never lost.
//!
//! The migration logic works on `&mut dyn Transport`; only connecting is
//! transport-specific (TCP today).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use balloon::BalloonState;
use rdma::{
    Control, PageOut, PageRun, PageSink, PendingIncoming, SinkReadError, TcpTransport, Transport,
    TransportError, VmDescriptor, proto,
};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::BalloonConfig;
use crate::vm::{
    LabDeviceState, LabVm, LabVmConfig, RunObserver, RunReport, VcpuControl, VcpuState,
};
use crate::workload::Workload;
use crate::{PAGE_SIZE, VmmError};

/// Pages in one data frame the source sends (1 MiB; the protocol allows up
/// to [`proto::MAX_RUN_PAGES`]). Frames this size keep the buffers in
/// flight few and warm in the cache between the copy out of guest memory,
/// the checksum and the socket's copy (migrating a 1 GiB guest here took
/// 110–150 ms of CPU with 4 MiB frames, 87–126 ms with these).
const SEND_RUN_PAGES: usize = 256;
const _: () = assert!(SEND_RUN_PAGES as u64 <= proto::MAX_RUN_PAGES);

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
    /// Destination: the VM was loaded but the source's commit (`Go`) did
    /// not come; the VM is discarded here.
    #[error("no commit (go) from the source after loading; discarding the VM")]
    NoCommit(#[source] TransportError),
    /// This labvm cannot move memory that way.
    #[error("unsupported here: {0}")]
    Unsupported(String),
    /// A thread of this migration died (a bug); the VM stays here.
    #[error("internal error: {0}")]
    Internal(String),
}

/// How page data moves (control messages always go over TCP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportKind {
    /// Several bulk TCP connections.
    #[default]
    Tcp,
    /// RDMA WRITE into the destination's registered guest RAM (cargo
    /// feature `rdma`, and an RDMA device on both hosts).
    Rdma,
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
    /// Socket and pause timeout; also how long the destination waits for
    /// `Go` and the source for `Running`.
    pub timeout: Duration,
    /// Where the source saves the paused VM when the migration is in doubt
    /// (`Go` sent, no `Running`). `None`: `labvm-in-doubt-PID.state` in the
    /// current directory.
    pub in_doubt_save: Option<PathBuf>,
    /// How page data moves.
    pub transport: TransportKind,
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
            in_doubt_save: None,
            transport: TransportKind::Tcp,
        }
    }

    /// The in-doubt state file: [`in_doubt_save`](Self::in_doubt_save) or
    /// the default in the current directory.
    pub fn in_doubt_path(&self) -> PathBuf {
        self.in_doubt_save.clone().unwrap_or_else(|| {
            std::env::current_dir()
                .unwrap_or_else(|_| PathBuf::from("."))
                .join(format!("labvm-in-doubt-{}.state", std::process::id()))
        })
    }
}

/// Exit status of a `labvm` source whose migration is in doubt: the VM was
/// committed to the destination (`Go` sent) but its `Running` never came;
/// the VM is saved to a file and runs on neither side here.
pub const EXIT_MIGRATION_IN_DOUBT: u8 = 76;

/// A migration whose outcome the source cannot know (`Go` sent, neither
/// `Running` nor `Abort` received).
#[derive(Clone, Debug, Serialize)]
pub struct InDoubt {
    /// What cut the exchange short.
    pub reason: String,
    /// Where the paused VM was saved (restore it with `labvm --restore`
    /// only if the destination does not run the guest).
    pub saved: Option<crate::snapshot::SaveReport>,
    /// Why saving failed, if it did (every path tried).
    pub save_error: Option<String>,
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
    /// Failure, if any. Unless [`in_doubt`](Self::in_doubt) is set, the VM
    /// then kept running on the source.
    pub error: Option<String>,
    /// Set when the migration is in doubt: the source neither runs the VM
    /// nor knows whether the destination does; the VM is saved.
    pub in_doubt: Option<InDoubt>,
    /// Where the downtime went (source only).
    pub phases: DowntimePhases,
    /// What came before the first page was sent (source only).
    pub setup: SetupPhases,
    /// How long each pre-copy round took to send and be acknowledged, ms
    /// (source only; stop-and-copy is in [`phases`](Self::phases)).
    pub round_ms: Vec<f64>,
    /// Reading the dirty log after each pre-copy round, ms in all (source).
    pub dirty_log_reads_ms: f64,
    /// After the switch-over: closing the channel's connections and
    /// threads, ms (source).
    pub teardown_ms: f64,
    /// Source: when the vCPUs were asked to pause, in µs since the Unix
    /// epoch (wall clock, so that two processes on one host compare).
    pub paused_unix_us: Option<u64>,
    /// Destination: when `Running` was sent and the vCPUs released, in µs
    /// since the Unix epoch. With [`paused_unix_us`](Self::paused_unix_us)
    /// of the source on the same host: the guest's whole downtime.
    pub resumed_unix_us: Option<u64>,
}

fn unix_us() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_micros()).ok())
}

/// The stop-and-copy phase, step by step, in ms from the previous step
/// (source side). Their sum is [`MigrationReport::downtime_ms`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct DowntimePhases {
    /// Asking the vCPUs to leave `KVM_RUN` until all have saved their state.
    pub pause_ms: f64,
    /// The last dirty-log read, and the pages devices wrote.
    pub dirty_log_ms: f64,
    /// Reading and queueing the last round's pages.
    pub send_ms: f64,
    /// Pages in the last round.
    pub pages: u64,
    /// Encoding and sending the vCPU states.
    pub vcpu_ms: f64,
    /// Encoding and sending the device state, and `Complete`.
    pub device_ms: f64,
    /// Until every queued byte was handed to the network (the end of
    /// QEMU's downtime measure; `downtime_sent_ms` is the sum up to here).
    pub flush_ms: f64,
    /// Until the destination stored the last round and loaded the state
    /// (`RoundAck`, `Loaded`).
    pub load_ms: f64,
    /// `Go` to `Running`: the destination starts the vCPUs.
    pub commit_ms: f64,
}

/// The steps before pre-copy's first page, in ms (source side). Connecting
/// runs beside the other two.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SetupPhases {
    /// All of them, start to end.
    pub wall_ms: f64,
    /// Connecting, `Hello`, the bulk connections, and the destination
    /// building the VM until its `Accept`.
    pub connect_ms: f64,
    /// Turning KVM's dirty logging on for guest RAM.
    pub dirty_log_ms: f64,
    /// Finding the populated pages (`/proc/self/pagemap`).
    pub scan_ms: f64,
}

/// Milliseconds since `*t`, and moves `*t` to now.
fn lap(t: &mut Instant) -> f64 {
    let now = Instant::now();
    let ms = now.duration_since(*t).as_secs_f64() * 1e3;
    *t = now;
    ms
}

/// The VM configuration as it travels in `Hello`.
#[derive(Serialize, Deserialize)]
struct WireConfig {
    ram_mib: u64,
    vcpus: u32,
    workload: Workload,
    stamp: u64,
    /// The virtio-balloon device, if the VM has one.
    #[serde(default)]
    balloon: Option<WireBalloon>,
}

/// A balloon device's configuration (its state travels in `Device`).
#[derive(Serialize, Deserialize)]
struct WireBalloon {
    stats_interval_ms: u64,
    grace_ms: u64,
}

/// Device state as it travels in `Device`: the lab device and, if the VM
/// has one, the virtio-balloon (device, queues and virtio-mmio transport).
#[derive(Serialize, Deserialize)]
struct WireDevices {
    lab: LabDeviceState,
    balloon: Option<BalloonState>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn descriptor(config: &LabVmConfig) -> VmDescriptor {
    let wire = WireConfig {
        ram_mib: config.ram_mib,
        vcpus: config.vcpus,
        workload: config.workload.clone(),
        stamp: config.stamp,
        balloon: config.balloon.as_ref().map(|b| WireBalloon {
            stats_interval_ms: millis(b.stats_interval),
            grace_ms: millis(b.grace),
        }),
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

    /// Runs one migration with `self.opts`; true when the VM stops here
    /// (it runs on the destination, or the migration is in doubt and the
    /// VM is saved).
    fn run_migration(&mut self, vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        let to = self.opts.to.clone();
        self.inner
            .migration_phase(vmm_hooks::MigratePhase::Started, &to, None);
        let mut report = MigrationReport {
            to: to.clone(),
            ..MigrationReport::default()
        };
        let started = Instant::now();
        let ended = migrate(vm, vcpus, &self.opts, &mut report);
        report.total_ms = started.elapsed().as_secs_f64() * 1e3;
        report.heartbeats_at_end = vcpus.heartbeats();
        // Whether the VM stops here, and whether it runs on the destination.
        let (stop, moved) = match ended {
            Ended::Moved => {
                tracing::info!(
                    to = %to,
                    total_ms = report.total_ms,
                    downtime_ms = report.downtime_ms,
                    bytes = report.bytes,
                    "migrated; stopping the VM here"
                );
                (true, true)
            }
            Ended::Failed(e) => {
                let msg = vmm_hooks::error_chain(&e);
                tracing::error!(to = %to, "migration failed, the VM keeps running here: {msg}");
                report.error = Some(msg);
                (false, false)
            }
            Ended::InDoubt(e, states) => {
                let reason = vmm_hooks::error_chain(&e);
                let doubt = save_in_doubt(vm, vcpus, states, &self.opts, reason);
                report.error = Some(match &doubt.saved {
                    Some(s) => format!(
                        "in doubt: {}; the VM is paused and saved to {} and may run on {to}",
                        doubt.reason,
                        s.path.display()
                    ),
                    None => format!("in doubt: {}; the VM could not be saved", doubt.reason),
                });
                report.in_doubt = Some(doubt);
                // Never resume: the destination may run the guest.
                (true, false)
            }
        };
        let outcome = vmm_hooks::MigrateOutcome {
            total_ms: report.total_ms,
            downtime_ms: report.downtime_ms,
            bytes: report.bytes,
            error: report.error.clone(),
        };
        let phase = match (moved, stop) {
            (true, _) => vmm_hooks::MigratePhase::Completed,
            // Stopped here without having moved: in doubt.
            (false, true) => vmm_hooks::MigratePhase::InDoubt,
            (false, false) => vmm_hooks::MigratePhase::Aborted,
        };
        self.inner.migration_phase(phase, &to, Some(outcome));
        self.report = Some(report);
        stop
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
            // Done only when the VM stopped here: a failed attempt leaves
            // it running here, open to the next order.
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

/// How a migration ended on the source.
enum Ended {
    /// The destination runs the guest.
    Moved,
    /// Failed before `Go` (or the destination said it discarded the VM):
    /// the vCPUs run again here.
    Failed(MigrateError),
    /// `Go` sent, no answer: the vCPUs stay paused with these states.
    InDoubt(MigrateError, Vec<VcpuState>),
}

/// Saves an in-doubt VM (vCPUs paused) to the configured path, or to the
/// temporary directory when that fails, and says so loudly.
fn save_in_doubt(
    vm: &LabVm,
    vcpus: &VcpuControl<'_>,
    states: Vec<VcpuState>,
    opts: &MigrationOptions,
    reason: String,
) -> InDoubt {
    let first = opts.in_doubt_path();
    let fallback =
        std::env::temp_dir().join(format!("labvm-in-doubt-{}.state", std::process::id()));
    let mut errors = Vec::new();
    for path in [first, fallback] {
        match crate::snapshot::save_paused(vm, vcpus, states.clone(), &path) {
            Ok(saved) => {
                tracing::error!(
                    to = %opts.to,
                    saved = %path.display(),
                    "migration IN DOUBT: Go was sent but Running never came ({reason}). \
                     The VM is paused and saved here and does not run on this host; it may \
                     run on the destination. Restore it (labvm --restore FILE) only if the \
                     destination does not run it"
                );
                return InDoubt {
                    reason,
                    saved: Some(saved),
                    save_error: (!errors.is_empty()).then(|| errors.join("; ")),
                };
            }
            Err(e) => errors.push(format!(
                "{}: {}",
                path.display(),
                vmm_hooks::error_chain(&e)
            )),
        }
    }
    let save_error = errors.join("; ");
    tracing::error!(
        to = %opts.to,
        "migration IN DOUBT: Go was sent but Running never came ({reason}), and the paused \
         VM could not be saved ({save_error}); it runs on the destination or nowhere"
    );
    InDoubt {
        reason,
        saved: None,
        save_error: Some(save_error),
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

/// Pages whose last copy on the destination holds data: `words` covers
/// the pages from `first` (a multiple of 64) on.
struct SentMap<'a> {
    words: &'a mut [u64],
    first: u64,
}

impl SentMap<'_> {
    fn mark(&mut self, p: u64, data: bool) {
        let w = p
            .checked_sub(self.first)
            .and_then(|q| usize::try_from(q / 64).ok())
            .and_then(|i| self.words.get_mut(i));
        if let Some(w) = w {
            if data {
                *w |= 1 << (p % 64);
            } else {
                *w &= !(1 << (p % 64));
            }
        }
    }
}

/// Round 0: every populated page (`populated`, one bit a page), zero pages
/// left out. Where the transport has lanes, each sends its share (about
/// equal, in address order) on a thread of its own, reading guest memory
/// there too, so the copy, the checksum and the socket's copy of the
/// round spread over the host's cores.
fn send_populated(
    tr: &mut dyn Transport,
    mem: &GuestMemoryMmap,
    populated: &[u64],
    ram_pages: u64,
    sent: &mut [u64],
    report: &mut MigrationReport,
) -> Result<(u64, u64), MigrateError> {
    let words = populated.len().min(sent.len());
    let (populated, sent) = (&populated[..words], &mut sent[..words]);
    let mut lanes = tr.lanes()?;
    if lanes.len() < 2 {
        drop(lanes);
        let pages = dirty_pages(populated).filter(|&p| p < ram_pages);
        let mut map = SentMap {
            words: sent,
            first: 0,
        };
        return send_pages(tr, mem, pages, true, &mut map, report);
    }
    let n = lanes.len();
    let bounds = shares(populated, n);
    let mut parts = Vec::with_capacity(n);
    let mut rest = sent;
    for k in 0..n {
        let (part, tail) = rest.split_at_mut(bounds[k + 1] - bounds[k]);
        parts.push(part);
        rest = tail;
    }
    /// Frames and bytes one lane sent, and its counts.
    type LaneOutcome = Result<((u64, u64), MigrationReport), MigrateError>;
    let results: Vec<LaneOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = lanes
            .iter_mut()
            .zip(parts)
            .zip(bounds.windows(2))
            .map(|((lane, part), b)| {
                let (lo, hi) = (b[0], b[1]);
                std::thread::Builder::new()
                    .name("migrate-lane".into())
                    .spawn_scoped(s, move || {
                        let first = lo as u64 * 64;
                        let pages = dirty_pages(&populated[lo..hi])
                            .map(move |p| p + first)
                            .filter(|&p| p < ram_pages);
                        let mut map = SentMap { words: part, first };
                        let mut r = MigrationReport::default();
                        let out = send_pages(lane.as_mut(), mem, pages, true, &mut map, &mut r);
                        out.map(|x| (x, r))
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(MigrateError::Internal("a sending thread panicked".into()))
                }),
                Err(e) => Err(MigrateError::Internal(format!(
                    "cannot start a sending thread: {e}"
                ))),
            })
            .collect()
    });
    let (mut frames, mut bytes, mut pages) = (0, 0, 0);
    for r in results {
        let ((f, b), lane) = r?;
        frames += f;
        bytes += b;
        pages += lane.pages;
        report.zero_pages += lane.zero_pages;
    }
    report.pages += pages;
    report.round_pages.push(pages);
    report.bytes += bytes;
    Ok((frames, bytes))
}

/// `n + 1` word indices into `bitmap` that cut it into `n` shares of about
/// equal set bits, in order (the first is 0, the last the length).
fn shares(bitmap: &[u64], n: usize) -> Vec<usize> {
    let total: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
    let mut bounds = vec![0usize];
    let mut acc = 0u64;
    for (i, w) in bitmap.iter().enumerate() {
        acc += u64::from(w.count_ones());
        if bounds.len() < n && acc * n as u64 >= total * bounds.len() as u64 {
            bounds.push(i + 1);
        }
    }
    // The loop cuts at most n - 1 times: the rest ends at the last word.
    while bounds.len() <= n {
        bounds.push(bitmap.len());
    }
    bounds
}

/// Sends the pages `pages` yields (ascending page numbers) as runs; with
/// `skip_zero`, zero pages are left out (the destination's fresh memory
/// holds zeros already), else sent as zero runs. Returns frames and bytes
/// sent.
///
/// Each page is copied once, from guest memory straight into the frame's
/// buffer, and checked for zeros there: the copy is what the transport
/// checksums and sends, so a guest write racing the send cannot tear it
/// (the write is in the next round's dirty log).
fn send_pages<O: PageOut + ?Sized>(
    tr: &mut O,
    mem: &GuestMemoryMmap,
    pages: impl Iterator<Item = u64>,
    skip_zero: bool,
    sent: &mut SentMap<'_>,
    report: &mut MigrationReport,
) -> Result<(u64, u64), MigrateError> {
    let max = SEND_RUN_PAGES;
    let page = PAGE_BYTES;
    let mut frames = 0u64;
    let mut bytes = 0u64;
    let mut sent_pages = 0u64;
    // The data run being gathered: its first page, its buffer (taken from
    // the transport, kept at full length) and the bytes of it in use.
    let mut run_start = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    let mut used = 0usize;
    let mut zero_start = 0u64;
    let mut zeros = 0u64;
    let mut zero_frames = 0u64;
    for p in pages {
        let follows = run_start + (used / page) as u64 == p && used < max * page;
        if used > 0 && !follows {
            flush_data(tr, run_start, &mut buf, &mut used, &mut frames, &mut bytes)?;
        }
        if buf.len() < max * page {
            // A recycled buffer keeps its length: resizing zero-fills only
            // what it lacks, once.
            buf = tr.page_buffer();
            buf.resize(max * page, 0);
        }
        if used == 0 {
            run_start = p;
        }
        let slot = &mut buf[used..used + page];
        mem.read_slice(slot, GuestAddress(p * PAGE_SIZE))
            .map_err(|e| {
                VmmError::GuestMemory(format!("reading guest memory at {:#x}: {e}", p * PAGE_SIZE))
            })?;
        let zero = is_zero(slot);
        sent.mark(p, !zero);
        if zero {
            report.zero_pages += 1;
            if used > 0 {
                flush_data(tr, run_start, &mut buf, &mut used, &mut frames, &mut bytes)?;
            }
            if skip_zero {
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
        used += page;
        sent_pages += 1;
    }
    flush_data(tr, run_start, &mut buf, &mut used, &mut frames, &mut bytes)?;
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

/// Sends the first `used` bytes of `buf` as one data run (the buffer goes
/// to the transport as it is; the next run takes a recycled one).
fn flush_data<O: PageOut + ?Sized>(
    tr: &mut O,
    start: u64,
    buf: &mut Vec<u8>,
    used: &mut usize,
    frames: &mut u64,
    bytes: &mut u64,
) -> Result<(), MigrateError> {
    if *used > 0 {
        *frames += 1;
        *bytes += *used as u64 + proto::HEADER_LEN as u64 + 8;
        let mut data = std::mem::take(buf);
        data.truncate(*used);
        *used = 0;
        tr.send_data(start * PAGE_SIZE, data)?;
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
) -> Ended {
    // Connecting (the destination builds the VM meanwhile) and preparing
    // round 0 here are independent: they overlap.
    let started = Instant::now();
    let mut setup = SetupPhases::default();
    let (connected, prepared) = std::thread::scope(|s| {
        let c = std::thread::Builder::new()
            .name("migrate-connect".into())
            .spawn_scoped(s, || {
                let t = Instant::now();
                (connect(vm, opts), t.elapsed())
            });
        let prepared = prepare(vm, &mut setup);
        let connected = match c {
            Ok(handle) => handle.join().unwrap_or_else(|_| {
                (
                    Err(MigrateError::Internal(
                        "the connecting thread panicked".into(),
                    )),
                    Duration::ZERO,
                )
            }),
            // No thread to spare: connect here, after preparing.
            Err(_) => {
                let t = Instant::now();
                (connect(vm, opts), t.elapsed())
            }
        };
        (connected, prepared)
    });
    setup.connect_ms = connected.1.as_secs_f64() * 1e3;
    setup.wall_ms = started.elapsed().as_secs_f64() * 1e3;
    report.setup = setup;
    let ended = match connected.0 {
        Err(e) => Ended::Failed(e),
        Ok(mut tr) => {
            tracing::debug!("destination accepted the VM");
            let ended = match prepared {
                Ok(populated) => {
                    precopy_and_switch(vm, vcpus, opts, tr.as_mut(), populated, report)
                }
                Err(e) => Ended::Failed(e),
            };
            let t = Instant::now();
            if let Ended::Failed(e) = &ended {
                // Tell the destination, if it still listens; the VM stays here.
                let _ = tr.send_control(&Control::Abort {
                    reason: vmm_hooks::error_chain(e),
                });
            }
            tr.close();
            report.teardown_ms = t.elapsed().as_secs_f64() * 1e3;
            ended
        }
    };
    // A VM that moved (or is in doubt) never runs here again: only one
    // that stays needs its writes untracked again.
    if let Ended::Failed(_) = &ended
        && let Err(e) = vm.set_dirty_logging(false)
    {
        tracing::warn!("cannot stop dirty logging: {}", vmm_hooks::error_chain(&e));
    }
    ended
}

/// Everything round 0 needs from this side: dirty logging on, the log
/// cleared (round 0 sends every populated page; what the guest writes
/// from here on is in the next round's log), and the populated pages.
fn prepare(vm: &LabVm, setup: &mut SetupPhases) -> Result<Vec<u64>, MigrateError> {
    let mut t = Instant::now();
    vm.set_dirty_logging(true)?;
    setup.dirty_log_ms = lap(&mut t);
    vm.take_dirty_log()?;
    // Pages never populated read as zeros: round 0 skips them without
    // faulting them in.
    let populated = match vm.populated_pages() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("cannot read /proc/self/pagemap ({e}); scanning every page");
            let ram_pages = (vm.config().ram_mib << 20) / PAGE_SIZE;
            vec![u64::MAX; usize::try_from(ram_pages.div_ceil(64)).unwrap_or(0)]
        }
    };
    setup.scan_ms = lap(&mut t);
    Ok(populated)
}

/// Opens the RDMA data path (the device, its queue pair and staging ring;
/// the control connection over TCP) and has the destination accept the VM.
#[cfg(feature = "rdma")]
fn connect_rdma(vm: &LabVm, opts: &MigrationOptions) -> Result<Box<dyn Transport>, MigrateError> {
    let mut tr = rdma::verbs::RdmaTransport::connect(
        &opts.to,
        &rdma::verbs::RdmaOptions::default(),
        opts.timeout,
    )?;
    let hello = Control::Hello {
        version: proto::PROTOCOL_VERSION,
        vm: descriptor(vm.config()),
        // No bulk connections: the destination answers with RDMA.
        bulk: 0,
        session: tr.session(),
    };
    tr.send_control(&hello)?;
    tr.open_data_path(vm.config().ram_mib << 20)?;
    expect(&mut tr, "accept", |c| matches!(c, Control::Accept))?;
    Ok(Box::new(tr))
}

/// Without the `rdma` feature: says so.
#[cfg(not(feature = "rdma"))]
fn connect_rdma(_vm: &LabVm, _opts: &MigrationOptions) -> Result<Box<dyn Transport>, MigrateError> {
    Err(MigrateError::Unsupported(
        "this labvm was built without RDMA (cargo feature rdma, needs rdma-core)".into(),
    ))
}

/// The destination's side of an RDMA migration: registers guest RAM and
/// connects the queue pair.
#[cfg(feature = "rdma")]
fn attach_rdma(pending: PendingIncoming, vm: &LabVm) -> Result<Box<dyn Transport>, MigrateError> {
    let ram = vm.config().ram_mib << 20;
    let len = usize::try_from(ram)
        .map_err(|_| MigrateError::Incompatible("RAM size does not fit this host".into()))?;
    let base = vm
        .memory()
        .get_host_address(GuestAddress(0))
        .map_err(|e| MigrateError::Vm(VmmError::GuestMemory(e.to_string())))?;
    // SAFETY: base..base+len is the VM's guest RAM mapping, one readable
    // and writable mapping owned by `vm`. The transport built from it is
    // kept in `Incoming` beside the VM and declared before it, so it is
    // dropped (its registration undone) before the mapping goes; on the
    // error paths of `receive` the transport is a later local than the VM
    // and is dropped first. The guest does not run before `Complete`.
    let guest = unsafe { rdma::verbs::GuestRam::new(base, len) }?;
    let tr = pending.attach_rdma(guest, &rdma::verbs::RdmaOptions::default())?;
    Ok(Box::new(tr))
}

/// Without the `rdma` feature: refuses (the source is told why).
#[cfg(not(feature = "rdma"))]
fn attach_rdma(
    mut pending: PendingIncoming,
    _vm: &LabVm,
) -> Result<Box<dyn Transport>, MigrateError> {
    let why =
        "this destination labvm was built without RDMA (cargo feature rdma); migrate over TCP";
    let _ = pending.send_control(&Control::Abort { reason: why.into() });
    Err(MigrateError::Unsupported(why.into()))
}

/// Opens the TCP channel (control and bulk connections) and has the
/// destination accept the VM.
fn connect(vm: &LabVm, opts: &MigrationOptions) -> Result<Box<dyn Transport>, MigrateError> {
    if opts.transport == TransportKind::Rdma {
        return connect_rdma(vm, opts);
    }
    let mut tr = TcpTransport::connect(&opts.to, opts.timeout)?;
    let hello = Control::Hello {
        version: proto::PROTOCOL_VERSION,
        vm: descriptor(vm.config()),
        bulk: opts.streams.max(1),
        session: tr.session(),
    };
    tr.send_control(&hello)?;
    tr.open_bulk(opts.streams.max(1))?;
    match expect(&mut tr, "accept", |c| matches!(c, Control::Accept)) {
        Err(MigrateError::Transport(TransportError::Closed { peer })) => {
            Err(MigrateError::Protocol(format!(
                "{peer} closed the connection instead of accepting the VM (a labvm that \
                 speaks another migration protocol version than {} does that; see its log)",
                proto::PROTOCOL_VERSION
            )))
        }
        other => other.map(|()| Box::new(tr) as Box<dyn Transport>),
    }
}

fn precopy_and_switch(
    vm: &LabVm,
    vcpus: &VcpuControl<'_>,
    opts: &MigrationOptions,
    tr: &mut dyn Transport,
    populated: Vec<u64>,
    report: &mut MigrationReport,
) -> Ended {
    // Pages whose last copy on the destination holds data (not zeros).
    let ram_pages = (vm.config().ram_mib << 20) / PAGE_SIZE;
    let mut sent = vec![0u64; usize::try_from(ram_pages.div_ceil(64)).unwrap_or(0)];
    let discards = balloon_discards(vm);
    let pending = match precopy(vm, opts, tr, &populated, &mut sent, report) {
        Ok(p) => p,
        Err(e) => return Ended::Failed(e),
    };
    let n = report.rounds;
    // Stop-and-copy: the guest is paused from here until Running or failure.
    let paused = Instant::now();
    report.paused_unix_us = unix_us();
    let states = match vcpus.pause(opts.timeout) {
        Ok(s) => s,
        Err(e) => {
            vcpus.resume();
            return Ended::Failed(e.into());
        }
    };
    report.phases.pause_ms = paused.elapsed().as_secs_f64() * 1e3;
    let copy = FinalCopy {
        pending,
        sent,
        discards,
        round: n,
    };
    let outcome = stop_and_copy(vm, vcpus, tr, copy, &states, paused, report);
    report.downtime_ms = paused.elapsed().as_secs_f64() * 1e3;
    report.rounds = n + 1;
    match outcome {
        Ok(()) => Ended::Moved,
        Err(Switch::Before(e)) => {
            vcpus.resume();
            Ended::Failed(e)
        }
        Err(Switch::InDoubt(e)) => Ended::InDoubt(e, states),
    }
}

/// Iterative pre-copy; returns the dirty bitmap left for stop-and-copy
/// (and leaves the round count in `report.rounds`).
fn precopy(
    vm: &LabVm,
    opts: &MigrationOptions,
    tr: &mut dyn Transport,
    populated: &[u64],
    sent: &mut [u64],
    report: &mut MigrationReport,
) -> Result<Vec<u64>, MigrateError> {
    let mem = vm.memory();
    let ram_pages = (vm.config().ram_mib << 20) / PAGE_SIZE;
    let t = Instant::now();
    let untouched = ram_pages
        - populated
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>()
            .min(ram_pages);
    report.zero_pages += untouched;
    let (frames, bytes) = send_populated(tr, mem, populated, ram_pages, sent, report)?;
    round(tr, 0, frames, false)?;
    report.round_ms.push(t.elapsed().as_secs_f64() * 1e3);
    let mut bw = bytes as f64 / t.elapsed().as_secs_f64().max(1e-6);
    tracing::debug!(
        bytes,
        ms = t.elapsed().as_secs_f64() * 1e3,
        mb_s = bw / 1e6,
        "pre-copy round 0 (every populated page)"
    );
    let mut n = 1u32;
    let t = Instant::now();
    let mut pending = vm.take_dirty_log()?;
    report.dirty_log_reads_ms += t.elapsed().as_secs_f64() * 1e3;
    let mut prev_dirty = u64::MAX;
    let mut stalls = 0u32;
    let target = opts.downtime.as_secs_f64();
    loop {
        let dirty: u64 = pending.iter().map(|w| u64::from(w.count_ones())).sum();
        let est = (dirty * (PAGE_SIZE + 32)) as f64 / bw;
        // Under the target, more rounds still pay while they shrink the
        // dirty set (the guest dirties less during a shorter round): the
        // pause then holds only what the guest dirties in one round of
        // fixed costs. A round that does not shrink it by a tenth is a
        // stall (a busy host slows single rounds, so one is not enough to
        // stop); stop at a set the link moves in half a millisecond, or
        // after three stalls in a row.
        if dirty.saturating_mul(10) < prev_dirty.saturating_mul(9) {
            stalls = 0;
        } else {
            stalls += 1;
        }
        let small = bw * 0.0005 / (PAGE_SIZE + 32) as f64;
        let fits = dirty == 0 || (est <= target && (dirty as f64 <= small || stalls >= 3));
        if fits || n >= opts.max_rounds {
            tracing::info!(round = n, dirty, est_ms = est * 1e3, "stop-and-copy");
            break;
        }
        let t = Instant::now();
        let mut map = SentMap {
            words: &mut *sent,
            first: 0,
        };
        let (frames, bytes) = send_pages(tr, mem, dirty_pages(&pending), false, &mut map, report)?;
        round(tr, n, frames, false)?;
        report.round_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if bytes > 1 << 20 {
            bw = bytes as f64 / t.elapsed().as_secs_f64().max(1e-6);
        }
        tracing::debug!(round = n, dirty, mb_s = bw / 1e6, "pre-copy round");
        n += 1;
        prev_dirty = dirty;
        let t = Instant::now();
        pending = vm.take_dirty_log()?;
        report.dirty_log_reads_ms += t.elapsed().as_secs_f64() * 1e3;
    }
    report.bandwidth_mb_s = bw / 1e6;
    report.rounds = n;
    Ok(pending)
}

/// Where the switch-over failed: before `Go` was sent (the source resumes)
/// or after (in doubt).
enum Switch {
    Before(MigrateError),
    InDoubt(MigrateError),
}

impl From<MigrateError> for Switch {
    fn from(e: MigrateError) -> Self {
        Switch::Before(e)
    }
}

impl From<TransportError> for Switch {
    fn from(e: TransportError) -> Self {
        Switch::Before(e.into())
    }
}

impl From<VmmError> for Switch {
    fn from(e: VmmError) -> Self {
        Switch::Before(e.into())
    }
}

/// What pre-copy leaves to the stop-and-copy phase.
struct FinalCopy {
    /// Pages dirtied since they were last sent.
    pending: Vec<u64>,
    /// Pages whose copy on the destination holds data.
    sent: Vec<u64>,
    /// The balloon's host discards when the migration began.
    discards: Option<u64>,
    /// The last round's number.
    round: u32,
}

/// Host discards the balloon made (inflation, free page reporting).
fn balloon_discards(vm: &LabVm) -> Option<u64> {
    vm.balloon().map(|b| b.report().counters.discard_calls)
}

/// Adds to `pending` what the dirty log cannot see: pages the balloon
/// device (host side) wrote, its used rings, and pages it gave back to the
/// host during the migration (they read as zeros now, and the destination
/// drops its stale copy).
fn device_written_pages(
    vm: &LabVm,
    balloon: Option<&BalloonState>,
    copy: &mut FinalCopy,
) -> Result<(), MigrateError> {
    let ram_pages = (vm.config().ram_mib << 20) / PAGE_SIZE;
    let mut set = |p: u64| {
        if p < ram_pages
            && let Some(w) = copy
                .pending
                .get_mut(usize::try_from(p / 64).unwrap_or(usize::MAX))
        {
            *w |= 1 << (p % 64);
        }
    };
    for q in balloon.iter().flat_map(|b| &b.queues).filter(|q| q.ready) {
        // flags, idx, ring[size] of 8 bytes, avail_event.
        let len = 6 + 8 * u64::from(q.size);
        let first = q.used_ring / PAGE_SIZE;
        let last = q.used_ring.saturating_add(len - 1) / PAGE_SIZE;
        (first..=last.min(first + 16)).for_each(&mut set);
    }
    if copy.discards.is_some() && balloon_discards(vm) != copy.discards {
        let populated = vm.populated_pages().map_err(|e| {
            VmmError::GuestMemory(format!(
                "reading /proc/self/pagemap for pages ballooned during the migration: {e}"
            ))
        })?;
        for (w, (p, s)) in copy
            .pending
            .iter_mut()
            .zip(populated.iter().zip(&copy.sent))
        {
            *w |= s & !p;
        }
    }
    Ok(())
}

fn stop_and_copy(
    vm: &LabVm,
    vcpus: &VcpuControl<'_>,
    tr: &mut dyn Transport,
    mut copy: FinalCopy,
    states: &[VcpuState],
    paused: Instant,
    report: &mut MigrationReport,
) -> Result<(), Switch> {
    let mut t = Instant::now();
    tr.send_inline()?;
    let last = vm.take_dirty_log()?;
    for (p, l) in copy.pending.iter_mut().zip(&last) {
        *p |= *l;
    }
    // The vCPUs are paused, so the balloon (driven by their MMIO exits and
    // by this thread) holds still.
    let balloon = vm.balloon().map(|b| b.state());
    device_written_pages(vm, balloon.as_ref(), &mut copy)?;
    report.phases.dirty_log_ms = lap(&mut t);
    let before = report.pages;
    let mut map = SentMap {
        words: &mut copy.sent,
        first: 0,
    };
    let (frames, _) = send_pages(
        tr,
        vm.memory(),
        dirty_pages(&copy.pending),
        false,
        &mut map,
        report,
    )?;
    report.phases.pages = report.pages - before;
    // The destination stores the round's frames before it reads the next
    // control message, so the state follows at once; its RoundAck is
    // read after everything was sent.
    tr.send_control(&Control::RoundEnd {
        round: copy.round,
        frames,
        last: true,
    })?;
    report.phases.send_ms = lap(&mut t);
    for (i, s) in states.iter().enumerate() {
        let state = serde_json::to_string(s)
            .map_err(|e| MigrateError::Protocol(format!("encoding vCPU {i}: {e}")))?;
        tr.send_control(&Control::Vcpu {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            state,
        })?;
    }
    report.phases.vcpu_ms = lap(&mut t);
    let devices = WireDevices {
        lab: vcpus.device_state(),
        balloon,
    };
    let dev = serde_json::to_string(&devices)
        .map_err(|e| MigrateError::Protocol(format!("encoding device state: {e}")))?;
    tr.send_control(&Control::Device { state: dev })?;
    tr.send_control(&Control::Complete)?;
    report.phases.device_ms = lap(&mut t);
    tr.flush()?;
    report.phases.flush_ms = lap(&mut t);
    report.downtime_sent_ms = paused.elapsed().as_secs_f64() * 1e3;
    report.counter = counter(vm);
    let n = copy.round;
    expect(
        tr,
        "round-ack",
        |c| matches!(c, Control::RoundAck { round } if *round == n),
    )?;
    expect(tr, "loaded", |c| matches!(c, Control::Loaded))?;
    report.phases.load_ms = lap(&mut t);
    // A Go whose write fails was not delivered whole, and a partial frame
    // never decodes: the destination cannot have started, so resume here.
    tr.send_control(&Control::Go)?;
    // Committed: from here the source never resumes its copy.
    let running = expect(tr, "running", |c| matches!(c, Control::Running));
    report.phases.commit_ms = lap(&mut t);
    match running {
        Ok(()) => Ok(()),
        // The destination says it discarded the VM without starting it.
        Err(e @ MigrateError::PeerAborted(_)) => Err(Switch::Before(e)),
        Err(e) => Err(Switch::InDoubt(e)),
    }
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
    fn receive_from(
        &self,
        gpa: u64,
        len: usize,
        src: &mut std::net::TcpStream,
        crc: &mut rdma::crc32fast::Hasher,
    ) -> Result<(), SinkReadError> {
        use vm_memory::ReadVolatile;
        self.check(gpa, len as u64).map_err(SinkReadError::Sink)?;
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), len)
            .map_err(|e| SinkReadError::Sink(e.to_string()))?;
        let volatile = |e: vm_memory::VolatileMemoryError| match e {
            vm_memory::VolatileMemoryError::IOError(io) => SinkReadError::Io(io),
            other => SinkReadError::Sink(other.to_string()),
        };
        // Fault the run's pages in with one call rather than one page
        // fault per 4 KiB during the socket's copy. Only advice: where the
        // kernel lacks MADV_POPULATE_WRITE (before 5.14) the copy faults
        // them in as before.
        let host = slice.ptr_guard_mut().as_ptr();
        // SAFETY: `check` put [gpa, gpa + len) inside guest RAM, one
        // private anonymous mapping that `self.mem` keeps alive, and
        // `slice` covers exactly that range; populating for write only
        // backs not-yet-present pages with zeroed memory and changes no
        // contents.
        let _ = unsafe { crate::sys::populate_write(host, len) };
        let mut got = 0;
        while got < len {
            let mut rest = slice.offset(got).map_err(volatile)?;
            match src.read_volatile(&mut rest) {
                Ok(0) => return Err(SinkReadError::Closed { got }),
                Ok(n) => got += n,
                Err(vm_memory::VolatileMemoryError::IOError(e))
                    if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(volatile(e)),
            }
        }
        // The checksum reads the pages back through a small buffer: the
        // guest's memory is never borrowed as a Rust slice. They are still
        // in the cache from the socket's copy.
        let mut chunk = [0u8; 16 << 10];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(chunk.len());
            let part = slice.subslice(off, n).map_err(volatile)?;
            part.copy_to(&mut chunk[..n]);
            crc.update(&chunk[..n]);
            off += n;
        }
        Ok(())
    }
    fn zero(&self, gpa: u64, pages: u64) -> Result<(), String> {
        let len = pages.checked_mul(PAGE_SIZE).ok_or("zero run too long")?;
        self.check(gpa, len)?;
        // Dropping the pages zeroes them and leaves them unbacked (pages
        // the guest ballooned away on the source stay off this host too).
        let host = self
            .mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|e| e.to_string())?;
        let len = usize::try_from(len).map_err(|_| "zero run too long")?;
        // SAFETY: `check` put [gpa, gpa + len) inside guest RAM, which is
        // one private anonymous mapping (`GuestMemoryMmap::from_ranges`)
        // that `self.mem` keeps alive; the VM does not run while it is
        // received, and a zero run asks for exactly these contents to go.
        unsafe { crate::sys::discard(host, len) }.map_err(|e| e.to_string())
    }
}

/// A migrated VM on the destination, committed by the source (`Go`
/// received) and ready to run.
pub struct Incoming {
    /// Declared before `vm`, so dropped first: an RDMA transport has the
    /// VM's guest RAM registered with the NIC.
    transport: Box<dyn Transport>,
    /// The VM, with memory and registers loaded.
    pub vm: LabVm,
    /// What the reception did.
    pub report: MigrationReport,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("vm", &self.vm)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

/// Destination: accepts one migration on `listener`, builds the VM the
/// source describes, loads its memory and state, answers `Loaded` and waits
/// (at most `timeout`) for the source's `Go`. On failure, or without `Go`,
/// the source is told (`Abort`, where the connection allows) and nothing
/// is kept. Run the returned VM at once with [`Incoming::run`]: the source
/// has committed and waits for `Running`.
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
    if let Err(e) = vm.prespawn_vcpu_threads() {
        tracing::warn!(
            "cannot create the vCPU threads ahead; they start after the commit: {}",
            vmm_hooks::error_chain(&e)
        );
    }
    let sink = Arc::new(GuestSink {
        mem: vm.guest_memory_arc(),
        ram: vm.config().ram_mib << 20,
    });
    let mut tr: Box<dyn Transport> = if pending.wants_rdma() {
        attach_rdma(pending, &vm)?
    } else {
        Box::new(pending.attach(sink)?)
    };
    let mut report = MigrationReport::default();
    match load(&mut vm, tr.as_mut(), &mut report).and_then(|()| await_go(tr.as_mut())) {
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
    // The target and everything else come with the device state.
    config.balloon = wire.balloon.map(|b| BalloonConfig {
        initial_target_mib: 0,
        stats_interval: Duration::from_millis(b.stats_interval_ms),
        grace: Duration::from_millis(b.grace_ms),
    });
    Ok(config)
}

/// Tells the source the VM is loaded and waits for its commit (`Go`).
fn await_go(tr: &mut dyn Transport) -> Result<(), MigrateError> {
    tr.send_control(&Control::Loaded)?;
    match tr.recv_control() {
        Ok(Control::Go) => {
            tracing::debug!("go received");
            Ok(())
        }
        Ok(Control::Abort { reason }) => Err(MigrateError::PeerAborted(reason)),
        Ok(other) => Err(MigrateError::Protocol(format!(
            "expected go, got {other:?}"
        ))),
        Err(e) => Err(MigrateError::NoCommit(e)),
    }
}

fn load(
    vm: &mut LabVm,
    tr: &mut dyn Transport,
    report: &mut MigrationReport,
) -> Result<(), MigrateError> {
    tr.send_control(&Control::Accept)?;
    let n = vm.config().vcpus as usize;
    let mut states: Vec<Option<VcpuState>> = vec![None; n];
    let mut device: Option<WireDevices> = None;
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
                let wire: WireDevices = serde_json::from_str(&state)
                    .map_err(|e| MigrateError::Protocol(format!("device state: {e}")))?;
                device = Some(wire);
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
    match (&device.balloon, vm.config().balloon.as_ref()) {
        (Some(state), Some(b)) => vm.restore_balloon(state, millis(b.grace))?,
        (None, None) => {}
        (Some(_), None) => {
            return Err(MigrateError::Protocol(
                "balloon state for a VM configured without a balloon".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(MigrateError::Protocol(
                "no balloon state for a VM configured with a balloon".into(),
            ));
        }
    }
    report.rounds = next_round;
    report.counter = counter(vm);
    vm.restore(&states, device.lab)?;
    Ok(())
}

/// Tells the source `Running` once the vCPU threads exist and nothing can
/// fail before they are released (`before_boot`: what follows it in
/// [`LabVm::run`] is infallible for a migrated guest), then passes
/// callbacks on. Sending it there rather than after the release keeps the
/// newly runnable vCPU threads from delaying the message on a busy host.
struct Confirm<'a> {
    transport: &'a mut dyn Transport,
    inner: &'a mut dyn RunObserver,
    /// `Running` was sent (or tried): the vCPUs are released.
    started: bool,
    /// When that was, µs since the Unix epoch.
    resumed_unix_us: Option<u64>,
}

impl RunObserver for Confirm<'_> {
    fn before_boot(&mut self, vm: &LabVm, tids: &[i32]) -> vmm_hooks::BootPlan {
        // The companion (if any) has its say first: a refused boot fails
        // the run before the vCPUs start, and the source hears Abort.
        let plan = self.inner.before_boot(vm, tids);
        if plan.refuses_boot() {
            return plan;
        }
        tracing::debug!("vCPU threads ready; sending running");
        self.started = true;
        self.resumed_unix_us = unix_us();
        if let Err(e) = self.transport.send_control(&Control::Running) {
            // The source committed (Go) and never resumes its copy: this
            // one runs. The source saved the VM as in doubt.
            tracing::warn!(
                "cannot confirm Running to the source (it keeps its copy paused and saved): {}",
                vmm_hooks::error_chain(&e)
            );
        }
        plan
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
        self.inner.should_stop()
    }
    fn ready(&mut self, elapsed: Duration, report: &vmm_hooks::BootReport) {
        self.transport.close();
        self.inner.ready(elapsed, report);
    }
    fn tick(&mut self, vm: &LabVm, vcpus: &VcpuControl<'_>) -> bool {
        self.inner.tick(vm, vcpus)
    }
}

impl Incoming {
    /// Runs the migrated guest, confirming `Running` to the source as soon
    /// as its vCPUs run. If the run fails before they start, the source is
    /// told (`Abort`) that the guest does not run here, so it resumes its
    /// copy.
    pub fn run(&mut self, observer: &mut dyn RunObserver) -> Result<RunReport, VmmError> {
        let mut confirm = Confirm {
            transport: self.transport.as_mut(),
            inner: observer,
            started: false,
            resumed_unix_us: None,
        };
        let result = self.vm.run(&mut confirm);
        self.report.resumed_unix_us = confirm.resumed_unix_us;
        if let (Err(e), false) = (&result, confirm.started) {
            let _ = confirm.transport.send_control(&Control::Abort {
                reason: format!(
                    "the destination could not start the guest: {}",
                    vmm_hooks::error_chain(e)
                ),
            });
            confirm.transport.close();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;

    fn sink(ram: u64) -> GuestSink {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(ram).unwrap())])
            .unwrap();
        GuestSink {
            mem: Arc::new(mem),
            ram,
        }
    }

    /// A connected pair of real loopback sockets: (writer, reader).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let w = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (r, _) = l.accept().unwrap();
        (w, r)
    }

    #[test]
    fn shares_cut_a_bitmap_into_ordered_shares_of_about_equal_pages() {
        let count = |b: &[u64]| b.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        let cases: Vec<Vec<u64>> = vec![
            vec![],
            vec![0; 10],
            vec![u64::MAX; 1000],
            vec![1],
            // Dense at both ends, empty in the middle.
            [vec![u64::MAX; 100], vec![0; 5000], vec![0xF0F0; 300]].concat(),
            (0..4096u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect(),
        ];
        for bitmap in &cases {
            let total = count(bitmap);
            for n in 1..=6 {
                let b = shares(bitmap, n);
                assert_eq!(b.len(), n + 1);
                assert_eq!(b[0], 0);
                assert_eq!(b[n], bitmap.len());
                assert!(b.windows(2).all(|w| w[0] <= w[1]), "{b:?}");
                // Each share is within one word of an equal share.
                let fair = total.div_ceil(n as u64);
                for w in b.windows(2) {
                    assert!(count(&bitmap[w[0]..w[1]]) <= fair + 64, "{b:?}");
                }
            }
        }
    }

    #[test]
    fn guest_sink_reads_pages_from_the_socket_into_guest_memory() {
        let s = sink(1 << 20);
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
        let (mut w, mut r) = pair();
        let sent = data.clone();
        let t = std::thread::spawn(move || w.write_all(&sent).unwrap());
        let mut crc = rdma::crc32fast::Hasher::new();
        s.receive_from(0x5000, data.len(), &mut r, &mut crc)
            .unwrap();
        t.join().unwrap();
        assert_eq!(crc.finalize(), proto::crc32(&data));
        let mut back = vec![0u8; data.len()];
        s.mem.read_slice(&mut back, GuestAddress(0x5000)).unwrap();
        assert_eq!(back, data);
        // The neighbours are untouched.
        let mut edge = [0xAAu8; 4096];
        s.mem.read_slice(&mut edge, GuestAddress(0x4000)).unwrap();
        assert!(edge.iter().all(|&b| b == 0));
        s.mem.read_slice(&mut edge, GuestAddress(0x8000)).unwrap();
        assert!(edge.iter().all(|&b| b == 0));
    }

    #[test]
    fn guest_sink_refuses_a_range_outside_ram_before_reading() {
        let s = sink(1 << 20);
        let (mut w, mut r) = pair();
        w.write_all(&[7u8; 4096]).unwrap();
        let mut crc = rdma::crc32fast::Hasher::new();
        let e = s
            .receive_from((1 << 20) - 4096, 8192, &mut r, &mut crc)
            .unwrap_err();
        assert!(
            matches!(&e, SinkReadError::Sink(m) if m.contains("outside")),
            "{e:?}"
        );
        // Nothing was consumed from the socket: the page is still there.
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut left = [0u8; 4096];
        std::io::Read::read_exact(&mut r, &mut left).unwrap();
        assert_eq!(left, [7u8; 4096]);
    }

    #[test]
    fn guest_sink_reports_how_much_came_before_the_peer_closed() {
        let s = sink(1 << 20);
        let (mut w, mut r) = pair();
        w.write_all(&[3u8; 5000]).unwrap();
        drop(w);
        let mut crc = rdma::crc32fast::Hasher::new();
        let e = s.receive_from(0, 8192, &mut r, &mut crc).unwrap_err();
        assert!(matches!(e, SinkReadError::Closed { got: 5000 }), "{e:?}");
    }
}
