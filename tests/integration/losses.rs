//! Every DPO loss type: value and gradient of the tensor implementation against a direct scalar implementation
//! of the formula in TRL 1.16's `_compute_loss` (gradients by central differences), on hand-made log-probs.

use prefalign::objective::dpo::{combined_loss, DpoLoss, LossInputs, LossParams, PairLogps};
use tch::{Kind, Tensor};

const PC: [f64; 3] = [-12.0, -30.25, -7.25]; // policy chosen
const PR: [f64; 3] = [-14.0, -28.0, -9.5]; // policy rejected
const RC: [f64; 3] = [-12.5, -31.0, -7.0]; // reference chosen
const RR: [f64; 3] = [-13.0, -27.5, -10.0]; // reference rejected
const NC: [f64; 3] = [4.0, 9.0, 2.0]; // chosen completion tokens
const NR: [f64; 3] = [5.0, 7.0, 3.0]; // rejected completion tokens
const PARAMS: LossParams = LossParams { beta: 0.1, label_smoothing: 0.2, discopop_tau: 0.05 };

fn log_sigmoid(x: f64) -> f64 {
    -(-x).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

/// The formula of `loss`, pair by pair, in plain f64; the mean over pairs.
fn direct(loss: DpoLoss, pc: &[f64], pr: &[f64]) -> f64 {
    let (b, e, tau) = (PARAMS.beta, PARAMS.label_smoothing, PARAMS.discopop_tau);
    let n = pc.len();
    let cr: Vec<f64> = (0..n).map(|i| pc[i] - RC[i]).collect();
    let rr: Vec<f64> = (0..n).map(|i| pr[i] - RR[i]).collect();
    let d: Vec<f64> = (0..n).map(|i| cr[i] - rr[i]).collect();
    let smoothed = |x: f64| -log_sigmoid(b * x) * (1.0 - e) - log_sigmoid(-b * x) * e;
    let per_pair: Vec<f64> = match loss {
        DpoLoss::Aot => {
            let policy = sorted((0..n).map(|i| pc[i] - pr[i]).collect());
            let reference = sorted((0..n).map(|i| RC[i] - RR[i]).collect());
            (0..n).map(|i| smoothed(policy[i] - reference[i])).collect()
        }
        DpoLoss::AotUnpaired => {
            let (c, r) = (sorted(cr.clone()), sorted(rr.clone()));
            (0..n).map(|i| smoothed(c[i] - r[i])).collect()
        }
        _ => (0..n)
            .map(|i| {
                let (c, r, d) = (cr[i], rr[i], d[i]);
                match loss {
                    DpoLoss::Sigmoid => -log_sigmoid(b * d),
                    DpoLoss::Hinge => (1.0 - b * d).max(0.0),
                    DpoLoss::Ipo => (c / NC[i] - r / NR[i] - 1.0 / (2.0 * b)).powi(2),
                    DpoLoss::ExoPair => {
                        sigmoid(b * d) * (log_sigmoid(b * d) - (1.0 - e).ln())
                            + sigmoid(-b * d) * (log_sigmoid(-b * d) - e.ln())
                    }
                    DpoLoss::NcaPair => -log_sigmoid(b * c) - 0.5 * log_sigmoid(-b * c) - 0.5 * log_sigmoid(-b * r),
                    DpoLoss::Robust => (-(1.0 - e) * log_sigmoid(b * d) + e * log_sigmoid(-b * d)) / (1.0 - 2.0 * e),
                    DpoLoss::BcoPair => -log_sigmoid(b * c) - log_sigmoid(-b * r),
                    DpoLoss::SppoHard => (c - 0.5 / b).powi(2) + (r + 0.5 / b).powi(2),
                    DpoLoss::ApoZero => 1.0 - sigmoid(b * c) + sigmoid(b * r),
                    DpoLoss::ApoDown => sigmoid(b * c) + 1.0 - sigmoid(b * (c - r)),
                    DpoLoss::Discopop => {
                        let m = sigmoid(b * d / tau);
                        -log_sigmoid(b * d) * (1.0 - m) + (-b * d).exp() * m
                    }
                    DpoLoss::SigmoidNorm => -log_sigmoid(b * (c / NC[i] - r / NR[i])),
                    DpoLoss::Sft | DpoLoss::Aot | DpoLoss::AotUnpaired => unreachable!(),
                }
            })
            .collect(),
    };
    per_pair.iter().sum::<f64>() / n as f64
}

fn tensor(v: &[f64]) -> Tensor {
    Tensor::from_slice(v).to_kind(Kind::Double)
}

/// Our value and gradient w.r.t. the policy's chosen and rejected log-probs.
fn ours(loss: DpoLoss) -> (f64, Vec<f64>, Vec<f64>) {
    let pc = tensor(&PC).set_requires_grad(true);
    let pr = tensor(&PR).set_requires_grad(true);
    let policy = PairLogps { chosen: pc.shallow_clone(), rejected: pr.shallow_clone() };
    let reference = PairLogps { chosen: tensor(&RC), rejected: tensor(&RR) };
    let (nc, nr) = (tensor(&NC), tensor(&NR));
    let empty = Tensor::zeros([3, 1], (Kind::Double, tch::Device::Cpu));
    let inputs = LossInputs {
        policy: &policy,
        reference: &reference,
        chosen_tokens: &nc,
        rejected_tokens: &nr,
        chosen_token_logps: &empty,
        chosen_token_mask: &empty,
    };
    let value = combined_loss(&[(loss, 1.0)], &inputs, PARAMS);
    value.backward();
    let grad = |t: &Tensor| Vec::<f64>::try_from(t.grad()).unwrap();
    (value.double_value(&[]), grad(&pc), grad(&pr))
}

fn numeric_grad(loss: DpoLoss, side: usize) -> Vec<f64> {
    let h = 1e-6;
    (0..3)
        .map(|i| {
            let shifted = |delta: f64| {
                let (mut pc, mut pr) = (PC.to_vec(), PR.to_vec());
                if side == 0 {
                    pc[i] += delta
                } else {
                    pr[i] += delta
                }
                direct(loss, &pc, &pr)
            };
            (shifted(h) - shifted(-h)) / (2.0 * h)
        })
        .collect()
}

#[test]
fn every_pairwise_loss_matches_its_formula() {
    for (name, loss) in DpoLoss::ALL {
        if loss == DpoLoss::Sft {
            continue;
        }
        let (value, grad_chosen, grad_rejected) = ours(loss);
        let expected = direct(loss, &PC, &PR);
        assert!((value - expected).abs() <= 1e-10 * expected.abs().max(1.0), "{name}: value {value} vs {expected}");
        for (side, grad) in [(0, grad_chosen), (1, grad_rejected)] {
            for (g, n) in grad.iter().zip(numeric_grad(loss, side)) {
                assert!((g - n).abs() <= 1e-6 * n.abs().max(1e-3), "{name}: gradient {g} vs numeric {n} (side {side})");
            }
        }
    }
}

#[test]
fn sft_is_the_mean_chosen_token_nll_and_weights_combine() {
    let token_logps = Tensor::from_slice(&[-1.0f64, -2.0, -3.0, -4.0, -5.0, -6.0]).view([2, 3]).set_requires_grad(true);
    let mask = Tensor::from_slice(&[0.0f64, 1.0, 1.0, 1.0, 0.0, 0.0]).view([2, 3]);
    let policy = PairLogps { chosen: tensor(&PC[..2]), rejected: tensor(&PR[..2]) };
    let reference = PairLogps { chosen: tensor(&RC[..2]), rejected: tensor(&RR[..2]) };
    let (nc, nr) = (tensor(&NC[..2]), tensor(&NR[..2]));
    let inputs = LossInputs {
        policy: &policy,
        reference: &reference,
        chosen_tokens: &nc,
        rejected_tokens: &nr,
        chosen_token_logps: &token_logps,
        chosen_token_mask: &mask,
    };
    let sft = combined_loss(&[(DpoLoss::Sft, 1.0)], &inputs, PARAMS);
    assert!((sft.double_value(&[]) - 3.0).abs() < 1e-12); // (2 + 3 + 4) / 3
    sft.backward();
    let grad = Vec::<f64>::try_from(token_logps.grad().flatten(0, -1)).unwrap();
    assert_eq!(grad, vec![0.0, -1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0, 0.0, 0.0]);
    let both = combined_loss(&[(DpoLoss::Sigmoid, 0.5), (DpoLoss::Sft, 2.0)], &inputs, PARAMS).double_value(&[]);
    let sigmoid = combined_loss(&[(DpoLoss::Sigmoid, 1.0)], &inputs, PARAMS).double_value(&[]);
    assert!((both - (0.5 * sigmoid + 2.0 * 3.0)).abs() < 1e-12);
    assert!(DpoLoss::parse("sigmoid").is_ok());
    assert!(DpoLoss::parse("sigmoidd").unwrap_err().to_string().contains("unknown loss_type \"sigmoidd\""));
}
