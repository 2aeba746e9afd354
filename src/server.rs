//! The hooks socket server: accepts VMM connections, checks the peer,
//! decodes frames, records events in order and answers each one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use vmm_hooks::proto::{self, HEADER_LEN, Message, ProtoError};
use vmm_hooks::{BootPlan, Event, EventKind, HookReply, error_chain};

use crate::libvirt::{AgentConfig, LibvirtAgent, LibvirtError};
use crate::metrics::Metrics;
use crate::store::{ProfileKey, ProfileStore, StoreError, StorePolicy};

/// What can go wrong running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Another process already serves this socket.
    #[error("{0} is in use by a running companion; stop it or choose another --socket")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The socket could not be created.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The profile store could not be opened.
    #[error("cannot open the profile store")]
    Store(#[from] StoreError),
    /// The libvirt agent could not start.
    #[error("cannot start the libvirt agent")]
    Libvirt(#[from] LibvirtError),
    /// The event log could not be opened.
    #[error("cannot open event log {path}")]
    EventLog {
        /// The log path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The hooks socket.
    pub socket: PathBuf,
    /// Append every event received, as JSON lines, here.
    pub event_log: Option<PathBuf>,
    /// User ids allowed to connect besides root and the daemon's own user.
    pub allowed_uids: Vec<u32>,
    /// A frame that has started must be complete within this time.
    pub frame_timeout: Duration,
    /// Most VMM connections served at once.
    pub max_connections: usize,
    /// Balloon control from demand forecasts (`None`: balloons are left alone).
    pub balloon: Option<Arc<crate::BalloonControl>>,
    /// The profile store (SQLite file); without one, plans are empty.
    pub store: Option<PathBuf>,
    /// What the store keeps and how it plans.
    pub policy: StorePolicy,
    /// Act on libvirt domains after their `started` hook (pin vCPUs, set
    /// the balloon, sample usage); `None`: only record libvirt hook calls.
    pub libvirt: Option<AgentConfig>,
    /// Where the daemon counts what it does.
    pub metrics: Arc<Metrics>,
    /// The interruption coordinator (`--capacity-mib`); `None`: every VM
    /// is admitted and none is interrupted.
    pub interrupt: Option<Arc<Mutex<crate::interrupt::Coordinator>>>,
    /// The shaping loop (`None`: off). It sees every event and answers
    /// balloon status with its targets; its ticks run beside the server.
    pub shaping: Option<Arc<crate::ShapingLoop>>,
}

impl ServerConfig {
    /// Defaults for a socket path.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ServerConfig {
            socket: socket.into(),
            event_log: None,
            allowed_uids: Vec::new(),
            frame_timeout: Duration::from_secs(10),
            max_connections: 1024,
            balloon: None,
            store: None,
            policy: StorePolicy::default(),
            libvirt: None,
            metrics: Arc::new(Metrics::new()),
            interrupt: None,
            shaping: None,
        }
    }
}

/// One received event, as the event log stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventRecord {
    /// When the daemon received it, milliseconds since the Unix epoch.
    pub received_unix_ms: u64,
    /// The peer's `hello`.
    pub peer: String,
    /// The event.
    pub event: Event,
}

#[derive(Debug, Default)]
struct State {
    /// Last sequence number seen per VM, to spot lost or reordered events.
    last_seq: HashMap<String, u64>,
    log: Option<BufWriter<File>>,
    store: Option<ProfileStore>,
    libvirt: Option<LibvirtAgent>,
    /// GPU reservations, in the store file.
    gpu_ledger: Option<accel::Ledger>,
}

/// The hooks server.
#[derive(Debug)]
pub struct HooksServer {
    config: ServerConfig,
    listener: UnixListener,
    state: Arc<Mutex<State>>,
}

