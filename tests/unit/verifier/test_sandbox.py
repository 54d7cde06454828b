"""Each confinement layer holds against a grader that runs the answer as Python."""

import re
import socket
from pathlib import Path

import pytest

from services.common.schemas import VerdictStatus
from services.verifier.pool import GraderPool
from services.verifier.sandbox import Limits


@pytest.fixture(scope="module")
def pool():
    pool = GraderPool(workers=1, timeout_s=5.0, graders="tests.helpers.graders", limits=Limits(address_space_mb=1024))
    yield pool
    pool.close()


def run(pool, code):
    return pool.grade("exec", code, "")


def test_every_layer_is_in_place(pool):
    report = pool.sandbox
    assert report["network"].startswith("new")
    assert report["filesystem"].startswith("landlock")
    assert report["syscalls"].startswith("seccomp")
    assert Path(report["workdir"]).name.startswith("passk-grader-")


def test_the_worker_writes_in_its_own_directory_and_nowhere_else(pool, tmp_path):
    assert run(pool, "open('scratch', 'w').write('x'); ok = open('scratch').read() == 'x'").status == "correct"
    outside = tmp_path / "escape"
    verdict = run(pool, f"open({str(outside)!r}, 'w').write('x')")
    assert verdict.status == VerdictStatus.GRADER_ERROR and "PermissionError" in verdict.detail
    assert not outside.exists()


def test_no_reads_outside_the_python_installation(pool):
    verdict = run(pool, "open('/etc/hostname').read()")
    assert verdict.status == VerdictStatus.GRADER_ERROR and "PermissionError" in verdict.detail


def test_no_network(pool):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        verdict = run(pool, f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert verdict.status == VerdictStatus.GRADER_ERROR
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_no_new_processes(pool, tmp_path):
    assert "PermissionError" in run(pool, "import os; os.fork()").detail
    marker = tmp_path / "ran"
    verdict = run(pool, f"import os; ok = os.system('touch {marker}') == 0")
    assert verdict.status == VerdictStatus.WRONG and not marker.exists()
    verdict = run(pool, f"import subprocess; subprocess.run(['touch', '{marker}'])")
    assert verdict.status == VerdictStatus.GRADER_ERROR and not marker.exists()


def test_limits_hold_and_cannot_be_raised(pool):
    verdict = run(pool, "x = bytearray(2 << 30)")  # over the 1 GiB address space
    assert verdict.status == VerdictStatus.GRADER_ERROR and "MemoryError" in verdict.detail
    verdict = run(pool, "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert verdict.status == VerdictStatus.GRADER_ERROR
    verdict = run(pool, "import os; os.kill(os.getppid(), 9)")
    assert verdict.status == VerdictStatus.GRADER_ERROR and "PermissionError" in verdict.detail
    assert run(pool, "ok = 1").status == VerdictStatus.CORRECT  # the same worker goes on


def test_a_busy_loop_is_killed_at_the_wall_clock_limit(pool):
    verdict = run(pool, "while True: pass")
    assert verdict.status == VerdictStatus.TIMEOUT
    assert run(pool, "ok = 1").status == VerdictStatus.CORRECT  # a fresh worker took its place


def test_a_worker_cannot_reach_the_parent_through_its_replies(pool, tmp_path):
    """Hostile code finds the worker's pipe and sends a pickle that would run a command when unpickled:
    the parent reads replies as JSON only, calls it a bad reply and retires the worker."""
    marker = tmp_path / "parent-pwned"
    code = f"""
import gc, os, pickle
from multiprocessing.connection import Connection
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
[conn] = [o for o in gc.get_objects() if isinstance(o, Connection)]
conn.send(Payload())
ok = 1
"""
    before = pool.restarts["bad_reply"]
    verdict = run(pool, code)
    assert verdict.status == VerdictStatus.GRADER_ERROR and "bad reply" in verdict.detail
    assert not marker.exists()
    assert pool.restarts["bad_reply"] == before + 1
    assert run(pool, "ok = 1").status == VerdictStatus.CORRECT


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x80\x04K\x01.", "JSON pair"),
        (b"[[], 0.1]", "1 to 2 replies"),
        (b'[[["ok", 1.0, "", 0.1], ["ok", 1.0, "", 0.1], ["ok", 1.0, "", 0.1]], 0.1]', "1 to 2 replies"),
        (b'[[["correct", 1.0, "", 0.1]], 0.1]', "bad status"),
        (b'[[["ok", 7.0, "", 0.1]], 0.1]', "not in [0, 1]"),
        (b'[[["ok", NaN, "", 0.1]], 0.1]', "not in [0, 1]"),
        (b'[[["ok", 1.0, "", -1]], 0.1]', "not a duration"),
        (b'[[["ok", 1.0]], 0.1]', "not [status, reward, detail, seconds]"),
    ],
)
def test_replies_are_checked_field_by_field(raw, message):
    from services.verifier.pool import parse_reply

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_reply(raw, 2)
    assert parse_reply(b'[[["ok", 1, "", 0.5], ["grader_error", 0.0, "x", 0.1]], 3]', 2) == (
        [("ok", 1.0, "", 0.5), ("grader_error", 0.0, "x", 0.1)],
        3.0,
    )


def test_rewriting_the_progress_record_does_not_buy_time(pool):
    """Hostile code keeps moving its own start time forward: the service's own clock still ends it."""
    code = """
import gc, time
[record] = [o for o in gc.get_objects() if type(o).__name__ == "c_double_Array_2"]
while True:
    record[1] = time.monotonic() + 3600.0
    time.sleep(0.01)
"""
    verdict = run(pool, code)
    assert verdict.status == VerdictStatus.TIMEOUT
    assert verdict.elapsed < 2 * pool.timeout_s + 1.0
    assert run(pool, "ok = 1").status == VerdictStatus.CORRECT
