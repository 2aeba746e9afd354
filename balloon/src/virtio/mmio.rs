//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): the register
//! file a driver reads and writes, the device status state machine, feature
//! negotiation and queue setup. It knows nothing of what the device does.
//!
//! Guest writes in the wrong state (queue setup after DRIVER_OK, features
//! after FEATURES_OK, notifications before DRIVER_OK, sizes past the
//! maximum) are refused with a rate-limited warning; a queue that cannot
//! be used, or a device fault, sets `DEVICE_NEEDS_RESET` and raises a
//! configuration-change interrupt, after which the device ignores
//! notifications until the driver resets it. Interrupts are recorded in
//! InterruptStatus only: lab guests run at CPL3 without interrupts and poll.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::{LogLimiter, VIRTIO_F_VERSION_1, VirtioDevice, interrupt, status};

/// Size of the register window of one virtio-mmio device.
pub const MMIO_WINDOW: u64 = 0x1000;

/// Register offsets (virtio 1.2, 4.2.2).
pub mod reg {
    /// "virt" (0x74726976).
    pub const MAGIC: u64 = 0x000;
    /// 2.
    pub const VERSION: u64 = 0x004;
    /// Virtio device id.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Offered features, 32 bits selected by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32 feature bits `DEVICE_FEATURES` shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Accepted features, 32 bits selected by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32 feature bits `DRIVER_FEATURES` sets.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue the queue registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size the driver chose.
    pub const QUEUE_NUM: u64 = 0x038;
    /// The selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Notification: the value is the queue index.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt causes.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Driver (available) ring address, low.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Driver (available) ring address, high.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Device (used) ring address, low.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Device (used) ring address, high.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Shared memory region selector.
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory region length, low (all ones: no such region).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Shared memory region base, low.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Shared memory region base, high.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Changes whenever the configuration space changes.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Device configuration space starts here.
    pub const CONFIG: u64 = 0x100;
}

/// "virt", little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Vendor id reported by our devices ("PRSC").
pub const VENDOR_PRESCIENT: u32 = 0x4353_5250;

/// The plain state of the transport.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Device status register.
    pub status: u32,
    /// Selected device feature word.
    pub device_features_sel: u32,
    /// Selected driver feature word.
    pub driver_features_sel: u32,
    /// Features the driver accepted so far.
    pub driver_features: u64,
    /// Selected queue.
    pub queue_sel: u32,
    /// Pending interrupt causes.
    pub interrupt_status: u32,
    /// Configuration generation counter.
    pub config_generation: u32,
}

/// A virtio device behind its virtio-mmio registers.
#[derive(Debug)]
pub struct MmioTransport<D> {
    device: D,
    state: MmioState,
    refused: LogLimiter,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind a fresh register file.
    pub fn new(device: D) -> Self {
        MmioTransport {
            device,
            state: MmioState::default(),
            refused: LogLimiter::default(),
        }
    }

    /// Rebuilds a transport from its state around a restored device.
    pub fn from_state(device: D, state: MmioState) -> Self {
        MmioTransport {
            device,
            state,
            refused: LogLimiter::default(),
        }
    }

