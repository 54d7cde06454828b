"""scripts/seed_table.py: the verdict per row of docs/RESULTS.md's rule (mean change above the
spread between seeds), from eval.jsonl files written here."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "seed_table.py"


def run_dir(tmp_path, name: str, before: dict[str, float], after: dict[str, float]) -> Path:
    run = tmp_path / name
    run.mkdir()
    rows = [{"version": v, "table": {r: {"pass@1": 0.0, "pass@8": x, "items": 5} for r, x in t.items()}}
            for v, t in ((0, before), (30, {r: 0.0 for r in before}), (60, after))]  # fmt: skip
    (run / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def test_a_row_improves_only_when_its_mean_change_exceeds_the_spread(tmp_path):
    before = {"maze/7x7": 0.30, "math/linear": 0.20, "puzzle/strings": 0.10}
    afters = [
        {"maze/7x7": 0.40, "math/linear": 0.20, "puzzle/strings": 0.30},
        {"maze/7x7": 0.42, "math/linear": 0.40, "puzzle/strings": 0.10},
        {"maze/7x7": 0.44, "math/linear": 0.30, "puzzle/strings": 0.12},
    ]
    runs = [run_dir(tmp_path, f"s{i}", before, after) for i, after in enumerate(afters)]
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, runs)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    # maze: +12 points against a spread of 4; math: +10 against 20; strings: +7.3 against 20
    assert lines["maze/7x7"].endswith("| +12.0 | 4.0 | yes |")
    assert lines["math/linear"].endswith("| +10.0 | 20.0 | no |")
    assert lines["puzzle/strings"].endswith("| +7.3 | 20.0 | no |")
    assert "1 rows improved" in done.stdout
    (runs[1] / "eval.jsonl").write_text((runs[1] / "eval.jsonl").read_text().splitlines()[0] + "\n")
    unfinished = subprocess.run([sys.executable, str(SCRIPT), *map(str, runs)], capture_output=True, text=True,
                                check=False)  # fmt: skip
    assert unfinished.returncode == 2 and "has 1 evaluations" in unfinished.stderr
