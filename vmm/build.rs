//! Assembles the lab guest (`guest/lab.S`) into a flat binary with the
//! GNU assembler and linker already on the machine (binutils); nothing is
//! downloaded. The binary is linked to run at guest-physical 0x100000.

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
}
