"""A rollout replica as a real process: generation, weight pushes over gRPC, the queue.

Tests that count versions, epochs and errors from a replica's start get a replica of their own
(``fresh_replica``, in Redis database 1); the others share one and assert only relative to what
they find, so any order of the tests gives the same results."""

import logging
import sys
from contextlib import contextmanager

import httpx
import pytest
import redis
import torch
import xxhash
from safetensors.torch import load_file

from services.common import registry
from services.common.config import StreamNames
from services.common.schemas import PromptJob, RolloutGroup
from services.common.weights import chunks, encode, pb, pb_grpc, push, push_call, status
from tests.helpers.procs import service, wait_for
from tests.helpers.tls import self_signed

STREAMS = StreamNames()
MAZE = "*******\n*S....*\n*****.*\n*E....*\n*******\n*******\n*******"
API_TOKEN = "api-s3cret"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@contextmanager
def started_replica(redis_url: str, model_dir, log, claim_idle_ms: int = 500):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    args = ["serve", "rollout", "--model-dir", str(model_dir), "--redis-url", redis_url, "--replica", "r-test"]
    args += ["--weights-token", "s3cret", "--claim-idle-ms", str(claim_idle_ms)]
    with service(args, log, env={"PASSK_ROLLOUT_API_TOKEN": API_TOKEN}) as (process, url):
        info = wait_for(lambda: {r.replica: r for r in registry.live_replicas(client)}.get("r-test"))
        yield process, url, info.grpc


@pytest.fixture(scope="module")
def replica(redis_server, tiny_model, tmp_path_factory):
    with started_replica(redis_server.url, tiny_model, tmp_path_factory.mktemp("rollout") / "rollout.log") as started:
        yield started


@pytest.fixture
def fresh_replica(redis_server, tiny_model, tmp_path):
    """A replica that has served nothing yet, on a Redis database no other replica uses."""
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    with started_replica(url, tiny_model, tmp_path / "rollout.log") as started:
        yield (*started, redis.Redis.from_url(url))


@pytest.fixture
def patient_replica(redis_server, tiny_model, tmp_path):
    """A fresh replica that leaves its jobs pending for 10 minutes before anyone may claim them."""
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    with started_replica(url, tiny_model, tmp_path / "rollout.log", claim_idle_ms=600_000) as started:
        yield (*started, redis.Redis.from_url(url))


def weights_of(model_dir, scale: float) -> dict[str, torch.Tensor]:
    state = load_file(model_dir / "model.safetensors")
    return {name: t * scale for name, t in state.items()}


def test_generate_over_http(replica):
    _, url, _ = replica
    body = {"prompt": MAZE + "\n", "n": 3, "sampling": {"max_tokens": 5, "seed": 1}}
    reply = httpx.post(f"{url}/v1/generate", json=body, timeout=60, headers=AUTH)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert len(data["samples"]) == 3 and data["policy_version"] == 0
    assert all(len(s["token_ids"]) == len(s["logprobs"]) <= 5 for s in data["samples"])
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "", "n": 3}, headers=AUTH).status_code == 422
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "x", "n": 0}, headers=AUTH).status_code == 422


