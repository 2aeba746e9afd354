//! The pure part of the RDMA transport: what the two sides exchange over
//! the control connection to connect their queue pairs, the 16-byte zero-run
//! message, the immediate-data sequence, and every check on a value the
//! peer chose. Nothing here touches a device, so all of it is tested on
//! machines without one; `verbs.rs` calls these checks before it posts a
//! work request or touches guest memory.

use serde::{Deserialize, Serialize};

use crate::proto::{MAX_RUN_PAGES, PAGE_SIZE};

/// Largest queue pair number (QPNs are 24 bits).
pub const MAX_QPN: u32 = 0x00FF_FFFF;
/// Largest packet sequence number (24 bits).
pub const MAX_PSN: u32 = 0x00FF_FFFF;
/// Bytes of one zero-run message (RDMA SEND payload).
pub const ZERO_MSG_LEN: usize = 16;
/// Most pages one zero run may name (as in the TCP `zero` frame).
pub const MAX_ZERO_PAGES: u64 = 1 << 40;

/// One side's RC queue pair, as the other side needs it to connect
/// (`RdmaConnect` from the source, inside `RdmaAccept` from the destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpEndpoint {
    /// The port's LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number this side sends.
    pub psn: u32,
    /// The port GID at the chosen index (all zero where unused).
    pub gid: [u8; 16],
    /// The port's active MTU as `enum ibv_mtu` (1 = 256 B .. 5 = 4096 B).
    pub mtu: u8,
}

/// The destination's guest RAM as one registered memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRegion {
    /// Virtual address of guest-physical address 0 in the destination process.
    pub addr: u64,
    /// Length in bytes (the guest's RAM size).
    pub len: u64,
    /// Remote key of the region.
    pub rkey: u32,
}

impl QpEndpoint {
    /// Checks the fields a peer chose; `Err` says which one is wrong.
    pub fn check(&self) -> Result<(), String> {
        // QPN 0 and 1 are the special SMI/GSI queue pairs, never an RC QP.
        if self.qpn < 2 || self.qpn > MAX_QPN {
            return Err(format!("queue pair number {:#x} (2 to 0xffffff)", self.qpn));
        }
        if self.psn > MAX_PSN {
            return Err(format!("packet sequence number {:#x} (24 bits)", self.psn));
        }
        if !(1..=5).contains(&self.mtu) {
            return Err(format!("MTU code {} (1 to 5)", self.mtu));
        }
        if self.lid == 0 && self.gid == [0; 16] {
            return Err("neither a LID nor a GID".into());
        }
        Ok(())
    }

    /// True when the address needs a global route header (RoCE, or no LID).
    pub fn needs_grh(&self, ethernet: bool) -> bool {
        ethernet || self.lid == 0
    }
}

/// The path MTU both sides support: the smaller `enum ibv_mtu` code.
pub fn path_mtu(local: u8, remote: u8) -> u8 {
    local.min(remote)
}

impl RemoteRegion {
    /// Source: checks the destination's region against the RAM size both
    /// sides agreed on in `Hello`.
    pub fn check(&self, ram_bytes: u64) -> Result<(), String> {
        if self.len != ram_bytes {
            return Err(format!(
                "memory region of {} bytes where the VM has {ram_bytes}",
                self.len
            ));
        }
        if self.len == 0 || !self.len.is_multiple_of(PAGE_SIZE) {
            return Err(format!(
                "memory region of {} bytes (not whole pages)",
                self.len
            ));
        }
        if self.addr.checked_add(self.len).is_none() {
            return Err(format!(
                "memory region at {:#x} of {} bytes wraps the address space",
                self.addr, self.len
            ));
        }
        Ok(())
    }
}

/// Why a page run cannot go to (or come from) the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// Address not page aligned.
    #[error("guest address {0:#x} is not 4 KiB aligned")]
    Unaligned(u64),
    /// Empty run, or not whole pages.
    #[error("run of {0} bytes is not a non-zero multiple of 4 KiB")]
    Length(u64),
    /// Longer than one frame may be.
    #[error("run of {0} pages is longer than allowed")]
    TooLong(u64),
    /// Past the end of guest RAM.
    #[error("run at {gpa:#x} of {bytes} bytes ends past guest RAM ({ram} bytes)")]
    OutOfRange {
        /// First byte.
        gpa: u64,
        /// Length.
        bytes: u64,
        /// RAM size.
        ram: u64,
    },
}

fn in_ram(gpa: u64, bytes: u64, ram: u64) -> Result<(), RunError> {
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return Err(RunError::Unaligned(gpa));
    }
    match gpa.checked_add(bytes) {
        Some(end) if end <= ram => Ok(()),
        _ => Err(RunError::OutOfRange { gpa, bytes, ram }),
    }
}

