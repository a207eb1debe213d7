//! What a training step consumes: the examples of each objective, and how the examples of a micro-batch become
//! the model's input (`MicroBatch`). Preference pairs run as pairs. SFT rows are independent sequences. A KTO
//! example is its prompt with its completion and with the mismatched completion of its KL estimate: the policy's
//! gradient pass runs the matched sequences only, its KL sequences run without gradient (as TRL runs them), and
//! the reference runs both as pairs [B matched rows; B KL rows], their prompt shared.

use crate::data::collate::truncated;
use crate::data::kto::KtoSequence;
use crate::data::pack::{pack_sequences, Batching, PackOptions, PackedBatch};
use crate::data::sft::SftRow;
use crate::data::tokenize::{Sequence, TokenizedPair};
use tch::{Kind, Tensor};

/// The training examples, indexed by the micro-batches.
#[derive(Clone, Copy)]
pub enum Examples<'a> {
    /// DPO, ORPO, CPO/SimPO
    Pairs(&'a [TokenizedPair]),
    Sft(&'a [SftRow]),
    Kto(&'a KtoExamples),
}

impl<'a> From<&'a [TokenizedPair]> for Examples<'a> {
    fn from(pairs: &'a [TokenizedPair]) -> Self {
        Examples::Pairs(pairs)
    }
}

impl<'a> From<&'a Vec<TokenizedPair>> for Examples<'a> {
    fn from(pairs: &'a Vec<TokenizedPair>) -> Self {
        Examples::Pairs(pairs)
    }
}

/// KTO's examples as pairs (chosen: prompt + completion, rejected: prompt + KL completion) and their labels.
pub struct KtoExamples {
    pub pairs: Vec<TokenizedPair>,
    /// whether each completion is desirable
    pub desirable: Vec<bool>,
}

impl KtoExamples {
    pub fn new(sequences: &[KtoSequence]) -> Self {
        let sequence = |prompt: &[i64], completion: &[i64]| Sequence {
            ids: prompt.iter().chain(completion).copied().collect(),
            prompt_len: prompt.len(),
        };
        let pairs = sequences
            .iter()
            .map(|s| TokenizedPair {
                location: s.location.clone(),
                prompt_ids: s.prompt_ids.clone(),
                chosen: sequence(&s.prompt_ids, &s.completion_ids),
                rejected: sequence(&s.prompt_ids, &s.kl_completion_ids),
            })
            .collect();
        KtoExamples { pairs, desirable: sequences.iter().map(|s| s.label).collect() }
    }
}

/// A micro-batch as a step runs it.
pub struct MicroBatch {
    /// What the policy's gradient pass runs and the loss reads.
    pub batch: PackedBatch,
    /// KTO's other sequences.
    pub kto: Option<KtoBatches>,
}

pub struct KtoBatches {
    /// The KL sequences (prompt + mismatched completion), which the policy scores without gradient.
    pub kl: PackedBatch,
    /// [matched; KL] as pairs, for the reference.
    pub pairs: PackedBatch,
}

impl MicroBatch {
    /// What the reference scores: the pairs (KTO's [matched; KL]).
    pub fn reference_input(&self) -> &PackedBatch {
        self.kto.as_ref().map_or(&self.batch, |k| &k.pairs)
    }

    /// The tokens transformers counts in `num_tokens`: every real token of the gradient pass (not KTO's KL rows).
    pub fn num_tokens(&self) -> i64 {
        self.batch.logical.attention_mask.sum(Kind::Int64).int64_value(&[])
    }
}

