"""Publish versions as the trainer does (``services.trainer.publisher``), from wherever this runs
(an emulated host, for tests and benches): the model's weights times ``--scale``, or each
``--state-file`` in turn, to the replicas registered in Redis. Prints one JSON line per version:
seconds, bytes sent, relay depth, payload bytes."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import redis
from safetensors.torch import load_file
from transformers import AutoConfig

from services.common import registry
from services.trainer.config import TrainerSettings
from services.trainer.publisher import Publisher

PICKED_DB = 15  # where --pick copies the chosen replicas' registry entries


def picked(url: str, count: int) -> str:
    """A Redis URL whose registry holds only the first ``count`` live replicas (by name), with fresh
    heartbeats: the publisher pushes to those alone."""
    source = redis.Redis.from_url(url)
    chosen = registry.live_replicas(source)[:count]
    if len(chosen) < count:
        raise SystemExit(f"--pick {count}: only {len(chosen)} replicas are live")
    base, _, _ = url.partition("?")
    target_url = f"{base}?db={PICKED_DB}" if url.startswith("unix://") else f"{url.rsplit('/', 1)[0]}/{PICKED_DB}"
    target = redis.Redis.from_url(target_url)
    target.delete(registry.REPLICAS)
    for info in chosen:
        registry.register(target, info.model_copy(update={"heartbeat": time.time()}))
    return target_url


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--version", type=int, required=True, help="The first version published.")
    parser.add_argument("--epoch", type=int, required=True)
    parser.add_argument("--fanout", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--state-file", type=Path, action="append", default=[], help="Versions to publish, in order.")
    parser.add_argument("--delta", action="store_true", help="weights_delta: versions after the first as deltas.")
    parser.add_argument("--pick", type=int, default=0, help="Publish to the first N live replicas only.")
    parser.add_argument("--token", default="")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = picked(args.redis_url, args.pick) if args.pick else args.redis_url
    source = redis.Redis.from_url(args.redis_url)  # where the replicas' own heartbeats land
    settings = TrainerSettings(redis_url=url, weights_token=args.token, push_timeout_s=args.timeout,
                               weights_fanout=args.fanout, weights_dtype=args.dtype, weights_delta=args.delta,
                               weights_chunk_bytes=args.chunk_bytes)  # fmt: skip
    client = redis.Redis.from_url(url)
    tied = bool(AutoConfig.from_pretrained(args.model).tie_word_embeddings)
    if args.state_file:
        states = [load_file(path) for path in args.state_file]
    else:
        states = [{name: t * args.scale for name, t in load_file(args.model / "model.safetensors").items()}]
    publisher = Publisher(settings, client, args.epoch, tied_embeddings=tied)
    live = registry.live_replicas(client)
    dtype = args.dtype if args.dtype != "auto" else (live[0].dtype if live else "float32")  # what the first gets
    for offset, state in enumerate(states):
        size = len(publisher.payload(state, dtype, copy=False))
        if offset:  # the replicas' heartbeats must show the previous version, which a delta is against
            deadline = time.monotonic() + 30
            names = {r.replica for r in registry.live_replicas(client)}
            while any(r.version != args.version + offset - 1 for r in registry.live_replicas(source)
                      if r.replica in names) and time.monotonic() < deadline:  # fmt: skip
                time.sleep(0.2)
            if args.pick:
                picked(args.redis_url, args.pick)  # the copies, with the versions the replicas report now
        seconds = publisher.publish(args.version + offset, state)
        print(json.dumps({"version": args.version + offset, "seconds": seconds, "bytes_sent": publisher.bytes_sent,
                          "depth": publisher.relay_depth, "payload_bytes": size}), flush=True)  # fmt: skip
    publisher.close()


if __name__ == "__main__":
    main()
