//! The daemon's TOML configuration, validated whole before anything
//! touches the host. Every key has a default; unknown keys are errors (a
//! typo must not silently fall back to a default).
//!
//! ```toml
//! [daemon]
//! socket = "/run/prescient/hooks.sock"
//! event_log = "/var/log/prescient/events.jsonl"   # optional
//! allow_uids = []
//! metrics_listen = "127.0.0.1:9464"              # optional: Prometheus /metrics
//!
//! [store]
//! path = "/var/lib/prescient/prescient.db"         # or enabled = false
//! retain_boots = 200
//! initial_profiles = 3
//! sample_every = 10
//! profile_chunk_kib = 2048
//! profile_interval_ms = 10
//!
//! [plan]
//! threshold = 0.5
//! mode = "concurrent"      # lazy | before | concurrent | full
//! hugepages = false
//! min_boots = 1
//!
//! [balloon]
//! forecasts = "/etc/prescient/balloon-forecasts.json"   # optional (see BalloonForecasts)
//!
//! [pool]
//! # cpus = 16                  # default: this process's CPUs (sched_getaffinity)
//! # memory_mib = 65536         # default: MemTotal
//! net_mbps = 0
//! disk_mbps = 0
//! gpus = 0
//! reserved_cpus = 0.0
//! reserved_memory_mib = 512
//! reserved_net_mbps = 0
//! reserved_disk_mbps = 0
//! reserved_gpus = 0
//! cpu_overcommit = 4.0
//! memory_overcommit = 1.0
//! net_overcommit = 1.0
//! disk_overcommit = 1.0
//!
//! [allocator]
//! quantile = 0.9
//! min_samples = 3
//! model_min_samples = 20
//! history = 200
//! on_shortfall = "refuse"      # refuse | boot-lazily
//! [[allocator.class]]
//! name = "batch"
//! vm_prefix = "batch-"         # and/or image = "<digest>"
//! quantile = 0.5
//! net_mbps = 100
//! disk_mbps = 50
//! gpus = 0
//!
//! [shaping]
//! interval_s = 30              # 0 (the default): the shaping loop is off
//! policy = "maximise-utilisation"   # minimise-fragmentation | favour-high-priority
//! lambda = 20.0                # tuner reward: -(slack + lambda * shortfall)
//! floor_mib = 128
//! host_memory_mib = 65536      # optional (default: the host's MemTotal)
//! host_cpus = 16.0             # optional (default: the host's CPUs)
//! cgroups = false              # cpu.weight / cpu.max in a cgroup per VM (its VMM process)
//! cgroup_parent = "prescient"
//!
//! [libvirt]
//! act = true                   # false: only record libvirt hook calls
//! uri = "qemu:///system"
//! run_dir = "/run/libvirt"
//! virsh = "virsh"
//! cpus = "2-7"                 # optional: CPUs for vCPU threads (default: the daemon's own)
//! sample_interval_ms = 10000
//! record = "/var/log/prescient/libvirt.jsonl"   # optional
//! migrate_uri = "qemu+tcp://{host}/system"   # optional: a drain live-migrates domains
//! migrate_timeout_s = 600      # pre-copy longer than this pauses the guest to finish
//! migrate_parallel = 1         # virsh migrate runs at once (1 or 2)
//!
//! [interrupt]
//! capacity_mib = 16384        # optional: turns the interruption coordinator on
//! capacity_vcpus = 32         # optional (default: unlimited)
//! shrink_headroom_mib = 16
//! retry_after_ms = 250
//! waiting_expiry_ms = 10000
//!
//! [forecast]
//! model = "/var/lib/prescient/forecast.model"   # default: the store's path + ".model"
//! min_outcomes = 12            # model outcomes per VM before it may be served
//! retrain_interval_s = 21600   # 0: no retraining
//! retrain_max_samples = 2000000
//! retrain_max_seconds = 120.0
//! retrain_epochs = 8
//! retrain_cpu_share = 0.25     # CPU time / wall time while training
//! retrain_hidden = 32
//! holdout_s = 21600            # the latest 6 h are held out and score every model
//! min_holdout_cases = 24
//! sample_retain_hours = 336
//! sample_max_rows = 20000000
//! forecast_max_rows = 1000000
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm_hooks::{PrefaultMode, ProfileRequest};

use vmm_hooks::{Resources, ShortfallAction};

