//! The labvm migration protocol, version 2.
//!
//! # Frames
//!
//! Every byte on a TCP connection belongs to a frame: a 16-byte header, then
//! `len` bytes of payload.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "PMIG"
//! 4       2     protocol version, little-endian (2)
//! 6       1     kind (see below)
//! 7       1     flags (0; reserved, a non-zero value is rejected)
//! 8       4     payload length, little-endian
//! 12      4     CRC-32 (IEEE) of the payload, little-endian
//! ```
//!
//! | kind | name    | payload                                              | limit |
//! |------|---------|------------------------------------------------------|-------|
//! | 1    | control | one [`Control`] message as JSON                      | 1 MiB |
//! | 2    | pages   | guest-physical address (u64 LE), then whole 4 KiB pages | 8 + 4 MiB |
//! | 3    | zero    | guest-physical address (u64 LE), page count (u64 LE)  | 16 B  |
//! | 4    | join    | session (u64 LE), connection index (u32 LE)          | 12 B  |
//!
//! Control messages travel on the control connection only; `pages` and
//! `zero` frames (bulk page data) travel on the bulk connections only; a
//! bulk connection's first frame is `join`. Page addresses are 4 KiB
//! aligned; the checksum catches corruption that TCP's own does not, so a
//! damaged frame aborts the migration instead of landing in guest memory.
//!
//! # Sequence
//!
//! ```text
//! source                                  destination (labvm --incoming PORT)
//!   control connection ------------------>  accept
//!   Hello{version, vm, bulk}  ----------->  checks version and VmDescriptor
//!   bulk connections, each join{session,i}  accepts `bulk` connections
//!                             <-----------  Accept            (or Abort{reason})
//!   round 0: every non-zero page (pages frames on the bulk connections;
//!            zero pages are not sent: the destination's RAM starts zeroed)
//!   RoundEnd{round, frames}   ----------->  waits until `frames` bulk frames landed
//!                             <-----------  RoundAck{round}
//!   rounds 1..: pages the dirty log names (pages, or zero for pages that
//!            became zero), each round closed by RoundEnd / RoundAck, until
//!            the dirty set fits the downtime target at the measured bandwidth
//!   [source pauses its vCPUs]
//!   last round (RoundEnd{last: true}), and without waiting for its
//!   RoundAck (the destination stores the round before it reads on):
//!   Vcpu{index, state} for every vCPU ->
//!   Device{state}             ----------->
//!   Complete                  ----------->
//!                             <-----------  RoundAck{last round}
//!                                           loads registers and device state;
//!                                           vCPUs NOT started yet
//!                             <-----------  Loaded
//!   Go                        ----------->  commit point (see below)
//!   [source never resumes its copy from here]
//!                                           creates the vCPU threads
//!                             <-----------  Running
//!                                           releases the vCPUs (nothing
//!                                           can fail between the two)
//!   [source stops its VM]
//! ```
//!
//! With the RDMA transport (cargo feature `rdma`) the source sends
//! `Hello{bulk: 0}` and opens no bulk connections; the queue pairs are
//! connected over the control connection instead, and page data moves by
//! RDMA (see `verbs.rs` and the crate README):
//!
//! ```text
//!   Hello{version, vm, bulk: 0} -------->  checks version and VmDescriptor
//!   RdmaConnect{qp}           ----------->  registers guest RAM, QP to RTR,
//!                                           posts receives
//!                             <-----------  RdmaAccept{qp, region}
//!   [source checks region.len == vm.ram_bytes, QP to RTS]
//!                             <-----------  Accept
//!   rounds: page runs as RDMA WRITE WITH IMMEDIATE into region.addr + gpa
//!           (imm = frame number), zero runs as 16-byte RDMA SENDs; each
//!           is one frame of RoundEnd's count; the rest as above.
//! ```
//!
//! # Commit (two-phase switch-over, new in version 2)
//!
//! `Go` is the commit point. Before the source has sent it, exactly one side
//! may run the guest, the source: on any failure (an `Abort`, a closed or
//! silent connection, a `Loaded` that never comes) the source resumes its
//! VM and the destination discards its copy. A `Go` whose write failed was
//! not delivered whole, and a partial frame never decodes, so it counts as
//! not sent. Once `Go` is sent the source never resumes its copy. It waits
//! for `Running`:
//!
//! - `Running` arrives: the destination runs the guest; the source stops.
//! - `Abort{reason}` arrives instead: the destination says it discarded the
//!   VM without starting it (e.g. it never received `Go` within its
//!   timeout, or could not start the vCPUs), so the source resumes.
//! - Nothing conclusive (connection lost, timeout): the migration is *in
//!   doubt*. The destination may or may not run the guest. The source keeps
//!   its VM paused, saves it to a state file and exits with a distinct
//!   status; the operator restores that file only if the destination does
//!   not run the guest. The guest is then never running twice, and never
//!   lost.
//!
//! The destination waits for `Go` at most its timeout after `Loaded`; if
//! it does not come (or the connection fails), it discards the VM, answers
//! `Abort` where it still can, and fails. After `Go` it owns the guest: a
//! `Running` it cannot deliver is logged, and the guest keeps running.
//!
//! Either side may send `Abort{reason}` at any point before `Go` and close;
//! the source then resumes its VM (if it paused it), the destination
//! discards its VM. A frame that does not decode (bad magic, version, kind,
//! flags, length, checksum, JSON) is answered with `Abort` where possible
//! and ends the migration on that side; it never reaches guest memory.
//!
//! # Versions
//!
//! The version is in every frame header, and a header with another version
//! is refused before its payload is read: a version 1 peer (which had no
//! `Loaded`/`Go` step) gets `Abort` naming both versions where the
//! connection still allows it, and the error on this side names them too.

