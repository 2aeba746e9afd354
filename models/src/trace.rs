//! Reading trace files (gzip CSV, see `shared/data/traces/README.md`) and
//! putting each series on the 5-minute grid of `EVALUATION.md`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ModelsError, Result};

/// Grid step in seconds.
pub const STEP_S: i64 = 300;
/// Slots per hour.
pub const SLOTS_PER_HOUR: usize = 12;
/// Slots per day.
pub const SLOTS_PER_DAY: usize = 288;

const HEADER: [&str; 9] = [
    "series",
    "ts",
    "cpu_pct",
    "mem_pct",
    "mem_kb",
    "disk_kbps",
    "net_kbps",
    "vcpus",
    "mem_cap_kb",
];

/// A measured usage column of the trace format; each is forecast on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// CPU utilisation, percent of provisioned CPU.
    CpuPct,
    /// Memory in use, percent of provisioned memory.
    MemPct,
    /// Memory in use, KiB.
    MemKb,
    /// Disk read + write, KiB/s.
    DiskKbps,
    /// Network receive + transmit, KiB/s.
    NetKbps,
}

impl Metric {
    /// All measured columns, in file order.
    pub const ALL: [Metric; 5] = [
        Metric::CpuPct,
        Metric::MemPct,
        Metric::MemKb,
        Metric::DiskKbps,
        Metric::NetKbps,
    ];

    /// The column name in the trace format.
    pub fn column(self) -> &'static str {
        match self {
            Metric::CpuPct => "cpu_pct",
            Metric::MemPct => "mem_pct",
            Metric::MemKb => "mem_kb",
            Metric::DiskKbps => "disk_kbps",
            Metric::NetKbps => "net_kbps",
        }
    }

    fn index(self) -> usize {
        match self {
            Metric::CpuPct => 0,
            Metric::MemPct => 1,
            Metric::MemKb => 2,
            Metric::DiskKbps => 3,
            Metric::NetKbps => 4,
        }
    }
}

/// Static (per-series) features. `None` where the file does not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Statics {
    /// Provisioned vCPUs.
    pub vcpus: Option<f64>,
    /// Provisioned memory, KiB.
    pub mem_cap_kb: Option<f64>,
}

/// One metric of one series on the 5-minute grid.
///
/// Slot `k` holds the values with `ts` in `(300(k-1), 300k]`, averaged;
/// `values[i]` is slot `first_slot + i`, `NaN` where the slot is empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Slot number of `values[0]`.
    pub first_slot: i64,
    /// One value per slot, `NaN` = empty.
    pub values: Vec<f64>,
}

/// The slot a timestamp falls in: the smallest `k` with `ts <= 300k`.
pub fn slot_of(ts: i64) -> i64 {
    -((-ts).div_euclid(STEP_S))
}

impl Grid {
    /// Build a grid from `(ts, value)` samples in any order.
    pub fn from_samples(samples: &[(i64, f64)]) -> Option<Grid> {
        let first = samples.iter().map(|s| slot_of(s.0)).min()?;
        let last = samples.iter().map(|s| slot_of(s.0)).max()?;
        let len = usize::try_from(last - first + 1).ok()?;
        let mut sum = vec![0.0f64; len];
        let mut count = vec![0u32; len];
        for &(ts, v) in samples {
            let Ok(i) = usize::try_from(slot_of(ts) - first) else {
                continue;
            };
            sum[i] += v;
            count[i] += 1;
        }
        let values = sum
            .iter()
            .zip(&count)
            .map(|(s, &c)| if c == 0 { f64::NAN } else { s / f64::from(c) })
            .collect();
        Some(Grid {
            first_slot: first,
            values,
        })
    }

    /// Slot number of the last slot.
    pub fn last_slot(&self) -> i64 {
        self.first_slot + self.values.len() as i64 - 1
    }

