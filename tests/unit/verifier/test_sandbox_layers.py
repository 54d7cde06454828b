"""Each confinement layer of ``services/verifier/sandbox.py`` by its effect, with every other layer
off: a child forked from the test applies one layer, then tries what only that layer stops; the
same probe in a child without the layer shows that the probe itself works. (The pool's tests run
all layers at once, where two or three overlap on most refusals.)"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import sys
from pathlib import Path

import pytest

from services.verifier import sandbox
from services.verifier.sandbox import UNPRIVILEGED_UID, Limits
from tests.helpers.forked import CLONE_NEWUTS, WAIT_S, in_child, unshare

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux confinement")
ROOT = os.geteuid() == 0
HIGH_FD = 250  # a descriptor number above any the test process holds


def nothing(_fd: int) -> None:
    pass


def connect(port: int):
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.fixture
def server():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


# --- the network namespace --------------------------------------------------------------------


def test_the_network_namespace_alone_cuts_the_host_off(server):
    port = server.getsockname()[1]
    assert in_child(nothing, connect(port))[0] == ["ok"]
    server.accept()[0].close()
    [result], _ = in_child(lambda fd: sandbox.isolate_network(), connect(port))
    assert result.startswith(("OSError:ENETUNREACH", "ConnectionRefusedError")), result
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.accept()  # nobody reached the host's listener


# --- Landlock ---------------------------------------------------------------------------------


def landlocked(workdir: Path, roots: list[str]):
    def layer(_fd: int) -> None:
        ruleset, _ = sandbox.landlock_ruleset(workdir, roots)
        sandbox.enforce_landlock(ruleset)

    return layer


def test_landlock_alone_confines_reads_writes_and_tcp(tmp_path, server):
    workdir, outside = tmp_path / "work", tmp_path / "outside.txt"
    workdir.mkdir()
    outside.write_text("secret")
    roots = sandbox.read_roots("tests.helpers.graders")
    assert not any(str(tmp_path).startswith(root) for root in roots)
    port = server.getsockname()[1]
    probes = (
        lambda: Path(os.__file__).read_text()[:0],  # the standard library: readable
        lambda: (workdir / "mine").write_text("x"),  # its working directory: writable
        (workdir / "mine").read_text,
        outside.read_text,
        lambda: (tmp_path / "escape").write_text("x"),
        lambda: os.listdir(tmp_path),
        lambda: (workdir / "mine").rename(tmp_path / "moved"),  # out of the working directory
        connect(port),
    )
    control, _ = in_child(nothing, *probes)
    assert control == ["ok:", "ok:1", "ok:x", "ok:secret", "ok:1", control[5], "ok:" + str(tmp_path / "moved"), "ok"]
    server.accept()[0].close()
    for leftover in ("escape", "moved"):
        (tmp_path / leftover).unlink()
    confined, _ = in_child(landlocked(workdir, roots), *probes)
    assert confined[:3] == ["ok:", "ok:1", "ok:x"]
    assert all(r.startswith("PermissionError") for r in confined[3:]), confined
    assert not (tmp_path / "escape").exists() and not (tmp_path / "moved").exists()


def test_landlock_lets_a_grader_read_its_installation_and_use_its_workdir(tmp_path):
    import sympy

    import tests.helpers.graders

    workdir = tmp_path / "work"
    workdir.mkdir()
    roots = sandbox.read_roots("tests.helpers.graders")
    readable = [os.__file__, sympy.__file__, tests.helpers.graders.__file__, sandbox.__file__]
    readable += [p for p in ("/usr/share/zoneinfo/UTC", "/usr/lib/os-release") if os.path.exists(p)]
    held = {}

    def layer(_fd: int) -> None:
        ruleset, _ = sandbox.landlock_ruleset(workdir, roots)
        held["fd"] = ruleset
        sandbox.enforce_landlock(ruleset)

    probes = (
        *(lambda path=path: len(Path(path).read_bytes()) > 0 for path in readable),
        (workdir / "d").mkdir,
        lambda: (workdir / "d" / "f").write_text("x"),
        lambda: (workdir / "d" / "f").rename(workdir / "g"),
        (workdir / "g").unlink,
        (workdir / "d").rmdir,
        lambda: Path("/dev/null").write_text("x"),
        lambda: Path("pyproject.toml").resolve().read_text(),  # the current directory is no root
        lambda: os.fstat(held["fd"]),  # the ruleset's descriptor is closed once enforced
    )
    confined, _ = in_child(layer, *probes)
    assert confined[: len(readable)] == ["ok:True"] * len(readable), list(zip(readable, confined, strict=False))
    assert confined[len(readable) : len(readable) + 6] == ["ok", "ok:1", f"ok:{workdir / 'g'}", "ok", "ok", "ok:1"]
    assert confined[-2].startswith("PermissionError") and confined[-1] == "OSError:EBADF", confined


def test_read_roots_are_the_installation_and_never_the_current_directory(monkeypatch, tmp_path):
    import sysconfig

    monkeypatch.chdir(tmp_path)
    roots = sandbox.read_roots("tests.helpers.graders:table")
    assert str(tmp_path) not in roots and os.getcwd() not in roots and "/" not in roots
    for wanted in (sys.prefix, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], "/usr/lib"):
        assert os.path.realpath(wanted) in roots, wanted
    assert str(Path(sandbox.__file__).resolve().parents[1]) in roots  # the services package
    assert str(Path(__file__).resolve().parents[2]) in roots  # the graders' package: tests
    assert roots == sorted(set(roots)) and all(os.path.isdir(r) for r in roots)


def test_unreadable_to_others_names_roots_another_uid_cannot_reach(open_dir):
    tmp_path = open_dir
    open_path, closed_parent, closed_root, unlisted = (tmp_path / n for n in ("open", "closed", "noread", "nolist"))
    for path in (open_path, closed_parent / "inside", closed_root, unlisted):
        path.mkdir(parents=True)
    closed_parent.chmod(0o700)  # no o+x on the way
    closed_root.chmod(0o711)  # reachable, not readable
    unlisted.chmod(0o704)  # readable, not searchable
    # the missing one not last: the roots after it are looked at too
    roots = [str(open_path), str(tmp_path / "gone"), str(closed_parent / "inside"), str(closed_root), str(unlisted)]
    bad = sandbox.unreadable_to_others(roots)
    assert bad == roots[1:], bad


def test_landlock_alone_stops_signals_to_processes_outside(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    roots = sandbox.read_roots("tests.helpers.graders")
    probe = lambda: os.kill(os.getppid(), 0)  # noqa: E731 - signal 0: may it signal the test?
    assert in_child(nothing, probe)[0] == ["ok"]
    [result], _ = in_child(landlocked(workdir, roots), probe)
    assert result == "PermissionError:EPERM", result


# --- seccomp ----------------------------------------------------------------------------------


def own_host_name(_fd: int) -> None:
    """A UTS namespace of the child's own: the probe that sets a host name must never set the
    machine's (it did once, and torchrun's rendezvous could no longer resolve the name)."""
    unshare(CLONE_NEWUTS)


def test_seccomp_alone_refuses_what_is_not_on_the_list(tmp_path, bpf):
    victim = tmp_path / "victim"
    victim.write_text("x")
    probes = (
        victim.read_text,  # on the list: open, read
        lambda: os.getpid() > 0,
        lambda: os.chmod(victim, 0o600),
        lambda: os.utime(victim, (1, 1)),
        lambda: socket.socket().close(),
        lambda: os.waitpid(pid, 0) if (pid := os.fork()) else os._exit(0),
        lambda: __import__("fcntl").ioctl(0, __import__("termios").TIOCSTI, b"x"),
        lambda: __import__("resource").setrlimit(__import__("resource").RLIMIT_NOFILE, (8, 8)),
        lambda: os.mknod(str(tmp_path / "node"), 0o600 | 0o010000),  # a FIFO: no device rights needed
        lambda: socket.sethostname("passk"),
    )
    # the control leaves out TIOCSTI (it would type into the terminal of whoever runs the tests)
    control, _ = in_child(own_host_name, *probes[:6], *probes[7:])
    assert control[:6] == ["ok:x", "ok:True", "ok", "ok", "ok", control[5]] and control[5].startswith("ok:")
    assert control[6:] == ["ok", "ok", "ok"]  # setrlimit, mknod and sethostname: allowed without the filter
    (tmp_path / "node").unlink()
    os.chmod(victim, 0o644)
    filtered, _ = in_child(lambda fd: (own_host_name(fd), sandbox.load_filter(bpf)), *probes)
    assert filtered[:2] == ["ok:x", "ok:True"]
    assert filtered[7] == "ValueError"  # CPython's word for a setrlimit refused with EPERM
    assert all(r.startswith("PermissionError:EPERM") for r in filtered[2:7] + filtered[8:]), str(filtered)
    assert victim.stat().st_mode & 0o777 == 0o644 and not (tmp_path / "node").exists()


def run_a_thread() -> str:
    import threading

    done = []
    thread = threading.Thread(target=lambda: done.append(threading.get_native_id() != os.getpid()))
    thread.start()
    thread.join()
    return str(done)


def test_seccomp_allows_what_python_needs_threads_included(bpf):
    import fcntl
    import termios

    probes = (
        lambda: os.isatty(0),  # TCGETS
        lambda: fcntl.ioctl(os.open(__file__, os.O_RDONLY), termios.FIONREAD, b"\0\0\0\0") != b"\0\0\0\0",
        lambda: __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[0] > 0,  # prlimit, read
        lambda: os.set_blocking(os.open("/dev/null", os.O_RDONLY), False),  # fcntl
        run_a_thread,  # clone with CLONE_THREAD, after clone3 answers ENOSYS
        lambda: next(
            x.split()[1] for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("NoNewPrivs")
        ),
    )
    filtered, _ = in_child(lambda fd: sandbox.load_filter(bpf), *probes)
    assert filtered[0] in ("ok:True", "ok:False")
    assert filtered[1:] == ["ok:True", "ok:True", "ok", "ok:[True]", "ok:1"], filtered


# --- privileges -------------------------------------------------------------------------------


@pytest.mark.skipif(not ROOT, reason="needs root to have privileges to drop")
def test_dropping_privileges_alone_takes_root_and_every_capability(open_dir):
    tmp_path = open_dir
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    theirs = tmp_path / "theirs"
    theirs.write_text("x")
    os.chown(theirs, 1234, 1234)
    theirs.chmod(0o600)
    status = lambda: "/".join(  # noqa: E731
        line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith(("CapEff:", "CapBnd:", "CapAmb:", "NoNewPrivs:"))
    )  # fmt: skip
    ids = lambda: (os.getresuid(), os.getresgid(), os.getgroups())  # noqa: E731
    report = {}  # filled in the child by the layer, read there by the last probe
    probes = (secret.read_text, theirs.read_text, lambda: os.chown(secret, 1234, 1234), os.getuid, status, ids,
              lambda: report.get("said"))  # fmt: skip
    control, _ = in_child(nothing, *probes)
    assert control[:3] == ["ok:root only", "ok:x", "ok"] and control[3] == "ok:0"
    os.chown(secret, 0, 0)
    dropped, _ = in_child(lambda fd: report.update(said=sandbox.drop_privileges(UNPRIVILEGED_UID)), *probes)
    assert dropped[:3] == ["PermissionError:EACCES", "PermissionError:EACCES", "PermissionError:EPERM"]
    assert dropped[3] == f"ok:{UNPRIVILEGED_UID}"
    assert dropped[4] == "ok:0000000000000000/0000000000000000/0000000000000000/1", dropped[4]
    nobody = UNPRIVILEGED_UID
    assert dropped[5] == f"ok:(({nobody}, {nobody}, {nobody}), ({nobody}, {nobody}, {nobody}), [])", dropped[5]
    assert dropped[6] == f"ok:uid {nobody}, gid {nobody}, no groups, no capabilities, no_new_privs"
    # without a uid to change to (the service not run as root): still uid 0, and no capability left
    kept, _ = in_child(lambda fd: sandbox.drop_privileges(None), *probes)
    assert kept[1:4] == ["PermissionError:EACCES", "PermissionError:EPERM", "ok:0"]
    assert kept[4] == "ok:0000000000000000/0000000000000000/0000000000000000/1", kept[4]
    assert secret.stat().st_uid == 0


# --- resource limits --------------------------------------------------------------------------


def spin() -> None:
    while True:  # CPU only, no memory: the CPU limit, not the address space, must end it
        pass


def test_limits_alone_bound_memory_file_size_and_cpu(tmp_path):
    # the child keeps the descriptors the test process holds (a test runner may hold many, with
    # gaps): the limit is a descriptor number, so opening that many more files always runs out
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    # the address space counts what the test process has mapped already (more as other tests import
    # more): 512 MiB above it, so the 2 MiB write fits and the 1 GiB allocation does not
    mapped = next(
        int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmSize")
    )
    space = mapped // 1024 + 512
    limits = Limits(address_space_mb=space, file_size_mb=1, open_files=highest + 8)
    probes = (
        lambda: len(bytearray(1 << 30)),  # 1 GiB: over the address space
        lambda: (tmp_path / "big").write_bytes(b"x" * (2 << 20)),  # 2 MiB: over the file size
        lambda: [os.open("/dev/null", os.O_RDONLY) for _ in range(limits.open_files + 1)] and None,  # over the files
        lambda: __import__("resource").getrlimit(__import__("resource").RLIMIT_CORE),
    )
    control, _ = in_child(nothing, *probes)
    assert control[:3] == [f"ok:{1 << 30}", f"ok:{2 << 20}", "ok"]
    limited, _ = in_child(lambda fd: sandbox.set_limits(limits, cpu_s=5), *probes)
    assert limited[0] == "MemoryError" and limited[1] == "OSError:EFBIG" and limited[2] == "OSError:EMFILE"
    assert limited[3] == "ok:(0, 0)"
    import resource

    names = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_FSIZE")
    values = lambda: [resource.getrlimit(getattr(resource, n)) for n in names]  # noqa: E731
    [got], _ = in_child(lambda fd: sandbox.set_limits(Limits(), cpu_s=None), values)
    mb = 1 << 20
    # soft CPU below hard, so SIGXCPU comes before SIGKILL; no processes; the defaults of Limits;
    # never above a hard limit the test process already has (a limit can only be lowered)
    wanted = [(4096 * mb, 4096 * mb), (600, 605), (64, 64), (0, 0), (16 * mb, 16 * mb)]
    held = [resource.getrlimit(getattr(resource, n))[1] for n in names]
    capped = [h if cap == resource.RLIM_INFINITY else min(h, cap) for (_, h), cap in zip(wanted, held, strict=True)]
    margins = [0, 5, 0, 0, 0]
    expected = [(min(soft, h - m), h) for (soft, _), h, m in zip(wanted, capped, margins, strict=True)]
    assert got == f"ok:{expected}"
    said = {}
    [text], _ = in_child(lambda fd: said.update(text=sandbox.set_limits(limits, cpu_s=7)), lambda: said["text"])
    assert text == f"ok:address space {space} MiB, cpu 7 s, {highest + 8} files, 0 processes, file size 1 MiB"
    # the CPU limit: a busy loop ends by SIGXCPU, whatever the wall clock says
    _, status = in_child(lambda fd: sandbox.set_limits(limits, cpu_s=1), spin)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU


def test_limits_never_try_to_raise_a_hard_limit_the_process_has():
    """Raising a hard limit needs CAP_SYS_RESOURCE, which a container's root often lacks: a grader of
    a service that runs under a lower limit keeps that limit, and still starts."""
    import resource

    def layer(_fd: int) -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (20, 21))
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        sandbox.drop_privileges(None)  # no CAP_SYS_RESOURCE from here on
        sandbox.set_limits(Limits(open_files=64), cpu_s=600)

    limits_now = lambda: (resource.getrlimit(resource.RLIMIT_CPU), resource.getrlimit(resource.RLIMIT_NOFILE))  # noqa: E731
    [got], _ = in_child(layer, limits_now)
    assert got == "ok:((16, 21), (32, 32))", got  # the CPU's soft limit 5 s below the hard one


def test_a_limit_cannot_be_raised_again():
    limits = Limits(address_space_mb=512)
    raise_it = lambda: __import__("resource").setrlimit(__import__("resource").RLIMIT_AS, (-1, -1))  # noqa: E731
    [result], _ = in_child(lambda fd: (sandbox.set_limits(limits), sandbox.drop_privileges(None)), raise_it)
    assert result.startswith(("ValueError", "PermissionError", "OSError"))


# --- the session ------------------------------------------------------------------------------


def test_a_new_session_alone_leaves_nothing_inherited(tmp_path):
    inherited = os.open(tmp_path / "inherited", os.O_CREAT | os.O_WRONLY)
    os.environ["PASSK_SECRET_FOR_THE_TEST"] = "leak"
    try:
        probes = (
            lambda: os.fstat(inherited).st_size,  # below the reporting pipe's descriptor
            lambda: os.fstat(HIGH_FD).st_size,  # above it
            lambda: os.environ.get("PASSK_SECRET_FOR_THE_TEST"),
            lambda: ",".join(os.readlink(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)),
            lambda: os.getsid(0) == os.getpid(),
        )

        def high_then(layer):
            def apply(fd: int) -> None:
                os.dup2(inherited, HIGH_FD)
                layer(fd)

            return apply

        control, _ = in_child(high_then(nothing), *probes)
        assert control[:3] == ["ok:0", "ok:0", "ok:leak"] and control[4] == "ok:False"
        fresh, _ = in_child(high_then(sandbox.new_session), *probes)
    finally:
        os.close(inherited)
        del os.environ["PASSK_SECRET_FOR_THE_TEST"]
    assert fresh == ["OSError:EBADF", "OSError:EBADF", "ok", "ok:/dev/null,/dev/null,/dev/null", "ok:True"], fresh


# --- dying with the template ------------------------------------------------------------------


def test_a_grader_dies_with_its_template():
    """A middle process (the template) forks a grader that sets die_with_parent and reports ready;
    the test then kills the template, and the grader dies too, which closes the pipe it holds."""
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read)
            if os.fork() == 0:
                sandbox.die_with_parent(os.getppid())  # the template waits below: no race
                os.write(write, b"ready")
                while True:
                    signal.pause()
            os.close(write)
            while True:  # the template lives until the test kills it
                signal.pause()
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], WAIT_S)
    assert ready and os.read(read, 5) == b"ready"
    os.kill(middle, signal.SIGKILL)
    os.waitpid(middle, 0)  # the template is gone
    ready, _, _ = select.select([read], [], [], WAIT_S)
    assert ready and os.read(read, 1) == b"", "the grader outlived its template"
    os.close(read)


# --- all of them, in confine's order ---------------------------------------------------------


def test_confine_applies_every_layer_and_says_so(open_dir, bpf, server):
    tmp_path = open_dir
    workdir = tmp_path / "work"
    roots = sandbox.read_roots("tests.helpers.graders")
    port = server.getsockname()[1]
    probes = (
        lambda: json.dumps(report),
        os.getcwd,
        lambda: (Path.cwd() / "scratch").write_text("x"),
        lambda: (tmp_path / "escape").write_text("x"),
        connect(port),
        os.fork,
        os.getuid,
    )
    report: dict = {}
    test_pid = os.getpid()

    def layer(fd: int) -> None:
        report.update(sandbox.confine(fd, workdir, Limits(), roots, bpf, parent=test_pid, cpu_s=3))

    import tempfile

    probes += (lambda: (os.environ.get("TMPDIR"), os.environ.get("HOME"), tempfile.gettempdir()),)
    result, _ = in_child(layer, *probes)
    got = json.loads(result[0][3:])
    uid = UNPRIVILEGED_UID if ROOT else os.getuid()
    groups = "no groups" if ROOT or not os.getgroups() else "groups " + ",".join(map(str, os.getgroups()))
    abi = sandbox._syscall(sandbox.SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    extra = (", no TCP" if abi >= 4 else "") + (", no signals out" if abi >= 6 else "")
    assert got == {
        "session": "new session, no terminal, streams on /dev/null, no inherited descriptors, empty environment",
        "filesystem": f"landlock ABI {abi}: read-only {len(roots)} installation directories, read-write workdir{extra}",
        "limits": "address space 4096 MiB, cpu 3 s, 64 files, 0 processes, file size 16 MiB",
        "privileges": f"uid {uid}, gid {uid}, {groups}, no capabilities, no_new_privs",
        "syscalls": "seccomp allow-list: no exec, fork, sockets, tty ioctls, metadata changes, devices",
    }
    assert result[1] == f"ok:{workdir}" and result[2] == "ok:1"
    assert all(r.startswith("PermissionError") for r in result[3:6]), result
    assert result[6] == f"ok:{uid}"
    assert result[7] == f"ok:{(str(workdir), str(workdir), str(workdir))}"
    assert not (tmp_path / "escape").exists()
    assert oct(workdir.stat().st_mode & 0o777) == "0o700" and workdir.stat().st_uid == uid


def test_confine_reports_a_layer_it_could_not_apply(open_dir):
    report: dict = {}
    test_pid = os.getpid()

    def layer(fd: int) -> None:
        # no seccomp program (the template could not build one), and a root Landlock cannot open
        report.update(
            sandbox.confine(
                fd, open_dir / "work", Limits(), ["/nonexistent"], RuntimeError("no libseccomp"), parent=test_pid
            )
        )

    [result], _ = in_child(layer, lambda: json.dumps(report))
    got = json.loads(result[3:])
    assert got["syscalls"] == "not filtered: no libseccomp"
    assert got["filesystem"] == "not restricted (landlock: No such file or directory)"
    assert got["session"].startswith("new session") and got["limits"].startswith("address space")
