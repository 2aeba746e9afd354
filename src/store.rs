//! The profile store: every boot's report and memory profile, and each
//! bootstrap key's working-set model and current plan, in one SQLite file
//! (WAL). Keys are (image digest, bootstrap-package digest).
//!
//! Durability: each boot is one transaction, committed before the VMM's
//! event is acknowledged; with WAL and `synchronous=NORMAL` a committed boot
//! survives the daemon being killed (a power loss may roll back the last
//! transactions).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use vmm_hooks::{BootPlan, BootReport, PrefaultPlan, ProfileRequest, Resources};

use crate::allocator::BootUsage;

use crate::working_set::{FrequencyModel, PlanPolicy, WorkingSetModel};

/// `PRAGMA application_id` of a Prescient store ("PRSC").
const APPLICATION_ID: i64 = 0x5052_5343;
/// Schema version (`PRAGMA user_version`). Version 1 held boots and
/// profiles; version 2 adds the resource pool (`pool_vms`) and the daemon's
/// own state (`daemon_state`); version 3 adds usage samples (`samples`) and
/// served forecasts (`served_forecasts`) for online learning. Older files
/// are migrated when opened, one version at a time.
const SCHEMA_VERSION: i64 = 3;

/// The tables version 3 added: every usage sample the daemon takes of a VM
/// (bounded by age and count, see [`ProfileStore::prune_online`]) and every
/// forecast it served with the forecaster that made it.
const ONLINE_TABLES: &str = "
         CREATE TABLE samples (
             vm_id TEXT NOT NULL,
             metric TEXT NOT NULL,
             at_unix_ms INTEGER NOT NULL,
             value REAL NOT NULL,
             vcpus INTEGER,
             memory_mib INTEGER
         );
         CREATE INDEX samples_by_metric ON samples (metric, at_unix_ms);
         CREATE INDEX samples_by_time ON samples (at_unix_ms);
         CREATE TABLE served_forecasts (
             id INTEGER PRIMARY KEY,
             vm_id TEXT NOT NULL,
             at_unix_ms INTEGER NOT NULL,
             metric TEXT NOT NULL,
             forecaster TEXT NOT NULL,
             reason TEXT NOT NULL,
             p50 REAL NOT NULL,
             p90 REAL NOT NULL,
             p99 REAL NOT NULL
         );
         CREATE INDEX served_by_vm ON served_forecasts (vm_id, id);";

/// One usage sample of a VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The VM.
    pub vm_id: String,
    /// What was measured (`mem_mib`: memory in use; `cpu_cores`: CPU).
    pub metric: String,
    /// When, ms since the Unix epoch.
    pub at_unix_ms: i64,
    /// The value.
    pub value: f64,
    /// The VM's vCPUs, where known.
    pub vcpus: Option<u32>,
    /// The VM's memory size, MiB, where known.
    pub memory_mib: Option<u64>,
}

/// A forecast the daemon served, and which forecaster made it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServedForecast {
    /// The VM.
    pub vm_id: String,
    /// When it was made, ms since the Unix epoch.
    pub at_unix_ms: i64,
    /// The metric forecast.
    pub metric: String,
    /// The forecaster: `model:<checksum prefix>@v<version>` or
    /// `baseline:<name>`.
    pub forecaster: String,
    /// Why that one (the selector's reason).
    pub reason: String,
    /// p50, p90, p99.
    pub quantiles: [f64; 3],
}

