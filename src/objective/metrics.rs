//! Logged metrics as TRL logs them: each step (or eval batch) appends one value per name, and a log line
//! reports the mean of the values appended since the last one.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct MetricLog {
    values: BTreeMap<String, Vec<f64>>,
}

impl MetricLog {
    pub fn push(&mut self, name: &str, value: f64) {
        self.values.entry(name.to_string()).or_default().push(value);
    }

    /// The mean of every metric, names prefixed with `prefix` (e.g. "eval_"); the log is then emptied.
    pub fn drain_means(&mut self, prefix: &str) -> BTreeMap<String, f64> {
        std::mem::take(&mut self.values)
            .into_iter()
            .map(|(name, values)| (format!("{prefix}{name}"), values.iter().sum::<f64>() / values.len() as f64))
            .collect()
    }
}
