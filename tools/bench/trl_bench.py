"""TRL 1.16 on exactly the work of `prefalign bench` (dpo, orpo, sft, kto): the same model shape (random init), the
same synthetic token ids (the formula of `synthetic_pair` in src/cli/bench.rs), the same batch, optimizer and
settings.

    .venv-fixtures/bin/python tools/bench/trl_bench.py --shape smollm2-135m --objective dpo --pairs 2 \
        --prompt-tokens 128 --completion-tokens 128 --steps 5 [--bf16] [--device cuda]

Runs `trainer.train()` for warmup + steps optimizer steps (one batch of all pairs, the same batch each step: DPO
runs its reference model every step, as TRL does by default) and times each step with a callback between
`on_step_begin` and `on_step_end` (forward, backward, clipping, AdamW). Prints one JSON object: median step time,
pairs/s and peak memory (CPU: the process's peak RSS; CUDA: device memory in use after a step, at most, as
`prefalign bench` measures it, and torch.cuda.max_memory_allocated).
"""
import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

# everything loads from local folders: no Hub calls, and no telemetry from TRL's trainer
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import accelerate
import datasets
import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests" / "fixtures" / "trl_data" / "tokenizer"  # SmolLM2's (vocab 49152)
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=2),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=130000.0, tie_word_embeddings=True, pad_token_id=2),
}


def synthetic_pair(pair, prompt_tokens, completion_tokens, vocab):
    """The ids of src/cli/bench.rs `synthetic_pair`."""
    def token(salt, at):
        return 3 + (pair * 7_919 + at * 104_729 + salt * 15_485_863) % (vocab - 3)
    prompt = [token(0, t) for t in range(prompt_tokens)]
    return prompt, [token(1, t) for t in range(completion_tokens)], [token(2, t) for t in range(completion_tokens)]


