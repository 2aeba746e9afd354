//! Where readings come from: the [`GpuSource`] seam, recorded fixtures, and
//! [`record`], which turns any source into a fixture.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::InventoryError;
use crate::model::{GpuProcess, GpuReading, Snapshot, SystemReading};
use crate::smi_xml::{MAX_XML_BYTES, parse_smi_xml};

/// A source of GPU readings. Two real implementations: the NVML backend
/// (`NvmlSource`, the live driver) and [`FixtureSource`] (a recording of a
/// real GPU: a JSON fixture or nvidia-smi XML). Every method only reads.
pub trait GpuSource {
    /// Where the readings come from, for logs and provenance.
    fn label(&self) -> String;
    /// The driver's versions.
    fn system(&self) -> Result<SystemReading, InventoryError>;
    /// Every GPU, by index.
    fn gpus(&self) -> Result<Vec<GpuReading>, InventoryError>;
    /// The processes on one GPU now (for per-VM samples between full
    /// readings).
    fn processes(&self, uuid: &str) -> Result<Vec<GpuProcess>, InventoryError>;
}

/// The fixture file format's name (`format` field).
pub const FIXTURE_FORMAT: &str = "prescient-gpu-fixture";
/// The fixture file format's version this build writes and reads.
pub const FIXTURE_VERSION: u32 = 1;

/// Where and when a fixture was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// When (RFC 3339, UTC), or the recording's own timestamp as written.
    pub recorded_at: String,
    /// The host's name (`None` when unknown, as for published XML).
    pub hostname: Option<String>,
    /// The driver version.
    pub driver_version: String,
    /// NVML's version.
    pub nvml_version: Option<String>,
    /// CUDA version the driver supports.
    pub cuda_driver_version: Option<String>,
    /// The GPU models, one per GPU.
    pub gpu_models: Vec<String>,
    /// What produced it (`nvml`, `nvidia-smi -q -x (FILE)`).
    pub source: String,
    /// Remarks (e.g. a report that disagrees with itself).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A recorded fixture: provenance and one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fixture {
    /// Always [`FIXTURE_FORMAT`].
    pub format: String,
    /// [`FIXTURE_VERSION`] when written by this build.
    pub version: u32,
    /// Where and when.
    pub provenance: Provenance,
    /// The readings.
    pub snapshot: Snapshot,
}

