//! The placement planner on topologies loaded through the real hwloc library.

use numa::{
    HostTopology, Placement, PlacementError, PlacementPolicy, Planner, Resource, SEGMENT_GRANULE,
    VmDemand,
};
use proptest::prelude::*;
use std::collections::BTreeSet;

const GIB: u64 = 1 << 30;
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/two-socket-four-node.xml"
);

fn vm(name: &str, vcpus: u32, gib: u64) -> VmDemand {
    VmDemand {
        vm: name.to_owned(),
        vcpus,
        memory_bytes: gib * GIB,
        gpu: None,
        latency_sensitive: false,
    }
}

fn fixture() -> HostTopology {
    HostTopology::from_xml_file(FIXTURE).expect("fixture loads")
}

fn place_all(planner: &Planner, demands: &[VmDemand]) -> Vec<Placement> {
    let mut ledger = planner.empty_ledger();
    let mut out = Vec::new();
    for d in demands {
        let p = planner.plan(&ledger, d).expect("plan");
        planner.record(&mut ledger, &p).expect("record");
        out.push(p);
    }
    out
}

#[test]
fn plan_small_vm_on_empty_host_uses_one_node_and_covers_memory() {
    let topo = fixture();
    let planner = Planner::new(&topo, PlacementPolicy::default());
    let p = planner.place(&[], &vm("a", 4, 2)).unwrap();
    assert!(p.is_single_node());
    let node = topo.node(p.nodes[0]).unwrap();
    assert!(p.vcpu_pus.iter().all(|pu| node.pus.contains(pu)));
    assert_eq!(p.memory.len(), 1);
    assert_eq!(p.memory[0].len_bytes, 2 * GIB);
    // Four vCPUs on four different cores before any SMT sibling is used.
    let cores: std::collections::BTreeSet<_> = p
        .vcpu_pus
        .iter()
        .map(|&pu| topo.core_of_pu(pu).unwrap().index)
        .collect();
    assert_eq!(cores.len(), 4);
}

#[test]
fn plan_second_vm_goes_to_least_loaded_node() {
    let topo = fixture();
    let planner = Planner::new(&topo, PlacementPolicy::default());
    let placed = place_all(
        &planner,
        &[vm("a", 6, 6), vm("b", 6, 6), vm("c", 6, 6), vm("d", 6, 6)],
    );
    let mut nodes: Vec<u32> = placed.iter().map(|p| p.nodes[0]).collect();
    nodes.sort_unstable();
    assert_eq!(nodes, vec![0, 1, 2, 3]);
}

