//! A balloon device behind its virtio-mmio transport, shared between the
//! vCPU threads (register accesses) and the VMM's control side (target,
//! statistics, monitoring, state).

use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::GuestMemoryMmap;

use crate::error::BalloonError;
use crate::monitor::{MonitorEvent, TargetMonitor};
use crate::virtio::balloon::{BALLOON_PAGE, Balloon, BalloonCounters, BalloonState, stat_name};
use crate::virtio::mmio::MmioTransport;

const MIB_PAGES: u64 = (1 << 20) / BALLOON_PAGE;

/// A snapshot of what the balloon is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonReport {
    /// Target, in 4 KiB pages.
    pub target_pages: u32,
    /// What the guest reports in the balloon, in 4 KiB pages.
    pub actual_pages: u32,
    /// Whether the driver set DRIVER_OK (and no reset is needed).
    pub driver_ok: bool,
    /// Whether the device asked for a reset.
    pub needs_reset: bool,
    /// The device's counters.
    pub counters: BalloonCounters,
    /// Latest guest statistics, by name.
    pub stats: Vec<(String, u64)>,
    /// Whether the guest currently ignores its target.
    pub unresponsive: bool,
    /// How long the balloon has not come closer to its target, in ms.
    pub stalled_ms: u64,
    /// Whether the guest is below its target because it deflated on OOM.
    pub deflated_on_oom: bool,
}

#[derive(Debug)]
struct Inner {
    transport: MmioTransport<Balloon>,
    monitor: TargetMonitor,
}

/// A shared balloon device. Cloning shares the device.
#[derive(Clone, Debug)]
pub struct BalloonHandle {
    inner: Arc<Mutex<Inner>>,
    mem: Arc<GuestMemoryMmap>,
    memory_pages: u64,
}

impl BalloonHandle {
    /// A new balloon for guest memory `mem`; a guest that does not move
    /// toward its target for `grace_ms` is reported unresponsive.
    pub fn new(mem: Arc<GuestMemoryMmap>, grace_ms: u64) -> Self {
        Self::with_transport(MmioTransport::new(Balloon::new()), mem, grace_ms)
    }

    fn with_transport(
        transport: MmioTransport<Balloon>,
        mem: Arc<GuestMemoryMmap>,
        grace_ms: u64,
    ) -> Self {
        use vm_memory::GuestMemoryBackend;
        let memory_pages = mem
            .iter()
            .map(vm_memory::GuestMemoryRegion::len)
            .sum::<u64>()
            / BALLOON_PAGE;
        BalloonHandle {
            inner: Arc::new(Mutex::new(Inner {
                transport,
                monitor: TargetMonitor::new(grace_ms),
            })),
            mem,
            memory_pages,
        }
    }

    /// Rebuilds a balloon from its state over guest memory `mem`.
    pub fn from_state(
        state: &BalloonState,
        mem: Arc<GuestMemoryMmap>,
        grace_ms: u64,
    ) -> Result<Self, BalloonError> {
        let device = Balloon::from_state(state)?;
        let transport = MmioTransport::from_state(device, state.mmio.clone());
        Ok(Self::with_transport(transport, mem, grace_ms))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The device's state (and its transport's).
    pub fn state(&self) -> BalloonState {
        let inner = self.lock();
        inner.transport.device().state(inner.transport.state())
    }

    /// A register read at `offset` in the device's MMIO window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.lock().transport.read(offset, data);
    }

    /// A register write at `offset` in the device's MMIO window.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.lock().transport.write(offset, data, &self.mem);
    }

    /// The guest memory the device works on.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// Guest RAM in MiB.
    pub fn memory_mib(&self) -> u64 {
        self.memory_pages / MIB_PAGES
    }

    /// Sets the balloon target in MiB; refuses more than guest RAM.
    pub fn set_target_mib(&self, mib: u64) -> Result<(), BalloonError> {
        let pages = mib.saturating_mul(MIB_PAGES);
        let pages = u32::try_from(pages)
            .ok()
            .filter(|&p| u64::from(p) <= self.memory_pages)
            .ok_or(BalloonError::TargetTooLarge {
                target_mib: mib,
                memory_mib: self.memory_mib(),
            })?;
        let mut inner = self.lock();
        inner.transport.device_mut().set_target_pages(pages);
        inner.transport.collect_interrupts();
        Ok(())
    }

    /// Pre-fault up to `mib` MiB of the pages the guest deflates from now
    /// on, as it deflates them (replaces any budget left): memory handed
    /// back for predicted growth is made resident by the host before the
    /// guest's first touch. Pages already present are left as they are.
    pub fn prefault_deflated_mib(&self, mib: u64) {
        let pages = mib.saturating_mul(MIB_PAGES);
        self.lock().transport.device_mut().prefault_deflated(pages);
    }

    /// The target in MiB.
    pub fn target_mib(&self) -> u64 {
        u64::from(self.lock().transport.device().target_pages()) / MIB_PAGES
    }

    /// Asks the guest for fresh statistics; false when the device holds no
    /// statistics buffer (the driver has not sent one, or has not answered
    /// the last request yet).
    pub fn request_stats(&self) -> bool {
        let mut inner = self.lock();
        let asked = inner.transport.device_mut().request_stats(&self.mem);
        inner.transport.collect_interrupts();
        asked
    }

    /// Feeds the monitor at `now_ms` (any monotonic clock); returns what it
    /// concluded.
    pub fn check(&self, now_ms: u64) -> Option<MonitorEvent> {
        let mut inner = self.lock();
        let d = inner.transport.device();
        let (target, actual) = (d.target_pages(), d.actual_pages());
        let oom = d.acked(crate::virtio::balloon::features::DEFLATE_ON_OOM);
        inner.monitor.observe(now_ms, target, actual, oom)
    }

    /// What the balloon is doing now.
    pub fn report(&self) -> BalloonReport {
        let inner = self.lock();
        let d = inner.transport.device();
        BalloonReport {
            target_pages: d.target_pages(),
            actual_pages: d.actual_pages(),
            driver_ok: inner.transport.driver_ok(),
            needs_reset: inner.transport.needs_reset(),
            counters: d.counters(),
            stats: d.stats().iter().map(|&(t, v)| (stat_name(t), v)).collect(),
            unresponsive: inner.monitor.unresponsive(),
            stalled_ms: inner.monitor.stalled_ms(),
            deflated_on_oom: inner.monitor.deflated_on_oom(),
        }
    }
}

impl BalloonReport {
    /// Target in MiB.
    pub fn target_mib(&self) -> u64 {
        u64::from(self.target_pages) / MIB_PAGES
    }

    /// Actual balloon size in MiB.
    pub fn actual_mib(&self) -> u64 {
        u64::from(self.actual_pages) / MIB_PAGES
    }
}
