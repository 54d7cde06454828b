"""gRPC stubs for proto/*.proto, generated on first use (never committed).

Generation writes to a temporary folder and renames it into place, so several
processes starting at once do not see half-written modules.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
GENERATED = Path(__file__).resolve().parent / "_generated"
_lock = threading.Lock()


def _generate(name: str) -> None:
    from grpc_tools import protoc

    source = PROTO_DIR / f"{name}.proto"
    if not source.exists():
        raise FileNotFoundError(f"no proto file {source}")
    target = GENERATED / f"{name}_pb2.py"
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return
    GENERATED.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=GENERATED) as tmp:
        code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(source)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {source} ({code})")
        for produced in Path(tmp).iterdir():
            os.replace(produced, GENERATED / produced.name)
    shutil.rmtree(GENERATED / "__pycache__", ignore_errors=True)


def load(name: str) -> tuple[ModuleType, ModuleType]:
    """(messages, services) modules of proto/<name>.proto."""
    with _lock:
        _generate(name)
        if str(GENERATED) not in sys.path:
            sys.path.append(str(GENERATED))  # the generated services module imports its messages by top-level name
        return importlib.import_module(f"{name}_pb2"), importlib.import_module(f"{name}_pb2_grpc")
