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
use vmm_hooks::{
    Allocation, BootPlan, Event, EventKind, HookReply, LibvirtOperation, Resources,
    ShortfallAction, error_chain,
};

use crate::allocator::{AllocatorPolicy, Declared, Forecast};
use crate::config::PoolSection;
use crate::libvirt::{AgentConfig, LibvirtAgent, LibvirtError};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::status::{DaemonStatus, PoolStatus};
use crate::store::{
    ProfileKey, ProfileStore, StoreError, StorePolicy, VmRecord, VmSource, VmState,
};

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
    /// The host's resources could not be read.
    #[error("cannot read the host's resources for the pool (set pool.cpus and pool.memory_mib)")]
    Pool(#[source] std::io::Error),
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
    /// The host's resource pool (totals, host reserve, over-commit).
    pub pool: PoolSection,
    /// How boots are forecast and admitted.
    pub allocator: AllocatorPolicy,
    /// The interruption coordinator (`--capacity-mib`); `None`: every VM
    /// is admitted and none is interrupted.
    pub interrupt: Option<Arc<Mutex<crate::interrupt::Coordinator>>>,
    /// The shaping loop (`None`: off). It sees every event and answers
    /// balloon status with its targets; its ticks run beside the server.
    pub shaping: Option<Arc<crate::ShapingLoop>>,
    /// Online learning (samples to the store, the served model,
    /// retraining); shown in the status.
    pub online: Option<Arc<crate::Online>>,
    /// Live migration: orders for VMs whose VMM can migrate, drains, and
    /// moves on predicted overload (`[migration]`).
    pub migration: Option<Arc<crate::migration::Mover>>,
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
            pool: PoolSection::default(),
            allocator: AllocatorPolicy::default(),
            interrupt: None,
            shaping: None,
            online: None,
            migration: None,
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

#[derive(Debug)]
struct State {
    /// Last sequence number seen per VM, to spot lost or reordered events.
    last_seq: HashMap<String, u64>,
    log: Option<BufWriter<File>>,
    store: Option<ProfileStore>,
    libvirt: Option<LibvirtAgent>,
    /// The host's resources and what each VM holds.
    pool: Pool,
    /// Every VM the daemon knows (saw created or before-boot since start,
    /// or restored from the store's pool table), by id.
    vms: HashMap<String, VmRecord>,
    /// GPU reservations, in the store file.
    gpu_ledger: Option<accel::Ledger>,
}

/// Key in `daemon_state`: "1" while a daemon runs on the store, "0" after a
/// clean shutdown.
const RUNNING_KEY: &str = "running";

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
        let mut pool = config.pool.build().map_err(ServeError::Pool)?;
        let mut vms = HashMap::new();
        let mut last_seq = HashMap::new();
        if let Some(s) = &store {
            let run_dir = config
                .libvirt
                .as_ref()
                .map_or_else(|| AgentConfig::system().run_dir, |a| a.run_dir.clone());
            restore_pool(
                s,
                &mut pool,
                &mut vms,
                &mut last_seq,
                &run_dir,
                &config.metrics,
            )?;
        }
        if let Some(s) = &store {
            resume_drain(s, config.migration.as_deref())?;
        }
        if let Some(m) = &config.migration {
            // libvirt domains restored from the store: the hook does not
            // announce them again; a resumed drain moves them.
            let domains = libvirt_domains(&vms);
            m.know_libvirt(&domains, m.draining());
        }
        config.metrics.set_pool(&pool);
        if let Some(m) = &config.migration {
            // The overload check compares forecasts with what VMs may use.
            #[allow(clippy::cast_precision_loss)]
            m.set_capacity_mib(pool.capacity().memory_mib as f64);
        }
        tracing::info!(
            capacity = %pool.capacity(),
            allocated = %pool.allocated(),
            vms = vms.len(),
            "resource pool ready"
        );
        // GPUs: probed once, logged once (one info line without a driver).
        let gpus = crate::gpu::probe_at_start(config.store.as_deref());
        config
            .metrics
            .gpus
            .set(gpus.map_or(0, |g| i64::try_from(g.gpus.len()).unwrap_or(i64::MAX)));
        let gpu_ledger = config.store.as_deref().and_then(crate::gpu::open_ledger);
        let libvirt = match &config.libvirt {
            Some(c) => {
                let mut c = c.clone();
                c.samples.clone_from(&config.online);
                Some(LibvirtAgent::start(c, Arc::clone(&config.metrics))?)
            }
            None => None,
        };
        tracing::info!(socket = %path.display(), "listening for VMM hooks");
        Ok(HooksServer {
            config,
            listener,
            state: Arc::new(Mutex::new(State {
                last_seq,
                log,
                store,
                libvirt,
                pool,
                vms,
                gpu_ledger,
            })),
        })
    }

    /// The check the migration listener makes before it starts a labvm
    /// for an incoming VM: the pool must have room for its RAM and vCPUs
    /// (the labvm's own `before-boot` then reserves them).
    pub fn slot_admitter(&self) -> crate::migration::SlotAdmitter {
        let state = Arc::clone(&self.state);
        let mover = self.config.migration.clone();
        Arc::new(move |req, pending_mib| {
            if mover.as_ref().is_some_and(|m| m.draining()) {
                return Err("this host is draining; it takes no VMs".into());
            }
            let st = state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if st.vms.contains_key(&req.vm_id) {
                return Err(format!(
                    "a VM named {:?} already runs on this host",
                    req.vm_id
                ));
            }
            let demand = Resources {
                cpu_millis: u64::from(req.vcpus).saturating_mul(1000),
                memory_mib: req.ram_mib.saturating_add(pending_mib),
                ..Resources::ZERO
            };
            st.pool
                .check(&req.vm_id, &demand)
                .map_err(|s| format!("no room on this host: {s}"))
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
        let agent = {
            let mut st = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(log) = st.log.as_mut() {
                let _ = log.flush();
            }
            persist_at_shutdown(&mut st);
            st.libvirt.take()
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
    let (uid, pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.pid()),
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
    // Whether the peer understands `interrupt` and `defer` replies, and
    // `migrate` replies.
    let mut can_interrupt = false;
    let mut can_migrate = false;
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
                can_migrate = features.iter().any(|f| f == proto::FEATURE_MIGRATE);
                continue;
            }
            Message::Event(event) => {
                let peer = Peer {
                    name: &peer,
                    pid,
                    can_interrupt,
                    can_migrate,
                };
                record(state, config, &peer, event)
            }
            // Operator requests: answered with the status, connection kept.
            msg @ (Message::UndrainRequest
            | Message::DrainRequest { .. }
            | Message::StatusRequest) => {
                let name = msg.type_name();
                let answer = match msg {
                    Message::DrainRequest { to } => drain(state, config, &to),
                    Message::UndrainRequest => undrain(state, config),
                    _ => status_message(state, config),
                };
                if let Err(e) = send(&mut stream, &answer).await {
                    tracing::debug!("cannot answer a {name} message: {e}");
                    return;
                }
                continue;
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

/// When the last unknown-VM warning was logged, ms since the Unix epoch.
static UNKNOWN_VM_WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// When the last shortfall warning was logged, ms since the Unix epoch.
static SHORTFALL_WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// True at most once a second per `last` (a rate limit for warnings a peer
/// can trigger).
fn warn_allowed(last: &std::sync::atomic::AtomicU64) -> bool {
    use std::sync::atomic::Ordering;
    let now = unix_ms();
    let prev = last.load(Ordering::Relaxed);
    now.saturating_sub(prev) >= 1000
        && last
            .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Whether `vm` holds GPUs in the store's GPU ledger (reserved outside the
/// boot path, with `prescient gpu reserve`): such a VM is known too. Read
/// only for events of VMs the pool does not know.
fn holds_gpus(st: &State, vm: &str) -> bool {
    st.gpu_ledger.as_ref().is_some_and(|l| {
        l.reservations()
            .is_ok_and(|rs| rs.iter().any(|r| r.vm == vm))
    })
}

/// Whether an event of this kind needs a VM the daemon knows (see the
/// protocol notes in `vmm_hooks::proto`).
fn needs_known_vm(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Created { .. }
            | EventKind::BeforeBoot { .. }
            | EventKind::Restore
            | EventKind::Migrate { .. }
            | EventKind::Libvirt(_)
    )
}

/// The VMM on a connection.
struct Peer<'a> {
    /// Its `hello`.
    name: &'a str,
    /// Its process (SO_PEERCRED).
    pid: Option<i32>,
    /// It understands `interrupt` and `defer` replies.
    can_interrupt: bool,
    /// It understands `migrate` replies.
    can_migrate: bool,
}

/// Starts a drain (`prescient host drain`); answers with the status.
fn drain(state: &Mutex<State>, config: &ServerConfig, to: &[String]) -> Message {
    let Some(mover) = config.migration.as_ref() else {
        return Message::Error {
            message: "this companion does not move VMs (no migration support configured)".into(),
        };
    };
    // A drain asked again (new destinations) keeps the time it began.
    let since = mover
        .drain_status()
        .and_then(|d| d.since_unix_ms)
        .unwrap_or_else(unix_ms);
    let record = match crate::migration::DrainRecord::new(to.to_vec(), since) {
        Ok(r) => r,
        Err(e) => {
            return Message::Error {
                message: e.to_string(),
            };
        }
    };
    {
        // The store write and the drain's start under one lock (the hook
        // path takes it, then the mover's, too), so that an undrain cannot
        // fall between them.
        let st = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Recorded before it begins, so that a daemon restarted from now
        // on (the OS update restarts it) resumes it. A drain is rare: one
        // direct write, as for reservations.
        let recorded = match st.store.as_ref() {
            None => {
                tracing::warn!(
                    "no profile store: this drain is held in memory only; a restarted daemon will not be draining"
                );
                false
            }
            Some(s) => match s.set_state(crate::migration::DRAIN_STATE_KEY, &record.to_json()) {
                Ok(()) => true,
                Err(e) => {
                    config.metrics.store_errors.inc();
                    tracing::error!(
                        "cannot record the drain in the store ({}); it goes on, but a restarted daemon will not be draining",
                        error_chain(&e)
                    );
                    false
                }
            },
        };
        let known: Vec<String> = st.vms.keys().cloned().collect();
        mover.know_libvirt(&libvirt_domains(&st.vms), false);
        mover.drain(&record, recorded, &known);
    }
    status_message(state, config)
}

/// The libvirt domains among the pool's records.
fn libvirt_domains(vms: &HashMap<String, VmRecord>) -> Vec<String> {
    vms.values()
        .filter(|r| r.source == VmSource::Libvirt)
        .map(|r| r.vm_id.clone())
        .collect()
}

/// Ends a drain (`prescient host undrain`): its record leaves the store
/// first; when that fails the host stays cordoned (a restart would
/// resume the drain) and the operator is told.
fn undrain(state: &Mutex<State>, config: &ServerConfig) -> Message {
    {
        let st = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = st.store.as_ref()
            && let Err(e) = s.clear_state(crate::migration::DRAIN_STATE_KEY)
        {
            config.metrics.store_errors.inc();
            let message = format!(
                "cannot remove the recorded drain from the store ({}); the host stays cordoned",
                error_chain(&e)
            );
            tracing::error!("undrain: {message}");
            return Message::Error { message };
        }
        if let Some(m) = config.migration.as_ref() {
            m.undrain();
        }
    }
    status_message(state, config)
}

/// At start: a drain recorded in the store is put back in force (see
/// [`crate::migration::Mover::resume_recorded`]).
fn resume_drain(
    store: &ProfileStore,
    mover: Option<&crate::migration::Mover>,
) -> Result<(), StoreError> {
    let Some(value) = store.state(crate::migration::DRAIN_STATE_KEY)? else {
        return Ok(());
    };
    match mover {
        Some(m) => m.resume_recorded(&value),
        None => tracing::warn!(
            "a drain is recorded in the store, but this companion has no migration support: it takes VMs as usual"
        ),
    }
    Ok(())
}

/// The daemon's status as a message (or an error saying why not).
fn status_message(state: &Mutex<State>, config: &ServerConfig) -> Message {
    let status = {
        let st = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        status_of(&st, config)
    };
    match serde_json::to_value(&status) {
        Ok(status) => Message::Status { status },
        Err(e) => Message::Error {
            message: format!("cannot encode the status: {e}"),
        },
    }
}

/// Logs and records one event; answers it.
fn record(state: &Mutex<State>, config: &ServerConfig, peer: &Peer<'_>, event: Event) -> HookReply {
    let (pid, can_interrupt) = (peer.pid, peer.can_interrupt);
    let peer_name = peer.name;
    let metrics = &*config.metrics;
    let balloon = config.balloon.as_deref();
    Metrics::inc(&metrics.events, event.kind.name());
    let mut st = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let vm = event.vm.vm_id.clone();
    if needs_known_vm(&event.kind) && !st.vms.contains_key(&vm) && !holds_gpus(&st, &vm) {
        Metrics::inc(&metrics.rejected, "unknown-vm");
        // A peer can send these as fast as it likes: one warning a second.
        if warn_allowed(&UNKNOWN_VM_WARNED) {
            tracing::warn!(
                vm,
                peer = peer_name,
                event = event.kind.name(),
                "event of a VM this daemon never saw boot: rejected (more are counted in prescient_rejected_total{{kind=\"unknown-vm\"}})"
            );
        } else {
            tracing::debug!(
                vm,
                peer = peer_name,
                event = event.kind.name(),
                "unknown VM: rejected"
            );
        }
        return HookReply::Rejected {
            reason: format!(
                "unknown VM {vm:?}: no created or before-boot event for it since the companion started, and no reservation in its pool (send created or before-boot first)"
            ),
        };
    }
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
        EventKind::Created { .. } => {
            st.vms
                .entry(vm.clone())
                .or_insert_with(|| new_record(&vm, &key, VmSource::Vmm, pid, event.at_unix_ms));
            HookReply::Ack
        }
        EventKind::BeforeBoot { .. }
            if can_interrupt && config.migration.as_ref().is_some_and(|m| m.draining()) =>
        {
            // No new VMs on a host being emptied; the VMM asks again.
            HookReply::Defer {
                reason: "this host is draining for maintenance (prescient host undrain ends it)"
                    .into(),
                retry_after_ms: 5000,
                missing_mib: 0,
            }
        }
        EventKind::BeforeBoot { vcpu_tids, ram, .. } => {
            if config.migration.as_ref().is_some_and(|m| m.draining()) {
                tracing::warn!(
                    vm,
                    peer = peer_name,
                    "a VM boots on a draining host: its VMM cannot be deferred"
                );
            }
            let declared = Declared {
                vcpus: u64::try_from(vcpu_tids.len()).unwrap_or(u64::MAX).max(1),
                memory_mib: ram.len >> 20,
            };
            let allocation = admit(&mut st, config, &event, VmSource::Vmm, pid, declared);
            let mut plan = plan_for(st.store.as_ref(), &key);
            if !allocation.admitted {
                // Nothing is promised to this VM: no pre-faulting (it would
                // commit memory the pool does not have), no profiling.
                plan = BootPlan::made_by(plan.made_by);
            }
            let kind = match (&plan.prefault, &plan.profile) {
                _ if !allocation.admitted => "not-admitted",
                (Some(_), _) => "prefault",
                (None, Some(_)) => "profile-only",
                (None, None) => "empty",
            };
            Metrics::inc(&metrics.plans, kind);
            HookReply::Plan(plan.with_allocation(allocation))
        }
        EventKind::Restarted => {
            let allocation = readmit(&mut st, metrics, &vm, event.at_unix_ms);
            HookReply::Plan(
                BootPlan::made_by(allocation.forecast_by.clone()).with_allocation(allocation),
            )
        }
        EventKind::Interrupted { .. } => {
            release(&mut st, metrics, &vm, event.at_unix_ms, false);
            HookReply::Ack
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
            release(&mut st, metrics, &vm, event.at_unix_ms, true);
            if let Some(l) = st.gpu_ledger.as_mut() {
                let failed = matches!(status, vmm_hooks::StopStatus::Failed { .. });
                crate::gpu::release_on_stop(l, metrics, &vm, failed);
            }
            HookReply::Ack
        }
        EventKind::Libvirt(call) => {
            match call.operation {
                LibvirtOperation::Start => {
                    if let Some(d) = &call.domain {
                        let kib = if d.current_memory_kib > 0 {
                            d.current_memory_kib
                        } else {
                            d.memory_kib
                        };
                        let declared = Declared {
                            vcpus: u64::from(d.vcpus.max(1)),
                            memory_mib: kib / 1024,
                        };
                        let a = admit(&mut st, config, &event, VmSource::Libvirt, None, declared);
                        if !a.admitted {
                            tracing::warn!(
                                vm,
                                "libvirt domain starts without a reservation: the hook cannot refuse a start ({})",
                                a.shortfall_text()
                            );
                        }
                    }
                }
                op if op.vm_gone() => release(&mut st, metrics, &vm, event.at_unix_ms, true),
                _ => {}
            }
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
    let reply = match config.shaping.as_deref() {
        Some(s) => s.observe(&event, pid.and_then(|p| u32::try_from(p).ok()), reply),
        None => reply,
    };
    // The interruption coordinator has the last word (admission, shrink
    // and interrupt orders).
    let reply = match config.interrupt.as_deref() {
        Some(c) => crate::interrupt::answer(c, metrics, &event, can_interrupt, reply, unix_ms()),
        None => reply,
    };
    // A migration order goes only where nothing else was answered.
    let reply = match config.migration.as_ref() {
        Some(m) => m.observe(&event, peer.can_migrate, reply),
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
            peer: peer_name.to_string(),
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

/// A record for a VM the daemon has just heard of.
fn new_record(vm: &str, key: &ProfileKey, source: VmSource, pid: Option<i32>, at: u64) -> VmRecord {
    VmRecord {
        vm_id: vm.to_string(),
        key: key.clone(),
        source,
        pid,
        pid_start: pid.and_then(crate::reconcile::process_start),
        state: VmState::Created,
        demand: Resources::ZERO,
        quantile: 0.0,
        forecast_by: String::new(),
        class: String::new(),
        shortfall: String::new(),
        last_seq: None,
        updated_unix_ms: i64::try_from(at).unwrap_or(i64::MAX),
    }
}

/// Forecasts a booting VM's demand, reserves it in the pool (or finds what
/// falls short), and records the outcome in memory and in the store.
fn admit(
    st: &mut State,
    config: &ServerConfig,
    event: &Event,
    source: VmSource,
    pid: Option<i32>,
    declared: Declared,
) -> Allocation {
    let metrics = &*config.metrics;
    let vm = &event.vm.vm_id;
    let key = ProfileKey {
        image: event.vm.image_digest.clone(),
        package: event.vm.package_digest.clone(),
    };
    let history = match st.store.as_ref() {
        Some(s) => s
            .boot_usage(&key, config.allocator.history)
            .unwrap_or_else(|e| {
                metrics.store_errors.inc();
                tracing::error!(
                    vm,
                    "cannot read boot history; forecasting from the declared size: {}",
                    error_chain(&e)
                );
                Vec::new()
            }),
        None => Vec::new(),
    };
    let forecast: Forecast =
        config
            .allocator
            .forecast(vm, &event.vm.image_digest, declared, &history);
    let allocation = config.allocator.admit(&mut st.pool, vm, &forecast);
    let mut rec = st
        .vms
        .remove(vm)
        .filter(|r| r.source == source)
        .unwrap_or_else(|| new_record(vm, &key, source, pid, event.at_unix_ms));
    if pid.is_some() && rec.pid != pid {
        rec.pid = pid;
        rec.pid_start = pid.and_then(crate::reconcile::process_start);
    }
    rec.key = key;
    rec.demand = forecast.demand;
    rec.quantile = forecast.quantile;
    rec.forecast_by = forecast.by.clone();
    rec.class = forecast.class.clone();
    rec.updated_unix_ms = i64::try_from(event.at_unix_ms).unwrap_or(i64::MAX);
    if allocation.admitted {
        Metrics::inc(&metrics.allocator_decisions, "fit");
        rec.state = VmState::Reserved;
        rec.shortfall.clear();
        tracing::debug!(vm, demand = %forecast.demand, by = forecast.by, "demand reserved");
    } else {
        // A VM that held a reservation (booted again under its id) gives
        // it up: it is not promised anything now.
        st.pool.release(vm);
        Metrics::inc(&metrics.allocator_decisions, "short");
        for s in &allocation.short {
            metrics.inc_short(s.resource);
        }
        rec.state = match allocation.on_shortfall {
            ShortfallAction::BootLazily => VmState::Unreserved,
            _ => VmState::Refused,
        };
        rec.shortfall = allocation.shortfall_text();
        if warn_allowed(&SHORTFALL_WARNED) {
            tracing::warn!(
                vm,
                demand = %forecast.demand,
                by = forecast.by,
                action = allocation.on_shortfall.name(),
                "demand does not fit the pool: {} (one warning a second; every one is counted in prescient_allocator_decisions_total{{kind=\"short\"}})",
                rec.shortfall
            );
        } else {
            tracing::debug!(vm, "demand does not fit the pool: {}", rec.shortfall);
        }
    }
    persist(st, metrics, &rec);
    st.vms.insert(vm.clone(), rec);
    metrics.set_pool(&st.pool);
    allocation
}

/// A restart: the resources forecast at boot are reserved again at once.
fn readmit(st: &mut State, metrics: &Metrics, vm: &str, at: u64) -> Allocation {
    // Only known VMs get here (checked by the caller); an unknown one
    // would be reserved nothing.
    let mut rec = st.vms.remove(vm).unwrap_or_else(|| {
        new_record(
            vm,
            &ProfileKey {
                image: String::new(),
                package: String::new(),
            },
            VmSource::Vmm,
            None,
            at,
        )
    });
    let short = match st.pool.reserve(vm, rec.demand) {
        Ok(_) => Vec::new(),
        Err(s) => s.short,
    };
    let allocation = Allocation::new(
        rec.demand,
        rec.quantile,
        format!("forecast at boot: {}", rec.forecast_by),
        short,
        ShortfallAction::Refuse,
    );
    if allocation.admitted {
        Metrics::inc(&metrics.allocator_decisions, "fit");
        rec.state = VmState::Reserved;
        rec.shortfall.clear();
    } else {
        Metrics::inc(&metrics.allocator_decisions, "short");
        for s in &allocation.short {
            metrics.inc_short(s.resource);
        }
        rec.state = VmState::Refused;
        rec.shortfall = allocation.shortfall_text();
        tracing::warn!(vm, "restart does not fit the pool: {}", rec.shortfall);
    }
    rec.updated_unix_ms = i64::try_from(at).unwrap_or(i64::MAX);
    persist(st, metrics, &rec);
    st.vms.insert(vm.to_string(), rec);
    metrics.set_pool(&st.pool);
    allocation
}

/// Releases what a VM holds; `forget` drops its record too (stopped),
/// otherwise it stays known as interrupted.
fn release(st: &mut State, metrics: &Metrics, vm: &str, at: u64, forget: bool) {
    if let Some(r) = st.pool.release(vm) {
        Metrics::inc(&metrics.allocator_decisions, "released");
        tracing::debug!(vm, resources = %r.resources, "reservation released");
    }
    if forget {
        if st.vms.remove(vm).is_some()
            && let Some(s) = st.store.as_ref()
            && let Err(e) = s.pool_remove(vm)
        {
            metrics.store_errors.inc();
            tracing::error!(vm, "cannot forget the VM in the store: {}", error_chain(&e));
        }
    } else if let Some(mut rec) = st.vms.remove(vm) {
        rec.state = VmState::Interrupted;
        rec.updated_unix_ms = i64::try_from(at).unwrap_or(i64::MAX);
        persist(st, metrics, &rec);
        st.vms.insert(vm.to_string(), rec);
    }
    metrics.set_pool(&st.pool);
}

fn persist(st: &State, metrics: &Metrics, rec: &VmRecord) {
    if let Some(s) = st.store.as_ref()
        && let Err(e) = s.pool_put(rec)
    {
        metrics.store_errors.inc();
        tracing::error!(
            vm = rec.vm_id,
            "cannot persist the VM's reservation: {}",
            error_chain(&e)
        );
    }
}

/// At start: the store's pool records, reconciled against the VMs that
/// really exist; what is gone is released and forgotten.
fn restore_pool(
    store: &ProfileStore,
    pool: &mut Pool,
    vms: &mut HashMap<String, VmRecord>,
    last_seq: &mut HashMap<String, u64>,
    libvirt_run_dir: &Path,
    metrics: &Metrics,
) -> Result<(), StoreError> {
    if store.state(RUNNING_KEY)?.as_deref() == Some("1") {
        tracing::warn!(
            "the previous daemon on this store did not shut down cleanly; its reservations are reconciled against the running VMs"
        );
    }
    store.set_state(RUNNING_KEY, "1")?;
    for rec in store.pool_records()? {
        if let Err(gone) = crate::reconcile::still_exists(&rec, libvirt_run_dir) {
            store.pool_remove(&rec.vm_id)?;
            Metrics::inc(&metrics.allocator_decisions, "reconciled-released");
            tracing::info!(
                vm = rec.vm_id,
                state = rec.state.name(),
                "VM no longer exists ({gone}): its reservation is released"
            );
            continue;
        }
        if rec.state == VmState::Reserved
            && let Some(over) = pool.restore(&rec.vm_id, rec.demand)
        {
            tracing::warn!(
                vm = rec.vm_id,
                "restored reservation exceeds the configured pool ({over}); the pool is over-committed until VMs stop"
            );
        }
        Metrics::inc(&metrics.allocator_decisions, "restored");
        if let Some(seq) = rec.last_seq {
            last_seq.insert(rec.vm_id.clone(), seq);
        }
        tracing::info!(vm = rec.vm_id, state = rec.state.name(), demand = %rec.demand, "VM restored from the store");
        vms.insert(rec.vm_id.clone(), rec);
    }
    Ok(())
}

/// At shutdown: each VM's last sequence number and a clean-shutdown mark,
/// then a WAL checkpoint. (Reservations themselves were written as they
/// changed.)
fn persist_at_shutdown(st: &mut State) {
    let records: Vec<VmRecord> = st
        .vms
        .values()
        .filter(|r| r.state != VmState::Created)
        .map(|r| {
            let mut r = r.clone();
            r.last_seq = st.last_seq.get(&r.vm_id).copied();
            r
        })
        .collect();
    let reservations = st.pool.len();
    if let Some(s) = st.store.as_mut() {
        let at = i64::try_from(unix_ms()).unwrap_or(i64::MAX);
        match s
            .persist_all(&records, at)
            .and_then(|()| s.set_state(RUNNING_KEY, "0"))
        {
            Ok(()) => tracing::info!(
                vms = records.len(),
                reservations,
                "state persisted for the next start"
            ),
            Err(e) => tracing::error!("cannot persist state at shutdown: {}", error_chain(&e)),
        }
    }
}

/// What `prescient status` shows.
fn status_of(st: &State, config: &ServerConfig) -> DaemonStatus {
    let mut vms: Vec<VmRecord> = st
        .vms
        .values()
        .map(|r| {
            let mut r = r.clone();
            r.last_seq = st.last_seq.get(&r.vm_id).copied();
            r
        })
        .collect();
    vms.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    DaemonStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        socket: config.socket.display().to_string(),
        store: config.store.as_ref().map(|p| p.display().to_string()),
        pool: PoolStatus::of(&st.pool),
        vms,
        model: config.online.as_ref().map(|o| o.status()),
        forecasts: config
            .shaping
            .as_ref()
            .map(|s| s.served())
            .unwrap_or_default(),
        migrations: config
            .migration
            .as_ref()
            .map(|m| m.moves())
            .unwrap_or_default(),
        draining: config.migration.as_ref().is_some_and(|m| m.draining()),
        drain: config.migration.as_ref().and_then(|m| m.drain_status()),
    }
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

/// Wall-clock time now, milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms() -> u64 {
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
