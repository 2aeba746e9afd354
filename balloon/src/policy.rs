//! Balloon policy: a pure function from a demand forecast, the guest's
//! statistics and limits to a balloon target. Time is injected (seconds
//! since the VM started), so tests replay traces.
//!
//! The forecast is plain data: a step function of memory demand over time
//! (the quantile the operator chose, e.g. p90), made by whatever forecaster
//! the companion runs. The policy
//! - **pre-balloons**: at start the balloon takes what the forecast says
//!   the guest will not use ([`initial_target`]);
//! - **deflates ahead of predicted growth and inflates after predicted
//!   shrinkage**: it plans for the highest demand in the next `lead_s`
//!   seconds, so memory is back in the guest before demand arrives;
//! - keeps **limits**: the guest keeps at least `floor_mib`, the balloon
//!   moves at most `max_rate_mib_s` (except that deflation under memory
//!   pressure seen in the guest's statistics is not slowed down).

use serde::{Deserialize, Serialize};

use crate::error::BalloonError;

/// One step of a demand forecast.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForecastPoint {
    /// Seconds since the VM started from which this demand holds.
    pub at_s: f64,
    /// Memory the guest is forecast to use, in MiB.
    pub demand_mib: u64,
}

/// Forecast memory demand of one VM: a step function, points sorted by time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DemandForecast {
    /// The steps.
    pub points: Vec<ForecastPoint>,
}

/// Limits the policy keeps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalloonLimits {
    /// Memory the guest always keeps, in MiB (the balloon never goes past
    /// guest RAM minus this).
    pub floor_mib: u64,
    /// Largest change of the target per second, in MiB.
    pub max_rate_mib_s: u64,
    /// How far ahead to look for growth, in seconds.
    pub lead_s: f64,
    /// Memory kept on top of the forecast demand, in MiB.
    pub headroom_mib: u64,
}

impl Default for BalloonLimits {
    fn default() -> Self {
        BalloonLimits {
            floor_mib: 64,
            max_rate_mib_s: 512,
            lead_s: 10.0,
            headroom_mib: 32,
        }
    }
}

/// One decision's input.
#[derive(Clone, Copy, Debug)]
pub struct PolicyInput<'a> {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The forecast.
    pub forecast: &'a DemandForecast,
    /// The limits.
    pub limits: &'a BalloonLimits,
    /// Now, in seconds since the VM started.
    pub now_s: f64,
    /// The target currently set, in MiB.
    pub current_target_mib: u64,
    /// Seconds since the current target was set (bounds the step size).
    pub since_last_s: f64,
    /// Memory the guest reports available (its statistics), in MiB.
    pub guest_available_mib: Option<u64>,
}

impl DemandForecast {
    /// Checks that the points are finite, non-negative and sorted.
    pub fn validate(&self) -> Result<(), BalloonError> {
        let mut last = f64::NEG_INFINITY;
        for p in &self.points {
            if !p.at_s.is_finite() || p.at_s < 0.0 || p.at_s < last {
                return Err(BalloonError::Policy(format!(
                    "forecast time {} is negative, not finite or out of order",
                    p.at_s
                )));
            }
            last = p.at_s;
        }
        Ok(())
    }

    /// The demand at time `t` (the first step before the forecast starts; 0
    /// for an empty forecast).
    pub fn demand_at(&self, t: f64) -> u64 {
        self.points
            .iter()
            .rev()
            .find(|p| p.at_s <= t)
            .or(self.points.first())
            .map_or(0, |p| p.demand_mib)
    }

    /// The highest demand in `[from, to]`.
    pub fn peak(&self, from: f64, to: f64) -> u64 {
        self.points
            .iter()
            .filter(|p| p.at_s > from && p.at_s <= to)
            .map(|p| p.demand_mib)
            .fold(self.demand_at(from), u64::max)
    }
}

fn check(input: &PolicyInput<'_>) -> Result<(), BalloonError> {
    input.forecast.validate()?;
    let l = input.limits;
    if l.floor_mib > input.memory_mib {
        return Err(BalloonError::Policy(format!(
            "floor of {} MiB exceeds guest RAM of {} MiB",
            l.floor_mib, input.memory_mib
        )));
    }
    if !l.lead_s.is_finite() || l.lead_s < 0.0 {
        return Err(BalloonError::Policy(format!("lead time {} s", l.lead_s)));
    }
    if !input.now_s.is_finite() || !input.since_last_s.is_finite() || input.since_last_s < 0.0 {
        return Err(BalloonError::Policy("time is not finite".into()));
    }
    Ok(())
}

/// The balloon a VM should start with: guest RAM minus the demand forecast
/// over the first `lead_s` seconds (plus headroom), within the floor.
pub fn initial_target(
    memory_mib: u64,
    forecast: &DemandForecast,
    limits: &BalloonLimits,
) -> Result<u64, BalloonError> {
    let input = PolicyInput {
        memory_mib,
        forecast,
        limits,
        now_s: 0.0,
        current_target_mib: 0,
        since_last_s: 0.0,
        guest_available_mib: None,
    };
    check(&input)?;
    Ok(wanted(&input))
}

/// What the forecast alone asks for, within the floor: the balloon that
/// leaves the guest its demand over the next `lead_s` seconds, and that can
/// still shrink, at the maximum rate, to what every later step of the
/// forecast needs `lead_s` before that step arrives.
fn wanted(input: &PolicyInput<'_>) -> u64 {
    let l = input.limits;
    let balloon_for = |demand: u64| {
        let usable = demand
            .saturating_add(l.headroom_mib)
            .max(l.floor_mib)
            .min(input.memory_mib);
        input.memory_mib - usable
    };
    let mut target = balloon_for(input.forecast.peak(input.now_s, input.now_s + l.lead_s));
    for p in input
        .forecast
        .points
        .iter()
        .filter(|p| p.at_s > input.now_s)
    {
        let slack_s = (p.at_s - l.lead_s - input.now_s).max(0.0);
        // Saturating float-to-int conversion; inputs are finite (checked).
        #[allow(clippy::cast_possible_truncation)]
        let reach = (l.max_rate_mib_s as f64 * slack_s) as u64;
        target = target.min(balloon_for(p.demand_mib).saturating_add(reach));
    }
    target
}

