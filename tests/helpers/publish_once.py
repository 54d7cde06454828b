"""Publish one version as the trainer does (``services.trainer.publisher``), from wherever this
runs (an emulated host, for tests and benches): the model's weights times ``--scale``, to every
replica registered in Redis. Prints one JSON line: seconds, bytes sent, relay depth."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import redis
from safetensors.torch import load_file
from transformers import AutoConfig

from services.trainer.config import TrainerSettings
from services.trainer.publisher import Publisher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--epoch", type=int, required=True)
    parser.add_argument("--fanout", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--token", default="")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = TrainerSettings(redis_url=args.redis_url, weights_token=args.token, push_timeout_s=args.timeout,
                               weights_fanout=args.fanout, weights_dtype=args.dtype,
                               weights_chunk_bytes=args.chunk_bytes)  # fmt: skip
    client = redis.Redis.from_url(args.redis_url)
    tied = bool(AutoConfig.from_pretrained(args.model).tie_word_embeddings)
    state = {name: t * args.scale for name, t in load_file(args.model / "model.safetensors").items()}
    publisher = Publisher(settings, client, args.epoch, tied_embeddings=tied)
    dtype = "float32" if args.dtype == "auto" else args.dtype
    size = len(publisher.payload(state, dtype, copy=False))
    seconds = publisher.publish(args.version, state)
    publisher.close()
    print(json.dumps({"seconds": seconds, "bytes_sent": publisher.bytes_sent, "depth": publisher.relay_depth,
                      "payload_bytes": size}))  # fmt: skip


if __name__ == "__main__":
    main()