use crate::allocator::{AllocatorPolicy, VmClass};
use crate::libvirt::{AgentConfig, parse_cpu_list};
use crate::pool::{Overcommit, Pool};
use crate::store::StorePolicy;
use crate::working_set::PlanPolicy;

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {key} = {value}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `plan.threshold`.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        reason: &'static str,
    },
    /// The `[migration]` section is out of range.
    #[error("{path}")]
    Migration {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the key).
        #[source]
        source: crate::migration::MigrationError,
    },
    /// The `[shaping]` section is out of range.
    #[error("{path}")]
    Shaping {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the key).
        #[source]
        source: crate::shaping::ShapeError,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The daemon.
    pub daemon: DaemonConfig,
    /// The profile store.
    pub store: StoreConfig,
    /// Boot plans.
    pub plan: PlanConfig,
    /// libvirt domains.
    pub libvirt: LibvirtConfig,
    /// Balloon control.
    pub balloon: BalloonSection,
    /// The host's resource pool.
    pub pool: PoolSection,
    /// The predictive allocator.
    pub allocator: AllocatorSection,
    /// The shaping loop.
    pub shaping: crate::ShapingConfig,
    /// The interruption coordinator.
    pub interrupt: InterruptSection,
    /// The forecasting model, the samples kept for it and its retraining.
    pub forecast: crate::online::ForecastConfig,
    /// Live migration between hosts.
    pub migration: crate::migration::MigrationConfig,
}

/// `[interrupt]`: the interruption coordinator (`crate::interrupt`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InterruptSection {
    /// Memory the host may hand out to VMs, MiB; unset: no coordinator
    /// (every VM admitted, none interrupted).
    pub capacity_mib: Option<u64>,
    /// vCPUs the host may hand out; unset: unlimited.
    pub capacity_vcpus: Option<u64>,
    /// Memory each VM keeps beyond what shrinks may take, MiB.
    pub shrink_headroom_mib: u64,
    /// When a deferred VMM asks again, ms (10 to 10000).
    pub retry_after_ms: u64,
    /// A deferred VM that has not asked again for this long is forgotten,
    /// ms (at least `retry_after_ms`).
    pub waiting_expiry_ms: u64,
}

impl Default for InterruptSection {
    fn default() -> Self {
        let c = crate::interrupt::CoordinatorConfig::new(crate::interrupt::Resources::default());
        InterruptSection {
            capacity_mib: None,
            capacity_vcpus: None,
            shrink_headroom_mib: c.shrink_headroom_mib,
            retry_after_ms: c.retry_after_ms,
            waiting_expiry_ms: c.waiting_expiry_ms,
        }
    }
}

/// `[pool]`: what the host has (CPUs and memory probed unless given;
/// bandwidths and GPUs cannot be probed reliably and are given here), what
/// it keeps for itself, and how far VMs may be promised more.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSection {
    /// Host CPUs (default: this process's CPUs, from sched_getaffinity).
    pub cpus: Option<u64>,
    /// Host memory, MiB (default: MemTotal from /proc/meminfo).
    pub memory_mib: Option<u64>,
    /// Network bandwidth, Mbit/s.
    pub net_mbps: u64,
    /// Disk bandwidth, MB/s.
    pub disk_mbps: u64,
    /// GPUs.
    pub gpus: u64,
    /// CPUs kept for the host (may be fractional).
    pub reserved_cpus: f64,
    /// Memory kept for the host, MiB.
    pub reserved_memory_mib: u64,
    /// Network bandwidth kept for the host, Mbit/s.
    pub reserved_net_mbps: u64,
    /// Disk bandwidth kept for the host, MB/s.
    pub reserved_disk_mbps: u64,
    /// GPUs kept for the host.
    pub reserved_gpus: u64,
    /// CPU over-commit ratio (0.1 to 64).
    pub cpu_overcommit: f64,
    /// Memory over-commit ratio (0.1 to 64).
    pub memory_overcommit: f64,
    /// Network over-commit ratio (0.1 to 64).
    pub net_overcommit: f64,
    /// Disk over-commit ratio (0.1 to 64).
    pub disk_overcommit: f64,
}

impl Default for PoolSection {
    fn default() -> Self {
        let o = Overcommit::default();
        PoolSection {
            cpus: None,
            memory_mib: None,
            net_mbps: 0,
            disk_mbps: 0,
            gpus: 0,
            reserved_cpus: 0.0,
            reserved_memory_mib: 512,
            reserved_net_mbps: 0,
            reserved_disk_mbps: 0,
            reserved_gpus: 0,
            cpu_overcommit: o.cpu,
            memory_overcommit: o.memory,
            net_overcommit: o.network,
            disk_overcommit: o.disk,
        }
    }
}

impl PoolSection {
    /// The pool this section describes, probing the host for what it does
    /// not give.
    pub fn build(&self) -> Result<Pool, std::io::Error> {
        let (cpus, memory_mib) = match (self.cpus, self.memory_mib) {
            (Some(c), Some(m)) => (c, m),
            (c, m) => {
                let (hc, hm) = crate::pool::host_totals()?;
                (c.unwrap_or(hc), m.unwrap_or(hm))
            }
        };
        let total = Resources {
            cpu_millis: cpus.saturating_mul(1000),
            memory_mib,
            net_mbps: self.net_mbps,
            disk_mbps: self.disk_mbps,
            gpus: self.gpus,
        };
        let reserved_millis = (self.reserved_cpus * 1000.0).round();
        let reserved = Resources {
            // Validated finite and within 0..=1e6 CPUs, so the cast is exact.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            cpu_millis: reserved_millis.max(0.0) as u64,
            memory_mib: self.reserved_memory_mib,
            net_mbps: self.reserved_net_mbps,
            disk_mbps: self.reserved_disk_mbps,
            gpus: self.reserved_gpus,
        };
        Ok(Pool::new(
            total,
            reserved,
            Overcommit {
                cpu: self.cpu_overcommit,
                memory: self.memory_overcommit,
                network: self.net_overcommit,
                disk: self.disk_overcommit,
            },
        ))
    }
}

