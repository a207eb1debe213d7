//! Several datasets mixed into one, as the alignment-handbook's recipes ask for it: its `dataset_mixture` (each
//! dataset with id, config, split, columns and weight; a seed; optionally a test split cut from the mixture) and
//! its older `dataset_mixer` (dataset -> fraction of its train splits) with `dataset_splits`. The result is the
//! handbook's `DatasetDict`: rows per split name, in the order `datasets` leaves them, since `shuffle(seed)` and
//! `train_test_split(seed=...)` draw their permutation from NumPy's `default_rng(seed)`, reproduced here.

use crate::data::source::{RawRow, ReadRows};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Rows per split name, as a `datasets.DatasetDict`.
pub type Splits = BTreeMap<String, ReadRows>;

/// The handbook's `dataset_mixture` (`alignment.configs.DatasetMixtureConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mixture {
    pub datasets: Vec<MixtureDataset>,
    #[serde(default)]
    pub seed: u64,
    pub test_split_size: Option<f64>,
}

/// One dataset of a mixture, with the handbook's defaults (split `train`, weight 1.0; `weight: null` takes the
/// dataset whole, unshuffled).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureDataset {
    pub id: String,
    pub config: Option<String>,
    #[serde(default = "train")]
    pub split: String,
    pub columns: Option<Vec<String>>,
    #[serde(default = "whole")]
    pub weight: Option<f64>,
}

fn train() -> String {
    "train".into()
}

fn whole() -> Option<f64> {
    Some(1.0)
}

impl Mixture {
    /// Parses the mixture from its JSON text (the YAML mapping as `--config` passes it on).
    pub fn parse(json: &str) -> Result<Self> {
        let mixture: Mixture = serde_json::from_str(json).context(
            "dataset_mixture: expected {datasets: [{id, config, split, columns, weight}], seed, test_split_size}",
        )?;
        if mixture.datasets.is_empty() {
            bail!("dataset_mixture has no datasets");
        }
        let column_sets: Vec<Vec<String>> = mixture
            .datasets
            .iter()
            .filter_map(|d| d.columns.clone())
            .map(|mut c| {
                c.sort();
                c
            })
            .collect();
        if column_sets.windows(2).any(|w| w[0] != w[1]) {
            bail!("dataset_mixture: every dataset must select the same columns; found {column_sets:?}");
        }
        for dataset in &mixture.datasets {
            if let Some(weight) = dataset.weight.filter(|w| !(w.is_finite() && *w >= 0.0)) {
                bail!("dataset_mixture: {} has weight {weight}; expected a fraction of its rows >= 0", dataset.id);
            }
        }
        Ok(mixture)
    }

    /// The mixture as the handbook's `get_dataset` builds it: each dataset loaded (`load(id, config, split)`), its
    /// columns selected, shuffled with the seed and cut to `weight` of its rows; all concatenated and shuffled
    /// with the seed; then `train` and, with `test_split_size`, `test` split off with the seed.
    pub fn build(&self, load: impl Fn(&str, Option<&str>, &str) -> Result<ReadRows>) -> Result<Splits> {
        let mut all = ReadRows::default();
        for dataset in &self.datasets {
            let name = format!("{} (split {})", dataset.id, dataset.split);
            let mut read = load(&dataset.id, dataset.config.as_deref(), &dataset.split)
                .with_context(|| format!("dataset_mixture: {name}"))?;
            if let Some(columns) = &dataset.columns {
                select_columns(&mut read.rows, columns, &name)?;
            }
            if let Some(weight) = dataset.weight {
                let keep = (read.rows.len() as f64 * weight) as usize;
                if keep > read.rows.len() {
                    bail!("dataset_mixture: {name} has weight {weight}, more than its {} rows", read.rows.len());
                }
                read.rows = shuffled(read.rows, self.seed);
                read.rows.truncate(keep);
            }
            eprintln!("dataset_mixture: {} rows of {name}", read.rows.len());
            all.append(read);
        }
        all.rows = shuffled(all.rows, self.seed);
        let mut splits = Splits::new();
        match self.test_split_size {
            Some(size) => {
                let (train, test) = train_test_split(all.rows, size, self.seed)?;
                splits.insert("train".into(), ReadRows { rows: train, invalid: all.invalid });
                splits.insert("test".into(), ReadRows { rows: test, invalid: Vec::new() });
            }
            None => {
                splits.insert("train".into(), all);
            }
        }
        Ok(splits)
    }
}

/// The columns the older handbook kept from each dataset of a `dataset_mixer`.
const LEGACY_COLUMNS: [&str; 6] = ["messages", "chosen", "rejected", "prompt", "completion", "label"];

