"""Each confinement layer holds against a grader that runs the answer as Python."""

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
