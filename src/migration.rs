//! Live migration, the companion's part: when to move a VM, where, and
//! with what downtime budget; `prescient host drain`; and, on the receiving
//! host, starting a labvm that waits for the VM.
//!
//! The moving itself is labvm's (`vmm/src/migrate.rs`, protocol in
//! `rdma::proto`). The companion speaks to it through the hooks protocol
//! (see `vmm_hooks::proto`, "Live migration"): labvm reports each running
//! VM's run status (`poll`, or `run` in `balloon` events) with its resident
//! memory and, now and then, its measured dirty rate; the companion answers
//! one of them with `migrate {to, downtime_ms}`; labvm reports `migrate`
//! started, then completed (and stops) or aborted (and runs on here).
//!
//! Between companions: the source asks the destination companion's
//! migration listener (`[migration] listen`) for a slot with one JSON line,
//! [`SlotRequest`]; the destination checks its pool, starts
//! `labvm --incoming ADDR:0 --hooks-socket ITS_SOCKET --vm-id ID`, and
//! answers [`SlotAnswer`] with the address that labvm listens on.
//!
//! When to move:
//! - `prescient host drain --to HOST:PORT…` (before an OS update): every
//!   VM that can migrate, each to the next destination in turn; a VM that
//!   reports in while the drain holds (one that was not known when it
//!   began, or any VM after a restart) is moved the same way, once per
//!   drain.
//! - Predicted overload (`[migration] destinations` set): when the VMs'
//!   forecast resident memory (the `quantile` of each VM's last `window`
//!   samples: the previous-window percentile forecaster) exceeds
//!   `overload_share` of the pool's memory capacity, the VM that relieves
//!   the overload with the smallest predicted downtime moves ([`choose_move`]).
//!
//! The downtime budget comes from the forecast dirty rate R (the same
//! quantile of the VM's measured rates) and the bandwidth B: pre-copy
//! rounds shrink the dirty set geometrically (by R/B a round) down to what
//! the guest dirties in the shortest round, `round_floor_ms`; the budget is
//! twice `switch_ms` plus that residue's send time, clamped to
//! `[min_downtime_ms, max_downtime_ms]` ([`downtime_budget`]). A VM that
//! dirties faster than 80 % of B does not converge and gets the maximum.
//!
//! libvirt domains move too, when `[libvirt] migrate_uri` is set: a drain
//! takes up each running domain the companion knows (from the hook's
//! calls, or the store's records after a restart) and runs `virsh -c
//! LOCAL migrate --live --p2p --persistent --undefinesource
//! --abort-on-error --timeout T --domain NAME --desturi URI` on a thread
//! of its own, at most `migrate_parallel` at once, where URI is
//! `migrate_uri` with `{host}` replaced by the host part of the drain's
//! destination ([`LibvirtMove`]). virsh's exit decides the record: moved,
//! or failed with virsh's error (libvirt keeps a domain whose migration
//! failed running on the source). Without `migrate_uri`, domains are
//! listed as unsupported, naming the key.
//!
//! A drain is durable: the daemon records it ([`DrainRecord`], JSON in the
//! store's `daemon_state` under [`DRAIN_STATE_KEY`]) before it begins and
//! removes it on `undrain`, so that a daemon restarted mid-drain (the
//! companion itself is restarted by the OS update it drains for) starts
//! cordoned and moves the VMs that report in to the recorded destinations
//! ([`Mover::resume_recorded`]). A recorded drain that cannot be read
//! leaves the host cordoned with nothing moving, and stays in the store
//! until `prescient host undrain`: a host whose operator asked it to be
//! emptied must not start taking VMs again because a record was damaged.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_hooks::{Event, EventKind, HookReply, MigrateOutcome, MigratePhase, RunStatus};

/// Version of the slot request between companions.
pub const SLOT_VERSION: u32 = 1;

/// Longest slot request or answer line, in bytes.
const MAX_LINE: u64 = 4096;

/// Largest VM a slot request may ask for, MiB (16 TiB).
const MAX_SLOT_RAM_MIB: u64 = 16 << 20;

/// Most vCPUs a slot request may ask for.
const MAX_SLOT_VCPUS: u32 = 1024;

/// A 4 KiB page, in bytes.
const PAGE_BYTES: f64 = 4096.0;

/// Key in the store's `daemon_state` under which a drain in force is
/// recorded ([`DrainRecord`] as JSON).
pub const DRAIN_STATE_KEY: &str = "drain";

/// Version of [`DrainRecord`].
pub const DRAIN_VERSION: u32 = 1;

/// Longest destination (`HOST:PORT`) a drain takes.
const MAX_DESTINATION_LEN: usize = 256;

/// Most destinations a drain takes.
const MAX_DESTINATIONS: usize = 64;

/// What can go wrong moving VMs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The destination companion could not be reached.
    #[error("cannot reach the destination companion at {addr}")]
    Connect {
        /// Its address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The destination companion refused the VM.
    #[error("the destination companion at {addr} refused: {reason}")]
    Refused {
        /// Its address.
        addr: String,
        /// What it said.
        reason: String,
    },
    /// The destination companion's answer is not a slot answer.
    #[error("bad answer from the destination companion at {addr}: {reason}")]
    BadAnswer {
        /// Its address.
        addr: String,
        /// What was wrong.
        reason: String,
    },
    /// A slot request that cannot be served.
    #[error("bad slot request: {0}")]
    BadRequest(String),
    /// A drain request, or a recorded drain, that cannot be used.
    #[error("bad drain: {0}")]
    BadDrain(String),
    /// labvm could not be started.
    #[error("cannot start {path}")]
    Spawn {
        /// The labvm binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The labvm started did not say where it listens.
    #[error("the labvm started for the VM did not listen: {0}")]
    NoListen(String),
    /// The migration listener could not be opened.
    #[error("cannot listen for migrations on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is out of range.
    #[error("migration.{key} = {value}: {reason}")]
    Config {
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
        /// What is allowed.
        reason: &'static str,
    },
}

/// `[migration]`: moving VMs between hosts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    /// Receiving side: accept slot requests from other companions here
    /// (unset: this host takes no migrations).
    pub listen: Option<SocketAddr>,
    /// The labvm binary started for each incoming VM.
    pub labvm: PathBuf,
    /// Extra arguments for that labvm (e.g. `--poll-ms 500`).
    pub labvm_args: Vec<String>,
    /// The address sources reach this host's labvms on (default: the
    /// listen address; required when that is unspecified, 0.0.0.0 or ::).
    pub advertise: Option<IpAddr>,
    /// Sending side: companions (`HOST:PORT` of their `listen`) to move
    /// VMs to when this host is predicted to be overloaded; empty: VMs
    /// move only on `prescient host drain`.
    pub destinations: Vec<String>,
    /// Predicted overload: the VMs' forecast resident memory above this
    /// share of the pool's memory capacity (0.1 to 1).
    pub overload_share: f64,
    /// Quantile of each VM's recent samples taken as its forecast.
    pub quantile: f64,
    /// Samples kept per VM (resident memory and dirty rate each).
    pub window: usize,
    /// Migration bandwidth assumed for downtime budgets, MB/s.
    pub bandwidth_mb_s: f64,
    /// Fixed cost of the switch-over (pause, vCPU and device state), ms.
    pub switch_ms: f64,
    /// Shortest pre-copy round (dirty-log read and scan), ms.
    pub round_floor_ms: f64,
    /// Smallest downtime budget, ms.
    pub min_downtime_ms: u64,
    /// Largest downtime budget, ms.
    pub max_downtime_ms: u64,
    /// Least time between two automatic moves, s.
    pub cooldown_s: u64,
    /// How long a destination companion may take to offer a slot, ms.
    pub request_timeout_ms: u64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            listen: None,
            labvm: PathBuf::from("labvm"),
            labvm_args: Vec::new(),
            advertise: None,
            destinations: Vec::new(),
            overload_share: 0.95,
            quantile: 0.9,
            window: 30,
            bandwidth_mb_s: 1000.0,
            switch_ms: 5.0,
            round_floor_ms: 10.0,
            min_downtime_ms: 20,
            max_downtime_ms: 500,
            cooldown_s: 60,
            request_timeout_ms: 15_000,
        }
    }
}

impl MigrationConfig {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), MigrationError> {
        let bad = |key, value: String, reason| MigrationError::Config { key, value, reason };
        if !(self.overload_share.is_finite() && (0.1..=1.0).contains(&self.overload_share)) {
            return Err(bad(
                "overload_share",
                self.overload_share.to_string(),
                "must be 0.1 to 1",
            ));
        }
        if !(self.quantile > 0.0 && self.quantile <= 1.0) {
            return Err(bad(
                "quantile",
                self.quantile.to_string(),
                "must be above 0 and at most 1",
            ));
        }
        if !(1..=10_000).contains(&self.window) {
            return Err(bad("window", self.window.to_string(), "must be 1 to 10000"));
        }
        for (key, v) in [
            ("bandwidth_mb_s", self.bandwidth_mb_s),
            ("switch_ms", self.switch_ms),
            ("round_floor_ms", self.round_floor_ms),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 1e7) {
                return Err(bad(key, v.to_string(), "must be above 0 and at most 1e7"));
            }
        }
        if self.min_downtime_ms == 0 || self.min_downtime_ms > self.max_downtime_ms {
            return Err(bad(
                "min_downtime_ms",
                self.min_downtime_ms.to_string(),
                "must be at least 1 and at most max_downtime_ms",
            ));
        }
        if self.max_downtime_ms > 60_000 {
            return Err(bad(
                "max_downtime_ms",
                self.max_downtime_ms.to_string(),
                "must be at most 60000",
            ));
        }
        if !(100..=600_000).contains(&self.request_timeout_ms) {
            return Err(bad(
                "request_timeout_ms",
                self.request_timeout_ms.to_string(),
                "must be 100 to 600000",
            ));
        }
        for d in &self.destinations {
            if !is_destination(d) {
                return Err(bad("destinations", d.clone(), "each must be HOST:PORT"));
            }
        }
        if let Some(l) = self.listen
            && l.ip().is_unspecified()
            && self.advertise.is_none()
        {
            return Err(bad(
                "advertise",
                String::new(),
                "must be set when listen is an unspecified address (0.0.0.0 or ::)",
            ));
        }
        if self.listen.is_some() && self.labvm.as_os_str().is_empty() {
            return Err(bad("labvm", String::new(), "must name the labvm binary"));
        }
        Ok(())
    }
}