/// `[allocator]`: how boots are forecast and what happens when they do not
/// fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllocatorSection {
    /// Forecast quantile for VMs no class covers (0 < q <= 1).
    pub quantile: f64,
    /// Boots of history before it replaces the declared size (at least 1).
    pub min_samples: usize,
    /// Boots of history before the models crate's forecaster is used.
    pub model_min_samples: usize,
    /// Newest boots considered (at least 1).
    pub history: usize,
    /// What a VMM is told when a demand does not fit: refuse | boot-lazily.
    pub on_shortfall: ShortfallAction,
    /// VM classes (first match wins).
    pub class: Vec<VmClass>,
}

impl Default for AllocatorSection {
    fn default() -> Self {
        let p = AllocatorPolicy::default();
        AllocatorSection {
            quantile: p.quantile,
            min_samples: p.min_samples,
            model_min_samples: p.model_min_samples,
            history: p.history,
            on_shortfall: p.on_shortfall,
            class: p.classes,
        }
    }
}

impl AllocatorSection {
    /// The allocator policy.
    pub fn policy(&self) -> AllocatorPolicy {
        AllocatorPolicy {
            quantile: self.quantile,
            min_samples: self.min_samples,
            model_min_samples: self.model_min_samples,
            history: self.history,
            on_shortfall: self.on_shortfall,
            classes: self.class.clone(),
        }
    }
}

/// `[balloon]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalloonSection {
    /// Demand forecasts (JSON, `crate::BalloonForecasts`) that drive VM
    /// balloons: pre-balloon at boot, then deflate ahead of growth.
    pub forecasts: Option<PathBuf>,
}

/// `[libvirt]`: what the daemon does to libvirt domains after their
/// `started` hook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    /// Pin vCPU threads, set balloons and sample usage (false: only record
    /// the hook calls).
    pub act: bool,
    /// The connection URI for `virsh`.
    pub uri: String,
    /// libvirt's run directory (QEMU pid files are in `qemu/` below it).
    pub run_dir: PathBuf,
    /// The `virsh` program.
    pub virsh: PathBuf,
    /// Host CPUs for vCPU threads when a domain names none (a list like
    /// `2-7`); unset: the daemon's own CPUs.
    pub cpus: Option<String>,
    /// How often running domains are sampled, ms (100 to 3600000).
    pub sample_interval_ms: u64,
    /// Append what the daemon does to domains here (JSON lines), if set.
    pub record: Option<PathBuf>,
    /// The destination libvirt's URI for `prescient host drain`, with
    /// `{host}` standing for the host part of the drain's destination
    /// (`HOST:PORT` of a companion), e.g. `qemu+tcp://{host}/system`;
    /// unset: a drain does not move libvirt domains.
    pub migrate_uri: Option<String>,
    /// A domain's pre-copy running longer than this, s, pauses the guest
    /// so that the migration finishes (`virsh migrate --timeout`); the
    /// companion gives virsh twice this plus a minute before it aborts
    /// the job (10 to 86400).
    pub migrate_timeout_s: u64,
    /// `virsh migrate` runs at once during a drain (1 or 2).
    pub migrate_parallel: usize,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        let a = AgentConfig::system();
        LibvirtConfig {
            act: true,
            uri: a.virsh.uri,
            run_dir: a.run_dir,
            virsh: a.virsh.program,
            cpus: None,
            sample_interval_ms: u64::try_from(a.sample_interval.as_millis()).unwrap_or(10_000),
            record: None,
            migrate_uri: None,
            migrate_timeout_s: 600,
            migrate_parallel: 1,
        }
    }
}

/// `[daemon]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// The hooks socket.
    pub socket: PathBuf,
    /// Event log (JSON lines), if any.
    pub event_log: Option<PathBuf>,
    /// Users allowed on the socket besides root and the daemon's own.
    pub allow_uids: Vec<u32>,
    /// Address of the Prometheus `/metrics` endpoint, if any.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from("/run/prescient/hooks.sock"),
            event_log: None,
            allow_uids: Vec::new(),
            metrics_listen: None,
        }
    }
}