/// The older handbook's `dataset_mixer` from its JSON text (the YAML mapping as `--config` passes it on): dataset
/// ids and fractions, in the recipe's order.
pub fn parse_mixer(json: &str) -> Result<Vec<(String, f64)>> {
    let parsed: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(json).context("dataset_mixer: expected a mapping of dataset ids to fractions")?;
    parsed
        .into_iter()
        .map(|(name, fraction)| {
            let fraction = fraction
                .as_f64()
                .with_context(|| format!("dataset_mixer: {name}: expected a fraction, found {fraction}"))?;
            Ok((name, fraction))
        })
        .collect()
}

/// The older handbook's `dataset_mixer` (dataset -> fraction, in the recipe's order) over `splits` (default
/// `train`, `test`), with one config per dataset or none: each split whose name holds "train" is cut to the first
/// fraction of its rows, those containing "test" are kept whole; each side is concatenated and shuffled with
/// seed 42 (`mix_datasets`). A text `prompt` beside conversational `chosen`/`rejected` is dropped, as the older
/// handbook's `apply_chat_template` ignored it.
pub fn legacy_mixer(
    mixer: &[(String, f64)],
    splits: &[String],
    configs: &[String],
    load: impl Fn(&str, Option<&str>, &str) -> Result<ReadRows>,
) -> Result<Splits> {
    let default_splits = ["train".to_string(), "test".to_string()];
    let splits = if splits.is_empty() { &default_splits[..] } else { splits };
    if !configs.is_empty() && configs.len() != mixer.len() {
        bail!("dataset_configs has {} names for the {} datasets of dataset_mixer", configs.len(), mixer.len());
    }
    if let Some((name, fraction)) = mixer.iter().find(|(_, f)| !(f.is_finite() && *f >= 0.0)) {
        bail!("dataset_mixer: {name} has fraction {fraction}; fractions cannot be negative");
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (i, (dataset, _)) in mixer.iter().enumerate() {
        for split in splits {
            let name = format!("{dataset} (split {split})");
            let mut read = load(dataset, configs.get(i).map(String::as_str), split)
                .with_context(|| format!("dataset_mixer: {name}"))?;
            for row in &mut read.rows {
                row.fields.retain(|key, _| LEGACY_COLUMNS.contains(&key.as_str()));
                // The older handbook took the prompt of conversational pairs from `chosen[:-1]` unless `prompt` held
                // messages too (UltraFeedback's `prompt` is the bare question): TRL's implicit prompt does that.
                if row.fields.get("prompt").is_some_and(|p| p.is_string())
                    && row.fields.get("chosen").is_some_and(|c| c.is_array())
                {
                    row.fields.remove("prompt");
                }
            }
            if split.contains("train") {
                train.push(read);
            } else if split.contains("test") {
                test.push(read);
            } else {
                bail!("dataset_splits: split {split} is recognized as neither train nor test (its name holds neither)");
            }
        }
    }
    let mut out = Splits::new();
    if !train.is_empty() {
        // The handbook pairs the n-th train split read with the n-th fraction.
        let mut all = ReadRows::default();
        for (read, (_, fraction)) in train.into_iter().zip(mixer) {
            let keep = (*fraction * read.rows.len() as f64) as usize;
            if keep > read.rows.len() {
                bail!("dataset_mixer: fraction {fraction} is more than the {} rows there are", read.rows.len());
            }
            all.rows.extend(read.rows.into_iter().take(keep));
            all.invalid.extend(read.invalid);
        }
        all.rows = shuffled(all.rows, 42);
        out.insert("train".into(), all);
    }
    if !test.is_empty() {
        let mut all = ReadRows::default();
        for read in test {
            all.append(read);
        }
        all.rows = shuffled(all.rows, 42);
        out.insert("test".into(), all);
    }
    Ok(out)
}

fn select_columns(rows: &mut [RawRow], columns: &[String], name: &str) -> Result<()> {
    for row in rows {
        if let Some(missing) = columns.iter().find(|c| !row.fields.contains_key(*c)) {
            let have: Vec<&String> = row.fields.keys().collect();
            bail!("{}: no column \"{missing}\" to select (columns: {have:?}) in {name}", row.location);
        }
        row.fields.retain(|key, _| columns.contains(key));
    }
    Ok(())
}

/// `Dataset.shuffle(seed=seed)`.
fn shuffled(rows: Vec<RawRow>, seed: u64) -> Vec<RawRow> {
    let mut slots: Vec<Option<RawRow>> = rows.into_iter().map(Some).collect();
    numpy_permutation(slots.len(), seed).into_iter().map(|i| slots[i].take().expect("a permutation")).collect()
}

/// `Dataset.train_test_split(test_size=size, seed=seed)`: a fraction (rounded up) or a count of test rows.
fn train_test_split(rows: Vec<RawRow>, size: f64, seed: u64) -> Result<(Vec<RawRow>, Vec<RawRow>)> {
    let n = rows.len();
    let n_test = if size > 0.0 && size < 1.0 {
        (size * n as f64).ceil() as usize
    } else if size >= 1.0 && size.fract() == 0.0 {
        size as usize
    } else {
        bail!("dataset_mixture: test_split_size {size}: expected a fraction in (0, 1) or a whole number of rows");
    };
    if n_test >= n {
        bail!("dataset_mixture: test_split_size {size} leaves no training rows out of {n}");
    }
    // the same permutation as shuffle(seed): its first n_test rows are the test split
    let mut test = shuffled(rows, seed);
    let train = test.split_off(n_test);
    Ok((train, test))
}

/// `numpy.random.default_rng(seed).permutation(n)`: PCG64 seeded through NumPy's `SeedSequence`, then NumPy's
/// Fisher-Yates shuffle of `arange(n)` with its masked rejection sampling (`random_interval`).
pub fn numpy_permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = NumpyPcg64::new(seed);
    let mut out: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.interval(i as u64) as usize;
        out.swap(i, j);
    }
    out
}

