//! Online learning in the daemon, on real parts: real SQLite store files
//! (a schema 2 file written by the previous Prescient is migrated), a real
//! burn model trained here on samples in the store, and real `prescient
//! serve` processes given a corrupted, a foreign-version and a good model
//! file.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Server, free_port, scrape};
use prescient::online::{Decision, retrain_once, sibling};
use prescient::{
    DaemonStatus, ForecastConfig, Metrics, Online, ProfileStore, Sample, ServedForecast,
    StorePolicy,
};
use vmm_hooks::{
    BalloonStatus, Event, EventKind, HookReply, LifecycleHook, SocketHook, SocketHookConfig,
    StopStatus, VmIdentity, VmSpec,
};

fn version(p: &Path) -> i64 {
    rusqlite::Connection::open(p)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn a_schema_version_2_store_is_migrated_to_3_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    // Written by the previous Prescient (schema 2: the version 1 file of
    // pool_e2e migrated by main's `prescient serve` and shut down cleanly).
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/store-v2.db"),
        &path,
    )
    .unwrap();
    assert_eq!(version(&path), 2);
    {
        let mut store = ProfileStore::open(&path, StorePolicy::default()).unwrap();
        assert_eq!(store.boot_rows().unwrap(), 20);
        assert_eq!(
            store.state("clean_shutdown_unix_ms").unwrap().as_deref(),
            Some("1795374961738")
        );
        assert_eq!(store.sample_rows().unwrap(), 0);
        // The new tables work.
        let s = |vm: &str, at: i64| Sample {
            vm_id: vm.into(),
            metric: "mem_mib".into(),
            at_unix_ms: at,
            value: 1.5,
            vcpus: Some(2),
            memory_mib: Some(512),
        };
        let f = ServedForecast {
            vm_id: "a".into(),
            at_unix_ms: 3,
            metric: "mem_mib".into(),
            forecaster: "baseline:prev_hour".into(),
            reason: "no model outcomes".into(),
            quantiles: [1.0, 2.0, 3.0],
        };
        store
            .write_online(&[s("a", 1), s("a", 2), s("b", 3)], std::slice::from_ref(&f))
            .unwrap();
        assert_eq!(store.samples("mem_mib", 0, 10).unwrap()[0], s("a", 1));
        assert_eq!(store.served_forecasts(Some("a"), 5).unwrap(), vec![f]);
        // Bounded: older than 2 ms goes, then the oldest beyond 1 row.
        assert_eq!(store.prune_online(2, 10, 10).unwrap(), (1, 0));
        assert_eq!(store.prune_online(0, 1, 0).unwrap(), (1, 1));
        assert_eq!(store.samples("mem_mib", 0, 10).unwrap(), vec![s("b", 3)]);
    }
    assert_eq!(version(&path), 3);
    // A daemon runs on it.
    let server = Server::start_in(dir, true, &[]);
    let log = server.stop();
    assert!(log.contains("profile store open"), "{log}");
}

/// `vms` VMs' memory in use, every 5 minutes over `days` days ending at
/// `end_s`: each VM's level times a pattern that steps between low and
/// high every two hours of the day (`constant`: a flat line).
fn fill_store(store: &Path, vms: usize, days: i64, end_s: i64, constant: bool) {
    let mut db = ProfileStore::open(store, StorePolicy::default()).unwrap();
    let mut batch = Vec::new();
    let slots = days * 288;
    for v in 0..vms {
        let level = 100.0 + 37.0 * v as f64;
        for k in 0..slots {
            let at = end_s - (slots - 1 - k) * 300;
            let hour = at.rem_euclid(86_400) / 3600;
            let value = if constant {
                level
            } else if (hour / 2) % 2 == 0 {
                level * 0.3
            } else {
                level * (1.6 + 0.05 * ((k * 7 + v as i64) % 5) as f64)
            };
            batch.push(Sample {
                vm_id: format!("vm-{v}"),
                metric: "mem_mib".into(),
                at_unix_ms: at * 1000,
                value,
                vcpus: Some(2),
                memory_mib: Some(4096),
            });
        }
    }
    db.write_online(&batch, &[]).unwrap();
}