use serde::{Deserialize, Serialize};

pub use crate::rdma_wire::{QpEndpoint, RemoteRegion};

/// Protocol version spoken here.
pub const PROTOCOL_VERSION: u16 = 2;
/// Frame magic.
pub const MAGIC: [u8; 4] = *b"PMIG";
/// Header length in bytes.
pub const HEADER_LEN: usize = 16;
/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Most pages one `pages` frame carries.
pub const MAX_RUN_PAGES: u64 = 1024;
/// Largest control payload.
pub const MAX_CONTROL: u32 = 1 << 20;

const KIND_CONTROL: u8 = 1;
const KIND_PAGES: u8 = 2;
const KIND_ZERO: u8 = 3;
const KIND_JOIN: u8 = 4;

/// What the destination checks before accepting a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescriptor {
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The workload's identity (the guest program's parameters).
    pub workload: String,
    /// Extra configuration the VMM needs to rebuild the VM (opaque here).
    pub config: String,
}

/// Control messages (on the control connection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
#[non_exhaustive]
pub enum Control {
    /// Source to destination: first message.
    Hello {
        /// The source's protocol version.
        version: u16,
        /// The VM being moved.
        vm: VmDescriptor,
        /// Number of bulk connections that follow; 0: the source moves
        /// page data over RDMA (`RdmaConnect` follows instead).
        bulk: u32,
        /// Session id the bulk connections present in `join`.
        session: u64,
    },
    /// Destination to source: the VM fits; send memory.
    Accept,
    /// Source to destination: round `round` is complete after `frames`
    /// bulk frames (counted over all bulk connections since the last round).
    RoundEnd {
        /// Round number, from 0.
        round: u32,
        /// Bulk frames of this round.
        frames: u64,
        /// True for the last round, sent with the vCPUs paused.
        last: bool,
    },
    /// Destination to source: every frame of `round` is in guest memory.
    RoundAck {
        /// The round.
        round: u32,
    },
    /// Source to destination: one vCPU's registers (VMM-defined encoding).
    Vcpu {
        /// vCPU index.
        index: u32,
        /// Encoded state.
        state: String,
    },
    /// Source to destination: device state (VMM-defined encoding).
    Device {
        /// Encoded state.
        state: String,
    },
    /// Source to destination: everything was sent; load it.
    Complete,
    /// Destination to source: memory, vCPU and device state are loaded and
    /// the vCPUs are ready to start (not running).
    Loaded,
    /// Source to destination: commit; start the guest. The source never
    /// resumes its copy after sending this.
    Go,
    /// Destination to source: the guest runs here now.
    Running,
    /// Source to destination, RDMA transport only (after `Hello` with
    /// `bulk: 0`): the source's queue pair.
    RdmaConnect {
        /// The source's RC queue pair.
        qp: QpEndpoint,
    },
    /// Destination to source, RDMA transport only: the destination's queue
    /// pair (ready to receive) and its guest RAM as one memory region.
    RdmaAccept {
        /// The destination's RC queue pair.
        qp: QpEndpoint,
        /// Guest RAM, registered for remote writes.
        region: RemoteRegion,
    },
    /// Either side: the migration is over without success.
    Abort {
        /// Why.
        reason: String,
    },
}

