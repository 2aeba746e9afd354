//! Properties of the balloon against a hostile guest: random descriptor
//! tables, available rings, PFN arrays and register sequences, written into
//! real guest memory (a `GuestMemoryMmap` with a hole in it) and driven
//! through the virtio-mmio registers as a driver would.
//!
//! Whatever the guest writes, the device never panics or hangs, writes guest
//! memory only in the used ring, discards only pages inside RAM that the
//! guest named, returns only valid heads, and consumes the available ring or
//! asks for a reset. Run longer with `PROPTEST_CASES=N`.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::BTreeSet;
use std::sync::Arc;

use balloon::{BalloonHandle, QUEUE_MAX, VIRTIO_F_VERSION_1, features, reg, status};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: u64 = 4096;
/// RAM: [0, 1 MiB) and [2 MiB, 3 MiB); [1 MiB, 2 MiB) is a hole.
const A_END: u64 = 1 << 20;
const B_START: u64 = 2 << 20;
const B_END: u64 = 3 << 20;
/// Queue structures live in the first 64 KiB; 16 KiB per queue.
const QBASE: u64 = 0;
const QSTRIDE: u64 = 0x4000;
const FILL: u8 = 0xA5;

fn memory() -> Arc<GuestMemoryMmap> {
    Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), A_END as usize),
            (GuestAddress(B_START), (B_END - B_START) as usize),
        ])
        .unwrap(),
    )
}

fn in_ram(gpa: u64) -> bool {
    gpa < A_END || (B_START..B_END).contains(&gpa)
}

fn w32(h: &BalloonHandle, off: u64, v: u32) {
    h.mmio_write(off, &v.to_le_bytes());
}

fn r32(h: &BalloonHandle, off: u64) -> u32 {
    let mut d = [0u8; 4];
    h.mmio_read(off, &mut d);
    u32::from_le_bytes(d)
}

/// Addresses a hostile guest likes.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0x1_0000u64..A_END,
        3 => B_START..B_END,
        1 => A_END..B_START,
        1 => B_END..B_END + 0x10_0000,
        1 => u64::MAX - 0x1_0000..=u64::MAX,
        1 => A_END - 16..A_END + 16,
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => (0u32..64).prop_map(|n| n * 4),
        2 => 0u32..=8192,
        1 => Just(4096u32),
        1 => Just(2 << 20),
        1 => any::<u32>(),
    ]
}

fn pfn() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..(A_END / PAGE) as u32,
        3 => (B_START / PAGE) as u32..(B_END / PAGE) as u32,
        1 => (A_END / PAGE) as u32..(B_START / PAGE) as u32,
        1 => any::<u32>(),
    ]
}

#[derive(Debug, Clone)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn desc() -> impl Strategy<Value = Desc> {
    (addr(), len(), 0u16..8, any::<u16>()).prop_map(|(addr, len, flags, next)| Desc {
        addr,
        len,
        flags,
        next: next % 300,
    })
}

#[derive(Debug, Clone)]
struct Case {
    features: u64,
    queue_size: u32,
    early_notify: bool,
    descs: Vec<Desc>,
    heads: Vec<u16>,
    avail_idx: u16,
    pfns: Vec<u32>,
    notifies: Vec<u32>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        prop_oneof![
            6 => prop::sample::select(vec![1u32, 2, 4, 8, 16, 64, 256]),
            1 => prop::sample::select(vec![0u32, 3, 100, 512, 1024, 65536]),
        ],
        any::<bool>(),
        prop::collection::vec(desc(), 1..32),
        prop::collection::vec(0u16..300, 0..32),
        prop_oneof![3 => 0u16..40, 1 => any::<u16>()],
        prop::collection::vec(pfn(), 0..512),
        prop::collection::vec(0u32..6, 1..6),
    )
        .prop_map(
            |(f, queue_size, early_notify, descs, heads, avail_idx, pfns, notifies)| Case {
                // Mostly sane features, sometimes anything.
                features: if f % 4 == 0 {
                    f
                } else {
                    (1 << VIRTIO_F_VERSION_1)
                        | (f & ((1 << features::STATS_VQ)
                            | (1 << features::DEFLATE_ON_OOM)
                            | (1 << features::PAGE_REPORTING)))
                },
                queue_size,
                early_notify,
                descs,
                heads,
                avail_idx,
                pfns,
                notifies,
            },
        )
}

/// Used ring area of queue `q` for a queue of `size`.
fn used_range(q: u64, size: u64) -> (u64, u64) {
    let start = QBASE + q * QSTRIDE + 0x2000;
    (start, start + 4 + 8 * size + 2)
}

