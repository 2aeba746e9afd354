//! End to end: train on a real trace slice, save, load, evaluate; and model
//! file rejection.

use std::path::{Path, PathBuf};

use models::{
    EvalOptions, Forecaster, LearnedForecaster, ModelsError, Task, TrainConfig, baselines,
    evaluate, load_trace, render_tables,
};

fn slice() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/azure-v1-slice.csv.gz")
}

#[test]
fn train_save_load_eval_on_real_trace_slice() {
    let ds = load_trace(&slice()).unwrap();
    assert_eq!(ds.name, "azure-v1-slice");
    assert_eq!(ds.series.len(), 12);
    let cfg = TrainConfig {
        hidden: 16,
        epochs: 2,
        batch: 256,
        max_examples_per_dataset: 600,
        ..TrainConfig::default()
    };
    let (model, rep) = models::train(std::slice::from_ref(&ds), &cfg, &mut |_| {}).unwrap();
    assert!(rep.train_examples > 0 && rep.epochs == 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.bin");
    model.save(&path).unwrap();
    let loaded = LearnedForecaster::load(&path).unwrap();
    assert_eq!(loaded.meta.calibration, model.meta.calibration);
    assert_eq!(loaded.meta.trained_on, vec!["azure-v1-slice".to_string()]);

    // The loaded model forecasts exactly what the trained one does.
    let s = &ds.series[0];
    let g = &s.metrics[0].1;
    let h = models::History {
        values: &g.values[..400],
        first_slot: g.first_slot,
        decision_slot: g.first_slot + 399,
        statics: s.statics,
    };
    let a = model.forecast(&h, models::Horizon::NextHour);
    let b = loaded.forecast(&h, models::Horizon::NextHour);
    assert_eq!(a, b);
    assert!(a.p50() <= a.p90() && a.p90() <= a.p99());

    let base = baselines();
    let mut fs: Vec<&dyn Forecaster> = base.iter().map(|b| b.as_ref()).collect();
    fs.push(&loaded);
    let opts = EvalOptions {
        held_out: None,
        plot_series: 1,
        plot_decisions: 10,
    };
    let rep = evaluate(&ds, &fs, &opts, &mut |_| {});
    assert_eq!(rep.tables.len(), 1, "no gaps in this slice: next_hour only");
    let t = &rep.tables[0];
    assert_eq!(t.task, Task::NextHour);
    // 12 series x decisions at t = 24 h .. 71 h (last target needs 10 slots).
    assert_eq!(t.series, 12);
    assert_eq!(t.decisions, 12 * 48);
    assert_eq!(t.rows.len(), 6);
    assert!(t.acceptance.is_some());
    let text = render_tables(&rep);
    assert!(text.contains("prev_24h") && text.contains("model"));
    assert_eq!(rep.plots.len(), 1);
    let svg = dir.path().join("p.svg");
    models::write_plot_svg(&svg, &rep.plots, &["model", "prev_24h"]).unwrap();
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
}

#[test]
fn online_calibration_uses_only_outcomes_before_each_decision() {
    let ds = load_trace(&slice()).unwrap();
    let g = &ds.series[3].metrics[0].1;
    let cases = models::next_hour_cases(g);
    let hs: Vec<models::History<'_>> = cases
        .iter()
        .map(|c| models::History {
            values: &g.values[..c.visible_len],
            first_slot: g.first_slot,
            decision_slot: c.decision_slot,
            statics: ds.series[3].statics,
        })
        .collect();
    let mut m = LearnedForecaster::untrained(8);
    m.online_gamma = 0.05;
    let outcomes: Vec<&[f64]> = cases.iter().map(|c| c.targets.as_slice()).collect();
    let a = m.forecast_sequence(&hs, models::Horizon::NextHour, &outcomes);
    // Change the outcomes of the last decision: no forecast may change.
    let big = vec![1e6; 12];
    let mut changed = outcomes.clone();
    *changed.last_mut().unwrap() = &big;
    let b = m.forecast_sequence(&hs, models::Horizon::NextHour, &changed);
    assert_eq!(a, b);
    // Change the first decision's outcomes: the second forecast changes.
    let mut changed = outcomes.clone();
    changed[0] = &big;
    let c = m.forecast_sequence(&hs, models::Horizon::NextHour, &changed);
    assert_eq!(a[0], c[0]);
    assert_ne!(a[1], c[1]);
}

fn saved_model(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("m.bin");
    LearnedForecaster::untrained(8).save(&p).expect("save");
    let bytes = std::fs::read(&p).expect("read back");
    (p, bytes)
}

fn reason(r: Result<LearnedForecaster, ModelsError>) -> String {
    match r {
        Err(ModelsError::ModelFile { reason, .. }) => reason,
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!("a bad model file was accepted"),
    }
}

#[test]
fn model_file_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = saved_model(dir.path());
    LearnedForecaster::load(&p).unwrap();
}

#[test]
fn corrupted_model_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut bytes) = saved_model(dir.path());
    let last = bytes.len() - 10;
    bytes[last] ^= 0x55;
    std::fs::write(&p, &bytes).unwrap();
    assert!(reason(LearnedForecaster::load(&p)).contains("corrupted"));
    // Truncated.
    std::fs::write(&p, &bytes[..30]).unwrap();
    let r = reason(LearnedForecaster::load(&p));
    assert!(r.contains("truncated") || r.contains("metadata"), "{r}");
}

#[test]
fn foreign_or_other_version_model_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut bytes) = saved_model(dir.path());
    // Another format version.
    bytes[8] = 99;
    std::fs::write(&p, &bytes).unwrap();
    assert!(reason(LearnedForecaster::load(&p)).contains("format version 99"));
    // Not a model file at all (e.g. a bare burnpack or a trace).
    std::fs::write(&p, b"series,ts,cpu_pct\nfoo").unwrap();
    assert!(reason(LearnedForecaster::load(&p)).contains("magic"));
    // Another feature spec.
    let (p, bytes) = saved_model(dir.path());
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let start = text.find("\"feature_version\":").unwrap() + "\"feature_version\":".len();
    let mut bytes = bytes;
    bytes[start] = b'7';
    std::fs::write(&p, &bytes).unwrap();
    assert!(reason(LearnedForecaster::load(&p)).contains("feature spec"));
}
