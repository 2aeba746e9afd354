//! The daemon's Prometheus metrics and their `/metrics` endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

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

/// Label of a per-resource gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    /// The resource (`cpu`, `memory`, `network`, `disk`, `gpu`).
    pub resource: String,
}

/// Label of a per-VM gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabel {
    /// The VM id.
    pub vm: String,
}

/// Label of a per-VM forecast quantile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmQuantileLabel {
    /// The VM id.
    pub vm: String,
    /// `p50`, `p90` or `p99`.
    pub quantile: String,
}

/// A per-VM floating-point gauge.
pub type VmGauge = Family<VmLabel, Gauge<f64, AtomicU64>>;

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
    /// What VMs may be promised, per resource (the resource's unit).
    pub pool_capacity: Family<ResourceLabel, Gauge>,
    /// What VMs hold now, per resource.
    pub pool_allocated: Family<ResourceLabel, Gauge>,
    /// VMs holding a reservation.
    pub pool_reservations: Gauge,
    /// Allocator decisions, by kind (`fit`, `short`, `released`,
    /// `reconciled-released`, `restored`).
    pub allocator_decisions: Family<KindLabel, Counter>,
    /// Resources that fell short, by resource (one per short resource per
    /// decision).
    pub allocator_short: Family<ResourceLabel, Counter>,
    /// What the interruption coordinator did, by kind (`admit`,
    /// `admit-after-shrink`, `restart-reserved`, `interrupt-ordered`,
    /// `defer`, `shrink-sent`, `interrupt-sent`, `interrupted`).
    pub interrupt_actions: Family<KindLabel, Counter>,
    /// Live migrations the companion ordered or followed, by kind
    /// (`auto`, `ordered`, `moved`, `failed`, `in-doubt`).
    pub migrations: Family<KindLabel, Counter>,
    /// What the shaping loop did, by kind (`balloon-target`, `cgroup-set`,
    /// `cgroup-failed`).
    pub shape_actions: Family<KindLabel, Counter>,
    /// Shaping: forecast memory in use per VM and quantile, MiB.
    pub shape_forecast_mib: Family<VmQuantileLabel, Gauge<f64, AtomicU64>>,
    /// Shaping: memory in use per VM over the last interval, MiB.
    pub shape_actual_mib: VmGauge,
    /// Shaping: memory granted per VM (guest RAM minus balloon), MiB.
    pub shape_grant_mib: VmGauge,
    /// Shaping: predicted growth to pre-fault per VM, MiB.
    pub shape_prefault_mib: VmGauge,
    /// Shaping: the headroom margin the tuner chose.
    pub shape_margin: Gauge<f64, AtomicU64>,
    /// Shaping: each VM's margin after widening by its forecast's spread.
    pub shape_vm_margin: VmGauge,
    /// GPUs the NVML inventory found at start (0 without a driver).
    pub gpus: Gauge,
    /// GPU reservations released, by reason (`stopped`, `failed`).
    pub gpu_released: Family<KindLabel, Counter>,
    /// Model files rejected at load, by reason (`other-version`,
    /// `corrupted`, `not-a-model`, `other-features`, `unreadable`, `invalid`).
    pub model_rejected: Family<KindLabel, Counter>,
    /// 1 while a forecasting model is loaded, 0 while only baselines serve.
    pub model_loaded: Gauge,
    /// Forecasts served, by the forecaster that made them
    /// (`model:<checksum>@v<version>`, `baseline:<name>`).
    pub forecasts_served: Family<KindLabel, Counter>,
    /// Samples and served forecasts written to the store.
    pub online_written: Counter,
    /// Samples and served forecasts dropped (the writer's queue was full).
    pub online_dropped: Counter,
    /// Retraining runs, by decision (`not-enough-data`, `model-good`,
    /// `installed`, `candidate-worse`).
    pub retrain_runs: Family<KindLabel, Counter>,
    /// The last retraining run's wall time, seconds.
    pub retrain_wall_seconds: Gauge<f64, AtomicU64>,
    /// The last retraining run's CPU time, seconds.
    pub retrain_cpu_seconds: Gauge<f64, AtomicU64>,
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
        let pool_capacity = Family::<ResourceLabel, Gauge>::default();
        let pool_allocated = Family::<ResourceLabel, Gauge>::default();
        let pool_reservations = Gauge::default();
        let allocator_decisions = Family::<KindLabel, Counter>::default();
        let allocator_short = Family::<ResourceLabel, Counter>::default();
        registry.register(
            "pool_capacity",
            "What VMs may be promised, per resource (cpu in millicores, memory in MiB, network in Mbit/s, disk in MB/s, GPUs)",
            pool_capacity.clone(),
        );
        registry.register(
            "pool_allocated",
            "What VMs hold now, per resource (units as pool_capacity)",
            pool_allocated.clone(),
        );
        registry.register(
            "pool_reservations",
            "VMs holding a reservation",
            pool_reservations.clone(),
        );
        registry.register(
            "allocator_decisions",
            "Allocator decisions, by kind (fit, short, released, reconciled-released, restored)",
            allocator_decisions.clone(),
        );
        registry.register(
            "allocator_short",
            "Resources that fell short in allocator decisions, by resource",
            allocator_short.clone(),
        );
        let interrupt_actions = Family::<KindLabel, Counter>::default();
        let migrations = Family::<KindLabel, Counter>::default();
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
        registry.register(
            "migrations",
            "Live migrations the companion ordered or followed, by kind",
            migrations.clone(),
        );
        let shape_actions = Family::<KindLabel, Counter>::default();
        let shape_forecast_mib = Family::<VmQuantileLabel, Gauge<f64, AtomicU64>>::default();
        let shape_actual_mib = VmGauge::default();
        let shape_grant_mib = VmGauge::default();
        let shape_prefault_mib = VmGauge::default();
        let shape_margin = Gauge::<f64, AtomicU64>::default();
        let shape_vm_margin = VmGauge::default();
        registry.register(
            "shape_vm_margin",
            "Headroom margin per VM after widening by its forecast's spread",
            shape_vm_margin.clone(),
        );
        registry.register(
            "shape_actions",
            "What the shaping loop did, by kind",
            shape_actions.clone(),
        );
        registry.register(
            "shape_forecast_mib",
            "Forecast memory in use per VM (next hour), MiB",
            shape_forecast_mib.clone(),
        );
        registry.register(
            "shape_actual_mib",
            "Memory in use per VM over the last shaping interval, MiB",
            shape_actual_mib.clone(),
        );
        registry.register(
            "shape_grant_mib",
            "Memory granted per VM by the shaping loop, MiB",
            shape_grant_mib.clone(),
        );
        registry.register(
            "shape_prefault_mib",
            "Predicted growth to pre-fault per VM, MiB",
            shape_prefault_mib.clone(),
        );
        registry.register(
            "shape_margin",
            "Headroom margin chosen by the online tuner",
            shape_margin.clone(),
        );
        registry.register("gpus", "GPUs found at start (NVML)", gpus.clone());
        registry.register(
            "gpu_reservations_released",
            "GPU reservations released when their VM stopped, by reason",
            gpu_released.clone(),
        );
        let model_rejected = Family::<KindLabel, Counter>::default();
        let model_loaded = Gauge::default();
        let forecasts_served = Family::<KindLabel, Counter>::default();
        let online_written = Counter::default();
        let online_dropped = Counter::default();
        let retrain_runs = Family::<KindLabel, Counter>::default();
        let retrain_wall_seconds = Gauge::<f64, AtomicU64>::default();
        let retrain_cpu_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "model_rejected",
            "Model files rejected at load, by reason",
            model_rejected.clone(),
        );
        registry.register(
            "model_loaded",
            "1 while a forecasting model is loaded (0: baselines only)",
            model_loaded.clone(),
        );
        registry.register(
            "forecasts_served",
            "Forecasts served by the shaping loop, by the forecaster that made them",
            forecasts_served.clone(),
        );
        registry.register(
            "online_records_written",
            "Usage samples and served forecasts written to the store",
            online_written.clone(),
        );
        registry.register(
            "online_records_dropped",
            "Usage samples and served forecasts dropped because the writer's queue was full",
            online_dropped.clone(),
        );
        registry.register(
            "retrain_runs",
            "Retraining runs, by decision",
            retrain_runs.clone(),
        );
        registry.register(
            "retrain_last_wall_seconds",
            "Wall time of the last retraining run",
            retrain_wall_seconds.clone(),
        );
        registry.register(
            "retrain_last_cpu_seconds",
            "CPU time of the last retraining run",
            retrain_cpu_seconds.clone(),
        );
        Metrics {
            registry,
            model_rejected,
            model_loaded,
            forecasts_served,
            online_written,
            online_dropped,
            retrain_runs,
            retrain_wall_seconds,
            retrain_cpu_seconds,
            shape_actions,
            shape_forecast_mib,
            shape_actual_mib,
            shape_grant_mib,
            shape_prefault_mib,
            shape_margin,
            shape_vm_margin,
            events,
            rejected,
            plans,
            boots_recorded,
            store_errors,
            connections,
            time_to_ready,
            balloon_targets,
            libvirt_actions,
            pool_capacity,
            pool_allocated,
            pool_reservations,
            allocator_decisions,
            allocator_short,
            interrupt_actions,
            migrations,
            gpus,
            gpu_released,
        }
    }

    /// Sets the pool gauges from the pool.
    pub fn set_pool(&self, pool: &crate::pool::Pool) {
        let (cap, alloc) = (pool.capacity(), pool.allocated());
        for r in vmm_hooks::Resource::ALL {
            let label = ResourceLabel {
                resource: r.name().to_string(),
            };
            let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.pool_capacity.get_or_create(&label).set(g(cap.get(r)));
            self.pool_allocated
                .get_or_create(&label)
                .set(g(alloc.get(r)));
        }
        self.pool_reservations
            .set(i64::try_from(pool.len()).unwrap_or(i64::MAX));
    }

    /// Counts one short resource.
    pub fn inc_short(&self, r: vmm_hooks::Resource) {
        self.allocator_short
            .get_or_create(&ResourceLabel {
                resource: r.name().to_string(),
            })
            .inc();
    }

    /// Counts one of a labelled family.
    pub fn inc(family: &Family<KindLabel, Counter>, kind: &str) {
        family
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Sets a per-VM gauge.
    pub fn shape_gauge(&self, family: &VmGauge, vm: &str, v: f64) {
        family.get_or_create(&VmLabel { vm: vm.to_string() }).set(v);
    }

    /// Sets a VM's forecast quantile.
    pub fn shape_forecast(&self, vm: &str, quantile: &str, v: f64) {
        self.shape_forecast_mib
            .get_or_create(&VmQuantileLabel {
                vm: vm.to_string(),
                quantile: quantile.to_string(),
            })
            .set(v);
    }

    /// Drops a stopped VM's shaping gauges.
    pub fn forget_shaped_vm(&self, vm: &str) {
        let l = VmLabel { vm: vm.to_string() };
        for f in [
            &self.shape_actual_mib,
            &self.shape_grant_mib,
            &self.shape_prefault_mib,
            &self.shape_vm_margin,
        ] {
            f.remove(&l);
        }
        for q in ["p50", "p90", "p99"] {
            self.shape_forecast_mib.remove(&VmQuantileLabel {
                vm: vm.to_string(),
                quantile: q.to_string(),
            });
        }
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
