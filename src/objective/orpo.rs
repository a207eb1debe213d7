//! ORPO (TRL's `ORPOTrainer`): NLL over prompt + chosen plus λ times the log odds ratio of the averaged
//! completion log-probs; the metrics it logs.

use crate::model::lm_head::TokenScores;
use crate::objective::metrics::{log_rewards, MetricLog};
use crate::objective::split_pairs;
use tch::{Kind, Tensor};

/// ORPO's settings, with TRL's `ORPOConfig` default.
#[derive(Debug, Clone, Copy)]
pub struct OrpoParams {
    /// λ, the weight of the odds-ratio term (TRL calls it β)
    pub beta: f64,
}

impl Default for OrpoParams {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

/// log(1 - exp(x)) for x < 0, stable at both ends (log(-expm1(x)) near 0, log1p(-exp(x)) far from it).
fn log1mexp(x: &Tensor) -> Tensor {
    let near_zero = x.ge(-std::f64::consts::LN_2);
    (-x.expm1()).log().where_self(&near_zero, &(-x.exp()).log1p())
}

struct OrpoTerms {
    /// scalar: nll_loss - mean(β · log σ(log_odds))
    loss: Tensor,
    /// scalar: mean token NLL over every real token of the chosen rows after the first
    nll_loss: Tensor,
    /// averaged completion log-probs, [B] each
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    /// [B]
    log_odds: Tensor,
}

/// The loss of one batch; its metrics are appended to `log`.
pub fn batch_loss(scores: &TokenScores, params: &OrpoParams, log: &mut MetricLog) -> Tensor {
    let terms = orpo_terms(scores, params.beta);
    log_batch_metrics(log, scores, &terms, params.beta);
    terms.loss
}

fn orpo_terms(scores: &TokenScores, beta: f64) -> OrpoTerms {
    let (real, _) = split_pairs(&scores.attention_mask);
    let (chosen_token_logps, _) = split_pairs(&scores.logps);
    let nll_loss = -(chosen_token_logps * &real).sum(Kind::Float) / real.sum(Kind::Float);
    let (chosen_logps, rejected_logps) = split_pairs(&scores.averaged_logps());
    let log_odds = (&chosen_logps - &rejected_logps) - (log1mexp(&chosen_logps) - log1mexp(&rejected_logps));
    let loss = &nll_loss - (log_odds.log_sigmoid() * beta).mean(Kind::Float);
    OrpoTerms { loss, nll_loss, chosen_logps, rejected_logps, log_odds }
}

/// Appends one batch's values of TRL's ORPO metrics to `log`.
fn log_batch_metrics(log: &mut MetricLog, scores: &TokenScores, terms: &OrpoTerms, beta: f64) {
    let scalar = |t: Tensor| t.double_value(&[]);
    let batch = terms.chosen_logps.size()[0];
    let rewards = (&terms.chosen_logps * beta, &terms.rejected_logps * beta);
    log_rewards(log, (&rewards.0, &rewards.1), (&terms.chosen_logps, &terms.rejected_logps));
    // TRL averages the logits of every position of each half, prompt and padding included (a packed layout has
    // no padding: docs/TRAINING.md).
    log.push("logits/chosen", scores.mean_logit_of_rows(0, batch, false));
    log.push("logits/rejected", scores.mean_logit_of_rows(batch, batch, false));
    log.push("nll_loss", scalar(terms.nll_loss.shallow_clone()));
    log.push("log_odds_ratio", scalar(terms.log_odds.log_sigmoid().mean(Kind::Float)));
    log.push("log_odds_chosen", scalar(terms.log_odds.mean(Kind::Float)));
}
