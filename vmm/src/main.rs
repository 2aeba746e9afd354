//! `labvm`: run a lab guest (or, where hardware virtualisation exists, Linux).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use labvm::{
    BalloonConfig, HookReporter, LabVm, LabVmConfig, OnInterrupt, StopReason, VMM_NAME, Workload,
    lab_identity,
};
use vmm_hooks::Admission;
use vmm_hooks::{LifecycleHook, NoCompanion, SocketHook, SocketHookConfig, error_chain};

/// labvm: Prescient's reference VMM.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Workload: seq:MIB, rand:MIB[:SEED[:VARY_PCT]], trace:PATH[:COMPUTE_PCT],
    /// dirty:PAGES_PER_SEC[:REGION_MIB], fault-ud, fault-pf, never-ready,
    /// balloon:TOUCH_MIB[:KEEP_MIB[:report][:ignore][:lazy][:grow=MIB]] (implies --balloon).
    #[arg(long, default_value = "seq:64")]
    workload: String,
    /// Seconds the guest may take to signal ready.
    #[arg(long, default_value_t = 30.0)]
    deadline: f64,
    /// For dirty workloads: seconds to run after ready (default: until Ctrl-C).
    #[arg(long)]
    run_for: Option<f64>,
    /// Write the run report as JSON here.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// The companion's hooks socket (e.g. /run/prescient/hooks.sock). The VM
    /// runs whether or not a companion answers there.
    #[arg(long)]
    hooks_socket: Option<PathBuf>,
    /// Milliseconds each hook event may wait for the companion.
    #[arg(long, default_value_t = 500)]
    hooks_timeout_ms: u64,
    /// Apply this boot plan (JSON, as the companion sends it) instead of the
    /// companion's.
    #[arg(long)]
    plan_file: Option<PathBuf>,
    /// Seed of the per-boot variation of rand workloads (default: from the clock).
    #[arg(long)]
    nonce: Option<u64>,
    /// Pre-warmed instance: apply the plan before the start request (time
    /// to ready then counts from after it).
    #[arg(long)]
    prewarm: bool,
    /// This VM's id on the host (default: labvm-PID).
    #[arg(long)]
    vm_id: Option<String>,
    /// Boot this Linux bzImage instead of a lab guest (needs hardware
    /// virtualisation; refused on PVM hosts).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd for --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, requires = "kernel", default_value = labvm::linux::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Give the VM a virtio-balloon device (virtio-mmio at 0xF_0000_1000).
    #[arg(long)]
    balloon: bool,
    /// Balloon target at start, in MiB (pre-balloon; a boot plan from the
    /// companion may replace it).
    #[arg(long, default_value_t = 0)]
    balloon_target_mib: u64,
    /// Milliseconds between the balloon's statistics requests to the guest.
    #[arg(long, default_value_t = 1000)]
    balloon_stats_ms: u64,
    /// Milliseconds between balloon status events to the companion (whose
    /// replies may set a new target).
    #[arg(long, default_value_t = 1000)]
    balloon_poll_ms: u64,
    /// Milliseconds a guest may not move toward its balloon target before
    /// it is reported as ignoring it.
    #[arg(long, default_value_t = 3000)]
    balloon_grace_ms: u64,
    /// For --kernel: stop the guest after this many seconds.
    #[arg(long, requires = "kernel")]
    timeout: Option<f64>,
    /// Destination of a live migration: listen on [ADDR:]PORT (ADDR
    /// defaults to 127.0.0.1; port 0 picks one and prints it), receive a
    /// VM and run it. The VM's configuration comes from the source.
    #[arg(long, value_name = "[ADDR:]PORT", conflicts_with_all = ["kernel", "migrate_to"])]
    incoming: Option<String>,
    /// Source of a live migration: once the guest is ready (plus
    /// --migrate-after), move it to the labvm listening at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "kernel")]
    migrate_to: Option<String>,
    /// Seconds after ready before migrating.
    #[arg(long, default_value_t = 0.0)]
    migrate_after: f64,
    /// Downtime target of the migration, in milliseconds.
    #[arg(long, default_value_t = 50)]
    downtime_ms: u64,
    /// Migration socket timeout in seconds (either side); also how long the
    /// destination waits for the source's commit and the source for the
    /// destination's confirmation.
    #[arg(long, default_value_t = 30.0)]
    migrate_timeout: f64,
    /// Bulk TCP connections for page data.
    #[arg(long, default_value_t = 4)]
    migrate_streams: u32,
    /// How page data moves: `tcp` (--migrate-streams connections) or
    /// `rdma` (RDMA WRITE into the destination's registered RAM; needs the
    /// `rdma` build and an RDMA device on both hosts). Control messages go
    /// over TCP either way; the destination follows the source.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "rdma"])]
    migrate_transport: String,
    /// Write the migration report (either side) as JSON here.
    #[arg(long)]
    migration_report: Option<PathBuf>,
    /// Source: where to save the paused VM if the migration ends in doubt
    /// (the destination was told to start it, but its confirmation never
    /// came). Default: labvm-in-doubt-PID.state beside --migration-report,
    /// else in the current directory. labvm then exits with status 76.
    #[arg(long, value_name = "FILE")]
    in_doubt_save: Option<PathBuf>,
    /// This VM's priority for the companion's interruption coordinator
    /// (higher wins; a VM may cause the interruption only of VMs of lower
    /// priority).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i32,
    /// The companion may interrupt this VM to make room for a VM of higher
    /// priority (gives the VM a balloon device, the channel the companion
    /// uses). Needs --save-on-interrupt, or --interrupt-mode stop.
    #[arg(long, conflicts_with_all = ["kernel", "incoming"])]
    interruptible: bool,
    /// On interruption: `save` (pause, save the state to
    /// --save-on-interrupt, exit 75; restart with --restore) or `stop`
    /// (stop, exit 75; restart is a cold boot with --restart).
    #[arg(long, default_value = "save", value_parser = ["save", "stop"])]
    interrupt_mode: String,
    /// Where an interrupted VM's state is saved.
    #[arg(long, value_name = "FILE")]
    save_on_interrupt: Option<PathBuf>,
    /// Restart an interrupted VM from its saved state (the VM's shape and
    /// workload come from the file; it resumes where it was paused). Use
    /// the same --vm-id so the companion grants its reserved resources.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "incoming", "migrate_to", "plan_file", "prewarm"])]
    restore: Option<PathBuf>,
    /// This (cold) boot restarts a VM the companion interrupted (implied
    /// by --restore).
    #[arg(long)]
    restart: bool,
    /// Milliseconds between run-status events to the companion (`poll`, or
    /// the `run` part of balloon events), whose replies may order a live
    /// migration. Only with --hooks-socket.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// Seconds between dirty-rate measurements reported to the companion
    /// (0: never). Each turns dirty logging on for --dirty-window-ms.
    #[arg(long, default_value_t = 10.0)]
    dirty_sample_s: f64,
    /// Length of one dirty-rate measurement, in milliseconds.
    #[arg(long, default_value_t = 250)]
    dirty_window_ms: u64,
    /// Longest wait, in seconds, while the companion defers this VM's boot
    /// for lack of resources; then it boots anyway.
    #[arg(long, default_value_t = 600.0)]
    admission_wait_s: f64,
}

