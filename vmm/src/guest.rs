//! The lab guest program and the system area labvm builds around it: page
//! tables, GDT, IDT, TSS, stacks and the parameter block. Pure functions over
//! guest memory; nothing here touches KVM.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::VmmError;
use crate::layout::{self, gdt};
use crate::workload::{ENTRY_BYTES, Workload, WorkloadPlan};

/// The assembled lab guest (see `guest/lab.S`).
pub(crate) static PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lab.bin"));
/// The lab guest's virtio-balloon driver (see `guest/balloon_driver.rs`).
pub(crate) static BALLOON_DRIVER: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/balloon_driver.bin"));

const HEADER_MAGIC: u64 = 0x3147_5345_4c42_414c;

/// Offsets in the parameter block (must match `guest/lab.S`).
pub(crate) mod params {
    pub const MAGIC: u64 = 0x00;
    pub const WORKLOAD: u64 = 0x08;
    pub const NR_VCPUS: u64 = 0x10;
    pub const TSC_KHZ: u64 = 0x18;
    pub const STAMP: u64 = 0x20;
    pub const DONE: u64 = 0x28;
    pub const COUNTER_ADDR: u64 = 0x30;
    pub const DIRTY_BASE: u64 = 0x38;
    pub const DIRTY_PAGES: u64 = 0x40;
    pub const DIRTY_RATE: u64 = 0x48;
    pub const HEARTBEAT_MS: u64 = 0x50;
    pub const LISTS: u64 = 0x100;
    // Balloon workload (must match guest/balloon_driver.rs and lab.S).
    pub const B_MMIO: u64 = 0x400;
    pub const B_AREA: u64 = 0x408;
    pub const B_POOL_START: u64 = 0x410;
    pub const B_POOL_END: u64 = 0x418;
    pub const B_TOUCH: u64 = 0x420;
    pub const B_KEEP: u64 = 0x428;
    pub const B_FLAGS: u64 = 0x438;
    pub const B_STACK_TOP: u64 = 0x440;
    pub const B_HEARTBEAT_MS: u64 = 0x450;
    pub const B_GROW: u64 = 0x458;
    pub const B_FLAG_REPORT: u64 = 1;
    pub const B_FLAG_IGNORE_TARGET: u64 = 2;
    pub const B_FLAG_LAZY_DEFLATE: u64 = 4;
    pub const VALUE_MAGIC: u64 = 0x5052_4553_4349_454e;
}

/// Entry point and exception stubs found in the program's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProgramHeader {
    pub entry: u64,
    pub isr_table: u64,
}

/// Reads the header at the start of the lab guest program.
pub(crate) fn program_header(program: &[u8]) -> Result<ProgramHeader, VmmError> {
    let word = |i: usize| -> Option<u64> {
        let bytes = program.get(i * 8..i * 8 + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    };
    match (word(0), word(1), word(2)) {
        (Some(HEADER_MAGIC), Some(entry), Some(isr_table))
            if in_program(entry, program) && in_program(isr_table + 31 * 8, program) =>
        {
            Ok(ProgramHeader { entry, isr_table })
        }
        _ => Err(VmmError::GuestProgram(
            "the lab guest program has no valid header".into(),
        )),
    }
}

fn in_program(addr: u64, program: &[u8]) -> bool {
    addr >= layout::PROGRAM && addr < layout::PROGRAM + program.len() as u64
}

/// Value the guest writes into the first qword of a touched page.
pub fn stamp_value(gpa: u64, stamp: u64) -> u64 {
    gpa ^ stamp
}

/// Everything the lab guest needs in memory, written once before the vCPUs start.
#[derive(Debug)]
pub(crate) struct GuestSetup<'a> {
    pub ram: u64,
    pub vcpus: u32,
    pub tsc_khz: u32,
    pub stamp: u64,
    pub workload: &'a Workload,
    pub plan: &'a WorkloadPlan,
}

/// Where the long-running workload keeps its counter.
pub(crate) fn counter_addr(plan: &WorkloadPlan) -> u64 {
    plan.area_start
}

