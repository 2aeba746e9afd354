//! Prescient, the companion daemon and command line.
//!
//! The daemon listens on the hooks socket (see `vmm_hooks::proto`), receives
//! each VM's lifecycle events from its VMM and answers before-boot events
//! with a boot plan: what to pre-fault, and what the predictive allocator
//! reserved for the VM in the host's resource pool (or which resources fall
//! short). This crate holds the daemon's parts; the binary
//! `prescient` wires them to a command line.

mod allocator;
mod balloon_control;
pub mod bench;
mod config;
mod gpu;
pub mod interrupt;
pub mod libvirt;
mod metrics;
pub mod migration;
mod pool;
mod reconcile;
mod server;
mod shape_loop;
pub mod shape_replay;
pub mod shaping;
mod status;
mod store;
mod trace_capture;
mod working_set;

pub use allocator::{AllocatorPolicy, BootUsage, Declared, Forecast, VmClass};
pub use balloon_control::{BalloonControl, BalloonControlError, BalloonForecasts, VmBalloonPlan};
pub use config::{
    AllocatorSection, BalloonSection, Config, ConfigError, DaemonConfig, InterruptSection,
    PlanConfig, PoolSection, StoreConfig,
};
pub use metrics::{Metrics, serve_metrics};
pub use pool::{Demand, Overcommit, Pool, Reservation, Shortfall, host_totals};
pub use reconcile::process_start;
pub use server::{EventRecord, HooksServer, ServeError, ServerConfig};
pub use shape_loop::{ShapingConfig, ShapingLoop, TickOutcome};
pub use status::{
    DaemonStatus, PoolStatus, StatusError, moves_table, query as query_status, request_drain,
    request_undrain, table as status_table,
};
pub use store::{
    BootRow, KeySummary, ProfileKey, ProfileStore, StoreError, StorePolicy, VmRecord, VmSource,
    VmState,
};
pub use trace_capture::{Capture, CaptureError, Touch, capture};
pub use working_set::{
    ChunkPrediction, FrequencyModel, MEMORY_BOOTS, PlanPolicy, WorkingSetModel, plan_from,
    recall_precision,
};
