//! The lab guest's virtio-balloon driver: a freestanding program that runs
//! at CPL3 inside the lab guest (`lab.S` calls it for the balloon workload).
//!
//! It follows virtio 1.2 as a driver, not our device: it finds a
//! virtio-mmio (version 2) balloon at the address labvm gives it, resets it,
//! negotiates features (VERSION_1, STATS_VQ, DEFLATE_ON_OOM,
//! PAGE_REPORTING; MUST_TELL_HOST honoured if a device insists), sets up
//! split virtqueues numbered as Linux numbers them (inflate, deflate, then
//! stats and reporting if negotiated), sets DRIVER_OK, and then keeps its
//! balloon at `num_pages` from configuration space, writing `actual` after
//! each step. There are no interrupts at CPL3: the driver polls
//! InterruptStatus (and acknowledges it) instead, then the used rings.
//!
//! Guest memory model (the "pool" is RAM above the driver's own area):
//! ```text
//! pool_start ... used_end | free ... | balloon_bottom ... pool_end
//!  in use (keep)           free pages   in the balloon (taken top down)
//! ```
//! At boot it inflates to the initial target (pre-balloon), touches
//! `touch` bytes of the pool (stamping each page with gpa ^ stamp), keeps
//! `keep` bytes of it in use and frees the rest, signals ready, reports its
//! free pages once (if asked), then follows the target. Deflated pages are
//! used at once: the driver stamps each one. It answers every statistics
//! request (the device hands the buffer back) with fresh numbers.
//!
//! Built by `build.rs` with rustc for x86_64 as a flat binary at
//! `DRIVER_BASE`; entry: `driver_main(params)`, returns an exit status.

#![no_std]
#![no_main]

use core::panic::PanicInfo;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{Ordering, fence};

// Parameter block (must match vmm/src/guest.rs).
const P_TSC_KHZ: u64 = 0x18;
const P_STAMP: u64 = 0x20;
const B_MMIO: u64 = 0x400;
const B_AREA: u64 = 0x408;
const B_POOL_START: u64 = 0x410;
const B_POOL_END: u64 = 0x418;
const B_TOUCH: u64 = 0x420;
const B_KEEP: u64 = 0x428;
const B_FLAGS: u64 = 0x438;
const B_HEARTBEAT_MS: u64 = 0x450;
const B_GROW: u64 = 0x458;
const FLAG_REPORT: u64 = 1;
const FLAG_IGNORE_TARGET: u64 = 2;
const FLAG_LAZY_DEFLATE: u64 = 4;

// Lab device (must match vmm/src/labdev.rs).
const LABDEV: u64 = 0xF_0000_0000;
const R_READY: u64 = 0x00;
const R_PROGRESS: u64 = 0x08;
const R_LOG: u64 = 0x18;
const R_HEARTBEAT: u64 = 0x28;

// virtio-mmio registers (virtio 1.2, 4.2.2).
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;
const CFG_NUM_PAGES: u64 = CONFIG;
const CFG_ACTUAL: u64 = CONFIG + 4;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 64;
const S_FAILED: u32 = 128;

const F_MUST_TELL_HOST: u64 = 1 << 0;
const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_PAGE_REPORTING: u64 = 1 << 5;
const F_VERSION_1: u64 = 1 << 32;

const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;

const VIRTIO_ID_BALLOON: u32 = 5;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

const PAGE: u64 = 4096;
const REPORT_CHUNK: u64 = 2 << 20;
const QUEUE_SIZE: u16 = 256;
/// PFNs in one inflate or deflate buffer (Linux uses 256; any size is valid).
const PFNS_PER_BUF: u64 = 4096;
/// Buffers per inflate or deflate batch.
const BUFS_PER_BATCH: u64 = 16;
/// Descriptors per reporting chain (Linux: 32).
const REPORT_SG: u64 = 32;

// Driver area layout.
const QUEUE_STRIDE: u64 = 0x4000;
const STATS_BUF: u64 = 0x10000;
const PFN_BUFS: u64 = 0x20000;

