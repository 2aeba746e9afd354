//! Moving a live VM's memory and state between hosts.
//!
//! This crate holds the labvm migration protocol ([`proto`]: frames,
//! control messages and the sequence both sides follow) and the transports
//! that carry it: [`TcpTransport`] (one control connection plus several
//! bulk connections for page data) and, with the cargo feature `rdma`,
//! RDMA verbs through rdma-sys ([`verbs`]). It does not know KVM or guest
//! layouts: the VMM hands it page runs and opaque register and device
//! state, and on the receiving side gives it a [`PageSink`] that writes
//! into guest memory. Deciding when to migrate is not done here.

pub mod proto;
pub mod rdma_wire;
mod tcp;
pub mod testing;
#[cfg(feature = "rdma")]
pub mod verbs;

/// The checksum [`PageSink::receive_from`] feeds (re-exported so sinks name the same type).
pub use crc32fast;
pub use proto::{Control, PageRun, ProtocolError, VmDescriptor};
pub use tcp::{PendingIncoming, TcpTransport};

use std::time::Duration;

/// Where received page data goes (guest memory, on the destination).
/// Implementations check every address: a peer's bytes choose it.
pub trait PageSink: Send + Sync {
    /// Writes whole pages at `gpa`.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String>;
    /// Zeroes `pages` pages at `gpa`.
    fn zero(&self, gpa: u64, pages: u64) -> Result<(), String>;
    /// Reads `len` bytes of whole pages from `src` into place at `gpa`
    /// and feeds them to `crc`, which the caller compares with the frame's
    /// checksum afterwards. On a mismatch the migration is abandoned and
    /// the destination VM never runs, so writing before checking is safe.
    ///
    /// The default stages the bytes through a buffer and calls
    /// [`write`](Self::write); guest memory reads them straight from the
    /// socket instead (one copy less per byte received).
    fn receive_from(
        &self,
        gpa: u64,
        len: usize,
        src: &mut std::net::TcpStream,
        crc: &mut crc32fast::Hasher,
    ) -> Result<(), SinkReadError> {
        use std::io::Read;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match src.read(&mut buf[got..]) {
                Ok(0) => return Err(SinkReadError::Closed { got }),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SinkReadError::Io(e)),
            }
        }
        crc.update(&buf);
        self.write(gpa, &buf).map_err(SinkReadError::Sink)
    }
}

/// Why [`PageSink::receive_from`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkReadError {
    /// Reading the socket failed (or it closed mid-frame).
    #[error("reading page data")]
    Io(#[source] std::io::Error),
    /// The peer closed the connection after `got` bytes of the data.
    #[error("the connection closed after {got} bytes of page data")]
    Closed {
        /// Data bytes read before the end.
        got: usize,
    },
    /// The pages cannot be stored there.
    #[error("{0}")]
    Sink(String),
}

