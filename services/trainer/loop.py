"""The trainer (one process): schedule prompt jobs, collect scored groups,
compute advantages, take a policy step, push the new version to every replica.

    prompts --> rollout x R --> verifier --> scored --> here --> weights (gRPC)
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import torch

from services.common import registry
from services.common.config import StreamNames
from services.common.payload import Payload
from services.common.schemas import PromptJob, SamplingParams, ScoredGroup
from services.common.streams import StreamConsumer, claim_once, publish
from services.common.weights import push
from services.tasks.maze import read_jsonl
from services.trainer.advantage import compute_advantages
from services.trainer.binomial import pass_at_k
from services.trainer.config import TrainerSettings
from services.trainer.evaluate import evaluate
from services.trainer.loss import policy_loss, response_logprobs

log = logging.getLogger(__name__)


def verdict_tensors(groups: list[ScoredGroup], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [G, n] and which of them are real answers: grader failures (timeout, grader_error,
    invalid_request) are masked out, never trained on as a reward of 0."""
    rewards = torch.zeros(len(groups), n, dtype=torch.float64)
    valid = torch.zeros(len(groups), n, dtype=torch.bool)
    for g, scored in enumerate(groups):
        for i, verdict in enumerate(scored.verdicts):
            rewards[g, i] = verdict.reward
            valid[g, i] = not verdict.failed
    return rewards, valid


def masked_advantages(
    estimator: str, rewards: torch.Tensor, valid: torch.Tensor, k: int, options: dict
) -> torch.Tensor:
    """Advantages of the valid answers, each group estimated on its valid answers alone; 0 for the
    masked ones and for groups left with fewer than max(2, k) valid answers."""
    usable = valid.sum(1) >= max(2, k)
    advantages = torch.zeros(rewards.shape)
    if usable.any():
        options = {key: (v[usable] if key == "entropy" else v) for key, v in options.items()}
        advantages[usable] = compute_advantages(estimator, rewards[usable], k=k, mask=valid[usable], **options).float()
    return advantages