impl HooksServer {
    /// Binds the socket (mode 0600) and opens the event log.
    pub fn bind(config: ServerConfig) -> Result<Self, ServeError> {
        // Everything that can fail on bad configuration is checked before
        // the socket appears.
        if let Some(p) = &config.store {
            drop(ProfileStore::open(p, config.policy.clone())?);
        }
        let path = config.socket.clone();
        prepare_socket_path(&path)?;
        let listener = UnixListener::bind(&path).map_err(|source| ServeError::Bind {
            path: path.clone(),
            source,
        })?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| ServeError::Bind {
                path: path.clone(),
                source,
            },
        )?;
        let log = match &config.event_log {
            Some(p) => Some(BufWriter::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| ServeError::EventLog {
                        path: p.clone(),
                        source,
                    })?,
            )),
            None => None,
        };
        let store = match &config.store {
            Some(p) => {
                let s = ProfileStore::open(p, config.policy.clone())?;
                tracing::info!(store = %p.display(), boots = s.boot_rows().unwrap_or(0), "profile store open");
                Some(s)
            }
            None => {
                tracing::warn!("no profile store configured: boot plans stay empty");
                None
            }
        };
        // GPUs: probed once, logged once (one info line without a driver).
        let gpus = crate::gpu::probe_at_start(config.store.as_deref());
        config
            .metrics
            .gpus
            .set(gpus.map_or(0, |g| i64::try_from(g.gpus.len()).unwrap_or(i64::MAX)));
        let gpu_ledger = config.store.as_deref().and_then(crate::gpu::open_ledger);
        let libvirt = match &config.libvirt {
            Some(c) => Some(LibvirtAgent::start(c.clone(), Arc::clone(&config.metrics))?),
            None => None,
        };
        tracing::info!(socket = %path.display(), "listening for VMM hooks");
        Ok(HooksServer {
            config,
            listener,
            state: Arc::new(Mutex::new(State {
                log,
                store,
                libvirt,
                gpu_ledger,
                ..State::default()
            })),
        })
    }

    /// Serves until `shutdown` turns true; then removes the socket.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) {
        let limit = Arc::new(Semaphore::new(self.config.max_connections));
        let own_uid = current_uid();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                accepted = self.listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                        tracing::warn!("too many VMM connections; refusing one");
                        Metrics::inc(&self.config.metrics.rejected, "too-many-connections");
                        continue;
                    };
                    let state = Arc::clone(&self.state);
                    let config = self.config.clone();
                    let rx = shutdown.clone();
                    tokio::spawn(async move {
                        config.metrics.connections.inc();
                        handle_connection(stream, &config, own_uid, &state, rx).await;
                        config.metrics.connections.dec();
                        drop(permit);
                    });
                }
            }
        }
        let agent = match self.state.lock() {
            Ok(mut st) => {
                if let Some(log) = st.log.as_mut() {
                    let _ = log.flush();
                }
                st.libvirt.take()
            }
            Err(_) => None,
        };
        // Outside the lock: stopping the agent waits for its thread.
        drop(agent);
        let _ = std::fs::remove_file(&self.config.socket);
        tracing::info!("hooks server stopped");
    }
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Removes a stale socket left by a dead daemon; refuses a live one or a non-socket.
fn prepare_socket_path(path: &Path) -> Result<(), ServeError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|source| ServeError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(ServeError::NotASocket(path.to_path_buf())),
    }
}

async fn handle_connection(
    mut stream: UnixStream,
    config: &ServerConfig,
    own_uid: u32,
    state: &Mutex<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (uid, peer_pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.pid().and_then(|p| u32::try_from(p).ok())),
        Err(e) => {
            tracing::error!("cannot read peer credentials: {e}; closing");
            return;
        }
    };
    if uid != 0 && uid != own_uid && !config.allowed_uids.contains(&uid) {
        tracing::error!(
            uid,
            "hooks connection from a user that is not allowed; closing"
        );
        let _ = send(
            &mut stream,
            &Message::Error {
                message: format!("user {uid} may not use this socket"),
            },
        )
        .await;
        return;
    }
    let mut peer = String::from("(no hello)");
    // Whether the peer understands `interrupt` and `defer` replies.
    let mut can_interrupt = false;
    loop {
        let msg = tokio::select! {
            _ = shutdown.changed() => return,
            m = read_frame(&mut stream, config.frame_timeout) => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(ProtoError::Closed) => {
                tracing::debug!(peer, "VMM disconnected");
                return;
            }
            Err(e) => {
                tracing::error!(
                    peer,
                    uid,
                    "bad frame from VMM ({}); disconnecting",
                    error_chain(&e)
                );
                Metrics::inc(&config.metrics.rejected, reject_reason(&e));
                let _ = send(
                    &mut stream,
                    &Message::Error {
                        message: e.to_string(),
                    },
                )
                .await;
                return;
            }
        };
        let reply = match msg {
            Message::Hello { peer: p, features } => {
                tracing::info!(peer = p, uid, ?features, "VMM connected");
                peer = p;
                can_interrupt = features.iter().any(|f| f == proto::FEATURE_INTERRUPT);
                continue;
            }
            Message::Event(event) => {
                let interrupt = config.interrupt.as_deref().map(|c| (c, can_interrupt));
                record(
                    state,
                    &config.metrics,
                    &peer,
                    event,
                    config.balloon.as_deref(),
                    config.shaping.as_deref().map(|s| (s, peer_pid)),
                    interrupt,
                )
            }
            other => {
                let name = other.type_name();
                Metrics::inc(&config.metrics.rejected, "unexpected-message");
                tracing::error!(peer, "unexpected {name} message from VMM; disconnecting");
                let _ = send(
                    &mut stream,
                    &Message::Error {
                        message: format!("unexpected {name} message"),
                    },
                )
                .await;
                return;
            }
        };
        if let Err(e) = send(&mut stream, &Message::Reply(reply)).await {
            tracing::warn!(
                peer,
                "cannot answer VMM ({}); disconnecting",
                error_chain(&e)
            );
            return;
        }
    }
}

