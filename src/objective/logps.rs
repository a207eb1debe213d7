//! Per-token scores of a batch under a model: log-probability of each next token, entropy, mean logit and
//! whether the next token is the argmax. Position t scores token t+1 (the shift every causal LM loss makes),
//! so every tensor here is [2B, T-1].

use crate::data::collate::Batch;
use crate::model::decoder::CausalLm;
use tch::{Kind, Tensor};

pub struct TokenScores {
    /// log p(input[t+1] | input[..=t]) for every position, [2B, T-1] f32
    pub logps: Tensor,
    /// entropy of the next-token distribution, [2B, T-1]
    pub entropy: Tensor,
    /// mean over the vocabulary of the logits, [2B, T-1]
    pub mean_logits: Tensor,
    /// the same at the last position, which scores no token, [2B]
    pub last_mean_logits: Tensor,
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
}

/// Runs `model` over `batch` and scores every next token. Logits are computed in f32.
pub fn score_tokens(model: &CausalLm, batch: &Batch) -> TokenScores {
    let device = model.lm_head_weight().device();
    let input_ids = batch.input_ids.to_device(device);
    let attention = batch.attention_mask.to_device(device);
    let logits = model.forward(&input_ids, Some(&attention)).to_kind(Kind::Float); // [2B, T, V]
    let len = logits.size()[1];
    let last_mean_logits = logits.select(1, len - 1).mean_dim(-1, false, Kind::Float); // [2B]
    let logits = logits.narrow(1, 0, len - 1); // [2B, T-1, V]
    let next = input_ids.narrow(1, 1, len - 1); // [2B, T-1]
    let log_probs = logits.log_softmax(-1, Kind::Float);
    let logps = log_probs.gather(-1, &next.unsqueeze(-1), false).squeeze_dim(-1);
    let entropy = -(log_probs.exp() * &log_probs).sum_dim_intlist(-1, false, Kind::Float);
    let mean_logits = logits.mean_dim(-1, false, Kind::Float);
    let is_top1 = logits.argmax(-1, false).eq_tensor(&next);
    let shift = |mask: &Tensor| mask.to_device(device).narrow(1, 1, len - 1).to_kind(Kind::Float);
    TokenScores {
        logps,
        entropy,
        mean_logits,
        last_mean_logits,
        is_top1,
        completion_mask: shift(&batch.completion_mask),
        attention_mask: shift(&batch.attention_mask),
    }
}
