//! The daemon side: acts on libvirt domains from outside, after libvirt's
//! `started` (or `reconnect`, `attach`) hook has returned.
//!
//! The hooks server hands each libvirt hook call to the agent without
//! waiting (the hook's reply never depends on what the agent does). The
//! agent runs on its own thread: it finds the domain's QEMU process and its
//! vCPU threads (by their names, `CPU N/TCG` or `CPU N/KVM`, or through QMP
//! `query-cpus-fast` via `virsh qemu-monitor-command`), pins each vCPU
//! thread with `sched_setaffinity`, sets the balloon with `virsh setmem`
//! when the domain asks for a target, and then samples the process's CPU
//! time, resident memory and balloon size until the domain stops. What it
//! did goes to the log and, if configured, to a JSON-lines record file.
//!
//! The decisions (which CPU for which vCPU, which balloon target) are pure
//! functions; the calls are in `sys`.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_hooks::{LibvirtDomain, LibvirtHookCall, error_chain};

use super::LibvirtError;
use super::domain::{parse_cpu_list, parse_domain};
use super::sys::{self, Virsh};
use crate::metrics::Metrics;

/// How the agent acts.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `virsh`, with the connection URI and its time bound.
    pub virsh: Virsh,
    /// libvirt's run directory (`/run/libvirt`): QEMU pid files are in
    /// `qemu/` below it.
    pub run_dir: PathBuf,
    /// Host CPUs for vCPU threads when the domain names none; `None`: the
    /// daemon's own CPUs.
    pub cpus: Option<Vec<usize>>,
    /// How often running domains are sampled.
    pub sample_interval: Duration,
    /// How long to look for a started domain's QEMU and vCPU threads.
    pub locate_for: Duration,
    /// Append what the agent does here, as JSON lines.
    pub record_file: Option<PathBuf>,
    /// Where usage samples go to the store (`qemu_rss_mib`,
    /// `qemu_cpu_cores` per domain); `None`: not stored.
    pub samples: Option<Arc<crate::online::Online>>,
}

impl AgentConfig {
    /// Defaults for the system libvirt.
    pub fn system() -> Self {
        AgentConfig {
            virsh: Virsh {
                program: PathBuf::from("virsh"),
                uri: "qemu:///system".into(),
                timeout: Duration::from_secs(60),
            },
            run_dir: PathBuf::from("/run/libvirt"),
            cpus: None,
            sample_interval: Duration::from_secs(10),
            locate_for: Duration::from_secs(60),
            record_file: None,
            samples: None,
        }
    }
}

/// One vCPU thread and where the agent put it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuPin {
    /// vCPU index.
    pub vcpu: u32,
    /// Its thread id.
    pub tid: i32,
    /// The CPUs it may run on now (empty when left alone).
    pub cpus: Vec<usize>,
    /// Why it was left alone or could not be pinned, if so.
    #[serde(default)]
    pub note: Option<String>,
}

/// What the agent records, one JSON object a line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "record")]
#[non_exhaustive]
pub enum AgentRecord {
    /// The agent acted on a running domain.
    Acted {
        /// The domain.
        vm: String,
        /// When, ms since the Unix epoch.
        at_unix_ms: u64,
        /// Its QEMU process.
        qemu_pid: i32,
        /// vCPU threads and their placement.
        vcpus: Vec<VcpuPin>,
        /// The balloon target set, KiB.
        balloon_target_kib: Option<u64>,
        /// Why the balloon was not set, if it was asked for and failed.
        balloon_error: Option<String>,
    },
    /// A usage sample of a running domain.
    Usage {
        /// The domain.
        vm: String,
        /// When, ms since the Unix epoch.
        at_unix_ms: u64,
        /// Its QEMU process.
        qemu_pid: i32,
        /// CPU time of the QEMU process so far, ms.
        cpu_ms: f64,
        /// Its resident memory, KiB.
        rss_kib: u64,
        /// The balloon's current size, KiB, if libvirt said.
        balloon_actual_kib: Option<u64>,
        /// GPU memory held by the QEMU process, MiB, on a host with the
        /// NVIDIA driver (absent elsewhere).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gpu_mem_mib: Option<u64>,
        /// SM utilisation of the QEMU process, percent of one GPU, where
        /// NVML gives per-process utilisation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gpu_sm_util_pct: Option<u32>,
    },
    /// The agent could not act on a domain.
    Failed {
        /// The domain.
        vm: String,
        /// When, ms since the Unix epoch.
        at_unix_ms: u64,
        /// What went wrong.
        error: String,
    },
}

