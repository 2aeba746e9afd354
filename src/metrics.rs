//! The daemon's Prometheus metrics and their `/metrics` endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of a per-kind counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind (event kind, rejection reason, plan kind).
    pub kind: String,
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Lifecycle events received, by kind.
    pub events: Family<KindLabel, Counter>,
    /// Connections or frames rejected, by reason.
    pub rejected: Family<KindLabel, Counter>,
    /// Boot plans served, by kind (`prefault`, `profile-only`, `empty`).
    pub plans: Family<KindLabel, Counter>,
    /// Boots recorded in the store.
    pub boots_recorded: Counter,
    /// Store errors.
    pub store_errors: Counter,
    /// VMM connections open now.
    pub connections: Gauge,
    /// Time to ready reported by VMMs, seconds.
    pub time_to_ready: Histogram,
    /// Balloon targets set by the companion, by kind (`pre-balloon`,
    /// `inflate`, `deflate`).
    pub balloon_targets: Family<KindLabel, Counter>,
    /// What the daemon did to libvirt domains, by action (`vcpu-pinned`,
    /// `pin-failed`, `balloon-set`, `balloon-failed`, `usage-sampled`,
    /// `domain-failed`).
    pub libvirt_actions: Family<KindLabel, Counter>,
    /// What the interruption coordinator did, by kind (`admit`,
    /// `admit-after-shrink`, `restart-reserved`, `interrupt-ordered`,
    /// `defer`, `shrink-sent`, `interrupt-sent`, `interrupted`).
    pub interrupt_actions: Family<KindLabel, Counter>,
    /// GPUs the NVML inventory found at start (0 without a driver).
    pub gpus: Gauge,
    /// GPU reservations released, by reason (`stopped`, `failed`).
    pub gpu_released: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("prescient");
        let events = Family::<KindLabel, Counter>::default();
        let rejected = Family::<KindLabel, Counter>::default();
        let plans = Family::<KindLabel, Counter>::default();
        let boots_recorded = Counter::default();
        let store_errors = Counter::default();
        let connections = Gauge::default();
        let time_to_ready = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let balloon_targets = Family::<KindLabel, Counter>::default();
        let libvirt_actions = Family::<KindLabel, Counter>::default();
        let interrupt_actions = Family::<KindLabel, Counter>::default();
        let gpus = Gauge::default();
        let gpu_released = Family::<KindLabel, Counter>::default();
        registry.register(
            "events",
            "Lifecycle events received from VMMs",
            events.clone(),
        );
        registry.register(
            "rejected",
            "Connections or frames rejected, by reason",
            rejected.clone(),
        );
        registry.register("boot_plans", "Boot plans served, by kind", plans.clone());
        registry.register(
            "boots_recorded",
            "Boot reports stored",
            boots_recorded.clone(),
        );
        registry.register("store_errors", "Profile store errors", store_errors.clone());
        registry.register(
            "vmm_connections",
            "VMM connections open",
            connections.clone(),
        );
        registry.register(
            "time_to_ready_seconds",
            "Time to ready reported by VMMs",
            time_to_ready.clone(),
        );
        registry.register(
            "balloon_targets",
            "Balloon targets set from forecasts, by kind",
            balloon_targets.clone(),
        );
        registry.register(
            "libvirt_actions",
            "Actions on libvirt domains after their started hook, by action",
            libvirt_actions.clone(),
        );
        registry.register(
            "interrupt_actions",
            "What the interruption coordinator did, by kind",
            interrupt_actions.clone(),
        );
        registry.register("gpus", "GPUs found at start (NVML)", gpus.clone());
        registry.register(
            "gpu_reservations_released",
            "GPU reservations released when their VM stopped, by reason",
            gpu_released.clone(),
        );
        Metrics {
            registry,
            events,
            rejected,
            plans,
            boots_recorded,
            store_errors,
            connections,
            time_to_ready,
            balloon_targets,
            libvirt_actions,
            interrupt_actions,
            gpus,
            gpu_released,
        }
    }

    /// Counts one of a labelled family.
    pub fn inc(family: &Family<KindLabel, Counter>, kind: &str) {
        family
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!("cannot encode metrics: {e}");
        }
        out
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown` turns true.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = Arc::clone(&metrics);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.render(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_in_the_exposition() {
        let m = Metrics::new();
        Metrics::inc(&m.events, "ready");
        Metrics::inc(&m.events, "ready");
        m.boots_recorded.inc();
        m.time_to_ready.observe(0.25);
        let text = m.render();
        assert!(
            text.contains(r#"prescient_events_total{kind="ready"} 2"#),
            "{text}"
        );
        assert!(text.contains("prescient_boots_recorded_total 1"), "{text}");
        assert!(
            text.contains("prescient_time_to_ready_seconds_count 1"),
            "{text}"
        );
    }
}
