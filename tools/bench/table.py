"""Markdown tables of `tools/bench/run.sh` output: each prefalign run beside the TRL run of the same shape,
objective, device, precision and checkpointing setting; then beside TRL's run in the same precision without
checkpointing (TRL's step as the issue's targets measure it).

    python3 tools/bench/table.py bench.jsonl
"""
import json
import sys


def key(run):
    return run["shape"], run["objective"], run["device"], run["bf16"], run["gradient_checkpointing"], bool(run.get("lora"))


def memory(run):
    """Peak GiB, or None where the run could not read it (a CUDA run without the CUDA runtime's memory query)."""
    if run["device"].startswith("cuda"):
        return run.get("peak_gpu_used_gib")
    return run["peak_rss_gib"]


def seconds(value):
    """Two decimals, and three significant digits below a second (a GPU step is tens of milliseconds: 0.0412)."""
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def gib(value):
    return "-" if value is None else f"{value:.2f}"


def ratio(ours, theirs):
    return "-" if ours is None or theirs is None else f"{ours / theirs:.2f}"


def variant(run):
    parts = [f"LoRA r {run['lora']['r']}"] if run.get("lora") else []
    if not run["prefix_sharing"]:
        parts.append("no prefix sharing")
    if not run["packing"]:
        parts.append("no packing")
    if run["precompute_ref_log_probs"]:
        parts.append("precomputed reference")
    if run.get("allocator_conf"):
        parts.append(run["allocator_conf"])
    return ", ".join(parts) or "default"


def table(runs, reference_key):
    trl = {key(r): r for r in runs
           if r["tool"].startswith("trl") and "override" not in r["tool"] and not r.get("allocator_conf")}
    print("| shape | objective | precision | checkpointing | prefalign variant | TRL s/step | prefalign s/step "
          "| speed-up | TRL peak GiB | prefalign peak GiB | memory ratio |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        if run["tool"] != "prefalign":
            continue
        base = trl.get(reference_key(run))
        if base is None:
            continue
        shape, objective, _, bf16, checkpointing, _ = key(run)
        trl_checkpointing = "on" if base["gradient_checkpointing"] else "off"
        ours = "on" if checkpointing else "off"
        print(f"| {shape} | {objective} | {'bf16' if bf16 else 'f32'} "
              f"| {ours if ours == trl_checkpointing else f'{ours} (TRL {trl_checkpointing})'} "
              f"| {variant(run)} | {seconds(base['median_step_s'])} | {seconds(run['median_step_s'])} "
              f"| {base['median_step_s'] / run['median_step_s']:.2f}x | {gib(memory(base))} | {gib(memory(run))} "
              f"| {ratio(memory(run), memory(base))} |")


def main():
    runs = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
    print("Same settings in both:\n")
    table(runs, key)
    print("\nAgainst TRL without gradient checkpointing:\n")
    table([r for r in runs if r["tool"] != "prefalign" or r["gradient_checkpointing"]], lambda r: key(r)[:4] + (False, key(r)[5]))


if __name__ == "__main__":
    main()
