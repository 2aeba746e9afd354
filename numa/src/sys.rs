//! The thin system adapter: thread affinity, memory policy, per-thread CPU
//! accounting. All the crate's `unsafe` lives here, one operation per block.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};
use nix::unistd::Pid;
use thiserror::Error;

/// Why a binding could not be applied or read back.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BindError {
    /// No PU given to pin to.
    #[error("thread {tid}: empty CPU list")]
    NoCpus {
        /// Thread id.
        tid: u32,
    },
    /// A PU beyond what the kernel's CPU set type can hold.
    #[error("thread {tid}: CPU {cpu} is beyond the {limit} CPUs a cpu_set_t can name")]
    CpuOutOfRange {
        /// Thread id.
        tid: u32,
        /// The PU.
        cpu: u32,
        /// The limit.
        limit: usize,
    },
    /// `sched_setaffinity`/`sched_getaffinity` failed.
    #[error("thread {tid}: {op} failed")]
    Affinity {
        /// Thread id.
        tid: u32,
        /// Which call.
        op: &'static str,
        /// The kernel's answer (ESRCH: no such thread; EINVAL: no allowed CPU online).
        #[source]
        errno: Errno,
    },
    /// An empty node list or a node id beyond the mask we pass.
    #[error(
        "memory range {addr:#x}+{len:#x}: bad node list {nodes:?} (must be non-empty ids below {limit})"
    )]
    BadNodes {
        /// Start of the range.
        addr: usize,
        /// Length.
        len: usize,
        /// The nodes asked for.
        nodes: Vec<u32>,
        /// Highest id + 1 we can name.
        limit: usize,
    },
    /// The range is not page aligned.
    #[error("memory range {addr:#x}+{len:#x} is not aligned to the {page}-byte page size")]
    Unaligned {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
        /// Page size.
        page: usize,
    },
    /// `mbind` or `get_mempolicy` failed.
    #[error("memory range {addr:#x}+{len:#x} on nodes {nodes:?}: {op} failed")]
    MemPolicy {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
        /// The nodes involved.
        nodes: Vec<u32>,
        /// Which call.
        op: &'static str,
        /// The kernel's answer (EFAULT: range not mapped; EINVAL: node offline; EIO: pages could not move).
        #[source]
        errno: Errno,
    },
    /// mmap/munmap of an anonymous mapping failed.
    #[error("anonymous mapping of {len} bytes: {op} failed")]
    Mapping {
        /// Length.
        len: usize,
        /// Which call.
        op: &'static str,
        /// The kernel's answer.
        #[source]
        errno: Errno,
    },
    /// A /proc or cgroup file could not be read or written.
    #[error("{path}: {op} failed")]
    File {
        /// The file.
        path: PathBuf,
        /// read or write.
        op: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup setting outside what the kernel accepts.
    #[error("vm {vm}: {setting}: {reason}")]
    CgroupSetting {
        /// VM id.
        vm: String,
        /// The cgroup v2 setting name.
        setting: String,
        /// What is wrong.
        reason: String,
    },
    /// A /proc file did not have the expected shape.
    #[error("{path}: unexpected content {content:?}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was there.
        content: String,
    },
}

/// Memory policy modes (`<linux/mempolicy.h>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum MemPolicyMode {
    /// The process default (local allocation).
    Default,
    /// Prefer a node, fall back to others.
    Preferred,
    /// Only these nodes.
    Bind,
    /// Round-robin over these nodes.
    Interleave,
    /// Allocate on the node of the CPU that faults.
    Local,
    /// A mode this crate does not name.
    Other(i32),
}

impl MemPolicyMode {
    fn raw(self) -> i32 {
        match self {
            Self::Default => 0,
            Self::Preferred => 1,
            Self::Bind => 2,
            Self::Interleave => 3,
            Self::Local => 4,
            Self::Other(x) => x,
        }
    }

    fn from_raw(x: i32) -> Self {
        match x {
            0 => Self::Default,
            1 => Self::Preferred,
            2 => Self::Bind,
            3 => Self::Interleave,
            4 => Self::Local,
            other => Self::Other(other),
        }
    }
}

