//! The live backend: NVML through nvml-wrapper, loaded at run time.
//!
//! Read-only: this module calls no NVML setter (compute mode, clocks,
//! persistence, MIG, ECC, reset). Readings a board does not support
//! (`NotSupported`, or a symbol an older driver lacks) become `None`, not
//! errors. Three readings nvml-wrapper does not wrap (remapped rows, a MIG
//! device's GPU and compute instance ids) are made through the symbols it
//! loaded, in the unsafe blocks below.

use std::os::raw::c_uint;
use std::path::PathBuf;

use nvml_wrapper::Device;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{ComputeMode as NvmlComputeMode, RetirementCause};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::{NvmlError, nvml_sym, nvml_try};

use crate::error::InventoryError;
use crate::model::{
    ComputeMode, EccMode, GpuProcess, GpuReading, MemoryReading, MigInstance, MigMode,
    RemappedRows, RetiredPages, SystemReading, Utilisation,
};
use crate::source::GpuSource;
use crate::sysfs::{pci_numa_node, sysfs_bdf};

const MIB: u64 = 1 << 20;

/// NVML, opened.
pub struct NvmlSource {
    nvml: Nvml,
    sys_root: PathBuf,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("sys_root", &self.sys_root)
            .finish_non_exhaustive()
    }
}

/// The one-line reason NVML did not start, for [`InventoryError::NoDriver`].
fn init_error(e: NvmlError) -> InventoryError {
    match e {
        NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => InventoryError::NoDriver {
            detail: "libnvidia-ml.so.1 not found".to_string(),
        },
        NvmlError::DriverNotLoaded => InventoryError::NoDriver {
            detail: "libnvidia-ml.so.1 is installed but the kernel driver is not loaded"
                .to_string(),
        },
        source => InventoryError::Nvml {
            what: "init",
            gpu: None,
            source,
        },
    }
}

/// `NotSupported` (and a symbol the driver lacks) is an absent reading.
fn optional<T>(
    r: Result<T, NvmlError>,
    what: &'static str,
    gpu: u32,
) -> Result<Option<T>, InventoryError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(
            NvmlError::NotSupported
            | NvmlError::FailedToLoadSymbol(_)
            | NvmlError::FunctionNotFound,
        ) => Ok(None),
        Err(source) => Err(InventoryError::Nvml {
            what,
            gpu: Some(gpu),
            source,
        }),
    }
}

fn required<T>(
    r: Result<T, NvmlError>,
    what: &'static str,
    gpu: Option<u32>,
) -> Result<T, InventoryError> {
    r.map_err(|source| InventoryError::Nvml { what, gpu, source })
}

fn memory(m: &nvml_wrapper::struct_wrappers::device::MemoryInfo) -> MemoryReading {
    MemoryReading {
        total_mib: m.total / MIB,
        used_mib: m.used / MIB,
        free_mib: m.free / MIB,
    }
}

impl NvmlSource {
    /// Loads `libnvidia-ml.so.1` and starts NVML. Without the driver this is
    /// [`InventoryError::NoDriver`], one line saying what is missing.
    pub fn open() -> Result<Self, InventoryError> {
        let nvml = Nvml::init().map_err(init_error)?;
        Ok(NvmlSource {
            nvml,
            sys_root: PathBuf::from("/sys"),
        })
    }

