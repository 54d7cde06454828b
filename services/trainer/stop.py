"""Stopping the trainer on SIGTERM (a pod evicted or preempted, `docker compose stop`, `passk up`
ending): the run stops at the next point where nothing is half done, its last completed step is
checkpointed, and the process exits with 143 (128 + SIGTERM), not 0, so that a Kubernetes Job or
a supervisor counts it as stopped rather than finished and a ``--resume-if-present`` restart goes on
from that step. A step's collection is abandoned (its groups belong to this run's epoch, which a
resumed trainer never trains on); a step that is training or publishing finishes first, since
both are bounded (``push_timeout_s``).
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM


class Stopped(Exception):
    """The run stopped on request; ``step`` is the last completed (and checkpointed) step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped on SIGTERM after step {step}")
        self.step = step


class StopRequest:
    """Set by SIGTERM (or ``request``); the loop polls ``check`` where stopping is safe."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> None:
        """Take SIGTERM (main thread only): later ones change nothing, the first one is being served."""
        signal.signal(signal.SIGTERM, lambda signum, frame: self.request())

    def request(self) -> None:
        if not self._event.is_set():
            log.warning("SIGTERM: stopping at the next safe point (the last completed step is checkpointed)")
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()
