"""Faults injected into the running local cluster, one at a time and mid-step: a verifier killed
while it holds groups, a replica frozen while it holds jobs (then thawed, its late work arriving
as duplicates), Redis killed and restarted from its append-only file. After each the run
finishes, every scheduled job is trained on exactly once, and the metrics show the recovery.
(A replica killed mid-step: test_loop.py; the trainer killed and resumed: test_resume.py.)

Each test prints a line ``RELIABILITY | fault | ...`` with what it measured; docs/RELIABILITY.md
holds them (``pytest tests/integration/test_faults.py -s -q | grep RELIABILITY``)."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.common.redis_server import RedisServer, free_port
from services.common.schemas import PromptJob
from services.common.streams import publish
from tests.helpers.cluster import maze_data, trainer_args
from tests.helpers.holding import LONG_BLOCK_MS, blocked_read, stop_holding
from tests.helpers.monitoring import scrape
from tests.helpers.procs import service, stop, wait_for

pytestmark = pytest.mark.slow

STEPS, PROMPTS, CLAIM_IDLE_MS, MAX_DELIVERIES = 8, 4, 1000, 5


@dataclass
class Cluster:
    tmp: Path
    redis: RedisServer
    verifiers: list = field(default_factory=list)  # (process, url)
    replicas: list = field(default_factory=list)  # (process, url)
    trainer: subprocess.Popen | None = None
    trainer_url: str = ""
    seen: dict[int, float] = field(default_factory=dict)  # step -> when its metrics line appeared

    @property
    def log(self) -> Path:
        return self.tmp / "logs" / "trainer.log"

    def rows(self) -> list[dict]:
        path = self.tmp / "run" / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def watch(self, until, timeout_s: float = 300) -> None:
        """Note when each step finishes until ``until()`` holds."""
        deadline = time.monotonic() + timeout_s
        while True:
            for row in self.rows():
                self.seen.setdefault(row["step"], time.monotonic())
            if until():
                return
            assert self.trainer.poll() in (None, 0), self.log.read_text()[-3000:]
            tail = self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"timed out; steps seen {sorted(self.seen)}\n{tail}"
            time.sleep(0.05)

    def note(self) -> None:
        """Take note of the steps finished so far (before a fault)."""
        self.watch(lambda: True)

    def stall_first_step(self) -> int:
        """Freeze the verifier ``v0`` (started ``stoppable``: it reads with a long block) in its read
        before the first step can end: Redis hands it one of step 1's groups, which it holds unseen,
        so the step waits however fast the run would go (a run with ``eval_at_start = false``: the
        first evaluation would wait instead). Returns, with the step's every other group waiting
        unread in the rollout stream, how many groups it holds."""
        v0 = self.verifiers[0][0]
        holding = stop_holding(v0.pid, self.redis.client, connection="passk-verifier:v0", stream="passk:rollouts",
                               group="verifier", consumer="v0")  # fmt: skip
        wait_for(lambda: sum(b"-s1-" in f[b"data"] for _, f in self.redis.client.xrange("passk:rollouts")) >= PROMPTS,
                 120, 0.05, what="every group of step 1 published")  # fmt: skip
        return holding

    def kill_redis(self) -> float:
        """SIGKILL Redis; returns when it died."""
        self.note()
        self.redis.process.kill()
        self.redis.process.wait()
        return time.monotonic()

    def finish(self, timeout_s: float = 300) -> list[dict]:
        self.watch(lambda: self.trainer.poll() is not None, timeout_s)
        assert self.trainer.returncode == 0, self.log.read_text()[-3000:]
        return self.rows()

    def recovery(self, fault_at: float, rows: list[dict]) -> tuple[float, float, float]:
        """(seconds from the fault to the next finished step, how long that step took, the median step)."""
        step, seen = min(((s, t) for s, t in self.seen.items() if t > fault_at), key=lambda st: st[1])
        return seen - fault_at, rows[step - 1]["step_s"], statistics.median(row["step_s"] for row in rows)


@contextmanager
def cluster(tmp_path, tiny_model, *, verifiers: int = 1, replicas: int = 2, stoppable: str = "", max_jobs: int = 2,
            **trainer: object):  # fmt: skip
    """``stoppable`` names the service (``v0``, ``r0``, ...) the test stops in a read (it reads with a
    long block; see tests/helpers/holding.py); ``max_jobs``: each replica's jobs at once; ``trainer``:
    more trainer settings."""
    logs = maze_data(tmp_path, test_per_size=2, seed=5)
    redis_server = RedisServer(tmp_path / "redis")
    run = Cluster(tmp_path, redis_server)
    common = ["--redis-url", redis_server.url, "--claim-idle-ms", str(CLAIM_IDLE_MS)]
    env = {"PASSK_ROLLOUT_MAX_DELIVERIES": str(MAX_DELIVERIES), "PASSK_VERIFIER_MAX_DELIVERIES": str(MAX_DELIVERIES)}
    try:
        with ExitStack() as stack:
            for i in range(verifiers):
                own = {**env, "PASSK_VERIFIER_CONSUMER": f"v{i}"}
                if stoppable == f"v{i}":
                    own["PASSK_VERIFIER_BLOCK_MS"] = LONG_BLOCK_MS
                args = ["serve", "verifier", *common]
                run.verifiers.append(stack.enter_context(service(args, logs / f"v{i}.log", env=own)))
            for i in range(replicas):
                own = {**env, "PASSK_ROLLOUT_BLOCK_MS": LONG_BLOCK_MS} if stoppable == f"r{i}" else env
                args = ["serve", "rollout", "--model-dir", str(tiny_model), "--replica", f"r{i}", "--max-jobs",
                        str(max_jobs)]  # fmt: skip
                run.replicas.append(stack.enter_context(service([*args, *common], logs / f"r{i}.log", env=own)))
            port = free_port()
            command = trainer_args(
                # the last verifier grades evaluations (a Service would route around a dead one)
                tmp_path, redis_server.url, run.verifiers[-1][1], tiny_model, steps=STEPS, prompts_per_step=PROMPTS,
                n_rollout=8, k=4, min_replicas=replicas, push_timeout_s=5, metrics_port=port, checkpoint_every=0,
                **trainer,
            )  # fmt: skip
            with run.log.open("ab") as out:
                run.trainer = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            run.trainer_url = f"http://127.0.0.1:{port}/metrics"
            try:
                yield run
            finally:
                stop(run.trainer)
    finally:
        run.redis.stop()


def assert_every_job_trained_once(rows: list[dict], steps: int = STEPS) -> None:
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    jobs = [job for row in rows for job in row["trained_jobs"]]
    assert len(jobs) == steps * PROMPTS and len(set(jobs)) == len(jobs), jobs
    # sync mode: step s trained exactly the jobs scheduled for it, nothing older and nothing lost
    for row in rows:
        assert sorted(int(job.rsplit("-", 1)[1]) for job in row["trained_jobs"]) == list(range(PROMPTS))
        assert all(f"-s{row['step']}-" in job for job in row["trained_jobs"])


def report(fault: str, recovery: tuple[float, float, float], extra: str) -> None:
    after, hit, median = recovery
    print(f"\nRELIABILITY | {fault} | next step done {after:.1f} s after the fault; it took {hit:.1f} s"
          f" (median step {median:.1f} s) | jobs lost 0, trained twice 0 | {extra}")  # fmt: skip


def test_a_verifier_killed_holding_groups(tmp_path, tiny_model):
    with cluster(tmp_path, tiny_model, verifiers=2, stoppable="v0") as run:
        run.watch(lambda: 2 in run.seen)
        victim, _ = run.verifiers[0]
        where = {"stream": "passk:rollouts", "group": "verifier", "consumer": "v0"}
        held = stop_holding(victim.pid, run.redis.client, connection="passk-verifier:v0", **where)
        run.note()  # what finished so far finished before the fault
        os.killpg(victim.pid, signal.SIGKILL)  # with its grader processes
        fault_at = time.monotonic()
        rows = run.finish()
        survivor = scrape(f"{run.verifiers[1][1]}/metrics")
    assert_every_job_trained_once(rows)
    assert survivor["passk_verifier_groups_claimed_total"] >= held
    report("verifier SIGKILL", run.recovery(fault_at, rows), f"{held} held groups claimed by the other verifier")


def test_a_frozen_replica_is_presumed_dead_and_its_late_work_not_trained_twice(tmp_path, tiny_model):
    with cluster(tmp_path, tiny_model, stoppable="r0") as run:
        run.watch(lambda: 2 in run.seen)
        frozen, _ = run.replicas[0]
        where = {"stream": "passk:prompts", "group": "rollout", "consumer": "r0"}
        held = stop_holding(frozen.pid, run.redis.client, connection="passk-rollout:r0", **where)
        run.note()
        fault_at = time.monotonic()
        frozen_step = max(run.seen)
        run.watch(lambda: frozen_step + 2 in run.seen)  # two steps without it
        os.kill(frozen.pid, signal.SIGCONT)  # it wakes up and finishes jobs the other replica already did
        rows = run.finish()
        other = scrape(f"{run.replicas[1][1]}/metrics")
        log = run.log.read_text()
    assert_every_job_trained_once(rows)
    assert other["passk_rollout_jobs_claimed_total"] >= held
    assert "skipped scored group" in log  # the thawed replica's duplicates, dropped by the dedupe key
    report("rollout replica SIGSTOP", run.recovery(fault_at, rows),
           f"{held} held jobs claimed after {CLAIM_IDLE_MS} ms idle; its late groups skipped")  # fmt: skip


def test_redis_killed_and_restarted_from_its_append_only_file(tmp_path, tiny_model):
    # killed while step 1 waits on a group the frozen verifier holds, the others in the rollout stream
    with cluster(tmp_path, tiny_model, stoppable="v0", eval_at_start="false") as run:
        port, workdir = run.redis.port, tmp_path / "redis"
        run.stall_first_step()
        fault_at = run.kill_redis()
        time.sleep(2)
        run.redis = RedisServer(workdir, port=port)
        os.kill(run.verifiers[0][0].pid, signal.SIGCONT)
        rows = run.finish()
        replicas = [scrape(f"{url}/metrics") for _, url in run.replicas]
        log = run.log.read_text()
    assert_every_job_trained_once(rows)
    assert "(lost by Redis)" not in log  # the AOF brought every entry back
    # the replicas ran through the outage (the frozen verifier finds a new connection when it wakes)
    assert all(r["passk_rollout_redis_errors_total"] >= 1 for r in replicas)
    report("Redis SIGKILL, restart after 2 s", run.recovery(fault_at, rows), "streams and pending entries restored")


def test_redis_losing_its_last_writes_loses_no_job(tmp_path, tiny_model):
    # step 1 waits on the group the frozen verifier holds; its other groups wait unread in the
    # rollout stream. Redis dies and comes back without them (its AOF cut back to before step 1's
    # first job, as if those writes never reached the disk): the held group comes back with the
    # verifier, the other jobs are in no stream
    with cluster(tmp_path, tiny_model, lost_job_check_s=2, stoppable="v0", eval_at_start="false") as run:
        port, workdir = run.redis.port, tmp_path / "redis"
        holding = run.stall_first_step()
        fault_at = run.kill_redis()
        (incr,) = (workdir / "appendonlydir").glob("*.incr.aof")
        data = incr.read_bytes()
        cut = data.rindex(b"\r\n*", 0, data.index(b"-s1-")) + 2  # the start of that command
        incr.write_bytes(data[:cut])
        run.redis = RedisServer(workdir, port=port)
        for stream in ("passk:prompts", "passk:rollouts"):
            assert not any(b"-s1-" in f[b"data"] for _, f in run.redis.client.xrange(stream))
        os.kill(run.verifiers[0][0].pid, signal.SIGCONT)
        rows = run.finish()
    log = run.log.read_text()
    lost = log.count("(lost by Redis): scheduled again as")
    # the held group's job too, when the trainer looks before the verifier's score is back
    assert PROMPTS - holding <= lost <= PROMPTS, log[-3000:]
    # each of step 1's jobs trained once: as itself (the held group) or as its new copy
    originals = [re.sub(r"-l\d+$", "", job) for row in rows for job in row["trained_jobs"]]
    assert sorted(originals) == sorted({*originals}) and len(originals) == STEPS * PROMPTS
    assert sum(bool(re.search(r"-l\d+$", job)) for job in rows[0]["trained_jobs"]) >= PROMPTS - holding
    assert_every_job_trained_once([{**row, "trained_jobs": [re.sub(r"-l\d+$", "", j) for j in row["trained_jobs"]]}
                                   for row in rows])  # fmt: skip
    report("Redis SIGKILL, its AOF cut back to before the step's jobs", run.recovery(fault_at, rows),
           f"{lost} lost jobs found in no stream after {2} s without progress and scheduled again")  # fmt: skip


def test_poison_messages_go_to_the_dead_letters_and_training_goes_on(tmp_path, tiny_model):
    with cluster(tmp_path, tiny_model) as run:
        client = run.redis.client
        run.watch(lambda: 1 in run.seen)
        garbage = client.xadd("passk:prompts", {"data": b"\xff not json"}).decode()
        empty = client.xadd("passk:prompts", {"other": b"x"}).decode()
        job = PromptJob(job_id="poison-long", prompt_id="p", task="maze", policy_version=0, prompt="*" * 5000,
                        reference="S.E", n=2)  # fmt: skip
        too_long = publish(client, "passk:prompts", job)
        # a job whose consumers keep dying: delivered again and again, never acked. The replicas
        # pause while a consumer that then "dies" takes it, so that it is the only one to read it.
        replicas = [process for process, _ in run.replicas]
        while True:
            for process in replicas:
                os.kill(process.pid, signal.SIGSTOP)
            if not int(client.xinfo_groups("passk:prompts")[0]["lag"]):
                break
            for process in replicas:
                os.kill(process.pid, signal.SIGCONT)
            time.sleep(0.02)
        # a read a replica started before it stopped still waits in Redis and would take the new
        # entry: wait until Redis has ended those reads (block_ms, 1 s)
        stopped_reads = lambda: [blocked_read(client, f"passk-rollout:r{i}") for i in range(len(replicas))]  # noqa: E731
        wait_for(lambda: not any(stopped_reads()), 60, 0.05)
        killer = publish(client, "passk:prompts", job.model_copy(update={"job_id": "poison-killer", "prompt": "S.E"}))
        ((_, [(taken, _)]),) = client.xreadgroup("rollout", "doomed", {"passk:prompts": ">"}, count=1)
        assert taken.decode() == killer
        for _ in range(MAX_DELIVERIES):  # each takeover by another consumer that dies in turn
            client.xclaim("passk:prompts", "rollout", "doomed", min_idle_time=0, message_ids=[killer])
        for process in replicas:
            os.kill(process.pid, signal.SIGCONT)
        rows = run.finish()
        dead = {
            fields[b"entry_id"].decode(): fields[b"reason"].decode()
            for _, fields in client.xrange("passk:prompts:dead")
        }
        counts = [scrape(f"{url}/metrics")["passk_rollout_jobs_dead_lettered_total"] for _, url in run.replicas]
    assert_every_job_trained_once(rows)
    assert set(dead) == {garbage, empty, too_long, killer}, dead
    assert "invalid PromptJob" in dead[garbage] and "no 'data' field" in dead[empty]
    assert "exceeds the context" in dead[too_long]
    assert f"delivered {MAX_DELIVERIES + 2} times (max {MAX_DELIVERIES})" in dead[killer]
    assert sum(counts) == 4
