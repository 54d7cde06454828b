"""A rollout replica: the engine, the prompts-stream worker, the weight
receiver and the registry heartbeat."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common import redis_client, registry
from services.common.config import RolloutSettings, StreamNames
from services.common.hf_sampling import Generation
from services.common.schemas import PromptJob, RolloutGroup, Sample, SamplingParams
from services.common.streams import Delivery, StreamConsumer, publish
from services.rollout.engine import Engine

log = logging.getLogger(__name__)


def to_samples(generations: list[Generation]) -> list[Sample]:
    return [Sample(text=g.text, token_ids=g.token_ids, logprobs=g.logprobs) for g in generations]


class Rollout:
    def __init__(self, engine: Engine, settings: RolloutSettings, streams: StreamNames | None = None) -> None:
        self.engine, self.settings, self.streams = engine, settings, streams or StreamNames()
        self.name = settings.replica or f"{socket.gethostname()}-{os.getpid()}"
        self.stop = threading.Event()
        self.consumer: StreamConsumer | None = None  # the queue's, once made: close() hands back what it holds
        self.handed_back = threading.Event()  # set once it has: what is still in hand is not published
        self.http_address = ""
        self.grpc_address = ""
        self.bulk_address = ""
        self.metrics = CollectorRegistry()
        self.running = Gauge(
            "passk_rollout_requests_running", "Prompts in the engine now (queue jobs and HTTP)", registry=self.metrics
        )
        self.waiting = Gauge(
            "passk_rollout_requests_waiting", "Prompt jobs read from the stream, waiting for the engine",
            registry=self.metrics,
        )  # fmt: skip
        self.queue_lag = Gauge(
            "passk_rollout_queue_lag", "Prompt jobs in the stream not yet read by any replica", registry=self.metrics
        )
        self.queue_pending = Gauge(
            "passk_rollout_queue_pending", "Prompt jobs read by a replica and not yet finished", registry=self.metrics
        )
        self.tokens = Counter("passk_rollout_generated_tokens", "Tokens generated", registry=self.metrics)
        self.groups = Counter("passk_rollout_groups", "Rollout groups published", registry=self.metrics)
        self.sync_seconds = Histogram(
            "passk_rollout_weight_sync_seconds", "Weight push: receive, verify and swap", registry=self.metrics,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )  # fmt: skip
        self.swap_seconds = Histogram(
            "passk_rollout_weight_swap_seconds", "Weight swap, generation stopped", registry=self.metrics,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        )  # fmt: skip
        self.sync_errors = Counter("passk_rollout_weight_sync_errors", "Refused weight pushes", registry=self.metrics)
        self.pushes = Counter(
            "passk_rollout_weight_pushes", "Weight pushes whose bytes began to come, by their channel (bulk or grpc)",
            ["channel"], registry=self.metrics,
        )  # fmt: skip
        for channel in ("bulk", "grpc"):
            self.pushes.labels(channel)
        self.claimed = Counter(
            "passk_rollout_jobs_claimed", "Prompt jobs taken over from a replica presumed dead", registry=self.metrics
        )
        self.dead_lettered = Counter(
            "passk_rollout_jobs_dead_lettered", "Prompt jobs moved to the dead letters", registry=self.metrics
        )
        self.redis_errors = Counter(
            "passk_rollout_redis_errors", "Failed Redis attempts, retried or not (Redis restarting or unreachable)",
            registry=self.metrics,
        )  # fmt: skip
        self.loaded_version = Gauge(
            "passk_rollout_policy_version", "Policy version being served", registry=self.metrics
        )
        self.client = redis_client.connect(
            settings.redis_url, on_error=self.redis_errors.inc, name=f"passk-rollout:{self.name}"
        )
        self.last_weight_error = ""
        self.receiver_swapping = lambda: False

    # -- readiness ---------------------------------------------------------
    def behind(self) -> bool:
        """True while the trainer has published a newer version than the one served."""
        try:
            return registry.current_policy(self.client) > self.engine.policy
        except (redis.RedisError, ValueError):
            return True

    def ready(self) -> bool:
        return not self.stop.is_set() and not self.receiver_swapping() and not self.behind()

    # -- weights -----------------------------------------------------------
    def swapped(self, version: int, swap_s: float, sync_s: float) -> None:
        self.swap_seconds.observe(swap_s)
        self.sync_seconds.observe(sync_s)
        self.loaded_version.set(version)
        self.heartbeat()

    def refused(self, error: str) -> None:
        self.sync_errors.inc()
        self.last_weight_error = error

    # -- registry ----------------------------------------------------------
    def heartbeat(self) -> None:
        info = registry.ReplicaInfo(
            replica=self.name,
            http=self.http_address,
            grpc=self.grpc_address,
            bulk=self.bulk_address,
            version=self.engine.version,
            epoch=self.engine.epoch,
            dtype=self.engine.dtype,
            heartbeat=time.time(),
        )
        registry.register(self.client, info)

    def run_heartbeat(self) -> None:
        while not self.stop.wait(self.settings.heartbeat_s):
            try:
                self.heartbeat()
            except redis.RedisError as err:  # a timeout too: the thread must outlive any Redis outage
                log.warning("registry heartbeat failed: %s", err)

    # -- the queue ---------------------------------------------------------
    def run_queue(self) -> None:
        self.consumer = consumer = StreamConsumer(
            self.client,
            self.streams.prompts,
            "rollout",
            self.name,
            claim_idle_ms=self.settings.claim_idle_ms,
            max_deliveries=self.settings.max_deliveries,
            block_ms=self.settings.block_ms,
            on_claim=self.claimed.inc,
            on_dead_letter=self.dead_lettered.inc,
        )
        while not self.stop.is_set():
            try:
                if self.behind():  # a late or missed version: wait for the trainer's push before taking jobs
                    self.stop.wait(0.2)
                    continue
                deliveries = consumer.read(self.settings.max_jobs)
                lag, pending = consumer.backlog()
                self.queue_lag.set(lag)
                self.queue_pending.set(pending)
                jobs = [(d, job) for d in deliveries if (job := consumer.decode(d, PromptJob)) is not None]
                jobs = [(d, job) for d, job in jobs if self.fits(consumer, d, job)]
                if jobs:
                    self.await_policy([job for _, job in jobs])
                    self.generate_and_publish(consumer, jobs)
            except (redis.ConnectionError, redis.TimeoutError) as err:  # counted by the client's retry policy
                log.warning("redis unavailable: %s", err)
                self.stop.wait(1.0)
            except Exception:  # unacked jobs come back after claim_idle_ms, then go to the dead letters
                log.exception("generation failed; the jobs stay pending")
                self.stop.wait(1.0)

    def await_policy(self, jobs: list[PromptJob]) -> None:
        """Wait for the weights the jobs were scheduled for. A job read while the trainer's push to this
        replica is still on its way (or before a late joiner's first catch-up push) would else be
        generated by the previous policy, and the trainer would drop the group as stale and schedule
        it again. The wait ends after ``claim_idle_ms``: by then another replica may have taken the
        jobs, and the groups are generated with what is served (the trainer judges them)."""
        wanted = max(registry.Policy(job.policy_epoch, job.policy_version) for job in jobs)
        deadline = time.monotonic() + self.settings.claim_idle_ms / 1000
        while self.engine.policy < wanted and time.monotonic() < deadline and not self.stop.wait(0.02):
            pass

    def fits(self, consumer: StreamConsumer, delivery: Delivery, job: PromptJob) -> bool:
        """Dead-letter a job whose prompt and answer cannot fit the model's context."""
        limit = self.engine.context_length
        tokens = self.engine.count_tokens(job.prompt)
        if tokens + job.sampling.max_tokens <= limit:
            return True
        consumer.dead_letter(
            delivery, f"prompt of {tokens} tokens + max_tokens {job.sampling.max_tokens} exceeds the context of {limit}"
        )
        return False

    def generate_and_publish(self, consumer: StreamConsumer, jobs: list[tuple[Delivery, PromptJob]]) -> None:
        # one engine call per (n, sampling): jobs that share them are batched
        batches: dict[tuple[int, SamplingParams], list[tuple[Delivery, PromptJob]]] = defaultdict(list)
        for delivery, job in jobs:
            batches[(job.n, job.sampling)].append((delivery, job))
        self.waiting.set(len(jobs))
        for (n, sampling), batch in batches.items():
            self.waiting.dec(len(batch))
            while True:  # a swap between reading the policy and generating would mislabel the groups
                policy = self.engine.policy
                prompt_ids, generations = self.generate([job.prompt for _, job in batch], n, sampling)
                if self.engine.policy == policy:
                    break
            for (delivery, job), ids, gens in zip(batch, prompt_ids, generations, strict=True):
                samples = to_samples(gens)
                group = RolloutGroup(
                    job=job,
                    policy_version=policy.version,
                    policy_epoch=policy.epoch,
                    prompt_token_ids=ids,
                    samples=samples,
                    replica=self.name,
                )
                if self.handed_back.is_set():  # stopping, and another replica may have these jobs now
                    return
                publish(self.client, self.streams.rollouts, group)
                consumer.ack(delivery)  # only after the group is in the next stream
                self.groups.inc()

    def refusal(self, prompts: list[str], n: int, max_tokens: int) -> tuple[int, str] | None:
        """Why an HTTP request cannot be served, as (status, message), or None: a prompt that does
        not fit the context with its answer (400), or more new tokens than one request may ask (413)."""
        limit = self.engine.context_length
        for prompt in prompts:
            tokens = self.engine.count_tokens(prompt)
            if tokens + max_tokens > limit:
                return 400, f"prompt of {tokens} tokens + max_tokens {max_tokens} exceeds the context of {limit}"
        asked = len(prompts) * n * max_tokens
        if asked > self.settings.max_request_tokens:
            return 413, (
                f"{len(prompts)} prompts x n {n} x max_tokens {max_tokens} = {asked} new tokens, over this replica's"
                f" max_request_tokens {self.settings.max_request_tokens}"
            )
        return None

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingParams
    ) -> tuple[list[list[int]], list[list[Generation]]]:
        """The engine's generate, counted in the metrics (the queue and the HTTP APIs all come here)."""
        self.running.inc(len(prompts))
        try:
            prompt_ids, generations = self.engine.generate(prompts, n, sampling)
        finally:
            self.running.dec(len(prompts))
        self.tokens.inc(sum(len(g.token_ids) for gens in generations for g in gens))
        return prompt_ids, generations

    def close(self, queue: threading.Thread | None = None) -> None:
        """Stop taking jobs; let the ones in hand finish (``stop_grace_s``), hand back the rest, and
        leave the registry."""
        self.stop.set()
        if queue is not None:
            queue.join(self.settings.stop_grace_s)
        try:
            if self.consumer is not None:
                self.handed_back.set()
                self.consumer.hand_back()
            registry.unregister(self.client, self.name)
        except redis.RedisError as err:  # they come back after claim_idle_ms, as a dead consumer's do
            log.warning("could not hand back jobs or leave the registry: %s", err)
