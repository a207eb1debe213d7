"""TRL's reference log-probs (the file tools/results/trl_recipe.py writes) beside prefalign's cached ones for the
same rows, for docs/RESULTS.md: how far the two programs' reference scores lie apart, and whether they rank the
pairs the same way (chosen above rejected).

    python3 tools/results/ref_logps_parity.py docs/results/trl-hh-dpo-full/trl_ref_logps.json \
        train=~/.cache/prefalign/ref_logps/<hash>.safetensors eval=~/.cache/prefalign/ref_logps/<hash>.safetensors

prefalign prints the path of each cache file it reads or writes ("reference log-probs: cached (...)"); the
training split's comes first. Needs numpy and safetensors (.venv-fixtures has both).
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

trl = json.load(open(sys.argv[1]))
for arg in sys.argv[2:]:
    split, path = arg.split("=", 1)
    ours = load_file(os.path.expanduser(path))
    theirs = {side: np.array(trl[split][f"ref_{side}_logps"]) for side in ("chosen", "rejected")}
    if len(ours["chosen"]) != len(theirs["chosen"]):
        sys.exit(f"{split}: {len(ours['chosen'])} pairs in {path}, {len(theirs['chosen'])} in {sys.argv[1]}")
    for side in ("chosen", "rejected"):
        gap = np.abs(theirs[side] - ours[side].astype(np.float64))
        print(f"{split} {side}: {len(gap)} pairs, |TRL - prefalign| mean {gap.mean():.3f}, max {gap.max():.3f} nats "
              f"(TRL mean {theirs[side].mean():.2f})")
    trl_prefers = theirs["chosen"] > theirs["rejected"]
    ours_prefers = ours["chosen"] > ours["rejected"]
    print(f"{split}: chosen above rejected TRL {100 * trl_prefers.mean():.2f}%, prefalign {100 * ours_prefers.mean():.2f}%, "
          f"{(trl_prefers != ours_prefers).sum()} pairs ranked differently")
