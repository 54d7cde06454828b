"""Red team: a model's answer is code, run inside a grader, against a verifier started from
``/`` as ``python -m services.cli`` (as ``passk up`` starts it), as root and as an
unprivileged user.

The vector is reasoning-gym's ``n_queens`` scorer, which ``eval``s the answer: an answer
``exec(...)`` runs Python in the grader. A probe reports what it managed by raising
``SystemExit(PROBE + json)``, which comes back in its verdict's detail. Each test is one
finding of the red-team report (issue 16); each asserts the outcome an attacker wants did
not happen, not that a particular layer said no.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import resource
import socket
import subprocess
import sys
import termios
import threading
from pathlib import Path

import httpx
import pytest

from services.common.config import StreamNames
from services.common.processes import stop, wait_healthy
from services.common.redis_server import RedisServer, free_port
from services.common.schemas import PromptJob, RolloutGroup, Sample, ScoredGroup
from services.common.streams import publish
from services.tasks.puzzles import generate
from tests.helpers.procs import wait_for

TOKEN = "redteam-secret-token-5b2f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 3.0
STREAMS = StreamNames()
MAZE = "*****\n*S*E*\n*.*.*\n*...*\n*****"  # only D D R R U U leads from S to E
PROBE = "PROBE:"
NOBODY = 65534
USERS = ["root", "nobody"]


def _queens_reference() -> str:
    [(config, entry)] = generate("n_queens", 1, seed=3)
    return json.dumps({"dataset": "n_queens", "config": config, "entry": entry}, default=list)


QUEENS = _queens_reference()


def code_answer(code: str) -> str:
    """An answer that runs ``code`` in the grader (n_queens evals the answer)."""
    return f"<answer>exec({code!r}, {{}})</answer>"


def probe_answer(body: str) -> str:
    """``body`` fills the dict ``r``; the probe sends it back through the verdict's detail."""
    code = "import json, os\nr = {}\n" + body + f"\nraise SystemExit({PROBE!r} + json.dumps(r))"
    return code_answer(code)


def attempt(name: str, expr: str) -> str:
    """Probe lines that record whether ``expr`` worked ("ok") or which error stopped it."""
    return f"try:\n    {expr}\n    r[{name!r}] = 'ok'\nexcept BaseException as e:\n    r[{name!r}] = type(e).__name__\n"


def probe_result(verdict: dict) -> dict:
    detail = verdict["detail"]
    assert PROBE in detail, f"the probe did not report: {verdict}"
    return json.loads(detail.split(PROBE, 1)[1])


# --- the service under attack ---------------------------------------------------------------


def _prepare(nofile: int | None, terminal: bool):
    def preexec() -> None:
        if terminal:  # a session of its own with the terminal on stdin as its controlling tty
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if nofile is not None:  # the common default soft limit, under which the flood of finding 5 bit
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    return preexec


def as_nobody(cmd: list[str], stage: Path) -> list[str]:
    """``cmd`` as uid/gid 65534 with no groups. When the Python installation lies below a directory other
    users cannot enter (pyenv under /root, 0700), it is made reachable in a mount namespace of the
    command's own: a tmpfs over that directory with the installation bound back into it. The host's
    mounts and permissions are untouched."""
    demote = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *cmd]
    real = Path(os.path.realpath(sys.base_prefix))
    blocked = next((p for p in [*reversed(real.parents), real] if not os.stat(p).st_mode & 0o001), None)
    if blocked is None:
        return demote
    inside = real.parents[len(real.parents) - len(blocked.parts) - 1] if blocked != real else real
    script = (
        'set -e; mount --bind "$1" "$2"; mount -t tmpfs -o mode=755 tmpfs "$3"; mkdir -p "$4"; '
        'mount --bind "$2" "$4"; shift 4; exec "$@"'
    )
    stage.mkdir(exist_ok=True)
    args = [str(inside), str(stage), str(blocked), str(inside)]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args, *demote]


