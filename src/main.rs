//! The `prescient` command line.
fn main() {}
