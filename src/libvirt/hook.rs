//! The hook side: `prescient libvirt-hook`, which libvirt runs as
//! `/etc/libvirt/hooks/qemu DOMAIN OPERATION SUB-OPERATION EXTRA` with the
//! domain XML on standard input.
//!
//! It reads the XML (bounded in size and time), reads what it can from it,
//! forwards one event to the daemon over the hooks socket, and returns
//! within a bound whatever the daemon does. It never calls libvirt (libvirt
//! holds the domain's lock while the hook runs; a call back into it would
//! deadlock) and never writes to standard output (for `migrate` and
//! `restore`, libvirt takes anything written there as a replacement domain
//! XML).

use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmm_hooks::{Event, EventKind, LibvirtHookCall, LifecycleHook, SocketHook, SocketHookConfig};

use super::LibvirtError;
use super::domain::{MAX_DOMAIN_XML, identity, parse_domain};

/// The peer name the hook gives in `hello`.
pub const HOOK_PEER: &str = concat!("prescient-libvirt-hook ", env!("CARGO_PKG_VERSION"));

/// The four arguments libvirt passes to a QEMU hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookArgs {
    /// The domain's name.
    pub domain: String,
    /// The operation (`prepare`, `start`, `started`, …).
    pub operation: String,
    /// `begin` or `end` (or `-`).
    pub sub_operation: String,
    /// Extra (or `-`).
    pub extra: String,
}

impl HookArgs {
    /// Reads libvirt's arguments; anything but four non-empty arguments is
    /// an error naming what arrived.
    pub fn parse(args: &[String]) -> Result<HookArgs, LibvirtError> {
        match args {
            [domain, op, sub, extra] if !domain.is_empty() && !op.is_empty() => Ok(HookArgs {
                domain: domain.clone(),
                operation: op.clone(),
                sub_operation: sub.clone(),
                extra: extra.clone(),
            }),
            _ => Err(LibvirtError::HookArgs(format!(
                "expected DOMAIN OPERATION SUB-OPERATION EXTRA, got {} argument(s) {args:?}",
                args.len()
            ))),
        }
    }
}

/// How the hook reaches the daemon.
#[derive(Clone, Debug)]
pub struct HookConfig {
    /// The daemon's hooks socket.
    pub socket: PathBuf,
    /// The whole call's bound: reading the XML, connecting, sending and
    /// waiting for the reply together.
    pub timeout: Duration,
}

/// What one hook call did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookOutcome {
    /// The daemon acknowledged the event.
    Delivered,
    /// The daemon could not be reached or did not answer in time; the call
    /// changed nothing.
    DaemonUnavailable,
}

/// Builds the event for one call: the XML is read and checked here, and a
/// bad XML is named in the event (and changes nothing in the daemon).
pub fn build_event(args: &HookArgs, xml: Result<String, LibvirtError>) -> (Event, Option<String>) {
    let (xml, read_error) = match xml {
        Ok(x) => (x, None),
        Err(e) => (String::new(), Some(e.to_string())),
    };
    let mut call = LibvirtHookCall::new(
        &args.operation,
        &args.sub_operation,
        &args.extra,
        String::new(),
    );
    let mut problem = read_error;
    if problem.is_none() {
        match parse_domain(&xml) {
            Ok(d) if d.name == args.domain => call.domain = Some(d),
            Ok(d) => {
                problem = Some(format!(
                    "the domain XML names {:?}, but libvirt called the hook for {:?}",
                    d.name, args.domain
                ));
            }
            Err(e) => problem = Some(e.to_string()),
        }
    }
    call.xml_error.clone_from(&problem);
    let vm = identity(&args.domain, &xml);
    call.domain_xml = xml;
    let event = Event {
        vm,
        seq: 0,
        at_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
        kind: EventKind::Libvirt(Box::new(call)),
    };
    (event, problem)
}

