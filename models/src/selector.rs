//! Choosing, per workload class, the forecaster that has measured best.
//!
//! The daemon records every forecast's outcome here; [`ForecasterSelector::
//! choose`] then serves the learned model only where its measured pinball
//! loss is below the best baseline's, so a user never gets a worse forecast
//! than the best baseline would have given (up to measurement noise while
//! few outcomes are known; until `min_outcomes` are known the best baseline
//! is served).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::forecast::{Forecaster, History, Horizon, LEVELS, Quantiles};
use crate::metrics::pinball;

/// Which forecaster served a forecast, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectorChoice {
    /// The forecaster's name (what a served forecast records).
    pub forecaster: String,
    /// Why: "model measured better", "best baseline", "too few outcomes".
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Loss {
    /// Exponentially weighted mean pinball loss (mean over levels).
    mean: f64,
    /// Outcomes seen.
    n: u64,
}

/// Per workload class measured error of each candidate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForecasterSelector {
    model: String,
    baselines: Vec<String>,
    /// Weight of a new outcome in the running mean.
    decay: f64,
    min_outcomes: u64,
    classes: BTreeMap<String, BTreeMap<String, Loss>>,
}

impl ForecasterSelector {
    /// A selector over a model and baselines (by name). `decay` is the
    /// weight of each new outcome (e.g. 0.01); the model is considered only
    /// after `min_outcomes` outcomes of it in a class.
    pub fn new(model: &str, baselines: &[&str], decay: f64, min_outcomes: u64) -> Self {
        ForecasterSelector {
            model: model.to_string(),
            baselines: baselines.iter().map(|s| s.to_string()).collect(),
            decay,
            min_outcomes,
            classes: BTreeMap::new(),
        }
    }

    /// Record that `forecaster` forecast `q` for a value that turned out to
    /// be `y`, in workload class `class`.
    pub fn record(&mut self, class: &str, forecaster: &str, y: f64, q: &Quantiles) {
        let loss = LEVELS
            .iter()
            .zip(q.0)
            .map(|(&p, qk)| pinball(p, y, qk))
            .sum::<f64>()
            / LEVELS.len() as f64;
        let e = self
            .classes
            .entry(class.to_string())
            .or_default()
            .entry(forecaster.to_string())
            .or_default();
        e.n += 1;
        // Plain mean for the first outcomes, then exponential.
        let a = (1.0 / e.n as f64).max(self.decay);
        e.mean += a * (loss - e.mean);
    }

    /// Forgets every measured outcome of `forecaster` in every class (the
    /// model was replaced: the new one is measured afresh).
    pub fn forget(&mut self, forecaster: &str) {
        for stats in self.classes.values_mut() {
            stats.remove(forecaster);
        }
    }

    /// Sets how many model outcomes a class needs before the model may be
    /// served.
    pub fn set_min_outcomes(&mut self, n: u64) {
        self.min_outcomes = n;
    }

    fn best_baseline(&self, class: &str) -> (String, Option<f64>) {
        let stats = self.classes.get(class);
        let mut best: Option<(&String, f64)> = None;
        for b in &self.baselines {
            if let Some(l) = stats
                .and_then(|s| s.get(b))
                .filter(|l| l.n > 0 && best.is_none_or(|(_, m)| l.mean < m))
            {
                best = Some((b, l.mean));
            }
        }
        match best {
            Some((n, m)) => (n.clone(), Some(m)),
            None => (self.baselines.first().cloned().unwrap_or_default(), None),
        }
    }

    /// The forecaster to serve for `class`.
    pub fn choose(&self, class: &str) -> SelectorChoice {
        let (base, base_loss) = self.best_baseline(class);
        let model = self.classes.get(class).and_then(|s| s.get(&self.model));
        match (model, base_loss) {
            (Some(m), Some(b)) if m.n >= self.min_outcomes && m.mean < b => SelectorChoice {
                forecaster: self.model.clone(),
                reason: format!("model measured better ({:.4} < {b:.4} of {base})", m.mean),
            },
            (Some(m), _) if m.n < self.min_outcomes => SelectorChoice {
                forecaster: base,
                reason: format!("too few model outcomes ({} < {})", m.n, self.min_outcomes),
            },
            (None, _) => SelectorChoice {
                forecaster: base,
                reason: "no model outcomes".into(),
            },
            _ => SelectorChoice {
                forecaster: base,
                reason: "best baseline".into(),
            },
        }
    }