fn run_case(c: &Case) -> Result<(), TestCaseError> {
    let mem = memory();
    // Fill RAM with a pattern so that any write or discard shows.
    mem.write_slice(&vec![FILL; A_END as usize], GuestAddress(0))
        .unwrap();
    mem.write_slice(
        &vec![FILL; (B_END - B_START) as usize],
        GuestAddress(B_START),
    )
    .unwrap();
    let h = BalloonHandle::new(Arc::clone(&mem), 1000);

    // The guest's tables: the same descriptors, heads and PFNs in every queue.
    let names: BTreeSet<u64> = {
        // Every page the guest names anywhere: PFNs, and descriptor ranges.
        let mut s: BTreeSet<u64> = c.pfns.iter().map(|&p| u64::from(p) * PAGE).collect();
        for d in &c.descs {
            // Only pages inside [0, B_END) can be discarded at all.
            let mut a = d.addr & !(PAGE - 1);
            let end = d.addr.saturating_add(u64::from(d.len)).min(B_END);
            while a < end {
                s.insert(a);
                a += PAGE;
            }
        }
        s
    };
    let pfn_bytes: Vec<u8> = c.pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    // PFN array at 0x20000 (inside RAM, named by descriptors that point there).
    mem.write_slice(&pfn_bytes, GuestAddress(0x2_0000)).unwrap();
    for q in 0..4u64 {
        let base = QBASE + q * QSTRIDE;
        for (i, d) in c.descs.iter().enumerate() {
            // Half the descriptors point at the PFN array, with its length.
            let (addr, len) = if i % 2 == 0 {
                (0x2_0000, (pfn_bytes.len() as u32).min(d.len.max(4)))
            } else {
                (d.addr, d.len)
            };
            let raw = [
                addr.to_le_bytes().to_vec(),
                len.to_le_bytes().to_vec(),
                d.flags.to_le_bytes().to_vec(),
                d.next.to_le_bytes().to_vec(),
            ]
            .concat();
            mem.write_slice(&raw, GuestAddress(base + i as u64 * 16))
                .unwrap();
        }
        let avail = base + 0x1000;
        mem.write_obj(0u16, GuestAddress(avail)).unwrap();
        mem.write_obj(c.avail_idx, GuestAddress(avail + 2)).unwrap();
        for (i, head) in c.heads.iter().enumerate().take(256) {
            mem.write_obj(*head, GuestAddress(avail + 4 + i as u64 * 2))
                .unwrap();
        }
    }
    // Snapshot after the guest wrote its tables.
    let before_a = {
        let mut v = vec![0u8; A_END as usize];
        mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    };
    // Descriptors may point anywhere from 0x10000 on, at any byte offset,
    // so any 32-bit word around the PFN array names a page; a discarded
    // page reads zero afterwards, so PFN 0 can be named by memory that was
    // FILL (whose own words, 0xA5A5A5A5, are outside RAM).
    let mut names = names;
    names.insert(0);
    let lo = 0x2_0000 - 4;
    for off in lo..0x2_0000 + pfn_bytes.len() + 4 {
        let w = u32::from_le_bytes(before_a[off..off + 4].try_into().unwrap());
        names.insert(u64::from(w) * PAGE);
    }

    // Driver sequence, with hostile twists.
    if c.early_notify {
        w32(&h, reg::QUEUE_NOTIFY, 0);
    }
    w32(&h, reg::STATUS, status::ACKNOWLEDGE);
    w32(&h, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(&h, reg::DRIVER_FEATURES_SEL, 0);
    w32(&h, reg::DRIVER_FEATURES, c.features as u32);
    w32(&h, reg::DRIVER_FEATURES_SEL, 1);
    w32(&h, reg::DRIVER_FEATURES, (c.features >> 32) as u32);
    w32(
        &h,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    let features_ok = r32(&h, reg::STATUS) & status::FEATURES_OK != 0;
    for q in 0..4u32 {
        let base = QBASE + u64::from(q) * QSTRIDE;
        w32(&h, reg::QUEUE_SEL, q);
        w32(&h, reg::QUEUE_NUM, c.queue_size);
        w32(&h, reg::QUEUE_DESC_LOW, base as u32);
        w32(&h, reg::QUEUE_DESC_HIGH, 0);
        w32(&h, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w32(&h, reg::QUEUE_DRIVER_HIGH, 0);
        w32(&h, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w32(&h, reg::QUEUE_DEVICE_HIGH, 0);
        w32(&h, reg::QUEUE_READY, 1);
    }
    let st = r32(&h, reg::STATUS);
    w32(&h, reg::STATUS, st | status::DRIVER_OK);
    for &n in &c.notifies {
        w32(&h, reg::QUEUE_NOTIFY, n);
    }
    h.request_stats();
    w32(&h, reg::QUEUE_NOTIFY, 2);

    let st = r32(&h, reg::STATUS);
    // DRIVER_OK never stands without FEATURES_OK.
    if st & status::DRIVER_OK != 0 {
        prop_assert!(st & status::FEATURES_OK != 0, "status {st:#x}");
        prop_assert!(features_ok);
    }
    let valid_size = c.queue_size.is_power_of_two() && c.queue_size <= u32::from(QUEUE_MAX);
    if !valid_size && features_ok {
        prop_assert!(
            st & status::DEVICE_NEEDS_RESET != 0,
            "size {} accepted",
            c.queue_size
        );
    }

    // Memory: outside the used rings, a byte changed only where a page was
    // discarded (then the whole page reads zero), and only pages the guest
    // named, inside RAM.
    let size = if valid_size {
        u64::from(c.queue_size)
    } else {
        256
    };
    let used: Vec<(u64, u64)> = (0..4).map(|q| used_range(q, size)).collect();
    let in_used = |a: u64| used.iter().any(|&(s, e)| a >= s && a < e);
    let mut after_a = vec![0u8; A_END as usize];
    mem.read_slice(&mut after_a, GuestAddress(0)).unwrap();
    let mut after_b = vec![0u8; (B_END - B_START) as usize];
    mem.read_slice(&mut after_b, GuestAddress(B_START)).unwrap();
    let check_page = |gpa: u64, before: Option<&[u8]>, after: &[u8]| -> Result<(), TestCaseError> {
        let changed: Vec<usize> = after
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b != before.map_or(FILL, |p| p[i]) && !in_used(gpa + i as u64))
            .map(|(i, _)| i)
            .collect();
        if !changed.is_empty() {
            prop_assert!(
                after
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == 0 || in_used(gpa + i as u64)),
                "page {gpa:#x} changed without being discarded"
            );
            prop_assert!(
                names.contains(&gpa),
                "page {gpa:#x} discarded but never named; changed at {:?}; {:?}",
                &changed[..changed.len().min(8)],
                h.report().counters
            );
            prop_assert!(in_ram(gpa));
        }
        Ok(())
    };
    for p in 0..(A_END / PAGE) {
        let s = (p * PAGE) as usize;
        check_page(
            p * PAGE,
            Some(&before_a[s..s + PAGE as usize]),
            &after_a[s..s + PAGE as usize],
        )?;
    }
    for p in 0..((B_END - B_START) / PAGE) {
        let s = (p * PAGE) as usize;
        check_page(B_START + p * PAGE, None, &after_b[s..s + PAGE as usize])?;
    }

    // Used rings hold only valid heads.
    if valid_size && st & status::DRIVER_OK != 0 {
        for q in 0..4u64 {
            let (s, _) = used_range(q, size);
            let idx: u16 = mem.read_obj(GuestAddress(s + 2)).unwrap();
            for i in 0..u64::from(idx).min(size) {
                let id: u32 = mem.read_obj(GuestAddress(s + 4 + i * 8)).unwrap();
                // The used ring sits where the guest filled FILL bytes, so
                // unwritten entries read 0xA5A5A5A5; written ones are heads.
                if id != u32::from_le_bytes([FILL; 4]) {
                    prop_assert!(u64::from(id) < size, "used id {id} past queue size {size}");
                }
            }
        }
    }
    let r = h.report();
    prop_assert!(r.counters.inflated_pages <= c.pfns.len() as u64 * c.descs.len() as u64 * 8);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn hostile_descriptor_tables_never_escape_guest_ram(c in case()) {
        run_case(&c)?;
    }

    /// Any sequence of register accesses: no panic, and the status
    /// register never claims DRIVER_OK without FEATURES_OK.
    #[test]
    fn arbitrary_register_sequences_keep_status_consistent(
        ops in prop::collection::vec((0u64..0x200, any::<u32>(), 0usize..9, any::<bool>()), 0..200)
    ) {
        let mem = memory();
        let h = BalloonHandle::new(Arc::clone(&mem), 1000);
        for (off, v, width, is_write) in ops {
            let bytes = v.to_le_bytes();
            let mut data = [0u8; 8];
            data[..width.min(4)].copy_from_slice(&bytes[..width.min(4)]);
            if is_write {
                h.mmio_write(off, &data[..width]);
            } else {
                h.mmio_read(off, &mut data[..width]);
            }
            let st = r32(&h, reg::STATUS);
            if st & status::DRIVER_OK != 0 {
                prop_assert!(st & status::FEATURES_OK != 0, "status {st:#x}");
            }
        }
    }
}