impl GuestSetup<'_> {
    /// Writes program, tables, stacks and parameters into `mem`; returns the header.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<ProgramHeader, VmmError> {
        let header = program_header(PROGRAM)?;
        if PROGRAM.len() as u64 > layout::PROGRAM_MAX {
            return Err(VmmError::GuestProgram(
                "the lab guest program is larger than its slot".into(),
            ));
        }
        let w = |addr: u64, val: u64| write_u64(mem, addr, val);
        mem.write_slice(PROGRAM, GuestAddress(layout::PROGRAM))
            .map_err(|e| VmmError::GuestMemory(format!("loading the program: {e}")))?;

        // Identity map: PML4[0] -> PDPT; PDPT[g] -> PD g for each GiB of RAM,
        // and the lab device's GiB; 2 MiB user pages throughout.
        const P_RW_US: u64 = 0x7;
        const PS: u64 = 0x80;
        w(layout::PML4, layout::PDPT | P_RW_US)?;
        let ram_pds = layout::ram_page_directories(self.ram);
        let gib_pd = |gib: u64, pd: u64, limit: u64| -> Result<(), VmmError> {
            w(layout::PDPT + gib * 8, pd | P_RW_US)?;
            for e in 0..512u64 {
                let addr = (gib << 30) + e * layout::LARGE_PAGE;
                if addr >= limit {
                    break;
                }
                w(pd + e * 8, addr | P_RW_US | PS)?;
            }
            Ok(())
        };
        for g in 0..ram_pds {
            gib_pd(g, layout::PD_BASE + g * 0x1000, self.ram)?;
        }
        let labdev_gib = layout::LABDEV_BASE >> 30;
        gib_pd(
            labdev_gib,
            layout::PD_BASE + ram_pds * 0x1000,
            layout::LABDEV_BASE + layout::LABDEV_SIZE,
        )?;

        // GDT: null, kernel code, kernel data, user data, user code.
        for (i, d) in [
            0,
            gdt::KERNEL_CODE64,
            gdt::KERNEL_DATA,
            gdt::USER_DATA,
            gdt::USER_CODE64,
        ]
        .into_iter()
        .enumerate()
        {
            w(layout::GDT + i as u64 * 8, d)?;
        }
        // IDT: interrupt gates (DPL 0) to the 32 exception stubs.
        for v in 0..32u64 {
            let stub = read_u64(mem, header.isr_table + v * 8)?;
            let (lo, hi) = idt_gate(stub, gdt::KERNEL_CS);
            w(layout::IDT + v * 16, lo)?;
            w(layout::IDT + v * 16 + 8, hi)?;
        }
        // One TSS per vCPU; only RSP0 matters (the stack for exceptions).
        for i in 0..u64::from(self.vcpus) {
            let tss = layout::TSS_BASE + i * layout::TSS_STRIDE;
            let rsp0 = layout::KSTACK_BASE + (i + 1) * layout::KSTACK_SIZE;
            // RSP0 sits at offset 4, unaligned.
            mem.write_slice(&rsp0.to_le_bytes(), GuestAddress(tss + 4))
                .map_err(|e| VmmError::GuestMemory(format!("writing the TSS: {e}")))?;
            // I/O map base past the limit: no I/O permission bitmap.
            mem.write_slice(&104u16.to_le_bytes(), GuestAddress(tss + 0x66))
                .map_err(|e| VmmError::GuestMemory(format!("writing the TSS: {e}")))?;
        }

        // Parameter block.
        let p = |off: u64, val: u64| w(layout::PARAMS + off, val);
        p(params::MAGIC, params::VALUE_MAGIC)?;
        p(params::WORKLOAD, self.workload.guest_code())?;
        p(params::NR_VCPUS, u64::from(self.vcpus))?;
        p(params::TSC_KHZ, u64::from(self.tsc_khz.max(1)))?;
        p(params::STAMP, self.stamp)?;
        p(params::DONE, 0)?;
        if let Workload::Dirty {
            pages_per_sec,
            region_mib,
            heartbeat_ms,
        } = self.workload
        {
            let counter = counter_addr(self.plan);
            p(params::COUNTER_ADDR, counter)?;
            p(params::DIRTY_BASE, counter + layout::PAGE_SIZE)?;
            p(
                params::DIRTY_PAGES,
                region_mib * (1 << 20) / layout::PAGE_SIZE,
            )?;
            p(params::DIRTY_RATE, *pages_per_sec)?;
            p(params::HEARTBEAT_MS, *heartbeat_ms)?;
        }
        if let Workload::Balloon {
            touch_mib,
            keep_mib,
            report_free,
            ignore_target,
            use_deflated,
            grow_mib,
        } = self.workload
        {
            if layout::DRIVER_BASE + BALLOON_DRIVER.len() as u64
                > layout::PROGRAM + layout::PROGRAM_MAX
                || layout::PROGRAM + PROGRAM.len() as u64 > layout::DRIVER_BASE
            {
                return Err(VmmError::GuestProgram(
                    "the balloon driver does not fit its slot".into(),
                ));
            }
            mem.write_slice(BALLOON_DRIVER, GuestAddress(layout::DRIVER_BASE))
                .map_err(|e| VmmError::GuestMemory(format!("loading the balloon driver: {e}")))?;
            let area = self.plan.area_start;
            p(params::B_MMIO, layout::BALLOON_MMIO_BASE)?;
            p(params::B_AREA, area)?;
            p(params::B_POOL_START, area + layout::DRIVER_AREA)?;
            p(params::B_POOL_END, self.ram)?;
            p(params::B_TOUCH, touch_mib << 20)?;
            p(params::B_KEEP, keep_mib << 20)?;
            let mut flags = 0;
            if *report_free {
                flags |= params::B_FLAG_REPORT;
            }
            if *ignore_target {
                flags |= params::B_FLAG_IGNORE_TARGET;
            }
            if !*use_deflated {
                flags |= params::B_FLAG_LAZY_DEFLATE;
            }
            p(params::B_FLAGS, flags)?;
            p(params::B_GROW, grow_mib << 20)?;
            p(params::B_STACK_TOP, area + layout::DRIVER_AREA)?;
            p(params::B_HEARTBEAT_MS, 100)?;
        }
        // Touch lists, one after another from LISTS.
        let mut next = layout::LISTS;
        let cycles_per_us = u64::from(self.tsc_khz) / 1000;
        for (i, list) in self.plan.lists.iter().enumerate() {
            let i = i as u64;
            p(params::LISTS + i * 16, next)?;
            p(params::LISTS + i * 16 + 8, list.len() as u64)?;
            let mut buf = Vec::with_capacity(list.len() * 24);
            for run in list {
                buf.extend_from_slice(&run.gpa.to_le_bytes());
                buf.extend_from_slice(&run.pages.to_le_bytes());
                let spin = run.compute_us.saturating_mul(cycles_per_us);
                buf.extend_from_slice(&spin.to_le_bytes());
            }
            mem.write_slice(&buf, GuestAddress(next))
                .map_err(|e| VmmError::GuestMemory(format!("writing touch lists: {e}")))?;
            next += list.len() as u64 * ENTRY_BYTES;
        }
        Ok(header)
    }
}