/// The tables version 2 added (created in a new store, added to an old one).
const POOL_TABLES: &str = "
         CREATE TABLE pool_vms (
             vm_id TEXT PRIMARY KEY,
             image TEXT NOT NULL,
             package TEXT NOT NULL,
             source TEXT NOT NULL,
             pid INTEGER,
             pid_start INTEGER,
             state TEXT NOT NULL,
             cpu_millis INTEGER NOT NULL,
             memory_mib INTEGER NOT NULL,
             net_mbps INTEGER NOT NULL,
             disk_mbps INTEGER NOT NULL,
             gpus INTEGER NOT NULL,
             quantile REAL NOT NULL,
             forecast_by TEXT NOT NULL,
             class TEXT NOT NULL,
             shortfall TEXT NOT NULL,
             last_seq INTEGER,
             updated_unix_ms INTEGER NOT NULL
         );
         CREATE TABLE daemon_state (
             key TEXT PRIMARY KEY,
             value TEXT NOT NULL
         );";

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file is not a Prescient store.
    #[error("{path} is not a Prescient store: {reason}")]
    NotAStore {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
    /// The store was written by another schema version.
    #[error(
        "{path} has schema version {found}; this Prescient reads version {SCHEMA_VERSION} (and migrates versions 1 and 2)"
    )]
    Schema {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i64,
    },
    /// SQLite failed.
    #[error("store database error")]
    Sql(#[from] rusqlite::Error),
    /// A stored binary value is damaged.
    #[error("stored {what} is damaged: {reason}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A stored value does not decode.
    #[error("stored {what} does not decode")]
    Decode {
        /// Which value.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// A bootstrap key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProfileKey {
    /// Image digest.
    pub image: String,
    /// Bootstrap-package digest.
    pub package: String,
}

/// What the store keeps and decides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StorePolicy {
    /// Boot rows kept per key (older ones are deleted).
    pub retain_boots: u32,
    /// The first boots of a key that are always profiled.
    pub initial_profiles: u32,
    /// After those, profile one boot in this many (0: never).
    pub sample_every: u32,
    /// Profile granularity and polling.
    pub profile: ProfileRequest,
    /// How predictions become plans.
    pub plan: PlanPolicy,
}

impl Default for StorePolicy {
    fn default() -> Self {
        StorePolicy {
            retain_boots: 200,
            initial_profiles: 3,
            sample_every: 10,
            profile: ProfileRequest::default(),
            plan: PlanPolicy::default(),
        }
    }
}

/// What the store knows of a key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeySummary {
    /// Boots recorded (ever).
    pub boots: u64,
    /// Boots with a profile (ever).
    pub profiled: u64,
    /// The current plan, if the model has one.
    pub plan: Option<PrefaultPlan>,
}

/// How the daemon hears of a VM (and how it checks, at start, that the VM
/// still exists).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmSource {
    /// A VMM on the hooks socket (labvm): alive while its process (pid from
    /// the socket's peer credentials, checked with its start time) is.
    Vmm,
    /// libvirt's QEMU hook: alive while the domain's QEMU process is.
    Libvirt,
}

impl VmSource {
    /// As stored.
    pub fn name(self) -> &'static str {
        match self {
            VmSource::Vmm => "vmm",
            VmSource::Libvirt => "libvirt",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        match s {
            "vmm" => Some(VmSource::Vmm),
            "libvirt" => Some(VmSource::Libvirt),
            _ => None,
        }
    }
}

/// Where a VM stands with the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Created; no boot asked for yet (held in memory only).
    Created,
    /// Booting or running with its demand reserved.
    Reserved,
    /// Running without a reservation (its demand did not fit and the policy
    /// is to boot lazily).
    Unreserved,
    /// Told not to boot (its demand did not fit); waiting for its `stopped`.
    Refused,
    /// Interrupted: its reservation released, its record kept for the restart.
    Interrupted,
}

impl VmState {
    /// As stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Reserved => "reserved",
            VmState::Unreserved => "unreserved",
            VmState::Refused => "refused",
            VmState::Interrupted => "interrupted",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        [
            VmState::Created,
            VmState::Reserved,
            VmState::Unreserved,
            VmState::Refused,
            VmState::Interrupted,
        ]
        .into_iter()
        .find(|v| v.name() == s)
    }
}

