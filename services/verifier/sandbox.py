"""Confinement of one grader process, applied once, after its imports and before
it sees any answer.

Graders parse untrusted model output, and some parsers ``eval`` it (sympy's
``parse_expr`` does), so each layer assumes the grader runs hostile code:

* a new network namespace: no interface but a down loopback, so no socket can
  reach anything;
* Landlock: reads only beneath the Python installation and the system
  libraries, writes only beneath a fresh temporary working directory, no TCP
  bind or connect, no signals to processes outside the sandbox;
* resource limits: address space, CPU seconds, open files, processes, file size,
  no core files;
* seccomp: no exec, fork, new sockets, ptrace, namespace changes, or raising the
  resource limits again (root ignores RLIMIT_NPROC, seccomp does not).

Each layer is tried on its own; one the kernel refuses is reported, not fatal,
so the service runs where it can and says what is isolated (``/readyz``). The
wall-clock limit is the pool's: it kills the process, which no code inside can
prevent.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import struct
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_THREAD = 0x00010000
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1

# Landlock filesystem rights, by the ABI version that introduced them.
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # execute .. make_sym
FS_BY_ABI = {1: FS_ABI1, 2: FS_ABI1 | 1 << 13, 3: FS_ABI1 | 3 << 13}  # + refer, + truncate
FS_ALL_FROM_5 = FS_ABI1 | 7 << 13  # + ioctl_dev
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | 1 << 14 | 1 << 15  # the only rights a file rule may hold
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1, 2


@dataclass(frozen=True)
class Limits:
    """Resource limits of one grader process."""

    address_space_mb: int = 4096
    cpu_s: int = 600  # for the process's whole life; the pool retires it before
    open_files: int = 64
    processes: int = 0  # no new processes or threads; root ignores this limit, seccomp stops its fork
    file_size_mb: int = 16


_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def isolate_network() -> str:
    """Move into a new, empty network namespace (needs CAP_SYS_ADMIN or user namespaces)."""
    if _libc.unshare(CLONE_NEWNET) == 0:
        return "new network namespace"
    first = ctypes.get_errno()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "new user and network namespace"
    raise OSError(first, f"unshare(CLONE_NEWNET) refused: {os.strerror(first)}")


def make_workdir() -> Path:
    """A fresh private directory, made the working and temporary directory."""
    workdir = Path(tempfile.mkdtemp(prefix="passk-grader-"))
    os.chdir(workdir)
    os.environ["TMPDIR"] = str(workdir)
    tempfile.tempdir = str(workdir)
    return workdir


def read_roots() -> list[str]:
    """Directories a grader may read: the interpreter, its packages and the system libraries."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr", "/lib", "/lib64", "/usr/lib"}
    paths.update(sysconfig.get_paths().values())
    paths.update(p for p in sys.path if p)
    paths.add(str(Path(__file__).resolve().parents[2]))  # the project, for editable installs
    real = {os.path.realpath(p) for p in paths}
    return sorted(p for p in real if os.path.isdir(p))


def _add_path_rule(ruleset: int, path: str, rights: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        attr = struct.pack("=Qi", rights, fd)  # struct landlock_path_beneath_attr is packed
        _syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), attr, 0)
    finally:
        os.close(fd)


def restrict_filesystem(workdir: Path) -> str:
    """Landlock: read-only beneath ``read_roots()``, read-write beneath ``workdir``, nothing else."""
    abi = _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    handled = FS_BY_ABI.get(abi, FS_ALL_FROM_5 if abi >= 5 else FS_BY_ABI[3])
    fields = [handled]
    if abi >= 4:
        fields.append(NET_BIND_TCP | NET_CONNECT_TCP)  # handled and never granted: no TCP at all
    if abi >= 6:
        fields.append(SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL)  # no signals to processes outside the sandbox
    attr = struct.pack(f"={len(fields)}Q", *fields)
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    try:
        read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
        for root in read_roots():
            _add_path_rule(ruleset, root, read)
        _add_path_rule(ruleset, "/dev/null", (FS_READ_FILE | FS_WRITE_FILE) & handled)
        _add_path_rule(ruleset, str(workdir), handled)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    extra = (", no TCP" if abi >= 4 else "") + (", no signals out" if abi >= 6 else "")
    return f"landlock ABI {abi}: read-only system, read-write workdir{extra}"


def set_limits(limits: Limits) -> str:
    mb = 1 << 20
    for name, value in (
        ("RLIMIT_AS", limits.address_space_mb * mb),
        ("RLIMIT_CPU", limits.cpu_s),
        ("RLIMIT_NOFILE", limits.open_files),
        ("RLIMIT_NPROC", limits.processes),
        ("RLIMIT_FSIZE", limits.file_size_mb * mb),
        ("RLIMIT_CORE", 0),
    ):
        # soft below hard for CPU, so SIGXCPU ends the process before SIGKILL would
        hard = value + 5 if name == "RLIMIT_CPU" else value
        resource.setrlimit(getattr(resource, name), (value, hard))
    return (
        f"address space {limits.address_space_mb} MiB, cpu {limits.cpu_s} s, {limits.open_files} files, "
        f"{limits.processes} processes, file size {limits.file_size_mb} MiB"
    )


def filter_syscalls(sc) -> str:
    """seccomp: deny the system calls a grader never needs, with EPERM, so Python raises instead of dying."""
    deny = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in (
        "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_writev", "unshare", "setns",
        "mount", "umount2", "pivot_root", "chroot", "setrlimit", "prlimit64", "socket", "socketpair",
        "kill", "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
    ):  # fmt: skip
        f.add_rule(deny, name)
    f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))  # a process, not a thread
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # flags sit behind a pointer; libc falls back to clone
    f.load()
    return "seccomp: no exec, fork, sockets, ptrace, namespaces or raised limits"


def confine(limits: Limits) -> dict[str, str]:
    """Apply every layer; returns what each one did or why it was refused."""
    report: dict[str, str] = {}
    try:  # before the filesystem closes: finding libseccomp reads the loader cache
        import pyseccomp
    except (ImportError, OSError, RuntimeError) as err:
        pyseccomp = err
    try:
        report["network"] = isolate_network()
    except OSError as err:
        report["network"] = f"not isolated: {err.strerror}"
    workdir = make_workdir()
    report["workdir"] = str(workdir)
    try:
        report["filesystem"] = restrict_filesystem(workdir)
    except OSError as err:
        report["filesystem"] = f"not restricted (landlock: {err.strerror})"
    report["limits"] = set_limits(limits)
    try:
        if isinstance(pyseccomp, Exception):
            raise pyseccomp
        report["syscalls"] = filter_syscalls(pyseccomp)
    except (ImportError, OSError, RuntimeError) as err:
        report["syscalls"] = f"not filtered: {err}"
    return report