/// Chooses a CPU set for each vCPU thread (pure): the domain's
/// `<prescient:cpus>` if it names any, otherwise `default_cpus`; one CPU
/// per vCPU, round robin in vCPU order. vCPUs that the domain pins itself
/// (`<cputune><vcpupin>`) are left alone.
pub fn pin_plan(
    domain: &LibvirtDomain,
    threads: &[(u32, i32)],
    default_cpus: &[usize],
) -> Result<Vec<VcpuPin>, LibvirtError> {
    let cpus = match &domain.prescient.cpus {
        Some(list) => parse_cpu_list(list)?,
        None => default_cpus.to_vec(),
    };
    if cpus.is_empty() {
        return Err(LibvirtError::CpuList {
            list: String::new(),
            why: "no CPUs to pin to".into(),
        });
    }
    let mut next = 0usize;
    let mut plan = Vec::with_capacity(threads.len());
    for &(vcpu, tid) in threads {
        if domain.pinned_by_libvirt.contains(&vcpu) {
            plan.push(VcpuPin {
                vcpu,
                tid,
                cpus: Vec::new(),
                note: Some("pinned by the domain's <cputune>; left alone".into()),
            });
            continue;
        }
        plan.push(VcpuPin {
            vcpu,
            tid,
            cpus: vec![cpus[next % cpus.len()]],
            note: None,
        });
        next += 1;
    }
    Ok(plan)
}

/// The balloon target for a domain (pure): its `<prescient:balloon-target-mib>`
/// in KiB, at most `<memory>`; `None` without a target or without a balloon
/// device.
pub fn balloon_target_kib(domain: &LibvirtDomain) -> Option<u64> {
    let mib = domain.prescient.balloon_target_mib?;
    if domain.balloon_model.as_deref() == Some("none") {
        return None;
    }
    Some(mib.saturating_mul(1024).min(domain.memory_kib))
}

enum Msg {
    Call {
        vm: String,
        call: Box<LibvirtHookCall>,
    },
}

struct Running {
    domain: LibvirtDomain,
    state: DomState,
    next_sample: Instant,
    /// The last sample's time (ms) and QEMU CPU time (ms), for the rate.
    last_cpu: Option<(u64, f64)>,
}

enum DomState {
    Locating { until: Instant, asked_qmp: bool },
    Running { pid: i32 },
}

/// The agent: a thread that acts on libvirt domains. Dropping it stops the
/// thread.
#[derive(Debug)]
pub struct LibvirtAgent {
    tx: Option<mpsc::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Call { vm, call } => write!(f, "{vm}: {}", call.operation_name),
        }
    }
}

impl LibvirtAgent {
    /// Starts the agent's thread; it counts what it does in `metrics`.
    pub fn start(config: AgentConfig, metrics: Arc<Metrics>) -> Result<Self, LibvirtError> {
        let default_cpus = match &config.cpus {
            Some(c) => c.clone(),
            None => sys::own_cpus()?,
        };
        if let Some(p) = &config.record_file {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| LibvirtError::Record {
                    path: p.clone(),
                    why: e.to_string(),
                })?;
        }
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("libvirt-agent".into())
            .spawn(move || Worker::new(config, default_cpus, metrics).run(&rx))
            .map_err(|e| {
                LibvirtError::Proc(format!("cannot start the libvirt agent thread: {e}"))
            })?;
        Ok(LibvirtAgent {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands one hook call to the agent; never blocks.
    pub fn notify(&self, vm: &str, call: &LibvirtHookCall) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Call {
                vm: vm.to_string(),
                call: Box::new(call.clone()),
            });
        }
    }
}

impl Drop for LibvirtAgent {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    config: AgentConfig,
    default_cpus: Vec<usize>,
    domains: HashMap<String, Running>,
    metrics: Arc<Metrics>,
    /// NVML and the GPUs it saw, where the driver is present.
    gpus: Option<(accel::NvmlSource, accel::Inventory)>,
}

impl Worker {
    fn new(config: AgentConfig, default_cpus: Vec<usize>, metrics: Arc<Metrics>) -> Self {
        // Without the driver this is quietly `None` (the daemon logged the
        // GPU inventory once at start).
        let gpus = accel::NvmlSource::open()
            .ok()
            .and_then(|n| accel::Inventory::read(&n).ok().map(|inv| (n, inv)));
        Worker {
            config,
            default_cpus,
            domains: HashMap::new(),
            metrics,
            gpus,
        }
    }