// Exit statuses (the driver failed; the host sees them as the guest's exit).
const EXIT_NO_DEVICE: u64 = 0xB0;
const EXIT_FEATURES: u64 = 0xB1;
const EXIT_QUEUE: u64 = 0xB2;
const EXIT_DEVICE_STUCK: u64 = 0xB3;

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The prebuilt libcore refers to the unwinding personality routine even with
/// panic=abort; nothing unwinds here, so it is never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Memory set and copy for the compiler (no libc here); `rep` string
/// instructions run at CPL3.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller (compiler-generated code) passes a writable range of n bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8, options(nostack));
    }
    d
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes non-overlapping ranges of n bytes.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _, options(nostack));
    }
    d
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
        // SAFETY: forward copy is safe when the destination starts before the source or after it.
        unsafe { memcpy(d, s, n) }
    } else {
        let mut i = n;
        while i > 0 {
            i -= 1;
            // SAFETY: i < n, inside both ranges.
            unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        }
        d
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: both ranges hold n bytes.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

fn rd64(addr: u64) -> u64 {
    // SAFETY: guest-physical addresses are identity-mapped user pages; the
    // host placed the parameter block and the areas named in it in RAM.
    unsafe { read_volatile(addr as *const u64) }
}

fn wr64(addr: u64, v: u64) {
    // SAFETY: as rd64; also used for MMIO writes to the lab device.
    unsafe { write_volatile(addr as *mut u64, v) }
}

fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc reads the time-stamp counter; allowed at CPL3 here.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn log(msg: &'static [u8]) {
    // The lab device reads a NUL-terminated string at the address written.
    wr64(LABDEV + R_LOG, msg.as_ptr() as u64);
}

/// The device's register window.
struct Mmio(u64);

impl Mmio {
    fn r(&self, off: u64) -> u32 {
        // SAFETY: the window is an MMIO page mapped by the guest page tables.
        unsafe { read_volatile((self.0 + off) as *const u32) }
    }
    fn w(&self, off: u64, v: u32) {
        // SAFETY: as r.
        unsafe { write_volatile((self.0 + off) as *mut u32, v) }
    }
    fn status(&self) -> u32 {
        self.r(STATUS)
    }
    fn add_status(&self, bits: u32) {
        let s = self.status();
        self.w(STATUS, s | bits);
    }
    /// Reads a configuration field consistently (virtio 1.2, 4.2.2.2:
    /// re-read while ConfigGeneration changes).
    fn config32(&self, off: u64) -> u32 {
        loop {
            let g = self.r(CONFIG_GENERATION);
            let v = self.r(off);
            if self.r(CONFIG_GENERATION) == g {
                return v;
            }
        }
    }
}

/// A split virtqueue the driver owns.
struct Vq {
    index: u32,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    last_used: u16,
}

impl Vq {
    /// Sets queue `index` up in `base` (16 KiB, zeroed here); None when the
    /// device has no such queue or refuses it.
    fn setup(m: &Mmio, index: u32, base: u64) -> Option<Vq> {
        m.w(QUEUE_SEL, index);
        if m.r(QUEUE_READY) != 0 {
            return None;
        }
        let max = m.r(QUEUE_NUM_MAX);
        if max == 0 {
            return None;
        }
        let size = if max < u32::from(QUEUE_SIZE) { max as u16 } else { QUEUE_SIZE };
        // The size must be a power of two for a split queue.
        let size = if size.is_power_of_two() { size } else { 1 << (15 - size.leading_zeros()) };
        let mut a = base;
        while a < base + QUEUE_STRIDE {
            wr64(a, 0);
            a += 8;
        }
        let q = Vq {
            index,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_avail: 0,
            last_used: 0,
        };
        m.w(QUEUE_NUM, u32::from(size));
        m.w(QUEUE_DESC_LOW, q.desc as u32);
        m.w(QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
        m.w(QUEUE_DRIVER_LOW, q.avail as u32);
        m.w(QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32);
        m.w(QUEUE_DEVICE_LOW, q.used as u32);
        m.w(QUEUE_DEVICE_HIGH, (q.used >> 32) as u32);
        m.w(QUEUE_READY, 1);
        if m.r(QUEUE_READY) != 1 || m.status() & S_NEEDS_RESET != 0 {
            return None;
        }
        Some(q)
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + u64::from(i) * 16;
        wr64(d, addr);
        let w = u64::from(len) | (u64::from(flags) << 32) | (u64::from(next) << 48);
        wr64(d + 8, w);
    }

    /// Puts a chain of `bufs` (address, length) starting at descriptor
    /// `first` on the available ring (not yet published).
    fn add(&mut self, first: u16, bufs: &[(u64, u32)], write: bool) {
        let n = bufs.len() as u16;
        for (k, &(addr, len)) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            if (k as u16) + 1 < n {
                flags |= DESC_F_NEXT;
            }
            self.set_desc(i, addr, len, flags, i + 1);
        }
        let slot = self.avail + 4 + u64::from(self.next_avail % self.size) * 2;
        // SAFETY: slot is inside this queue's available ring.
        unsafe { write_volatile(slot as *mut u16, first) };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes the added chains visible and notifies the device.
    fn kick(&self, m: &Mmio) {
        fence(Ordering::SeqCst);
        // SAFETY: avail + 2 is the ring's idx field.
        unsafe { write_volatile((self.avail + 2) as *mut u16, self.next_avail) };
        fence(Ordering::SeqCst);
        m.w(QUEUE_NOTIFY, self.index);
    }

    fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        // SAFETY: used + 2 is the used ring's idx field.
        unsafe { read_volatile((self.used + 2) as *const u16) }
    }

    /// Takes one used element if there is one; returns its head id.
    fn pop_used(&mut self) -> Option<u32> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let e = self.used + 4 + u64::from(self.last_used % self.size) * 8;
        // SAFETY: e is an element of the used ring.
        let id = unsafe { read_volatile(e as *const u32) };
        self.last_used = self.last_used.wrapping_add(1);
        Some(id)
    }

    /// Waits until the device used everything submitted (bounded by
    /// `timeout` TSC cycles); false when it did not.
    fn wait_all(&mut self, timeout: u64) -> bool {
        let start = rdtsc();
        loop {
            while self.pop_used().is_some() {}
            if self.last_used == self.next_avail {
                return true;
            }
            if rdtsc().wrapping_sub(start) > timeout {
                return false;
            }
            core::hint::spin_loop();
        }
    }
}

