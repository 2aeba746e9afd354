//! The binder names missing cgroup controllers once, not once per VM.
//!
//! Its own test binary with this one test: the log is captured with a
//! scoped tracing subscriber, and tracing caches each log callsite's
//! interest process-wide, so another test thread that reached the same
//! callsite first (with no subscriber) could make this one see nothing.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use numa::{CgroupBinder, CgroupLayout, CgroupSettings};

const MOUNTINFO: &str = "\
25 1 0:23 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:24 / /nonexistent/cgroup/cpu rw,relatime shared:2 - cgroup cgroup rw,cpu
27 25 0:25 / /nonexistent/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
28 25 0:26 / /nonexistent/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
29 25 0:27 / /nonexistent/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
30 25 0:28 / /nonexistent/unified rw,relatime - cgroup2 cgroup2 rw
";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl tracing_subscriber::fmt::MakeWriter<'_> for Captured {
    type Writer = Self;
    fn make_writer(&self) -> Self {
        self.clone()
    }
}

#[test]
fn missing_controllers_are_reported_once_not_per_vm() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let b = CgroupBinder::new(CgroupLayout::from_mountinfo(MOUNTINFO), "prescient");
        let settings = CgroupSettings {
            io_weight: Some(100),
            ..CgroupSettings::default()
        };
        for vm in ["a", "b", "c"] {
            // v1 blkio here is a path without a weight file: skipped.
            let out = b.apply(vm, &settings).unwrap();
            assert_eq!(out.skipped.len(), 1);
        }
    });
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("WARN"), "{text}");
    assert!(
        lines[0].contains("v2 io missing, using cgroup v1 blkio"),
        "{text}"
    );
}
