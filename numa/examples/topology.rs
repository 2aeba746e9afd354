//! Print a host topology as JSON, the free capacity the planner sees, and
//! where the cgroup controllers live.
//!
//! `cargo run -p numa --example topology [-- --xml FILE | --synthetic DESC]`
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use numa::{CgroupLayout, HostTopology, PlacementPolicy, Planner};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let topo = match args.as_slice() {
        [] => HostTopology::live(),
        [flag, path] if flag == "--xml" => HostTopology::from_xml_file(path),
        [flag, desc] if flag == "--synthetic" => HostTopology::from_synthetic(desc),
        _ => {
            eprintln!("usage: topology [--xml FILE | --synthetic DESC]");
            return ExitCode::from(2);
        }
    };
    let topo = match topo {
        Ok(t) => t,
        Err(e) => {
            eprintln!("topology: {e}");
            return ExitCode::from(1);
        }
    };
    match serde_json::to_string_pretty(&topo) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("topology: {e}");
            return ExitCode::from(1);
        }
    }
    let planner = Planner::new(&topo, PlacementPolicy::default());
    for c in planner.capacity(&planner.empty_ledger()) {
        println!(
            "node {}: {} vCPU slots, {} whole cores, {} MiB for VMs",
            c.node,
            c.free_vcpus,
            c.free_cores,
            c.free_memory_bytes >> 20
        );
    }
    if args.is_empty() {
        match CgroupLayout::detect() {
            Ok(l) => println!("{}", l.summary()),
            Err(e) => println!("cgroups: {e}"),
        }
    }
    ExitCode::SUCCESS
}
