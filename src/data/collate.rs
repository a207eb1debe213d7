//! Batches of tokenized pairs, as TRL's DPO collator lays them out: 2B rows (every chosen sequence, then every
//! rejected one), right-padded, with an attention mask and a completion mask. ORPO's `concatenated_inputs` is
//! the same layout over its already-truncated sequences. Also the (seeded) order in which pairs are visited.

use crate::data::tokenize::{Sequence, TokenizedPair};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TruncationMode {
    KeepStart,
    KeepEnd,
}

/// Tensors of one batch of B pairs, each [2B, T] int64.
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// 1 on completion tokens (the tokens whose log-probs the objectives score).
    pub completion_mask: Tensor,
}

/// Truncates one prompt+completion sequence to `max_length`; returns ids and completion mask.
pub(crate) fn truncated(seq: &Sequence, truncation: Option<(usize, TruncationMode)>) -> (Vec<i64>, Vec<i64>) {
    let mask: Vec<i64> = (0..seq.ids.len()).map(|i| i64::from(i >= seq.prompt_len)).collect();
    match truncation {
        Some((max, _)) if seq.ids.len() <= max => (seq.ids.clone(), mask),
        Some((max, TruncationMode::KeepStart)) => (seq.ids[..max].to_vec(), mask[..max].to_vec()),
        Some((max, TruncationMode::KeepEnd)) => {
            let start = seq.ids.len() - max;
            (seq.ids[start..].to_vec(), mask[start..].to_vec())
        }
        None => (seq.ids.clone(), mask),
    }
}

/// Collates `pairs` into [2B, T] tensors padded on the right with `pad_id` (masks with 0).
pub fn collate(pairs: &[&TokenizedPair], pad_id: i64, truncation: Option<(usize, TruncationMode)>) -> Batch {
    let rows: Vec<(Vec<i64>, Vec<i64>)> = pairs
        .iter()
        .map(|p| truncated(&p.chosen, truncation))
        .chain(pairs.iter().map(|p| truncated(&p.rejected, truncation)))
        .collect();
    collate_rows(&rows, pad_id)
}

/// Collates rows of (token ids, completion mask) into [rows, T] tensors padded on the right with `pad_id`.
pub fn collate_rows(rows: &[(Vec<i64>, Vec<i64>)], pad_id: i64) -> Batch {
    let width = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let (mut ids, mut attention, mut completion) = (Vec::new(), Vec::new(), Vec::new());
    for (row_ids, row_mask) in rows {
        let pad = width - row_ids.len();
        ids.extend(row_ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        attention.extend(std::iter::repeat_n(1i64, row_ids.len()).chain(std::iter::repeat_n(0, pad)));
        completion.extend(row_mask.iter().copied().chain(std::iter::repeat_n(0, pad)));
    }
    let shape = [rows.len() as i64, width as i64];
    Batch {
        input_ids: Tensor::from_slice(&ids).view(shape),
        attention_mask: Tensor::from_slice(&attention).view(shape),
        completion_mask: Tensor::from_slice(&completion).view(shape),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplingStrategy {
    /// dataset order (transformers' `train_sampling_strategy="sequential"`)
    Sequential,
    /// a seeded permutation per epoch
    Random,
}

/// The order in which to visit `len` pairs in `epoch`: the same seed and epoch always give the same order, and
/// it is TRL's. transformers' Trainer samples through accelerate's `SeedableRandomSampler`, which draws
/// `torch.randperm(len)` from a generator seeded with `seed + epoch`; torch's CPU randperm is this Fisher-Yates
/// shuffle over MT19937 (checked against torch in the test below).
pub fn epoch_order(len: usize, strategy: SamplingStrategy, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if strategy == SamplingStrategy::Random {
        // torch seeds its mt19937 with the low 32 bits of the seed.
        let mut generator = rand_mt::Mt::new(seed.wrapping_add(epoch) as u32);
        for i in 0..len.saturating_sub(1) {
            let z = generator.next_u32() as usize % (len - i);
            order.swap(i, i + z);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_order_is_a_seeded_permutation() {
        let a = epoch_order(50, SamplingStrategy::Random, 42, 0);
        assert_eq!(a, epoch_order(50, SamplingStrategy::Random, 42, 0));
        assert_ne!(a, epoch_order(50, SamplingStrategy::Random, 42, 1));
        assert_ne!(a, epoch_order(50, SamplingStrategy::Random, 7, 0));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(epoch_order(5, SamplingStrategy::Sequential, 42, 3), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn random_order_is_torchs_randperm() {
        // torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() with torch 2.11
        assert_eq!(epoch_order(789, SamplingStrategy::Random, 42, 0)[..8], [672, 428, 338, 103, 355, 316, 94, 409]);
        assert_eq!(epoch_order(789, SamplingStrategy::Random, 42, 1)[..8], [154, 509, 579, 580, 364, 687, 249, 156]);
        assert_eq!(epoch_order(11, SamplingStrategy::Random, 42, 0)[..8], [6, 8, 9, 2, 1, 10, 0, 7]);
        assert_eq!(epoch_order(3, SamplingStrategy::Random, 1, 0), [1, 2, 0]);
    }
}
