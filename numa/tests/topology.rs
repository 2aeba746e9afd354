//! Topology loading through the real hwloc library.

use numa::{CacheKind, DeviceKind, DistanceOrigin, HostTopology, TopologyError, TopologySource};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/two-socket-four-node.xml"
);

#[test]
fn synthetic_two_socket_four_node_has_expected_shape() {
    let t = HostTopology::from_synthetic("pack:2 numa:2(memory=8GiB) l3:1(size=16MiB) core:4 pu:2")
        .unwrap();
    assert_eq!(t.packages.len(), 2);
    assert_eq!(t.nodes.len(), 4);
    assert_eq!(t.cores.len(), 16);
    assert_eq!(t.pus().len(), 32);
    for (i, node) in t.nodes.iter().enumerate() {
        assert_eq!(node.id as usize, i);
        assert_eq!(node.memory_bytes, 8 << 30);
        assert_eq!(node.cores.len(), 4);
        assert_eq!(node.pus.len(), 8);
        assert_eq!(node.package, Some(u32::try_from(i / 2).unwrap()));
    }
    assert_eq!(t.packages[1].nodes, vec![2, 3]);
    // SMT siblings are consecutive PUs in a synthetic topology.
    assert_eq!(t.cores[0].pus, vec![0, 1]);
    assert_eq!(t.core_of_pu(9).unwrap().index, 4);
    let l3: Vec<_> = t.caches.iter().filter(|c| c.level == 3).collect();
    assert_eq!(l3.len(), 4);
    assert_eq!(l3[0].size_bytes, 16 << 20);
    assert_eq!(l3[0].kind, CacheKind::Unified);
    // hwloc reports no distances for a synthetic host: derived from packages.
    assert_eq!(t.distances.origin, DistanceOrigin::Derived);
    assert_eq!(t.distance(0, 1), Some(20));
    assert_eq!(t.distance(0, 2), Some(30));
    assert_eq!(t.distance(3, 3), Some(10));
    assert!(matches!(t.source, TopologySource::Synthetic { .. }));
}

#[test]
fn xml_fixture_reports_distances_and_device_locality() {
    let t = HostTopology::from_xml_file(FIXTURE).unwrap();
    assert_eq!(t.nodes.len(), 4);
    assert_eq!(t.distances.origin, DistanceOrigin::Reported);
    assert_eq!(t.distance(0, 1), Some(12));
    assert_eq!(t.distance(1, 3), Some(20));
    let gpu = t.gpu("cuda0").unwrap();
    assert_eq!(gpu.kind, DeviceKind::Gpu);
    assert_eq!(gpu.pci_bus_id, "0000:41:00.0");
    assert_eq!(gpu.nodes, vec![2]);
    assert!(t.gpu("0000:41:00.0").is_some());
    let nic = t
        .devices
        .iter()
        .find(|d| d.kind == DeviceKind::Nic)
        .unwrap();
    assert_eq!(nic.names, vec!["eth1".to_owned()]);
    assert_eq!(nic.nodes, vec![0]);
}

#[test]
fn xml_document_in_memory_matches_file() {
    let text = std::fs::read_to_string(FIXTURE).unwrap();
    let a = HostTopology::from_xml(&text).unwrap();
    let b = HostTopology::from_xml_file(FIXTURE).unwrap();
    assert_eq!(a.nodes, b.nodes);
    assert_eq!(a.devices, b.devices);
    assert_eq!(a.distances, b.distances);
}

#[test]
fn topology_round_trips_through_json() {
    let t = HostTopology::from_xml_file(FIXTURE).unwrap();
    let json = serde_json::to_string(&t).unwrap();
    let back: HostTopology = serde_json::from_str(&json).unwrap();
    assert_eq!(t, back);
}

