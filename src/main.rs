//! The `prescient` command line.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prescient::{Config, HooksServer, ServerConfig};
use vmm_hooks::error_chain;

mod forecast_cli;
mod gpu_cli;

/// Prescient: a KVM host companion that prepares the host before VM demand arrives.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the companion daemon: listen for VMM lifecycle hooks.
    Serve(Box<ServeArgs>),
    /// Validate a configuration file and print the effective configuration.
    CheckConfig(CheckConfigArgs),
    /// Ask the running daemon for its VMs, resource pool, reservations and
    /// forecasts; print them as a table (or JSON).
    Status(StatusArgs),
    /// Record a real program's start-up memory touches as a labvm trace.
    TraceCapture(TraceCaptureArgs),
    /// Benchmarks that compare strategies side by side.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Train the forecasting model on trace files and score it on held-out series.
    Train(forecast_cli::TrainArgs),
    /// Score the baselines (and a model) on trace files.
    Eval(forecast_cli::EvalArgs),
    /// libvirt's QEMU hook: forwards DOMAIN OPERATION SUB-OPERATION EXTRA and
    /// the domain XML (stdin) to the daemon; always exits 0 within the bound.
    LibvirtHook(LibvirtHookArgs),
    /// Install `prescient libvirt-hook` as libvirt's QEMU hook (hooks/qemu).
    InstallLibvirtHook(InstallLibvirtHookArgs),
    /// Replay a real trace through forecaster, shaper and margin tuner, and
    /// compare the tuned margin with fixed margins.
    ShapeReplay(ShapeReplayArgs),
    /// GPUs: inventory (NVML or a recording), recordings, reservations.
    #[command(subcommand)]
    Gpu(gpu_cli::GpuCommand),
    /// This host as a whole: drain it (move every VM off) before an update.
    #[command(subcommand)]
    Host(HostCommand),
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// Live-migrate every VM that can migrate to other hosts' companions
    /// (their `[migration] listen`), in turn, and follow until each moved
    /// or failed (a VM whose move fails runs on here). Exit 0 when every VM
    /// moved, 1 otherwise. The host takes no new VMs until `undrain`. The
    /// drain is recorded in the daemon's store: a restarted daemon resumes
    /// it (cordoned; VMs move as they report in).
    Drain(DrainArgs),
    /// End a drain (also one resumed after a restart, or the cordon left
    /// by an unreadable recorded drain): the host takes new VMs again.
    Undrain(UndrainArgs),
}

#[derive(Debug, clap::Args)]
struct UndrainArgs {
    /// The daemon's hooks socket.
    #[arg(long, default_value = "/run/prescient/hooks.sock")]
    socket: PathBuf,
}

#[derive(Debug, clap::Args)]
struct DrainArgs {
    /// The daemon's hooks socket.
    #[arg(long, default_value = "/run/prescient/hooks.sock")]
    socket: PathBuf,
    /// A destination companion, HOST:PORT (repeat for several; VMs are
    /// spread over them in turn).
    #[arg(long = "to", required = true, value_name = "HOST:PORT")]
    to: Vec<String>,
    /// Give up following after this many seconds (moves in flight go on).
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
    /// Print the final state as JSON.
    #[arg(long)]
    json: bool,
}

