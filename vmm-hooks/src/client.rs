//! The blocking socket client a VMM uses to reach the companion.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error_chain;
use crate::event::{BootPlan, Event, EventKind, HookReply, LifecycleHook};
use crate::proto::{self, Message, ProtoError};

/// How the VMM reaches the companion.
#[derive(Clone, Debug)]
pub struct SocketHookConfig {
    /// The companion's hooks socket.
    pub path: PathBuf,
    /// How long one event may wait for its reply (connecting included).
    pub timeout: Duration,
    /// After a failure, how long to go without a companion before trying again.
    pub retry_after: Duration,
    /// Who we are (sent in `hello`).
    pub peer: String,
    /// Optional protocol features announced in `hello` (e.g.
    /// [`crate::proto::FEATURE_INTERRUPT`]); none by default.
    pub features: Vec<String>,
}

impl SocketHookConfig {
    /// Defaults: 500 ms per event, retry after 5 s.
    pub fn new(path: impl Into<PathBuf>, peer: impl Into<String>) -> Self {
        SocketHookConfig {
            path: path.into(),
            timeout: Duration::from_millis(500),
            retry_after: Duration::from_secs(5),
            peer: peer.into(),
            features: Vec::new(),
        }
    }
}

/// A [`LifecycleHook`] that forwards events to the companion over its
/// socket. It never fails the VM: when the companion is absent, slow or
/// misbehaves, the event is answered locally (ack, or an empty plan), the
/// problem is logged once per outage, and the next attempt waits
/// `retry_after`.
#[derive(Debug)]
pub struct SocketHook {
    config: SocketHookConfig,
    conn: Option<UnixStream>,
    retry_at: Option<Instant>,
    outage_logged: bool,
}

impl SocketHook {
    /// A client that connects on first use.
    pub fn new(config: SocketHookConfig) -> Self {
        SocketHook {
            config,
            conn: None,
            retry_at: None,
            outage_logged: false,
        }
    }

    /// True while a connection is open.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    fn connect(&self) -> Result<UnixStream, ProtoError> {
        // connect(2) on a Unix socket can block when the listener's backlog
        // is full; bound it by connecting on a helper thread.
        let (tx, rx) = mpsc::channel();
        let path = self.config.path.clone();
        std::thread::Builder::new()
            .name("hooks-connect".into())
            .spawn(move || {
                let _ = tx.send(UnixStream::connect(path));
            })
            .map_err(ProtoError::Io)?;
        let mut stream = match rx.recv_timeout(self.config.timeout) {
            Ok(r) => r.map_err(ProtoError::Io)?,
            Err(_) => return Err(ProtoError::Timeout),
        };
        stream
            .set_read_timeout(Some(self.config.timeout))
            .map_err(ProtoError::Io)?;
        stream
            .set_write_timeout(Some(self.config.timeout))
            .map_err(ProtoError::Io)?;
        proto::write_message(
            &mut stream,
            &Message::Hello {
                peer: self.config.peer.clone(),
                features: self.config.features.clone(),
            },
        )?;
        Ok(stream)
    }

    fn exchange(&mut self, event: &Event) -> Result<HookReply, ProtoError> {
        if self.conn.is_none() {
            self.conn = Some(self.connect()?);
        }
        let Some(stream) = self.conn.as_mut() else {
            return Err(ProtoError::Closed);
        };
        proto::write_message(stream, &Message::Event(event.clone()))?;
        match proto::read_message(stream)? {
            Message::Reply(r) => Ok(r),
            Message::Error { message } => Err(ProtoError::Rejected(message)),
            other => Err(ProtoError::Unexpected(other.type_name())),
        }
    }
}

fn fallback(event: &Event) -> HookReply {
    match event.kind {
        EventKind::BeforeBoot { .. } => HookReply::Plan(BootPlan::empty()),
        _ => HookReply::Ack,
    }
}

impl LifecycleHook for SocketHook {
    fn on_event(&mut self, event: &Event) -> HookReply {
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                return fallback(event);
            }
            self.retry_at = None;
        }
        match self.exchange(event) {
            Ok(reply) => {
                if let HookReply::Rejected { reason } = &reply {
                    tracing::warn!(
                        event = event.kind.name(),
                        vm = event.vm.vm_id,
                        "the companion rejected the event: {reason}"
                    );
                }
                if self.outage_logged {
                    tracing::info!(socket = %self.config.path.display(), "companion reachable again");
                    self.outage_logged = false;
                }
                reply
            }
            Err(e) => {
                self.conn = None;
                self.retry_at = Some(Instant::now() + self.config.retry_after);
                if !self.outage_logged {
                    self.outage_logged = true;
                    tracing::warn!(
                        socket = %self.config.path.display(),
                        event = event.kind.name(),
                        "companion unavailable ({}); continuing without it",
                        error_chain(&e)
                    );
                } else {
                    tracing::debug!(
                        event = event.kind.name(),
                        "companion still unavailable: {e}"
                    );
                }
                fallback(event)
            }
        }
    }
}