/// The metric label of a rejected frame.
fn reject_reason(e: &ProtoError) -> &'static str {
    match e {
        ProtoError::BadMagic(_) => "bad-magic",
        ProtoError::Version { .. } => "version",
        ProtoError::TooLarge { .. } => "too-large",
        ProtoError::Body(_) => "malformed",
        ProtoError::Truncated { .. } => "truncated",
        ProtoError::Timeout => "timeout",
        _ => "io",
    }
}

/// Logs and records one event; answers it.
fn record(
    state: &Mutex<State>,
    metrics: &Metrics,
    peer: &str,
    event: Event,
    balloon: Option<&crate::BalloonControl>,
    shaping: Option<(&crate::ShapingLoop, Option<u32>)>,
    interrupt: Option<(&Mutex<crate::interrupt::Coordinator>, bool)>,
) -> HookReply {
    Metrics::inc(&metrics.events, event.kind.name());
    let mut st = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let vm = event.vm.vm_id.clone();
    // Each libvirt hook call is a process of its own and numbers nothing;
    // libvirt runs a domain's hooks one at a time, so arrival order is order.
    let sequenced = !matches!(event.kind, EventKind::Libvirt(_));
    match st.last_seq.get(&vm) {
        _ if !sequenced => {}
        Some(&last) if event.seq != last + 1 => {
            tracing::warn!(
                vm,
                last,
                seq = event.seq,
                "events of this VM arrived out of sequence"
            );
        }
        None if event.seq != 0 => {
            tracing::warn!(
                vm,
                seq = event.seq,
                "first event seen of this VM is not its first"
            );
        }
        _ => {}
    }
    if sequenced {
        st.last_seq.insert(vm.clone(), event.seq);
    }
    tracing::info!(vm, seq = event.seq, event = event.kind.name(), "VM event");
    let key = ProfileKey {
        image: event.vm.image_digest.clone(),
        package: event.vm.package_digest.clone(),
    };
    let reply = match &event.kind {
        EventKind::BeforeBoot { .. } => {
            let plan = plan_for(st.store.as_ref(), &key);
            let kind = match (&plan.prefault, &plan.profile) {
                (Some(_), _) => "prefault",
                (None, Some(_)) => "profile-only",
                (None, None) => "empty",
            };
            Metrics::inc(&metrics.plans, kind);
            HookReply::Plan(plan)
        }
        EventKind::Ready { time_to_ready_ms } => {
            metrics.time_to_ready.observe(time_to_ready_ms / 1e3);
            HookReply::Ack
        }
        EventKind::BootReport(report) => {
            if let Some(store) = st.store.as_mut() {
                let at = i64::try_from(event.at_unix_ms).unwrap_or(i64::MAX);
                match store.record_boot(&key, &vm, at, report) {
                    Ok(id) => {
                        metrics.boots_recorded.inc();
                        tracing::debug!(vm, id, "boot recorded");
                    }
                    Err(e) => {
                        metrics.store_errors.inc();
                        tracing::error!(vm, "cannot record the boot: {}", error_chain(&e));
                    }
                }
            }
            HookReply::Ack
        }
        EventKind::Stopped { status } => {
            st.last_seq.remove(&vm);
            if let Some(l) = st.gpu_ledger.as_mut() {
                let failed = matches!(status, vmm_hooks::StopStatus::Failed { .. });
                crate::gpu::release_on_stop(l, metrics, &vm, failed);
            }
            HookReply::Ack
        }
        EventKind::Libvirt(call) => {
            if let Some(problem) = &call.xml_error {
                tracing::warn!(
                    vm,
                    operation = call.operation_name,
                    "libvirt hook could not read the domain XML: {problem}"
                );
            }
            // libvirt's last word on a domain (after a stop, or a start
            // that failed): its GPUs are free again.
            if call.operation == vmm_hooks::LibvirtOperation::Release
                && let Some(l) = st.gpu_ledger.as_mut()
            {
                crate::gpu::release_on_stop(l, metrics, &vm, false);
            }
            // Never waits: the agent acts after this reply, on its own thread.
            if let Some(agent) = st.libvirt.as_ref() {
                agent.notify(&vm, call);
            }
            HookReply::Ack
        }
        _ => HookReply::Ack,
    };
    let reply = match balloon {
        Some(b) => b.answer(&event, reply, std::time::Instant::now()),
        None => reply,
    };
    // The shaping loop's target, where it has one, wins over the forecasts file's.
    let reply = match shaping {
        Some((s, pid)) => s.observe(&event, pid, reply),
        None => reply,
    };
    // The interruption coordinator has the last word (admission, shrink
    // and interrupt orders).
    let reply = match interrupt {
        Some((c, can)) => crate::interrupt::answer(c, metrics, &event, can, reply, unix_ms()),
        None => reply,
    };
    match (&event.kind, &reply) {
        (EventKind::BeforeBoot { .. }, HookReply::Plan(p)) if p.balloon_target_mib.is_some() => {
            Metrics::inc(&metrics.balloon_targets, "pre-balloon");
        }
        (EventKind::Balloon(s), HookReply::BalloonTarget { target_mib, .. }) => {
            let kind = if *target_mib > s.target_mib {
                "inflate"
            } else {
                "deflate"
            };
            Metrics::inc(&metrics.balloon_targets, kind);
        }
        _ => {}
    }
    if let Some(log) = st.log.as_mut() {
        let rec = EventRecord {
            received_unix_ms: unix_ms(),
            peer: peer.to_string(),
            event,
        };
        let written = serde_json::to_writer(&mut *log, &rec)
            .map_err(std::io::Error::other)
            .and_then(|()| log.write_all(b"\n"))
            .and_then(|()| log.flush());
        if let Err(e) = written {
            tracing::error!("cannot append to the event log: {e}");
        }
    }
    reply
}

