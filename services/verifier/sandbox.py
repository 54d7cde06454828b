"""Confinement of one grader process, applied after it is forked from the template and
before it sees any answer.

Graders parse untrusted model output and some ``eval`` it (reasoning-gym's n_queens
scorer, sympy's ``parse_expr``), so each layer assumes the grader runs hostile code.
In the order they are applied:

* session: a new session with no controlling terminal, stdin/stdout/stderr on
  /dev/null, every other inherited descriptor closed (only its own socket stays), an
  empty environment; so nothing reaches a terminal, the service's log, its pipes or
  the resource tracker, and no secret is in the process;
* a private working directory (the only writable place);
* resource limits: address space, CPU seconds, open files, processes, file size, no
  core files;
* privileges: started as root, the grader runs as uid 65534 with no supplementary
  groups; in every case with no capabilities, the ambient set emptied, the bounding set
  too where the process may empty it (CAP_SETPCAP), and ``no_new_privs``;
* Landlock: reads only beneath the Python installation, the graders' package and the
  system libraries (never the current directory), writes only beneath the working
  directory, no TCP, no signals to processes outside the sandbox;
* seccomp, an allow-list: the system calls a grader needs and nothing else (no exec,
  fork, sockets, ioctl but a few harmless requests, chmod/chown/utime/xattr, mknod,
  host names, the kernel log, ptrace, namespaces, raised limits); the rest fail with
  EPERM, so Python raises instead of dying.

The network namespace is the template's (a new, empty one; every grader inherits it).
Each layer is tried on its own; one the kernel refuses is reported, not fatal, so the
service runs where it can and says what is isolated (``/readyz``). Wall-clock limits
are the service's: it kills the process, which no code inside can prevent.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import struct
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_THREAD = 0x00010000
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 22, 24, 38
SECCOMP_MODE_FILTER = 2
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_HEADER = struct.pack("=Ii", LINUX_CAPABILITY_VERSION_3, 0)  # version 3, the calling thread
CAP_DATA_SIZE = 24  # two struct __user_cap_data_struct: capabilities 0-31, then 32-63
CAP_SETPCAP = 8
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1
UNPRIVILEGED_UID = 65534  # "nobody"
MAX_FD = 0x7FFFFFFF  # above any descriptor number the kernel hands out

# What a grader may read besides the interpreter and its packages: the system libraries its
# extension modules load, and time zones (on a merged-/usr system /lib is /usr/lib).
SYSTEM_ROOTS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo")
INSTALL_PATHS = ("stdlib", "platstdlib", "purelib", "platlib")  # of sysconfig.get_paths()

# Landlock filesystem rights, by the ABI version that introduced them.
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # execute .. make_sym
FS_BY_ABI = {1: FS_ABI1, 2: FS_ABI1 | 1 << 13, 3: FS_ABI1 | 3 << 13}  # + refer, + truncate
FS_ALL_FROM_5 = FS_ABI1 | 7 << 13  # + ioctl_dev
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1, 2

# ioctl requests a grader may make: Python asks whether a stream is a terminal (TCGETS) and
# sets close-on-exec or non-blocking flags; everything else, TIOCSTI above all, is refused.
TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX = 0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451
ALLOWED_IOCTLS = (TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX)

# What CPython, sympy, reasoning-gym and math-verify need while grading, written from the calls
# CPython's file, memory, time and signal handling make (not traced): the graders' tests run
# under this list, so a call it lacks shows up there as a grader_error. Descriptors come only from open()
# of files Landlock allows, and from the socket the grader was given.
ALLOWED_SYSCALLS = (
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "close",
    "fstat", "newfstatat", "statx", "lstat", "stat", "fstatfs", "statfs", "lseek",
    "mmap", "mprotect", "munmap", "mremap", "brk", "madvise", "msync",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
    "getgroups", "getpgrp", "getsid", "getrandom",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "getitimer", "setitimer", "alarm",
    "futex", "sched_yield", "sched_getaffinity", "set_robust_list", "get_robust_list", "rseq", "restart_syscall",
    "exit", "exit_group",
    "open", "openat", "getdents64", "getcwd", "chdir", "fchdir", "readlink", "readlinkat",
    "access", "faccessat", "faccessat2", "fcntl", "flock", "dup", "dup2", "dup3",
    "poll", "ppoll", "select", "pselect6", "recvfrom", "recvmsg", "sendto", "sendmsg", "shutdown",
    "uname", "sysinfo", "getrusage", "times",
    "mkdir", "mkdirat", "unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2",
    "ftruncate", "truncate", "fsync", "fdatasync",
)  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Resource limits of one grader process."""

    address_space_mb: int = 4096
    cpu_s: int = 600  # of one process's life: a one-answer grader gets its answer's limit instead
    open_files: int = 64
    processes: int = 0  # no new processes or threads (seccomp stops a fork anyway)
    file_size_mb: int = 16


