//! Where each token of a batch goes on the model's input. TRL's layout runs chosen and rejected as separate,
//! right-padded rows. With prefix sharing a pair runs as one sequence [shared prefix | chosen rest | rejected
//! rest] in which the rejected branch cannot see the chosen one and its positions restart after the prefix, so
//! the prompt is computed once per pair (arXiv 2410.20305). With packing, several pairs share one row and no
//! compute is spent on padding. Either way the objectives see TRL's logical [2B, T] batch: `source` maps each
//! logical token to the packed token whose hidden state predicts what follows it.

use crate::data::collate::{truncated, Batch, TruncationMode};
use crate::data::tokenize::TokenizedPair;
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackOptions {
    /// Share the common prefix (the prompt) of chosen and rejected.
    pub prefix_sharing: bool,
    /// Put several pairs in one row, up to `row_tokens` tokens (a longer pair gets a row of its own); 0: up
    /// to the longest pair of the batch, so that no row is longer than without packing (attention grows with
    /// the square of a row's length, and masked-out pairs in one row still cost attention compute).
    pub packing: bool,
    pub row_tokens: usize,
}

impl PackOptions {
    /// TRL's layout: one right-padded row per sequence.
    pub const TRL: PackOptions = PackOptions { prefix_sharing: false, packing: false, row_tokens: 0 };

    pub fn is_trl_layout(&self) -> bool {
        !self.prefix_sharing && !self.packing
    }
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions { prefix_sharing: true, packing: true, row_tokens: 0 }
    }
}

/// How pairs become a batch: the pad id, the truncation DPO applies at collation (ORPO's pairs arrive
/// truncated: `None`) and the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Batching {
    pub pad_id: i64,
    pub truncation: Option<(usize, TruncationMode)>,
    pub layout: PackOptions,
}

impl Batching {
    pub fn pack(&self, pairs: &[&TokenizedPair]) -> PackedBatch {
        pack(pairs, self.pad_id, self.truncation, self.layout)
    }
}

/// Model input in a segment layout (see `model::decoder::TokenLayout::Segments`), all [R, L] int64.
pub struct Segments {
    pub input_ids: Tensor,
    pub positions: Tensor,
    pub group: Tensor,
    pub branch: Tensor,
}

/// A batch as the model runs it, and how TRL's logical batch maps onto it. Its tensors stay on the CPU; what the
/// model needs goes to its device from there (`model::lm_head`).
pub struct PackedBatch {
    /// TRL's [2B, T] batch: targets, masks and metrics are defined on it.
    pub logical: Batch,
    /// None: the model runs `logical` itself (TRL's layout).
    pub segments: Option<Segments>,
    /// [2B, T] index into the flattened model input [R * L] of each logical token; -1 where the logical
    /// token is padding that the packed input does not hold.
    pub source: Tensor,
    /// KTO: whether each example's completion is desirable, [B] bool
    pub desirable: Option<Tensor>,
}

/// A piece of the model's input that runs in one attention group: a pair (prefix, chosen rest, rejected rest)
/// when sharing its prompt, else one sequence.
struct Unit {
    ids: Vec<i64>,
    positions: Vec<i64>,
    branch: Vec<i64>,
    /// (logical row, index in this unit of each of that row's tokens)
    rows: Vec<(usize, Vec<usize>)>,
}

impl Unit {
    /// Logical row `row` as a unit of its own.
    fn sequence(row: usize, ids: Vec<i64>) -> Unit {
        let n = ids.len();
        Unit { positions: (0..n as i64).collect(), branch: vec![0; n], rows: vec![(row, (0..n).collect())], ids }
    }
}

impl PackedBatch {
    /// Tokens whose next token the loss scores: after the first of each logical row, in the completion mask.
    pub fn label_tokens(&self) -> i64 {
        let mask = &self.logical.completion_mask;
        let width = mask.size()[1];
        mask.narrow(1, 1.min(width), (width - 1).max(0)).sum(tch::Kind::Int64).int64_value(&[])
    }
}

