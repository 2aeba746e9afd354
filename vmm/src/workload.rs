//! Lab workloads: what the lab guest does once it runs, and the touch lists
//! that labvm writes into guest memory for it.
//!
//! A touch list is an array of runs `(guest-physical address, pages, spin
//! cycles)`; the guest writes one stamped qword into every 4 KiB page of a
//! run, then spins for the given number of TSC cycles. Sequential, seeded
//! random and recorded-trace workloads all reduce to such lists, split over
//! the vCPUs.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::VmmError;
use crate::layout::{LARGE_PAGE, LISTS, PAGE_SIZE};

/// Bytes of one touch-list entry in guest memory.
pub(crate) const ENTRY_BYTES: u64 = 24;

/// What the lab guest does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Workload {
    /// Touch `touch_mib` MiB of the workload area front to back.
    Sequential {
        /// MiB to touch.
        touch_mib: u64,
    },
    /// Touch `touch_mib` MiB of distinct pages of the workload area, in an
    /// order drawn from `seed`. With `vary_pct` > 0, that share of the pages
    /// differs from boot to boot (drawn from `nonce`), as real bootstraps
    /// vary a little around a common core.
    Random {
        /// MiB to touch.
        touch_mib: u64,
        /// Seed of the order (the same seed gives the same pages in the same order).
        seed: u64,
        /// Percentage (0..=100) of the pages that vary per boot.
        #[serde(default)]
        vary_pct: u32,
        /// Per-boot seed of the varying pages; not part of the workload's identity.
        #[serde(skip)]
        nonce: u64,
    },
    /// Touch the pages of a bootstrap trace, in its order (see [`Trace`]).
    Trace(Trace),
    /// Signal ready at once, then keep a counter in guest memory and dirty
    /// `pages_per_sec` pages per second, cycling over `region_mib` MiB, until stopped.
    Dirty {
        /// Pages written per second (0: only the counter moves).
        pages_per_sec: u64,
        /// Size of the region the dirtied pages cycle over.
        region_mib: u64,
        /// Interval of the heartbeat the guest sends to the host (0: none).
        heartbeat_ms: u64,
    },
    /// Execute `ud2` (raises #UD): a faulting guest.
    FaultInvalidOpcode,
    /// Write to an unmapped address (raises #PF): a faulting guest.
    FaultPageFault,
    /// Spin forever without signalling ready.
    NeverReady,
    /// Run the lab guest's virtio-balloon driver (needs a balloon device):
    /// reach the initial target, touch `touch_mib` MiB of the page pool,
    /// keep `keep_mib` of it in use and free the rest, signal ready, then
    /// follow the balloon target until stopped.
    Balloon {
        /// MiB the guest touches at boot.
        touch_mib: u64,
        /// MiB of those it keeps in use (the balloon never takes them).
        keep_mib: u64,
        /// Report free pages through free page reporting once after boot.
        report_free: bool,
        /// Negotiate and set up the device, but never move the balloon
        /// (a guest that ignores its target).
        ignore_target: bool,
        /// Write to every page right after deflating it (use the memory at
        /// once); false: only hand the pages back to the guest's free pool,
        /// as Linux does.
        use_deflated: bool,
        /// 200 ms after ready, the guest needs this many MiB more in use;
        /// with `DEFLATE_ON_OOM` it takes them from the balloon when its
        /// free pages do not suffice, even below the target.
        grow_mib: u64,
    },
}

