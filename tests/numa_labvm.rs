//! numa applied to a real labvm guest on KVM: the plan's vCPU pins and
//! memory binding are applied in before-boot, when the vCPU threads exist
//! but the guest has not run and nothing has been pre-faulted yet.

use std::time::Instant;

use labvm::testing::kvm_or_skip;
use labvm::{LabVm, LabVmConfig, RunObserver, StopReason, Workload};
use numa::{
    HostRange, HostTopology, MemPolicyMode, Placement, PlacementPolicy, Planner, VmDemand,
    bind_guest_memory, memory_policy, pin_vcpus, thread_affinity,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_hooks::BootPlan;

struct Pinner {
    placement: Placement,
    affinities: Vec<Vec<u32>>,
    policy: Option<(MemPolicyMode, Vec<u32>)>,
}

impl RunObserver for Pinner {
    fn before_boot(&mut self, vm: &LabVm, vcpu_tids: &[i32]) -> BootPlan {
        let tids: Vec<u32> = vcpu_tids
            .iter()
            .map(|&t| u32::try_from(t).expect("tid"))
            .collect();
        pin_vcpus(&self.placement, &tids).expect("pin vCPUs");
        self.affinities = tids
            .iter()
            .map(|&t| thread_affinity(t).expect("affinity"))
            .collect();
        let host = vm
            .memory()
            .get_host_address(GuestAddress(0))
            .expect("guest RAM mapped");
        let range = HostRange {
            addr: host as usize,
            len: usize::try_from(vm.config().ram_mib << 20).expect("size"),
        };
        bind_guest_memory(&self.placement, &[range]).expect("bind guest memory");
        self.policy = Some(memory_policy(range.addr).expect("policy"));
        BootPlan::empty()
    }
}

#[test]
fn hw_kvm_labvm_vcpus_and_memory_follow_the_numa_plan() {
    if !kvm_or_skip("hw_kvm_labvm_vcpus_and_memory_follow_the_numa_plan") {
        return;
    }
    let topo = HostTopology::live().unwrap();
    let vcpus = u32::try_from(topo.pus().len().min(2)).unwrap();
    let mut config = LabVmConfig::new(64, Workload::Sequential { touch_mib: 16 });
    config.vcpus = vcpus;
    let planner = Planner::new(&topo, PlacementPolicy::default());
    let placement = planner
        .place(
            &[],
            &VmDemand {
                vm: "lab-numa".into(),
                vcpus,
                memory_bytes: config.ram_mib << 20,
                gpu: None,
                latency_sensitive: false,
            },
        )
        .unwrap();
    let mut vm = LabVm::create(config, Instant::now()).unwrap();
    let mut pinner = Pinner {
        placement: placement.clone(),
        affinities: Vec::new(),
        policy: None,
    };
    let report = vm.run(&mut pinner).unwrap();
    assert!(
        matches!(report.stop, StopReason::Exited(0)),
        "{:?}",
        report.stop
    );
    assert!(report.time_to_ready.is_some());
    let expected: Vec<Vec<u32>> = placement.vcpu_pus.iter().map(|&pu| vec![pu]).collect();
    assert_eq!(pinner.affinities, expected);
    assert_eq!(
        pinner.policy,
        Some((MemPolicyMode::Bind, vec![placement.memory[0].node]))
    );
}