/// The two qwords of a 64-bit interrupt gate (present, DPL 0, type 0xE).
pub(crate) fn idt_gate(handler: u64, selector: u16) -> (u64, u64) {
    let lo = (handler & 0xFFFF)
        | (u64::from(selector) << 16)
        | (0x8Eu64 << 40)
        | (((handler >> 16) & 0xFFFF) << 48);
    (lo, handler >> 32)
}

pub(crate) fn write_u64(mem: &GuestMemoryMmap, addr: u64, val: u64) -> Result<(), VmmError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| VmmError::GuestMemory(format!("write at {addr:#x}: {e}")))
}

pub(crate) fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> Result<u64, VmmError> {
    mem.read_obj(GuestAddress(addr))
        .map_err(|e| VmmError::GuestMemory(format!("read at {addr:#x}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_header_points_inside_program() {
        let h = program_header(PROGRAM).unwrap();
        assert!(h.entry > layout::PROGRAM);
        assert!(h.isr_table > h.entry);
        let mut bad = PROGRAM.to_vec();
        bad[0] ^= 1;
        assert!(program_header(&bad).is_err());
        assert!(program_header(&PROGRAM[..16]).is_err());
    }

    #[test]
    fn idt_gate_splits_handler_address() {
        let (lo, hi) = idt_gate(0x1234_5678_9abc_def0, 0x08);
        assert_eq!(lo & 0xFFFF, 0xdef0);
        assert_eq!((lo >> 16) & 0xFFFF, 0x08);
        assert_eq!((lo >> 40) & 0xFF, 0x8E);
        assert_eq!(lo >> 48, 0x9abc);
        assert_eq!(hi, 0x1234_5678);
    }

    #[test]
    fn setup_maps_ram_and_labdev_with_user_large_pages() {
        let ram = 64u64 << 20;
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), usize::try_from(ram).unwrap())])
                .unwrap();
        let w = Workload::Sequential { touch_mib: 4 };
        let plan = WorkloadPlan::new(&w, ram, 1).unwrap();
        GuestSetup {
            ram,
            vcpus: 1,
            tsc_khz: 2_000_000,
            stamp: 1,
            workload: &w,
            plan: &plan,
        }
        .write(&mem)
        .unwrap();
        let pd0 = read_u64(&mem, layout::PDPT).unwrap() & !0xFFF;
        assert_eq!(pd0, layout::PD_BASE);
        // Last RAM large page is mapped, the next one is not.
        assert_eq!(read_u64(&mem, pd0 + 31 * 8).unwrap(), (31 << 21) | 0x87);
        assert_eq!(read_u64(&mem, pd0 + 32 * 8).unwrap(), 0);
        let labdev_pd = read_u64(&mem, layout::PDPT + (layout::LABDEV_BASE >> 30) * 8).unwrap();
        assert_eq!(
            read_u64(&mem, labdev_pd & !0xFFF).unwrap(),
            layout::LABDEV_BASE | 0x87
        );
        assert_eq!(
            read_u64(&mem, layout::PARAMS + params::LISTS).unwrap(),
            layout::LISTS
        );
    }
}
