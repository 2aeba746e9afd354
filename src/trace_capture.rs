//! Capturing a real program's start-up memory accesses as a labvm bootstrap
//! trace, by sampling `/proc/PID/pagemap` of its anonymous writable mappings
//! (heap, anonymous mmaps, stack) while it runs.
//!
//! The program is started stopped (`sh -c 'kill -STOP $$; exec ...'`) so
//! sampling begins before its first instruction. Each sample reads which
//! pages are present; a page seen for the first time is a touch at that
//! sample's time. Mappings are laid end to end, in order of first
//! appearance, to form one offset space (each starts at a 2 MiB boundary).
//! Pages touched and freed between two samples are missed, and sampling
//! costs the program some speed; both are noted in the trace's header.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PAGE: u64 = 4096;
const ALIGN: u64 = 2 << 20;

/// What can go wrong capturing a trace.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// The program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// /proc could not be read (pagemap needs root or CAP_SYS_ADMIN for PFNs,
    /// but the present bit is readable by the process owner).
    #[error("cannot read /proc/{pid}/{what}")]
    Proc {
        /// The process.
        pid: i32,
        /// Which file.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program never started (it did not stop itself as expected).
    #[error("the program did not reach its start: {0}")]
    Start(String),
    /// Writing the trace failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One captured touch: a page offset in the trace's offset space and its
/// first-seen time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Touch {
    /// Byte offset (page aligned).
    pub offset: u64,
    /// Milliseconds from the program's start.
    pub at_ms: f64,
}

/// A captured start-up.
#[derive(Clone, Debug)]
pub struct Capture {
    /// The command line.
    pub command: Vec<String>,
    /// Touches in time order.
    pub touches: Vec<Touch>,
    /// Samples taken.
    pub samples: u64,
    /// Wall time of the program, ms.
    pub wall_ms: f64,
    /// Its exit status.
    pub status: Option<i32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Mapping {
    start: u64,
    end: u64,
}

/// Anonymous, private, writable mappings from a maps file's text.
fn anon_writable(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let _offset = f.next()?;
            let _dev = f.next()?;
            let inode = f.next()?;
            let name = f.next().unwrap_or("");
            let (s, e) = range.split_once('-')?;
            let anon = inode == "0" && (name.is_empty() || name == "[heap]" || name == "[stack]");
            (perms.starts_with("rw") && perms.ends_with('p') && anon).then(|| Mapping {
                start: u64::from_str_radix(s, 16).unwrap_or(0),
                end: u64::from_str_radix(e, 16).unwrap_or(0),
            })
        })
        .filter(|m| m.end > m.start)
        .collect()
}

/// Runs `command` to completion (or `limit`), sampling every `interval`.
pub fn capture(
    command: &[String],
    interval: Duration,
    limit: Duration,
) -> Result<Capture, CaptureError> {
    let program = command.first().cloned().unwrap_or_default();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("kill -STOP $$; exec \"$@\"")
        .arg("sh")
        .args(command)
        .spawn()
        .map_err(|source| CaptureError::Spawn {
            program: program.clone(),
            source,
        })?;
    let pid =
        i32::try_from(child.id()).map_err(|_| CaptureError::Start("pid out of range".into()))?;
    let mut status = 0;
    // SAFETY: waiting on our own child's pid with a valid status pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
    if rc != pid || !libc::WIFSTOPPED(status) {
        let _ = child.kill();
        return Err(CaptureError::Start(format!(
            "waitpid gave {rc}, status {status:#x}"
        )));
    }
    // SAFETY: signalling our own stopped child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let t0 = Instant::now();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut base: HashMap<u64, u64> = HashMap::new(); // mapping start -> offset base
    let mut next_base = 0u64;
    let mut touches = Vec::new();
    let mut samples = 0u64;
    let mut exit = None;
    let mut buf = Vec::new();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            exit = s.code();
            break;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        // Opened afresh each time: a pagemap handle stays bound to the
        // address space it was opened on, and the program execs.
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        let mut pagemap = match File::open(format!("/proc/{pid}/pagemap")) {
            Ok(f) => f,
            Err(source) if samples == 0 => {
                let _ = child.kill();
                return Err(CaptureError::Proc {
                    pid,
                    what: "pagemap",
                    source,
                });
            }
            Err(_) => continue,
        };
        let at_ms = t0.elapsed().as_secs_f64() * 1e3;
        samples += 1;
        let mut maps = anon_writable(&maps);
        maps.sort_by_key(|m| m.start);
        for m in maps {
            let pages = (m.end - m.start) / PAGE;
            buf.resize(usize::try_from(pages * 8).unwrap_or(0), 0);
            if pagemap.seek(SeekFrom::Start(m.start / PAGE * 8)).is_err()
                || pagemap.read_exact(&mut buf).is_err()
            {
                continue;
            }
            let b = *base.entry(m.start).or_insert_with(|| {
                let b = next_base;
                next_base += (m.end - m.start).div_ceil(ALIGN) * ALIGN;
                b
            });
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
                // Bit 63: present; bit 62: swapped.
                if entry >> 62 == 0 {
                    continue;
                }
                let addr = m.start + i as u64 * PAGE;
                if seen.insert(addr) {
                    touches.push(Touch {
                        offset: b + (addr - m.start),
                        at_ms,
                    });
                }
            }
        }
        std::thread::sleep(interval);
    }
    Ok(Capture {
        command: command.to_vec(),
        touches,
        samples,
        wall_ms: t0.elapsed().as_secs_f64() * 1e3,
        status: exit,
    })
}

