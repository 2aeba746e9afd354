//! Guest-physical layout of a lab VM. The lab guest (`guest/lab.S`) uses the
//! same numbers; `guest::tests` checks the ones it can see.
//!
//! ```text
//! 0x0000_1000  PML4
//! 0x0000_2000  PDPT (the first 512 GiB)
//! 0x0000_3000  GDT
//! 0x0000_4000  IDT (256 gates)
//! 0x0000_5000  TSS array (one 128-byte TSS per vCPU)
//! 0x0000_6000  parameter block (read by the guest)
//! 0x0000_8000  CPL0 exception stacks (1 KiB per vCPU)
//! 0x0001_0000  page directories (one per GiB of RAM, then the MMIO window)
//! 0x0006_0000  CPL3 stacks (4 KiB per vCPU)
//! 0x0010_0000  guest program
//! 0x0020_0000  per-vCPU touch lists, rounded up to 2 MiB
//! ...          workload area, to the end of RAM
//! 0xF_0000_0000 lab device page (MMIO, no memory behind it)
//! 0xF_0000_1000 virtio-mmio balloon (when configured)
//! ```
//!
//! With the balloon workload the driver lives at 0x18_0000 (inside the
//! program slot) and its area (virtqueues, buffers, stack) takes the first
//! 2 MiB of the workload area; the rest of RAM is the guest's page pool.

/// Page size the workloads touch.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a guest page-table large page (and the default profiling chunk).
pub const LARGE_PAGE: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

pub(crate) const PML4: u64 = 0x1000;
pub(crate) const PDPT: u64 = 0x2000;
pub(crate) const GDT: u64 = 0x3000;
pub(crate) const IDT: u64 = 0x4000;
pub(crate) const TSS_BASE: u64 = 0x5000;
pub(crate) const TSS_STRIDE: u64 = 128;
pub(crate) const PARAMS: u64 = 0x6000;
pub(crate) const KSTACK_BASE: u64 = 0x8000;
pub(crate) const KSTACK_SIZE: u64 = 0x400;
pub(crate) const PD_BASE: u64 = 0x1_0000;
pub(crate) const USTACK_BASE: u64 = 0x6_0000;
pub(crate) const USTACK_SIZE: u64 = 0x1000;
/// Where the guest program is loaded (and linked).
pub(crate) const PROGRAM: u64 = 0x10_0000;
pub(crate) const PROGRAM_MAX: u64 = 0x10_0000;
/// Start of the touch lists.
pub(crate) const LISTS: u64 = 0x20_0000;

/// Guest-physical address of the lab device page.
pub const LABDEV_BASE: u64 = 0xF_0000_0000;
pub(crate) const LABDEV_SIZE: u64 = 0x1000;
/// Guest-physical address of the virtio-mmio balloon's register window
/// (in the lab device's large page, so already mapped for the guest).
pub const BALLOON_MMIO_BASE: u64 = LABDEV_BASE + 0x1000;
/// Where the lab guest's balloon driver is loaded (and linked).
pub(crate) const DRIVER_BASE: u64 = 0x18_0000;
/// Size of the balloon driver's area at the start of the workload area.
pub(crate) const DRIVER_AREA: u64 = LARGE_PAGE;

/// Most vCPUs a lab VM may have (the TSS page and the stacks hold 32).
pub const MAX_VCPUS: u32 = 32;
/// Smallest RAM a lab VM may have, in MiB: the system area plus one large page.
pub const MIN_RAM_MIB: u64 = 8;
/// Largest RAM a lab VM may have, in MiB (below the lab device window).
pub const MAX_RAM_MIB: u64 = 32 * 1024;

/// Page directories needed to identity-map `ram` bytes with 2 MiB pages.
pub(crate) fn ram_page_directories(ram: u64) -> u64 {
    ram.div_ceil(GIB)
}

/// Selectors and descriptors of the flat GDT.
pub(crate) mod gdt {
    pub const KERNEL_CS: u16 = 0x08;
    pub const USER_DS: u16 = 0x18 | 3;
    pub const USER_CS: u16 = 0x20 | 3;
    pub const TSS: u16 = 0x28;
    /// 64-bit code, DPL 0.
    pub const KERNEL_CODE64: u64 = 0x0020_9A00_0000_0000;
    /// Data, DPL 0.
    pub const KERNEL_DATA: u64 = 0x0000_9200_0000_0000;
    /// Data, DPL 3.
    pub const USER_DATA: u64 = 0x0000_F200_0000_0000;
    /// 64-bit code, DPL 3.
    pub const USER_CODE64: u64 = 0x0020_FA00_0000_0000;
}
