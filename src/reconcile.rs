//! At start, which of the VMs the store remembers still exist.
//!
//! - A VM reported by a VMM on the hooks socket (labvm) exists while its
//!   VMM process does: the pid comes from the socket's peer credentials
//!   (`SO_PEERCRED`) when it booted, and the process's start time
//!   (`/proc/PID/stat`) must match, so a reused pid is not taken for it.
//! - A libvirt domain exists while its QEMU process does (libvirt's pid
//!   file `RUN_DIR/qemu/NAME.pid`, checked against the process's
//!   `-name guest=NAME`, else a scan of `/proc`). No `virsh` call: the
//!   daemon may start before libvirtd, and a QEMU process is what holds the
//!   resources.
//!
//! A record whose last event was `stopped` is not in the store at all (it
//! is deleted then), so every record is of a VM that was running.

use std::path::Path;

use crate::store::{VmRecord, VmSource};

/// The start time of a process, in clock ticks since boot (field 22 of
/// `/proc/PID/stat`); `None` when there is no such process.
pub fn process_start(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_start_time(&stat)
}

/// Field 22 (`starttime`) of a `/proc/PID/stat` line. The command name
/// (field 2) is in parentheses and may hold spaces and parentheses, so
/// fields are counted from the last `)`.
pub fn stat_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')': field 3 (state) is the first; starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Ok when the VM still exists; otherwise why it is taken for gone.
pub fn still_exists(rec: &VmRecord, libvirt_run_dir: &Path) -> Result<(), String> {
    match rec.source {
        VmSource::Vmm => {
            let Some(pid) = rec.pid else {
                return Err("no VMM process id was recorded".into());
            };
            match process_start(pid) {
                None => Err(format!("its VMM process {pid} has exited")),
                Some(start) if rec.pid_start.is_some_and(|s| s != start) => Err(format!(
                    "process {pid} is another process now (start time {start}, the VMM's was {})",
                    rec.pid_start.unwrap_or(0)
                )),
                Some(_) => Ok(()),
            }
        }
        VmSource::Libvirt => crate::libvirt::find_qemu_pid(libvirt_run_dir, &rec.vm_id)
            .map(|_| ())
            .ok_or_else(|| {
                format!(
                    "no QEMU process of the domain (pid file under {})",
                    libvirt_run_dir.join("qemu").display()
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let line = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 12345678 300";
        assert_eq!(stat_start_time(line), Some(987_654));
        assert_eq!(stat_start_time("garbage"), None);
        let own = i32::try_from(std::process::id()).unwrap();
        let a = process_start(own).unwrap();
        assert_eq!(process_start(own), Some(a));
        assert_eq!(process_start(-1), None);
    }
}
