//! GPUs in the daemon: the inventory is probed once at start and logged
//! once; with a store, the reservation ledger is reconciled against it.
//! A host without the NVIDIA driver gets one info line and nothing else
//! changes.

use std::path::Path;

use accel::{Inventory, InventoryError, Ledger, ReleaseReason};

/// Probes the GPUs (NVML), logs what was found in one line, and reconciles
/// the reservation ledger in `store` with it. Returns the inventory, or
/// `None` without GPUs or driver.
pub fn probe_at_start(store: Option<&Path>) -> Option<Inventory> {
    let inventory = match Inventory::probe() {
        Ok(inv) => inv,
        Err(e @ InventoryError::NoDriver { .. }) => {
            tracing::info!("GPUs: {e}");
            return None;
        }
        Err(e) => {
            tracing::warn!(
                "GPUs: the inventory could not be read: {}",
                vmm_hooks::error_chain(&e)
            );
            return None;
        }
    };
    tracing::info!("GPUs: {}", inventory.summary());
    if let Some(path) = store {
        match Ledger::open(path).and_then(|mut l| l.reconcile(&inventory, None)) {
            Ok(report) => {
                if !report.dropped.is_empty() || !report.kept.is_empty() {
                    tracing::info!(
                        kept = report.kept.len(),
                        dropped = report.dropped.len(),
                        "GPU reservations reconciled with the host"
                    );
                }
            }
            Err(e) => tracing::warn!("GPU reservations: {}", vmm_hooks::error_chain(&e)),
        }
    }
    Some(inventory)
}

/// Ends a VM's GPU reservations when it stops (`failed`: it ended in a
/// failure, e.g. a restart that did not succeed), counting them in
/// `prescient_gpu_reservations_released_total`. Errors are logged: a
/// stopping VM is never held up by the ledger.
pub fn release_on_stop(ledger: &mut Ledger, metrics: &crate::Metrics, vm: &str, failed: bool) {
    let why = if failed {
        ReleaseReason::Failed
    } else {
        ReleaseReason::Stopped
    };
    match ledger.release(vm, why) {
        Ok(gone) => {
            let kind = if failed { "failed" } else { "stopped" };
            for _ in &gone {
                crate::Metrics::inc(&metrics.gpu_released, kind);
            }
        }
        Err(e) => {
            tracing::error!(
                vm,
                "cannot release its GPU reservations: {}",
                vmm_hooks::error_chain(&e)
            );
        }
    }
}

/// Opens the reservation ledger in the store (its tables are created on
/// first use); `None`, logged, when it cannot be.
pub fn open_ledger(store: &Path) -> Option<Ledger> {
    match Ledger::open(store) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(
                "GPU reservations unavailable: {}",
                vmm_hooks::error_chain(&e)
            );
            None
        }
    }
}
