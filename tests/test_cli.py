"""The ``passk`` console script, run as a real subprocess."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

PASSK = [sys.executable, "-m", "services.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*PASSK, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env, check=False)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "advantage-curves" in result.stdout


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "passk"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.startswith("passk "), result


def test_cli_module_does_not_import_torch():
    # --help must stay fast: torch is imported only inside the commands that need it
    code = "import sys, services.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 0


def test_cli_estimator_names_match_the_registry():
    from services.cli import ESTIMATORS
    from services.trainer.advantage import Estimator

    assert list(ESTIMATORS) == [e.value for e in Estimator]


def read_curves(path: Path) -> dict[tuple[str, str], list[dict]]:
    curves: dict[tuple[str, str], list[dict]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            curves.setdefault((row["estimator"], row["k"]), []).append(row)
    return curves


def peak(rows: list[dict]) -> int:
    return int(max(rows, key=lambda r: float(r["eta"]))["n_pos"])


def test_advantage_curves_for_n32_peak_where_the_paper_says(tmp_path):
    result = run("advantage-curves", "--n", "32", "--k", "1", "4", "8", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    curves = read_curves(tmp_path / "advantage_curves.csv")
    assert set(curves) == {(e, k) for e in ("passk_analytic", "passk_combination", "passk_exceeding") for k in "148"}
    assert all(len(rows) == 33 for rows in curves.values())
    assert peak(curves[("passk_analytic", "1")]) == 16
    assert peak(curves[("passk_analytic", "8")]) == 4
    # the printed table says the same
    lines = [line.split() for line in result.stdout.splitlines() if "passk_analytic" in line]
    printed = {cells[3]: cells[5] for cells in (line for line in lines) if len(cells) > 5}
    assert printed == {"1": "16", "4": "8", "8": "4"}, result.stdout
    assert (tmp_path / "advantage_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_advantage_curves_accepts_repeated_k_and_chosen_estimators(tmp_path):
    result = run(
        "advantage-curves", "--n", "16", "--k", "2", "--k", "16", "-e", "grpo", "-e", "pkpo", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    curves = read_curves(tmp_path / "advantage_curves.csv")
    # grpo ignores k and is drawn once
    assert set(curves) == {("grpo", ""), ("pkpo", "2"), ("pkpo", "16")}
    assert peak(curves[("grpo", "")]) == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "0"], "every k must satisfy 1 <= k <= N=32, got [0]"),
        (["--n", "8", "--k", "9"], "every k must satisfy 1 <= k <= N=8, got [9]"),
        (["--n", "1"], "N must be between 2 and 4096, got 1"),
        (["-e", "passk_magic"], "unknown estimator(s) ['passk_magic']"),
        (["-e", "passk_adaptive"], "passk_adaptive depends on per-prompt entropy"),
        (["--n", "many"], "Invalid value for '--n'"),
    ],
)
def test_advantage_curves_rejects_bad_arguments(tmp_path, args, message):
    result = run("advantage-curves", *args, "--out", str(tmp_path))
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "advantage_curves.csv").exists()


def test_data_puzzles_and_math_write_splits(tmp_path):
    from services.tasks.records import read_jsonl

    result = run("data", "puzzles", "--out", str(tmp_path / "p"), "--train-per-task", "2", "--test-per-task", "1")
    assert result.returncode == 0, result.stderr
    assert len(read_jsonl(tmp_path / "p" / "test.jsonl")) == 14  # 7 categories x 2 tasks x 1
    result = run("data", "math", "--out", str(tmp_path / "m"), "--train-per-kind", "3", "--test-per-kind", "2")
    assert result.returncode == 0, result.stderr
    assert [len(read_jsonl(tmp_path / "m" / f"{s}.jsonl")) for s in ("train", "test")] == [12, 8]


def test_serve_verifier_rejects_bad_settings():
    result = run("serve", "verifier", "--graders", "not a module!")
    assert result.returncode != 0 and "graders" in result.stderr and "pattern" in result.stderr


def test_healthcheck_names_each_unhealthy_endpoint():
    from services.common.redis_server import free_port

    port = free_port()
    result = run("healthcheck", f"http://127.0.0.1:{port}/healthz", f"grpc://127.0.0.1:{port}", "ftp://host/x")
    assert result.returncode == 1
    assert f"http://127.0.0.1:{port}/healthz:" in result.stderr
    assert f"grpc://127.0.0.1:{port}: UNAVAILABLE" in result.stderr
    assert "ftp://host/x: the scheme must be http, https, grpc or redis" in result.stderr


def test_healthcheck_passes_on_a_live_redis(redis_server):
    result = run("healthcheck", redis_server.url)
    assert result.returncode == 0 and "PONG" in result.stdout, result


@pytest.mark.parametrize(
    ("mixture", "message"),
    [
        ('{task = "math", train = "NONE", test = "NONE", weight = 0}', "mixture.0.weight"),
        ('{task = "math", train = "NONE", test = "NONE"}', "mixture[0].train:"),
        ('{task = "math", train = "DATA", test = "DATA", template = "{question}"}', "unknown fields ['question']"),
    ],
)
def test_train_and_up_refuse_a_bad_mixture_before_starting_anything(tmp_path, mixture, message):
    (tmp_path / "data.jsonl").write_text('{"id": "a", "task": "math", "category": "c", "prompt": "1+1", '
                                         '"reference": "2", "answer": "2"}\n')  # fmt: skip
    mixture = mixture.replace("NONE", str(tmp_path / "none.jsonl")).replace("DATA", str(tmp_path / "data.jsonl"))
    preset = tmp_path / "bad.toml"
    preset.write_text(f"[trainer]\nrun_dir = '{tmp_path / 'run'}'\nmixture = [{mixture}]\n")
    for command in ("train", "up"):
        result = run(command, "--preset", str(preset))
        assert result.returncode == 2 and message in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_up_refuses_a_bad_setting_before_writing_the_presets_data(tmp_path):
    preset = tmp_path / "bad.toml"
    data = f"[[data]]\nkind = 'maze'\nout = '{tmp_path / 'mazes'}'\nargs = ['--train-per-size', '4']\n"
    preset.write_text(f"[trainer]\nrun_dir = '{tmp_path / 'run'}'\nlr = -1\n\n{data}")
    result = run("up", "--preset", str(preset))
    assert result.returncode == 2 and "lr" in result.stderr, result.stderr
    assert not (tmp_path / "mazes").exists() and not (tmp_path / "run").exists()


def test_train_and_up_refuse_an_evaluation_size_the_test_data_lacks(tmp_path):
    assert run("data", "maze", "--out", str(tmp_path), "--train-size", "5", "--test-size", "5",
               "--train-per-size", "4", "--test-per-size", "2").returncode == 0  # fmt: skip
    preset = tmp_path / "sizes.toml"
    preset.write_text(f"[trainer]\nrun_dir = '{tmp_path / 'run'}'\ntrain_data = '{tmp_path / 'train.jsonl'}'\n"
                      f"test_data = '{tmp_path / 'test.jsonl'}'\neval_every_sizes = [9]\n")  # fmt: skip
    for command in ("train", "up"):
        result = run(command, "--preset", str(preset))
        message = " ".join(result.stderr.split())
        assert result.returncode == 2 and "eval_every_sizes [9]" in message, result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_data_puzzles_of_named_reasoning_gym_datasets(tmp_path):
    from services.tasks.records import read_jsonl
    from services.verifier.graders import GRADERS

    out = tmp_path / "p"
    args = ["--dataset", "basic_arithmetic=sums", "--dataset", "chain_sum=sums", "--dataset", "word_sorting"]
    result = run("data", "puzzles", "--out", str(out), "--train-per-task", "3", "--test-per-task", "2", *args)
    assert result.returncode == 0, result.stderr
    test = read_jsonl(out / "test.jsonl")
    assert [(i.category, i.id.split("-")[0]) for i in test] == [
        ("sums", "basic_arithmetic"), ("sums", "basic_arithmetic"), ("sums", "chain_sum"), ("sums", "chain_sum"),
        ("word_sorting", "word_sorting"), ("word_sorting", "word_sorting"),
    ]  # fmt: skip
    assert len(read_jsonl(out / "train.jsonl")) == 9
    assert all(GRADERS["puzzle"](f"<answer>{i.answer}</answer>", i.reference) == 1.0 for i in test)
    test_only = run(
        "data", "puzzles", "--out", str(tmp_path / "t"), "--train-per-task", "0", "--test-per-task", "1", *args
    )
    assert test_only.returncode == 0, test_only.stderr  # an empty split is written empty
    assert [len(read_jsonl(tmp_path / "t" / f"{s}.jsonl")) for s in ("train", "test")] == [0, 3]
    refused = run("data", "puzzles", "--out", str(out), "--dataset", "no_such_puzzle")
    assert refused.returncode == 2 and "unknown reasoning-gym dataset 'no_such_puzzle'" in refused.stderr
    eased = run(
        "data", "puzzles", "--out", str(tmp_path / "e"), "--train-per-task", "4", "--test-per-task", "4",
        "--dataset", "chain_sum", "--option", "chain_sum.max_terms=2", "--option", "chain_sum.max_digits=2",
    )  # fmt: skip
    assert eased.returncode == 0, eased.stderr
    for item in read_jsonl(tmp_path / "e" / "test.jsonl"):  # two terms of one digit, graded by the same config
        assert len(item.prompt.split("=")[0].split(":")[1].split()) == 3, item.prompt
        assert GRADERS["puzzle"](f"<answer>{item.answer}</answer>", item.reference) == 1.0
    for option, message in (
        ("chain_sum.max_term=2", "chain_sum has no field 'max_term'"),
        ("chain_sum.max_terms=0", "max_terms must be >= min_terms"),
        ("chain_sum.max_terms=many", "chain_sum: bad configuration {'max_terms': 'many'}"),
        ("word_sorting.min_words=2", "options for word_sorting, which is not generated"),
    ):
        refused = run("data", "puzzles", "--out", str(out), "--dataset", "chain_sum", "--option", option)
        assert refused.returncode == 2 and message in " ".join(refused.stderr.replace("│", " ").split()), option