/// `[store]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Whether to keep a store (without one, plans stay empty).
    pub enabled: bool,
    /// The SQLite file.
    pub path: PathBuf,
    /// Boot rows kept per key.
    pub retain_boots: u32,
    /// First boots of a key always profiled.
    pub initial_profiles: u32,
    /// Then one boot in this many (0: never).
    pub sample_every: u32,
    /// Profile granularity, KiB (a power of two, 4 to 1048576).
    pub profile_chunk_kib: u64,
    /// Dirty-log polling interval while profiling, ms (1 to 1000).
    pub profile_interval_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let p = StorePolicy::default();
        StoreConfig {
            enabled: true,
            path: PathBuf::from("/var/lib/prescient/prescient.db"),
            retain_boots: p.retain_boots,
            initial_profiles: p.initial_profiles,
            sample_every: p.sample_every,
            profile_chunk_kib: p.profile.chunk_size / 1024,
            profile_interval_ms: p.profile.interval_ms,
        }
    }
}

/// `[plan]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanConfig {
    /// Chunks at or above this touch probability are pre-faulted (0 < t <= 1).
    pub threshold: f64,
    /// How the VMM pre-faults.
    pub mode: PrefaultMode,
    /// Ask for transparent huge pages.
    pub hugepages: bool,
    /// Profiles needed before any plan is made.
    pub min_boots: u32,
}