/// Checks a data run of `bytes` bytes at `gpa` against `ram` bytes of RAM.
pub fn check_data_run(gpa: u64, bytes: u64, ram: u64) -> Result<(), RunError> {
    if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) {
        return Err(RunError::Length(bytes));
    }
    if bytes / PAGE_SIZE > MAX_RUN_PAGES {
        return Err(RunError::TooLong(bytes / PAGE_SIZE));
    }
    in_ram(gpa, bytes, ram)
}

/// Checks a zero run of `pages` pages at `gpa`; returns its length in bytes.
pub fn check_zero_run(gpa: u64, pages: u64, ram: u64) -> Result<u64, RunError> {
    if pages == 0 {
        return Err(RunError::Length(0));
    }
    if pages > MAX_ZERO_PAGES {
        return Err(RunError::TooLong(pages));
    }
    // pages <= 2^40, so pages * 4096 <= 2^52: no overflow.
    let bytes = pages * PAGE_SIZE;
    in_ram(gpa, bytes, ram)?;
    Ok(bytes)
}

/// Encodes a zero run as the payload of an RDMA SEND.
pub fn encode_zero(gpa: u64, pages: u64) -> [u8; ZERO_MSG_LEN] {
    let mut m = [0u8; ZERO_MSG_LEN];
    m[..8].copy_from_slice(&gpa.to_le_bytes());
    m[8..].copy_from_slice(&pages.to_le_bytes());
    m
}

/// Decodes a received zero-run message of `b.len()` bytes (the completion's
/// byte count); the range is checked separately with [`check_zero_run`].
pub fn decode_zero(b: &[u8]) -> Result<(u64, u64), String> {
    if b.len() != ZERO_MSG_LEN {
        return Err(format!(
            "zero-run message of {} bytes ({ZERO_MSG_LEN} expected)",
            b.len()
        ));
    }
    let mut g = [0u8; 8];
    let mut p = [0u8; 8];
    g.copy_from_slice(&b[..8]);
    p.copy_from_slice(&b[8..]);
    Ok((u64::from_le_bytes(g), u64::from_le_bytes(p)))
}

/// The immediate data of frame number `seq` (network byte order, as
/// `ibv_send_wr.imm_data` wants it).
pub fn imm_for(seq: u32) -> u32 {
    seq.to_be()
}

/// Checks a completion's immediate data against the frame number expected
/// next. RC delivers in order, so any other value means a broken or
/// hostile peer.
pub fn check_imm(imm_be: u32, expected: u32) -> Result<(), String> {
    let got = u32::from_be(imm_be);
    if got == expected {
        Ok(())
    } else {
        Err(format!("frame number {got} where {expected} was next"))
    }
}