#[test]
fn plan_latency_sensitive_vm_gets_whole_cores_that_nobody_shares() {
    let topo = HostTopology::from_synthetic("pack:1 numa:1(memory=16GiB) core:4 pu:2").unwrap();
    let planner = Planner::new(&topo, PlacementPolicy::default());
    let mut lat = vm("rt", 2, 1);
    lat.latency_sensitive = true;
    let placed = place_all(&planner, &[lat, vm("bulk", 4, 1)]);
    let rt = &placed[0];
    assert_eq!(rt.exclusive_cores.len(), 2);
    let rt_cores: Vec<usize> = rt
        .vcpu_pus
        .iter()
        .map(|&pu| topo.core_of_pu(pu).unwrap().index)
        .collect();
    assert_eq!(rt_cores, rt.exclusive_cores);
    // The bulk VM fills the other two cores, both siblings each, and never
    // touches a sibling of the latency-sensitive VM's PUs.
    for &pu in &placed[1].vcpu_pus {
        let core = topo.core_of_pu(pu).unwrap().index;
        assert!(!rt_cores.contains(&core), "pu {pu} shares core {core}");
    }
    // Host now full for shared vCPUs: 4 PUs left, 4 used.
    let ledger = planner.ledger(&placed).unwrap();
    let err = planner.plan(&ledger, &vm("more", 1, 1)).unwrap_err();
    assert!(
        matches!(
            err,
            PlacementError::HostShort {
                resource: Resource::Vcpus,
                needed: 1,
                available: 0,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn plan_reserved_cores_stay_free_for_latency_sensitive_vms() {
    let topo = HostTopology::from_synthetic("pack:1 numa:1(memory=16GiB) core:4 pu:2").unwrap();
    let policy = PlacementPolicy {
        cpu_overcommit_percent: 200,
        reserved_cores_per_node: 1,
        ..PlacementPolicy::default()
    };
    let planner = Planner::new(&topo, policy);
    // Shared VMs fill the three unreserved cores (6 PUs x 200% = 12 vCPUs).
    let placed = place_all(&planner, &[vm("a", 6, 1), vm("b", 6, 1)]);
    for p in &placed {
        assert!(
            p.vcpu_pus
                .iter()
                .all(|&pu| topo.core_of_pu(pu).unwrap().index != 3),
            "{p:?}"
        );
    }
    let ledger = planner.ledger(&placed).unwrap();
    assert!(matches!(
        planner.plan(&ledger, &vm("c", 1, 1)),
        Err(PlacementError::HostShort { .. })
    ));
    // The reserved core is still whole for a latency-sensitive VM.
    let mut lat = vm("rt", 1, 1);
    lat.latency_sensitive = true;
    let p = planner.plan(&ledger, &lat).unwrap();
    assert_eq!(p.exclusive_cores, vec![3]);
    // Without the reservation the same sequence leaves no whole core.
    let open = Planner::new(
        &topo,
        PlacementPolicy {
            reserved_cores_per_node: 0,
            ..policy
        },
    );
    let placed = place_all(&open, &[vm("a", 6, 1), vm("b", 6, 1)]);
    let ledger = open.ledger(&placed).unwrap();
    assert!(matches!(
        open.plan(&ledger, &lat),
        Err(PlacementError::HostShort {
            resource: Resource::WholeCores,
            ..
        })
    ));
}

#[test]
fn plan_gpu_vm_lands_on_the_gpus_node() {
    let topo = fixture();
    let planner = Planner::new(&topo, PlacementPolicy::default());
    let mut d = vm("gpu", 4, 4);
    d.gpu = Some("cuda0".into());
    let p = planner.place(&[], &d).unwrap();
    assert_eq!(p.nodes, vec![2]);
    assert_eq!(p.gpu.as_deref(), Some("cuda0"));
}

#[test]
fn plan_gpu_node_full_names_node_resource_and_shortfall() {
    let topo = fixture();
    let planner = Planner::new(&topo, PlacementPolicy::default());
    let mut d = vm("gpu", 10, 1);
    d.gpu = Some("0000:41:00.0".into());
    let err = planner.place(&[], &d).unwrap_err();
    assert_eq!(
        err,
        PlacementError::GpuNodeShort {
            vm: "gpu".into(),
            gpu: "0000:41:00.0".into(),
            node: 2,
            resource: Resource::Vcpus,
            needed: 10,
            available: 8,
        }
    );
    assert!(err.to_string().contains("short by 2"), "{err}");
}

#[test]
fn plan_unknown_gpu_is_rejected() {
    let planner = Planner::new(&fixture(), PlacementPolicy::default());
    let mut d = vm("g", 1, 1);
    d.gpu = Some("cuda7".into());
    assert!(matches!(
        planner.place(&[], &d),
        Err(PlacementError::UnknownGpu { .. })
    ));
}

#[test]
fn plan_vm_larger_than_a_node_spreads_over_the_nearest_nodes() {
    let topo = fixture();
    let planner = Planner::new(&topo, PlacementPolicy::default());
    // A node offers 8 vCPUs; 12 need two nodes. Nodes 0 and 1 are 12 apart,
    // nodes 0 and 2 are 20 apart: the spread must stay in one package.
    let p = planner.place(&[], &vm("big", 12, 10)).unwrap();
    assert_eq!(p.nodes, vec![0, 1]);
    assert_eq!(p.vcpu_pus.len(), 12);
    let total: u64 = p.memory.iter().map(|s| s.len_bytes).sum();
    assert_eq!(total, 10 * GIB);
    let mut offset = 0;
    for seg in &p.memory {
        assert_eq!(seg.offset_bytes, offset);
        assert_eq!(seg.offset_bytes % SEGMENT_GRANULE, 0);
        offset += seg.len_bytes;
    }
}

#[test]
fn plan_spread_disabled_rejects_with_best_node_and_shortfall() {
    let policy = PlacementPolicy {
        allow_spread: false,
        ..PlacementPolicy::default()
    };
    let planner = Planner::new(&fixture(), policy);
    let err = planner.place(&[], &vm("big", 12, 1)).unwrap_err();
    assert_eq!(
        err,
        PlacementError::NoSingleNode {
            vm: "big".into(),
            node: 0,
            resource: Resource::Vcpus,
            needed: 12,
            available: 8
        }
    );
}

#[test]
fn plan_more_memory_than_host_names_memory_shortfall() {
    let planner = Planner::new(&fixture(), PlacementPolicy::default());
    let err = planner.place(&[], &vm("huge", 2, 64)).unwrap_err();
    match err {
        PlacementError::HostShort {
            resource: Resource::MemoryBytes,
            needed,
            available,
            ..
        } => {
            assert_eq!(needed, 64 * GIB);
            assert!(available < needed);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn plan_rejects_invalid_demand_and_duplicate_vm() {
    let planner = Planner::new(&fixture(), PlacementPolicy::default());
    assert!(matches!(
        planner.place(&[], &vm("z", 0, 1)),
        Err(PlacementError::InvalidDemand { .. })
    ));
    let mut d = vm("z", 1, 1);
    d.memory_bytes = 0;
    assert!(matches!(
        planner.place(&[], &d),
        Err(PlacementError::InvalidDemand { .. })
    ));
    let p = planner.place(&[], &vm("a", 1, 1)).unwrap();
    assert!(matches!(
        planner.place(&[p], &vm("a", 1, 1)),
        Err(PlacementError::AlreadyPlaced { .. })
    ));
}

#[test]
fn ledger_rejects_placement_on_unknown_node_or_pu() {
    let planner = Planner::new(&fixture(), PlacementPolicy::default());
    let mut p = planner.place(&[], &vm("a", 1, 1)).unwrap();
    p.memory[0].node = 9;
    assert!(matches!(
        planner.ledger(&[p.clone()]),
        Err(PlacementError::UnknownNode { node: 9, .. })
    ));
    p.memory[0].node = 0;
    p.vcpu_pus[0] = 999;
    assert!(matches!(
        planner.ledger(&[p]),
        Err(PlacementError::UnknownPu { pu: 999, .. })
    ));
}

// ---- properties -------------------------------------------------------

/// Synthetic shapes: packages, nodes per package, cores per node, PUs per core.
fn shape() -> impl Strategy<Value = (u32, u32, u32, u32, u64)> {
    (1u32..=2, 1u32..=2, 1u32..=4, 1u32..=2, 1u64..=8)
}

fn demand() -> impl Strategy<Value = (u32, u64, bool)> {
    (1u32..=10, 1u64..=8 * 1024, any::<bool>())
}

fn topology_for(s: (u32, u32, u32, u32, u64)) -> HostTopology {
    let (p, n, c, t, mem) = s;
    HostTopology::from_synthetic(&format!(
        "pack:{p} numa:{n}(memory={mem}GiB) core:{c} pu:{t}"
    ))
    .expect("valid synthetic description")
}

/// Cores held back for latency-sensitive VMs: each node's last `r` cores.
fn reserved_cores(topo: &HostTopology, r: u32) -> BTreeSet<usize> {
    topo.nodes
        .iter()
        .flat_map(|n| n.cores.iter().rev().take(r as usize).copied())
        .collect()
}

/// Usage per node computed from placements alone, independently of the
/// planner: (shared vCPUs, shared PUs, memory).
fn usage(topo: &HostTopology, placements: &[Placement], reserved: u32) -> Vec<(u64, u64, u64)> {
    let exclusive: BTreeSet<usize> = placements
        .iter()
        .flat_map(|p| p.exclusive_cores.iter().copied())
        .collect();
    let held = reserved_cores(topo, reserved);
    topo.nodes
        .iter()
        .map(|node| {
            let shared_pus = node
                .cores
                .iter()
                .filter(|c| !exclusive.contains(c) && !held.contains(c))
                .map(|&c| topo.cores[c].pus.len() as u64)
                .sum();
            let shared_vcpus = placements
                .iter()
                .flat_map(|p| p.vcpu_pus.iter())
                .filter(|pu| node.pus.contains(pu))
                .filter(|&&pu| !exclusive.contains(&topo.core_of_pu(pu).expect("pu").index))
                .count() as u64;
            let mem = placements.iter().map(|p| p.memory_on(node.id)).sum();
            (shared_vcpus, shared_pus, mem)
        })
        .collect()
}

/// Could one node hold this demand? Computed without the planner.
fn some_node_fits(
    topo: &HostTopology,
    policy: PlacementPolicy,
    placements: &[Placement],
    d: &VmDemand,
) -> bool {
    let used = usage(topo, placements, policy.reserved_cores_per_node);
    let held = reserved_cores(topo, policy.reserved_cores_per_node);
    let busy_cores: BTreeSet<usize> = placements
        .iter()
        .flat_map(|p| {
            p.vcpu_pus
                .iter()
                .map(|&pu| topo.core_of_pu(pu).expect("pu").index)
        })
        .collect();
    topo.nodes
        .iter()
        .zip(used)
        .any(|(node, (vcpus, shared_pus, mem))| {
            let mem_cap = node.memory_bytes * u64::from(policy.memory_limit_percent) / 100;
            if mem + d.memory_bytes > mem_cap {
                return false;
            }
            let pct = u64::from(policy.cpu_overcommit_percent);
            if d.latency_sensitive {
                // Reserved cores first; taking one costs the shared pool nothing.
                let mut free: Vec<usize> = node
                    .cores
                    .iter()
                    .copied()
                    .filter(|c| !busy_cores.contains(c))
                    .collect();
                free.sort_by_key(|c| (!held.contains(c), *c));
                if (free.len() as u64) < u64::from(d.vcpus) {
                    return false;
                }
                let taken: u64 = free
                    .iter()
                    .take(d.vcpus as usize)
                    .filter(|c| !held.contains(c))
                    .map(|&c| topo.cores[c].pus.len() as u64)
                    .sum();
                (shared_pus - taken) * pct / 100 >= vcpus
            } else {
                vcpus + u64::from(d.vcpus) <= shared_pus * pct / 100
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn plan_never_overcommits_and_prefers_one_node(
        s in shape(),
        pct in prop_oneof![Just(100u32), Just(150), Just(200)],
        mem_pct in 50u32..=100,
        spread in any::<bool>(),
        reserved in 0u32..=2,
        demands in prop::collection::vec(demand(), 1..24),
    ) {
        let topo = topology_for(s);
        let policy = PlacementPolicy {
            cpu_overcommit_percent: pct,
            memory_limit_percent: mem_pct,
            allow_spread: spread,
            reserved_cores_per_node: reserved,
        };
        let held = reserved_cores(&topo, reserved);
        let planner = Planner::new(&topo, policy);
        let mut placements: Vec<Placement> = Vec::new();
        for (i, (vcpus, mib, lat)) in demands.into_iter().enumerate() {
            let d = VmDemand { vm: format!("vm{i}"), vcpus, memory_bytes: mib << 20, gpu: None, latency_sensitive: lat };
            let fits_one = some_node_fits(&topo, policy, &placements, &d);
            let ledger = planner.ledger(&placements).expect("ledger");
            match planner.plan(&ledger, &d) {
                Ok(p) => {
                    prop_assert_eq!(p.vcpu_pus.len(), vcpus as usize);
                    prop_assert_eq!(p.memory.iter().map(|m| m.len_bytes).sum::<u64>(), d.memory_bytes);
                    if fits_one {
                        prop_assert!(p.is_single_node(), "spread {:?} although one node fits", p.nodes);
                    }
                    if !spread {
                        prop_assert!(p.is_single_node());
                    }
                    placements.push(p);
                }
                Err(e) => prop_assert!(!fits_one, "rejected although one node fits: {}", e),
            }
            // Invariants over everything placed so far.
            for (node, (vcpus, shared_pus, mem)) in topo.nodes.iter().zip(usage(&topo, &placements, reserved)) {
                prop_assert!(vcpus * 100 <= shared_pus * u64::from(pct), "node {} vcpus {} > cap", node.id, vcpus);
                prop_assert!(mem * 100 <= node.memory_bytes * u64::from(mem_pct), "node {} memory over limit", node.id);
            }
            // Shared vCPUs never sit on a reserved core.
            for p in placements.iter().filter(|p| p.exclusive_cores.is_empty()) {
                for &pu in &p.vcpu_pus {
                    let core = topo.core_of_pu(pu).expect("pu").index;
                    prop_assert!(!held.contains(&core), "{} uses reserved core {}", p.vm, core);
                }
            }
            // Exclusive cores carry exactly one vCPU, on their first PU, of their owner.
            for p in &placements {
                for &c in &p.exclusive_cores {
                    let on_core: Vec<u32> = placements.iter().flat_map(|q| q.vcpu_pus.iter().copied())
                        .filter(|pu| topo.cores[c].pus.contains(pu)).collect();
                    prop_assert_eq!(on_core, vec![topo.cores[c].pus[0]]);
                }
            }
        }
    }

    #[test]
    fn plan_same_input_gives_same_answer(
        s in shape(),
        demands in prop::collection::vec(demand(), 1..16),
        probe in demand(),
    ) {
        let topo = topology_for(s);
        let planner = Planner::new(&topo, PlacementPolicy::default());
        let mut placements = Vec::new();
        let mut ledger = planner.empty_ledger();
        for (i, (vcpus, mib, lat)) in demands.into_iter().enumerate() {
            let d = VmDemand { vm: format!("vm{i}"), vcpus, memory_bytes: mib << 20, gpu: None, latency_sensitive: lat };
            if let Ok(p) = planner.plan(&ledger, &d) {
                planner.record(&mut ledger, &p).expect("record");
                placements.push(p);
            }
        }
        let d = VmDemand { vm: "probe".into(), vcpus: probe.0, memory_bytes: probe.1 << 20, gpu: None, latency_sensitive: probe.2 };
        let first = planner.plan(&ledger, &d);
        prop_assert_eq!(&first, &planner.plan(&ledger, &d));
        // A second planner, and the placements in the opposite order.
        let again = Planner::new(&topology_for(s), PlacementPolicy::default());
        placements.reverse();
        prop_assert_eq!(&first, &again.place(&placements, &d));
    }
}

#[test]
fn capacity_reports_free_slots_cores_and_memory_per_node() {
    let topo = HostTopology::from_synthetic("pack:1 numa:2(memory=4GiB) core:2 pu:2").unwrap();
    let policy = PlacementPolicy {
        memory_limit_percent: 50,
        ..PlacementPolicy::default()
    };
    let planner = Planner::new(&topo, policy);
    let empty = planner.capacity(&planner.empty_ledger());
    assert_eq!(empty.len(), 2);
    assert_eq!(
        (
            empty[0].free_vcpus,
            empty[0].free_cores,
            empty[0].free_memory_bytes
        ),
        (4, 2, 2 * GIB)
    );
    let placed = place_all(&planner, &[vm("a", 1, 1)]);
    let node = placed[0].nodes[0];
    let after = planner.capacity(&planner.ledger(&placed).unwrap());
    let c = after.iter().find(|c| c.node == node).unwrap();
    assert_eq!(
        (c.free_vcpus, c.free_cores, c.free_memory_bytes),
        (3, 1, GIB)
    );
}