    fn device(&self, index: u32) -> Result<Device<'_>, InventoryError> {
        required(
            self.nvml.device_by_index(index),
            "device handle",
            Some(index),
        )
    }

    fn read_gpu(&self, index: u32) -> Result<GpuReading, InventoryError> {
        let d = self.device(index)?;
        let uuid = required(d.uuid(), "UUID", Some(index))?;
        let name = required(d.name(), "name", Some(index))?;
        let pci = required(d.pci_info(), "PCI info", Some(index))?;
        let pci_bus_id = sysfs_bdf(&pci.bus_id)?;
        let numa_node = match optional(d.numa_node_id(), "NUMA node", index) {
            Ok(Some(n)) => Some(n),
            // Older drivers and many boards: sysfs knows.
            _ => pci_numa_node(&self.sys_root, &pci_bus_id),
        };
        let mem = required(d.memory_info(), "memory", Some(index))?;
        let utilisation =
            optional(d.utilization_rates(), "utilisation", index)?.map(|u| Utilisation {
                gpu_pct: u.gpu,
                memory_pct: u.memory,
            });
        let processes = self.device_processes(&d, index)?;
        let compute_mode = match optional(d.compute_mode(), "compute mode", index)? {
            Some(NvmlComputeMode::Default) => ComputeMode::Default,
            Some(NvmlComputeMode::ExclusiveThread) => ComputeMode::ExclusiveThread,
            Some(NvmlComputeMode::Prohibited) => ComputeMode::Prohibited,
            Some(NvmlComputeMode::ExclusiveProcess) => ComputeMode::ExclusiveProcess,
            None => ComputeMode::Other("N/A".to_string()),
        };
        let mig = optional(d.mig_mode(), "MIG mode", index)?;
        let mig_mode = MigMode {
            current: mig.as_ref().map(|m| m.current == 1),
            pending: mig.as_ref().map(|m| m.pending == 1),
        };
        let mig_instances = if mig_mode.current == Some(true) {
            self.mig_instances(&d, index)?
        } else {
            Vec::new()
        };
        let ecc = optional(d.is_ecc_enabled(), "ECC mode", index)?.map(|e| EccMode {
            current: e.currently_enabled,
            pending: e.pending_enabled,
        });
        let single = optional(
            d.retired_pages(RetirementCause::MultipleSingleBitEccErrors),
            "retired pages",
            index,
        )?;
        let double = optional(
            d.retired_pages(RetirementCause::DoubleBitEccError),
            "retired pages",
            index,
        )?;
        let pending = optional(d.are_pages_pending_retired(), "pending retirement", index)?;
        let retired_pages = match (single, double) {
            (Some(s), Some(dbl)) => Some(RetiredPages {
                single_bit: u32::try_from(s.len()).unwrap_or(u32::MAX),
                double_bit: u32::try_from(dbl.len()).unwrap_or(u32::MAX),
                pending: pending.unwrap_or(false),
            }),
            _ => None,
        };
        let remapped_rows = optional(remapped_rows(&d), "remapped rows", index)?;
        Ok(GpuReading {
            index,
            uuid,
            name,
            pci_bus_id,
            numa_node,
            memory: memory(&mem),
            utilisation,
            processes,
            compute_mode,
            mig_mode,
            mig_instances,
            ecc,
            retired_pages,
            remapped_rows,
        })
    }

    fn device_processes(
        &self,
        d: &Device<'_>,
        index: u32,
    ) -> Result<Vec<GpuProcess>, InventoryError> {
        // In MIG mode the parent GPU lists every instance's processes only
        // to a privileged caller; otherwise they are not visible (empty).
        let procs = match d.running_compute_processes() {
            Err(NvmlError::NoPermission) => Vec::new(),
            r => optional(r, "running compute processes", index)?.unwrap_or_default(),
        };
        // Per-process SM utilisation over the driver's sample buffer; absent
        // on many boards and when nothing ran lately.
        let util = match d.process_utilization_stats(None) {
            Ok(v) => v,
            Err(
                NvmlError::NotSupported
                | NvmlError::NoPermission
                | NvmlError::NotFound
                | NvmlError::FailedToLoadSymbol(_)
                | NvmlError::FunctionNotFound,
            ) => Vec::new(),
            Err(source) => {
                return Err(InventoryError::Nvml {
                    what: "process utilisation",
                    gpu: Some(index),
                    source,
                });
            }
        };
        Ok(procs
            .into_iter()
            .map(|p| GpuProcess {
                pid: p.pid,
                used_mib: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b / MIB),
                    UsedGpuMemory::Unavailable => None,
                },
                gpu_instance_id: p.gpu_instance_id,
                compute_instance_id: p.compute_instance_id,
                kind: Some("C".to_string()),
                name: None,
                sm_util_pct: util
                    .iter()
                    .filter(|s| s.pid == p.pid)
                    .max_by_key(|s| s.timestamp)
                    .map(|s| s.sm_util),
            })
            .collect())
    }

    fn mig_instances(
        &self,
        d: &Device<'_>,
        index: u32,
    ) -> Result<Vec<MigInstance>, InventoryError> {
        let max = required(d.mig_device_count(), "MIG device count", Some(index))?;
        let mut out = Vec::new();
        for i in 0..max {
            let m = match d.mig_device_by_index(i) {
                Ok(m) => m,
                // Slots without an instance.
                Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
                Err(source) => {
                    return Err(InventoryError::Nvml {
                        what: "MIG device handle",
                        gpu: Some(index),
                        source,
                    });
                }
            };
            let mem = required(m.memory_info(), "MIG device memory", Some(index))?;
            out.push(MigInstance {
                index: i,
                uuid: optional(m.uuid(), "MIG device UUID", index)?,
                gpu_instance_id: optional(
                    instance_id(&m, InstanceId::Gpu),
                    "GPU instance id",
                    index,
                )?,
                compute_instance_id: optional(
                    instance_id(&m, InstanceId::Compute),
                    "compute instance id",
                    index,
                )?,
                multiprocessor_count: optional(m.attributes(), "MIG device attributes", index)?
                    .map(|a| a.multiprocessor_count),
                memory: memory(&mem),
            });
        }
        Ok(out)
    }
}