/// A run of guest pages to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRun<'a> {
    /// Pages with data: `data.len()` is a non-zero multiple of 4 KiB.
    Data {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// The pages.
        data: &'a [u8],
    },
    /// Pages that are all zero.
    Zero {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// Number of pages.
        pages: u64,
    },
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A control message.
    Control(Control),
    /// Pages with data.
    Pages {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// Page data (a multiple of 4 KiB).
        data: Vec<u8>,
    },
    /// Zero pages.
    Zero {
        /// First page.
        gpa: u64,
        /// Number of pages.
        pages: u64,
    },
    /// First frame of a bulk connection.
    Join {
        /// Session id from `Hello`.
        session: u64,
        /// Index of this bulk connection.
        index: u32,
    },
}

/// A frame header that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    kind: u8,
    len: u32,
    crc: u32,
}

impl Header {
    /// Payload length in bytes.
    pub fn payload_len(&self) -> usize {
        self.len as usize
    }
}

/// Why bytes from a peer were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Fewer bytes than the frame needs.
    #[error("truncated frame: {got} of {want} bytes")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        want: usize,
    },
    /// Not a migration peer.
    #[error("bad frame magic {0:02x?} (not a labvm migration peer?)")]
    BadMagic([u8; 4]),
    /// Another protocol version.
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// Reserved flags set.
    #[error("reserved frame flags {0:#x} set")]
    Flags(u8),
    /// Payload length wrong for the kind.
    #[error("frame kind {kind}: payload of {len} bytes is not allowed")]
    Length {
        /// Frame kind.
        kind: u8,
        /// Announced length.
        len: u32,
    },
    /// Payload checksum mismatch.
    #[error("payload checksum {got:#010x} does not match header {want:#010x}")]
    Checksum {
        /// Computed.
        got: u32,
        /// In the header.
        want: u32,
    },
    /// Page address not aligned.
    #[error("page address {0:#x} is not 4 KiB aligned")]
    Unaligned(u64),
    /// A zero run of no pages, or one too long.
    #[error("zero run of {0} pages")]
    ZeroRun(u64),
    /// Control payload is not a valid message.
    #[error("malformed control message: {0}")]
    Control(String),
}

/// CRC-32 (IEEE 802.3), as in zlib.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