/// The next balloon target, in MiB.
pub fn balloon_target(input: &PolicyInput<'_>) -> Result<u64, BalloonError> {
    check(input)?;
    let l = input.limits;
    let max_balloon = input.memory_mib - l.floor_mib;
    let current = input.current_target_mib.min(max_balloon);
    let mut target = wanted(input);
    // Memory pressure in the guest: give back at least the shortfall, now.
    if let Some(avail) = input.guest_available_mib
        && avail < l.headroom_mib
    {
        let urgent = current.saturating_sub(l.headroom_mib - avail);
        if urgent < target.min(current) {
            return Ok(urgent);
        }
    }
    // Rate limit, in both directions.
    let step_f = (l.max_rate_mib_s as f64 * input.since_last_s).floor();
    // Saturating float-to-int conversion (NaN cannot occur: inputs are checked).
    #[allow(clippy::cast_possible_truncation)]
    let step = step_f as u64;
    target = if target > current {
        current.saturating_add(step).min(target)
    } else {
        current.saturating_sub(step).max(target)
    };
    Ok(target.min(max_balloon))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forecast(points: &[(f64, u64)]) -> DemandForecast {
        DemandForecast {
            points: points
                .iter()
                .map(|&(at_s, demand_mib)| ForecastPoint { at_s, demand_mib })
                .collect(),
        }
    }

    #[test]
    fn pre_balloon_takes_what_the_forecast_leaves_unused() {
        let f = forecast(&[(0.0, 300), (60.0, 900)]);
        let l = BalloonLimits {
            floor_mib: 128,
            max_rate_mib_s: 100,
            lead_s: 10.0,
            headroom_mib: 20,
        };
        assert_eq!(initial_target(1024, &f, &l).unwrap(), 1024 - 320);
        // Demand under the floor: the floor wins.
        let small = forecast(&[(0.0, 10)]);
        assert_eq!(initial_target(1024, &small, &l).unwrap(), 1024 - 128);
        // Demand over RAM: no balloon.
        let big = forecast(&[(0.0, 5000)]);
        assert_eq!(initial_target(1024, &big, &l).unwrap(), 0);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let l = BalloonLimits::default();
        let unsorted = forecast(&[(5.0, 1), (1.0, 2)]);
        assert!(initial_target(1024, &unsorted, &l).is_err());
        let nan = forecast(&[(f64::NAN, 1)]);
        assert!(initial_target(1024, &nan, &l).is_err());
        let high_floor = BalloonLimits {
            floor_mib: 2048,
            ..l
        };
        assert!(initial_target(1024, &forecast(&[]), &high_floor).is_err());
    }

    /// Replays a forecast second by second: the balloon deflates before the
    /// predicted growth arrives, inflates after the predicted shrinkage,
    /// never moves faster than the rate and never crosses the floor.
    #[test]
    fn replay_deflates_ahead_of_growth_within_rate_and_floor() {
        let memory = 2048;
        let f = forecast(&[(0.0, 256), (100.0, 1536), (200.0, 512)]);
        let l = BalloonLimits {
            floor_mib: 256,
            max_rate_mib_s: 128,
            lead_s: 15.0,
            headroom_mib: 64,
        };
        let mut target = initial_target(memory, &f, &l).unwrap();
        assert_eq!(target, memory - 320);
        let mut trace = Vec::new();
        for t in 1..=300u32 {
            let now = f64::from(t);
            let next = balloon_target(&PolicyInput {
                memory_mib: memory,
                forecast: &f,
                limits: &l,
                now_s: now,
                current_target_mib: target,
                since_last_s: 1.0,
                guest_available_mib: None,
            })
            .unwrap();
            assert!(
                next.abs_diff(target) <= l.max_rate_mib_s,
                "t={t}: {target} -> {next}"
            );
            assert!(next <= memory - l.floor_mib, "t={t}: floor crossed");
            target = next;
            trace.push((t, target));
        }
        let at = |s: u32| trace[(s - 1) as usize].1;
        // The guest has its memory lead_s before the growth at 100 s...
        assert_eq!(memory - at(85), 1536 + 64);
        assert!(
            memory - at(100) >= 1536 + 64,
            "usable at 100 s: {}",
            memory - at(100)
        );
        // ... and the balloon stayed up until deflating at the maximum rate
        // was needed to get there (1280 MiB at 128 MiB/s: 10 s).
        assert_eq!(at(75), memory - 320);
        assert!(at(76) < memory - 320);
        // After the shrinkage at 200 s, the balloon grows back, rate-limited.
        assert_eq!(memory - at(240), 512 + 64);
        assert!(at(201) < memory - 576);
    }

    #[test]
    fn memory_pressure_deflates_at_once() {
        let f = forecast(&[(0.0, 256)]);
        let l = BalloonLimits {
            floor_mib: 64,
            max_rate_mib_s: 10,
            lead_s: 0.0,
            headroom_mib: 100,
        };
        let t = balloon_target(&PolicyInput {
            memory_mib: 1024,
            forecast: &f,
            limits: &l,
            now_s: 5.0,
            current_target_mib: 600,
            since_last_s: 1.0,
            guest_available_mib: Some(20),
        })
        .unwrap();
        assert_eq!(t, 600 - 80);
    }
}
