"""Run directories as `passk experiment`'s runner leaves them, for report tests: eval.jsonl,
metrics.jsonl and done.json."""

import json
from pathlib import Path


def write_run(run_dir: Path, tables: dict, steps: list | None, seconds: float = 120.0) -> None:
    """``tables``: {version: {row: (pass@1, pass@8)}}, a row a maze size or a task category."""
    run_dir.mkdir(parents=True)
    lines = [{"version": v, "table": {str(row): {"pass@1": a, "pass@8": b} for row, (a, b) in t.items()}}
             for v, t in tables.items()]  # fmt: skip
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if steps is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in steps))
    (run_dir / "done.json").write_text(json.dumps({"seconds": seconds}))
