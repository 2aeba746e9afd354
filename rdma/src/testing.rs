//! Helpers for this crate's hardware tests (`hw_rdma_`), in the style of
//! `labvm::testing`: a test that needs an RDMA device prints
//! `SKIP <test>: <reason>` and returns where there is none, unless the
//! environment variable `PRESCIENT_REQUIRE` (a comma-separated list) names
//! `rdma`, as CI on an RDMA host sets it: there a missing device fails.

/// True when `PRESCIENT_REQUIRE` names `what`.
pub fn required(what: &str) -> bool {
    std::env::var("PRESCIENT_REQUIRE").is_ok_and(|v| v.split(',').any(|r| r.trim() == what))
}

/// The first RDMA device's name, or `None` after printing
/// `SKIP <test>: <reason>` (a panic instead under `PRESCIENT_REQUIRE=rdma`).
#[cfg(feature = "rdma")]
#[allow(clippy::print_stdout)]
pub fn rdma_device_or_skip(test: &str) -> Option<String> {
    let why = match crate::verbs::list_devices() {
        Ok(d) if !d.is_empty() => return d.into_iter().next(),
        Ok(_) => "no RDMA device (ibv_get_device_list found none)".to_string(),
        Err(e) => format!("cannot list RDMA devices: {e}"),
    };
    assert!(
        !required("rdma"),
        "{test}: an RDMA device is required (PRESCIENT_REQUIRE) but: {why}"
    );
    println!("SKIP {test}: {why}");
    None
}
