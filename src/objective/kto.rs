//! KTO (TRL's `KTOTrainer`, arXiv 2402.01306): each completion's implicit reward β·(log π − log π_ref) pushed above
//! (desirable) or below (undesirable) a KL estimate taken from mismatched prompt/completion pairs; the metrics TRL
//! logs. The batch holds the B matched sequences; the KL sequences' log-probs arrive computed (`Given`).

use crate::data::pack::PackedBatch;
use crate::model::lm_head::TokenScores;
use crate::objective::metrics::MetricLog;
use crate::objective::Given;
use tch::{Kind, Tensor};

/// KTOConfig's `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KtoLoss {
    #[default]
    Kto,
    /// APO-zero, unpaired (arXiv 2408.06266): no KL term
    ApoZeroUnpaired,
}

impl KtoLoss {
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "kto" => Ok(KtoLoss::Kto),
            "apo_zero_unpaired" => Ok(KtoLoss::ApoZeroUnpaired),
            other => anyhow::bail!("unknown KTO loss_type \"{other}\": expected kto or apo_zero_unpaired"),
        }
    }
}

/// KTO's settings, with TRL's `KTOConfig` defaults.
#[derive(Debug, Clone, Copy)]
pub struct KtoParams {
    pub beta: f64,
    pub loss: KtoLoss,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Default for KtoParams {
    fn default() -> Self {
        Self { beta: 0.1, loss: KtoLoss::Kto, desirable_weight: 1.0, undesirable_weight: 1.0 }
    }
}

/// The loss of one batch (the mean over its examples, NaNs left out); its metrics are appended to `log`.
pub fn batch_loss(
    scores: &TokenScores,
    batch: &PackedBatch,
    given: &Given,
    params: &KtoParams,
    log: &mut MetricLog,
) -> Tensor {
    let device = scores.logps.device();
    let desirable = batch.desirable.as_ref().expect("a KTO batch carries its labels").to_device(device);
    let reference = given.reference.as_ref().expect("KTO needs its reference's log-probs");
    let kl_logps = given.kl_logps.as_ref().expect("KTO needs the policy's log-probs of its KL sequences");
    let logps = scores.summed_logps(); // [B]
    let beta = params.beta;
    // the KL estimate: a constant of the loss, at least 0
    let kl = (kl_logps.detach() - &reference.rejected).mean(Kind::Float).clamp_min(0.0);
    let logratios = &logps - &reference.chosen; // [B]
    let (desirable_losses, undesirable_losses): (Tensor, Tensor) = match params.loss {
        KtoLoss::Kto => (1.0 - ((&logratios - &kl) * beta).sigmoid(), 1.0 - ((&kl - &logratios) * beta).sigmoid()),
        KtoLoss::ApoZeroUnpaired => (1.0 - (&logratios * beta).sigmoid(), (&logratios * beta).sigmoid()),
    };
    let losses = desirable_losses.where_self(&desirable, &undesirable_losses);
    let weights = Tensor::from(params.desirable_weight)
        .to_device(device)
        .where_self(&desirable, &Tensor::from(params.undesirable_weight).to_device(device));
    let losses = losses * weights;
    let loss = losses.nanmean(None::<&[i64]>, false, Kind::Float);

    let scalar = |t: &Tensor| t.double_value(&[]);
    log.push("kl", scalar(&kl));
    let completions = &scores.completion_mask;
    let tokens = completions.sum(Kind::Float).double_value(&[]);
    let entropy = &scores.entropy;
    log.push("entropy", if tokens > 0.0 { scalar(&(entropy * completions).sum(Kind::Float)) / tokens } else { 0.0 });
    let mean_logits = &scores.mean_logits;
    let rewards = logratios.detach() * beta;
    let mut means = [None, None];
    for (i, (label, name)) in [(true, "chosen"), (false, "rejected")].into_iter().enumerate() {
        let rows = if label { desirable.shallow_clone() } else { desirable.logical_not() };
        let count = rows.sum(Kind::Float).double_value(&[]);
        let rows_f = rows.to_kind(Kind::Float).unsqueeze(1);
        let mask = completions * &rows_f;
        let label_tokens = mask.sum(Kind::Float).double_value(&[]);
        if label_tokens > 0.0 {
            log.push(&format!("logits/{name}"), scalar(&(mean_logits * &mask).sum(Kind::Float)) / label_tokens);
        }
        if count > 0.0 {
            let total = |t: &Tensor| scalar(&t.masked_select(&rows).nansum(None::<&[i64]>, false, Kind::Float)) / count;
            let reward = total(&rewards);
            log.push(&format!("rewards/{name}"), reward);
            log.push(&format!("logps/{name}"), total(&logps.detach()));
            means[i] = Some(reward);
        }
    }
    if let [Some(chosen), Some(rejected)] = means {
        log.push("rewards/margins", chosen - rejected);
    }
    loss
}