impl Default for PlanConfig {
    fn default() -> Self {
        let p = PlanPolicy::default();
        PlanConfig {
            threshold: p.threshold,
            mode: p.mode,
            hugepages: p.hugepages,
            min_boots: p.min_boots,
        }
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates text (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every value (`path` names the source in errors).
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key, value: String, reason| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            value,
            reason,
        };
        let s = &self.store;
        if !(s.profile_chunk_kib.is_power_of_two() && (4..=1 << 20).contains(&s.profile_chunk_kib))
        {
            return Err(bad(
                "store.profile_chunk_kib",
                s.profile_chunk_kib.to_string(),
                "must be a power of two from 4 to 1048576",
            ));
        }
        if !(1..=1000).contains(&s.profile_interval_ms) {
            return Err(bad(
                "store.profile_interval_ms",
                s.profile_interval_ms.to_string(),
                "must be 1 to 1000",
            ));
        }
        if s.retain_boots == 0 {
            return Err(bad(
                "store.retain_boots",
                "0".into(),
                "must keep at least one boot",
            ));
        }
        let p = &self.plan;
        if !(p.threshold > 0.0 && p.threshold <= 1.0) {
            return Err(bad(
                "plan.threshold",
                p.threshold.to_string(),
                "must be above 0 and at most 1",
            ));
        }
        if self.daemon.socket.as_os_str().is_empty() {
            return Err(bad("daemon.socket", String::new(), "must name a path"));
        }
        let l = &self.libvirt;
        if let Some(cpus) = &l.cpus
            && parse_cpu_list(cpus).is_err()
        {
            return Err(bad(
                "libvirt.cpus",
                cpus.clone(),
                "must be a CPU list like 0-3,8 (CPUs 0 to 1023)",
            ));
        }
        if !(100..=3_600_000).contains(&l.sample_interval_ms) {
            return Err(bad(
                "libvirt.sample_interval_ms",
                l.sample_interval_ms.to_string(),
                "must be 100 to 3600000",
            ));
        }
        if l.uri.is_empty() {
            return Err(bad("libvirt.uri", String::new(), "must name a libvirt URI"));
        }
        if let Some(u) = &l.migrate_uri
            && let Err(why) = crate::migration::check_migrate_uri(u)
        {
            return Err(bad("libvirt.migrate_uri", u.clone(), why));
        }
        if !(10..=86_400).contains(&l.migrate_timeout_s) {
            return Err(bad(
                "libvirt.migrate_timeout_s",
                l.migrate_timeout_s.to_string(),
                "must be 10 to 86400",
            ));
        }
        if !(1..=2).contains(&l.migrate_parallel) {
            return Err(bad(
                "libvirt.migrate_parallel",
                l.migrate_parallel.to_string(),
                "must be 1 or 2",
            ));
        }
        let pool = &self.pool;
        if !(pool.reserved_cpus.is_finite() && (0.0..=1e6).contains(&pool.reserved_cpus)) {
            return Err(bad(
                "pool.reserved_cpus",
                pool.reserved_cpus.to_string(),
                "must be 0 to 1000000 CPUs",
            ));
        }
        for (key, v) in [
            ("pool.cpu_overcommit", pool.cpu_overcommit),
            ("pool.memory_overcommit", pool.memory_overcommit),
            ("pool.net_overcommit", pool.net_overcommit),
            ("pool.disk_overcommit", pool.disk_overcommit),
        ] {
            if !(v.is_finite() && (0.1..=64.0).contains(&v)) {
                return Err(bad(key, v.to_string(), "must be 0.1 to 64"));
            }
        }
        if pool.cpus == Some(0) {
            return Err(bad(
                "pool.cpus",
                "0".into(),
                "must be at least 1 (or omitted to probe)",
            ));
        }
        let a = &self.allocator;
        let quantile_ok = |q: f64| q > 0.0 && q <= 1.0;
        if !quantile_ok(a.quantile) {
            return Err(bad(
                "allocator.quantile",
                a.quantile.to_string(),
                "must be above 0 and at most 1",
            ));
        }
        if a.min_samples == 0 {
            return Err(bad(
                "allocator.min_samples",
                "0".into(),
                "must be at least 1",
            ));
        }
        if a.history == 0 {
            return Err(bad("allocator.history", "0".into(), "must be at least 1"));
        }
        if a.model_min_samples < a.min_samples {
            return Err(bad(
                "allocator.model_min_samples",
                a.model_min_samples.to_string(),
                "must be at least allocator.min_samples",
            ));
        }
        for c in &a.class {
            if c.name.is_empty() {
                return Err(bad(
                    "allocator.class.name",
                    String::new(),
                    "must name the class",
                ));
            }
            if c.vm_prefix.is_none() && c.image.is_none() {
                return Err(bad(
                    "allocator.class",
                    c.name.clone(),
                    "must say which VMs it covers (vm_prefix or image)",
                ));
            }
            if let Some(q) = c.quantile
                && !quantile_ok(q)
            {
                return Err(bad(
                    "allocator.class.quantile",
                    format!("{q} (class {})", c.name),
                    "must be above 0 and at most 1",
                ));
            }
        }
        let i = &self.interrupt;
        if i.capacity_mib == Some(0) {
            return Err(bad(
                "interrupt.capacity_mib",
                "0".into(),
                "must be at least 1 (or unset: no coordinator)",
            ));
        }
        if i.capacity_vcpus == Some(0) {
            return Err(bad(
                "interrupt.capacity_vcpus",
                "0".into(),
                "must be at least 1 (or unset: unlimited)",
            ));
        }
        if !(10..=10_000).contains(&i.retry_after_ms) {
            return Err(bad(
                "interrupt.retry_after_ms",
                i.retry_after_ms.to_string(),
                "must be 10 to 10000",
            ));
        }
        if i.waiting_expiry_ms < i.retry_after_ms {
            return Err(bad(
                "interrupt.waiting_expiry_ms",
                i.waiting_expiry_ms.to_string(),
                "must be at least interrupt.retry_after_ms",
            ));
        }
        if let Err(e) = self.shaping.validate() {
            return Err(ConfigError::Shaping {
                path: path.to_path_buf(),
                source: e,
            });
        }
        let f = &self.forecast;
        if f.model.as_ref().is_some_and(|m| m.as_os_str().is_empty()) {
            return Err(bad(
                "forecast.model",
                String::new(),
                "must name a file (or be left out)",
            ));
        }
        if f.min_outcomes == 0 {
            return Err(bad(
                "forecast.min_outcomes",
                "0".into(),
                "must be at least 1",
            ));
        }
        if f.retrain_interval_s > 30 * 86_400 {
            return Err(bad(
                "forecast.retrain_interval_s",
                f.retrain_interval_s.to_string(),
                "must be 0 (off) to 2592000",
            ));
        }
        if !(100..=100_000_000).contains(&f.retrain_max_samples) {
            return Err(bad(
                "forecast.retrain_max_samples",
                f.retrain_max_samples.to_string(),
                "must be 100 to 100000000",
            ));
        }
        if !(f.retrain_max_seconds.is_finite() && (1.0..=86_400.0).contains(&f.retrain_max_seconds))
        {
            return Err(bad(
                "forecast.retrain_max_seconds",
                f.retrain_max_seconds.to_string(),
                "must be 1 to 86400",
            ));
        }
        if !(1..=1000).contains(&f.retrain_epochs) {
            return Err(bad(
                "forecast.retrain_epochs",
                f.retrain_epochs.to_string(),
                "must be 1 to 1000",
            ));
        }
        if !(f.retrain_cpu_share.is_finite() && (0.05..=1.0).contains(&f.retrain_cpu_share)) {
            return Err(bad(
                "forecast.retrain_cpu_share",
                f.retrain_cpu_share.to_string(),
                "must be 0.05 to 1",
            ));
        }
        if !(4..=1024).contains(&f.retrain_hidden) {
            return Err(bad(
                "forecast.retrain_hidden",
                f.retrain_hidden.to_string(),
                "must be 4 to 1024",
            ));
        }
        if !(3600..=30 * 86_400).contains(&f.holdout_s) {
            return Err(bad(
                "forecast.holdout_s",
                f.holdout_s.to_string(),
                "must be 3600 (one next-hour decision) to 2592000",
            ));
        }
        if f.min_holdout_cases == 0 {
            return Err(bad(
                "forecast.min_holdout_cases",
                "0".into(),
                "must be at least 1",
            ));
        }
        if f.sample_retain_hours == 0
            || f.sample_retain_hours.saturating_mul(3600) <= f.holdout_s
            || f.sample_retain_hours > 87_600
        {
            return Err(bad(
                "forecast.sample_retain_hours",
                f.sample_retain_hours.to_string(),
                "must keep more than forecast.holdout_s of samples, and at most 87600 (10 years)",
            ));
        }
        if f.sample_max_rows == 0 || f.forecast_max_rows == 0 {
            return Err(bad(
                "forecast.sample_max_rows",
                format!("{} / {}", f.sample_max_rows, f.forecast_max_rows),
                "sample_max_rows and forecast_max_rows must be at least 1",
            ));
        }
        if let Err(e) = self.migration.validate() {
            return Err(ConfigError::Migration {
                path: path.to_path_buf(),
                source: e,
            });
        }
        if s.enabled && s.path.as_os_str().is_empty() {
            return Err(bad(
                "store.path",
                String::new(),
                "must name a file (or set enabled = false)",
            ));
        }
        Ok(())
    }