impl Workload {
    /// The workload a command-line spec names (`seq:MIB`,
    /// `rand:MIB[:SEED[:VARY_PCT]]`, `trace:PATH[:COMPUTE_PCT]`,
    /// `dirty:PPS[:REGION_MIB]`, `fault-ud`, `fault-pf`, `never-ready`,
    /// `balloon:TOUCH[:KEEP[:report|ignore|lazy|grow=MIB...]]`), with
    /// `nonce` seeding the per-boot variation of `rand`; an error names
    /// what is wrong with the spec.
    pub fn from_spec(spec: &str, nonce: u64) -> Result<Workload, String> {
        let mut parts = spec.split(':');
        let kind = parts.next().unwrap_or_default();
        let num = |s: Option<&str>, what: &str| -> Result<Option<u64>, String> {
            s.map(|s| {
                s.parse()
                    .map_err(|_| format!("bad {what} {s:?} in workload {spec:?}"))
            })
            .transpose()
        };
        let need =
            |v: Option<u64>, what: &str| v.ok_or_else(|| format!("workload {spec:?} needs {what}"));
        let w = match kind {
            "seq" => Workload::Sequential {
                touch_mib: need(num(parts.next(), "MiB")?, "MiB")?,
            },
            "rand" => Workload::Random {
                touch_mib: need(num(parts.next(), "MiB")?, "MiB")?,
                seed: num(parts.next(), "seed")?.unwrap_or(1),
                vary_pct: u32::try_from(num(parts.next(), "vary percentage")?.unwrap_or(0))
                    .map_err(|_| format!("bad vary percentage in workload {spec:?}"))?,
                nonce,
            },
            "trace" => {
                // trace:PATH or trace:PATH:COMPUTE_PCT (a path may hold colons).
                let rest = spec.strip_prefix("trace:").unwrap_or_default();
                let (path, pct) = match rest.rsplit_once(':') {
                    Some((p, pct))
                        if !pct.is_empty() && pct.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        (
                            p,
                            pct.parse::<u32>()
                                .map_err(|_| format!("bad compute percentage in {spec:?}"))?,
                        )
                    }
                    _ => (rest, 100),
                };
                return Trace::load(std::path::Path::new(path))
                    .map(|mut t| {
                        t.compute_pct = pct;
                        Workload::Trace(t)
                    })
                    .map_err(|e| e.to_string());
            }
            "dirty" => Workload::Dirty {
                pages_per_sec: need(num(parts.next(), "pages per second")?, "pages per second")?,
                region_mib: num(parts.next(), "region MiB")?.unwrap_or(64),
                heartbeat_ms: 100,
            },
            "fault-ud" => Workload::FaultInvalidOpcode,
            "fault-pf" => Workload::FaultPageFault,
            "never-ready" => Workload::NeverReady,
            "balloon" => {
                let touch_mib = need(num(parts.next(), "touch MiB")?, "touch MiB")?;
                let keep_mib = num(parts.next(), "keep MiB")?.unwrap_or(touch_mib);
                let (mut report_free, mut ignore_target, mut use_deflated) = (false, false, true);
                let mut grow_mib = 0;
                for flag in parts.by_ref() {
                    match flag {
                        "report" => report_free = true,
                        "ignore" => ignore_target = true,
                        "lazy" => use_deflated = false,
                        g if g.starts_with("grow=") => {
                            grow_mib = g["grow=".len()..]
                                .parse()
                                .map_err(|_| format!("bad grow MiB {g:?} in workload {spec:?}"))?;
                        }
                        other => {
                            return Err(format!(
                                "unknown balloon flag {other:?} in workload {spec:?}"
                            ));
                        }
                    }
                }
                Workload::Balloon {
                    touch_mib,
                    keep_mib,
                    report_free,
                    ignore_target,
                    use_deflated,
                    grow_mib,
                }
            }
            _ => return Err(format!("unknown workload {spec:?}")),
        };
        if parts.next().is_some() {
            return Err(format!("too many fields in workload {spec:?}"));
        }
        Ok(w)
    }

    /// The number the guest program dispatches on.
    pub(crate) fn guest_code(&self) -> u64 {
        match self {
            Workload::Sequential { .. } | Workload::Random { .. } | Workload::Trace(_) => 1,
            Workload::Dirty { .. } => 2,
            Workload::FaultInvalidOpcode => 3,
            Workload::FaultPageFault => 4,
            Workload::NeverReady => 5,
            Workload::Balloon { .. } => 6,
        }
    }

    /// A short name for reports.
    pub fn name(&self) -> String {
        match self {
            Workload::Sequential { touch_mib } => format!("seq-{touch_mib}M"),
            Workload::Random {
                touch_mib,
                seed,
                vary_pct,
                ..
            } => match vary_pct {
                0 => format!("rand-{touch_mib}M-s{seed}"),
                v => format!("rand-{touch_mib}M-s{seed}-v{v}"),
            },
            Workload::Trace(t) if t.compute_pct == 100 => format!("trace-{}", t.name),
            Workload::Trace(t) => format!("trace-{}-c{}", t.name, t.compute_pct),
            Workload::Dirty { pages_per_sec, .. } => format!("dirty-{pages_per_sec}pps"),
            Workload::FaultInvalidOpcode => "fault-ud".into(),
            Workload::FaultPageFault => "fault-pf".into(),
            Workload::NeverReady => "never-ready".into(),
            Workload::Balloon {
                touch_mib,
                keep_mib,
                ignore_target,
                ..
            } => format!(
                "balloon-{touch_mib}M-keep{keep_mib}M{}",
                if *ignore_target { "-ignore" } else { "" }
            ),
        }
    }

    /// Bytes that identify the workload and its parameters (for the
    /// bootstrap-package digest).
    pub fn identity(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// One run of a touch list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TouchRun {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of consecutive 4 KiB pages.
    pub pages: u64,
    /// Microseconds of compute after the run.
    pub compute_us: u64,
}