/// Lays out `pairs` for the model. The logical batch is exactly `collate`'s.
pub fn pack(
    pairs: &[&TokenizedPair],
    pad_id: i64,
    truncation: Option<(usize, TruncationMode)>,
    options: PackOptions,
) -> PackedBatch {
    let logical = crate::data::collate::collate(pairs, pad_id, truncation);
    if options.is_trl_layout() {
        return padded(logical);
    }
    let batch = pairs.len();
    let mut units = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        let (chosen, _) = truncated(&pair.chosen, truncation);
        let (rejected, _) = truncated(&pair.rejected, truncation);
        if options.prefix_sharing {
            let shared = chosen.iter().zip(&rejected).take_while(|(c, r)| c == r).count();
            let rest = rejected.len() - shared;
            let mut ids = chosen.clone();
            ids.extend_from_slice(&rejected[shared..]);
            let positions = (0..chosen.len() as i64).chain(shared as i64..rejected.len() as i64).collect();
            let branch = std::iter::repeat_n(0, shared)
                .chain(std::iter::repeat_n(1, chosen.len() - shared))
                .chain(std::iter::repeat_n(2, rest))
                .collect();
            let rejected_index = (0..shared).chain(chosen.len()..chosen.len() + rest).collect();
            units.push(Unit {
                ids,
                positions,
                branch,
                rows: vec![(i, (0..chosen.len()).collect()), (batch + i, rejected_index)],
            });
        } else {
            units.push(Unit::sequence(i, chosen));
            units.push(Unit::sequence(batch + i, rejected));
        }
    }
    lay_out(logical, units, pad_id, options)
}

/// Lays out independent sequences, given as (token ids, completion mask) rows: the logical batch holds one row
/// each; with `options.packing` several share a model row, each attending only to itself with positions from 0.
pub fn pack_sequences(rows: &[(Vec<i64>, Vec<i64>)], pad_id: i64, options: PackOptions) -> PackedBatch {
    let logical = crate::data::collate::collate_rows(rows, pad_id);
    if !options.packing {
        return padded(logical);
    }
    let units = rows.iter().enumerate().map(|(i, (ids, _))| Unit::sequence(i, ids.clone())).collect();
    lay_out(logical, units, pad_id, options)
}

/// TRL's layout: the model runs the logical batch itself.
fn padded(logical: Batch) -> PackedBatch {
    let (rows, width) = (logical.input_ids.size()[0], logical.input_ids.size()[1]);
    PackedBatch {
        source: Tensor::arange(rows * width, tch::kind::INT64_CPU).view([rows, width]),
        segments: None,
        logical,
        desirable: None,
    }
}

