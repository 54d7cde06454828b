"""The system calls under ``services/verifier/sandbox.py``, each checked against the kernel's own
account (/proc) or made to fail on purpose: the error paths, the fallbacks a root test process never
takes (no capability to change uid, no CAP_SETPCAP, no privilege for a network namespace, a
Landlock nesting limit reached), and the Landlock ABI table. Effects of whole layers are in
``test_sandbox_layers.py``."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import struct
import sys
from pathlib import Path

import pytest

from services.verifier import sandbox
from services.verifier.sandbox import UNPRIVILEGED_UID, Limits
from tests.helpers.forked import in_child

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root to have privileges to take away")

# written from the kernel's headers, not from the module under test
LIBC = ctypes.CDLL(None, use_errno=True)
CAPSET, CLONE = 126, 56
PR_SET_DUMPABLE, PR_CAPBSET_READ, PR_GET_NO_NEW_PRIVS = 4, 23, 39
CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8
SIGCHLD, CLONE_THREAD = 17, 0x10000
OTHER_UID = 1234
pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="Linux confinement"),
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 system call numbers"),
]


def status(*fields: str) -> list[int]:
    """Hexadecimal (Cap*) or decimal fields of /proc/self/status, in the order asked."""
    lines = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return [int(lines[f].strip(), 16 if f.startswith("Cap") else 10) for f in fields]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    words = [m & 0xFFFFFFFF for m in (effective, permitted, inheritable)] + [
        m >> 32 for m in (effective, permitted, inheritable)
    ]
    header = struct.pack("=Ii", 0x20080522, 0)
    if LIBC.syscall(ctypes.c_long(CAPSET), header, struct.pack("=6I", *words)) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def become(uid: int, groups: tuple[int, ...] = ()) -> None:
    """uid and gid ``uid``, these supplementary groups: a process with no capability left."""
    os.setgroups(groups)
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


# --- the two wrappers -------------------------------------------------------------------------


def test_a_failed_system_call_raises_with_the_kernels_error():
    with pytest.raises(OSError) as caught:  # an unknown flag of landlock_create_ruleset
        sandbox._syscall(sandbox.SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1 << 15))
    assert caught.value.errno == errno.EINVAL
    assert str(caught.value) == f"[Errno {errno.EINVAL}] {os.strerror(errno.EINVAL)}"


def test_prctl_passes_zeros_for_the_arguments_not_given_and_returns_the_result():
    # PR_GET_NO_NEW_PRIVS refuses any non-zero argument; PR_CAPBSET_READ answers 0 or 1
    assert sandbox._prctl(PR_GET_NO_NEW_PRIVS, 0) == status("NoNewPrivs")[0]
    bounding = status("CapBnd")[0]
    assert [sandbox._prctl(PR_CAPBSET_READ, cap) for cap in (0, 8, 21)] == [bounding >> c & 1 for c in (0, 8, 21)]
    with pytest.raises(OSError) as caught:
        sandbox._prctl(sandbox.PR_SET_NO_NEW_PRIVS, 2)  # only 1 is accepted: nothing is set
    assert caught.value.errno == errno.EINVAL
    assert str(caught.value) == f"[Errno {errno.EINVAL}] prctl(38): {os.strerror(errno.EINVAL)}"


@needs_root
def test_capabilities_are_read_as_the_kernel_reports_them():
    permitted = status("CapPrm")[0]
    effective = (1 << 0 | 1 << 31 | 1 << 33) & permitted  # both words, and bit 31 (a sign bit if misread)
    inheritable = (1 << 1 | 1 << 35) & permitted
    assert effective.bit_count() == 3 and inheritable.bit_count() == 2

    def layer(_fd: int) -> None:
        capset(effective, permitted, inheritable)

    [read, kernel], _ = in_child(layer, sandbox._capabilities, lambda: tuple(status("CapEff", "CapPrm", "CapInh")))
    assert read == kernel == f"ok:{(effective, permitted, inheritable)}"


# --- Landlock ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("abi", "fields", "extra"),
    [  # from the kernel's landlock.h: one u64 per field the ABI has
        (1, [0x1FFF], ""),  # execute .. make_sym
        (2, [0x3FFF], ""),  # + refer
        (3, [0x7FFF], ""),  # + truncate
        (4, [0x7FFF, 0b11], ", no TCP"),  # + handled_access_net: bind, connect
        (5, [0xFFFF, 0b11], ", no TCP"),  # + ioctl_dev
        (6, [0xFFFF, 0b11, 0b11], ", no TCP, no signals out"),  # + scoped: abstract sockets, signals
        (7, [0xFFFF, 0b11, 0b11], ", no TCP, no signals out"),  # logging flags only
        (9, [0xFFFF, 0b11, 0b11], ", no TCP, no signals out"),  # a newer kernel: what we know of
    ],
)
def test_a_ruleset_handles_every_right_its_abi_knows(abi, fields, extra):
    handled, attr, words = sandbox.landlock_attr(abi)
    assert (handled, attr, words) == (fields[0], struct.pack(f"={len(fields)}Q", *fields), extra)


@needs_root
def test_landlock_without_privilege_sets_no_new_privs_and_opens_roots_it_cannot_list(open_dir):
    """A process that is not root (no CAP_SYS_ADMIN) may restrict itself only under no_new_privs;
    a root it may search but not read is still added (opened as a path, not for reading)."""
    searchable = open_dir / "searchable"
    searchable.mkdir(mode=0o311)
    searchable.chmod(0o311)
    workdir = open_dir / "work"
    workdir.mkdir()

    def layer(_fd: int) -> None:
        become(OTHER_UID)
        ruleset, _ = sandbox.landlock_ruleset(workdir, [str(searchable)])
        sandbox.enforce_landlock(ruleset)

    elsewhere = open_dir / "elsewhere.txt"
    elsewhere.write_text("x")
    elsewhere.chmod(0o644)
    no_new_privs = lambda: LIBC.prctl(PR_GET_NO_NEW_PRIVS, *[ctypes.c_ulong(0)] * 4)  # noqa: E731 - /proc is out of reach
    probes = (no_new_privs, elsewhere.read_text)
    assert in_child(lambda fd: become(OTHER_UID), *probes)[0] == ["ok:0", "ok:x"]
    confined, _ = in_child(layer, *probes)
    assert confined == ["ok:1", "PermissionError:EACCES"], confined


# --- seccomp ----------------------------------------------------------------------------------


def load_and_say(program: bytes):
    def probe() -> str:
        try:
            sandbox.load_filter(program)
        except (OSError, ValueError) as err:
            return f"{type(err).__name__}: {err}"
        return "loaded"

    return probe


def test_a_program_that_is_not_whole_instructions_is_refused_before_the_kernel_sees_it():
    probes = (load_and_say(b""), load_and_say(bytes(13)), lambda: status("NoNewPrivs")[0], load_and_say(bytes(8)))
    said, _ = in_child(lambda fd: None, *probes)
    assert said[:3] == [
        "ok:ValueError: a seccomp program is whole 8-byte instructions, not 0 bytes",
        "ok:ValueError: a seccomp program is whole 8-byte instructions, not 13 bytes",
        "ok:0",  # refused before no_new_privs was set
    ]
    # eight zero bytes are one instruction ("load 0") and no return: the kernel refuses the program
    assert said[3] == f"ok:OSError: [Errno {errno.EINVAL}] prctl(22): {os.strerror(errno.EINVAL)}"


def raw_clone_with_the_thread_bit_as_its_stack():
    """fork by a raw clone whose second argument (the new stack) has CLONE_THREAD's bit: the filter
    must look at the flags, the first argument. The child dies at once (its stack is unmapped)."""
    import faulthandler

    faulthandler.disable()  # the child dies of SIGSEGV by design: no "Fatal Python error" in the test log
    LIBC.prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))  # no core
    args = [ctypes.c_long(a) for a in (CLONE, SIGCHLD, CLONE_THREAD, 0, 0, 0)]
    pid = LIBC.syscall(*args)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone")
    try:
        os.waitpid(pid, 0)
    except PermissionError:  # wait4 is not on the seccomp list: reaped when this process exits
        pass
    return "forked"


def test_seccomp_allows_clone_only_for_threads(bpf):
    [control], _ = in_child(lambda fd: None, raw_clone_with_the_thread_bit_as_its_stack)
    assert control == "ok:forked"
    [filtered], _ = in_child(lambda fd: sandbox.load_filter(bpf), raw_clone_with_the_thread_bit_as_its_stack)
    assert filtered == "PermissionError:EPERM"


# --- the network namespace --------------------------------------------------------------------


def isolate_and_say() -> str:
    try:
        return sandbox.isolate_network()
    except OSError as err:
        return f"{errno.errorcode[err.errno]}: {err.strerror}"


@needs_root
def test_a_network_namespace_as_root_in_a_user_namespace_without_and_none_when_both_are_refused(bpf):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        reach = lambda: socket.create_connection(("127.0.0.1", port), timeout=5).close()  # noqa: E731
        [said, reached], _ = in_child(lambda fd: None, isolate_and_say, reach)
        assert said == "ok:new network namespace"
        assert reached.startswith(("OSError:ENETUNREACH", "ConnectionRefusedError")), reached
        # uid 65534 has no CAP_SYS_ADMIN: a user namespace of its own gives it one
        [said, reached], _ = in_child(lambda fd: become(UNPRIVILEGED_UID), isolate_and_say, reach)
        assert said == "ok:new user and network namespace"
        assert reached.startswith(("OSError:ENETUNREACH", "ConnectionRefusedError")), reached
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody reached the host's listener
    # unshare is not on the seccomp list: both tries refused, the first one's error reported
    [said], _ = in_child(lambda fd: sandbox.load_filter(bpf), isolate_and_say)
    assert said == f"ok:EPERM: unshare(CLONE_NEWNET) refused: {os.strerror(errno.EPERM)}"


# --- privileges -------------------------------------------------------------------------------


def privileges_and_bounding():
    return json.dumps(status("CapEff", "CapPrm", "CapBnd", "NoNewPrivs"))


@needs_root
def test_the_bounding_set_is_emptied_with_cap_setpcap_and_left_without_it():
    permitted, bounding = status("CapPrm", "CapBnd")
    assert permitted >> CAP_SETPCAP & 1 and bounding

    def only_setpcap(_fd: int) -> None:
        capset(1 << CAP_SETPCAP, permitted, 0)
        sandbox.drop_privileges(None)

    def all_but_setpcap(_fd: int) -> None:
        capset(permitted & ~(1 << CAP_SETPCAP), permitted, 0)
        sandbox.drop_privileges(None)

    [emptied], _ = in_child(only_setpcap, privileges_and_bounding)
    assert emptied == f"ok:{json.dumps([0, 0, 0, 1])}"
    [kept], _ = in_child(all_but_setpcap, privileges_and_bounding)
    assert kept == f"ok:{json.dumps([0, 0, bounding, 1])}"  # no capability to use it, and no exec


# --- dying with the template ------------------------------------------------------------------


def test_a_grader_whose_template_is_already_gone_ends_at_once():
    test_pid = os.getpid()
    said, status_ = in_child(lambda fd: sandbox.die_with_parent(test_pid), lambda: "alive")
    assert said == ["ok:alive"] and os.WEXITSTATUS(status_) == 0
    # the parent it was told of is not its parent: as if the template died before the call
    said, status_ = in_child(lambda fd: sandbox.die_with_parent(test_pid + 1_000_000), lambda: "alive")
    assert said == [] and os.WIFEXITED(status_) and os.WEXITSTATUS(status_) == 1


# --- the session ------------------------------------------------------------------------------


def test_a_new_session_closes_every_descriptor_but_its_own_even_above_the_soft_limit(tmp_path):
    import resource

    inherited = os.open(tmp_path / "inherited", os.O_CREAT | os.O_WRONLY)
    high = 600

    def layer(fd: int) -> None:
        assert fd > 3, fd
        for number in (0, 1, 2, 3, fd + 1, high):
            os.dup2(inherited, number)
        resource.setrlimit(resource.RLIMIT_NOFILE, (high - 100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        sandbox.new_session(fd)

    probes = (
        *(lambda n=n: os.readlink(f"/proc/self/fd/{n}") for n in (0, 1, 2)),
        lambda: os.fstat(3),
        lambda: os.fstat(high),
    )
    try:
        said, _ = in_child(layer, *probes)
        probes_next = (lambda: os.fstat(high + 1),)
        assert in_child(lambda fd: None, *probes_next)[0] == ["OSError:EBADF"]
    finally:
        os.close(inherited)
    assert said == ["ok:/dev/null"] * 3 + ["OSError:EBADF", "OSError:EBADF"], said


def test_the_descriptor_after_its_own_is_closed_too(tmp_path):
    inherited = os.open(tmp_path / "inherited", os.O_CREAT | os.O_WRONLY)
    after = {}

    def layer(fd: int) -> None:
        after["fd"] = fd + 1
        os.dup2(inherited, fd + 1)
        sandbox.new_session(fd)

    try:
        [said], _ = in_child(layer, lambda: os.fstat(after["fd"]))
    finally:
        os.close(inherited)
    assert said == "OSError:EBADF"


# --- confine, when a layer fails ----------------------------------------------------------------


def confined_report(workdir: Path, syscall_filter, before=None):
    """A layer for in_child: ``before`` (what went wrong earlier), then confine; the report stays
    in the child for the probe below."""
    report: dict = {}
    test_pid = os.getpid()

    def layer(fd: int) -> None:
        if before is not None:
            before()
        roots = sandbox.read_roots("tests.helpers.graders")
        report.update(sandbox.confine(fd, workdir, Limits(), roots, syscall_filter, parent=test_pid))

    return layer, lambda: json.dumps(report)


def test_confine_reports_a_filter_the_kernel_refused(open_dir):
    layer, report = confined_report(open_dir / "work", bytes(8))
    [said], _ = in_child(layer, report)
    got = json.loads(said[3:])
    assert got["syscalls"] == f"not filtered: [Errno {errno.EINVAL}] prctl(22): {os.strerror(errno.EINVAL)}"
    assert got["filesystem"].startswith("landlock ABI")


def sixteen_landlock_layers() -> None:
    """Landlock nests at most 16 rulesets: after these, a 17th cannot be enforced."""
    for _ in range(16):
        attr = struct.pack("=Q", 1)  # handles execute only, grants nothing
        ruleset = LIBC.syscall(ctypes.c_long(444), attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
        assert ruleset >= 0, ctypes.get_errno()
        assert LIBC.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
        assert LIBC.syscall(ctypes.c_long(446), ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0
        os.close(ruleset)


def test_confine_reports_landlock_it_could_not_enforce(open_dir, bpf):
    layer, report = confined_report(open_dir / "work", bpf, before=sixteen_landlock_layers)
    [said], _ = in_child(layer, report)
    got = json.loads(said[3:])
    assert got["filesystem"] == f"not restricted (landlock: {os.strerror(errno.E2BIG)})"
    assert got["syscalls"].startswith("seccomp")


@needs_root
def test_confine_reports_privileges_it_could_not_drop(open_dir, bpf):
    permitted = status("CapPrm")[0]
    without_set_ids = permitted & ~(1 << CAP_SETUID | 1 << CAP_SETGID)
    layer, report = confined_report(open_dir / "work", bpf, before=lambda: capset(without_set_ids, permitted, 0))
    [said, uid], _ = in_child(layer, report, os.getuid)
    got = json.loads(said[3:])
    assert got["privileges"] == f"not dropped: [Errno {errno.EPERM}] {os.strerror(errno.EPERM)}"
    assert uid == "ok:0" and got["syscalls"].startswith("seccomp")


@needs_root
def test_confine_in_a_service_not_run_as_root_keeps_its_uid(open_dir, bpf):
    workdir = open_dir / "work"
    # only root may drop supplementary groups: the report names those the service keeps
    layer, report = confined_report(workdir, bpf, before=lambda: become(OTHER_UID, (2001, 2002)))
    [said, uid], _ = in_child(layer, report, os.getuid)
    got = json.loads(said[3:])
    assert got["privileges"] == f"uid {OTHER_UID}, gid {OTHER_UID}, groups 2001,2002, no capabilities, no_new_privs"
    assert uid == f"ok:{OTHER_UID}" and workdir.stat().st_uid == OTHER_UID


# --- the roots a grader may read -----------------------------------------------------------------


def test_read_roots_add_the_graders_top_package_and_skip_what_is_missing(monkeypatch):
    import sysconfig

    import sympy

    sympy_dir = os.path.realpath(os.path.dirname(sympy.__file__))
    assert sympy_dir in sandbox.read_roots("sympy:parse_expr")  # a top-level package, no dot
    tests_dir = str(Path(__file__).resolve().parents[2])
    unknown = sandbox.read_roots("no_such_package:table")  # not imported: only the installation
    assert set(sandbox.read_roots("tests.helpers.graders:table")) - set(unknown) == {tests_dir}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        assert os.path.realpath(sysconfig.get_paths()[key]) in unknown, key
    monkeypatch.setattr(sandbox, "SYSTEM_ROOTS", ("/no/such/directory", "/", *sandbox.SYSTEM_ROOTS))
    roots = sandbox.read_roots("tests.helpers.graders")
    assert "/no/such/directory" not in roots and "/" not in roots
    assert {os.path.realpath(p) for p in sandbox.SYSTEM_ROOTS[2:] if os.path.isdir(p)} <= set(roots)
