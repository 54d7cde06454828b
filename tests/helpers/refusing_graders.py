"""The real graders, in a module that refuses to load while /tmp/passk-refuse-graders-<parent pid>
exists: the test of /readyz with no grader process able to start creates it, then removes it."""

import os
from pathlib import Path

if Path(f"/tmp/passk-refuse-graders-{os.getppid()}").exists():
    raise ImportError("refusing to load: the test asked for it")

from services.verifier import graders as _real

GRADERS, warm = _real.GRADERS, _real.warm
BATCHED = getattr(_real, "BATCHED", frozenset())
