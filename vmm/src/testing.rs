//! Helpers for tests that need real hardware, shared by every crate's
//! `hw_kvm_` tests.

/// True when `/dev/kvm` can be opened. Otherwise prints
/// `SKIP <test>: <reason>` and returns false, or panics when the
/// environment variable `PRESCIENT_REQUIRE` (a comma-separated list) names
/// `kvm`, as CI sets it: there a missing KVM is a failure, not a skip.
#[allow(clippy::print_stdout)]
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            assert!(
                !required("kvm"),
                "{test}: /dev/kvm is required (PRESCIENT_REQUIRE) but cannot be opened: {e}"
            );
            println!("SKIP {test}: /dev/kvm not present ({e})");
            false
        }
    }
}

/// True when `PRESCIENT_REQUIRE` names `what`.
pub fn required(what: &str) -> bool {
    std::env::var("PRESCIENT_REQUIRE").is_ok_and(|v| v.split(',').any(|r| r.trim() == what))
}