    /// The transport's state.
    pub fn state(&self) -> MmioState {
        self.state.clone()
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably. Call [`Self::collect_interrupts`] after acting
    /// on it so that the causes it raised become visible to the driver.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Moves the interrupt causes the device raised into InterruptStatus;
    /// a configuration change also bumps ConfigGeneration.
    pub fn collect_interrupts(&mut self) {
        let raised = self.device.take_interrupts();
        if raised & interrupt::CONFIG != 0 {
            self.state.config_generation = self.state.config_generation.wrapping_add(1);
        }
        self.state.interrupt_status |= raised;
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.state.status
    }

    /// True once the driver set DRIVER_OK and the device does not need a reset.
    pub fn driver_ok(&self) -> bool {
        self.state.status & status::DRIVER_OK != 0
            && self.state.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// True when the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.state.status & status::DEVICE_NEEDS_RESET != 0
    }

    fn refuse(&mut self, what: &str, offset: u64, value: u64) {
        if self.refused.hit() {
            tracing::warn!(
                offset,
                value,
                status = self.state.status,
                refused = self.refused.count(),
                "virtio-mmio: guest {what}; ignored"
            );
        }
    }

    fn set_needs_reset(&mut self, why: &str) {
        if self.state.status & status::DEVICE_NEEDS_RESET == 0 {
            tracing::warn!("virtio-mmio: device needs reset: {why}");
        }
        self.state.status |= status::DEVICE_NEEDS_RESET;
        if self.state.status & status::DRIVER_OK != 0 {
            self.state.interrupt_status |= interrupt::CONFIG;
        }
    }

    fn selected_queue(&mut self) -> Option<&mut virtio_queue::Queue> {
        let sel = self.state.queue_sel as usize;
        self.device.queues_mut().get_mut(sel)
    }

    /// Whether queue registers may be written now (after FEATURES_OK,
    /// before DRIVER_OK, on an existing queue that is not ready yet).
    fn queue_setup_allowed(&mut self) -> bool {
        let s = self.state.status;
        s & status::FEATURES_OK != 0
            && s & (status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET) == 0
            && self.selected_queue().is_some_and(|q| !q.ready())
    }

    /// A driver read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_PRESCIENT,
            reg::DEVICE_FEATURES => match self.state.device_features_sel {
                0 => low32(self.device.offered_features()),
                1 => low32(self.device.offered_features() >> 32),
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => u32::from(self.selected_queue().is_some_and(|q| q.ready())),
            reg::INTERRUPT_STATUS => {
                self.collect_interrupts();
                self.state.interrupt_status
            }
            reg::STATUS => self.state.status,
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => {
                self.collect_interrupts();
                self.state.config_generation
            }
            _ => 0,
        };
        // Registers are 32 bits wide; narrower or wider reads get the
        // corresponding bytes (and zeros past them).
        data.fill(0);
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A driver write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) {
        if offset >= reg::CONFIG {
            if !self.device.write_config(offset - reg::CONFIG, data) {
                self.refuse("config write refused", offset, 0);
            }
            self.collect_interrupts();
            return;
        }
        if data.len() != 4 {
            self.refuse("register write that is not 32 bits wide", offset, 0);
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let s = self.state.status;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.state.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.state.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if s & status::DRIVER == 0 || s & status::FEATURES_OK != 0 {
                    self.refuse("wrote features outside negotiation", offset, v.into());
                    return;
                }
                match self.state.driver_features_sel {
                    0 => {
                        self.state.driver_features =
                            (self.state.driver_features & !0xFFFF_FFFF) | u64::from(v);
                    }
                    1 => {
                        self.state.driver_features =
                            (self.state.driver_features & 0xFFFF_FFFF) | (u64::from(v) << 32);
                    }
                    _ => self.refuse(
                        "selected a feature word that does not exist",
                        offset,
                        v.into(),
                    ),
                }
            }
            reg::QUEUE_SEL => self.state.queue_sel = v,
            reg::QUEUE_NUM => {
                if !self.queue_setup_allowed() {
                    self.refuse("set a queue size outside queue setup", offset, v.into());
                    return;
                }
                let size = u16::try_from(v).ok();
                let ok = match (size, self.selected_queue()) {
                    (Some(size), Some(q)) => q.try_set_size(size).is_ok(),
                    _ => false,
                };
                if !ok {
                    self.set_needs_reset(&format!(
                        "queue {} size {v} is zero, not a power of two or past the maximum",
                        self.state.queue_sel
                    ));
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if !self.queue_setup_allowed() {
                    self.refuse("set a queue address outside queue setup", offset, v.into());
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    return;
                };
                let set = |cur: u64, high: bool| -> u64 {
                    if high {
                        (cur & 0xFFFF_FFFF) | (u64::from(v) << 32)
                    } else {
                        (cur & !0xFFFF_FFFF) | u64::from(v)
                    }
                };
                let high = offset & 4 != 0;
                let result = match offset {
                    reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => q.try_set_desc_table_address(
                        vm_memory::GuestAddress(set(q.desc_table(), high)),
                    ),
                    reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => q.try_set_avail_ring_address(
                        vm_memory::GuestAddress(set(q.avail_ring(), high)),
                    ),
                    _ => q.try_set_used_ring_address(vm_memory::GuestAddress(set(
                        q.used_ring(),
                        high,
                    ))),
                };
                if result.is_err() {
                    self.set_needs_reset(&format!(
                        "queue {} ring address is misaligned",
                        self.state.queue_sel
                    ));
                }
            }
            reg::QUEUE_READY => {
                if v == 1 {
                    if !self.queue_setup_allowed() {
                        self.refuse("made a queue ready outside queue setup", offset, 1);
                        return;
                    }
                    let sel = self.state.queue_sel;
                    let Some(q) = self.selected_queue() else {
                        return;
                    };
                    q.set_ready(true);
                    if !q.is_valid(mem) {
                        q.set_ready(false);
                        self.set_needs_reset(&format!(
                            "queue {sel} rings are not inside guest RAM"
                        ));
                    }
                } else if v == 0 {
                    // Virtio 1.2 without VIRTIO_F_RING_RESET: a ready queue
                    // may not be disabled except by a device reset.
                    if self.selected_queue().is_some_and(|q| q.ready()) {
                        self.refuse("disabled a ready queue without a reset", offset, 0);
                    }
                } else {
                    self.refuse(
                        "wrote a QueueReady value other than 0 or 1",
                        offset,
                        v.into(),
                    );
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v, mem),
            reg::INTERRUPT_ACK => self.state.interrupt_status &= !v,
            reg::STATUS => self.write_status(v, mem),
            reg::SHM_SEL => {}
            _ => self.refuse("wrote a read-only or unknown register", offset, v.into()),
        }
    }

    fn notify(&mut self, index: u32, mem: &GuestMemoryMmap) {
        if !self.driver_ok() {
            self.refuse(
                "notified a queue before DRIVER_OK (or while it needs reset)",
                reg::QUEUE_NOTIFY,
                index.into(),
            );
            return;
        }
        let i = index as usize;
        if !self.device.queues_mut().get(i).is_some_and(|q| q.ready()) {
            self.refuse(
                "notified a queue that does not exist or is not ready",
                reg::QUEUE_NOTIFY,
                index.into(),
            );
            return;
        }
        if let Err(fault) = self.device.queue_notify(i, mem) {
            self.set_needs_reset(&fault.0);
        }
        self.collect_interrupts();
    }

    fn write_status(&mut self, v: u32, mem: &GuestMemoryMmap) {
        if v == 0 {
            self.device.reset();
            let generation = self.state.config_generation;
            self.state = MmioState {
                config_generation: generation.wrapping_add(1),
                ..MmioState::default()
            };
            return;
        }
        let old = self.state.status;
        // The driver may only add bits, and only the ones it owns
        // (NEEDS_RESET is the device's; reserved bits are dropped).
        let v = v
            & (status::ACKNOWLEDGE
                | status::DRIVER
                | status::FEATURES_OK
                | status::DRIVER_OK
                | status::FAILED);
        if v & old != old & !status::DEVICE_NEEDS_RESET {
            self.refuse("cleared status bits without a reset", reg::STATUS, v.into());
            return;
        }
        let added = v & !old;
        let order_ok = (added & status::DRIVER == 0 || v & status::ACKNOWLEDGE != 0)
            && (added & status::FEATURES_OK == 0 || v & status::DRIVER != 0)
            && (added & status::DRIVER_OK == 0 || v & status::FEATURES_OK != 0);
        if !order_ok {
            self.refuse("set status bits out of order", reg::STATUS, v.into());
            return;
        }
        let mut new = v | (old & status::DEVICE_NEEDS_RESET);
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.offered_features();
            let f = self.state.driver_features;
            let valid = f & !offered == 0 && f & (1 << VIRTIO_F_VERSION_1) != 0;
            if !valid {
                // The driver reads Status back and finds FEATURES_OK clear
                // (and no DRIVER_OK that may have come in the same write).
                new &= !(status::FEATURES_OK | status::DRIVER_OK);
                self.refuse(
                    "accepted features the device does not offer (or not VERSION_1)",
                    reg::STATUS,
                    f,
                );
            }
        }
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK != 0 {
            let features = self.state.driver_features;
            self.state.status = new;
            if let Err(fault) = self.device.activate(features, mem) {
                self.set_needs_reset(&fault.0);
            }
            self.collect_interrupts();
            return;
        }
        self.state.status = new;
    }
}

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xFFFF_FFFF).unwrap_or(0)
}