_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args) -> int:
    """A system call by number: Landlock's, which glibc has no wrappers for (the same numbers on
    every architecture)."""
    return _checked(_libc.syscall(ctypes.c_long(number), *args))


def _checked(result: int) -> int:
    """A libc call's result; OSError with errno when it failed."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _prctl(option: int, arg: int, *more: int) -> int:
    """prctl(2), or OSError naming the option. prctl is variadic: every argument goes as a full
    register, and the unused ones as zeros (several options refuse anything else with EINVAL)."""
    values = (arg, *more, 0, 0, 0)[:4]
    result = _libc.prctl(option, *(ctypes.c_ulong(v) for v in values))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return result


# --- in the template: once, before any grader is forked ---------------------------------------


def isolate_network() -> str:
    """Move into a new, empty network namespace (needs CAP_SYS_ADMIN or user namespaces)."""
    if _libc.unshare(CLONE_NEWNET) == 0:
        return "new network namespace"
    first = ctypes.get_errno()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "new user and network namespace"
    raise OSError(first, f"unshare(CLONE_NEWNET) refused: {os.strerror(first)}")


def read_roots(graders_module: str) -> list[str]:
    """Directories a grader may read: the interpreter and its packages, the system libraries and the
    package holding the graders. Never the current directory, nor whatever ``sys.path`` picked up
    from it (``python -m`` puts it first): started from ``/``, that would be everything."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *SYSTEM_ROOTS}
    paths.update(v for k, v in sysconfig.get_paths().items() if k in INSTALL_PATHS)
    for name in {graders_module.partition(":")[0].split(".")[0], __name__.split(".")[0]}:
        module = sys.modules.get(name)
        for location in getattr(getattr(module, "__spec__", None), "submodule_search_locations", None) or ():
            paths.add(location)
    real = {os.path.realpath(p) for p in paths}
    return sorted(p for p in real if os.path.isdir(p) and p != "/")


def unreadable_to_others(roots: list[str]) -> list[str]:
    """Roots that a process of another uid cannot reach (a directory on the way without o+x, or
    the root itself without o+rx): graders there can use only what the template imported."""
    bad = []
    for root in roots:
        path = Path(root)
        chain = [*reversed(path.parents), path]
        try:
            modes = [p.stat().st_mode for p in chain]
        except OSError:
            bad.append(root)
            continue
        if any(not m & 0o001 for m in modes) or not modes[-1] & 0o004:
            bad.append(root)
    return bad


def build_filter(sc) -> bytes:
    """The seccomp allow-list as a BPF program, built with libseccomp once in the template; each grader
    loads the program itself (libseccomp would compile it again on every load: 2-3 ms a grader)."""
    deny = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(defaction=deny)
    for name in ALLOWED_SYSCALLS:
        try:
            f.add_rule(sc.ALLOW, name)
        except (ValueError, RuntimeError, OSError):  # not a system call on this architecture
            pass
    for request in ALLOWED_IOCTLS:
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, request))
    f.add_rule(sc.ALLOW, "prlimit64", sc.Arg(2, sc.EQ, 0))  # reading a limit, never setting one
    f.add_rule(sc.ALLOW, "getrlimit")
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # flags sit behind a pointer; libc falls back to clone
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))  # threads only
    import tempfile

    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()  # checked where it is loaded


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def load_filter(program: bytes) -> None:
    """Install a BPF program as this process's seccomp filter (after no_new_privs)."""
    if not program or len(program) % 8:
        raise ValueError(f"a seccomp program is whole 8-byte instructions, not {len(program)} bytes")
    buffer = ctypes.create_string_buffer(program)  # the kernel reads the length from fprog
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