impl Capture {
    /// Writes the trace in labvm's format with a provenance header.
    pub fn write(&self, path: &Path, interval: Duration) -> Result<(), CaptureError> {
        let err = |source| CaptureError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::io::BufWriter::new(File::create(path).map_err(err)?);
        let when = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut text = String::new();
        text.push_str("# labvm bootstrap trace (OFFSET PAGES COMPUTE_US), see README.md\n");
        // Debug quoting keeps newlines in arguments out of the trace's lines.
        text.push_str(&format!("# program: {:?}\n", self.command));
        text.push_str(&format!(
            "# captured by `prescient trace-capture` at unix time {when} on Linux {}\n",
            host.trim()
        ));
        text.push_str(&format!(
            "# method: /proc/PID/pagemap of anonymous writable mappings sampled every {} us; {} samples over {:.1} ms; exit status {:?}\n",
            interval.as_micros(),
            self.samples,
            self.wall_ms,
            self.status
        ));
        text.push_str(&format!(
            "# {} pages touched ({:.1} MiB); compute between touches is the time between the samples that first saw them\n",
            self.touches.len(),
            self.touches.len() as f64 * 4096.0 / f64::from(1 << 20)
        ));
        f.write_all(text.as_bytes()).map_err(err)?;
        for (offset, pages, compute_us) in runs(&self.touches) {
            writeln!(f, "{offset:#x} {pages} {compute_us}").map_err(err)?;
        }
        f.flush().map_err(err)
    }
}

/// Milliseconds as whole microseconds (negative: 0).
#[allow(clippy::cast_possible_truncation)] // `as` saturates; a rounded, non-negative duration is meant
fn micros(ms: f64) -> u64 {
    (ms * 1000.0).round().max(0.0) as u64
}

/// Groups touches seen in the same sample into runs of consecutive pages;
/// the last run of a sample carries the time until the next sample.
fn runs(touches: &[Touch]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    let mut last_at: Option<f64> = None;
    for t in touches {
        let new_sample = last_at.is_some_and(|a| a != t.at_ms);
        if new_sample && let (Some(prev), Some(a)) = (out.last_mut(), last_at) {
            prev.2 = micros(t.at_ms - a);
        }
        match out.last_mut() {
            Some(r) if !new_sample && r.0 + r.1 * PAGE == t.offset => r.1 += 1,
            _ => out.push((t.offset, 1, 0)),
        }
        last_at = Some(t.at_ms);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_keep_only_anonymous_private_writable_mappings() {
        let maps = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
7f0000100000-7f0000200000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6
7f0000200000-7f0000300000 rw-p 00010000 08:01 1234                       /usr/lib/libc.so.6
7f0000300000-7f0000400000 rw-s 00000000 00:05 99                         /dev/zero (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";
        let m = anon_writable(maps);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].start, 0x55d0_c000_0000);
        assert_eq!(m[2].end, 0x7ffd_0002_1000);
    }

    #[test]
    fn runs_merge_consecutive_pages_within_a_sample() {
        let t = |offset, at_ms| Touch { offset, at_ms };
        let r = runs(&[
            t(0, 1.0),
            t(4096, 1.0),
            t(3 * 4096, 1.0),
            t(8192, 2.5),
            t(12288 * 4, 2.5),
        ]);
        assert_eq!(
            r,
            vec![
                (0, 2, 0),
                (3 * 4096, 1, 1500),
                (8192, 1, 0),
                (12288 * 4, 1, 0)
            ]
        );
    }

    #[test]
    fn capturing_a_real_program_sees_its_heap_grow() {
        // A program that writes 8 MiB of fresh heap pages: the capture must
        // see at least that much.
        let cmd = vec![
            "python3".to_string(),
            "-c".to_string(),
            // The pause at the end lets the sampler see the last pages even
            // when a loaded machine delays it (pages touched right before
            // exit are the method's known blind spot, noted in the header).
            "import time\nb = bytearray(8 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\ntime.sleep(0.5)"
                .to_string(),
        ];
        if Command::new("python3").arg("-c").arg("1").output().is_err() {
            println!("SKIP capturing_a_real_program_sees_its_heap_grow: python3 not installed");
            return;
        }
        let c = capture(&cmd, Duration::from_micros(500), Duration::from_secs(60)).unwrap();
        assert_eq!(c.status, Some(0));
        assert!(
            c.touches.len() as u64 * 4096 >= 8 << 20,
            "{} pages",
            c.touches.len()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.trace");
        c.write(&path, Duration::from_micros(500)).unwrap();
        let t = labvm_trace_lines(&path);
        assert!(t > 0);
    }

    fn labvm_trace_lines(path: &Path) -> usize {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .count()
    }
}