fn retrain_config(model: &Path) -> ForecastConfig {
    ForecastConfig {
        model: Some(model.to_path_buf()),
        retrain_epochs: 16,
        retrain_hidden: 16,
        retrain_cpu_share: 1.0,
        retrain_max_seconds: 600.0,
        holdout_s: 6 * 3600,
        min_holdout_cases: 10,
        ..ForecastConfig::default()
    }
}

/// A model that forecasts nothing useful: random weights, no training.
fn save_untrained(path: &Path) -> Vec<u8> {
    models::LearnedForecaster::untrained(8).save(path).unwrap();
    std::fs::read(path).unwrap()
}

const END_S: i64 = 1_795_000_000 - 1_795_000_000 % 86_400 + 20 * 3600;

#[test]
fn retraining_installs_a_better_model_keeps_the_previous_file_and_then_leaves_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let model = dir.path().join("forecast.model");
    fill_store(&store, 12, 3, END_S, false);
    let old = save_untrained(&model);
    let metrics = Arc::new(Metrics::new());
    let online = Online::new(retrain_config(&model), Some(&store), Arc::clone(&metrics));
    let old_id = online.model().unwrap().id.clone();
    let mut db = ProfileStore::open(&store, StorePolicy::default()).unwrap();
    let out = retrain_once(&online, &mut db, END_S * 1000 + 1).unwrap();
    assert_eq!(out.decision, Decision::Installed, "{}", out.summary());
    // The served model was fine-tuned (its width kept), not replaced by a
    // fresh network.
    assert_eq!(out.fine_tuned_from.as_deref(), Some(old_id.as_str()));
    let (best_name, best) = out.best_baseline.clone().unwrap();
    let cand = out.candidate_loss.unwrap();
    assert!(
        cand < best && cand < out.model_loss.unwrap(),
        "{}",
        out.summary()
    );
    assert!(out.samples == 12 * 3 * 288 && out.holdout_cases >= 10);
    // The old file is kept as .prev; the new one is at the path, loads,
    // and is served.
    assert_eq!(std::fs::read(sibling(&model, "prev")).unwrap(), old);
    assert!(!sibling(&model, "candidate").exists());
    let new_id = out.installed.clone().unwrap();
    assert_ne!(new_id, old_id);
    let reloaded = models::LearnedForecaster::load(&model).unwrap();
    assert_eq!(reloaded.id(), new_id);
    assert_eq!(online.model().unwrap().id, new_id);
    assert!(
        metrics
            .render()
            .contains(r#"prescient_retrain_runs_total{kind="installed"} 1"#)
    );
    eprintln!("installed: {} (best baseline {best_name})", out.summary());
    // The next run finds the model better than the best baseline on the
    // same window: nothing is trained, nothing replaced.
    let installed = std::fs::read(&model).unwrap();
    let out = retrain_once(&online, &mut db, END_S * 1000 + 1).unwrap();
    assert_eq!(out.decision, Decision::ModelGood, "{}", out.summary());
    assert_eq!(out.candidate_loss, None);
    assert_eq!(std::fs::read(&model).unwrap(), installed);
    assert_eq!(std::fs::read(sibling(&model, "prev")).unwrap(), old);
    // A restart loads the installed model.
    let again = Online::new(
        retrain_config(&model),
        Some(&store),
        Arc::new(Metrics::new()),
    );
    assert_eq!(again.model().unwrap().id, new_id);
}

