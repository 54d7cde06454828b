"""Trainer settings: a TOML preset in configs/, overridable field by field."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from services.trainer.advantage import Estimator
from services.trainer.mixture import MixtureTask


class Stage(BaseModel):
    """One stage of a schedule: an estimator for a number of steps (Table 5's "P@k T. + P@1 T.")."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    estimator: Estimator
    """Advantage estimator of this stage."""
    steps: int = Field(ge=1)
    """Steps of this stage."""
    k: int = Field(1, ge=1)
    """The k of this stage."""
    estimator_options: dict[str, float | int | str] = {}
    """Extra options for this stage's estimator."""


class EntropyAdvantage(BaseModel):
    """Cheng et al. 2025's entropy-based advantage (arXiv 2506.14758, Eq. 4-6): every token's
    advantage A becomes A + min(alpha * H_t, |A| / kappa), H_t its entropy (detached)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    alpha: float = Field(0.4, gt=0)
    """Weight of the entropy (0.4 with GRPO in the paper, 0.1 with PPO)."""
    kappa: float = Field(2.0, gt=1)
    """The bonus is at most |A| / kappa, so it never flips the advantage's sign."""


class CovarianceControl(BaseModel):
    """Clip-Cov or KL-Cov (Cui et al. 2025, arXiv 2505.22617): the tokens whose log-probability
    moves most with their advantage are held back (services/trainer/token_shaping.py)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: Literal["clip_cov", "kl_cov"]
    """clip_cov: a random few inside (lower, upper) lose their gradient; kl_cov: the top fraction
    gets a KL penalty, and no ratio is clipped."""
    ratio: float = Field(0.0002, gt=0, le=1)
    """Fraction of a loss call's tokens chosen (verl: 0.0002; the original's k_percent 0.2 for a
    7B model is 0.002)."""
    lower: float = 1.0
    """clip_cov: only tokens whose covariance is above this ..."""
    upper: float = 5.0
    """... and below this."""
    kl_coef: float = Field(1.0, ge=0)
    """kl_cov: c in c |log pi - log pi_old|."""

    @model_validator(mode="after")
    def _window(self) -> CovarianceControl:
        if self.lower >= self.upper:
            raise ValueError(f"covariance: lower ({self.lower}) must be below upper ({self.upper})")
        return self


class KAnneal(BaseModel):
    """PKPO's annealing of k (Walder & Karkhanis 2025): from the run's ``k`` to ``k_end`` over
    ``steps`` training steps (``services.trainer.pkpo.anneal_k``), then ``k_end``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    k_end: int = Field(ge=1)
    """The k at the end of the schedule."""
    steps: int = Field(ge=0)
    """Steps the schedule takes."""
    schedule: Literal["linear", "cosine", "step"] = "linear"
    """How k moves: linear or cosine interpolation (rounded), or one switch at ``steps``."""


class TrainerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model_dir: str = "models/tiny-maze"
    """Starting policy, HF format."""
    run_dir: str = "runs/maze-tiny"
    """Where metrics.jsonl, TensorBoard logs and the report go."""
    train_data: str = "data/maze-tiny/train.jsonl"
    """Maze train split (JSONL from `passk data maze`)."""
    test_data: str = "data/maze-tiny/test.jsonl"
    """Maze test split."""
    prompt_template: Literal["compact", "paper"] = "compact"
    """How a maze becomes a prompt."""
    mixture: list[MixtureTask] = []
    """Tasks to train on, each with its splits, weight and template (services/trainer/mixture.py);
    empty: the mazes of train_data and test_data."""
    estimator: Estimator = Estimator.PASSK_ANALYTIC
    """Advantage estimator (any registry name)."""
    k: int = Field(8, ge=1)
    """The k of Pass@k training."""
    k_anneal: KAnneal | None = None
    """Anneal k from ``k`` to ``k_anneal.k_end`` (PKPO); none: k stays. Not with ``stages``."""
    estimator_options: dict[str, float | int | str] = {}
    """Extra options for the estimator (e.g. n_group for passk_bootstrap)."""
    n_rollout: int = Field(32, ge=2, le=4096)
    """Samples per prompt."""
    prompts_per_step: int = Field(16, ge=1)
    """Prompts per training step (the prompt batch)."""
    steps: int = Field(150, ge=0)
    """Training steps (policy versions)."""
    stages: list[Stage] = []
    """A schedule of estimators, run in order (and repeated ``stage_repeats`` times); empty: the
    estimator above for every step. Their steps must add up to ``steps``."""
    stage_repeats: int = Field(1, ge=1)
    """How often the stages run, e.g. 2 for "(P@k T. + P@1 T.) x 2"."""
    mini_batch_prompts: int = Field(0, ge=0)
    """Prompts per optimizer step (the paper's mini-batch, 32 of 128): a step's batch is split into
    mini-batches, one policy update each. 0: the whole prompt batch in one update."""
    micro_batch_prompts: int = Field(0, ge=0)
    """Prompts per forward/backward on one rank (gradient accumulation; memory only, the update is
    the same). 0: a rank's whole share of a mini-batch at once."""
    lr: float = Field(2e-4, gt=0)
    """AdamW learning rate."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up, in optimizer updates (the paper: 10)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy regularization coefficient (Sec. 3.1 tries 0.001, 0.003, 0.005)."""
    kl_coef: float = Field(0.0, ge=0)
    """KL penalty to the starting policy (k3 estimate); 0 keeps no reference model, as the paper."""
    entropy_advantage: EntropyAdvantage | None = None
    """Token advantages shaped by entropy (Cheng et al. 2025), e.g. {alpha = 0.4, kappa = 2}."""
    top_entropy: float | None = Field(None, gt=0, le=1)
    """The policy gradient only on this top fraction of tokens by entropy (Wang et al. 2025: 0.2)."""
    covariance: CovarianceControl | None = None
    """Clip-Cov or KL-Cov, e.g. {kind = "kl_cov", ratio = 0.002}."""
    noise_rewards: float = Field(0.0, ge=0, le=1)
    """Noise rewards (Sec. 3.1): the fraction of negative responses whose reward is flipped to 1."""
    outcome_bonus: Literal["off", "ucb", "ucb_mean", "ucb_con", "batch"] = "off"
    """Outcome-based exploration (Song et al. 2025): a bonus on the advantage from each answer's count
    for its prompt over the run, kept in Redis (ucb, ucb_mean, ucb_con), or a penalty on answers
    repeated within the group (batch). services/trainer/outcome_bonus.py has the formulas."""
    outcome_bonus_c: float = Field(0.2, gt=0, le=10)
    """The bonus's factor c."""
    outcome_bonus_b0: float = Field(0.5, ge=0, le=1)
    """ucb_con's constant baseline b0."""
    clip_low: float = Field(0.2, ge=0, le=1)
    """PPO ratio clip below 1 (DAPO: 0.2)."""
    clip_high: float = Field(0.28, ge=0, le=10)
    """PPO ratio clip above 1 (DAPO clip-higher: 0.28)."""
    loss_aggregation: Literal["token", "sequence"] = "token"
    """Token-level (DAPO) or sequence-level (GRPO) loss averaging."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping."""
    temperature: float = Field(1.0, gt=0)
    """Rollout sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Rollout nucleus sampling."""
    max_tokens: int = Field(24, ge=1)
    """New tokens per sample at most."""
    eval_every: int = Field(50, ge=0)
    """Evaluate every this many steps (0: only before and after)."""
    eval_at_start: bool = True
    """Evaluate the starting policy before the first step (experiments that train one start many
    times evaluate it once, in a run of 0 steps)."""
    eval_max_tokens: int = Field(0, ge=0)
    """New tokens per evaluation sample at most (0: max_tokens); larger held-out mazes than the
    training ones need longer answers."""
    eval_every_sizes: list[int] = []
    """Maze sizes of the evaluations every ``eval_every`` steps (empty: all); the evaluations before
    and after training cover every size. Cheap training curves when the held-out set has large mazes.
    Maze-only runs: a mixture evaluates every row each time."""
    eval_via: Literal["replicas", "trainer"] = "replicas"
    """Who samples the held-out answers: the rollout replicas, as evaluation jobs on the prompts
    stream that are never trained on (vLLM on GPU), or the trainer's own copy of the policy on rank 0
    (transformers; configs/maze-tiny.toml keeps it so that its published tables stay reproducible)."""
    eval_mazes: int = Field(100, ge=1)
    """Held-out mazes per size in an evaluation."""
    eval_n: int = Field(32, ge=1)
    """Samples per held-out maze."""
    eval_k: list[int] = [1, 8]
    """The k of the reported pass@k."""
    seed: int = 0
    """Seed of prompt sampling and rollouts."""
    eval_seed: int = 1234
    """Seed of the evaluation's sampling: fixed, so that runs of different seeds are judged alike."""
    threads: int = Field(1, ge=1)
    """torch threads of the trainer (per rank)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state across the ranks (FSDP2), for models whose
    AdamW state does not fit one device; False: every rank holds the whole model."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each rank trains: auto is its GPU (LOCAL_RANK) when there is one. On a GPU the forward
    passes run in bfloat16 autocast."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis server of the streams."""
    verifier_url: str = "http://127.0.0.1:8100"
    """Verifier HTTP API, which grades the trainer's own evaluations (``eval_via = "trainer"``)."""
    verifier_token: SecretStr = SecretStr("")
    """Bearer token the verifier's API requires (its api_token); empty sends none."""
    weights_token: SecretStr = SecretStr("")
    """Bearer token for weight pushes to the replicas."""
    weights_tls_ca: str = ""
    """PEM certificate(s) to trust: pushes go over TLS when set (the replicas then serve TLS)."""
    metrics_host: str = "127.0.0.1"
    """Where the trainer's Prometheus metrics are served (rank 0)."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """Port of the trainer's Prometheus metrics; 0: not served."""
    metrics_linger_s: float = Field(0.0, ge=0, le=600)
    """After the last step, keep /metrics up until Prometheus has scraped it once more, at most
    this long (0: exit at once). The compose and Kubernetes deployments set it above the scrape
    interval, so that a short run's final values are recorded."""
    stream_keep: int = Field(64, ge=0)
    """The newest entries of each stream kept for inspection after every consumer is done with them;
    older consumed entries are trimmed each step (pending and unread ones never are)."""
    weights_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype of the weights pushed to the replicas: "auto" pushes each replica the dtype it
    reports serving in (a bfloat16 vLLM replica gets half the bytes of the float32 master weights);
    the floating-point tensors are cast once per version and dtype, before the pushes."""
    weights_fanout: int = Field(0, ge=0, le=64)
    """0: the trainer pushes each version to every replica itself (a star). f >= 1: it pushes to f
    replicas (of each serving dtype) and each relays it on to f more as it arrives, so the trainer's
    link carries each version f times however many replicas there are (1: a chain)."""
    weights_chunk_bytes: int = Field(4 << 20, ge=16 << 10, le=8 << 20)
    """Bytes per pushed chunk. A relay passes a chunk on once it has arrived whole, so a chain adds
    one chunk's transfer time per hop (4 MiB: 0.3 ms at 100 Gbit/s, 34 ms at 1 Gbit/s)."""
    weights_delta: bool = False
    """Send a replica that holds the previous version only the XOR against it, compressed with zstd
    (services/common/delta.py); costs a host copy of the last payload per serving dtype. Not with
    relays (weights_fanout > 0), which pass whole versions on."""
    weights_bulk: bool = True
    """Send a version's bytes over the replica's bulk channel (a TCP connection of their own, over
    TLS when weights_tls_ca is set) where it registered one, gRPC carrying the rest: fewer copies at
    both ends (services/common/bulk.py). False, or a replica without one: the bytes go over gRPC.
    A relay sends on over its children's channels the same way (they travel with the push).
    Deltas always go over gRPC."""
    push_timeout_s: float = Field(300, gt=0)
    """How long one weight push to a replica may take; a replica that stops answering is given up
    on after it (and leaves the registry once its heartbeats stop)."""
    group_timeout_s: float = Field(600, gt=0)
    """How long a step waits for its scored groups."""
    lost_job_check_s: float = Field(10, gt=0)
    """After this long with no group arriving, the trainer looks for the jobs it waits for in the
    streams, and schedules again those in none (Redis lost them in a crash: lost_jobs.py)."""
    min_replicas: int = Field(1, ge=1)
    """Replicas that must be live before training starts."""

    mode: Literal["sync", "async"] = "sync"
    """sync: each step's rollouts come from the version being trained. async: the next step's
    rollouts are generated while a step trains, so they are up to ``max_staleness`` versions old."""
    max_staleness: int = Field(1, ge=1, le=16)
    """async mode: groups from more versions back are dropped, counted and generated again."""
    checkpoint_every: int = Field(10, ge=0)
    """Write a checkpoint every this many steps (and after the last); 0: only after the last."""
    keep_checkpoints: int = Field(3, ge=1)
    """Checkpoints kept; older ones are deleted once a newer one is complete."""

    @model_validator(mode="after")
    def _k_fits(self) -> TrainerSettings:
        if self.k > self.n_rollout:
            raise ValueError(f"k={self.k} is larger than n_rollout={self.n_rollout}")
        for stage in self.stages:
            if stage.k > self.n_rollout:
                raise ValueError(f"stage {stage.estimator}: k={stage.k} is larger than n_rollout={self.n_rollout}")
        if self.k_anneal is not None:
            if self.k_anneal.k_end > self.n_rollout:
                raise ValueError(f"k_anneal.k_end={self.k_anneal.k_end} is larger than n_rollout={self.n_rollout}")
            if self.stages:
                raise ValueError("k_anneal anneals the run's k; with stages, give each stage its k")
        if self.stages and sum(s.steps for s in self.stages) * self.stage_repeats != self.steps:
            total = sum(s.steps for s in self.stages) * self.stage_repeats
            raise ValueError(f"the stages add up to {total} steps, but steps={self.steps}")
        if self.mini_batch_prompts > self.prompts_per_step:
            raise ValueError(f"mini_batch_prompts={self.mini_batch_prompts} > prompts_per_step={self.prompts_per_step}")
        if any(k > self.eval_n or k < 1 for k in self.eval_k):
            raise ValueError(f"every eval_k must be between 1 and eval_n={self.eval_n}, got {self.eval_k}")
        if self.mixture and self.eval_every_sizes:
            raise ValueError("eval_every_sizes picks maze sizes of test_data; a mixture evaluates every row each time")
        if self.weights_delta and self.weights_fanout:
            raise ValueError("weights_delta goes straight from the trainer; relays (weights_fanout > 0) pass whole "
                             "versions on: set one of them")  # fmt: skip
        return self