fn header(kind: u8, payload: &[&[u8]]) -> [u8; HEADER_LEN] {
    let mut len = 0usize;
    let mut crc = crc32fast::Hasher::new();
    for p in payload {
        len += p.len();
        crc.update(p);
    }
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[6] = kind;
    h[7] = 0;
    h[8..12].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    h[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Encodes a control message as one frame.
pub fn encode_control(msg: &Control) -> Vec<u8> {
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = header(KIND_CONTROL, &[&body]).to_vec();
    out.extend_from_slice(&body);
    out
}

/// Encodes a page run as one frame (the caller keeps runs within
/// [`MAX_RUN_PAGES`]).
pub fn encode_run(run: PageRun<'_>) -> Vec<u8> {
    match run {
        PageRun::Data { gpa, data } => {
            let g = gpa.to_le_bytes();
            let mut out = header(KIND_PAGES, &[&g, data]).to_vec();
            out.reserve(8 + data.len());
            out.extend_from_slice(&g);
            out.extend_from_slice(data);
            out
        }
        PageRun::Zero { gpa, pages } => {
            let mut p = [0u8; 16];
            p[..8].copy_from_slice(&gpa.to_le_bytes());
            p[8..].copy_from_slice(&pages.to_le_bytes());
            let mut out = header(KIND_ZERO, &[&p]).to_vec();
            out.extend_from_slice(&p);
            out
        }
    }
}

/// The header and address of a `pages` frame for `data` (which follows
/// them on the wire), without copying the data.
pub fn pages_header(gpa: u64, data: &[u8]) -> ([u8; HEADER_LEN], [u8; 8]) {
    let g = gpa.to_le_bytes();
    (header(KIND_PAGES, &[&g, data]), g)
}

/// Encodes the `join` frame of a bulk connection.
pub fn encode_join(session: u64, index: u32) -> Vec<u8> {
    let mut p = [0u8; 12];
    p[..8].copy_from_slice(&session.to_le_bytes());
    p[8..].copy_from_slice(&index.to_le_bytes());
    let mut out = header(KIND_JOIN, &[&p]).to_vec();
    out.extend_from_slice(&p);
    out
}

/// Checks a header: magic, version, kind, flags and the length the kind allows.
pub fn decode_header(b: &[u8]) -> Result<Header, ProtocolError> {
    if b.len() < HEADER_LEN {
        return Err(ProtocolError::Truncated {
            got: b.len(),
            want: HEADER_LEN,
        });
    }
    let magic = [b[0], b[1], b[2], b[3]];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version(version));
    }
    let kind = b[6];
    if b[7] != 0 {
        return Err(ProtocolError::Flags(b[7]));
    }
    let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let crc = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    let max_pages = u32::try_from(8 + MAX_RUN_PAGES * PAGE_SIZE).unwrap_or(u32::MAX);
    let ok = match kind {
        KIND_CONTROL => len > 0 && len <= MAX_CONTROL,
        KIND_PAGES => len > 8 && len <= max_pages && u64::from(len - 8).is_multiple_of(PAGE_SIZE),
        KIND_ZERO => len == 16,
        KIND_JOIN => len == 12,
        other => return Err(ProtocolError::Kind(other)),
    };
    if !ok {
        return Err(ProtocolError::Length { kind, len });
    }
    Ok(Header { kind, len, crc })
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// A decoded frame whose page data borrows the payload it came in (the
/// bulk receive path decodes into a reused buffer this way).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameRef<'a> {
    /// A control message.
    Control(Control),
    /// Pages with data.
    Pages {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// Page data (a multiple of 4 KiB).
        data: &'a [u8],
    },
    /// Zero pages.
    Zero {
        /// First page.
        gpa: u64,
        /// Number of pages.
        pages: u64,
    },
    /// First frame of a bulk connection.
    Join {
        /// Session id from `Hello`.
        session: u64,
        /// Index of this bulk connection.
        index: u32,
    },
}

/// The receive path that reads a `pages` frame's data straight into place
/// (the bulk connections of the TCP transport): after `header`, the first
/// 8 payload bytes give the address, checked here before any data is
/// read. The data follows (`header.payload_len() - 8` bytes); feed it to
/// the returned hasher and hand that to [`finish_pages`].
pub fn start_pages(
    header: Header,
    gpa: [u8; 8],
) -> Result<(u64, usize, crc32fast::Hasher), ProtocolError> {
    if header.kind != KIND_PAGES {
        return Err(ProtocolError::Kind(header.kind));
    }
    let addr = u64::from_le_bytes(gpa);
    if !addr.is_multiple_of(PAGE_SIZE) {
        return Err(ProtocolError::Unaligned(addr));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&gpa);
    // decode_header allowed only lengths of 8 + whole pages.
    Ok((addr, header.payload_len() - 8, crc))
}

/// Compares the checksum of a `pages` frame read with [`start_pages`].
pub fn finish_pages(header: Header, crc: crc32fast::Hasher) -> Result<(), ProtocolError> {
    let got = crc.finalize();
    if got != header.crc {
        return Err(ProtocolError::Checksum {
            got,
            want: header.crc,
        });
    }
    Ok(())
}

