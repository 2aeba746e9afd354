//! RDMA verbs through rdma-sys (cargo feature `rdma`).
//!
//! What exists: listing the host's RDMA devices with `ibv_get_device_list`,
//! and [`TransportError::NoRdmaDevice`] where there are none (as on every
//! machine this project has run on so far).
//!
//! What is not written yet: the data path (an RC queue pair set up over the
//! TCP control connection, the destination's guest RAM registered as one
//! memory region, page runs moved with RDMA WRITE WITH IMMEDIATE so that
//! `wait_pages` counts completions). Until it is, [`open`] refuses with
//! [`TransportError::RdmaDataPathUnwritten`] on hosts that do have a device,
//! instead of pretending.

use std::ffi::CStr;

use crate::TransportError;

/// Names of the RDMA devices on this host (e.g. `mlx5_0`, `rxe0`).
pub fn list_devices() -> Result<Vec<String>, TransportError> {
    let mut n: i32 = 0;
    // SAFETY: `n` is a valid out-pointer for the device count; the list the
    // call returns is freed below with ibv_free_device_list.
    let list = unsafe { rdma_sys::ibv_get_device_list(&mut n) };
    if list.is_null() {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // ENOSYS: the verbs library found no kernel support at all.
        return if errno == ENOSYS || errno == 0 {
            Ok(Vec::new())
        } else {
            Err(TransportError::Rdma {
                op: "ibv_get_device_list",
                errno,
            })
        };
    }
    let count = usize::try_from(n).unwrap_or(0);
    let mut names = Vec::with_capacity(count);
    for i in 0..count {
        // SAFETY: `list` holds `count` device pointers (ibv_get_device_list's
        // contract), so offset `i < count` stays inside the array.
        let slot = unsafe { list.add(i) };
        // SAFETY: `slot` points at element `i` of the live array (above).
        let dev = unsafe { *slot };
        if dev.is_null() {
            continue;
        }
        // SAFETY: `dev` is a live device from the list, not yet freed.
        let name = unsafe { rdma_sys::ibv_get_device_name(dev) };
        if !name.is_null() {
            // SAFETY: ibv_get_device_name returns a NUL-terminated string
            // owned by the device, valid until the list is freed below.
            let s = unsafe { CStr::from_ptr(name) };
            names.push(s.to_string_lossy().into_owned());
        }
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once; no
    // device pointer from it is used afterwards.
    unsafe { rdma_sys::ibv_free_device_list(list) };
    Ok(names)
}

/// Linux's ENOSYS: the verbs library found no kernel RDMA support.
const ENOSYS: i32 = 38;

/// Opens an RDMA migration channel: [`TransportError::NoRdmaDevice`] where
/// the host has none; on hosts with a device, the data path is not written
/// yet (see the module notes).
pub fn open() -> Result<std::convert::Infallible, TransportError> {
    let devices = list_devices()?;
    if devices.is_empty() {
        return Err(TransportError::NoRdmaDevice);
    }
    tracing::info!(?devices, "RDMA devices found");
    Err(TransportError::RdmaDataPathUnwritten { devices })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hw_rdma_open_on_a_host_without_devices_says_so() {
        match list_devices() {
            Ok(d) if d.is_empty() => {
                // CI on an RDMA host sets PRESCIENT_REQUIRE=rdma: no device is a failure there.
                assert!(
                    !std::env::var("PRESCIENT_REQUIRE")
                        .is_ok_and(|v| v.split(',').any(|r| r.trim() == "rdma")),
                    "RDMA required (PRESCIENT_REQUIRE) but no device found"
                );
                assert!(matches!(open(), Err(TransportError::NoRdmaDevice)));
            }
            Ok(d) => assert!(matches!(
                open(),
                Err(TransportError::RdmaDataPathUnwritten { devices }) if devices == d
            )),
            Err(e) => panic!("listing RDMA devices failed: {e}"),
        }
    }
}
