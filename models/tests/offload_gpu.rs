#![allow(clippy::unwrap_used)]
#![allow(clippy::print_stdout)]
//! The GPU (wgpu) path against the CPU (flex) path with the same weights:
//! batch inference, a training epoch, the calibration and the forecaster's
//! offloaded batches. Needs the `gpu` feature and a Vulkan adapter; a
//! software one (Mesa's lavapipe) is enough for these tests, which check
//! numbers, never speed. Without an adapter each test prints `SKIP` and
//! returns; `PRESCIENT_REQUIRE=gpu` turns that into a failure.
//!
//! `hw_gpu_` tests need a hardware GPU (a software adapter is a skip).
#![cfg(feature = "gpu")]

use models::{
    CalibrationPlan, Crossover, Forecaster, Gpu, GpuMode, History, Horizon, Kernels,
    LearnedForecaster, Offload, OffloadWorkload, REL_ERR_FLOOR, Statics, Target, calibrate,
    max_relative_error, open_gpu,
};

fn required() -> bool {
    std::env::var("PRESCIENT_REQUIRE").is_ok_and(|v| v.split(',').any(|r| r.trim() == "gpu"))
}

fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match open_gpu() {
        Ok(g) => {
            println!("{test}: adapter {}", g.info());
            Some(g)
        }
        Err(why) => {
            assert!(
                !required(),
                "{test}: a GPU is required (PRESCIENT_REQUIRE) but: {why}"
            );
            println!("SKIP {test}: no GPU adapter: {why}");
            None
        }
    }
}

#[test]
fn gpu_batch_inference_matches_cpu_within_1e_3() {
    let Some(gpu) = gpu_or_skip("gpu_batch_inference_matches_cpu_within_1e_3") else {
        return;
    };
    let wl = OffloadWorkload::synthetic(5000, 5000, 1);
    let k = Kernels::new(128, 3);
    let cpu = k.place(None).infer(wl.features(), wl.rows()).unwrap();
    let on_gpu = k.place(Some(&gpu)).infer(wl.features(), wl.rows()).unwrap();
    assert_eq!(cpu.len(), 5000 * 3);
    let (rel, abs) = max_relative_error(&cpu, &on_gpu, REL_ERR_FLOOR);
    println!("inference: max rel err {rel:.3e}, max abs err {abs:.3e}");
    assert!(rel < 1e-3, "relative error {rel}");
    // The outputs are not trivially equal because they are all zero.
    assert!(cpu.iter().any(|v| v.abs() > 0.1));
}

#[test]
fn gpu_training_epoch_matches_cpu_within_1e_3() {
    let Some(gpu) = gpu_or_skip("gpu_training_epoch_matches_cpu_within_1e_3") else {
        return;
    };
    let wl = OffloadWorkload::synthetic(4096, 4096, 2);
    let k = Kernels::new(64, 5);
    let (cpu_net, cpu_loss) = k.train_epoch(None, &wl, 512, 2e-3, 9);
    let (gpu_net, gpu_loss) = k.train_epoch(Some(&gpu), &wl, 512, 2e-3, 9);
    let probe = &wl.features()[..1024 * models::N_FEATURES];
    let before = k.place(None).infer(probe, 1024).unwrap();
    let a = cpu_net.place(None).infer(probe, 1024).unwrap();
    let b = gpu_net.place(None).infer(probe, 1024).unwrap();
    // Training moved the weights (on both sides) ...
    let (moved, _) = max_relative_error(&before, &a, REL_ERR_FLOOR);
    assert!(moved > 1e-2, "an epoch changed nothing: {moved}");
    // ... to the same place.
    let (rel, abs) = max_relative_error(&a, &b, REL_ERR_FLOOR);
    println!(
        "training epoch: max rel err {rel:.3e}, max abs err {abs:.3e}, loss CPU {cpu_loss:.6} GPU {gpu_loss:.6}"
    );
    assert!(rel < 1e-3, "relative error {rel}");
    assert!((cpu_loss - gpu_loss).abs() <= 1e-3 * cpu_loss.abs());
}

