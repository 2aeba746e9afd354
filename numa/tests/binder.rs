//! The binder on the live machine: real threads, real mappings.

use std::sync::mpsc;
use std::thread;

use numa::{
    AnonMapping, BindError, HostTopology, MemPolicyMode, bind_memory, current_tid, memory_policy,
    page_node, pin_thread, thread_affinity, thread_cpu, threads_named,
};

/// A parked thread: reports its tid, then on each request reports the CPU
/// it is running on (from /proc/thread-self/stat) until told to stop.
struct Parked {
    tid: u32,
    ask: mpsc::Sender<bool>,
    answer: mpsc::Receiver<u32>,
    handle: thread::JoinHandle<()>,
}

fn running_cpu() -> u32 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
    let rest = stat.rsplit_once(')').expect("comm").1;
    rest.split_whitespace()
        .nth(36)
        .expect("field 39")
        .parse()
        .expect("cpu")
}

fn parked(name: &str) -> Parked {
    let (tid_tx, tid_rx) = mpsc::channel();
    let (ask, ask_rx) = mpsc::channel::<bool>();
    let (ans_tx, answer) = mpsc::channel();
    let handle = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            tid_tx.send(current_tid()).expect("send tid");
            while let Ok(true) = ask_rx.recv() {
                // Burn a little CPU so the thread really runs where it is allowed.
                let mut x = 0u64;
                for i in 0..200_000u64 {
                    x = x.wrapping_mul(31).wrapping_add(i);
                }
                std::hint::black_box(x);
                ans_tx.send(running_cpu()).expect("send cpu");
            }
        })
        .expect("spawn");
    let tid = tid_rx.recv().expect("tid");
    Parked {
        tid,
        ask,
        answer,
        handle,
    }
}

impl Parked {
    fn cpu_now(&self) -> u32 {
        self.ask.send(true).expect("ask");
        self.answer.recv().expect("answer")
    }
    fn stop(self) {
        self.ask.send(false).expect("stop");
        self.handle.join().expect("join");
    }
}

fn status_cpus_allowed(tid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_owned()
}

#[test]
fn hw_numa_pin_real_thread_reads_back_from_kernel_and_proc() {
    let topo = HostTopology::live().unwrap();
    let pus = topo.pus();
    let t = parked("pin-test");
    for &cpu in &pus {
        pin_thread(t.tid, &[cpu]).unwrap();
        assert_eq!(thread_affinity(t.tid).unwrap(), vec![cpu]);
        assert_eq!(status_cpus_allowed(t.tid), cpu.to_string());
        assert_eq!(t.cpu_now(), cpu, "thread ran outside its pinned CPU");
        assert_eq!(thread_cpu(std::process::id(), t.tid).unwrap().last_cpu, cpu);
    }
    pin_thread(t.tid, &pus).unwrap();
    assert_eq!(thread_affinity(t.tid).unwrap(), pus);
    t.stop();
}

