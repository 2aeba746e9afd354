//! The hooks socket protocol, version 1.
//!
//! A Unix stream socket carries frames in both directions. A frame is a
//! 12-byte header followed by a JSON body:
//!
//! ```text
//! offset  size  field
//! 0       4     magic "PRSC"
//! 4       2     protocol version, little-endian (1)
//! 6       2     flags, little-endian (0; reserved)
//! 8       4     body length in bytes, little-endian (at most MAX_BODY, 16 MiB)
//! 12      len   body: one Message as JSON (UTF-8)
//! ```
//!
//! Sequence: the VMM connects and sends `hello`; then for each lifecycle
//! event it sends `event` and waits for exactly one `reply` (an ack, or a
//! plan for `before-boot`) before sending the next, so events arrive in
//! order. A side that receives a bad frame (wrong magic or version, a body
//! over the limit, malformed JSON, a truncated frame) sends `error` if it
//! can, logs, and closes the connection. Either side may close at any time;
//! the VMM then carries on without a companion.
//!
//! ## Balloon control (additive, still version 1)
//!
//! A VMM with a virtio-balloon device adds, on the same connection and in
//! the same event/reply sequence:
//!
//! ```text
//! VMM                                         companion
//!  event before-boot ─────────────────────────► reply plan {balloon_target_mib?}
//!                                                (pre-balloon: the VMM sets the
//!                                                 target before the guest runs)
//!  every poll interval (labvm: --balloon-poll-ms):
//!  event balloon {target_mib, actual_mib,      ► reply ack                (keep the target)
//!        inflated/deflated/reported pages,       or reply balloon-target {target_mib}
//!        guest_stats, unresponsive}                (set-target; the VMM applies it at once)
//!  event balloon-unresponsive {target_mib,     ► reply ack
//!        actual_mib, stalled_ms}  (once per episode of a guest ignoring its target)
//! ```
//!
//! Both sides ignore nothing silently: a companion that does not know the
//! balloon event kinds answers `error` and closes, and the VMM carries on
//! without a companion, as for any rejected event. `balloon_target_mib` in a
//! plan is optional and omitted when absent, so plans from older companions
//! decode unchanged.
//!
//! ## libvirt hook calls (an addition to version 1)
//!
//! `prescient libvirt-hook`, run by libvirt as `/etc/libvirt/hooks/qemu`,
//! is a short-lived peer: it connects, says `hello` (peer
//! `prescient-libvirt-hook <version>`), sends one `event` whose kind is
//! `libvirt`, waits for the reply within its time bound, and exits. The
//! event's `vm.vm_id` is the domain name; its `seq` is always 0 because each
//! hook call is a process of its own (libvirt runs a domain's hooks one at a
//! time, so arrival order is the domain's order, and the daemon does not
//! check `seq` for these events). The body carries the operation, libvirt's
//! sub-operation and extra argument, the domain XML as received and the
//! hook's reading of it:
//!
//! ```json
//! {"type":"event","vm":{"vm_id":"web-1","image_digest":"…","package_digest":"…"},
//!  "seq":0,"at_unix_ms":1700000000000,
//!  "kind":{"kind":"libvirt","operation":"started","operation_name":"started",
//!          "sub_operation":"begin","extra":"-","domain_xml":"<domain …>",
//!          "domain":{"name":"web-1","vcpus":2,"memory_kib":524288,…},
//!          "xml_error":null}}
//! ```
//!
//! How libvirt's operations map onto the lifecycle:
//!
//! | libvirt operation | sub-op | lifecycle | the daemon |
//! | --- | --- | --- | --- |
//! | `prepare` | begin | created | records |
//! | `start` | begin | before boot | records |
//! | `started` | begin | running | pins the vCPU threads, sets the balloon, samples usage |
//! | `reconnect`, `attach` | begin | running (seen again) | as for `started` |
//! | `migrate` | begin | migrate started (incoming) | records |
//! | `restore` | begin | restore | records |
//! | `stopped` | end | stopped | stops sampling |
//! | `release` | end | gone | forgets the domain |
//! | anything else | | `other` (raw name kept) | records |
//!
//! A daemon older than this addition rejects the event as a malformed body;
//! the hook then exits 0 as it does whenever the daemon is unavailable.
//!
//! ## Resource pool and status (additions to version 1)
//!
//! ```text
//! VMM                                         companion
//!  event before-boot ─────────────────────────► reply plan {allocation?}
//!  event restarted ───────────────────────────► reply plan {allocation?}
//!  event stopped ─────────────────────────────► reply ack   (reservation released)
//!  event ready|boot-report|balloon|paused|… of ► reply rejected {reason}
//!        a VM the companion never saw boot        (nothing recorded; connection stays)
//!
//! operator tool                               companion
//!  status-request ────────────────────────────► status {status: {...}}
//! ```
//!
//! `allocation` in a plan (omitted when the companion has no pool, so older
//! VMMs and companions decode each other's plans unchanged):
//!
//! ```json
//! {"admitted": false, "quantile": 0.9, "forecast_by": "declared size (cold start)",
//!  "demand": {"cpu_millis": 2000, "memory_mib": 4096, "net_mbps": 0, "disk_mbps": 0, "gpus": 0},
//!  "short": [{"resource": "memory", "wanted": 4096, "free": 1024, "short_by": 3072}],
//!  "on_shortfall": "refuse"}
//! ```
//!
//! A VMM that is not admitted follows `on_shortfall`: `refuse` (do not run
//! the guest; report `stopped` with a failure naming the shortfall) or
//! `boot-lazily` (run without pre-faulting or profiling). A VMM that knows
//! nothing of `allocation` boots as before. `rejected` is a reply, not an
//! `error`: the companion keeps the connection. An older VMM cannot decode
//! `rejected` and treats the companion as unavailable for a while, as for
//! any reply it does not understand; labvm always sends `created` and
//! `before-boot` first, so it is never rejected.
//!
//! Events that need a VM the companion knows (one it saw `created` or
//! `before-boot` for since it started, or whose reservation, or GPU
//! reservation, it holds in its store): every kind except `created`, `before-boot`, `restore`, `migrate`
//! and libvirt hook calls.
//!
//! ## Interruption (an addition to version 1, negotiated)
//!
//! A VMM that can be told to interrupt a VM announces the feature
//! [`FEATURE_INTERRUPT`] in `hello` (`"features": ["interrupt-1"]`; the
//! field is omitted when empty, and unknown fields are ignored, so either
//! side may be older). The companion sends the two replies below **only**
//! on connections whose `hello` announced the feature; to any other VMM it
//! answers as before, so an older VMM never sees a reply kind it cannot
//! decode.
//!
//! `before-boot` carries an `admission` object (`priority`, higher wins;
//! `interruptible`; `restart`, true when the boot restarts an interrupted
//! VM); absent, it means priority 0, not interruptible, a fresh boot.
//!
//! ```text
//! VMM (high priority)                     companion (capacity C)
//!  event before-boot {admission} ─────────► fits C?  reply plan
//!                                           (after shrinking others and
//!                                            ordering interruptions: plan)
//!                                           cannot free enough: reply defer
//!                                             {reason, retry_after_ms, missing_mib}
//!                                             → VMM waits, sends before-boot again
//! VMM (interruptible victim)
//!  event balloon {…} ─────────────────────► reply interrupt {reason}
//!   (pause vCPUs, save state to its file, or only stop when configured
//!    to cold-boot on restart)
//!  event interrupted {reason} ────────────► reply ack   (allocation released,
//!  event stopped {…} ─────────────────────► reply ack    restart reservation kept)
//! later, the restart (labvm --restore FILE):
//!  event created, before-boot {restart: true} ► reply plan  (the pre-calculated
//!                                                reservation, at once) or defer
//!  event restarted ───────────────────────► reply ack   (a restore: instead of
//!                                                        ready and boot-report;
//!                                                        a cold boot: after them)
//! ```
//!
//! ## Live migration (an addition to version 1, negotiated)
//!
//! A VMM that can live-migrate a running VM when told to announces
//! [`FEATURE_MIGRATE`] in `hello`. It then reports a running VM every poll
//! interval: a VM with a balloon in its `balloon` event (field `run`), any
//! other VM with a `poll` event. The companion answers `migrate` **only** on
//! connections whose `hello` announced the feature:
//!
//! ```text
//! VMM (source)                              companion (source host)
//!  event poll {ram_mib, resident_mib,    ───► reply ack, or
//!        dirty_pages_per_s?, migratable}      reply migrate {to, downtime_ms, reason}
//!                                              (to: a destination labvm that
//!                                               waits with --incoming)
//!  event migrate {phase: started, to}    ───► reply ack
//!  … pre-copy, stop-and-copy, commit (rdma/src/proto.rs) …
//!  event migrate {phase: completed|aborted|in-doubt, to, outcome
//!        {total_ms, downtime_ms, bytes, error?}} ► reply ack
//!  event stopped (after completed)       ───► reply ack  (reservation released)
//! ```
//!
//! After `aborted` the VM runs on at the source and keeps polling. After
//! `in-doubt` (the source committed but never heard that the destination
//! runs the VM) the source has saved its paused copy (the error names the
//! file) and stops; check the destination before restoring it. The
//! destination VMM connects to its own host's companion like a restored VM:
//! `created`, `before-boot {restart: true}`, then `restarted`.
//!
//! Other VMs are shrunk first with `balloon-target` replies to their
//! `balloon` events. A VMM without a balloon device sends no `balloon`
//! events and so can be neither shrunk nor interrupted (labvm gives every
//! `--interruptible` VM a balloon device for this reason).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::event::{Event, HookReply};

