//! Prefix sharing, packing and gradient checkpointing compute the losses, metrics and gradients of TRL's
//! layout within f32 rounding, on Llama (tied), Mistral (sliding window 8, shorter than the sequences) and
//! Qwen2 (q/k/v biases), for DPO, ORPO and SimPO; bf16 autocast stays close to f32;
//! the reference's log-probs-only path equals the policy's scores bit for bit; the lm_head's kept softmax gives
//! the gradients its recomputation gives.

use crate::common::fixture;
use prefalign::data::collate::TruncationMode;
use prefalign::data::pack::{pack, PackOptions};
use prefalign::data::tokenize::{Sequence, TokenizedPair};
use prefalign::model::lm_head::{score_tokens, summed_completion_logps, Needed, Precision};
use prefalign::model::{self, LoadedModel};
use prefalign::objective::metrics::MetricLog;
use prefalign::objective::{CpoParams, DpoParams, Given, Objective, OrpoParams};
use prefalign::train::step::{forward_backward, StepOptions};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// Pairs of random ids with prompts of 2..14 tokens and completions of 1..18 (some sharing their first tokens).
fn random_pairs(count: usize, vocab: i64) -> Vec<TokenizedPair> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    (0..count)
        .map(|i| {
            let mut ids = |n: usize| (0..n).map(|_| rng.random_range(3..vocab)).collect::<Vec<i64>>();
            let prompt = ids(2 + i * 5 % 13);
            let chosen = ids(1 + i * 7 % 18);
            let mut rejected = ids(1 + i * 3 % 18);
            if i % 3 == 0 {
                rejected[0] = chosen[0]; // a completion prefix that is shared too
            }
            let seq = |c: &[i64]| Sequence { ids: prompt.iter().chain(c).copied().collect(), prompt_len: prompt.len() };
            TokenizedPair {
                location: format!("pair {i}"),
                prompt_ids: prompt.clone(),
                chosen: seq(&chosen),
                rejected: seq(&rejected),
            }
        })
        .collect()
}

struct Outcome {
    loss: f64,
    metrics: BTreeMap<String, f64>,
    grads: BTreeMap<String, Tensor>,
}

