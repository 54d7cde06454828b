"""Delta pushes between real processes: after a first full version, the trainer sends replicas
that hold it only the compressed XOR; a replica whose base is not what it should be refuses it and
gets the full version, and serves exactly the trainer's bytes either way."""

from __future__ import annotations

from contextlib import ExitStack

import redis
from safetensors.torch import load_file
from transformers import AutoConfig

from services.common import delta, registry
from services.common.payload import scratch_dir
from services.common.weights import status
from services.trainer.config import TrainerSettings
from services.trainer.publisher import Publisher
from tests.helpers.procs import service, wait_for

TOKEN = "delta-s3cret"


def test_deltas_go_to_replicas_that_hold_the_base_and_a_wrong_base_gets_the_full_version(
    redis_server, tiny_model, tmp_path
):
    url = redis_server.url.rsplit("/", 1)[0] + "/5"
    client = redis.Redis.from_url(url)
    client.flushdb()
    with ExitStack() as stack:
        processes = {}
        for name in ("d-1", "d-2"):
            args = ["serve", "rollout", "--model-dir", str(tiny_model), "--redis-url", url, "--replica", name,
                    "--weights-token", TOKEN]  # fmt: skip
            processes[name] = stack.enter_context(service(args, tmp_path / f"{name}.log"))[0]
        wait_for(lambda: len(registry.live_replicas(client)) == 2, what="both replicas registered")
        addresses = {r.replica: r.grpc for r in registry.live_replicas(client)}
        settings = TrainerSettings(redis_url=url, weights_token=TOKEN, push_timeout_s=60, weights_delta=True,
                                   weights_chunk_bytes=256 << 10)  # fmt: skip
        tied = bool(AutoConfig.from_pretrained(tiny_model).tie_word_embeddings)
        pub = Publisher(settings, client, 1, tied_embeddings=tied)
        start = load_file(tiny_model / "model.safetensors")
        v1 = {name: t * 1.01 for name, t in start.items()}
        pub.publish(1, v1)  # nothing to send a delta against yet: full
        full = len(pub.payload(v1, "float32", copy=False))
        assert pub.bytes_sent == 2 * full
        wait_for(lambda: all(r.version == 1 for r in registry.live_replicas(client)), what="heartbeats on v1")

        # d-2's kept copy of version 1 is damaged: the delta rebuilds to bytes that fail the checksum
        kept = next((scratch_dir() / f"passk-{processes['d-2'].pid}").glob("kept-e1-v1.safetensors"))
        damaged = bytearray(kept.read_bytes())
        damaged[len(damaged) // 2] ^= 0x40
        kept.write_bytes(bytes(damaged))

        v2 = {name: t.clone() for name, t in v1.items()}
        v2["model.norm.weight"] += 0.01  # one small tensor moves: a small delta
        frames = delta.frames(2, 1, pub.payload(v2, "float32", copy=False), pub.bases["float32"].data,
                              pub.bases["float32"].checksum, settings.weights_chunk_bytes)  # fmt: skip
        small = sum(map(len, frames))
        assert small < 0.1 * full
        pub.publish(2, v2)
        pub.close()
        # d-1 took the delta; d-2 refused it (checksum mismatch), then took the full version
        assert pub.bytes_sent == 2 * small + full
        assert {name: status(a, token=TOKEN).version for name, a in addresses.items()} == {"d-1": 2, "d-2": 2}
        refusal = (tmp_path / "d-2.log").read_text()
        assert "refused a weight push: checksum mismatch" in refusal
        assert "refused" not in (tmp_path / "d-1.log").read_text()
        # and both serve the trainer's version 2 itself: what they keep is its bytes, bit for bit
        expected = pub.bases["float32"].data  # the trainer keeps version 2 as the next base
        for name in ("d-1", "d-2"):
            (copy,) = (scratch_dir() / f"passk-{processes[name].pid}").glob("kept-e1-v2.safetensors")
            assert copy.read_bytes() == expected, name
