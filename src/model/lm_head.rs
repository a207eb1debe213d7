//! The LM head over a batch: per-token scores (log-probability of each next token, entropy, mean logit, whether
//! the next token is the argmax) and their backward pass. Position t scores token t+1 (the shift every causal LM
//! loss makes), so every tensor here is TRL's logical [2B, T-1], whatever layout the model ran (`data::pack`).
//!
//! The [tokens, vocab] logits are never materialized for the whole batch: the lm_head, log-softmax and gather
//! run over chunks of the positions whose log-probs are needed, in f32, and `LmHeadTape::backward` turns d loss /
//! d log-prob into gradients of the hidden states and the lm_head weight from each chunk's softmax: kept from the
//! forward pass when all of them fit in `KEPT_ELEMENTS`, else recomputed chunk by chunk.

use crate::data::pack::PackedBatch;
use crate::model::decoder::{CausalLm, TokenLayout};
use tch::{Device, Kind, Tensor};

/// Logits of at most this many elements exist at once (64 MiB in f32).
const CHUNK_ELEMENTS: i64 = 1 << 24;
/// The softmax of every chunk is kept for the backward pass when they have at most this many elements together
/// (128 MiB in f32): what recomputing a chunk's logits and softmax there would hold at once.
const KEPT_ELEMENTS: i64 = 2 * CHUNK_ELEMENTS;

pub struct TokenScores {
    /// log p(input[t+1] | input[..=t]) where needed (see `Needed`), 0 elsewhere, [2B, T-1] f32
    pub logps: Tensor,
    /// entropy of the next-token distribution where log-probs were computed, [2B, T-1]
    pub entropy: Tensor,
    /// mean over the vocabulary of the logits, [2B, T-1]
    pub mean_logits: Tensor,
    /// the same at the last position, which scores no token, [2B]
    pub last_mean_logits: Tensor,
    /// 1 where `mean_logits` exists: everywhere in TRL's layout, on real tokens in a packed one, [2B, T-1]
    pub logit_mask: Tensor,
    /// the same for `last_mean_logits`, [2B]
    pub last_logit_mask: Tensor,
    /// next token is the argmax, [2B, T-1] bool
    pub is_top1: Tensor,
    /// shifted completion mask (1 where the scored token is a completion token), [2B, T-1] f32
    pub completion_mask: Tensor,
    /// shifted attention mask (1 where the scored token is a real token), [2B, T-1] f32
    pub attention_mask: Tensor,
}

impl TokenScores {
    /// Sum of completion log-probs per sequence, [2B].
    pub fn summed_logps(&self) -> Tensor {
        (&self.logps * &self.completion_mask).sum_dim_intlist(-1, false, Kind::Float)
    }

    /// Completion tokens per sequence, [2B].
    pub fn completion_tokens(&self) -> Tensor {
        self.completion_mask.sum_dim_intlist(-1, false, Kind::Float)
    }

    /// Mean completion log-prob per sequence, [2B] (NaN for an empty completion, as in TRL).
    pub fn averaged_logps(&self) -> Tensor {
        self.summed_logps() / self.completion_tokens()
    }

    /// Mean logit over the positions of rows `start..start+rows` that have one; with `last`, the last position
    /// (which scores no token) counts too.
    pub fn mean_logit_of_rows(&self, start: i64, rows: i64, last: bool) -> f64 {
        let mask = self.logit_mask.narrow(0, start, rows);
        let mut sum = (self.mean_logits.narrow(0, start, rows) * &mask).sum(Kind::Float);
        let mut count = mask.sum(Kind::Float);
        if last {
            let last_mask = self.last_logit_mask.narrow(0, start, rows);
            sum += (self.last_mean_logits.narrow(0, start, rows) * &last_mask).sum(Kind::Float);
            count += last_mask.sum(Kind::Float);
        }
        (sum / count).double_value(&[])
    }
}

/// Which positions need log-probs: every objective scores completion tokens; ORPO's NLL also every token of
/// the chosen rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needed {
    Completions,
    CompletionsAndChosenRows,
}