/// One VM the daemon knows, as the pool table stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM.
    pub vm_id: String,
    /// Its bootstrap key.
    pub key: ProfileKey,
    /// How the daemon hears of it.
    pub source: VmSource,
    /// The VMM's process id (from the socket's peer credentials).
    pub pid: Option<i32>,
    /// That process's start time (`/proc/PID/stat` field 22), so a reused
    /// pid is not taken for the VMM.
    pub pid_start: Option<u64>,
    /// Where it stands.
    pub state: VmState,
    /// The forecast demand (held in the pool when `state` is reserved).
    pub demand: Resources,
    /// The forecast's quantile.
    pub quantile: f64,
    /// How the demand was forecast.
    pub forecast_by: String,
    /// The VM's class.
    pub class: String,
    /// What fell short, when it did not fit.
    pub shortfall: String,
    /// The last event sequence number seen (written at shutdown).
    pub last_seq: Option<u64>,
    /// When the record last changed, ms since the Unix epoch.
    pub updated_unix_ms: i64,
}

/// One stored boot.
#[derive(Clone, Debug, PartialEq)]
pub struct BootRow {
    /// Row id (grows with time).
    pub id: i64,
    /// The VM.
    pub vm_id: String,
    /// When it was recorded.
    pub at_unix_ms: i64,
    /// Its report.
    pub report: BootReport,
}

/// The store.
#[derive(Debug)]
pub struct ProfileStore {
    conn: Connection,
    policy: StorePolicy,
}

