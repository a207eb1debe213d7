//! One forward and backward pass of the policy over a batch. The lm_head runs in chunks (`model::lm_head`),
//! so backpropagation is in three parts: the loss to the log-probs (autograd), the log-probs to the final
//! hidden states and lm_head weight (`LmHeadTape`), the hidden states to every other parameter (autograd, or
//! layer by layer with recomputation under gradient checkpointing).

use crate::data::batches::MicroBatch;
use crate::data::pack::PackedBatch;
use crate::model::decoder::CausalLm;
use crate::model::lm_head::{backward_from, score_hidden, summed_completion_logps, ModelInput, Precision};
use crate::objective::dpo::PairLogps;
use crate::objective::metrics::MetricLog;
use crate::objective::{Given, Objective};
use tch::Tensor;

#[derive(Debug, Clone, Copy, Default)]
pub struct StepOptions {
    pub precision: Precision,
    /// Keep only each layer's input during the forward pass and recompute the layer during backward.
    pub gradient_checkpointing: bool,
    /// The seed of this gradient pass's dropout masks on the adapters' input (LoRA's `lora_dropout`); None: no
    /// dropout. The trainer derives one per step and micro-batch where the objective trains with dropout (SFT).
    pub lora_dropout: Option<u64>,
}

/// What the loss of `micro` takes as given: the reference's log-probs (computed by the caller, or precomputed)
/// and, for KTO, the policy's log-probs of the KL sequences, without gradient as TRL computes them.
pub fn given(policy: &CausalLm, micro: &MicroBatch, reference: Option<PairLogps>, precision: Precision) -> Given {
    let kl_logps = micro.kto.as_ref().map(|k| summed_completion_logps(policy, &k.kl, precision));
    Given { reference, kl_logps }
}

/// Computes the loss of `packed` times `scale`, appends its metrics to `log` and, when the loss is finite,
/// accumulates its gradient in the model's parameters. Returns the scaled loss.
pub fn forward_backward(
    model: &CausalLm,
    packed: &PackedBatch,
    objective: &Objective,
    given: &Given,
    scale: f64,
    options: StepOptions,
    log: &mut MetricLog,
) -> f64 {
    let input = ModelInput::new(packed, model.lm_head_weight().device());
    let layout = input.layout();
    let cast = options.precision.cast;
    let ctx = model.layer_context(&input.input_ids, &layout, cast).with_lora_dropout(options.lora_dropout);
    // With checkpointing the forward pass builds no graph and keeps the input of every layer (and of the norm).
    let mut layer_inputs = Vec::new();
    let hidden = if options.gradient_checkpointing {
        tch::no_grad(|| {
            let mut x = model.embed(&input.input_ids);
            for i in 0..model.num_layers() {
                layer_inputs.push(x.shallow_clone());
                x = model.layer(i, &x, &ctx);
            }
            layer_inputs.push(x.shallow_clone());
            model.final_norm(&x)
        })
    } else {
        model.hidden_states_in(&input.input_ids, &ctx)
    }; // [R, L, hidden]

    let (scores, tape) = score_hidden(model, packed, &hidden, objective.needed(), options.precision, true);
    let loss = objective.batch_loss(&scores, packed, given, log) * scale;
    let value = loss.double_value(&[]);
    if !value.is_finite() {
        return value;
    }
    loss.backward();
    let logps_grad = scores.logps.grad();
    let logps_grad = if logps_grad.defined() { logps_grad } else { scores.logps.zeros_like() };
    let mut grad = tape.backward(model, &logps_grad).view_as(&hidden); // d loss / d hidden, [R, L, hidden]
    if !options.gradient_checkpointing {
        backward_from(&hidden, &grad);
        return value;
    }
    // Recompute the norm and each layer from its saved input, last first, passing the gradient down.
    let through = |x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, grad: &Tensor| {
        let x = x.detach().set_requires_grad(true);
        backward_from(&f(&x), grad);
        x.grad()
    };
    grad = through(&layer_inputs.pop().expect("norm input"), &|x| model.final_norm(x), &grad);
    for i in (0..model.num_layers()).rev() {
        grad = through(&layer_inputs.pop().expect("layer input"), &|x| model.layer(i, x, &ctx), &grad);
    }
    let embedded = model.embed(&input.input_ids);
    if embedded.requires_grad() {
        backward_from(&embedded, &grad); // not under LoRA, where the embeddings are frozen
    }
    value
}
