//! The migration decoder against garbage, truncation and corruption.

use proptest::prelude::*;
use rdma::proto::{self, Control, Frame, PageRun, ProtocolError};

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
    ]
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