impl<'a> Examples<'a> {
    pub fn len(&self) -> usize {
        match self {
            Examples::Pairs(pairs) => pairs.len(),
            Examples::Sft(rows) => rows.len(),
            Examples::Kto(examples) => examples.pairs.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pairs a reference model scores (KTO's: matched and KL sequences); none for SFT.
    pub fn pairs(&self) -> Option<&'a [TokenizedPair]> {
        match *self {
            Examples::Pairs(pairs) => Some(pairs),
            Examples::Kto(examples) => Some(&examples.pairs),
            Examples::Sft(_) => None,
        }
    }

    /// The data rows behind the examples at `indices`, for messages.
    pub fn locations(&self, indices: &[usize]) -> Vec<String> {
        let mut out = Vec::new();
        for &i in indices {
            match self {
                Examples::Sft(rows) => out.extend(rows[i].sources.iter().cloned()),
                _ => out.push(self.pairs().expect("pairs")[i].location.clone()),
            }
        }
        out
    }

    /// The micro-batch of the examples at `indices`, laid out by `batching`. SFT rows that TRL packed keep their
    /// sequences apart in any layout (each attends only to itself, positions from 0).
    pub fn micro_batch(&self, indices: &[usize], batching: &Batching) -> MicroBatch {
        fn pick<'p>(pairs: &'p [TokenizedPair], indices: &[usize]) -> Vec<&'p TokenizedPair> {
            indices.iter().map(|&i| &pairs[i]).collect()
        }
        // sequences that never share a prompt: TRL's padded rows, or packed
        let sequences = |rows: &[(Vec<i64>, Vec<i64>)], packed_rows: bool| {
            let layout = PackOptions {
                prefix_sharing: false,
                packing: batching.layout.packing || packed_rows,
                row_tokens: batching.layout.row_tokens,
            };
            pack_sequences(rows, batching.pad_id, layout)
        };
        match self {
            Examples::Pairs(all) => MicroBatch { batch: batching.pack(&pick(all, indices)), kto: None },
            Examples::Kto(examples) => {
                let pairs = pick(&examples.pairs, indices);
                let side = |kl: bool| -> Vec<(Vec<i64>, Vec<i64>)> {
                    let sequence =
                        |p: &TokenizedPair| truncated(if kl { &p.rejected } else { &p.chosen }, batching.truncation);
                    pairs.iter().map(|&p| sequence(p)).collect()
                };
                let mut batch = sequences(&side(false), false);
                let desirable: Vec<bool> = indices.iter().map(|&i| examples.desirable[i]).collect();
                batch.desirable = Some(Tensor::from_slice(&desirable));
                let kto = KtoBatches { kl: sequences(&side(true), false), pairs: batching.pack(&pairs) };
                MicroBatch { batch, kto: Some(kto) }
            }
            Examples::Sft(rows) => {
                let rows_of: Vec<(Vec<i64>, Vec<i64>)> = indices.iter().flat_map(|&i| rows[i].sequences()).collect();
                let packed_rows = indices.iter().any(|&i| rows[i].seq_lengths.len() > 1);
                MicroBatch { batch: sequences(&rows_of, packed_rows), kto: None }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::collate::TruncationMode;

    /// KTO's gradient pass holds the matched sequences only; the KL sequences form a batch of their own (the
    /// policy scores them without gradient) and the reference gets both as pairs. All are cut as TRL's collator
    /// cuts them (prompt + completion to max_length, keeping the start).
    #[test]
    fn kto_micro_batches_keep_the_kl_sequences_out_of_the_gradient_pass() {
        let sequence = |i: i64, label| KtoSequence {
            location: format!("row {i}"),
            label,
            prompt_ids: vec![10 + i; 3],
            completion_ids: vec![20 + i; 2 + i as usize],
            kl_completion_ids: vec![30 + i; 4],
        };
        let examples = KtoExamples::new(&[sequence(0, true), sequence(1, false)]);
        for layout in [PackOptions::TRL, PackOptions::default()] {
            let batching = Batching { pad_id: 0, truncation: Some((6, TruncationMode::KeepStart)), layout };
            let micro = Examples::Kto(&examples).micro_batch(&[1, 0], &batching);
            let ids = |b: &PackedBatch| Vec::<Vec<i64>>::try_from(&b.logical.input_ids).unwrap();
            assert_eq!(ids(&micro.batch), [vec![11, 11, 11, 21, 21, 21], vec![10, 10, 10, 20, 20, 0]]);
            assert_eq!(Vec::<bool>::try_from(micro.batch.desirable.as_ref().unwrap()).unwrap(), [false, true]);
            assert_eq!(micro.num_tokens(), 11);
            let kto = micro.kto.as_ref().expect("KTO's other sequences");
            assert_eq!(ids(&kto.kl), [vec![11, 11, 11, 31, 31, 31], vec![10, 10, 10, 30, 30, 30]]);
            assert_eq!(ids(micro.reference_input()), [ids(&micro.batch), ids(&kto.kl)].concat());
        }
    }
}
