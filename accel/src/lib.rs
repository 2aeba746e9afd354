//! GPUs for Prescient: what the host has, who holds what, and where a VM's
//! GPU demand should go.
//!
//! - **Inventory** ([`Inventory`]): every GPU's UUID, name, PCI address, NUMA
//!   node, memory, utilisation, processes, compute mode, MIG mode and
//!   instances, ECC and retired pages / remapped rows, read through a
//!   [`GpuSource`]: the live driver ([`NvmlSource`], NVML loaded at run
//!   time; without the driver, [`Inventory::probe`] says "no NVIDIA driver
//!   (libnvidia-ml.so.1 not found)") or a recording of a real GPU
//!   ([`FixtureSource`]: a JSON fixture written by [`record`], or
//!   `nvidia-smi -q -x` output).
//! - **Placement** ([`place`]): a pure function choosing a device (whole GPU
//!   or MIG instance) for a VM's predicted GPU memory.
//! - **Ledger** ([`Ledger`]): reservations kept in the companion's SQLite
//!   store, reconciled with the host at start, released on stop.
//!
//! It does not change device state: NVML is only read; enforcement
//! (exclusive compute mode, vfio-pci) is opt-in and not carried out by this
//! version ([`Enforcement`]). GPU offload of the companion's own kernels
//! lives elsewhere (`models`).

mod error;
mod inventory;
mod ledger;
mod model;
mod nvml;
mod placement;
mod smi_xml;
mod source;
mod sysfs;

pub use error::{InventoryError, LedgerError, PlacementError};
pub use inventory::{Inventory, VmGpuUsage, mig_slot_id};
pub use ledger::{
    Enforcement, LEDGER_VERSION, Ledger, ReconcileReport, ReleaseReason, Reservation,
    STORE_APPLICATION_ID, reservations_table,
};
pub use model::{
    ComputeMode, EccMode, GpuProcess, GpuReading, MemoryReading, MigInstance, MigMode,
    RemappedRows, RetiredPages, Snapshot, SystemReading, Utilisation,
};
pub use nvml::NvmlSource;
pub use placement::{Choice, Demand, DeviceSlot, Holder, SlotKind, available_mib, place};
pub use smi_xml::{MAX_XML_BYTES, MAX_XML_NODES, SmiLog, parse_smi_xml};
pub use source::{
    FIXTURE_FORMAT, FIXTURE_VERSION, Fixture, FixtureSource, GpuSource, Provenance, hostname,
    record, rfc3339,
};
pub use sysfs::{NodeDistances, pci_numa_node, sysfs_bdf};
