//! The pre-fault engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_hooks::GuestRange;

/// What can go wrong pre-faulting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrefaultError {
    /// A planned range is not inside guest RAM or not page aligned.
    #[error("range {start:#x}+{len:#x} is not a page-aligned part of guest RAM ({ram:#x} bytes)")]
    BadRange {
        /// Start of the range.
        start: u64,
        /// Its length.
        len: u64,
        /// Size of guest RAM.
        ram: u64,
    },
    /// madvise failed (e.g. `EINVAL` on kernels before 5.14, `ENOMEM`,
    /// `EFAULT` when the host cannot provide the memory).
    #[error("madvise({what}) on {start:#x}+{len:#x} failed")]
    Madvise {
        /// Which advice.
        what: &'static str,
        /// Start of the range (guest-physical).
        start: u64,
        /// Its length.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The prefetch thread could not be started.
    #[error("cannot start the prefetch thread")]
    Thread(#[source] std::io::Error),
}

/// The host mapping of guest RAM (guest-physical 0 at `base`).
#[derive(Clone, Copy, Debug)]
pub struct HostMapping {
    base: usize,
    len: u64,
}

const PAGE: u64 = 4096;

impl HostMapping {
    /// Describes the mapping of `len` bytes of guest RAM at `base`.
    ///
    /// # Safety
    ///
    /// `base` must be the start of a private anonymous (or shared) mapping
    /// of at least `len` bytes that stays mapped for as long as this value
    /// or any copy of it (including one held by a [`Prefetcher`]) is used.
    /// Populating it must be harmless to its owner (it is guest RAM).
    pub unsafe fn new(base: *mut u8, len: u64) -> Self {
        HostMapping {
            base: base as usize,
            len,
        }
    }

    /// Size of guest RAM.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn madvise(
        &self,
        start: u64,
        len: u64,
        advice: libc::c_int,
        what: &'static str,
    ) -> Result<(), PrefaultError> {
        self.check(start, len)?;
        let addr = self.base + usize::try_from(start).unwrap_or(usize::MAX);
        let bytes = usize::try_from(len).unwrap_or(usize::MAX);
        // SAFETY: `check` proved [start, start+len) lies inside the mapping,
        // which the constructor's contract keeps mapped; madvise with these
        // advices only changes residency and paging hints, never contents.
        let rc = unsafe { libc::madvise(addr as *mut libc::c_void, bytes, advice) };
        if rc == 0 {
            Ok(())
        } else {
            Err(PrefaultError::Madvise {
                what,
                start,
                len,
                source: std::io::Error::last_os_error(),
            })
        }
    }

    fn check(&self, start: u64, len: u64) -> Result<(), PrefaultError> {
        let end = start.checked_add(len);
        if !start.is_multiple_of(PAGE)
            || !len.is_multiple_of(PAGE)
            || len == 0
            || end.is_none_or(|e| e > self.len)
        {
            return Err(PrefaultError::BadRange {
                start,
                len,
                ram: self.len,
            });
        }
        Ok(())
    }

    /// Which pages of `[start, start+len)` are resident (one bool per 4 KiB).
    fn resident(&self, start: u64, len: u64) -> Option<Vec<bool>> {
        self.check(start, len).ok()?;
        let pages = usize::try_from(len / PAGE).ok()?;
        let mut vec = vec![0u8; pages];
        let addr = self.base + usize::try_from(start).ok()?;
        // SAFETY: the range is inside the live mapping (checked above) and
        // `vec` holds exactly one byte per page of it, as mincore writes.
        let rc = unsafe {
            libc::mincore(
                addr as *mut libc::c_void,
                usize::try_from(len).ok()?,
                vec.as_mut_ptr(),
            )
        };
        (rc == 0).then(|| vec.into_iter().map(|b| b & 1 == 1).collect())
    }
}

/// Bytes of guest RAM resident in host memory now (mincore over the mapping).
pub fn resident_bytes(map: &HostMapping) -> Option<u64> {
    let mut total = 0u64;
    let mut start = 0u64;
    while start < map.len {
        let len = STEP.min(map.len - start);
        total += map.resident(start, len)?.iter().filter(|&&b| b).count() as u64 * PAGE;
        start += len;
    }
    Some(total)
}

