"""An experiment file: which trainings to run (start model x method x seed), all on
one base preset, read from TOML and checked before anything starts.

The ``[trainer]`` table is a training preset like those in configs/ (every run
gets it); ``[experiment]`` says what varies. Each start names the model it
trains from and how to build that model when it is missing, so that the file
alone says where every number of the report comes from.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.experiment.names import method_name

if TYPE_CHECKING:
    from services.trainer.config import TrainerSettings


class Start(BaseModel):
    """A starting checkpoint: the warm-up that builds it (``passk model build-tiny``) and the
    methods trained from it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    """Short name, used in run directories and the report."""
    model_dir: str
    """The model; built when it holds no config.json (a maze model with warm-up steps and horizon)."""
    warmup_steps: int | None = Field(None, ge=0, le=100_000)
    """Supervised warm-up steps of the build (None: a shipped model the runner does not build)."""
    horizon: int | None = Field(None, ge=1, le=100_000)
    """Cosine schedule length of the build: steps < horizon leaves it under-trained (not annealed)."""
    methods: list[str] = []
    """Methods trained from this start; empty: all of the experiment's."""


class Variant(BaseModel):
    """A method that is more than an estimator name: an estimator with other settings (another k),
    or a schedule of stages (Pass@k training, then Pass@1 training). Named in ``methods`` like an
    estimator."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,47}$")
    """The method's name in ``methods``, run directories and the report's tables."""
    label: str = Field("", max_length=60)
    """How the report names it (empty: the name)."""
    estimator: str | None = None
    """The estimator (None: the base preset's, or the stages' own)."""
    set: list[str] = []
    """``key=value`` overrides on top of the base preset, as `passk train --set` takes them."""


class Rule(BaseModel):
    """The verdict rule, fixed in the experiment file before the run. Each paired difference A − B
    (same seed, same prompts, same evaluation) gets a two-sided ``confidence`` interval from the
    t distribution over the seeds; it is *the same* when the interval lies inside ±margin (no
    effect that matters), else *higher* when it lies above 0, *lower* when below, else *unclear*.
    An interval narrower than the margin in each direction (half-width < margin / 2) always
    decides: the design sizes the seeds for that from a pilot's spread."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Two-sided confidence of the interval."""
    margin: float = Field(gt=0, le=1)
    """Pass@k (a fraction): the smallest difference that matters, and the equivalence margin."""
    margin_pass1: float | None = Field(None, gt=0, le=1)
    """The same for pass@1 (None: ``margin``)."""
    margin_entropy: float = Field(0.02, gt=0)
    """The same for policy entropy (nats)."""
    margin_diversity: float = Field(0.03, gt=0, le=1)
    """The same for negative-answer diversity (distinct wrong answers per wrong answer)."""
    margin_share: float = Field(0.03, gt=0, le=1)
    """The same for shares of η (the advantage mass on the hard prompts)."""
    pilot: dict[str, float] = {}
    """Standard deviations over seeds of paired differences, measured in a pilot before the run
    (name: sd, in the measure's units): the report sets the standard error they predict for this
    design beside the one it got."""
    pilot_source: str = ""
    """Where the pilot numbers come from."""


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,63}$")
    """The experiment's name (`passk experiment <name>`)."""
    kind: Literal["claims", "comparison"] = "claims"
    """What the report says: a verdict per claim of the paper (maze-repro), or a side-by-side
    comparison of the methods with their diagnostics and no verdict."""
    title: str = Field("the paper's maze findings at CPU scale", min_length=1, max_length=120)
    """The report's heading after the name."""
    out: str
    """Run directory: one sub-directory per training, the report at its top."""
    docs: str = ""
    """Where a copy of the report goes (empty: none)."""
    seeds: list[int] = Field(min_length=1, max_length=64)
    """Training seeds, the same for every method."""
    methods: list[str] = Field(min_length=1)
    """Methods compared: estimator registry names (the trainer's settings check them) or variants."""
    method_seeds: dict[str, list[int]] = {}
    """Seeds of particular methods instead of ``seeds`` (e.g. more for the headline pair)."""
    variants: list[Variant] = []
    """Methods with settings of their own, named in ``methods``."""
    rule: Rule | None = None
    """The verdict rule (claims experiments); none: the sign rule of the first reproduction."""
    starts: list[Start] = Field(min_length=1)
    """Starting models."""
    archive: str = ""
    """A directory kept in git: each finished training's results (done.json, eval.jsonl and the
    per-step figures the report reads) are copied there, so that a run that needs several sittings
    continues on a clean clone, and the report can be rebuilt from it alone (empty: none)."""
    checkpoint_every: int = Field(0, ge=0, le=100_000)
    """Checkpoint every this many steps; an interrupted training then continues from its latest
    checkpoint instead of starting over (0: no checkpoints)."""
    lanes: int = Field(2, ge=1, le=64)
    """Trainings run at once, each on its own Redis, verifier and replica (one core each)."""
    model_sizes: list[int] = []
    """Maze sizes of the models' supervised warm-up (a maze experiment; empty for a mixture)."""
    max_positions: int = Field(1024, ge=64, le=65536)
    """Context length of the built models."""
    build_threads: int = Field(2, ge=1, le=256)
    """torch threads of the models' build (its numbers depend on it)."""
    train_sizes: list[int] = []
    """Maze sizes of the RL training split (data built when missing). A mixture experiment (its
    [trainer] has a mixture) leaves the sizes empty: its data come from the file's [[data]] steps
    and its rows from the mixture."""
    test_sizes: list[int] = []
    """Maze sizes of the held-out split: the report's table rows."""
    train_per_size: int = Field(5000, ge=1)
    test_per_size: int = Field(100, ge=1)
    data_seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {self.methods}")
        for method, seeds in self.method_seeds.items():
            if method not in self.methods:
                raise ValueError(f"method_seeds: {method!r} is not in experiment.methods")
            if not seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"method_seeds: {method!r} needs distinct seeds, got {seeds}")
        variants = [v.name for v in self.variants]
        if len(set(variants)) != len(variants):
            raise ValueError(f"variant names repeat: {variants}")
        unused = sorted(set(variants) - set(self.methods))
        if unused:
            raise ValueError(f"variants {unused} are not in experiment.methods")
        names = [s.name for s in self.starts]
        if len(set(names)) != len(names):
            raise ValueError(f"start names repeat: {names}")
        for start in self.starts:
            extra = set(start.methods) - set(self.methods)
            if extra:
                raise ValueError(f"start {start.name}: methods {sorted(extra)} are not in experiment.methods")
            if (start.warmup_steps is None) != (start.horizon is None):
                raise ValueError(f"start {start.name}: warmup_steps and horizon go together (or neither: shipped)")
            if start.horizon is not None and not 1 <= start.warmup_steps <= start.horizon:
                raise ValueError(f"start {start.name}: warmup_steps must be within 1..horizon={start.horizon}")
        for horizon in {s.horizon for s in self.starts if s.horizon is not None}:
            steps = [s.warmup_steps for s in self.starts if s.horizon == horizon]
            if len(set(steps)) != len(steps):
                raise ValueError(f"two starts stop the {horizon}-step warm-up at the same step: they are one model")
        for field in ("model_sizes", "train_sizes", "test_sizes"):
            bad = [s for s in getattr(self, field) if s < 5 or s % 2 == 0 or s > 201]
            if bad:
                raise ValueError(f"{field}: maze sizes must be odd and between 5 and 201, got {bad}")
        return self

    def methods_of(self, start: Start) -> list[str]:
        return list(start.methods) or list(self.methods)

    def seeds_of(self, method: str) -> list[int]:
        return list(self.method_seeds.get(method, self.seeds))

    def variant(self, method: str) -> Variant | None:
        return next((v for v in self.variants if v.name == method), None)

    def label(self, method: str) -> str:
        """The report's name of a method: the variant's label, else the estimator's."""
        variant = self.variant(method)
        return (variant.label or variant.name) if variant is not None else method_name(method)