/// NumPy's PCG64 bit generator with its 32-bit buffering (`next_uint32` hands out both halves of a 64-bit draw).
struct NumpyPcg64 {
    pcg: rand_pcg::Pcg64,
    spare: Option<u32>,
}

impl NumpyPcg64 {
    fn new(seed: u64) -> Self {
        let words = seed_sequence_state(seed);
        let state = (u128::from(words[0]) << 64) | u128::from(words[1]);
        let stream = (u128::from(words[2]) << 64) | u128::from(words[3]);
        // rand_pcg's `new(state, stream)` is pcg64_srandom_r(state, stream), as NumPy's `pcg64_set_seed` calls it.
        Self { pcg: rand_pcg::Pcg64::new(state, stream), spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        rand_core::RngCore::next_u64(&mut self.pcg)
    }

    fn next_u32(&mut self) -> u32 {
        if let Some(spare) = self.spare.take() {
            return spare;
        }
        let next = self.next_u64();
        self.spare = Some((next >> 32) as u32);
        next as u32
    }

    /// A uniform integer in `0..=max` (`random_interval`).
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        loop {
            let value =
                if max <= u64::from(u32::MAX) { u64::from(self.next_u32()) & mask } else { self.next_u64() & mask };
            if value <= max {
                return value;
            }
        }
    }
}

/// `SeedSequence(seed).generate_state(4, np.uint64)`: NumPy's entropy pool of four 32-bit words, hashed out.
fn seed_sequence_state(seed: u64) -> [u64; 4] {
    const INIT_A: u32 = 0x43b0d7e5;
    const MULT_A: u32 = 0x931e8875;
    const INIT_B: u32 = 0x8b51f9dd;
    const MULT_B: u32 = 0x58f38ded;
    const MIX_MULT_L: u32 = 0xca01f9dd;
    const MIX_MULT_R: u32 = 0x4973f715;
    let entropy: Vec<u32> = if seed >> 32 == 0 { vec![seed as u32] } else { vec![seed as u32, (seed >> 32) as u32] };
    let mut hash_const = INIT_A;
    let mut hashmix = |value: u32| {
        let mut value = value ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_A);
        value = value.wrapping_mul(hash_const);
        value ^ (value >> 16)
    };
    let mix = |x: u32, y: u32| {
        let result = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        result ^ (result >> 16)
    };
    let mut pool = [0u32; 4];
    for (i, word) in pool.iter_mut().enumerate() {
        *word = hashmix(entropy.get(i).copied().unwrap_or(0));
    }
    for src in 0..4 {
        for dst in 0..4 {
            if src != dst {
                pool[dst] = mix(pool[dst], hashmix(pool[src]));
            }
        }
    }
    let mut hash_const = INIT_B;
    let words: Vec<u32> = (0..8)
        .map(|i| {
            let mut value = pool[i % 4] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            value = value.wrapping_mul(hash_const);
            value ^ (value >> 16)
        })
        .collect();
    // little-endian pairs of 32-bit words
    std::array::from_fn(|i| u64::from(words[2 * i]) | (u64::from(words[2 * i + 1]) << 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_equal_numpy_default_rng() {
        // numpy 2.4.6: list(np.random.default_rng(seed).permutation(n))
        assert_eq!(numpy_permutation(10, 0), [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]);
        assert_eq!(numpy_permutation(10, 42), [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]);
        assert_eq!(numpy_permutation(7, 1), [5, 0, 1, 4, 2, 6, 3]);
        // a seed past 32 bits: two entropy words
        assert_eq!(numpy_permutation(100, 123_456_789_012)[..10], [15, 19, 68, 83, 62, 18, 96, 65, 73, 86]);
        assert_eq!(numpy_permutation(1, 5), [0]);
        assert!(numpy_permutation(0, 5).is_empty());
    }
}
