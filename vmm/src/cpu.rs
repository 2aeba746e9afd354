//! CPU state shared by every way labvm enters a guest.

use kvm_bindings::{kvm_segment, kvm_sregs};

/// Loads flat 64-bit segments: CS (`cs`, 64-bit code) and DS, ES, FS, GS,
/// SS (`ds`, read/write data), all at privilege level `dpl`. Returns the
/// code segment so callers can derive others (TR) from it.
pub(crate) fn flat_long_mode_segments(
    sregs: &mut kvm_sregs,
    dpl: u8,
    cs: u16,
    ds: u16,
) -> kvm_segment {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: cs,
        type_: 0xb,
        present: 1,
        dpl,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: ds,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    code
}
