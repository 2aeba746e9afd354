//! Writing evaluation results: text tables, JSON and an SVG band plot.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::error::{ModelsError, Result};
use crate::eval::{EvalReport, PlotSeries};

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.4}"))
}

/// Render every table of `report` as fixed-width text.
pub fn render_tables(report: &EvalReport) -> String {
    let mut out = String::new();
    for t in &report.tables {
        let _ = writeln!(
            out,
            "\n== {} / {} / {}: {} series, {} decisions, {} target values ==",
            t.dataset,
            t.metric.column(),
            t.task.name(),
            t.series,
            t.decisions,
            t.rows.first().map_or(0, |r| r.1.n)
        );
        let _ = writeln!(
            out,
            "{:<11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9} {:>7} {:>7}",
            "forecaster",
            "pinball",
            "pin_p50",
            "pin_p90",
            "pin_p99",
            "MAE",
            "cov90",
            "cov99",
            "slack90",
            "slack99",
            "rslk90",
            "rslk99",
            "short90",
            "short99",
            "eqrs90",
            "eqrs99"
        );
        for (name, m) in &t.rows {
            let l = &m.levels;
            let _ = writeln!(
                out,
                "{:<11} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>7.4} {:>7.4} {:>9.4} {:>9.4} {:>7.4} {:>7.4} {:>9.4} {:>9.4} {:>7} {:>7}",
                name,
                m.pinball_mean,
                l[0].pinball,
                l[1].pinball,
                l[2].pinball,
                m.mae,
                l[1].coverage,
                l[2].coverage,
                l[1].slack,
                l[2].slack,
                l[1].relative_slack,
                l[2].relative_slack,
                l[1].shortfall,
                l[2].shortfall,
                opt(l[1].eq_relative_slack),
                opt(l[2].eq_relative_slack),
            );
        }
        if let Some(a) = &t.acceptance {
            let _ = writeln!(
                out,
                "model vs best baseline: pinball {:.4} vs {:.4} ({}) [{}]; coverage p90 {:.2}% p99 {:.2}% [{}]; \
                 equal-coverage rel. slack p90 {:.4} vs {:.4} ({}) = {:+.1}%, p99 {:.4} vs {:.4} ({}) = {:+.1}% [{}]",
                a.model_pinball,
                a.best_pinball,
                a.best_pinball_baseline,
                if a.pinball_ok { "ok" } else { "NOT MET" },
                100.0 * a.model_coverage[0],
                100.0 * a.model_coverage[1],
                if a.coverage_ok { "ok" } else { "NOT MET" },
                a.model_eq_rel_slack[0],
                a.best_eq_rel_slack[0].1,
                a.best_eq_rel_slack[0].0,
                -100.0 * a.eq_rel_slack_reduction[0],
                a.model_eq_rel_slack[1],
                a.best_eq_rel_slack[1].1,
                a.best_eq_rel_slack[1].0,
                -100.0 * a.eq_rel_slack_reduction[1],
                if a.slack_ok { "ok" } else { "NOT MET" },
            );
        }
    }
    out
}

/// Write `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).map_err(|e| ModelsError::io(path, e))
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Draw predicted p50/p90/p99 bands against actuals, one panel per series,
/// for the forecasters named in `show` (e.g. the model and one baseline).
pub fn write_plot_svg(path: &Path, plots: &[PlotSeries], show: &[&str]) -> Result<()> {
    let (w, ph, pad) = (1000.0f64, 260.0f64, 50.0f64);
    let height = ph * plots.len().max(1) as f64 + 20.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (pi, p) in plots.iter().enumerate() {
        let y0 = pi as f64 * ph + 10.0;
        let slots: Vec<i64> = p
            .decisions
            .iter()
            .flat_map(|d| d.targets.iter().map(|t| t.0))
            .collect();
        let (Some(&smin), Some(&smax)) = (slots.iter().min(), slots.iter().max()) else {
            continue;
        };
        let idx: Vec<usize> = show
            .iter()
            .filter_map(|n| p.forecasters.iter().position(|f| f == n))
            .collect();
        let mut vmax = p
            .decisions
            .iter()
            .flat_map(|d| d.targets.iter().map(|t| t.1))
            .fold(0.0f64, f64::max);
        for d in &p.decisions {
            for &k in &idx {
                vmax = vmax.max(d.forecasts[k].p99());
            }
        }
        let vmax = if vmax > 0.0 { vmax * 1.05 } else { 1.0 };
        let span = (smax - smin).max(1) as f64;
        let x = |slot: f64| pad + (slot - smin as f64) / span * (w - 2.0 * pad);
        let y = |v: f64| y0 + ph - 30.0 - v / vmax * (ph - 50.0);
        let _ = writeln!(
            svg,
            r#"<text x="{pad}" y="{}">{} {} (last {} decisions; bands: p50 line, p90 and p99 steps; dots: actual)</text>"#,
            y0 + 10.0,
            xml(&p.dataset),
            xml(&p.series),
            p.decisions.len()
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="#999"/><text x="4" y="{}">{vmax:.3}</text><text x="4" y="{}">0</text>"##,
            y(0.0),
            w - pad,
            y(0.0),
            y(vmax) + 4.0,
            y(0.0)
        );
        for (ci, &k) in idx.iter().enumerate() {
            let color = COLORS[ci % COLORS.len()];
            for (lvl, (opacity, dash)) in [(0.9, ""), (0.6, "4,2"), (0.4, "2,2")].iter().enumerate()
            {
                let mut d = String::new();
                for dec in &p.decisions {
                    let v = dec.forecasts[k].0[lvl];
                    let xa = x(dec.decision_slot as f64 + 0.5);
                    let xb = x(dec.decision_slot as f64 + 12.5);
                    let _ = write!(d, "M{xa:.1},{:.1}L{xb:.1},{:.1}", y(v), y(v));
                }
                let dash = if dash.is_empty() {
                    String::new()
                } else {
                    format!(r#" stroke-dasharray="{dash}""#)
                };
                let _ = writeln!(
                    svg,
                    r#"<path d="{d}" stroke="{color}" stroke-opacity="{opacity}"{dash} fill="none" stroke-width="1.5"/>"#
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
                w - pad - 150.0 + 75.0 * ci as f64,
                y0 + 24.0,
                xml(&p.forecasters[k])
            );
        }
        for dec in &p.decisions {
            for &(slot, v) in &dec.targets {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="black"/>"#,
                    x(slot as f64),
                    y(v)
                );
            }
        }
    }
    let _ = writeln!(svg, "</svg>");
    std::fs::write(path, svg).map_err(|e| ModelsError::io(path, e))
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