# --- in each grader, after the fork -----------------------------------------------------------


def new_session(keep: int) -> str:
    """No terminal, no inherited streams or descriptors but ``keep``, an empty environment."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, keep)  # ``null`` too, when it is not one of 0-2
    # to the largest number, not the soft limit: a descriptor opened before that limit was lowered
    # sits above it (close_range makes the span free)
    os.closerange(keep + 1, MAX_FD)
    os.environ.clear()  # the template was started with a scrubbed environment already
    return "new session, no terminal, streams on /dev/null, no inherited descriptors, empty environment"


def enter_workdir(workdir: Path, uid: int | None) -> None:
    workdir.mkdir(mode=0o700)
    if uid is not None:
        os.chown(workdir, uid, uid)
    os.chdir(workdir)
    os.environ.update({"TMPDIR": str(workdir), "HOME": str(workdir)})
    import tempfile

    tempfile.tempdir = str(workdir)


def set_limits(limits: Limits, cpu_s: int | None = None) -> str:
    """Lower every limit to the grader's; a limit the service already has below that stays (raising
    a hard limit needs CAP_SYS_RESOURCE, which a container's root often lacks)."""
    mb = 1 << 20
    cpu = cpu_s if cpu_s is not None else limits.cpu_s
    for name, value in (
        ("RLIMIT_AS", limits.address_space_mb * mb),
        ("RLIMIT_CPU", cpu),
        ("RLIMIT_NOFILE", limits.open_files),
        ("RLIMIT_NPROC", limits.processes),
        ("RLIMIT_FSIZE", limits.file_size_mb * mb),
        ("RLIMIT_CORE", 0),
    ):
        which = getattr(resource, name)
        current = resource.getrlimit(which)[1]
        # soft below hard for CPU, so SIGXCPU ends the process before SIGKILL would
        margin = 5 if name == "RLIMIT_CPU" else 0
        hard = value + margin
        if current != resource.RLIM_INFINITY:
            hard = min(hard, current)
        resource.setrlimit(which, (max(min(value, hard - margin), 0), hard))
    return (
        f"address space {limits.address_space_mb} MiB, cpu {cpu} s, {limits.open_files} files, "
        f"{limits.processes} processes, file size {limits.file_size_mb} MiB"
    )


def _capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) capability masks of this thread."""
    data = ctypes.create_string_buffer(CAP_DATA_SIZE)
    _checked(_libc.capget(CAP_HEADER, data))  # glibc's wrapper: the system call's number differs by architecture
    e0, p0, i0, e1, p1, i1 = struct.unpack("=6I", data.raw)
    return e0 | e1 << 32, p0 | p1 << 32, i0 | i1 << 32


def drop_privileges(uid: int | None) -> str:
    """As root: no supplementary groups, ``uid`` as every user and group id. Always: the ambient
    set emptied, no capabilities left, ``no_new_privs``; the bounding set emptied too when the
    process holds CAP_SETPCAP."""
    # Emptying the bounding set needs CAP_SETPCAP in force (the capset below clears it with the
    # rest); a process without it cannot use the set anyway: that takes an exec, which no_new_privs
    # and the seccomp list stop.
    if _capabilities()[0] & 1 << CAP_SETPCAP:
        for cap in range(int(Path("/proc/sys/kernel/cap_last_cap").read_text()) + 1):
            _prctl(PR_CAPBSET_DROP, cap)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root to another uid: the kernel clears every capability
    _checked(_libc.capset(CAP_HEADER, bytes(CAP_DATA_SIZE)))  # also inside a user namespace, where the uid is not root
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    # the groups are named: a service not run as root keeps its own (only root may drop them)
    groups = "groups " + ",".join(map(str, os.getgroups())) if os.getgroups() else "no groups"
    return f"uid {os.getuid()}, gid {os.getgid()}, {groups}, no capabilities, no_new_privs"


def die_with_parent(parent: int) -> None:
    """SIGKILL when the template (pid ``parent``) goes; set after the uid change, which clears it.
    A template gone before this leaves an orphan, adopted by init or a subreaper: it ends at once."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _add_path_rule(ruleset: int, path: str, rights: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        attr = struct.pack("=Qi", rights, fd)  # struct landlock_path_beneath_attr is packed
        _syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), attr, 0)
    finally:
        os.close(fd)


