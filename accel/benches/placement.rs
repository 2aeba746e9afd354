//! Placement strategies side by side on a host built from the real
//! recordings: VMs arrive and leave; each asks for GPU memory, some
//! exclusively; a strategy that fragments turns later VMs away.
//!
//! `cargo bench -p accel --bench placement`
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use accel::{
    Demand, DeviceSlot, FixtureSource, Holder, Inventory, NodeDistances, available_mib, place,
};

/// A host: the recorded A100 (MIG, 4 instances) on node 1, a second A100
/// with MIG off on node 0, and two recorded T4s, one per node.
fn host() -> Vec<DeviceSlot> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let a100 = Inventory::read(&FixtureSource::load(&dir.join("a100-sxm4-80gb-mig.xml")).unwrap())
        .unwrap();
    let t4 = Inventory::read(&FixtureSource::load(&dir.join("tesla-t4.xml")).unwrap()).unwrap();
    let mut gpus = Vec::new();
    let mut g = a100.gpus[0].clone();
    g.numa_node = Some(1);
    gpus.push(g.clone());
    g.uuid = "GPU-a100-whole".to_string();
    g.mig_mode.current = Some(false);
    g.mig_instances.clear();
    g.numa_node = Some(0);
    gpus.push(g);
    for (i, node) in [(0, 0u32), (1, 1)] {
        let mut t = t4.gpus[0].clone();
        t.uuid = format!("GPU-t4-{i}");
        t.numa_node = Some(node);
        gpus.push(t);
    }
    Inventory {
        source: "bench".to_string(),
        system: a100.system,
        gpus,
    }
    .slots()
}

#[derive(Clone, Copy, PartialEq)]
enum Strategy {
    /// `accel::place`: nearest node, MIG first, best fit.
    Accel,
    /// `accel::place` told nothing of the VM's node: MIG first, best fit.
    AccelNoNode,
    /// The first slot (in inventory order) that fits.
    FirstFit,
    /// The slot with the most room.
    WorstFit,
}

fn choose(
    s: Strategy,
    slots: &[DeviceSlot],
    holders: &[Holder],
    d: &Demand,
    dist: &NodeDistances,
) -> Option<DeviceSlot> {
    match s {
        Strategy::Accel => place(slots, holders, d, dist).ok().map(|c| c.slot),
        Strategy::AccelNoNode => {
            let d = Demand {
                numa_node: None,
                ..d.clone()
            };
            place(slots, holders, &d, dist).ok().map(|c| c.slot)
        }
        Strategy::FirstFit => slots
            .iter()
            .find(|sl| available_mib(sl, holders, d.exclusive).is_some_and(|a| a >= d.mem_mib))
            .cloned(),
        Strategy::WorstFit => slots
            .iter()
            .filter_map(|sl| {
                available_mib(sl, holders, d.exclusive)
                    .filter(|a| *a >= d.mem_mib)
                    .map(|a| (a, sl))
            })
            .max_by_key(|(a, _)| *a)
            .map(|(_, sl)| sl.clone()),
    }
}

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Outcome {
    placed: u64,
    rejected: u64,
    rejected_big: u64,
    remote: u64,
    ns_per_place: f64,
}

fn run(s: Strategy, slots: &[DeviceSlot], seed: u64, steps: u64, life: (u64, u64)) -> Outcome {
    let dist = NodeDistances::from_rows(vec![vec![10, 21], vec![21, 10]]);
    let mut rng = Rng(seed);
    let mut live: Vec<(u64, Holder)> = Vec::new();
    let mut out = Outcome {
        placed: 0,
        rejected: 0,
        rejected_big: 0,
        remote: 0,
        ns_per_place: 0.0,
    };
    let mut spent = 0u128;
    for t in 0..steps {
        live.retain(|(end, _)| *end > t);
        // Mostly small inference VMs, some mid-size, a few that need a big GPU.
        let mem = match rng.below(100) {
            0..=59 => 1_000 + rng.below(3_000),
            60..=89 => 8_000 + rng.below(8_000),
            _ => 30_000 + rng.below(30_000),
        };
        let d = Demand {
            vm: format!("vm-{t}"),
            mem_mib: mem,
            numa_node: Some(u32::try_from(rng.below(2)).unwrap()),
            exclusive: rng.below(3) == 0,
        };
        let holders: Vec<Holder> = live.iter().map(|(_, h)| h.clone()).collect();
        let t0 = Instant::now();
        let c = choose(s, slots, &holders, &d, &dist);
        spent += t0.elapsed().as_nanos();
        match c {
            Some(slot) => {
                out.placed += 1;
                if slot.numa_node != d.numa_node {
                    out.remote += 1;
                }
                let life = life.0 + rng.below(life.1 - life.0 + 1);
                live.push((
                    t + life,
                    Holder {
                        vm: d.vm,
                        device_id: slot.id,
                        parent_uuid: slot.parent_uuid,
                        kind: slot.kind,
                        exclusive: d.exclusive,
                        mem_mib: d.mem_mib,
                    },
                ));
            }
            None => {
                out.rejected += 1;
                if mem >= 30_000 {
                    out.rejected_big += 1;
                }
            }
        }
    }
    out.ns_per_place = spent as f64 / steps as f64;
    out
}

fn main() {
    let slots = host();
    let steps = 20_000;
    println!(
        "host: {} slots ({} MIG instances of the recorded A100 on node 1, a whole A100 on node 0, two recorded T4s); {steps} arrivals (one per step), 1/3 exclusive, 60% 1-4 GB, 30% 8-16 GB, 10% 30-60 GB; 3 seeds summed",
        slots.len(),
        slots
            .iter()
            .filter(|s| s.kind == accel::SlotKind::Mig)
            .count()
    );
    for (load, life) in [
        ("light: lifetimes 2-9 steps", (2, 9)),
        ("heavy: lifetimes 5-44 steps", (5, 44)),
    ] {
        println!("\n{load}\n");
        println!(
            "| strategy | placed | rejected | rejected >= 30 GB | placed off the VM's node | ns per decision |"
        );
        println!("|---|---|---|---|---|---|");
        for (name, s) in [
            (
                "accel::place (nearest node, MIG first, best fit)",
                Strategy::Accel,
            ),
            ("accel::place without the VM's node", Strategy::AccelNoNode),
            ("first fit", Strategy::FirstFit),
            ("worst fit (most room)", Strategy::WorstFit),
        ] {
            let mut tot = Outcome {
                placed: 0,
                rejected: 0,
                rejected_big: 0,
                remote: 0,
                ns_per_place: 0.0,
            };
            for seed in [1u64, 2, 3] {
                let o = run(s, &slots, 0x9E37_79B9_7F4A_7C15 ^ seed, steps, life);
                tot.placed += o.placed;
                tot.rejected += o.rejected;
                tot.rejected_big += o.rejected_big;
                tot.remote += o.remote;
                tot.ns_per_place += o.ns_per_place / 3.0;
            }
            println!(
                "| {name} | {} | {} | {} | {} | {:.0} |",
                tot.placed, tot.rejected, tot.rejected_big, tot.remote, tot.ns_per_place
            );
        }
    }
}
