//! What can go wrong reading GPUs, and with the ledger and placement.

use std::path::PathBuf;

/// Reading the inventory (NVML, fixtures, nvidia-smi XML).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InventoryError {
    /// NVML could not be loaded or started: no NVIDIA driver on this host.
    #[error("no NVIDIA driver ({detail})")]
    NoDriver {
        /// What was missing (`libnvidia-ml.so.1 not found`, `driver not loaded`).
        detail: String,
    },
    /// An NVML call failed.
    #[error("NVML {what}{}", gpu.map(|g| format!(" on GPU {g}")).unwrap_or_default())]
    Nvml {
        /// The reading.
        what: &'static str,
        /// The GPU index, when the call was about one.
        gpu: Option<u32>,
        /// NVML's error.
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    /// A GPU the caller named is not in the inventory.
    #[error("no GPU {uuid} in the inventory")]
    UnknownGpu {
        /// Its UUID.
        uuid: String,
    },
    /// A PCI address that is not `DDDD:BB:DD.F`.
    #[error("not a PCI address: {address:?}")]
    PciAddress {
        /// What was given (at most 64 characters of it).
        address: String,
    },
    /// A fixture file could not be read.
    #[error("cannot read the fixture {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A fixture file is neither a JSON recording nor nvidia-smi XML, or is
    /// malformed.
    #[error("bad fixture {}: {reason}", path.display())]
    Fixture {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the place where it is.
        reason: String,
    },
    /// nvidia-smi XML that cannot be read.
    #[error("nvidia-smi XML: {reason}")]
    Xml {
        /// What is wrong, with the element where it is.
        reason: String,
    },
}

/// The reservation ledger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The database file could not be opened or is not a Prescient store.
    #[error("cannot use {} as the reservation ledger: {reason}", path.display())]
    NotAStore {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The ledger's own tables carry another version.
    #[error("the GPU reservation tables have version {found}, this build knows {expected}")]
    Version {
        /// Found in the file.
        found: i64,
        /// This build's.
        expected: i64,
    },
    /// The device is held exclusively, or an exclusive hold was asked on a
    /// device that is in use.
    #[error("{device} is held by {holder}{}", if *exclusive { " exclusively" } else { "" })]
    Conflict {
        /// The device asked for.
        device: String,
        /// The VM already holding it (or a relative of it).
        holder: String,
        /// Whether the holder's reservation is exclusive.
        exclusive: bool,
    },
    /// The VM already holds this device.
    #[error("VM {vm} already holds {device}")]
    AlreadyHeld {
        /// The VM.
        vm: String,
        /// The device.
        device: String,
    },
    /// SQLite failed.
    #[error("SQLite")]
    Sql(#[from] rusqlite::Error),
    /// A stored row that cannot be read back.
    #[error("a stored GPU reservation is corrupt: {reason}")]
    Corrupt {
        /// What is wrong.
        reason: String,
    },
    /// Placement found nothing.
    #[error("no GPU for VM {vm}")]
    Placement {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: PlacementError,
    },
    /// Enforcement was asked for and cannot be done.
    #[error("GPU enforcement unsupported here: {reason}")]
    EnforcementUnsupported {
        /// Why.
        reason: String,
    },
}

/// Placement found no device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// The inventory has no GPU at all.
    #[error("the host has no GPU")]
    NoDevices,
    /// No device has the memory free.
    #[error(
        "no device has {demand_mib} MiB free{} (largest free: {largest_free_mib} MiB)",
        if *exclusive { " and no other holder" } else { "" }
    )]
    NoFit {
        /// What was asked.
        demand_mib: u64,
        /// Whether exclusively.
        exclusive: bool,
        /// The largest free memory of any device that could be held at all.
        largest_free_mib: u64,
    },
}
