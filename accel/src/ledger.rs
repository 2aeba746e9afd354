//! The reservation ledger: which VM holds which GPU or MIG instance (and,
//! on vGPU/mdev hosts, which profile), kept in the companion's SQLite store.
//!
//! The ledger owns two tables in the store file, created idempotently:
//! `gpu_ledger_meta` (its own version) and `gpu_reservations`. It never
//! touches the store's `user_version` or its other tables. Reserving places
//! and records in one `BEGIN IMMEDIATE` transaction, so two processes
//! sharing the file cannot both take a device exclusively.
//!
//! Enforcement (exclusive compute mode, binding to vfio-pci) changes device
//! state; it is opt-in ([`Enforcement`]) and this version does not carry
//! it out: enabled, it answers "unsupported here" with the reason.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::inventory::Inventory;
use crate::placement::{Demand, Holder, SlotKind, place};
use crate::source::rfc3339;
use crate::sysfs::NodeDistances;

/// The ledger tables' version.
pub const LEDGER_VERSION: i64 = 1;
/// The companion store's `PRAGMA application_id` ("PRSC").
pub const STORE_APPLICATION_ID: i64 = 0x5052_5343;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS gpu_ledger_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO gpu_ledger_meta (key, value) VALUES ('version', 1);
CREATE TABLE IF NOT EXISTS gpu_reservations (
    vm TEXT NOT NULL,
    device_id TEXT NOT NULL,
    parent_uuid TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('gpu', 'mig')),
    exclusive INTEGER NOT NULL CHECK (exclusive IN (0, 1)),
    mem_mib INTEGER NOT NULL CHECK (mem_mib >= 0),
    mdev_profile TEXT,
    numa_node INTEGER,
    created_at TEXT NOT NULL,
    PRIMARY KEY (vm, device_id)
);
CREATE INDEX IF NOT EXISTS gpu_reservations_parent ON gpu_reservations (parent_uuid);
";

/// One VM's hold on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The VM.
    pub vm: String,
    /// The slot (GPU UUID, MIG UUID, or `GPU-…/giN/ciM`).
    pub device_id: String,
    /// The GPU it is, or is part of.
    pub parent_uuid: String,
    /// Whole GPU or MIG instance.
    pub kind: SlotKind,
    /// Whether nobody else may use the device.
    pub exclusive: bool,
    /// GPU memory reserved, MiB.
    pub mem_mib: u64,
    /// The mdev/vGPU type the VM gets on it (`nvidia-63`), when given.
    pub mdev_profile: Option<String>,
    /// The GPU's NUMA node when reserved.
    pub numa_node: Option<u32>,
    /// When (RFC 3339, UTC).
    pub created_at: String,
}

impl Reservation {
    fn holder(&self) -> Holder {
        Holder {
            vm: self.vm.clone(),
            device_id: self.device_id.clone(),
            parent_uuid: self.parent_uuid.clone(),
            kind: self.kind,
            exclusive: self.exclusive,
            mem_mib: self.mem_mib,
        }
    }
}

/// Why a VM's reservations end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The VM stopped.
    Stopped,
    /// The VM failed (its start or restart did not succeed, or it crashed).
    Failed,
    /// An operator asked.
    Operator,
}

/// What reconciliation at start found.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Reservations whose device is gone, dropped, with the reason.
    pub dropped: Vec<(Reservation, String)>,
    /// Reservations of VMs the caller does not know to be running (kept).
    pub unknown_vms: Vec<Reservation>,
    /// Reservations that check out.
    pub kept: Vec<Reservation>,
}

/// Opt-in enforcement of reservations on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Enforcement {
    /// Whether enforcement was asked for.
    pub enabled: bool,
}

impl Enforcement {
    /// Enforces `r`: with enforcement off (the default) nothing is changed
    /// and the answer says so; on, this version refuses with the reason.
    pub fn apply(&self, r: &Reservation) -> Result<String, LedgerError> {
        self.check()?;
        Ok(format!(
            "enforcement is off: {} on {} is recorded only; the device is not changed",
            r.vm, r.device_id
        ))
    }

    /// Whether enforcement as configured can be carried out: off, yes; on,
    /// "unsupported here" with the reason (check before reserving).
    pub fn check(&self) -> Result<(), LedgerError> {
        if !self.enabled {
            return Ok(());
        }
        Err(LedgerError::EnforcementUnsupported {
            reason: "this version does not change device state (exclusive-process compute mode, \
                     binding to vfio-pci); do that with nvidia-smi -c or driverctl"
                .to_string(),
        })
    }
}

/// The ledger over one SQLite connection.
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
}