/// How a batch is run: its layout and the autocast dtype (None: the weights' dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Precision {
    pub cast: Option<Kind>,
}

/// The model input of `packed`, on `device`.
pub struct ModelInput {
    pub input_ids: Tensor,
    mask: InputMask,
}

/// The tensors behind a `TokenLayout`, owned.
enum InputMask {
    Padded { attention_mask: Tensor },
    Segments { positions: Tensor, group: Tensor, branch: Tensor },
}

impl ModelInput {
    pub fn new(packed: &PackedBatch, device: Device) -> Self {
        match &packed.segments {
            Some(s) => ModelInput {
                input_ids: s.input_ids.to_device(device),
                mask: InputMask::Segments {
                    positions: s.positions.to_device(device),
                    group: s.group.to_device(device),
                    branch: s.branch.to_device(device),
                },
            },
            None => ModelInput {
                input_ids: packed.logical.input_ids.to_device(device),
                mask: InputMask::Padded { attention_mask: packed.logical.attention_mask.to_device(device) },
            },
        }
    }

    pub fn layout(&self) -> TokenLayout<'_> {
        match &self.mask {
            InputMask::Segments { positions, group, branch } => TokenLayout::Segments { positions, group, branch },
            InputMask::Padded { attention_mask } => TokenLayout::Padded(Some(attention_mask)),
        }
    }
}

/// What `LmHeadTape::backward` needs: the scored positions' hidden states and targets.
pub struct LmHeadTape {
    /// [N, hidden], detached
    hidden: Tensor,
    /// next token ids, [N]
    targets: Tensor,
    /// position in the flattened logical [2B * (T-1)] of each scored row, [N]
    logical_index: Tensor,
    /// row of the flattened model hidden states [R * L] it came from, [N]
    hidden_index: Tensor,
    /// rows of the flattened model hidden states
    hidden_rows: i64,
    cast: Option<Kind>,
    /// each chunk's softmax [c, V] f32, from the forward pass, when kept (see `KEPT_ELEMENTS`)
    kept_softmax: Vec<Tensor>,
}

/// The lm_head weight [vocab, hidden] in the dtype its matrix products run in.
fn matmul_weight(model: &CausalLm, cast: Option<Kind>) -> Tensor {
    let weight = model.lm_head_weight();
    cast.map_or_else(|| weight.shallow_clone(), |kind| weight.to_kind(kind))
}

/// Logits of hidden rows h [n, hidden] in f32, [n, vocab].
fn chunk_logits(h: &Tensor, weight: &Tensor) -> Tensor {
    h.to_kind(weight.kind()).matmul(&weight.tr()).to_kind(Kind::Float)
}

fn chunk_rows(vocab: i64) -> i64 {
    (CHUNK_ELEMENTS / vocab.max(1)).max(16)
}

/// Runs `model` over `packed` (no gradient) and scores the needed tokens.
pub fn score_tokens(model: &CausalLm, packed: &PackedBatch, needed: Needed, precision: Precision) -> TokenScores {
    let input = ModelInput::new(packed, model.lm_head_weight().device());
    let hidden = tch::no_grad(|| model.hidden_states(&input.input_ids, &input.layout(), precision.cast));
    let mut scores = score_hidden(model, packed, &hidden, needed, precision, false).0;
    scores.logps = scores.logps.detach();
    scores
}

/// Summed completion log-probs per sequence under `model` (no gradient), [2B]: what DPO needs of its reference.
/// Skips the metrics `score_tokens` computes beside them (entropy, argmax, mean logit); the log-probs are the
/// same operations, so a reference equal to the policy gives bit-equal values.
pub fn summed_completion_logps(model: &CausalLm, packed: &PackedBatch, precision: Precision) -> Tensor {
    let input = ModelInput::new(packed, model.lm_head_weight().device());
    tch::no_grad(|| {
        let hidden = model.hidden_states(&input.input_ids, &input.layout(), precision.cast);
        let masks = ShiftedMasks::new(packed);
        let tape = LmHeadTape::new(packed, &hidden, &masks, Needed::Completions, precision.cast);
        let masks = masks.to_device(hidden.device());
        let (logps, _, _) = tape.chunked_scores(model, false, false);
        let rows = packed.logical.input_ids.size()[0];
        let logps = tape.dense(&logps, rows, masks.len);
        (logps * &masks.completion).sum_dim_intlist(-1, false, Kind::Float)
    })
}