#[derive(Clone, Copy)]
enum InstanceId {
    Gpu,
    Compute,
}

/// `nvmlDeviceGetGpuInstanceId` / `nvmlDeviceGetComputeInstanceId` on a MIG
/// device handle (not wrapped by nvml-wrapper 0.13).
fn instance_id(d: &Device<'_>, which: InstanceId) -> Result<u32, NvmlError> {
    let lib = d.nvml().lib();
    let sym = match which {
        InstanceId::Gpu => nvml_sym(lib.nvmlDeviceGetGpuInstanceId.as_ref())?,
        InstanceId::Compute => nvml_sym(lib.nvmlDeviceGetComputeInstanceId.as_ref())?,
    };
    // SAFETY: `handle` is unsafe only because the raw handle could be used to
    // outlive the `Device`; it is used below while `d` (and its `Nvml`) is
    // borrowed, so it stays valid.
    let handle = unsafe { d.handle() };
    let mut id: c_uint = 0;
    // SAFETY: `sym` is the driver's function of this exact signature, loaded
    // by nvml-wrapper from the same library `d` came from; `handle` is a live
    // device handle (above) and `id` a valid, writable `c_uint` for the call.
    let code = unsafe { sym(handle, &mut id) };
    nvml_try(code)?;
    Ok(id)
}

/// `nvmlDeviceGetRemappedRows` (not wrapped by nvml-wrapper 0.13).
fn remapped_rows(d: &Device<'_>) -> Result<RemappedRows, NvmlError> {
    let sym = nvml_sym(d.nvml().lib().nvmlDeviceGetRemappedRows.as_ref())?;
    // SAFETY: as in `instance_id`: the handle is used only while `d` is
    // borrowed.
    let handle = unsafe { d.handle() };
    let (mut corr, mut unc, mut pending, mut failure): (c_uint, c_uint, c_uint, c_uint) =
        (0, 0, 0, 0);
    // SAFETY: `sym` has this signature (nvml.h: device, four `unsigned int *`
    // outputs), came from the library `d` belongs to; `handle` is live; the
    // four pointers are to distinct local `c_uint`s, valid for writes.
    let code = unsafe { sym(handle, &mut corr, &mut unc, &mut pending, &mut failure) };
    nvml_try(code)?;
    Ok(RemappedRows {
        correctable: corr,
        uncorrectable: unc,
        pending: pending != 0,
        failure: failure != 0,
    })
}

impl GpuSource for NvmlSource {
    fn label(&self) -> String {
        "nvml".to_string()
    }

    fn system(&self) -> Result<SystemReading, InventoryError> {
        let driver_version = required(self.nvml.sys_driver_version(), "driver version", None)?;
        let nvml_version = self.nvml.sys_nvml_version().ok();
        let cuda_driver_version = self.nvml.sys_cuda_driver_version().ok().map(|v| {
            // 12020 -> "12.2", as nvidia-smi prints it.
            format!("{}.{}", v / 1000, v % 1000 / 10)
        });
        Ok(SystemReading {
            driver_version,
            nvml_version,
            cuda_driver_version,
        })
    }

    fn gpus(&self) -> Result<Vec<GpuReading>, InventoryError> {
        let n = required(self.nvml.device_count(), "device count", None)?;
        (0..n).map(|i| self.read_gpu(i)).collect()
    }

    fn processes(&self, uuid: &str) -> Result<Vec<GpuProcess>, InventoryError> {
        let d = match self.nvml.device_by_uuid(uuid) {
            Ok(d) => d,
            Err(NvmlError::NotFound | NvmlError::InvalidArg) => {
                return Err(InventoryError::UnknownGpu {
                    uuid: uuid.to_string(),
                });
            }
            Err(source) => {
                return Err(InventoryError::Nvml {
                    what: "device by UUID",
                    gpu: None,
                    source,
                });
            }
        };
        let index = required(d.index(), "index", None)?;
        self.device_processes(&d, index)
    }
}