    fn count(&self, action: &str) {
        Metrics::inc(&self.metrics.libvirt_actions, action);
    }

    fn run(mut self, rx: &mpsc::Receiver<Msg>) {
        loop {
            let wait = self.next_wakeup();
            match rx.recv_timeout(wait) {
                Ok(Msg::Call { vm, call }) => self.on_call(&vm, &call),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.step();
        }
        tracing::debug!("libvirt agent stopped");
    }

    fn next_wakeup(&self) -> Duration {
        let now = Instant::now();
        self.domains
            .values()
            .map(|d| match d.state {
                DomState::Locating { .. } => Duration::from_millis(100),
                DomState::Running { .. } => d.next_sample.saturating_duration_since(now),
            })
            .min()
            .unwrap_or(Duration::from_secs(3600))
    }

    fn on_call(&mut self, vm: &str, call: &LibvirtHookCall) {
        let op = call.operation;
        if op.vm_gone() {
            if self.domains.remove(vm).is_some() {
                tracing::info!(
                    vm,
                    operation = call.operation_name,
                    "domain gone; no longer sampled"
                );
            }
            return;
        }
        if !op.vm_runs() {
            return;
        }
        // The daemon reads the XML itself: the hook is a peer, not an authority.
        let domain = match parse_domain(&call.domain_xml) {
            Ok(d) if d.name == vm => d,
            Ok(d) => {
                self.failed(
                    vm,
                    &format!(
                        "the domain XML names {:?}, not this domain; nothing done",
                        d.name
                    ),
                );
                return;
            }
            Err(e) => {
                self.failed(vm, &format!("{}; nothing done", error_chain(&e)));
                return;
            }
        };
        tracing::info!(
            vm,
            operation = call.operation_name,
            vcpus = domain.vcpus,
            "domain runs; acting on it"
        );
        self.domains.insert(
            vm.to_string(),
            Running {
                domain,
                state: DomState::Locating {
                    until: Instant::now() + self.config.locate_for,
                    asked_qmp: false,
                },
                next_sample: Instant::now(),
                last_cpu: None,
            },
        );
    }

    fn step(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self.domains.keys().cloned().collect();
        for vm in names {
            let Some(d) = self.domains.get_mut(&vm) else {
                continue;
            };
            match d.state {
                DomState::Locating { until, asked_qmp } => {
                    match locate(&self.config, &d.domain, now >= until, asked_qmp) {
                        Located::Found(pid, threads) => {
                            let record = act(
                                &self.config,
                                &self.default_cpus,
                                &self.metrics,
                                &d.domain,
                                pid,
                                &threads,
                            );
                            d.state = DomState::Running { pid };
                            d.next_sample = Instant::now();
                            self.write(&record);
                        }
                        Located::NotYet { asked_qmp: q } if now < until => {
                            d.state = DomState::Locating {
                                until,
                                asked_qmp: q,
                            };
                        }
                        Located::NotYet { .. } => {
                            self.domains.remove(&vm);
                            self.failed(
                                &vm,
                                &format!(
                                    "its QEMU process and vCPU threads were not found within {} s",
                                    self.config.locate_for.as_secs()
                                ),
                            );
                        }
                    }
                }
                DomState::Running { pid } if now >= d.next_sample => {
                    d.next_sample = now + self.config.sample_interval;
                    match sample(&self.config, self.gpus.as_ref(), &vm, pid) {
                        Some(r) => {
                            if let Some(o) = &self.config.samples {
                                store_usage(o, d, &r);
                            }
                            self.count("usage-sampled");
                            self.write(&r);
                        }
                        None => {
                            tracing::info!(vm, pid, "QEMU process gone; no longer sampled");
                            self.domains.remove(&vm);
                        }
                    }
                }
                DomState::Running { .. } => {}
            }
        }
    }

    fn failed(&self, vm: &str, error: &str) {
        self.count("domain-failed");
        tracing::error!(vm, "libvirt domain: {error}");
        self.write(&AgentRecord::Failed {
            vm: vm.to_string(),
            at_unix_ms: crate::server::unix_ms(),
            error: error.to_string(),
        });
    }

    fn write(&self, record: &AgentRecord) {
        let Some(path) = &self.config.record_file else {
            return;
        };
        let line = serde_json::to_string(record).map(|mut s| {
            s.push('\n');
            s
        });
        let written = line.map_err(std::io::Error::other).and_then(|l| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?
                .write_all(l.as_bytes())
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), "cannot append to the libvirt record file: {e}");
        }
    }
}