/// Splits `len` bytes into pieces of at most `slot` bytes: (offset, length).
/// The last piece of a run carries the immediate data.
pub fn chunks(len: usize, slot: usize) -> impl Iterator<Item = (usize, usize)> {
    let slot = slot.max(1);
    (0..len.div_ceil(slot)).map(move |i| {
        let off = i * slot;
        (off, slot.min(len - off))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> QpEndpoint {
        QpEndpoint {
            lid: 0,
            qpn: 0x11,
            psn: 0x123,
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
            mtu: 3,
        }
    }

    #[test]
    fn endpoint_with_sane_fields_passes() {
        assert_eq!(ep().check(), Ok(()));
    }

    #[test]
    fn endpoint_special_or_wide_qpn_is_refused() {
        for qpn in [0, 1, MAX_QPN + 1, u32::MAX] {
            let e = QpEndpoint { qpn, ..ep() };
            assert!(e.check().unwrap_err().contains("queue pair"), "{qpn}");
        }
    }

    #[test]
    fn endpoint_wide_psn_bad_mtu_or_no_address_is_refused() {
        assert!(
            QpEndpoint {
                psn: 1 << 24,
                ..ep()
            }
            .check()
            .is_err()
        );
        assert!(QpEndpoint { mtu: 0, ..ep() }.check().is_err());
        assert!(QpEndpoint { mtu: 6, ..ep() }.check().is_err());
        assert!(
            QpEndpoint {
                gid: [0; 16],
                ..ep()
            }
            .check()
            .is_err()
        );
        assert!(
            QpEndpoint {
                gid: [0; 16],
                lid: 7,
                ..ep()
            }
            .check()
            .is_ok()
        );
    }

    #[test]
    fn grh_on_ethernet_or_without_lid() {
        assert!(ep().needs_grh(false));
        assert!(QpEndpoint { lid: 3, ..ep() }.needs_grh(true));
        assert!(!QpEndpoint { lid: 3, ..ep() }.needs_grh(false));
        assert_eq!(path_mtu(5, 3), 3);
        assert_eq!(path_mtu(2, 4), 2);
    }

    #[test]
    fn region_must_match_the_agreed_ram_size() {
        let r = RemoteRegion {
            addr: 0x7f00_0000_0000,
            len: 1 << 30,
            rkey: 9,
        };
        assert_eq!(r.check(1 << 30), Ok(()));
        assert!(r.check(1 << 29).unwrap_err().contains("where the VM has"));
        assert!(r.check(1 << 31).is_err());
    }

    #[test]
    fn region_that_wraps_or_is_not_whole_pages_is_refused() {
        let r = RemoteRegion {
            addr: u64::MAX - 4095,
            len: 8192,
            rkey: 1,
        };
        assert!(r.check(8192).unwrap_err().contains("wraps"));
        let r = RemoteRegion {
            addr: 0x1000,
            len: 100,
            rkey: 1,
        };
        assert!(r.check(100).unwrap_err().contains("whole pages"));
        let r = RemoteRegion {
            addr: 0x1000,
            len: 0,
            rkey: 1,
        };
        assert!(r.check(0).is_err());
    }

    #[test]
    fn data_runs_inside_ram_pass_and_others_do_not() {
        let ram = 1 << 20;
        assert_eq!(check_data_run(0, 4096, ram), Ok(()));
        assert_eq!(check_data_run(ram - 4096, 4096, ram), Ok(()));
        assert_eq!(
            check_data_run(ram, 4096, ram),
            Err(RunError::OutOfRange {
                gpa: ram,
                bytes: 4096,
                ram
            })
        );
        assert_eq!(
            check_data_run(0x800, 4096, ram),
            Err(RunError::Unaligned(0x800))
        );
        assert_eq!(check_data_run(0, 0, ram), Err(RunError::Length(0)));
        assert_eq!(check_data_run(0, 100, ram), Err(RunError::Length(100)));
        assert_eq!(
            check_data_run(0, (MAX_RUN_PAGES + 1) * PAGE_SIZE, u64::MAX),
            Err(RunError::TooLong(MAX_RUN_PAGES + 1))
        );
        // gpa + len overflows u64: out of range, not a wrapped small address.
        let top = u64::MAX - 4095;
        assert!(matches!(
            check_data_run(top, 8192, u64::MAX),
            Err(RunError::OutOfRange { .. })
        ));
    }

    #[test]
    fn zero_runs_are_checked_like_data_runs() {
        let ram = 1 << 20;
        assert_eq!(check_zero_run(0, 256, ram), Ok(ram));
        assert!(matches!(
            check_zero_run(4096, 256, ram),
            Err(RunError::OutOfRange { .. })
        ));
        assert_eq!(check_zero_run(0, 0, ram), Err(RunError::Length(0)));
        assert_eq!(
            check_zero_run(0, MAX_ZERO_PAGES + 1, u64::MAX),
            Err(RunError::TooLong(MAX_ZERO_PAGES + 1))
        );
        assert!(matches!(
            check_zero_run(u64::MAX - 4095, MAX_ZERO_PAGES, u64::MAX),
            Err(RunError::OutOfRange { .. })
        ));
        assert_eq!(check_zero_run(1, 1, ram), Err(RunError::Unaligned(1)));
    }

    #[test]
    fn zero_message_round_trips_and_wrong_lengths_fail() {
        let m = encode_zero(0xabc000, 77);
        assert_eq!(decode_zero(&m), Ok((0xabc000, 77)));
        assert!(decode_zero(&m[..15]).is_err());
        assert!(decode_zero(&[0u8; 17]).is_err());
        assert!(decode_zero(&[]).is_err());
    }

    #[test]
    fn immediate_data_is_the_frame_number_in_network_order() {
        let imm = imm_for(0x0102_0304);
        assert_eq!(imm.to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(check_imm(imm, 0x0102_0304), Ok(()));
        assert!(
            check_imm(imm, 0x0102_0305)
                .unwrap_err()
                .contains("frame number")
        );
        assert_eq!(check_imm(imm_for(u32::MAX), u32::MAX), Ok(()));
    }

    #[test]
    fn chunks_cover_the_run_exactly() {
        let c: Vec<_> = chunks(10, 4).collect();
        assert_eq!(c, vec![(0, 4), (4, 4), (8, 2)]);
        let c: Vec<_> = chunks(8, 4).collect();
        assert_eq!(c, vec![(0, 4), (4, 4)]);
        assert_eq!(chunks(0, 4).count(), 0);
        assert_eq!(chunks(3, 4).collect::<Vec<_>>(), vec![(0, 3)]);
    }

    #[test]
    fn endpoint_json_round_trips() {
        let j = serde_json::to_string(&ep()).unwrap();
        assert_eq!(serde_json::from_str::<QpEndpoint>(&j).unwrap(), ep());
        // A GID byte over 255 or a short GID is a decode error, not a truncation.
        let bad = j.replace("254", "300");
        assert!(serde_json::from_str::<QpEndpoint>(&bad).is_err());
    }
}
