"""Runs a prefalign recipe (recipes/*.yaml) with TRL 1.16 on the same model and the same rows, for
docs/RESULTS.md: the two trainers compared on the same work.

    .venv-fixtures/bin/python tools/results/trl_recipe.py --recipe recipes/hh_dpo.yaml --trainer dpo \
        --output-dir runs/trl-hh-dpo [--seed 42] [--max-steps N]

Run it again with the same arguments and it resumes from the newest checkpoint under <output-dir>/trl (the
recipe's save_steps). Keep --max-steps as it was: the learning-rate schedule comes back from the checkpoint, so a
resumed run with a larger --max-steps trains its extra steps at the old schedule's end (lr 0).

DPO's reference log-probs are TRL's slowest part here (about 12 s per batch of 8 HH pairs, an hour for the HH
recipe), and TRL computes them again on every start, resumes included. So the script writes TRL's own values to
--ref-logps (default <output-dir>/trl_ref_logps.json) once TRL has computed them, and a later start with that
file hands them back to TRL instead of computing them again: the same numbers, checked against a digest of the
tokenized rows they belong to. `--no-gradient-checkpointing` turns off a recipe's gradient checkpointing: the same
gradients, no recomputation, more memory (on the HH DPO recipe: 21.9 GB resident within 10 steps and no faster).
`--no-eval` skips TRL's own held-out evaluations (every eval_steps and at the end; 5.7 minutes each on the HH
recipe) for the rest of a run, resumes included; training is the same (evaluation draws no random numbers and
the data order comes from the seed), and the held-out scores after training still come from `prefalign eval`.
ORPO: pairs whose prompt fills max_length are left out by the export, as prefalign drops them (TRL would keep them
and train on a NaN loss); the script checks that TRL's tokenization leaves no such pair.

Same rows: `prefalign data export --model --trainer` writes the training and held-out pairs exactly as prefalign
trains on them (HH-RLHF transcripts become conversational prompt / chosen / rejected; the pairs prefalign's
rules drop are left out), and TRL tokenizes them by its own rules (prefalign's tokenization equals TRL's:
tests/integration/trl_data.rs). Same model: `prefalign convert` turns the GGUF into the Hugging Face folder TRL loads (logits
equal transformers' own GGUF loading). Same settings: the recipe's keys, with bf16 and gradient checkpointing off
unless the recipe turns them on (prefalign's defaults; TRL's are on).
The held-out preference accuracy and reward margin after training are measured by `prefalign eval` on TRL's
output exactly as `prefalign compare` scores its own runs, so both trainers are scored by one program
(`--score-base` scores the untrained model too). Writes <output-dir>/trl_summary.json.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import transformers
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# PREFALIGN_BIN: a copy of the binary, so that rebuilding target/ during a run of hours does not pull it away
PREFALIGN = Path(os.environ.get("PREFALIGN_BIN", ROOT / "target" / "release" / "prefalign"))
datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()


def prefalign(*args):
    subprocess.run([str(PREFALIGN), *map(str, args)], check=True, cwd=ROOT)


def export(recipe, split, path, trainer, model_dir, limit=None):
    """The rows of `split` as prefalign trains on them: converted, and without the pairs that prefalign's rules for
    `trainer` drop after tokenizing with `model_dir`'s tokenizer at the recipe's max_length."""
    args = ["data", "export", "--dataset", recipe["dataset_name"], "--dataset-split", split, "--output", path,
            "--model", model_dir, "--trainer", trainer, "--max-length", recipe["max_length"]]
    if limit:
        args += ["--limit", limit]
    if recipe.get("dataset_format"):
        args += ["--dataset-format", recipe["dataset_format"]]
    if recipe.get("skip_invalid_rows"):
        args += ["--skip-invalid-rows"]
    prefalign(*args)
    return datasets.load_dataset("json", data_files=str(path), split="train")


def held_out_scores(model_dir, recipe, trainer, out, reference=None, limit=None):
    """`prefalign eval` on the held-out pairs (as `prefalign compare` scores its runs): preference accuracy
    (chosen log-prob above rejected), and DPO rewards against `reference`."""
    flags = ["eval", "--model", model_dir, "--dataset", recipe["eval_dataset"], "--dataset-split", recipe["dataset_test_split"],
             "--objective", trainer, "--beta", recipe["beta"], "--max-length", recipe["max_length"], "--output", out,
             "--batch-size", recipe.get("per_device_eval_batch_size", 8)]
    if recipe.get("dataset_format"):
        flags += ["--dataset-format", recipe["dataset_format"]]
    if recipe.get("skip_invalid_rows"):
        flags += ["--skip-invalid-rows"]
    if recipe.get("bf16"):
        flags += ["--bf16"]
    if reference is not None:
        flags += ["--ref-model", reference]
    if limit:
        flags += ["--limit", limit]
    result = subprocess.run([str(PREFALIGN), *map(str, flags)], check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(result.stdout)


def rows_digest(dataset):
    """A digest of the tokenized pairs, to check that saved reference log-probs belong to these rows."""
    rows = dataset.select_columns(["chosen_ids", "rejected_ids"]).to_dict()
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def replaying(trainer_class, saved):
    """`trainer_class` taking the reference log-probs of a split from `saved` (what an earlier start wrote, TRL's
    own values) instead of computing them again."""

    class Replaying(trainer_class):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            if name not in saved:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            split = saved[name]
            if split["rows_digest"] != rows_digest(dataset):
                raise SystemExit(f"the saved reference log-probs of the {name} split are for other rows; remove the "
                                 "--ref-logps file to compute them again")
            return dataset.add_column("ref_chosen_logps", split["ref_chosen_logps"]).add_column(
                "ref_rejected_logps", split["ref_rejected_logps"])

    return Replaying


def save_ref_logps(trainer, path):
    splits = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    columns = ["ref_chosen_logps", "ref_rejected_logps"]
    path.write_text(json.dumps({"trl": __import__("trl").__version__} | {
        name: {"rows_digest": rows_digest(dataset)} | dataset.select_columns(columns).to_dict()
        for name, dataset in splits.items()}))
    print(f"TRL's reference log-probs written to {path}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--trainer", choices=["dpo", "orpo"], required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--limit", type=int, help="only the first N rows of each split (a quick check of the script)")
    parser.add_argument("--score-base", action="store_true",
                        help="also score the untrained model (the same numbers as prefalign compare's baseline)")
    parser.add_argument("--ref-logps", help="TRL's DPO reference log-probs: replayed if the file exists, else written "
                        "once TRL has computed them (default <output-dir>/trl_ref_logps.json)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="same gradients, no recomputation, more memory (HH DPO recipe: 21.9 GB, no faster)")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip TRL's own held-out evaluations during training (prefalign eval still scores the result)")
    args = parser.parse_args()
    recipe = yaml.safe_load(open(ROOT / args.recipe))
    if args.seed is not None:
        recipe["seed"] = args.seed
    if args.max_steps is not None:
        recipe["max_steps"] = args.max_steps
    out = (ROOT / args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    model_dir = out / "base-model"
    if not (model_dir / "config.json").exists():
        prefalign("convert", "--model", recipe["model_name_or_path"], "--output", model_dir)
    train = export(recipe, recipe["dataset_split"], out / "train.jsonl", args.trainer, model_dir, args.limit)
    held_out = export(recipe, recipe["dataset_test_split"], out / "held_out.jsonl", args.trainer, model_dir, args.limit)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    common = dict(
        output_dir=str(out / "trl"), learning_rate=recipe["learning_rate"],
        lr_scheduler_type=recipe.get("lr_scheduler_type", "linear"),
        # transformers 5: a warmup_steps below 1 is a ratio of the total steps (ceil), as warmup_ratio was
        warmup_steps=recipe.get("warmup_steps") or recipe.get("warmup_ratio", 0.0),
        per_device_train_batch_size=recipe["per_device_train_batch_size"],
        per_device_eval_batch_size=recipe.get("per_device_eval_batch_size", 8), max_steps=recipe.get("max_steps", -1),
        num_train_epochs=recipe.get("num_train_epochs", 1),
        logging_steps=recipe.get("logging_steps", 10), eval_strategy="no" if args.no_eval else "steps", eval_steps=recipe.get("eval_steps", 50),
        save_strategy="steps" if recipe.get("save_steps") else "no", save_steps=recipe.get("save_steps", 500),
        save_total_limit=recipe.get("save_total_limit"), report_to=[], seed=recipe.get("seed", 42), beta=recipe["beta"],
        max_length=recipe["max_length"], bf16=bool(recipe.get("bf16", False)),
        gradient_checkpointing=bool(recipe.get("gradient_checkpointing", False)) and not args.no_gradient_checkpointing,
        use_cpu=True,
    )
    saved = {}  # TRL's reference log-probs from an earlier start
    if args.trainer == "dpo":
        from trl import DPOConfig, DPOTrainer
        config = DPOConfig(loss_type=recipe.get("loss_type", ["sigmoid"]),
                           precompute_ref_log_probs=bool(recipe.get("precompute_ref_log_probs", False)), **common)
        ref_logps = Path(args.ref_logps) if args.ref_logps else out / "trl_ref_logps.json"
        if config.precompute_ref_log_probs and ref_logps.exists():
            saved = json.loads(ref_logps.read_text())
            print(f"TRL's reference log-probs from {ref_logps}", flush=True)
        trainer = replaying(DPOTrainer, saved)(model=model, args=config, train_dataset=train, eval_dataset=held_out,
                                               processing_class=tokenizer)
        if config.precompute_ref_log_probs and not saved:
            save_ref_logps(trainer, ref_logps)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        config = ORPOConfig(**common)
        trainer = ORPOTrainer(model=model, args=config, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer)
        # TRL keeps a pair whose prompt fills max_length: truncation empties its completion, its loss is NaN, and the
        # first batch holding one turns every weight NaN. The export left such pairs out, as prefalign drops them;
        # check that TRL's own tokenization agrees.
        for split in ("train_dataset", "eval_dataset"):
            empty = getattr(trainer, split).filter(lambda row: all(label == -100 for label in row["chosen_labels"])
                                                   or all(label == -100 for label in row["rejected_labels"]))
            if len(empty):
                raise SystemExit(f"{split}: TRL's tokenization leaves {len(empty)} pairs with an empty completion that "
                                 "prefalign's export kept")

    reference = model_dir if args.trainer == "dpo" else None
    before = held_out_scores(model_dir, recipe, args.trainer, out / "held_out_before.jsonl", reference, args.limit) if args.score_base else None
    started = time.time()
    checkpoint = get_last_checkpoint(str(out / "trl")) if (out / "trl").is_dir() else None
    if checkpoint:
        print(f"resuming from {checkpoint}", flush=True)
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.time() - started
    trained = out / "trained-model"
    trainer.save_model(str(trained))
    tokenizer.save_pretrained(str(trained))
    after = held_out_scores(trained, recipe, args.trainer, out / "held_out_after.jsonl", reference, args.limit)
    summary = {
        "trainer": f"trl {__import__('trl').__version__} {args.trainer}", "recipe": args.recipe, "seed": recipe.get("seed", 42),
        "max_steps": trainer.state.max_steps, "gradient_checkpointing": config.gradient_checkpointing,
        "ref_logps_replayed": bool(saved), "resumed_from": checkpoint, "train_seconds": seconds, "held_out_before": before, "held_out_after": after,
        "log_history": trainer.state.log_history,
    }
    (out / "trl_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("trainer", "train_seconds")} | {
        "accuracy_before": before and before["eval_preference_accuracy"], "accuracy_after": after["eval_preference_accuracy"],
        "reward_margin_after": after.get("eval_rewards/margins")}))


if __name__ == "__main__":
    sys.exit(main())
