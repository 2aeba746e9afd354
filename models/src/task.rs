//! The next-hour quantile task of `EVALUATION.md`: decision times, targets
//! and the post-restart subset.

use serde::{Deserialize, Serialize};

use crate::trace::{Grid, SLOTS_PER_DAY, SLOTS_PER_HOUR};

/// Which question a case asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Every full hour with enough history: forecast the next hour.
    NextHour,
    /// After a gap of 30 minutes or more: forecast the first full hour after
    /// the restart from the history before the gap.
    PostRestart,
}

impl Task {
    /// Name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Task::NextHour => "next_hour",
            Task::PostRestart => "post_restart",
        }
    }
}

/// One decision of one metric of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Which task.
    pub task: Task,
    /// The decision time `t` as a slot number (`t = 300 * decision_slot`).
    pub decision_slot: i64,
    /// The forecaster sees `grid.values[..visible_len]`.
    pub visible_len: usize,
    /// The present target values in `(t, t + 1 h]`, in slot order.
    pub targets: Vec<f64>,
}

const HOUR_SLOTS: i64 = 12;
/// Minimum present target slots for an hour to count.
pub const MIN_TARGETS: usize = 10;
/// A gap: consecutive present slots at least this many slots apart (30 min).
pub const GAP_SLOTS: i64 = 6;

fn targets(grid: &Grid, decision_slot: i64) -> Vec<f64> {
    (1..=HOUR_SLOTS)
        .filter_map(|d| grid.index_of(decision_slot + d))
        .map(|i| grid.values[i])
        .filter(|v| !v.is_nan())
        .collect()
}

fn present(grid: &Grid) -> impl Iterator<Item = (usize, i64)> + '_ {
    grid.values
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .map(|(i, _)| (i, grid.first_slot + i as i64))
}

/// All next-hour cases of a grid.
///
/// Decision times are the full hours `t` with at least 24 h of the series
/// before them. A series whose present values span at most 24 h (a one-day
/// series) needs 6 h instead, and only hours whose target ends at or before
/// the series' last value count. An hour counts only with at least 10
/// present target slots.
pub fn next_hour_cases(grid: &Grid) -> Vec<Case> {
    let mut out = Vec::new();
    let mut it = present(grid);
    let Some((_, first)) = it.next() else {
        return out;
    };
    let last = present(grid).last().map_or(first, |p| p.1);
    let one_day = last - first <= SLOTS_PER_DAY as i64;
    let need = if one_day {
        6 * SLOTS_PER_HOUR as i64
    } else {
        SLOTS_PER_DAY as i64
    };
    let mut t = (first + need).div_euclid(HOUR_SLOTS) * HOUR_SLOTS;
    if t < first + need {
        t += HOUR_SLOTS;
    }
    while t < last {
        if one_day && t + HOUR_SLOTS > last {
            break;
        }
        let tg = targets(grid, t);
        if tg.len() >= MIN_TARGETS {
            let visible_len = usize::try_from(t - grid.first_slot + 1).unwrap_or(0);
            out.push(Case {
                task: Task::NextHour,
                decision_slot: t,
                visible_len: visible_len.min(grid.values.len()),
                targets: tg,
            });
        }
        t += HOUR_SLOTS;
    }
    out
}

/// All post-restart cases of a grid: for each gap (two consecutive present
/// slots at least 30 minutes apart) the decision time is the first full hour
/// at or after the first value after the gap; the forecaster sees the values
/// up to the last one before the gap. No minimum history is required.
pub fn post_restart_cases(grid: &Grid) -> Vec<Case> {
    let mut out = Vec::new();
    let mut prev: Option<(usize, i64)> = None;
    for (i, slot) in present(grid) {
        if let Some((pi, _)) = prev.filter(|&(_, ps)| slot - ps >= GAP_SLOTS) {
            let t = slot.div_euclid(HOUR_SLOTS) * HOUR_SLOTS
                + if slot.rem_euclid(HOUR_SLOTS) == 0 {
                    0
                } else {
                    HOUR_SLOTS
                };
            let tg = targets(grid, t);
            if tg.len() >= MIN_TARGETS {
                out.push(Case {
                    task: Task::PostRestart,
                    decision_slot: t,
                    visible_len: pi + 1,
                    targets: tg,
                });
            }
        }
        prev = Some((i, slot));
    }
    out
}

/// Both tasks' cases.
pub fn all_cases(grid: &Grid) -> Vec<Case> {
    let mut v = next_hour_cases(grid);
    v.extend(post_restart_cases(grid));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(first_slot: i64, n: usize, hole: Option<std::ops::Range<usize>>) -> Grid {
        let mut values: Vec<f64> = (0..n).map(|i| i as f64).collect();
        if let Some(r) = hole {
            for v in &mut values[r] {
                *v = f64::NAN;
            }
        }
        Grid { first_slot, values }
    }

    #[test]
    fn next_hour_needs_24h_of_history_on_long_series() {
        // 3 days from slot 0.
        let g = grid(0, 3 * 288, None);
        let c = next_hour_cases(&g);
        assert_eq!(c[0].decision_slot, 288, "first decision is t = 24 h");
        assert_eq!(c[0].visible_len, 289);
        assert_eq!(
            c[0].targets,
            (289..=300).map(|v| v as f64).collect::<Vec<_>>()
        );
        // Last decision whose target has >= 10 present slots: last slot is
        // 863, so t = 852 (targets 853..=863, 11 slots).
        assert_eq!(c.last().unwrap().decision_slot, 852);
        assert_eq!(c.len(), (852 - 288) / 12 + 1);
    }

    #[test]
    fn next_hour_on_one_day_series_uses_6h_and_targets_inside() {
        // PlanetLab-like: 288 slots starting at a full hour (slot 12).
        let g = grid(12, 288, None);
        let c = next_hour_cases(&g);
        assert_eq!(c[0].decision_slot, 12 + 72);
        let last = 12 + 287;
        assert!(c.iter().all(|c| c.decision_slot + 12 <= last));
        assert_eq!(c.last().unwrap().decision_slot, 276);
    }

    #[test]
    fn decision_hours_skip_targets_with_fewer_than_10_present() {
        // Hole of 3 slots in the first target hour (slots 289..=291).
        let g = grid(0, 3 * 288, Some(289..292));
        let c = next_hour_cases(&g);
        assert_eq!(c[0].decision_slot, 300);
        // Two missing slots still count (10 present).
        let g = grid(0, 3 * 288, Some(289..291));
        assert_eq!(next_hour_cases(&g)[0].decision_slot, 288);
        assert_eq!(next_hour_cases(&g)[0].targets.len(), 10);
    }

    #[test]
    fn gap_of_30_minutes_makes_a_post_restart_case_and_25_does_not() {
        // Present 0..=100, then missing 101..=105 (5 slots, 30 min apart):
        // slots 100 and 106 are 6 slots apart -> a gap.
        let g = grid(0, 400, Some(101..106));
        let c = post_restart_cases(&g);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].visible_len, 101, "sees up to slot 100");
        assert_eq!(
            c[0].decision_slot, 108,
            "first full hour at or after slot 106"
        );
        assert_eq!(c[0].targets[0], 109.0);
        // 4 missing slots: 25 minutes apart, not a gap.
        let g = grid(0, 400, Some(101..105));
        assert!(post_restart_cases(&g).is_empty());
        // A restart exactly on the hour decides at that hour.
        let g = grid(0, 400, Some(101..120));
        assert_eq!(post_restart_cases(&g)[0].decision_slot, 120);
    }
}