/// The logical layout's masks shifted by one position (position t scores token t+1), [2B, T-1] f32 each. Made on
/// the CPU, where the batch is, so that the positions they select are found there (`LmHeadTape::new`).
struct ShiftedMasks {
    completion: Tensor,
    attention: Tensor,
    /// T-1
    len: i64,
}

impl ShiftedMasks {
    fn new(packed: &PackedBatch) -> Self {
        let len = packed.logical.input_ids.size()[1] - 1;
        let shift = |mask: &Tensor| mask.narrow(1, 1, len).to_kind(Kind::Float);
        ShiftedMasks {
            completion: shift(&packed.logical.completion_mask),
            attention: shift(&packed.logical.attention_mask),
            len,
        }
    }

    fn to_device(&self, device: Device) -> Self {
        ShiftedMasks {
            completion: self.completion.to_device(device),
            attention: self.attention.to_device(device),
            len: self.len,
        }
    }
}

/// Scores the needed tokens from the model's final hidden states [R, L, hidden]. The returned log-probs are a
/// leaf that requires grad: after `loss.backward()`, its gradient goes to `LmHeadTape::backward`, which `backward`
/// says will run (the tape then keeps what it can of the forward pass for it).
pub fn score_hidden(
    model: &CausalLm,
    packed: &PackedBatch,
    hidden: &Tensor,
    needed: Needed,
    precision: Precision,
    backward: bool,
) -> (TokenScores, LmHeadTape) {
    let weight = model.lm_head_weight();
    let device = weight.device();
    let (rows, width) = (packed.logical.input_ids.size()[0], packed.logical.input_ids.size()[1]);
    let masks = ShiftedMasks::new(packed);
    let len = masks.len;
    let mut tape = LmHeadTape::new(packed, hidden, &masks, needed, precision.cast);
    let masks = masks.to_device(device);
    let source = packed.source.to_device(device); // [2B, T]

    let keep = backward && tape.targets.size()[0] * weight.size()[0] <= KEPT_ELEMENTS;
    let (logps, entropy, is_top1, mean_logits) = tch::no_grad(|| {
        let (logps, metrics, kept) = tape.chunked_scores(model, true, keep);
        tape.kept_softmax = kept;
        let (entropy, top1) = metrics.expect("metrics requested");
        // The mean logit is the hidden state times the mean lm_head row: no vocabulary-wide logits needed.
        let hidden_flat = hidden.detach().reshape([tape.hidden_rows, -1]); // [R*L, hidden]
        let mean_row = weight.to_kind(Kind::Float).mean_dim(0, false, Kind::Float); // [hidden]
        let mean_logits = hidden_flat
            .to_kind(Kind::Float)
            .matmul(&mean_row)
            .index_select(0, &source.clamp_min(0).flatten(0, -1))
            .view([rows, width]);
        (tape.dense(&logps, rows, len), tape.dense(&entropy, rows, len), tape.dense(&top1, rows, len), mean_logits)
    });
    let has_logits = source.ge(0).to_kind(Kind::Float);
    let scores = TokenScores {
        logps: logps.set_requires_grad(true),
        entropy,
        mean_logits: mean_logits.narrow(1, 0, len),
        last_mean_logits: mean_logits.select(1, len),
        logit_mask: has_logits.narrow(1, 0, len),
        last_logit_mask: has_logits.select(1, len),
        is_top1,
        completion_mask: masks.completion,
        attention_mask: masks.attention,
    };
    (scores, tape)
}

