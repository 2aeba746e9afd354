//! The companion's side of ballooning: per-VM demand forecasts (plain data,
//! from a file) turned into balloon targets by the pure policy in
//! `balloon::policy`. Before boot it pre-balloons (the boot plan carries the
//! part of memory the forecast says the VM will not use); on each `balloon`
//! status event it answers with a new target when the policy moves it
//! (ahead of predicted growth, after predicted shrinkage, within the floor
//! and the maximum rate, and at once under memory pressure seen in the
//! guest's statistics). Time is measured from the VM's `created` event.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use balloon::policy::{self, BalloonLimits, DemandForecast, PolicyInput};
use serde::{Deserialize, Serialize};
use vmm_hooks::{BalloonStatus, Event, EventKind, HookReply};

/// Forecast and limits for one VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmBalloonPlan {
    /// Memory demand over time since the VM was created.
    pub forecast: DemandForecast,
    /// Floor, rate, lead time and headroom.
    #[serde(default)]
    pub limits: BalloonLimits,
}

/// The forecasts file (`prescient serve --balloon-forecasts FILE`, JSON):
/// a plan per VM id, and a default for VMs not named.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BalloonForecasts {
    /// For VMs not listed in `vms`.
    #[serde(default)]
    pub default: Option<VmBalloonPlan>,
    /// By VM id.
    #[serde(default)]
    pub vms: HashMap<String, VmBalloonPlan>,
}

/// Why the forecasts file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BalloonControlError {
    /// The file cannot be read.
    #[error("cannot read balloon forecasts {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error("balloon forecasts {path} are malformed")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A forecast is unusable (unsorted, negative or non-finite times).
    #[error("balloon forecast for {vm} in {path}")]
    Forecast {
        /// The file.
        path: PathBuf,
        /// The VM id (or `default`).
        vm: String,
        /// Why.
        #[source]
        source: balloon::BalloonError,
    },
}

#[derive(Debug)]
struct Track {
    created: Instant,
    memory_mib: Option<u64>,
    last_decision: Instant,
}

impl Track {
    /// A VM first seen at `now`.
    fn new(now: Instant) -> Self {
        Track {
            created: now,
            memory_mib: None,
            last_decision: now,
        }
    }
}

/// Balloon control for the daemon.
#[derive(Debug, Default)]
pub struct BalloonControl {
    forecasts: BalloonForecasts,
    vms: Mutex<HashMap<String, Track>>,
}

impl BalloonControl {
    /// Control with these forecasts (checked).
    pub fn new(forecasts: BalloonForecasts, origin: &Path) -> Result<Self, BalloonControlError> {
        let named = forecasts
            .vms
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .chain(forecasts.default.iter().map(|v| ("default", v)));
        for (vm, plan) in named {
            plan.forecast
                .validate()
                .map_err(|source| BalloonControlError::Forecast {
                    path: origin.to_path_buf(),
                    vm: vm.to_string(),
                    source,
                })?;
        }
        Ok(BalloonControl {
            forecasts,
            vms: Mutex::new(HashMap::new()),
        })
    }