@contextlib.contextmanager
def verifier(
    tmp: Path,
    user: str,
    redis_url: str,
    *,
    stdio: int | None = None,
    nofile: int | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
):
    """``python -m services.cli serve verifier`` from ``/``, as ``user``; yields (process, url, log)."""
    port = free_port()
    log = tmp / f"verifier-{port}.log"
    cmd = [sys.executable, "-m", "services.cli", "serve", "verifier", "--redis-url", redis_url, "--port", str(port)]
    cmd += ["--workers", "2", "--timeout-s", str(TIMEOUT_S), *(extra or [])]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PASSK_VERIFIER_API_TOKEN": TOKEN, **(env or {})}
    if user == "nobody":
        cmd = as_nobody(cmd, tmp / f"python-{port}")
    with log.open("ab") as out:
        process = subprocess.Popen(
            cmd,
            cwd="/",
            env=full_env,
            stdin=stdio if stdio is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=stdio if stdio is not None else subprocess.STDOUT,
            start_new_session=stdio is None,
            preexec_fn=_prepare(nofile, stdio is not None),  # noqa: PLW1509  (the test's own threads hold no locks here)
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, log, 180)
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout_s=180)
        yield process, url, log
    finally:
        stop(process)


@pytest.fixture(scope="module", params=USERS)
def target(request, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"redteam-{request.param}")
    os.chmod(tmp, 0o777)
    with verifier(tmp, request.param, redis_server.url) as (process, url, log):
        yield request.param, process, url, log, tmp


def grade(url: str, task: str, reference: str, responses: list[str], timeout: float = 600) -> list[dict]:
    body = {"task": task, "reference": reference, "responses": responses}
    reply = httpx.post(f"{url}/v1/grade", json=body, headers=AUTH, timeout=timeout)
    assert reply.status_code == 200, reply.text[:500]
    return reply.json()["verdicts"]


def probe(url: str, body: str) -> dict:
    [verdict] = grade(url, "puzzle", QUEENS, [probe_answer(body)])
    return probe_result(verdict)


def assert_still_grading(url: str) -> None:
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert [v["status"] for v in grade(url, "maze", MAZE, ["<answer>DDRRUU</answer>", "<answer>R</answer>"])] == [
        "correct",
        "wrong",
    ]
    math = grade(url, "math", "24", ["\\boxed{24}", "\\boxed{25}"])
    assert [v["status"] for v in math] == ["correct", "wrong"], math


def test_the_probe_runs_code_in_the_grader(target):
    """The premise of the suite: an n_queens answer is executed (else every test below is hollow)."""
    _, _, url, _, _ = target
    assert probe(url, "r['ran'] = 6 * 7") == {"ran": 42}


# --- 1. the terminal ---------------------------------------------------------------------------


@pytest.mark.parametrize("user", USERS)
def test_1_no_keystrokes_into_the_services_terminal(user, redis_server, tmp_path):
    """The verifier runs on a terminal (its controlling tty, its stdin and stderr); a grader that
    pushes characters into that terminal's input (TIOCSTI) must not get them there."""
    os.chmod(tmp_path, 0o777)
    master, slave = pty.openpty()
    os.chmod(os.ttyname(slave), 0o666)

    marker = "touch-redteam-tty-marker"
    # through ctypes, which the graders' process has loaded anyway: fcntl or termios might not be importable
    body = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    body += (
        f"def push(fd):\n    for c in {marker.encode()!r}:\n"
        "        assert libc.ioctl(fd, 0x5412, ctypes.c_char_p(bytes([c]))) == 0, ctypes.get_errno()\n"
    )
    for fd in (0, 1, 2):
        body += attempt(f"fd{fd}", f"push({fd})")  # 0x5412 is TIOCSTI
    body += attempt("devtty", "push(os.open('/dev/tty', os.O_RDWR))")
    try:
        with verifier(tmp_path, user, redis_server.url, stdio=slave) as (_, url, _):
            result = probe(url, body)
            assert_still_grading(url)
    finally:
        os.set_blocking(master, False)
        typed = b""
        with contextlib.suppress(BlockingIOError, OSError):
            typed = os.read(master, 1 << 16)
        os.set_blocking(slave, False)
        with contextlib.suppress(BlockingIOError, OSError):
            typed += os.read(slave, 1 << 16)
        os.close(master)
        os.close(slave)
    assert marker.encode() not in typed, result
    assert all(v != "ok" for v in result.values()), result


# --- 2. metadata, host names, devices, the kernel log ------------------------------------------


