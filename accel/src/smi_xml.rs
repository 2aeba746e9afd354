//! `nvidia-smi -q -x` output, read into a [`Snapshot`].
//!
//! This is the format operators already have (`nvidia-smi -q -x > gpu.xml`),
//! and the one real GPU readings are published in. The reader is strict
//! about what placement relies on (UUID, name, PCI address, memory) and
//! lenient about the rest: `N/A` and missing optional elements become
//! `None`. It takes input from anywhere, so it bounds what it parses: at most
//! [`MAX_XML_BYTES`] bytes and [`MAX_XML_NODES`] nodes; a DOCTYPE is allowed
//! (nvidia-smi writes one) and roxmltree refuses entity loops.

use roxmltree::{Document, Node, ParsingOptions};

use crate::error::InventoryError;
use crate::model::{
    ComputeMode, EccMode, GpuProcess, GpuReading, MemoryReading, MigInstance, MigMode,
    RemappedRows, RetiredPages, Snapshot, SystemReading, Utilisation,
};
use crate::sysfs::sysfs_bdf;

/// The largest XML accepted (a real 8-GPU report is under 1 MiB).
pub const MAX_XML_BYTES: usize = 16 << 20;
/// The most XML nodes accepted.
pub const MAX_XML_NODES: u32 = 1_000_000;

/// What an nvidia-smi report holds besides the readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmiLog {
    /// The readings.
    pub snapshot: Snapshot,
    /// nvidia-smi's `<timestamp>`, as written.
    pub timestamp: Option<String>,
    /// Things worth knowing about the file (e.g. `attached_gpus` disagreeing
    /// with the GPUs present).
    pub notes: Vec<String>,
}

fn err(reason: impl Into<String>) -> InventoryError {
    InventoryError::Xml {
        reason: reason.into(),
    }
}

