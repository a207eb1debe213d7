//! `prefalign bench`: DPO, ORPO, SFT or KTO training steps on a randomly initialised model of a given shape and
//! synthetic examples of fixed lengths; median step time, examples/s and peak memory. `tools/bench/trl_bench.py` runs TRL 1.16
//! on the same shape, token ids and settings (docs/PERFORMANCE.md).

use crate::cli::train::LoraArgs;
use crate::cli::ComputeArgs;
use crate::data::batches::{Examples, KtoExamples};
use crate::data::collate::TruncationMode;
use crate::data::kto::KtoSequence;
use crate::data::pack::Batching;
use crate::data::sft::{SftRow, IGNORE};
use crate::data::tokenize::{Sequence, TokenizedPair};
use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::quantized::QuantizedWeight;
use crate::model::LoadedModel;
use crate::objective::metrics::MetricLog;
use crate::objective::{DpoParams, KtoParams, Objective, OrpoParams, SftParams};
use crate::runtime::peak_rss_bytes;
use crate::train::reference;
use crate::train::trainer::StepError;
use crate::train::{Reference, Trainer, TrainerConfig};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::Path;
use std::time::Instant;
use tch::{nn::VarStore, Kind, Tensor};

const SMOLLM2_135M: &str = r#"{"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
  "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
  "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true,
  "pad_token_id": 2}"#;
const SMOLLM2_1_7B: &str = r#"{"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
  "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152,
  "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 130000.0, "tie_word_embeddings": true,
  "pad_token_id": 2}"#;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BenchObjective {
    Dpo,
    Orpo,
    /// prompt + chosen completion of each synthetic pair, the loss on the completion
    Sft,
    /// prompt + chosen completion (desirable) or rejected one (undesirable), alternately; a reference copy
    Kto,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// smollm2-135m, smollm2-1.7b, or a config.json
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    /// The shape with this many decoder layers instead of its own (to project a large shape's memory per layer)
    #[arg(long, value_parser = crate::cli::values::at_least_one)]
    layers: Option<usize>,
    #[arg(long, value_enum, default_value = "dpo")]
    objective: BenchObjective,
    /// Examples per step: pairs (dpo, orpo), sequences (sft) or unpaired examples (kto)
    #[arg(long, value_parser = crate::cli::values::at_least_one, default_value_t = 2)]
    pairs: usize,
    #[arg(long, value_parser = crate::cli::values::at_least_one, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, value_parser = crate::cli::values::at_least_one, default_value_t = 128)]
    completion_tokens: usize,
    /// Timed steps (after --warmup untimed ones)
    #[arg(long, value_parser = crate::cli::values::at_least_one, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// DPO, KTO: reference log-probs computed once before the timed steps (no reference forward per step)
    #[arg(long)]
    precompute_ref_log_probs: bool,
    /// cpu, cuda, cuda:N or auto
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    compute: ComputeArgs,
    /// With --use-peft: LoRA adapters on the policy, which is its own reference with the adapters off (no copy)
    #[command(flatten)]
    lora: LoraArgs,
    /// With --use-peft: the projections frozen in NF4 (QLoRA), each drawn and quantized in turn
    #[arg(long)]
    load_in_4bit: bool,
    /// With --load-in-4bit: bitsandbytes' double quantization of the blocks' scales
    #[arg(long, visible_alias = "bnb-4bit-use-double-quant")]
    use_bnb_nested_quant: bool,
    /// Print the result as one JSON object
    #[arg(long)]
    json: bool,
}

/// Token ids of synthetic pair `pair`: the same formula as tools/bench/trl_bench.py, so both run identical data.
/// Chosen and rejected share the prompt and differ from their first completion token on.
pub fn synthetic_pair(pair: usize, prompt_tokens: usize, completion_tokens: usize, vocab: usize) -> TokenizedPair {
    let id = |salt: usize, at: usize| (3 + (pair * 7_919 + at * 104_729 + salt * 15_485_863) % (vocab - 3)) as i64;
    let prompt: Vec<i64> = (0..prompt_tokens).map(|t| id(0, t)).collect();
    let sequence = |salt| Sequence {
        ids: prompt.iter().copied().chain((0..completion_tokens).map(|t| id(salt, t))).collect(),
        prompt_len: prompt_tokens,
    };
    TokenizedPair {
        location: format!("synthetic:{pair}"),
        prompt_ids: prompt.clone(),
        chosen: sequence(1),
        rejected: sequence(2),
    }
}

