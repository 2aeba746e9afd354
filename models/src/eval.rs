//! Scoring forecasters on trace files exactly as `EVALUATION.md` defines.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::forecast::{Forecaster, History, Horizon, Quantiles};
use crate::metrics::{Metrics, Scorer};
use crate::task::{Task, all_cases};
use crate::trace::{Dataset, Metric, Part, SplitSpec};

/// What to evaluate.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// If set, only series in the Test part of this split are scored (use
    /// the model's split on files it was trained on).
    pub held_out: Option<SplitSpec>,
    /// How many series to record for the band plot.
    pub plot_series: usize,
    /// How many decisions per plotted series (the last ones).
    pub plot_decisions: usize,
}

/// The metrics of every forecaster for one dataset, metric and task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Table {
    /// Dataset name.
    pub dataset: String,
    /// The metric column.
    pub metric: Metric,
    /// The task.
    pub task: Task,
    /// Series scored.
    pub series: usize,
    /// Decision times scored.
    pub decisions: usize,
    /// Forecaster name -> metrics, in forecaster order.
    pub rows: Vec<(String, Metrics)>,
    /// The model against the best baseline, if a `model` row is present.
    pub acceptance: Option<Acceptance>,
}

/// The acceptance checks of issue 5 for one table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Acceptance {
    /// Baseline with the lowest mean pinball loss.
    pub best_pinball_baseline: String,
    /// Its mean pinball loss.
    pub best_pinball: f64,
    /// The model's mean pinball loss.
    pub model_pinball: f64,
    /// Model coverage at p90 and p99.
    pub model_coverage: [f64; 2],
    /// Lowest equal-coverage relative slack of any baseline at p90, p99,
    /// and which baseline.
    pub best_eq_rel_slack: [(String, f64); 2],
    /// The model's equal-coverage relative slack at p90, p99.
    pub model_eq_rel_slack: [f64; 2],
    /// `1 - model / best` at p90, p99 (positive = model tighter).
    pub eq_rel_slack_reduction: [f64; 2],
    /// Coverage within 2 points of 90 % and 0.5 points of 99 %.
    pub coverage_ok: bool,
    /// Pinball below the best baseline's.
    pub pinball_ok: bool,
    /// At least 10 % (p90) and 15 % (p99) less relative slack.
    pub slack_ok: bool,
}

/// One plotted series: targets and forecasts per decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlotSeries {
    /// Dataset name.
    pub dataset: String,
    /// Series id.
    pub series: String,
    /// Forecaster names, matching `forecasts[i]`.
    pub forecasters: Vec<String>,
    /// Per decision: decision slot, target (slot, value) pairs, and the
    /// forecast of each forecaster.
    pub decisions: Vec<PlotDecision>,
}

/// One decision of a plotted series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlotDecision {
    /// Decision time as a slot number.
    pub decision_slot: i64,
    /// Target values by slot.
    pub targets: Vec<(i64, f64)>,
    /// One forecast per forecaster.
    pub forecasts: Vec<Quantiles>,
}

/// Everything `eval` measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalReport {
    /// One table per dataset, metric and task that had cases.
    pub tables: Vec<Table>,
    /// Series recorded for plotting.
    pub plots: Vec<PlotSeries>,
}

type Key = (Metric, Task);