impl LmHeadTape {
    /// Picks the positions of `hidden` [R, L, hidden] whose next token is scored: completion tokens, and with
    /// `Needed::CompletionsAndChosenRows` every real token of the chosen rows. `masks` are on the CPU: found
    /// there, the indices cost the GPU nothing, where `nonzero` (whose output size the host must know) would wait
    /// for every kernel issued so far, the whole forward pass.
    fn new(packed: &PackedBatch, hidden: &Tensor, masks: &ShiftedMasks, needed: Needed, cast: Option<Kind>) -> Self {
        let device = hidden.device();
        let logical = &packed.logical;
        let (rows, len) = (logical.input_ids.size()[0], masks.len);
        let hidden_size = *hidden.size().last().expect("hidden states");
        let hidden_flat = hidden.detach().reshape([-1, hidden_size]); // [R*L, hidden]
        let mut scored = masks.completion.gt(0.0);
        if needed == Needed::CompletionsAndChosenRows {
            let chosen_rows = Tensor::arange(rows, tch::kind::INT64_CPU).lt(rows / 2).unsqueeze(1);
            scored = scored.logical_or(&masks.attention.gt(0.0).logical_and(&chosen_rows));
        }
        let logical_index = scored.flatten(0, -1).nonzero().squeeze_dim(1); // [N]
        let hidden_index = packed.source.narrow(1, 0, len).flatten(0, -1).index_select(0, &logical_index);
        let targets = logical.input_ids.narrow(1, 1, len).flatten(0, -1).index_select(0, &logical_index);
        let [logical_index, hidden_index, targets] =
            [logical_index, hidden_index, targets].map(|t| t.to_device(device));
        LmHeadTape {
            hidden: hidden_flat.index_select(0, &hidden_index),
            targets,
            logical_index,
            hidden_index,
            hidden_rows: hidden_flat.size()[0],
            cast,
            kept_softmax: Vec::new(),
        }
    }

    /// Log-prob of each scored row's target, [N]; with `metrics` also the entropy of its next-token
    /// distribution and whether the target is the argmax, [N] each; with `keep` each chunk's softmax. Runs under
    /// no_grad.
    fn chunked_scores(
        &self,
        model: &CausalLm,
        metrics: bool,
        keep: bool,
    ) -> (Tensor, Option<(Tensor, Tensor)>, Vec<Tensor>) {
        let device = self.hidden.device();
        let n = self.targets.size()[0];
        let matmul_weight = matmul_weight(model, self.cast);
        let rows_per_chunk = chunk_rows(matmul_weight.size()[0]);
        let (mut logps, mut entropy, mut top1, mut kept) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for start in (0..n).step_by(rows_per_chunk as usize) {
            let size = rows_per_chunk.min(n - start);
            let logits = chunk_logits(&self.hidden.narrow(0, start, size), &matmul_weight); // [c, V]
            let targets = self.targets.narrow(0, start, size).unsqueeze(1); // [c, 1]
            if metrics {
                top1.push(logits.argmax(-1, false).eq_tensor(&targets.squeeze_dim(1)));
            }
            // kept: the softmax as the backward pass would recompute it, so the numbers are the same either way
            let softmax = keep.then(|| logits.softmax(-1, Kind::Float));
            let log_probs = logits.log_softmax(-1, Kind::Float);
            drop(logits); // at most two [c, V] buffers at a time besides the kept ones
            logps.push(log_probs.gather(1, &targets, false).squeeze_dim(1));
            if metrics {
                let mut plogp = log_probs.exp();
                entropy.push(-plogp.g_mul_(&log_probs).sum_dim_intlist(-1, false, Kind::Float));
            }
            kept.extend(softmax);
        }
        let cat = |parts: Vec<Tensor>, kind: Kind| {
            if parts.is_empty() {
                Tensor::zeros([0], (kind, device))
            } else {
                Tensor::cat(&parts, 0)
            }
        };
        let logps = cat(logps, Kind::Float);
        (logps, metrics.then(|| (cat(entropy, Kind::Float), cat(top1, Kind::Bool))), kept)
    }