/// The feature a VMM announces in `hello` when it understands the
/// `interrupt` and `defer` replies (see the module documentation).
pub const FEATURE_INTERRUPT: &str = "interrupt-1";

/// The feature a VMM announces in `hello` when it sends `poll` events and
/// understands the `migrate` reply (see the module documentation).
pub const FEATURE_MIGRATE: &str = "migrate-1";

/// Protocol version spoken here.
pub const PROTOCOL_VERSION: u16 = 1;
/// Frame magic.
pub const MAGIC: [u8; 4] = *b"PRSC";
/// Header length in bytes.
pub const HEADER_LEN: usize = 12;
/// Largest body accepted, in bytes.
pub const MAX_BODY: u32 = 16 << 20;

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
#[non_exhaustive]
pub enum Message {
    /// First message of a VMM: who it is.
    Hello {
        /// The VMM and its version, e.g. `labvm 0.1.0`.
        peer: String,
        /// Optional protocol features the VMM understands (e.g.
        /// [`FEATURE_INTERRUPT`]); empty from older VMMs, and omitted when
        /// empty so older companions read the hello unchanged.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// A lifecycle event (VMM to companion).
    Event(Event),
    /// The answer to an event (companion to VMM).
    Reply(HookReply),
    /// The sender rejects what it received and closes the connection.
    Error {
        /// Why.
        message: String,
    },
    /// An operator's tool asks the companion for its state (`prescient
    /// status`); answered with [`Message::Status`]. No `hello` needed.
    StatusRequest,
    /// The companion's state: VMs, the resource pool, reservations and
    /// forecasts, as the companion defines it (a JSON object; see
    /// `prescient status --json`).
    Status {
        /// The state.
        status: serde_json::Value,
    },
    /// An operator's tool asks the companion to move every migratable VM
    /// off this host (`prescient host drain`); answered with
    /// [`Message::Status`] at once, while the moves go on. Progress is read
    /// with [`Message::StatusRequest`] (its `migration` part). No `hello`
    /// needed.
    DrainRequest {
        /// Destination companions' migration addresses (`HOST:PORT` of
        /// their `[migration] listen`), used in turn.
        to: Vec<String>,
    },
    /// An operator's tool ends a drain (`prescient host undrain`): the
    /// host takes new VMs again. Answered with [`Message::Status`].
    UndrainRequest,
}

/// What can go wrong on the wire.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection inside a frame.
    #[error("truncated frame: connection closed after {got} of {want} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the frame needed.
        want: usize,
    },
    /// The frame does not start with the magic.
    #[error("bad frame magic {0:02x?} (not a Prescient hooks peer?)")]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {got} (this side speaks {PROTOCOL_VERSION})")]
    Version {
        /// The peer's version.
        got: u16,
    },
    /// The body is longer than allowed.
    #[error("frame body of {len} bytes exceeds the limit of {MAX_BODY}")]
    TooLarge {
        /// Announced length.
        len: u32,
    },
    /// The body is not a valid message.
    #[error("malformed message body")]
    Body(#[source] serde_json::Error),
    /// The peer did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The socket failed.
    #[error("socket I/O")]
    Io(#[source] io::Error),
    /// The peer answered with an error message.
    #[error("peer rejected the message: {0}")]
    Rejected(String),
    /// The peer sent a message that does not fit the sequence.
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
}

impl ProtoError {
    fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ProtoError::Timeout,
            _ => ProtoError::Io(e),
        }
    }
}