struct Driver {
    m: Mmio,
    features: u64,
    inflate: Vq,
    deflate: Vq,
    stats: Option<Vq>,
    reporting: Option<Vq>,
    area: u64,
    pool_start: u64,
    pool_end: u64,
    used_end: u64,
    balloon_bottom: u64,
    stamp: u64,
    tsc_khz: u64,
    touched: u64,
    use_deflated: bool,
}

impl Driver {
    fn balloon_pages(&self) -> u64 {
        (self.pool_end - self.balloon_bottom) / PAGE
    }

    fn free_bytes(&self) -> u64 {
        self.balloon_bottom - self.used_end
    }

    fn ms(&self, n: u64) -> u64 {
        n * self.tsc_khz
    }

    fn stuck(&self) -> u64 {
        self.m.add_status(S_FAILED);
        log(b"balloon driver: device did not use its buffers\0");
        EXIT_DEVICE_STUCK
    }

    /// Fills the PFN buffers with `pages` PFNs from `first` (ascending) and
    /// submits them on `inflate` or `deflate`; waits for the device.
    fn move_pages(&mut self, inflate: bool, first: u64, pages: u64) -> Result<(), u64> {
        let timeout = self.ms(2000);
        let base = self.area + PFN_BUFS;
        let mut done = 0u64;
        let mut buf = 0u64;
        let mut descs = 0u16;
        while done < pages {
            let n = (pages - done).min(PFNS_PER_BUF);
            let addr = base + buf * PFNS_PER_BUF * 4;
            for k in 0..n {
                let pfn = ((first + (done + k) * PAGE) / PAGE) as u32;
                // SAFETY: addr + 4k lies in this buffer of the driver area.
                unsafe { write_volatile((addr + k * 4) as *mut u32, pfn) };
            }
            let q = if inflate { &mut self.inflate } else { &mut self.deflate };
            q.add(descs, &[(addr, (n * 4) as u32)], false);
            descs += 1;
            buf += 1;
            done += n;
        }
        let q = if inflate { &mut self.inflate } else { &mut self.deflate };
        q.kick(&self.m);
        if q.wait_all(timeout) { Ok(()) } else { Err(self.stuck()) }
    }