const MPOL_MF_STRICT: u32 = 1;
const MPOL_MF_MOVE: u32 = 2;
const MPOL_F_NODE: u64 = 1;
const MPOL_F_ADDR: u64 = 2;
/// Node mask words we pass to the kernel: 1024 nodes.
const MASK_WORDS: usize = 16;
const MASK_BITS: usize = MASK_WORDS * 64;

/// The calling thread's kernel thread id.
#[must_use]
pub fn current_tid() -> u32 {
    u32::try_from(nix::unistd::gettid().as_raw()).unwrap_or(0)
}

fn pid_of(tid: u32) -> Pid {
    Pid::from_raw(i32::try_from(tid).unwrap_or(i32::MAX))
}

/// Pin a thread (by kernel tid, any process) to these PUs.
///
/// # Errors
/// [`BindError::NoCpus`], [`BindError::CpuOutOfRange`], or the kernel's
/// refusal (no such thread, no permission, CPUs offline).
pub fn pin_thread(tid: u32, cpus: &[u32]) -> Result<(), BindError> {
    if cpus.is_empty() {
        return Err(BindError::NoCpus { tid });
    }
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu as usize)
            .map_err(|_| BindError::CpuOutOfRange {
                tid,
                cpu,
                limit: CpuSet::count(),
            })?;
    }
    sched_setaffinity(pid_of(tid), &set).map_err(|errno| BindError::Affinity {
        tid,
        op: "sched_setaffinity",
        errno,
    })?;
    tracing::debug!(tid, ?cpus, "thread pinned");
    Ok(())
}

/// The PUs a thread may run on, ascending.
///
/// # Errors
/// The kernel's refusal (no such thread).
pub fn thread_affinity(tid: u32) -> Result<Vec<u32>, BindError> {
    let set = sched_getaffinity(pid_of(tid)).map_err(|errno| BindError::Affinity {
        tid,
        op: "sched_getaffinity",
        errno,
    })?;
    Ok((0..CpuSet::count())
        .filter(|&i| set.is_set(i).unwrap_or(false))
        .filter_map(|i| u32::try_from(i).ok())
        .collect())
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or(4096)
}

fn node_mask(addr: usize, len: usize, nodes: &[u32]) -> Result<[u64; MASK_WORDS], BindError> {
    let bad = || BindError::BadNodes {
        addr,
        len,
        nodes: nodes.to_vec(),
        limit: MASK_BITS,
    };
    if nodes.is_empty() {
        return Err(bad());
    }
    let mut mask = [0u64; MASK_WORDS];
    for &n in nodes {
        let n = n as usize;
        let word = mask.get_mut(n / 64).ok_or_else(bad)?;
        *word |= 1 << (n % 64);
    }
    Ok(mask)
}

/// Set the memory policy of a host mapping range so that its pages come
/// from `nodes` (mode [`MemPolicyMode::Bind`] or `Interleave`/`Preferred`).
///
/// Call this before the range is pre-faulted so the pages land on the node.
/// With `move_existing`, pages already faulted elsewhere are migrated
/// (`MPOL_MF_MOVE | MPOL_MF_STRICT`). The range must be mapped and page
/// aligned; `mbind` changes only where pages live, never their contents.
///
/// # Errors
/// [`BindError::Unaligned`], [`BindError::BadNodes`], or the kernel's
/// refusal ([`BindError::MemPolicy`]).
pub fn bind_memory(
    addr: usize,
    len: usize,
    nodes: &[u32],
    mode: MemPolicyMode,
    move_existing: bool,
) -> Result<(), BindError> {
    let page = page_size();
    if !addr.is_multiple_of(page) || !len.is_multiple_of(page) || len == 0 {
        return Err(BindError::Unaligned { addr, len, page });
    }
    let mask = node_mask(addr, len, nodes)?;
    let flags = if move_existing {
        MPOL_MF_MOVE | MPOL_MF_STRICT
    } else {
        0
    };
    // SAFETY: mbind(2) only reads `mask` (MASK_WORDS words, live for the
    // call, and maxnode = MASK_BITS + 1 because the kernel reads maxnode - 1
    // bits) and changes the NUMA policy of [addr, addr+len); it never reads
    // or writes the range's contents, and the kernel itself rejects a range
    // that is not mapped (EFAULT), so no Rust-visible memory changes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            mode.raw(),
            mask.as_ptr(),
            MASK_BITS + 1,
            flags,
        )
    };
    if rc != 0 {
        return Err(BindError::MemPolicy {
            addr,
            len,
            nodes: nodes.to_vec(),
            op: "mbind",
            errno: Errno::last(),
        });
    }
    tracing::debug!(addr, len, ?nodes, ?mode, "memory bound");
    Ok(())
}

