"""How long ``passk --help`` takes, against a bare Python start in the same run.

    .venv/bin/python bench/cli_startup.py [--runs 20]

The CLI must stay instant: commands import torch and friends only when they run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def median_seconds(command: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="runs of each command")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    passk = str(Path(sys.executable).parent / "passk")
    bare = median_seconds([sys.executable, "-c", "pass"], args.runs)
    help_ = median_seconds([passk, "--help"], args.runs)
    torch = median_seconds([sys.executable, "-c", "import torch"], args.runs)
    print(f"python -c pass      {bare * 1e3:7.1f} ms")
    print(f"passk --help        {help_ * 1e3:7.1f} ms   ({help_ / bare:.1f}x a bare start)")
    print(f"python -c 'import torch'  {torch * 1e3:7.1f} ms   (what --help would cost with torch at the top)")


if __name__ == "__main__":
    main()
