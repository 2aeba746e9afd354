//! The shaping loop driving a real lab VM's balloon on real KVM: a real
//! `prescient serve --shape-interval-s 1`, labvm reporting its balloon
//! status with the guest driver's own statistics; the loop forecasts the
//! guest's memory in use and inflates the balloon down to that forecast
//! plus its margin, and the guest follows.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Server, free_port, scrape};

use labvm::Workload;
use labvm::testing::kvm_or_skip;
use vmm_hooks::EventKind;

#[test]
fn hw_kvm_shaping_loop_inflates_a_lab_guest_balloon_to_its_forecast() {
    const NAME: &str = "hw_kvm_shaping_loop_inflates_a_lab_guest_balloon_to_its_forecast";
    if !kvm_or_skip(NAME) {
        return;
    }
    let port = free_port();
    let server = Server::start_args(
        false,
        &[
            "--shape-interval-s",
            "1",
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    // 512 MiB guest that keeps 200 MiB in use (above the default floor of
    // 128 MiB) and frees the rest.
    common::run_balloon_labvm(
        &server,
        "shape-kvm",
        512,
        Workload::from_spec("balloon:256:200:lazy", 0).unwrap(),
    );

    let statuses: Vec<(u64, u64, Option<u64>)> = server
        .events()
        .iter()
        .filter_map(|r| match &r.event.kind {
            EventKind::Balloon(s) => Some((
                s.target_mib,
                s.actual_mib,
                s.guest_stat("total-memory")
                    .zip(s.guest_stat("available-memory"))
                    .filter(|_| s.stats_updates > 0)
                    .map(|(t, a)| (t - a) >> 20),
            )),
            _ => None,
        })
        .collect();
    // The guest's own statistics said how much it uses.
    let used = statuses.iter().filter_map(|s| s.2).max().unwrap();
    assert!((190..=280).contains(&used), "used {used} MiB: {statuses:?}");
    // The loop set a target and the guest inflated to it.
    let target = statuses.iter().map(|s| s.0).max().unwrap();
    assert!(target > 0, "no balloon target: {statuses:?}");
    assert!(
        statuses.iter().any(|s| s.0 == target && s.1 == target),
        "the guest never reached {target}: {statuses:?}"
    );
    // It leaves the guest at least what it used, and at most that plus the
    // largest margin (100 %) and rounding.
    let grant = 512 - target;
    assert!(
        grant >= used && grant <= 2 * used + 2,
        "grant {grant}, used {used}"
    );
    let m = scrape(port);
    assert!(
        m.contains(r#"prescient_shape_actions_total{kind="balloon-target"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"prescient_balloon_targets_total{kind="inflate"}"#),
        "{m}"
    );
}
