//! `prescient train` and `prescient eval`: command-line glue over the
//! `models` crate (all logic lives there).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use models::{
    Dataset, EvalOptions, EvalReport, Forecaster, GpuMode, LearnedForecaster, ModelsError, Offload,
    TrainConfig, baselines, evaluate, load_trace, render_tables, write_json, write_plot_svg,
};

/// Arguments of `prescient train`.
#[derive(Debug, clap::Args)]
pub(crate) struct TrainArgs {
    /// Trace files (gzip CSV in the trace format).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Where to write the model.
    #[arg(long, default_value = "prescient-model.bin")]
    pub out: PathBuf,
    /// Directory for the held-out evaluation JSON and plot.
    #[arg(long, default_value = "prescient-report")]
    pub report_dir: PathBuf,
    /// Maximum epochs.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Hidden layer width.
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    /// Stop optimising after this many seconds.
    #[arg(long, default_value_t = 360.0)]
    pub max_seconds: f64,
    /// At most this many training examples per file.
    #[arg(long, default_value_t = 200_000)]
    pub max_examples: usize,
    /// Random seed.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Example weight = (series scale / file mean scale)^this.
    #[arg(long, default_value_t = 1.0)]
    pub weight_power: f64,
    /// Training decisions every this many 5-minute slots.
    #[arg(long, default_value_t = 3)]
    pub stride: i64,
    /// How much (relative) calibration pinball loss may be given up for
    /// less slack when choosing the per-level shrink exponent.
    #[arg(long, default_value_t = 0.01)]
    pub shrink_tolerance: f64,
    /// Skip the held-out evaluation after training.
    #[arg(long)]
    pub no_eval: bool,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

/// Where the model's batch kernels run.
#[derive(Debug, clap::Args)]
pub(crate) struct OffloadArgs {
    /// GPU offload: `auto` (a hardware GPU adapter if one opens), `off`, or
    /// `on` (a GPU is reserved for the host; any adapter, software ones
    /// included). The GPU runs batches at or above the measured crossover.
    #[arg(long, default_value = "auto")]
    pub gpu: GpuMode,
    /// The measured crossover (`prescient bench offload` writes it; when
    /// missing or measured elsewhere it is measured now and written here).
    #[arg(long, default_value = models::DEFAULT_CROSSOVER_FILE)]
    pub gpu_crossover: PathBuf,
}

impl OffloadArgs {
    fn open(&self, hidden: usize) -> Offload {
        let o = Offload::open(self.gpu, &self.gpu_crossover, hidden, true);
        progress(o.line());
        o
    }
}

/// Arguments of `prescient eval`.
#[derive(Debug, clap::Args)]
pub(crate) struct EvalArgs {
    /// Trace files (gzip CSV in the trace format).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// A model written by `prescient train`; without it only the baselines
    /// are scored.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Score every series, even in files the model was trained on (by
    /// default those files are scored on their held-out series only).
    #[arg(long)]
    pub all_series: bool,
    /// Write all tables as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw predicted bands against actuals for a few series (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Series per file in the plot.
    #[arg(long, default_value_t = 2)]
    pub plot_series: usize,
    /// Step of the model's per-series online calibration (0 = off).
    #[arg(long, default_value_t = models::ONLINE_GAMMA)]
    pub online_gamma: f64,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

fn progress(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
}

fn load_all(files: &[PathBuf]) -> Result<Vec<Dataset>, ModelsError> {
    let mut out = Vec::new();
    for f in files {
        let t = Instant::now();
        let ds = load_trace(f)?;
        progress(&format!(
            "loaded {} ({} series) in {:.1} s",
            f.display(),
            ds.series.len(),
            t.elapsed().as_secs_f64()
        ));
        out.push(ds);
    }
    Ok(out)
}

fn eval_all(
    datasets: &[Dataset],
    model: Option<&LearnedForecaster>,
    all_series: bool,
    plot_series: usize,
) -> EvalReport {
    let base = baselines();
    let mut fs: Vec<&dyn Forecaster> = base.iter().map(|b| b.as_ref()).collect();
    if let Some(m) = model {
        fs.push(m);
    }
    let mut report = EvalReport::default();
    for ds in datasets {
        let held_out = model
            .filter(|m| !all_series && m.meta.trained_on.contains(&ds.name))
            .map(|m| m.meta.split);
        if held_out.is_some() {
            progress(&format!(
                "{}: the model was trained on this file; scoring its held-out series only",
                ds.name
            ));
        }
        let opts = EvalOptions {
            held_out,
            plot_series,
            plot_decisions: 48,
        };
        let r = evaluate(ds, &fs, &opts, &mut |l| progress(l));
        report.tables.extend(r.tables);
        report.plots.extend(r.plots);
    }
    report
}

fn emit(report: &EvalReport, json: Option<&Path>, plot: Option<&Path>) -> Result<(), ModelsError> {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", render_tables(report));
    if let Some(j) = json {
        write_json(j, report)?;
        progress(&format!("wrote {}", j.display()));
    }
    if let Some(p) = plot {
        write_plot_svg(p, &report.plots, &["model", "prev_24h"])?;
        progress(&format!("wrote {}", p.display()));
    }
    Ok(())
}

/// `prescient train`.
pub(crate) fn run_train(args: TrainArgs) -> Result<(), ModelsError> {
    let datasets = load_all(&args.files)?;
    let cfg = TrainConfig {
        hidden: args.hidden,
        epochs: args.epochs,
        max_seconds: args.max_seconds,
        max_examples_per_dataset: args.max_examples,
        seed: args.seed,
        shrink_pinball_tolerance: args.shrink_tolerance,
        stride_slots: args.stride,
        weight_power: args.weight_power,
        ..TrainConfig::default()
    };
    let t = Instant::now();
    let offload = args.offload.open(cfg.hidden);
    let (model, rep) = models::train_on(&datasets, &cfg, &offload, &mut |l| progress(l))?;
    model.save(&args.out)?;
    progress(&format!(
        "trained in {:.1} s ({} epochs, {:.1} s preparing, {:.1} s optimising); wrote {}",
        t.elapsed().as_secs_f64(),
        rep.epochs,
        rep.prepare_seconds,
        rep.train_seconds,
        args.out.display()
    ));
    if args.no_eval {
        return Ok(());
    }
    std::fs::create_dir_all(&args.report_dir).map_err(|e| ModelsError::Io {
        path: args.report_dir.clone(),
        source: e,
    })?;
    let report = eval_all(&datasets, Some(&model), false, 2);
    write_json(&args.report_dir.join("train.json"), &rep)?;
    emit(
        &report,
        Some(&args.report_dir.join("eval.json")),
        Some(&args.report_dir.join("bands.svg")),
    )
}

/// `prescient eval`.
pub(crate) fn run_eval(args: EvalArgs) -> Result<(), ModelsError> {
    let model = match &args.model {
        Some(p) => {
            let mut m = LearnedForecaster::load(p)?;
            m.online_gamma = args.online_gamma;
            let offload = args.offload.open(m.meta.net.hidden);
            Some(m.with_offload(&offload))
        }
        None => None,
    };
    let datasets = load_all(&args.files)?;
    let report = eval_all(&datasets, model.as_ref(), args.all_series, args.plot_series);
    emit(&report, args.json.as_deref(), args.plot.as_deref())
}