@dataclass(frozen=True)
class Run:
    """One training of the experiment."""

    start: str
    method: str
    seed: int
    model_dir: str
    run_dir: Path
    variant: Variant | None = None

    @property
    def name(self) -> str:
        return self.run_dir.name

    def overrides(self) -> list[str]:
        """`--set` values on top of the base preset (a variant's last: they win)."""
        estimator = self.method if self.variant is None else self.variant.estimator
        return [
            f"model_dir='{self.model_dir}'",
            f"run_dir='{self.run_dir}'",
            *([f"estimator='{estimator}'"] if estimator is not None else []),
            f"seed={self.seed}",
            "eval_at_start=false",  # the start's own evaluation run holds it: identical for every run
            *(self.variant.set if self.variant is not None else []),
        ]


@dataclass(frozen=True)
class StartEval:
    """The evaluation of a start model before any training (step 0 of every curve from it)."""

    start: str
    model_dir: str
    run_dir: Path

    def overrides(self) -> list[str]:
        return [f"model_dir='{self.model_dir}'", f"run_dir='{self.run_dir}'", "steps=0", "stages=[]"]


def load(path: Path, out: str | None = None, seeds: list[int] | None = None) -> tuple[Experiment, TrainerSettings]:
    """(the experiment, its base trainer settings, defaults filled in and checked) of an experiment
    file; ``out``/``seeds`` replace the file's. Raises ValueError naming the file and what is wrong."""
    from services.trainer.config import load_settings

    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: {err}") from None
    unknown = sorted(set(raw) - {"experiment", "trainer", "rollout", "data"})
    if unknown or "experiment" not in raw or "trainer" not in raw:
        raise ValueError(
            f"{path}: needs [experiment] and [trainer] tables (and maybe [rollout], [[data]]), got {sorted(raw)}"
        )
    table = dict(raw["experiment"])
    if out is not None:
        table["out"] = out
    if seeds is not None:  # every method on these seeds
        table["seeds"] = seeds
        table.pop("method_seeds", None)
    try:
        experiment = Experiment.model_validate(table)
    except ValidationError as err:
        raise ValueError(f"{path} [experiment]: {err}") from None
    trainer = load_settings(path)
    sizes = (experiment.model_sizes, experiment.train_sizes, experiment.test_sizes)
    if trainer.mixture and any(sizes):
        raise ValueError(f"{path}: a mixture experiment takes its rows from [trainer] mixture and its data from "
                         "[[data]]: drop model_sizes, train_sizes and test_sizes")  # fmt: skip
    if not trainer.mixture and not all(sizes):
        raise ValueError(f"{path}: a maze experiment needs model_sizes, train_sizes and test_sizes")
    return experiment, trainer


def check(path: Path, evals: list[StartEval], runs: list[Run]) -> None:
    """Every training's full settings, validated by the trainer's own rules before anything starts
    (an unknown method or a k over n_rollout fails here, not an hour in)."""
    from services.trainer.config import load_settings

    for item in [*evals, *runs]:
        try:
            load_settings(path, item.overrides())
        except ValueError as err:
            raise ValueError(f"{path}: run {item.run_dir.name}: {err}") from None


def plan(experiment: Experiment) -> tuple[list[StartEval], list[Run]]:
    """The start evaluations and the trainings, the trainings ordered seed-major, so that a partial
    experiment has every method at its first seeds."""
    root = Path(experiment.out)
    evals = [StartEval(s.name, s.model_dir, root / f"{s.name}-start") for s in experiment.starts]
    runs = [
        Run(start.name, m, seed, start.model_dir, root / f"{start.name}-{m}-s{seed}", experiment.variant(m))
        for seed in sorted({seed for m in experiment.methods for seed in experiment.seeds_of(m)})
        for start in experiment.starts
        for m in experiment.methods_of(start)
        if seed in experiment.seeds_of(m)
    ]
    return evals, runs
