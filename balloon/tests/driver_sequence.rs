//! The balloon driven through its registers the way a virtio driver does,
//! over real guest memory: the happy path (negotiation, queues, inflate,
//! deflate, statistics, reporting) and the refusals a driver meets when it
//! breaks the rules.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use balloon::{
    BalloonHandle, VIRTIO_F_VERSION_1, features, interrupt, reg, resident_pages, status,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;
const PAGE: u64 = 4096;

struct Driver {
    h: BalloonHandle,
    mem: Arc<GuestMemoryMmap>,
    next_avail: [u16; 4],
}

fn q_base(q: u32) -> u64 {
    0x1_0000 + u64::from(q) * 0x4000
}

impl Driver {
    fn new() -> Driver {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap(),
        );
        Driver {
            h: BalloonHandle::new(Arc::clone(&mem), 1000),
            mem,
            next_avail: [0; 4],
        }
    }
    fn w(&self, off: u64, v: u32) {
        self.h.mmio_write(off, &v.to_le_bytes());
    }
    fn r(&self, off: u64) -> u32 {
        let mut d = [0u8; 4];
        self.h.mmio_read(off, &mut d);
        u32::from_le_bytes(d)
    }
    fn negotiate(&self, features: u64) -> bool {
        self.w(reg::STATUS, 0);
        self.w(reg::STATUS, status::ACKNOWLEDGE);
        self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, features as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.r(reg::STATUS) & status::FEATURES_OK != 0
    }
    fn setup_queue(&self, q: u32, size: u32) {
        let base = q_base(q);
        self.w(reg::QUEUE_SEL, q);
        self.w(reg::QUEUE_NUM, size);
        self.w(reg::QUEUE_DESC_LOW, base as u32);
        self.w(reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        self.w(reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        self.w(reg::QUEUE_READY, 1);
    }
    fn driver_ok(&self) {
        let s = self.r(reg::STATUS);
        self.w(reg::STATUS, s | status::DRIVER_OK);
    }
    /// Puts one single-descriptor chain (descriptor `d`) on queue `q` and notifies.
    fn submit(&mut self, q: u32, d: u16, addr: u64, len: u32, write: bool) {
        let base = q_base(q);
        let flags: u16 = if write { 2 } else { 0 };
        let desc = base + u64::from(d) * 16;
        self.mem.write_obj(addr, GuestAddress(desc)).unwrap();
        self.mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
        let i = self.next_avail[q as usize];
        self.mem
            .write_obj(d, GuestAddress(base + 0x1000 + 4 + u64::from(i % 16) * 2))
            .unwrap();
        self.next_avail[q as usize] = i.wrapping_add(1);
        self.mem
            .write_obj(i.wrapping_add(1), GuestAddress(base + 0x1000 + 2))
            .unwrap();
        self.w(reg::QUEUE_NOTIFY, q);
    }
    fn used_idx(&self, q: u32) -> u16 {
        self.mem
            .read_obj(GuestAddress(q_base(q) + 0x2000 + 2))
            .unwrap()
    }
    fn pfns(&self, at: u64, pages: impl Iterator<Item = u64>) -> u32 {
        let bytes: Vec<u8> = pages
            .flat_map(|p| ((p / PAGE) as u32).to_le_bytes())
            .collect();
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }
}

fn all_features() -> u64 {
    (1 << VIRTIO_F_VERSION_1)
        | (1 << features::STATS_VQ)
        | (1 << features::DEFLATE_ON_OOM)
        | (1 << features::PAGE_REPORTING)
}

#[test]
fn driver_sequence_inflates_deflates_reports_and_exchanges_statistics() {
    let mut d = Driver::new();
    assert_eq!(d.r(reg::MAGIC), 0x7472_6976);
    assert_eq!(d.r(reg::VERSION), 2);
    assert_eq!(d.r(reg::DEVICE_ID), 5);
    d.w(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(d.r(reg::DEVICE_FEATURES), 1, "VERSION_1 in the high word");
    assert!(d.negotiate(all_features()));
    for q in 0..4 {
        d.w(reg::QUEUE_SEL, q);
        assert_eq!(d.r(reg::QUEUE_NUM_MAX), 256);
        d.setup_queue(q, 16);
    }
    d.w(reg::QUEUE_SEL, 4);
    assert_eq!(d.r(reg::QUEUE_NUM_MAX), 0, "no fifth queue");
    d.driver_ok();
    assert_eq!(d.r(reg::STATUS) & status::DRIVER_OK, status::DRIVER_OK);

    // The host asks for 2 MiB; the driver sees a configuration change.
    let generation = d.r(reg::CONFIG_GENERATION);
    d.h.set_target_mib(2).unwrap();
    assert_ne!(d.r(reg::CONFIG_GENERATION), generation);
    assert_eq!(
        d.r(reg::INTERRUPT_STATUS) & interrupt::CONFIG,
        interrupt::CONFIG
    );
    d.w(reg::INTERRUPT_ACK, interrupt::CONFIG);
    assert_eq!(d.r(reg::CONFIG), 512, "num_pages");

    // Inflate [8, 10) MiB, which the guest had written.
    d.mem
        .write_slice(&vec![1u8; 2 * MIB as usize], GuestAddress(8 * MIB))
        .unwrap();
    let len = d.pfns(0x8_0000, (8 * MIB..10 * MIB).step_by(PAGE as usize));
    d.submit(0, 0, 0x8_0000, len, false);
    assert_eq!(d.used_idx(0), 1);
    assert_eq!(
        d.r(reg::INTERRUPT_STATUS) & interrupt::VRING,
        interrupt::VRING
    );
    let res = resident_pages(&d.mem, 8 * MIB, 2 * MIB).unwrap();
    assert!(res.iter().all(|&r| !r), "inflated pages still resident");
    d.w(reg::CONFIG + 4, 512);
    let r = d.h.report();
    assert_eq!((r.actual_pages, r.counters.inflated_pages), (512, 512));

    // Deflate half of it; the guest can write there again.
    let len = d.pfns(0x9_0000, (8 * MIB..9 * MIB).step_by(PAGE as usize));
    d.submit(1, 0, 0x9_0000, len, false);
    assert_eq!(d.used_idx(1), 1);
    d.mem.write_obj(7u64, GuestAddress(8 * MIB)).unwrap();
    assert_eq!(d.h.report().counters.deflated_pages, 256);

    // Statistics: the device keeps the buffer until it wants fresh numbers.
    let mut stats = Vec::new();
    for (tag, val) in [(4u16, 123u64), (5, 456)] {
        stats.extend_from_slice(&tag.to_le_bytes());
        stats.extend_from_slice(&val.to_le_bytes());
    }
    d.mem.write_slice(&stats, GuestAddress(0xA_0000)).unwrap();
    d.submit(2, 0, 0xA_0000, 20, false);
    assert_eq!(d.used_idx(2), 0, "the device holds the statistics buffer");
    let r = d.h.report();
    assert_eq!(
        r.stats,
        vec![("free-memory".into(), 123), ("total-memory".into(), 456)]
    );
    assert!(d.h.request_stats());
    assert_eq!(d.used_idx(2), 1, "handed back to ask for more");
    assert!(
        !d.h.request_stats(),
        "nothing held until the driver answers"
    );

    // Free page reporting: [12, 14) MiB as one device-writable range.
    d.mem
        .write_slice(&vec![1u8; 2 * MIB as usize], GuestAddress(12 * MIB))
        .unwrap();
    d.submit(3, 0, 12 * MIB, (2 * MIB) as u32, true);
    assert_eq!(d.used_idx(3), 1);
    assert!(
        resident_pages(&d.mem, 12 * MIB, 2 * MIB)
            .unwrap()
            .iter()
            .all(|&r| !r)
    );
    assert_eq!(d.h.report().counters.reported_pages, 512);
    assert_eq!(d.h.report().counters.skipped_chains, 0);
}

#[test]
fn queue_numbering_follows_the_negotiated_features() {
    // Without STATS_VQ, the reporting queue is queue 2 (as Linux numbers it).
    let mut d = Driver::new();
    assert!(d.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << features::PAGE_REPORTING)));
    for q in 0..3 {
        d.setup_queue(q, 16);
    }
    d.driver_ok();
    d.mem
        .write_slice(&vec![1u8; 2 * MIB as usize], GuestAddress(4 * MIB))
        .unwrap();
    d.submit(2, 0, 4 * MIB, (2 * MIB) as u32, true);
    assert_eq!(d.h.report().counters.reported_pages, 512);
}

