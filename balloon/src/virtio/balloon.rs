//! The virtio memory balloon device model (virtio 1.2, 5.5): configuration
//! space, inflate/deflate/statistics/free-page-reporting queues and what
//! each element means for guest memory. It does not know registers (the
//! transport does) nor why the target is what it is (the policy does).
//!
//! The guest controls every descriptor, so each element is checked before it
//! has an effect: a chain with a write-only buffer where a readable one is
//! due, a length that is not a whole number of entries, an address outside
//! guest RAM or a chain past its size limit is skipped (returned unused,
//! counted, logged with a rate limit); a PFN outside RAM is skipped alone.
//! Pages are only ever discarded inside guest RAM, and the host writes guest
//! memory only in the used rings that virtio-queue checked at setup.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::queue::QueueSnapshot;
use super::{DeviceFault, LogLimiter, VIRTIO_F_VERSION_1, VirtioDevice, interrupt};
use crate::error::BalloonError;
use crate::sys;

/// Feature bits of the balloon (virtio 1.2, 5.5.3).
pub mod features {
    /// Host must be told before pages are deflated (not offered).
    pub const MUST_TELL_HOST: u32 = 0;
    /// Statistics queue.
    pub const STATS_VQ: u32 = 1;
    /// Deflate the balloon when the guest runs out of memory.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// Free page hinting (not offered).
    pub const FREE_PAGE_HINT: u32 = 3;
    /// Page poisoning (not offered).
    pub const PAGE_POISON: u32 = 4;
    /// Free page reporting.
    pub const PAGE_REPORTING: u32 = 5;
}

/// Size of a balloon page (the PFN unit), in bytes.
pub const BALLOON_PAGE: u64 = 4096;
/// Largest queue size the device offers.
pub const QUEUE_MAX: u16 = 256;
/// Most PFNs accepted in one inflate or deflate chain (256 KiB of PFNs,
/// 256 MiB of guest memory; Linux sends 256 per chain). With at most 256
/// chains per notification this bounds the work one notification costs.
pub const MAX_PFNS_PER_CHAIN: usize = 1 << 16;
/// Bytes of one statistics entry (`le16 tag; le64 val`, packed).
pub const STAT_ENTRY: usize = 10;
/// Most statistics entries accepted in one buffer.
pub const MAX_STATS: usize = 64;
/// Version of [`BalloonState`] written by this code.
pub const STATE_VERSION: u32 = 1;

/// Names of the statistics tags (virtio 1.2, 5.5.6.3), by tag.
pub const STAT_NAMES: [&str; 10] = [
    "swap-in",
    "swap-out",
    "major-faults",
    "minor-faults",
    "free-memory",
    "total-memory",
    "available-memory",
    "disk-caches",
    "hugetlb-allocations",
    "hugetlb-failures",
];

/// The name of a statistics tag (`tag-N` for tags this device does not know).
pub fn stat_name(tag: u16) -> String {
    STAT_NAMES
        .get(usize::from(tag))
        .map_or_else(|| format!("tag-{tag}"), |s| (*s).to_string())
}

/// What a queue is used for, once features are negotiated. Queue indices
/// are given to the queues that exist in this order, as drivers number
/// them (Linux's and QEMU's numbering): inflate, deflate, then statistics
/// if `STATS_VQ`, free page hints if `FREE_PAGE_HINT`, reporting if
/// `PAGE_REPORTING`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueRole {
    /// Pages the guest gives to the host.
    Inflate,
    /// Pages the guest takes back.
    Deflate,
    /// The guest's memory statistics.
    Stats,
    /// Free pages the guest reports.
    Reporting,
}

/// Counts of what the device did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonCounters {
    /// Pages inflated (given back to the host).
    pub inflated_pages: u64,
    /// Pages deflated (taken back by the guest).
    pub deflated_pages: u64,
    /// Pages discarded through free page reporting.
    pub reported_pages: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
    /// Chains skipped as malformed.
    pub skipped_chains: u64,
    /// PFNs or reported ranges skipped as outside RAM or misaligned.
    pub skipped_pages: u64,
    /// Host discard calls made (a range of contiguous pages is one call).
    pub discard_calls: u64,
    /// Host discard calls that failed.
    pub discard_failures: u64,
    /// Deflated pages the host made resident before the guest touched them
    /// (pre-fault for predicted growth; see `Balloon::prefault_deflated`).
    #[serde(default)]
    pub prefaulted_pages: u64,
}

