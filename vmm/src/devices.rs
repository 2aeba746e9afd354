//! labvm's MMIO device bus beyond the lab device: the virtio-balloon
//! (virtio-mmio) at [`BALLOON_MMIO_BASE`], and the periodic work devices
//! need from the controller (statistics requests, target monitoring).
//!
//! Lab guests run at CPL3 without interrupts, so the bus raises none: the
//! guest driver polls InterruptStatus and the used rings.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use balloon::{BalloonHandle, MMIO_WINDOW, MonitorEvent};
use vm_memory::GuestMemoryMmap;

use crate::VmmError;
use crate::layout::BALLOON_MMIO_BASE;

/// How labvm runs its balloon device.
#[derive(Clone, Debug, PartialEq)]
pub struct BalloonConfig {
    /// Target at start, in MiB (pre-balloon; a boot plan may change it).
    pub initial_target_mib: u64,
    /// How often the device asks the guest for statistics.
    pub stats_interval: Duration,
    /// How long a guest may not move toward its target before it is
    /// reported as ignoring it.
    pub grace: Duration,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            initial_target_mib: 0,
            stats_interval: Duration::from_secs(1),
            grace: Duration::from_secs(3),
        }
    }
}

#[derive(Debug)]
struct Tick {
    last_stats: Option<Instant>,
}

/// The devices of one lab VM.
#[derive(Debug)]
pub(crate) struct Devices {
    balloon: Option<BalloonHandle>,
    stats_interval: Duration,
    epoch: Instant,
    tick: Mutex<Tick>,
}

impl Devices {
    pub(crate) fn new(
        config: Option<&BalloonConfig>,
        mem: &Arc<GuestMemoryMmap>,
    ) -> Result<Self, VmmError> {
        let balloon = match config {
            Some(c) => {
                let grace_ms = u64::try_from(c.grace.as_millis()).unwrap_or(u64::MAX);
                let h = BalloonHandle::new(Arc::clone(mem), grace_ms);
                h.set_target_mib(c.initial_target_mib)
                    .map_err(|e| VmmError::Config(e.to_string()))?;
                Some(h)
            }
            None => None,
        };
        Ok(Devices {
            balloon,
            stats_interval: config.map_or(Duration::from_secs(1), |c| c.stats_interval),
            epoch: Instant::now(),
            tick: Mutex::new(Tick { last_stats: None }),
        })
    }

    /// Replaces the balloon with one rebuilt from a saved state.
    pub(crate) fn restore_balloon(
        &mut self,
        state: &balloon::BalloonState,
        mem: &Arc<GuestMemoryMmap>,
        grace_ms: u64,
    ) -> Result<(), VmmError> {
        let h = BalloonHandle::from_state(state, Arc::clone(mem), grace_ms)
            .map_err(|e| VmmError::Config(format!("saved balloon state: {e}")))?;
        self.balloon = Some(h);
        Ok(())
    }

    pub(crate) fn balloon(&self) -> Option<&BalloonHandle> {
        self.balloon.as_ref()
    }

    fn balloon_offset(&self, addr: u64) -> Option<(&BalloonHandle, u64)> {
        let off = addr.checked_sub(BALLOON_MMIO_BASE)?;
        (off < MMIO_WINDOW).then_some(())?;
        Some((self.balloon.as_ref()?, off))
    }

    /// A guest MMIO read; false when no device is at `addr`.
    pub(crate) fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.balloon_offset(addr) {
            Some((b, off)) => {
                b.mmio_read(off, data);
                true
            }
            None => false,
        }
    }

    /// A guest MMIO write; false when no device is at `addr`.
    pub(crate) fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.balloon_offset(addr) {
            Some((b, off)) => {
                b.mmio_write(off, data);
                true
            }
            None => false,
        }
    }

    /// Applies the device part of a boot plan before the vCPUs run: the
    /// pre-balloon target. A VM without a balloon ignores it.
    pub(crate) fn apply_plan(&self, plan: &vmm_hooks::BootPlan) {
        let (Some(mib), Some(b)) = (plan.balloon_target_mib, &self.balloon) else {
            return;
        };
        match b.set_target_mib(mib) {
            Ok(()) => tracing::info!(target_mib = mib, "pre-balloon target from the boot plan"),
            Err(e) => tracing::warn!("boot plan's balloon target refused: {e}"),
        }
    }

    /// Periodic device work, called by the controller about every 100 ms:
    /// asks for statistics every interval and watches the balloon target.
    pub(crate) fn tick(&self) {
        let Some(b) = &self.balloon else {
            return;
        };
        let now = Instant::now();
        {
            let mut t = self
                .tick
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = t
                .last_stats
                .is_none_or(|at| now.saturating_duration_since(at) >= self.stats_interval);
            if due && b.request_stats() {
                t.last_stats = Some(now);
            }
        }
        let now_ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        match b.check(now_ms) {
            Some(MonitorEvent::Unresponsive {
                target,
                actual,
                stalled_ms,
            }) => tracing::warn!(
                target_pages = target,
                actual_pages = actual,
                stalled_ms,
                "the guest is not moving its balloon toward the target"
            ),
            Some(MonitorEvent::DeflatedOnOom { target, actual }) => tracing::info!(
                target_pages = target,
                actual_pages = actual,
                "the guest deflated its balloon below the target on memory pressure (DEFLATE_ON_OOM)"
            ),
            Some(MonitorEvent::Recovered) => {
                tracing::info!("the guest moves its balloon toward the target again");
            }
            None => {}
        }
    }
}
