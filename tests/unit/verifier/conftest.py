"""Fixtures of the sandbox tests."""

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def open_dir():
    """A directory every uid can reach and write (pytest's tmp_path sits under a 0700 one): where a
    test lets a process of another uid work, so that only the layer under test stands in its way."""
    path = Path(tempfile.mkdtemp(prefix="passk-sandbox-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def bpf() -> bytes:
    """The seccomp program the verifier's template builds."""
    import pyseccomp

    from services.verifier import sandbox

    return sandbox.build_filter(pyseccomp)