/// Reads an nvidia-smi XML report.
pub fn parse_smi_xml(text: &str) -> Result<SmiLog, InventoryError> {
    if text.len() > MAX_XML_BYTES {
        return Err(err(format!(
            "{} bytes, more than the {MAX_XML_BYTES} accepted",
            text.len()
        )));
    }
    let opts = ParsingOptions {
        allow_dtd: true,
        nodes_limit: MAX_XML_NODES,
    };
    let doc = Document::parse_with_options(text, opts).map_err(|e| err(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "nvidia_smi_log" {
        return Err(err(format!(
            "the root element is <{}>, not <nvidia_smi_log>",
            root.tag_name().name().chars().take(64).collect::<String>()
        )));
    }
    let driver_version = text_of(root, "driver_version")
        .filter(|s| !is_na(s))
        .ok_or_else(|| err("<driver_version> is missing"))?;
    let system = SystemReading {
        driver_version,
        nvml_version: None,
        cuda_driver_version: text_of(root, "cuda_version").filter(|s| !is_na(s)),
    };
    let mut gpus = Vec::new();
    for (i, g) in children(root, "gpu").enumerate() {
        let index = u32::try_from(i).map_err(|_| err("too many <gpu> elements"))?;
        gpus.push(read_gpu(g, index)?);
    }
    let mut notes = Vec::new();
    if let Some(n) = text_of(root, "attached_gpus")
        && n.parse::<usize>().ok() != Some(gpus.len())
    {
        notes.push(format!(
            "<attached_gpus> says {n}, the report holds {} <gpu> element(s)",
            gpus.len()
        ));
    }
    let mut uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
    uuids.sort_unstable();
    if let Some(w) = uuids.windows(2).find(|w| w[0] == w[1]) {
        return Err(err(format!("two GPUs have the UUID {}", w[0])));
    }
    Ok(SmiLog {
        snapshot: Snapshot { system, gpus },
        timestamp: text_of(root, "timestamp"),
        notes,
    })
}

fn children<'a, 'i>(n: Node<'a, 'i>, name: &'static str) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &'static str) -> Option<Node<'a, 'i>> {
    children(n, name).next()
}

/// The trimmed text of a child element (`None` when absent).
fn text_of(n: Node<'_, '_>, name: &'static str) -> Option<String> {
    child(n, name).map(|c| c.text().unwrap_or("").trim().to_string())
}

fn path_text(n: Node<'_, '_>, path: &[&'static str]) -> Option<String> {
    let (last, init) = path.split_last()?;
    let mut cur = n;
    for p in init {
        cur = child(cur, p)?;
    }
    text_of(cur, last)
}

fn is_na(s: &str) -> bool {
    s.is_empty() || s == "N/A" || s.starts_with("Requested functionality")
}

/// `"81920 MiB"` → 81920.
fn mib(s: &str, at: &str) -> Result<u64, InventoryError> {
    let v = s
        .strip_suffix("MiB")
        .map(str::trim)
        .and_then(|v| v.parse::<u64>().ok());
    v.ok_or_else(|| err(format!("{at} is {:?}, not a number of MiB", clip(s))))
}

fn pct(s: &str, at: &str) -> Result<Option<u32>, InventoryError> {
    if is_na(s) {
        return Ok(None);
    }
    let v = s
        .strip_suffix('%')
        .map(str::trim)
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|v| *v <= 100);
    v.map(Some)
        .ok_or_else(|| err(format!("{at} is {:?}, not a percentage", clip(s))))
}

fn opt_u32(s: Option<String>, at: &str) -> Result<Option<u32>, InventoryError> {
    match s {
        None => Ok(None),
        Some(s) if is_na(&s) => Ok(None),
        Some(s) => s
            .parse::<u32>()
            .map(Some)
            .map_err(|_| err(format!("{at} is {:?}, not a number", clip(&s)))),
    }
}

fn flag(s: Option<String>, yes: &str, no: &str, at: &str) -> Result<Option<bool>, InventoryError> {
    match s {
        None => Ok(None),
        Some(s) if is_na(&s) => Ok(None),
        Some(s) if s == yes => Ok(Some(true)),
        Some(s) if s == no => Ok(Some(false)),
        Some(s) => Err(err(format!("{at} is {:?}, not {yes} or {no}", clip(&s)))),
    }
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

fn read_memory(n: Node<'_, '_>, at: &str) -> Result<MemoryReading, InventoryError> {
    let fb = child(n, "fb_memory_usage")
        .ok_or_else(|| err(format!("{at}: <fb_memory_usage> is missing")))?;
    let field = |name: &'static str| -> Result<u64, InventoryError> {
        let t = text_of(fb, name)
            .ok_or_else(|| err(format!("{at}: <fb_memory_usage><{name}> is missing")))?;
        mib(&t, &format!("{at}: <fb_memory_usage><{name}>"))
    };
    let m = MemoryReading {
        total_mib: field("total")?,
        used_mib: field("used")?,
        free_mib: field("free")?,
    };
    if m.used_mib > m.total_mib || m.free_mib > m.total_mib {
        return Err(err(format!(
            "{at}: used {} MiB and free {} MiB do not fit in total {} MiB",
            m.used_mib, m.free_mib, m.total_mib
        )));
    }
    Ok(m)
}

fn read_gpu(g: Node<'_, '_>, index: u32) -> Result<GpuReading, InventoryError> {
    let id_attr = g.attribute("id").map(str::to_string);
    let at = format!("GPU {index}");
    let pci_raw = path_text(g, &["pci", "pci_bus_id"])
        .or(id_attr)
        .ok_or_else(|| {
            err(format!(
                "{at}: no PCI address (<gpu id> or <pci><pci_bus_id>)"
            ))
        })?;
    let pci_bus_id = sysfs_bdf(&pci_raw).map_err(|_| {
        err(format!(
            "{at}: PCI address {:?} is not DDDD:BB:DD.F",
            clip(&pci_raw)
        ))
    })?;
    let at = format!("GPU {index} ({pci_bus_id})");
    let uuid = text_of(g, "uuid")
        .filter(|s| !is_na(s))
        .ok_or_else(|| err(format!("{at}: <uuid> is missing")))?;
    let name = text_of(g, "product_name")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err(format!("{at}: <product_name> is missing")))?;
    let memory = read_memory(g, &at)?;
    let utilisation = match child(g, "utilization") {
        None => None,
        Some(u) => {
            let gpu = pct(
                &text_of(u, "gpu_util").unwrap_or_default(),
                &format!("{at}: <gpu_util>"),
            )?;
            let mem = pct(
                &text_of(u, "memory_util").unwrap_or_default(),
                &format!("{at}: <memory_util>"),
            )?;
            gpu.zip(mem).map(|(gpu_pct, memory_pct)| Utilisation {
                gpu_pct,
                memory_pct,
            })
        }
    };
    let mut processes = Vec::new();
    if let Some(ps) = child(g, "processes") {
        for p in children(ps, "process_info") {
            let pid = opt_u32(text_of(p, "pid"), &format!("{at}: <process_info><pid>"))?
                .ok_or_else(|| err(format!("{at}: a <process_info> has no <pid>")))?;
            let used_mib = match text_of(p, "used_memory") {
                Some(s) if !is_na(&s) => {
                    Some(mib(&s, &format!("{at}: process {pid} <used_memory>"))?)
                }
                _ => None,
            };
            processes.push(GpuProcess {
                pid,
                used_mib,
                gpu_instance_id: opt_u32(
                    text_of(p, "gpu_instance_id"),
                    &format!("{at}: process {pid} <gpu_instance_id>"),
                )?,
                compute_instance_id: opt_u32(
                    text_of(p, "compute_instance_id"),
                    &format!("{at}: process {pid} <compute_instance_id>"),
                )?,
                kind: text_of(p, "type").filter(|s| !is_na(s)),
                name: text_of(p, "process_name").filter(|s| !is_na(s)),
                sm_util_pct: None,
            });
        }
    }
    let compute_mode = match text_of(g, "compute_mode").as_deref() {
        Some("Default") => ComputeMode::Default,
        Some("Exclusive_Thread") => ComputeMode::ExclusiveThread,
        Some("Prohibited") => ComputeMode::Prohibited,
        Some("Exclusive_Process") => ComputeMode::ExclusiveProcess,
        // As NVML's reading maps NotSupported.
        Some(other) if is_na(other) => ComputeMode::Other("N/A".to_string()),
        Some(other) => ComputeMode::Other(clip(other)),
        None => return Err(err(format!("{at}: <compute_mode> is missing"))),
    };
    let mig_mode = match child(g, "mig_mode") {
        None => MigMode::default(),
        Some(m) => MigMode {
            current: flag(
                text_of(m, "current_mig"),
                "Enabled",
                "Disabled",
                &format!("{at}: <current_mig>"),
            )?,
            pending: flag(
                text_of(m, "pending_mig"),
                "Enabled",
                "Disabled",
                &format!("{at}: <pending_mig>"),
            )?,
        },
    };
    let mut mig_instances = Vec::new();
    if let Some(md) = child(g, "mig_devices") {
        for d in children(md, "mig_device") {
            let mat = format!("{at}: MIG device {}", mig_instances.len());
            let index = opt_u32(text_of(d, "index"), &format!("{mat} <index>"))?
                .ok_or_else(|| err(format!("{mat}: <index> is missing")))?;
            mig_instances.push(MigInstance {
                index,
                uuid: None,
                gpu_instance_id: opt_u32(
                    text_of(d, "gpu_instance_id"),
                    &format!("{mat} <gpu_instance_id>"),
                )?,
                compute_instance_id: opt_u32(
                    text_of(d, "compute_instance_id"),
                    &format!("{mat} <compute_instance_id>"),
                )?,
                multiprocessor_count: opt_u32(
                    path_text(d, &["device_attributes", "shared", "multiprocessor_count"]),
                    &format!("{mat} <multiprocessor_count>"),
                )?,
                memory: read_memory(d, &mat)?,
            });
        }
    }
    let ecc = match child(g, "ecc_mode") {
        None => None,
        Some(e) => {
            let cur = flag(
                text_of(e, "current_ecc"),
                "Enabled",
                "Disabled",
                &format!("{at}: <current_ecc>"),
            )?;
            let pend = flag(
                text_of(e, "pending_ecc"),
                "Enabled",
                "Disabled",
                &format!("{at}: <pending_ecc>"),
            )?;
            cur.map(|current| EccMode {
                current,
                pending: pend.unwrap_or(current),
            })
        }
    };
    let retired_pages = match child(g, "retired_pages") {
        None => None,
        Some(r) => {
            let single = opt_u32(
                path_text(r, &["multiple_single_bit_retirement", "retired_count"]),
                &format!("{at}: single-bit <retired_count>"),
            )?;
            let double = opt_u32(
                path_text(r, &["double_bit_retirement", "retired_count"]),
                &format!("{at}: double-bit <retired_count>"),
            )?;
            let pending = flag(
                text_of(r, "pending_retirement"),
                "Yes",
                "No",
                &format!("{at}: <pending_retirement>"),
            )?;
            match (single, double) {
                (Some(single_bit), Some(double_bit)) => Some(RetiredPages {
                    single_bit,
                    double_bit,
                    pending: pending.unwrap_or(false),
                }),
                _ => None,
            }
        }
    };
    let remapped_rows = match child(g, "remapped_rows") {
        None => None,
        Some(r) if child(r, "remapped_row_corr").is_none() => None,
        Some(r) => {
            let c = opt_u32(
                text_of(r, "remapped_row_corr"),
                &format!("{at}: <remapped_row_corr>"),
            )?;
            let u = opt_u32(
                text_of(r, "remapped_row_unc"),
                &format!("{at}: <remapped_row_unc>"),
            )?;
            let p = flag(
                text_of(r, "remapped_row_pending"),
                "Yes",
                "No",
                &format!("{at}: <remapped_row_pending>"),
            )?;
            let f = flag(
                text_of(r, "remapped_row_failure"),
                "Yes",
                "No",
                &format!("{at}: <remapped_row_failure>"),
            )?;
            c.zip(u).map(|(correctable, uncorrectable)| RemappedRows {
                correctable,
                uncorrectable,
                pending: p.unwrap_or(false),
                failure: f.unwrap_or(false),
            })
        }
    };
    Ok(GpuReading {
        index,
        uuid,
        name,
        pci_bus_id,
        numa_node: None,
        memory,
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