/// A model of `config` with weights drawn like transformers' `_init_weights` (normal, std 0.02; norms 1). Drawn by
/// the CPU's generator on every device, so that a CUDA run starts from the CPU run's weights (CUDA's generator
/// draws another sequence from the same seed). With `nf4` (Some(double_quant)) the projections are drawn after
/// the parameters, one at a time, and kept in NF4.
fn random_model(config: &ModelConfig, device: tch::Device, seed: i64, nf4: Option<bool>) -> Result<LoadedModel> {
    tch::manual_seed(seed);
    let vs = VarStore::new(device);
    let mut model = CausalLm::new_with(&vs.root(), config, nf4.is_some())?;
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0)); // the same draw for the same name, every time
    tch::no_grad(|| {
        for (name, mut var) in variables {
            if !name.ends_with("norm.weight") {
                var.copy_(&(Tensor::randn(var.size(), (Kind::Float, tch::Device::Cpu)) * 0.02));
            }
        }
    });
    if let Some(double_quant) = nf4 {
        model.load_quantized(|_, rows, cols| {
            let weight = Tensor::randn([rows, cols], (Kind::Float, tch::Device::Cpu)) * 0.02;
            Ok(QuantizedWeight::nf4(&weight, double_quant, Kind::Float).to_device(device))
        })?;
    }
    Ok(LoadedModel { vs, model, tokenizer: None, adapter: None })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let mut config: ModelConfig = match args.shape.as_str() {
        "smollm2-135m" => serde_json::from_str(SMOLLM2_135M)?,
        "smollm2-1.7b" => serde_json::from_str(SMOLLM2_1_7B)?,
        path if Path::new(path).is_file() => ModelConfig::from_file(Path::new(path)).context("--shape")?,
        other => {
            anyhow::bail!("--shape {other}: not a known shape (smollm2-135m, smollm2-1.7b) nor a config.json file")
        }
    };
    if let Some(layers) = args.layers {
        config.num_hidden_layers = layers;
    }
    let device = crate::model::device::parse_device(&args.device)?;
    if args.load_in_4bit && !args.lora.use_peft {
        anyhow::bail!("--load-in-4bit trains LoRA adapters: add --use-peft");
    }
    let mut policy = random_model(&config, device, 0, args.load_in_4bit.then_some(args.use_bnb_nested_quant))?;
    args.lora.apply(&mut policy, &args.shape, args.compute.step().precision.cast)?;
    let pairs: Vec<TokenizedPair> = (0..args.pairs)
        .map(|i| synthetic_pair(i, args.prompt_tokens, args.completion_tokens, config.vocab_size))
        .collect();
    let max_length = Some((args.prompt_tokens + args.completion_tokens, TruncationMode::KeepStart));
    let (objective, truncation) = match args.objective {
        BenchObjective::Dpo => (Objective::Dpo(DpoParams::default()), max_length),
        BenchObjective::Orpo => (Objective::Orpo(OrpoParams::default()), None),
        BenchObjective::Sft => (Objective::Sft(SftParams::default()), None),
        BenchObjective::Kto => (Objective::Kto(KtoParams::default()), max_length),
    };
    let sft_rows: Vec<SftRow> = pairs
        .iter()
        .map(|p| {
            let labels =
                p.chosen.ids.iter().enumerate().map(|(i, &id)| if i < p.chosen.prompt_len { IGNORE } else { id });
            SftRow {
                input_ids: p.chosen.ids.clone(),
                labels: labels.collect(),
                seq_lengths: vec![p.chosen.ids.len()],
                sources: vec![p.location.clone()],
            }
        })
        .collect();
    // desirable and undesirable alternately; TRL's KL completions: rotated by one within the batch (all examples)
    let completion = |i: usize| {
        let pair = &pairs[i % pairs.len()];
        if i.is_multiple_of(2) {
            pair.chosen.completion()
        } else {
            pair.rejected.completion()
        }
    };
    let kto_sequences: Vec<KtoSequence> = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| KtoSequence {
            location: p.location.clone(),
            label: i.is_multiple_of(2),
            prompt_ids: p.prompt_ids.clone(),
            completion_ids: completion(i).to_vec(),
            kl_completion_ids: completion(i + pairs.len() - 1).to_vec(),
        })
        .collect();
    let kto_examples = KtoExamples::new(&kto_sequences);
    let examples = match args.objective {
        BenchObjective::Sft => Examples::Sft(&sft_rows),
        BenchObjective::Kto => Examples::Kto(&kto_examples),
        _ => Examples::Pairs(&pairs),
    };
    let trainer_config = TrainerConfig {
        batching: Batching { pad_id: 2, truncation, layout: args.compute.layout() },
        step: args.compute.step(),
        ..TrainerConfig::default()
    };
    let precision = trainer_config.step.precision;
    let lora = policy.adapter.is_some();
    // TRL's default reference: a second, frozen copy of the policy run every step (with LoRA, the policy itself).
    let reference_model = if objective.needs_reference() && !lora {
        let mut reference = random_model(&config, device, 0, None)?;
        reference.vs.freeze();
        if let Some(kind) = precision.cast {
            reference.model.store_matmul_weights_in(kind);
        }
        Some(reference)
    } else {
        None
    };
    let own_reference = lora && objective.needs_reference();
    let reference_source = if own_reference { Some(&policy) } else { reference_model.as_ref() };
    let precomputed = match (reference_source, args.precompute_ref_log_probs, examples.pairs()) {
        (Some(model), true, Some(pairs)) => {
            Some(reference::compute(&model.model, pairs, &trainer_config.batching, precision, pairs.len()))
        }
        _ => None,
    };
    // A precomputed reference needs no model any more: dropped here, its memory goes back to the steps.
    let reference_model = reference_model.filter(|_| precomputed.is_none());
    let reference = match (&precomputed, &reference_model) {
        (Some(logps), _) => Reference::Precomputed { train: logps, eval: None },
        (None, _) if own_reference => Reference::Model(&policy),
        (None, Some(model)) => Reference::Model(model),
        (None, None) => Reference::None,
    };
    let mut trainer = Trainer::new(&policy, reference, &objective, examples, &trainer_config);
    let batch: Vec<usize> = (0..pairs.len()).collect();
    let mut cuda_peak: Option<u64> = None;
    let mut times = Vec::new();
    let mut phases = [Vec::new(), Vec::new(), Vec::new()]; // reference, policy forward+backward, optimizer
    for step in 0..args.warmup + args.steps {
        let started = Instant::now();
        let outcome = trainer
            .optimizer_step(step, std::slice::from_ref(&batch), trainer_config.learning_rate, &mut MetricLog::default())
            .map_err(|e| match e {
                StepError::NonFinite(n) => anyhow::anyhow!("non-finite {} at step {}", n.what, step + 1),
                StepError::Group(error) => error,
            })?;
        if let tch::Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        let seconds = started.elapsed().as_secs_f64();
        // read after the clock stops: the query is not part of a training step
        if let tch::Device::Cuda(index) = device {
            cuda_peak = cuda_peak.max(crate::model::device::cuda_memory_used_bytes(index));
        }
        if step >= args.warmup {
            times.push(seconds);
            phases[0].push(outcome.seconds.reference);
            phases[1].push(outcome.seconds.policy);
            // the rest of the step: clipping, AdamW and, on CUDA, waiting for the GPU to finish
            phases[2].push(seconds - outcome.seconds.reference - outcome.seconds.policy);
        }
        if !args.json {
            let loss = outcome.loss;
            eprintln!(
                "step {}: {seconds:.3} s, loss {loss:.4}{}",
                step + 1,
                if step < args.warmup { " (warmup)" } else { "" }
            );
        }
    }
    let step_times = times.clone(); // in order, as TRL's bench lists them
    let step_seconds = median(&mut times);
    let [reference_s, policy_s, optimizer_s] = phases.map(|mut p| median(&mut p));
    let peak_rss = peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    // the CUDA caching allocator's settings, which change its peak (libtorch reads PYTORCH_ALLOC_CONF first)
    let allocator_conf =
        ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"].iter().find_map(|name| std::env::var(name).ok());
    let summary = serde_json::json!({
        "tool": "prefalign",
        "shape": args.shape,
        "layers": config.num_hidden_layers,
        "objective": format!("{:?}", args.objective).to_lowercase(),
        "device": args.device,
        "bf16": args.compute.bf16,
        "prefix_sharing": trainer_config.batching.layout.prefix_sharing,
        "packing": trainer_config.batching.layout.packing,
        "gradient_checkpointing": trainer_config.step.gradient_checkpointing,
        "precompute_ref_log_probs": args.precompute_ref_log_probs,
        "lora": policy.adapter.as_ref().map(|a| serde_json::json!({
            "r": a.config.r, "alpha": a.config.alpha, "targets": a.targets,
            "trainable_parameters": policy.adapter_variables().values().map(|t| t.numel()).sum::<usize>(),
        })),
        "pairs": args.pairs,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "steps": args.steps,
        "median_step_s": step_seconds,
        "pairs_per_s": args.pairs as f64 / step_seconds,
        "step_times_s": step_times,
        "median_phase_s": {"reference": reference_s, "policy": policy_s, "optimizer": optimizer_s},
        "peak_rss_gib": peak_rss,
        "peak_gpu_used_gib": cuda_peak.map(|b| b as f64 / (1u64 << 30) as f64),
        "threads": tch::get_num_threads(),
        "allocator_conf": allocator_conf,
    });
    if let Some(bytes) = cuda_peak {
        eprintln!("GPU memory in use after a step, at most: {:.2} GiB", bytes as f64 / (1u64 << 30) as f64);
    }
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} {} on {}: median step {:.3} s (reference {reference_s:.3}, policy {policy_s:.3}, optimizer {optimizer_s:.3}), {:.2} pairs/s, peak RSS {:.2} GiB",
            args.shape,
            summary["objective"].as_str().unwrap_or(""),
            args.device,
            step_seconds,
            args.pairs as f64 / step_seconds,
            peak_rss
        );
    }
    Ok(())
}