    /// Index into `values` of slot `slot`, if inside the grid.
    pub fn index_of(&self, slot: i64) -> Option<usize> {
        let i = usize::try_from(slot - self.first_slot).ok()?;
        (i < self.values.len()).then_some(i)
    }
}

/// One series of a trace file.
#[derive(Debug, Clone)]
pub struct Series {
    /// The `series` column.
    pub id: String,
    /// What keeps VMs apart in a train/test split (PlanetLab: the file name
    /// without the day; elsewhere the series id).
    pub split_key: String,
    /// Static features.
    pub statics: Statics,
    /// One grid per measured metric that has at least one value.
    pub metrics: Vec<(Metric, Grid)>,
}

/// A loaded trace file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Name used in tables: the file name without `.csv.gz` / `.csv`.
    pub name: String,
    /// Where it came from.
    pub path: PathBuf,
    /// Its series, in file order.
    pub series: Vec<Series>,
}

/// The split key of a series id: PlanetLab ids `planetlab/<day>/<name>` split
/// by `<name>` (the same VM appears on several days); others by the id.
pub fn split_key(id: &str) -> String {
    if let Some((_day, name)) = id
        .strip_prefix("planetlab/")
        .and_then(|rest| rest.split_once('/'))
    {
        return format!("planetlab/{name}");
    }
    id.to_string()
}

/// The dataset name of a path: file name without `.gz` and `.csv`.
pub fn dataset_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    let name = name.strip_suffix(".csv").unwrap_or(name);
    name.to_string()
}

struct Row {
    ts: i64,
    measured: [Option<f64>; 5],
    vcpus: Option<f64>,
    mem_cap_kb: Option<f64>,
}

fn parse_num(cell: &str, path: &Path, line: usize, col: &str) -> Result<Option<f64>> {
    if cell.is_empty() {
        return Ok(None);
    }
    let v: f64 = cell.parse().map_err(|_| ModelsError::TraceFormat {
        path: path.to_path_buf(),
        line,
        reason: format!("column {col}: {cell:?} is not a number"),
    })?;
    if !v.is_finite() {
        return Err(ModelsError::TraceFormat {
            path: path.to_path_buf(),
            line,
            reason: format!("column {col}: {cell:?} is not finite"),
        });
    }
    Ok(Some(v))
}

/// Load a trace file (gzip CSV, or plain CSV if the name does not end in
/// `.gz`).
pub fn load_trace(path: &Path) -> Result<Dataset> {
    let file = std::fs::File::open(path).map_err(|e| ModelsError::io(path, e))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    read_trace(BufReader::with_capacity(1 << 20, reader), path)
}

