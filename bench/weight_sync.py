"""Publishing one version of SmolLM2-135M (538 MB in float32) to rollout
replicas over loopback gRPC, against a raw loopback TCP transfer of the same
bytes, in the same run.

The replicas are real ones (``passk serve rollout``, transformers backend) with
the model loaded. *publish* is what the trainer does for a version: push it to
every replica in parallel, chunks cut from the tensors themselves, each
replica streaming it into a file, hashing and scanning it and swapping it in;
it ends when every replica answered. *swap* is the stop-the-world part inside a replica (generation waits
on it), from the replicas' own histogram. *raw TCP* sends the same bytes with
``socket.sendall`` to the same number of receiver processes that write them to
a file in the same place and answer; nothing else. *gRPC only* sends the same
framed chunks through bare gRPC servers that write them to a file the same way:
what the gRPC library itself costs over raw TCP.

    passk model import-smollm2 --out models/smollm2-135m     # once
    .venv/bin/python bench/weight_sync.py --repeat 3
    .venv/bin/python bench/weight_sync.py --hosts --rate-mbit 200   # star vs relay, deltas: emulated hosts
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from services.common import registry
from services.common.payload import Payload, scratch_dir
from services.common.processes import stop, wait_healthy
from services.common.redis_server import RedisServer, free_port
from services.common.weights import chunks, push

RECEIVER = r"""
import os, socket, sys, tempfile
directory = sys.argv[1]
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        size = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
        if size == 0:
            break
        fd, name = tempfile.mkstemp(dir=directory)
        with os.fdopen(fd, "wb") as f:
            left = size
            while left:
                data = conn.recv(min(left, 2 << 20))
                f.write(data)
                left -= len(data)
        os.unlink(name)
        conn.sendall(b"ok")