/// Stops on SIGINT/SIGTERM or after `until`.
struct CliStop {
    until: Option<Instant>,
}

impl labvm::RunObserver for CliStop {
    fn should_stop(&mut self) -> bool {
        stop_requested() || self.until.is_some_and(|t| Instant::now() >= t)
    }
}

fn print_migration(m: &labvm::MigrationReport) {
    match &m.error {
        _ if m.in_doubt.is_some() => {
            let d = m.in_doubt.as_ref();
            match d.and_then(|d| d.saved.as_ref()) {
                Some(s) => println!(
                    "migration IN DOUBT ({}): the VM is paused and saved to {} (counter {:?}); \
                     it may run on {}. Restore it with --restore only if it does not run there.",
                    d.map(|d| d.reason.as_str()).unwrap_or_default(),
                    s.path.display(),
                    s.counter,
                    m.to
                ),
                None => println!(
                    "migration IN DOUBT ({}): the VM could not be saved ({}); it runs on {} or nowhere",
                    d.map(|d| d.reason.as_str()).unwrap_or_default(),
                    d.and_then(|d| d.save_error.as_deref()).unwrap_or_default(),
                    m.to
                ),
            }
        }
        None => println!(
            "migrated to {}: total {:.1} ms, downtime {:.1} ms, {} bytes",
            m.to, m.total_ms, m.downtime_ms, m.bytes
        ),
        Some(e) => println!("migration failed, the VM ran on here: {e}"),
    }
}