/// The boot plan for a key, or an empty one (boot as usual) without a
/// readable store.
fn plan_for(store: Option<&ProfileStore>, key: &ProfileKey) -> BootPlan {
    const WHO: &str = concat!("prescient ", env!("CARGO_PKG_VERSION"));
    let Some(store) = store else {
        return BootPlan::made_by(format!("{WHO}: no profile store (boot as usual)"));
    };
    store.boot_plan(key).unwrap_or_else(|e| {
        tracing::error!("cannot read the profile store: {}", error_chain(&e));
        BootPlan::made_by(format!("{WHO}: profile store unreadable (boot as usual)"))
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Reads one frame: waits as long as needed for its first byte, then gives
/// the rest `timeout` to arrive.
async fn read_frame(stream: &mut UnixStream, timeout: Duration) -> Result<Message, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    let n = stream
        .read(&mut header[..1])
        .await
        .map_err(ProtoError::Io)?;
    if n == 0 {
        return Err(ProtoError::Closed);
    }
    let rest = async {
        read_exact(stream, &mut header[1..], 1, HEADER_LEN).await?;
        let len = proto::parse_header(&header)?;
        let mut body = vec![0u8; len as usize];
        read_exact(stream, &mut body, 0, len as usize).await?;
        proto::decode_body(&body)
    };
    tokio::time::timeout(timeout, rest)
        .await
        .map_err(|_| ProtoError::Timeout)?
}

async fn read_exact(
    stream: &mut UnixStream,
    buf: &mut [u8],
    already: usize,
    want: usize,
) -> Result<(), ProtoError> {
    let mut got = 0;
    while got < buf.len() {
        let n = stream.read(&mut buf[got..]).await.map_err(ProtoError::Io)?;
        if n == 0 {
            return Err(ProtoError::Truncated {
                got: already + got,
                want,
            });
        }
        got += n;
    }
    Ok(())
}

async fn send(stream: &mut UnixStream, msg: &Message) -> Result<(), ProtoError> {
    let frame = proto::encode(msg)?;
    stream.write_all(&frame).await.map_err(ProtoError::Io)
}