/// Parse trace CSV text (already decompressed) from `reader`; `path` is used
/// for names and messages only.
pub fn read_trace(mut reader: impl BufRead, path: &Path) -> Result<Dataset> {
    let mut line = String::new();
    let mut lineno = 0usize;
    let mut next = |buf: &mut String| -> Result<bool> {
        buf.clear();
        let n = reader
            .read_line(buf)
            .map_err(|e| ModelsError::io(path, e))?;
        Ok(n > 0)
    };
    if !next(&mut line)? {
        return Err(ModelsError::TraceFormat {
            path: path.to_path_buf(),
            line: 1,
            reason: "empty file".into(),
        });
    }
    lineno += 1;
    let header: Vec<&str> = line.trim_end_matches(['\n', '\r']).split(',').collect();
    if header != HEADER {
        return Err(ModelsError::TraceFormat {
            path: path.to_path_buf(),
            line: 1,
            reason: format!("header must be {:?}, found {:?}", HEADER.join(","), header),
        });
    }
    let mut series = Vec::new();
    let mut cur_id: Option<String> = None;
    let mut rows: Vec<Row> = Vec::new();
    while next(&mut line)? {
        lineno += 1;
        let text = line.trim_end_matches(['\n', '\r']);
        if text.is_empty() {
            continue;
        }
        let cells: Vec<&str> = text.split(',').collect();
        if cells.len() != 9 {
            return Err(ModelsError::TraceFormat {
                path: path.to_path_buf(),
                line: lineno,
                reason: format!("expected 9 columns, found {}", cells.len()),
            });
        }
        let ts =
            parse_num(cells[1], path, lineno, "ts")?.ok_or_else(|| ModelsError::TraceFormat {
                path: path.to_path_buf(),
                line: lineno,
                reason: "empty ts".into(),
            })?;
        let mut measured = [None; 5];
        for (k, m) in measured.iter_mut().enumerate() {
            *m = parse_num(cells[2 + k], path, lineno, HEADER[2 + k])?;
        }
        // EVALUATION.md: a mem_pct above 100 is treated as missing.
        if measured[1].is_some_and(|v| v > 100.0) {
            measured[1] = None;
        }
        if ts.abs() > 1e15 {
            return Err(ModelsError::TraceFormat {
                path: path.to_path_buf(),
                line: lineno,
                reason: format!("ts {ts} out of range"),
            });
        }
        // |ts| <= 1e15 was checked, so the cast is exact after rounding.
        #[allow(clippy::cast_possible_truncation)]
        let ts = ts.round() as i64;
        let row = Row {
            ts,
            measured,
            vcpus: parse_num(cells[7], path, lineno, "vcpus")?,
            mem_cap_kb: parse_num(cells[8], path, lineno, "mem_cap_kb")?,
        };
        if cur_id.as_deref() != Some(cells[0]) {
            if let Some(id) = cur_id.take() {
                series.extend(finish_series(id, std::mem::take(&mut rows)));
            }
            cur_id = Some(cells[0].to_string());
        }
        rows.push(row);
    }
    if let Some(id) = cur_id.take() {
        series.extend(finish_series(id, rows));
    }
    Ok(Dataset {
        name: dataset_name(path),
        path: path.to_path_buf(),
        series,
    })
}

fn finish_series(id: String, rows: Vec<Row>) -> Option<Series> {
    let has_vcpus = rows.iter().any(|r| r.vcpus.is_some());
    // Placeholder rows (EVALUATION.md): vcpus empty while other rows have it,
    // or every measured column empty.
    let kept: Vec<&Row> = rows
        .iter()
        .filter(|r| !(has_vcpus && r.vcpus.is_none()))
        .filter(|r| r.measured.iter().any(Option::is_some))
        .collect();
    let statics = Statics {
        vcpus: kept.iter().rev().find_map(|r| r.vcpus),
        mem_cap_kb: kept.iter().rev().find_map(|r| r.mem_cap_kb),
    };
    let mut metrics = Vec::new();
    for m in Metric::ALL {
        let samples: Vec<(i64, f64)> = kept
            .iter()
            .filter_map(|r| r.measured[m.index()].map(|v| (r.ts, v)))
            .collect();
        if let Some(g) = Grid::from_samples(&samples) {
            metrics.push((m, g));
        }
    }
    if metrics.is_empty() {
        return None;
    }
    Some(Series {
        split_key: split_key(&id),
        id,
        statics,
        metrics,
    })
}

/// Which part of a train/validation/test split a series belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// Used to fit the model's weights.
    Train,
    /// Held out from fitting; used to calibrate quantiles.
    Calibration,
    /// Never seen in training: what `eval` scores.
    Test,
}

/// A deterministic split by series key: FNV-1a of the key, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    /// Percent of keys in the test part.
    pub test_pct: u32,
    /// Percent of keys in the calibration part.
    pub calibration_pct: u32,
    /// Mixed into the hash so a different seed gives a different split.
    pub seed: u64,
}

impl Default for SplitSpec {
    fn default() -> Self {
        SplitSpec {
            test_pct: 30,
            calibration_pct: 20,
            seed: 0x5eed,
        }
    }
}

