//! Booting Linux guests: only where KVM has hardware virtualisation.
//!
//! On a software-virtualised KVM (PVM, shadow paging) guest code at CPL0 is
//! emulated one instruction at a time, so a Linux kernel does not boot in
//! any useful time; [`boot`] detects that first and refuses with the reason.
//!
//! Elsewhere labvm loads a bzImage with linux-loader (64-bit boot protocol),
//! an optional initrd and a command line, writes the zero page (e820 map,
//! setup header), enters the kernel's 64-bit entry point with identity-mapped
//! page tables, and runs one vCPU with an in-kernel irqchip and PIT and a
//! 16550 serial console (vm-superio) on COM1 whose output goes to stdout.
//! There are no MP or ACPI tables, so a Linux guest gets one vCPU.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_segment,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{KernelLoader, bzimage::BzImage, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical layout of a Linux boot.
mod addr {
    pub const GDT: u64 = 0x500;
    pub const IDT: u64 = 0x520;
    pub const ZERO_PAGE: u64 = 0x7000;
    pub const BOOT_STACK: u64 = 0x8ff0;
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    pub const CMDLINE: u64 = 0x20000;
    pub const CMDLINE_U32: u32 = 0x20000;
    pub const CMDLINE_MAX: usize = 0x10000;
    /// Kernel load address (and start of high memory).
    pub const HIMEM: u64 = 0x10_0000;
    /// End of conventional memory (the EBDA starts here).
    pub const EBDA: u64 = 0x9_fc00;
    /// Linux guests stay below the 32-bit PCI hole.
    pub const MAX_RAM: u64 = 3 << 30;
}

const COM1: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Why Linux cannot be booted, or what went wrong booting it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinuxError {
    /// This host's KVM cannot run a Linux guest.
    #[error("cannot boot Linux on this host: {0}")]
    Unsupported(String),
    /// The boot configuration is wrong.
    #[error("invalid Linux boot configuration: {0}")]
    Config(String),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not a loadable bzImage.
    #[error("cannot load kernel {path}: {reason}")]
    Kernel {
        /// The image.
        path: PathBuf,
        /// linux-loader's reason.
        reason: String,
    },
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU stopped in a way labvm does not handle.
    #[error("vCPU stopped: {0}")]
    Vcpu(String),
}

/// What this host's KVM is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Virtualisation {
    /// Intel VT-x or AMD-V: guests run at every privilege level natively.
    Hardware(&'static str),
    /// Software virtualisation (PVM): only CPL3 guest code runs natively.
    Pvm,
    /// Neither CPU flag nor PVM module: nested or unknown.
    Unknown,
}

/// Detects the kind of virtualisation from `/proc/cpuinfo` and `/sys/module`.
pub fn detect() -> Virtualisation {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify(&cpuinfo, Path::new("/sys/module/kvm_pvm").exists())
}

/// Pure part of [`detect`].
pub fn classify(cpuinfo: &str, pvm_module: bool) -> Virtualisation {
    if pvm_module {
        return Virtualisation::Pvm;
    }
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    if has("vmx") {
        Virtualisation::Hardware("vmx")
    } else if has("svm") {
        Virtualisation::Hardware("svm")
    } else {
        Virtualisation::Unknown
    }
}

/// Refuses a Linux boot unless the host has hardware virtualisation.
pub fn require_hardware_virtualisation() -> Result<&'static str, LinuxError> {
    refusal(detect())
}

fn refusal(v: Virtualisation) -> Result<&'static str, LinuxError> {
    match v {
        Virtualisation::Hardware(f) => Ok(f),
        Virtualisation::Pvm => Err(LinuxError::Unsupported(
            "KVM here is PVM (software virtualisation, module kvm_pvm): guest kernel code is \
             emulated one instruction at a time and a Linux kernel does not boot; lab guests \
             (CPL3 workloads) run, Linux needs a host with VT-x or AMD-V"
                .into(),
        )),
        Virtualisation::Unknown => Err(LinuxError::Unsupported(
            "the CPU reports neither vmx nor svm, so KVM has no hardware virtualisation here; \
             Linux needs a host with VT-x or AMD-V"
                .into(),
        )),
    }
}