#[test]
fn hw_numa_pin_bad_input_is_a_clear_error() {
    let me = current_tid();
    assert!(matches!(pin_thread(me, &[]), Err(BindError::NoCpus { .. })));
    assert!(matches!(
        pin_thread(me, &[5000]),
        Err(BindError::CpuOutOfRange { cpu: 5000, .. })
    ));
    // A CPU the set can name but the machine does not have.
    let err = pin_thread(me, &[1000]).unwrap_err();
    assert!(
        matches!(
            err,
            BindError::Affinity {
                errno: nix::errno::Errno::EINVAL,
                ..
            }
        ),
        "{err:?}"
    );
    // A thread that does not exist (pid_max is at most 2^22).
    let err = pin_thread(0x7fff_fff0, &[0]).unwrap_err();
    assert!(
        matches!(
            err,
            BindError::Affinity {
                errno: nix::errno::Errno::ESRCH,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("sched_setaffinity"));
}

#[test]
fn hw_numa_thread_cpu_counts_real_run_time_and_names_are_found() {
    let t = parked("labvm-vcpu7");
    let before = thread_cpu(std::process::id(), t.tid).unwrap();
    for _ in 0..20 {
        t.cpu_now();
    }
    let after = thread_cpu(std::process::id(), t.tid).unwrap();
    assert!(after.run_ns > before.run_ns, "{before:?} -> {after:?}");
    let found = threads_named(std::process::id(), "labvm-vcpu").unwrap();
    assert!(
        found.contains(&(t.tid, "labvm-vcpu7".to_owned())),
        "{found:?}"
    );
    t.stop();
}

#[test]
fn hw_numa_mbind_anonymous_mapping_to_first_node_pages_land_there() {
    let topo = HostTopology::live().unwrap();
    let node = topo.nodes[0].id;
    let mut map = AnonMapping::new(8 << 20).unwrap();
    let (mode, _) = memory_policy(map.addr()).unwrap();
    assert_eq!(mode, MemPolicyMode::Default);
    bind_memory(map.addr(), map.len(), &[node], MemPolicyMode::Bind, false).unwrap();
    let (mode, nodes) = memory_policy(map.addr()).unwrap();
    assert_eq!(mode, MemPolicyMode::Bind);
    assert_eq!(nodes, vec![node]);
    // Pre-fault after binding: every page must come from the bound node.
    map.touch();
    for offset in (0..map.len()).step_by(1 << 20) {
        assert_eq!(page_node(map.addr() + offset).unwrap(), node);
    }
}

#[test]
fn hw_numa_mbind_second_node_when_present() {
    let topo = HostTopology::live().unwrap();
    let Some(second) = topo.nodes.get(1).map(|n| n.id) else {
        println!("SKIP hw_numa_mbind_second_node_when_present: this host has one NUMA node");
        return;
    };
    let mut map = AnonMapping::new(4 << 20).unwrap();
    bind_memory(map.addr(), map.len(), &[second], MemPolicyMode::Bind, false).unwrap();
    map.touch();
    assert_eq!(page_node(map.addr()).unwrap(), second);
    // Move the now-faulted pages to the first node.
    let first = topo.nodes[0].id;
    bind_memory(map.addr(), map.len(), &[first], MemPolicyMode::Bind, true).unwrap();
    assert_eq!(page_node(map.addr()).unwrap(), first);
}

#[test]
fn hw_numa_mbind_bad_input_is_a_clear_error() {
    let topo = HostTopology::live().unwrap();
    let map = AnonMapping::new(1 << 20).unwrap();
    let err = bind_memory(map.addr() + 1, 4096, &[0], MemPolicyMode::Bind, false).unwrap_err();
    assert!(matches!(err, BindError::Unaligned { .. }), "{err:?}");
    let err = bind_memory(map.addr(), map.len(), &[], MemPolicyMode::Bind, false).unwrap_err();
    assert!(matches!(err, BindError::BadNodes { .. }), "{err:?}");
    let err = bind_memory(map.addr(), map.len(), &[4096], MemPolicyMode::Bind, false).unwrap_err();
    assert!(matches!(err, BindError::BadNodes { .. }), "{err:?}");
    // A node id this host does not have.
    let absent = topo.nodes.iter().map(|n| n.id).max().unwrap() + 1;
    let err =
        bind_memory(map.addr(), map.len(), &[absent], MemPolicyMode::Bind, false).unwrap_err();
    assert!(
        matches!(err, BindError::MemPolicy { op: "mbind", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("[{absent}]")), "{err}");
    // A range past the mapping's end is not mapped.
    let addr = map.addr();
    let len = map.len();
    drop(map);
    let err = bind_memory(addr, len, &[0], MemPolicyMode::Bind, false).unwrap_err();
    assert!(
        matches!(
            err,
            BindError::MemPolicy {
                errno: nix::errno::Errno::EFAULT,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn hw_numa_placement_applied_to_real_vcpu_threads_and_guest_mappings() {
    use numa::{HostRange, PlacementPolicy, Planner, VmDemand, bind_guest_memory, pin_vcpus};
    let topo = HostTopology::live().unwrap();
    let planner = Planner::new(&topo, PlacementPolicy::default());
    let vcpus = u32::try_from(topo.pus().len().min(2)).unwrap();
    let placement = planner
        .place(
            &[],
            &VmDemand {
                vm: "lab".into(),
                vcpus,
                memory_bytes: 12 << 20,
                gpu: None,
                latency_sensitive: false,
            },
        )
        .unwrap();
    // Guest memory in two host mappings, as a VMM with a hole would have.
    let mut low = AnonMapping::new(4 << 20).unwrap();
    let mut high = AnonMapping::new(8 << 20).unwrap();
    let ranges = [
        HostRange {
            addr: low.addr(),
            len: low.len(),
        },
        HostRange {
            addr: high.addr(),
            len: high.len(),
        },
    ];
    bind_guest_memory(&placement, &ranges).unwrap();
    let node = placement.memory[0].node;
    for m in [&low, &high] {
        assert_eq!(
            memory_policy(m.addr()).unwrap(),
            (MemPolicyMode::Bind, vec![node])
        );
    }
    low.touch();
    high.touch();
    assert_eq!(page_node(high.addr() + high.len() - 4096).unwrap(), node);

    let threads: Vec<Parked> = (0..vcpus)
        .map(|i| parked(&format!("labvm-vcpu{i}")))
        .collect();
    let tids: Vec<u32> = threads.iter().map(|t| t.tid).collect();
    pin_vcpus(&placement, &tids).unwrap();
    for (i, t) in threads.iter().enumerate() {
        assert_eq!(thread_affinity(t.tid).unwrap(), vec![placement.vcpu_pus[i]]);
        assert_eq!(t.cpu_now(), placement.vcpu_pus[i]);
    }
    // One thread more than the placement has vCPUs is refused by name.
    let extra = parked("labvm-vcpu9");
    let mut too_many = tids.clone();
    too_many.push(extra.tid);
    assert!(matches!(
        pin_vcpus(&placement, &too_many),
        Err(BindError::NoCpus { .. })
    ));
    extra.stop();
    for t in threads {
        t.stop();
    }
}
