//! Prescient, the companion daemon and command line.
//!
//! The daemon listens on the hooks socket (see `vmm_hooks::proto`), receives
//! each VM's lifecycle events from its VMM and answers before-boot events
//! with a boot plan. This crate holds the daemon's parts; the binary
//! `prescient` wires them to a command line.

mod balloon_control;
pub mod bench;
mod config;
mod gpu;
pub mod interrupt;
pub mod libvirt;
mod metrics;
mod server;
mod shape_loop;
pub mod shape_replay;
pub mod shaping;
mod store;
mod trace_capture;
mod working_set;

pub use balloon_control::{BalloonControl, BalloonControlError, BalloonForecasts, VmBalloonPlan};
pub use config::{
    BalloonSection, Config, ConfigError, DaemonConfig, InterruptSection, PlanConfig, StoreConfig,
};
pub use metrics::{Metrics, serve_metrics};
pub use server::{EventRecord, HooksServer, ServeError, ServerConfig};
pub use shape_loop::{ShapingConfig, ShapingLoop, TickOutcome};
pub use store::{BootRow, KeySummary, ProfileKey, ProfileStore, StoreError, StorePolicy};
pub use trace_capture::{Capture, CaptureError, Touch, capture};
pub use working_set::{
    ChunkPrediction, FrequencyModel, MEMORY_BOOTS, PlanPolicy, WorkingSetModel, plan_from,
    recall_precision,
};
