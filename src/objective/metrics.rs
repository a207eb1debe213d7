//! Logged metrics as TRL logs them: each step (or eval batch) appends one value per name, and a log line
//! reports the mean of the values appended since the last one.

use std::collections::BTreeMap;
use tch::{Kind, Tensor};

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct MetricLog {
    values: BTreeMap<String, Vec<f64>>,
}

impl MetricLog {
    pub fn push(&mut self, name: &str, value: f64) {
        self.values.entry(name.to_string()).or_default().push(value);
    }

    /// Adds every value of `other` after this log's own.
    pub fn append(&mut self, other: MetricLog) {
        for (name, values) in other.values {
            self.values.entry(name).or_default().extend(values);
        }
    }

    /// The mean of every metric, names prefixed with `prefix` (e.g. "eval_"); the log is then emptied.
    pub fn drain_means(&mut self, prefix: &str) -> BTreeMap<String, f64> {
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
