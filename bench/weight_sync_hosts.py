"""Weight sync between emulated hosts (``bench/weight_sync.py --hosts``): the trainer and each
replica on a network namespace of its own, every link limited to ``--rate-mbit`` each way with
tc's tbf (tests/helpers/hosts.py), so the links, not this machine's cores, set the pace.

For R = 1, 2, 4, 8 replicas (real ones: ``passk serve rollout``, transformers backend, serving in
bfloat16) it times one published version until every replica serves it, pushed by the trainer to
each (star) and through relays (``weights_fanout``). Then, for delta pushes, it takes real
optimizer steps (AdamW, ``--lr``) on the model and reports the bytes of each version's delta as a
fraction of the full payload, in bfloat16 and in float32, and the time a delta push took against
a full one to one replica.

    passk model import-smollm2 --out models/smollm2-135m     # once
    .venv/bin/python bench/weight_sync.py --hosts --rate-mbit 200
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from services.common import delta, registry
from services.common.payload import Payload, in_dtype

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: its tests/helpers
from tests.helpers import hosts as emulated

TOKEN = "bench-weights"


def start_replicas(lab: emulated.Hosts, count: int, model: Path, redis_url: str, logs: Path, rate: float) -> None:
    for i in range(count):
        host = lab.add(f"r{i}", rate)
        host.python(["-m", "services.cli", "serve", "rollout", "--model-dir", str(model), "--redis-url", redis_url,
                     "--replica", f"r{i}", "--host", host.address, "--port", "8200", "--grpc-port", "50051",
                     "--weights-token", TOKEN, "--threads", "1"], logs / f"r{i}.log",
                    env={"PASSK_ROLLOUT_HF_DTYPE": "bfloat16"})  # fmt: skip


def publish(trainer: emulated.Host, redis_url: str, model: Path, logs: Path, *, version: int, epoch: int,
            fanout: int, extra: list[str]) -> list[dict]:  # fmt: skip
    """Versions from the trainer's host (tests/helpers/publish_once.py); the driver's JSON lines."""
    log = logs / f"publish-v{version}.log"
    log.unlink(missing_ok=True)  # a run before this one wrote its results to the same file
    driver = trainer.python(["-m", "tests.helpers.publish_once", "--redis-url", redis_url, "--model", str(model),
                             "--version", str(version), "--epoch", str(epoch), "--fanout", str(fanout),
                             "--token", TOKEN, "--timeout", "900", *extra], log)  # fmt: skip
    if driver.wait(timeout=1800) != 0:
        raise RuntimeError(f"publish failed: {log.read_text()[-2000:]}")
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def run_lab(args, model: Path, logs: Path, state_files: list[Path]) -> tuple[list[tuple], list[dict]]:
    """(a row per R: star and relay times, bytes, depth, payload size; the delta publishes of the
    optimizer's versions to one replica, the first full)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="passk-bench-") as tmp, emulated.Hosts() as lab:
        store = emulated.UnixRedis(Path(tmp))
        try:
            trainer = lab.add("trainer", args.rate_mbit)
            start_replicas(lab, max(args.sizes), model, store.url, logs, args.rate_mbit)
            client = redis.Redis.from_url(store.url)
            deadline = time.monotonic() + 900
            while len(registry.live_replicas(client)) < max(args.sizes):
                if time.monotonic() > deadline:
                    raise RuntimeError("replicas did not start; see the logs in " + str(logs))
                time.sleep(1)
            version = 0
            for count in args.sizes:
                row = [count]
                for fanout in (0, args.fanout):
                    times = []
                    for _ in range(args.repeat):
                        version += 1
                        (out,) = publish(trainer, store.url, model, logs, version=version, epoch=1, fanout=fanout,
                                         extra=["--pick", str(count), "--scale", str(1 + version / 1000)])  # fmt: skip
                        times.append(out["seconds"])
                    row += [statistics.median(times), out["bytes_sent"], out["depth"], out["payload_bytes"]]
                rows.append(tuple(row))
            files = [arg for path in state_files for arg in ("--state-file", str(path))]
            deltas = publish(trainer, store.url, model, logs, version=version + 1, epoch=1, fanout=0,
                             extra=["--pick", "1", "--delta", *files])  # fmt: skip
        finally:
            store.close()
    return rows, deltas


def optimizer_versions(model: Path, steps: int, lr: float) -> list[dict[str, torch.Tensor]]:
    """The model's weights after 0, 1, ..., ``steps`` AdamW steps at ``lr`` on its own language
    modelling loss over a few fixed sentences: the versions a run with that learning rate publishes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    text = ["Find the path from S to E in the maze.", "The answer is 42.", "Solve: 3 + 4 * 2 =", "Pass@k training."]
    batch = tokenizer(text, return_tensors="pt", padding=True)
    versions = [{n: t.detach().clone() for n, t in net.state_dict().items()}]
    for _ in range(steps):
        loss = net(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        versions.append({n: t.detach().clone() for n, t in net.state_dict().items()})
    return versions


def delta_fractions(versions: list[dict[str, torch.Tensor]], dtype: str, chunk_bytes: int = 4 << 20) -> list[float]:
    """Each version's delta against the one before, as a fraction of its full payload, in ``dtype``."""
    out = []
    for before, after in itertools.pairwise(versions):
        base = Payload.of_tensors(in_dtype(before, dtype))
        new = Payload.of_tensors(in_dtype(after, dtype))
        frames = delta.frames(1, 1, new, b"".join(base.pieces(0, len(base))), base.digest(), chunk_bytes)
        out.append(sum(map(len, frames)) / len(new))
    return out


def main(args, console: Console) -> None:
    if reason := emulated.unavailable():
        sys.exit(f"emulated hosts are not available here: {reason}")
    model = args.model_dir
    logs = Path("runs/bench-weight-sync-hosts")
    logs.mkdir(parents=True, exist_ok=True)
    versions = optimizer_versions(model, args.steps, args.lr)  # before the replicas take the cores
    fractions = {dtype: delta_fractions(versions, dtype) for dtype in ("bfloat16", "float32")}
    with tempfile.TemporaryDirectory(prefix="passk-bench-versions-") as tmp:
        files = []
        for i, version in enumerate(versions):
            files.append(Path(tmp) / f"v{i}.safetensors")
            save_file({n: t.contiguous() for n, t in version.items()}, files[-1])
        del versions
        rows, deltas = run_lab(args, model, logs, files)
    table = Table(title=f"one version of {model.name} in bfloat16 to R replicas, links of {args.rate_mbit} Mbit/s "
                        f"each way (median of {args.repeat})")  # fmt: skip
    for column in ("R", "star s", "star bytes sent", f"relay (fan-out {args.fanout}) s", "relay bytes sent",
                   "relay depth", "star / (R = 1)", "relay / (R = 1)"):  # fmt: skip
        table.add_column(column, justify="right")
    one_star, one_relay = rows[0][1], rows[0][5]
    for count, star, star_bytes, _, _, relay, relay_bytes, relay_depth, _ in rows:
        table.add_row(str(count), f"{star:.1f}", f"{star_bytes:,}", f"{relay:.1f}", f"{relay_bytes:,}",
                      str(relay_depth), f"{star / one_star:.2f}", f"{relay / one_relay:.2f}")  # fmt: skip
    console.print(table)
    payload = rows[0][4]
    hop = rows[0][1]
    console.print(f"payload {payload:,} bytes; one hop {hop:.1f} s = {payload * 8 / hop / 1e6:.0f} Mbit/s effective "
                  f"on a {args.rate_mbit} Mbit/s link")  # fmt: skip

    for dtype, values in fractions.items():
        console.print(f"delta / full payload, {dtype}, after each of {args.steps} AdamW steps at lr {args.lr}: "
                      + ", ".join(f"{f:.4f}" for f in values))  # fmt: skip
    full, rest = deltas[0], deltas[1:]
    saved = 1 - statistics.median(d["seconds"] for d in rest) / full["seconds"]
    console.print(f"to one replica in bfloat16: full version {full['seconds']:.2f} s ({full['bytes_sent']:,} bytes); "
                  "deltas " + ", ".join(f"{d['seconds']:.2f} s ({d['bytes_sent']:,} bytes)" for d in rest)
                  + f"; time saved {saved:.0%}")  # fmt: skip