/// A Linux boot.
#[derive(Clone, Debug)]
pub struct LinuxConfig {
    /// The bzImage.
    pub kernel: PathBuf,
    /// An initrd, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB (at most 3072).
    pub ram_mib: u64,
    /// vCPUs (1: no MP or ACPI tables are provided).
    pub vcpus: u32,
    /// Stop the guest after this long (None: until it powers off or resets).
    pub timeout: Option<Duration>,
}

/// The default command line: serial console, no PCI probing, reboot through
/// the keyboard controller (which labvm turns into a clean stop).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule";

/// Where things were put in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Where the kernel image starts.
    pub kernel_load: u64,
    /// The 64-bit entry point.
    pub entry: u64,
    /// Where the initrd was put, and its size.
    pub initrd: Option<(u64, u64)>,
}

/// Loads kernel, initrd and command line and writes the zero page and the
/// boot page tables. Pure over guest memory: no KVM.
pub fn load(mem: &GuestMemoryMmap, config: &LinuxConfig) -> Result<LoadedKernel, LinuxError> {
    let ram = config.ram_mib << 20;
    if !((64 << 20)..=addr::MAX_RAM).contains(&ram) {
        return Err(LinuxError::Config(format!(
            "{} MiB of RAM; Linux guests take 64 to {} MiB",
            config.ram_mib,
            addr::MAX_RAM >> 20
        )));
    }
    let mut kernel = File::open(&config.kernel).map_err(|source| LinuxError::Read {
        path: config.kernel.clone(),
        source,
    })?;
    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(addr::HIMEM)),
        &mut kernel,
        Some(GuestAddress(addr::HIMEM)),
    )
    .map_err(|e| LinuxError::Kernel {
        path: config.kernel.clone(),
        reason: e.to_string(),
    })?;
    let header = loaded.setup_header.ok_or_else(|| LinuxError::Kernel {
        path: config.kernel.clone(),
        reason: "no setup header".into(),
    })?;

    let mut cmdline = Cmdline::new(addr::CMDLINE_MAX)
        .map_err(|e| LinuxError::Config(format!("command line: {e}")))?;
    cmdline
        .insert_str(&config.cmdline)
        .map_err(|e| LinuxError::Config(format!("command line {:?}: {e}", config.cmdline)))?;
    load_cmdline(mem, GuestAddress(addr::CMDLINE), &cmdline)
        .map_err(|e| LinuxError::Memory(format!("writing the command line: {e}")))?;

    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(mem, path, ram, loaded.kernel_end, &header)?),
        None => None,
    };
    let params = boot_params_for(
        header,
        ram,
        u32::try_from(config.cmdline.len() + 1).unwrap_or(u32::MAX),
        initrd,
    );
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(addr::ZERO_PAGE)),
        mem,
    )
    .map_err(|e| LinuxError::Memory(format!("writing the zero page: {e}")))?;
    write_boot_tables(mem)?;
    Ok(LoadedKernel {
        kernel_load: loaded.kernel_load.0,
        entry: loaded.kernel_load.0 + 0x200,
        initrd,
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    ram: u64,
    kernel_end: u64,
    header: &setup_header,
) -> Result<(u64, u64), LinuxError> {
    let data = std::fs::read(path).map_err(|source| LinuxError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    // As high as possible, page aligned, below the kernel's initrd limit.
    let limit = match header.initrd_addr_max {
        0 => 0x37ff_ffff,
        m => u64::from(m),
    }
    .min(ram - 1);
    let start = (limit + 1)
        .checked_sub(size)
        .map(|s| s & !0xfff)
        .filter(|&s| s >= kernel_end)
        .ok_or_else(|| {
            LinuxError::Config(format!(
                "initrd {} ({size} bytes) does not fit between the kernel and {limit:#x}",
                path.display()
            ))
        })?;
    mem.write_slice(&data, GuestAddress(start))
        .map_err(|e| LinuxError::Memory(format!("writing the initrd: {e}")))?;
    Ok((start, size))
}

/// The zero page for a kernel with `header`, `ram` bytes of RAM, a command
/// line of `cmdline_size` bytes (with its NUL) and an optional initrd.
pub fn boot_params_for(
    header: setup_header,
    ram: u64,
    cmdline_size: u32,
    initrd: Option<(u64, u64)>,
) -> boot_params {
    let mut p = boot_params {
        hdr: header,
        ..Default::default()
    };
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448;
    p.hdr.cmd_line_ptr = addr::CMDLINE_U32;
    p.hdr.cmdline_size = cmdline_size;
    // CAN_USE_HEAP | KEEP_SEGMENTS-free loadflags plus LOADED_HIGH from the image.
    p.hdr.loadflags |= 0x80;
    p.hdr.heap_end_ptr = 0xfe00;
    if let Some((start, size)) = initrd {
        p.hdr.ramdisk_image = u32::try_from(start).unwrap_or(0);
        p.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }
    let entries: [(u64, u64, u32); 2] = [
        (0, addr::EBDA, 1u32),
        (addr::HIMEM, ram - addr::HIMEM, 1u32),
    ];
    for (i, (a, s, t)) in entries.into_iter().enumerate() {
        p.e820_table[i].addr = a;
        p.e820_table[i].size = s;
        p.e820_table[i].r#type = t;
    }
    p.e820_entries = 2;
    p
}

/// GDT, an empty IDT, and page tables identity-mapping the first GiB.
fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), LinuxError> {
    let w = |a: u64, v: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| LinuxError::Memory(format!("boot tables at {a:#x}: {e}")))
    };
    for (i, d) in [
        0u64,
        0x00af_9b00_0000_ffff, // 0x08: 64-bit code
        0x00cf_9300_0000_ffff, // 0x10: data
        0x008f_8b00_0000_ffff, // 0x18: TSS
    ]
    .into_iter()
    .enumerate()
    {
        w(addr::GDT + i as u64 * 8, d)?;
    }
    w(addr::IDT, 0)?;
    w(addr::PML4, addr::PDPT | 0x3)?;
    w(addr::PDPT, addr::PD | 0x3)?;
    for e in 0..512u64 {
        w(addr::PD + e * 8, (e << 21) | 0x83)?;
    }
    Ok(())
}

