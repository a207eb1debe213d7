//! Logged metrics as TRL logs them: each step (or eval batch) appends one value per name, and a log line
//! reports the mean of the values appended since the last one.

use std::collections::BTreeMap;
use tch::{Kind, Tensor};

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct MetricLog {
    values: BTreeMap<String, Vec<f64>>,
    /// The denominators of the ratios among `values` (`push_ratio`), by name.
    #[serde(default)]
    weights: BTreeMap<String, Vec<f64>>,
}

impl MetricLog {
    pub fn push(&mut self, name: &str, value: f64) {
        self.values.entry(name.to_string()).or_default().push(value);
    }

    /// A ratio (0 when `denominator` is 0) that ranks of a data-parallel run combine as Σnumerator / Σdenominator,
    /// as TRL gathers token sums and counts.
    pub fn push_ratio(&mut self, name: &str, numerator: f64, denominator: f64) {
        self.push(name, if denominator > 0.0 { numerator / denominator } else { 0.0 });
        self.weights.entry(name.to_string()).or_default().push(denominator);
    }

    /// Adds every value of `other` after this log's own.
    pub fn append(&mut self, other: MetricLog) {
        for (name, values) in other.values {
            self.values.entry(name).or_default().extend(values);
        }
        for (name, weights) in other.weights {
            self.weights.entry(name).or_default().extend(weights);
        }
    }

    /// Combines the logs of the ranks of a data-parallel run, given `sum`, which sums a list of values across
    /// them: each value becomes its mean over the ranks, a ratio Σnumerator / Σdenominator. Every rank must hold
    /// the same names and counts.
    pub fn combine_ranks<E>(&mut self, ranks: usize, sum: impl FnOnce(&[f64]) -> Result<Vec<f64>, E>) -> Result<(), E> {
        // per name: its values (a ratio's as numerators), then a ratio's denominators
        let mut flat = Vec::new();
        for (name, values) in &self.values {
            match self.weights.get(name) {
                Some(weights) => {
                    flat.extend(values.iter().zip(weights).map(|(v, w)| v * w));
                    flat.extend(weights);
                }
                None => flat.extend(values),
            }
        }
        let mut summed = sum(&flat)?.into_iter();
        for (name, values) in self.values.iter_mut() {
            let totals: Vec<f64> = summed.by_ref().take(values.len()).collect();
            match self.weights.get_mut(name) {
                Some(weights) => {
                    let denominators: Vec<f64> = summed.by_ref().take(values.len()).collect();
                    for ((value, total), &d) in values.iter_mut().zip(totals).zip(&denominators) {
                        *value = if d > 0.0 { total / d } else { 0.0 };
                    }
                    *weights = denominators;
                }
                None => {
                    for (value, total) in values.iter_mut().zip(totals) {
                        *value = total / ranks as f64;
                    }
                }
            }
        }
        Ok(())
    }

    /// The mean of every metric, names prefixed with `prefix` (e.g. "eval_"); the log is then emptied.
    pub fn drain_means(&mut self, prefix: &str) -> BTreeMap<String, f64> {
        self.weights.clear();
        std::mem::take(&mut self.values)
            .into_iter()
            .map(|(name, values)| (format!("{prefix}{name}"), values.iter().sum::<f64>() / values.len() as f64))
            .collect()
    }
}

/// The reward and log-prob metrics every preference objective logs: `rewards/{chosen,rejected,accuracies,margins}`
/// and `logps/{chosen,rejected}`, from per-pair rewards and log-probs ([B] each).
pub fn log_rewards(log: &mut MetricLog, rewards: (&Tensor, &Tensor), logps: (&Tensor, &Tensor)) {
    let mean = |t: &Tensor| t.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    let (chosen, rejected) = rewards;
    log.push("rewards/chosen", mean(chosen));
    log.push("rewards/rejected", mean(rejected));
    log.push("rewards/accuracies", mean(&chosen.gt_tensor(rejected)));
    log.push("rewards/margins", mean(&(chosen - rejected)));
    log.push("logps/chosen", mean(logps.0));
    log.push("logps/rejected", mean(logps.1));
}