/// Where page runs go: a [`Transport`] (queued on its bulk channels), or
/// one of its [`lanes`](Transport::lanes) (written on the calling thread).
pub trait PageOut: Send {
    /// Sends one page run; the run's data is copied.
    fn send_run(&mut self, run: PageRun<'_>) -> Result<(), TransportError>;
    /// Sends whole pages at `gpa` (a non-zero multiple of 4 KiB, at most
    /// [`proto::MAX_RUN_PAGES`] pages), taking the buffer instead of
    /// copying it. Get buffers from [`page_buffer`](Self::page_buffer).
    fn send_data(&mut self, gpa: u64, data: Vec<u8>) -> Result<(), TransportError> {
        self.send_run(PageRun::Data { gpa, data: &data })
    }
    /// A buffer for [`send_data`](Self::send_data), reused from a frame
    /// already sent where the transport keeps them. It may hold that
    /// frame's bytes: set its length (`clear`, `resize`, `truncate`) to
    /// what you fill.
    fn page_buffer(&mut self) -> Vec<u8> {
        Vec::new()
    }
}

/// One migration channel: control messages and bulk page runs.
///
/// The source calls `send_*`, `flush` and `recv_control`; the destination
/// calls `recv_control`, `wait_pages` and `send_control`. Page runs go
/// straight into the destination's [`PageSink`].
pub trait Transport: PageOut {
    /// Sends one control message on the control channel.
    fn send_control(&mut self, msg: &Control) -> Result<(), TransportError>;
    /// Returns when every queued run has been handed to the network.
    fn flush(&mut self) -> Result<(), TransportError>;
    /// Stop-and-copy: flushes, then sends later runs on the calling thread
    /// instead of handing them to other threads, so a paused guest does
    /// not wait for those to be scheduled on a busy host. Transports
    /// without such threads need not do anything.
    fn send_inline(&mut self) -> Result<(), TransportError> {
        self.flush()
    }
    /// Lanes for sending page runs from several threads at once (one per
    /// bulk connection): each writes its frames on the thread that holds
    /// it, and they count towards the round like any other. Queued runs
    /// are flushed first. Empty where the transport has no such
    /// connections (RDMA): send on this thread then.
    fn lanes(&mut self) -> Result<Vec<Box<dyn PageOut + '_>>, TransportError> {
        Ok(Vec::new())
    }
    /// Receives the next control message (waits at most the transport's timeout).
    fn recv_control(&mut self) -> Result<Control, TransportError>;
    /// Destination: waits until `frames` more page runs have landed in the sink.
    fn wait_pages(&mut self, frames: u64) -> Result<(), TransportError>;
    /// Closes every channel; later calls fail.
    fn close(&mut self);
}

/// Everything a transport can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A socket operation failed.
    #[error("{op} with {peer} failed")]
    Io {
        /// The peer's address.
        peer: String,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The peer sent bytes that are not a valid frame.
    #[error("bad frame from {peer}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What was wrong.
        #[source]
        source: ProtocolError,
    },
    /// The peer sent a valid frame at the wrong place.
    #[error("unexpected {what} from {peer}")]
    Unexpected {
        /// The peer.
        peer: String,
        /// What came.
        what: String,
    },
    /// The peer closed the connection.
    #[error("{peer} closed the connection")]
    Closed {
        /// The peer.
        peer: String,
    },
    /// Nothing came in time.
    #[error("timed out after {after:?} waiting for {what} from {peer}")]
    Timeout {
        /// The peer.
        peer: String,
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// Received pages could not be stored.
    #[error("cannot store pages at {gpa:#x}: {reason}")]
    Sink {
        /// First page.
        gpa: u64,
        /// Why.
        reason: String,
    },
    /// No RDMA device on this host.
    #[error(
        "no RDMA device on this host (ibv_get_device_list found none); use the TCP transport, or load an RDMA driver (e.g. rdma_rxe for soft RoCE)"
    )]
    NoRdmaDevice,
    /// The RDMA device cannot be used as asked (named device absent, port
    /// not active, no usable GID, resources too small).
    #[error("RDMA device {device}: {reason}")]
    RdmaSetup {
        /// The device (or the name asked for).
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// A work request completed with an error status.
    #[error(
        "RDMA {op} with {peer} completed with status \"{status}\" (vendor error {vendor_err:#x})"
    )]
    Completion {
        /// The peer.
        peer: String,
        /// What completed (`RDMA write`, `receive`, ...).
        op: &'static str,
        /// `ibv_wc_status_str` of the status.
        status: String,
        /// The provider's own error code.
        vendor_err: u32,
    },
    /// A page run does not fit the peer's guest RAM; nothing was sent.
    #[error("page run refused for {peer}")]
    Run {
        /// The peer.
        peer: String,
        /// Why.
        #[source]
        source: rdma_wire::RunError,
    },
    /// The peer ended the migration with `Abort`.
    #[error("{peer} aborted the migration: {reason}")]
    PeerAborted {
        /// The peer.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// A verbs call failed.
    #[error("RDMA {op} failed (errno {errno})")]
    Rdma {
        /// The verb.
        op: &'static str,
        /// errno.
        errno: i32,
    },
}