/// Makes `[start, start+len)` of guest RAM resident and writable now
/// (`MADV_POPULATE_WRITE`), optionally asking for huge pages first.
pub fn populate(
    map: &HostMapping,
    range: GuestRange,
    hugepages: bool,
) -> Result<(), PrefaultError> {
    if hugepages {
        map.madvise(range.start, range.len, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
    }
    map.madvise(
        range.start,
        range.len,
        libc::MADV_POPULATE_WRITE,
        "MADV_POPULATE_WRITE",
    )
}

/// Checks every range before anything is touched: a plan is applied whole
/// or not at all.
pub fn validate_ranges(map: &HostMapping, ranges: &[GuestRange]) -> Result<(), PrefaultError> {
    ranges.iter().try_for_each(|r| map.check(r.start, r.len))
}

/// Populates `ranges` in order; returns the bytes populated.
pub fn populate_plan(
    map: &HostMapping,
    ranges: &[GuestRange],
    hugepages: bool,
) -> Result<u64, PrefaultError> {
    validate_ranges(map, ranges)?;
    let mut bytes = 0;
    for r in ranges {
        populate(map, *r, hugepages)?;
        bytes += r.len;
    }
    Ok(bytes)
}

/// What a prefetch thread did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefetchStats {
    /// Bytes of planned ranges populated.
    pub planned_bytes: u64,
    /// Bytes populated beyond the plan after the guest strayed from it.
    pub extended_bytes: u64,
    /// Time spent populating.
    pub busy: Duration,
    /// Misses seen: pages the guest made resident that the plan did not name.
    pub misses: u64,
    /// Bytes of planned steps skipped because the guest had already made
    /// most of them resident (it caught up with the thread).
    pub skipped_bytes: u64,
    /// The first error, after which the thread stopped (the guest goes on faulting lazily).
    pub error: Option<String>,
}

/// A thread that populates planned ranges in order while the guest runs,
/// then watches for touches outside the plan and extends to the next likely
/// ranges.
#[derive(Debug)]
pub struct Prefetcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<PrefetchStats>>,
}

/// Granularity of the prefetch thread's work and of miss detection.
const STEP: u64 = 2 << 20;

impl Prefetcher {
    /// Validates `ranges` and `extend`, populates the first `head_bytes` of
    /// `ranges` now (before the guest runs), then starts a thread for the
    /// rest and, on misses, `extend`.
    pub fn spawn(
        map: HostMapping,
        ranges: Vec<GuestRange>,
        extend: Vec<GuestRange>,
        hugepages: bool,
        head_bytes: u64,
    ) -> Result<Self, PrefaultError> {
        validate_ranges(&map, &ranges)?;
        validate_ranges(&map, &extend)?;
        // Snapshot before anything is populated: what is resident now was
        // put there by the VMM, not by the guest.
        let expected = Residency::snapshot(&map);
        let t = Instant::now();
        let (head, rest) = split_at_bytes(&ranges, head_bytes);
        let head_done = populate_plan(&map, &head, hugepages)?;
        let head_time = t.elapsed();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                let mut stats = prefetch(&map, expected, &ranges, &rest, &extend, hugepages, &flag);
                stats.planned_bytes += head_done;
                stats.busy += head_time;
                stats
            })
            .map_err(PrefaultError::Thread)?;
        Ok(Prefetcher {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread (after the step in progress) and returns what it did.
    pub fn stop(mut self) -> PrefetchStats {
        self.finish()
    }

    fn finish(&mut self) -> PrefetchStats {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(stats)) => stats,
            Some(Err(_)) => PrefetchStats {
                error: Some("the prefetch thread panicked".into()),
                ..PrefetchStats::default()
            },
            None => PrefetchStats::default(),
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Never let the thread outlive the caller's promise about the mapping.
        if self.thread.is_some() {
            self.finish();
        }
    }
}

/// The first `bytes` of `ranges` (in order) and what is left.
fn split_at_bytes(ranges: &[GuestRange], bytes: u64) -> (Vec<GuestRange>, Vec<GuestRange>) {
    let (mut head, mut rest) = (Vec::new(), Vec::new());
    let mut left = bytes / PAGE * PAGE;
    for r in ranges {
        if left >= r.len {
            head.push(*r);
            left -= r.len;
        } else if left > 0 {
            head.push(GuestRange {
                start: r.start,
                len: left,
            });
            rest.push(GuestRange {
                start: r.start + left,
                len: r.len - left,
            });
            left = 0;
        } else {
            rest.push(*r);
        }
    }
    (head, rest)
}

