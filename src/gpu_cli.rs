//! `prescient gpu …`: the GPU inventory, recordings and reservations.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use accel::{
    Demand, Enforcement, FixtureSource, GpuSource, Inventory, Ledger, NodeDistances, NvmlSource,
    ReleaseReason, record, reservations_table,
};

type CliResult = Result<(), Box<dyn std::error::Error>>;

/// GPU commands.
#[derive(Debug, clap::Subcommand)]
pub enum GpuCommand {
    /// Print every GPU: memory, utilisation, processes, compute and MIG mode,
    /// ECC and retired pages.
    Inventory(InventoryArgs),
    /// Record every NVML reading of this host into a JSON fixture (with the
    /// date, host, driver, NVML and CUDA versions and GPU models), or turn an
    /// nvidia-smi XML report into one (`--fixture`).
    Record(RecordArgs),
    /// List the GPU reservations in a store.
    Reservations(ReservationsArgs),
    /// Choose a GPU or MIG instance for a VM's demand and reserve it.
    Reserve(ReserveArgs),
    /// Release every GPU reservation of a VM.
    Release(ReleaseArgs),
}

#[derive(Debug, clap::Args)]
pub struct InventoryArgs {
    /// Read a recording (JSON fixture or `nvidia-smi -q -x` output) instead
    /// of the live driver.
    #[arg(long)]
    fixture: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// Where to write the fixture.
    #[arg(long)]
    out: PathBuf,
    /// Record from this nvidia-smi XML report (or fixture) instead of NVML.
    #[arg(long)]
    fixture: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ReservationsArgs {
    /// The companion's store (`prescient serve --store`).
    #[arg(long)]
    store: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReserveArgs {
    /// The companion's store.
    #[arg(long)]
    store: PathBuf,
    /// The VM.
    #[arg(long)]
    vm: String,
    /// Predicted GPU memory, MiB.
    #[arg(long)]
    mem_mib: u64,
    /// The VM's NUMA node.
    #[arg(long)]
    numa_node: Option<u32>,
    /// Hold the device exclusively.
    #[arg(long)]
    exclusive: bool,
    /// The mdev/vGPU type the VM gets.
    #[arg(long)]
    mdev_profile: Option<String>,
    /// Place against a recording instead of the live driver.
    #[arg(long)]
    fixture: Option<PathBuf>,
    /// Also enforce the reservation on the device (exclusive compute mode,
    /// vfio-pci). Not implemented: refused before anything is recorded.
    #[arg(long)]
    enforce: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReleaseArgs {
    /// The companion's store.
    #[arg(long)]
    store: PathBuf,
    /// The VM.
    #[arg(long)]
    vm: String,
}

fn source(fixture: Option<&Path>) -> Result<Box<dyn GpuSource>, accel::InventoryError> {
    Ok(match fixture {
        Some(p) => Box::new(FixtureSource::load(p)?),
        None => Box::new(NvmlSource::open()?),
    })
}

#[allow(clippy::print_stdout)]
pub fn run(cmd: GpuCommand) -> CliResult {
    match cmd {
        GpuCommand::Inventory(a) => {
            let inv = Inventory::read(source(a.fixture.as_deref())?.as_ref())?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&inv)?);
            } else {
                print!("{}", inv.table());
            }
        }
        GpuCommand::Record(a) => {
            let src = source(a.fixture.as_deref())?;
            let f = record(src.as_ref(), SystemTime::now(), accel::hostname())?;
            std::fs::write(&a.out, f.to_json() + "\n")
                .map_err(|e| format!("cannot write {}: {e}", a.out.display()))?;
            println!(
                "recorded {} GPU(s) ({}) from {} into {}",
                f.snapshot.gpus.len(),
                f.provenance.gpu_models.join(", "),
                f.provenance.source,
                a.out.display()
            );
        }
        GpuCommand::Reservations(a) => {
            let rs = Ledger::open(&a.store)?.reservations()?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&rs)?);
            } else {
                print!("{}", reservations_table(&rs));
            }
        }
        GpuCommand::Reserve(a) => {
            let enforcement = Enforcement { enabled: a.enforce };
            // Refused before anything is recorded when it cannot be done.
            enforcement.check()?;
            let inv = Inventory::read(source(a.fixture.as_deref())?.as_ref())?;
            let mut ledger = Ledger::open(&a.store)?;
            let demand = Demand {
                vm: a.vm,
                mem_mib: a.mem_mib,
                numa_node: a.numa_node,
                exclusive: a.exclusive,
            };
            let r = ledger.reserve(
                &inv,
                &demand,
                a.mdev_profile.as_deref(),
                &NodeDistances::read(Path::new("/sys")),
                SystemTime::now(),
            )?;
            print!("{}", reservations_table(std::slice::from_ref(&r)));
            println!("{}", enforcement.apply(&r)?);
        }
        GpuCommand::Release(a) => {
            let gone = Ledger::open(&a.store)?.release(&a.vm, ReleaseReason::Operator)?;
            println!("released {} reservation(s) of {}", gone.len(), a.vm);
        }
    }
    Ok(())
}