impl Message {
    /// The message's type, as on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Event(_) => "event",
            Message::Reply(_) => "reply",
            Message::Error { .. } => "error",
            Message::StatusRequest => "status-request",
            Message::Status { .. } => "status",
            Message::DrainRequest { .. } => "drain-request",
            Message::UndrainRequest => "undrain-request",
        }
    }
}

/// Checks a header; returns the body length.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<u32, ProtoError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::Version { got: version });
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len > MAX_BODY {
        return Err(ProtoError::TooLarge { len });
    }
    Ok(len)
}

/// Decodes a body.
pub fn decode_body(body: &[u8]) -> Result<Message, ProtoError> {
    serde_json::from_slice(body).map_err(ProtoError::Body)
}

/// Encodes a message as one frame.
pub fn encode(msg: &Message) -> Result<Vec<u8>, ProtoError> {
    let body = serde_json::to_vec(msg).map_err(ProtoError::Body)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= MAX_BODY)
        .ok_or(ProtoError::TooLarge {
            len: u32::try_from(body.len()).unwrap_or(u32::MAX),
        })?;
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&0u16.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Writes one message.
pub fn write_message<W: Write>(w: &mut W, msg: &Message) -> Result<(), ProtoError> {
    let frame = encode(msg)?;
    w.write_all(&frame).map_err(ProtoError::from_io)?;
    w.flush().map_err(ProtoError::from_io)
}

