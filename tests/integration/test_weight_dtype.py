"""The trainer pushes each replica its version in the dtype the replica serves in: a bfloat16
replica gets half the bytes of the float32 master weights, cast once, and serves the version."""

from __future__ import annotations

from contextlib import ExitStack

import redis
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from services.common import registry
from services.common.payload import in_dtype
from services.trainer.config import TrainerSettings
from services.trainer.publisher import Publisher
from tests.helpers.procs import service, wait_for

TOKEN = "dtype-s3cret"


def test_each_replica_gets_its_serving_dtype(redis_server, tiny_model, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + "/2"
    client = redis.Redis.from_url(url)
    client.flushdb()
    with ExitStack() as stack:
        for name, dtype in (("r-f32", "float32"), ("r-bf16", "bfloat16")):
            args = ["serve", "rollout", "--model-dir", str(tiny_model), "--redis-url", url, "--replica", name,
                    "--weights-token", TOKEN]  # fmt: skip
            stack.enter_context(service(args, tmp_path / f"{name}.log", env={"PASSK_ROLLOUT_HF_DTYPE": dtype}))
        replicas = wait_for(lambda: {r.replica: r for r in registry.live_replicas(client)} if len(
            registry.live_replicas(client)) == 2 else None, what="both replicas registered")  # fmt: skip
        assert replicas["r-f32"].dtype == "float32" and replicas["r-bf16"].dtype == "bfloat16"

        state = {name: t * 1.01 for name, t in load_file(tiny_model / "model.safetensors").items()}
        tied = bool(AutoConfig.from_pretrained(tiny_model).tie_word_embeddings)
        settings = TrainerSettings(redis_url=url, weights_token=TOKEN, push_timeout_s=60)
        publisher = Publisher(settings, client, epoch=1, tied_embeddings=tied)
        full, half = publisher.payload(state, "float32", copy=False), publisher.payload(state, "bfloat16", copy=False)
        assert len(half) < 0.52 * len(full)
        publisher.publish(1, state)
        assert publisher.bytes_sent == len(full) + len(half)
        served = wait_for(lambda: {r.replica: r.policy for r in registry.live_replicas(client)} if all(
            r.version == 1 for r in registry.live_replicas(client)) else None, what="both on version 1")  # fmt: skip
        assert served == {"r-f32": (1, 1), "r-bf16": (1, 1)}

        # forced: every replica gets float32, whatever it serves in (the bfloat16 one casts on load)
        forced = Publisher(settings.model_copy(update={"weights_dtype": "float32"}), client, epoch=1,
                           tied_embeddings=tied)  # fmt: skip
        forced.publish(2, {name: t * 1.02 for name, t in state.items()})
        assert forced.bytes_sent == 2 * len(full)
        publisher.close(), forced.close()

    # what the bfloat16 payload holds: every float tensor rounded to bfloat16, nothing else changed
    cast = in_dtype(publisher.weights(state), "bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in cast.values() if t.is_floating_point())
    assert torch.equal(cast["model.embed_tokens.weight"], state["model.embed_tokens.weight"].to(torch.bfloat16))
