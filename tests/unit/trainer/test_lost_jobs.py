"""A job is lost when no stream mentions it: wherever it is on its way (waiting, generated,
scored, even acknowledged but not yet trimmed) it is found, and an id that is a prefix of
another's is not mistaken for it."""

from services.common.config import StreamNames
from services.common.schemas import PromptJob
from services.common.streams import publish
from services.trainer.lost_jobs import lost

STREAMS = StreamNames()


def job(job_id: str) -> PromptJob:
    return PromptJob(job_id=job_id, prompt_id="p", task="maze", policy_version=1, prompt="S..E", reference="*",
                     n=2)  # fmt: skip


def test_only_jobs_in_no_stream_are_lost(redis_client):
    client = redis_client
    publish(client, STREAMS.prompts, job("run-s3-0"))  # waiting for a replica
    # generated: the rollout group carries its job (as the scored group does)
    client.xadd(STREAMS.rollouts, {"data": '{"job":{"job_id":"run-s3-1","n":2},"samples":[]}'})
    client.xadd(STREAMS.scored, {"data": '{"group":{"job":{"job_id":"run-s3-2"}},"verdicts":[]}'})
    publish(client, STREAMS.prompts, job("run-s3-10"))  # a longer id with run-s3-1 as its prefix
    waiting = ["run-s3-0", "run-s3-1", "run-s3-2", "run-s3-3", "run-s3-10", "run-s3-1-l0"]
    assert lost(client, STREAMS, waiting) == ["run-s3-3", "run-s3-1-l0"]
    assert lost(client, STREAMS, []) == []
    client.delete(STREAMS.prompts, STREAMS.rollouts, STREAMS.scored)
    assert lost(client, STREAMS, ["run-s3-0"]) == ["run-s3-0"]  # Redis came back without them