/// A downtime budget and how it was reached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// The budget, ms.
    pub downtime_ms: u64,
    /// Whether pre-copy is expected to converge (dirty rate well under the
    /// bandwidth).
    pub converges: bool,
    /// How it was computed.
    pub why: String,
}

/// The downtime budget for a VM whose forecast dirty rate is `dirty_pps`
/// pages a second (see the module documentation).
pub fn downtime_budget(dirty_pps: Option<f64>, c: &MigrationConfig) -> Budget {
    let clamp = |ms: f64| {
        // Rounded up to whole ms; the clamp bounds it.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = ms.ceil().clamp(0.0, 1e9) as u64;
        ms.clamp(c.min_downtime_ms, c.max_downtime_ms)
    };
    let bandwidth = c.bandwidth_mb_s * 1e6;
    let Some(pps) = dirty_pps.filter(|r| r.is_finite() && *r >= 0.0) else {
        return Budget {
            downtime_ms: clamp(2.0 * c.switch_ms),
            converges: true,
            why: "no dirty rate measured yet: twice the switch-over cost".into(),
        };
    };
    let rate = pps * PAGE_BYTES;
    if rate >= 0.8 * bandwidth {
        return Budget {
            downtime_ms: c.max_downtime_ms,
            converges: false,
            why: format!(
                "dirty rate {:.0} MB/s is over 80% of the {:.0} MB/s bandwidth: pre-copy cannot converge, the largest budget",
                rate / 1e6,
                c.bandwidth_mb_s
            ),
        };
    }
    let residue = rate * c.round_floor_ms / 1e3;
    let send_ms = residue / bandwidth * 1e3;
    Budget {
        downtime_ms: clamp(2.0 * (c.switch_ms + send_ms)),
        converges: true,
        why: format!(
            "dirty rate {:.0} pages/s: {:.1} MB left after a {:.0} ms round, {:.2} ms to send, plus {:.1} ms switch-over, doubled",
            pps,
            residue / 1e6,
            c.round_floor_ms,
            send_ms,
            c.switch_ms
        ),
    }
}

/// The `q` quantile of the finite `samples` (the empirical quantile of the
/// previous-window forecaster, [`models::empirical_quantile`]; `None` when
/// there are none).
pub fn quantile(samples: impl IntoIterator<Item = f64>, q: f64) -> Option<f64> {
    let mut v: Vec<f64> = samples.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(models::empirical_quantile(&v, q.clamp(0.0, 1.0)))
}

/// A VM that could move, as the overload check sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Its id.
    pub vm: String,
    /// Forecast resident memory, MiB.
    pub resident_mib: f64,
    /// Forecast dirty rate, pages/s.
    pub dirty_pps: Option<f64>,
    /// Whether it can migrate now.
    pub movable: bool,
}

/// Whether the VMs' forecast memory overloads a host of `capacity_mib`,
/// and if so which one VM to move: of the movable VMs whose departure
/// brings the forecast under the limit, the one with the smallest
/// downtime budget (then the least memory to copy); if none is enough on
/// its own, the largest. `None`: no overload, or nothing can move.
pub fn choose_move(cands: &[Candidate], capacity_mib: f64, c: &MigrationConfig) -> Option<String> {
    let limit = capacity_mib * c.overload_share;
    let total: f64 = cands.iter().map(|v| v.resident_mib).sum();
    if total <= limit {
        return None;
    }
    let excess = total - limit;
    let movable = cands.iter().filter(|v| v.movable);
    let enough = movable
        .clone()
        .filter(|v| v.resident_mib >= excess)
        .min_by(|a, b| {
            let ka = (downtime_budget(a.dirty_pps, c).downtime_ms, a.resident_mib);
            let kb = (downtime_budget(b.dirty_pps, c).downtime_ms, b.resident_mib);
            ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
        });
    enough
        .or_else(|| movable.max_by(|a, b| a.resident_mib.total_cmp(&b.resident_mib)))
        .map(|v| v.vm.clone())
}

/// Where a move stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveState {
    /// Asking the destination companion for a slot.
    Requesting,
    /// A destination labvm waits; the order goes with the VM's next status.
    Ready,
    /// The VM was told to migrate (a libvirt domain: queued for `virsh
    /// migrate`).
    Ordered,
    /// Pre-copy runs.
    Migrating,
    /// The VM runs on the destination.
    Moved,
    /// The move failed; the VM runs on here.
    Failed,
    /// The source committed but did not hear that the destination runs
    /// the VM: the source saved its paused copy and stopped. Check the
    /// destination before restoring that copy.
    InDoubt,
    /// The VM cannot migrate (its VMM did not announce the feature, or it
    /// is a libvirt domain and `[libvirt] migrate_uri` is not set).
    Unsupported,
}

impl MoveRecord {
    /// Its state as a word.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            MoveState::Requesting => "requesting",
            MoveState::Ready => "ready",
            MoveState::Ordered => "ordered",
            MoveState::Migrating => "migrating",
            MoveState::Moved => "moved",
            MoveState::Failed => "failed",
            MoveState::InDoubt => "in-doubt",
            MoveState::Unsupported => "unsupported",
        }
    }
}

impl MoveState {
    /// Whether the move is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MoveState::Moved | MoveState::Failed | MoveState::Unsupported | MoveState::InDoubt
        )
    }
}

/// One VM's move.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveRecord {
    /// The VM.
    pub vm: String,
    /// Why it moves (`drain`, or the overload forecast).
    pub reason: String,
    /// The destination companion.
    pub destination: String,
    /// Where it stands.
    pub state: MoveState,
    /// The destination labvm's address, once known.
    #[serde(default)]
    pub addr: Option<String>,
    /// The downtime budget given.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// What labvm reported at the end.
    #[serde(default)]
    pub outcome: Option<MigrateOutcome>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// When the move began, ms since the Unix epoch.
    pub started_unix_ms: u64,
}

/// Checks a drain's destinations: one to [`MAX_DESTINATIONS`], each
/// `HOST:PORT` of a companion's `[migration] listen`.
pub fn check_destinations(destinations: &[String]) -> Result<(), MigrationError> {
    let bad = || {
        MigrationError::BadDrain(
            "a drain needs one or more destinations, each HOST:PORT of a companion's [migration] listen"
                .into(),
        )
    };
    if destinations.is_empty() || destinations.len() > MAX_DESTINATIONS {
        return Err(bad());
    }
    if !destinations.iter().all(|d| is_destination(d)) {
        return Err(bad());
    }
    Ok(())
}

/// Whether `d` is a destination companion's address: `HOST:PORT`, a
/// non-empty host and a port number, at most [`MAX_DESTINATION_LEN`]
/// bytes, no control characters.
fn is_destination(d: &str) -> bool {
    let port_ok = d
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    port_ok && d.len() <= MAX_DESTINATION_LEN && !d.chars().any(char::is_control)
}

/// A drain as the store records it (JSON in `daemon_state` under
/// [`DRAIN_STATE_KEY`]): written before the drain begins, removed by
/// `undrain`, read when the daemon starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRecord {
    /// [`DRAIN_VERSION`].
    pub version: u32,
    /// Destination companions, used in turn.
    pub destinations: Vec<String>,
    /// When the drain began, ms since the Unix epoch.
    pub since_unix_ms: u64,
}

impl DrainRecord {
    /// A drain to `destinations` (checked) that began at `since_unix_ms`.
    pub fn new(destinations: Vec<String>, since_unix_ms: u64) -> Result<Self, MigrationError> {
        check_destinations(&destinations)?;
        Ok(DrainRecord {
            version: DRAIN_VERSION,
            destinations,
            since_unix_ms,
        })
    }

    /// Parses and checks a recorded drain.
    pub fn parse(value: &str) -> Result<Self, MigrationError> {
        let r: DrainRecord = serde_json::from_str(value)
            .map_err(|e| MigrationError::BadDrain(format!("not a drain record: {e}")))?;
        if r.version != DRAIN_VERSION {
            return Err(MigrationError::BadDrain(format!(
                "drain record version {}, this companion reads {DRAIN_VERSION}",
                r.version
            )));
        }
        check_destinations(&r.destinations)?;
        Ok(r)
    }

    /// The record as the store keeps it.
    pub fn to_json(&self) -> String {
        // A struct of strings and integers always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A drain in force, as `prescient status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainStatus {
    /// Destination companions, used in turn (empty when the recorded
    /// drain was unreadable: the host is cordoned and no VM moves).
    pub destinations: Vec<String>,
    /// When the drain began, ms since the Unix epoch (`None` when the
    /// recorded drain was unreadable).
    pub since_unix_ms: Option<u64>,
    /// This daemon resumed the drain from the store when it started.
    #[serde(default)]
    pub resumed: bool,
    /// The drain is recorded in the store: a restarted daemon resumes it.
    /// False without a store, or when the write failed (see the log).
    #[serde(default)]
    pub recorded: bool,
    /// Why the recorded drain could not be read; the host is cordoned
    /// until `prescient host undrain` (or a new `prescient host drain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// How a drain moves libvirt domains (`[libvirt]` `virsh`, `uri`,
/// `migrate_uri`, `migrate_timeout_s`, `migrate_parallel`).
#[derive(Clone, Debug)]
pub struct LibvirtMove {
    /// `virsh` with the local libvirt's URI; its timeout is the hard bound
    /// of one `virsh migrate` (then the job is aborted and virsh killed).
    pub virsh: crate::libvirt::Virsh,
    /// The destination libvirt's URI, `{host}` standing for the host part
    /// of the drain's destination; `None`: domains are not moved.
    pub migrate_uri: Option<String>,
    /// `virsh migrate --timeout`: pre-copy longer than this, s, pauses the
    /// guest so that the migration finishes.
    pub timeout_s: u64,
    /// `virsh migrate` runs at once.
    pub parallel: usize,
}

/// Checks a `[libvirt] migrate_uri` template (pure).
pub fn check_migrate_uri(uri: &str) -> Result<(), &'static str> {
    if !uri.contains("{host}") {
        return Err(
            "must contain {host}, the host part of the drain's destination, e.g. qemu+tcp://{host}/system",
        );
    }
    if uri.len() > 512 || uri.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must be one word of at most 512 characters");
    }
    if !uri.contains("://") {
        return Err("must be a libvirt URI, e.g. qemu+tcp://{host}/system");
    }
    Ok(())
}