/// The companion at --hooks-socket, or none.
fn companion(cli: &Cli) -> Box<dyn LifecycleHook> {
    match &cli.hooks_socket {
        Some(path) => {
            let mut c = SocketHookConfig::new(path, VMM_NAME);
            c.timeout = Duration::from_millis(cli.hooks_timeout_ms);
            c.features = vec![
                vmm_hooks::proto::FEATURE_INTERRUPT.to_string(),
                vmm_hooks::proto::FEATURE_MIGRATE.to_string(),
            ];
            Box::new(SocketHook::new(c))
        }
        None => Box::new(NoCompanion),
    }
}

/// --vm-id, or labvm-PID.
fn vm_id(cli: &Cli) -> String {
    cli.vm_id
        .clone()
        .unwrap_or_else(|| format!("labvm-{}", std::process::id()))
}

/// The reporter with run status and migration orders (see
/// `HookReporter::with_migration`).
fn with_migration<'a>(reporter: HookReporter<'a>, cli: &Cli) -> HookReporter<'a> {
    let sample = (cli.dirty_sample_s > 0.0).then(|| Duration::from_secs_f64(cli.dirty_sample_s));
    reporter.with_migration(
        Duration::from_millis(cli.poll_ms.max(10)),
        sample,
        Duration::from_millis(cli.dirty_window_ms.max(10)),
    )
}

/// Streams, timeouts and the in-doubt file of migrations the companion
/// orders (and the base of --migrate-to's).
fn template(cli: &Cli) -> labvm::MigrationOptions {
    let mut opts = labvm::MigrationOptions::new(String::new());
    opts.streams = cli.migrate_streams;
    opts.downtime = Duration::from_millis(cli.downtime_ms);
    opts.timeout = Duration::from_secs_f64(cli.migrate_timeout.max(0.1));
    opts.in_doubt_save = cli.in_doubt_save.clone().or_else(|| {
        let dir = cli.migration_report.as_ref()?.parent()?;
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        Some(dir.join(format!("labvm-in-doubt-{}.state", std::process::id())))
    });
    opts.transport = if cli.migrate_transport == "rdma" {
        labvm::TransportKind::Rdma
    } else {
        labvm::TransportKind::Tcp
    };
    opts
}

fn write_json<T: serde::Serialize>(path: &Option<PathBuf>, value: &T) {
    if let Some(path) = path {
        let json = serde_json::to_string_pretty(value).unwrap_or_default();
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("labvm: cannot write {}: {e}", path.display());
        }
    }
}