enum Located {
    Found(i32, Vec<(u32, i32)>),
    NotYet { asked_qmp: bool },
}

/// Looks for the QEMU process and all its vCPU threads.
fn locate(
    config: &AgentConfig,
    domain: &LibvirtDomain,
    last_try: bool,
    asked_qmp: bool,
) -> Located {
    let Some(pid) = sys::find_qemu_pid(&config.run_dir, &domain.name) else {
        return Located::NotYet { asked_qmp };
    };
    let want = usize::try_from(domain.vcpus).unwrap_or(usize::MAX);
    let threads = sys::vcpu_threads(pid);
    if threads.len() >= want {
        return Located::Found(pid, threads);
    }
    // Threads not named (a QEMU without debug-threads): ask QMP once,
    // through libvirt, which owns the monitor.
    if threads.is_empty() && (last_try || !asked_qmp) {
        let answer = config.virsh.run(&[
            "qemu-monitor-command",
            &domain.name,
            r#"{"execute":"query-cpus-fast"}"#,
        ]);
        match answer.and_then(|a| sys::qmp_vcpu_threads(&a)) {
            Ok(t) if t.len() >= want => return Located::Found(pid, t),
            Ok(_) => {}
            Err(e) => tracing::debug!(vm = domain.name, "query-cpus-fast: {e}"),
        }
        return Located::NotYet { asked_qmp: true };
    }
    Located::NotYet { asked_qmp }
}

/// Pins the vCPU threads and sets the balloon.
fn act(
    config: &AgentConfig,
    default_cpus: &[usize],
    metrics: &Metrics,
    domain: &LibvirtDomain,
    pid: i32,
    threads: &[(u32, i32)],
) -> AgentRecord {
    let vm = domain.name.clone();
    let vcpus = match pin_plan(domain, threads, default_cpus) {
        Ok(mut plan) => {
            for p in plan.iter_mut().filter(|p| !p.cpus.is_empty()) {
                match sys::set_thread_cpus(p.tid, &p.cpus) {
                    Ok(()) => {
                        Metrics::inc(&metrics.libvirt_actions, "vcpu-pinned");
                        tracing::info!(vm, vcpu = p.vcpu, tid = p.tid, cpus = ?p.cpus, "vCPU thread pinned");
                    }
                    Err(e) => {
                        tracing::warn!(
                            vm,
                            vcpu = p.vcpu,
                            tid = p.tid,
                            "cannot pin the vCPU thread: {e}"
                        );
                        Metrics::inc(&metrics.libvirt_actions, "pin-failed");
                        p.note = Some(e.to_string());
                        p.cpus = sys::thread_cpus(p.tid).unwrap_or_default();
                    }
                }
            }
            plan
        }
        Err(e) => {
            Metrics::inc(&metrics.libvirt_actions, "pin-failed");
            tracing::error!(vm, "no vCPU placement: {e}");
            threads
                .iter()
                .map(|&(vcpu, tid)| VcpuPin {
                    vcpu,
                    tid,
                    cpus: Vec::new(),
                    note: Some(e.to_string()),
                })
                .collect()
        }
    };
    let target = balloon_target_kib(domain);
    let mut balloon_error = None;
    if domain.prescient.balloon_target_mib.is_some() && target.is_none() {
        Metrics::inc(&metrics.libvirt_actions, "balloon-failed");
        balloon_error =
            Some("the domain has no balloon device (memballoon model none)".to_string());
    }
    if let Some(kib) = target {
        let size = format!("{kib}KiB");
        match config.virsh.run(&["setmem", &domain.name, &size, "--live"]) {
            Ok(_) => {
                Metrics::inc(&metrics.libvirt_actions, "balloon-set");
                tracing::info!(vm, target_kib = kib, "balloon target set");
            }
            Err(e) => {
                Metrics::inc(&metrics.libvirt_actions, "balloon-failed");
                tracing::error!(vm, target_kib = kib, "cannot set the balloon: {e}");
                balloon_error = Some(e.to_string());
            }
        }
    }
    AgentRecord::Acted {
        vm,
        at_unix_ms: crate::server::unix_ms(),
        qemu_pid: pid,
        vcpus,
        balloon_target_kib: target.filter(|_| balloon_error.is_none()),
        balloon_error,
    }
}

