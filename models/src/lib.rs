//! Forecasters for Prescient.
//!
//! This crate turns a VM's usage history into a forecast: quantiles (p50,
//! p90, p99) of one metric (CPU, memory, disk, network) for the next
//! interval, the next hour, or the first hour after a restart. It holds the
//! trace reader, the five baselines of `EVALUATION.md`, a burn quantile
//! network with its training and model file format, the scorer that
//! implements `EVALUATION.md` exactly, report writers (table, JSON, SVG),
//! and a selector that serves whichever forecaster has measured better.
//!
//! It does not store samples, schedule retraining or talk to a VMM: the
//! daemon does that and calls in here.

mod error;
mod eval;
mod features;
mod forecast;
mod metrics;
mod model;
mod nn;
mod offload;
mod report;
mod selector;
mod task;
mod trace;
mod train;

pub use error::{ModelsError, Result};
pub use eval::{EvalOptions, EvalReport, Table, evaluate};
pub use features::{N_FEATURES, feature_names};
pub use forecast::{
    EwmaSd, Forecaster, History, Horizon, LEVELS, OnlineCalibrator, PrevWindow, Quantiles, Vpa,
    baselines, empirical_quantile,
};
pub use metrics::{LevelMetrics, Metrics, Scorer, equal_coverage_factor, pinball};
pub use model::{Calibration, FORMAT_VERSION, LearnedForecaster, ModelMeta, ONLINE_GAMMA};
pub use offload::{
    CROSSOVER_FORMAT, CalibrationPlan, Chooser, Crossover, DEFAULT_CROSSOVER_FILE, Gpu, GpuInfo,
    GpuMode, Kernels, Offload, OffloadWorkload, PlacedNet, REL_ERR_FLOOR, SizeTiming, Target,
    calibrate, crossover_of, gpu_compiled, host_identity, max_relative_error, open_gpu,
};
pub use report::{render_tables, write_json, write_plot_svg};
pub use selector::{ForecasterSelector, SelectorChoice};
pub use task::{Case, Task, all_cases, next_hour_cases, post_restart_cases};
pub use trace::{
    Dataset, Grid, Metric, Part, STEP_S, Series, SplitSpec, Statics, load_trace, read_trace,
    slot_of, split_counts,
};
pub use train::{TrainConfig, TrainReport, fine_tune, train, train_on};