    /// Per-row values [N] placed at their logical positions, zero elsewhere, [2B, T-1].
    fn dense(&self, values: &Tensor, rows: i64, len: i64) -> Tensor {
        Tensor::zeros([rows * len], (values.kind(), values.device()))
            .index_put(&[Some(&self.logical_index)], values, false)
            .view([rows, len])
    }

    /// From d loss / d logps [2B, T-1]: accumulates the lm_head weight's gradient and returns d loss / d hidden
    /// states, [R * L, hidden]. d logp / d logits = onehot(target) - softmax, from each chunk's kept softmax or
    /// its logits recomputed.
    pub fn backward(self, model: &CausalLm, logps_grad: &Tensor) -> Tensor {
        let weight = model.lm_head_weight();
        let grad_logps = logps_grad.flatten(0, -1).index_select(0, &self.logical_index); // [N]
        let n = self.targets.size()[0];
        // Accumulate straight into the weight's gradient when it exists (after an earlier micro-batch of the step);
        // none for a frozen weight (LoRA).
        let existing = weight.grad();
        let fresh = !existing.defined();
        let mut grad_weight = weight.requires_grad().then(|| {
            if fresh {
                Tensor::zeros(weight.size(), (Kind::Float, weight.device()))
            } else {
                existing
            }
        });
        let mut grad_hidden = Vec::new();
        let mut kept = self.kept_softmax.into_iter();
        tch::no_grad(|| {
            let matmul_weight = matmul_weight(model, self.cast);
            let kind = matmul_weight.kind();
            let rows_per_chunk = chunk_rows(weight.size()[0]);
            for start in (0..n).step_by(rows_per_chunk as usize) {
                let size = rows_per_chunk.min(n - start);
                let h = self.hidden.narrow(0, start, size);
                let g = grad_logps.narrow(0, start, size).unsqueeze(1); // [c, 1]
                let mut grad_logits = match kept.next() {
                    Some(softmax) => softmax, // overwritten in place: the last use
                    None => chunk_logits(&h, &matmul_weight).softmax(-1, Kind::Float), // [c, V]
                };
                debug_assert_eq!(grad_logits.size()[0], size, "a kept softmax of another chunk");
                let _ = grad_logits.g_mul_(&-&g).scatter_add_(1, &self.targets.narrow(0, start, size).unsqueeze(1), &g);
                let grad_logits = grad_logits.to_kind(kind);
                grad_hidden.push(grad_logits.matmul(&matmul_weight).to_kind(Kind::Float)); // [c, hidden]
                match grad_weight.as_mut() {
                    Some(g) if kind == Kind::Float => {
                        let _ = g.addmm_(&grad_logits.tr(), &h); // [V, hidden]
                    }
                    Some(g) => *g += grad_logits.tr().matmul(&h.to_kind(kind)).to_kind(Kind::Float),
                    None => {}
                }
            }
        });
        let hidden_size = self.hidden.size()[1];
        let per_row = if grad_hidden.is_empty() {
            Tensor::zeros([0, hidden_size], (Kind::Float, weight.device()))
        } else {
            Tensor::cat(&grad_hidden, 0)
        };
        // A shared token's hidden state predicts both branches' next tokens: gradients add up.
        let grad = Tensor::zeros([self.hidden_rows, hidden_size], (Kind::Float, weight.device())).index_add(
            0,
            &self.hidden_index,
            &per_row,
        );
        if let (Some(g), true) = (&grad_weight, fresh) {
            backward_from(weight, g);
        }
        grad
    }
}

/// Pushes `grad` (d loss / d `output`) back through `output`'s graph; on a parameter, adds it to the parameter's
/// gradient wherever autograd keeps it.
pub fn backward_from(output: &Tensor, grad: &Tensor) {
    (output * grad.to_kind(output.kind())).sum(Kind::Float).backward();
}
