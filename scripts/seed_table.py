"""The before/after table of runs of one preset with different seeds, and docs/RESULTS.md's verdict
per row: improved when the mean over seeds of (after - before) exceeds the spread of "after"
between the seeds (max - min).

    python scripts/seed_table.py runs/mixed-tiny-s0 runs/mixed-tiny-s1 runs/mixed-tiny-s2 [--k 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(run: Path) -> tuple[dict, dict]:
    """(first, last) evaluation tables of a run's eval.jsonl."""
    entries = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines() if line.strip()]
    if len(entries) < 2:
        raise ValueError(f"{run}/eval.jsonl has {len(entries)} evaluations; a finished run has two or more")
    return entries[0]["table"], entries[-1]["table"]


def table(runs: list[Path], k: int) -> tuple[str, int]:
    """The markdown table and the number of improved rows."""
    tables = [load(run) for run in runs]
    metric = f"pass@{k}"
    head = ["row", "before", *[f"after (seed run {i})" for i in range(len(runs))], "mean change", "spread", "improved"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    improved = 0
    for row in tables[0][0]:
        before = [first[row][metric] for first, _ in tables]
        after = [last[row][metric] for _, last in tables]
        change = sum(a - b for a, b in zip(after, before, strict=True)) / len(runs)
        spread = max(after) - min(after)
        verdict = change > spread
        improved += verdict
        cells = [row, f"{100 * before[0]:.1f}", *(f"{100 * a:.1f}" for a in after), f"{100 * change:+.1f}",
                 f"{100 * spread:.1f}", "yes" if verdict else "no"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", improved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        text, improved = table(args.runs, args.k)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    print(f"{improved} rows improved (mean change of pass@{args.k} above the spread between the seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