/// Score `forecasters` on one dataset. `progress` gets a line now and then.
pub fn evaluate(
    ds: &Dataset,
    forecasters: &[&dyn Forecaster],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(&str),
) -> EvalReport {
    let t0 = Instant::now();
    let names: Vec<String> = forecasters.iter().map(|f| f.name().to_string()).collect();
    let mut scorers: BTreeMap<Key, Vec<Scorer>> = BTreeMap::new();
    let mut counts: BTreeMap<Key, (usize, usize)> = BTreeMap::new();
    let mut plots = Vec::new();
    let in_scope: Vec<usize> = ds
        .series
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            opts.held_out
                .is_none_or(|sp| sp.part(&s.split_key) == Part::Test)
        })
        .map(|(i, _)| i)
        .collect();
    let total = in_scope.len();
    let mut last_report = Instant::now();
    for (done, &si) in in_scope.iter().enumerate() {
        let s = &ds.series[si];
        for (metric, grid) in &s.metrics {
            let cases = all_cases(grid);
            if cases.is_empty() {
                continue;
            }
            for task in [Task::NextHour, Task::PostRestart] {
                let sel: Vec<_> = cases.iter().filter(|c| c.task == task).collect();
                if sel.is_empty() {
                    continue;
                }
                let hs: Vec<History<'_>> = sel
                    .iter()
                    .map(|c| History {
                        values: &grid.values[..c.visible_len],
                        first_slot: grid.first_slot,
                        decision_slot: c.decision_slot,
                        statics: s.statics,
                    })
                    .collect();
                let horizon = match task {
                    Task::NextHour => Horizon::NextHour,
                    Task::PostRestart => Horizon::AfterRestart,
                };
                let fcs: Vec<Vec<Quantiles>> = forecasters
                    .iter()
                    .map(|f| {
                        let outcomes: Vec<&[f64]> =
                            sel.iter().map(|c| c.targets.as_slice()).collect();
                        f.forecast_sequence(&hs, horizon, &outcomes)
                    })
                    .collect();
                let sc = scorers
                    .entry((*metric, task))
                    .or_insert_with(|| vec![Scorer::default(); forecasters.len()]);
                for (k, f) in fcs.iter().enumerate() {
                    for (c, q) in sel.iter().zip(f) {
                        sc[k].push_all(&c.targets, q);
                    }
                }
                let e = counts.entry((*metric, task)).or_insert((0, 0));
                e.0 += 1;
                e.1 += sel.len();
                if task == Task::NextHour
                    && plots.len() < opts.plot_series
                    && *metric == s.metrics[0].0
                {
                    let skip = sel.len().saturating_sub(opts.plot_decisions);
                    plots.push(PlotSeries {
                        dataset: ds.name.clone(),
                        series: s.id.clone(),
                        forecasters: names.clone(),
                        decisions: sel
                            .iter()
                            .enumerate()
                            .skip(skip)
                            .map(|(j, c)| PlotDecision {
                                decision_slot: c.decision_slot,
                                targets: (1..=12)
                                    .map(|d| c.decision_slot + d)
                                    .filter_map(|slot| {
                                        let i = grid.index_of(slot)?;
                                        let v = grid.values[i];
                                        (!v.is_nan()).then_some((slot, v))
                                    })
                                    .collect(),
                                forecasts: fcs.iter().map(|f| f[j]).collect(),
                            })
                            .collect(),
                    });
                }
            }
        }
        if last_report.elapsed().as_secs_f64() > 5.0 || done + 1 == total {
            last_report = Instant::now();
            let el = t0.elapsed().as_secs_f64();
            let eta = el / (done + 1) as f64 * (total - done - 1) as f64;
            progress(&format!(
                "{}: {}/{} series scored ({el:.0} s elapsed, ~{eta:.0} s left)",
                ds.name,
                done + 1,
                total
            ));
        }
    }
    let mut tables = Vec::new();
    for (key, sc) in scorers {
        let rows: Vec<(String, Metrics)> = names
            .iter()
            .zip(&sc)
            .filter_map(|(n, s)| Some((n.clone(), s.metrics()?)))
            .collect();
        let (series, decisions) = counts.get(&key).copied().unwrap_or((0, 0));
        let acceptance = acceptance(&rows);
        tables.push(Table {
            dataset: ds.name.clone(),
            metric: key.0,
            task: key.1,
            series,
            decisions,
            rows,
            acceptance,
        });
    }
    EvalReport { tables, plots }
}

const BASELINE_NAMES: [&str; 5] = ["prev_hour", "prev_24h", "ewma_sd", "vpa", "vpa_margin"];

fn acceptance(rows: &[(String, Metrics)]) -> Option<Acceptance> {
    let model = &rows.iter().find(|r| r.0 == "model")?.1;
    let base: Vec<&(String, Metrics)> = rows
        .iter()
        .filter(|r| BASELINE_NAMES.contains(&r.0.as_str()))
        .collect();
    let best_pin = base
        .iter()
        .min_by(|a, b| a.1.pinball_mean.total_cmp(&b.1.pinball_mean))?;
    let best_eq = |k: usize| -> (String, f64) {
        base.iter()
            .filter_map(|r| Some((r.0.clone(), r.1.levels[k].eq_relative_slack?)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((String::new(), f64::NAN))
    };
    let b90 = best_eq(1);
    let b99 = best_eq(2);
    let m90 = model.levels[1].eq_relative_slack.unwrap_or(f64::NAN);
    let m99 = model.levels[2].eq_relative_slack.unwrap_or(f64::NAN);
    let red = [1.0 - m90 / b90.1, 1.0 - m99 / b99.1];
    let cov = [model.levels[1].coverage, model.levels[2].coverage];
    Some(Acceptance {
        best_pinball_baseline: best_pin.0.clone(),
        best_pinball: best_pin.1.pinball_mean,
        model_pinball: model.pinball_mean,
        model_coverage: cov,
        coverage_ok: (cov[0] - 0.90).abs() <= 0.02 && (cov[1] - 0.99).abs() <= 0.005,
        pinball_ok: model.pinball_mean < best_pin.1.pinball_mean,
        slack_ok: red[0] >= 0.10 && red[1] >= 0.15,
        best_eq_rel_slack: [b90, b99],
        model_eq_rel_slack: [m90, m99],
        eq_rel_slack_reduction: red,
    })
}