    fn write_actual(&self) {
        self.m.w(CFG_ACTUAL, self.balloon_pages() as u32);
    }

    /// One step toward `target` pages; true when something moved.
    fn follow(&mut self, target: u64) -> Result<bool, u64> {
        let have = self.balloon_pages();
        let batch = PFNS_PER_BUF * BUFS_PER_BATCH;
        if have < target {
            // Only free pages go into the balloon; pages in use stay.
            let n = (target - have).min(batch).min(self.free_bytes() / PAGE);
            if n == 0 {
                return Ok(false);
            }
            let first = self.balloon_bottom - n * PAGE;
            self.move_pages(true, first, n)?;
            self.balloon_bottom = first;
        } else if have > target {
            let n = (have - target).min(batch);
            let first = self.balloon_bottom;
            // Tell the host before using the pages: required with
            // MUST_TELL_HOST, and what this driver always does.
            self.move_pages(false, first, n)?;
            self.balloon_bottom = first + n * PAGE;
            // Use the pages we got back (unless asked to only free them).
            if self.use_deflated {
                let mut p = first;
                while p < first + n * PAGE {
                    wr64(p, p ^ self.stamp);
                    p += PAGE;
                }
                self.touched += n;
                wr64(LABDEV + R_PROGRESS, self.touched);
            }
        } else {
            return Ok(false);
        }
        self.write_actual();
        Ok(true)
    }

    /// Sends statistics (the buffer is descriptor 0 of the stats queue).
    fn send_stats(&mut self) {
        // RAM starts at 0 and ends at pool_end; the balloon is not the guest's.
        let total = self.pool_end - self.balloon_pages() * PAGE;
        let free = self.balloon_bottom - self.used_end;
        let Some(q) = self.stats.as_mut() else {
            return;
        };
        let entries: [(u16, u64); 5] = [
            (2, 0),     // major faults
            (3, 0),     // minor faults
            (4, free),  // free memory
            (5, total), // total memory
            (6, free),  // available memory
        ];
        let buf = self.area + STATS_BUF;
        for (k, &(tag, val)) in entries.iter().enumerate() {
            let e = buf + k as u64 * 10;
            // SAFETY: the stats buffer in the driver area holds 64 entries.
            unsafe {
                write_volatile(e as *mut u16, tag);
            }
            // SAFETY: as above; entries are packed (unaligned u64).
            unsafe {
                core::ptr::write_unaligned((e + 2) as *mut u64, val);
            }
        }
        q.add(0, &[(buf, (entries.len() * 10) as u32)], false);
        q.kick(&self.m);
    }

    /// The guest needs `bytes` more memory in use. Free pages first; with
    /// DEFLATE_ON_OOM, pages from the balloon for the rest (virtio 1.2,
    /// 5.5.6.1: the driver may use balloon pages below the target when the
    /// system needs them), telling the device through the deflate queue.
    fn grow(&mut self, bytes: u64) -> Result<(), u64> {
        let free = self.free_bytes();
        if bytes > free && self.features & F_DEFLATE_ON_OOM != 0 {
            let need = (bytes - free).min(self.pool_end - self.balloon_bottom) / PAGE;
            let mut done = 0;
            while done < need {
                let n = (need - done).min(PFNS_PER_BUF * BUFS_PER_BATCH);
                let first = self.balloon_bottom;
                self.move_pages(false, first, n)?;
                self.balloon_bottom = first + n * PAGE;
                done += n;
            }
            self.write_actual();
            log(b"balloon driver: deflated on OOM\0");
        }
        let end = (self.used_end + bytes).min(self.balloon_bottom);
        let mut p = self.used_end;
        while p < end {
            wr64(p, p ^ self.stamp);
            p += PAGE;
            self.touched += 1;
        }
        self.used_end = end;
        wr64(LABDEV + R_PROGRESS, self.touched);
        Ok(())
    }