    /// Reads a forecasts file.
    pub fn load(path: &Path) -> Result<Self, BalloonControlError> {
        let text = std::fs::read_to_string(path).map_err(|source| BalloonControlError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let forecasts =
            serde_json::from_str(&text).map_err(|source| BalloonControlError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        Self::new(forecasts, path)
    }

    fn plan_for(&self, vm: &str) -> Option<&VmBalloonPlan> {
        self.forecasts
            .vms
            .get(vm)
            .or(self.forecasts.default.as_ref())
    }

    /// Adjusts the server's `reply` to `event` at `now`: adds a pre-balloon
    /// target to before-boot plans, answers balloon status with targets.
    pub fn answer(&self, event: &Event, reply: HookReply, now: Instant) -> HookReply {
        let vm = event.vm.vm_id.as_str();
        let mut vms = self
            .vms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &event.kind {
            EventKind::Created { spec } => {
                vms.insert(
                    vm.to_string(),
                    Track {
                        created: now,
                        memory_mib: Some(spec.memory_mib),
                        last_decision: now,
                    },
                );
                reply
            }
            EventKind::BeforeBoot { ram, .. } => {
                let Some(plan) = self.plan_for(vm) else {
                    return reply;
                };
                let track = vms.entry(vm.to_string()).or_insert_with(|| Track::new(now));
                let memory_mib = track.memory_mib.unwrap_or(ram.len >> 20);
                track.memory_mib = Some(memory_mib);
                match (
                    reply,
                    policy::initial_target(memory_mib, &plan.forecast, &plan.limits),
                ) {
                    (HookReply::Plan(p), Ok(target)) => {
                        tracing::info!(vm, target_mib = target, "pre-balloon");
                        track.last_decision = now;
                        HookReply::Plan(p.with_balloon_target_mib(target))
                    }
                    (reply, Err(e)) => {
                        tracing::warn!(vm, "no pre-balloon: {e}");
                        reply
                    }
                    (reply, Ok(_)) => reply,
                }
            }
            EventKind::Balloon(status) => {
                let Some(plan) = self.plan_for(vm) else {
                    return reply;
                };
                let track = vms.entry(vm.to_string()).or_insert_with(|| Track::new(now));
                let decided = decide(plan, status, track, now);
                track.last_decision = now;
                match decided {
                    Ok(Some(target)) => {
                        tracing::debug!(vm, target_mib = target, "balloon target");
                        HookReply::BalloonTarget {
                            target_mib: target,
                            prefault_mib: 0,
                        }
                    }
                    Ok(None) => reply,
                    Err(e) => {
                        tracing::warn!(vm, "balloon policy: {e}");
                        reply
                    }
                }
            }
            EventKind::BalloonUnresponsive {
                target_mib,
                actual_mib,
                stalled_ms,
            } => {
                tracing::warn!(
                    vm,
                    target_mib,
                    actual_mib,
                    stalled_ms,
                    "guest ignores its balloon target"
                );
                reply
            }
            EventKind::Stopped { .. } => {
                vms.remove(vm);
                reply
            }
            _ => reply,
        }
    }
}

/// The new target for a status, if it differs from the current one.
fn decide(
    plan: &VmBalloonPlan,
    status: &BalloonStatus,
    track: &Track,
    now: Instant,
) -> Result<Option<u64>, balloon::BalloonError> {
    let available = status
        .guest_stat("available-memory")
        .filter(|_| status.stats_updates > 0)
        .map(|b| b >> 20);
    let target = policy::balloon_target(&PolicyInput {
        memory_mib: status.memory_mib,
        forecast: &plan.forecast,
        limits: &plan.limits,
        now_s: now.saturating_duration_since(track.created).as_secs_f64(),
        current_target_mib: status.target_mib,
        since_last_s: now
            .saturating_duration_since(track.last_decision)
            .as_secs_f64(),
        guest_available_mib: available,
    })?;
    // A guest that took pages back under memory pressure (DEFLATE_ON_OOM)
    // needs them: never ask for more than it kept in the balloon.
    let target = if status.deflated_on_oom {
        target.min(status.actual_mib)
    } else {
        target
    };
    Ok((target != status.target_mib).then_some(target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmm_hooks::{BootPlan, GuestRange, VmIdentity, VmSpec};

    fn event(kind: EventKind) -> Event {
        Event {
            vm: VmIdentity {
                vm_id: "vm-1".into(),
                image_digest: "i".into(),
                package_digest: "p".into(),
            },
            seq: 0,
            at_unix_ms: 0,
            kind,
        }
    }

    fn control() -> BalloonControl {
        let json = r#"{"default": {"forecast": {"points": [
            {"at_s": 0, "demand_mib": 128}, {"at_s": 30, "demand_mib": 768}]},
            "limits": {"floor_mib": 64, "max_rate_mib_s": 100, "lead_s": 5, "headroom_mib": 32}}}"#;
        BalloonControl::new(serde_json::from_str(json).unwrap(), Path::new("t")).unwrap()
    }

