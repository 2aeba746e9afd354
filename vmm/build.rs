//! Assembles the lab guest (`guest/lab.S`) into a flat binary with the
//! GNU assembler and linker already on the machine (binutils); nothing is
//! downloaded. The binary is linked to run at guest-physical 0x100000.
//!
//! Also builds the lab guest's virtio-balloon driver (`guest/balloon_driver.rs`),
//! a freestanding `#![no_std]` Rust program, with the same rustc that builds
//! this crate (no extra target needed: it is linked without libc or start
//! files by `guest/driver.ld` at 0x180000 and flattened with objcopy).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let src = PathBuf::from("guest/lab.S");
    println!("cargo:rerun-if-changed={}", src.display());
    let obj = out.join("lab.o");
    let bin = out.join("lab.bin");
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld")
        .args([
            "-Ttext=0x100000",
            "--oformat",
            "binary",
            "-e",
            "_start",
            "-o",
        ])
        .arg(&bin)
        .arg(&obj));

    let driver = PathBuf::from("guest/balloon_driver.rs");
    let script = PathBuf::from("guest/driver.ld");
    println!("cargo:rerun-if-changed={}", driver.display());
    println!("cargo:rerun-if-changed={}", script.display());
    let script_abs = std::fs::canonicalize(&script).expect("guest/driver.ld exists");
    let elf = out.join("balloon_driver.elf");
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    run(Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "bin",
            "--crate-name",
            "balloon_driver",
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "relocation-model=static",
            "-C",
            "target-cpu=x86-64",
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .arg("-C")
        .arg(format!("link-arg=-T{}", script_abs.display()))
        .arg("-o")
        .arg(&elf)
        .arg(&driver));
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(out.join("balloon_driver.bin")));
}