"""


GRPC_RECEIVER = r"""
import os, sys, tempfile
from concurrent import futures
import grpc
directory = sys.argv[1]
def push(chunks, context):
    fd, name = tempfile.mkstemp(dir=directory)
    with os.fdopen(fd, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
    os.unlink(name)
    return b""
server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", 16 << 20)])
handler = grpc.stream_unary_rpc_method_handler(push, request_deserializer=None, response_serializer=None)
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Sink", {"Push": handler}),))
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


def grpc_only(ports: list[int], payload) -> float:
    """The same framed chunks through bare gRPC servers that write them to a file: gRPC's own cost."""

    def send(port: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            channel.stream_unary("/bench.Sink/Push")(chunks(1, payload), timeout=120)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(ports)) as pool:
        list(pool.map(send, ports))
    return time.perf_counter() - start


def raw_tcp(ports: list[int], view: memoryview) -> float:
    def send(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(len(view).to_bytes(8, "big"))
            conn.sendall(view)
            assert conn.recv(2) == b"ok"

    start = time.perf_counter()
    with ThreadPoolExecutor(len(ports)) as pool:
        list(pool.map(send, ports))
    return time.perf_counter() - start


def swap_sums(urls: list[str]) -> list[float]:
    """Each replica's total swap seconds so far, from its Prometheus histogram."""
    pattern = re.compile(r"^passk_rollout_weight_swap_seconds_sum (\S+)", re.M)
    return [float(pattern.search(httpx.get(f"{url}/metrics").text).group(1)) for url in urls]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/smollm2-135m"))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    hosts = parser.add_argument_group("emulated hosts (bench/weight_sync_hosts.py)")
    hosts.add_argument("--hosts", action="store_true", help="Star against relay, and deltas, between emulated hosts.")
    hosts.add_argument("--rate-mbit", type=float, default=200.0, help="Every link's rate, each way.")
    hosts.add_argument("--sizes", default="1,2,4,8", help="Replica counts R, comma-separated.")
    hosts.add_argument("--fanout", type=int, default=2, help="The relays' fan-out.")
    hosts.add_argument("--steps", type=int, default=3, help="AdamW steps whose versions are sent as deltas.")
    hosts.add_argument("--lr", type=float, default=1e-6)
    args = parser.parse_args()
    if not (args.model_dir / "model.safetensors").exists():
        parser.error(f"{args.model_dir} has no model.safetensors: passk model import-smollm2 --out {args.model_dir}")
    if args.replicas < 1 or args.repeat < 1:
        parser.error("--replicas and --repeat must be >= 1")

    console = Console(width=200)
    if args.hosts:
        try:
            args.sizes = sorted({int(x) for x in args.sizes.split(",")})
        except ValueError:
            parser.error(f"--sizes must be comma-separated counts, got {args.sizes!r}")
        if args.sizes[0] < 1 or args.fanout < 1 or args.steps < 1 or not 0 < args.rate_mbit <= 100_000:
            parser.error("--sizes, --fanout and --steps must be >= 1, --rate-mbit in (0, 100000]")
        import weight_sync_hosts  # beside this file

        weight_sync_hosts.main(args, console)
        return
    state = load_file(args.model_dir / "model.safetensors")
    whole = b"".join(Payload.of_tensors(state).pieces(0, 1 << 62))  # the same bytes, for the baselines
    logs = Path("runs/bench-weight-sync")
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "redis").mkdir(exist_ok=True)
    redis = RedisServer(logs / "redis", appendonly=False)
    replicas, receivers, sinks = [], [], []
    try:
        for i in range(args.replicas):
            port = free_port()
            cmd = [sys.executable, "-m", "services.cli", "serve", "rollout", "--model-dir", str(args.model_dir)]
            cmd += ["--port", str(port), "--redis-url", redis.url, "--replica", f"bench-{i}", "--threads", "1"]
            with (logs / f"replica-{i}.log").open("wb") as log:
                process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            replicas.append((process, f"http://127.0.0.1:{port}"))
        for process, url in replicas:
            wait_healthy(process, url, logs / "replica.log", 300)
        addresses = sorted((r.grpc, r.bulk) for r in registry.live_replicas(redis.client))
        for _ in range(args.replicas):
            receiver = subprocess.Popen(
                [sys.executable, "-c", RECEIVER, str(scratch_dir())], stdout=subprocess.PIPE, text=True
            )
            receivers.append((receiver, int(receiver.stdout.readline())))
            sink = subprocess.Popen(
                [sys.executable, "-c", GRPC_RECEIVER, str(scratch_dir())], stdout=subprocess.PIPE, text=True
            )
            sinks.append((sink, int(sink.stdout.readline())))

        rows = []
        urls = [url for _, url in replicas]
        swapped = swap_sums(urls)
        version = 0
        for _ in range(args.repeat):
            times = []
            for over_bulk in (True, False):  # the trainer's default, then the bytes over gRPC too
                version += 1
                start = time.perf_counter()
                payload = Payload.of_tensors(state)
                with ThreadPoolExecutor(len(addresses)) as pool:
                    replies = list(pool.map(lambda a, v=version, p=payload, b=over_bulk:
                                            push(a[0], v, p, bulk_address=a[1] if b else ""), addresses))  # fmt: skip
                times.append(time.perf_counter() - start)
                assert all(r.accepted for r in replies), [r.error for r in replies]
            raw = raw_tcp([port for _, port in receivers], memoryview(whole))
            bare = grpc_only([port for _, port in sinks], Payload.of_bytes(whole))
            now = swap_sums(urls)
            swap = max(b - a for a, b in zip(swapped, now, strict=True)) / 2
            rows.append((len(payload), times[0], times[1], raw, bare, swap))
            swapped = now
            del payload
    finally:
        for receiver, port in receivers:
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall((0).to_bytes(8, "big"))
            receiver.wait(10)
        for sink, _ in sinks:
            sink.kill()
            sink.wait(10)
        for process, _ in replicas:
            stop(process)
        redis.stop()

    table = Table(title=f"one version to {args.replicas} replicas over loopback ({args.repeat} versions)")
    columns = ("bytes", "publish s", "publish, bytes over gRPC s", "raw TCP s", "gRPC only s", "publish / raw",
               "publish over gRPC / raw", "gRPC only / raw", "swap s (stop-the-world)")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for size, published, over_grpc, raw, bare, swap in rows:
        times = (published, over_grpc, raw, bare, published / raw, over_grpc / raw, bare / raw, swap)
        table.add_row(f"{size:,}", *(f"{x:.2f}" for x in times))
    warm = rows[1:] or rows  # the first versions page in fresh mappings on the replicas
    console.print(table)
    console.print(f"median over rounds 2..: publish / raw TCP {statistics.median(r[1] / r[3] for r in warm):.2f}, "
                  f"publish with the bytes over gRPC / raw TCP {statistics.median(r[2] / r[3] for r in warm):.2f}, "
                  f"gRPC only / raw TCP {statistics.median(r[4] / r[3] for r in warm):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