#[test]
fn a_candidate_that_cannot_beat_the_best_baseline_never_replaces_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let model = dir.path().join("forecast.model");
    // Flat series: the last hour's quantiles are exact; no model beats them.
    fill_store(&store, 12, 3, END_S, true);
    let old = save_untrained(&model);
    let online = Online::new(
        retrain_config(&model),
        Some(&store),
        Arc::new(Metrics::new()),
    );
    let old_id = online.model().unwrap().id.clone();
    let mut db = ProfileStore::open(&store, StorePolicy::default()).unwrap();
    let out = retrain_once(&online, &mut db, END_S * 1000 + 1).unwrap();
    assert_eq!(out.decision, Decision::CandidateWorse, "{}", out.summary());
    assert!(out.candidate_loss.unwrap() >= out.best_baseline.unwrap().1);
    assert_eq!(std::fs::read(&model).unwrap(), old);
    assert!(!sibling(&model, "prev").exists());
    assert!(!sibling(&model, "candidate").exists());
    assert_eq!(online.model().unwrap().id, old_id);
}

#[test]
fn retraining_without_enough_held_out_data_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let model = dir.path().join("forecast.model");
    // Two hours of samples: no next-hour decision with 6 h of history.
    fill_store(&store, 3, 0, END_S, false);
    let mut db = ProfileStore::open(&store, StorePolicy::default()).unwrap();
    db.write_online(
        &(0..24)
            .map(|k| Sample {
                vm_id: "short".into(),
                metric: "mem_mib".into(),
                at_unix_ms: (END_S - 300 * k) * 1000,
                value: 5.0,
                vcpus: None,
                memory_mib: None,
            })
            .collect::<Vec<_>>(),
        &[],
    )
    .unwrap();
    let online = Online::new(
        retrain_config(&model),
        Some(&store),
        Arc::new(Metrics::new()),
    );
    assert!(online.model().is_none());
    let out = retrain_once(&online, &mut db, END_S * 1000 + 1).unwrap();
    assert_eq!(out.decision, Decision::NotEnoughData, "{}", out.summary());
    assert_eq!(out.samples, 24);
    assert!(!model.exists());
}

fn event(vm: &str, seq: u64, kind: EventKind) -> Event {
    Event {
        vm: VmIdentity {
            vm_id: vm.into(),
            image_digest: "img".into(),
            package_digest: "pkg".into(),
        },
        seq,
        at_unix_ms: 1,
        kind,
    }
}

/// A 1024 MiB guest using 300 MiB, balloon at 0.
fn status() -> BalloonStatus {
    let mut s = BalloonStatus::new(1024);
    s.driver_ok = true;
    s.stats_updates = 1;
    s.guest_stats = vec![
        ("total-memory".into(), 1024 << 20),
        ("available-memory".into(), (1024 - 300) << 20),
    ];
    s
}

fn daemon_status(server: &Server) -> DaemonStatus {
    prescient::query_status(&server.socket, Duration::from_secs(5)).unwrap()
}

