//! The lab device: one guest-physical page with no memory behind it, so that
//! each guest write is an MMIO exit. The guest uses it to report ready,
//! progress, exit status, log strings, heartbeats and faults. Decoding is
//! pure; the guest controls every value, so nothing here trusts them.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{LABDEV_BASE, LABDEV_SIZE};

/// Register offsets (must match `guest/lab.S`).
pub(crate) mod reg {
    pub const READY: u64 = 0x00;
    pub const PROGRESS: u64 = 0x08;
    pub const EXIT: u64 = 0x10;
    pub const LOG: u64 = 0x18;
    pub const PARK: u64 = 0x20;
    pub const HEARTBEAT: u64 = 0x28;
    pub const FAULT: u64 = 0x30;
}

/// Longest log string read from the guest.
pub(crate) const MAX_LOG: usize = 256;

/// A decoded write to the lab device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LabWrite {
    Ready,
    Progress(u64),
    Exit(u64),
    Log(u64),
    Park,
    Heartbeat(u64),
    Fault(u64),
    Unknown(u64),
}

/// Decodes an MMIO write; `None` when the address is not the lab device.
pub(crate) fn decode(addr: u64, data: &[u8]) -> Option<LabWrite> {
    let off = addr.checked_sub(LABDEV_BASE)?;
    if off >= LABDEV_SIZE {
        return None;
    }
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    let v = u64::from_le_bytes(bytes);
    Some(match off {
        reg::READY => LabWrite::Ready,
        reg::PROGRESS => LabWrite::Progress(v),
        reg::EXIT => LabWrite::Exit(v),
        reg::LOG => LabWrite::Log(v),
        reg::PARK => LabWrite::Park,
        reg::HEARTBEAT => LabWrite::Heartbeat(v),
        reg::FAULT => LabWrite::Fault(v),
        other => LabWrite::Unknown(other),
    })
}

/// Reads a NUL-terminated string of at most [`MAX_LOG`] bytes from guest
/// memory; `None` when `gpa` is outside guest RAM.
pub(crate) fn read_guest_string(mem: &GuestMemoryMmap, gpa: u64) -> Option<String> {
    let mut buf = Vec::with_capacity(64);
    for i in 0..MAX_LOG as u64 {
        let b: u8 = mem.read_obj(GuestAddress(gpa.checked_add(i)?)).ok()?;
        if b == 0 {
            break;
        }
        buf.push(b);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Name of an x86 exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 floating point",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating point",
        20 => "#VE virtualisation",
        21 => "#CP control protection",
        _ => "reserved exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_maps_registers_and_ignores_other_addresses() {
        assert_eq!(decode(LABDEV_BASE, &[1]), Some(LabWrite::Ready));
        assert_eq!(
            decode(LABDEV_BASE + reg::EXIT, &7u64.to_le_bytes()),
            Some(LabWrite::Exit(7))
        );
        assert_eq!(
            decode(LABDEV_BASE + reg::PROGRESS, &[0x34, 0x12]),
            Some(LabWrite::Progress(0x1234))
        );
        assert_eq!(
            decode(LABDEV_BASE + 0x800, &[0]),
            Some(LabWrite::Unknown(0x800))
        );
        assert_eq!(decode(LABDEV_BASE - 8, &[0]), None);
        assert_eq!(decode(LABDEV_BASE + LABDEV_SIZE, &[0]), None);
        // Oversized data (not produced by KVM, but guest-shaped) is cut, not a panic.
        assert_eq!(
            decode(LABDEV_BASE + reg::HEARTBEAT, &[1; 16]),
            Some(LabWrite::Heartbeat(0x0101_0101_0101_0101))
        );
    }

    #[test]
    fn guest_strings_are_bounded_and_checked() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        mem.write_slice(b"hello\0", GuestAddress(0x100)).unwrap();
        assert_eq!(read_guest_string(&mem, 0x100).as_deref(), Some("hello"));
        mem.write_slice(&[b'a'; 600], GuestAddress(0x200)).unwrap();
        assert_eq!(read_guest_string(&mem, 0x200).unwrap().len(), MAX_LOG);
        assert_eq!(read_guest_string(&mem, 0x10_0000), None);
        assert_eq!(read_guest_string(&mem, u64::MAX), None);
    }
}