def test_2_no_metadata_changes_devices_or_kernel_log(target):
    user, _, url, _, tmp = target
    victim = tmp / "victim.txt"
    victim.write_text("x")
    os.chown(victim, NOBODY if user == "nobody" else 0, NOBODY if user == "nobody" else 0)
    os.chmod(victim, 0o644)
    before = os.stat(victim)
    host = socket.gethostname()
    v = str(victim)
    body = "import ctypes, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    body += attempt("chmod", f"os.chmod({v!r}, 0o777)")
    body += attempt("chown", f"os.chown({v!r}, 1234, 1234)")
    body += attempt("utime", f"os.utime({v!r}, (1, 1))")
    body += attempt("setxattr", f"os.setxattr({v!r}, 'user.redteam', b'1')")
    # the same name again: a harmless change if it goes through, yet it must not
    body += attempt("sethostname", f"assert libc.sethostname({host.encode()!r}, {len(host)}) == 0, ctypes.get_errno()")
    body += attempt("mknod", "os.mknod('null-device', 0o600 | 0o020000, os.makedev(1, 3))")  # /dev/null's numbers
    body += attempt(
        "kernel_log",
        "buf = ctypes.create_string_buffer(4096); n = libc.klogctl(3, buf, 4096); assert n > 0, ctypes.get_errno()",
    )
    body += attempt("kmsg", "open('/dev/kmsg', 'rb').read(100)")
    result = probe(url, body)
    assert all(outcome != "ok" for outcome in result.values()), result
    after = os.stat(victim)
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
        before.st_mtime,
    )
    assert os.listxattr(victim) == []
    assert_still_grading(url)


# --- 3. one answer setting other answers' rewards, or reading other requests --------------------

PATCH_GRADERS = """
import sys
for name, module in list(sys.modules.items()):
    table = getattr(module, 'GRADERS', None)
    if isinstance(table, dict):
        for key in list(table):
            table[key] = lambda r, g: 1.0
"""

RECORD_GOLDS = """
import sys, builtins
seen = builtins.__dict__.setdefault('_redteam_seen', [])
for name, module in list(sys.modules.items()):
    table = getattr(module, 'GRADERS', None)
    if isinstance(table, dict):
        for key, grader in list(table.items()):
            def spy(r, g, _grader=grader):
                seen.append(g[:60])
                return _grader(r, g)
            table[key] = spy
"""

READ_GOLDS = (
    "import builtins\n"
    "seen = [g for g in builtins.__dict__.get('_redteam_seen', []) if '7919' in g]\n"
    "raise SystemExit('PROBE:' + repr(seen) + ' of ' + str(len(builtins.__dict__.get('_redteam_seen', []))))"
)


def test_3_an_answer_cannot_set_the_rewards_of_later_answers(target):
    _, _, url, _, _ = target
    # enough copies that every grader process runs one, whichever gets which
    grade(url, "puzzle", QUEENS, [code_answer(PATCH_GRADERS)] * 8)
    wrong = {
        "maze": (MAZE, "<answer>R</answer>"),
        "math": ("24", "\\boxed{25}"),
        "puzzle": (QUEENS, "<answer>x</answer>"),
    }
    for task, (reference, answer) in wrong.items():
        assert {v["status"] for v in grade(url, task, reference, [answer] * 4)} == {"wrong"}, task


def test_3_an_answer_cannot_set_the_rewards_of_its_siblings(target):
    """Siblings of one group are what a policy would flip: the patch first, wrong answers after it."""
    _, _, url, _, _ = target
    verdicts = grade(url, "puzzle", QUEENS, [code_answer(PATCH_GRADERS)] + ["<answer>x</answer>"] * 7)
    assert {v["status"] for v in verdicts[1:]} == {"wrong"}, verdicts


def test_3_forged_replies_on_the_graders_channel_are_not_taken(target):
    """The answer writes, on every descriptor it has, messages that would say the next answers are correct."""
    _, _, url, _, _ = target
    forge = (
        "import json, struct\n"
        "reply = json.dumps([[['ok', 1.0, '', 0.001]] * 8, 0.1]).encode()\n"
        "for fd in range(3, 64):\n"
        "    for message in (struct.pack('!i', len(reply)) + reply, reply):\n"
        "        try: os.write(fd, message)\n"
        "        except OSError: pass\n"
    )
    verdicts = grade(url, "puzzle", QUEENS, [code_answer(forge)] + ["<answer>x</answer>"] * 7)
    assert {v["status"] for v in verdicts[1:]} == {"wrong"}, verdicts