/// FNV-1a, 64 bit.
pub(crate) fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl SplitSpec {
    /// The part of a series with this split key.
    pub fn part(&self, key: &str) -> Part {
        let bucket = fnv1a(key.as_bytes(), self.seed) % 100;
        if bucket < u64::from(self.test_pct) {
            Part::Test
        } else if bucket < u64::from(self.test_pct + self.calibration_pct) {
            Part::Calibration
        } else {
            Part::Train
        }
    }
}

/// Count of series per part, for reporting.
pub fn split_counts(ds: &Dataset, split: &SplitSpec) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for s in &ds.series {
        let name = match split.part(&s.split_key) {
            Part::Train => "train",
            Part::Calibration => "calibration",
            Part::Test => "test",
        };
        *out.entry(name).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Dataset {
        read_trace(text.as_bytes(), Path::new("x.csv")).unwrap()
    }

    const H: &str = "series,ts,cpu_pct,mem_pct,mem_kb,disk_kbps,net_kbps,vcpus,mem_cap_kb\n";

    #[test]
    fn slot_of_uses_half_open_intervals() {
        assert_eq!(slot_of(0), 0);
        assert_eq!(slot_of(1), 1);
        assert_eq!(slot_of(300), 1);
        assert_eq!(slot_of(301), 2);
        assert_eq!(slot_of(-1), 0);
        assert_eq!(slot_of(-300), -1);
    }

    #[test]
    fn grid_averages_two_values_in_one_slot_and_leaves_gaps_empty() {
        let g = Grid::from_samples(&[(300, 2.0), (250, 4.0), (1200, 1.0)]).unwrap();
        assert_eq!(g.first_slot, 1);
        assert_eq!(g.values.len(), 4);
        assert_eq!(g.values[0], 3.0);
        assert!(g.values[1].is_nan() && g.values[2].is_nan());
        assert_eq!(g.values[3], 1.0);
    }

    #[test]
    fn reader_drops_placeholder_rows_and_high_mem_pct() {
        let text = format!(
            "{H}a,300,10,50,,,,2,\na,600,20,,,,,,\na,900,,,,,,2,\na,1200,30,150,,,,2,\n\
             b,300,1,,,,,,\n"
        );
        let ds = parse(&text);
        assert_eq!(ds.series.len(), 2);
        let a = &ds.series[0];
        assert_eq!(a.statics.vcpus, Some(2.0));
        let cpu = &a.metrics.iter().find(|m| m.0 == Metric::CpuPct).unwrap().1;
        // Row at 600 has vcpus empty while others have it; row at 900 has no
        // measured column.
        assert_eq!(cpu.values.len(), 4);
        assert_eq!(cpu.values[0], 10.0);
        assert!(cpu.values[1].is_nan());
        assert!(cpu.values[2].is_nan());
        assert_eq!(cpu.values[3], 30.0);
        let mem = &a.metrics.iter().find(|m| m.0 == Metric::MemPct).unwrap().1;
        assert_eq!(mem.values.len(), 1, "mem_pct 150 is treated as missing");
    }

    #[test]
    fn reader_rejects_bad_header_and_bad_numbers() {
        assert!(read_trace("a,b\n".as_bytes(), Path::new("x")).is_err());
        let bad = format!("{H}a,300,x,,,,,,\n");
        let err = read_trace(bad.as_bytes(), Path::new("x")).unwrap_err();
        assert!(err.to_string().contains(":2:"), "{err}");
    }

    #[test]
    fn planetlab_split_key_drops_the_day() {
        assert_eq!(
            split_key("planetlab/20110303/host_a b"),
            "planetlab/host_a b"
        );
        assert_eq!(split_key("azure-v1/123"), "azure-v1/123");
        let s = SplitSpec::default();
        assert_eq!(
            s.part(&split_key("planetlab/20110303/x")),
            s.part(&split_key("planetlab/20110420/x"))
        );
    }
}
