//! Guest-memory shaping: making guest memory resident before the guest
//! needs it, and giving it back when it does not.
//!
//! The pre-fault engine ([`populate`], [`Prefetcher`]) works on the VMM's
//! host mapping of guest RAM with `MADV_POPULATE_WRITE` (optionally after
//! `MADV_HUGEPAGE`): all planned ranges before the vCPUs start, a prefetch
//! thread running ahead of the guest in predicted first-touch order, or all
//! of RAM. It takes plans as plain data (`vmm_hooks::PrefaultPlan`) and does
//! not decide what to pre-fault; the companion does.

mod prefault;

pub use prefault::{
    HostMapping, PrefaultError, PrefetchStats, Prefetcher, populate, populate_plan, resident_bytes,
    validate_ranges,
};