/// The COM1 interrupt line.
#[derive(Debug)]
struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Boots Linux and runs it until it powers off, resets, times out or
/// `stop` returns true. Serial output goes to `console`.
pub fn boot(
    config: &LinuxConfig,
    console: Box<dyn Write + Send>,
    stop: &dyn Fn() -> bool,
) -> Result<(), LinuxError> {
    let flavour = require_hardware_virtualisation()?;
    tracing::info!(flavour, "hardware virtualisation present; booting Linux");
    if config.vcpus != 1 {
        return Err(LinuxError::Config(
            "Linux guests get one vCPU (labvm provides no MP or ACPI tables)".into(),
        ));
    }
    let kvm_err = |op| move |source| LinuxError::Kvm { op, source };
    // Guest memory first: declared before the VM, it is dropped after it,
    // so the mapping outlives the memory slot on every path.
    let ram = config.ram_mib << 20;
    let ram_usize =
        usize::try_from(ram).map_err(|_| LinuxError::Config("RAM size too large".into()))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram_usize)])
        .map_err(|e| LinuxError::Memory(e.to_string()))?;
    let loaded = load(&mem, config)?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| LinuxError::Memory(e.to_string()))?;

    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("create PIT"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` starts a live anonymous mapping of `ram` bytes owned by
    // `mem`; `mem` is declared before `vm` and so dropped after it, on every
    // return path, so the mapping outlives the slot.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("set memory region"))?;

    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| LinuxError::Memory(e.to_string()))?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("register COM1 irqfd"))?;
    let mut serial = Serial::new(IrqLine(irq), console);

    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("get supported CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    setup_boot_vcpu(&vcpu, loaded.entry)?;

    let started = Instant::now();
    run_vcpu(&mut vcpu, &mut serial, config.timeout, started, stop)
}

fn run_vcpu(
    vcpu: &mut VcpuFd,
    serial: &mut Serial<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    timeout: Option<Duration>,
    started: Instant,
    stop: &dyn Fn() -> bool,
) -> Result<(), LinuxError> {
    loop {
        if stop() || timeout.is_some_and(|t| started.elapsed() >= t) {
            tracing::info!("stopping the Linux guest");
            return Ok(());
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if (COM1..COM1 + 8).contains(&port) {
                    let off = u8::try_from(port - COM1).unwrap_or(0);
                    if let Err(e) = serial.write(off, data.first().copied().unwrap_or(0)) {
                        tracing::warn!("serial write: {e:?}");
                    }
                } else if port == I8042_COMMAND && data.first() == Some(&I8042_RESET) {
                    tracing::info!("guest asked for a reset; stopping");
                    return Ok(());
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if (COM1..COM1 + 8).contains(&port) {
                    let off = u8::try_from(port - COM1).unwrap_or(0);
                    data.fill(serial.read(off));
                } else {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Shutdown) => {
                tracing::info!("guest powered off");
                return Ok(());
            }
            Ok(other) => return Err(LinuxError::Vcpu(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(source) => {
                return Err(LinuxError::Kvm {
                    op: "run vCPU",
                    source,
                });
            }
        }
    }
}

/// 64-bit boot protocol state: long mode, CPL0, flat segments, rsi = zero page.
fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), LinuxError> {
    let kvm_err = |op| move |source| LinuxError::Kvm { op, source };
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
    let code = crate::cpu::flat_long_mode_segments(&mut sregs, 0, 0x08, 0x10);
    sregs.tr = kvm_segment {
        selector: 0x18,
        type_: 0xb,
        s: 0,
        l: 0,
        db: 0,
        ..code
    };
    sregs.gdt.base = addr::GDT;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = addr::IDT;
    sregs.idt.limit = 7;
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.cr3 = addr::PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
    let mut regs = vcpu.get_regs().map_err(kvm_err("get regs"))?;
    regs.rip = entry;
    regs.rsp = addr::BOOT_STACK;
    regs.rbp = addr::BOOT_STACK;
    regs.rsi = addr::ZERO_PAGE;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
    let mut fpu = vcpu.get_fpu().map_err(kvm_err("get FPU"))?;
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    vcpu.set_fpu(&fpu).map_err(kvm_err("set FPU"))?;
    // LINT0 = ExtINT (the PIC), LINT1 = NMI.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("get LAPIC"))?;
    set_lvt(&mut lapic.regs, 0x350, 7);
    set_lvt(&mut lapic.regs, 0x360, 4);
    vcpu.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))?;
    Ok(())
}

/// Sets the delivery mode of a local APIC LVT register.
fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = x as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A minimal bzImage: a real-mode setup area of one sector plus the boot
    /// sector, with a version 2.15 setup header, then `payload`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img.extend_from_slice(payload);
        img
    }

    fn files(payload: &[u8], initrd: Option<&[u8]>) -> (tempfile::TempDir, LinuxConfig) {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("bzImage");
        File::create(&k)
            .unwrap()
            .write_all(&bzimage(payload))
            .unwrap();
        let i = initrd.map(|d| {
            let p = dir.path().join("initrd");
            std::fs::write(&p, d).unwrap();
            p
        });
        let config = LinuxConfig {
            kernel: k,
            initrd: i,
            cmdline: DEFAULT_CMDLINE.into(),
            ram_mib: 128,
            vcpus: 1,
            timeout: None,
        };
        (dir, config)
    }

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(
            GuestAddress(0),
            usize::try_from(mib * MIB).unwrap(),
        )])
        .unwrap()
    }

    #[test]
    fn classify_tells_hardware_pvm_and_unknown_apart() {
        assert_eq!(
            classify("processor: 0\nflags\t: fpu vmx sse\n", false),
            Virtualisation::Hardware("vmx")
        );
        assert_eq!(
            classify("flags\t: fpu svm\n", false),
            Virtualisation::Hardware("svm")
        );
        assert_eq!(classify("flags\t: fpu svm\n", true), Virtualisation::Pvm);
        assert_eq!(
            classify("flags\t: fpu sse\n", false),
            Virtualisation::Unknown
        );
        let err = refusal(Virtualisation::Pvm).unwrap_err().to_string();
        assert!(err.contains("PVM") && err.contains("VT-x"), "{err}");
        assert!(refusal(Virtualisation::Unknown).is_err());
        assert_eq!(refusal(Virtualisation::Hardware("svm")).unwrap(), "svm");
    }

    #[test]
    fn load_places_kernel_cmdline_initrd_and_zero_page() {
        let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let (_dir, config) = files(&payload, Some(&[7u8; 10_000]));
        let m = mem(128);
        let k = load(&m, &config).unwrap();
        assert_eq!(k.kernel_load, addr::HIMEM);
        assert_eq!(k.entry, addr::HIMEM + 0x200);
        let mut back = vec![0u8; payload.len()];
        m.read_slice(&mut back, GuestAddress(addr::HIMEM)).unwrap();
        assert_eq!(back, payload);

        let (start, size) = k.initrd.unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(start % 4096, 0);
        assert!(start + size <= 128 * MIB);
        let b: u8 = m.read_obj(GuestAddress(start + 9_999)).unwrap();
        assert_eq!(b, 7);

        let mut cl = vec![0u8; DEFAULT_CMDLINE.len() + 1];
        m.read_slice(&mut cl, GuestAddress(addr::CMDLINE)).unwrap();
        assert_eq!(&cl[..DEFAULT_CMDLINE.len()], DEFAULT_CMDLINE.as_bytes());
        assert_eq!(cl[DEFAULT_CMDLINE.len()], 0);

        let p: boot_params = m.read_obj(GuestAddress(addr::ZERO_PAGE)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!(u64::from(p.hdr.cmd_line_ptr), addr::CMDLINE);
        assert_eq!(u64::from(p.hdr.ramdisk_image), start);
        assert_eq!({ p.hdr.ramdisk_size }, 10_000);
        assert_eq!(p.e820_entries, 2);
        assert_eq!({ p.e820_table[1].addr }, addr::HIMEM);
        assert_eq!({ p.e820_table[1].size }, 128 * MIB - addr::HIMEM);
        // Identity map of the first GiB with 2 MiB pages.
        let pde: u64 = m.read_obj(GuestAddress(addr::PD + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
    }

    #[test]
    fn load_rejects_non_bzimage_and_bad_sizes() {
        let (dir, mut config) = files(&[1, 2, 3], None);
        let m = mem(128);
        std::fs::write(&config.kernel, vec![0u8; 4096]).unwrap();
        assert!(matches!(load(&m, &config), Err(LinuxError::Kernel { .. })));
        config.kernel = dir.path().join("missing");
        assert!(matches!(load(&m, &config), Err(LinuxError::Read { .. })));
        let (_d2, mut c2) = files(&[1], None);
        c2.ram_mib = 32;
        assert!(matches!(load(&mem(32), &c2), Err(LinuxError::Config(_))));
        let (_d3, c3) = files(&[1], Some(&vec![0u8; 129 * 1024 * 1024]));
        assert!(matches!(load(&mem(128), &c3), Err(LinuxError::Config(_))));
        let (_d4, mut c4) = files(&[1], None);
        c4.cmdline = "x".repeat(addr::CMDLINE_MAX + 1);
        assert!(matches!(load(&mem(128), &c4), Err(LinuxError::Config(_))));
    }

    #[test]
    fn lvt_delivery_mode_is_replaced_not_ored() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x351] = 0x07; // mode 7 already, plus masked bit elsewhere
        regs[0x352] = 0x01;
        set_lvt(&mut regs, 0x350, 4);
        assert_eq!(regs[0x351] as u8, 0x04);
        assert_eq!(regs[0x352] as u8, 0x01);
    }
}
