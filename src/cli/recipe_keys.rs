//! Recipe keys that are no flag of the command: every field of TRL 1.16's configs (`trl_fields.json`, written by
//! `tools/fixtures/list_trl_fields.py`) and the alignment-handbook's own keys is answered here. A key that only
//! steers Python-side machinery is accepted, and the docs say what prefalign does instead; a key whose meaning
//! prefalign does not implement is accepted at TRL's default (where it changes nothing) and refused otherwise,
//! saying why; a field of another trainer's config is refused naming that config.

use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// What a recipe key that is no flag means to prefalign.
pub enum KeyAnswer {
    /// accepted without effect
    Accepted,
    /// refused, with the reason
    Refused(String),
    /// not a field of any config prefalign knows
    Unknown,
}

/// Keys accepted whatever their value, with what prefalign does instead (docs/TRAINING.md lists them).
pub const ACCEPTED: &[(&str, &str)] = &[
    ("log_level", "logging is set with PREFALIGN_LOG"),
    ("log_level_replica", "rank 0 logs; the other ranks print errors only"),
    ("log_on_each_node", "rank 0 logs"),
    ("logging_nan_inf_filter", "a non-finite loss stops the run, or is skipped and counted with --skip-nonfinite"),
    ("disable_tqdm", "a progress bar on a terminal, one line per logged row elsewhere"),
    ("include_num_input_tokens_seen", "num_tokens is logged"),
    ("run_name", "tracking integrations are not built in"),
    ("project", "tracking integrations are not built in"),
    ("trackio_space_id", "tracking integrations are not built in"),
    ("trackio_bucket_id", "tracking integrations are not built in"),
    ("trackio_static_space_id", "tracking integrations are not built in"),
    ("dataloader_num_workers", "data is prepared in-process before training"),
    ("dataloader_pin_memory", "data is prepared in-process before training"),
    ("dataloader_persistent_workers", "data is prepared in-process before training"),
    ("dataloader_prefetch_factor", "data is prepared in-process before training"),
    ("dataloader_multiprocessing_context", "data is prepared in-process before training"),
    ("dataset_num_proc", "data is prepared in-process before training"),
    ("preprocessing_num_workers", "data is prepared in-process before training"),
    ("remove_unused_columns", "prefalign reads the columns it needs"),
    ("overwrite_output_dir", "a run writes into --output-dir; a lock keeps a second run out"),
    ("gradient_checkpointing_kwargs", "prefalign recomputes each layer its own way (use_reentrant has no meaning)"),
    ("do_train", "the training commands train"),
    ("skip_memory_metrics", "prefalign bench measures memory"),
    ("full_determinism", "runs are deterministic by default"),
    ("use_cpu", "--device chooses (default cpu)"),
    ("trust_remote_code", "prefalign runs its own implementation of each supported architecture, never a repo's code"),
    ("use_cache", "training keeps no KV cache"),
    ("torch_empty_cache_steps", "prefalign frees memory as it goes"),
    ("tf32", "libtorch's default matmul precision"),
    ("average_tokens_across_devices", "sft runs in one process"),
    ("ddp_find_unused_parameters", "a parameter without a gradient takes part in the average as zeros"),
    ("ddp_broadcast_buffers", "the models hold no buffers to broadcast"),
    ("ddp_static_graph", "no autograd graph is kept across steps"),
    ("local_rank", "read from LOCAL_RANK"),
    ("save_on_each_node", "rank 0 saves, into the one --output-dir"),
    ("ignore_bias_buffers", "no buffers are broadcast in one process"),
    ("pad_to_multiple_of", "rows are packed or padded to the longest; padding does not change results"),
    ("padding_free", "prefalign packs pairs without padding by default (--no-packing: padded rows)"),
    ("eval_packing", "evaluation rows are packed as the training rows (packing)"),
    ("eval_do_concat_batches", "evaluation computes TRL's metrics over all pairs"),
    ("eval_use_gather_object", "one process"),
    ("eval_accumulation_steps", "evaluation computes TRL's metrics over all pairs"),
    ("prediction_loss_only", "evaluation computes TRL's metrics over all pairs"),
    ("batch_eval_metrics", "evaluation computes TRL's metrics over all pairs"),
    ("include_for_metrics", "evaluation computes TRL's metrics over all pairs"),
    ("label_names", "the objectives know their inputs"),
    ("length_column_name", "no length-grouped sampling"),
    ("bnb_4bit_quant_storage", "NF4 codes are stored packed in bytes"),
    ("bf16_full_eval", "evaluation runs with --bf16's autocast"),
    ("restore_callback_states_from_checkpoint", "no callbacks"),
    (
        "precompute_ref_batch_size",
        "precomputation uses --per-device-eval-batch-size; the batch size does not change results",
    ),
    // the alignment-handbook's own keys
    ("hub_model_revision", "the Hub branch of the handbook's release scripts"),
    ("push_to_hub_revision", "the Hub branch of the handbook's release scripts"),
    ("overwrite_hub_revision", "the Hub branch of the handbook's release scripts"),
    ("wandb_entity", "tracking integrations are not built in"),
    ("wandb_project", "tracking integrations are not built in"),
    ("wandb_run_group", "tracking integrations are not built in"),
    ("callbacks", "the handbook's Python callbacks"),
    ("benchmarks", "the handbook's evaluation jobs"),
    ("truncation_side", "truncation follows --truncation-mode"),
    ("auto_insert_empty_system_msg", "the chat template decides about system messages"),
    ("text_column", "preference data has its own columns (--prompt-column, --chosen-column, --rejected-column)"),
    ("tokenizer_name_or_path", "the model's own tokenizer is used"),
    ("model_code_revision", "no model code is run"),
    ("base_model_revision", "the reference is --model itself or --ref-model"),
    ("use_flash_attention_2", "prefalign runs its own attention (see attn_implementation)"),
];

