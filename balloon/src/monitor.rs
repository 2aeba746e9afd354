//! Detects a guest that ignores its balloon target: pure, with time
//! injected (milliseconds on any monotonic clock).

/// What the monitor concluded from one observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorEvent {
    /// The guest has not moved its balloon toward the target for `stalled_ms`.
    Unresponsive {
        /// Target, in pages.
        target: u32,
        /// What the guest reports, in pages.
        actual: u32,
        /// How long it has not moved toward the target.
        stalled_ms: u64,
    },
    /// A guest reported unresponsive moved toward its target again (or reached it).
    Recovered,
    /// A guest that negotiated `DEFLATE_ON_OOM` took pages back from the
    /// balloon below an unchanged target (virtio 1.2, 5.5.6.1): allowed,
    /// so not reported as ignoring the target while the target stays.
    DeflatedOnOom {
        /// Target, in pages.
        target: u32,
        /// What the guest reports now, in pages.
        actual: u32,
    },
}

/// Watches (target, actual) over time. A guest is unresponsive when its
/// balloon differs from the target and has not come closer to it for
/// `grace_ms`; it is reported once per episode.
#[derive(Clone, Debug)]
pub struct TargetMonitor {
    grace_ms: u64,
    last_target: Option<u32>,
    since_ms: u64,
    best_gap: u32,
    reported: bool,
    stalled_ms: u64,
    last_actual: Option<u32>,
    oom_below: bool,
}

impl TargetMonitor {
    /// A monitor with this grace period.
    pub fn new(grace_ms: u64) -> Self {
        TargetMonitor {
            grace_ms,
            last_target: None,
            since_ms: 0,
            best_gap: 0,
            reported: false,
            stalled_ms: 0,
            last_actual: None,
            oom_below: false,
        }
    }

    /// Whether the guest is currently reported unresponsive.
    pub fn unresponsive(&self) -> bool {
        self.reported
    }

    /// How long the balloon has not come closer to its target, as of the
    /// last observation (0 when it is at the target or moving).
    pub fn stalled_ms(&self) -> u64 {
        self.stalled_ms
    }

    /// Whether the guest is below its target because it deflated on OOM.
    pub fn deflated_on_oom(&self) -> bool {
        self.oom_below
    }

    /// Feeds one observation at `now_ms`; `deflate_on_oom` says whether the
    /// guest negotiated `DEFLATE_ON_OOM`.
    pub fn observe(
        &mut self,
        now_ms: u64,
        target: u32,
        actual: u32,
        deflate_on_oom: bool,
    ) -> Option<MonitorEvent> {
        let last_actual = self.last_actual.replace(actual);
        if self.last_target != Some(target) {
            self.oom_below = false;
        }
        if deflate_on_oom
            && self.last_target == Some(target)
            && actual < target
            && last_actual.is_some_and(|a| actual < a)
        {
            // The guest gave itself pages from the balloon.
            self.oom_below = true;
            self.reported = false;
            self.stalled_ms = 0;
            self.since_ms = now_ms;
            self.best_gap = target - actual;
            return Some(MonitorEvent::DeflatedOnOom { target, actual });
        }
        if self.oom_below && actual < target {
            self.stalled_ms = 0;
            self.since_ms = now_ms;
            return None;
        }
        self.oom_below = false;
        let gap = target.abs_diff(actual);
        self.stalled_ms = 0;
        let recovered = |m: &mut Self| {
            if std::mem::take(&mut m.reported) {
                Some(MonitorEvent::Recovered)
            } else {
                None
            }
        };
        if gap == 0 {
            self.last_target = Some(target);
            self.best_gap = 0;
            self.since_ms = now_ms;
            return recovered(self);
        }
        if self.last_target != Some(target) {
            // A new target starts a new episode.
            self.last_target = Some(target);
            self.best_gap = gap;
            self.since_ms = now_ms;
            return recovered(self);
        }
        if gap < self.best_gap {
            self.best_gap = gap;
            self.since_ms = now_ms;
            return recovered(self);
        }
        let stalled_ms = now_ms.saturating_sub(self.since_ms);
        self.stalled_ms = stalled_ms;
        if stalled_ms >= self.grace_ms && !self.reported {
            self.reported = true;
            return Some(MonitorEvent::Unresponsive {
                target,
                actual,
                stalled_ms,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_that_ignores_target_is_reported_once_after_grace() {
        let mut m = TargetMonitor::new(1000);
        assert_eq!(m.observe(0, 100, 0, false), None);
        assert_eq!(m.observe(999, 100, 0, false), None);
        assert_eq!(
            m.observe(1000, 100, 0, false),
            Some(MonitorEvent::Unresponsive {
                target: 100,
                actual: 0,
                stalled_ms: 1000
            })
        );
        assert!(m.unresponsive());
        assert_eq!(m.observe(5000, 100, 0, false), None);
        assert_eq!(
            m.observe(5001, 100, 10, false),
            Some(MonitorEvent::Recovered)
        );
        assert!(!m.unresponsive());
    }

    #[test]
    fn guest_making_progress_is_never_reported() {
        let mut m = TargetMonitor::new(1000);
        for i in 0..100u32 {
            assert_eq!(m.observe(u64::from(i) * 900, 100, i, false), None);
        }
        assert_eq!(m.observe(1_000_000, 100, 100, false), None);
    }

    #[test]
    fn deflate_on_oom_below_an_unchanged_target_is_not_ignoring_it() {
        let mut m = TargetMonitor::new(1000);
        assert_eq!(m.observe(0, 100, 100, true), None);
        assert_eq!(
            m.observe(10, 100, 60, true),
            Some(MonitorEvent::DeflatedOnOom {
                target: 100,
                actual: 60
            })
        );
        assert_eq!(m.observe(5000, 100, 60, true), None);
        assert!(m.deflated_on_oom() && !m.unresponsive());
        // Without the feature the same numbers are a guest ignoring its target.
        let mut m = TargetMonitor::new(1000);
        m.observe(0, 100, 100, false);
        m.observe(10, 100, 60, false);
        assert!(matches!(
            m.observe(5000, 100, 60, false),
            Some(MonitorEvent::Unresponsive { .. })
        ));
        // A new target ends the allowance: a guest that then stays put is reported.
        let mut m = TargetMonitor::new(1000);
        m.observe(0, 100, 100, true);
        m.observe(10, 100, 60, true);
        assert_eq!(m.observe(20, 120, 60, true), None);
        assert!(!m.deflated_on_oom());
        assert!(matches!(
            m.observe(1100, 120, 60, true),
            Some(MonitorEvent::Unresponsive { .. })
        ));
    }

    #[test]
    fn new_target_restarts_the_clock() {
        let mut m = TargetMonitor::new(1000);
        m.observe(0, 100, 0, false);
        assert_eq!(m.observe(900, 50, 0, false), None);
        assert_eq!(m.observe(1800, 50, 0, false), None);
        assert!(matches!(
            m.observe(1900, 50, 0, false),
            Some(MonitorEvent::Unresponsive {
                stalled_ms: 1000,
                ..
            })
        ));
        // Reaching the target ends the episode.
        assert_eq!(
            m.observe(2000, 50, 50, false),
            Some(MonitorEvent::Recovered)
        );
    }
}
