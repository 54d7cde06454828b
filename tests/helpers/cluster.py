"""Pieces of the local cluster the integration tests share."""

import sys

from services.tasks.maze import build_splits
from services.tasks.records import write_jsonl


def maze_data(tmp_path, *, test_per_size: int, seed: int):
    """7x7 train and test splits in tmp_path; returns a fresh logs folder."""
    splits = build_splits([7], [7], train_per_size=50, test_per_size=test_per_size, seed=seed)
    write_jsonl(splits["train"], tmp_path / "train.jsonl")
    write_jsonl(splits["test"], tmp_path / "test.jsonl")
    logs = tmp_path / "logs"
    logs.mkdir()
    return logs


def trainer_args(tmp_path, redis_url: str, verifier_url: str, model_dir, **overrides) -> list[str]:
    """`passk train` arguments for a short run of the tiny model on the data of ``maze_data``."""
    settings = {
        "model_dir": f"'{model_dir}'", "run_dir": f"'{tmp_path / 'run'}'",
        "train_data": f"'{tmp_path / 'train.jsonl'}'", "test_data": f"'{tmp_path / 'test.jsonl'}'",
        "redis_url": f"'{redis_url}'", "verifier_url": f"'{verifier_url}'", "max_tokens": 16,
        "eval_mazes": 2, "eval_n": 2, "eval_k": "[1]", "eval_every": 0, "min_replicas": 1, "group_timeout_s": 180,
    }  # fmt: skip
    settings.update({key: str(value) for key, value in overrides.items()})
    args = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "services.cli", "train", "--preset", "configs/maze-tiny.toml", *args]