    /// Replays a VM's life through the control, with time injected.
    #[test]
    fn replay_pre_balloons_then_deflates_ahead_of_forecast_growth() {
        let c = control();
        let t0 = Instant::now();
        let created = event(EventKind::Created {
            spec: VmSpec {
                vcpus: 1,
                memory_mib: 1024,
                vmm: "labvm".into(),
                priority: 0,
                interruptible: false,
            },
        });
        assert_eq!(c.answer(&created, HookReply::Ack, t0), HookReply::Ack);
        let bb = event(EventKind::BeforeBoot {
            vcpu_tids: vec![1],
            ram: GuestRange {
                start: 0,
                len: 1 << 30,
            },
            admission: Default::default(),
        });
        let plan = c
            .answer(&bb, HookReply::Plan(BootPlan::made_by("t")), t0)
            .into_plan();
        assert_eq!(plan.balloon_target_mib, Some(1024 - 160));
        // The guest follows every target at once; one status per second.
        let mut target = 1024 - 160;
        let mut first_deflate = None;
        for s in 1..=60u64 {
            let mut st = BalloonStatus::new(1024);
            st.target_mib = target;
            st.actual_mib = target;
            let reply = c.answer(
                &event(EventKind::Balloon(st)),
                HookReply::Ack,
                t0 + Duration::from_secs(s),
            );
            if let HookReply::BalloonTarget { target_mib, .. } = reply {
                assert!(target_mib.abs_diff(target) <= 100, "rate at {s} s");
                if target_mib < target && first_deflate.is_none() {
                    first_deflate = Some(s);
                }
                target = target_mib;
            }
            if s == 30 {
                // Growth to 768 MiB arrives at 30 s: the guest already has it.
                assert!(
                    1024 - target >= 768 + 32,
                    "usable {} at 30 s",
                    1024 - target
                );
            }
        }
        // Deflating 640 MiB at 100 MiB/s takes 6.4 s, done lead_s (5 s)
        // before the growth at 30 s: it starts at 19 s, not earlier.
        assert_eq!(first_deflate, Some(19));
        assert_eq!(target, 1024 - 800);
    }

    #[test]
    fn guest_that_deflated_on_oom_is_not_asked_to_give_the_pages_back() {
        let c = control();
        let t0 = Instant::now();
        let mut st = BalloonStatus::new(1024);
        st.target_mib = 864;
        st.actual_mib = 700;
        st.deflated_on_oom = true;
        let reply = c.answer(
            &event(EventKind::Balloon(st)),
            HookReply::Ack,
            t0 + Duration::from_secs(1),
        );
        assert_eq!(
            reply,
            HookReply::BalloonTarget {
                target_mib: 700,
                prefault_mib: 0
            }
        );
    }

    #[test]
    fn vm_without_forecast_is_left_alone_and_bad_files_are_refused() {
        let c = BalloonControl::default();
        let st = BalloonStatus::new(1024);
        assert_eq!(
            c.answer(
                &event(EventKind::Balloon(st)),
                HookReply::Ack,
                Instant::now()
            ),
            HookReply::Ack
        );
        let bad = r#"{"default": {"forecast": {"points": [{"at_s": 5, "demand_mib": 1}, {"at_s": 1, "demand_mib": 2}]}}}"#;
        let err = BalloonControl::new(serde_json::from_str(bad).unwrap(), Path::new("f.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("default") && err.contains("f.json"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        std::fs::write(&p, "{not json").unwrap();
        assert!(matches!(
            BalloonControl::load(&p),
            Err(BalloonControlError::Parse { .. })
        ));
    }
}