fn incoming(cli: &Cli, spec: &str) -> ExitCode {
    let addr = if spec.contains(':') {
        spec.to_string()
    } else {
        format!("127.0.0.1:{spec}")
    };
    let listener = match std::net::TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("labvm: cannot listen on {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("incoming: listening on {a}"),
        Err(e) => eprintln!("labvm: listening on {addr} (address unknown: {e})"),
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let timeout = Duration::from_secs_f64(cli.migrate_timeout.max(0.1));
    let mut inc = match labvm::receive(listener, timeout) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("labvm: incoming migration failed: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    println!(
        "incoming: VM received ({} rounds, {:.1} ms); running",
        inc.report.rounds, inc.report.total_ms
    );
    // The incoming migration's report is written once the run ends: a file
    // write here would sit in the guest's downtime (the source waits for
    // Running).
    let until = cli
        .run_for
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    // Whether the VM was moved on (and whether that move is in doubt).
    let (result, moved_on) = if cli.hooks_socket.is_some() {
        run_incoming_with_companion(cli, &mut inc, until)
    } else {
        (inc.run(&mut CliStop { until }), None)
    };
    if moved_on.is_none() {
        // (A VM that moved on wrote its outgoing migration's report.)
        write_json(&cli.migration_report, &inc.report);
    }
    match result {
        Ok(report) => {
            write_json(&cli.report_json, &report);
            if moved_on == Some(true) {
                ExitCode::from(labvm::EXIT_MIGRATION_IN_DOUBT)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("labvm: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// Runs a received VM under this host's companion: it hears of the VM as
/// of a restored one (`created`, `before-boot` restarting, `restarted`),
/// gets its run status, and may move it on again.
fn run_incoming_with_companion(
    cli: &Cli,
    inc: &mut labvm::Incoming,
    until: Option<Instant>,
) -> (Result<labvm::RunReport, labvm::VmmError>, Option<bool>) {
    let mut hook = companion(cli);
    let identity = lab_identity(&vm_id(cli), &inc.vm);
    let stop = move || stop_requested() || until.is_some_and(|t| Instant::now() >= t);
    let stop: &dyn Fn() -> bool = &stop;
    let mut reporter = HookReporter::new(hook.as_mut(), identity)
        .with_stop(stop)
        // The source has committed and waits for Running: the VM starts
        // now even if the companion would defer it (it may still refuse,
        // and then the source resumes its copy).
        .with_admission(
            Admission::new(cli.priority, false).restarting(),
            Duration::ZERO,
        )
        .restored();
    if let Some(balloon) = inc.vm.balloon() {
        reporter = reporter.with_balloon(balloon, Duration::from_millis(cli.balloon_poll_ms));
    }
    reporter = with_migration(reporter, cli);
    reporter.created(&inc.vm);
    let mut source = labvm::MigrationSource::on_request(template(cli), &mut reporter);
    let result = inc.run(&mut source);
    let moved = source.report.take();
    reporter.stopped(&result);
    if let Some(m) = &moved {
        print_migration(m);
        write_json(&cli.migration_report, m);
    }
    (result, moved.map(|m| m.in_doubt.is_some()))
}

fn boot_linux(cli: &Cli, kernel: PathBuf) -> ExitCode {
    let config = labvm::linux::LinuxConfig {
        kernel,
        initrd: cli.initrd.clone(),
        cmdline: cli.cmdline.clone(),
        ram_mib: cli.mem,
        vcpus: cli.vcpus,
        timeout: cli.timeout.map(Duration::from_secs_f64),
    };
    match labvm::linux::boot(&config, Box::new(std::io::stdout()), &stop_requested) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labvm: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// A per-boot seed for the varying part of `rand` workloads.
fn boot_nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // The low 64 bits of the nanosecond clock are what varies.
    u64::try_from(t & u128::from(u64::MAX)).unwrap_or(0) ^ (u64::from(std::process::id()) << 32)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::SeqCst);
}

fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn main() -> ExitCode {
    let started = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal) {
            eprintln!("labvm: cannot install a handler for signal {sig}: {e}");
        }
    }
    if let Some(kernel) = cli.kernel.clone() {
        return boot_linux(&cli, kernel);
    }
    if let Some(spec) = cli.incoming.clone() {
        return incoming(&cli, &spec);
    }
    let nonce = cli.nonce.unwrap_or_else(boot_nonce);
    let workload = match Workload::from_spec(&cli.workload, nonce) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("labvm: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.interruptible && cli.interrupt_mode == "save" && cli.save_on_interrupt.is_none() {
        eprintln!(
            "labvm: --interruptible needs --save-on-interrupt FILE (or --interrupt-mode stop)"
        );
        return ExitCode::from(2);
    }
    let mut config = LabVmConfig::new(cli.mem, workload);
    config.vcpus = cli.vcpus;
    config.ready_deadline = Duration::from_secs_f64(cli.deadline);
    config.run_for = cli.run_for.map(Duration::from_secs_f64);
    if cli.balloon || cli.interruptible || matches!(config.workload, Workload::Balloon { .. }) {
        config.balloon = Some(BalloonConfig {
            initial_target_mib: cli.balloon_target_mib,
            stats_interval: Duration::from_millis(cli.balloon_stats_ms),
            grace: Duration::from_millis(cli.balloon_grace_ms),
        });
    }
    config.prewarm = cli.prewarm;
    if let Some(path) = &cli.plan_file {
        match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<vmm_hooks::BootPlan>(&b).map_err(|e| e.to_string())
            }) {
            Ok(plan) => config.plan = Some(plan),
            Err(e) => {
                eprintln!("labvm: cannot use plan file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    let created = match &cli.restore {
        Some(path) => labvm::restore_from_file(path).map(|r| {
            println!(
                "restored from {}: {} pages, counter {:?}",
                path.display(),
                r.pages,
                r.counter
            );
            let mut vm = r.vm;
            vm.set_run_for(cli.run_for.map(Duration::from_secs_f64));
            vm
        }),
        None => LabVm::create(config, started).map_err(labvm::SnapshotError::from),
    };
    let mut vm = match created {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("labvm: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    let mut hook = companion(&cli);
    let vm_id = vm_id(&cli);
    let identity = lab_identity(&vm_id, &vm);
    let stop: &dyn Fn() -> bool = &stop_requested;
    let mut admission = Admission::new(cli.priority, cli.interruptible);
    if cli.restore.is_some() || cli.restart {
        admission = admission.restarting();
    }
    let mut reporter = HookReporter::new(hook.as_mut(), identity)
        .with_stop(stop)
        .with_admission(
            admission,
            Duration::from_secs_f64(cli.admission_wait_s.max(0.0)),
        );
    if cli.restore.is_some() {
        reporter = reporter.restored();
    }
    if cli.interruptible {
        reporter = reporter.with_interrupt(match &cli.save_on_interrupt {
            Some(path) if cli.interrupt_mode == "save" => OnInterrupt::Save(path.clone()),
            _ => OnInterrupt::Stop,
        });
    }
    if let Some(balloon) = vm.balloon() {
        reporter = reporter.with_balloon(balloon, Duration::from_millis(cli.balloon_poll_ms));
    }
    if cli.hooks_socket.is_some() {
        reporter = with_migration(reporter, &cli);
    }
    reporter.created(&vm);
    let (result, migration) = match &cli.migrate_to {
        Some(to) => {
            let mut opts = template(&cli);
            opts.to = to.clone();
            opts.after = Duration::from_secs_f64(cli.migrate_after.max(0.0));
            let mut source = labvm::MigrationSource::new(opts, &mut reporter);
            let r = vm.run(&mut source);
            let m = source.report.take();
            (r, m)
        }
        // With a companion, it may order a live migration at any time.
        None if cli.hooks_socket.is_some() => {
            let mut source = labvm::MigrationSource::on_request(template(&cli), &mut reporter);
            let r = vm.run(&mut source);
            let m = source.report.take();
            (r, m)
        }
        None => (vm.run(&mut reporter), None),
    };
    let interrupted = reporter.interrupted().cloned();
    reporter.stopped(&result);
    if let Some(i) = &interrupted {
        match &i.save {
            Some(r) => println!(
                "interrupted ({}): saved to {} ({} bytes, {} pages, {:.1} ms, counter {:?})",
                i.reason,
                r.path.display(),
                r.bytes,
                r.pages,
                r.ms,
                r.counter
            ),
            None => println!("interrupted ({}): stopped", i.reason),
        }
    }
    if let Some(m) = &migration {
        print_migration(m);
        write_json(&cli.migration_report, m);
    }
    let in_doubt = migration.as_ref().is_some_and(|m| m.in_doubt.is_some());
    match result {
        Ok(report) => {
            match report.time_to_ready {
                Some(t) => println!("ready after {:.1} ms", t.as_secs_f64() * 1e3),
                None => println!("guest never signalled ready"),
            }
            if let Some(path) = &cli.report_json {
                let json = serde_json::to_string_pretty(&report).unwrap_or_default();
                if let Err(e) = std::fs::write(path, json) {
                    eprintln!("labvm: cannot write {}: {e}", path.display());
                }
            }
            match report.stop {
                _ if in_doubt => ExitCode::from(labvm::EXIT_MIGRATION_IN_DOUBT),
                _ if interrupted.is_some() => ExitCode::from(labvm::EXIT_INTERRUPTED),
                StopReason::Exited(s) => ExitCode::from(u8::try_from(s).unwrap_or(1)),
                StopReason::Stopped => ExitCode::SUCCESS,
            }
        }
        Err(e @ labvm::VmmError::NotAdmitted { .. }) => {
            // Its own status, so a script can tell "no room here, try
            // another host" from a failure.
            eprintln!("labvm: {}", error_chain(&e));
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("labvm: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}