/// Why a key is refused when it is set to anything but TRL's default.
const REFUSED: &[(&str, &str)] = &[
    ("fp16", "fp16 mixed precision is not implemented; use bf16"),
    ("fp16_full_eval", "fp16 is not implemented; use bf16"),
    ("torch_compile", "prefalign's kernels are compiled in"),
    ("torch_compile_backend", "prefalign's kernels are compiled in"),
    ("torch_compile_mode", "prefalign's kernels are compiled in"),
    ("use_liger_kernel", "prefalign's fused kernels play that part"),
    ("liger_kernel_config", "prefalign's fused kernels play that part"),
    ("deepspeed", "multi-process training is not implemented yet"),
    ("fsdp", "multi-process training is not implemented yet"),
    ("fsdp_config", "multi-process training is not implemented yet"),
    ("accelerator_config", "multi-process training is not implemented yet"),
    ("parallelism_config", "multi-process training is not implemented yet"),
    ("load_best_model_at_end", "choosing a best checkpoint by metric is not implemented"),
    ("metric_for_best_model", "choosing a best checkpoint by metric is not implemented"),
    ("greater_is_better", "choosing a best checkpoint by metric is not implemented"),
    ("auto_find_batch_size", "the batch size is what you set"),
    ("neftune_noise_alpha", "NEFTune noise is not implemented"),
    ("label_smoothing_factor", "the Trainer's cross-entropy label smoothing does not apply to preference losses"),
    ("optim_args", "AdamW takes its settings from --adam-beta1/2, --adam-epsilon, --weight-decay"),
    ("optim_target_modules", "AdamW trains every trainable parameter"),
    ("eval_delay", "evaluation starts with the first due step"),
    ("eval_on_start", "evaluation before the first step is not implemented (prefalign eval scores a model)"),
    ("activation_checkpointing", "use gradient_checkpointing"),
    ("activation_checkpointing_kwargs", "use gradient_checkpointing"),
    ("activation_offloading", "activations are not offloaded; gradient_checkpointing saves memory instead"),
    ("enable_jit_checkpoint", "checkpoints are written at save steps and on SIGINT/SIGTERM"),
    ("ignore_data_skip", "a resumed run continues the data order exactly"),
    ("dataset_streaming", "datasets are read whole"),
    ("disable_dropout", "the preference trainers apply no dropout, as TRL's default disable_dropout: true"),
    ("sync_ref_model", "TR-DPO's reference syncing is not implemented"),
    ("f_divergence_type", "f-divergence DPO is not implemented (reverse KL)"),
    ("f_alpha_divergence_coef", "f-divergence DPO is not implemented (reverse KL)"),
    ("use_weighting", "WPO weighting is not implemented"),
    ("ld_alpha", "LD-DPO is not implemented"),
    ("pad_token", "the tokenizer's pad token pads; padding does not reach the loss"),
    ("padding_value", "the tokenizer's pad token pads; padding does not reach the loss"),
    ("model_init_kwargs", "the model loads from --model, --dtype and --attn-implementation"),
    ("router_aux_loss_coef", "mixture-of-experts models are not supported"),
    ("generate_during_eval", "generation during evaluation is not implemented (prefalign generate)"),
    ("is_encoder_decoder", "prefalign trains decoder-only models"),
    ("alpha", "AlphaPO's reward shaping (CPO alpha) is not implemented"),
    ("do_predict", "prediction is not implemented"),
    ("debug", "PyTorch debug modes do not apply"),
    ("lr_scheduler_kwargs", "only min_lr_rate (cosine_with_min_lr) is taken"),
    ("eos_token", "the tokenizer's EOS token ends the sequences"),
    ("dataset_kwargs", "the dataset is always prepared by prefalign"),
    ("ref_model_mixup_alpha", "TR-DPO's reference syncing is not implemented"),
    ("ref_model_sync_steps", "TR-DPO's reference syncing is not implemented"),
];