/// Reads all of `input` up to [`MAX_DOMAIN_XML`] bytes, giving up after
/// `timeout` (the reader thread is left behind; the hook process exits
/// soon after).
pub fn read_bounded<R: Read + Send + 'static>(
    mut input: R,
    timeout: Duration,
) -> Result<String, LibvirtError> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("hook-stdin".into())
        .spawn(move || {
            let mut buf = Vec::new();
            let limit = u64::try_from(MAX_DOMAIN_XML).unwrap_or(u64::MAX) + 1;
            let r = (&mut input).take(limit).read_to_end(&mut buf).map(|_| buf);
            let _ = tx.send(r);
        })
        .map_err(|e| LibvirtError::Stdin(e.to_string()))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(buf)) if buf.len() > MAX_DOMAIN_XML => Err(LibvirtError::DomainXml(format!(
            "more than the limit of {MAX_DOMAIN_XML} bytes on standard input"
        ))),
        Ok(Ok(buf)) => String::from_utf8(buf)
            .map_err(|_| LibvirtError::DomainXml("standard input is not UTF-8".into())),
        Ok(Err(e)) => Err(LibvirtError::Stdin(e.to_string())),
        Err(_) => Err(LibvirtError::Stdin(format!(
            "no end of input within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// Runs one hook call: reads the XML from `input`, forwards the event, and
/// returns within about `config.timeout` whatever happens.
pub fn run_hook<R: Read + Send + 'static>(
    args: &HookArgs,
    input: R,
    config: &HookConfig,
) -> (HookOutcome, Option<String>) {
    let start = Instant::now();
    // Half of the bound for the XML, the rest for the daemon.
    let xml = read_bounded(input, config.timeout / 2);
    let (event, problem) = build_event(args, xml);
    let left = config
        .timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(50));
    (forward(event, &config.socket, left), problem)
}

/// Sends one event and waits for its reply, for at most `bound` in all.
fn forward(event: Event, socket: &std::path::Path, bound: Duration) -> HookOutcome {
    let (tx, rx) = mpsc::channel();
    let mut cfg = SocketHookConfig::new(socket, HOOK_PEER);
    // SocketHook bounds connect, write and read each by its timeout; a third
    // of the bound each keeps the sum within it, and the watchdog below holds
    // the bound whatever happens.
    cfg.timeout = (bound / 3).max(Duration::from_millis(20));
    let spawned = std::thread::Builder::new()
        .name("hook-forward".into())
        .spawn(move || {
            let mut hook = SocketHook::new(cfg);
            let _reply = hook.on_event(&event);
            let _ = tx.send(hook.is_connected());
        });
    if spawned.is_err() {
        return HookOutcome::DaemonUnavailable;
    }
    match rx.recv_timeout(bound) {
        Ok(true) => HookOutcome::Delivered,
        _ => HookOutcome::DaemonUnavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(domain: &str, op: &str) -> HookArgs {
        HookArgs::parse(&[domain.into(), op.into(), "begin".into(), "-".into()]).unwrap()
    }

    #[test]
    fn hook_arguments_must_be_four() {
        assert!(HookArgs::parse(&[]).is_err());
        assert!(HookArgs::parse(&["a".into(), "start".into(), "begin".into()]).is_err());
        assert!(HookArgs::parse(&["".into(), "start".into(), "begin".into(), "-".into()]).is_err());
        let a = args("vm", "started");
        assert_eq!(a.operation, "started");
        assert_eq!(a.extra, "-");
    }

    #[test]
    fn event_carries_operation_xml_and_summary() {
        let xml = "<domain type='qemu'><name>vm</name><memory>1024</memory><vcpu>2</vcpu></domain>";
        let (e, problem) = build_event(&args("vm", "started"), Ok(xml.into()));
        assert_eq!(problem, None);
        assert_eq!(e.vm.vm_id, "vm");
        let EventKind::Libvirt(call) = &e.kind else {
            panic!("not a libvirt event");
        };
        assert_eq!(call.operation, vmm_hooks::LibvirtOperation::Started);
        assert_eq!(call.domain_xml, xml);
        assert_eq!(call.domain.as_ref().map(|d| d.vcpus), Some(2));
        assert_eq!(e.kind.name(), "libvirt-started");
    }

    #[test]
    fn bad_or_foreign_xml_is_named_and_carries_no_summary() {
        let (e, problem) = build_event(&args("vm", "start"), Ok("<domain>".into()));
        assert!(problem.is_some());
        let EventKind::Libvirt(call) = &e.kind else {
            panic!("not a libvirt event");
        };
        assert!(call.domain.is_none());
        assert_eq!(call.xml_error, problem);
        let other = "<domain><name>other</name><memory>1</memory><vcpu>1</vcpu></domain>";
        let (_, problem) = build_event(&args("vm", "start"), Ok(other.into()));
        assert!(problem.unwrap().contains("\"other\""));
        let (e, problem) = build_event(
            &args("vm", "frobnicate"),
            Err(LibvirtError::Stdin("x".into())),
        );
        assert!(problem.unwrap().contains("x"));
        assert_eq!(e.kind.name(), "libvirt-other");
    }

    #[test]
    fn oversized_input_is_refused() {
        let big = vec![b' '; MAX_DOMAIN_XML + 10];
        let r = read_bounded(std::io::Cursor::new(big), Duration::from_secs(30));
        assert!(r.unwrap_err().to_string().contains("limit"));
        let r = read_bounded(
            std::io::Cursor::new(vec![0xff, 0xfe]),
            Duration::from_secs(30),
        );
        assert!(r.unwrap_err().to_string().contains("UTF-8"));
    }
}