impl Header {
    /// Whether this is a `pages` frame (see [`start_pages`]).
    pub fn is_pages(&self) -> bool {
        self.kind == KIND_PAGES
    }
}

/// Decodes a payload that belongs to `header`.
pub fn decode_payload(header: Header, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
    Ok(match decode_borrowed(header, &payload)? {
        FrameRef::Control(c) => Frame::Control(c),
        FrameRef::Pages { gpa, data } => Frame::Pages {
            gpa,
            data: data.to_vec(),
        },
        FrameRef::Zero { gpa, pages } => Frame::Zero { gpa, pages },
        FrameRef::Join { session, index } => Frame::Join { session, index },
    })
}

/// Decodes a payload that belongs to `header` without copying page data;
/// the same checks as [`decode_payload`].
pub fn decode_borrowed(header: Header, payload: &[u8]) -> Result<FrameRef<'_>, ProtocolError> {
    if payload.len() != header.payload_len() {
        return Err(ProtocolError::Truncated {
            got: payload.len(),
            want: header.payload_len(),
        });
    }
    let got = crc32(payload);
    if got != header.crc {
        return Err(ProtocolError::Checksum {
            got,
            want: header.crc,
        });
    }
    match header.kind {
        KIND_CONTROL => serde_json::from_slice(payload)
            .map(FrameRef::Control)
            .map_err(|e| ProtocolError::Control(e.to_string())),
        KIND_PAGES => {
            let gpa = le64(payload);
            if !gpa.is_multiple_of(PAGE_SIZE) {
                return Err(ProtocolError::Unaligned(gpa));
            }
            Ok(FrameRef::Pages {
                gpa,
                data: &payload[8..],
            })
        }
        KIND_ZERO => {
            let gpa = le64(payload);
            let pages = le64(&payload[8..]);
            if !gpa.is_multiple_of(PAGE_SIZE) {
                return Err(ProtocolError::Unaligned(gpa));
            }
            if pages == 0 || pages > (1 << 40) {
                return Err(ProtocolError::ZeroRun(pages));
            }
            Ok(FrameRef::Zero { gpa, pages })
        }
        KIND_JOIN => Ok(FrameRef::Join {
            session: le64(payload),
            index: u32::from_le_bytes([payload[8], payload[9], payload[10], payload[11]]),
        }),
        other => Err(ProtocolError::Kind(other)),
    }
}