def test_the_api_needs_the_token_and_limits_bodies(replica):
    import openai

    _, url, _ = replica
    body = {"prompt": MAZE + "\n", "n": 1}
    assert httpx.post(f"{url}/v1/generate", json=body).status_code == 401
    wrong = httpx.post(f"{url}/v1/generate", json=body, headers={"Authorization": "Bearer api-s3creT"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    # probes and Prometheus carry no token
    assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200
    huge = httpx.post(f"{url}/v1/generate", content=b"x" * (16 * 1024 * 1024 + 1), headers=AUTH)
    assert huge.status_code == 413


def test_weight_push_needs_the_token(replica, tiny_model):
    _, _, address = replica
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        push(address, 1, encode(weights_of(tiny_model, 1.0)), token="wrong")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def errors_counted(url: str) -> float:
    line = next(
        x
        for x in httpx.get(f"{url}/metrics").text.splitlines()
        if x.startswith("passk_rollout_weight_sync_errors_total")
    )
    return float(line.split()[-1])


def test_corrupted_and_truncated_pushes_keep_the_old_version(replica, tiny_model):
    import grpc

    _, url, address = replica
    served = status(address, token="s3cret")
    errors_before = errors_counted(url)
    payload = encode(weights_of(tiny_model, 1.0))
    metadata = [("authorization", "Bearer s3cret")]
    digest = xxhash.xxh3_128_hexdigest(payload)  # the library's, not the project's checksum()
    version = served.version + 7
    corrupted = bytearray(payload)
    corrupted[len(corrupted) // 2] ^= 0xFF
    streams = {
        "checksum mismatch": [
            pb.WeightChunk(version=version, total_bytes=len(payload), checksum=digest, data=bytes(corrupted))
        ],
        "truncated stream": [
            pb.WeightChunk(version=version, total_bytes=len(payload), checksum=digest, data=payload[:1000])
        ],
        "longer than": [pb.WeightChunk(version=version, total_bytes=10, checksum=digest, data=payload[:1000])],
        "must carry the payload's XXH3-128": [pb.WeightChunk(version=version, total_bytes=len(payload), data=payload)],
        "chunks after the one carrying the checksum": [
            pb.WeightChunk(version=version, total_bytes=len(payload), checksum=digest, data=payload[:1000]),
            pb.WeightChunk(data=payload[1000:]),
        ],
    }
    with_nan = weights_of(tiny_model, 1.0)
    name = sorted(with_nan)[-1]
    with_nan[name].view(-1)[-1] = float("nan")
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.WeightsStub(channel)
        for message, stream in streams.items():
            reply = stub.Push(iter(stream), timeout=30, metadata=metadata)
            assert not reply.accepted and message in reply.error, reply.error
            assert (reply.epoch, reply.version) == (served.epoch, served.version)
        # a NaN is found as the bytes stream in (chunks cut at element boundaries) and, when odd chunk
        # sizes split elements, in the received file
        for chunk_bytes in (4096, 4099):
            reply = push_call(channel)(chunks(version, encode(with_nan), chunk_bytes), timeout=30, metadata=metadata)
            assert not reply.accepted and reply.error == f"{name}: NaN or inf values", reply.error
    assert status(address, token="s3cret").version == served.version
    assert "NaN" in httpx.get(f"{url}/readyz").json()["last_weight_error"]
    assert errors_counted(url) == errors_before + 7


def test_a_pushed_version_is_served_and_tags_the_groups(fresh_replica, tiny_model):
    process, url, address, client = fresh_replica
    reply = push(address, 1, encode(weights_of(tiny_model, 1.0)), token="s3cret")
    assert reply.accepted and reply.version == 1
    assert push(address, 1, encode(weights_of(tiny_model, 1.0)), token="s3cret").error.startswith(
        "version 1 (epoch 0) is not newer"
    )
    registry.set_current_version(client, 1)
    assert wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200)
    job = PromptJob(job_id="j1", prompt_id="m1", task="maze", policy_version=1, prompt=MAZE + "\n", reference=MAZE, n=4)
    client.xadd(STREAMS.prompts, {"data": job.model_dump_json()})
    client.xadd(STREAMS.prompts, {"data": b'{"job_id": 5}'})
    entries = wait_for(lambda: client.xrange(STREAMS.rollouts))
    group = RolloutGroup.model_validate_json(entries[0][1][b"data"])
    assert group.policy_version == 1 and group.replica == "r-test" and len(group.samples) == 4
    assert wait_for(lambda: client.xlen(f"{STREAMS.prompts}:dead") == 1)
    long_job = job.model_copy(update={"job_id": "j-long", "prompt": "*" * 600})
    client.xadd(STREAMS.prompts, {"data": long_job.model_dump_json()})
    assert wait_for(lambda: client.xlen(f"{STREAMS.prompts}:dead") == 2)
    reasons = [fields[b"reason"].decode() for _, fields in client.xrange(f"{STREAMS.prompts}:dead")]
    assert "prompt of 601 tokens + max_tokens 64 exceeds the context of 512" in reasons[1]
    assert process.poll() is None
    # a version the replica does not have yet makes it unready and stops it taking jobs
    registry.set_current_version(client, 2)
    assert wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 503)
    assert "passk_rollout_policy_version 1.0" in httpx.get(f"{url}/metrics").text
    # a resumed trainer (a new epoch) brings the replica back to an older version; the old epoch cannot
    reply = push(address, 0, encode(weights_of(tiny_model, 1.0)), epoch=1, token="s3cret")
    assert reply.accepted and (reply.epoch, reply.version) == (1, 0)
    late = push(address, 3, encode(weights_of(tiny_model, 1.0)), epoch=0, token="s3cret")
    assert not late.accepted and "version 3 (epoch 0) is not newer than the served 0 (epoch 1)" in late.error
    registry.set_current_policy(client, registry.Policy(1, 0))
    assert wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200)
    client.xadd(
        STREAMS.prompts, {"data": job.model_copy(update={"job_id": "j2", "policy_version": 0}).model_dump_json()}
    )
    entries = wait_for(lambda: client.xrange(STREAMS.rollouts)[1:])
    group = RolloutGroup.model_validate_json(entries[0][1][b"data"])
    assert (group.job.job_id, group.policy_epoch, group.policy_version) == ("j2", 1, 0)


