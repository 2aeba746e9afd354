//! Per-VM cgroup CPU and I/O settings.
//!
//! Detects which cgroup hierarchies the host mounts (cgroup v2 and its
//! enabled controllers; cgroup v1 hierarchies) and writes a VM's settings
//! where a controller exists: cgroup v2 first, the v1 equivalent when only
//! v1 has the controller (`cpu.shares`, `cpu.cfs_quota_us`, v1 `cpuset`,
//! `blkio.throttle.*`, `blkio.weight`). What neither offers is skipped and
//! reported, and the binder says so once, at start, in one log line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sys::BindError;

/// A `cpu.max` limit: `quota_us` of CPU time per `period_us` (None = no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuMax {
    /// Microseconds of CPU per period; `None` means unlimited.
    pub quota_us: Option<u64>,
    /// Period in microseconds.
    pub period_us: u64,
}

/// An `io.max` limit for one block device; `None` fields are unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoMax {
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// Read bytes per second.
    pub rbps: Option<u64>,
    /// Write bytes per second.
    pub wbps: Option<u64>,
    /// Read I/O operations per second.
    pub riops: Option<u64>,
    /// Write I/O operations per second.
    pub wiops: Option<u64>,
}

/// What to set for a VM; `None`/empty fields are left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupSettings {
    /// CPUs the VM may use (`cpuset.cpus`).
    pub cpuset_cpus: Option<Vec<u32>>,
    /// Memory nodes the VM may use (`cpuset.mems`).
    pub cpuset_mems: Option<Vec<u32>>,
    /// `cpu.weight`, 1..=10000 (100 is the default share).
    pub cpu_weight: Option<u32>,
    /// `cpu.max`.
    pub cpu_max: Option<CpuMax>,
    /// `io.weight`, 1..=10000.
    pub io_weight: Option<u32>,
    /// `io.max` per device.
    pub io_max: Vec<IoMax>,
}

/// One setting that was written: which, where, what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedSetting {
    /// The cgroup v2 name of the setting (`cpu.weight`, `io.max`, ...).
    pub setting: String,
    /// The file written (a v1 file when v2 lacks the controller).
    pub path: PathBuf,
    /// The value written.
    pub value: String,
}

/// One setting that could not be applied on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedSetting {
    /// The cgroup v2 name of the setting.
    pub setting: String,
    /// Why.
    pub reason: String,
}

/// What [`CgroupBinder::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupOutcome {
    /// Settings written.
    pub applied: Vec<AppliedSetting>,
    /// Settings this host cannot take.
    pub skipped: Vec<SkippedSetting>,
}

/// The cgroup hierarchies mounted on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupLayout {
    /// The cgroup2 mount point, if any.
    pub v2_root: Option<PathBuf>,
    /// Controllers the v2 root offers (`cgroup.controllers`).
    pub v2_controllers: BTreeSet<String>,
    /// v1 controller name -> mount point.
    pub v1: BTreeMap<String, PathBuf>,
}

/// Where a controller lives on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Home {
    V2(PathBuf),
    V1(PathBuf),
    Missing,
}

