"""The median and range of several bench/models.py runs, variant by variant: a markdown table and
the time-memory frontier of the medians as a PNG.

    python -m bench.summarize_models bench/results/models-...-run{1,2,3}.json --md summary.md --plot frontier.png

Each run is one JSON file that bench/models.py wrote (--json); runs may cover different models.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

RATIOS = (
    ("time_vs_unchecked", "time / unchecked"),
    ("time_ratio", "time / torch checkpoint"),
    ("held_vs_unchecked", "held after forward / unchecked"),
    ("backward_peak_vs_unchecked", "backward peak / unchecked"),
)


def _cell(values: List[float], ranged: bool) -> str:
    median = statistics.median(values)
    return f"{median:.2f} ({min(values):.2f}–{max(values):.2f})" if ranged else f"{median:.2f}"


def summarize(paths: Sequence[Path], models: Optional[Sequence[str]] = None) -> Tuple[str, dict]:
    runs = [json.loads(Path(path).read_text()) for path in paths]
    rows: Dict[Tuple[str, str], List[dict]] = {}
    for run in runs:
        for row in run["rows"]:
            if models is None or row["model"] in models:
                rows.setdefault((row["model"], row["variant"]), []).append(row)
    first = runs[0]
    lines = [
        f"Medians (and ranges) of {len(runs)} runs of bench/models.py: {first['machine']}, torch {first['torch']}, "
        f"ckbn backend {first['ckbn_backend']}; time: {first['time']} per run. Runs: "
        + ", ".join(f"`{Path(path).name}`" for path in paths)
        + ".",
        "",
        "| model | variant | runs | time (ms) | " + " | ".join(title for _, title in RATIOS) + " |",
        "|---|---|---:|---:|" + "---:|" * len(RATIOS),
    ]
    medians = []
    for (model, variant), samples in rows.items():
        cells = [
            _cell([s[key] for s in samples], ranged=index == 0) if key in samples[0] else "–"
            for index, (key, _) in enumerate(RATIOS)
        ]
        time_ms = statistics.median(s["time_ms"] for s in samples)
        lines.append(f"| {model} | {variant} | {len(samples)} | {time_ms:.0f} | " + " | ".join(cells) + " |")
        median_row = {"model": model, "variant": variant, "time_ms": time_ms}
        for key in ("held_bytes", "memory_bytes"):
            if key in samples[0]:
                median_row[key] = statistics.median(s[key] for s in samples)
        medians.append(median_row)
    report = {"machine": first["machine"] + f", medians of {len(runs)} runs", "ckbn_backend": first["ckbn_backend"]}
    return "\n".join(lines) + "\n", dict(report, rows=medians)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summarize_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench/models.py --json")
    parser.add_argument("--models", default=None, help="comma-separated: summarize only these models' rows")
    parser.add_argument("--md", type=Path, default=None, help="write the table here (default: print it)")
    parser.add_argument("--plot", type=Path, default=None, help="write the frontier of the medians here (PNG)")
    args = parser.parse_args(argv)
    table, report = summarize(args.runs, args.models.split(",") if args.models else None)
    if args.md is None:
        print(table, end="")
    else:
        args.md.write_text(table)
    if args.plot is not None:
        from bench.models import plot  # imports torch, torchvision and ckbn: only when plotting

        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
