//! Saving a paused lab VM to a file and restoring it: what an interruption
//! and the later restart do (`labvm --save-on-interrupt FILE`, `labvm
//! --restore FILE`). The state is the one live migration moves (vCPU
//! registers and TSC, the lab device, guest memory) plus the balloon's.
//!
//! File format (version 1), little-endian:
//!
//! ```text
//! offset  size  field
//! 0       8     magic "LABVMSAV"
//! 8       4     format version (1)
//! 12      4     header length H (at most 1 MiB)
//! 16      H     header: JSON (VM configuration, vCPU states, lab device
//!               state, balloon configuration and state, counter)
//! then page runs, in ascending address order:
//!         8     guest-physical address (4 KiB aligned)
//!         4     pages N (1 to 256)
//!         N*4096 the pages' bytes
//! end:    8     u64::MAX, then 4 bytes 0
//! ```
//!
//! Pages never populated and pages of zeros are left out (a restored VM's
//! memory starts zeroed). The file is written to `FILE.tmp` and renamed
//! into place after `fsync`, so a crash mid-save never leaves a truncated
//! file under the final name. The reader trusts nothing: magic, version,
//! lengths, ranges and order are checked, the header is bounded, and a file
//! that ends early or has bytes after the end marker is refused.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use balloon::BalloonState;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::BalloonConfig;
use crate::vm::{LabDeviceState, LabVm, LabVmConfig, VcpuControl, VcpuState};
use crate::workload::Workload;
use crate::{PAGE_SIZE, VmmError, guest};

/// File magic.
pub const SAVE_MAGIC: [u8; 8] = *b"LABVMSAV";
/// Format version written here.
pub const SAVE_VERSION: u32 = 1;
/// Largest header accepted.
const MAX_HEADER: u32 = 1 << 20;
/// Most pages in one run.
const MAX_RUN_PAGES: u32 = 256;
const PAGE: usize = 4096;

/// What can go wrong saving or restoring.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a labvm state file this version can read.
    #[error("{path} is not a usable labvm state file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// KVM or the VM failed.
    #[error("VM")]
    Vm(#[from] VmmError),
}

#[derive(Serialize, Deserialize)]
struct SavedBalloon {
    stats_interval_ms: u64,
    grace_ms: u64,
    state: BalloonState,
}

#[derive(Serialize, Deserialize)]
struct Header {
    ram_mib: u64,
    vcpus: u32,
    workload: Workload,
    stamp: u64,
    vcpu_states: Vec<VcpuState>,
    device: LabDeviceState,
    balloon: Option<SavedBalloon>,
    counter: Option<u64>,
}

/// What a save did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SaveReport {
    /// The file.
    pub path: PathBuf,
    /// Bytes written.
    pub bytes: u64,
    /// Pages with data written.
    pub pages: u64,
    /// The guest's counter when it was paused (dirty workloads).
    pub counter: Option<u64>,
    /// Pause to file in place, ms.
    pub ms: f64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The guest's counter (dirty workloads), read from guest memory.
pub(crate) fn counter(vm: &LabVm) -> Option<u64> {
    match vm.config().workload {
        Workload::Dirty { .. } => guest::read_u64(vm.memory(), vm.workload_area_start()).ok(),
        _ => None,
    }
}

/// Pauses the VM's vCPUs and saves the VM to `path`. On success the vCPUs
/// stay paused (the caller stops the VM); on failure they are resumed and
/// nothing is left under `path`.
pub fn save(
    vm: &LabVm,
    vcpus: &VcpuControl<'_>,
    path: &Path,
    timeout: Duration,
) -> Result<SaveReport, SnapshotError> {
    let t = Instant::now();
    let states = vcpus.pause(timeout)?;
    match write_file(vm, vcpus, states, path) {
        Ok(mut r) => {
            r.ms = t.elapsed().as_secs_f64() * 1e3;
            Ok(r)
        }
        Err(e) => {
            vcpus.resume();
            Err(e)
        }
    }
}

/// Saves a VM whose vCPUs are already paused (their states `states`, as
/// [`VcpuControl::pause`] returned them) to `path`. The vCPUs stay paused
/// whatever happens: a migration in doubt must not resume its copy.
pub(crate) fn save_paused(
    vm: &LabVm,
    vcpus: &VcpuControl<'_>,
    states: Vec<VcpuState>,
    path: &Path,
) -> Result<SaveReport, SnapshotError> {
    let t = Instant::now();
    let mut r = write_file(vm, vcpus, states, path)?;
    r.ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(r)
}

