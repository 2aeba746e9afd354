//! The contract between a VMM and the Prescient companion.
//!
//! A VMM reports each VM's lifecycle as [`Event`]s (created, before-boot,
//! ready, paused, resumed, interrupted, restarted, stopped, and snapshot,
//! restore and migrate phases), or, on a libvirt host, the calls of
//! libvirt's QEMU hook ([`LibvirtHookCall`]). Before boot the companion answers with a
//! [`BootPlan`]; after bootstrap the VMM sends a [`BootReport`] of what the
//! guest really did.
//!
//! Two ways to connect: link a [`LifecycleHook`] into the VMM (in-process),
//! or speak the framed, versioned socket protocol ([`proto`]) to the
//! companion daemon through [`SocketHook`], which times out and falls back
//! to "no plan" so that a VM never fails to start because the companion is
//! down or slow.
//!
//! This crate holds data types, the codec and a blocking client. It has no
//! policy and no async runtime; the companion's server lives in `prescient`.

mod client;
mod event;
pub mod proto;
mod resources;

pub use client::{SocketHook, SocketHookConfig};
pub use event::{
    Admission, BalloonStatus, BootPlan, BootProfile, BootReport, Event, EventKind, GuestRange,
    HookReply, LibvirtDomain, LibvirtHookCall, LibvirtOperation, LibvirtPrescientSettings,
    LifecycleHook, MigrateOutcome, MigratePhase, NoCompanion, PrefaultMode, PrefaultPlan,
    PrefaultReport, ProfileRequest, RunStatus, StopStatus, TouchWindow, VmIdentity, VmSpec,
};
pub use proto::{Message, PROTOCOL_VERSION, ProtoError};
pub use resources::{Allocation, Resource, ResourceShort, Resources, ShortfallAction};

/// An error and its sources on one line (`outer: inner: innermost`), for
/// messages that reach an operator.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
