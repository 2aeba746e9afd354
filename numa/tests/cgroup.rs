//! cgroup settings on the live machine's real cgroup hierarchies.

use std::process::Command;

use numa::{
    CgroupBinder, CgroupLayout, CgroupSettings, CpuMax, HostTopology, IoMax, thread_affinity,
};

fn block_device() -> Option<(u32, u32)> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("loop") || name.starts_with("ram") {
            continue;
        }
        let dev = std::fs::read_to_string(e.path().join("dev")).ok()?;
        let (a, b) = dev.trim().split_once(':')?;
        return Some((a.parse().ok()?, b.parse().ok()?));
    }
    None
}

#[test]
fn hw_numa_cgroup_live_settings_read_back_and_confine_a_real_process() {
    let layout = CgroupLayout::detect().unwrap();
    let summary = layout.summary();
    if layout.v2_controllers.is_empty() && layout.v1.is_empty() {
        println!(
            "SKIP hw_numa_cgroup_live_settings_read_back_and_confine_a_real_process: no cgroup controller mounted ({summary})"
        );
        return;
    }
    if !layout.all_v2() {
        assert!(summary.contains("missing"), "{summary}");
    }
    let parent = format!("prescient-test-{}", std::process::id());
    let binder = CgroupBinder::new(layout.clone(), &parent);
    let topo = HostTopology::live().unwrap();
    let pu = *topo.pus().last().unwrap();
    let settings = CgroupSettings {
        cpuset_cpus: Some(vec![pu]),
        cpuset_mems: Some(vec![topo.nodes[0].id]),
        cpu_weight: Some(50),
        cpu_max: Some(CpuMax {
            quota_us: Some(20_000),
            period_us: 100_000,
        }),
        io_weight: Some(100),
        io_max: block_device()
            .map(|(major, minor)| IoMax {
                major,
                minor,
                rbps: Some(10 << 20),
                wbps: Some(5 << 20),
                riops: None,
                wiops: None,
            })
            .into_iter()
            .collect(),
    };
    let out = match binder.apply("vm-a", &settings) {
        Ok(out) => out,
        Err(e)
            if e.to_string().contains("Permission denied")
                || e.to_string().contains("Read-only") =>
        {
            println!("SKIP hw_numa_cgroup_live_settings_read_back_and_confine_a_real_process: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    println!(
        "{summary}\napplied: {:#?}\nskipped: {:#?}",
        out.applied, out.skipped
    );
    assert!(!out.applied.is_empty());
    for a in &out.applied {
        let content = std::fs::read_to_string(&a.path).unwrap();
        if a.value.ends_with(" 0") {
            // v1 throttle: 0 removes the rule.
            assert!(
                !content.contains(&a.value),
                "{}: {content}",
                a.path.display()
            );
        } else if a.path.ends_with("cpu.weight")
            || a.path.ends_with("cpu.max")
            || a.path.ends_with("io.max")
            || a.path.ends_with("io.weight")
        {
            // v2 files echo in their own format.
            let first = a.value.split_whitespace().next().unwrap();
            assert!(
                content.contains(first),
                "{}: {content:?} lacks {first}",
                a.path.display()
            );
        } else {
            assert!(
                content.contains(a.value.as_str()),
                "{}: {content:?} lacks {:?}",
                a.path.display(),
                a.value
            );
        }
    }
    // Everything asked for is either applied or skipped with a reason.
    for setting in ["cpuset.cpus", "cpu.weight", "cpu.max", "io.weight"] {
        let applied = out.applied.iter().any(|a| a.setting == setting);
        let skipped = out
            .skipped
            .iter()
            .any(|s| s.setting == setting && !s.reason.is_empty());
        assert!(
            applied ^ skipped,
            "{setting}: applied {applied} skipped {skipped}"
        );
    }

    // A real process moved into the groups is confined by the cpuset.
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    let attached = binder.attach("vm-a", pid);
    let cgroup_file = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let affinity = thread_affinity(pid);
    child.kill().unwrap();
    child.wait().unwrap();
    attached.unwrap();
    assert!(
        cgroup_file.contains(&format!("/{parent}/vm-a")),
        "{cgroup_file}"
    );
    if out.applied.iter().any(|a| a.setting == "cpuset.cpus") {
        assert_eq!(affinity.unwrap(), vec![pu]);
    }

    binder.remove("vm-a").unwrap();
    assert!(binder.groups("vm-a").is_empty());
    let mut roots: Vec<_> = layout.v1.values().cloned().collect();
    roots.extend(layout.v2_root.clone());
    for r in roots {
        let _ = std::fs::remove_dir(r.join(&parent));
    }
}