/// The plain state of a balloon device and its transport, for snapshot and
/// migration; rebuilt with `BalloonHandle::from_state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Target size of the balloon in pages (`num_pages`).
    pub num_pages: u32,
    /// Size the driver reports (`actual`).
    pub actual: u32,
    /// Features the driver negotiated.
    pub acked_features: u64,
    /// Whether the driver set DRIVER_OK.
    pub activated: bool,
    /// The queues, by index.
    pub queues: Vec<QueueSnapshot>,
    /// Queue roles after negotiation, by index.
    pub roles: Vec<Option<QueueRole>>,
    /// The statistics buffer the device holds, if any.
    pub stats_head: Option<u16>,
    /// The latest statistics, as (tag, value).
    pub stats: Vec<(u16, u64)>,
    /// What the device did so far.
    pub counters: BalloonCounters,
    /// Interrupt causes raised and not yet collected by the transport.
    pub pending_interrupts: u32,
    /// The virtio-mmio transport.
    pub mmio: super::mmio::MmioState,
}

/// The balloon device model.
#[derive(Debug)]
pub struct Balloon {
    offered: u64,
    num_pages: u32,
    actual: u32,
    acked: u64,
    activated: bool,
    queues: Vec<Queue>,
    roles: Vec<Option<QueueRole>>,
    stats_head: Option<u16>,
    stats: Vec<(u16, u64)>,
    counters: BalloonCounters,
    interrupts: u32,
    bad_chain: LogLimiter,
    bad_page: LogLimiter,
    discard_failed: LogLimiter,
    prefault_failed: LogLimiter,
    /// Deflated pages still to pre-fault (a budget, not device state: it is
    /// not saved, and a restored device starts without one).
    prefault_budget: u64,
}

/// Why an element was skipped.
#[derive(Debug)]
enum Skip {
    Empty,
    WriteOnly,
    Length(u32),
    TooLong,
    Address(u64),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::Empty => f.write_str("empty chain or head index past the queue size"),
            Skip::WriteOnly => f.write_str("write-only buffer where the device reads"),
            Skip::Length(l) => write!(f, "buffer length {l} is not a whole number of entries"),
            Skip::TooLong => f.write_str("chain longer than the device accepts"),
            Skip::Address(a) => write!(f, "buffer at {a:#x} is outside guest RAM"),
        }
    }
}

impl Default for Balloon {
    fn default() -> Self {
        Self::new()
    }
}

