//! The thin adapter to the host: `/proc`, `sched_setaffinity` and `virsh`
//! (run as a child process with a time bound). The parsers are pure and
//! tested here; the calls are not.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::LibvirtError;
use super::domain::{MAX_CPU, parse_cpu_list};

/// True when a QEMU command line (its arguments) names this libvirt domain:
/// libvirt passes `-name guest=NAME,debug-threads=on` (commas in the name
/// doubled).
pub fn cmdline_names_guest(args: &[&str], name: &str) -> bool {
    let want = format!("guest={}", name.replace(',', ",,"));
    args.windows(2).any(|w| {
        w[0] == "-name"
            && w[1].strip_prefix(&want).is_some_and(|rest| {
                rest.is_empty() || (rest.starts_with(',') && !rest.starts_with(",,"))
            })
    })
}

/// The vCPU index of a QEMU thread named `CPU N/TCG` or `CPU N/KVM`.
pub fn vcpu_of_thread_name(comm: &str) -> Option<u32> {
    let rest = comm.trim_end().strip_prefix("CPU ")?;
    let (n, accel) = rest.split_once('/')?;
    if accel.is_empty() {
        return None;
    }
    n.parse().ok()
}

/// `Cpus_allowed_list` from a `/proc/…/status` text.
pub fn cpus_allowed(status: &str) -> Result<Vec<usize>, LibvirtError> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| LibvirtError::Proc("no Cpus_allowed_list in the status".into()))?;
    parse_cpu_list(line.trim())
}

/// `VmRSS` in KiB from a `/proc/PID/status` text (0 for a process without
/// memory, such as a zombie).
pub fn rss_kib(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time in clock ticks from a `/proc/…/stat` line.
pub fn stat_cpu_ticks(stat: &str) -> Result<u64, LibvirtError> {
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after its last ')' are fixed: state is field 3, utime 14, stime 15.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| LibvirtError::Proc("stat has no command name".into()))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| -> Result<u64, LibvirtError> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| LibvirtError::Proc("stat is too short".into()))
    };
    // `after` starts at field 3, so field N is at index N - 3.
    Ok(get(11)?.saturating_add(get(12)?))
}

/// `actual` (the balloon's current size) in KiB from `virsh dommemstat`.
pub fn dommemstat_actual_kib(out: &str) -> Option<u64> {
    out.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some("actual")).then(|| it.next()?.parse().ok())?
    })
}

/// vCPU thread ids from a QMP `query-cpus-fast` answer.
pub fn qmp_vcpu_threads(json: &str) -> Result<Vec<(u32, i32)>, LibvirtError> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| LibvirtError::Qmp(format!("query-cpus-fast answer is not JSON: {e}")))?;
    let list = v.get("return").and_then(|r| r.as_array()).ok_or_else(|| {
        LibvirtError::Qmp("query-cpus-fast answered without a return list".into())
    })?;
    list.iter()
        .map(|c| {
            let idx = c.get("cpu-index").and_then(serde_json::Value::as_u64);
            let tid = c.get("thread-id").and_then(serde_json::Value::as_i64);
            match (
                idx.and_then(|i| u32::try_from(i).ok()),
                tid.and_then(|t| i32::try_from(t).ok()),
            ) {
                (Some(i), Some(t)) if t > 0 => Ok((i, t)),
                _ => Err(LibvirtError::Qmp(format!(
                    "query-cpus-fast entry without cpu-index and thread-id: {c}"
                ))),
            }
        })
        .collect()
}

fn proc_path(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}"))
}

fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(proc_path(pid).join("cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

fn is_domain_qemu(pid: i32, name: &str) -> bool {
    cmdline(pid).is_some_and(|args| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cmdline_names_guest(&refs, name)
    })
}

/// The QEMU process of a domain: libvirt's pid file (`RUN_DIR/qemu/NAME.pid`)
/// when it names a live QEMU of this domain, otherwise a scan of `/proc`.
pub fn find_qemu_pid(run_dir: &Path, name: &str) -> Option<i32> {
    let pidfile = run_dir.join("qemu").join(format!("{name}.pid"));
    if let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|&p| p > 0 && is_domain_qemu(p, name))
    {
        return Some(pid);
    }
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .find(|&pid| is_domain_qemu(pid, name))
}

/// The vCPU threads of a QEMU process, by their names (`CPU N/TCG`), sorted
/// by vCPU index.
pub fn vcpu_threads(pid: i32) -> Vec<(u32, i32)> {
    let Ok(dir) = std::fs::read_dir(proc_path(pid).join("task")) else {
        return Vec::new();
    };
    let mut v: Vec<(u32, i32)> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let tid: i32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            Some((vcpu_of_thread_name(&comm)?, tid))
        })
        .collect();
    v.sort_unstable();
    v
}

/// The CPUs a thread may run on.
pub fn thread_cpus(tid: i32) -> Result<Vec<usize>, LibvirtError> {
    let status = std::fs::read_to_string(proc_path(tid).join("status"))
        .map_err(|e| LibvirtError::Proc(format!("cannot read /proc/{tid}/status: {e}")))?;
    cpus_allowed(&status)
}

