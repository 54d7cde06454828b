"""Each confinement layer holds against a grader that runs the answer as Python (the ``exec``
test grader: 1.0 if the code set ``ok``). Every answer runs in a fresh grader process."""

import json
import socket

import pytest

from services.common.schemas import VerdictStatus
from services.verifier.pool import GraderPool
from services.verifier.sandbox import UNPRIVILEGED_UID, Limits


@pytest.fixture(scope="module")
def pool():
    pool = GraderPool(workers=1, timeout_s=5.0, graders="tests.helpers.graders", limits=Limits(address_space_mb=1024))
    yield pool
    pool.close()


def run(pool, code):
    return pool.grade("exec", code, "")


def refused(verdict, error="PermissionError"):
    return verdict.status == VerdictStatus.GRADER_ERROR and error in verdict.detail


def test_the_report_names_every_layer_and_its_tested_effect(pool):
    report = pool.sandbox
    assert report["network"].startswith("new")
    assert report["filesystem"].startswith("landlock")
    assert report["syscalls"].startswith("seccomp")
    assert report["privileges"].startswith(f"uid {UNPRIVILEGED_UID}")
    assert report["session"].startswith("new session")
    effects = json.loads(report["effects"])
    assert effects and set(effects.values()) == {"refused"}, effects


def test_the_grader_writes_in_its_own_directory_and_nowhere_else(pool, tmp_path):
    assert run(pool, "open('scratch', 'w').write('x'); ok = open('scratch').read() == 'x'").status == "correct"
    outside = tmp_path / "escape"
    tmp_path.chmod(0o777)  # writable by the grader's uid too: only the sandbox stands in the way
    assert refused(run(pool, f"open({str(outside)!r}, 'w').write('x')"))
    assert not outside.exists()


def test_no_reads_outside_the_python_installation(pool):
    assert refused(run(pool, "open('/etc/hostname').read()"))
    assert refused(run(pool, "import os; os.listdir('/')"))


def test_no_network(pool):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        assert refused(run(pool, f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"))
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_no_new_processes(pool, tmp_path):
    assert refused(run(pool, "import os; os.fork()"))
    marker = tmp_path / "ran"
    tmp_path.chmod(0o777)
    verdict = run(pool, f"import os; ok = os.system('touch {marker}') == 0")
    assert verdict.status == VerdictStatus.WRONG and not marker.exists()
    assert refused(run(pool, f"import subprocess; subprocess.run(['touch', '{marker}'])"))
    assert not marker.exists()


def test_limits_hold_and_cannot_be_raised(pool):
    assert refused(run(pool, "x = bytearray(2 << 30)"), "MemoryError")  # over the 1 GiB address space
    assert refused(run(pool, "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))"), "Error")
    assert refused(run(pool, "import os; os.kill(os.getppid(), 9)"))
    assert run(pool, "ok = 1").status == VerdictStatus.CORRECT


def test_no_terminal_metadata_or_privilege(pool, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("x")
    tmp_path.chmod(0o777)
    victim.chmod(0o666)
    assert refused(run(pool, "import fcntl, termios; fcntl.ioctl(2, termios.TIOCSTI, b'x')"), "Error")
    assert refused(run(pool, f"import os; os.chmod({str(victim)!r}, 0o777)"))
    assert refused(run(pool, f"import os; os.utime({str(victim)!r}, (1, 1))"))
    assert refused(run(pool, "import os; os.mknod('dev', 0o600 | 0o020000, os.makedev(1, 3))"))
    assert run(pool, "import os; ok = os.getuid() != 0 and not os.environ.get('PATH')").status == "correct"
    assert run(pool, "import os; ok = not os.isatty(0) and os.getsid(0) == os.getpid()").status == "correct"
    assert victim.stat().st_mode & 0o777 == 0o666


def test_a_busy_loop_is_killed_at_the_wall_clock_limit(pool):
    verdict = run(pool, "while True: pass")
    assert verdict.status == VerdictStatus.TIMEOUT
    assert run(pool, "ok = 1").status == VerdictStatus.CORRECT
