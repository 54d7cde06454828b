"""The tiny model's build: several maze sizes, a context long enough for them, and snapshots
that are the same model as a shorter build on the same schedule."""

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.tiny_model import build_tiny


def weights(path):
    return load_file(path / "model.safetensors")


def test_a_snapshot_is_the_shorter_build(tmp_path):
    torch.set_num_threads(1)
    build_tiny(tmp_path / "long", sizes=(5, 7), steps=4, horizon=6, batch=4, snapshots={2: tmp_path / "snap"})
    build_tiny(tmp_path / "short", sizes=(5, 7), steps=2, horizon=6, batch=4)
    snap, short, long = weights(tmp_path / "snap"), weights(tmp_path / "short"), weights(tmp_path / "long")
    assert snap.keys() == short.keys()
    assert all(torch.equal(snap[k], short[k]) for k in snap)
    assert any(not torch.equal(snap[k], long[k]) for k in snap)  # two more steps changed it
    config = (tmp_path / "snap" / "config.json").read_text()
    assert '"max_position_embeddings": 512' in config


def test_bad_builds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="odd"):
        build_tiny(tmp_path / "m", sizes=(8,), steps=1)
    with pytest.raises(ValueError, match="21x21 mazes need up to"):
        build_tiny(tmp_path / "m", sizes=(21,), steps=1, max_positions=512)
    with pytest.raises(ValueError, match="snapshot steps"):
        build_tiny(tmp_path / "m", steps=2, snapshots={3: tmp_path / "s"})