fn run(
    model: &LoadedModel,
    pairs: &[TokenizedPair],
    objective: &Objective,
    layout: PackOptions,
    step: StepOptions,
) -> Outcome {
    for (_, var) in model.vs.variables() {
        let mut grad = var.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let batch = pack(&refs, 0, Some((28, TruncationMode::KeepStart)), layout);
    let mut log = MetricLog::default();
    let loss = forward_backward(&model.model, &batch, objective, &Given::default(), 1.0, step, &mut log);
    let grads = model.vs.variables().into_iter().map(|(name, var)| (name, var.grad().copy())).collect();
    Outcome { loss, metrics: log.drain_means(""), grads }
}

fn objectives() -> Vec<(&'static str, Objective)> {
    let simpo = CpoParams { beta: 2.0, cpo_alpha: 0.0, ..CpoParams::default() };
    vec![
        ("dpo", Objective::Dpo(DpoParams { reference_free: true, ..DpoParams::default() })),
        ("orpo", Objective::Orpo(OrpoParams::default())),
        ("simpo", Objective::Cpo(simpo.with_loss_type("simpo").unwrap())),
    ]
}

fn assert_close(what: &str, got: &Outcome, want: &Outcome, metrics: bool) {
    assert!(
        (got.loss - want.loss).abs() <= 1e-5 * want.loss.abs().max(1.0),
        "{what}: loss {} vs {}",
        got.loss,
        want.loss
    );
    if metrics {
        for (key, value) in &want.metrics {
            let ours = got.metrics[key];
            assert!((ours - value).abs() <= 1e-4 * value.abs().max(1e-2), "{what}: {key} {ours} vs {value}");
        }
    }
    for (name, want_grad) in &want.grads {
        let scale = want_grad.abs().max().double_value(&[]).max(1e-6);
        let diff = (&got.grads[name] - want_grad).abs().max().double_value(&[]);
        assert!(diff <= 1e-4 * scale, "{what}: gradient of {name} differs by {diff} (largest entry {scale})");
    }
}

#[test]
fn layouts_and_checkpointing_match_trl_layout() {
    for model_name in ["llama", "mistral", "qwen2"] {
        let model = model::load(&fixture(&format!("models/{model_name}")), Device::Cpu, Kind::Float).unwrap();
        let pairs = random_pairs(7, model.config().vocab_size as i64);
        for (objective_name, objective) in objectives() {
            let want = run(&model, &pairs, &objective, PackOptions::TRL, StepOptions::default());
            assert!(want.loss.is_finite());
            let layouts = [
                ("shared, a row per pair", PackOptions { prefix_sharing: true, packing: false, row_tokens: 0 }),
                ("shared, packed", PackOptions { prefix_sharing: true, packing: true, row_tokens: 0 }),
                ("shared, packed into long rows", PackOptions { prefix_sharing: true, packing: true, row_tokens: 200 }),
                ("unshared, packed", PackOptions { prefix_sharing: false, packing: true, row_tokens: 0 }),
            ];
            for (layout_name, layout) in layouts {
                let got = run(&model, &pairs, &objective, layout, StepOptions::default());
                // ORPO's and CPO's logits/* average over padding in TRL's layout; a packed one has none.
                let all_metrics = objective_name == "dpo";
                assert_close(&format!("{model_name} {objective_name} {layout_name}"), &got, &want, all_metrics);
            }
            let checkpointed = StepOptions { gradient_checkpointing: true, ..Default::default() };
            for layout in [PackOptions::TRL, PackOptions::default()] {
                let got = run(&model, &pairs, &objective, layout, checkpointed);
                assert_close(
                    &format!("{model_name} {objective_name} checkpointed {layout:?}"),
                    &got,
                    &want,
                    objective_name == "dpo" || layout.is_trl_layout(),
                );
            }
        }
    }
}

#[test]
fn bf16_autocast_stays_close_to_f32() {
    let model = model::load(&fixture("models/llama"), Device::Cpu, Kind::Float).unwrap();
    let pairs = random_pairs(7, model.config().vocab_size as i64);
    let bf16 = StepOptions { precision: Precision { cast: Some(Kind::BFloat16) }, ..Default::default() };
    for (name, objective) in objectives() {
        let f32 = run(&model, &pairs, &objective, PackOptions::default(), StepOptions::default());
        let half = run(&model, &pairs, &objective, PackOptions::default(), bf16);
        assert!(
            (half.loss - f32.loss).abs() <= 2e-2 * f32.loss.abs().max(1.0),
            "{name}: bf16 loss {} vs f32 {}",
            half.loss,
            f32.loss
        );
        let flat = |o: &Outcome| Tensor::cat(&o.grads.values().map(|g| g.flatten(0, -1)).collect::<Vec<_>>(), 0);
        let (a, b) = (flat(&half), flat(&f32));
        let cosine =
            (&a * &b).sum(Kind::Double).double_value(&[]) / (a.norm().double_value(&[]) * b.norm().double_value(&[]));
        assert!(cosine > 0.99, "{name}: bf16 gradient direction cosine {cosine}");
        // The master weights stay f32.
        assert!(model.vs.variables().values().all(|v| v.kind() == Kind::Float));
    }
}

/// The reference's lean path (log-probs only) gives the policy's summed completion log-probs bit for bit, in every
/// layout and precision: a reference equal to the policy starts DPO at exactly ln 2.
#[test]
fn reference_logps_equal_the_policy_scores_bit_for_bit() {
    for model_name in ["llama", "qwen2"] {
        let model = model::load(&fixture(&format!("models/{model_name}")), Device::Cpu, Kind::Float).unwrap();
        let pairs = random_pairs(7, model.config().vocab_size as i64);
        let refs: Vec<&TokenizedPair> = pairs.iter().collect();
        for layout in [PackOptions::TRL, PackOptions::default()] {
            let batch = pack(&refs, 0, Some((28, TruncationMode::KeepStart)), layout);
            for precision in [Precision { cast: None }, Precision { cast: Some(Kind::BFloat16) }] {
                let lean = summed_completion_logps(&model.model, &batch, precision);
                let full = score_tokens(&model.model, &batch, Needed::Completions, precision).summed_logps();
                assert_eq!(lean.size(), [14]);
                assert!(lean.equal(&full), "{model_name} {layout:?} {precision:?}: {lean:?} vs {full:?}");
            }
        }
    }
}

/// The lm_head's backward pass gives the same gradients, bit for bit, from the softmax kept in the forward pass as
/// from logits recomputed there (in f32 and under bf16 autocast).
#[test]
fn kept_and_recomputed_softmax_give_the_same_lm_head_gradients() {
    use prefalign::model::lm_head::{score_hidden, ModelInput};
    let model = model::load(&fixture("models/llama"), Device::Cpu, Kind::Float).unwrap();
    let pairs = random_pairs(7, model.config().vocab_size as i64);
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let batch = pack(&refs, 0, Some((28, TruncationMode::KeepStart)), PackOptions::default());
    let input = ModelInput::new(&batch, Device::Cpu);
    let weight = model.model.lm_head_weight();
    for precision in [Precision { cast: None }, Precision { cast: Some(Kind::BFloat16) }] {
        let hidden = tch::no_grad(|| model.model.hidden_states(&input.input_ids, &input.layout(), precision.cast));
        let mut results = Vec::new();
        for keep in [true, false] {
            let (scores, tape) = score_hidden(&model.model, &batch, &hidden, Needed::Completions, precision, keep);
            let probe = Tensor::linspace(-1.0, 1.0, scores.logps.numel() as i64, (Kind::Float, Device::Cpu));
            (&scores.logps * probe.view_as(&scores.logps)).sum(Kind::Float).backward();
            let grad_hidden = tape.backward(&model.model, &scores.logps.grad());
            results.push((grad_hidden, weight.grad().copy(), scores.entropy));
            let _ = weight.grad().zero_();
        }
        let ((hidden_a, weight_a, entropy_a), (hidden_b, weight_b, entropy_b)) = (&results[0], &results[1]);
        assert!(hidden_a.equal(hidden_b), "{precision:?}: the hidden states' gradients differ");
        assert!(weight_a.equal(weight_b), "{precision:?}: the lm_head weight's gradients differ");
        assert!(entropy_a.equal(entropy_b), "{precision:?}: the entropies differ");
    }
}
