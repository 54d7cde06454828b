"""Mutation testing of the modules whose tests must catch every change that matters.

    .venv/bin/python scripts/mutation.py                 # every module (about an hour on 2 cores)
    .venv/bin/python scripts/mutation.py maze streams    # some of them
    .venv/bin/python scripts/mutation.py --report        # the last results again, without running

mutmut (``[tool.mutmut]`` in pyproject.toml: the modules, the tests that guard them) changes one
thing at a time in a copy of the code under ``mutants/`` and runs the tests that reach the changed
function; a mutant is killed when a test fails (or times out). This prints, per module, the
mutation score (killed / (mutants - equivalent)) and every survivor that ``docs/TESTING.md`` does
not explain as equivalent (a change no behaviour can tell apart), and exits 1 when a module scores
under 90 % or a survivor is unexplained.

The sandbox runs in processes mutmut does not watch: it learns which tests reach a function from
calls in the test process itself, and the layers run in children forked from the tests (which do
inherit the active mutant). So the sandbox's functions are credited with the tests of
``tests/unit/verifier/test_sandbox_layers.py`` and ``test_sandbox_calls.py`` before its mutants run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = [str(Path(sys.executable).with_name("mutmut"))]
MODULES = {
    "advantage": "services.trainer.advantage",
    "loss": "services.trainer.loss",
    "maze": "services.verifier.maze",
    "streams": "services.common.streams",
    "sandbox": "services.verifier.sandbox",
}
SANDBOX_TESTS = ("tests/unit/verifier/test_sandbox_layers.py", "tests/unit/verifier/test_sandbox_calls.py")
EQUIVALENTS = ROOT / "docs" / "TESTING.md"
TARGET = 0.90
KILLED = {"killed", "timeout"}  # a mutant that makes a test hang is caught by its timeout


def mutmut(*args: str, capture: bool = False) -> str:
    # one torch thread: OpenMP's thread pool does not survive the forks mutmut runs each mutant in
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([*MUTMUT, *args], cwd=ROOT, text=True, capture_output=capture, check=False, env=env)
    if done.returncode not in (0, 1):
        sys.exit(f"mutmut {' '.join(args)} failed with exit status {done.returncode}:\n{done.stderr or ''}")
    return done.stdout or ""


def results() -> dict[str, str]:
    """{mutant name: status} of every mutant mutmut has a result for."""
    out = {}
    for line in mutmut("results", "--all", "true", capture=True).splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name.startswith("services."):
            out[name] = status
    return out


def module_of(mutant: str) -> str:
    return next((m for m in MODULES.values() if mutant.startswith(m + ".")), "?")


def credit_sandbox_tests() -> None:
    """Give every sandbox function the layer tests (see the module docstring)."""
    path = ROOT / "mutants" / "mutmut-stats.json"
    stats = json.loads(path.read_text())
    tests = sorted(t for t in stats["duration_by_test"] if t.startswith(SANDBOX_TESTS))
    if not tests:
        sys.exit(f"no test of {SANDBOX_TESTS} in mutmut's stats: are they in pytest_add_cli_args_test_selection?")
    functions = {re.sub(r"__mutmut_\d+$", "", name) for name in results() if name.startswith(MODULES["sandbox"])}
    for function in functions:
        known = set(stats["tests_by_mangled_function_name"].get(function, []))
        stats["tests_by_mangled_function_name"][function] = sorted(known | set(tests))
    path.write_text(json.dumps(stats, indent=4))


def equivalents() -> dict[str, str]:
    """{mutant name: why it is equivalent}, from the table rows "| `name` | why |" of TESTING.md."""
    found = {}
    for line in EQUIVALENTS.read_text().splitlines():
        match = re.match(r"\|\s*`(services\.[^`]+__mutmut_\d+)`\s*\|\s*(.+?)\s*\|\s*$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def report(chosen: list[str]) -> bool:
    statuses, explained = results(), equivalents()
    ok = True
    print(f"{'module':<28} {'mutants':>8} {'killed':>8} {'equivalent':>11} {'survived':>9} {'score':>10}")
    for module in chosen:
        mine = {name: status for name, status in statuses.items() if module_of(name) == module}
        counts = Counter("killed" if s in KILLED else s for s in mine.values())
        survivors = sorted(name for name, s in mine.items() if s not in KILLED)
        equivalent = [name for name in survivors if name in explained]
        # the equivalent mutants are canaries: one "killed" means a test fails in mutmut's workers
        # whatever the mutant (it happened: a limits test ran out of descriptors there), so every
        # kill of that module is in doubt
        canaries = sorted(name for name in mine if name in explained and mine[name] in KILLED)
        unexplained = [name for name in survivors if name not in explained]
        total = len(mine)
        # the mutation score: killed among the mutants a test could kill (the equivalent ones cannot)
        rate = counts["killed"] / (total - len(equivalent)) if total > len(equivalent) else 0.0
        row = (module, total, counts["killed"], len(equivalent), len(unexplained), rate)
        print("{:<28} {:>8} {:>8} {:>11} {:>9} {:>10.1%}".format(*row))
        if not total or rate < TARGET or unexplained or canaries:
            ok = False
        for name in unexplained:
            print(f"    {mine[name]:<12} {name}   (mutmut show {name})")
        for name in canaries:
            print(f"    KILLED, BUT EQUIVALENT: {name}: does a test fail in mutmut's workers on its own?")
    return ok


def main(argv: list[str]) -> int:
    only_report = "--report" in argv
    names = [a for a in argv if not a.startswith("--")] or list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        sys.exit(f"unknown module {unknown}; choose from {sorted(MODULES)}")
    chosen = [MODULES[n] for n in names]
    if not only_report:
        plain = [f"{m}*" for m in chosen if m != MODULES["sandbox"]]
        if plain:
            mutmut("run", *plain)
        if MODULES["sandbox"] in chosen:
            # one cheap mutant, so mutmut brings its stats up to date (new tests, changed code) first
            mutmut("run", f"{MODULES['maze']}.x_check__mutmut_1")
            credit_sandbox_tests()
            mutmut("run", f"{MODULES['sandbox']}*")
    return 0 if report(chosen) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
