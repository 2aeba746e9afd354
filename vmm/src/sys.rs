//! The few raw OS calls labvm makes that no safe wrapper covers.

use std::sync::Once;

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the kick signal once per process, so the
/// signal interrupts `KVM_RUN` with `EINTR` instead of killing the process.
pub(crate) fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), on_kick));
    result
}

/// `KVM_CAP_PRE_FAULT_MEMORY`.
pub(crate) const KVM_CAP_PRE_FAULT_MEMORY: u32 = kvm_bindings::KVM_CAP_PRE_FAULT_MEMORY;

vmm_sys_util::ioctl_iowr_nr!(
    KVM_PRE_FAULT_MEMORY,
    kvm_bindings::KVMIO,
    0xd5,
    kvm_bindings::kvm_pre_fault_memory
);

/// Maps `[gpa, gpa+size)` into the guest's (EPT/NPT) page tables ahead of
/// use with `KVM_PRE_FAULT_MEMORY`, where KVM has the capability. Retries
/// the remainder after EINTR/EAGAIN, as the ioctl's contract asks.
pub(crate) fn kvm_pre_fault(vcpu: &kvm_ioctls::VcpuFd, gpa: u64, size: u64) -> std::io::Result<()> {
    let mut range = kvm_bindings::kvm_pre_fault_memory {
        gpa,
        size,
        ..Default::default()
    };
    while range.size > 0 {
        // SAFETY: `vcpu` is an open vCPU fd; the request number encodes the
        // size of kvm_pre_fault_memory, and `range` is a live, exclusively
        // borrowed value of that type that the kernel reads and updates.
        let rc = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut range)
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                _ => return Err(e),
            }
        }
    }
    Ok(())
}

/// The calling thread's kernel thread id.
pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments, cannot fail and touches no memory.
    unsafe { libc::gettid() }
}

/// Resident set size of this process in bytes, from /proc/self/statm.
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(resident * u64::try_from(page).ok()?)
}

/// Clock ticks per second of /proc's CPU times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// Fields of a /proc stat line after the command name (which may hold
/// spaces and parentheses): index 0 is the state (field 3 of proc(5)).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// CPU time (user + system) of one thread of this process, in milliseconds.
pub(crate) fn thread_cpu_ms(tid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let f = stat_fields(&stat)?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 * 1000.0 / clock_ticks() as f64)
}

/// Minor and major page faults of this process so far.
pub(crate) fn process_faults() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f = stat_fields(&stat)?;
    Some((f.get(7)?.parse().ok()?, f.get(9)?.parse().ok()?))
}

/// For each 4 KiB page of the mapping at `host` (`pages` pages), whether it
/// may hold data: present or swapped out, read from `/proc/self/pagemap`
/// (bits 63 and 62; no privilege needed for these). A page that is neither
/// has never been written (or was discarded) and reads as zeros, so a full
/// scan can skip it without faulting it in. Bit `i` of the result is page `i`.
pub(crate) fn populated_pages(host: u64, pages: u64) -> std::io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
    let mut out = vec![0u64; words];
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = 0u64;
    while page < pages {
        let n = (pages - page).min(4096);
        let len = usize::try_from(n * 8).unwrap_or(0);
        let off = (host / 4096 + page) * 8;
        f.read_exact_at(&mut buf[..len], off)?;
        for (i, e) in buf[..len].chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(e);
            let entry = u64::from_le_bytes(a);
            if entry & (3 << 62) != 0 {
                let p = page + i as u64;
                out[usize::try_from(p / 64).unwrap_or(0)] |= 1 << (p % 64);
            }
        }
        page += n;
    }
    Ok(out)
}

/// Drops the pages of `[host, host + len)` with `MADV_DONTNEED`: they hold
/// no host memory afterwards and read as zeros.
///
/// # Safety
///
/// The range must lie inside a live private anonymous mapping whose
/// contents the caller may throw away (guest RAM that is not running, or
/// pages the guest gave up).
pub(crate) unsafe fn discard(host: *mut u8, len: usize) -> std::io::Result<()> {
    // SAFETY: the caller guarantees the range lies in a live private
    // anonymous mapping whose contents may be dropped; MADV_DONTNEED then
    // only replaces them with zero-fill-on-demand pages.
    let r = unsafe { libc::madvise(host.cast::<libc::c_void>(), len, libc::MADV_DONTNEED) };
    os_result(r)
}

/// Backs the not-yet-present pages of `[host, host + len)` with zeroed
/// memory in one call (`MADV_POPULATE_WRITE`, Linux 5.14), instead of one
/// page fault per 4 KiB on first write.
///
/// # Safety
///
/// The range must lie inside a live private anonymous mapping (guest RAM).
/// Contents do not change: present pages are left as they are.
pub(crate) unsafe fn populate_write(host: *mut u8, len: usize) -> std::io::Result<()> {
    // SAFETY: the caller guarantees the range lies in a live private
    // anonymous mapping; MADV_POPULATE_WRITE only faults its missing pages
    // in as a write would, without changing any byte.
    let r = unsafe { libc::madvise(host.cast::<libc::c_void>(), len, libc::MADV_POPULATE_WRITE) };
    os_result(r)
}

/// A libc call's 0-or-error return as a `Result` (errno on failure).
fn os_result(r: libc::c_int) -> std::io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let line = "123 (a) b (c) S 1 2 3 4 5 6 77 8 99 10 11 12";
        let f = stat_fields(line).unwrap();
        assert_eq!(f[0], "S");
        assert_eq!(f[7], "77");
        assert_eq!(f[9], "99");
        assert_eq!(f[11], "11");
    }

    #[test]
    fn own_thread_cpu_and_faults_are_readable() {
        assert!(thread_cpu_ms(gettid()).is_some());
        assert!(process_faults().is_some());
        assert!(process_rss_bytes().unwrap() > 0);
    }
}