/// The memory policy governing the page at `addr`: mode and node list.
///
/// # Errors
/// The kernel's refusal (EFAULT if `addr` is not mapped).
pub fn memory_policy(addr: usize) -> Result<(MemPolicyMode, Vec<u32>), BindError> {
    let mut mode: libc::c_int = 0;
    let mut mask = [0u64; MASK_WORDS];
    // SAFETY: get_mempolicy(2) writes one int to `mode` and at most
    // (maxnode - 1) = MASK_BITS bits to `mask`, both local and live for the
    // call; with MPOL_F_ADDR it only looks up the policy of the VMA holding
    // `addr` and touches no memory there.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &raw mut mode,
            mask.as_mut_ptr(),
            MASK_BITS + 1,
            addr,
            MPOL_F_ADDR,
        )
    };
    if rc != 0 {
        return Err(BindError::MemPolicy {
            addr,
            len: 0,
            nodes: Vec::new(),
            op: "get_mempolicy",
            errno: Errno::last(),
        });
    }
    let nodes = (0..MASK_BITS)
        .filter(|&i| mask.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0))
        .filter_map(|i| u32::try_from(i).ok())
        .collect();
    Ok((MemPolicyMode::from_raw(mode), nodes))
}

/// The node that holds the (already faulted) page at `addr`.
///
/// # Errors
/// The kernel's refusal (EFAULT if `addr` is not mapped).
pub fn page_node(addr: usize) -> Result<u32, BindError> {
    let mut node: libc::c_int = -1;
    // SAFETY: with MPOL_F_NODE | MPOL_F_ADDR and a null mask, get_mempolicy(2)
    // writes only the node id into `node` (a live local int) and faults the
    // page in if needed, which is what a read of it would do anyway.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &raw mut node,
            std::ptr::null_mut::<u64>(),
            0usize,
            addr,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    };
    if rc != 0 {
        return Err(BindError::MemPolicy {
            addr,
            len: 0,
            nodes: Vec::new(),
            op: "get_mempolicy(MPOL_F_NODE)",
            errno: Errno::last(),
        });
    }
    u32::try_from(node).map_err(|_| BindError::MemPolicy {
        addr,
        len: 0,
        nodes: Vec::new(),
        op: "get_mempolicy(MPOL_F_NODE)",
        errno: Errno::EINVAL,
    })
}