#[test]
fn gpu_calibration_measures_both_sides_at_every_size() {
    let Some(gpu) = gpu_or_skip("gpu_calibration_measures_both_sides_at_every_size") else {
        return;
    };
    let plan = CalibrationPlan {
        inference_rows: vec![16, 256, 2048],
        training_batches: vec![64, 256],
        reps: 1,
        steps: 2,
    };
    let c = calibrate(&gpu, 32, &plan).unwrap();
    let sizes: Vec<usize> = c.inference.iter().map(|t| t.size).collect();
    assert_eq!(sizes, vec![16, 256, 2048]);
    let sizes: Vec<usize> = c.training.iter().map(|t| t.size).collect();
    assert_eq!(sizes, vec![64, 256]);
    for t in c.inference.iter().chain(&c.training) {
        assert!(t.cpu_ms > 0.0 && t.gpu_ms > 0.0, "{t:?}");
    }
    assert_eq!(c.inference_min_rows, models::crossover_of(&c.inference));
    assert_eq!(c.adapter, *gpu.info());
    assert_eq!(c.hidden, 32);
    println!("{}", serde_json::to_string(&c).unwrap());
}

fn histories(values: &[Vec<f64>]) -> Vec<History<'_>> {
    values
        .iter()
        .map(|v| History {
            values: v,
            first_slot: 10_000,
            decision_slot: 10_000 + v.len() as i64 - 1,
            statics: Statics::default(),
        })
        .collect()
}

#[test]
fn gpu_offloaded_forecasts_match_cpu_forecasts() {
    let Some(gpu) = gpu_or_skip("gpu_offloaded_forecasts_match_cpu_forecasts") else {
        return;
    };
    // 600 VMs, two days of history each, different levels and cycles.
    let series: Vec<Vec<f64>> = (0..600)
        .map(|i| {
            (0..576)
                .map(|k| {
                    let level = 1.0 + f64::from(i % 37);
                    let day = f64::from(k % 288) / 288.0 * std::f64::consts::TAU;
                    level * (1.0 + 0.5 * (day + f64::from(i)).sin())
                })
                .collect()
        })
        .collect();
    let hs = histories(&series);
    let cpu_model = LearnedForecaster::untrained(64);
    let cpu = cpu_model.forecast_batch(&hs, Horizon::NextHour);
    // A crossover under which 600 rows go to the GPU and 599 would not.
    let crossover = Crossover {
        format: models::CROSSOVER_FORMAT,
        host: models::host_identity(),
        adapter: gpu.info().clone(),
        hidden: 64,
        measured_unix_s: 0,
        inference: Vec::new(),
        inference_min_rows: Some(600),
        training: Vec::new(),
        training_min_batch: None,
    };
    let offload = Offload::with_crossover(GpuMode::On, gpu, crossover);
    assert_eq!(offload.chooser().inference(600), Target::Gpu);
    assert_eq!(offload.chooser().inference(599), Target::Cpu);
    let gpu_model = cpu_model.with_offload(&offload);
    let on_gpu = gpu_model.forecast_batch(&hs, Horizon::NextHour);
    // The network computes in f32: compare at that precision.
    #[allow(clippy::cast_possible_truncation)]
    let flat = |q: &[models::Quantiles]| -> Vec<f32> {
        q.iter()
            .flat_map(|q| q.0.iter().map(|&v| v as f32))
            .collect()
    };
    let (rel, abs) = max_relative_error(&flat(&cpu), &flat(&on_gpu), REL_ERR_FLOOR);
    println!("forecasts: max rel err {rel:.3e}, max abs err {abs:.3e}");
    assert!(rel < 1e-3, "relative error {rel}");
}

#[test]
fn hw_gpu_auto_mode_opens_the_hardware_gpu_and_measures_a_crossover() {
    let test = "hw_gpu_auto_mode_opens_the_hardware_gpu_and_measures_a_crossover";
    let Some(gpu) = gpu_or_skip(test) else {
        return;
    };
    if gpu.info().software {
        assert!(
            !required(),
            "{test}: a hardware GPU is required (PRESCIENT_REQUIRE) but the adapter is {}",
            gpu.info()
        );
        println!(
            "SKIP {test}: the only adapter is software-emulated ({})",
            gpu.info()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crossover.json");
    let o = Offload::open(GpuMode::Auto, &file, 128, true);
    println!("{}", o.line());
    assert!(o.gpu().is_some(), "{}", o.line());
    let stored = Crossover::load(&file).unwrap();
    assert_eq!(stored.adapter, *gpu.info());
    // Opening again reuses the stored measurement.
    let again = Offload::open(GpuMode::Auto, &file, 128, false);
    assert_eq!(again.crossover(), Some(&stored));
}
