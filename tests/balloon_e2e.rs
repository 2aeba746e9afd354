//! A real `prescient serve --balloon-forecasts` process driving a lab VM's
//! balloon on real KVM over the hooks socket: pre-balloon at boot, then
//! deflation ahead of the forecast's growth.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Server, free_port, scrape};

use labvm::Workload;
use labvm::testing::kvm_or_skip;
use vmm_hooks::EventKind;

/// A `prescient serve` with these balloon forecasts and a metrics endpoint.
/// Returns the server, the metrics port and the directory holding the
/// forecasts file (kept alive as long as the server).
fn start_server(forecasts: &str) -> (Server, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let fc = dir.path().join("forecasts.json");
    std::fs::write(&fc, forecasts).unwrap();
    let port = free_port();
    let server = Server::start_args(
        false,
        &[
            "--balloon-forecasts",
            fc.to_str().unwrap(),
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    (server, port, dir)
}

#[test]
fn hw_kvm_companion_pre_balloons_then_deflates_ahead_of_forecast_growth() {
    if !kvm_or_skip("hw_kvm_companion_pre_balloons_then_deflates_ahead_of_forecast_growth") {
        return;
    }
    // 256 MiB guest; forecast: 64 MiB now, 160 MiB from 6 s on (late
    // enough that a slow boot is still ready before the deflation).
    let (server, metrics_port, _forecasts) = start_server(
        r#"{"vms": {"fc-1": {
            "forecast": {"points": [{"at_s": 0, "demand_mib": 64}, {"at_s": 6, "demand_mib": 160}]},
            "limits": {"floor_mib": 32, "max_rate_mib_s": 512, "lead_s": 1, "headroom_mib": 16}}}}"#,
    );
    common::run_balloon_labvm(
        &server,
        "fc-1",
        256,
        // The guest would touch all its memory.
        Workload::from_spec("balloon:252:32", 0).unwrap(),
    );

    let events = server.events();
    let kinds: Vec<&EventKind> = events.iter().map(|r| &r.event.kind).collect();
    let ready = kinds
        .iter()
        .position(|k| matches!(k, EventKind::Ready { .. }))
        .unwrap();
    let balloons: Vec<(usize, u64, u64)> = kinds
        .iter()
        .enumerate()
        .filter_map(|(i, k)| match k {
            EventKind::Balloon(s) => Some((i, s.target_mib, s.actual_mib)),
            _ => None,
        })
        .collect();
    // Pre-balloon: 256 - (64 + 16) MiB, reached before the guest was ready.
    let first_after_ready = balloons.iter().find(|b| b.0 > ready).unwrap();
    assert_eq!(
        (first_after_ready.1, first_after_ready.2),
        (176, 176),
        "{balloons:?}"
    );
    // The host committed memory only for the forecast demand at boot.
    let rss_kib = kinds
        .iter()
        .find_map(|k| match k {
            EventKind::BootReport(r) => Some(r.rss_kib),
            _ => None,
        })
        .unwrap();
    assert!(rss_kib < 140 * 1024, "RSS at ready {rss_kib} KiB");
    // Ahead of the growth at 6 s the companion deflated to 256 - 176 = 80.
    let last = balloons.last().unwrap();
    assert_eq!((last.1, last.2), (80, 80), "{balloons:?}");
    // Never below the forecast's needs, never past the floor.
    assert!(balloons.iter().all(|b| b.1 <= 256 - 32));
    // The companion counted what it did.
    let m = scrape(metrics_port);
    assert!(
        m.contains("prescient_balloon_targets_total{kind=\"pre-balloon\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("prescient_balloon_targets_total{kind=\"deflate\"}"),
        "{m}"
    );
    assert!(
        !m.contains("prescient_balloon_targets_total{kind=\"inflate\"}"),
        "{m}"
    );
}