/// CPU time (ms) and resident memory (KiB) of a process.
pub fn process_usage(pid: i32) -> Result<(f64, u64), LibvirtError> {
    let stat = std::fs::read_to_string(proc_path(pid).join("stat"))
        .map_err(|e| LibvirtError::Proc(format!("cannot read /proc/{pid}/stat: {e}")))?;
    let status = std::fs::read_to_string(proc_path(pid).join("status"))
        .map_err(|e| LibvirtError::Proc(format!("cannot read /proc/{pid}/status: {e}")))?;
    let ticks = stat_cpu_ticks(&stat)?;
    Ok((
        ticks as f64 * 1000.0 / clock_ticks_per_second(),
        rss_kib(&status),
    ))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory preconditions; _SC_CLK_TCK is a valid name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Restricts thread `tid` to `cpus`.
pub fn set_thread_cpus(tid: i32, cpus: &[usize]) -> Result<(), LibvirtError> {
    if cpus.is_empty() || cpus.iter().any(|&c| c > MAX_CPU) {
        return Err(LibvirtError::Affinity {
            tid,
            why: format!("CPU set {cpus:?} is empty or out of range"),
        });
    }
    // SAFETY: cpu_set_t is plain data (an array of integers); all zeros is
    // the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: `c` is at most MAX_CPU (checked above), inside the
        // 1024-bit set; CPU_SET only writes that bit of `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a live, initialised cpu_set_t and the size passed is
    // its own; the kernel only reads it. A tid that no longer exists or that
    // we may not change is reported through the return value.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(LibvirtError::Affinity {
            tid,
            why: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(())
}

/// The CPUs this process may run on (the daemon's own set).
pub fn own_cpus() -> Result<Vec<usize>, LibvirtError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| LibvirtError::Proc(format!("cannot read /proc/self/status: {e}")))?;
    cpus_allowed(&status)
}

/// `virsh` with a connection URI, each call bounded in time.
#[derive(Clone, Debug)]
pub struct Virsh {
    /// The program.
    pub program: PathBuf,
    /// The connection URI (`qemu:///system`).
    pub uri: String,
    /// Longest a call may take.
    pub timeout: Duration,
}

impl Virsh {
    /// Runs `virsh -c URI ARGS…`; its standard output, or an error with
    /// what it wrote to standard error.
    pub fn run(&self, args: &[&str]) -> Result<String, LibvirtError> {
        let what = args.first().copied().unwrap_or("").to_string();
        let fail = |why: String| LibvirtError::Virsh {
            command: what.clone(),
            why,
        };
        let mut child = Command::new(&self.program)
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", self.program.display())))?;
        let reader = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_string(&mut s);
                }
                s
            })
        };
        let out = reader(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let err = reader(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(LibvirtError::VirshTimeout {
                        command: what,
                        secs: self.timeout.as_secs(),
                    });
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        };
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        if status.success() {
            Ok(out)
        } else {
            Err(fail(format!("{status}: {}", err.trim())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_name_matches_libvirt_command_lines() {
        let args = [
            "qemu-system-x86_64",
            "-name",
            "guest=web-1,debug-threads=on",
            "-S",
        ];
        assert!(cmdline_names_guest(&args, "web-1"));
        assert!(!cmdline_names_guest(&args, "web"));
        assert!(!cmdline_names_guest(&args, "web-10"));
        let args = ["qemu", "-name", "guest=a,,b,debug-threads=on"];
        assert!(cmdline_names_guest(&args, "a,b"));
        assert!(!cmdline_names_guest(&args, "a"));
        assert!(cmdline_names_guest(&["qemu", "-name", "guest=x"], "x"));
        assert!(!cmdline_names_guest(&["qemu", "guest=x"], "x"));
    }

    #[test]
    fn vcpu_thread_names_parse() {
        assert_eq!(vcpu_of_thread_name("CPU 0/TCG\n"), Some(0));
        assert_eq!(vcpu_of_thread_name("CPU 12/KVM"), Some(12));
        assert_eq!(vcpu_of_thread_name("qemu-system-x86"), None);
        assert_eq!(vcpu_of_thread_name("CPU x/TCG"), None);
        assert_eq!(vcpu_of_thread_name("CPU 1/"), None);
    }

    #[test]
    fn proc_texts_parse() {
        let status = "Name:\tqemu\nVmRSS:\t  123456 kB\nCpus_allowed_list:\t0-1,4\n";
        assert_eq!(cpus_allowed(status).unwrap(), [0, 1, 4]);
        assert_eq!(rss_kib(status), 123_456);
        assert_eq!(rss_kib("Name: z\n"), 0);
        assert!(cpus_allowed("Name: x\n").is_err());
        let stat =
            "42 (qemu (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 70 0 0 20 0 5 0 100 1000 200";
        assert_eq!(stat_cpu_ticks(stat).unwrap(), 320);
        assert!(stat_cpu_ticks("42 (x) S 1").is_err());
        assert!(stat_cpu_ticks("garbage").is_err());
    }

    #[test]
    fn dommemstat_and_qmp_answers_parse() {
        assert_eq!(
            dommemstat_actual_kib("actual 262144\nrss 300000\n"),
            Some(262_144)
        );
        assert_eq!(dommemstat_actual_kib("rss 1\n"), None);
        let qmp = r#"{"return":[{"cpu-index":0,"thread-id":101,"props":{}},{"cpu-index":1,"thread-id":102}],"id":"x"}"#;
        assert_eq!(qmp_vcpu_threads(qmp).unwrap(), [(0, 101), (1, 102)]);
        assert!(qmp_vcpu_threads("{\"return\":[{\"cpu-index\":0}]}").is_err());
        assert!(qmp_vcpu_threads("{\"error\":{}}").is_err());
        assert!(qmp_vcpu_threads("nope").is_err());
    }

    #[test]
    fn own_threads_can_be_read_and_pinned_to_their_own_set() {
        let cpus = own_cpus().unwrap();
        assert!(!cpus.is_empty());
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        // Pinning a thread to the set it already has changes nothing.
        set_thread_cpus(tid, &cpus).unwrap();
        assert_eq!(thread_cpus(tid).unwrap(), cpus);
        assert!(set_thread_cpus(tid, &[]).is_err());
    }
}