fn write_file(
    vm: &LabVm,
    vcpus: &VcpuControl<'_>,
    states: Vec<VcpuState>,
    path: &Path,
) -> Result<SaveReport, SnapshotError> {
    let c = vm.config();
    let balloon = match (vm.balloon(), &c.balloon) {
        (Some(h), Some(bc)) => Some(SavedBalloon {
            stats_interval_ms: u64::try_from(bc.stats_interval.as_millis()).unwrap_or(u64::MAX),
            grace_ms: u64::try_from(bc.grace.as_millis()).unwrap_or(u64::MAX),
            state: h.state(),
        }),
        _ => None,
    };
    let header = Header {
        ram_mib: c.ram_mib,
        vcpus: c.vcpus,
        workload: c.workload.clone(),
        stamp: c.stamp,
        vcpu_states: states,
        device: vcpus.device_state(),
        balloon,
        counter: counter(vm),
    };
    let json = serde_json::to_vec(&header).map_err(|e| SnapshotError::Format {
        path: path.to_path_buf(),
        reason: format!("cannot encode the header: {e}"),
    })?;
    let hlen = u32::try_from(json.len())
        .ok()
        .filter(|&l| l <= MAX_HEADER)
        .ok_or_else(|| SnapshotError::Format {
            path: path.to_path_buf(),
            reason: format!("header of {} bytes is too large", json.len()),
        })?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = Out {
            w: BufWriter::with_capacity(1 << 20, file),
            bytes: 0,
            path: &tmp,
        };
        w.put(&SAVE_MAGIC)?;
        w.put(&SAVE_VERSION.to_le_bytes())?;
        w.put(&hlen.to_le_bytes())?;
        w.put(&json)?;
        let ram_pages = (c.ram_mib << 20) / PAGE_SIZE;
        let populated = vm.populated_pages().unwrap_or_else(|e| {
            tracing::warn!("cannot read /proc/self/pagemap ({e}); saving every non-zero page");
            vec![u64::MAX; usize::try_from(ram_pages.div_ceil(64)).unwrap_or(0)]
        });
        let mut pages = 0u64;
        let mut run: Vec<u8> = Vec::with_capacity(MAX_RUN_PAGES as usize * PAGE);
        let mut run_start = 0u64;
        let mut buf = vec![0u8; PAGE];
        for p in 0..ram_pages {
            let word = populated
                .get(usize::try_from(p / 64).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(0);
            let skip = word & (1 << (p % 64)) == 0;
            if !skip {
                vm.memory()
                    .read_slice(&mut buf, GuestAddress(p * PAGE_SIZE))
                    .map_err(|e| {
                        VmmError::GuestMemory(format!("reading page {p:#x} to save it: {e}"))
                    })?;
            }
            if skip || buf.iter().all(|&b| b == 0) {
                w.run(&mut run, run_start)?;
                continue;
            }
            if run.is_empty() {
                run_start = p;
            }
            run.extend_from_slice(&buf);
            pages += 1;
            if run.len() >= MAX_RUN_PAGES as usize * PAGE {
                w.run(&mut run, run_start)?;
            }
        }
        w.run(&mut run, run_start)?;
        w.put(&u64::MAX.to_le_bytes())?;
        w.put(&0u32.to_le_bytes())?;
        let bytes = w.bytes;
        let file = w.w.into_inner().map_err(|e| SnapshotError::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        Ok(SaveReport {
            path: path.to_path_buf(),
            bytes,
            pages,
            counter: header.counter,
            ms: 0.0,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The file being written, counting its bytes.
struct Out<'a> {
    w: BufWriter<File>,
    bytes: u64,
    path: &'a Path,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) -> Result<(), SnapshotError> {
        self.bytes += b.len() as u64;
        self.w.write_all(b).map_err(io(self.path))
    }

    /// Writes the pending run of pages starting at page `start`, if any.
    fn run(&mut self, run: &mut Vec<u8>, start: u64) -> Result<(), SnapshotError> {
        if run.is_empty() {
            return Ok(());
        }
        let n = u32::try_from(run.len() / PAGE).unwrap_or(u32::MAX);
        self.put(&(start * PAGE_SIZE).to_le_bytes())?;
        self.put(&n.to_le_bytes())?;
        self.put(run)?;
        run.clear();
        Ok(())
    }
}

/// A restored VM, ready to run from where it was saved.
#[derive(Debug)]
pub struct Restored {
    /// The VM.
    pub vm: LabVm,
    /// The guest's counter in the file (dirty workloads).
    pub counter: Option<u64>,
    /// Pages loaded.
    pub pages: u64,
}

/// Builds the VM saved in `path` and loads its memory and state.
pub fn restore(path: &Path) -> Result<Restored, SnapshotError> {
    let bad = |reason: String| SnapshotError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(io(path))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut fixed = [0u8; 16];
    read_exact(&mut r, &mut fixed, path, "the file header")?;
    if fixed[..8] != SAVE_MAGIC {
        return Err(bad("wrong magic".into()));
    }
    let version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
    if version != SAVE_VERSION {
        return Err(bad(format!(
            "format version {version} (this labvm reads {SAVE_VERSION})"
        )));
    }
    let hlen = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
    if hlen > MAX_HEADER {
        return Err(bad(format!("header of {hlen} bytes exceeds {MAX_HEADER}")));
    }
    let mut json = vec![0u8; hlen as usize];
    read_exact(&mut r, &mut json, path, "the header")?;
    let h: Header =
        serde_json::from_slice(&json).map_err(|e| bad(format!("unreadable header: {e}")))?;
    let mut config = LabVmConfig::new(h.ram_mib, h.workload);
    config.vcpus = h.vcpus;
    config.stamp = h.stamp;
    config.balloon = h.balloon.as_ref().map(|b| BalloonConfig {
        initial_target_mib: 0,
        stats_interval: Duration::from_millis(b.stats_interval_ms),
        grace: Duration::from_millis(b.grace_ms),
    });
    // Validates the configuration (RAM, vCPUs) before anything is read.
    let mut vm = LabVm::create_incoming(config)?;
    let ram = vm.config().ram_mib << 20;
    let mut next = 0u64;
    let mut pages = 0u64;
    let mut data = vec![0u8; MAX_RUN_PAGES as usize * PAGE];
    loop {
        let mut rh = [0u8; 12];
        read_exact(&mut r, &mut rh, path, "a page run")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&rh[..8]);
        let gpa = u64::from_le_bytes(a);
        let n = u32::from_le_bytes([rh[8], rh[9], rh[10], rh[11]]);
        if gpa == u64::MAX && n == 0 {
            break;
        }
        if gpa % PAGE_SIZE != 0 || n == 0 || n > MAX_RUN_PAGES || gpa < next {
            return Err(bad(format!(
                "bad page run: {n} pages at {gpa:#x} (runs must be aligned, ascending, 1 to {MAX_RUN_PAGES} pages)"
            )));
        }
        let len = u64::from(n) * PAGE_SIZE;
        match gpa.checked_add(len) {
            Some(end) if end <= ram => next = end,
            _ => {
                return Err(bad(format!(
                    "page run at {gpa:#x} of {len} bytes falls outside {ram} bytes of RAM"
                )));
            }
        }
        let buf = &mut data[..n as usize * PAGE];
        read_exact(&mut r, buf, path, "page data")?;
        vm.memory()
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|e| VmmError::GuestMemory(format!("loading {gpa:#x}: {e}")))?;
        pages += u64::from(n);
    }
    let mut rest = [0u8; 1];
    match r.read(&mut rest) {
        Ok(0) => {}
        Ok(_) => return Err(bad("bytes after the end marker".into())),
        Err(e) => {
            return Err(SnapshotError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    }
    if let Some(b) = &h.balloon {
        vm.restore_balloon(&b.state, b.grace_ms)?;
    }
    vm.restore(&h.vcpu_states, h.device)?;
    Ok(Restored {
        counter: counter(&vm),
        vm,
        pages,
    })
}

fn read_exact(
    r: &mut impl Read,
    buf: &mut [u8],
    path: &Path,
    what: &str,
) -> Result<(), SnapshotError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SnapshotError::Format {
                path: path.to_path_buf(),
                reason: format!("the file ends inside {what} (truncated)"),
            }
        } else {
            SnapshotError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        std::fs::write(&p, bytes).unwrap();
        (dir, p)
    }

    fn reason(bytes: &[u8]) -> String {
        let (_d, p) = file(bytes);
        match restore(&p) {
            Err(SnapshotError::Format { reason, .. }) => reason,
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    fn head(version: u32, hlen: u32) -> Vec<u8> {
        let mut v = SAVE_MAGIC.to_vec();
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&hlen.to_le_bytes());
        v
    }

    #[test]
    fn bad_headers_are_refused_before_any_vm_is_built() {
        assert!(reason(b"").contains("truncated"));
        assert!(reason(b"NOTLABVM\x01\0\0\0\0\0\0\0").contains("magic"));
        assert!(reason(&head(2, 0)).contains("version 2"));
        assert!(reason(&head(1, u32::MAX)).contains("exceeds"));
        assert!(reason(&head(1, 10)).contains("truncated"));
        let mut h = head(1, 4);
        h.extend_from_slice(b"{{{{");
        assert!(reason(&h).contains("unreadable header"));
    }

    proptest::proptest! {
        // Whatever follows a valid magic and version, the reader refuses it
        // with a reason and never panics (no KVM needed: every such file
        // fails before a VM is built).
        #[test]
        fn arbitrary_bytes_after_the_magic_are_refused(
            hlen in proptest::prelude::any::<u32>(),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let mut bytes = head(1, hlen);
            bytes.extend_from_slice(&body);
            let (_d, p) = file(&bytes);
            let refused = matches!(restore(&p), Err(SnapshotError::Format { .. }));
            proptest::prop_assert!(refused, "{} bytes accepted", bytes.len());
        }
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let e = restore(Path::new("/nonexistent/labvm.state")).unwrap_err();
        assert!(matches!(e, SnapshotError::Io { .. }));
        assert!(e.to_string().contains("/nonexistent/labvm.state"));
    }
}