fn read_row(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<(Reservation, String, i64, i64, Option<i64>)> {
    let kind: String = row.get(3)?;
    let exclusive: i64 = row.get(4)?;
    let mem: i64 = row.get(5)?;
    let node: Option<i64> = row.get(7)?;
    Ok((
        Reservation {
            vm: row.get(0)?,
            device_id: row.get(1)?,
            parent_uuid: row.get(2)?,
            kind: SlotKind::Gpu,
            exclusive: exclusive != 0,
            mem_mib: 0,
            mdev_profile: row.get(6)?,
            numa_node: None,
            created_at: row.get(8)?,
        },
        kind,
        exclusive,
        mem,
        node,
    ))
}

fn load(conn: &Connection) -> Result<Vec<Reservation>, LedgerError> {
    let mut stmt = conn.prepare(
        "SELECT vm, device_id, parent_uuid, kind, exclusive, mem_mib, mdev_profile, numa_node, created_at
         FROM gpu_reservations ORDER BY vm, device_id",
    )?;
    let rows = stmt.query_map([], read_row)?;
    let mut out = Vec::new();
    for row in rows {
        let (mut r, kind, _, mem, node) = row?;
        let corrupt = |reason: String| LedgerError::Corrupt { reason };
        r.kind = match kind.as_str() {
            "gpu" => SlotKind::Gpu,
            "mig" => SlotKind::Mig,
            other => return Err(corrupt(format!("{} has kind {other:?}", r.device_id))),
        };
        r.mem_mib =
            u64::try_from(mem).map_err(|_| corrupt(format!("{} has memory {mem}", r.device_id)))?;
        r.numa_node = node
            .map(u32::try_from)
            .transpose()
            .map_err(|_| corrupt(format!("{} has NUMA node {node:?}", r.device_id)))?;
        out.push(r);
    }
    Ok(out)
}

fn insert(conn: &Connection, r: &Reservation) -> Result<(), LedgerError> {
    let holders: Vec<Holder> = load(conn)?.iter().map(Reservation::holder).collect();
    if let Some(h) = holders
        .iter()
        .find(|h| h.vm == r.vm && h.device_id == r.device_id)
    {
        return Err(LedgerError::AlreadyHeld {
            vm: h.vm.clone(),
            device: h.device_id.clone(),
        });
    }
    let overlapping = holders.iter().find(|h| {
        (h.device_id == r.device_id
            || (h.parent_uuid == r.parent_uuid
                && (h.kind == SlotKind::Gpu || r.kind == SlotKind::Gpu)))
            && (h.exclusive || r.exclusive)
    });
    if let Some(h) = overlapping {
        return Err(LedgerError::Conflict {
            device: r.device_id.clone(),
            holder: h.vm.clone(),
            exclusive: h.exclusive,
        });
    }
    conn.execute(
        "INSERT INTO gpu_reservations
         (vm, device_id, parent_uuid, kind, exclusive, mem_mib, mdev_profile, numa_node, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            r.vm,
            r.device_id,
            r.parent_uuid,
            r.kind.as_str(),
            i64::from(r.exclusive),
            i64::try_from(r.mem_mib).unwrap_or(i64::MAX),
            r.mdev_profile,
            r.numa_node.map(i64::from),
            r.created_at,
        ],
    )?;
    Ok(())
}

impl Ledger {
    /// Opens the ledger in the companion's store file. The file must exist
    /// and be a Prescient store (`prescient serve --store FILE` creates
    /// one); the ledger's tables are created on first use.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let not_a_store = |reason: String| LedgerError::NotAStore {
            path: path.to_path_buf(),
            reason,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| not_a_store(e.to_string()))?;
        let app: i64 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(|e| not_a_store(format!("{e} (corrupt, or not an SQLite database)")))?;
        if app != STORE_APPLICATION_ID {
            return Err(not_a_store(format!(
                "not a Prescient store (application_id {app:#x}); `prescient serve --store FILE` creates one"
            )));
        }
        Ledger::with_connection(conn)
    }

    /// Uses a connection the caller opened (the ledger's tables are created
    /// if missing).
    pub fn with_connection(conn: Connection) -> Result<Self, LedgerError> {
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} COMMIT;"))?;
        let version: i64 = conn
            .query_row(
                "SELECT value FROM gpu_ledger_meta WHERE key = 'version'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        if version != LEDGER_VERSION {
            return Err(LedgerError::Version {
                found: version,
                expected: LEDGER_VERSION,
            });
        }
        Ok(Ledger { conn })
    }

    /// Every reservation, by VM then device.
    pub fn reservations(&self) -> Result<Vec<Reservation>, LedgerError> {
        load(&self.conn)
    }

    /// Chooses a device for `demand` from `inventory` (see
    /// [`crate::placement`]) and records the reservation, in one
    /// transaction.
    pub fn reserve(
        &mut self,
        inventory: &Inventory,
        demand: &Demand,
        mdev_profile: Option<&str>,
        distances: &NodeDistances,
        now: SystemTime,
    ) -> Result<Reservation, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let holders: Vec<Holder> = load(&tx)?.iter().map(Reservation::holder).collect();
        // A VM holds a device once: what it holds already is not offered again.
        let slots: Vec<_> = inventory
            .slots()
            .into_iter()
            .filter(|s| {
                !holders
                    .iter()
                    .any(|h| h.vm == demand.vm && h.device_id == s.id)
            })
            .collect();
        let choice = place(&slots, &holders, demand, distances).map_err(|source| {
            LedgerError::Placement {
                vm: demand.vm.clone(),
                source,
            }
        })?;
        let r = Reservation {
            vm: demand.vm.clone(),
            device_id: choice.slot.id.clone(),
            parent_uuid: choice.slot.parent_uuid.clone(),
            kind: choice.slot.kind,
            exclusive: demand.exclusive,
            mem_mib: demand.mem_mib,
            mdev_profile: mdev_profile.map(str::to_string),
            numa_node: choice.slot.numa_node,
            created_at: rfc3339(now),
        };
        insert(&tx, &r)?;
        tx.commit()?;
        tracing::info!(
            vm = r.vm,
            device = r.device_id,
            exclusive = r.exclusive,
            mem_mib = r.mem_mib,
            "GPU reserved"
        );
        Ok(r)
    }

    /// Records a reservation chosen elsewhere (an operator's, or a domain's
    /// own `<hostdev>`); refused when it overlaps an exclusive one.
    pub fn hold(&mut self, r: &Reservation) -> Result<(), LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert(&tx, r)?;
        tx.commit()?;
        Ok(())
    }

    /// Ends every reservation of `vm` (on stop, on a failed restart, or by
    /// hand), returning what was released.
    pub fn release(
        &mut self,
        vm: &str,
        why: ReleaseReason,
    ) -> Result<Vec<Reservation>, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let gone: Vec<Reservation> = load(&tx)?.into_iter().filter(|r| r.vm == vm).collect();
        tx.execute("DELETE FROM gpu_reservations WHERE vm = ?1", params![vm])?;
        tx.commit()?;
        for r in &gone {
            tracing::info!(vm, device = r.device_id, reason = ?why, "GPU reservation released");
        }
        Ok(gone)
    }

    /// Checks every reservation against the host at start: a reservation
    /// whose device is gone from `inventory` is dropped (with a warning); one
    /// whose VM is not in `running_vms` is reported and kept (the VM may
    /// start again; [`Ledger::release`] ends it). `running_vms: None` (the
    /// caller does not know yet) checks devices only.
    pub fn reconcile(
        &mut self,
        inventory: &Inventory,
        running_vms: Option<&[&str]>,
    ) -> Result<ReconcileReport, LedgerError> {
        let slots = inventory.slots();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut report = ReconcileReport::default();
        for r in load(&tx)? {
            let reason = if let Some(s) = slots.iter().find(|s| s.id == r.device_id) {
                if s.kind != r.kind {
                    Some(format!("{} is now a {}", r.device_id, s.kind.as_str()))
                } else {
                    None
                }
            } else if inventory.gpu(&r.parent_uuid).is_some() {
                Some(format!(
                    "GPU {} is present but {} is not (MIG layout changed)",
                    r.parent_uuid, r.device_id
                ))
            } else {
                Some(format!("GPU {} is gone from the host", r.parent_uuid))
            };
            if let Some(reason) = reason {
                tx.execute(
                    "DELETE FROM gpu_reservations WHERE vm = ?1 AND device_id = ?2",
                    params![r.vm, r.device_id],
                )?;
                tracing::warn!(
                    vm = r.vm,
                    device = r.device_id,
                    "GPU reservation dropped: {reason}"
                );
                report.dropped.push((r, reason));
            } else if running_vms.is_some_and(|vms| !vms.contains(&r.vm.as_str())) {
                tracing::warn!(
                    vm = r.vm,
                    device = r.device_id,
                    "GPU reservation of a VM that is not running"
                );
                report.unknown_vms.push(r);
            } else {
                report.kept.push(r);
            }
        }
        tx.commit()?;
        Ok(report)
    }
}

/// A table of reservations for `prescient gpu reservations`.
pub fn reservations_table(rs: &[Reservation]) -> String {
    let mut s = format!(
        "{:<20} {:<52} {:<4} {:<9} {:>9} {:>4} {:<14} {}\n",
        "vm", "device", "kind", "exclusive", "mem MiB", "numa", "mdev profile", "since"
    );
    for r in rs {
        s.push_str(&format!(
            "{:<20} {:<52} {:<4} {:<9} {:>9} {:>4} {:<14} {}\n",
            r.vm,
            r.device_id,
            r.kind.as_str(),
            if r.exclusive { "yes" } else { "no" },
            r.mem_mib,
            r.numa_node
                .map_or_else(|| "-".to_string(), |n| n.to_string()),
            r.mdev_profile.as_deref().unwrap_or("-"),
            r.created_at
        ));
    }
    s
}