/// A private anonymous read-write mapping, unmapped on drop: a stand-in for
/// a VMM's guest memory in tests and the benchmark.
#[derive(Debug)]
pub struct AnonMapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl AnonMapping {
    /// Map `len` bytes (rounded up to the page size), not yet faulted.
    ///
    /// # Errors
    /// [`BindError::Mapping`] if mmap fails or `len` is zero.
    pub fn new(len: usize) -> Result<Self, BindError> {
        let page = page_size();
        let len = len.div_ceil(page) * page;
        let nz = NonZeroUsize::new(len).ok_or(BindError::Mapping {
            len,
            op: "mmap",
            errno: Errno::EINVAL,
        })?;
        // SAFETY: a fresh private anonymous mapping at an address the kernel
        // chooses (None) cannot overlap any existing Rust object; we own it
        // until Drop unmaps it.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(|errno| BindError::Mapping {
            len,
            op: "mmap",
            errno,
        })?;
        Ok(Self { ptr, len })
    }

    /// Start address.
    #[must_use]
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Length in bytes (a whole number of pages).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: zero-length mappings are refused.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping as bytes (faults pages in as it is read or written).
    #[must_use]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is the start of a live read-write mapping of exactly
        // `len` bytes that this struct owns exclusively (no other alias is
        // handed out while `&mut self` is borrowed); anonymous memory is
        // zero-filled, so every byte is initialised.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }

    /// Write one byte per page so every page is faulted in.
    pub fn touch(&mut self) {
        let page = page_size();
        for chunk in self.as_mut_slice().chunks_mut(page) {
            if let Some(b) = chunk.first_mut() {
                *b = 1;
            }
        }
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping created in `new`, owned by
        // this struct; no slice borrowed from it outlives `&mut self`.
        if let Err(errno) = unsafe { munmap(self.ptr, self.len) } {
            tracing::warn!(len = self.len, %errno, "munmap of anonymous mapping failed");
        }
    }
}

// SAFETY: AnonMapping owns its mapping exclusively, like a Box<[u8]>: the
// pointer is never shared, all access goes through `&mut self`, and munmap
// may run on any thread.
unsafe impl Send for AnonMapping {}

/// CPU accounting of one thread from `/proc/<pid>/task/<tid>/schedstat`
/// and `stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ThreadCpu {
    /// Thread id.
    pub tid: u32,
    /// Nanoseconds spent running.
    pub run_ns: u64,
    /// Nanoseconds spent runnable but waiting for a CPU.
    pub wait_ns: u64,
    /// The CPU it last ran on.
    pub last_cpu: u32,
}

fn read(path: &std::path::Path) -> Result<String, BindError> {
    std::fs::read_to_string(path).map_err(|source| BindError::File {
        path: path.to_path_buf(),
        op: "read",
        source,
    })
}

/// Read a thread's CPU accounting from /proc.
///
/// # Errors
/// The files are missing (thread gone) or malformed.
pub fn thread_cpu(pid: u32, tid: u32) -> Result<ThreadCpu, BindError> {
    let dir = PathBuf::from(format!("/proc/{pid}/task/{tid}"));
    let sched_path = dir.join("schedstat");
    let sched = read(&sched_path)?;
    let mut fields = sched.split_whitespace().map(str::parse::<u64>);
    let parse_err = |path: &std::path::Path, content: &str| BindError::Parse {
        path: path.to_path_buf(),
        content: content.chars().take(120).collect(),
    };
    let (Some(Ok(run_ns)), Some(Ok(wait_ns))) = (fields.next(), fields.next()) else {
        return Err(parse_err(&sched_path, &sched));
    };
    let stat_path = dir.join("stat");
    let stat = read(&stat_path)?;
    // Field 39 (processor); the command name (field 2) may hold spaces, so
    // count from the closing parenthesis.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| parse_err(&stat_path, &stat))?;
    let last_cpu = after
        .split_whitespace()
        .nth(39 - 3)
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(|| parse_err(&stat_path, &stat))?;
    Ok(ThreadCpu {
        tid,
        run_ns,
        wait_ns,
        last_cpu,
    })
}

/// Threads of process `pid` whose name (`comm`) starts with `prefix`, e.g.
/// `labvm-vcpu`, as (tid, name), ascending tid.
///
/// # Errors
/// The process's task directory cannot be read.
pub fn threads_named(pid: u32, prefix: &str) -> Result<Vec<(u32, String)>, BindError> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let entries = std::fs::read_dir(&dir).map_err(|source| BindError::File {
        path: dir.clone(),
        op: "read",
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread may exit between readdir and read: skip it.
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim_end().to_owned();
        if comm.starts_with(prefix) {
            out.push((tid, comm));
        }
    }
    out.sort_unstable();
    Ok(out)
}
