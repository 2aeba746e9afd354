//! `prescient status`: the running daemon's VMs, resource pool,
//! reservations and forecasts, asked over the hooks socket (a
//! `status-request` message; see `vmm_hooks::proto`) and printed as an
//! aligned table or JSON.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_hooks::proto::{self, Message, ProtoError};
use vmm_hooks::{Resource, Resources};

use crate::pool::{Overcommit, Pool};
use crate::store::VmRecord;

/// What can go wrong asking the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatusError {
    /// The socket cannot be reached.
    #[error(
        "cannot reach the daemon at {path} (is `prescient serve` running, and may this user use its socket?)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("the daemon at {path} did not answer the status request")]
    Exchange {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: ProtoError,
    },
    /// The answer is not a status.
    #[error("the daemon answered with something other than a status: {0}")]
    Answer(String),
}

/// The pool as the status shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// What the host has.
    pub total: Resources,
    /// What it keeps for itself.
    pub host_reserved: Resources,
    /// What VMs may be promised.
    pub capacity: Resources,
    /// What VMs hold.
    pub allocated: Resources,
    /// What is left.
    pub free: Resources,
    /// Over-commit ratios.
    pub overcommit: Overcommit,
    /// VMs holding a reservation.
    pub reservations: usize,
}

impl PoolStatus {
    /// The status of a pool.
    pub fn of(p: &Pool) -> Self {
        PoolStatus {
            total: p.total(),
            host_reserved: p.host_reserved(),
            capacity: p.capacity(),
            allocated: p.allocated(),
            free: p.free(),
            overcommit: p.overcommit(),
            reservations: p.len(),
        }
    }
}

/// The daemon's state, as `prescient status --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's version.
    pub version: String,
    /// Its hooks socket.
    pub socket: String,
    /// Its store, if it has one.
    pub store: Option<String>,
    /// The resource pool.
    pub pool: PoolStatus,
    /// Every VM it knows, by id, with its forecast and reservation.
    pub vms: Vec<VmRecord>,
    /// The forecasting model (`None`: online learning off).
    #[serde(default)]
    pub model: Option<crate::online::ModelStatus>,
    /// The last forecast served to each VM and which forecaster made it.
    #[serde(default)]
    pub forecasts: Vec<crate::store::ServedForecast>,
    /// Live migrations it ordered (the latest per VM; absent from older
    /// companions).
    #[serde(default)]
    pub migrations: Vec<crate::migration::MoveRecord>,
    /// A drain holds new VMs off this host (`prescient host undrain` ends it).
    #[serde(default)]
    pub draining: bool,
    /// The drain in force: destinations, since when, whether it was
    /// resumed after a restart and is recorded in the store (absent when
    /// not draining, and from older companions).
    #[serde(default)]
    pub drain: Option<crate::migration::DrainStatus>,
}

/// `unix_ms` as UTC, `2026-11-22T21:40:05Z`.
pub(crate) fn utc_text(unix_ms: u64) -> String {
    accel::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms))
}

/// The drain line of the status table (empty when not draining).
fn drain_text(s: &DaemonStatus) -> String {
    match &s.drain {
        Some(d) if d.unreadable.is_some() => format!(
            "DRAINING: cordoned because the drain recorded in the store is unreadable ({}); no new VMs, no VM moves; prescient host undrain ends it\n",
            d.unreadable.as_deref().unwrap_or_default()
        ),
        Some(d) => format!(
            "DRAINING since {} to {}{}{}; no new VMs; prescient host undrain ends it\n",
            d.since_unix_ms.map_or_else(|| "?".into(), utc_text),
            d.destinations.join(", "),
            if d.resumed {
                " (resumed after a restart)"
            } else {
                ""
            },
            if d.recorded {
                ""
            } else {
                " (NOT recorded in the store: a restarted daemon forgets it)"
            }
        ),
        None if s.draining => "DRAINING; no new VMs; prescient host undrain ends it\n".into(),
        None => String::new(),
    }
}

/// Asks the daemon at `socket` for its status.
pub fn query(socket: &Path, timeout: Duration) -> Result<DaemonStatus, StatusError> {
    ask(socket, &Message::StatusRequest, timeout)
}

/// Asks the daemon at `socket` to drain this host to the companions at
/// `to` (`prescient host drain`); returns its status as the drain begins.
pub fn request_drain(
    socket: &Path,
    to: &[String],
    timeout: Duration,
) -> Result<DaemonStatus, StatusError> {
    ask(socket, &Message::DrainRequest { to: to.to_vec() }, timeout)
}

/// Ends a drain of the daemon at `socket` (`prescient host undrain`).
pub fn request_undrain(socket: &Path, timeout: Duration) -> Result<DaemonStatus, StatusError> {
    ask(socket, &Message::UndrainRequest, timeout)
}

/// Sends `msg`; the answer is a status.
fn ask(socket: &Path, msg: &Message, timeout: Duration) -> Result<DaemonStatus, StatusError> {
    let mut s = UnixStream::connect(socket).map_err(|source| StatusError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let exchange = |e| StatusError::Exchange {
        path: socket.to_path_buf(),
        source: e,
    };
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| exchange(ProtoError::Io(e)))?;
    proto::write_message(&mut s, msg).map_err(exchange)?;
    match proto::read_message(&mut s).map_err(exchange)? {
        Message::Status { status } => {
            serde_json::from_value(status).map_err(|e| StatusError::Answer(e.to_string()))
        }
        Message::Error { message } => Err(StatusError::Answer(format!("error: {message}"))),
        other => Err(StatusError::Answer(other.type_name().to_string())),
    }
}