def test_3_an_answer_cannot_read_other_requests(target):
    _, _, url, _, _ = target
    grade(url, "puzzle", QUEENS, [code_answer(RECORD_GOLDS)] * 8)
    secret = "\\frac{7919}{104729}"
    grade(url, "math", secret, ["\\boxed{1}"] * 4)
    verdicts = grade(url, "puzzle", QUEENS, [code_answer(READ_GOLDS)] * 8)
    assert not any("7919" in v["detail"] for v in verdicts), verdicts


# --- 4. the time limit, defeated from inside ---------------------------------------------------

RESET_CLOCK = """
import gc, time
records = [o for o in gc.get_objects() if type(o).__name__ == 'c_double_Array_2']
while True:
    for record in records:
        record[0] = record[0] + 1
        record[1] = time.monotonic()
    time.sleep(0.01)
"""

TRUNCATED_HEADER = """
import os, struct, time
for fd in range(3, 64):
    try: os.write(fd, struct.pack('!i', 1000) + b'[')
    except OSError: pass
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("attack", [RESET_CLOCK, TRUNCATED_HEADER], ids=["reset-clock", "truncated-header"])
def test_4_the_time_limit_holds_against_the_grader(target, attack):
    """Both answers would run forever; each must end as a timeout and leave the service grading."""
    _, _, url, _, _ = target
    verdicts = grade(url, "puzzle", QUEENS, [code_answer(attack)] * 2, timeout=120)
    assert [v["status"] for v in verdicts] == ["timeout", "timeout"], verdicts
    assert_still_grading(url)


# --- 5. a flood of idle connections must not leave the service without graders ----------------


def test_5_idle_connections_do_not_empty_the_pool(tmp_path):
    """Under the common soft limit of 1,024 files, 1,100 idle connections are held while a grader times
    out and needs a replacement; afterwards the service must grade again with a full pool."""
    os.chmod(tmp_path, 0o777)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    # a Redis of its own: the module's verifiers would otherwise take the group from the one under test
    with (
        RedisServer(tmp_path / "redis") as redis_server,
        verifier(tmp_path, "root", redis_server.url, nofile=1024) as (
            _,
            url,
            _,
        ),
    ):
        client = redis_server.client
        port = int(url.rsplit(":", 1)[1])
        publish(client, STREAMS.rollouts, rollout_group("hang", "puzzle", QUEENS, [code_answer("while True: pass")]))
        idle = []
        try:
            for _ in range(1100):
                try:
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    break
            wait_for(lambda: "hang" in scored_groups(client), timeout_s=120)
        finally:
            for s in idle:
                s.close()
        assert_still_grading(url)
        wait_for(lambda: httpx.get(f"{url}/readyz").json()["graders"] >= 2, timeout_s=60)


# --- 6. the current directory ------------------------------------------------------------------


def test_6_nothing_outside_the_python_installation_is_readable(target):
    _, _, url, _, _ = target
    project = Path(__file__).resolve().parents[2]
    body = attempt("passwd", "open('/etc/passwd').read()")
    body += attempt("root", "os.listdir('/root')")
    body += attempt("project_env", f"open({str(project / '.env')!r}).read()")
    body += attempt("project_tests", f"os.listdir({str(project / 'tests')!r})")
    body += attempt("cwd_listing", "os.listdir('/')")
    body += attempt("proc", "open('/proc/1/cmdline').read()")
    result = probe(url, body)
    assert all(outcome != "ok" for outcome in result.values()), result


# --- 8. secrets --------------------------------------------------------------------------------


def test_8_the_services_secrets_do_not_reach_graders(target, redis_server):
    _, _, url, _, _ = target
    # only entries that hold the token's value, so that the detail's 500 characters hold them
    secretish = "[e for e in {} if 'redteam-secret' in e]"
    body = "r['environ'] = " + secretish.format("[f'{k}={v}' for k, v in os.environ.items()]") + "\n"
    for name, path in (("proc_environ", "'/proc/self/environ'"), ("parent_environ", "f'/proc/{os.getppid()}/environ'")):
        raw = f"open({path}, 'rb').read().decode(errors='replace').split(chr(0))"
        body += attempt(name, f"r[{name!r} + '_found'] = " + secretish.format(raw))
    [verdict] = grade(url, "puzzle", QUEENS, [probe_answer(body)])
    assert TOKEN not in json.dumps(verdict), verdict
    client = redis_server.client
    job = f"secret-{os.getpid()}"
    publish(client, STREAMS.rollouts, rollout_group(job, "puzzle", QUEENS, [probe_answer(body)]))
    scored = wait_for(lambda: scored_groups(client).get(job), timeout_s=120)
    assert TOKEN not in scored.model_dump_json()


# --- 9. the resource tracker -------------------------------------------------------------------


@pytest.mark.parametrize("user", USERS)
def test_9_graders_cannot_make_the_service_delete_files(user, redis_server, tmp_path):
    os.chmod(tmp_path, 0o777)
    victim = Path(f"/dev/shm/passk-redteam-{os.getpid()}-{user}")
    victim.write_text("keep me")
    if user == "nobody":  # /dev/shm is sticky: only the owner's processes may delete it
        os.chown(victim, NOBODY, NOBODY)
    message = f"REGISTER:/{victim.name}:shared_memory\n"
    body = f"for fd in range(3, 256):\n    try: os.write(fd, {message.encode()!r})\n    except OSError: pass\n"
    try:
        with verifier(tmp_path, user, redis_server.url) as (_, url, _):
            grade(url, "puzzle", QUEENS, [probe_answer(body)] * 4)
        assert victim.exists()  # the service and everything it started have stopped
    finally:
        victim.unlink(missing_ok=True)


# --- 10. the service's log ---------------------------------------------------------------------


def test_10_graders_cannot_write_the_services_log(target):
    _, _, url, log, _ = target
    marker = f"forged-log-line-{os.getpid()}"
    line = json.dumps({"level": "INFO", "logger": "services.verifier", "message": marker}) + "\n"
    body = f"for fd in (1, 2):\n    try: os.write(fd, {line.encode()!r} * 2000)\n    except OSError: pass\n"
    before = log.stat().st_size
    grade(url, "puzzle", QUEENS, [probe_answer(body)] * 2)
    assert_still_grading(url)
    assert marker not in log.read_text(errors="replace")
    assert log.stat().st_size - before < 100_000


# --- 11. budgets, fairness, cancellation -------------------------------------------------------


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def timeout_restarts(url: str) -> float:
    return metric(url, 'passk_verifier_worker_restarts_total{reason="timeout"}')


def test_11_a_slow_request_does_not_starve_others(target):
    """A request of 12 answers that each hit the limit is under way (its first timeout is seen); an
    innocent request sent then must be answered before the slow one is."""
    _, _, url, _, _ = target
    before = timeout_restarts(url)
    slow: dict = {}
    thread = threading.Thread(
        target=lambda: slow.setdefault("v", grade(url, "puzzle", QUEENS, [code_answer("while True: pass")] * 12))
    )
    thread.start()
    try:
        wait_for(lambda: timeout_restarts(url) > before, timeout_s=120)
        innocent = grade(url, "maze", MAZE, ["<answer>DDRRUU</answer>"])
        assert innocent[0]["status"] == "correct"
        assert "v" not in slow, "the innocent request waited for the slow one"
    finally:
        thread.join(600)


def test_11_a_request_has_a_grading_budget(redis_server, tmp_path):
    """With a budget of two time limits a request of 10 endless answers is not graded to its end: the
    answers left when the budget is spent fail without running."""
    os.chmod(tmp_path, 0o777)
    env = {"PASSK_VERIFIER_REQUEST_BUDGET_S": str(2 * TIMEOUT_S)}
    with verifier(tmp_path, "root", redis_server.url, env=env) as (_, url, _):
        verdicts = grade(url, "puzzle", QUEENS, [code_answer("while True: pass")] * 10)
        assert {v["status"] for v in verdicts} == {"timeout"}
        ran = [v for v in verdicts if "budget" not in v["detail"]]
        assert 1 <= len(ran) <= 4, verdicts  # the budget, plus what was under way when it ran out


def test_11_grading_stops_when_the_client_leaves(target):
    _, _, url, _, _ = target
    before = timeout_restarts(url)
    body = json.dumps({"task": "puzzle", "reference": QUEENS, "responses": [code_answer("while True: pass")] * 10})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/grade", content=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=1.0)
    wait_for(lambda: metric(url, "passk_verifier_answers_in_flight") == 0, timeout_s=120)
    assert timeout_restarts(url) - before <= 3  # what was under way when the client left
    assert_still_grading(url)


# --- 13. references that break graders ---------------------------------------------------------


def test_13_a_reference_with_lone_surrogates_is_an_invalid_request(target, redis_server):
    _, _, url, _, _ = target
    entry = json.loads(QUEENS)["entry"]
    # valid text, with \\udcxx escapes that JSON decoding turns into lone surrogates inside the grader
    key = "\\udcff" * 400
    reference = '{"dataset": "n_queens", "config": {"' + key + '": 1}, "entry": ' + json.dumps(entry) + "}"
    before = metric(url, 'passk_verifier_worker_restarts_total{reason="died"}')
    verdicts = grade(url, "puzzle", reference, ["<answer>x</answer>"] * 2)
    assert {v["status"] for v in verdicts} == {"invalid_request"}, verdicts
    assert metric(url, 'passk_verifier_worker_restarts_total{reason="died"}') == before


# --- 14. the queue consumer --------------------------------------------------------------------


def rollout_group(job_id: str, task: str, reference: str, texts: list[str]) -> RolloutGroup:
    job = PromptJob(
        job_id=job_id, prompt_id="p0", task=task, policy_version=1, prompt="q", reference=reference, n=len(texts)
    )
    samples = [Sample(text=t, token_ids=[1], logprobs=[-0.5]) for t in texts]
    return RolloutGroup(job=job, policy_version=1, prompt_token_ids=[1], samples=samples, replica="r0")


def scored_groups(client) -> dict[str, ScoredGroup]:
    entries = client.xrange(STREAMS.scored)
    return {g.group.job.job_id: g for g in (ScoredGroup.model_validate_json(f[b"data"]) for _, f in entries)}


def test_14_the_consumer_recovers_when_its_stream_is_deleted(target, redis_server):
    client = redis_server.client
    publish(client, STREAMS.rollouts, rollout_group("before-del", "maze", MAZE, ["<answer>DDRRUU</answer>"]))
    wait_for(lambda: "before-del" in scored_groups(client), timeout_s=120)
    client.delete(STREAMS.rollouts)
    publish(client, STREAMS.rollouts, rollout_group("after-del", "maze", MAZE, ["<answer>DDRRUU</answer>"]))
    scored = wait_for(lambda: scored_groups(client).get("after-del"), timeout_s=120)
    assert [v.status for v in scored.verdicts] == ["correct"]


def test_14_readyz_is_false_while_the_consumer_cannot_work(tmp_path):
    os.chmod(tmp_path, 0o777)
    redis_dir = tmp_path / "redis"
    server = RedisServer(redis_dir)
    try:
        with verifier(tmp_path, "root", server.url) as (_, url, _):
            port = server.port
            server.stop()
            wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 503, timeout_s=120)
            assert httpx.get(f"{url}/readyz").json()["consumer"] != "ok"
            server = RedisServer(redis_dir, port)
            wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout_s=120)
    finally:
        server.stop()


# --- /readyz -----------------------------------------------------------------------------------


def test_readyz_reports_each_sandbox_layer(target):
    _, _, url, _, _ = target
    body = httpx.get(f"{url}/readyz").json()
    layers = body["sandbox"]
    for layer in ("network", "filesystem", "syscalls", "privileges", "session", "limits"):
        assert layer in layers, layers
    assert str(NOBODY) in layers["privileges"], layers  # root's graders run as nobody; nobody's stay nobody


def test_readyz_is_false_with_no_live_grader(redis_server, tmp_path):
    """The graders' module refuses to load while a marker file exists: with the template process killed
    and no way to start another, /readyz must say not ready; once loading works again, ready."""
    os.chmod(tmp_path, 0o777)
    extra = ["--graders", "tests.helpers.refusing_graders"]
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # started from /: where tests/ is
    with verifier(tmp_path, "root", redis_server.url, extra=extra, env=env) as (process, url, _):
        marker = Path(f"/tmp/passk-refuse-graders-{process.pid}")  # what the module checks, from its parent's pid
        marker.touch()
        for pid in grader_processes(process.pid):
            os.kill(pid, 9)
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 503, timeout_s=120)
        assert httpx.get(f"{url}/readyz").json()["graders"] == 0
        marker.unlink()
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout_s=120)
        assert httpx.get(f"{url}/readyz").json()["graders"] >= 1
        assert_still_grading(url)


def grader_processes(service_pid: int) -> list[int]:
    """Every descendant of the service: its grader processes, whatever starts them."""
    found, frontier = [], [service_pid]
    while frontier:
        pid = frontier.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError):
                for child in (task / "children").read_text().split():
                    found.append(int(child))
                    frontier.append(int(child))
    return found