/// Bytes as MB, for display.
#[allow(clippy::cast_precision_loss)]
fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// `prescient host drain`: asks, then follows the moves, one line per change.
fn host_drain(args: &DrainArgs) -> ExitCode {
    use prescient::migration::MoveRecord;
    let ask = std::time::Duration::from_secs(5);
    let first = match prescient::request_drain(&args.socket, &args.to, ask) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("prescient host drain: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let line = |m: &MoveRecord| -> String {
        match (&m.state, &m.outcome, &m.error) {
            (_, _, Some(e)) => format!("{}: {}: {e}", m.vm, m.state_name()),
            (_, Some(o), None) => format!(
                "{}: {} to {} (total {:.0} ms, downtime {:.1} ms, {:.1} MB)",
                m.vm,
                m.state_name(),
                m.addr.as_deref().unwrap_or("?"),
                o.total_ms,
                o.downtime_ms,
                megabytes(o.bytes)
            ),
            _ => format!(
                "{}: {}{}",
                m.vm,
                m.state_name(),
                m.addr
                    .as_deref()
                    .or(Some(m.destination.as_str()).filter(|d| !d.is_empty()))
                    .map(|a| format!(" ({a})"))
                    .unwrap_or_default()
            ),
        }
    };
    match &first.drain {
        Some(d) if !d.recorded => eprintln!(
            "prescient host drain: warning: the drain is NOT recorded in the daemon's store (no store, or the write failed: see its log); if the daemon restarts it will not be draining"
        ),
        _ => {}
    }
    let drained: Vec<String> = first
        .migrations
        .iter()
        .filter(|m| m.reason == "drain")
        .map(|m| m.vm.clone())
        .collect();
    if drained.is_empty() {
        eprintln!(
            "prescient host drain: no VMs on this host; it takes no new VMs until prescient host undrain"
        );
        return ExitCode::SUCCESS;
    }
    eprintln!("draining {} VM(s) to {}", drained.len(), args.to.join(", "));
    let mut seen: std::collections::HashMap<String, String> = Default::default();
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs_f64(args.timeout_s.max(0.0));
    let mut current = first;
    loop {
        let mine: Vec<&MoveRecord> = current
            .migrations
            .iter()
            .filter(|m| drained.contains(&m.vm))
            .collect();
        for m in &mine {
            let l = line(m);
            if seen.get(&m.vm) != Some(&l) {
                eprintln!("{l}");
                seen.insert(m.vm.clone(), l);
            }
        }
        if mine.iter().all(|m| m.state.is_final()) || std::time::Instant::now() >= deadline {
            let moved = mine
                .iter()
                .filter(|m| m.state == prescient::migration::MoveState::Moved)
                .count();
            if args.json {
                let json = serde_json::to_string_pretty(&mine).unwrap_or_default();
                println!("{json}");
            } else {
                print!("{}", prescient::moves_table(&current.migrations));
            }
            let done = mine.iter().all(|m| m.state.is_final());
            eprintln!(
                "{moved} of {} moved{}",
                mine.len(),
                if done {
                    ""
                } else {
                    "; gave up following (moves in flight go on)"
                }
            );
            return if moved == mine.len() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        match prescient::query_status(&args.socket, ask) {
            Ok(s) => current = s,
            Err(e) => {
                eprintln!("prescient host drain: {}", error_chain(&e));
                return ExitCode::from(2);
            }
        }
    }
}

#[derive(Debug, clap::Args)]
struct ShapeReplayArgs {
    /// The trace file (shared/data/traces format, gzip CSV).
    #[arg(long)]
    trace: PathBuf,
    /// Cost of shortfall against slack in the reward -(slack + lambda * shortfall).
    #[arg(long, default_value_t = 20.0)]
    lambda: f64,
    /// minimise-fragmentation, maximise-utilisation or favour-high-priority.
    #[arg(long, default_value = "maximise-utilisation")]
    policy: prescient::shaping::ShapePolicy,
    /// The demand column: cpu_pct (shapes cpu.max) or mem_pct (shapes the balloon).
    #[arg(long, default_value = "cpu_pct")]
    metric: String,
    /// VMs: the first N series of the file with that column.
    #[arg(long, default_value_t = 16)]
    vms: usize,
    /// Host capacity as a share of the VMs' total size.
    #[arg(long, default_value_t = 0.5)]
    host_fraction: f64,
    /// Decisions per row of the window table.
    #[arg(long, default_value_t = 288)]
    window: usize,
    /// Replay at most this many 5-minute slots.
    #[arg(long)]
    max_slots: Option<usize>,
    /// Where JSON and the SVG plot go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn shape_replay(a: ShapeReplayArgs) -> ExitCode {
    use prescient::shape_replay::{ReplayConfig, replay};
    let metric = match a.metric.as_str() {
        "cpu_pct" => models::Metric::CpuPct,
        "mem_pct" => models::Metric::MemPct,
        other => {
            eprintln!("prescient: --metric {other}: use cpu_pct or mem_pct");
            return ExitCode::from(2);
        }
    };
    let mut c = ReplayConfig::new(&a.trace);
    c.metric = metric;
    c.lambda = a.lambda;
    c.policy = a.policy;
    c.vms = a.vms.max(1);
    c.host_fraction = a.host_fraction;
    c.window = a.window.max(1);
    c.max_slots = a.max_slots;
    match replay(&c).and_then(|r| r.write(&a.out).map(|f| (r, f))) {
        Ok((r, (json, svg))) => {
            println!("{}", r.tables());
            println!("JSON: {}\nplot: {}", json.display(), svg.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("prescient: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, clap::Args)]
struct LibvirtHookArgs {
    /// The daemon's hooks socket.
    #[arg(long, default_value = "/run/prescient/hooks.sock")]
    socket: PathBuf,
    /// The whole call's bound, ms (reading the XML and talking to the daemon).
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// DOMAIN OPERATION SUB-OPERATION EXTRA, as libvirt passes them.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct InstallLibvirtHookArgs {
    /// libvirt's hooks directory.
    #[arg(long, default_value = "/etc/libvirt/hooks")]
    hooks_dir: PathBuf,
    /// The daemon's hooks socket the hook talks to.
    #[arg(long, default_value = "/run/prescient/hooks.sock")]
    socket: PathBuf,
    /// The hook's time bound, ms.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// The prescient binary the hook runs (default: this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Replace a hook that Prescient did not write (it is kept beside it).
    #[arg(long)]
    force: bool,
}

fn libvirt_hook(args: LibvirtHookArgs) -> ExitCode {
    use prescient::libvirt::{HookArgs, HookConfig, HookOutcome, run_hook};
    // Exit 0 whatever happens: a failing qemu hook stops libvirt from
    // starting (or, on reconnect, keeping) the domain. Nothing goes to
    // stdout: for migrate and restore libvirt reads it as a new domain XML.
    let hook_args = match HookArgs::parse(&args.args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("prescient libvirt-hook: {e}; nothing forwarded");
            return ExitCode::SUCCESS;
        }
    };
    let config = HookConfig {
        socket: args.socket,
        timeout: std::time::Duration::from_millis(args.timeout_ms.clamp(50, 60_000)),
    };
    let (outcome, problem) = run_hook(&hook_args, std::io::stdin(), &config);
    if let Some(p) = problem {
        eprintln!(
            "prescient libvirt-hook: {} {} {}: {p} (forwarded without a domain summary)",
            hook_args.domain, hook_args.operation, hook_args.sub_operation
        );
    }
    if outcome == HookOutcome::DaemonUnavailable {
        eprintln!(
            "prescient libvirt-hook: {} {} {}: the daemon at {} did not take the call; the domain goes on without it",
            hook_args.domain,
            hook_args.operation,
            hook_args.sub_operation,
            config.socket.display()
        );
    }
    ExitCode::SUCCESS
}

fn install_libvirt_hook(args: InstallLibvirtHookArgs) -> ExitCode {
    let binary = match args.binary.map_or_else(std::env::current_exe, Ok) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("prescient: cannot tell where this binary is ({e}); pass --binary");
            return ExitCode::FAILURE;
        }
    };
    let config = prescient::libvirt::InstallConfig {
        hooks_dir: args.hooks_dir,
        binary,
        socket: args.socket,
        timeout: std::time::Duration::from_millis(args.timeout_ms.clamp(50, 60_000)),
        force: args.force,
    };
    match prescient::libvirt::install(&config) {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("prescient: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time to ready of lab guests on KVM under each pre-fault strategy.
    Bootstrap(BootstrapBenchArgs),
    /// Latency of serving boot plans from a store with many boots.
    Store(StoreBenchArgs),
    /// Simulated VM lifecycles through the hooks socket at a fixed rate.
    Load(LoadBenchArgs),
    /// One run of the daemon's retraining job on a store of realistic size:
    /// samples, decision, wall and CPU time.
    Retrain(RetrainBenchArgs),
    /// The forecasting model's batch kernels on the CPU and the GPU side by
    /// side, their agreement, and the measured crossover.
    Offload(OffloadBenchArgs),
    /// The interruption coordinator's choice: exact search against greedy
    /// (time per decision and what each chose), on seeded random hosts.
    Interrupt(InterruptBenchArgs),
}

#[derive(Debug, clap::Args)]
struct OffloadBenchArgs {
    /// Batch inference sizes, VMs.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 10_000, 100_000])]
    vms: Vec<usize>,
    /// Examples in the timed training epoch.
    #[arg(long, default_value_t = 100_000)]
    train_examples: usize,
    /// Training mini-batch size.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Hidden width of a fresh network (ignored with --model).
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Timed repetitions of each inference (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Use the weights of a model written by `prescient train`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the measured crossover is stored (read by `--gpu auto|on`).
    #[arg(long, default_value = models::DEFAULT_CROSSOVER_FILE)]
    crossover_out: PathBuf,
    /// Skip the crossover measurement.
    #[arg(long)]
    no_calibrate: bool,
    /// Fail unless a hardware GPU adapter opens (no GPU, or only a
    /// software-emulated one, is then an error rather than a CPU-only table).
    #[arg(long)]
    require_gpu: bool,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct InterruptBenchArgs {
    /// Random requests per host size.
    #[arg(long, default_value_t = 200)]
    cases: usize,
    /// Seed of the random hosts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, clap::Args)]
struct LoadBenchArgs {
    /// Lifecycles (created, before-boot, ready, boot-report, stopped) per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 60)]
    seconds: u32,
    /// Client connections.
    #[arg(long, default_value_t = 16)]
    clients: u32,
    /// Where the socket, store and event log go.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// Run the daemon's retraining job (100 VMs x 14 days of samples,
    /// training again and again at the lowest CPU priority) beside the load.
    #[arg(long)]
    retrain: bool,
    /// Where the retraining job's store and model files go [default: --dir]
    /// (a tmpfs here separates its CPU use from its disk writes).
    #[arg(long)]
    retrain_dir: Option<PathBuf>,
    /// The retraining job's CPU share ([forecast] retrain_cpu_share).
    #[arg(long, default_value_t = 0.25)]
    retrain_cpu_share: f64,
    /// Usage samples per second queued through the daemon's sample writer
    /// into the same store file as the hook path's writes (0: none).
    #[arg(long, default_value_t = 0)]
    samples_per_s: u32,
}

#[derive(Debug, clap::Args)]
struct RetrainBenchArgs {
    /// VMs in the store.
    #[arg(long, default_value_t = 100)]
    vms: usize,
    /// Hours of 5-minute samples per VM.
    #[arg(long, default_value_t = 24)]
    hours: u32,
    /// Epochs of each training.
    #[arg(long)]
    epochs: Option<usize>,
    /// Where the temporary store and model go.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct BootstrapBenchArgs {
    /// The labvm binary (default: next to this program).
    #[arg(long)]
    labvm: Option<PathBuf>,
    /// Repetitions of each strategy.
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Pause before each run, ms (the same for every strategy).
    #[arg(long, default_value_t = 2500)]
    pause_ms: u64,
    /// Profile and plan granularity, KiB.
    #[arg(long, default_value_t = 4)]
    chunk_kib: u64,
    /// The recorded start-up trace.
    #[arg(long, default_value = "data/traces/python-sympy-import.trace")]
    trace: PathBuf,
    /// Only these workloads (names as in the table).
    #[arg(long)]
    only: Vec<String>,
    /// Where JSON and the SVG plot go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct StoreBenchArgs {
    /// Boots to store.
    #[arg(long, default_value_t = 10_000)]
    boots: u64,
    /// Bootstrap keys they spread over.
    #[arg(long, default_value_t = 100)]
    keys: u64,
    /// Plans served per case.
    #[arg(long, default_value_t = 1000)]
    lookups: u32,
    /// Where the temporary store goes.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
}

fn bench(cmd: BenchCommand) -> ExitCode {
    use prescient::bench;
    match cmd {
        BenchCommand::Interrupt(a) => {
            let rows = bench::interrupt_bench(&[4, 8, 12, 16], a.cases.max(1), a.seed);
            println!("{}", bench::interrupt_table(&rows));
            ExitCode::SUCCESS
        }
        BenchCommand::Bootstrap(a) => {
            let labvm = a.labvm.clone().unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("labvm")))
                    .unwrap_or_else(|| PathBuf::from("labvm"))
            });
            let mut workloads = bench::BootstrapBench::default_workloads(&a.trace);
            if !a.only.is_empty() {
                workloads.retain(|w| a.only.contains(&w.name));
            }
            let b = bench::BootstrapBench {
                labvm,
                reps: a.reps.max(1),
                pause: std::time::Duration::from_millis(a.pause_ms),
                chunk: a.chunk_kib.max(4) * 1024,
                workloads,
                out: a.out.clone(),
            };
            match b
                .run()
                .and_then(|r| bench::write_bootstrap_outputs(&a.out, &r).map(|f| (r, f)))
            {
                Ok((results, (json, svg))) => {
                    println!("{}", bench::bootstrap_table(&results, b.reps, b.chunk));
                    println!("JSON: {}\nplot: {}", json.display(), svg.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("prescient: {}", error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        BenchCommand::Load(a) => {
            if let Err(e) = std::fs::create_dir_all(&a.dir) {
                eprintln!("prescient: cannot create {}: {e}", a.dir.display());
                return ExitCode::FAILURE;
            }
            let retrain_dir = a.retrain_dir.clone().unwrap_or_else(|| a.dir.clone());
            let retrain = a
                .retrain
                .then_some((retrain_dir.as_path(), a.retrain_cpu_share.clamp(0.05, 1.0)));
            match bench::load_bench(
                &a.dir,
                a.rate,
                a.seconds,
                a.clients,
                retrain,
                a.samples_per_s,
            ) {
                Ok(r) => {
                    println!("{}", bench::load_table(&r));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("prescient: {}", error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        BenchCommand::Retrain(a) => {
            if let Err(e) = std::fs::create_dir_all(&a.dir) {
                eprintln!("prescient: cannot create {}: {e}", a.dir.display());
                return ExitCode::FAILURE;
            }
            let mut cfg = prescient::ForecastConfig::default();
            if let Some(e) = a.epochs {
                cfg.retrain_epochs = e.max(1);
            }
            match bench::retrain_bench(&a.dir, a.vms.max(1), a.hours.max(1), &cfg) {
                Ok(rows) => {
                    println!("{}", bench::retrain_table(&rows));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("prescient: {}", error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        BenchCommand::Offload(a) => {
            let b = bench::OffloadBench {
                vms: a.vms,
                train_examples: a.train_examples.max(1),
                batch: a.batch.max(1),
                hidden: a.hidden.clamp(1, 4096),
                reps: a.reps.max(1),
                model: a.model,
                crossover_out: (!a.no_calibrate).then_some(a.crossover_out),
                out: a.out.clone(),
            };
            let result = b
                .run(&mut |line| eprintln!("bench: {line}"))
                .and_then(|r| bench::write_offload_json(&a.out, &r).map(|f| (r, f)));
            match result {
                Ok((r, json)) => {
                    println!("{}", bench::offload_table(&r));
                    println!("JSON: {}", json.display());
                    let hardware = r.gpu.as_ref().is_some_and(|g| !g.software);
                    if a.require_gpu && !hardware {
                        eprintln!(
                            "prescient: --require-gpu: {}",
                            r.gpu.as_ref().map_or_else(
                                || r.gpu_unsupported.clone().unwrap_or_default(),
                                |g| format!("the adapter is software-emulated: {g}")
                            )
                        );
                        ExitCode::FAILURE
                    } else if r.agrees() {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!(
                            "prescient: GPU outputs differ from the CPU's by more than {:e}",
                            bench::AGREEMENT
                        );
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("prescient: {}", error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        BenchCommand::Store(a) => {
            if let Err(e) = std::fs::create_dir_all(&a.dir) {
                eprintln!("prescient: cannot create {}: {e}", a.dir.display());
                return ExitCode::FAILURE;
            }
            match bench::store_bench(&a.dir, a.boots, a.keys, a.lookups) {
                Ok(rows) => {
                    println!("{}", bench::store_table(&rows));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("prescient: {}", error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[derive(Debug, clap::Args)]
struct TraceCaptureArgs {
    /// Where to write the trace.
    #[arg(long)]
    out: PathBuf,
    /// Sampling interval in microseconds.
    #[arg(long, default_value_t = 500)]
    interval_us: u64,
    /// Stop the program after this many seconds.
    #[arg(long, default_value_t = 120)]
    limit_s: u64,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn trace_capture(args: TraceCaptureArgs) -> ExitCode {
    let interval = std::time::Duration::from_micros(args.interval_us.max(50));
    let result = prescient::capture(
        &args.command,
        interval,
        std::time::Duration::from_secs(args.limit_s),
    )
    .and_then(|c| c.write(&args.out, interval).map(|()| c));
    match result {
        Ok(c) => {
            println!(
                "{} pages ({:.1} MiB) first touched over {:.0} ms in {} samples; exit status {:?}; trace written to {}",
                c.touches.len(),
                c.touches.len() as f64 / 256.0,
                c.wall_ms,
                c.samples,
                c.status,
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("prescient: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The configuration file (TOML; see deploy/prescient.toml). Flags below
    /// override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The hooks socket VMMs connect to [default: /run/prescient/hooks.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Append every received event to this file as JSON lines.
    #[arg(long)]
    event_log: Option<PathBuf>,
    /// Also allow this user id to connect (root and the daemon's own user always may).
    #[arg(long)]
    allow_uid: Vec<u32>,
    /// Drive VM balloons from the demand forecasts in this JSON file
    /// (`{"default": {"forecast": {"points": [{"at_s": 0, "demand_mib": 512}]},
    /// "limits": {...}}, "vms": {"<vm id>": {...}}}`): pre-balloon at boot,
    /// then deflate ahead of forecast growth and inflate after shrinkage.
    #[arg(long)]
    balloon_forecasts: Option<PathBuf>,
    /// The profile store (an SQLite file, created if missing)
    /// [default: /var/lib/prescient/prescient.db].
    #[arg(long)]
    store: Option<PathBuf>,
    /// Run without a profile store (plans stay empty).
    #[arg(long, conflicts_with = "store")]
    no_store: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Only record libvirt hook calls; do not act on the domains.
    #[arg(long)]
    no_libvirt: bool,
    /// The libvirt connection URI the daemon uses after a domain started
    /// [default: qemu:///system].
    #[arg(long)]
    libvirt_uri: Option<String>,
    /// libvirt's run directory (QEMU pid files are in qemu/ below it)
    /// [default: /run/libvirt].
    #[arg(long)]
    libvirt_run_dir: Option<PathBuf>,
    /// Host CPUs for libvirt vCPU threads when a domain names none (default: the daemon's own).
    #[arg(long)]
    libvirt_cpus: Option<String>,
    /// How often running libvirt domains are sampled, ms [default: 10000].
    #[arg(long)]
    libvirt_sample_ms: Option<u64>,
    /// Append what the daemon does to libvirt domains here (JSON lines).
    #[arg(long)]
    libvirt_record: Option<PathBuf>,
    /// The virsh program [default: virsh].
    #[arg(long)]
    virsh: Option<PathBuf>,
    /// The destination libvirt's URI for `prescient host drain`, `{host}`
    /// standing for the destination's host (`[libvirt] migrate_uri`, e.g.
    /// qemu+tcp://{host}/system); unset: a drain leaves libvirt domains.
    #[arg(long)]
    libvirt_migrate_uri: Option<String>,
    /// Memory this host may hand out to VMs, MiB: turns on the interruption
    /// coordinator (admission against this capacity, balloon shrinks,
    /// interruption of lower-priority interruptible VMs, deferral); also
    /// `[interrupt] capacity_mib`. The coordinator keeps its own ledger
    /// against this capacity; the resource pool's reservations run beside it.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    capacity_mib: Option<u64>,
    /// vCPUs this host may hand out to VMs [default: unlimited].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    capacity_vcpus: Option<u64>,
    /// Memory each VM keeps beyond what the coordinator's shrinks may take,
    /// MiB [default: 16].
    #[arg(long)]
    shrink_headroom_mib: Option<u64>,
    /// Run the shaping loop every N seconds (0: off) [default: 0].
    #[arg(long)]
    shape_interval_s: Option<u64>,
    /// Shaping policy: minimise-fragmentation, maximise-utilisation or
    /// favour-high-priority [default: maximise-utilisation].
    #[arg(long)]
    shape_policy: Option<prescient::shaping::ShapePolicy>,
    /// Shaping tuner reward: -(slack + lambda * shortfall) [default: 20].
    #[arg(long)]
    shape_lambda: Option<f64>,
    /// Write cpu.weight / cpu.max to a cgroup per VM holding its VMM process.
    #[arg(long)]
    shape_cgroups: bool,
    /// The forecasting model file (`prescient train --out`), served by the
    /// shaping loop where it measures better than the baselines and
    /// replaced by retraining [default: the store's path + ".model"].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Seconds between retraining runs (0: off) [default: 21600].
    #[arg(long)]
    retrain_interval_s: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The daemon's hooks socket.
    #[arg(long, default_value = "/run/prescient/hooks.sock")]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// How long to wait for the daemon, ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

fn status(args: StatusArgs) -> ExitCode {
    let timeout = std::time::Duration::from_millis(args.timeout_ms.clamp(10, 600_000));
    // Written, not printed: a closed pipe (`| head`) ends the output quietly.
    let out = |text: String| {
        use std::io::Write;
        let _ = std::io::stdout().lock().write_all(text.as_bytes());
        ExitCode::SUCCESS
    };
    match prescient::query_status(&args.socket, timeout) {
        Ok(s) if args.json => match serde_json::to_string_pretty(&s) {
            Ok(j) => out(j + "\n"),
            Err(e) => {
                eprintln!("prescient: cannot encode the status: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(s) => out(prescient::status_table(&s)),
        Err(e) => {
            eprintln!("prescient: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, clap::Args)]
struct CheckConfigArgs {
    /// The configuration file.
    path: PathBuf,
}

/// The configuration: the file (or the defaults), then the flags.
fn effective_config(args: &ServeArgs) -> Result<Config, prescient::ConfigError> {
    let mut c = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(s) = &args.socket {
        c.daemon.socket = s.clone();
    }
    if args.event_log.is_some() {
        c.daemon.event_log = args.event_log.clone();
    }
    c.daemon.allow_uids.extend(&args.allow_uid);
    if let Some(s) = &args.store {
        c.store.path = s.clone();
        c.store.enabled = true;
    }
    if args.no_store {
        c.store.enabled = false;
    }
    if args.metrics_listen.is_some() {
        c.daemon.metrics_listen = args.metrics_listen;
    }
    if args.balloon_forecasts.is_some() {
        c.balloon.forecasts = args.balloon_forecasts.clone();
    }
    if args.capacity_mib.is_some() {
        c.interrupt.capacity_mib = args.capacity_mib;
    }
    if args.capacity_vcpus.is_some() {
        c.interrupt.capacity_vcpus = args.capacity_vcpus;
    }
    if let Some(h) = args.shrink_headroom_mib {
        c.interrupt.shrink_headroom_mib = h;
    }
    let l = &mut c.libvirt;
    if args.no_libvirt {
        l.act = false;
    }
    if let Some(u) = &args.libvirt_uri {
        l.uri = u.clone();
    }
    if let Some(d) = &args.libvirt_run_dir {
        l.run_dir = d.clone();
    }
    if args.libvirt_cpus.is_some() {
        l.cpus = args.libvirt_cpus.clone();
    }
    if let Some(ms) = args.libvirt_sample_ms {
        l.sample_interval_ms = ms;
    }
    if args.libvirt_record.is_some() {
        l.record = args.libvirt_record.clone();
    }
    if let Some(v) = &args.virsh {
        l.virsh = v.clone();
    }
    if args.libvirt_migrate_uri.is_some() {
        l.migrate_uri = args.libvirt_migrate_uri.clone();
    }
    if let Some(n) = args.shape_interval_s {
        c.shaping.interval_s = n;
    }
    if let Some(p) = args.shape_policy {
        c.shaping.policy = p;
    }
    if let Some(l) = args.shape_lambda {
        c.shaping.lambda = l;
    }
    if args.shape_cgroups {
        c.shaping.cgroups = true;
    }
    if args.model.is_some() {
        c.forecast.model = args.model.clone();
    }
    if let Some(n) = args.retrain_interval_s {
        c.forecast.retrain_interval_s = n;
    }
    // Flags are checked like the file.
    c.validate(std::path::Path::new("(command line)"))?;
    Ok(c)
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn serve(args: ServeArgs) -> ExitCode {
    let c = match effective_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("prescient: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let mut config = ServerConfig::new(c.daemon.socket.clone());
    config.event_log = c.daemon.event_log.clone();
    config.allowed_uids = c.daemon.allow_uids.clone();
    config.policy = c.store_policy();
    config.pool = c.pool.clone();
    config.allocator = c.allocator.policy();
    if let Some(path) = &c.balloon.forecasts {
        match prescient::BalloonControl::load(path) {
            Ok(c) => config.balloon = Some(std::sync::Arc::new(c)),
            Err(e) => {
                eprintln!("prescient: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        }
    }
    config.libvirt = c.libvirt_agent();
    if let Some(ic) = c.interrupt_coordinator() {
        tracing::info!(
            capacity_mib = ic.capacity.memory_mib,
            capacity_vcpus = ic.capacity.vcpus,
            "interruption coordinator on"
        );
        config.interrupt = Some(std::sync::Arc::new(std::sync::Mutex::new(
            prescient::interrupt::Coordinator::new(ic),
        )));
    }
    if c.shaping.interval_s > 0 {
        // The model serves the shaping loop: loaded (or rejected) now.
        let online = std::sync::Arc::new(prescient::Online::new(
            c.forecast.clone(),
            c.store.enabled.then_some(c.store.path.as_path()),
            std::sync::Arc::clone(&config.metrics),
        ));
        config.online = Some(std::sync::Arc::clone(&online));
        match prescient::ShapingLoop::new(c.shaping.clone(), std::sync::Arc::clone(&config.metrics))
        {
            Ok(l) => config.shaping = Some(std::sync::Arc::new(l.with_online(online))),
            Err(e) => {
                eprintln!("prescient: {}", error_chain(&e));
                return ExitCode::from(2);
            }
        }
    }
    if config.online.is_none() && c.store.enabled && config.libvirt.is_some() {
        // No shaping loop: the libvirt agent's samples are still stored.
        config.online = Some(std::sync::Arc::new(prescient::Online::samples_only(
            c.forecast.clone(),
            std::sync::Arc::clone(&config.metrics),
        )));
    }
    match prescient::migration::Mover::new(
        c.migration.clone(),
        0.0,
        std::sync::Arc::clone(&config.metrics),
    ) {
        Ok(m) => config.migration = Some(std::sync::Arc::new(m.with_libvirt(c.libvirt_move()))),
        Err(e) => {
            eprintln!("prescient: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    }
    let shaping = config.shaping.clone();
    let online = config.online.clone();
    if c.store.enabled {
        if let Some(dir) = c.store.path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            eprintln!("prescient: cannot create {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        config.store = Some(c.store.path.clone());
    }
    let metrics = std::sync::Arc::clone(&config.metrics);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("prescient: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Signal handlers first: from the moment the socket exists a client
        // (or systemd) may send SIGTERM, and before the handlers are in
        // place that would kill the daemon without its orderly shutdown.
        let shutdown_signal = shutdown_signal();
        let server = match HooksServer::bind(config) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("prescient: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        if let Some(addr) = c.migration.listen {
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(source) => {
                    let e = prescient::migration::MigrationError::Listen { addr, source };
                    eprintln!("prescient: {}", error_chain(&e));
                    return ExitCode::FAILURE;
                }
            };
            let receiver = prescient::migration::Receiver::new(
                c.migration.labvm.clone(),
                c.migration.labvm_args.clone(),
                c.migration.advertise.unwrap_or_else(|| addr.ip()),
                c.daemon.socket.clone(),
            );
            tracing::info!(
                listen = %listener.local_addr().unwrap_or(addr),
                labvm = %receiver.labvm.display(),
                "taking live migrations from other hosts"
            );
            tokio::spawn(prescient::migration::serve_slots(
                listener,
                receiver,
                server.slot_admitter(),
                rx.clone(),
            ));
        }
        if let Some(addr) = c.daemon.metrics_listen {
            let rx = rx.clone();
            let listener = tokio::spawn(prescient::serve_metrics(addr, metrics, rx));
            tokio::spawn(async move {
                if let Ok(Err(e)) = listener.await {
                    tracing::error!("metrics endpoint on {addr} failed: {e}");
                }
            });
        }
        if let Some(l) = shaping {
            tokio::spawn(l.run(rx.clone()));
        }
        // Samples to the store and retraining: the store was opened (and
        // migrated) by `bind`.
        if let (Some(o), true) = (&online, c.store.enabled)
            && let Err(e) = o.start(&c.store.path)
        {
            eprintln!("prescient: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
        tokio::spawn(async move {
            shutdown_signal.await;
            tracing::info!("shutting down");
            let _ = tx.send(true);
        });
        server.serve(rx).await;
        if let Some(o) = &online {
            // Writes the queued samples before the process ends.
            o.shutdown();
        }
        ExitCode::SUCCESS
    })
}

/// Installs the SIGTERM and SIGINT handlers now and returns a future that
/// completes when either arrives.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // libvirt runs the hook; an unparsable command line must not
            // fail the domain (help and version still print as usual).
            if std::env::args().nth(1).as_deref() == Some("libvirt-hook") && e.use_stderr() {
                eprintln!("prescient libvirt-hook: {e}");
                return ExitCode::SUCCESS;
            }
            e.exit()
        }
    };
    if let Command::LibvirtHook(args) = cli.command {
        // Quiet: libvirt keeps what a hook writes to stderr in its own log.
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
            )
            .with_writer(std::io::stderr)
            .init();
        return libvirt_hook(args);
    }
    init_logging();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::CheckConfig(a) => match Config::load(&a.path) {
            Ok(c) => {
                println!("{}", toml::to_string_pretty(&c).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("prescient: {}", error_chain(&e));
                ExitCode::from(2)
            }
        },
        Command::Status(args) => status(args),
        Command::TraceCapture(args) => trace_capture(args),
        Command::Bench(cmd) => bench(cmd),
        Command::LibvirtHook(args) => libvirt_hook(args),
        Command::InstallLibvirtHook(args) => install_libvirt_hook(args),
        Command::ShapeReplay(args) => shape_replay(args),
        Command::Train(args) => forecast(forecast_cli::run_train(args)),
        Command::Eval(args) => forecast(forecast_cli::run_eval(args)),
        Command::Host(HostCommand::Drain(args)) => host_drain(&args),
        Command::Host(HostCommand::Undrain(args)) => {
            match prescient::request_undrain(&args.socket, std::time::Duration::from_secs(5)) {
                Ok(s) if !s.draining => {
                    eprintln!("this host takes new VMs again");
                    ExitCode::SUCCESS
                }
                Ok(_) => {
                    eprintln!("prescient host undrain: the daemon still reports draining");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("prescient host undrain: {}", error_chain(&e));
                    ExitCode::from(2)
                }
            }
        }
        Command::Gpu(cmd) => match gpu_cli::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("prescient gpu: {}", error_chain(e.as_ref()));
                ExitCode::FAILURE
            }
        },
    }
}

fn forecast(r: Result<(), models::ModelsError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prescient: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
