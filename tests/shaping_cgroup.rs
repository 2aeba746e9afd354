//! The shaping loop's CPU actions on the live cgroup hierarchy: a real
//! process stands for a VM's VMM; after the loop's ticks (time injected) it
//! sits in the VM's cgroup with the `cpu.max` and weight the shaper chose.
//! Prints `SKIP` where no cpu controller is mounted or writable.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prescient::{Metrics, ShapingConfig, ShapingLoop};
use vmm_hooks::{BalloonStatus, Event, EventKind, HookReply, StopStatus, VmIdentity, VmSpec};

const NAME: &str = "hw_numa_cgroup_shaping_loop_confines_the_vmm_process_to_its_cpu_limit";

fn event(seq: u64, kind: EventKind) -> Event {
    Event {
        vm: VmIdentity {
            vm_id: "cg-1".into(),
            image_digest: "i".into(),
            package_digest: "p".into(),
        },
        seq,
        at_unix_ms: 0,
        kind,
    }
}

#[test]
fn hw_numa_cgroup_shaping_loop_confines_the_vmm_process_to_its_cpu_limit() {
    let layout = match numa::CgroupLayout::detect() {
        Ok(l) => l,
        Err(e) => {
            println!("SKIP {NAME}: {e}");
            return;
        }
    };
    let cpu_root: Option<PathBuf> = if layout.v2_controllers.contains("cpu") {
        layout.v2_root.clone()
    } else {
        layout.v1.get("cpu").cloned()
    };
    let Some(cpu_root) = cpu_root else {
        println!("SKIP {NAME}: no cpu controller ({})", layout.summary());
        return;
    };
    let parent = format!("prescient-test-{}", std::process::id());
    if std::fs::create_dir_all(cpu_root.join(&parent)).is_err() {
        println!("SKIP {NAME}: {} not writable", cpu_root.display());
        return;
    }
    let config = ShapingConfig {
        interval_s: 10,
        host_memory_mib: Some(1 << 20),
        host_cpus: Some(8.0),
        cgroups: true,
        cgroup_parent: parent.clone(),
        ..ShapingConfig::default()
    };
    let metrics = Arc::new(Metrics::new());
    let l = ShapingLoop::new(config, Arc::clone(&metrics)).unwrap();
    // The "VMM": an idle process.
    let mut child = Command::new("sleep")
        .arg("120")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    l.observe(
        &event(
            0,
            EventKind::Created {
                spec: VmSpec {
                    vcpus: 2,
                    memory_mib: 1024,
                    vmm: "test".into(),
                    priority: 0,
                    interruptible: false,
                },
            },
        ),
        Some(pid),
        HookReply::Ack,
    );
    let t0 = Instant::now();
    let mut plan = None;
    for k in 1..=4u64 {
        let mut s = BalloonStatus::new(1024);
        s.stats_updates = 1;
        s.guest_stats = vec![
            ("total-memory".into(), 1024 << 20),
            ("available-memory".into(), 700 << 20),
        ];
        l.observe(&event(k, EventKind::Balloon(s)), Some(pid), HookReply::Ack);
        let out = l.tick(t0 + Duration::from_secs(10 * k));
        if out.plan.is_some() {
            plan = out.plan;
        }
    }
    let plan = plan.expect("no plan after four ticks");
    let a = &plan.actions[0];
    // An idle process: its CPU forecast is ~0, so it gets the least CPU.
    let quota = a.cpu_max.unwrap().quota_us;
    assert_eq!(quota, 5000, "{a:?}");
    let group = cpu_root.join(&parent).join("cg-1");
    let procs = std::fs::read_to_string(group.join("cgroup.procs")).unwrap();
    let inside = procs.lines().any(|l| l.trim() == pid.to_string());
    let limit = std::fs::read_to_string(group.join("cpu.cfs_quota_us"))
        .or_else(|_| std::fs::read_to_string(group.join("cpu.max")))
        .unwrap();
    // Leave nothing behind: the process, then its groups.
    let _ = child.kill();
    let _ = child.wait();
    l.observe(
        &event(
            9,
            EventKind::Stopped {
                status: StopStatus::Stopped,
            },
        ),
        Some(pid),
        HookReply::Ack,
    );
    for g in numa::CgroupBinder::new(layout.clone(), &parent).groups("cg-1") {
        let _ = std::fs::remove_dir(g);
    }
    for root in layout.v1.values().chain(layout.v2_root.iter()) {
        let _ = std::fs::remove_dir(root.join(&parent));
    }
    assert!(inside, "{pid} not in {}: {procs}", group.display());
    assert!(limit.trim().starts_with("5000"), "limit {limit}");
    let text = metrics.render();
    assert!(
        text.contains(r#"prescient_shape_actions_total{kind="cgroup-set"}"#),
        "{text}"
    );
}
