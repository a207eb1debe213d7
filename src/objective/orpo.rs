//! ORPO (TRL's `ORPOTrainer`): NLL over prompt + chosen plus λ times the log odds ratio of the averaged
//! completion log-probs; the metrics it logs.

use crate::objective::logps::TokenScores;
use crate::objective::metrics::{log_rewards, MetricLog};
use tch::{Kind, Tensor};

/// log(1 - exp(x)) for x < 0, stable at both ends (log(-expm1(x)) near 0, log1p(-exp(x)) far from it).
pub fn log1mexp(x: &Tensor) -> Tensor {
    let near_zero = x.ge(-std::f64::consts::LN_2);
    (-x.expm1()).log().where_self(&near_zero, &(-x.exp()).log1p())
}

pub struct OrpoTerms {
    /// scalar: nll_loss - mean(β · log σ(log_odds))
    pub loss: Tensor,
    /// scalar: mean token NLL over every real token of the chosen rows after the first
    pub nll_loss: Tensor,
    /// averaged completion log-probs, [B] each
    pub chosen_logps: Tensor,
    pub rejected_logps: Tensor,
    /// [B]
    pub log_odds: Tensor,
}

pub fn orpo_terms(scores: &TokenScores, beta: f64) -> OrpoTerms {
    let batch = scores.logps.size()[0] / 2;
    let chosen_rows = |t: &Tensor| t.narrow(0, 0, batch);
    let real = chosen_rows(&scores.attention_mask);
    let nll_loss = -(chosen_rows(&scores.logps) * &real).sum(Kind::Float) / real.sum(Kind::Float);
    let averaged = scores.averaged_logps();
    let (chosen_logps, rejected_logps) = (averaged.narrow(0, 0, batch), averaged.narrow(0, batch, batch));
    let log_odds = (&chosen_logps - &rejected_logps) - (log1mexp(&chosen_logps) - log1mexp(&rejected_logps));
    let loss = &nll_loss - (log_odds.log_sigmoid() * beta).mean(Kind::Float);
    OrpoTerms { loss, nll_loss, chosen_logps, rejected_logps, log_odds }
}

/// Appends one batch's values of TRL's ORPO metrics to `log`.
pub fn log_batch_metrics(log: &mut MetricLog, scores: &TokenScores, terms: &OrpoTerms, beta: f64) {
    let scalar = |t: Tensor| t.double_value(&[]);
    let batch = terms.chosen_logps.size()[0];
    let rewards = (&terms.chosen_logps * beta, &terms.rejected_logps * beta);
    log_rewards(log, (&rewards.0, &rewards.1), (&terms.chosen_logps, &terms.rejected_logps));
    // TRL averages the logits of every position of each half, prompt and padding included (a packed layout has
    // no padding: docs/TRAINING.md).
    log.push("logits/chosen", scores.mean_logit_of_rows(0, batch as i64, false));
    log.push("logits/rejected", scores.mean_logit_of_rows(batch as i64, batch as i64, false));
    log.push("nll_loss", scalar(terms.nll_loss.shallow_clone()));
    log.push("log_odds_ratio", scalar(terms.log_odds.log_sigmoid().mean(Kind::Float)));
    log.push("log_odds_chosen", scalar(terms.log_odds.mean(Kind::Float)));
}
