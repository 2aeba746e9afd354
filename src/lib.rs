//! Prescient, the companion daemon and command line.
//!
//! The daemon listens on the hooks socket (see `vmm_hooks::proto`), receives
//! each VM's lifecycle events from its VMM and answers before-boot events
//! with a boot plan. This crate holds the daemon's parts; the binary
//! `prescient` wires them to a command line.

mod server;

pub use server::{EventRecord, HooksServer, ServeError, ServerConfig};
