"""The template process: it imports and warms the graders once, then forks a fresh grader
for the service whenever asked, and never grades anything itself.

Started by the pool (``python -m services.verifier.template SPEC``) with a scrubbed
environment and one descriptor besides its standard streams, its control socket. It moves into a new, empty
network namespace, builds the seccomp filter, and answers each request on the control
socket (``once``, ``batch`` or ``probe``) by forking: the new process keeps only one end
of a fresh socket pair, confines itself (``sandbox.confine``) and grades what arrives on
it; the template hands the other end and a pidfd of the grader (so the service can kill
exactly that process, never a reused pid) to the service with SCM_RIGHTS. No answer
reaches the template, so a grader that ran an answer can change nothing another grader
will see: each starts from the template's untouched memory.

Kinds of grader: ``once`` grades one answer and exits (graders that may execute answer
text); ``batch`` grades batches until the service closes it (graders shown never to
execute answer text, e.g. the maze checker); ``probe`` reports its confinement, layer by
layer, tested by effect.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from services.verifier import frames
from services.verifier.errors import InvalidReference
from services.verifier.sandbox import Limits, build_filter, confine, isolate_network, read_roots, unreadable_to_others

THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DETAIL_CHARS = 500
REPLY_SLICE = 32  # answers per reply message of a batching grader
# Imported here because a grader (another uid, below Landlock) may not be able to load them later:
# a Python installed under /root is unreadable to uid 65534. Looked up lazily by the codecs, json, re.
PRELOADED = ("encodings.idna", "encodings.punycode", "encodings.ascii", "encodings.latin_1", "unicodedata")


def load_graders(graders: str) -> tuple[dict, Callable[[], None] | None, frozenset[str]]:
    """(task -> grader, warm-up function or None, tasks whose grader never executes answer text)."""
    module_name, _, attr = graders.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr or "GRADERS"), getattr(module, "warm", None), frozenset(getattr(module, "BATCHED", ()))


def printable(text: str) -> str:
    """Details go into JSON: no lone surrogates, and short."""
    return text[:DETAIL_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")


def grade_one(table: dict, task: str, response: str, reference: str) -> list:
    """[status, reward, detail] of one answer; the service turns it into a verdict."""
    try:
        grader = table[task]
    except KeyError:
        return ["invalid_request", 0.0, printable(f"unknown task {task!r}; known: {', '.join(sorted(table))}")]
    try:
        reward = float(grader(response, reference))
        if not 0.0 <= reward <= 1.0:  # also NaN
            return ["grader_error", 0.0, printable(f"reward {reward!r} is outside [0, 1]")]
        return ["ok", reward, ""]
    except InvalidReference as err:
        return ["invalid_request", 0.0, printable(str(err))]
    except BaseException as err:
        return ["grader_error", 0.0, printable(f"{type(err).__name__}: {err}")]


def probe_effects() -> dict[str, str]:
    """What a confined grader finds when it tries what each layer forbids: 'refused' or 'ALLOWED'."""
    checks = {
        "read /etc": lambda: open("/etc/passwd", "rb").read(1),
        "socket": socket.socket,
        "fork": os.fork,
        "chmod": lambda: os.chmod(".", 0o777),
        "terminal": lambda: os.open("/dev/tty", os.O_RDWR),
    }
    effects = {"root": "ALLOWED" if os.geteuid() == 0 else "refused"}
    for name, check in checks.items():
        try:
            result = check()
            if name == "fork" and result == 0:
                os._exit(0)
            effects[name] = "ALLOWED"
        except OSError:
            effects[name] = "refused"
    return effects


def serve_grader(sock: socket.socket, kind: str, table: dict, spec: dict, syscall_filter, template: int) -> None:
    """The forked grader's whole life; it never returns."""
    try:
        limits = Limits(**spec["limits"])
        cpu_s = int(spec["timeout_s"]) + 1 if kind == "once" else None
        workdir = Path(spec["workbase"]) / str(os.getpid())
        report = confine(sock.fileno(), workdir, limits, spec["roots"], syscall_filter, parent=template, cpu_s=cpu_s)
        if kind == "probe":
            report["effects"] = json.dumps(probe_effects(), sort_keys=True)
            frames.send_blocking(sock, {"report": {**spec["template_report"], **report}})
            os._exit(0)
        while True:
            job = frames.recv_blocking(sock)
            if job is None:
                os._exit(0)
            task, reference, responses = job["task"], job["reference"], job["responses"]
            # replies go out in slices, so the service turns them into verdicts while this process grades on
            for start in range(0, len(responses), REPLY_SLICE):
                part = responses[start : start + REPLY_SLICE]
                frames.send_blocking(sock, [grade_one(table, task, r, reference) for r in part])
            if kind == "once":
                os._exit(0)
    except BaseException:
        os._exit(70)


def main() -> None:
    spec = json.loads(sys.argv[1])
    control = socket.socket(fileno=spec["control_fd"])
    sys.path[:] = spec["sys_path"]
    os.environ.update(THREAD_ENV)
    sys.dont_write_bytecode = True  # graders cannot write beside the packages
    # No parent-death signal here: it follows the thread that started this process, and the pool starts
    # templates from short-lived threads. The template goes when its control socket closes, which the
    # kernel does when the service dies however it dies; its graders follow it (theirs is set).
    try:
        table, warm, _ = load_graders(spec["graders"])
        if warm is not None:
            warm()  # import lazily loaded parsers now, while imports are cheap and allowed
        for name in PRELOADED:
            importlib.import_module(name)
        try:
            import pyseccomp

            syscall_filter = build_filter(pyseccomp)
        except (ImportError, OSError, RuntimeError, ValueError) as err:
            syscall_filter = err
        try:
            network = isolate_network()
        except OSError as err:
            network = f"not isolated: {err.strerror}"
        spec["roots"] = read_roots(spec["graders"])
        hidden = unreadable_to_others(spec["roots"]) if os.geteuid() == 0 else []
        imports = f"only what the template imported from {', '.join(hidden)} (not readable by other users)"
        spec["template_report"] = {"network": network, "imports": imports if hidden else "any installed module"}
    except Exception as err:
        control.sendall(json.dumps({"failed": printable(f"{type(err).__name__}: {err}")}).encode())
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # graders are reaped by the kernel: no zombies
    gc.collect()
    gc.freeze()  # the graders' objects stay shared with every fork instead of being copied by the GC
    control.sendall(json.dumps({"ready": spec["template_report"]}).encode())
    template = os.getpid()  # the graders' parent: one that finds another parent knows it is gone
    while True:
        request = control.recv(64)
        if not request:
            return  # the service is gone
        kind = request.decode(errors="replace")
        if kind not in ("once", "batch", "probe"):
            continue
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            control.close()
            ours.close()
            serve_grader(theirs, kind, table, spec, syscall_filter, template)
        theirs.close()
        fds = [ours.detach()]
        try:
            fds.append(os.pidfd_open(pid))
        except OSError:  # it already died: the service finds its socket closed
            pass
        socket.send_fds(control, [json.dumps({"pid": pid}).encode()], fds)
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    main()
