//! The migration decoder against garbage, truncation and corruption.

use proptest::prelude::*;
use rdma::proto::{self, Control, Frame, PageRun, ProtocolError, QpEndpoint, RemoteRegion};
use rdma::rdma_wire::{self, RunError};

fn control() -> impl Strategy<Value = Control> {
    prop_oneof![
        Just(Control::Accept),
        Just(Control::Complete),
        Just(Control::Running),
        Just(Control::Loaded),
        Just(Control::Go),
        (any::<u32>(), any::<u64>(), any::<bool>()).prop_map(|(round, frames, last)| {
            Control::RoundEnd {
                round,
                frames,
                last,
            }
        }),
        any::<u32>().prop_map(|round| Control::RoundAck { round }),
        (any::<u32>(), ".{0,64}").prop_map(|(index, state)| Control::Vcpu { index, state }),
        ".{0,64}".prop_map(|reason| Control::Abort { reason }),
        endpoint().prop_map(|qp| Control::RdmaConnect { qp }),
        (endpoint(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(qp, addr, len, rkey)| {
            Control::RdmaAccept {
                qp,
                region: RemoteRegion { addr, len, rkey },
            }
        }),
    ]
}

fn endpoint() -> impl Strategy<Value = QpEndpoint> {
    (
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        any::<[u8; 16]>(),
        any::<u8>(),
    )
        .prop_map(|(lid, qpn, psn, gid, mtu)| QpEndpoint {
            lid,
            qpn,
            psn,
            gid,
            mtu,
        })
}

proptest! {
    #[test]
    fn decode_of_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = proto::decode_frame(&bytes);
    }

    #[test]
    fn decode_after_valid_header_and_random_payload_never_panics(
        kind in 0u8..6,
        payload in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::MAGIC);
        b.extend_from_slice(&proto::PROTOCOL_VERSION.to_le_bytes());
        b.push(kind);
        b.push(0);
        b.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        b.extend_from_slice(&proto::crc32(&payload).to_le_bytes());
        b.extend_from_slice(&payload);
        let _ = proto::decode_frame(&b);
    }

    #[test]
    fn control_round_trips(m in control()) {
        let b = proto::encode_control(&m);
        prop_assert_eq!(proto::decode_frame(&b), Ok((Frame::Control(m), b.len())));
    }

    #[test]
    fn every_truncation_of_a_valid_frame_is_reported_truncated(
        m in control(),
        pages in 1usize..4,
        gpa in 0u64..1_000_000,
        cut in any::<prop::sample::Index>(),
    ) {
        let data = vec![0xA5u8; pages * 4096];
        for b in [
            proto::encode_control(&m),
            proto::encode_run(PageRun::Data { gpa: gpa * 4096, data: &data }),
            proto::encode_run(PageRun::Zero { gpa: gpa * 4096, pages: pages as u64 }),
        ] {
            let n = cut.index(b.len());
            let r = proto::decode_frame(&b[..n]);
            prop_assert!(matches!(r, Err(ProtocolError::Truncated { .. })), "cut at {} of {}: {:?}", n, b.len(), r);
        }
    }

    #[test]
    fn a_flipped_bit_never_decodes_to_different_pages(
        gpa in 0u64..1_000_000,
        fill in any::<u8>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let data = vec![fill; 4096];
        let mut b = proto::encode_run(PageRun::Data { gpa: gpa * 4096, data: &data });
        let i = at.index(b.len());
        b[i] ^= 1 << bit;
        // Either rejected, or (a flip inside the unchecked header fields
        // cannot change the payload) the same pages at the same address.
        if let Ok((f, _)) = proto::decode_frame(&b) {
            prop_assert_eq!(f, Frame::Pages { gpa: gpa * 4096, data });
        }
    }
}

// The RDMA side's range checks against the same rule computed without
// overflow (u128): a run passes exactly when it is aligned, of whole pages,
// not too long, and inside RAM.
proptest! {
    #[test]
    fn data_run_check_matches_the_wide_arithmetic(
        gpa in prop_oneof![any::<u64>(), (0u64..4096).prop_map(|p| p * 4096), (0u64..16).prop_map(|k| u64::MAX - k * 4096 - 4095)],
        bytes in prop_oneof![any::<u64>(), (0u64..=1100).prop_map(|p| p * 4096)],
        ram in prop_oneof![any::<u64>(), (1u64..8192).prop_map(|p| p * 4096), Just(u64::MAX)],
    ) {
        let ok = gpa % 4096 == 0
            && bytes > 0
            && bytes % 4096 == 0
            && bytes / 4096 <= proto::MAX_RUN_PAGES
            && u128::from(gpa) + u128::from(bytes) <= u128::from(ram);
        prop_assert_eq!(rdma_wire::check_data_run(gpa, bytes, ram).is_ok(), ok);
    }

    #[test]
    fn zero_run_check_matches_the_wide_arithmetic(
        gpa in prop_oneof![any::<u64>(), (0u64..4096).prop_map(|p| p * 4096)],
        pages in prop_oneof![any::<u64>(), 0u64..4096, Just(rdma_wire::MAX_ZERO_PAGES), Just(rdma_wire::MAX_ZERO_PAGES + 1)],
        ram in prop_oneof![any::<u64>(), (1u64..8192).prop_map(|p| p * 4096), Just(u64::MAX)],
    ) {
        let ok = gpa % 4096 == 0
            && pages > 0
            && pages <= rdma_wire::MAX_ZERO_PAGES
            && u128::from(gpa) + u128::from(pages) * 4096 <= u128::from(ram);
        let r = rdma_wire::check_zero_run(gpa, pages, ram);
        prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
        if let Ok(b) = r {
            prop_assert_eq!(b, pages * 4096);
        }
        prop_assert!(!matches!(r, Err(RunError::Length(n)) if n != 0));
    }

    #[test]
    fn zero_message_round_trips(gpa in any::<u64>(), pages in any::<u64>()) {
        prop_assert_eq!(rdma_wire::decode_zero(&rdma_wire::encode_zero(gpa, pages)), Ok((gpa, pages)));
    }

    #[test]
    fn region_check_accepts_only_the_agreed_size_without_wrap(
        addr in any::<u64>(),
        len in prop_oneof![any::<u64>(), (1u64..8192).prop_map(|p| p * 4096)],
        ram in prop_oneof![any::<u64>(), (1u64..8192).prop_map(|p| p * 4096)],
    ) {
        let ok = len == ram
            && len > 0
            && len % 4096 == 0
            && u128::from(addr) + u128::from(len) <= u128::from(u64::MAX);
        let r = RemoteRegion { addr, len, rkey: 1 }.check(ram);
        prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
    }
}