/// Columns two spaces apart; `left(c)` says which are left-aligned (the
/// others, numbers, are right-aligned).
fn render(rows: &[Vec<String>], left: impl Fn(usize) -> bool) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let w = widths[c];
            if left(c) {
                line.push_str(&format!("{cell:<w$}"));
            } else {
                line.push_str(&format!("{cell:>w$}"));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn amounts(r: &Resources) -> Vec<String> {
    Resource::ALL
        .iter()
        .map(|&k| r.get(k).to_string())
        .collect()
}

/// The status as two aligned tables (pool, then VMs).
pub fn table(s: &DaemonStatus) -> String {
    let mut head = vec!["pool".to_string()];
    head.extend(
        Resource::ALL
            .iter()
            .map(|r| format!("{} ({})", r.name(), r.unit())),
    );
    let p = &s.pool;
    let mut rows = vec![head];
    for (name, r) in [
        ("total", &p.total),
        ("host reserved", &p.host_reserved),
        ("capacity", &p.capacity),
        ("allocated", &p.allocated),
        ("free", &p.free),
    ] {
        let mut row = vec![name.to_string()];
        row.extend(amounts(r));
        rows.push(row);
    }
    let mut out = format!(
        "prescient {} on {} (store: {}); over-commit cpu {}x, memory {}x; VMs holding a reservation: {}\n{}\n",
        s.version,
        s.socket,
        s.store.as_deref().unwrap_or("none"),
        p.overcommit.cpu,
        p.overcommit.memory,
        p.reservations,
        drain_text(s)
    );
    out.push_str(&render(&rows, |c| c == 0));
    out.push('\n');
    if let Some(m) = &s.model {
        out.push_str(&format!(
            "model: {} ({}){}{}\n",
            m.loaded
                .as_deref()
                .unwrap_or("none loaded, baselines serve"),
            m.path.as_deref().unwrap_or("no file"),
            m.rejected
                .as_ref()
                .map_or_else(String::new, |r| format!("; rejected: {r}")),
            m.last_retrain
                .as_ref()
                .map_or_else(String::new, |r| format!("; last retraining: {r}")),
        ));
    }
    if !s.forecasts.is_empty() {
        let mut rows = vec![
            ["vm", "metric", "p50", "p90", "p99", "forecaster", "why"]
                .map(String::from)
                .to_vec(),
        ];
        for f in &s.forecasts {
            rows.push(vec![
                f.vm_id.clone(),
                f.metric.clone(),
                format!("{:.1}", f.quantiles[0]),
                format!("{:.1}", f.quantiles[1]),
                format!("{:.1}", f.quantiles[2]),
                f.forecaster.clone(),
                f.reason.clone(),
            ]);
        }
        out.push_str(&render(&rows, |c| !(2..5).contains(&c)));
        out.push('\n');
    }
    if s.vms.is_empty() {
        out.push_str("no VMs\n");
        return out;
    }
    let mut rows = vec![
        [
            "vm",
            "state",
            "class",
            "pid",
            "q",
            "cpu (m)",
            "mem (MiB)",
            "net",
            "disk",
            "gpu",
            "forecast",
            "short",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in &s.vms {
        let mut row = vec![
            v.vm_id.clone(),
            v.state.name().to_string(),
            if v.class.is_empty() {
                "-".into()
            } else {
                v.class.clone()
            },
            v.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            if v.quantile > 0.0 {
                format!("p{}", (v.quantile * 100.0).round())
            } else {
                "-".into()
            },
        ];
        row.extend(amounts(&v.demand));
        row.push(if v.forecast_by.is_empty() {
            "-".into()
        } else {
            v.forecast_by.clone()
        });
        row.push(if v.shortfall.is_empty() {
            "-".into()
        } else {
            v.shortfall.clone()
        });
        rows.push(row);
    }
    // Names and text left, numbers right.
    let text = render(&rows, |c| !(3..10).contains(&c));
    out.push_str(&text);
    if !s.migrations.is_empty() {
        out.push('\n');
        out.push_str(&moves_table(&s.migrations));
    }
    out
}

/// Live migrations as an aligned table.
pub fn moves_table(moves: &[crate::migration::MoveRecord]) -> String {
    let mut rows = vec![
        [
            "vm",
            "move",
            "to",
            "budget ms",
            "total ms",
            "downtime ms",
            "MB",
            "why / error",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for m in moves {
        let o = m.outcome.as_ref();
        #[allow(clippy::cast_precision_loss)]
        rows.push(vec![
            m.vm.clone(),
            m.state_name().to_string(),
            m.addr.clone().unwrap_or_else(|| {
                if m.destination.is_empty() {
                    "-".into()
                } else {
                    m.destination.clone()
                }
            }),
            m.budget
                .as_ref()
                .map_or_else(|| "-".into(), |b| b.downtime_ms.to_string()),
            o.map_or_else(|| "-".into(), |o| format!("{:.0}", o.total_ms)),
            o.map_or_else(|| "-".into(), |o| format!("{:.1}", o.downtime_ms)),
            o.map_or_else(|| "-".into(), |o| format!("{:.1}", o.bytes as f64 / 1e6)),
            m.error.clone().unwrap_or_else(|| m.reason.clone()),
        ]);
    }
    render(&rows, |c| c < 3 || c == 7)
}