/// The destination libvirt's URI for a drain to `destination`
/// (`HOST:PORT` of a companion, checked): `template` with `{host}`
/// replaced by HOST (an IPv6 host keeps its brackets).
pub fn destination_libvirt_uri(template: &str, destination: &str) -> Option<String> {
    let (host, _) = destination.rsplit_once(':')?;
    (!host.is_empty()).then(|| template.replace("{host}", host))
}

/// Checks a libvirt domain name before it goes to `virsh` as an argument
/// (never through a shell): not empty, at most 1024 bytes, no control
/// characters.
pub fn check_domain_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 1024 {
        return Err("the domain name is empty or longer than 1024 bytes".into());
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "the domain name {name:?} contains control characters; it is not passed to virsh"
        ));
    }
    Ok(())
}

/// `virsh migrate`'s arguments (after `-c LOCAL`) for `domain` to
/// `dest_uri` (pure). The domain and URI are given as option values, so
/// that a name beginning with `-` stays a name.
pub fn virsh_migrate_args(domain: &str, dest_uri: &str, timeout_s: u64) -> Vec<String> {
    [
        "migrate",
        "--live",
        "--p2p",
        "--persistent",
        "--undefinesource",
        "--abort-on-error",
        "--timeout",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([
        timeout_s.to_string(),
        "--domain".into(),
        domain.to_string(),
        "--desturi".into(),
        dest_uri.to_string(),
    ])
    .collect()
}

/// Longest virsh error kept in a move record, characters.
const MAX_VIRSH_ERROR: usize = 600;

/// Live-migrates `domain` with virsh (blocks: run off the hook path);
/// `Err`: virsh's error, trimmed. Past the hard bound the job is aborted
/// (`virsh domjobabort`) and virsh killed.
fn migrate_domain(lm: &LibvirtMove, domain: &str, dest_uri: &str) -> Result<(), String> {
    check_domain_name(domain)?;
    let args = virsh_migrate_args(domain, dest_uri, lm.timeout_s);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    match lm.virsh.run(&refs) {
        Ok(_) => Ok(()),
        Err(e) => {
            let mut why = e.to_string();
            if matches!(e, crate::libvirt::LibvirtError::VirshTimeout { .. }) {
                let mut abort = lm.virsh.clone();
                abort.timeout = Duration::from_secs(30);
                let aborted = abort.run(&["domjobabort", "--domain", domain]);
                why = format!(
                    "{why}; the migration job was aborted ({})",
                    aborted.map_or_else(|e| e.to_string(), |_| "ok".into())
                );
            }
            let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
            Err(if why.chars().count() > MAX_VIRSH_ERROR {
                why.chars().take(MAX_VIRSH_ERROR).collect::<String>() + "…"
            } else {
                why
            })
        }
    }
}

/// What a drain started for one VM.
#[derive(Debug)]
enum Started {
    /// A labvm VM: ask this destination companion for a slot.
    Slot(String, SlotRequest),
    /// A libvirt domain: queued for `virsh migrate`.
    Libvirt,
}

/// What the companion knows of a running VM for moving it.
#[derive(Debug, Default)]
struct Track {
    vcpus: u32,
    ram_mib: u64,
    resident: VecDeque<f64>,
    dirty: VecDeque<f64>,
    /// The VMM announced the migrate feature and says it can.
    movable: bool,
}

#[derive(Debug, Default)]
struct MoverState {
    tracks: HashMap<String, Track>,
    moves: BTreeMap<String, MoveRecord>,
    last_auto: Option<Instant>,
    /// When the overload check last ran (it runs on the hook path, so at
    /// most every [`OVERLOAD_CHECK_EVERY`], not on every status event).
    last_check: Option<Instant>,
    next_destination: usize,
    /// VMs the drain in force has taken up (each gets one move per
    /// drain); emptied when a drain begins or ends.
    drained: std::collections::HashSet<String>,
    /// Running libvirt domains (from the hook's calls, and the store's
    /// records at start).
    libvirt: std::collections::HashSet<String>,
    /// libvirt domains waiting for `virsh migrate`: name and destination URI.
    libvirt_queue: VecDeque<(String, String)>,
    /// `virsh migrate` threads running.
    libvirt_running: usize,
}

/// Least time between two overload checks.
const OVERLOAD_CHECK_EVERY: Duration = Duration::from_secs(1);

impl MoverState {
    /// The next of `destinations` in turn (not empty).
    fn next_destination(&mut self, destinations: &[String]) -> String {
        let d = destinations[self.next_destination % destinations.len()].clone();
        self.next_destination = self.next_destination.wrapping_add(1);
        d
    }

    /// Records `vm`'s move off this host for the drain in force (to the
    /// next of `destinations`, or unsupported when its VMM cannot migrate
    /// it); returns where to ask for a slot, and the request, when it can
    /// move, or that a libvirt domain was queued for `virsh migrate`.
    /// A VM that has not reported its run status yet is listed as
    /// unsupported but not taken up: it moves if it reports in while the
    /// drain holds.
    fn drain_move(
        &mut self,
        vm: &str,
        destinations: &[String],
        lm: Option<&LibvirtMove>,
    ) -> Option<Started> {
        if self.libvirt.contains(vm) {
            return self.drain_domain(vm, destinations, lm);
        }
        let track = self.tracks.get(vm);
        let reported = track.is_some_and(|t| !t.resident.is_empty());
        let req = track.filter(|t| t.movable).map(|t| t.slot_request(vm));
        if reported {
            self.drained.insert(vm.to_string());
        }
        let Some(req) = req else {
            let why = if reported {
                "its VMM does not offer live migration (labvm announces migrate-1)"
            } else {
                "its VMM does not offer live migration (labvm announces migrate-1), or it has not reported its run status yet (it moves if it does while the drain holds)"
            };
            self.moves.insert(
                vm.to_string(),
                MoveRecord {
                    error: Some(why.into()),
                    ..MoveRecord::begin(vm, "drain".into(), String::new(), MoveState::Unsupported)
                },
            );
            return None;
        };
        let destination = self.next_destination(destinations);
        self.moves.insert(
            vm.to_string(),
            MoveRecord::begin(
                vm,
                "drain".into(),
                destination.clone(),
                MoveState::Requesting,
            ),
        );
        Some(Started::Slot(destination, req))
    }

    /// [`drain_move`](Self::drain_move) for a libvirt domain: queued for
    /// `virsh migrate` to the next destination's libvirt (state
    /// `ordered`, `addr` the destination URI), or unsupported without
    /// `[libvirt] migrate_uri` or with a name virsh must not be given.
    fn drain_domain(
        &mut self,
        vm: &str,
        destinations: &[String],
        lm: Option<&LibvirtMove>,
    ) -> Option<Started> {
        self.drained.insert(vm.to_string());
        let unsupported = |why: String| MoveRecord {
            error: Some(why),
            ..MoveRecord::begin(vm, "drain".into(), String::new(), MoveState::Unsupported)
        };
        let Some(template) = lm.and_then(|l| l.migrate_uri.as_deref()) else {
            self.moves.insert(
                vm.to_string(),
                unsupported(
                    "a libvirt domain: set [libvirt] migrate_uri (e.g. \"qemu+tcp://{host}/system\") for a drain to live-migrate it".into(),
                ),
            );
            return None;
        };
        if let Err(why) = check_domain_name(vm) {
            self.moves.insert(vm.to_string(), unsupported(why));
            return None;
        }
        let destination = self.next_destination(destinations);
        let Some(uri) = destination_libvirt_uri(template, &destination) else {
            self.moves.insert(
                vm.to_string(),
                unsupported(format!("no host in the destination {destination:?}")),
            );
            return None;
        };
        self.moves.insert(
            vm.to_string(),
            MoveRecord {
                addr: Some(uri.clone()),
                ..MoveRecord::begin(vm, "drain".into(), destination, MoveState::Ordered)
            },
        );
        self.libvirt_queue.push_back((vm.to_string(), uri));
        Some(Started::Libvirt)
    }
}

impl Track {
    /// The slot request for this VM.
    fn slot_request(&self, vm: &str) -> SlotRequest {
        SlotRequest {
            version: SLOT_VERSION,
            vm_id: vm.to_string(),
            ram_mib: self.ram_mib,
            vcpus: self.vcpus.max(1),
        }
    }
}

impl MoveRecord {
    /// A move of `vm` that begins now.
    fn begin(vm: &str, reason: String, destination: String, state: MoveState) -> Self {
        MoveRecord {
            vm: vm.to_string(),
            reason,
            destination,
            state,
            addr: None,
            budget: None,
            outcome: None,
            error: None,
            started_unix_ms: crate::server::unix_ms(),
        }
    }
}

/// Decides and follows moves; one per companion.
#[derive(Debug)]
pub struct Mover {
    config: MigrationConfig,
    /// Memory the host's VMs may use, MiB (the pool's capacity).
    capacity_mib: Mutex<f64>,
    state: Mutex<MoverState>,
    metrics: Arc<crate::Metrics>,
    /// A drain began and was not ended: no new VMs here (boots are
    /// deferred, slot requests refused). Read on the hook path; set with
    /// `drain` held.
    draining: std::sync::atomic::AtomicBool,
    /// The drain in force.
    drain: Mutex<Option<DrainStatus>>,
    /// How libvirt domains move (`None`: they are not moved).
    libvirt: Option<LibvirtMove>,
}

/// Asks the companion at `addr` for a slot for `req`; returns the address
/// of the labvm that waits there.
pub fn request_slot(
    addr: &str,
    req: &SlotRequest,
    timeout: Duration,
) -> Result<String, MigrationError> {
    let connect = |source| MigrationError::Connect {
        addr: addr.to_string(),
        source,
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(connect)?
        .next()
        .ok_or_else(|| {
            connect(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the name has no address",
            ))
        })?;
    let mut s = TcpStream::connect_timeout(&sock, timeout).map_err(connect)?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(connect)?;
    let mut line =
        serde_json::to_vec(req).map_err(|e| MigrationError::BadRequest(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).map_err(connect)?;
    let mut answer = String::new();
    BufReader::new(s.take(MAX_LINE))
        .read_line(&mut answer)
        .map_err(connect)?;
    let bad = |reason: String| MigrationError::BadAnswer {
        addr: addr.to_string(),
        reason,
    };
    let a: SlotAnswer = serde_json::from_str(answer.trim_end()).map_err(|e| {
        bad(format!(
            "{e} in {:?}",
            answer.chars().take(80).collect::<String>()
        ))
    })?;
    match (a.ok, a.addr, a.error) {
        (true, Some(to), _) if to.parse::<SocketAddr>().is_ok() => Ok(to),
        (true, other, _) => Err(bad(format!("no usable address: {other:?}"))),
        (false, _, e) => Err(MigrationError::Refused {
            addr: addr.to_string(),
            reason: e.unwrap_or_else(|| "no reason given".into()),
        }),
    }
}

impl Mover {
    /// A mover with `config` (validated) for a pool of `capacity_mib`.
    pub fn new(
        config: MigrationConfig,
        capacity_mib: f64,
        metrics: Arc<crate::Metrics>,
    ) -> Result<Self, MigrationError> {
        config.validate()?;
        Ok(Mover {
            config,
            capacity_mib: Mutex::new(capacity_mib),
            state: Mutex::new(MoverState::default()),
            metrics,
            draining: std::sync::atomic::AtomicBool::new(false),
            drain: Mutex::new(None),
            libvirt: None,
        })
    }

    /// The mover, moving libvirt domains as `lm` says on a drain.
    #[must_use]
    pub fn with_libvirt(mut self, lm: LibvirtMove) -> Self {
        self.libvirt = Some(lm);
        self
    }

    /// Notes running libvirt domains that the hook did not announce to
    /// this daemon (the store's records at start; the pool's records
    /// before a drain). `take_up`: while a drain holds, each moves as a
    /// domain reporting in does.
    pub fn know_libvirt(self: &Arc<Self>, names: &[String], take_up: bool) {
        {
            let mut st = self.lock();
            st.libvirt.extend(names.iter().cloned());
        }
        if take_up {
            for n in names {
                self.drain_arrival(n);
            }
        }
    }

    /// Follows a libvirt hook call: the domain runs (`started`,
    /// `reconnect`, `attach`: while a drain holds it moves), or is gone.
    fn libvirt_call(self: &Arc<Self>, vm: &str, op: vmm_hooks::LibvirtOperation) {
        use vmm_hooks::LibvirtOperation as Op;
        match op {
            Op::Start | Op::Started | Op::Reconnect | Op::Attach => {
                self.lock().libvirt.insert(vm.to_string());
                if op != Op::Start {
                    self.drain_arrival(vm);
                }
            }
            op if op.vm_gone() => {
                let mut st = self.lock();
                st.libvirt.remove(vm);
                // Queued and not begun: it will not move. (Once virsh
                // runs, its exit decides: the source domain stops when
                // the migration completes.)
                let queued = st.libvirt_queue.iter().any(|(n, _)| n == vm);
                st.libvirt_queue.retain(|(n, _)| n != vm);
                if let Some(m) = st.moves.get_mut(vm)
                    && queued
                    && m.state == MoveState::Ordered
                {
                    m.state = MoveState::Failed;
                    m.error = Some("the domain stopped before it moved".into());
                    crate::Metrics::inc(&self.metrics.migrations, "failed");
                }
            }
            _ => {}
        }
    }

    /// Starts `virsh migrate` threads for queued domains, up to
    /// `migrate_parallel` at once.
    fn pump_libvirt(self: &Arc<Self>) {
        let Some(lm) = self.libvirt.clone() else {
            return;
        };
        loop {
            {
                let mut st = self.lock();
                if st.libvirt_running >= lm.parallel.max(1) || st.libvirt_queue.is_empty() {
                    return;
                }
                st.libvirt_running += 1;
            }
            let me = Arc::clone(self);
            let lm = lm.clone();
            let spawned = std::thread::Builder::new()
                .name("prescient-virsh-migrate".into())
                .spawn(move || me.libvirt_worker(&lm));
            if let Err(e) = spawned {
                tracing::error!("cannot start a virsh migrate thread: {e}");
                self.lock().libvirt_running -= 1;
                return;
            }
        }
    }

    /// One `virsh migrate` thread: migrates queued domains one at a time
    /// until the queue is empty.
    fn libvirt_worker(&self, lm: &LibvirtMove) {
        loop {
            let (vm, uri) = {
                let mut st = self.lock();
                let Some((vm, uri)) = st.libvirt_queue.pop_front() else {
                    st.libvirt_running -= 1;
                    return;
                };
                match st.moves.get_mut(&vm) {
                    Some(m) if m.state == MoveState::Ordered => m.state = MoveState::Migrating,
                    _ => continue,
                }
                (vm, uri)
            };
            tracing::info!(
                vm,
                to = uri,
                "live-migrating a libvirt domain (virsh migrate)"
            );
            let r = migrate_domain(lm, &vm, &uri);
            let mut st = self.lock();
            let Some(m) = st.moves.get_mut(&vm) else {
                continue;
            };
            match r {
                Ok(()) => {
                    m.state = MoveState::Moved;
                    crate::Metrics::inc(&self.metrics.migrations, "moved");
                    tracing::info!(vm, to = uri, "libvirt domain moved");
                }
                Err(why) => {
                    tracing::warn!(vm, to = uri, "libvirt domain did not move: {why}");
                    m.state = MoveState::Failed;
                    m.error = Some(why);
                    crate::Metrics::inc(&self.metrics.migrations, "failed");
                }
            }
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &MigrationConfig {
        &self.config
    }

    /// Sets the memory capacity the overload check compares with.
    pub fn set_capacity_mib(&self, mib: f64) {
        *self
            .capacity_mib
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = mib;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MoverState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the host is draining (see [`drain`](Self::drain)).
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lock_drain(&self) -> std::sync::MutexGuard<'_, Option<DrainStatus>> {
        self.drain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts `drain` in force (`None`: none).
    fn set_drain(&self, drain: Option<DrainStatus>) -> Option<DrainStatus> {
        let mut d = self.lock_drain();
        self.draining
            .store(drain.is_some(), std::sync::atomic::Ordering::SeqCst);
        std::mem::replace(&mut *d, drain)
    }

    /// The drain in force, if any.
    pub fn drain_status(&self) -> Option<DrainStatus> {
        self.lock_drain().clone()
    }

    /// Ends a drain: the host takes new VMs again. (The caller removes
    /// the store's record first.) Moves under way go on.
    pub fn undrain(&self) {
        self.lock().drained.clear();
        if self.set_drain(None).is_some() {
            tracing::info!("drain ended: this host takes new VMs again");
        }
    }

    /// At start: puts the drain recorded in the store (`value`, JSON of a
    /// [`DrainRecord`]) back in force. A readable record resumes the
    /// drain: the host is cordoned, and each VM that reports in moves to
    /// the recorded destinations as during the drain. An unreadable one
    /// cordons the host with nothing moving (the safer state for a host
    /// its operator asked to empty) and is left in the store for the
    /// operator; `prescient host undrain` ends it. Logs one line either way.
    pub fn resume_recorded(&self, value: &str) {
        match DrainRecord::parse(value) {
            Ok(r) => {
                tracing::info!(
                    since_unix_ms = r.since_unix_ms,
                    "resuming drain begun at {} to {}: this host takes no new VMs, and VMs move off as they report in (prescient host undrain ends it)",
                    crate::status::utc_text(r.since_unix_ms),
                    r.destinations.join(", ")
                );
                self.set_drain(Some(DrainStatus {
                    destinations: r.destinations,
                    since_unix_ms: Some(r.since_unix_ms),
                    resumed: true,
                    recorded: true,
                    unreadable: None,
                }));
            }
            Err(e) => {
                let why = e.to_string();
                tracing::error!(
                    value = value.chars().take(200).collect::<String>(),
                    "the drain recorded in the store is unreadable ({why}): this host stays CORDONED (it takes no new VMs) but moves no VM; the record is left in the store; prescient host undrain ends the cordon, prescient host drain --to HOST:PORT starts a new drain"
                );
                self.set_drain(Some(DrainStatus {
                    destinations: Vec::new(),
                    since_unix_ms: None,
                    resumed: true,
                    recorded: true,
                    unreadable: Some(why),
                }));
            }
        }
    }

    /// Every move so far (the latest per VM).
    pub fn moves(&self) -> Vec<MoveRecord> {
        self.lock().moves.values().cloned().collect()
    }

    /// Sees one event of a VM whose VMM can (`can_migrate`) or cannot
    /// migrate; returns the reply, turned into a `migrate` order when one
    /// is due for this VM and nothing else was answered.
    pub fn observe(
        self: &Arc<Self>,
        event: &Event,
        can_migrate: bool,
        reply: HookReply,
    ) -> HookReply {
        let vm = &event.vm.vm_id;
        let status = match &event.kind {
            EventKind::Created { spec } => {
                let mut st = self.lock();
                let t = st.tracks.entry(vm.clone()).or_default();
                t.vcpus = spec.vcpus;
                t.ram_mib = spec.memory_mib;
                return reply;
            }
            EventKind::Poll(s) => Some(s),
            EventKind::Balloon(b) => b.run.as_ref(),
            EventKind::Migrate { phase, outcome, .. } => {
                self.migrate_event(vm, *phase, outcome.clone());
                return reply;
            }
            EventKind::Libvirt(call) => {
                self.libvirt_call(vm, call.operation);
                return reply;
            }
            EventKind::Stopped { .. } => {
                let mut st = self.lock();
                st.tracks.remove(vm);
                if let Some(m) = st.moves.get_mut(vm)
                    && !m.state.is_final()
                {
                    m.state = MoveState::Failed;
                    m.error = Some("the VM stopped before it moved".into());
                    crate::Metrics::inc(&self.metrics.migrations, "failed");
                }
                return reply;
            }
            _ => None,
        };
        let Some(status) = status else {
            return reply;
        };
        self.sample(vm, status, can_migrate);
        self.drain_arrival(vm);
        if !can_migrate || !matches!(reply, HookReply::Ack) {
            return reply;
        }
        self.maybe_auto();
        let mut st = self.lock();
        let forecast = st
            .tracks
            .get(vm)
            .and_then(|t| quantile(t.dirty.iter().copied(), self.config.quantile));
        let Some(m) = st.moves.get_mut(vm).filter(|m| m.state == MoveState::Ready) else {
            return reply;
        };
        let Some(to) = m.addr.clone() else {
            return reply;
        };
        let budget = downtime_budget(forecast, &self.config);
        tracing::info!(
            vm,
            to,
            downtime_ms = budget.downtime_ms,
            why = budget.why,
            reason = m.reason,
            "ordering a live migration"
        );
        m.state = MoveState::Ordered;
        let reply = HookReply::Migrate {
            to,
            downtime_ms: budget.downtime_ms,
            reason: m.reason.clone(),
        };
        m.budget = Some(budget);
        crate::Metrics::inc(&self.metrics.migrations, "ordered");
        reply
    }

    fn sample(&self, vm: &str, s: &RunStatus, can_migrate: bool) {
        let window = self.config.window;
        let mut st = self.lock();
        let t = st.tracks.entry(vm.to_string()).or_default();
        if t.ram_mib == 0 {
            t.ram_mib = s.ram_mib;
        }
        t.movable = can_migrate && s.migratable;
        #[allow(clippy::cast_precision_loss)]
        t.resident.push_back(s.resident_mib as f64);
        if let Some(d) = s.dirty_pages_per_s.filter(|d| d.is_finite() && *d >= 0.0) {
            t.dirty.push_back(d);
        }
        while t.resident.len() > window {
            t.resident.pop_front();
        }
        while t.dirty.len() > window {
            t.dirty.pop_front();
        }
    }

    fn migrate_event(&self, vm: &str, phase: MigratePhase, outcome: Option<MigrateOutcome>) {
        let mut st = self.lock();
        let Some(m) = st.moves.get_mut(vm) else {
            // A migration the companion did not order (labvm --migrate-to).
            tracing::info!(vm, ?phase, "live migration (not ordered here)");
            return;
        };
        match phase {
            MigratePhase::Started => m.state = MoveState::Migrating,
            MigratePhase::Completed => {
                m.state = MoveState::Moved;
                crate::Metrics::inc(&self.metrics.migrations, "moved");
            }
            MigratePhase::InDoubt => {
                m.state = MoveState::InDoubt;
                m.error = outcome.as_ref().and_then(|o| o.error.clone());
                crate::Metrics::inc(&self.metrics.migrations, "in-doubt");
                tracing::error!(
                    vm,
                    error = ?m.error,
                    "live migration IN DOUBT: the source saved its paused copy; check the destination before restoring it"
                );
            }
            _ => {
                m.state = MoveState::Failed;
                m.error = outcome
                    .as_ref()
                    .and_then(|o| o.error.clone())
                    .or_else(|| Some("the VMM aborted the migration".into()));
                crate::Metrics::inc(&self.metrics.migrations, "failed");
            }
        }
        if outcome.is_some() {
            m.outcome = outcome;
        }
        tracing::info!(vm, state = ?m.state, error = ?m.error, "live migration");
    }

    /// Moves every VM that can migrate to `drain`'s destinations in turn
    /// (VMs in `known` that cannot are listed as unsupported; VMs that
    /// report in later move as they do), and keeps new VMs off this host
    /// until [`undrain`](Self::undrain). `recorded`: the caller wrote
    /// `drain` to the store. Returns at once; progress is in
    /// [`moves`](Self::moves).
    pub fn drain(
        self: &Arc<Self>,
        drain: &DrainRecord,
        recorded: bool,
        known: &[String],
    ) -> Vec<MoveRecord> {
        let destinations = &drain.destinations;
        if destinations.is_empty() {
            return self.moves();
        }
        let mut started = Vec::new();
        {
            // The mover's lock around the switch: a VM reporting in now
            // is either taken up below or sees the new drain.
            let mut st = self.lock();
            self.set_drain(Some(DrainStatus {
                destinations: destinations.clone(),
                since_unix_ms: Some(drain.since_unix_ms),
                resumed: false,
                recorded,
                unreadable: None,
            }));
            st.drained.clear();
            let mut ids: Vec<String> = known.to_vec();
            ids.extend(st.tracks.keys().cloned());
            ids.extend(st.libvirt.iter().cloned());
            ids.sort();
            ids.dedup();
            for vm in ids {
                if st.moves.get(&vm).is_some_and(|m| !m.state.is_final()) {
                    st.drained.insert(vm);
                    continue;
                }
                started.extend(st.drain_move(&vm, destinations, self.libvirt.as_ref()));
            }
            prune(&mut st.moves);
        }
        tracing::info!(
            vms = started.len(),
            ?destinations,
            recorded,
            "draining this host"
        );
        for s in started {
            self.start(s);
        }
        self.moves()
    }

    /// While a drain holds: a VM that reports its status and was not
    /// taken up by this drain yet (it was not known when the drain began,
    /// or the daemon resumed the drain after a restart) moves as the
    /// drain's VMs do. Once per VM per drain: a failed move is not retried
    /// until the next drain (or restart).
    fn drain_arrival(self: &Arc<Self>, vm: &str) {
        if !self.draining() {
            return;
        }
        let started = {
            let mut st = self.lock();
            if st.drained.contains(vm) {
                return;
            }
            let Some(destinations) = self
                .lock_drain()
                .as_ref()
                .map(|d| d.destinations.clone())
                .filter(|d| !d.is_empty())
            else {
                return;
            };
            if st.moves.get(vm).is_some_and(|m| !m.state.is_final()) {
                st.drained.insert(vm.to_string());
                return;
            }
            let started = st.drain_move(vm, &destinations, self.libvirt.as_ref());
            prune(&mut st.moves);
            started
        };
        match started {
            Some(s) => {
                tracing::info!(vm, "draining: a VM reported in; moving it off this host");
                self.start(s);
            }
            None => tracing::info!(
                vm,
                "draining: a VM reported in whose VMM cannot migrate it; it stays"
            ),
        }
    }

    /// Follows up what a drain started: a slot request, or `virsh
    /// migrate` threads.
    fn start(self: &Arc<Self>, s: Started) {
        match s {
            Started::Slot(destination, req) => self.request(destination, req),
            Started::Libvirt => {
                crate::Metrics::inc(&self.metrics.migrations, "ordered");
                self.pump_libvirt();
            }
        }
    }

    /// Asks `destination` for a slot on a thread of its own (never on the
    /// hook path); the order goes out with the VM's next status.
    fn request(self: &Arc<Self>, destination: String, req: SlotRequest) {
        let me = Arc::clone(self);
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let spawned = std::thread::Builder::new()
            .name("prescient-slot".into())
            .spawn(move || {
                let r = request_slot(&destination, &req, timeout);
                let mut st = me.lock();
                let Some(m) = st.moves.get_mut(&req.vm_id) else {
                    return;
                };
                if m.state != MoveState::Requesting {
                    return;
                }
                match r {
                    Ok(addr) => {
                        tracing::info!(vm = req.vm_id, destination, addr, "slot offered");
                        m.addr = Some(addr);
                        m.state = MoveState::Ready;
                    }
                    Err(e) => {
                        let msg = vmm_hooks::error_chain(&e);
                        tracing::warn!(vm = req.vm_id, destination, "no slot: {msg}");
                        m.state = MoveState::Failed;
                        m.error = Some(msg);
                        crate::Metrics::inc(&me.metrics.migrations, "failed");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a slot request thread: {e}");
        }
    }

    /// The overload check: only with destinations configured, at most
    /// every [`OVERLOAD_CHECK_EVERY`], a move at most once a cooldown and
    /// only while nothing else moves.
    fn maybe_auto(self: &Arc<Self>) {
        if self.config.destinations.is_empty() {
            return;
        }
        let capacity = *self
            .capacity_mib
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (destination, req, cands_len) = {
            let mut st = self.lock();
            if st
                .last_check
                .is_some_and(|t| t.elapsed() < OVERLOAD_CHECK_EVERY)
            {
                return;
            }
            st.last_check = Some(Instant::now());
            if st.moves.values().any(|m| !m.state.is_final()) {
                return;
            }
            if st
                .last_auto
                .is_some_and(|t| t.elapsed() < Duration::from_secs(self.config.cooldown_s))
            {
                return;
            }
            let q = self.config.quantile;
            let cands: Vec<Candidate> = st
                .tracks
                .iter()
                .map(|(vm, t)| Candidate {
                    vm: vm.clone(),
                    resident_mib: quantile(t.resident.iter().copied(), q).unwrap_or(0.0),
                    dirty_pps: quantile(t.dirty.iter().copied(), q),
                    movable: t.movable,
                })
                .collect();
            let Some(vm) = choose_move(&cands, capacity, &self.config) else {
                return;
            };
            let Some(t) = st.tracks.get(&vm) else {
                return;
            };
            let req = t.slot_request(&vm);
            let destination = st.next_destination(&self.config.destinations);
            st.last_auto = Some(Instant::now());
            let forecast: f64 = cands.iter().map(|c| c.resident_mib).sum();
            let reason = format!(
                "predicted overload: {forecast:.0} MiB forecast (p{:.0}) over {:.0}% of {capacity:.0} MiB",
                q * 100.0,
                self.config.overload_share * 100.0
            );
            st.moves.insert(
                vm.clone(),
                MoveRecord::begin(&vm, reason, destination.clone(), MoveState::Requesting),
            );
            (destination, req, cands.len())
        };
        tracing::info!(
            vm = req.vm_id,
            destination,
            vms = cands_len,
            "this host is predicted to be overloaded; moving a VM"
        );
        crate::Metrics::inc(&self.metrics.migrations, "auto");
        self.request(destination, req);
    }
}

/// A source companion's request for a slot (one JSON line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotRequest {
    /// [`SLOT_VERSION`].
    pub version: u32,
    /// The VM's id (kept on this host).
    pub vm_id: String,
    /// Its RAM, MiB.
    pub ram_mib: u64,
    /// Its vCPUs.
    pub vcpus: u32,
}

/// The answer (one JSON line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotAnswer {
    /// Whether a labvm waits for the VM.
    pub ok: bool,
    /// Where it listens, `HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SlotRequest {
    /// Parses and checks one request line.
    pub fn parse(line: &str) -> Result<Self, MigrationError> {
        let r: SlotRequest = serde_json::from_str(line.trim_end())
            .map_err(|e| MigrationError::BadRequest(format!("not a slot request: {e}")))?;
        if r.version != SLOT_VERSION {
            return Err(MigrationError::BadRequest(format!(
                "slot request version {}, this companion speaks {SLOT_VERSION}",
                r.version
            )));
        }
        let id_ok = !r.vm_id.is_empty()
            && r.vm_id.len() <= 128
            && r.vm_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
        if !id_ok {
            return Err(MigrationError::BadRequest(
                "vm_id must be 1 to 128 of A-Z a-z 0-9 . _ - :".into(),
            ));
        }
        // Broad bounds; the labvm started checks its own limits.
        if !(1..=MAX_SLOT_RAM_MIB).contains(&r.ram_mib) {
            return Err(MigrationError::BadRequest(format!(
                "ram_mib {} is outside 1..={MAX_SLOT_RAM_MIB}",
                r.ram_mib
            )));
        }
        if !(1..=MAX_SLOT_VCPUS).contains(&r.vcpus) {
            return Err(MigrationError::BadRequest(format!(
                "vcpus {} is outside 1..={MAX_SLOT_VCPUS}",
                r.vcpus
            )));
        }
        Ok(r)
    }
}

/// How the receiving side starts labvms.
#[derive(Clone, Debug)]
pub struct Receiver {
    /// The labvm binary.
    pub labvm: PathBuf,
    /// Extra arguments.
    pub args: Vec<String>,
    /// The address labvms listen on and sources connect to.
    pub advertise: IpAddr,
    /// This companion's hooks socket (the labvm reports there).
    pub hooks_socket: PathBuf,
    /// Started labvms that have not received their VM yet: VM id to RAM
    /// (MiB). Counted against the pool until the VM arrives and reserves
    /// for itself, and bounded ([`MAX_PENDING`]).
    pending: Arc<Mutex<HashMap<String, u64>>>,
}

/// Finished moves kept for `prescient status` (the oldest go first).
const MAX_FINISHED_MOVES: usize = 1024;

/// Drops the oldest finished moves beyond [`MAX_FINISHED_MOVES`].
fn prune(moves: &mut BTreeMap<String, MoveRecord>) {
    let finished = moves.values().filter(|m| m.state.is_final()).count();
    if finished <= MAX_FINISHED_MOVES {
        return;
    }
    let mut old: Vec<(u64, String)> = moves
        .values()
        .filter(|m| m.state.is_final())
        .map(|m| (m.started_unix_ms, m.vm.clone()))
        .collect();
    old.sort();
    for (_, vm) in old.into_iter().take(finished - MAX_FINISHED_MOVES) {
        moves.remove(&vm);
    }
}

/// Most labvms waiting for an incoming VM at once.
pub const MAX_PENDING: usize = 4;

impl Receiver {
    /// Starts `labvm` (with `args`) for incoming VMs, listening on
    /// `advertise`, reporting to `hooks_socket`.
    pub fn new(
        labvm: PathBuf,
        args: Vec<String>,
        advertise: IpAddr,
        hooks_socket: PathBuf,
    ) -> Self {
        Receiver {
            labvm,
            args,
            advertise,
            hooks_socket,
            pending: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Checks `req` with `admit` (given the RAM of the labvms still
    /// waiting) and, when it passes, counts it as waiting.
    fn claim(&self, req: &SlotRequest, admit: &SlotAdmitter) -> Result<(), String> {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.contains_key(&req.vm_id) {
            return Err(format!("a labvm already waits for VM {:?}", req.vm_id));
        }
        if pending.len() >= MAX_PENDING {
            return Err(format!(
                "{MAX_PENDING} incoming migrations are already waiting; try again later"
            ));
        }
        admit(req, pending.values().sum())?;
        pending.insert(req.vm_id.clone(), req.ram_mib);
        Ok(())
    }

    fn unclaim(pending: &Mutex<HashMap<String, u64>>, vm: &str) {
        pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(vm);
    }

    /// Starts a labvm waiting for `req`'s VM; returns where it listens.
    /// The labvm outlives this call (and the companion): it is its own
    /// process group, and a thread reaps it and logs its output.
    pub fn start(&self, req: &SlotRequest) -> Result<String, MigrationError> {
        let listen = SocketAddr::new(self.advertise, 0);
        let mut cmd = Command::new(&self.labvm);
        cmd.arg("--incoming")
            .arg(listen.to_string())
            .arg("--hooks-socket")
            .arg(&self.hooks_socket)
            .arg("--vm-id")
            .arg(&req.vm_id)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|source| MigrationError::Spawn {
            path: self.labvm.clone(),
            source,
        })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(MigrationError::NoListen("no pipes to the child".into()));
        };
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let vm = req.vm_id.clone();
        let pending = Arc::clone(&self.pending);
        let out = std::thread::Builder::new()
            .name("prescient-incoming".into())
            .spawn(move || {
                let mut sent = false;
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if !sent && let Some(a) = line.strip_prefix("incoming: listening on ") {
                        let _ = tx.send(a.trim().to_string());
                        sent = true;
                    }
                    if line.starts_with("incoming: VM received") {
                        // It reserves for itself in before-boot from now.
                        Receiver::unclaim(&pending, &vm);
                    }
                    tracing::info!(vm, "incoming labvm: {line}");
                }
                let status = child.wait();
                Receiver::unclaim(&pending, &vm);
                tracing::info!(vm, ?status, "incoming labvm exited");
            });
        let vm = req.vm_id.clone();
        let err = std::thread::Builder::new()
            .name("prescient-incoming-err".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    tracing::debug!(vm, "incoming labvm: {line}");
                }
            });
        if out.is_err() || err.is_err() {
            return Err(MigrationError::NoListen(
                "cannot start the threads that follow it".into(),
            ));
        }
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(addr) => {
                // labvm prints the address it bound; sources use the
                // advertised host with its port.
                let port = addr
                    .parse::<SocketAddr>()
                    .map_err(|e| MigrationError::NoListen(format!("{addr:?}: {e}")))?
                    .port();
                Ok(SocketAddr::new(self.advertise, port).to_string())
            }
            Err(_) => Err(MigrationError::NoListen(
                "it exited or said nothing within 10 s (see the companion's log)".into(),
            )),
        }
    }
}

/// The receiving companion's check of a slot request, given the RAM (MiB)
/// of labvms still waiting for their VMs: room in its pool, and no VM of
/// that id on the host.
pub type SlotAdmitter = Arc<dyn Fn(&SlotRequest, u64) -> Result<(), String> + Send + Sync>;

/// Serves slot requests on `listener` until `shutdown`: one request line
/// per connection, checked, then `admit` (the pool's check), then a labvm
/// started; one answer line.
pub async fn serve_slots(
    listener: tokio::net::TcpListener,
    receiver: Receiver,
    admit: SlotAdmitter,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let receiver = Arc::new(receiver);
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("migration listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let receiver = Arc::clone(&receiver);
        let admit = Arc::clone(&admit);
        tokio::spawn(async move {
            let (r, mut w) = stream.split();
            let mut line = String::new();
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::io::BufReader::new(r.take(MAX_LINE)).read_line(&mut line),
            )
            .await;
            let answer = match read {
                Ok(Ok(_)) => match SlotRequest::parse(&line) {
                    Ok(req) => match receiver.claim(&req, &admit) {
                        Ok(()) => {
                            let receiver2 = Arc::clone(&receiver);
                            let req2 = req.clone();
                            let started =
                                tokio::task::spawn_blocking(move || receiver2.start(&req2)).await;
                            if !matches!(started, Ok(Ok(_))) {
                                Receiver::unclaim(&receiver.pending, &req.vm_id);
                            }
                            match started {
                                Ok(Ok(addr)) => {
                                    tracing::info!(vm = req.vm_id, %peer, addr, "a labvm waits for an incoming VM");
                                    SlotAnswer {
                                        ok: true,
                                        addr: Some(addr),
                                        error: None,
                                    }
                                }
                                Ok(Err(e)) => refuse(&peer, vmm_hooks::error_chain(&e)),
                                Err(e) => refuse(&peer, format!("internal: {e}")),
                            }
                        }
                        Err(why) => refuse(&peer, why),
                    },
                    Err(e) => refuse(&peer, e.to_string()),
                },
                Ok(Err(e)) => refuse(&peer, format!("cannot read the request: {e}")),
                Err(_) => refuse(&peer, "no request within 10 s".into()),
            };
            let mut out = serde_json::to_vec(&answer).unwrap_or_default();
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

fn refuse(peer: &SocketAddr, why: String) -> SlotAnswer {
    tracing::warn!(%peer, "slot request refused: {why}");
    SlotAnswer {
        ok: false,
        addr: None,
        error: Some(why),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cand(vm: &str, mib: f64, pps: Option<f64>) -> Candidate {
        Candidate {
            vm: vm.into(),
            resident_mib: mib,
            dirty_pps: pps,
            movable: true,
        }
    }

    #[test]
    fn budget_grows_with_the_dirty_rate_and_refuses_to_pretend_convergence() {
        let c = MigrationConfig::default();
        let none = downtime_budget(None, &c);
        assert_eq!(none.downtime_ms, 20);
        assert!(none.converges);
        let idle = downtime_budget(Some(0.0), &c);
        assert_eq!(idle.downtime_ms, 20, "{}", idle.why);
        // 2e6 pages/s = 8.2 GB/s: far over the 1 GB/s bandwidth.
        let hot = downtime_budget(Some(2e6), &c);
        assert!(!hot.converges);
        assert_eq!(hot.downtime_ms, c.max_downtime_ms);
        // 150 000 pages/s = 614 MB/s: 6.1 MB left after a 10 ms round,
        // 6.1 ms to send, (5 + 6.1) * 2 = 22.3 -> 23 ms.
        let warm = downtime_budget(Some(150_000.0), &c);
        assert!(warm.converges);
        assert_eq!(warm.downtime_ms, 23, "{}", warm.why);
        let mut slow = c.clone();
        slow.bandwidth_mb_s = 100.0;
        // Same rate over a slower link: over 80 % of it.
        assert!(!downtime_budget(Some(20_000.0), &slow).converges);
        // Monotone in the rate while it converges.
        let mut last = 0;
        for pps in [0.0, 1e3, 1e4, 5e4, 1e5, 1.5e5, 1.9e5] {
            let b = downtime_budget(Some(pps), &c).downtime_ms;
            assert!(b >= last, "{pps}: {b} < {last}");
            last = b;
        }
        assert_eq!(downtime_budget(Some(f64::NAN), &c).downtime_ms, 20);
    }

    #[test]
    fn quantile_is_nearest_rank() {
        assert_eq!(quantile([], 0.9), None);
        assert_eq!(quantile([5.0], 0.9), Some(5.0));
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile(v.iter().copied(), 0.9), Some(9.0));
        assert_eq!(quantile(v.iter().copied(), 1.0), Some(10.0));
        assert_eq!(quantile(v.iter().copied(), 0.5), Some(5.0));
        assert_eq!(quantile([f64::NAN, 2.0], 1.0), Some(2.0));
    }

    #[test]
    fn no_move_without_a_predicted_overload() {
        let c = MigrationConfig::default();
        let vms = [cand("a", 400.0, None), cand("b", 500.0, None)];
        assert_eq!(choose_move(&vms, 1000.0, &c), None);
    }

    #[test]
    fn the_cheapest_vm_that_is_enough_moves() {
        let c = MigrationConfig::default();
        // 1200 MiB forecast on a 1000 MiB host at 95 %: 250 MiB too much.
        let vms = [
            cand("big-hot", 700.0, Some(150_000.0)),
            cand("mid-cold", 300.0, Some(100.0)),
            cand("small", 200.0, Some(10.0)),
        ];
        assert_eq!(
            choose_move(&vms, 1000.0, &c).as_deref(),
            Some("mid-cold"),
            "small is not enough; of the rest, mid-cold has the smaller budget"
        );
        // Equal budgets: the least memory to copy.
        let vms = [
            cand("a", 600.0, None),
            cand("b", 300.0, None),
            cand("c", 300.0, None),
        ];
        assert_eq!(choose_move(&vms, 1000.0, &c).as_deref(), Some("b"));
        // Nothing enough on its own: the largest movable one.
        let mut vms = vec![cand("x", 600.0, None), cand("y", 600.0, None)];
        vms.push(Candidate {
            movable: false,
            ..cand("z", 900.0, None)
        });
        assert!(matches!(
            choose_move(&vms, 500.0, &c).as_deref(),
            Some("x" | "y")
        ));
        // Nothing movable: nothing moves.
        let stuck = [Candidate {
            movable: false,
            ..cand("z", 5000.0, None)
        }];
        assert_eq!(choose_move(&stuck, 1000.0, &c), None);
    }

    #[test]
    fn slot_requests_are_checked() {
        let ok = r#"{"version":1,"vm_id":"web-1","ram_mib":256,"vcpus":2}"#;
        assert_eq!(SlotRequest::parse(ok).unwrap().vm_id, "web-1");
        for (line, says) in [
            ("garbage", "not a slot request"),
            (
                r#"{"version":2,"vm_id":"a","ram_mib":256,"vcpus":1}"#,
                "version 2",
            ),
            (
                r#"{"version":1,"vm_id":"a b","ram_mib":256,"vcpus":1}"#,
                "vm_id",
            ),
            (
                r#"{"version":1,"vm_id":"","ram_mib":256,"vcpus":1}"#,
                "vm_id",
            ),
            (
                r#"{"version":1,"vm_id":"a","ram_mib":0,"vcpus":1}"#,
                "ram_mib 0",
            ),
            (
                r#"{"version":1,"vm_id":"a","ram_mib":256,"vcpus":0}"#,
                "vcpus 0",
            ),
            (
                r#"{"version":1,"vm_id":"a","ram_mib":256,"vcpus":1,"x":1}"#,
                "unknown field",
            ),
            (
                r#"{"version":1,"vm_id":"../../x","ram_mib":256,"vcpus":1}"#,
                "vm_id",
            ),
        ] {
            let e = SlotRequest::parse(line).unwrap_err().to_string();
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    #[test]
    fn drain_records_round_trip_and_bad_ones_are_refused() {
        let r = DrainRecord::new(vec!["10.0.0.2:7790".into(), "[::1]:7790".into()], 1234).unwrap();
        assert_eq!(DrainRecord::parse(&r.to_json()).unwrap(), r);
        for (value, says) in [
            ("", "not a drain record"),
            ("{not json", "not a drain record"),
            ("[]", "not a drain record"),
            (
                r#"{"version":1,"destinations":[],"since_unix_ms":1}"#,
                "one or more destinations",
            ),
            (
                r#"{"version":1,"destinations":["nohost"],"since_unix_ms":1}"#,
                "HOST:PORT",
            ),
            (
                r#"{"version":1,"destinations":["h:99999"],"since_unix_ms":1}"#,
                "HOST:PORT",
            ),
            (
                r#"{"version":2,"destinations":["h:1"],"since_unix_ms":1}"#,
                "version 2",
            ),
            (
                r#"{"version":1,"destinations":["h:1"],"since_unix_ms":-5}"#,
                "not a drain record",
            ),
            (
                r#"{"version":1,"destinations":["h:1"],"since_unix_ms":1,"x":0}"#,
                "unknown field",
            ),
        ] {
            let e = DrainRecord::parse(value).unwrap_err().to_string();
            assert!(e.contains(says), "{value}: {e}");
        }
        assert!(DrainRecord::new(vec![":7790".into()], 1).is_err());
        assert!(DrainRecord::new(vec![format!("{}:1", "h".repeat(300))], 1).is_err());
    }

    fn mover() -> Arc<Mover> {
        Arc::new(
            Mover::new(
                MigrationConfig::default(),
                1e6,
                Arc::new(crate::Metrics::new()),
            )
            .unwrap(),
        )
    }

    fn event(vm: &str, kind: EventKind) -> Event {
        Event {
            vm: vmm_hooks::VmIdentity {
                vm_id: vm.into(),
                image_digest: "i".into(),
                package_digest: "p".into(),
            },
            seq: 0,
            at_unix_ms: 1,
            kind,
        }
    }

    fn poll(vm: &str) -> Event {
        event(
            vm,
            EventKind::Poll(RunStatus {
                ram_mib: 64,
                resident_mib: 10,
                dirty_pages_per_s: None,
                migratable: true,
            }),
        )
    }

    #[test]
    fn libvirt_migrate_uris_names_and_arguments() {
        assert!(check_migrate_uri("qemu+tcp://{host}/system").is_ok());
        assert!(check_migrate_uri("qemu+ssh://root@{host}:2222/system").is_ok());
        for bad in [
            "qemu+tcp://h/system",
            "qemu+tcp://{host}/sys tem",
            "qemu+tcp://{host}/system\n",
            "{host}",
        ] {
            assert!(check_migrate_uri(bad).is_err(), "{bad}");
        }
        let t = "qemu+tcp://{host}:16510/system";
        assert_eq!(
            destination_libvirt_uri(t, "10.0.0.7:7790").as_deref(),
            Some("qemu+tcp://10.0.0.7:16510/system")
        );
        assert_eq!(
            destination_libvirt_uri("qemu+tcp://{host}/system", "[fd00::7]:7790").as_deref(),
            Some("qemu+tcp://[fd00::7]/system")
        );
        assert_eq!(destination_libvirt_uri(t, ":7790"), None);
        assert!(check_domain_name("web-1").is_ok());
        assert!(check_domain_name("-looks-like-an-option").is_ok());
        assert!(check_domain_name("").is_err());
        assert!(check_domain_name("a\nb").unwrap_err().contains("control"));
        assert!(check_domain_name("a\u{7f}b").is_err());
        // The name and URI are option values: a leading `-` stays a name.
        assert_eq!(
            virsh_migrate_args("-x", "qemu+tcp://h/system", 30),
            [
                "migrate",
                "--live",
                "--p2p",
                "--persistent",
                "--undefinesource",
                "--abort-on-error",
                "--timeout",
                "30",
                "--domain",
                "-x",
                "--desturi",
                "qemu+tcp://h/system"
            ]
        );
    }

    fn libvirt_call(vm: &str, op: &str) -> Event {
        event(
            vm,
            EventKind::Libvirt(Box::new(vmm_hooks::LibvirtHookCall::new(
                op,
                "begin",
                "-",
                String::new(),
            ))),
        )
    }

    fn lv_move(virsh: &std::path::Path, uri: Option<&str>) -> LibvirtMove {
        LibvirtMove {
            virsh: crate::libvirt::Virsh {
                program: virsh.to_path_buf(),
                uri: "qemu:///system".into(),
                timeout: Duration::from_secs(30),
            },
            migrate_uri: uri.map(Into::into),
            timeout_s: 30,
            parallel: 1,
        }
    }

    fn wait_final(m: &Mover, vm: &str) -> MoveRecord {
        let t = Instant::now();
        loop {
            if let Some(r) = m
                .moves()
                .into_iter()
                .find(|r| r.vm == vm && r.state.is_final())
            {
                return r;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "{:?}", m.moves());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_drain_without_migrate_uri_lists_libvirt_domains_as_unsupported_naming_the_key() {
        let m = Arc::new(
            Mover::new(
                MigrationConfig::default(),
                1e6,
                Arc::new(crate::Metrics::new()),
            )
            .unwrap()
            .with_libvirt(lv_move(std::path::Path::new("virsh"), None)),
        );
        let _ = m.observe(&libvirt_call("dom", "started"), false, HookReply::Ack);
        let rec = DrainRecord::new(vec!["127.0.0.1:9".into()], 1).unwrap();
        let moves = m.drain(&rec, false, &["dom".into()]);
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].state, MoveState::Unsupported);
        assert!(
            moves[0]
                .error
                .as_deref()
                .unwrap()
                .contains("[libvirt] migrate_uri"),
            "{moves:?}"
        );
    }

    /// A real program standing in for virsh: `/bin/sh` running `body`.
    fn fake_virsh(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
        let virsh = dir.join("virsh");
        std::fs::write(&virsh, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&virsh, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        virsh
    }

    #[test]
    fn a_virsh_migrate_past_its_bound_is_killed_and_its_job_aborted() {
        // A virsh whose migrate never answers (within the test's bound)
        // and whose domjobabort succeeds; every call is recorded.
        let dir = tempfile::tempdir().unwrap();
        let virsh = fake_virsh(
            dir.path(),
            "echo \"$@\" >> \"$0.calls\"\ncase \"$*\" in *migrate*) sleep 30;; esac\nexit 0\n",
        );
        let mut lm = lv_move(&virsh, Some("qemu+tcp://{host}/system"));
        lm.virsh.timeout = Duration::from_secs(1);
        let why = migrate_domain(&lm, "dom", "qemu+tcp://10.0.0.2/system").unwrap_err();
        assert!(why.contains("no answer within 1 s; killed"), "{why}");
        assert!(why.contains("the migration job was aborted (ok)"), "{why}");
        let calls = std::fs::read_to_string(dir.path().join("virsh.calls")).unwrap();
        assert!(
            calls
                .lines()
                .last()
                .unwrap()
                .contains("domjobabort --domain dom"),
            "{calls}"
        );
    }

    #[test]
    fn a_libvirt_move_whose_virsh_fails_is_failed_with_virshs_reason() {
        // A real program that fails as virsh does (non-zero, message on
        // stderr): the record carries the message, trimmed.
        let dir = tempfile::tempdir().unwrap();
        let virsh = fake_virsh(
            dir.path(),
            "echo \"$@\" > \"$0.args\"\necho 'error: failed to connect to the hypervisor' >&2\nexit 1\n",
        );
        let metrics = Arc::new(crate::Metrics::new());
        let m = Arc::new(
            Mover::new(MigrationConfig::default(), 1e6, Arc::clone(&metrics))
                .unwrap()
                .with_libvirt(lv_move(&virsh, Some("qemu+tcp://{host}:16510/system"))),
        );
        // Known from the store at start; a drain that holds takes it up.
        let rec = DrainRecord::new(vec!["127.0.0.3:7790".into()], 1).unwrap();
        m.resume_recorded(&rec.to_json());
        m.know_libvirt(&["dom".into()], true);
        let r = wait_final(&m, "dom");
        assert_eq!(r.state, MoveState::Failed, "{r:?}");
        assert_eq!(r.addr.as_deref(), Some("qemu+tcp://127.0.0.3:16510/system"));
        assert!(
            r.error
                .as_deref()
                .unwrap()
                .contains("failed to connect to the hypervisor"),
            "{r:?}"
        );
        let args = std::fs::read_to_string(dir.path().join("virsh.args")).unwrap();
        assert!(
            args.contains("--domain dom --desturi qemu+tcp://127.0.0.3:16510/system"),
            "{args}"
        );
        // Once per drain: reporting in again does not start it over.
        let _ = m.observe(&libvirt_call("dom", "reconnect"), false, HookReply::Ack);
        assert_eq!(m.moves().len(), 1);
        assert_eq!(m.moves()[0].state, MoveState::Failed);
        // A domain that starts on the draining host is moved too; one
        // that stops while queued or before: nothing to move.
        let _ = m.observe(&libvirt_call("late", "started"), false, HookReply::Ack);
        let r = wait_final(&m, "late");
        assert_eq!(r.state, MoveState::Failed, "{r:?}");
        let text = metrics.render();
        assert!(
            text.contains(r#"prescient_migrations_total{kind="failed"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn libvirt_moves_run_one_at_a_time_and_a_domain_that_stops_while_queued_does_not_move() {
        // A virsh that waits for the test's word (bounded), records which
        // domain it was given, and fails.
        let dir = tempfile::tempdir().unwrap();
        let virsh = fake_virsh(
            dir.path(),
            "d=$(dirname \"$0\")\nfor a in \"$@\"; do echo \"$a\"; done >> \"$d/calls\"\ni=0\nwhile [ ! -e \"$d/go\" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\necho 'error: stopped by the test' >&2\nexit 1\n",
        );
        let m = Arc::new(
            Mover::new(
                MigrationConfig::default(),
                1e6,
                Arc::new(crate::Metrics::new()),
            )
            .unwrap()
            .with_libvirt(lv_move(&virsh, Some("qemu+tcp://{host}/system"))),
        );
        m.know_libvirt(&["a".into(), "b".into()], false);
        let rec = DrainRecord::new(vec!["h:1".into()], 1).unwrap();
        m.drain(&rec, false, &[]);
        let state = |vm: &str| m.moves().into_iter().find(|r| r.vm == vm).unwrap().state;
        let t = Instant::now();
        while state("a") != MoveState::Migrating {
            assert!(t.elapsed() < Duration::from_secs(30), "{:?}", m.moves());
            std::thread::sleep(Duration::from_millis(5));
        }
        // One at a time: b waits while a's virsh runs; then b stops.
        assert_eq!(state("b"), MoveState::Ordered);
        let _ = m.observe(&libvirt_call("b", "release"), false, HookReply::Ack);
        let b = wait_final(&m, "b");
        assert_eq!(b.state, MoveState::Failed);
        assert_eq!(
            b.error.as_deref(),
            Some("the domain stopped before it moved")
        );
        std::fs::write(dir.path().join("go"), "").unwrap();
        let a = wait_final(&m, "a");
        assert!(
            a.error.as_deref().unwrap().contains("stopped by the test"),
            "{a:?}"
        );
        // virsh was never run for b.
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert!(calls.lines().any(|l| l == "a"), "{calls}");
        assert!(!calls.lines().any(|l| l == "b"), "{calls}");
    }

    #[test]
    fn a_resumed_drain_moves_each_vm_that_reports_in_once_in_turn() {
        let m = mover();
        // Nothing listens on port 9 of loopback: the slot requests fail
        // (on their own threads); what is checked is who was taken up.
        let rec = DrainRecord::new(vec!["127.0.0.1:9".into(), "127.0.0.2:9".into()], 42).unwrap();
        m.resume_recorded(&rec.to_json());
        assert!(m.draining());
        let d = m.drain_status().unwrap();
        assert_eq!(d.destinations, rec.destinations);
        assert_eq!(d.since_unix_ms, Some(42));
        assert!(d.resumed && d.recorded && d.unreadable.is_none());
        for vm in ["a", "b"] {
            assert_eq!(m.observe(&poll(vm), true, HookReply::Ack), HookReply::Ack);
        }
        let moves = m.moves();
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert_eq!(moves[0].destination, "127.0.0.1:9");
        assert_eq!(moves[1].destination, "127.0.0.2:9");
        assert!(moves.iter().all(|r| r.reason == "drain"));
        // Reporting again does not start another move (a second one
        // would go to the next destination in turn).
        for _ in 0..3 {
            m.observe(&poll("a"), true, HookReply::Ack);
        }
        let again = m.moves();
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].destination, "127.0.0.1:9");
        assert_eq!(again[0].started_unix_ms, moves[0].started_unix_ms);
        // A VMM without the feature: listed, not moved.
        m.observe(&poll("old"), false, HookReply::Ack);
        let old = m.moves().into_iter().find(|r| r.vm == "old").unwrap();
        assert_eq!(old.state, MoveState::Unsupported);
        m.undrain();
        assert!(!m.draining() && m.drain_status().is_none());
        // After the drain, a new VM reporting in stays.
        m.observe(&poll("c"), true, HookReply::Ack);
        assert!(m.moves().iter().all(|r| r.vm != "c"));
    }

    #[test]
    fn an_unreadable_recorded_drain_cordons_the_host_and_moves_nothing() {
        for value in [
            "{garbage",
            r#"{"version":1,"destinations":[],"since_unix_ms":1}"#,
        ] {
            let m = mover();
            m.resume_recorded(value);
            assert!(m.draining(), "{value}");
            let d = m.drain_status().unwrap();
            assert!(d.destinations.is_empty() && d.since_unix_ms.is_none());
            assert!(d.unreadable.is_some(), "{value}");
            m.observe(&poll("a"), true, HookReply::Ack);
            assert!(m.moves().is_empty(), "{value}");
            // A new drain replaces the cordon, and begins now.
            let rec = DrainRecord::new(vec!["127.0.0.1:9".into()], 7).unwrap();
            m.drain(&rec, true, &[]);
            let d = m.drain_status().unwrap();
            assert!(d.unreadable.is_none() && !d.resumed);
            assert_eq!(d.destinations, rec.destinations);
            assert_eq!(m.moves()[0].vm, "a");
        }
    }

    #[test]
    fn utc_text_is_rfc3339() {
        assert_eq!(crate::status::utc_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            crate::status::utc_text(951_782_400_000),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            crate::status::utc_text(1_795_383_605_999),
            "2026-11-22T21:40:05Z"
        );
    }

    #[test]
    fn config_is_validated() {
        assert!(MigrationConfig::default().validate().is_ok());
        let mut c = MigrationConfig {
            listen: Some("0.0.0.0:7790".parse().unwrap()),
            ..MigrationConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("advertise"));
        c.advertise = Some("10.0.0.2".parse().unwrap());
        assert!(c.validate().is_ok());
        c.min_downtime_ms = 600;
        assert!(c.validate().is_err());
        // The same rule as a drain's destinations.
        for bad in ["nohost", "host:port", ":7790", "host:70000"] {
            let c = MigrationConfig {
                destinations: vec![bad.into()],
                ..MigrationConfig::default()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
        let c = MigrationConfig {
            destinations: vec!["10.0.0.2:7790".into(), "[::1]:7790".into()],
            ..MigrationConfig::default()
        };
        assert!(c.validate().is_ok());
        let c = MigrationConfig {
            overload_share: 1.5,
            ..MigrationConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
