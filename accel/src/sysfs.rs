//! PCI addresses and NUMA locality from sysfs.
//!
//! NVML writes a PCI address as `00000000:01:00.0` (32-bit domain, upper-case
//! hex); sysfs names the device `0000:01:00.0` (16-bit domain, lower case).
//! NVML's own NUMA query (`nvmlDeviceGetNumaNodeId`) is missing from older
//! drivers and returns NotSupported on many boards, so the node comes from
//! `/sys/bus/pci/devices/<bdf>/numa_node`.

use std::path::Path;

use crate::error::InventoryError;

/// Turns NVML's or nvidia-smi's PCI address into sysfs form.
///
/// Accepts `DDDDDDDD:BB:DD.F`, `DDDD:BB:DD.F` and `BB:DD.F` in either case;
/// anything else is an error naming the input.
pub fn sysfs_bdf(bus_id: &str) -> Result<String, InventoryError> {
    let bad = || InventoryError::PciAddress {
        address: bus_id.chars().take(64).collect(),
    };
    let s = bus_id.trim();
    let parts: Vec<&str> = s.split(':').collect();
    let (domain, bus, devfn) = match parts.as_slice() {
        [d, b, df] => (u32::from_str_radix(d, 16).map_err(|_| bad())?, *b, *df),
        [b, df] => (0, *b, *df),
        _ => return Err(bad()),
    };
    let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
    let bus = u8::from_str_radix(bus, 16).map_err(|_| bad())?;
    let dev = u8::from_str_radix(dev, 16).map_err(|_| bad())?;
    let func = u8::from_str_radix(func, 16).map_err(|_| bad())?;
    if dev > 0x1f || func > 7 || domain > 0xffff {
        return Err(bad());
    }
    Ok(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// The NUMA node of a PCI device, from `<sys>/bus/pci/devices/<bdf>/numa_node`
/// (`None` when the file is missing or says -1: no NUMA, or unknown).
pub fn pci_numa_node(sys_root: &Path, bdf: &str) -> Option<u32> {
    let text =
        std::fs::read_to_string(sys_root.join("bus/pci/devices").join(bdf).join("numa_node"))
            .ok()?;
    let n: i64 = text.trim().parse().ok()?;
    u32::try_from(n).ok()
}

/// NUMA distances between nodes (the ACPI SLIT as Linux shows it: 10 for a
/// node to itself, larger is farther).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeDistances {
    /// `(node, its row of distances indexed by node)`.
    rows: Vec<(u32, Vec<u32>)>,
}

impl NodeDistances {
    /// Distances given directly: `rows[i]` is node `i`'s row.
    pub fn from_rows(rows: Vec<Vec<u32>>) -> Self {
        NodeDistances {
            rows: rows
                .into_iter()
                .enumerate()
                .filter_map(|(i, r)| u32::try_from(i).ok().map(|i| (i, r)))
                .collect(),
        }
    }

    /// Reads `<sys>/devices/system/node/node*/distance`. A host without
    /// NUMA (or without the files) gives an empty table.
    pub fn read(sys_root: &Path) -> Self {
        let mut rows = Vec::new();
        let Ok(dir) = std::fs::read_dir(sys_root.join("devices/system/node")) else {
            return NodeDistances::default();
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix("node"))
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(entry.path().join("distance")) else {
                continue;
            };
            let row: Option<Vec<u32>> = text.split_whitespace().map(|v| v.parse().ok()).collect();
            if let Some(row) = row {
                rows.push((n, row));
            }
        }
        rows.sort_by_key(|(n, _)| *n);
        NodeDistances { rows }
    }

    /// The distance from `from` to `to`: 10 when equal, the table's value
    /// when known, else 20 (Linux's default remote distance) for two known
    /// different nodes. `None` when either node is unknown.
    pub fn distance(&self, from: Option<u32>, to: Option<u32>) -> Option<u32> {
        let (from, to) = (from?, to?);
        if from == to {
            return Some(10);
        }
        let table = self
            .rows
            .iter()
            .find(|(n, _)| *n == from)
            .and_then(|(_, row)| row.get(usize::try_from(to).ok()?).copied());
        Some(table.unwrap_or(20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_bdf_maps_nvml_forms() {
        assert_eq!(
            sysfs_bdf("00000000:01:00.0").ok().as_deref(),
            Some("0000:01:00.0")
        );
        assert_eq!(
            sysfs_bdf("00000000:00:1E.0").ok().as_deref(),
            Some("0000:00:1e.0")
        );
        assert_eq!(
            sysfs_bdf("0001:C1:00.1").ok().as_deref(),
            Some("0001:c1:00.1")
        );
        assert_eq!(sysfs_bdf("3b:00.0").ok().as_deref(), Some("0000:3b:00.0"));
    }

    #[test]
    fn sysfs_bdf_rejects_garbage() {
        for bad in [
            "",
            "0:1",
            "zz:00.0",
            "00:20.0",
            "00:00.8",
            "100000:00:00.0",
            "a:b:c:d",
            "01:00",
        ] {
            assert!(sysfs_bdf(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn numa_node_and_distances_from_a_sysfs_tree() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path();
        let dev = root.join("bus/pci/devices/0000:3b:00.0");
        std::fs::create_dir_all(&dev).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dev.join("numa_node"), "1\n").unwrap_or_else(|e| panic!("{e}"));
        let other = root.join("bus/pci/devices/0000:01:00.0");
        std::fs::create_dir_all(&other).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(other.join("numa_node"), "-1\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pci_numa_node(root, "0000:3b:00.0"), Some(1));
        assert_eq!(pci_numa_node(root, "0000:01:00.0"), None);
        assert_eq!(pci_numa_node(root, "0000:99:00.0"), None);

        for (n, row) in [(0, "10 21 31"), (1, "21 10 21"), (2, "31 21 10")] {
            let d = root.join(format!("devices/system/node/node{n}"));
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(d.join("distance"), format!("{row}\n"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let d = NodeDistances::read(root);
        assert_eq!(d.distance(Some(0), Some(2)), Some(31));
        assert_eq!(d.distance(Some(2), Some(1)), Some(21));
        assert_eq!(d.distance(Some(1), Some(1)), Some(10));
        assert_eq!(d.distance(Some(0), None), None);
        assert_eq!(d.distance(Some(5), Some(0)), Some(20));
    }

    #[test]
    fn this_hosts_distance_table_is_square_when_present() {
        let d = NodeDistances::read(Path::new("/sys"));
        for (_, row) in &d.rows {
            assert_eq!(row.len(), d.rows.len());
        }
    }
}