/// Reads one message.
pub fn read_message<R: Read>(r: &mut R) -> Result<Message, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    read_full(r, &mut header, true)?;
    let len = parse_header(&header)?;
    let mut body = vec![0u8; len as usize];
    read_full(r, &mut body, false)?;
    decode_body(&body)
}

/// Fills `buf`; a clean end of stream before the first byte is `Closed`
/// when `at_boundary`, and `Truncated` anywhere else.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], at_boundary: bool) -> Result<(), ProtoError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && at_boundary => return Err(ProtoError::Closed),
            Ok(0) => {
                return Err(ProtoError::Truncated {
                    got,
                    want: buf.len(),
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtoError::from_io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{BootPlan, EventKind, GuestRange, VmIdentity};
    use proptest::prelude::*;

    fn event(kind: EventKind) -> Message {
        Message::Event(Event {
            vm: VmIdentity {
                vm_id: "vm-1".into(),
                image_digest: "img".into(),
                package_digest: "pkg".into(),
            },
            seq: 3,
            at_unix_ms: 1_700_000_000_000,
            kind,
        })
    }

    #[test]
    fn messages_round_trip_through_frames() {
        let msgs = [
            Message::Hello {
                peer: "labvm 0.1.0".into(),
                features: Vec::new(),
            },
            Message::Hello {
                peer: "labvm 0.2.0".into(),
                features: vec![FEATURE_INTERRUPT.into()],
            },
            Message::Reply(HookReply::Interrupt {
                reason: "make room".into(),
            }),
            Message::Reply(HookReply::Defer {
                reason: "full".into(),
                retry_after_ms: 500,
                missing_mib: 64,
            }),
            event(EventKind::BeforeBoot {
                vcpu_tids: vec![1],
                ram: GuestRange {
                    start: 0,
                    len: 1 << 26,
                },
                admission: crate::Admission::new(5, true).restarting(),
            }),
            event(EventKind::BeforeBoot {
                vcpu_tids: vec![10, 11],
                ram: GuestRange {
                    start: 0,
                    len: 1 << 30,
                },
                admission: crate::Admission::default(),
            }),
            event(EventKind::Ready {
                time_to_ready_ms: 12.5,
            }),
            Message::Reply(HookReply::Plan(BootPlan::empty())),
            Message::Reply(HookReply::Ack),
            Message::Reply(HookReply::Plan(
                BootPlan::made_by("test").with_balloon_target_mib(256),
            )),
            Message::Reply(HookReply::BalloonTarget {
                target_mib: 128,
                prefault_mib: 0,
            }),
            Message::Reply(HookReply::BalloonTarget {
                target_mib: 64,
                prefault_mib: 48,
            }),
            event(EventKind::Balloon(crate::BalloonStatus::new(1024))),
            event(EventKind::BalloonUnresponsive {
                target_mib: 256,
                actual_mib: 0,
                stalled_ms: 2000,
            }),
            Message::Error {
                message: "no".into(),
            },
        ];
        for m in msgs {
            let frame = encode(&m).unwrap();
            let back = read_message(&mut frame.as_slice()).unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn migration_additions_round_trip_and_old_migrate_events_decode() {
        use crate::event::{MigrateOutcome, MigratePhase, RunStatus};
        let run = RunStatus {
            ram_mib: 1024,
            resident_mib: 300,
            dirty_pages_per_s: Some(2000.0),
            migratable: true,
        };
        let mut balloon = crate::BalloonStatus::new(1024);
        balloon.run = Some(run.clone());
        for m in [
            Message::Hello {
                peer: "labvm".into(),
                features: vec![FEATURE_MIGRATE.into()],
            },
            event(EventKind::Poll(run)),
            event(EventKind::Balloon(balloon)),
            event(EventKind::Migrate {
                phase: MigratePhase::Aborted,
                to: Some("10.0.0.2:7001".into()),
                outcome: Some(MigrateOutcome {
                    total_ms: 400.0,
                    downtime_ms: 5.0,
                    bytes: 1 << 20,
                    error: Some("peer aborted".into()),
                }),
            }),
            Message::Reply(HookReply::Migrate {
                to: "10.0.0.2:7001".into(),
                downtime_ms: 40,
                reason: "drain".into(),
            }),
            Message::DrainRequest {
                to: vec!["10.0.0.2:7790".into()],
            },
            Message::UndrainRequest,
        ] {
            let frame = encode(&m).unwrap();
            assert_eq!(read_message(&mut frame.as_slice()).unwrap(), m);
        }
        // A migrate event from an older VMM has only its phase; a balloon
        // status without `run` decodes with none.
        let old = br#"{"type":"event","vm":{"vm_id":"a","image_digest":"i","package_digest":"p"},"seq":3,"at_unix_ms":1,"kind":{"kind":"migrate","phase":"started"}}"#;
        match decode_body(old).unwrap() {
            Message::Event(e) => assert_eq!(
                e.kind,
                EventKind::Migrate {
                    phase: MigratePhase::Started,
                    to: None,
                    outcome: None
                }
            ),
            other => panic!("{other:?}"),
        }
        let json = serde_json::to_string(&crate::BalloonStatus::new(64)).unwrap();
        assert!(!json.contains("\"run\""), "{json}");
    }

    #[test]
    fn pool_additions_round_trip_and_old_plans_decode_without_them() {
        use crate::resources::{Allocation, Resource, ResourceShort, Resources, ShortfallAction};
        let demand = Resources {
            cpu_millis: 2000,
            memory_mib: 4096,
            ..Resources::ZERO
        };
        let short = vec![ResourceShort {
            resource: Resource::Memory,
            wanted: 4096,
            free: 1024,
            short_by: 3072,
        }];
        let allocation = Allocation::new(demand, 0.9, "declared", short, ShortfallAction::Refuse);
        assert!(!allocation.admitted);
        let plan = BootPlan::made_by("test").with_allocation(allocation);
        assert!(plan.refuses_boot());
        for m in [
            Message::Reply(HookReply::Plan(plan)),
            Message::Reply(HookReply::Rejected {
                reason: "unknown VM".into(),
            }),
            Message::StatusRequest,
            Message::Status {
                status: serde_json::json!({"vms": []}),
            },
        ] {
            let frame = encode(&m).unwrap();
            assert_eq!(read_message(&mut frame.as_slice()).unwrap(), m);
        }
        // Plans from companions without a pool carry no allocation, and a
        // plan without one is not sent with an empty field.
        let old = br#"{"type":"reply","kind":"plan","made_by":"old"}"#;
        match decode_body(old).unwrap() {
            Message::Reply(HookReply::Plan(p)) => {
                assert!(p.allocation.is_none() && !p.refuses_boot());
            }
            other => panic!("{other:?}"),
        }
        let json =
            serde_json::to_string(&Message::Reply(HookReply::Plan(BootPlan::empty()))).unwrap();
        assert!(!json.contains("allocation"), "{json}");
        // A boot-lazily shortfall does not refuse.
        let lazy = BootPlan::empty().with_allocation(Allocation::new(
            demand,
            0.9,
            "x",
            vec![ResourceShort {
                resource: Resource::Cpu,
                wanted: 1,
                free: 0,
                short_by: 1,
            }],
            ShortfallAction::BootLazily,
        ));
        assert!(!lazy.refuses_boot());
    }

    #[test]
    fn balloon_target_without_prefault_is_the_v1_wire_form_both_ways() {
        let old = br#"{"type":"reply","kind":"balloon-target","target_mib":128}"#;
        let m: Message = serde_json::from_slice(old).unwrap();
        assert_eq!(
            m,
            Message::Reply(HookReply::BalloonTarget {
                target_mib: 128,
                prefault_mib: 0
            })
        );
        // With nothing to pre-fault an older VMM sees exactly what it knows.
        assert_eq!(serde_json::to_vec(&m).unwrap(), old.to_vec());
    }

    #[test]
    fn plan_without_balloon_target_decodes_as_before() {
        let old = br#"{"type":"reply","kind":"plan","made_by":"old companion"}"#;
        let m = decode_body(old).unwrap();
        assert_eq!(
            m,
            Message::Reply(HookReply::Plan(BootPlan::made_by("old companion")))
        );
        let json =
            serde_json::to_string(&Message::Reply(HookReply::Plan(BootPlan::empty()))).unwrap();
        assert!(!json.contains("balloon"), "{json}");
    }

    #[test]
    fn hello_and_before_boot_from_older_peers_decode_with_defaults() {
        let old = br#"{"type":"hello","peer":"labvm 0.1.0"}"#;
        assert_eq!(
            decode_body(old).unwrap(),
            Message::Hello {
                peer: "labvm 0.1.0".into(),
                features: Vec::new()
            }
        );
        let json = serde_json::to_string(&Message::Hello {
            peer: "p".into(),
            features: Vec::new(),
        })
        .unwrap();
        assert!(!json.contains("features"), "{json}");
        let old_bb = br#"{"type":"event","vm":{"vm_id":"a","image_digest":"i","package_digest":"p"},
            "seq":1,"at_unix_ms":0,"kind":{"kind":"before-boot","vcpu_tids":[7],"ram":{"start":0,"len":4096}}}"#;
        let Message::Event(e) = decode_body(old_bb).unwrap() else {
            panic!("not an event");
        };
        let EventKind::BeforeBoot { admission, .. } = e.kind else {
            panic!("not before-boot");
        };
        assert_eq!(admission, crate::Admission::default());
        assert_eq!(
            (
                admission.priority,
                admission.interruptible,
                admission.restart
            ),
            (0, false, false)
        );
    }

    #[test]
    fn hostile_interrupt_and_defer_replies_are_body_errors() {
        for body in [
            &br#"{"type":"reply","kind":"interrupt"}"#[..],
            br#"{"type":"reply","kind":"interrupt","reason":7}"#,
            br#"{"type":"reply","kind":"defer","reason":"x","retry_after_ms":-1,"missing_mib":0}"#,
            br#"{"type":"reply","kind":"defer","reason":"x","retry_after_ms":1e99,"missing_mib":0}"#,
            br#"{"type":"event","vm":{"vm_id":"a","image_digest":"i","package_digest":"p"},"seq":0,"at_unix_ms":0,"kind":{"kind":"before-boot","vcpu_tids":[],"ram":{"start":0,"len":1},"admission":{"priority":4294967296}}}"#,
        ] {
            assert!(
                matches!(decode_body(body), Err(ProtoError::Body(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn bad_magic_version_and_length_are_rejected() {
        let good = encode(&Message::Reply(HookReply::Ack)).unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            read_message(&mut bad.as_slice()),
            Err(ProtoError::BadMagic(_))
        ));
        let mut bad = good.clone();
        bad[4] = 9;
        assert!(matches!(
            read_message(&mut bad.as_slice()),
            Err(ProtoError::Version { got: 9 })
        ));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_message(&mut bad.as_slice()),
            Err(ProtoError::TooLarge { len: u32::MAX })
        ));
    }

    #[test]
    fn truncated_frames_and_clean_close_are_told_apart() {
        let good = encode(&Message::Reply(HookReply::Ack)).unwrap();
        assert!(matches!(
            read_message(&mut &good[..0]),
            Err(ProtoError::Closed)
        ));
        assert!(matches!(
            read_message(&mut &good[..5]),
            Err(ProtoError::Truncated { got: 5, want: 12 })
        ));
        assert!(matches!(
            read_message(&mut &good[..good.len() - 1]),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn garbage_body_is_a_body_error() {
        let mut frame = Vec::new();
        frame.extend_from_slice(&MAGIC);
        frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        frame.extend_from_slice(&0u16.to_le_bytes());
        frame.extend_from_slice(&4u32.to_le_bytes());
        frame.extend_from_slice(b"{{{{");
        assert!(matches!(
            read_message(&mut frame.as_slice()),
            Err(ProtoError::Body(_))
        ));
    }

    proptest! {
        // The decoder never panics, whatever the bytes.
        #[test]
        fn decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = read_message(&mut bytes.as_slice());
        }

        // A valid header followed by arbitrary (possibly short) body bytes.
        #[test]
        fn decoder_survives_arbitrary_bodies(len in 0u32..512, body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut frame = Vec::new();
            frame.extend_from_slice(&MAGIC);
            frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            frame.extend_from_slice(&0u16.to_le_bytes());
            frame.extend_from_slice(&len.to_le_bytes());
            frame.extend_from_slice(&body);
            let r = read_message(&mut frame.as_slice());
            if (len as usize) > body.len() {
                prop_assert!(matches!(r, Err(ProtoError::Truncated { .. })), "{r:?}");
            }
        }

        // Every prefix of a valid frame is reported as closed or truncated.
        #[test]
        fn every_prefix_is_truncated(cut in 0usize..200) {
            let frame = encode(&event(EventKind::Paused)).unwrap();
            let cut = cut.min(frame.len() - 1);
            let r = read_message(&mut &frame[..cut]);
            prop_assert!(matches!(r, Err(ProtoError::Closed | ProtoError::Truncated { .. })), "{r:?}");
        }
    }
}
