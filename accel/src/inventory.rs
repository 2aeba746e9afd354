//! The inventory: one reading of every GPU, the devices VMs can hold, and
//! GPU use attributed to VMs by process id.

use serde::{Deserialize, Serialize};

use crate::error::InventoryError;
use crate::model::{GpuReading, MigInstance, SystemReading};
use crate::nvml::NvmlSource;
use crate::placement::{DeviceSlot, SlotKind};
use crate::source::GpuSource;

/// One reading of a host's GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Where it came from (`nvml`, `fixture …`).
    pub source: String,
    /// The driver.
    pub system: SystemReading,
    /// Every GPU.
    pub gpus: Vec<GpuReading>,
}

/// A VM's GPU use, from the processes that are its own (its VMM or QEMU
/// process and any helper the caller names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VmGpuUsage {
    /// GPU memory its processes hold, MiB, over every GPU (processes whose
    /// memory the driver does not report count 0).
    pub mem_mib: u64,
    /// SM utilisation of its processes, percent of one GPU, summed over GPUs;
    /// `None` when no source gives per-process utilisation for any of them.
    pub sm_util_pct: Option<u32>,
    /// Per GPU: `(uuid, MiB)`.
    pub per_gpu: Vec<(String, u64)>,
}

impl Inventory {
    /// Reads the live GPUs through NVML. On a host without the driver this
    /// is [`InventoryError::NoDriver`]: "no NVIDIA driver
    /// (libnvidia-ml.so.1 not found)".
    pub fn probe() -> Result<Self, InventoryError> {
        let nvml = NvmlSource::open()?;
        Inventory::read(&nvml)
    }

    /// Reads every GPU from a source.
    pub fn read(source: &dyn GpuSource) -> Result<Self, InventoryError> {
        Ok(Inventory {
            source: source.label(),
            system: source.system()?,
            gpus: source.gpus()?,
        })
    }

    /// The GPU with this UUID.
    pub fn gpu(&self, uuid: &str) -> Option<&GpuReading> {
        self.gpus.iter().find(|g| g.uuid == uuid)
    }

    /// The devices a VM can hold: each GPU whole when MIG is off, each of its
    /// MIG instances when MIG is on.
    pub fn slots(&self) -> Vec<DeviceSlot> {
        let mut out = Vec::new();
        for g in &self.gpus {
            if g.mig_enabled() {
                for m in &g.mig_instances {
                    out.push(DeviceSlot {
                        id: mig_slot_id(&g.uuid, m),
                        parent_uuid: g.uuid.clone(),
                        kind: SlotKind::Mig,
                        numa_node: g.numa_node,
                        total_mib: m.memory.total_mib,
                        free_mib: m.memory.free_mib,
                    });
                }
            } else {
                out.push(DeviceSlot {
                    id: g.uuid.clone(),
                    parent_uuid: g.uuid.clone(),
                    kind: SlotKind::Gpu,
                    numa_node: g.numa_node,
                    total_mib: g.memory.total_mib,
                    free_mib: g.memory.free_mib,
                });
            }
        }
        out
    }

    /// A VM's GPU use in this reading, from its processes' ids.
    pub fn vm_usage(&self, pids: &[u32]) -> VmGpuUsage {
        let per_gpu = self
            .gpus
            .iter()
            .map(|g| (g.uuid.as_str(), g.processes.as_slice()));
        usage(per_gpu, pids)
    }

    /// A VM's GPU use now: the processes of every GPU read again from
    /// `source` (cheaper than a whole reading; for periodic samples).
    pub fn sample_vm(
        &self,
        source: &dyn GpuSource,
        pids: &[u32],
    ) -> Result<VmGpuUsage, InventoryError> {
        let mut fresh = Vec::with_capacity(self.gpus.len());
        for g in &self.gpus {
            fresh.push((g.uuid.as_str(), source.processes(&g.uuid)?));
        }
        Ok(usage(fresh.iter().map(|(u, p)| (*u, p.as_slice())), pids))
    }

    /// One line for the daemon's log.
    pub fn summary(&self) -> String {
        if self.gpus.is_empty() {
            return format!(
                "no GPUs (driver {}, {})",
                self.system.driver_version, self.source
            );
        }
        let gpus: Vec<String> = self
            .gpus
            .iter()
            .map(|g| {
                let mig = if g.mig_enabled() {
                    format!(", MIG {} instance(s)", g.mig_instances.len())
                } else {
                    String::new()
                };
                format!(
                    "{} {} {} MiB free of {}{mig}",
                    g.pci_bus_id, g.name, g.memory.free_mib, g.memory.total_mib
                )
            })
            .collect();
        format!(
            "{} GPU(s), driver {}: {}",
            self.gpus.len(),
            self.system.driver_version,
            gpus.join("; ")
        )
    }