/// A bootstrap trace: the pages a bootstrap touched, in order, as offsets
/// from the start of the workload area.
///
/// File format (text, UTF-8): one touch per line, `OFFSET [PAGES [COMPUTE_US]]`,
/// fields separated by white space. OFFSET is a byte offset into the
/// workload area, decimal or `0x` hexadecimal, rounded down to its 4 KiB
/// page; PAGES (default 1) consecutive pages are touched from there;
/// COMPUTE_US (default 0) is the compute, in microseconds, between this
/// touch and the next. Blank lines and lines starting with `#` are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Name for reports (the file stem).
    pub name: String,
    /// The touches, offsets relative to the workload area.
    pub runs: Vec<TouchRun>,
    /// Percentage of the recorded compute to replay (100: as recorded;
    /// 0: the touch order alone).
    #[serde(default = "hundred")]
    pub compute_pct: u32,
}

fn hundred() -> u32 {
    100
}

impl Trace {
    /// Reads a trace file.
    pub fn load(path: &Path) -> Result<Self, VmmError> {
        let text = std::fs::read_to_string(path).map_err(|source| VmmError::TraceRead {
            path: path.to_path_buf(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "trace".into());
        Self::parse(&name, &text).map_err(|(line, reason)| VmmError::TraceParse {
            path: path.to_path_buf(),
            line,
            reason,
        })
    }

    /// Parses trace text; the error carries the 1-based line number.
    pub fn parse(name: &str, text: &str) -> Result<Self, (usize, String)> {
        let mut runs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let num = |s: Option<&str>, what: &str, default: Option<u64>| match (s, default) {
                (Some(s), _) => parse_u64(s).ok_or_else(|| (i + 1, format!("bad {what} {s:?}"))),
                (None, Some(d)) => Ok(d),
                (None, None) => Err((i + 1, format!("missing {what}"))),
            };
            let offset = num(fields.next(), "offset", None)?;
            let pages = num(fields.next(), "page count", Some(1))?;
            let compute_us = num(fields.next(), "compute time", Some(0))?;
            if fields.next().is_some() {
                return Err((i + 1, "more than three fields".into()));
            }
            if pages == 0 {
                return Err((i + 1, "page count is 0".into()));
            }
            runs.push(TouchRun {
                gpa: offset / PAGE_SIZE * PAGE_SIZE,
                pages,
                compute_us,
            });
        }
        if runs.is_empty() {
            return Err((0, "the trace has no touches".into()));
        }
        Ok(Trace {
            name: name.to_string(),
            runs,
            compute_pct: 100,
        })
    }

    /// Bytes of the workload area the trace needs (its highest touched page, exclusive).
    pub fn extent(&self) -> u64 {
        self.runs
            .iter()
            .map(|r| r.gpa.saturating_add(r.pages.saturating_mul(PAGE_SIZE)))
            .max()
            .unwrap_or(0)
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Where things go in guest memory for one workload, and each vCPU's list.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct WorkloadPlan {
    /// First byte of the workload area.
    pub area_start: u64,
    /// Per vCPU: the runs it touches, in order (absolute guest-physical addresses).
    pub lists: Vec<Vec<TouchRun>>,
}

impl WorkloadPlan {
    /// Lays out `workload` for a guest with `ram` bytes and `vcpus` vCPUs.
    pub fn new(workload: &Workload, ram: u64, vcpus: u32) -> Result<Self, VmmError> {
        let n = u64::from(vcpus.max(1));
        let entries = match workload {
            Workload::Sequential { .. } => n,
            Workload::Random { touch_mib, .. } => mib(*touch_mib) / PAGE_SIZE,
            Workload::Trace(t) => u64::try_from(t.runs.len()).unwrap_or(u64::MAX),
            _ => 0,
        };
        let list_bytes = entries.saturating_mul(ENTRY_BYTES);
        let area_start = LISTS.saturating_add(list_bytes.div_ceil(LARGE_PAGE) * LARGE_PAGE);
        let area = ram.saturating_sub(area_start);
        let too_big = |need: u64| VmmError::WorkloadTooLarge {
            workload: workload.name(),
            need_mib: need.div_ceil(1 << 20),
            have_mib: area >> 20,
        };
        let nl = usize::try_from(n).unwrap_or(1);
        let mut lists = vec![Vec::new(); nl];
        match workload {
            Workload::Sequential { touch_mib } => {
                let bytes = mib(*touch_mib);
                if bytes > area {
                    return Err(too_big(bytes));
                }
                let pages = bytes / PAGE_SIZE;
                let mut next = area_start;
                for (i, list) in lists.iter_mut().enumerate() {
                    let i = i as u64;
                    let share = pages / n + u64::from(i < pages % n);
                    if share > 0 {
                        list.push(TouchRun {
                            gpa: next,
                            pages: share,
                            compute_us: 0,
                        });
                    }
                    next += share * PAGE_SIZE;
                }
            }
            Workload::Random {
                touch_mib,
                seed,
                vary_pct,
                nonce,
            } => {
                let bytes = mib(*touch_mib);
                if bytes > area {
                    return Err(too_big(bytes));
                }
                if *vary_pct > 100 {
                    return Err(VmmError::Config(format!("vary_pct {vary_pct} is over 100")));
                }
                let order = varied_pages(
                    area / PAGE_SIZE,
                    bytes / PAGE_SIZE,
                    *seed,
                    *vary_pct,
                    *nonce,
                );
                for (k, page) in order.into_iter().enumerate() {
                    lists[k % nl].push(TouchRun {
                        gpa: area_start + page * PAGE_SIZE,
                        pages: 1,
                        compute_us: 0,
                    });
                }
            }
            Workload::Trace(t) => {
                if t.extent() > area {
                    return Err(too_big(t.extent()));
                }
                for (k, run) in t.runs.iter().enumerate() {
                    lists[k % nl].push(TouchRun {
                        gpa: area_start + run.gpa,
                        pages: run.pages,
                        compute_us: run.compute_us * u64::from(t.compute_pct) / 100,
                    });
                }
            }
            Workload::Dirty { region_mib, .. } => {
                // One page for the counter, then the dirty region.
                let need = PAGE_SIZE + mib(*region_mib);
                if need > area {
                    return Err(too_big(need));
                }
            }
            Workload::Balloon {
                touch_mib,
                keep_mib,
                ..
            } => {
                // The driver's area, then the page pool.
                if keep_mib > touch_mib {
                    return Err(VmmError::Config(format!(
                        "balloon workload keeps {keep_mib} MiB but touches only {touch_mib} MiB"
                    )));
                }
                let need = crate::layout::DRIVER_AREA + mib(*touch_mib);
                if need > area {
                    return Err(too_big(need));
                }
            }
            Workload::FaultInvalidOpcode | Workload::FaultPageFault | Workload::NeverReady => {}
        }
        Ok(WorkloadPlan { area_start, lists })
    }

    /// Every (page address) the lists touch, in list order per vCPU.
    pub fn touched_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.lists
            .iter()
            .flatten()
            .flat_map(|r| (0..r.pages).map(move |p| r.gpa + p * PAGE_SIZE))
    }
}

fn mib(m: u64) -> u64 {
    m.saturating_mul(1 << 20)
}

/// `count` distinct page indices out of `0..total`, in a seeded random order
/// (a partial Fisher-Yates shuffle driven by splitmix64).
fn random_pages(total: u64, count: u64, seed: u64) -> Vec<u64> {
    let total_usize = usize::try_from(total).unwrap_or(usize::MAX);
    let count = usize::try_from(count.min(total)).unwrap_or(total_usize);
    let mut idx: Vec<u64> = (0..total).collect();
    let mut state = seed;
    for i in 0..count {
        let remaining = (total_usize - i) as u64;
        let j = i + usize::try_from(splitmix64(&mut state) % remaining).unwrap_or(0);
        idx.swap(i, j);
    }
    idx.truncate(count);
    idx
}

/// `count` distinct pages of `0..total`: all but `vary_pct` percent drawn
/// from `seed` alone (the same every boot), the rest from the pages left,
/// drawn from `nonce`, and spread evenly through the order.
fn varied_pages(total: u64, count: u64, seed: u64, vary_pct: u32, nonce: u64) -> Vec<u64> {
    let count = count.min(total);
    let vary = count * u64::from(vary_pct.min(100)) / 100;
    let base_n = count - vary;
    // The seed's permutation decides the core; what it leaves is the pool
    // the varying pages come from.
    let perm = random_pages(total, total, seed);
    let (base, pool) = perm.split_at(usize::try_from(base_n).unwrap_or(0));
    if vary == 0 {
        return base.to_vec();
    }
    let picks = random_pages(pool.len() as u64, vary, nonce ^ 0xA076_1D64_78BD_642F);
    let varying: Vec<u64> = picks
        .into_iter()
        .map(|i| pool[usize::try_from(i).unwrap_or(0)])
        .collect();
    let stride = (count / vary).max(1);
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let (mut b, mut v) = (base.iter(), varying.iter());
    for i in 0..count {
        let next = if i % stride == stride - 1 {
            v.next().or_else(|| b.next())
        } else {
            b.next().or_else(|| v.next())
        };
        if let Some(&p) = next {
            out.push(p);
        }
    }
    out
}

/// splitmix64: a small, well-mixed, seedable generator.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {

    #[test]
    fn from_spec_reads_balloon_flags_and_refuses_bad_specs() {
        assert_eq!(
            Workload::from_spec("balloon:124:16:lazy:grow=64", 0),
            Ok(Workload::Balloon {
                touch_mib: 124,
                keep_mib: 16,
                report_free: false,
                ignore_target: false,
                use_deflated: false,
                grow_mib: 64,
            })
        );
        assert_eq!(
            Workload::from_spec("rand:8:3:5", 42),
            Ok(Workload::Random {
                touch_mib: 8,
                seed: 3,
                vary_pct: 5,
                nonce: 42,
            })
        );
        for bad in ["seq", "seq:x", "seq:1:2", "balloon:1:1:fly", "warp:1"] {
            let e = Workload::from_spec(bad, 0).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
    use super::*;
    use std::collections::HashSet;

    const MIB: u64 = 1 << 20;

    #[test]
    fn random_plan_touches_distinct_pages_inside_area_and_is_seeded() {
        let w = Workload::Random {
            touch_mib: 8,
            seed: 7,
            vary_pct: 0,
            nonce: 0,
        };
        let a = WorkloadPlan::new(&w, 64 * MIB, 2).unwrap();
        let b = WorkloadPlan::new(&w, 64 * MIB, 2).unwrap();
        assert_eq!(a, b);
        let pages: Vec<u64> = a.touched_pages().collect();
        assert_eq!(pages.len() as u64, 8 * MIB / PAGE_SIZE);
        let set: HashSet<_> = pages.iter().collect();
        assert_eq!(set.len(), pages.len());
        assert!(pages.iter().all(|&p| p >= a.area_start && p < 64 * MIB));
        let c = WorkloadPlan::new(
            &Workload::Random {
                touch_mib: 8,
                seed: 8,
                vary_pct: 0,
                nonce: 0,
            },
            64 * MIB,
            2,
        )
        .unwrap();
        assert_ne!(a.lists, c.lists);
    }

    #[test]
    fn sequential_plan_splits_contiguously_over_vcpus() {
        let w = Workload::Sequential { touch_mib: 3 };
        let p = WorkloadPlan::new(&w, 32 * MIB, 2).unwrap();
        assert_eq!(p.lists[0][0].gpa, p.area_start);
        assert_eq!(p.lists[0][0].pages + p.lists[1][0].pages, 768);
        assert_eq!(
            p.lists[1][0].gpa,
            p.area_start + p.lists[0][0].pages * PAGE_SIZE
        );
    }

    #[test]
    fn plan_larger_than_ram_is_rejected_with_sizes() {
        let err = WorkloadPlan::new(&Workload::Sequential { touch_mib: 64 }, 32 * MIB, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("64 MiB"), "{err}");
    }

    #[test]
    fn trace_parses_offsets_pages_and_compute() {
        let t = Trace::parse("t", "# comment\n0x2000\n\n12288 4\n0x10 2 50\n").unwrap();
        assert_eq!(
            t.runs,
            vec![
                TouchRun {
                    gpa: 0x2000,
                    pages: 1,
                    compute_us: 0
                },
                TouchRun {
                    gpa: 12288,
                    pages: 4,
                    compute_us: 0
                },
                TouchRun {
                    gpa: 0,
                    pages: 2,
                    compute_us: 50
                },
            ]
        );
        assert_eq!(t.extent(), 12288 + 4 * PAGE_SIZE);
    }

    #[test]
    fn trace_errors_name_the_line() {
        assert_eq!(Trace::parse("t", "0x1000\nzz\n").unwrap_err().0, 2);
        assert_eq!(Trace::parse("t", "1 0\n").unwrap_err().0, 1);
        assert_eq!(Trace::parse("t", "1 1 1 1\n").unwrap_err().0, 1);
        assert!(Trace::parse("t", "# nothing\n").is_err());
    }

    #[test]
    fn varied_pages_share_the_core_and_differ_by_the_varying_share() {
        let a = varied_pages(10_000, 1_000, 3, 5, 1);
        let b = varied_pages(10_000, 1_000, 3, 5, 2);
        assert_eq!(a.len(), 1_000);
        let sa: HashSet<u64> = a.iter().copied().collect();
        let sb: HashSet<u64> = b.iter().copied().collect();
        assert_eq!(sa.len(), 1_000);
        assert_eq!(sa.intersection(&sb).count(), 950);
        assert_eq!(
            varied_pages(10_000, 1_000, 3, 0, 9),
            random_pages(10_000, 1_000, 3)
        );
        // The nonce is not part of the identity.
        let w = |nonce| Workload::Random {
            touch_mib: 1,
            seed: 1,
            vary_pct: 5,
            nonce,
        };
        assert_eq!(w(1).identity(), w(2).identity());
    }

    #[test]
    fn random_pages_is_a_partial_permutation() {
        let v = random_pages(100, 100, 1);
        let mut s = v.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(random_pages(100, 10, 1).len(), 10);
    }
}