ENV_PREFIX = "PASSK_TRAINER_"


def environment_overrides(environ: Mapping[str, str]) -> list[str]:
    """``key=value`` overrides from PASSK_TRAINER_<FIELD> variables (how containers configure the
    trainer, tokens included, without putting them on a command line)."""
    overrides = []
    for name, value in sorted(environ.items()):
        if name.startswith(ENV_PREFIX):
            key = name.removeprefix(ENV_PREFIX).lower()
            if key not in TrainerSettings.model_fields:
                raise ValueError(f"{name}: the trainer has no setting {key!r}")
            overrides.append(f"{key}={value}")
    return overrides


def load_settings(
    preset: Path, overrides: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> TrainerSettings:
    """A preset file, then PASSK_TRAINER_* variables of ``environ``, then ``key=value`` overrides
    (values parsed as TOML, else taken as strings)."""
    try:
        data = tomllib.loads(preset.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"cannot read preset {preset}: {err}") from None
    data = data.get("trainer", data)
    for item in [*environment_overrides(environ or {}), *(overrides or [])]:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        field = TrainerSettings.model_fields.get(key.strip())
        if field is not None and field.annotation in (str, SecretStr) and not isinstance(value, str):
            value = raw  # a token of digits is still a string
        data[key.strip()] = value
    return TrainerSettings.model_validate(data)


def stage_at(settings: TrainerSettings, step: int) -> Stage:
    """The stage that trains step ``step`` (1-based)."""
    if not settings.stages:
        k = settings.k
        if settings.k_anneal is not None:
            from services.trainer.pkpo import anneal_k

            schedule = settings.k_anneal
            k = anneal_k(step - 1, k_start=k, k_end=schedule.k_end, steps=schedule.steps, schedule=schedule.schedule)
        return Stage(estimator=settings.estimator, steps=max(settings.steps, 1), k=k,
                     estimator_options=settings.estimator_options)  # fmt: skip
    position = (step - 1) % sum(s.steps for s in settings.stages)
    for stage in settings.stages:
        if position < stage.steps:
            return stage
        position -= stage.steps
    raise AssertionError("unreachable")
