"""Checkpoints: everything a run needs to continue as if it had not stopped.

A checkpoint is a directory ``checkpoints/step-000040``: the model in
Hugging Face format (safetensors, config, tokenizer; ``passk eval`` and the
replicas load it as any model directory) and ``trainer.pt`` with the
optimizer, the scheduler, the prompt sampler's state, the RNG states, the
policy version and the step. It is written under a temporary name and renamed
into place, so a crash mid-write leaves the previous checkpoint as the latest;
the oldest beyond ``keep`` are deleted only after that.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class State:
    step: int
    version: int
    sampler: object  # random.Random().getstate()
    optimizer: dict
    scheduler: dict
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    python_rng: object


def directory(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = sorted(
        (int(m.group(1)), path)
        for path in directory(run_dir).glob("step-*")
        if (m := NAME.match(path.name)) and (path / "trainer.pt").exists()
    )
    return found[-1][1] if found else None


def save(run_dir: Path, model, tokenizer, state: State, keep: int, model_state: dict | None = None) -> Path:
    """Write a checkpoint; ``model_state``: the whole state dict when the model itself is sharded."""
    root = directory(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    torch.save(state.__dict__, tmp / "trainer.pt")
    for path in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        with path.open("rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    complete = sorted(p for p in root.glob("step-*") if NAME.match(p.name))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path) -> State:
    data = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    return State(**data)


def capture_rng() -> tuple[torch.Tensor, list[torch.Tensor], object]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return torch.get_rng_state(), cuda, random.getstate()


def restore_rng(state: State) -> None:
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda_rng)
    random.setstate(state.python_rng)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