/// Hands a usage record to the store's sample queue (never blocks): the
/// QEMU process's resident memory, and its CPU in cores since the last
/// sample.
fn store_usage(online: &crate::online::Online, d: &mut Running, r: &AgentRecord) {
    let AgentRecord::Usage {
        vm,
        at_unix_ms,
        cpu_ms,
        rss_kib,
        ..
    } = r
    else {
        return;
    };
    let at = i64::try_from(*at_unix_ms).unwrap_or(i64::MAX);
    let sample = |metric: &str, value: f64| crate::store::Sample {
        vm_id: vm.clone(),
        metric: metric.into(),
        at_unix_ms: at,
        value,
        vcpus: Some(d.domain.vcpus),
        memory_mib: Some(d.domain.memory_kib / 1024),
    };
    online.sample(sample("qemu_rss_mib", *rss_kib as f64 / 1024.0));
    if let Some((then, before)) = d.last_cpu
        && *at_unix_ms > then
        && *cpu_ms >= before
    {
        let cores = (cpu_ms - before) / (at_unix_ms - then) as f64;
        online.sample(sample("qemu_cpu_cores", cores));
    }
    d.last_cpu = Some((*at_unix_ms, *cpu_ms));
}

/// One usage sample; `None` when the process is gone.
fn sample(
    config: &AgentConfig,
    gpus: Option<&(accel::NvmlSource, accel::Inventory)>,
    vm: &str,
    pid: i32,
) -> Option<AgentRecord> {
    let (cpu_ms, rss_kib) = match sys::process_usage(pid) {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(vm, pid, "usage: {e}");
            return None;
        }
    };
    let balloon_actual_kib = match config.virsh.run(&["dommemstat", vm]) {
        Ok(out) => sys::dommemstat_actual_kib(&out),
        Err(e) => {
            tracing::debug!(vm, "dommemstat: {e}");
            None
        }
    };
    // GPU memory and utilisation of the QEMU process (a host-rendered or
    // vGPU device; a passed-through GPU is invisible from the host).
    let gpu = gpus.and_then(|(nvml, inv)| {
        let pid = u32::try_from(pid).ok()?;
        match inv.sample_vm(nvml, &[pid]) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::debug!(vm, pid, "GPU usage: {e}");
                None
            }
        }
    });
    let gpu_mem_mib = gpu.as_ref().map(|u| u.mem_mib);
    let gpu_sm_util_pct = gpu.and_then(|u| u.sm_util_pct);
    tracing::debug!(
        vm,
        pid,
        cpu_ms,
        rss_kib,
        ?balloon_actual_kib,
        ?gpu_mem_mib,
        "usage"
    );
    Some(AgentRecord::Usage {
        vm: vm.to_string(),
        at_unix_ms: crate::server::unix_ms(),
        qemu_pid: pid,
        cpu_ms,
        rss_kib,
        balloon_actual_kib,
        gpu_mem_mib,
        gpu_sm_util_pct,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(cpus: Option<&str>, pinned: &[u32], target: Option<u64>) -> LibvirtDomain {
        let mut d = parse_domain(
            "<domain type='qemu'><name>d</name><memory unit='MiB'>512</memory><vcpu>4</vcpu>\
             <devices><memballoon model='virtio'/></devices></domain>",
        )
        .unwrap();
        d.prescient.cpus = cpus.map(str::to_string);
        d.pinned_by_libvirt = pinned.to_vec();
        d.prescient.balloon_target_mib = target;
        d
    }

    const THREADS: [(u32, i32); 4] = [(0, 100), (1, 101), (2, 102), (3, 103)];

    #[test]
    fn vcpus_spread_round_robin_over_the_default_cpus() {
        let plan = pin_plan(&domain(None, &[], None), &THREADS, &[2, 3, 5]).unwrap();
        let cpus: Vec<Vec<usize>> = plan.iter().map(|p| p.cpus.clone()).collect();
        assert_eq!(cpus, [vec![2], vec![3], vec![5], vec![2]]);
        assert!(plan.iter().all(|p| p.note.is_none()));
    }

    #[test]
    fn domain_cpus_win_and_libvirt_pins_are_left_alone() {
        let plan = pin_plan(&domain(Some("1"), &[2], None), &THREADS, &[0, 1]).unwrap();
        let cpus: Vec<Vec<usize>> = plan.iter().map(|p| p.cpus.clone()).collect();
        assert_eq!(cpus, [vec![1], vec![1], vec![], vec![1]]);
        assert!(plan[2].note.is_some());
        assert!(pin_plan(&domain(Some("x"), &[], None), &THREADS, &[0]).is_err());
        assert!(pin_plan(&domain(None, &[], None), &THREADS, &[]).is_err());
    }

    #[test]
    fn balloon_target_is_capped_and_needs_a_device() {
        assert_eq!(balloon_target_kib(&domain(None, &[], None)), None);
        assert_eq!(
            balloon_target_kib(&domain(None, &[], Some(256))),
            Some(256 * 1024)
        );
        assert_eq!(
            balloon_target_kib(&domain(None, &[], Some(4096))),
            Some(512 * 1024)
        );
        let mut d = domain(None, &[], Some(256));
        d.balloon_model = Some("none".into());
        assert_eq!(balloon_target_kib(&d), None);
    }

    /// Usage records reach the store's samples table: resident memory
    /// each time, CPU in cores from the second record on.
    #[test]
    fn usage_samples_go_to_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.db");
        drop(crate::store::ProfileStore::open(&store, Default::default()).unwrap());
        let online = Arc::new(crate::online::Online::samples_only(
            crate::online::ForecastConfig::default(),
            Arc::new(Metrics::new()),
        ));
        online.start(&store).unwrap();
        let mut d = Running {
            domain: domain(None, &[], None),
            state: DomState::Running { pid: 1 },
            next_sample: Instant::now(),
            last_cpu: None,
        };
        let usage = |at: u64, cpu_ms: f64| AgentRecord::Usage {
            vm: "d".into(),
            at_unix_ms: at,
            qemu_pid: 1,
            cpu_ms,
            rss_kib: 256 * 1024,
            balloon_actual_kib: None,
            gpu_mem_mib: None,
            gpu_sm_util_pct: None,
        };
        // Recent: older samples are pruned by the writer.
        let t = u64::try_from(crate::online::unix_ms_now()).unwrap();
        store_usage(&online, &mut d, &usage(t - 10_000, 500.0));
        store_usage(&online, &mut d, &usage(t, 15_500.0));
        online.shutdown();
        let db = crate::store::ProfileStore::open(&store, Default::default()).unwrap();
        let rss = db.samples("qemu_rss_mib", 0, 10).unwrap();
        assert_eq!(rss.len(), 2);
        assert_eq!(rss[1].value, 256.0);
        assert_eq!((rss[1].vcpus, rss[1].memory_mib), (Some(4), Some(512)));
        let cpu = db.samples("qemu_cpu_cores", 0, 10).unwrap();
        assert_eq!(cpu.len(), 1);
        assert_eq!(
            (cpu[0].at_unix_ms, cpu[0].value),
            (i64::try_from(t).unwrap(), 1.5)
        );
    }

    #[test]
    fn records_round_trip_as_json_lines() {
        let r = AgentRecord::Acted {
            vm: "d".into(),
            at_unix_ms: 1,
            qemu_pid: 2,
            vcpus: vec![VcpuPin {
                vcpu: 0,
                tid: 3,
                cpus: vec![1],
                note: None,
            }],
            balloon_target_kib: Some(262_144),
            balloon_error: None,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"record\":\"acted\""), "{s}");
        assert_eq!(serde_json::from_str::<AgentRecord>(&s).unwrap(), r);
    }

    #[test]
    fn agent_ignores_bad_xml_and_records_the_failure() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("rec.jsonl");
        let mut config = AgentConfig::system();
        config.record_file = Some(rec.clone());
        config.cpus = Some(vec![0]);
        let metrics = Arc::new(Metrics::new());
        let agent = LibvirtAgent::start(config, Arc::clone(&metrics)).unwrap();
        let call = LibvirtHookCall::new("started", "begin", "-", "<domain><oops".into());
        agent.notify("vm-x", &call);
        // Stopping the agent processes what was sent before.
        drop(agent);
        let text = std::fs::read_to_string(&rec).unwrap();
        let recs: Vec<AgentRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(recs.len(), 1, "{text}");
        let AgentRecord::Failed { vm, error, .. } = &recs[0] else {
            panic!("{text}");
        };
        assert_eq!(vm, "vm-x");
        assert!(error.contains("nothing done"), "{error}");
        let text = metrics.render();
        assert!(
            text.contains(r#"prescient_libvirt_actions_total{kind="domain-failed"} 1"#),
            "{text}"
        );
    }
}