def test_a_job_read_before_its_version_arrives_waits_for_it(patient_replica, tiny_model):
    """The trainer announces a version and schedules its jobs while its push to a replica is still
    under way: the replica, which read the job, generates it with the version it was scheduled for."""
    _process, url, address, client = patient_replica
    assert push(address, 1, encode(weights_of(tiny_model, 1.0)), token="s3cret").accepted
    registry.set_current_version(client, 1)
    assert wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200)
    job = PromptJob(job_id="j2", prompt_id="m1", task="maze", policy_version=2, prompt=MAZE + "\n", reference=MAZE, n=2)
    client.xadd(STREAMS.prompts, {"data": job.model_dump_json()})
    assert wait_for(lambda: client.xpending(STREAMS.prompts, "rollout")["pending"] == 1, 60, 0.01)
    assert client.xlen(STREAMS.rollouts) == 0  # held, not generated by version 1
    assert push(address, 2, encode(weights_of(tiny_model, 0.5)), token="s3cret").accepted
    registry.set_current_version(client, 2)
    entries = wait_for(lambda: client.xrange(STREAMS.rollouts))
    group = RolloutGroup.model_validate_json(entries[0][1][b"data"])
    assert (group.job.job_id, group.policy_version) == ("j2", 2)
    assert client.xpending(STREAMS.prompts, "rollout")["pending"] == 0


def test_the_openai_compatible_api(replica):
    """The official openai client talks to the replica's /v1 subset."""
    import openai

    _, url, _ = replica
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_TOKEN, max_retries=0)
    [model] = client.models.list().data
    completion = client.completions.create(
        model=model.id, prompt=[MAZE + "\n"], max_tokens=6, temperature=0, n=2, logprobs=0
    )
    assert len(completion.choices) == 2 and completion.choices[0].text == completion.choices[1].text
    first = completion.choices[0]
    assert len(first.logprobs.token_logprobs) == len(first.logprobs.tokens) <= 6
    assert completion.usage.completion_tokens == 2 * len(first.logprobs.tokens)
    assert first.finish_reason in ("stop", "length")
    # a stop string ends the text before it, as in vLLM
    text = first.text
    if len(text) >= 2:
        stopped = client.completions.create(
            model=model.id, prompt=MAZE + "\n", max_tokens=6, temperature=0, stop=text[1]
        )
        assert stopped.choices[0].text == text[: text.index(text[1])] and stopped.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="exceeds the context"):
        client.completions.create(model=model.id, prompt="*" * 600, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=model.id, prompt="x", max_tokens=2, stream=True)
    metrics = httpx.get(f"{url}/metrics").text
    assert "passk_rollout_requests_running 0.0" in metrics and "passk_rollout_generated_tokens_total" in metrics


def test_a_stream_cut_half_way_keeps_the_old_version_and_leaves_no_file(replica, tiny_model):
    import grpc

    from services.common.payload import scratch_dir
    from services.common.weights import channel

    _, url, address = replica
    served = status(address, token="s3cret").version
    before = set(scratch_dir().glob("passk-*/passk-v*"))
    payload = encode(weights_of(tiny_model, 0.5))
    stream = list(chunks(served + 1, payload, chunk_bytes=len(payload) // 4))

    def cut():  # the trainer dies after half of the chunks
        yield from stream[: len(stream) // 2]
        raise ConnectionAbortedError("trainer gone")

    with channel(address) as to_replica, pytest.raises(grpc.RpcError):
        push_call(to_replica)(cut(), timeout=30, metadata=[("authorization", "Bearer s3cret")])
    reply = wait_for(lambda: (s := status(address, token="s3cret")) and s)
    assert reply.version == served
    assert httpx.get(f"{url}/healthz").json()["version"] == served
    assert wait_for(lambda: set(scratch_dir().glob("passk-*/passk-v*")) == before)  # the partial file is gone


def test_the_weight_service_over_tls(redis_server, tiny_model, tmp_path, caplog):
    """With a certificate the weight service speaks TLS only; the trainer's side trusts the CA."""
    import subprocess

    import grpc

    cert, key = self_signed(tmp_path)
    args = ["serve", "rollout", "--model-dir", str(tiny_model), "--redis-url", redis_server.url, "--replica", "r-tls"]
    args += ["--weights-tls-cert", str(cert), "--weights-tls-key", str(key)]
    with service(args, tmp_path / "rollout.log"):
        replicas = lambda: {r.replica: r.grpc for r in registry.live_replicas(redis_server.client)}  # noqa: E731
        address = wait_for(lambda: replicas().get("r-tls"))
        ca = cert.read_bytes()
        reply = push(address, 1, encode(weights_of(tiny_model, 1.0)), tls_ca=ca)
        assert reply.accepted and status(address, tls_ca=ca).version == 1
        # the bulk channel speaks TLS too, with the same certificate (a plain-text one is tested in test_bulk)
        channel_ = next(r.bulk for r in registry.live_replicas(redis_server.client) if r.replica == "r-tls")
        with caplog.at_level(logging.WARNING, logger="services.common.weights"):
            reply = push(address, 2, encode(weights_of(tiny_model, 0.5)), tls_ca=ca, bulk_address=channel_)
        assert reply.accepted and status(address, tls_ca=ca).version == 2
        assert not caplog.records, "the push fell back to gRPC"
        with pytest.raises(grpc.RpcError) as err:  # plaintext is not served
            status(address)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    bad = ["serve", "rollout", "--model-dir", str(tiny_model), "--weights-tls-cert", str(cert)]
    cmd = [sys.executable, "-m", "services.cli", *bad]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "weights_tls_cert and weights_tls_key go together" in result.stderr