#[test]
fn rule_breaking_drivers_are_refused_or_reset() {
    // Features the device does not offer, or no VERSION_1: FEATURES_OK stays clear.
    let d = Driver::new();
    assert!(!d.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << features::FREE_PAGE_HINT)));
    assert!(!d.negotiate(1 << features::STATS_VQ));

    // Notification before DRIVER_OK: ignored, nothing used.
    let mut d = Driver::new();
    assert!(d.negotiate(all_features()));
    d.setup_queue(0, 16);
    let len = d.pfns(0x8_0000, [8 * MIB].into_iter());
    d.submit(0, 0, 0x8_0000, len, false);
    assert_eq!(d.used_idx(0), 0);
    assert_eq!(d.h.report().counters.inflated_pages, 0);

    // DRIVER_OK without the negotiated queues: the device needs a reset.
    d.driver_ok();
    assert_ne!(d.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    // A reset clears it.
    d.w(reg::STATUS, 0);
    assert_eq!(d.r(reg::STATUS), 0);

    // Queue size past the maximum or not a power of two: needs reset.
    for size in [512, 3, 0] {
        let d = Driver::new();
        assert!(d.negotiate(all_features()));
        d.setup_queue(0, size);
        assert_ne!(
            d.r(reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0,
            "size {size}"
        );
    }

    // Rings outside RAM: the queue does not become ready.
    let d = Driver::new();
    assert!(d.negotiate(all_features()));
    d.w(reg::QUEUE_SEL, 0);
    d.w(reg::QUEUE_NUM, 16);
    d.w(reg::QUEUE_DESC_LOW, 0);
    d.w(reg::QUEUE_DESC_HIGH, 1);
    d.w(reg::QUEUE_READY, 1);
    assert_eq!(d.r(reg::QUEUE_READY), 0);
    assert_ne!(d.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);

    // Inflate chains with bad buffers are skipped, valid PFNs still count.
    let mut d = Driver::new();
    assert!(d.negotiate(all_features()));
    for q in 0..4 {
        d.setup_queue(q, 16);
    }
    d.driver_ok();
    d.submit(0, 0, 0x8_0000, 6, false); // not a whole number of PFNs
    d.submit(0, 1, 0x8_0000, 8, true); // write-only
    d.submit(0, 2, RAM + PAGE, 8, false); // outside RAM
    let len = d.pfns(
        0x8_0000,
        [8 * MIB, 64 * MIB, u64::from(u32::MAX) * PAGE].into_iter(),
    );
    d.submit(0, 3, 0x8_0000, len, false);
    assert_eq!(d.used_idx(0), 4, "every chain returned");
    let c = d.h.report().counters;
    assert_eq!(
        (c.skipped_chains, c.skipped_pages, c.inflated_pages),
        (3, 2, 1)
    );
    // The available index jumping more than a queue ahead: needs reset.
    d.mem
        .write_obj(100u16, GuestAddress(q_base(0) + 0x1000 + 2))
        .unwrap();
    d.w(reg::QUEUE_NOTIFY, 0);
    assert_ne!(d.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    // A target past RAM is refused and changes nothing.
    assert!(d.h.set_target_mib(17).is_err());
    assert_eq!(d.h.target_mib(), 0);
}

#[test]
fn chains_past_the_pfn_limit_are_skipped_whole() {
    let mut d = Driver::new();
    assert!(d.negotiate(all_features()));
    for q in 0..4 {
        d.setup_queue(q, 16);
    }
    d.driver_ok();
    let limit = balloon::MAX_PFNS_PER_CHAIN as u64;
    // One PFN over the limit (all of them valid pages): skipped, nothing discarded.
    let len = d.pfns(0x20_0000, (0..=limit).map(|i| (i % 512) * PAGE + 8 * MIB));
    d.submit(0, 0, 0x20_0000, len, false);
    assert_eq!(d.used_idx(0), 1);
    let c = d.h.report().counters;
    assert_eq!((c.skipped_chains, c.inflated_pages), (1, 0));
    // At the limit: accepted.
    d.submit(0, 1, 0x20_0000, len - 4, false);
    assert_eq!(
        d.h.report().counters.inflated_pages,
        512,
        "duplicates merged"
    );
}

#[test]
fn deflated_pages_are_prefaulted_up_to_the_budget_and_keep_their_contents() {
    let mut d = Driver::new();
    assert!(d.negotiate(all_features()));
    for q in 0..4 {
        d.setup_queue(q, 16);
    }
    d.driver_ok();
    d.h.set_target_mib(4).unwrap();
    // Inflate [8, 12) MiB: the host drops those pages.
    let len = d.pfns(0x8_0000, (8 * MIB..12 * MIB).step_by(PAGE as usize));
    d.submit(0, 0, 0x8_0000, len, false);
    assert!(
        resident_pages(&d.mem, 8 * MIB, 4 * MIB)
            .unwrap()
            .iter()
            .all(|&r| !r)
    );
    // The guest already wrote one deflated page before the host saw the
    // deflate (allowed without MUST_TELL_HOST): its contents must survive.
    d.mem.write_obj(0x5eed_u64, GuestAddress(8 * MIB)).unwrap();

    // Growth is forecast: pre-fault up to 1 MiB of what the guest deflates.
    d.h.prefault_deflated_mib(1);
    let len = d.pfns(0x9_0000, (8 * MIB..10 * MIB).step_by(PAGE as usize));
    d.submit(1, 0, 0x9_0000, len, false);
    let res = resident_pages(&d.mem, 8 * MIB, 4 * MIB).unwrap();
    let per_mib = (MIB / PAGE) as usize;
    assert!(res[..per_mib].iter().all(|&r| r), "budgeted pages resident");
    assert!(
        res[per_mib..].iter().all(|&r| !r),
        "nothing past the budget, and no inflated page, made resident"
    );
    let v: u64 = d.mem.read_obj(GuestAddress(8 * MIB)).unwrap();
    assert_eq!(v, 0x5eed, "a page in use keeps its contents");
    let c = d.h.report().counters;
    assert_eq!((c.deflated_pages, c.prefaulted_pages), (512, 256));

    // The budget is spent: a further deflate faults lazily.
    let len = d.pfns(0xA_0000, (10 * MIB..11 * MIB).step_by(PAGE as usize));
    d.submit(1, 1, 0xA_0000, len, false);
    assert!(
        resident_pages(&d.mem, 10 * MIB, MIB)
            .unwrap()
            .iter()
            .all(|&r| !r)
    );
    assert_eq!(d.h.report().counters.prefaulted_pages, 256);
}