/// Puts `units` into model rows (first fit in order, up to the row budget; one unit per row without packing).
fn lay_out(logical: Batch, units: Vec<Unit>, pad_id: i64, options: PackOptions) -> PackedBatch {
    let (rows, width) = (logical.input_ids.size()[0], logical.input_ids.size()[1]);
    let longest = units.iter().map(|u| u.ids.len()).max().unwrap_or(0);
    let budget = if options.row_tokens == 0 { longest } else { options.row_tokens.max(longest) };
    let mut packed_rows: Vec<(Vec<usize>, usize)> = Vec::new();
    for (u, unit) in units.iter().enumerate() {
        let n = unit.ids.len();
        match packed_rows.iter_mut().find(|(_, used)| options.packing && used + n <= budget) {
            Some((row, used)) => {
                row.push(u);
                *used += n;
            }
            None => packed_rows.push((vec![u], n)),
        }
    }
    let len = packed_rows.iter().map(|(_, used)| *used).max().unwrap_or(0).max(1);
    let total = packed_rows.len() * len;
    let (mut ids, mut positions, mut group, mut branch) =
        (vec![pad_id; total], vec![0i64; total], vec![0i64; total], vec![0i64; total]);
    let mut source = vec![-1i64; (rows * width) as usize];
    let mut next_group = 0;
    for (r, (row, _)) in packed_rows.iter().enumerate() {
        let mut at = r * len;
        for &u in row {
            let unit = &units[u];
            let n = unit.ids.len();
            ids[at..at + n].copy_from_slice(&unit.ids);
            positions[at..at + n].copy_from_slice(&unit.positions);
            branch[at..at + n].copy_from_slice(&unit.branch);
            group[at..at + n].fill(next_group);
            next_group += 1;
            for (logical_row, index) in &unit.rows {
                for (t, &k) in index.iter().enumerate() {
                    source[logical_row * width as usize + t] = (at + k) as i64;
                }
            }
            at += n;
        }
        // Padding at the end of a row: each token its own group, so it sees only itself (no NaN rows).
        for pad_group in &mut group[at..(r + 1) * len] {
            *pad_group = next_group;
            next_group += 1;
        }
    }
    let shape = [packed_rows.len() as i64, len as i64];
    let tensor = |v: &[i64]| Tensor::from_slice(v).view(shape);
    PackedBatch {
        segments: Some(Segments {
            input_ids: tensor(&ids),
            positions: tensor(&positions),
            group: tensor(&group),
            branch: tensor(&branch),
        }),
        source: Tensor::from_slice(&source).view([rows, width]),
        logical,
        desirable: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenize::Sequence;

    fn pair(prompt: &[i64], chosen: &[i64], rejected: &[i64]) -> TokenizedPair {
        let seq = |c: &[i64]| Sequence { ids: prompt.iter().chain(c).copied().collect(), prompt_len: prompt.len() };
        TokenizedPair {
            location: String::new(),
            prompt_ids: prompt.to_vec(),
            chosen: seq(chosen),
            rejected: seq(rejected),
        }
    }

    fn values(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn shared_prefix_runs_once_and_sources_point_at_the_right_tokens() {
        let pairs = [pair(&[1, 2, 3], &[4, 5], &[6]), pair(&[7], &[8], &[9, 10, 11])];
        let refs: Vec<&TokenizedPair> = pairs.iter().collect();
        let packed = pack(&refs, 0, None, PackOptions { row_tokens: 64, ..Default::default() });
        let seg = packed.segments.as_ref().unwrap();
        assert_eq!(values(&seg.input_ids), vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(values(&seg.positions), vec![0, 1, 2, 3, 4, 3, 0, 1, 1, 2, 3]);
        assert_eq!(values(&seg.branch), vec![0, 0, 0, 1, 1, 2, 0, 1, 2, 2, 2]);
        assert_eq!(values(&seg.group), vec![0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
        // Every real logical token maps to a packed token with the same id.
        let logical_ids = values(&packed.logical.input_ids);
        let real = values(&packed.logical.attention_mask);
        let flat_ids = values(&seg.input_ids);
        for (k, &s) in values(&packed.source).iter().enumerate() {
            assert_eq!(s >= 0, real[k] == 1, "logical token {k}");
            if s >= 0 {
                assert_eq!(flat_ids[s as usize], logical_ids[k]);
            }
        }
    }

    #[test]
    fn without_packing_each_pair_gets_a_row_and_without_sharing_each_sequence_a_unit() {
        let pairs = [pair(&[1, 2], &[3], &[4]), pair(&[5], &[6], &[7])];
        let refs: Vec<&TokenizedPair> = pairs.iter().collect();
        let rows = pack(&refs, 0, None, PackOptions { packing: false, ..Default::default() });
        assert_eq!(rows.segments.as_ref().unwrap().input_ids.size(), vec![2, 4]);
        let unshared =
            pack(&refs, 0, None, PackOptions { prefix_sharing: false, row_tokens: 64, ..Default::default() });
        assert_eq!(values(&unshared.segments.as_ref().unwrap().input_ids), vec![1, 2, 3, 1, 2, 4, 5, 6, 5, 7]);
        // By default no row outgrows the longest pair: [1 2 3 4] and [5 6 7] fill one row each.
        let auto = pack(&refs, 0, None, PackOptions::default());
        assert_eq!(auto.segments.as_ref().unwrap().input_ids.size(), vec![2, 4]);
        let short = [pair(&[1, 2, 3, 4], &[5], &[6]), pair(&[7], &[8], &[9]), pair(&[10], &[11], &[12])];
        let short_refs: Vec<&TokenizedPair> = short.iter().collect();
        let auto = pack(&short_refs, 0, None, PackOptions::default());
        assert_eq!(values(&auto.segments.as_ref().unwrap().input_ids), vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let trl = pack(&refs, 0, None, PackOptions::TRL);
        assert!(trl.segments.is_none());
        assert_eq!(values(&trl.source), (0..12).collect::<Vec<_>>());
    }
}