def landlock_attr(abi: int) -> tuple[int, bytes, str]:
    """What a ruleset handles under Landlock ``abi``: every filesystem right that ABI knows (so none
    is allowed unless a rule grants it), TCP from ABI 4 (never granted), signals and abstract UNIX
    sockets scoped to the sandbox from ABI 6. Returns the filesystem rights, the packed struct
    landlock_ruleset_attr (one u64 per field the ABI has) and the words for the report."""
    handled = FS_BY_ABI.get(abi, FS_ALL_FROM_5 if abi >= 5 else FS_BY_ABI[3])
    fields, extra = [handled], ""
    if abi >= 4:
        fields.append(NET_BIND_TCP | NET_CONNECT_TCP)
        extra = ", no TCP"
    if abi >= 6:
        fields.append(SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL)
        extra += ", no signals out"
    return handled, struct.pack(f"={len(fields)}Q", *fields), extra


def landlock_ruleset(workdir: Path, roots: list[str]) -> tuple[int, str]:
    """A Landlock ruleset: read-only beneath ``roots``, read-write beneath ``workdir``, nothing else.
    Built while the process may still open every root; enforced by ``enforce_landlock``."""
    abi = _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    handled, attr, extra = landlock_attr(abi)
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    try:
        read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
        for root in roots:
            _add_path_rule(ruleset, root, read)
        _add_path_rule(ruleset, "/dev/null", (FS_READ_FILE | FS_WRITE_FILE) & handled)
        _add_path_rule(ruleset, str(workdir), handled)
    except OSError:
        os.close(ruleset)
        raise
    return ruleset, f"landlock ABI {abi}: read-only {len(roots)} installation directories, read-write workdir{extra}"


def enforce_landlock(ruleset: int) -> None:
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)


def confine(
    sock_fd: int,
    workdir: Path,
    limits: Limits,
    roots: list[str],
    syscall_filter,
    *,
    parent: int,
    cpu_s: int | None = None,
) -> dict[str, str]:
    """Apply every layer, in order; returns what each one did or why it was refused. ``parent`` is
    the template's pid (the grader dies with it)."""
    report = {"session": new_session(sock_fd)}
    uid = UNPRIVILEGED_UID if os.geteuid() == 0 else None
    enter_workdir(workdir, uid)
    try:
        ruleset, report["filesystem"] = landlock_ruleset(workdir, roots)
    except OSError as err:
        ruleset, report["filesystem"] = None, f"not restricted (landlock: {err.strerror})"
    report["limits"] = set_limits(limits, cpu_s)
    try:
        report["privileges"] = drop_privileges(uid)
    except OSError as err:
        report["privileges"] = f"not dropped: {err}"
    die_with_parent(parent)
    if ruleset is not None:
        try:
            enforce_landlock(ruleset)
        except OSError as err:
            report["filesystem"] = f"not restricted (landlock: {err.strerror})"
    if isinstance(syscall_filter, BaseException):
        report["syscalls"] = f"not filtered: {syscall_filter}"
    else:
        try:
            load_filter(syscall_filter)
            report["syscalls"] = "seccomp allow-list: no exec, fork, sockets, tty ioctls, metadata changes, devices"
        except (OSError, RuntimeError, ValueError) as err:
            report["syscalls"] = f"not filtered: {err}"
    return report
