//! What a training step consumes: the examples of each objective, and how the examples of a micro-batch become
//! the model's input (`pack`). Preference pairs and KTO's examples share the pair layout: a KTO example is its
//! prompt with its completion and with the mismatched completion of its KL estimate, so the batch is [B matched
//! rows; B KL rows] and the prompt can be shared. SFT rows are independent sequences.

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
    pub fn pack(&self, indices: &[usize], batching: &Batching) -> PackedBatch {
        fn pick<'p>(pairs: &'p [TokenizedPair], indices: &[usize]) -> Vec<&'p TokenizedPair> {
            indices.iter().map(|&i| &pairs[i]).collect()
        }
        match self {
            Examples::Pairs(all) => batching.pack(&pick(all, indices)),
            Examples::Kto(examples) => {
                let mut batch = batching.pack(&pick(&examples.pairs, indices));
                let desirable: Vec<bool> = indices.iter().map(|&i| examples.desirable[i]).collect();
                batch.desirable = Some(Tensor::from_slice(&desirable));
                batch
            }
            Examples::Sft(rows) => {
                let sequences: Vec<(Vec<i64>, Vec<i64>)> = indices.iter().flat_map(|&i| rows[i].sequences()).collect();
                let packed_rows = indices.iter().any(|&i| rows[i].seq_lengths.len() > 1);
                let layout = PackOptions {
                    prefix_sharing: false,
                    packing: batching.layout.packing || packed_rows,
                    row_tokens: batching.layout.row_tokens,
                };
                pack_sequences(&sequences, batching.pad_id, layout)
            }
        }
    }

    /// The tokens of `batch` that transformers counts in `num_tokens`: every real token, except KTO's KL rows.
    pub fn num_tokens(&self, batch: &PackedBatch) -> i64 {
        let mask = &batch.logical.attention_mask;
        let mask = match self {
            Examples::Kto(_) => mask.narrow(0, 0, mask.size()[0] / 2),
            _ => mask.shallow_clone(),
        };
        mask.sum(Kind::Int64).int64_value(&[])
    }
}