#[test]
fn live_topology_matches_kernel_view() {
    let t = HostTopology::live().unwrap();
    let online = std::fs::read_to_string("/sys/devices/system/node/online").unwrap();
    let kernel_nodes = parse_list(online.trim());
    let ours: Vec<u32> = t.nodes.iter().map(|n| n.id).collect();
    assert_eq!(ours, kernel_nodes);
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    assert_eq!(t.pus(), parse_list(cpus.trim()));
    assert!(t.nodes.iter().all(|n| n.memory_bytes > 0));
    // Every core belongs to a node.
    assert!(t.cores.iter().all(|c| c.node.is_some()));
}

#[test]
fn malformed_xml_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.xml");
    std::fs::write(&path, "<topology version=\"2.0\"><object type=\"Machine\"").unwrap();
    let err = HostTopology::from_xml_file(&path).unwrap_err();
    assert!(matches!(err, TopologyError::XmlFile { .. }), "{err:?}");
    assert!(err.to_string().contains("broken.xml"));
}

#[test]
fn missing_xml_file_is_a_clear_error() {
    let err = HostTopology::from_xml_file("/nonexistent/host.xml").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/host.xml"), "{err}");
}

#[test]
fn malformed_xml_document_is_a_clear_error() {
    let err = HostTopology::from_xml("not xml at all").unwrap_err();
    assert!(matches!(err, TopologyError::XmlText));
}

#[test]
fn impossible_synthetic_description_is_a_clear_error() {
    for bad in ["pack:2 numa:0 core:4", "banana:3", "pack:2 core:x pu:2", ""] {
        let err = HostTopology::from_synthetic(bad).unwrap_err();
        assert!(
            matches!(err, TopologyError::Synthetic { .. }),
            "{bad}: {err:?}"
        );
        assert!(err.to_string().contains("synthetic"));
    }
}

fn parse_list(s: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                out.extend(a.parse::<u32>().expect("number")..=b.parse::<u32>().expect("number"))
            }
            None => out.push(part.parse().expect("number")),
        }
    }
    out
}

/// Every GPU (PCI class 0x03/0x12) and NIC (0x02) in sysfs, with its node
/// (-1 when the platform reports none): (bus id, class, node).
fn sysfs_pci() -> Vec<(String, u32, i64)> {
    let Ok(dir) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
        let Ok(class) = u32::from_str_radix(read("class").trim().trim_start_matches("0x"), 16)
        else {
            continue;
        };
        if matches!(class >> 16, 0x02 | 0x03 | 0x12) {
            let node = read("numa_node").trim().parse().unwrap_or(-1);
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                class >> 16,
                node,
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn hw_numa_live_gpus_and_nics_match_sysfs_locality() {
    let t = HostTopology::live().unwrap();
    let all: Vec<u32> = t.nodes.iter().map(|n| n.id).collect();
    let sysfs = sysfs_pci();
    let mut ours: Vec<&str> = t.devices.iter().map(|d| d.pci_bus_id.as_str()).collect();
    ours.sort_unstable();
    let theirs: Vec<&str> = sysfs.iter().map(|(b, _, _)| b.as_str()).collect();
    assert_eq!(ours, theirs, "hwloc and sysfs disagree on GPUs/NICs");
    for (bus, class, node) in &sysfs {
        let d = t.devices.iter().find(|d| &d.pci_bus_id == bus).unwrap();
        let kind = if *class == 0x02 {
            DeviceKind::Nic
        } else {
            DeviceKind::Gpu
        };
        assert_eq!(d.kind, kind, "{bus}");
        match u32::try_from(*node) {
            // hwloc attaches a device to the object covering its local CPUs,
            // which may be a package spanning the sysfs node and others.
            Ok(n) => assert!(d.nodes.contains(&n), "{bus}: {:?} lacks node {n}", d.nodes),
            Err(_) => assert_eq!(d.nodes, all, "{bus}: no locality reported, so every node"),
        }
    }
    if !sysfs.iter().any(|(_, class, _)| *class != 0x02) {
        println!(
            "SKIP hw_numa_live_gpus_and_nics_match_sysfs_locality: no GPU on this host (the NIC checks ran)"
        );
    }
}
