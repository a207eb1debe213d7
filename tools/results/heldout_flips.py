"""How a DPO run changed the model's own preference on held-out pairs, pair by pair, from the per-pair scores
`prefalign compare` writes (runs/<name>/heldout_after.jsonl: policy and reference log-probs of each pair; the
reference is the untrained model). For docs/RESULTS.md.

    python3 tools/results/heldout_flips.py runs/hh-dpo-full/runs/seed=*/heldout_after.jsonl

Prints, per file: accuracy before and after (chosen summed log-prob above rejected), the pairs that turned right
and wrong, an exact two-sided McNemar test on those, the median gap |chosen - rejected| of the untrained model, the
mean and median shift of the chosen-minus-rejected log-ratio, and how many pairs lie within the mean shift.
"""
import json
import math
import statistics
import sys

for path in sys.argv[1:]:
    rows = [json.loads(line) for line in open(path)]
    before = [r["ref_chosen_logps"] > r["ref_rejected_logps"] for r in rows]
    after = [r["chosen_logps"] > r["rejected_logps"] for r in rows]
    gained = sum(1 for b, a in zip(before, after) if not b and a)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    flips = gained + lost
    p = min(1.0, 2 * sum(math.comb(flips, i) for i in range(min(gained, lost) + 1)) / 2**flips) if flips else 1.0
    gaps = [abs(r["ref_chosen_logps"] - r["ref_rejected_logps"]) for r in rows]
    shifts = [(r["chosen_logps"] - r["ref_chosen_logps"]) - (r["rejected_logps"] - r["ref_rejected_logps"]) for r in rows]
    mean_shift = statistics.mean(shifts)
    n = len(rows)
    print(f"{path}: {n} pairs, accuracy {100 * sum(before) / n:.1f}% -> {100 * sum(after) / n:.1f}%, "
          f"{gained} turned right, {lost} turned wrong, McNemar p = {p:.2f}; untrained gap median "
          f"{statistics.median(gaps):.1f} nats; log-ratio shift mean {mean_shift:.2f}, median "
          f"{statistics.median(shifts):.2f} nats; {sum(g < mean_shift for g in gaps)} pairs within the mean shift")
