"""The trainer: schedule prompt jobs, collect scored groups, compute
advantages, take a policy step, push the new version to every replica.

    prompts --> rollout x R --> verifier --> scored --> here --> weights (gRPC)

Under torchrun it runs as several ranks: rank 0 does all of the above but the
step itself, sends each step's batch to the other ranks, and every rank trains
on its share (``step.train_on``). Checkpoints and ``resume`` restore the whole
run; a resumed trainer starts a new epoch, so the replicas take its (older)
restored version.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import redis
import torch

from services.common import redis_client, registry
from services.common.config import StreamNames
from services.common.registry import Policy
from services.common.schemas import PromptJob, SamplingParams, ScoredGroup
from services.common.streams import StreamConsumer, claim_once, publish, trim_consumed
from services.tasks.maze import read_jsonl
from services.trainer import checkpoint, distributed, evaluate, held_out, lost_jobs, task_figures
from services.trainer.batch import from_groups
from services.trainer.config import TrainerSettings, stage_at
from services.trainer.held_out import HeldOut
from services.trainer.mixture import Mixture, Prompt
from services.trainer.outcome_bonus import RunBonus
from services.trainer.prometheus import TrainerMetrics
from services.trainer.publisher import Publisher
from services.trainer.step import Optimization, train_on
from services.trainer.stop import Stopped, StopRequest

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        settings: TrainerSettings,
        streams: StreamNames | None = None,
        *,
        resume: bool = False,
        mixture: Mixture | None = None,
    ) -> None:
        """``mixture``: the settings' mixture already read (by the CLI's check); else it is read here."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.s, self.streams = settings, streams or StreamNames()
        self.ranks = distributed.init(settings.device)
        self.stop = StopRequest()  # SIGTERM, once the CLI installs it (every rank: rank 0 decides)
        torch.set_num_threads(settings.threads)
        torch.manual_seed(settings.seed)
        self.rng = random.Random(settings.seed)  # the prompt sampler
        self.run_dir = Path(settings.run_dir)
        restored = checkpoint.latest(self.run_dir) if resume else None
        if resume and restored is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint.directory(self.run_dir)}")
        model_dir = str(restored or settings.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.ranks.device)
        self.model.train()
        reference = None
        if settings.kl_coef:  # the starting policy, frozen
            reference = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=torch.float32)
            reference = reference.to(self.ranks.device).eval().requires_grad_(False)
        if settings.fsdp:
            if self.ranks.world < 2:
                raise ValueError("fsdp shards the model across ranks: start the trainer with torchrun, 2 or more")
            distributed.shard_model(self.model)
            if reference is not None:
                distributed.shard_model(reference)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=0.0)
        warmup = max(settings.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.opt = Optimization(self.model, optimizer, scheduler, reference, self.tokenizer.pad_token_id)
        self.version, self.first_step = 0, 1
        if restored is not None:
            state = checkpoint.load(restored)
            distributed.load_optimizer_state(self.model, optimizer, state.optimizer, settings.fsdp)
            scheduler.load_state_dict(state.scheduler)
            self.rng.setstate(state.sampler)
            checkpoint.restore_rng(state)
            self.version, self.first_step = state.version, state.step + 1
            log.info("resumed from %s: step %d, policy version %d", restored, state.step, state.version)
        self.resumed = restored is not None
        if self.ranks.main:
            self._init_main(mixture)

    def _init_main(self, mixture: Mixture | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        settings = self.s
        if mixture is None and settings.mixture:
            mixture = Mixture(settings.mixture, settings.prompts_per_step)
        self.mixture = mixture
        held_out_items = held_out.held_out_items(settings, mixture)  # refused now, before Redis is touched
        self.train_items = read_jsonl(Path(settings.train_data)) if self.mixture is None else []
        self.prometheus = TrainerMetrics()
        self.client = redis_client.connect(
            settings.redis_url, on_error=self.prometheus.redis_errors.inc, name="passk-trainer"
        )
        self.consumer = StreamConsumer(self.client, self.streams.scored, "trainer", "trainer", claim_idle_ms=600_000)
        self.epoch = registry.new_epoch(self.client)
        self.bonus = None  # outcome-based exploration (outcome_bonus.py)
        if settings.outcome_bonus != "off":
            self.bonus = RunBonus(settings.outcome_bonus, settings.outcome_bonus_b0, self.client, settings.run_dir,
                                  resumed_at=self.first_step - 1 if self.resumed else None)  # fmt: skip
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        self.publisher = Publisher(settings, self.client, self.epoch, tied_embeddings=tied)
        self.full_state: dict[str, torch.Tensor] | None = None  # FSDP2: the last published state, on the host
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = checkpoint.directory(self.run_dir)
        if not self.resumed and previous.exists():  # a fresh run: an older run's checkpoints must not be resumed
            aside = previous.with_name("checkpoints.previous")
            shutil.rmtree(aside, ignore_errors=True)
            previous.rename(aside)
            log.info("moved the previous run's checkpoints to %s", aside)
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.held_out = HeldOut(
            held_out_items,
            mazes_only=mixture is None,
            run_dir=self.run_dir,
            writer=self.writer,
            prometheus=self.prometheus,
        )
        self.unsharded: torch.nn.Module | None = None  # FSDP2: the evaluation's copy of the policy
        if settings.metrics_port:
            self.prometheus.serve(settings.metrics_host, settings.metrics_port)
        self.rows: dict[str, str] = {}  # job id -> the row its prompt counts in (task/category, maze size)
        # groups of scheduled jobs that came while other jobs were collected (the next step's, during an evaluation)
        self.early: dict[str, ScoredGroup] = {}
        self.lost_count = 0  # jobs scheduled again because Redis lost them: their ids' suffix
        # the last step completed by this process, with what a checkpoint of it holds beyond the
        # model: the prompt sampler's state and the RNGs at its end (a stop checkpoints it)
        self.completed: tuple[int, object, tuple] | None = None

    @property
    def policy(self) -> Policy:
        return Policy(self.epoch, self.version)

    # -- the loop ------------------------------------------------------------
    def run(self, progress: Callable[[dict], None] | None = None) -> list[dict]:
        if not self.ranks.main:
            self.follow()
            return []
        try:
            state = self.gather()  # first, so that no rank waits in this collective while rank 0 waits below
            self.wait_for_replicas()
            self.publish(state)  # the starting (or restored) version, in this trainer's epoch
            if not self.resumed and (self.s.eval_at_start or not self.s.steps):
                self.record_eval()
            if self.resumed:
                self.catch_up_eval()
            jobs = None
            for step in range(self.first_step, self.s.steps + 1):
                self.check_stop()
                metrics, jobs = self.step(step, jobs)
                if progress:
                    progress(metrics)
                if self.s.eval_every and step % self.s.eval_every == 0 and step != self.s.steps:
                    self.record_eval(self.s.eval_every_sizes)
            if self.s.steps and self.first_step <= self.s.steps:
                self.record_eval()
            if self.s.metrics_linger_s and not self.prometheus.linger(self.s.metrics_linger_s):
                log.warning("no scrape of /metrics within %.0f s of the last step", self.s.metrics_linger_s)
        except Stopped:
            self.checkpoint_on_stop()
            raise
        finally:
            distributed.broadcast(None, self.ranks)  # the other ranks stop
            self.writer.close()
            self.publisher.close()
            self.metrics_file.close()
            distributed.close()
        return self.held_out.entries

    def follow(self) -> None:
        """Ranks other than 0: train on each batch rank 0 sends, until it sends None."""
        try:
            self.gather()  # rank 0 publishes the starting version
            while (message := distributed.broadcast(None, self.ranks)) is not None:
                if message[0] == "checkpoint":  # rank 0 stops: its checkpoint gathers the optimizer's shards
                    distributed.optimizer_state(self.model, self.opt.optimizer, self.s.fsdp)
                    continue
                step, version, batch = message
                train_on(batch, self.opt, self.s, stage_at(self.s, step), version, self.ranks)
                self.gather()  # the collectives rank 0 makes for publishing and checkpointing, in its order
                if self.checkpoint_due(step):
                    distributed.optimizer_state(self.model, self.opt.optimizer, self.s.fsdp)
        finally:
            distributed.close()

    def wait_for_replicas(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while len(registry.live_replicas(self.client)) < self.s.min_replicas:
            self.check_stop()
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {self.s.min_replicas} rollout replicas registered after {timeout_s} s")
            time.sleep(0.5)

    def step(self, step: int, jobs: list[PromptJob] | None) -> tuple[dict, list[PromptJob] | None]:
        """One step; in async mode it returns the next step's jobs, scheduled before this step trains so
        that the replicas generate them meanwhile (with the version before this step's update)."""
        t0 = time.monotonic()
        if jobs is None:
            jobs = self.schedule(step)
        groups, waited, dropped = self.collect(jobs)
        t1 = time.monotonic()
        sampler = self.rng.getstate()  # where the next unscheduled step's draws begin
        next_jobs = None
        if self.s.mode == "async" and step < self.s.steps:
            next_jobs = self.schedule(step + 1)
        batch = from_groups(groups, self.s.n_rollout)
        if self.bonus is not None:
            batch = dataclasses.replace(batch, bonus=self.bonus(step, groups, batch.valid))
        distributed.broadcast((step, self.version, batch), self.ranks)
        stage = stage_at(self.s, step)
        rows = [self.rows.pop(job.job_id) for job in jobs]
        metrics = train_on(batch, self.opt, self.s, stage, self.version, self.ranks, rows)
        t2 = time.monotonic()
        metrics["tasks"] = task_figures.by_task(groups, rows, stage.k)
        for task, figures in metrics.pop("task_diagnostics").items():
            metrics["tasks"][task].update(figures)
        staleness = [self.version - v for v in batch.policy_versions]
        self.version += 1
        state = self.gather()
        metrics["weight_sync_s"] = self.publish(state)
        metrics["weight_sync_bytes"] = self.publisher.bytes_sent
        metrics["weight_relay_depth"] = self.publisher.relay_depth
        if self.checkpoint_due(step):
            self.save_checkpoint(step, sampler, state)
        self.completed = (step, sampler, checkpoint.capture_rng())
        metrics.update(
            step=step, version=self.version, rollout_s=t1 - t0, waiting_s=waited, train_s=t2 - t1,
            step_s=time.monotonic() - t0, staleness_mean=sum(staleness) / len(staleness),
            staleness_max=max(staleness), dropped_stale=dropped, trained_jobs=[g.group.job.job_id for g in groups],
            stream_lengths=self.trim_streams(), time=time.time(),
        )  # fmt: skip
        self.log_metrics(metrics, step)
        return metrics, next_jobs

    def trim_streams(self) -> dict[str, int]:
        """Drop what every consumer is done with, so that Redis holds at most a few steps of work
        however long the run; returns each stream's length after."""
        lengths = {}
        for stream in (self.streams.prompts, self.streams.rollouts, self.streams.scored):
            try:
                trim_consumed(self.client, stream, self.s.stream_keep)
                lengths[stream] = int(self.client.xlen(stream))
            except redis.RedisError as err:  # a step is not worth failing for it; the next one trims
                log.warning("could not trim %s: %s", stream, err)
        return lengths

    def checkpoint_due(self, step: int) -> bool:
        return step == self.s.steps or bool(self.s.checkpoint_every and step % self.s.checkpoint_every == 0)

    def gather(self) -> dict[str, torch.Tensor]:
        """The whole model's state on rank 0: the live parameters, or under FSDP2 a host copy gathered
        from every rank (a collective: every rank calls it at the same points)."""
        return distributed.full_state(self.model, self.s.fsdp)

    def save_checkpoint(self, step: int, sampler: object, state: dict[str, torch.Tensor], rng: tuple = ()) -> None:
        """``rng``: the RNG states to record (``capture_rng``'s), when not the current ones."""
        torch_rng, cuda_rng, python_rng = rng or checkpoint.capture_rng()
        record = checkpoint.State(
            step=step,
            version=self.version,
            sampler=sampler,
            optimizer=distributed.optimizer_state(self.model, self.opt.optimizer, self.s.fsdp),
            scheduler=self.opt.scheduler.state_dict(),
            torch_rng=torch_rng,
            cuda_rng=cuda_rng,
            python_rng=python_rng,
        )
        whole = state if self.s.fsdp else None  # unsharded, the model saves itself (tied weights once)
        checkpoint.save(self.run_dir, self.model, self.tokenizer, record, self.s.keep_checkpoints, model_state=whole)
        if self.bonus is not None:
            self.bonus.checkpointed(step)

    def check_stop(self) -> None:
        """Raise ``Stopped`` if SIGTERM came: called only where nothing of a step is half done."""
        if self.stop.requested:
            raise Stopped(self.completed[0] if self.completed else self.first_step - 1)

    def checkpoint_on_stop(self) -> None:
        """The last step completed in this process, checkpointed unless it already is: a restart with
        ``--resume-if-present`` goes on from the step after it, having trained nothing twice."""
        if self.completed is None or self.checkpoint_due(self.completed[0]):
            return
        step, sampler, rng = self.completed
        if self.s.fsdp:  # the optimizer's shards are gathered from every rank
            distributed.broadcast(("checkpoint", step), self.ranks)
        self.save_checkpoint(step, sampler, self.full_state, rng)
        log.warning("stopped: checkpointed step %d", step)

    # -- rollouts ------------------------------------------------------------
    def schedule(self, step: int) -> list[PromptJob]:
        sampling = SamplingParams(temperature=self.s.temperature, top_p=self.s.top_p, max_tokens=self.s.max_tokens)
        jobs = []
        for i, prompt in enumerate(self.draw_prompts()):
            job = PromptJob(
                # the epoch in the id: a resumed run's jobs never meet the crashed run's groups
                job_id=f"e{self.epoch}-v{self.version}-s{step}-{i}",
                prompt_id=prompt.id,
                task=prompt.task,
                policy_version=self.version,
                policy_epoch=self.epoch,
                prompt=prompt.text,
                reference=prompt.reference,
                n=self.s.n_rollout,
                sampling=sampling.model_copy(update={"seed": self.rng.randrange(2**31)}),
            )
            publish(self.client, self.streams.prompts, job)
            jobs.append(job)
            self.rows[job.job_id] = prompt.row
        return jobs

    def draw_prompts(self) -> list[Prompt]:
        """A step's prompts from the seeded sampler: the mixture's draw, or (no mixture) mazes drawn as
        they always were, so that a maze preset's seed gives the same run as before mixtures."""
        if self.mixture is not None:
            return self.mixture.draw(self.rng, self.s.prompts_per_step)
        mazes = self.rng.sample(self.train_items, self.s.prompts_per_step)
        template = self.s.prompt_template
        return [Prompt(m.id, "maze", f"maze/{m.size}x{m.size}", m.prompt(template), m.maze) for m in mazes]

    def collect(self, jobs: list[PromptJob]) -> tuple[list[ScoredGroup], float, int]:
        """The scored group of every job, in job order, the seconds spent waiting on the stream, and
        the groups dropped as too stale (their jobs are scheduled again). A group counts if it comes
        from this epoch and at most ``max_staleness`` versions back (async mode; 0 in sync mode); a
        replayed or foreign one is acked and skipped."""
        staleness = self.s.max_staleness if self.s.mode == "async" else 0
        waiting = {job.job_id: job for job in jobs}  # the job id in the stream -> the job it stands for
        found: dict[str, ScoredGroup] = {}
        deadline = time.monotonic() + self.s.group_timeout_s
        waited, dropped = 0.0, 0
        progress = time.monotonic()  # when a group last came (or the jobs were last looked for)

        def take(scored: ScoredGroup) -> None:
            nonlocal dropped, deadline, progress
            group = scored.group
            job_id = group.job.job_id
            if self.version - staleness <= group.policy_version <= self.version:
                original = waiting.pop(job_id)
                found[original.job_id] = scored
                for alias in [k for k, v in waiting.items() if v is original]:  # a job scheduled again: one is enough
                    del waiting[alias]
                progress = time.monotonic()
                deadline = progress + self.s.group_timeout_s  # progress: an evaluation may take long
            elif group.policy_version < self.version - staleness:
                dropped += 1
                original = waiting.pop(job_id)
                retry = self.reschedule(original)
                waiting[retry.job_id] = original
                log.info("dropped group %s of version %d (staleness > %d); scheduled again as %s",
                         job_id, group.policy_version, staleness, retry.job_id)  # fmt: skip
            else:
                log.warning("skipped scored group %s of a later version %d", job_id, group.policy_version)

        for job_id in [job_id for job_id in waiting if job_id in self.early]:
            take(self.early.pop(job_id))
        while waiting:
            self.check_stop()  # the step is abandoned: its groups belong to this epoch, never to a resumed run
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} scored groups missing: none came in {self.s.group_timeout_s} s")
            if time.monotonic() - progress > self.s.lost_job_check_s:
                progress = time.monotonic()
                self.schedule_lost(waiting)
            start = time.monotonic()
            try:
                self.publisher.catch_up(self.published_state, copied=self.full_state is not None)
                deliveries = self.consumer.read(32)
            except (redis.ConnectionError, redis.TimeoutError) as err:  # Redis restarting: the groups wait there
                log.warning("redis unavailable while collecting: %s", err)
                time.sleep(1.0)
                continue
            finally:
                waited += time.monotonic() - start
            for delivery in deliveries:
                scored = self.consumer.decode(delivery, ScoredGroup)
                if scored is None:
                    continue
                group = scored.group
                job_id = group.job.job_id
                fresh = claim_once(self.client, f"{job_id}:{group.policy_epoch}:{group.policy_version}")
                ours = fresh and group.policy_epoch == self.epoch
                if ours and job_id in waiting:
                    take(scored)
                elif ours and job_id in self.rows and job_id not in found:  # a later step's job, while evaluating
                    self.early[job_id] = scored
                else:
                    log.warning("skipped scored group %s (replayed, stale or foreign)", job_id)
                self.consumer.ack(delivery)
        # job order, not arrival order: the batch (and so the ranks' shares) is the same in every run
        return [found[job.job_id] for job in jobs], waited, dropped

    def run_jobs(self, jobs: list[PromptJob]) -> list[ScoredGroup]:
        """Publish jobs that are not a step's (an evaluation's) and collect their scored groups, in order."""
        for job in jobs:
            publish(self.client, self.streams.prompts, job)
        return self.collect(jobs)[0]

    def schedule_lost(self, waiting: dict[str, PromptJob]) -> None:
        """Schedule again the waited-for jobs that are in no stream (``lost_jobs``): the same prompt
        and sampling seed under a new id; whichever of the two comes first is trained on."""
        try:
            gone = lost_jobs.lost(self.client, self.streams, list(waiting))
        except redis.RedisError as err:  # Redis is back soon, or the step times out
            log.warning("could not look for lost jobs: %s", err)
            return
        for job_id in gone:
            original = waiting[job_id]
            retry = original.model_copy(update={"job_id": f"{original.job_id}-l{self.lost_count}"})
            self.lost_count += 1
            publish(self.client, self.streams.prompts, retry)
            waiting[retry.job_id] = original
            self.prometheus.lost_jobs.inc()
            log.warning("job %s is in no stream (lost by Redis): scheduled again as %s", job_id, retry.job_id)

    def reschedule(self, job: PromptJob) -> PromptJob:
        """The same prompt and sampling again, for the current version (a job is dropped at most once
        per version, so the version makes the id unique)."""
        retry = job.model_copy(update={"job_id": f"{job.job_id}-r{self.version}", "policy_version": self.version})
        publish(self.client, self.streams.prompts, retry)
        return retry

    # -- weights -------------------------------------------------------------
    def publish(self, state: dict[str, torch.Tensor]) -> float:
        """The new version to the replicas (``publisher.Publisher``); returns the seconds it took."""
        self.full_state = state if self.s.fsdp else None  # a host copy already: late joiners get it
        return self.publisher.publish(self.version, state)

    def published_state(self) -> dict[str, torch.Tensor]:
        """The parameters of the published version: the host copy under FSDP2, else the live model's
        (unchanged until the next step)."""
        return self.full_state if self.full_state is not None else self.model.state_dict()

    # -- evaluation and logs ---------------------------------------------------
    def eval_model(self) -> torch.nn.Module:
        """The policy to sample evaluations from on rank 0 alone: the model itself, or under FSDP2 (whose
        forward needs every rank) an unsharded copy holding the last published state."""
        if not self.s.fsdp:
            return self.model
        if self.unsharded is None:
            from transformers import AutoModelForCausalLM

            self.unsharded = AutoModelForCausalLM.from_pretrained(self.s.model_dir, dtype=torch.float32)
            self.unsharded = self.unsharded.to(self.ranks.device).eval()
        self.unsharded.load_state_dict(self.full_state, strict=False)
        return self.unsharded

    def catch_up_eval(self) -> None:
        """The evaluation due after the restored step, when the stop that ended the last attempt came
        after its checkpoint but before that evaluation was written (else the run would end, or go on,
        without it: an experiment's training would have no final table)."""
        step = self.first_step - 1
        if self.s.steps and step == self.s.steps:
            sizes = None
        elif self.s.eval_every and step and step % self.s.eval_every == 0:
            sizes = self.s.eval_every_sizes
        else:
            return
        if not self.held_out.on_record(self.version, sizes):
            log.info("evaluating step %d again: the last attempt stopped before its evaluation was written", step)
            self.record_eval(sizes)

    def record_eval(self, sizes: list[int] | None = None) -> dict:
        """Evaluate the current policy on the held-out items (of the maze sizes ``sizes`` only, when
        given), sampled by the replicas or by the trainer's own copy (``eval_via``)."""
        if self.s.eval_via == "replicas":
            sample = functools.partial(held_out.on_replicas, self.run_jobs, settings=self.s, epoch=self.epoch,
                                       version=self.version)  # fmt: skip
        else:
            sample = functools.partial(
                evaluate.evaluate_items, self.eval_model(), self.tokenizer, n=self.s.eval_n, ks=self.s.eval_k,
                max_tokens=self.s.eval_max_tokens or self.s.max_tokens, verifier_url=self.s.verifier_url,
                verifier_token=self.s.verifier_token.get_secret_value(), seed=self.s.eval_seed,
            )  # fmt: skip
        return self.held_out.record(self.version, sample, sizes)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        self.prometheus.record_step(metrics)
        for name, value in metrics.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(f"train/{name}", value, step)
        for task, figures in metrics.get("tasks", {}).items():
            for name, value in figures.items():
                if isinstance(value, int | float):  # a mean over no answers is None
                    self.writer.add_scalar(f"task/{task}/{name}", value, step)
            for bucket, eta in figures.get("eta_by_accuracy", {}).items():
                self.writer.add_scalar(f"task/{task}/eta_by_accuracy/{bucket.replace('/', '_of_')}", eta, step)
        for bucket, eta in metrics.get("eta_by_accuracy", {}).items():
            self.writer.add_scalar(f"eta_by_accuracy/{bucket.replace('/', '_of_')}", eta, step)
