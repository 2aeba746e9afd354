//! The readings: plain serde data, the same whichever source produced them.

use serde::{Deserialize, Serialize};

/// Memory of a GPU or a MIG instance, MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MemoryReading {
    /// Total framebuffer memory.
    pub total_mib: u64,
    /// In use.
    pub used_mib: u64,
    /// Free (what the driver says; total minus used minus reserved).
    pub free_mib: u64,
}

/// Utilisation over the driver's last sample period, percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Utilisation {
    /// Time a kernel was running.
    pub gpu_pct: u32,
    /// Time device memory was being read or written.
    pub memory_pct: u32,
}

/// A process with a context on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    /// Host process id.
    pub pid: u32,
    /// GPU memory it uses, MiB (`None` where the driver does not say).
    pub used_mib: Option<u64>,
    /// The MIG GPU instance it runs in, in MIG mode.
    pub gpu_instance_id: Option<u32>,
    /// The MIG compute instance it runs in, in MIG mode.
    pub compute_instance_id: Option<u32>,
    /// `C` (compute), `G` (graphics) or `C+G`, where the source says.
    pub kind: Option<String>,
    /// Its name, where the source says (NVML does not).
    pub name: Option<String>,
    /// Its share of the streaming multiprocessors over the last sample
    /// period, percent (NVML's process utilisation; `None` where unknown).
    pub sm_util_pct: Option<u32>,
}

/// The compute mode of a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComputeMode {
    /// Many contexts per device.
    Default,
    /// One context per device, usable from one thread at a time (removed from
    /// current drivers).
    ExclusiveThread,
    /// No contexts.
    Prohibited,
    /// One context per device, from one process.
    ExclusiveProcess,
    /// Something this version does not know, as the source wrote it.
    Other(String),
}

impl ComputeMode {
    /// The mode as nvidia-smi writes it.
    pub fn as_str(&self) -> &str {
        match self {
            ComputeMode::Default => "Default",
            ComputeMode::ExclusiveThread => "Exclusive_Thread",
            ComputeMode::Prohibited => "Prohibited",
            ComputeMode::ExclusiveProcess => "Exclusive_Process",
            ComputeMode::Other(s) => s,
        }
    }
}

/// MIG mode: `None` fields where the GPU does not support MIG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MigMode {
    /// In force now.
    pub current: Option<bool>,
    /// In force after the next reset.
    pub pending: Option<bool>,
}

/// One MIG instance (a GPU instance with a compute instance in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigInstance {
    /// Its index on the parent GPU.
    pub index: u32,
    /// Its UUID (`MIG-…`; NVML gives it, nvidia-smi's XML does not).
    pub uuid: Option<String>,
    /// GPU instance id.
    pub gpu_instance_id: Option<u32>,
    /// Compute instance id.
    pub compute_instance_id: Option<u32>,
    /// Streaming multiprocessors.
    pub multiprocessor_count: Option<u32>,
    /// Its slice of the framebuffer.
    pub memory: MemoryReading,
}

/// ECC mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EccMode {
    /// In force now.
    pub current: bool,
    /// In force after the next reboot.
    pub pending: bool,
}

/// Pages retired by the driver (pre-Ampere boards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredPages {
    /// Retired after multiple single-bit ECC errors.
    pub single_bit: u32,
    /// Retired after a double-bit ECC error.
    pub double_bit: u32,
    /// Pages waiting to be retired at the next reboot.
    pub pending: bool,
}

/// Rows remapped by the driver (Ampere and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemappedRows {
    /// Remapped after correctable errors.
    pub correctable: u32,
    /// Remapped after uncorrectable errors.
    pub uncorrectable: u32,
    /// A remapping waits for a reset.
    pub pending: bool,
    /// A remapping failed.
    pub failure: bool,
}

/// Everything read about one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuReading {
    /// The driver's index.
    pub index: u32,
    /// `GPU-…`.
    pub uuid: String,
    /// The product name.
    pub name: String,
    /// PCI address in sysfs form (`0000:01:00.0`).
    pub pci_bus_id: String,
    /// The NUMA node the GPU hangs off (`None`: unknown or no NUMA).
    pub numa_node: Option<u32>,
    /// Framebuffer memory.
    pub memory: MemoryReading,
    /// `None` where the driver does not report it (MIG mode, for one).
    pub utilisation: Option<Utilisation>,
    /// Processes with a context on it.
    pub processes: Vec<GpuProcess>,
    /// Compute mode.
    pub compute_mode: ComputeMode,
    /// MIG mode.
    pub mig_mode: MigMode,
    /// MIG instances (empty unless MIG is on).
    pub mig_instances: Vec<MigInstance>,
    /// ECC mode (`None`: not supported).
    pub ecc: Option<EccMode>,
    /// Retired pages (`None`: not supported).
    pub retired_pages: Option<RetiredPages>,
    /// Remapped rows (`None`: not supported).
    pub remapped_rows: Option<RemappedRows>,
}

impl GpuReading {
    /// Whether MIG is on now.
    pub fn mig_enabled(&self) -> bool {
        self.mig_mode.current == Some(true)
    }
}

/// What the source says about the driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SystemReading {
    /// The kernel driver's version.
    pub driver_version: String,
    /// NVML's own version (`None` where the source does not say).
    pub nvml_version: Option<String>,
    /// The CUDA version the driver supports (`12.2`).
    pub cuda_driver_version: Option<String>,
}

/// One full reading of a host's GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The driver.
    pub system: SystemReading,
    /// Every GPU, by index.
    pub gpus: Vec<GpuReading>,
}
