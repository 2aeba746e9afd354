//! Guest-memory shaping: making guest memory resident before the guest
//! needs it, and giving it back when it does not.
//!
//! - The **pre-fault engine** ([`populate`], [`Prefetcher`]) works on the
//!   VMM's host mapping of guest RAM with `MADV_POPULATE_WRITE` (optionally
//!   after `MADV_HUGEPAGE`): all planned ranges before the vCPUs start, a
//!   prefetch thread running ahead of the guest in predicted first-touch
//!   order, or all of RAM. It takes plans as plain data
//!   (`vmm_hooks::PrefaultPlan`) and does not decide what to pre-fault; the
//!   companion does.
//! - A **virtio-balloon device** (virtio 1.2, 5.5) with inflate, deflate,
//!   statistics and free-page-reporting queues and `DEFLATE_ON_OOM`, on a
//!   **virtio-mmio transport** (4.2, version 2), built on virtio-queue. The
//!   device model knows queues and configuration space; the transport knows
//!   registers; [`BalloonHandle`] shares both between a VMM's vCPU threads
//!   and its control side. Inflated and reported pages go back to the host
//!   (`MADV_DONTNEED`, hole punching for file-backed memory). Guests run
//!   without interrupts here, so the device records interrupt causes in
//!   InterruptStatus and the driver polls.
//! - A **target monitor** that spots a guest ignoring its balloon target.
//! - A **balloon policy** ([`policy`]): a pure function from a demand
//!   forecast (plain data), guest statistics and limits to a balloon
//!   target, with time injected.
//!
//! This crate does not run VMs, talk to the companion or forecast.

mod error;
mod handle;
mod monitor;
pub mod policy;
mod prefault;
mod sys;
mod virtio;

pub use error::BalloonError;
pub use handle::{BalloonHandle, BalloonReport};
pub use monitor::{MonitorEvent, TargetMonitor};
pub use prefault::{
    HostMapping, PrefaultError, PrefetchStats, Prefetcher, populate, populate_plan, resident_bytes,
    validate_ranges,
};
pub use sys::resident_pages;
pub use virtio::balloon::{
    BALLOON_PAGE, Balloon, BalloonCounters, BalloonState, MAX_PFNS_PER_CHAIN, QUEUE_MAX, QueueRole,
    STATE_VERSION, features, stat_name,
};
pub use virtio::mmio::{MMIO_WINDOW, MmioState, MmioTransport, reg};
pub use virtio::queue::QueueSnapshot;
pub use virtio::{DeviceFault, VIRTIO_F_VERSION_1, VirtioDevice, interrupt, status};
