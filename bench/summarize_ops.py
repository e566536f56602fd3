"""The median and range of several bench/ops.py runs, row by row, as a markdown table.

    python bench/summarize_ops.py bench/results/cpu-DATE-1thread-run{1,2,3}.json > summary.md

Each run is one JSON file that bench/ops.py wrote (--json). A row is met when its median meets
every target the runs held it to.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Dict, List, Tuple


def summarize(paths: List[str]) -> str:
    runs = [json.load(open(path)) for path in paths]
    ratios: Dict[Tuple, List[float]] = {}
    targets: Dict[Tuple, List[str]] = {}
    for run in runs:
        for row in run["rows"]:
            key = (row["case"], "x".join(map(str, row["shape"])), row["layout"], row["dtype"])
            ratios.setdefault(key, []).append(row["ratio"])
            targets[key] = row["targets"]
    meta = runs[0]["meta"]
    lines = [
        f"Ratio = torch time / ckbn time (above 1: ckbn is faster), {len(runs)} runs of bench/ops.py:",
        f"{meta.get('implementation', '')}, torch {meta.get('torch', '')}, threads {meta.get('threads', '')}, "
        f"first run {meta.get('date', '')}. Runs: {', '.join(paths)}.",
        "",
        "| case | shape | layout | dtype | "
        + " | ".join(f"run {i + 1}" for i in range(len(runs)))
        + " | median | range | target | met (median) |",
        "|---" * (len(runs) + 8) + "|",
    ]
    for key, values in ratios.items():
        median = statistics.median(values)
        wanted = targets[key]
        # Targets read "torch/ckbn >= 1.50"; rows without one must not be slower than torch.
        need = min((float(t.split(">=")[1]) for t in wanted if t.startswith("torch/ckbn >=")), default=1.0)
        target = ", ".join(wanted) or "not slower (>= 1.0)"
        lines.append(
            "| "
            + " | ".join(key)
            + " | "
            + " | ".join(f"{v:.2f}" for v in values)
            + f" | **{median:.2f}** | {min(values):.2f}-{max(values):.2f} | {target} "
            + f"| {'yes' if median >= need else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.stdout.write(summarize(sys.argv[1:]))