impl Balloon {
    /// A balloon offering statistics, deflate-on-OOM and free page reporting.
    pub fn new() -> Self {
        let offered = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << features::STATS_VQ)
            | (1 << features::DEFLATE_ON_OOM)
            | (1 << features::PAGE_REPORTING);
        Balloon {
            offered,
            num_pages: 0,
            actual: 0,
            acked: 0,
            activated: false,
            queues: fresh_queues(),
            roles: vec![None; 4],
            stats_head: None,
            stats: Vec::new(),
            counters: BalloonCounters::default(),
            interrupts: 0,
            bad_chain: LogLimiter::default(),
            bad_page: LogLimiter::default(),
            discard_failed: LogLimiter::default(),
            prefault_failed: LogLimiter::default(),
            prefault_budget: 0,
        }
    }

    /// Sets the target size of the balloon, in pages; raises a
    /// configuration-change interrupt.
    pub fn set_target_pages(&mut self, pages: u32) {
        if pages != self.num_pages {
            self.num_pages = pages;
            self.interrupts |= interrupt::CONFIG;
        }
    }

    /// Pre-fault up to `pages` of the pages the guest deflates from now on,
    /// as it deflates them: the companion forecasts growth, the balloon
    /// hands memory back, and the host makes it resident before the guest's
    /// first touch instead of on it. Replaces any budget left.
    pub fn prefault_deflated(&mut self, pages: u64) {
        self.prefault_budget = pages;
    }

    /// Deflated pages still to pre-fault.
    pub fn prefault_budget(&self) -> u64 {
        self.prefault_budget
    }

    /// The target, in pages.
    pub fn target_pages(&self) -> u32 {
        self.num_pages
    }

    /// The balloon size the driver reports, in pages.
    pub fn actual_pages(&self) -> u32 {
        self.actual
    }

    /// Whether the driver negotiated `feature`.
    pub fn acked(&self, feature: u32) -> bool {
        self.acked & (1 << feature) != 0
    }

    /// Whether the driver set DRIVER_OK.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// The latest statistics, as (tag, value).
    pub fn stats(&self) -> &[(u16, u64)] {
        &self.stats
    }

    /// What the device did so far.
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// Asks the guest for fresh statistics by giving back the buffer the
    /// device holds (virtio 1.2, 5.5.6.3); false when it holds none.
    pub fn request_stats(&mut self, mem: &GuestMemoryMmap) -> bool {
        let Some(head) = self.stats_head.take() else {
            return false;
        };
        let Some(q) = self.queue_for(QueueRole::Stats) else {
            return false;
        };
        match q.add_used(mem, head, 0) {
            Ok(()) => {
                self.interrupts |= interrupt::VRING;
                true
            }
            Err(e) => {
                if self.bad_chain.hit() {
                    tracing::warn!("balloon: cannot return the statistics buffer: {e}");
                }
                false
            }
        }
    }

    fn queue_for(&mut self, role: QueueRole) -> Option<&mut Queue> {
        let i = self.roles.iter().position(|r| *r == Some(role))?;
        self.queues.get_mut(i)
    }

    /// The state of the device (with the transport's state beside it).
    pub fn state(&self, mmio: super::mmio::MmioState) -> BalloonState {
        BalloonState {
            version: STATE_VERSION,
            num_pages: self.num_pages,
            actual: self.actual,
            acked_features: self.acked,
            activated: self.activated,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            roles: self.roles.clone(),
            stats_head: self.stats_head,
            stats: self.stats.clone(),
            counters: self.counters,
            pending_interrupts: self.interrupts,
            mmio,
        }
    }

    /// Rebuilds a device from its state; refuses a state this code cannot
    /// use (other version, unknown features, bad queues) and changes nothing.
    pub fn from_state(state: &BalloonState) -> Result<Self, BalloonError> {
        let bad = |why: String| BalloonError::State(why);
        if state.version != STATE_VERSION {
            return Err(bad(format!(
                "version {} (this device reads version {STATE_VERSION})",
                state.version
            )));
        }
        let mut b = Balloon::new();
        if state.acked_features & !b.offered != 0 {
            return Err(bad(format!(
                "features {:#x} include some this device does not offer ({:#x})",
                state.acked_features, b.offered
            )));
        }
        if state.queues.len() != b.queues.len() || state.roles.len() != b.queues.len() {
            return Err(bad(format!(
                "{} queues and {} roles (this device has {})",
                state.queues.len(),
                state.roles.len(),
                b.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, q) in state.queues.iter().enumerate() {
            if q.max_size != QUEUE_MAX {
                return Err(bad(format!("queue {i} has maximum size {}", q.max_size)));
            }
            queues.push(q.restore().map_err(|e| bad(format!("queue {i}: {e}")))?);
        }
        if let Some(head) = state.stats_head {
            let stats_q = state
                .roles
                .iter()
                .position(|r| *r == Some(QueueRole::Stats))
                .and_then(|i| state.queues.get(i));
            if stats_q.is_none_or(|q| head >= q.size) {
                return Err(bad(format!(
                    "statistics buffer {head} is not in the statistics queue"
                )));
            }
        }
        if state.stats.len() > MAX_STATS {
            return Err(bad(format!("{} statistics entries", state.stats.len())));
        }
        b.num_pages = state.num_pages;
        b.actual = state.actual;
        b.acked = state.acked_features;
        b.activated = state.activated;
        b.queues = queues;
        b.roles = state.roles.clone();
        b.stats_head = state.stats_head;
        b.stats = state.stats.clone();
        b.counters = state.counters;
        b.interrupts = state.pending_interrupts;
        Ok(b)
    }

    fn skip(&mut self, role: QueueRole, head: u16, why: &Skip) {
        self.counters.skipped_chains += 1;
        if self.bad_chain.hit() {
            tracing::warn!(
                queue = ?role,
                head,
                skipped = self.bad_chain.count(),
                "balloon: skipping a malformed element: {why}"
            );
        }
    }

    /// Checks that `[gpa, gpa + len)` lies inside one region of guest RAM.
    fn in_ram(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        mem.find_region(GuestAddress(gpa)).is_some_and(|r| {
            let start = r.start_addr().0;
            end <= start.saturating_add(r.len())
        })
    }

    /// Discards `[gpa, gpa + len)` (already checked to be in one region).
    fn discard(&mut self, mem: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
        self.counters.discard_calls += 1;
        match sys::discard(mem, gpa, len) {
            Ok(()) => true,
            Err(e) => {
                self.counters.discard_failures += 1;
                if self.discard_failed.hit() {
                    tracing::warn!(gpa, len, "balloon: cannot give pages back to the host: {e}");
                }
                false
            }
        }
    }

    /// Populates deflated `pages` (sorted PFN addresses) while the budget lasts.
    fn prefault(&mut self, mem: &GuestMemoryMmap, pages: &[u64]) {
        for (start, count) in runs(pages) {
            let count = count.min(self.prefault_budget);
            if count == 0 {
                return;
            }
            let len = count * BALLOON_PAGE;
            let done = if Self::in_ram(mem, start, len) {
                sys::populate(mem, start, len).map(|()| count)
            } else {
                (0..count).try_fold(0, |n, p| {
                    sys::populate(mem, start + p * BALLOON_PAGE, BALLOON_PAGE).map(|()| n + 1)
                })
            };
            match done {
                Ok(n) => {
                    self.prefault_budget -= n;
                    self.counters.prefaulted_pages += n;
                }
                Err(e) => {
                    // Lazy faulting still works; stop trying for this budget.
                    self.prefault_budget = 0;
                    if self.prefault_failed.hit() {
                        tracing::warn!("balloon: pre-fault of deflated pages stopped: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Reads the PFN array of an inflate or deflate chain.
    fn read_pfns(
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<Vec<u32>, Skip> {
        let mut pfns = Vec::new();
        let mut any = false;
        for desc in chain {
            any = true;
            if desc.is_write_only() {
                return Err(Skip::WriteOnly);
            }
            if desc.len() % 4 != 0 {
                return Err(Skip::Length(desc.len()));
            }
            let n = (desc.len() / 4) as usize;
            if pfns.len() + n > MAX_PFNS_PER_CHAIN {
                return Err(Skip::TooLong);
            }
            let mut buf = vec![0u8; n * 4];
            mem.read_slice(&mut buf, desc.addr())
                .map_err(|_| Skip::Address(desc.addr().0))?;
            pfns.extend(
                buf.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        if !any {
            return Err(Skip::Empty);
        }
        Ok(pfns)
    }

    /// Keeps the PFNs whose page lies in RAM, sorted and deduplicated, and
    /// counts the others.
    fn valid_pages(&mut self, mem: &GuestMemoryMmap, pfns: Vec<u32>) -> Vec<u64> {
        let mut pages: Vec<u64> = Vec::with_capacity(pfns.len());
        for pfn in pfns {
            let gpa = u64::from(pfn) * BALLOON_PAGE;
            if Self::in_ram(mem, gpa, BALLOON_PAGE) {
                pages.push(gpa);
            } else {
                self.counters.skipped_pages += 1;
                if self.bad_page.hit() {
                    tracing::warn!(
                        pfn,
                        skipped = self.bad_page.count(),
                        "balloon: PFN outside guest RAM skipped"
                    );
                }
            }
        }
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    fn inflate_or_deflate(
        &mut self,
        role: QueueRole,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) {
        let head = chain.head_index();
        let pfns = match Self::read_pfns(chain, mem) {
            Ok(p) => p,
            Err(why) => return self.skip(role, head, &why),
        };
        let pages = self.valid_pages(mem, pfns);
        let n = pages.len() as u64;
        if role == QueueRole::Inflate {
            for (start, count) in runs(&pages) {
                // A run of contiguous pages may still cross a region boundary.
                if Self::in_ram(mem, start, count * BALLOON_PAGE) {
                    self.discard(mem, start, count * BALLOON_PAGE);
                } else {
                    for p in 0..count {
                        self.discard(mem, start + p * BALLOON_PAGE, BALLOON_PAGE);
                    }
                }
            }
            self.counters.inflated_pages += n;
        } else {
            // Without MUST_TELL_HOST the guest may already use the pages;
            // they fault back in on first touch, unless the companion asked
            // for them to be made resident now (pages already present are
            // left as they are).
            self.counters.deflated_pages += n;
            self.prefault(mem, &pages);
        }
    }

    fn stats_buffer(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<(), Skip> {
        let mut bytes = Vec::new();
        let mut any = false;
        for desc in chain {
            any = true;
            if desc.is_write_only() {
                return Err(Skip::WriteOnly);
            }
            let len = desc.len() as usize;
            if bytes.len() + len > MAX_STATS * STAT_ENTRY {
                return Err(Skip::TooLong);
            }
            let mut buf = vec![0u8; len];
            mem.read_slice(&mut buf, desc.addr())
                .map_err(|_| Skip::Address(desc.addr().0))?;
            bytes.extend_from_slice(&buf);
        }
        if !any {
            return Err(Skip::Empty);
        }
        if bytes.len() % STAT_ENTRY != 0 {
            return Err(Skip::Length(u32::try_from(bytes.len()).unwrap_or(u32::MAX)));
        }
        self.stats = bytes
            .chunks_exact(STAT_ENTRY)
            .map(|e| {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(&e[2..10]);
                (tag, u64::from_le_bytes(v))
            })
            .collect();
        self.counters.stats_updates += 1;
        Ok(())
    }

    fn report(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<(), Skip> {
        let mut ranges = Vec::new();
        for desc in chain {
            let (gpa, len) = (desc.addr().0, u64::from(desc.len()));
            if len == 0
                || gpa % BALLOON_PAGE != 0
                || len % BALLOON_PAGE != 0
                || !Self::in_ram(mem, gpa, len)
            {
                self.counters.skipped_pages += 1;
                if self.bad_page.hit() {
                    tracing::warn!(
                        gpa,
                        len,
                        "balloon: reported range misaligned or outside guest RAM skipped"
                    );
                }
                continue;
            }
            ranges.push((gpa, len));
        }
        if ranges.is_empty() {
            return Err(Skip::Empty);
        }
        for (gpa, len) in ranges {
            if self.discard(mem, gpa, len) {
                self.counters.reported_pages += len / BALLOON_PAGE;
            }
        }
        Ok(())
    }
}

/// Runs of contiguous pages in a sorted list: (first page address, pages).
fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((start, count)) if *start + *count * BALLOON_PAGE == p => *count += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

fn fresh_queues() -> Vec<Queue> {
    (0..4)
        .filter_map(|_| <Queue as QueueT>::new(QUEUE_MAX).ok())
        .collect()
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON
    }

    fn offered_features(&self) -> u64 {
        self.offered
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; 16];
        space[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        space[4..8].copy_from_slice(&self.actual.to_le_bytes());
        // free_page_hint_cmd_id and poison_val: features not offered, 0.
        data.fill(0);
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(v) = off.checked_add(i).and_then(|j| space.get(j)) {
                *b = *v;
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        // Only `actual` is writable by the driver.
        if offset == 4 && data.len() == 4 {
            self.actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            true
        } else {
            false
        }
    }

    fn activate(&mut self, features: u64, _mem: &GuestMemoryMmap) -> Result<(), DeviceFault> {
        self.acked = features;
        let mut roles = vec![Some(QueueRole::Inflate), Some(QueueRole::Deflate)];
        if self.acked(features::STATS_VQ) {
            roles.push(Some(QueueRole::Stats));
        }
        if self.acked(features::PAGE_REPORTING) {
            roles.push(Some(QueueRole::Reporting));
        }
        roles.resize(self.queues.len(), None);
        for (i, role) in roles.iter().enumerate() {
            let ready = self.queues.get(i).is_some_and(|q| q.ready());
            if role.is_some() && !ready {
                return Err(DeviceFault(format!(
                    "driver set DRIVER_OK without setting up queue {i} ({role:?})"
                )));
            }
        }
        self.roles = roles;
        self.activated = true;
        Ok(())
    }

    fn queue_notify(&mut self, index: usize, mem: &GuestMemoryMmap) -> Result<(), DeviceFault> {
        let Some(role) = self.roles.get(index).copied().flatten() else {
            // A queue with no role after negotiation: nothing to do.
            if self.bad_chain.hit() {
                tracing::warn!(index, "balloon: notification for an unused queue ignored");
            }
            return Ok(());
        };
        let Some(q) = self.queues.get_mut(index) else {
            return Ok(());
        };
        let chains: Vec<_> = match q.iter(mem) {
            Ok(it) => it.collect(),
            Err(e) => {
                return Err(DeviceFault(format!(
                    "queue {index} ({role:?}): available ring unusable: {e}"
                )));
            }
        };
        let mut used = Vec::with_capacity(chains.len());
        for chain in chains {
            let head = chain.head_index();
            let keep = match role {
                QueueRole::Inflate | QueueRole::Deflate => {
                    self.inflate_or_deflate(role, chain, mem);
                    false
                }
                QueueRole::Stats => match self.stats_buffer(chain, mem) {
                    Ok(()) => true,
                    Err(why) => {
                        self.skip(role, head, &why);
                        false
                    }
                },
                QueueRole::Reporting => {
                    if let Err(why) = self.report(chain, mem) {
                        self.skip(role, head, &why);
                    }
                    false
                }
            };
            if keep {
                // The device holds one statistics buffer; an earlier one
                // (a driver that re-sent without being asked) goes back.
                if let Some(old) = self.stats_head.replace(head) {
                    used.push(old);
                }
            } else {
                used.push(head);
            }
        }
        let Some(q) = self.queues.get_mut(index) else {
            return Ok(());
        };
        let mut returned = false;
        for head in used {
            match q.add_used(mem, head, 0) {
                Ok(()) => returned = true,
                Err(e) => {
                    self.counters.skipped_chains += 1;
                    if self.bad_chain.hit() {
                        tracing::warn!(index, head, "balloon: cannot return element: {e}");
                    }
                }
            }
        }
        if returned {
            self.interrupts |= interrupt::VRING;
        }
        Ok(())
    }

    fn take_interrupts(&mut self) -> u32 {
        std::mem::take(&mut self.interrupts)
    }

    fn reset(&mut self) {
        let target = self.num_pages;
        let counters = self.counters;
        *self = Balloon::new();
        // The host's target and the history survive a driver reset.
        self.num_pages = target;
        self.counters = counters;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_contiguous_pages_only() {
        let p = [0x1000, 0x2000, 0x3000, 0x5000, 0x6000, 0x9000];
        assert_eq!(runs(&p), vec![(0x1000, 3), (0x5000, 2), (0x9000, 1)]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn stat_names_cover_spec_tags_and_unknown_ones() {
        assert_eq!(stat_name(4), "free-memory");
        assert_eq!(stat_name(5), "total-memory");
        assert_eq!(stat_name(77), "tag-77");
    }

    #[test]
    fn config_space_reads_target_and_accepts_only_actual() {
        let mut b = Balloon::new();
        b.set_target_pages(0x1234);
        let mut d = [0u8; 4];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234);
        assert!(b.write_config(4, &7u32.to_le_bytes()));
        assert_eq!(b.actual_pages(), 7);
        assert!(!b.write_config(0, &9u32.to_le_bytes()));
        assert_eq!(b.target_pages(), 0x1234);
        assert!(!b.write_config(4, &[1, 2]));
        let mut far = [0xAAu8; 8];
        b.read_config(12, &mut far);
        assert_eq!(far, [0; 8]);
        b.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0; 8]);
        assert_eq!(b.take_interrupts(), interrupt::CONFIG);
        assert_eq!(b.take_interrupts(), 0);
    }
}