/// Where each TRL config's fields and defaults are, by command.
fn classes(command: &str) -> Option<[&'static str; 4]> {
    let config = match command {
        "dpo" => "DPOConfig",
        "orpo" => "ORPOConfig",
        "cpo" => "CPOConfig",
        "sft" => "SFTConfig",
        "kto" => "KTOConfig",
        _ => return None,
    };
    Some([config, "TrainingArguments", "ModelConfig", "ScriptArguments"])
}

fn fields() -> &'static BTreeMap<String, BTreeMap<String, Value>> {
    static FIELDS: OnceLock<BTreeMap<String, BTreeMap<String, Value>>> = OnceLock::new();
    FIELDS.get_or_init(|| serde_json::from_str(include_str!("trl_fields.json")).expect("trl_fields.json is valid"))
}

/// TRL's default for `key` under `command` (the trainer's config first), if it is a field there.
fn trl_default(command: &str, key: &str) -> Option<&'static Value> {
    classes(command)?.iter().find_map(|class| fields().get(*class)?.get(key))
}

/// Whether a recipe value is TRL's default (null is "unset", as the YAML loader gives it).
fn is_default(value: &Value, default: &Value) -> bool {
    match (value, default) {
        (Value::Null, _) => true,
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(items), single) if items.len() == 1 && !single.is_array() => is_default(&items[0], single),
        (a, b) => a == b,
    }
}

/// What prefalign does with recipe key `key` = `value` under `command` (dpo, orpo, cpo).
pub fn answer(command: &str, key: &str, value: &Value) -> KeyAnswer {
    if ACCEPTED.iter().any(|(k, _)| *k == key) {
        return KeyAnswer::Accepted;
    }
    if let Some(default) = trl_default(command, key) {
        if is_default(value, default) {
            return KeyAnswer::Accepted;
        }
        let why = REFUSED.iter().find(|(k, _)| *k == key).map_or("prefalign does not implement it", |(_, why)| why);
        return KeyAnswer::Refused(format!(
            "{key}: {value} is not supported: {why} (only TRL's default, {default}, is accepted)"
        ));
    }
    if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == key) {
        return KeyAnswer::Refused(format!("{key} is not supported: {why}"));
    }
    let owners: Vec<&str> =
        fields().iter().filter(|(_, f)| f.contains_key(key)).map(|(class, _)| class.as_str()).collect();
    match (owners.is_empty(), classes(command)) {
        (false, Some([config, ..])) => KeyAnswer::Refused(format!(
            "{key} is a field of TRL's {}, not of its {config} (`prefalign {command}`)",
            owners.join(" and ")
        )),
        _ => KeyAnswer::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_accepted_and_other_values_refused_with_the_reason() {
        assert!(matches!(answer("dpo", "torch_compile", &json!(false)), KeyAnswer::Accepted));
        assert!(matches!(answer("dpo", "f_divergence_type", &json!("reverse_kl")), KeyAnswer::Accepted));
        let KeyAnswer::Refused(why) = answer("dpo", "torch_compile", &json!(true)) else { panic!() };
        assert!(why.contains("compiled in") && why.contains("false"), "{why}");
        let KeyAnswer::Refused(why) = answer("dpo", "packing_strategy", &json!("bfd")) else { panic!() };
        assert!(why.contains("SFTConfig") && why.contains("DPOConfig"), "{why}");
        assert!(matches!(answer("dpo", "preprocessing_num_workers", &json!(12)), KeyAnswer::Accepted));
        assert!(matches!(answer("dpo", "no_such_key", &json!(1)), KeyAnswer::Unknown));
        // a list default given as a scalar
        assert!(matches!(answer("cpo", "loss_type", &json!("sigmoid")), KeyAnswer::Accepted));
    }
}