/// Decodes one frame from the start of `b`; returns it and the bytes used.
pub fn decode_frame(b: &[u8]) -> Result<(Frame, usize), ProtocolError> {
    let h = decode_header(b)?;
    let want = HEADER_LEN + h.payload_len();
    if b.len() < want {
        return Err(ProtocolError::Truncated { got: b.len(), want });
    }
    let frame = decode_payload(h, b[HEADER_LEN..want].to_vec())?;
    Ok((frame, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn control_frame_round_trips() {
        let m = Control::RoundEnd {
            round: 3,
            frames: 77,
            last: true,
        };
        let b = encode_control(&m);
        assert_eq!(decode_frame(&b).unwrap(), (Frame::Control(m), b.len()));
    }

    #[test]
    fn rdma_control_frames_round_trip() {
        let qp = QpEndpoint {
            lid: 0,
            qpn: 0x1234,
            psn: 0xabcdef,
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0xff, 0xfe, 0, 0, 1],
            mtu: 5,
        };
        for m in [
            Control::RdmaConnect { qp },
            Control::RdmaAccept {
                qp,
                region: RemoteRegion {
                    addr: 0x7f12_3456_7000,
                    len: 1 << 30,
                    rkey: 0xdead_beef,
                },
            },
        ] {
            let b = encode_control(&m);
            assert_eq!(decode_frame(&b).unwrap(), (Frame::Control(m), b.len()));
        }
    }

    #[test]
    fn rdma_accept_with_a_gid_of_the_wrong_length_is_malformed() {
        let body = br#"{"type":"rdma-accept","qp":{"lid":0,"qpn":5,"psn":1,"gid":[1,2,3],"mtu":3},"region":{"addr":4096,"len":4096,"rkey":1}}"#;
        let mut b = header(KIND_CONTROL, &[body]).to_vec();
        b.extend_from_slice(body);
        assert!(matches!(decode_frame(&b), Err(ProtocolError::Control(_))));
    }

    #[test]
    fn pages_frame_round_trips() {
        let data = vec![7u8; 8192];
        let b = encode_run(PageRun::Data {
            gpa: 0x3000,
            data: &data,
        });
        let (f, n) = decode_frame(&b).unwrap();
        assert_eq!(n, b.len());
        assert_eq!(f, Frame::Pages { gpa: 0x3000, data });
    }

    #[test]
    fn pages_header_matches_the_encoded_frame() {
        let data = vec![9u8; 4096];
        let (h, g) = pages_header(0x5000, &data);
        let mut b = h.to_vec();
        b.extend_from_slice(&g);
        b.extend_from_slice(&data);
        assert_eq!(
            b,
            encode_run(PageRun::Data {
                gpa: 0x5000,
                data: &data
            })
        );
    }

    /// The in-place receive path (`start_pages`, data, `finish_pages`)
    /// accepts exactly what `decode_borrowed` accepts for page frames.
    fn read_in_place(frame: &[u8]) -> Result<(u64, Vec<u8>), ProtocolError> {
        let h = decode_header(frame)?;
        let mut g = [0u8; 8];
        g.copy_from_slice(&frame[HEADER_LEN..HEADER_LEN + 8]);
        let (gpa, len, mut crc) = start_pages(h, g)?;
        let data = frame[HEADER_LEN + 8..HEADER_LEN + 8 + len].to_vec();
        crc.update(&data);
        finish_pages(h, crc)?;
        Ok((gpa, data))
    }

    #[test]
    fn pages_read_in_place_check_address_and_checksum() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        let frame = encode_run(PageRun::Data {
            gpa: 0x7000,
            data: &data,
        });
        assert_eq!(read_in_place(&frame).unwrap(), (0x7000, data.clone()));
        // Every flipped byte of the address or the data is caught; an
        // address flip that leaves it unaligned is caught before any data.
        for at in [HEADER_LEN, HEADER_LEN + 3, HEADER_LEN + 8, frame.len() - 1] {
            let mut bad = frame.clone();
            bad[at] ^= 0x10;
            let e = read_in_place(&bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    ProtocolError::Checksum { .. } | ProtocolError::Unaligned(_)
                ),
                "byte {at}: {e:?}"
            );
        }
        let mut unaligned = frame.clone();
        unaligned[HEADER_LEN] ^= 0x01;
        assert_eq!(
            read_in_place(&unaligned).unwrap_err(),
            ProtocolError::Unaligned(0x7001)
        );
        // Only page frames take this path.
        let zero = encode_run(PageRun::Zero { gpa: 0, pages: 1 });
        let h = decode_header(&zero).unwrap();
        assert!(!h.is_pages());
        assert_eq!(
            start_pages(h, [0; 8]).unwrap_err(),
            ProtocolError::Kind(KIND_ZERO)
        );
    }

    #[test]
    fn flipped_payload_byte_fails_the_checksum() {
        let data = vec![1u8; 4096];
        let mut b = encode_run(PageRun::Data {
            gpa: 0,
            data: &data,
        });
        b[HEADER_LEN + 100] ^= 0x40;
        assert!(matches!(
            decode_frame(&b),
            Err(ProtocolError::Checksum { .. })
        ));
    }

    #[test]
    fn other_version_is_rejected() {
        let mut b = encode_control(&Control::Accept);
        b[4] = 9;
        assert_eq!(decode_frame(&b), Err(ProtocolError::Version(9)));
    }

    #[test]
    fn pages_frame_not_a_page_multiple_is_rejected() {
        let mut b = encode_run(PageRun::Data {
            gpa: 0,
            data: &[0u8; 4096],
        });
        b[8..12].copy_from_slice(&(8u32 + 100).to_le_bytes());
        assert!(matches!(
            decode_header(&b),
            Err(ProtocolError::Length { kind: 2, .. })
        ));
    }
}