impl CgroupLayout {
    /// Read `/proc/self/mountinfo` and the v2 root's `cgroup.controllers`.
    ///
    /// # Errors
    /// `/proc/self/mountinfo` cannot be read.
    pub fn detect() -> Result<Self, BindError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|source| BindError::File {
            path: path.to_path_buf(),
            op: "read",
            source,
        })?;
        Ok(Self::from_mountinfo(&text))
    }

    /// Parse mountinfo text; reads `cgroup.controllers` under a v2 mount.
    #[must_use]
    pub fn from_mountinfo(text: &str) -> Self {
        let mut layout = Self {
            v2_root: None,
            v2_controllers: BTreeSet::new(),
            v1: BTreeMap::new(),
        };
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split_whitespace().nth(4) else {
                continue;
            };
            let mut r = right.split_whitespace();
            let (Some(fstype), Some(_src), Some(opts)) = (r.next(), r.next(), r.next()) else {
                continue;
            };
            let mount_point = PathBuf::from(mount_point.replace("\\040", " "));
            match fstype {
                "cgroup2" if layout.v2_root.is_none() => {
                    layout.v2_controllers =
                        std::fs::read_to_string(mount_point.join("cgroup.controllers"))
                            .map(|s| s.split_whitespace().map(str::to_owned).collect())
                            .unwrap_or_default();
                    layout.v2_root = Some(mount_point);
                }
                "cgroup" => {
                    for opt in opts.split(',') {
                        if matches!(opt, "cpu" | "cpuset" | "blkio" | "cpuacct" | "memory") {
                            layout
                                .v1
                                .entry(opt.to_owned())
                                .or_insert_with(|| mount_point.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        layout
    }

    fn home(&self, v2: &str, v1: &str) -> Home {
        match &self.v2_root {
            Some(root) if self.v2_controllers.contains(v2) => Home::V2(root.clone()),
            _ => self
                .v1
                .get(v1)
                .map_or(Home::Missing, |p| Home::V1(p.clone())),
        }
    }

    /// One line saying where each controller the binder uses lives, and
    /// which are missing.
    #[must_use]
    pub fn summary(&self) -> String {
        let mut s = String::new();
        match &self.v2_root {
            Some(root) => {
                let offered: Vec<&str> = self.v2_controllers.iter().map(String::as_str).collect();
                let _ = write!(
                    s,
                    "cgroup v2 at {} offers [{}]",
                    root.display(),
                    offered.join(" ")
                );
            }
            None => s.push_str("no cgroup v2 mount"),
        }
        for (v2, v1) in [("cpuset", "cpuset"), ("cpu", "cpu"), ("io", "blkio")] {
            match self.home(v2, v1) {
                Home::V2(_) => {}
                Home::V1(p) => {
                    let _ = write!(
                        s,
                        "; v2 {v2} missing, using cgroup v1 {v1} at {}",
                        p.display()
                    );
                }
                Home::Missing => {
                    let _ = write!(
                        s,
                        "; {v2} controller missing in v2 and v1: {v2} settings will be skipped"
                    );
                }
            }
        }
        s
    }

    /// True when every controller the binder uses is on cgroup v2.
    #[must_use]
    pub fn all_v2(&self) -> bool {
        ["cpuset", "cpu", "io"]
            .iter()
            .all(|c| self.v2_controllers.contains(*c))
    }
}

/// Writes per-VM cgroups under `<hierarchy>/<parent>/<vm>`.
#[derive(Debug, Clone)]
pub struct CgroupBinder {
    layout: CgroupLayout,
    parent: String,
}

fn list(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn write_file(path: &Path, value: &str) -> Result<(), BindError> {
    std::fs::write(path, value).map_err(|source| BindError::File {
        path: path.to_path_buf(),
        op: "write",
        source,
    })
}

fn read_file(path: &Path) -> Result<String, BindError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| BindError::File {
            path: path.to_path_buf(),
            op: "read",
            source,
        })
}

fn mkdir(path: &Path) -> Result<(), BindError> {
    std::fs::create_dir_all(path).map_err(|source| BindError::File {
        path: path.to_path_buf(),
        op: "mkdir",
        source,
    })
}

fn skip(out: &mut CgroupOutcome, setting: &str, reason: String) {
    out.skipped.push(SkippedSetting {
        setting: setting.to_owned(),
        reason,
    });
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "max".to_owned(), |x| x.to_string())
}

fn check_weight(vm: &str, setting: &str, w: u32) -> Result<(), BindError> {
    if (1..=10_000).contains(&w) {
        Ok(())
    } else {
        Err(BindError::CgroupSetting {
            vm: vm.to_owned(),
            setting: setting.to_owned(),
            reason: format!("weight {w} outside 1..=10000"),
        })
    }
}

impl CgroupBinder {
    /// A binder over this layout, grouping VMs under `parent` (e.g.
    /// `"prescient"`). Logs once where each controller lives and what is
    /// missing.
    #[must_use]
    pub fn new(layout: CgroupLayout, parent: &str) -> Self {
        if layout.all_v2() {
            tracing::info!("{}", layout.summary());
        } else {
            tracing::warn!("{}", layout.summary());
        }
        Self {
            layout,
            parent: parent.to_owned(),
        }
    }

    /// The layout in use.
    #[must_use]
    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    fn group(&self, root: &Path, vm: &str) -> PathBuf {
        root.join(&self.parent).join(vm)
    }

    /// Create the VM's cgroup(s) and write its settings.
    ///
    /// # Errors
    /// An out-of-range weight, or a cgroup file that cannot be written.
    pub fn apply(&self, vm: &str, s: &CgroupSettings) -> Result<CgroupOutcome, BindError> {
        if let Some(w) = s.cpu_weight {
            check_weight(vm, "cpu.weight", w)?;
        }
        if let Some(w) = s.io_weight {
            check_weight(vm, "io.weight", w)?;
        }
        let mut out = CgroupOutcome::default();
        let mut v2_needs: BTreeSet<&str> = BTreeSet::new();
        let mut writes: Vec<(String, PathBuf, String)> = Vec::new();

        // cpuset
        if s.cpuset_cpus.is_some() || s.cpuset_mems.is_some() {
            match self.layout.home("cpuset", "cpuset") {
                Home::V2(root) => {
                    v2_needs.insert("cpuset");
                    let g = self.group(&root, vm);
                    if let Some(c) = &s.cpuset_cpus {
                        writes.push(("cpuset.cpus".into(), g.join("cpuset.cpus"), list(c)));
                    }
                    if let Some(m) = &s.cpuset_mems {
                        writes.push(("cpuset.mems".into(), g.join("cpuset.mems"), list(m)));
                    }
                }
                Home::V1(root) => {
                    // v1 cpuset groups start empty and refuse tasks until
                    // both files are set: fill the parent from the root.
                    let parent = root.join(&self.parent);
                    mkdir(&parent)?;
                    for f in ["cpuset.cpus", "cpuset.mems"] {
                        if read_file(&parent.join(f))?.is_empty() {
                            write_file(&parent.join(f), &read_file(&root.join(f))?)?;
                        }
                    }
                    let g = self.group(&root, vm);
                    mkdir(&g)?;
                    let cpus = s
                        .cpuset_cpus
                        .as_ref()
                        .map_or_else(|| read_file(&parent.join("cpuset.cpus")), |c| Ok(list(c)))?;
                    let mems = s
                        .cpuset_mems
                        .as_ref()
                        .map_or_else(|| read_file(&parent.join("cpuset.mems")), |m| Ok(list(m)))?;
                    writes.push(("cpuset.cpus".into(), g.join("cpuset.cpus"), cpus));
                    writes.push(("cpuset.mems".into(), g.join("cpuset.mems"), mems));
                }
                Home::Missing => skip(
                    &mut out,
                    "cpuset.cpus",
                    "no cpuset controller in cgroup v2 or v1".into(),
                ),
            }
        }

        // cpu
        let cpu_home = self.layout.home("cpu", "cpu");
        if let Some(w) = s.cpu_weight {
            match &cpu_home {
                Home::V2(root) => {
                    v2_needs.insert("cpu");
                    writes.push((
                        "cpu.weight".into(),
                        self.group(root, vm).join("cpu.weight"),
                        w.to_string(),
                    ));
                }
                Home::V1(root) => {
                    // v2 weight 100 == v1 shares 1024.
                    let shares = (u64::from(w) * 1024 / 100).max(2);
                    writes.push((
                        "cpu.weight".into(),
                        self.group(root, vm).join("cpu.shares"),
                        shares.to_string(),
                    ));
                }
                Home::Missing => skip(
                    &mut out,
                    "cpu.weight",
                    "no cpu controller in cgroup v2 or v1".into(),
                ),
            }
        }
        if let Some(m) = s.cpu_max {
            match &cpu_home {
                Home::V2(root) => {
                    v2_needs.insert("cpu");
                    writes.push((
                        "cpu.max".into(),
                        self.group(root, vm).join("cpu.max"),
                        format!("{} {}", opt(m.quota_us), m.period_us),
                    ));
                }
                Home::V1(root) => {
                    let g = self.group(root, vm);
                    writes.push((
                        "cpu.max".into(),
                        g.join("cpu.cfs_period_us"),
                        m.period_us.to_string(),
                    ));
                    let quota = m
                        .quota_us
                        .map_or_else(|| "-1".to_owned(), |q| q.to_string());
                    writes.push(("cpu.max".into(), g.join("cpu.cfs_quota_us"), quota));
                }
                Home::Missing => skip(
                    &mut out,
                    "cpu.max",
                    "no cpu controller in cgroup v2 or v1".into(),
                ),
            }
        }

        // io
        let io_home = self.layout.home("io", "blkio");
        if let Some(w) = s.io_weight {
            match &io_home {
                Home::V2(root) => {
                    v2_needs.insert("io");
                    writes.push((
                        "io.weight".into(),
                        self.group(root, vm).join("io.weight"),
                        format!("default {w}"),
                    ));
                }
                Home::V1(root) => {
                    let file = ["blkio.weight", "blkio.bfq.weight"]
                        .into_iter()
                        .find(|f| root.join(f).exists());
                    match file {
                        // v1 weights run 10..=1000 (100 = default, as in v2).
                        Some(f) => writes.push((
                            "io.weight".into(),
                            self.group(root, vm).join(f),
                            w.clamp(10, 1000).to_string(),
                        )),
                        None => skip(
                            &mut out,
                            "io.weight",
                            format!(
                                "no io controller in cgroup v2 and v1 blkio at {} has no weight file (CFQ/BFQ not in use)",
                                root.display()
                            ),
                        ),
                    }
                }
                Home::Missing => skip(
                    &mut out,
                    "io.weight",
                    "no io controller in cgroup v2 or v1".into(),
                ),
            }
        }
        for m in &s.io_max {
            let dev = format!("{}:{}", m.major, m.minor);
            match &io_home {
                Home::V2(root) => {
                    v2_needs.insert("io");
                    writes.push((
                        "io.max".into(),
                        self.group(root, vm).join("io.max"),
                        format!(
                            "{dev} rbps={} wbps={} riops={} wiops={}",
                            opt(m.rbps),
                            opt(m.wbps),
                            opt(m.riops),
                            opt(m.wiops)
                        ),
                    ));
                }
                Home::V1(root) => {
                    let g = self.group(root, vm);
                    for (file, v) in [
                        ("blkio.throttle.read_bps_device", m.rbps),
                        ("blkio.throttle.write_bps_device", m.wbps),
                        ("blkio.throttle.read_iops_device", m.riops),
                        ("blkio.throttle.write_iops_device", m.wiops),
                    ] {
                        // v1 uses 0 for "no limit".
                        writes.push((
                            "io.max".into(),
                            g.join(file),
                            format!("{dev} {}", v.unwrap_or(0)),
                        ));
                    }
                }
                Home::Missing => skip(
                    &mut out,
                    "io.max",
                    "no io controller in cgroup v2 or v1".into(),
                ),
            }
        }

        // Enable the v2 controllers down to the VM's group.
        if let Some(root) = &self.layout.v2_root
            && !v2_needs.is_empty()
        {
            let enable: String = v2_needs.iter().map(|c| format!("+{c} ")).collect();
            let enable = enable.trim_end();
            let parent = root.join(&self.parent);
            mkdir(&parent)?;
            write_file(&root.join("cgroup.subtree_control"), enable)?;
            write_file(&parent.join("cgroup.subtree_control"), enable)?;
        }
        for (setting, path, value) in writes {
            if let Some(dir) = path.parent() {
                mkdir(dir)?;
            }
            write_file(&path, &value)?;
            tracing::debug!(vm, setting, path = %path.display(), value, "cgroup setting written");
            out.applied.push(AppliedSetting {
                setting,
                path,
                value,
            });
        }
        for sk in &out.skipped {
            tracing::debug!(
                vm,
                setting = sk.setting,
                reason = sk.reason,
                "cgroup setting skipped"
            );
        }
        Ok(out)
    }

    /// The VM's group directories that exist (v2 and each v1 hierarchy).
    #[must_use]
    pub fn groups(&self, vm: &str) -> Vec<PathBuf> {
        let mut roots: BTreeSet<PathBuf> = self.layout.v1.values().cloned().collect();
        if let Some(r) = &self.layout.v2_root {
            roots.insert(r.clone());
        }
        roots
            .into_iter()
            .map(|r| self.group(&r, vm))
            .filter(|g| g.is_dir())
            .collect()
    }

    /// Move a process (all its threads) into every group of the VM.
    ///
    /// # Errors
    /// A `cgroup.procs` write fails (no such process, empty v1 cpuset).
    pub fn attach(&self, vm: &str, pid: u32) -> Result<(), BindError> {
        for g in self.groups(vm) {
            write_file(&g.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Remove the VM's groups (they must hold no process any more).
    ///
    /// # Errors
    /// A group cannot be removed (still populated).
    pub fn remove(&self, vm: &str) -> Result<(), BindError> {
        for g in self.groups(vm) {
            std::fs::remove_dir(&g).map_err(|source| BindError::File {
                path: g.clone(),
                op: "rmdir",
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 1 0:23 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:24 / /nonexistent/cgroup/cpu rw,relatime shared:2 - cgroup cgroup rw,cpu
27 25 0:25 / /nonexistent/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
28 25 0:26 / /nonexistent/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
29 25 0:27 / /nonexistent/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
30 25 0:28 / /nonexistent/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_with_v1_and_bare_v2_finds_both() {
        let l = CgroupLayout::from_mountinfo(MOUNTINFO);
        assert_eq!(l.v2_root, Some(PathBuf::from("/nonexistent/unified")));
        assert!(l.v2_controllers.is_empty());
        assert_eq!(
            l.v1.get("cpu"),
            Some(&PathBuf::from("/nonexistent/cgroup/cpu"))
        );
        assert_eq!(
            l.v1.get("blkio"),
            Some(&PathBuf::from("/nonexistent/cgroup/blkio"))
        );
        assert!(!l.v1.contains_key("name=systemd"));
        let s = l.summary();
        assert!(
            s.contains("v2 cpu missing, using cgroup v1 cpu at /nonexistent/cgroup/cpu"),
            "{s}"
        );
        assert!(s.contains("v2 io missing, using cgroup v1 blkio"), "{s}");
        assert!(!l.all_v2());
    }

    #[test]
    fn no_cgroups_at_all_skips_every_setting_with_reason() {
        let l = CgroupLayout::from_mountinfo("");
        let b = CgroupBinder::new(l, "prescient");
        let out = b
            .apply(
                "vm1",
                &CgroupSettings {
                    cpuset_cpus: Some(vec![0]),
                    cpu_weight: Some(100),
                    io_weight: Some(100),
                    ..CgroupSettings::default()
                },
            )
            .unwrap();
        assert!(out.applied.is_empty());
        let names: Vec<&str> = out.skipped.iter().map(|s| s.setting.as_str()).collect();
        assert_eq!(names, vec!["cpuset.cpus", "cpu.weight", "io.weight"]);
    }

    #[test]
    fn v2_tree_gets_v2_formats_and_enabled_controllers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let layout = CgroupLayout {
            v2_root: Some(root.clone()),
            v2_controllers: ["cpuset", "cpu", "io"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            v1: BTreeMap::new(),
        };
        assert!(layout.all_v2());
        let b = CgroupBinder::new(layout, "prescient");
        let out = b
            .apply(
                "vm1",
                &CgroupSettings {
                    cpuset_cpus: Some(vec![2, 3]),
                    cpuset_mems: Some(vec![1]),
                    cpu_weight: Some(200),
                    cpu_max: Some(CpuMax {
                        quota_us: Some(50_000),
                        period_us: 100_000,
                    }),
                    io_weight: Some(300),
                    io_max: vec![IoMax {
                        major: 8,
                        minor: 0,
                        rbps: Some(1 << 20),
                        wbps: None,
                        riops: None,
                        wiops: Some(500),
                    }],
                },
            )
            .unwrap();
        assert!(out.skipped.is_empty());
        let g = root.join("prescient/vm1");
        let read = |f: &str| std::fs::read_to_string(g.join(f)).unwrap();
        assert_eq!(read("cpuset.cpus"), "2,3");
        assert_eq!(read("cpuset.mems"), "1");
        assert_eq!(read("cpu.weight"), "200");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("io.weight"), "default 300");
        assert_eq!(
            read("io.max"),
            "8:0 rbps=1048576 wbps=max riops=max wiops=500"
        );
        let ctl = std::fs::read_to_string(root.join("prescient/cgroup.subtree_control")).unwrap();
        assert_eq!(ctl, "+cpu +cpuset +io");
    }

    #[test]
    fn weight_out_of_range_is_rejected_before_any_write() {
        let b = CgroupBinder::new(CgroupLayout::from_mountinfo(""), "p");
        let err = b
            .apply(
                "vm1",
                &CgroupSettings {
                    cpu_weight: Some(0),
                    ..CgroupSettings::default()
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("cpu.weight"), "{err}");
    }
}
