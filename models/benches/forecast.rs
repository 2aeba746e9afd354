//! Inference benchmark: one VM and a batch of 10,000 VMs on CPU.
//!
//! `cargo bench -p models --bench forecast [-- MODEL_FILE]` prints a table.
//! Without a model file an untrained network of the default shape is used
//! (inference cost does not depend on the weights).

#![allow(clippy::print_stdout)]

use std::time::Instant;

use models::{Forecaster, History, Horizon, LearnedForecaster, Statics, baselines};

fn synthetic(n_vms: usize, slots: usize) -> Vec<Vec<f64>> {
    (0..n_vms)
        .map(|v| {
            (0..slots)
                .map(|i| {
                    let day = ((i % 288) as f64 / 288.0 * std::f64::consts::TAU).sin();
                    10.0 + (v % 50) as f64 + 5.0 * day + ((i * 7919 + v * 104_729) % 13) as f64
                })
                .collect()
        })
        .collect()
}

fn histories(series: &[Vec<f64>]) -> Vec<History<'_>> {
    series
        .iter()
        .map(|v| History {
            values: v,
            first_slot: 0,
            decision_slot: v.len() as i64 - 1,
            statics: Statics::default(),
        })
        .collect()
}

fn main() {
    let model = match std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        Some(path) => match LearnedForecaster::load(std::path::Path::new(&path)) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
        None => LearnedForecaster::untrained(128),
    };
    // 8 days of 5-minute history per VM (the model reads at most 7 days).
    let series = synthetic(10_000, 8 * 288);
    let hs = histories(&series);
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    let mut fs: Vec<&dyn Forecaster> = Vec::new();
    let base = baselines();
    fs.extend(base.iter().map(|b| b.as_ref()));
    fs.push(&model);
    for f in fs {
        // Warm up, then the median of 101 single forecasts.
        let _ = f.forecast(&hs[0], Horizon::NextHour);
        let mut one: Vec<f64> = (0..101)
            .map(|i| {
                let t = Instant::now();
                let q = f.forecast(&hs[i % hs.len()], Horizon::NextHour);
                std::hint::black_box(q);
                t.elapsed().as_secs_f64()
            })
            .collect();
        one.sort_by(f64::total_cmp);
        let t = Instant::now();
        let q = f.forecast_batch(&hs, Horizon::NextHour);
        std::hint::black_box(q);
        let batch = t.elapsed().as_secs_f64();
        rows.push((f.name().to_string(), one[50], batch));
    }
    println!("| forecaster | one VM (median of 101) | batch of 10,000 VMs |");
    println!("| --- | ---: | ---: |");
    for (n, one, batch) in rows {
        println!("| {n} | {:.3} ms | {:.3} s |", one * 1e3, batch);
    }
}