    /// Forecast with the chosen one among `candidates` (matched by name);
    /// returns the choice (to record with the forecast) and the quantiles.
    /// Falls back to the first candidate if the chosen name is absent
    /// (e.g. the model file was rejected).
    pub fn forecast(
        &self,
        class: &str,
        candidates: &[&dyn Forecaster],
        h: &History<'_>,
        horizon: Horizon,
    ) -> Option<(SelectorChoice, Quantiles)> {
        let choice = self.choose(class);
        let f = candidates
            .iter()
            .find(|f| f.name() == choice.forecaster)
            .or_else(|| candidates.first())?;
        let chosen = SelectorChoice {
            forecaster: f.name().to_string(),
            reason: if f.name() == choice.forecaster {
                choice.reason
            } else {
                format!("{} unavailable, fell back", choice.forecaster)
            },
        };
        Some((chosen, f.forecast(h, horizon)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forecast::{EwmaSd, PrevWindow};
    use crate::trace::Statics;

    #[test]
    fn selector_serves_model_only_when_it_measured_better() {
        let mut s = ForecasterSelector::new("model", &["prev_hour", "prev_24h"], 0.05, 10);
        assert_eq!(s.choose("web").forecaster, "prev_hour");
        for _ in 0..20 {
            s.record("web", "prev_hour", 10.0, &Quantiles([8.0, 12.0, 15.0]));
            s.record("web", "prev_24h", 10.0, &Quantiles([10.0, 11.0, 12.0]));
            s.record("web", "model", 10.0, &Quantiles([5.0, 6.0, 7.0]));
        }
        // The model is worse than prev_24h: serve prev_24h.
        let c = s.choose("web");
        assert_eq!(c.forecaster, "prev_24h", "{c:?}");
        // In another class the model is better.
        for _ in 0..20 {
            s.record("batch", "prev_hour", 10.0, &Quantiles([5.0, 6.0, 7.0]));
            s.record("batch", "model", 10.0, &Quantiles([10.0, 10.5, 11.0]));
        }
        assert_eq!(s.choose("batch").forecaster, "model");
        // Too few model outcomes in a new class: baseline.
        s.record("db", "prev_hour", 1.0, &Quantiles([1.0, 1.0, 1.0]));
        s.record("db", "model", 1.0, &Quantiles([1.0, 1.0, 1.0]));
        assert_eq!(s.choose("db").forecaster, "prev_hour");
        // A replaced model is measured afresh: baseline until it has
        // outcomes again.
        s.forget("model");
        assert_eq!(s.choose("batch").forecaster, "prev_hour");
        assert_eq!(s.choose("batch").reason, "no model outcomes");
    }

    #[test]
    fn selector_falls_back_when_chosen_forecaster_is_missing() {
        let mut s = ForecasterSelector::new("model", &["ewma_sd"], 0.05, 1);
        s.record("c", "ewma_sd", 10.0, &Quantiles([0.0, 0.0, 0.0]));
        s.record("c", "model", 10.0, &Quantiles([10.0, 10.0, 10.0]));
        assert_eq!(s.choose("c").forecaster, "model");
        let values = [1.0, 2.0, 3.0];
        let h = History {
            values: &values,
            first_slot: 0,
            decision_slot: 2,
            statics: Statics::default(),
        };
        let cands: [&dyn Forecaster; 2] = [&EwmaSd, &PrevWindow::hour()];
        let (choice, q) = s.forecast("c", &cands, &h, Horizon::NextHour).unwrap();
        assert_eq!(choice.forecaster, "ewma_sd");
        assert!(choice.reason.contains("unavailable"));
        assert!(q.p50() > 0.0);
    }
}