impl ProfileStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path, policy: StorePolicy) -> Result<Self, StoreError> {
        let not_a_store = |reason: String| StoreError::NotAStore {
            path: path.to_path_buf(),
            reason,
        };
        let conn = Connection::open(path).map_err(|e| not_a_store(e.to_string()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let app_id: i64 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(|e| not_a_store(format!("{e} (corrupt, or not an SQLite database)")))?;
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(|e| not_a_store(format!("{e} (corrupt)")))?;
        if app_id == 0 && tables == 0 {
            create_schema(&conn)?;
        } else if app_id != APPLICATION_ID {
            return Err(not_a_store(format!(
                "an SQLite database of another application (application_id {app_id:#x}, {tables} schema objects)"
            )));
        }
        let mut version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version == 1 {
            migrate_adding(&conn, POOL_TABLES, 2)?;
            tracing::info!(store = %path.display(), "store migrated from schema version 1 to 2 (resource pool tables added)");
            version = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        }
        if version == 2 {
            migrate_adding(&conn, ONLINE_TABLES, 3)?;
            tracing::info!(store = %path.display(), "store migrated from schema version 2 to 3 (sample and served-forecast tables added)");
            version = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        }
        if version != SCHEMA_VERSION {
            return Err(StoreError::Schema {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode, "the store could not switch to WAL journaling");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(ProfileStore { conn, policy })
    }

    /// The policy in force.
    pub fn policy(&self) -> &StorePolicy {
        &self.policy
    }

    /// What the store knows of `key`.
    pub fn summary(&self, key: &ProfileKey) -> Result<KeySummary, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT boots, profiled, plan FROM profiles WHERE image = ?1 AND package = ?2",
                params![key.image, key.package],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<Vec<u8>>>(2)?,
                    ))
                },
            )
            .optional()?;
        let Some((boots, profiled, plan)) = row else {
            return Ok(KeySummary::default());
        };
        let plan = plan
            .map(|p| plan_codec::decode(&p))
            .transpose()
            .map_err(|reason| StoreError::Corrupt {
                what: "plan",
                reason,
            })?;
        Ok(KeySummary {
            boots: u64::try_from(boots).unwrap_or(0),
            profiled: u64::try_from(profiled).unwrap_or(0),
            plan,
        })
    }

    /// The boot plan for `key`: the model's pre-fault plan, if it has one,
    /// and a profile request while the key still needs profiles. This is
    /// what the daemon answers a before-boot event with.
    pub fn boot_plan(&self, key: &ProfileKey) -> Result<BootPlan, StoreError> {
        let summary = self.summary(key)?;
        let mut plan = BootPlan::made_by(format!(
            "prescient {}: {} boots of this key, {} profiled",
            env!("CARGO_PKG_VERSION"),
            summary.boots,
            summary.profiled
        ));
        if store_should_profile(&self.policy, &summary) {
            plan = plan.with_profile(self.policy.profile);
        }
        if let Some(p) = summary.plan {
            plan = plan.with_prefault(p);
        }
        Ok(plan)
    }

    /// Whether the next boot of a key with this summary should be profiled.
    pub fn should_profile(&self, s: &KeySummary) -> bool {
        store_should_profile(&self.policy, s)
    }

    /// Records one boot (and learns from its profile) in one transaction.
    pub fn record_boot(
        &mut self,
        key: &ProfileKey,
        vm_id: &str,
        at_unix_ms: i64,
        report: &BootReport,
    ) -> Result<i64, StoreError> {
        let encode = |what, v: &dyn erased::Json| {
            v.json()
                .map_err(|source| StoreError::Decode { what, source })
        };
        let prefault = report
            .prefault
            .as_ref()
            .map(|p| encode("prefault report", p))
            .transpose()?;
        let profile = report
            .profile
            .as_ref()
            .map(|p| encode("profile", p))
            .transpose()?;
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO boots (image, package, vm_id, at_unix_ms, time_to_ready_ms, vcpu_cpu_ms,
                                minor_faults, major_faults, rss_kib, plan_applied, prefault, profile)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                key.image,
                key.package,
                vm_id,
                at_unix_ms,
                report.time_to_ready_ms,
                report.vcpu_cpu_ms,
                i64::try_from(report.minor_faults).unwrap_or(i64::MAX),
                i64::try_from(report.major_faults).unwrap_or(i64::MAX),
                i64::try_from(report.rss_kib).unwrap_or(i64::MAX),
                report.plan_applied,
                prefault,
                profile,
            ],
        )?;
        let id = tx.last_insert_rowid();
        let existing: Option<(String, Option<Vec<u8>>)> = tx
            .query_row(
                "SELECT model, plan FROM profiles WHERE image = ?1 AND package = ?2",
                params![key.image, key.package],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let mut model: FrequencyModel = match &existing {
            Some((m, _)) => serde_json::from_str(m).map_err(|source| StoreError::Decode {
                what: "working-set model",
                source,
            })?,
            None => FrequencyModel::new(),
        };
        let profiled = i64::from(report.profile.is_some());
        if let Some(p) = &report.profile {
            model.observe(p);
        }
        let plan = match (&report.profile, existing) {
            (Some(_), _) | (None, None) => model
                .plan(&self.policy.plan)
                .map(|p| plan_codec::encode(&p)),
            (None, Some((_, plan))) => plan,
        };
        let model_json = serde_json::to_string(&model).map_err(|source| StoreError::Decode {
            what: "working-set model",
            source,
        })?;
        tx.execute(
            "INSERT INTO profiles (image, package, boots, profiled, model, plan, updated_unix_ms)
             VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6)
             ON CONFLICT (image, package) DO UPDATE SET
                boots = boots + 1, profiled = profiled + ?3, model = ?4, plan = ?5, updated_unix_ms = ?6",
            params![key.image, key.package, profiled, model_json, plan, at_unix_ms],
        )?;
        tx.execute(
            "DELETE FROM boots WHERE image = ?1 AND package = ?2 AND id <= (
                SELECT id FROM boots WHERE image = ?1 AND package = ?2
                ORDER BY id DESC LIMIT 1 OFFSET ?3)",
            params![key.image, key.package, i64::from(self.policy.retain_boots)],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// The stored boots of `key`, oldest first.
    pub fn boots(&self, key: &ProfileKey) -> Result<Vec<BootRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, vm_id, at_unix_ms, time_to_ready_ms, vcpu_cpu_ms, minor_faults, major_faults,
                    rss_kib, plan_applied, prefault, profile
             FROM boots WHERE image = ?1 AND package = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![key.image, key.package], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, f64>(3)?,
                r.get::<_, f64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, bool>(8)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, Option<String>>(10)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, vm_id, at, ttr, cpu, minor, major, rss, applied, prefault, profile) = row?;
            let mut report = BootReport::new(ttr);
            report.vcpu_cpu_ms = cpu;
            report.minor_faults = u64::try_from(minor).unwrap_or(0);
            report.major_faults = u64::try_from(major).unwrap_or(0);
            report.rss_kib = u64::try_from(rss).unwrap_or(0);
            report.plan_applied = applied;
            report.prefault = prefault
                .map(|p| serde_json::from_str(&p))
                .transpose()
                .map_err(|source| StoreError::Decode {
                    what: "prefault report",
                    source,
                })?;
            report.profile = profile
                .map(|p| serde_json::from_str(&p))
                .transpose()
                .map_err(|source| StoreError::Decode {
                    what: "profile",
                    source,
                })?;
            out.push(BootRow {
                id,
                vm_id,
                at_unix_ms: at,
                report,
            });
        }
        Ok(out)
    }

    /// What the newest `limit` boots of `key` used (oldest first): the
    /// allocator's history. Reads only the usage columns.
    pub fn boot_usage(&self, key: &ProfileKey, limit: usize) -> Result<Vec<BootUsage>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT rss_kib, vcpu_cpu_ms, time_to_ready_ms FROM boots
             WHERE image = ?1 AND package = ?2 ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![
                key.image,
                key.package,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| {
                Ok(BootUsage {
                    rss_kib: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    vcpu_cpu_ms: r.get(1)?,
                    time_to_ready_ms: r.get(2)?,
                })
            },
        )?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// Writes (inserts or replaces) one VM's pool record.
    pub fn pool_put(&self, v: &VmRecord) -> Result<(), StoreError> {
        let n = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO pool_vms (vm_id, image, package, source, pid, pid_start, state,
                    cpu_millis, memory_mib, net_mbps, disk_mbps, gpus, quantile, forecast_by, class,
                    shortfall, last_seq, updated_unix_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            )?
            .execute(params![
                v.vm_id,
                v.key.image,
                v.key.package,
                v.source.name(),
                v.pid,
                v.pid_start.map(n),
                v.state.name(),
                n(v.demand.cpu_millis),
                n(v.demand.memory_mib),
                n(v.demand.net_mbps),
                n(v.demand.disk_mbps),
                n(v.demand.gpus),
                v.quantile,
                v.forecast_by,
                v.class,
                v.shortfall,
                v.last_seq.map(n),
                v.updated_unix_ms,
            ])?;
        Ok(())
    }

    /// Forgets one VM's pool record; true if there was one.
    pub fn pool_remove(&self, vm_id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached("DELETE FROM pool_vms WHERE vm_id = ?1")?
            .execute(params![vm_id])?;
        Ok(n > 0)
    }

    /// Every VM's pool record, by VM id.
    pub fn pool_records(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT vm_id, image, package, source, pid, pid_start, state, cpu_millis, memory_mib,
                    net_mbps, disk_mbps, gpus, quantile, forecast_by, class, shortfall, last_seq,
                    updated_unix_ms
             FROM pool_vms ORDER BY vm_id",
        )?;
        let u = |x: i64| u64::try_from(x).unwrap_or(0);
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i32>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, String>(6)?,
                [
                    r.get::<_, i64>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, i64>(10)?,
                    r.get::<_, i64>(11)?,
                ],
                r.get::<_, f64>(12)?,
                r.get::<_, String>(13)?,
                r.get::<_, String>(14)?,
                r.get::<_, String>(15)?,
                r.get::<_, Option<i64>>(16)?,
                r.get::<_, i64>(17)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                vm_id,
                image,
                package,
                source,
                pid,
                pid_start,
                state,
                amounts,
                quantile,
                forecast_by,
                class,
                shortfall,
                last_seq,
                at,
            ) = row?;
            let corrupt = |what: &'static str, v: &str| StoreError::Corrupt {
                what,
                reason: format!("{v:?} for VM {vm_id}"),
            };
            out.push(VmRecord {
                key: ProfileKey { image, package },
                source: VmSource::from_name(&source)
                    .ok_or_else(|| corrupt("pool VM source", &source))?,
                pid,
                pid_start: pid_start.map(u),
                state: VmState::from_name(&state)
                    .ok_or_else(|| corrupt("pool VM state", &state))?,
                demand: Resources {
                    cpu_millis: u(amounts[0]),
                    memory_mib: u(amounts[1]),
                    net_mbps: u(amounts[2]),
                    disk_mbps: u(amounts[3]),
                    gpus: u(amounts[4]),
                },
                quantile,
                forecast_by,
                class,
                shortfall,
                last_seq: last_seq.map(u),
                updated_unix_ms: at,
                vm_id,
            });
        }
        Ok(out)
    }

    /// Sets a value of the daemon's own state.
    pub fn set_state(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO daemon_state (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    /// Removes a value of the daemon's own state (nothing when absent).
    pub fn clear_state(&self, key: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM daemon_state WHERE key = ?1", params![key])?;
        Ok(())
    }

    /// A value of the daemon's own state.
    pub fn state(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM daemon_state WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Writes the records in one transaction (at shutdown) and checkpoints
    /// the WAL into the main file.
    pub fn persist_all(
        &mut self,
        records: &[VmRecord],
        clean_at_unix_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for v in records {
            tx.execute(
                "UPDATE pool_vms SET last_seq = ?2 WHERE vm_id = ?1",
                params![
                    v.vm_id,
                    v.last_seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX))
                ],
            )?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO daemon_state (key, value) VALUES ('clean_shutdown_unix_ms', ?1)",
            params![clean_at_unix_ms.to_string()],
        )?;
        tx.commit()?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Writes usage samples and served forecasts in one transaction.
    pub fn write_online(
        &mut self,
        samples: &[Sample],
        forecasts: &[ServedForecast],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO samples (vm_id, metric, at_unix_ms, value, vcpus, memory_mib)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for x in samples {
                ins.execute(params![
                    x.vm_id,
                    x.metric,
                    x.at_unix_ms,
                    x.value,
                    x.vcpus,
                    x.memory_mib.map(|m| i64::try_from(m).unwrap_or(i64::MAX))
                ])?;
            }
            let mut ins = tx.prepare_cached(
                "INSERT INTO served_forecasts (vm_id, at_unix_ms, metric, forecaster, reason, p50, p90, p99)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for f in forecasts {
                ins.execute(params![
                    f.vm_id,
                    f.at_unix_ms,
                    f.metric,
                    f.forecaster,
                    f.reason,
                    f.quantiles[0],
                    f.quantiles[1],
                    f.quantiles[2]
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Bounds the online tables: deletes samples taken before
    /// `before_unix_ms`, then the oldest samples beyond `max_samples` and
    /// the oldest served forecasts beyond `max_forecasts`. Returns the rows
    /// deleted (samples, forecasts).
    pub fn prune_online(
        &self,
        before_unix_ms: i64,
        max_samples: u64,
        max_forecasts: u64,
    ) -> Result<(u64, u64), StoreError> {
        let cap = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let mut samples = self.conn.execute(
            "DELETE FROM samples WHERE at_unix_ms < ?1",
            params![before_unix_ms],
        )?;
        samples += self.conn.execute(
            "DELETE FROM samples WHERE rowid <= (SELECT max(rowid) FROM samples) - ?1",
            params![cap(max_samples)],
        )?;
        let forecasts = self.conn.execute(
            "DELETE FROM served_forecasts WHERE id <= (SELECT max(id) FROM served_forecasts) - ?1",
            params![cap(max_forecasts)],
        )?;
        Ok((samples as u64, forecasts as u64))
    }

    /// The newest `limit` samples of `metric` taken at or after
    /// `since_unix_ms`, oldest first.
    pub fn samples(
        &self,
        metric: &str,
        since_unix_ms: i64,
        limit: usize,
    ) -> Result<Vec<Sample>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT vm_id, metric, at_unix_ms, value, vcpus, memory_mib FROM samples
             WHERE metric = ?1 AND at_unix_ms >= ?2 ORDER BY at_unix_ms DESC LIMIT ?3",
        )?;
        let rows = st.query_map(
            params![
                metric,
                since_unix_ms,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| {
                Ok(Sample {
                    vm_id: r.get(0)?,
                    metric: r.get(1)?,
                    at_unix_ms: r.get(2)?,
                    value: r.get(3)?,
                    vcpus: r.get(4)?,
                    memory_mib: r
                        .get::<_, Option<i64>>(5)?
                        .map(|m| u64::try_from(m).unwrap_or(0)),
                })
            },
        )?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// Stored sample rows, all metrics.
    pub fn sample_rows(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM samples", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The newest `limit` served forecasts (of `vm`, or of every VM),
    /// newest first.
    pub fn served_forecasts(
        &self,
        vm: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ServedForecast>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT vm_id, at_unix_ms, metric, forecaster, reason, p50, p90, p99
             FROM served_forecasts WHERE ?1 IS NULL OR vm_id = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![vm, i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok(ServedForecast {
                vm_id: r.get(0)?,
                at_unix_ms: r.get(1)?,
                metric: r.get(2)?,
                forecaster: r.get(3)?,
                reason: r.get(4)?,
                quantiles: [r.get(5)?, r.get(6)?, r.get(7)?],
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Number of stored boot rows, all keys.
    pub fn boot_rows(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM boots", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

fn store_should_profile(policy: &StorePolicy, s: &KeySummary) -> bool {
    s.profiled < u64::from(policy.initial_profiles)
        || (policy.sample_every > 0 && (s.boots + 1).is_multiple_of(u64::from(policy.sample_every)))
}

fn create_schema(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(&format!(
        "PRAGMA application_id = {APPLICATION_ID};
         BEGIN;
         CREATE TABLE boots (
             id INTEGER PRIMARY KEY,
             image TEXT NOT NULL,
             package TEXT NOT NULL,
             vm_id TEXT NOT NULL,
             at_unix_ms INTEGER NOT NULL,
             time_to_ready_ms REAL NOT NULL,
             vcpu_cpu_ms REAL NOT NULL,
             minor_faults INTEGER NOT NULL,
             major_faults INTEGER NOT NULL,
             rss_kib INTEGER NOT NULL,
             plan_applied INTEGER NOT NULL,
             prefault TEXT,
             profile TEXT
         );
         CREATE INDEX boots_by_key ON boots (image, package, id);
         CREATE TABLE profiles (
             image TEXT NOT NULL,
             package TEXT NOT NULL,
             boots INTEGER NOT NULL,
             profiled INTEGER NOT NULL,
             model TEXT NOT NULL,
             plan BLOB,
             updated_unix_ms INTEGER NOT NULL,
             PRIMARY KEY (image, package)
         );
         {POOL_TABLES}
         {ONLINE_TABLES}
         PRAGMA user_version = {SCHEMA_VERSION};
         COMMIT;"
    ))?;
    Ok(())
}

/// One schema step: creates `tables` and sets the version to `version`, in
/// one transaction (a crash leaves the previous version, which migrates
/// on the next open). 1 to 2 adds the pool tables, 2 to 3 the sample and
/// served-forecast tables.
fn migrate_adding(conn: &Connection, tables: &str, version: u32) -> Result<(), StoreError> {
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         {tables}
         PRAGMA user_version = {version};
         COMMIT;"
    ))?;
    Ok(())
}

/// Serialising a value to JSON behind a trait object (for one closure).
mod erased {
    pub trait Json {
        fn json(&self) -> Result<String, serde_json::Error>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Result<String, serde_json::Error> {
            serde_json::to_string(self)
        }
    }
}

/// Plans are stored in a compact binary form: a sparse bootstrap's plan can
/// hold hundreds of thousands of ranges, and serving it must stay fast.
///
/// ```text
/// "PPL1" | mode u8 | hugepages u8 | ranges u32 | extend u32 | (start u64, len u64)* (LE)
/// ```
mod plan_codec {
    use vmm_hooks::{GuestRange, PrefaultMode, PrefaultPlan};

    const MAGIC: &[u8; 4] = b"PPL1";

    fn mode_byte(m: PrefaultMode) -> u8 {
        match m {
            PrefaultMode::Before => 1,
            PrefaultMode::Concurrent => 2,
            PrefaultMode::Full => 3,
            _ => 0,
        }
    }

    pub fn encode(p: &PrefaultPlan) -> Vec<u8> {
        let mut v = Vec::with_capacity(14 + 16 * (p.ranges.len() + p.extend.len()));
        v.extend_from_slice(MAGIC);
        v.push(mode_byte(p.mode));
        v.push(u8::from(p.hugepages));
        for n in [p.ranges.len(), p.extend.len()] {
            v.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
        }
        for r in p.ranges.iter().chain(&p.extend) {
            v.extend_from_slice(&r.start.to_le_bytes());
            v.extend_from_slice(&r.len.to_le_bytes());
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<PrefaultPlan, String> {
        if b.len() < 14 || &b[..4] != MAGIC {
            return Err("not a version 1 plan".into());
        }
        let mode = match b[4] {
            0 => PrefaultMode::Lazy,
            1 => PrefaultMode::Before,
            2 => PrefaultMode::Concurrent,
            3 => PrefaultMode::Full,
            m => return Err(format!("unknown pre-fault mode {m}")),
        };
        let count = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        let (n, m) = (count(6), count(10));
        let body = &b[14..];
        if body.len() != (n + m) * 16 {
            return Err(format!(
                "{} bytes of ranges for {n} + {m} ranges",
                body.len()
            ));
        }
        let mut all = body.chunks_exact(16).map(|c| {
            let word = |o: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&c[o..o + 8]);
                u64::from_le_bytes(w)
            };
            GuestRange {
                start: word(0),
                len: word(8),
            }
        });
        let ranges: Vec<GuestRange> = all.by_ref().take(n).collect();
        let mut plan = PrefaultPlan::new(mode, ranges);
        plan.extend = all.collect();
        plan.hugepages = b[5] != 0;
        Ok(plan)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn plans_round_trip_and_damage_is_detected() {
            let mut p = PrefaultPlan::new(
                PrefaultMode::Concurrent,
                vec![
                    GuestRange {
                        start: 4096,
                        len: 8192,
                    },
                    GuestRange {
                        start: 0,
                        len: 4096,
                    },
                ],
            );
            p.extend = vec![GuestRange {
                start: 1 << 30,
                len: 2 << 20,
            }];
            p.hugepages = true;
            let b = encode(&p);
            assert_eq!(decode(&b).unwrap(), p);
            assert!(decode(&b[..b.len() - 1]).is_err());
            assert!(decode(b"PPL2").is_err());
            let mut bad = b.clone();
            bad[4] = 9;
            assert!(decode(&bad).is_err());
            let mut bad = b;
            bad[6] = 200;
            assert!(decode(&bad).is_err());
        }
    }
}