    /// Reports the free part of the pool in 2 MiB blocks (like Linux's
    /// page reporting at pageblock order), REPORT_SG blocks per chain.
    fn report_free(&mut self) -> Result<(), u64> {
        let timeout = self.ms(2000);
        let Some(q) = self.reporting.as_mut() else {
            return Ok(());
        };
        let lo = self.used_end.div_ceil(REPORT_CHUNK) * REPORT_CHUNK;
        let hi = self.balloon_bottom / REPORT_CHUNK * REPORT_CHUNK;
        let mut a = lo;
        while a < hi {
            let mut sg = [(0u64, 0u32); REPORT_SG as usize];
            let mut n = 0usize;
            while a < hi && n < sg.len() {
                sg[n] = (a, REPORT_CHUNK as u32);
                n += 1;
                a += REPORT_CHUNK;
            }
            q.add(0, &sg[..n], true);
            q.kick(&self.m);
            if !q.wait_all(timeout) {
                return Err(self.stuck());
            }
        }
        Ok(())
    }
}

fn fail(m: &Mmio, code: u64, msg: &'static [u8]) -> u64 {
    m.add_status(S_FAILED);
    log(msg);
    code
}

/// Entry point: `params` is the lab guest's parameter block.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.entry")]
pub extern "C" fn driver_main(params: u64) -> u64 {
    let m = Mmio(rd64(params + B_MMIO));
    let flags = rd64(params + B_FLAGS);
    let tsc_khz = rd64(params + P_TSC_KHZ).max(1);
    let heartbeat_ms = rd64(params + B_HEARTBEAT_MS);

    // 4.2.3.1: check magic, version and device id.
    if m.r(MAGIC) != 0x7472_6976 || m.r(VERSION) != 2 || m.r(DEVICE_ID) != VIRTIO_ID_BALLOON {
        log(b"balloon driver: no virtio-mmio v2 balloon found\0");
        return EXIT_NO_DEVICE;
    }
    // 3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    m.w(STATUS, 0);
    while m.status() != 0 {
        core::hint::spin_loop();
    }
    m.add_status(S_ACKNOWLEDGE);
    m.add_status(S_DRIVER);
    m.w(DEVICE_FEATURES_SEL, 0);
    let lo = u64::from(m.r(DEVICE_FEATURES));
    m.w(DEVICE_FEATURES_SEL, 1);
    let hi = u64::from(m.r(DEVICE_FEATURES));
    let offered = lo | (hi << 32);
    if offered & F_VERSION_1 == 0 {
        return fail(&m, EXIT_FEATURES, b"balloon driver: device is not virtio 1.x\0");
    }
    let wanted = F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING | F_MUST_TELL_HOST;
    let features = offered & wanted;
    m.w(DRIVER_FEATURES_SEL, 0);
    m.w(DRIVER_FEATURES, features as u32);
    m.w(DRIVER_FEATURES_SEL, 1);
    m.w(DRIVER_FEATURES, (features >> 32) as u32);
    m.add_status(S_FEATURES_OK);
    if m.status() & S_FEATURES_OK == 0 {
        return fail(&m, EXIT_FEATURES, b"balloon driver: device refused our features\0");
    }
    // Queues, numbered as Linux numbers them.
    let area = rd64(params + B_AREA);
    let mut next = 0u32;
    let mut queue = |m: &Mmio| {
        let q = Vq::setup(m, next, area + u64::from(next) * QUEUE_STRIDE);
        next += 1;
        q
    };
    let (Some(inflate), Some(deflate)) = (queue(&m), queue(&m)) else {
        return fail(&m, EXIT_QUEUE, b"balloon driver: inflate/deflate queue setup failed\0");
    };
    let stats = if features & F_STATS_VQ != 0 {
        match queue(&m) {
            Some(q) => Some(q),
            None => return fail(&m, EXIT_QUEUE, b"balloon driver: stats queue setup failed\0"),
        }
    } else {
        None
    };
    let reporting = if features & F_PAGE_REPORTING != 0 {
        match queue(&m) {
            Some(q) => Some(q),
            None => return fail(&m, EXIT_QUEUE, b"balloon driver: reporting queue setup failed\0"),
        }
    } else {
        None
    };
    m.add_status(S_DRIVER_OK);
    log(b"balloon driver: DRIVER_OK\0");

    let pool_start = rd64(params + B_POOL_START);
    let pool_end = rd64(params + B_POOL_END);
    let touch = rd64(params + B_TOUCH).min(pool_end - pool_start);
    let keep = rd64(params + B_KEEP).min(touch);
    let mut d = Driver {
        m,
        features,
        inflate,
        deflate,
        stats,
        reporting,
        area,
        pool_start,
        pool_end,
        used_end: pool_start + keep,
        balloon_bottom: pool_end,
        stamp: rd64(params + P_STAMP),
        tsc_khz,
        touched: 0,
        use_deflated: flags & FLAG_LAZY_DEFLATE == 0,
    };
    let ignore = flags & FLAG_IGNORE_TARGET != 0;
    // 5.5.6: the device holds one stats buffer from the start.
    d.send_stats();

    // Pre-balloon: reach the initial target before using memory.
    if !ignore {
        let target = u64::from(d.m.config32(CFG_NUM_PAGES));
        loop {
            match d.follow(target) {
                Ok(true) => {}
                Ok(false) => break,
                Err(code) => return code,
            }
        }
    }
    // Boot: touch memory, keep part of it in use.
    let end = (d.pool_start + touch).min(d.balloon_bottom);
    let mut p = d.pool_start;
    while p < end {
        wr64(p, p ^ d.stamp);
        p += PAGE;
        d.touched += 1;
    }
    wr64(LABDEV + R_PROGRESS, d.touched);
    wr64(LABDEV + R_READY, 1);
    if flags & FLAG_REPORT != 0 && d.reporting.is_some() {
        if let Err(code) = d.report_free() {
            return code;
        }
        log(b"balloon driver: free pages reported\0");
    }

    let mut grow = rd64(params + B_GROW);
    let grow_at = rdtsc() + d.ms(200);
    let mut last_beat = rdtsc();
    let mut last_poll = 0u64;
    let mut target = u64::from(d.m.config32(CFG_NUM_PAGES));
    let mut busy = true;
    loop {
        let now = rdtsc();
        if !busy && now.wrapping_sub(last_poll) < d.ms(1) {
            core::hint::spin_loop();
            continue;
        }
        last_poll = now;
        // Poll the interrupt causes the device would have raised.
        let isr = d.m.r(INTERRUPT_STATUS);
        if isr != 0 {
            d.m.w(INTERRUPT_ACK, isr);
        }
        if d.m.status() & S_NEEDS_RESET != 0 {
            log(b"balloon driver: device needs reset\0");
            return fail(&d.m, EXIT_QUEUE, b"balloon driver: giving up\0");
        }
        if isr & INT_CONFIG != 0 {
            target = u64::from(d.m.config32(CFG_NUM_PAGES));
        }
        if isr & INT_VRING != 0 {
            // A statistics request: the device gave the buffer back.
            let asked = d.stats.as_mut().is_some_and(|q| q.pop_used().is_some());
            if asked {
                d.send_stats();
            }
        }
        busy = false;
        if grow > 0 && now >= grow_at {
            if let Err(code) = d.grow(grow) {
                return code;
            }
            grow = 0;
        }
        if !ignore {
            match d.follow(target) {
                Ok(moved) => busy = moved,
                Err(code) => return code,
            }
        }
        if heartbeat_ms > 0 && now.wrapping_sub(last_beat) >= d.ms(heartbeat_ms) {
            last_beat = now;
            wr64(LABDEV + R_HEARTBEAT, d.balloon_pages());
        }
    }
}
