"""Rollout engines: generate N samples per prompt, load a new weight version.

``HFEngine`` runs a transformers causal LM on the CPU (or one GPU), each prompt
prefilled once for its N samples. Generation and weight swaps take the same
lock, so a new version is swapped in between batches, never inside one.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from services.common.hf_sampling import Generation, encode_prompt, sample
from services.common.payload import SERVING_DTYPES
from services.common.registry import Policy
from services.common.schemas import SamplingParams
from services.common.weights import WeightTransferError


class Engine(ABC):
    version: int = 0  # the policy version served, and its trainer epoch
    epoch: int = 0
    context_length: int = 0  # prompt plus generated tokens, at most
    dtype: str = "float32"  # what the weights are served in (payload.SERVING_DTYPES): pushes come in it
    tokenizer = None  # a transformers tokenizer

    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes, special tokens included."""
        return len(encode_prompt(self.tokenizer, prompt))

    @abstractmethod
    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams
    ) -> tuple[list[list[int]], list[list[Generation]]]:
        """(prompt token ids, N generations) for each prompt."""

    @property
    def policy(self) -> Policy:
        return Policy(self.epoch, self.version)

    @abstractmethod
    def load_weights(self, path: Path, version: int, *, epoch: int = 0, values_checked: bool = False) -> float:
        """Swap in the version held in a safetensors file, atomically; returns the seconds the swap
        stopped generation. WeightTransferError keeps the old version. ``values_checked``: the
        values were already scanned for NaN/inf (as they arrived), so only names and shapes are."""

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation, by the model's own chat template (ValueError if it has none)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the served model has no chat template; use /v1/completions")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class HFEngine(Engine):
    def __init__(
        self, model_dir: Path, *, device: str = "cpu", threads: int | None = None, dtype: str = "float32"
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=SERVING_DTYPES[dtype]).to(device).eval()
        self.lock = threading.Lock()
        self.version = 0
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams
    ) -> tuple[list[list[int]], list[list[Generation]]]:
        with self.lock:
            return sample(
                self.model,
                self.tokenizer,
                prompts,
                n,
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed,
                stop=sampling.stop,
            )

    def load_weights(self, path: Path, version: int, *, epoch: int = 0, values_checked: bool = False) -> float:
        from safetensors.torch import load_file

        state = load_file(path)  # memory-mapped
        expected = {name: tuple(t.shape) for name, t in self.model.state_dict().items()}
        check_weights(state, expected, values=not values_checked)
        start = time.monotonic()
        with self.lock:
            self.model.load_state_dict(state, strict=False)
            self.version, self.epoch = version, epoch
        return time.monotonic() - start


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a model directory's safetensors files, read from their headers."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    if not shapes:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    return shapes


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], *, values: bool = True) -> None:
    """WeightTransferError unless ``state`` has exactly the expected names and shapes and (when
    ``values``) finite values."""
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    # tied embeddings appear once in a saved file and twice in state_dict()
    missing = [m for m in missing if not (m == "lm_head.weight" and "model.embed_tokens.weight" in state)]
    if missing or unknown:
        raise WeightTransferError(f"weights do not fit the model: missing {missing[:5]}, unknown {unknown[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise WeightTransferError(f"{name}: shape {tuple(tensor.shape)}, model has {tuple(expected[name])}")
        # the sum is NaN or inf whenever an element is (ten times faster than a full isfinite); only a
        # sum that overflowed from finite values needs the full check
        if values and not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise WeightTransferError(f"{name}: NaN or inf values")
