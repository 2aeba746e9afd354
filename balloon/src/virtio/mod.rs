//! Virtio plumbing shared by the device model and the transport: the
//! device trait the virtio-mmio transport drives, status and feature bits,
//! and a rate limiter for logs a guest can trigger.
//!
//! The device model (`balloon.rs`) knows virtqueues and its configuration
//! space; the transport (`mmio.rs`) knows registers and the status state
//! machine. Neither knows the companion's policy.

pub(crate) mod balloon;
pub(crate) mod mmio;
pub(crate) mod queue;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and ready.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The guest gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// `VIRTIO_F_VERSION_1`: a virtio 1.x (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Why a device needs a reset (the transport sets `DEVICE_NEEDS_RESET`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFault(pub String);

/// A virtio device as the transport sees it. One implementation today (the
/// balloon); the transport is written against this so that it knows
/// registers and nothing of ballooning.
pub trait VirtioDevice: Send {
    /// Virtio device id (5: memory balloon).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers.
    fn offered_features(&self) -> u64;
    /// The device's virtqueues, by index.
    fn queues_mut(&mut self) -> &mut [Queue];
    /// Reads `data.len()` bytes of configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes configuration space; returns false when the write was refused.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool;
    /// The driver set DRIVER_OK with these negotiated features.
    fn activate(&mut self, features: u64, mem: &GuestMemoryMmap) -> Result<(), DeviceFault>;
    /// The driver notified queue `index` (only after activation).
    fn queue_notify(&mut self, index: usize, mem: &GuestMemoryMmap) -> Result<(), DeviceFault>;
    /// Takes the interrupt causes the device raised since the last call
    /// (`INT_VRING`, `INT_CONFIG`).
    fn take_interrupts(&mut self) -> u32;
    /// Device reset (the driver wrote 0 to Status): back to the initial state.
    fn reset(&mut self);
}

/// Interrupt status bits of virtio-mmio.
pub mod interrupt {
    use virtio_bindings::virtio_mmio as m;
    /// A used buffer was added to a queue.
    pub const VRING: u32 = m::VIRTIO_MMIO_INT_VRING;
    /// The configuration changed.
    pub const CONFIG: u32 = m::VIRTIO_MMIO_INT_CONFIG;
}

/// Rate limiter for logs that a guest can trigger at will: the first eight
/// occurrences of each kind are logged, then only the 16th, 32nd, 64th, ...
#[derive(Clone, Debug, Default)]
pub(crate) struct LogLimiter {
    count: u64,
}

impl LogLimiter {
    /// Counts one occurrence; true when it should be logged.
    pub(crate) fn hit(&mut self) -> bool {
        self.count = self.count.saturating_add(1);
        self.count <= 8 || self.count.is_power_of_two()
    }

    /// Occurrences so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_logs_first_eight_then_powers_of_two() {
        let mut l = LogLimiter::default();
        let logged: Vec<u64> = (1..=100u64).filter(|_| l.hit()).collect();
        assert_eq!(logged, vec![1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]);
    }
}