    /// A table for `prescient gpu inventory`.
    pub fn table(&self) -> String {
        let mut s = format!(
            "source: {}\ndriver {}, NVML {}, CUDA {}\n",
            self.source,
            self.system.driver_version,
            self.system.nvml_version.as_deref().unwrap_or("n/a"),
            self.system.cuda_driver_version.as_deref().unwrap_or("n/a"),
        );
        s.push_str(&format!(
            "{:<4} {:<44} {:<24} {:<13} {:>4} {:>9} {:>9} {:>9} {:>5} {:<17} {:<8} {:<5} {:<12} {:>5}\n",
            "idx", "uuid", "name", "pci", "numa", "total", "used", "free", "util", "compute mode", "mig", "ecc", "retired/remap", "procs"
        ));
        let na = || "-".to_string();
        for g in &self.gpus {
            let retired = match (g.retired_pages, g.remapped_rows) {
                (Some(r), _) => format!("{}+{} pages", r.single_bit, r.double_bit),
                (None, Some(r)) => format!("{}+{} rows", r.correctable, r.uncorrectable),
                (None, None) => na(),
            };
            s.push_str(&format!(
                "{:<4} {:<44} {:<24} {:<13} {:>4} {:>9} {:>9} {:>9} {:>5} {:<17} {:<8} {:<5} {:<12} {:>5}\n",
                g.index,
                g.uuid,
                g.name.chars().take(24).collect::<String>(),
                g.pci_bus_id,
                g.numa_node.map_or_else(na, |n| n.to_string()),
                g.memory.total_mib,
                g.memory.used_mib,
                g.memory.free_mib,
                g.utilisation.map_or_else(na, |u| format!("{}%", u.gpu_pct)),
                g.compute_mode.as_str(),
                match g.mig_mode.current {
                    Some(true) => "on".to_string(),
                    Some(false) => "off".to_string(),
                    None => na(),
                },
                g.ecc.map_or_else(na, |e| if e.current { "on" } else { "off" }.to_string()),
                retired,
                g.processes.len(),
            ));
            for m in &g.mig_instances {
                s.push_str(&format!(
                    "  mig {:<2} {:<40} sm {:>3} total {:>7} MiB used {:>7} MiB free {:>7} MiB\n",
                    m.index,
                    mig_slot_id(&g.uuid, m),
                    m.multiprocessor_count.map_or_else(na, |n| n.to_string()),
                    m.memory.total_mib,
                    m.memory.used_mib,
                    m.memory.free_mib
                ));
            }
            for p in &g.processes {
                s.push_str(&format!(
                    "  pid {:<8} {:<4} {:>7} MiB  {}\n",
                    p.pid,
                    p.kind.as_deref().unwrap_or("-"),
                    p.used_mib.map_or_else(na, |m| m.to_string()),
                    p.name.as_deref().unwrap_or("")
                ));
            }
        }
        s
    }
}

/// The slot id of a MIG instance: its UUID, else `GPU-…/giN/ciM`, else
/// `GPU-…/migI`.
pub fn mig_slot_id(parent: &str, m: &MigInstance) -> String {
    if let Some(u) = &m.uuid {
        return u.clone();
    }
    match (m.gpu_instance_id, m.compute_instance_id) {
        (Some(gi), Some(ci)) => format!("{parent}/gi{gi}/ci{ci}"),
        _ => format!("{parent}/mig{}", m.index),
    }
}

fn usage<'a>(
    gpus: impl Iterator<Item = (&'a str, &'a [crate::model::GpuProcess])>,
    pids: &[u32],
) -> VmGpuUsage {
    let mut u = VmGpuUsage::default();
    for (uuid, procs) in gpus {
        let mine: Vec<_> = procs.iter().filter(|p| pids.contains(&p.pid)).collect();
        if mine.is_empty() {
            continue;
        }
        // Saturating: a recording is input, and may hold absurd values.
        let mem = mine
            .iter()
            .filter_map(|p| p.used_mib)
            .fold(0u64, u64::saturating_add);
        u.mem_mib = u.mem_mib.saturating_add(mem);
        u.per_gpu.push((uuid.to_string(), mem));
        for p in mine {
            if let Some(sm) = p.sm_util_pct {
                u.sm_util_pct = Some(u.sm_util_pct.unwrap_or(0).saturating_add(sm));
            }
        }
    }
    u
}