    /// The interruption coordinator this configuration asks for (`None`:
    /// no `interrupt.capacity_mib`).
    pub fn interrupt_coordinator(&self) -> Option<crate::interrupt::CoordinatorConfig> {
        let i = &self.interrupt;
        let capacity =
            crate::interrupt::Resources::new(i.capacity_mib?, i.capacity_vcpus.unwrap_or(u64::MAX));
        let mut c = crate::interrupt::CoordinatorConfig::new(capacity);
        c.shrink_headroom_mib = i.shrink_headroom_mib;
        c.retry_after_ms = i.retry_after_ms;
        c.waiting_expiry_ms = i.waiting_expiry_ms;
        Some(c)
    }

    /// The libvirt agent this configuration asks for (`None`: only record
    /// libvirt hook calls).
    pub fn libvirt_agent(&self) -> Option<AgentConfig> {
        let l = &self.libvirt;
        if !l.act {
            return None;
        }
        let mut a = AgentConfig::system();
        a.virsh.uri = l.uri.clone();
        a.virsh.program = l.virsh.clone();
        a.run_dir = l.run_dir.clone();
        // Checked by `validate`; a list that does not parse means the defaults.
        a.cpus = l.cpus.as_deref().and_then(|c| parse_cpu_list(c).ok());
        a.sample_interval = std::time::Duration::from_millis(l.sample_interval_ms);
        a.record_file = l.record.clone();
        Some(a)
    }

    /// How a drain moves libvirt domains (`virsh` and the local URI as for
    /// the agent, whether or not it acts).
    pub fn libvirt_move(&self) -> crate::migration::LibvirtMove {
        let l = &self.libvirt;
        crate::migration::LibvirtMove {
            virsh: crate::libvirt::Virsh {
                program: l.virsh.clone(),
                uri: l.uri.clone(),
                timeout: std::time::Duration::from_secs(
                    l.migrate_timeout_s.saturating_mul(2).saturating_add(60),
                ),
            },
            migrate_uri: l.migrate_uri.clone(),
            timeout_s: l.migrate_timeout_s,
            parallel: l.migrate_parallel,
        }
    }

