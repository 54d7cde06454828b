"""Every preset in configs/ is a valid configuration, says what the paper's setting says, and bad
presets or overrides are refused with the field named."""

from pathlib import Path

import pytest

from services.launcher import ensure_preset_data, preset_data, preset_rollout_options
from services.trainer.config import load_settings, stage_at
from services.trainer.tiny_mixture import MATH_KINDS, PUZZLE_OPTIONS, PUZZLES, ROW_CYCLE

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_preset_loads(preset):
    settings = load_settings(preset)
    assert settings.k <= settings.n_rollout
    preset_rollout_options(preset)
    preset_data(preset)


def test_the_mixture_preset_writes_the_rows_its_model_learned():
    """configs/mixed-tiny.toml's data steps make the puzzles as the warm-up configured them, and
    each of its tasks' files comes from a data step."""
    preset = CONFIGS / "mixed-tiny.toml"
    settings, steps = load_settings(preset), {step.kind: step for step in preset_data(preset)}
    assert {Path(t.train).parent for t in settings.mixture} == {Path(step.out) for step in steps.values()}
    puzzles = steps["puzzles"].args
    datasets = [puzzles[i + 1] for i, arg in enumerate(puzzles) if arg == "--dataset"]
    assert sorted(datasets) == sorted(f"{dataset}={category}" for category, dataset in PUZZLES.items())
    options = [puzzles[i + 1] for i, arg in enumerate(puzzles) if arg == "--option"]
    assert sorted(options) == sorted(f"{d}.{f}={v}" for d, fields in PUZZLE_OPTIONS.items() for f, v in fields.items())
    math = steps["math"].args
    assert [math[i + 1] for i, arg in enumerate(math) if arg == "--kind"] == list(MATH_KINDS)
    assert "maze/7x7" in ROW_CYCLE and steps["maze"].args[:4] == ["--train-size", "7", "--test-size", "7"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[[data]]\nkind = 'poems'\nout = 'x'", "data[0].kind"),
        ("[[data]]\nkind = 'math'", "data[0].out: Field required"),
        ("[[data]]\nkind = 'math'\nout = 'x'\nargs = [1]", "data[0].args.0"),
        ("[[data]]\nkind = 'math'\nout = 'x'\nflags = []", "data[0].flags"),
        ("data = 'math'", "data must be an array of tables"),
    ],
)
def test_bad_data_steps_are_refused_naming_the_field(tmp_path, table, message):
    preset = tmp_path / "p.toml"
    preset.write_text(table + "\n")
    with pytest.raises(ValueError, match="data") as caught:
        preset_data(preset)
    assert message in str(caught.value)


def test_data_steps_write_what_is_missing_and_report_a_failed_command(tmp_path):
    out = tmp_path / "math"
    preset = tmp_path / "p.toml"
    args = "['--train-per-kind', '3', '--test-per-kind', '2', '--kind', 'linear']"
    preset.write_text(f"[[data]]\nkind = 'math'\nout = '{out}'\nargs = {args}\n")
    steps = preset_data(preset)
    assert steps[0].missing()
    ensure_preset_data(steps)
    assert len((out / "test.jsonl").read_text().splitlines()) == 2 and not steps[0].missing()
    (out / "train.jsonl").write_text("kept\n")
    ensure_preset_data(steps)  # present: not written again
    assert (out / "train.jsonl").read_text() == "kept\n"
    (out / "test.jsonl").unlink()
    bad = steps[0].model_copy(update={"args": ["--kind", "cubic"]})
    with pytest.raises(ValueError, match=r"(?s)data\[0\]: passk data math .*unknown kinds \['cubic'\]"):
        ensure_preset_data([bad])


