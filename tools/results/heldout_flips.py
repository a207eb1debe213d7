"""How a run changed the model's own preference on held-out pairs, pair by pair, from the per-pair scores
`prefalign compare` writes (runs/<name>/heldout_after.jsonl). For docs/RESULTS.md.

    python3 tools/results/heldout_flips.py runs/hh-dpo-full/runs/seed=*/heldout_after.jsonl
    python3 tools/results/heldout_flips.py --before BASE.jsonl runs/hh-orpo/runs/beta=0.1/heldout_after.jsonl

DPO: each file holds the policy's and the reference's (the untrained model's) summed log-probs of each pair.
ORPO and CPO have no reference: --before names the untrained model's per-pair scores (`prefalign eval --output`,
or the held_out_before.jsonl of tools/results/trl_recipe.py --score-base), and the per-token average log-probs
are compared (ORPO's measure), pairs matched by location.

Prints, per file: accuracy before and after (chosen log-prob above rejected), the pairs that turned right and
wrong, an exact two-sided McNemar test on those, the median gap |chosen - rejected| of the untrained model, the
mean and median shift of the chosen-minus-rejected log-ratio, and how many pairs lie within the mean shift.
"""
import json
import math
import statistics
import sys


def read(path):
    return [json.loads(line) for line in open(path)]


args = sys.argv[1:]
base = None
if args[:1] == ["--before"]:
    base = {row["location"]: row for row in read(args[1])}
    args = args[2:]
unit = "nats per token" if base else "nats"

for path in args:
    rows = read(path)
    if base:  # (chosen, rejected) before and after
        scores = [((base[r["location"]]["chosen_logps_avg"], base[r["location"]]["rejected_logps_avg"]),
                   (r["chosen_logps_avg"], r["rejected_logps_avg"])) for r in rows]
    else:
        scores = [((r["ref_chosen_logps"], r["ref_rejected_logps"]), (r["chosen_logps"], r["rejected_logps"])) for r in rows]
    before = [b[0] > b[1] for b, _ in scores]
    after = [a[0] > a[1] for _, a in scores]
    gained = sum(1 for b, a in zip(before, after) if not b and a)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    flips = gained + lost
    p = min(1.0, 2 * sum(math.comb(flips, i) for i in range(min(gained, lost) + 1)) / 2**flips) if flips else 1.0
    gaps = [abs(b[0] - b[1]) for b, _ in scores]
    shifts = [(a[0] - b[0]) - (a[1] - b[1]) for b, a in scores]
    mean_shift = statistics.mean(shifts)
    n = len(rows)
    print(f"{path}: {n} pairs, accuracy {100 * sum(before) / n:.1f}% -> {100 * sum(after) / n:.1f}%, "
          f"{gained} turned right, {lost} turned wrong, McNemar p = {p:.2f}; untrained gap median "
          f"{statistics.median(gaps):.3g} {unit}; log-ratio shift mean {mean_shift:.3g}, median "
          f"{statistics.median(shifts):.3g} {unit}; {sum(g < mean_shift for g in gaps)} pairs within the mean shift")