    /// The store policy this configuration asks for.
    pub fn store_policy(&self) -> StorePolicy {
        StorePolicy {
            retain_boots: self.store.retain_boots,
            initial_profiles: self.store.initial_profiles,
            sample_every: self.store.sample_every,
            profile: ProfileRequest {
                chunk_size: self.store.profile_chunk_kib * 1024,
                interval_ms: self.store.profile_interval_ms,
            },
            plan: PlanPolicy {
                threshold: self.plan.threshold,
                mode: self.plan.mode,
                hugepages: self.plan.hugepages,
                min_boots: self.plan.min_boots,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_section_is_checked_and_turns_the_coordinator_on() {
        assert_eq!(parse("").unwrap().interrupt_coordinator(), None);
        let c = parse("[interrupt]\ncapacity_mib = 2048\nshrink_headroom_mib = 32\n")
            .unwrap()
            .interrupt_coordinator()
            .unwrap();
        assert_eq!(c.capacity, crate::interrupt::Resources::new(2048, u64::MAX));
        assert_eq!(c.shrink_headroom_mib, 32);
        for (text, key) in [
            ("[interrupt]\ncapacity_mib = 0\n", "interrupt.capacity_mib"),
            (
                "[interrupt]\ncapacity_vcpus = 0\n",
                "interrupt.capacity_vcpus",
            ),
            (
                "[interrupt]\nretry_after_ms = 1\n",
                "interrupt.retry_after_ms",
            ),
            (
                "[interrupt]\nretry_after_ms = 500\nwaiting_expiry_ms = 100\n",
                "interrupt.waiting_expiry_ms",
            ),
        ] {
            match parse(text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("[interrupt]\ncapacity = 5\n"),
            Err(ConfigError::Parse { .. })
        ));
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn forecast_section_is_read_and_each_bad_key_is_named() {
        let c = parse(
            "[forecast]\nmodel = \"/var/lib/p/m.model\"\nretrain_interval_s = 0\nholdout_s = 7200\n",
        )
        .unwrap();
        assert_eq!(c.forecast.model, Some(PathBuf::from("/var/lib/p/m.model")));
        assert_eq!(c.forecast.retrain_interval_s, 0);
        assert_eq!(c.forecast.holdout_s, 7200);
        for (text, key) in [
            ("[forecast]\nmodel = \"\"\n", "forecast.model"),
            ("[forecast]\nmin_outcomes = 0\n", "forecast.min_outcomes"),
            (
                "[forecast]\nretrain_interval_s = 2592001\n",
                "forecast.retrain_interval_s",
            ),
            (
                "[forecast]\nretrain_max_samples = 10\n",
                "forecast.retrain_max_samples",
            ),
            (
                "[forecast]\nretrain_max_seconds = 0.5\n",
                "forecast.retrain_max_seconds",
            ),
            (
                "[forecast]\nretrain_epochs = 0\n",
                "forecast.retrain_epochs",
            ),
            (
                "[forecast]\nretrain_hidden = 2\n",
                "forecast.retrain_hidden",
            ),
            (
                "[forecast]\nretrain_cpu_share = 0\n",
                "forecast.retrain_cpu_share",
            ),
            ("[forecast]\nholdout_s = 60\n", "forecast.holdout_s"),
            (
                "[forecast]\nmin_holdout_cases = 0\n",
                "forecast.min_holdout_cases",
            ),
            (
                "[forecast]\nsample_retain_hours = 6\nholdout_s = 21600\n",
                "forecast.sample_retain_hours",
            ),
            (
                "[forecast]\nsample_retain_hours = 9000000000000000000\n",
                "forecast.sample_retain_hours",
            ),
            (
                "[forecast]\nsample_max_rows = 0\n",
                "forecast.sample_max_rows",
            ),
        ] {
            match parse(text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("[forecast]\nmodels = \"x\"\n"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn balloon_section_names_the_forecasts_and_rejects_typos() {
        let c = parse("[balloon]\nforecasts = \"/etc/f.json\"\n").unwrap();
        assert_eq!(c.balloon.forecasts, Some(PathBuf::from("/etc/f.json")));
        assert!(parse("[balloon]\nforecast = \"/etc/f.json\"\n").is_err());
    }

    #[test]
    fn pool_and_allocator_sections_are_read_and_checked() {
        let c = parse(
            r#"
            [pool]
            cpus = 8
            memory_mib = 16384
            net_mbps = 10000
            gpus = 2
            reserved_cpus = 1.5
            reserved_memory_mib = 2048
            cpu_overcommit = 2.0
            [allocator]
            quantile = 0.99
            on_shortfall = "boot-lazily"
            [[allocator.class]]
            name = "batch"
            vm_prefix = "batch-"
            quantile = 0.5
            gpus = 1
            "#,
        )
        .unwrap();
        let pool = c.pool.build().unwrap();
        assert_eq!(pool.capacity().cpu_millis, 13_000);
        assert_eq!(pool.capacity().memory_mib, 14_336);
        assert_eq!(pool.capacity().gpus, 2);
        let p = c.allocator.policy();
        assert_eq!(p.on_shortfall, ShortfallAction::BootLazily);
        assert_eq!(p.class_of("batch-1", "x").unwrap().quantile, Some(0.5));
        // Probed when not given.
        let probed = Config::default().pool.build().unwrap();
        assert!(probed.total().cpu_millis >= 1000 && probed.total().memory_mib > 0);
        for (text, key) in [
            ("[pool]\ncpu_overcommit = 0\n", "pool.cpu_overcommit"),
            ("[pool]\nreserved_cpus = -1\n", "pool.reserved_cpus"),
            ("[pool]\ncpus = 0\n", "pool.cpus"),
            ("[allocator]\nquantile = 1.5\n", "allocator.quantile"),
            ("[allocator]\nmin_samples = 0\n", "allocator.min_samples"),
            (
                "[allocator]\nmin_samples = 5\nmodel_min_samples = 4\n",
                "allocator.model_min_samples",
            ),
            ("[[allocator.class]]\nname = \"x\"\n", "allocator.class"),
            (
                "[[allocator.class]]\nname = \"x\"\nvm_prefix = \"x\"\nquantile = 0\n",
                "allocator.class.quantile",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = parse("[allocator]\non_shortfall = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("maybe") || e.contains("unknown variant"), "{e}");
        let e = parse("[[allocator.class]]\nname = \"x\"\nvm_prefx = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vm_prefx"), "{e}");
    }

    #[test]
    fn shaping_section_is_read_and_checked() {
        let c = parse(
            "[shaping]\ninterval_s = 15\npolicy = \"favour-high-priority\"\nlambda = 2.5\n[shaping.limits]\nmemory_granule_mib = 256\n",
        )
        .unwrap();
        assert_eq!(c.shaping.interval_s, 15);
        assert_eq!(
            c.shaping.policy,
            crate::shaping::ShapePolicy::FavourHighPriority
        );
        assert_eq!(c.shaping.limits.memory_granule_mib, 256);
        assert_eq!(parse("").unwrap().shaping.interval_s, 0);
        for text in [
            "[shaping]\npolicy = \"fastest\"\n",
            "[shaping]\nintervals = 3\n",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
        let e = vmm_hooks::error_chain(&parse("[shaping]\nlambda = -1\n").unwrap_err());
        assert!(e.contains("shaping.lambda"), "{e}");
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.store_policy(), StorePolicy::default());
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let c = parse(include_str!("../deploy/prescient.toml")).unwrap();
        assert!(c.daemon.metrics_listen.is_some());
        assert_eq!(c.store_policy(), StorePolicy::default());
        assert_eq!(c.pool, PoolSection::default());
        assert_eq!(c.allocator, AllocatorSection::default());
        // The documented [forecast] values are the defaults.
        assert_eq!(c.forecast, crate::online::ForecastConfig::default());
    }

    #[test]
    fn a_full_file_is_read() {
        let c = parse(
            r#"
            [daemon]
            socket = "/tmp/x.sock"
            allow_uids = [1000]
            metrics_listen = "127.0.0.1:9464"
            [store]
            path = "/tmp/s.db"
            profile_chunk_kib = 4
            sample_every = 0
            [plan]
            threshold = 0.75
            mode = "before"
            hugepages = true
            "#,
        )
        .unwrap();
        assert_eq!(c.daemon.allow_uids, vec![1000]);
        assert_eq!(c.daemon.metrics_listen.unwrap().port(), 9464);
        let p = c.store_policy();
        assert_eq!(p.profile.chunk_size, 4096);
        assert_eq!(p.plan.mode, PrefaultMode::Before);
        assert!(p.plan.hugepages);
    }

    #[test]
    fn libvirt_section_becomes_the_agent_config() {
        let c = parse(
            "[libvirt]\nuri = \"qemu:///system?socket=/tmp/s\"\ncpus = \"1,3\"\nsample_interval_ms = 500\nrecord = \"/tmp/r.jsonl\"\n",
        )
        .unwrap();
        let a = c.libvirt_agent().unwrap();
        assert_eq!(a.virsh.uri, "qemu:///system?socket=/tmp/s");
        assert_eq!(a.cpus, Some(vec![1, 3]));
        assert_eq!(a.sample_interval.as_millis(), 500);
        assert_eq!(a.record_file.as_deref(), Some(Path::new("/tmp/r.jsonl")));
        assert!(
            parse("[libvirt]\nact = false\n")
                .unwrap()
                .libvirt_agent()
                .is_none()
        );
        assert!(Config::default().libvirt_agent().is_some());
        let m = parse("[libvirt]\nvirsh = \"/v\"\nmigrate_uri = \"qemu+tcp://{host}:16510/system\"\nmigrate_timeout_s = 30\nmigrate_parallel = 2\n")
            .unwrap()
            .libvirt_move();
        assert_eq!(
            m.migrate_uri.as_deref(),
            Some("qemu+tcp://{host}:16510/system")
        );
        assert_eq!((m.timeout_s, m.parallel), (30, 2));
        assert_eq!(m.virsh.program, Path::new("/v"));
        assert_eq!(m.virsh.timeout.as_secs(), 120);
        assert_eq!(Config::default().libvirt_move().migrate_uri, None);
    }

    #[test]
    fn typos_bad_types_and_bad_values_are_rejected_with_the_key() {
        let e = parse("[plan]\nthreshhold = 0.5\n").unwrap_err().to_string();
        assert!(e.contains("threshhold"), "{e}");
        let e = parse("[plan]\nmode = \"eager\"\n").unwrap_err().to_string();
        assert!(e.contains("eager") || e.contains("unknown variant"), "{e}");
        let e = parse("[store]\nretain_boots = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("retain_boots") || e.contains("invalid type"),
            "{e}"
        );
        for (text, key) in [
            ("[plan]\nthreshold = 0\n", "plan.threshold"),
            ("[plan]\nthreshold = 1.5\n", "plan.threshold"),
            (
                "[store]\nprofile_chunk_kib = 3\n",
                "store.profile_chunk_kib",
            ),
            (
                "[store]\nprofile_interval_ms = 0\n",
                "store.profile_interval_ms",
            ),
            ("[store]\nretain_boots = 0\n", "store.retain_boots"),
            ("[daemon]\nsocket = \"\"\n", "daemon.socket"),
            ("[libvirt]\ncpus = \"3-1\"\n", "libvirt.cpus"),
            (
                "[libvirt]\nsample_interval_ms = 5\n",
                "libvirt.sample_interval_ms",
            ),
            ("[libvirt]\nuri = \"\"\n", "libvirt.uri"),
            (
                "[libvirt]\nmigrate_uri = \"qemu+tcp://fixed/system\"\n",
                "libvirt.migrate_uri",
            ),
            (
                "[libvirt]\nmigrate_uri = \"qemu+tcp://{host} /system\"\n",
                "libvirt.migrate_uri",
            ),
            (
                "[libvirt]\nmigrate_timeout_s = 1\n",
                "libvirt.migrate_timeout_s",
            ),
            (
                "[libvirt]\nmigrate_parallel = 3\n",
                "libvirt.migrate_parallel",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = parse("[daemon]\nmetrics_listen = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics_listen") || e.contains("invalid"), "{e}");
    }
}
