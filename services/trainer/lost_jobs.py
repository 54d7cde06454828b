"""Finding the prompt jobs Redis lost.

Redis acknowledges a write before it reaches the disk (``appendfsync everysec``), so a crash can
take its last second of writes with it: a job the trainer published may then be in no stream at
all, and no service will ever work on it. While a job is alive it is always an entry of one of
the three streams (a replica publishes its rollouts before it acknowledges the job, the verifier
its scores before it acknowledges the rollouts, and entries are trimmed only by the trainer,
between steps), so a job found in none of them while the trainer waits for it is lost, and is
scheduled again.
"""

from __future__ import annotations

import redis

from services.common.config import StreamNames


def lost(client: redis.Redis, streams: StreamNames, job_ids: list[str]) -> list[str]:
    """The jobs of ``job_ids`` that no entry of the prompt, rollout or scored stream mentions.
    Streams are read in the direction work flows (prompts first), so a job that moves on while
    they are read is still found."""
    needles = {job_id: f'"job_id":"{job_id}"'.encode() for job_id in job_ids}
    missing = set(job_ids)
    for stream in (streams.prompts, streams.rollouts, streams.scored):
        if not missing:
            break
        for _, fields in client.xrange(stream):
            data = fields.get(b"data", b"")
            missing = {job_id for job_id in missing if needles[job_id] not in data}
            if not missing:
                break
    return [job_id for job_id in job_ids if job_id in missing]