/// Runs one VM against `server` until the shaping loop has served it a
/// forecast; returns the daemon's status then.
fn drive_until_served(server: &Server) -> DaemonStatus {
    let mut hc = SocketHookConfig::new(&server.socket, "test-vmm");
    hc.timeout = Duration::from_secs(5);
    let mut hook = SocketHook::new(hc);
    let created = hook.on_event(&event(
        "on-1",
        0,
        EventKind::Created {
            spec: VmSpec {
                vcpus: 2,
                memory_mib: 1024,
                vmm: "test-vmm".into(),
                priority: 0,
                interruptible: false,
            },
        },
    ));
    assert_eq!(created, HookReply::Ack);
    let start = Instant::now();
    let mut seq = 1;
    loop {
        hook.on_event(&event("on-1", seq, EventKind::Balloon(status())));
        seq += 1;
        let s = daemon_status(server);
        if !s.forecasts.is_empty() {
            hook.on_event(&event(
                "on-1",
                seq,
                EventKind::Stopped {
                    status: StopStatus::Stopped,
                },
            ));
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no forecast served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A saved model file with `damage` applied to its bytes.
fn damaged_model(dir: &Path, name: &str, damage: impl Fn(&mut Vec<u8>)) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut bytes = save_untrained(&path);
    damage(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_corrupted_or_foreign_version_model_is_rejected_and_the_daemon_serves_baselines() {
    let files = tempfile::tempdir().unwrap();
    let corrupted = damaged_model(files.path(), "corrupted.model", |b| {
        let n = b.len();
        b[n - 9] ^= 0x5a;
    });
    let foreign = damaged_model(files.path(), "foreign.model", |b| {
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
    });
    for (path, reason, words) in [
        (&corrupted, "corrupted", "checksum"),
        (&foreign, "other-version", "format version 7"),
    ] {
        let (server, port) = serve_with_model(path);
        let s = drive_until_served(&server);
        let m = s.model.clone().unwrap();
        assert_eq!(m.loaded, None);
        assert!(m.rejected.as_ref().unwrap().contains(words), "{m:?}");
        assert_eq!(s.forecasts.len(), 1);
        let f = &s.forecasts[0];
        assert!(f.forecaster.starts_with("baseline:"), "{f:?}");
        assert_eq!(f.vm_id, "on-1");
        let text = scrape(port);
        assert!(
            text.contains(&format!(
                "prescient_model_rejected_total{{kind=\"{reason}\"}} 1"
            )),
            "{text}"
        );
        assert!(text.contains("prescient_model_loaded 0"), "{text}");
        assert!(
            text.contains(&format!(
                "prescient_forecasts_served_total{{kind=\"{}\"}}",
                f.forecaster
            )),
            "{text}"
        );
        let store = server.store.clone();
        let (log, _dir) = server.stop_keep_dir();
        assert!(
            log.contains("model file rejected, serving the baselines"),
            "{log}"
        );
        assert!(log.contains(&path.display().to_string()), "{log}");
        assert!(log.contains(words), "{log}");
        // What was served, and the samples it was made from, are in the store.
        let db = ProfileStore::open(&store, StorePolicy::default()).unwrap();
        let served = db.served_forecasts(Some("on-1"), 100).unwrap();
        assert!(!served.is_empty());
        assert!(served.iter().all(|f| f.forecaster.starts_with("baseline:")));
        let samples = db.samples("mem_mib", 0, 1000).unwrap();
        assert!(samples.len() >= 2, "{samples:?}");
        assert!(
            samples
                .iter()
                .all(|s| s.vm_id == "on-1" && s.value == 300.0)
        );
    }
}

/// A daemon serving the model at `path`, shaping every second, with its
/// metrics on the returned port.
fn serve_with_model(path: &std::path::Path) -> (Server, u16) {
    let port = free_port();
    let server = Server::start_args(
        true,
        &[
            "--shape-interval-s",
            "1",
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
            "--model",
            path.to_str().unwrap(),
        ],
    );
    (server, port)
}

#[test]
fn a_good_model_is_loaded_and_each_served_forecast_names_its_forecaster() {
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("good.model");
    save_untrained(&path);
    let id = models::LearnedForecaster::load(&path).unwrap().id();
    let (server, port) = serve_with_model(&path);
    let s = drive_until_served(&server);
    let m = s.model.clone().unwrap();
    assert_eq!(m.loaded.as_deref(), Some(id.as_str()));
    assert!(id.starts_with("model:") && id.ends_with("@v1"), "{id}");
    // No or too few model outcomes yet: the best baseline serves, and
    // says why.
    let f = &s.forecasts[0];
    assert!(f.forecaster.starts_with("baseline:"), "{f:?}");
    assert!(f.reason.contains("model outcomes"), "{f:?}");
    let table = prescient::status_table(&s);
    assert!(table.contains(&id), "{table}");
    assert!(table.contains("baseline:"), "{table}");
    let text = scrape(port);
    assert!(text.contains("prescient_model_loaded 1"), "{text}");
    let log = server.stop();
    assert!(log.contains("forecasting model loaded"), "{log}");
}

/// The scheduling policy (`/proc/PID/task/TID/stat` field 41) of each of
/// `pid`'s threads, by thread name.
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(t.join("comm")),
            std::fs::read_to_string(t.join("stat")),
        ) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After ')': field 3 is index 0, so field 41 is index 38.
        out.push((comm.trim().to_string(), f[38].parse().unwrap()));
    }
    out
}

#[test]
fn the_daemon_retrains_periodically_on_its_own_thread_at_the_lowest_cpu_priority() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // 6 VMs x 30 h of samples ending now, as the shaping loop stores them.
    prescient::bench::fill_samples(&store, 6, 30, i64::try_from(now_s).unwrap(), 3).unwrap();
    let config = dir.path().join("prescient.toml");
    std::fs::write(
        &config,
        "[forecast]\nretrain_interval_s = 1\nretrain_epochs = 1\nretrain_hidden = 8\nmin_holdout_cases = 1\n",
    )
    .unwrap();
    let port = free_port();
    let server = Server::start_in(
        dir,
        true,
        &[
            "--config",
            config.to_str().unwrap(),
            "--shape-interval-s",
            "1",
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let start = Instant::now();
    let text = loop {
        let text = scrape(port);
        if text.contains("prescient_retrain_runs_total{") {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no retraining run: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        text.contains("prescient_retrain_last_cpu_seconds"),
        "{text}"
    );
    // Its threads run at SCHED_IDLE (5).
    let policies = thread_policies(server.pid());
    let retrain: Vec<_> = policies
        .iter()
        .filter(|(n, _)| n.starts_with("prescient-retra") || n.starts_with("prescient-train"))
        .collect();
    assert_eq!(retrain.len(), 2, "{policies:?}");
    assert!(
        retrain.iter().all(|(_, p)| *p == libc::SCHED_IDLE as u32),
        "{policies:?}"
    );
    // The hooks path does not.
    assert!(
        policies
            .iter()
            .filter(|(n, _)| !n.starts_with("prescient-retra") && !n.starts_with("prescient-train"))
            .all(|(_, p)| *p == 0),
        "{policies:?}"
    );
    let s = daemon_status(&server);
    let last = s.model.unwrap().last_retrain.unwrap();
    assert!(last.contains("held-out decisions"), "{last}");
    let log = server.stop();
    assert!(log.contains("retraining job on"), "{log}");
    assert!(log.contains("retraining run:"), "{log}");
}

#[test]
fn a_model_rejected_at_start_is_set_aside_not_kept_as_previous_when_a_new_one_is_installed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    fill_store(&store, 12, 3, END_S, false);
    let model = damaged_model(dir.path(), "forecast.model", |b| {
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
    });
    let foreign = std::fs::read(&model).unwrap();
    let metrics = Arc::new(Metrics::new());
    let online = Online::new(retrain_config(&model), Some(&store), Arc::clone(&metrics));
    assert!(online.model().is_none());
    assert!(
        online
            .status()
            .rejected
            .unwrap()
            .contains("format version 2")
    );
    assert!(
        metrics
            .render()
            .contains(r#"prescient_model_rejected_total{kind="other-version"} 1"#)
    );
    let mut db = ProfileStore::open(&store, StorePolicy::default()).unwrap();
    let out = retrain_once(&online, &mut db, END_S * 1000 + 1).unwrap();
    assert_eq!(out.decision, Decision::Installed, "{}", out.summary());
    assert_eq!(out.model_loss, None);
    // Nothing to fine-tune: trained from scratch.
    assert_eq!(out.fine_tuned_from, None);
    assert_eq!(std::fs::read(sibling(&model, "rejected")).unwrap(), foreign);
    assert!(!sibling(&model, "prev").exists());
    assert_eq!(
        models::LearnedForecaster::load(&model).unwrap().id(),
        out.installed.unwrap()
    );
    let s = online.status();
    assert_eq!(s.rejected, None);
    assert!(s.last_retrain.unwrap().starts_with("installed"));
}