impl Fixture {
    /// The fixture as pretty JSON.
    pub fn to_json(&self) -> String {
        // A tree of plain data with string keys always serialises.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Reads every value from `source` into a fixture, stamped with `now` and
/// `hostname`.
pub fn record(
    source: &dyn GpuSource,
    now: SystemTime,
    hostname: Option<String>,
) -> Result<Fixture, InventoryError> {
    let system = source.system()?;
    let gpus = source.gpus()?;
    Ok(Fixture {
        format: FIXTURE_FORMAT.to_string(),
        version: FIXTURE_VERSION,
        provenance: Provenance {
            recorded_at: rfc3339(now),
            hostname,
            driver_version: system.driver_version.clone(),
            nvml_version: system.nvml_version.clone(),
            cuda_driver_version: system.cuda_driver_version.clone(),
            gpu_models: gpus.iter().map(|g| g.name.clone()).collect(),
            source: source.label(),
            notes: Vec::new(),
        },
        snapshot: Snapshot { system, gpus },
    })
}

/// This host's name (`/proc/sys/kernel/hostname`).
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `2026-11-22T16:39:46Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A recording of a real GPU host, served as a [`GpuSource`].
#[derive(Debug, Clone)]
pub struct FixtureSource {
    fixture: Fixture,
    path: Option<PathBuf>,
}

impl FixtureSource {
    /// Serves a fixture held in memory.
    pub fn new(fixture: Fixture) -> Self {
        FixtureSource {
            fixture,
            path: None,
        }
    }

    /// Loads a JSON fixture (from [`record`]) or an nvidia-smi XML report
    /// (`nvidia-smi -q -x`), told apart by their first character.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let io = |source| InventoryError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |reason: String| InventoryError::Fixture {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut bytes = Vec::new();
        let limit = u64::try_from(MAX_XML_BYTES).unwrap_or(u64::MAX);
        file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() > MAX_XML_BYTES {
            return Err(bad(format!("larger than {MAX_XML_BYTES} bytes")));
        }
        let text = String::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
        let fixture = match text.trim_start().chars().next() {
            Some('<') => {
                let log = parse_smi_xml(&text).map_err(|e| bad(e.to_string()))?;
                let system = log.snapshot.system.clone();
                Fixture {
                    format: FIXTURE_FORMAT.to_string(),
                    version: FIXTURE_VERSION,
                    provenance: Provenance {
                        recorded_at: log.timestamp.unwrap_or_else(|| "unknown".to_string()),
                        hostname: None,
                        driver_version: system.driver_version,
                        nvml_version: system.nvml_version,
                        cuda_driver_version: system.cuda_driver_version,
                        gpu_models: log.snapshot.gpus.iter().map(|g| g.name.clone()).collect(),
                        source: "nvidia-smi -q -x".to_string(),
                        notes: log.notes,
                    },
                    snapshot: log.snapshot,
                }
            }
            Some('{') => {
                let f: Fixture = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
                if f.format != FIXTURE_FORMAT {
                    return Err(bad(format!(
                        "format {:?}, not {FIXTURE_FORMAT:?}",
                        f.format.chars().take(64).collect::<String>()
                    )));
                }
                if f.version != FIXTURE_VERSION {
                    return Err(bad(format!(
                        "version {}, this build reads version {FIXTURE_VERSION}",
                        f.version
                    )));
                }
                validate(&f.snapshot).map_err(bad)?;
                f
            }
            _ => {
                return Err(bad(
                    "neither a JSON fixture ('{') nor nvidia-smi XML ('<')".to_string()
                ));
            }
        };
        Ok(FixtureSource {
            fixture,
            path: Some(path.to_path_buf()),
        })
    }

    /// The fixture served.
    pub fn fixture(&self) -> &Fixture {
        &self.fixture
    }
}

/// What a JSON fixture must satisfy for placement to trust it.
fn validate(s: &Snapshot) -> Result<(), String> {
    let mut uuids: Vec<&str> = Vec::new();
    for g in &s.gpus {
        let m = &g.memory;
        if m.used_mib > m.total_mib || m.free_mib > m.total_mib {
            return Err(format!("GPU {}: memory does not add up ({m:?})", g.uuid));
        }
        for i in &g.mig_instances {
            let im = &i.memory;
            if im.used_mib > im.total_mib
                || im.free_mib > im.total_mib
                || im.total_mib > m.total_mib
            {
                return Err(format!(
                    "GPU {} MIG instance {}: memory does not add up ({im:?})",
                    g.uuid, i.index
                ));
            }
        }
        if uuids.contains(&g.uuid.as_str()) {
            return Err(format!("two GPUs have the UUID {}", g.uuid));
        }
        uuids.push(&g.uuid);
    }
    Ok(())
}

impl GpuSource for FixtureSource {
    fn label(&self) -> String {
        match &self.path {
            Some(p) => format!(
                "fixture {} ({})",
                p.display(),
                self.fixture.provenance.source
            ),
            None => format!("fixture ({})", self.fixture.provenance.source),
        }
    }

    fn system(&self) -> Result<SystemReading, InventoryError> {
        Ok(self.fixture.snapshot.system.clone())
    }

    fn gpus(&self) -> Result<Vec<GpuReading>, InventoryError> {
        Ok(self.fixture.snapshot.gpus.clone())
    }

    fn processes(&self, uuid: &str) -> Result<Vec<GpuProcess>, InventoryError> {
        self.fixture
            .snapshot
            .gpus
            .iter()
            .find(|g| g.uuid == uuid)
            .map(|g| g.processes.clone())
            .ok_or_else(|| InventoryError::UnknownGpu {
                uuid: uuid.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_365_586)),
            "2026-11-22T16:39:46Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