class Trainer:
    def __init__(self, settings: TrainerSettings, streams: StreamNames | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.s, self.streams = settings, streams or StreamNames()
        torch.set_num_threads(settings.threads)
        torch.manual_seed(settings.seed)
        self.rng = random.Random(settings.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=torch.float32)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=0.0)
        warmup = max(settings.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.train_items = read_jsonl(Path(settings.train_data))
        self.test_items = read_jsonl(Path(settings.test_data))
        by_size: dict[int, list] = {}
        for item in self.test_items:
            by_size.setdefault(item.size, []).append(item)
        self.eval_items = [it for items in by_size.values() for it in items[: settings.eval_mazes]]
        self.client = redis.Redis.from_url(settings.redis_url)
        self.consumer = StreamConsumer(self.client, self.streams.scored, "trainer", "trainer", claim_idle_ms=600_000)
        self.version = 0
        self.published: int | None = None  # the last version pushed
        self.snapshot: tuple[int, Payload] | None = None  # a copy of it for late joiners, taken when one shows up
        self.catching_up: set[str] = set()
        self.catch_up_pool = ThreadPoolExecutor(2, thread_name_prefix="catch-up")
        self.last_catch_up = 0.0
        self.tls_ca = Path(settings.weights_tls_ca).read_bytes() if settings.weights_tls_ca else None
        registry.set_current_version(self.client, 0)
        self.run_dir = Path(settings.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.evaluations: list[dict] = []

    # -- the loop ------------------------------------------------------------
    def run(self, progress: Callable[[dict], None] | None = None) -> list[dict]:
        self.wait_for_replicas()
        self.record_eval()
        for step in range(1, self.s.steps + 1):
            metrics = self.step(step)
            if progress:
                progress(metrics)
            if self.s.eval_every and step % self.s.eval_every == 0 and step != self.s.steps:
                self.record_eval()
        if self.s.steps:
            self.record_eval()
        self.writer.close()
        self.catch_up_pool.shutdown(wait=False, cancel_futures=True)
        self.metrics_file.close()
        return self.evaluations

    def wait_for_replicas(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while len(registry.live_replicas(self.client)) < self.s.min_replicas:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {self.s.min_replicas} rollout replicas registered after {timeout_s} s")
            time.sleep(0.5)

    def step(self, step: int) -> dict:
        t0 = time.monotonic()
        jobs = self.schedule(step)
        groups = self.collect(jobs)
        t1 = time.monotonic()
        metrics = self.update(groups)
        t2 = time.monotonic()
        self.version += 1
        metrics["weight_sync_s"] = self.publish_weights()
        metrics.update(
            step=step, version=self.version, rollout_s=t1 - t0, train_s=t2 - t1, step_s=time.monotonic() - t0
        )
        self.log_metrics(metrics, step)
        return metrics

    # -- rollouts ------------------------------------------------------------
    def schedule(self, step: int) -> list[PromptJob]:
        sampling = SamplingParams(temperature=self.s.temperature, top_p=self.s.top_p, max_tokens=self.s.max_tokens)
        jobs = []
        for i, item in enumerate(self.rng.sample(self.train_items, self.s.prompts_per_step)):
            job = PromptJob(
                job_id=f"v{self.version}-s{step}-{i}",
                prompt_id=item.id,
                task="maze",
                policy_version=self.version,
                prompt=item.prompt(self.s.prompt_template),
                reference=item.maze,
                n=self.s.n_rollout,
                sampling=sampling.model_copy(update={"seed": self.rng.randrange(2**31)}),
            )
            publish(self.client, self.streams.prompts, job)
            jobs.append(job)
        return jobs

    def collect(self, jobs: list[PromptJob]) -> list[ScoredGroup]:
        """The scored group of every job; a replayed or stale group is acked and skipped."""
        waiting = {job.job_id: job for job in jobs}
        groups: list[ScoredGroup] = []
        deadline = time.monotonic() + self.s.group_timeout_s
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} scored groups missing after {self.s.group_timeout_s} s")
            self.catch_up()
            for delivery in self.consumer.read(32):
                scored = self.consumer.decode(delivery, ScoredGroup)
                if scored is None:
                    continue
                job_id = scored.group.job.job_id
                fresh = claim_once(self.client, f"{job_id}:{scored.group.policy_version}")
                if fresh and job_id in waiting and scored.group.policy_version == self.version:
                    groups.append(scored)
                    del waiting[job_id]
                else:
                    log.warning("skipped scored group %s (replayed, stale or foreign)", job_id)
                self.consumer.ack(delivery)
        return groups

    # -- the policy step -----------------------------------------------------
    def update(self, groups: list[ScoredGroup]) -> dict:
        n = self.s.n_rollout
        rewards, valid = verdict_tensors(groups, n)
        logprobs, entropy, response = response_logprobs(
            self.model,
            [scored.group.prompt_token_ids for scored in groups],
            [[sample.token_ids for sample in scored.group.samples] for scored in groups],
            self.tokenizer.pad_token_id,
        )
        old = torch.zeros_like(logprobs)
        for row, sample in enumerate(s for scored in groups for s in scored.group.samples):
            old[row, : len(sample.logprobs)] = torch.tensor(sample.logprobs)
        tokens = response.sum(1).clamp_min(1)
        response_entropy = ((entropy.detach() * response).sum(1) / tokens).view(len(groups), n)

        options = dict(self.s.estimator_options)
        if self.s.estimator == "passk_adaptive":
            options["entropy"] = response_entropy
        advantages = masked_advantages(self.s.estimator, rewards, valid, self.s.k, options)
        loss, stats = policy_loss(
            logprobs,
            old,
            advantages.view(-1),
            response & valid.view(-1, 1),
            clip_low=self.s.clip_low,
            clip_high=self.s.clip_high,
            aggregation=self.s.loss_aggregation,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at version {self.version}")
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()

        correct = (rewards > 0) & valid
        k = min(self.s.k, n)
        batch_pass_k = pass_at_k(valid.sum(1), correct.sum(1), k) if bool((valid.sum(1) >= k).all()) else None
        return {
            "loss": loss.item(),
            "reward_mean": float(rewards[valid].mean()) if valid.any() else 0.0,
            f"batch_pass@{k}": float(batch_pass_k.mean()) if batch_pass_k is not None else None,
            "adv_abs_mean": float(advantages[valid].abs().mean()) if valid.any() else 0.0,
            "eta_mean": float(advantages.abs().sum(1).mean()),
            "entropy": float(response_entropy.mean()),
            "response_tokens": float(tokens.float().mean()),
            "clip_fraction": stats.clip_fraction,
            "grad_norm": float(grad_norm),
            "failed_verdicts": int((~valid).sum()),
            "groups": len(groups),
        }

    # -- weights -------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # the same tensor as the embeddings
        return state

    def publish_weights(self) -> float:
        """Push the new version to every live replica, then announce it. The chunks are cut from the
        parameters themselves, which stay put until every push has answered."""
        start = time.monotonic()
        payload = Payload.of_tensors(self.weights())
        replicas = registry.live_replicas(self.client)
        version = self.version
        with ThreadPoolExecutor(max(1, len(replicas))) as pool:
            replies = list(pool.map(lambda r: self._push(r.grpc, version, payload), replicas))
        accepted = sum(replies)
        if replicas and not accepted:
            raise RuntimeError(f"no replica accepted policy version {version}")
        self.published, self.snapshot = version, None
        registry.set_current_version(self.client, version)
        return time.monotonic() - start

    def catch_up(self) -> None:
        """Push the current version to replicas that joined late or missed it (they take no jobs until
        they serve it), in the background, at most once a second. Called while collecting rollouts,
        when the parameters are still the published version: the pushes send a copy taken then, since
        they may outlast the collection."""
        if self.published is None or time.monotonic() - self.last_catch_up < 1.0:
            return
        self.last_catch_up = time.monotonic()
        version = self.published
        for replica in registry.live_replicas(self.client):
            if replica.version < version and replica.grpc not in self.catching_up:
                log.info("replica %s serves version %d: pushing %d", replica.replica, replica.version, version)
                if self.snapshot is None or self.snapshot[0] != version:
                    self.snapshot = (version, Payload.snapshot(self.weights()))
                self.catching_up.add(replica.grpc)
                self.catch_up_pool.submit(self._catch_up_one, replica.grpc, version, self.snapshot[1])

    def _catch_up_one(self, address: str, version: int, payload: Payload) -> None:
        try:
            self._push(address, version, payload)
        finally:
            self.catching_up.discard(address)

    def _push(self, address: str, version: int, payload: Payload) -> bool:
        try:
            reply = push(address, version, payload, token=self.s.weights_token or None, tls_ca=self.tls_ca)
        except Exception as err:  # a replica that died mid-push: it drops out of the registry
            log.warning("weight push to %s failed: %s", address, err)
            return False
        if not reply.accepted:
            log.warning("replica %s refused version %d: %s", address, version, reply.error)
        return bool(reply.accepted)

    # -- evaluation and logs ---------------------------------------------------
    def record_eval(self) -> dict:
        start = time.monotonic()
        table = evaluate(
            self.model,
            self.tokenizer,
            self.eval_items,
            n=self.s.eval_n,
            ks=self.s.eval_k,
            max_tokens=self.s.max_tokens,
            template=self.s.prompt_template,
            verifier_url=self.s.verifier_url,
            seed=self.s.eval_seed,
        )
        entry = {"version": self.version, "table": {str(size): row for size, row in table.items()}}
        entry["eval_s"] = time.monotonic() - start
        self.evaluations.append(entry)
        with (self.run_dir / "eval.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        for size, row in table.items():
            for name, value in row.items():
                if name.startswith("pass@"):
                    self.writer.add_scalar(f"eval/{size}x{size}/{name}", value, self.version)
        return entry

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        for name, value in metrics.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(f"train/{name}", value, step)