class StepTimer(TrainerCallback):
    def __init__(self, device):
        self.device, self.times, self.started = device, [], None

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self.started)
        if self.device.startswith("cuda"):  # measured as prefalign bench does: device memory in use
            free, total = torch.cuda.mem_get_info()
            self.gpu_used = max(getattr(self, "gpu_used", 0), total - free)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="smollm2-135m", help=f"{', '.join(SHAPES)}, or a config.json")
    parser.add_argument("--layers", type=int, help="the shape with this many decoder layers instead of its own")
    parser.add_argument("--objective", default="dpo", choices=["dpo", "orpo", "sft", "kto"])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--use-peft", action="store_true", help="LoRA (PEFT); the reference is the policy, adapters off")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-target-modules", default=None, help="comma-separated, or all-linear")
    args = parser.parse_args()

    torch.manual_seed(0)
    shape = SHAPES[args.shape] if args.shape in SHAPES else json.loads(Path(args.shape).read_text())
    config = LlamaConfig(**{**shape, **({"num_hidden_layers": args.layers} if args.layers else {})})
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    work = Path(tempfile.mkdtemp())
    LlamaForCausalLM(config).save_pretrained(work / "model")
    policy = LlamaForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    pairs = [synthetic_pair(i, args.prompt_tokens, args.completion_tokens, config.vocab_size) for i in range(args.pairs)]
    common = dict(
        output_dir=str(work / "out"), per_device_train_batch_size=args.pairs, learning_rate=1e-6, max_grad_norm=1.0,
        max_steps=args.warmup + args.steps, lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no",
        report_to=[], bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=args.device == "cpu", train_sampling_strategy="sequential", seed=42,
    )
    beta = dict(beta=0.1)
    text = Dataset.from_dict({"prompt": ["a"] * args.pairs, "chosen": [" b"] * args.pairs, "rejected": [" c"] * args.pairs})
    peft = {}
    if args.use_peft:  # as TRL's get_peft_config builds it from ModelConfig
        from peft import LoraConfig
        targets = args.lora_target_modules
        targets = targets if targets in (None, "all-linear") else targets.split(",")
        peft["peft_config"] = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                                         lora_dropout=0.05, bias="none", target_modules=targets)
    if args.objective == "dpo":
        from trl import DPOConfig, DPOTrainer
        # what TRL does without one (with PEFT: none, the adapters are switched off)
        reference = None if args.use_peft else LlamaForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
        trainer_args = DPOConfig(max_length=args.prompt_tokens + args.completion_tokens, **common, **beta)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=trainer_args, train_dataset=text,
                             processing_class=tokenizer, **peft)
        rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
    elif args.objective == "sft":
        from trl import SFTConfig, SFTTrainer
        # prompt-completion rows as SFTTrainer prepares them: the prompt out of the loss (completion_only_loss)
        trainer_args = SFTConfig(max_length=args.prompt_tokens + args.completion_tokens, **common)
        trainer = SFTTrainer(model=policy, args=trainer_args, train_dataset=Dataset.from_dict({"text": ["a"] * args.pairs}),
                             processing_class=tokenizer, **peft)
        rows = [{"input_ids": p + c, "labels": [-100] * len(p) + c} for p, c, _ in pairs]
    elif args.objective == "kto":
        from trl import KTOConfig, KTOTrainer
        reference = None if args.use_peft else LlamaForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
        trainer_args = KTOConfig(max_length=args.prompt_tokens + args.completion_tokens, **common, **beta)
        unpaired = Dataset.from_dict({"prompt": ["a"] * args.pairs, "completion": [" b"] * args.pairs,
                                      "label": [i % 2 == 0 for i in range(args.pairs)]})
        trainer = KTOTrainer(model=policy, ref_model=reference, args=trainer_args, train_dataset=unpaired,
                             processing_class=tokenizer, **peft)
        # as prefalign bench: desirable examples take the chosen completion, undesirable ones the rejected; the KL
        # completions rotated by one within the batch, as KTOTrainer prepares them
        completions = [c if i % 2 == 0 else r for i, (_, c, r) in enumerate(pairs)]
        rows = [{"prompt_ids": p, "completion_ids": completions[i], "KL_completion_ids": completions[i - 1],
                 "label": i % 2 == 0} for i, (p, _, _) in enumerate(pairs)]
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        trainer_args = ORPOConfig(max_length=args.prompt_tokens + args.completion_tokens, **common, **beta)
        trainer = ORPOTrainer(model=policy, args=trainer_args, train_dataset=text, processing_class=tokenizer, **peft)
        # ORPOTrainer.tokenize_row's output: labels are the sequence with the prompt masked by -100
        rows = []
        for p, c, r in pairs:
            row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for side, completion in (("chosen", c), ("rejected", r)):
                row[f"{side}_input_ids"] = p + completion
                row[f"{side}_attention_mask"] = [1] * (len(p) + len(completion))
                row[f"{side}_labels"] = [-100] * len(p) + completion
            rows.append(row)
    trainer.train_dataset = Dataset.from_list(rows)
    timer = StepTimer(args.device)
    trainer.add_callback(timer)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = timer.times[args.warmup:]
    step = statistics.median(times)
    if args.device.startswith("cuda"):
        memory = {"peak_gpu_used_gib": timer.gpu_used / 2**30,
                  "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    else:
        memory = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    # tools/bench/mkl_intel_cpu.c preloaded: MKL's kernels for the instruction set on AMD CPUs too, as in prefalign
    mkl_override = "mkl_intel_cpu" in os.environ.get("LD_PRELOAD", "")
    print(json.dumps({
        "tool": f"trl {trl.__version__}" + (" + MKL vendor override" if mkl_override else ""), "shape": args.shape,
        "layers": config.num_hidden_layers, "objective": args.objective, "device": args.device,
        "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing, "pairs": args.pairs,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "targets": args.lora_target_modules,
                 "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                 "peft": __import__("peft").__version__} if args.use_peft else None,
        "prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens, "steps": args.steps,
        "median_step_s": step, "pairs_per_s": args.pairs / step, "step_times_s": times,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, **memory,
        "allocator_conf": os.environ.get("PYTORCH_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF")),
    }))


if __name__ == "__main__":
    main()
