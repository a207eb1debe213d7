"""Prints a Markdown table of TRL's and prefalign's training logs side by side, per window of steps: the mean of
the logged training loss, implicit reward accuracy, reward margin and gradient norm (ORPO: loss, NLL of the
chosen, log-odds ratio, reward accuracy, gradient norm), and each trainer's held-out evaluations. For
docs/RESULTS.md (the same recipe run by both trainers).

    python3 tools/results/trl_vs_prefalign.py runs/trl-hh-dpo-full/trl_summary.json \
        runs/hh-dpo-full/runs/seed=42/metrics.jsonl [more metrics.jsonl ...] [--window 50]

The TRL file is trl_recipe.py's trl_summary.json or a checkpoint's trainer_state.json (both hold TRL's
log_history); each prefalign file is a run's metrics.jsonl (one row per logging window, `eval_*` rows for
evaluations). Both trainers log the same keys, averaged over the same logging windows.
"""
import argparse
import json
import statistics
from pathlib import Path

# (column, title) of the training rows' and the evaluations' keys, per objective
DPO_KEYS = [("loss", "loss"), ("rewards/accuracies", "reward acc."), ("rewards/margins", "margin"), ("grad_norm", "grad norm")]
ORPO_KEYS = [("loss", "loss"), ("nll_loss", "NLL"), ("log_odds_ratio", "log-odds ratio"),
             ("rewards/accuracies", "reward acc."), ("grad_norm", "grad norm")]


def read_log(path):
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())["log_history"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def windows(rows, width, keys):
    """{(first step, last step) of the window: {key: mean over the training rows logged in it}}"""
    grouped = {}
    for row in rows:
        if "loss" in row and "step" in row:
            grouped.setdefault((row["step"] - 1) // width, []).append(row)
    return {(w * width + 1, (w + 1) * width): {k: statistics.mean(r[k] for r in rs) for k in keys}
            for w, rs in sorted(grouped.items())}


def evaluations(rows):
    return {row["step"]: row for row in rows if "eval_loss" in row and "step" in row}


def print_table(title, first_column, per_trainer, keys):
    """One Markdown row per window or step that any trainer logged, one column per trainer."""
    print(f"{title}\n")
    print(f"| {first_column} | " + " | ".join(per_trainer) + " |")
    print("|---|" + "---|" * len(per_trainer))
    for at in sorted(set().union(*per_trainer.values())):
        rows = [table.get(at) for table in per_trainer.values()]
        cells = [" / ".join(f"{row[k]:.3f}" for k in keys) if row else "–" for row in rows]
        label = f"{at[0]}–{at[1]}" if isinstance(at, tuple) else at
        print(f"| {label} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("trl")
    parser.add_argument("prefalign", nargs="+")
    parser.add_argument("--window", type=int, default=50)
    args = parser.parse_args()
    logs = {"TRL": read_log(args.trl)} | {Path(p).parent.name or p: read_log(p) for p in args.prefalign}

    columns = ORPO_KEYS if any("nll_loss" in row for row in logs["TRL"]) else DPO_KEYS
    keys = [key for key, _ in columns]
    print_table(f"Training rows, mean per {args.window} steps ({' / '.join(title for _, title in columns)}):", "steps",
                {name: windows(rows, args.window, keys) for name, rows in logs.items()}, keys)
    print()
    evaluated = [(f"eval_{key}", title) for key, title in columns if key != "grad_norm"]  # no gradients in an evaluation
    print_table(f"Held-out evaluations (eval {' / '.join(title for _, title in evaluated)}):", "step",
                {name: evaluations(rows) for name, rows in logs.items()}, [key for key, _ in evaluated])

if __name__ == "__main__":
    main()
