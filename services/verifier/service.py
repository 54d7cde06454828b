"""The verifier service: grades rollout groups from the queue and over HTTP."""

from __future__ import annotations

import logging
import os
import socket
import threading

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common import redis_client
from services.common.config import StreamNames, VerifierSettings
from services.common.schemas import RolloutGroup, ScoredGroup, Verdict, VerdictStatus
from services.common.streams import StreamConsumer, publish
from services.verifier.outcomes import outcome
from services.verifier.pool import RESTART_REASONS, GraderPool
from services.verifier.sandbox import Limits

log = logging.getLogger(__name__)


class Verifier:
    def __init__(self, settings: VerifierSettings, streams: StreamNames | None = None) -> None:
        self.settings = settings
        self.streams = streams or StreamNames()
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "passk_verifier_worker_restarts",
            "Grader processes that ended before their time, by reason (timeout, died, bad_reply)",
            ["reason"],
            registry=self.registry,
        )
        for reason in RESTART_REASONS:  # at 0 from the start, so that rate() and alerts see every reason
            self.restarts.labels(reason)
        limits = Limits(settings.address_space_mb, settings.cpu_s, settings.open_files, 0, settings.file_size_mb)
        self.pool = GraderPool(
            settings.workers,
            settings.timeout_s,
            settings.graders,
            limits,
            settings.start_timeout_s,
            on_restart=lambda reason: self.restarts.labels(reason).inc(),
            request_budget_s=settings.request_budget_s,
        )
        self.in_flight = Gauge(
            "passk_verifier_answers_in_flight", "Answers being graded right now", registry=self.registry
        )
        self.in_flight.set_function(self.pool.in_flight)
        self.verdicts = Counter(
            "passk_verifier_verdicts", "Verdicts by grader and status", ["grader", "status"], registry=self.registry
        )
        self.grading_seconds = Histogram(
            "passk_verifier_grading_seconds", "Wall time of one answer's grading", ["grader"], registry=self.registry
        )
        self.groups = Counter("passk_verifier_groups", "Rollout groups scored from the queue", registry=self.registry)
        self.queue_lag = Gauge(
            "passk_verifier_queue_lag",
            "Rollout groups in the stream not yet read by any verifier",
            registry=self.registry,
        )
        self.queue_pending = Gauge(
            "passk_verifier_queue_pending",
            "Rollout groups read by a verifier and not yet scored",
            registry=self.registry,
        )
        self.claimed = Counter(
            "passk_verifier_groups_claimed",
            "Rollout groups taken over from a verifier presumed dead",
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "passk_verifier_groups_dead_lettered", "Rollout groups moved to the dead letters", registry=self.registry
        )
        self.redis_errors = Counter(
            "passk_verifier_redis_errors",
            "Failed Redis attempts, retried or not (Redis restarting or unreachable)",
            registry=self.registry,
        )
        self.stop = threading.Event()
        self.queue_thread: threading.Thread | None = None
        self.consumer: StreamConsumer | None = None  # the queue's, once made: close() hands back what it holds
        self.handed_back = threading.Event()  # set once it has: what is still in hand is not published
        self.consumer_state = "not started"  # "ok" after a read that worked, else what went wrong

    def _too_long(self, task: str, response: str) -> Verdict | None:
        """An answer over the length limit is wrong without grading: the model failed to stop."""
        if len(response) <= self.settings.max_answer_chars:
            return None
        detail = f"answer has {len(response)} characters, over the limit of {self.settings.max_answer_chars}"
        return Verdict(reward=0.0, status=VerdictStatus.WRONG, detail=detail, grader=task, elapsed=0.0)

    def _count(self, verdicts: list[Verdict]) -> list[Verdict]:
        for v in verdicts:
            self.verdicts.labels(v.grader, v.status.value).inc()
            self.grading_seconds.labels(v.grader).observe(v.elapsed)
        return verdicts

    def _screen(self, task: str, responses: list[str]) -> tuple[list[Verdict | None], list[str]]:
        screened = [self._too_long(task, r) for r in responses]
        return screened, [r for r, v in zip(responses, screened, strict=True) if v is None]

    def _merge(self, screened: list[Verdict | None], graded: list[Verdict]) -> list[Verdict]:
        rest = iter(graded)
        return self._count([v if v is not None else next(rest) for v in screened])

    def grade(self, task: str, responses: list[str], reference: str) -> list[Verdict]:
        screened, todo = self._screen(task, responses)
        return self._merge(screened, self.pool.grade_many(task, todo, reference))

    async def grade_async(self, task: str, responses: list[str], reference: str) -> list[Verdict]:
        screened, todo = self._screen(task, responses)
        return self._merge(screened, await self.pool.grade_many_async(task, todo, reference))

    def score(self, group: RolloutGroup) -> ScoredGroup:
        task, texts = group.job.task, [s.text for s in group.samples]
        screened, todo = self._screen(task, texts)
        verdicts = self._merge(screened, self.pool.grade_many(task, todo, group.job.reference))
        # each answer's outcome beside its verdict, for the trainer's outcome counts (none for an
        # answer the screen turned away over the length limit: it was not read)
        verdicts = [
            v if held is not None else v.model_copy(update={"outcome": outcome(task, text)})
            for v, held, text in zip(verdicts, screened, texts, strict=True)
        ]
        return ScoredGroup(group=group, verdicts=verdicts)

    def start_queue(self) -> None:
        self.queue_thread = threading.Thread(target=self.run_queue, name="verifier-queue", daemon=True)
        self.queue_thread.start()

    def run_queue(self) -> None:
        """Consume rollout groups until ``stop`` is set; ack each only after its scores are published."""
        name = self.settings.consumer or f"{socket.gethostname()}-{os.getpid()}"
        client = redis_client.connect(
            self.settings.redis_url, on_error=self._redis_failed, name=f"passk-verifier:{name}"
        )

        def make_consumer() -> StreamConsumer:
            return StreamConsumer(
                client,
                self.streams.rollouts,
                "verifier",
                name,
                claim_idle_ms=self.settings.claim_idle_ms,
                max_deliveries=self.settings.max_deliveries,
                block_ms=self.settings.block_ms,
                on_claim=self.claimed.inc,
                on_dead_letter=self.dead_lettered.inc,
            )

        # made inside the loop: a Redis that refuses at first (still loading, protected mode, a wrong
        # password) is retried with its reason in /readyz, rather than ending this thread for good
        consumer: StreamConsumer | None = None
        while not self.stop.is_set():
            try:
                consumer = self.consumer = consumer or make_consumer()
                deliveries = consumer.read()
                self.consumer_state = "ok"
                lag, pending = consumer.backlog()
                self.queue_lag.set(lag)
                self.queue_pending.set(pending)
                for delivery in deliveries:
                    group = consumer.decode(delivery, RolloutGroup)
                    if group is None:
                        continue
                    scored = self.score(group)
                    if self.handed_back.is_set():  # stopping, and another verifier may have the group now
                        return
                    publish(client, self.streams.scored, scored)
                    consumer.ack(delivery)
                    self.groups.inc()
            except (redis.ConnectionError, redis.TimeoutError) as err:  # Redis restarting: wait, then go on
                self.consumer_state = f"redis unavailable: {err}"
                log.warning("redis unavailable: %s", err)
                self.stop.wait(1.0)
            except Exception as err:  # an unacked group comes back after claim_idle_ms, then goes to the dead letters
                self.consumer_state = f"failing: {type(err).__name__}: {err}"[:300]
                if consumer is None:
                    log.warning("redis refuses the verifier's consumer group: %s", err)
                else:
                    log.exception("scoring failed; the group stays pending")
                self.stop.wait(1.0)

    def _redis_failed(self) -> None:
        """Every failed attempt, also those the client retries: not ready from the first, not the last."""
        self.redis_errors.inc()
        self.consumer_state = "redis unavailable (retrying)"

    def consumer_ok(self) -> bool:
        if self.queue_thread is None:
            return True  # no queue: HTTP only
        return self.queue_thread.is_alive() and self.consumer_state == "ok"

    @property
    def ready(self) -> bool:
        """Graders can be started and, when it runs, the queue consumer reads."""
        return self.pool.healthy() and self.consumer_ok()

    def close(self) -> None:
        """Stop taking groups; let the one in hand finish (``stop_grace_s``), hand back the rest,
        and stop every grader process."""
        self.stop.set()
        if self.queue_thread is not None:
            self.queue_thread.join(self.settings.stop_grace_s)
        if self.consumer is not None:
            self.handed_back.set()
            try:
                self.consumer.hand_back()
            except redis.RedisError as err:  # they come back after claim_idle_ms, as a dead consumer's do
                log.warning("could not hand back groups: %s", err)
        self.pool.close()