/// Splits ranges into steps of at most STEP bytes, in order.
fn steps(ranges: &[GuestRange]) -> impl Iterator<Item = GuestRange> + '_ {
    ranges.iter().flat_map(|r| {
        let n = r.len.div_ceil(STEP);
        (0..n).map(move |i| {
            let start = r.start + i * STEP;
            GuestRange {
                start,
                len: STEP.min(r.start + r.len - start),
            }
        })
    })
}

fn prefetch(
    map: &HostMapping,
    mut expected: Residency,
    ranges: &[GuestRange],
    todo: &[GuestRange],
    extend: &[GuestRange],
    hugepages: bool,
    stop: &AtomicBool,
) -> PrefetchStats {
    let mut stats = PrefetchStats::default();
    // Pages that are resident because of the VMM (loading the guest) or of
    // the plan are expected; any other resident page is a guest miss.
    for r in ranges {
        expected.mark(*r);
    }
    let work = |r: GuestRange, stats: &mut PrefetchStats| -> bool {
        let t = Instant::now();
        let res = populate(map, r, hugepages);
        stats.busy += t.elapsed();
        match res {
            Ok(()) => true,
            Err(e) => {
                stats.error = Some(vmm_hooks::error_chain(&e));
                false
            }
        }
    };
    for r in steps(todo) {
        if stop.load(Ordering::Relaxed) {
            return stats;
        }
        // Where the guest got first, faulting again only competes with it
        // for the same page-table locks: skip ahead.
        let done = map
            .resident(r.start, r.len)
            .map_or(0, |v| v.iter().filter(|&&b| b).count() as u64);
        if done * PAGE * 2 > r.len {
            stats.skipped_bytes += r.len;
            continue;
        }
        if !work(r, &mut stats) {
            return stats;
        }
        stats.planned_bytes += r.len;
    }
    // The plan is done: each time the guest writes outside it, take on the
    // next most likely range the plan left out.
    let mut queue = extend.iter().copied();
    while !stop.load(Ordering::Relaxed) {
        let misses = expected.new_misses(map);
        stats.misses += misses;
        for _ in 0..misses {
            let Some(r) = queue.next() else { break };
            expected.mark(r);
            for step in steps(std::slice::from_ref(&r)) {
                if stop.load(Ordering::Relaxed) {
                    return stats;
                }
                if !work(step, &mut stats) {
                    return stats;
                }
                stats.extended_bytes += step.len;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    stats
}

/// Which pages of guest RAM are expected to be resident.
struct Residency {
    pages: Vec<bool>,
}

impl Residency {
    /// What is resident now.
    fn snapshot(map: &HostMapping) -> Self {
        let mut pages = Vec::with_capacity(usize::try_from(map.len / PAGE).unwrap_or(0));
        let mut start = 0;
        while start < map.len {
            let len = STEP.min(map.len - start);
            match map.resident(start, len) {
                Some(v) => pages.extend(v),
                None => pages.extend(std::iter::repeat_n(
                    true,
                    usize::try_from(len / PAGE).unwrap_or(0),
                )),
            }
            start += len;
        }
        Residency { pages }
    }

    fn mark(&mut self, r: GuestRange) {
        let first = usize::try_from(r.start / PAGE).unwrap_or(usize::MAX);
        let n = usize::try_from(r.len.div_ceil(PAGE)).unwrap_or(0);
        for p in self.pages.iter_mut().skip(first).take(n) {
            *p = true;
        }
    }

    /// Counts resident pages not expected, and expects them from now on.
    fn new_misses(&mut self, map: &HostMapping) -> u64 {
        let mut misses = 0;
        let mut start = 0;
        while start < map.len {
            let len = STEP.min(map.len - start);
            let first = usize::try_from(start / PAGE).unwrap_or(usize::MAX);
            if let Some(v) = map.resident(start, len) {
                for (i, resident) in v.into_iter().enumerate() {
                    if let Some(e) = self.pages.get_mut(first + i)
                        && resident
                        && !*e
                    {
                        *e = true;
                        misses += 1;
                    }
                }
            }
            start += len;
        }
        misses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Anon {
        ptr: *mut u8,
        len: usize,
    }

    impl Anon {
        fn new(len: usize) -> Anon {
            // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Anon { ptr: p.cast(), len }
        }

        fn map(&self) -> HostMapping {
            // SAFETY: the mapping lives as long as `self`, which outlives every use in these tests.
            unsafe { HostMapping::new(self.ptr, self.len as u64) }
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmapping exactly the mapping created in `new`.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    fn resident_pages(m: &HostMapping, start: u64, len: u64) -> usize {
        m.resident(start, len)
            .unwrap()
            .iter()
            .filter(|&&b| b)
            .count()
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn populate_makes_exactly_the_range_resident() {
        let a = Anon::new(16 << 20);
        let m = a.map();
        assert_eq!(resident_pages(&m, 0, 16 * MIB), 0);
        populate(
            &m,
            GuestRange {
                start: 4 * MIB,
                len: 2 * MIB,
            },
            false,
        )
        .unwrap();
        assert_eq!(resident_pages(&m, 4 * MIB, 2 * MIB), 512);
        assert_eq!(resident_pages(&m, 0, 4 * MIB), 0);
        assert_eq!(resident_pages(&m, 6 * MIB, 10 * MIB), 0);
    }

    #[test]
    fn bad_ranges_are_rejected_before_anything_is_touched() {
        let a = Anon::new(8 << 20);
        let m = a.map();
        let plan = [
            GuestRange { start: 0, len: MIB },
            GuestRange {
                start: 7 * MIB,
                len: 2 * MIB,
            },
        ];
        assert!(matches!(
            populate_plan(&m, &plan, false),
            Err(PrefaultError::BadRange { .. })
        ));
        assert_eq!(
            resident_pages(&m, 0, 8 * MIB),
            0,
            "a rejected plan touched memory"
        );
        for bad in [
            GuestRange {
                start: 1,
                len: 4096,
            },
            GuestRange { start: 0, len: 100 },
            GuestRange { start: 0, len: 0 },
            GuestRange {
                start: u64::MAX - 4095,
                len: 8192,
            },
        ] {
            assert!(validate_ranges(&m, &[bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn prefetcher_populates_plan_then_extends_after_a_miss() {
        let a = Anon::new(32 << 20);
        let m = a.map();
        let plan = vec![GuestRange {
            start: 8 * MIB,
            len: 4 * MIB,
        }];
        let extend = vec![GuestRange {
            start: 24 * MIB,
            len: 2 * MIB,
        }];
        let p = Prefetcher::spawn(m, plan, extend, false, MIB).unwrap();
        // The head start is populated before spawn returns.
        assert_eq!(resident_pages(&m, 8 * MIB, MIB), 256);
        // Wait for the plan, then touch a page outside it, as a guest would.
        let t = Instant::now();
        while resident_pages(&m, 8 * MIB, 4 * MIB) < 1024 {
            assert!(t.elapsed() < Duration::from_secs(30), "plan not populated");
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: offset 16 MiB is inside the 32 MiB mapping owned by `a`.
        let page = unsafe { a.ptr.add(16 << 20) };
        // SAFETY: `page` points into the live, writable mapping owned by `a`.
        unsafe { page.write_volatile(1) };
        while resident_pages(&m, 24 * MIB, 2 * MIB) < 512 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no extension after a miss"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let stats = p.stop();
        assert_eq!(stats.planned_bytes, 4 * MIB);
        assert_eq!(stats.extended_bytes, 2 * MIB);
        assert_eq!(stats.misses, 1);
        // Nothing else was populated: the plan, the extension, the one page.
        assert_eq!(resident_pages(&m, 0, 32 * MIB), 1024 + 512 + 1);
        assert!(stats.error.is_none());
    }

    #[test]
    fn head_start_splits_the_plan_in_order() {
        let r = [
            GuestRange {
                start: 0,
                len: 3 * MIB,
            },
            GuestRange {
                start: 10 * MIB,
                len: MIB,
            },
        ];
        let (h, t) = split_at_bytes(&r, 3 * MIB + 4096);
        assert_eq!(
            h,
            vec![
                r[0],
                GuestRange {
                    start: 10 * MIB,
                    len: 4096
                }
            ]
        );
        assert_eq!(
            t,
            vec![GuestRange {
                start: 10 * MIB + 4096,
                len: MIB - 4096
            }]
        );
        let (h, t) = split_at_bytes(&r, 0);
        assert!(h.is_empty());
        assert_eq!(t, r.to_vec());
    }

    #[test]
    fn steps_split_ranges_in_order() {
        let r = [
            GuestRange {
                start: 0,
                len: 5 * MIB,
            },
            GuestRange {
                start: 10 * MIB,
                len: MIB,
            },
        ];
        let s: Vec<_> = steps(&r).map(|g| (g.start / MIB, g.len / MIB)).collect();
        assert_eq!(s, vec![(0, 2), (2, 2), (4, 1), (10, 1)]);
    }
}