def test_the_gpu_presets_carry_the_papers_settings():
    gpu = ("maze-passk", "maze-pass1", "maze-pk-then-p1", "enigmata-passk", "enigmata-pass1", "enigmata-pk-then-p1")
    for name in (f"qwen2.5-7b-{preset}" for preset in gpu):
        s = load_settings(CONFIGS / f"{name}.toml")
        assert (s.n_rollout, s.prompts_per_step, s.mini_batch_prompts, s.lr, s.warmup_steps) == (32, 128, 32, 1e-6, 10)
        assert (s.clip_low, s.clip_high, s.loss_aggregation, s.kl_coef, s.entropy_coef) == (0.2, 0.28, "token", 0, 0)
        assert preset_rollout_options(CONFIGS / f"{name}.toml") == ["--backend", "vllm"]
        assert s.fsdp and s.device == "cuda"
    for task in ("maze", "enigmata"):
        schedule = load_settings(CONFIGS / f"qwen2.5-7b-{task}-pk-then-p1.toml")
        steps = (1, 100, 101, 200, 201, 400)
        picked = [(stage_at(schedule, step).estimator, stage_at(schedule, step).k) for step in steps]
        assert picked == [("passk_analytic", 8), ("passk_analytic", 8), ("grpo", 1), ("grpo", 1),
                          ("passk_analytic", 8), ("grpo", 1)]  # fmt: skip
    for name, estimator, k in (("passk", "passk_analytic", 8), ("pass1", "grpo", 1)):
        s = load_settings(CONFIGS / f"qwen2.5-7b-enigmata-{name}.toml")
        assert (s.estimator, s.k, s.max_tokens) == (estimator, k, 4096)
        assert [(t.task, t.train, t.weight) for t in s.mixture] == [("puzzle", "data/puzzles/train.jsonl", 1.0)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mini_batch_prompts=64", "mini_batch_prompts=64 > prompts_per_step=16"),
        ("noise_rewards=1.5", "noise_rewards"),
        ("stages=[{estimator = 'grpo', steps = 10}]", "the stages add up to 10 steps, but steps=150"),
        ("mode='later'", "mode"),
        ("stages=[{estimator = 'passk_analytic', k = 64, steps = 150}]", "k=64 is larger than n_rollout=32"),
        ("k_anneal={k_end = 33, steps = 10}", "k_anneal.k_end=33 is larger than n_rollout=32"),
        ("k_anneal={k_end = 0, steps = 10}", "k_anneal.k_end"),
        ("k_anneal={k_end = 1, steps = 10, schedule = 'wavy'}", "k_anneal.schedule"),
        ("k_anneal={k_end = 1}", "k_anneal.steps"),
        ("entropy_advantage={alpha = 0}", "entropy_advantage.alpha"),
        ("entropy_advantage={alpha = 0.4, kappa = 1}", "entropy_advantage.kappa"),
        ("entropy_advantage={alpha = 0.4, beta = 1}", "entropy_advantage.beta"),
        ("top_entropy=0", "top_entropy"),
        ("top_entropy=1.5", "top_entropy"),
        ("covariance={kind = 'both'}", "covariance.kind"),
        ("covariance={kind = 'clip_cov', ratio = 0}", "covariance.ratio"),
        ("covariance={kind = 'clip_cov', lower = 5, upper = 1}", "covariance: lower \\(5.0\\) must be below upper"),
        ("covariance={kind = 'kl_cov', kl_coef = -1}", "covariance.kl_coef"),
        ("weights_fanout=-1", "weights_fanout"),
        ("weights_dtype='int8'", "weights_dtype"),
        ("weights_chunk_bytes=100", "weights_chunk_bytes"),
    ],
)
def test_bad_settings_are_refused_by_name(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", r"\+")):
        load_settings(CONFIGS / "maze-tiny.toml", [override])


def test_deltas_and_relays_are_one_or_the_other():
    assert load_settings(CONFIGS / "maze-tiny.toml", ["weights_delta=true"]).weights_delta
    assert load_settings(CONFIGS / "maze-tiny.toml", ["weights_fanout=2"]).weights_fanout == 2
    with pytest.raises(ValueError, match="weights_delta goes straight from the trainer"):
        load_settings(CONFIGS / "maze-tiny.toml", ["weights_delta=true", "weights_fanout=2"])


def test_the_token_level_options_are_one_line_each():
    from services.trainer.step import token_loss_options
    from services.trainer.token_shaping import Covariance

    plain = load_settings(CONFIGS / "maze-tiny.toml")
    assert token_loss_options(plain, 3, 0) == {}
    lines = ["entropy_advantage={alpha = 0.1}", "top_entropy=0.2", "covariance={kind = 'kl_cov', ratio = 0.002}"]
    options = token_loss_options(load_settings(CONFIGS / "maze-tiny.toml", lines), 3, 0)
    assert options["entropy_advantage"] == (0.1, 2.0) and options["top_entropy"] == 0.2
    assert options["covariance"] == Covariance("kl_cov", ratio=0.002, lower=1.0, upper=5.0, kl_coef=1.0)
    # Clip-Cov's draws: the same generator state for the same run, version and rank, not for others
    states = [token_loss_options(load_settings(CONFIGS / "maze-tiny.toml", lines), v, r)["generator"].initial_seed()
              for v, r in ((3, 0), (3, 0), (4, 0), (3, 1))]  # fmt: skip
    assert states[0] == states[1] and len(set(states)) == 3


def test_an_unknown_rollout_key_is_refused(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[trainer]\nsteps = 1\n[rollout]\nbackend = "vllm"\ngpus = 8\n')
    with pytest.raises(ValueError, match="gpus"):
        preset_rollout_options(preset)


def test_trainer_fields_come_from_passk_trainer_variables_between_preset_and_set():
    environ = {
        "PASSK_TRAINER_REDIS_URL": "redis://redis:6379/0", "PASSK_TRAINER_WEIGHTS_TOKEN": "0123",
        "PASSK_TRAINER_STEPS": "7", "PASSK_TRAINER_EVAL_K": "[1, 4]", "PASSK_VERIFIER_PORT": "1", "HOME": "/x",
    }  # fmt: skip
    settings = load_settings(Path("configs/maze-tiny.toml"), ["steps=9"], environ)
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.weights_token.get_secret_value() == "0123"  # digits stay a string: it is a token
    assert settings.eval_k == [1, 4]
    assert settings.steps == 9  # --set wins over the environment
    assert load_settings(Path("configs/maze-tiny.toml"), [], environ).steps == 7


def test_an_unknown_trainer_variable_is_refused_by_name():
    with pytest.raises(ValueError, match="PASSK_TRAINER_STPES: the trainer has no setting 'stpes'"):
        load_settings(Path("configs/maze-tiny.toml"), [], {"PASSK_TRAINER_STPES": "3"})


def test_tokens_never_print():
    environ = {"PASSK_TRAINER_WEIGHTS_TOKEN": "w-s3cret", "PASSK_TRAINER_VERIFIER_TOKEN": "v-s3cret"}
    settings = load_settings(Path("configs/maze-tiny.toml"), [], environ)
    shown = f"{settings!r} {settings} {settings.model_dump()} {settings.model_dump_json()}"
    assert "s3cret" not in shown and "**********" in shown


def test_k_anneals_from_the_runs_k_along_the_schedule():
    """PKPO's k schedule from one preset line: step 1 trains with the run's k, the last scheduled
    step and every later one with k_end."""
    linear = load_settings(CONFIGS / "maze-tiny.toml", ["estimator='pkpo'", "k_anneal={k_end = 1, steps = 14}"])
    assert [stage_at(linear, step).k for step in (1, 2, 8, 15, 16, 150)] == [8, 8, 4, 1, 1, 1]  # 4.5 rounds to 4
    switch = load_settings(CONFIGS / "maze-tiny.toml", ["k_anneal={k_end = 2, steps = 5, schedule = 'step'}"])
    assert [stage_at(switch, step).k for step in range(1, 9)] == [8, 8, 8, 8, 8, 2, 2, 2]
    assert stage_at(load_settings(CONFIGS / "maze-tiny.toml"), 100).k == 8  # none: k stays
    with pytest.raises(ValueError, match="k_anneal anneals the run's k; with stages"):
        load_settings(CONFIGS / "maze-tiny.toml", ["k_anneal={k_end = 1, steps = 5}", "steps=2",
                      "stages=[{estimator = 'grpo', steps = 2}]"])  # fmt: skip
