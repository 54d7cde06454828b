"""``passk serve verifier``: the queue worker and the HTTP app in one process."""

from __future__ import annotations

from services.common import http_server
from services.common.config import VerifierSettings
from services.common.logs import setup_logging
from services.common.processes import exit_now
from services.verifier.app import create_app
from services.verifier.service import Verifier


def run(settings: VerifierSettings, *, queue: bool = True) -> None:
    setup_logging("verifier")
    verifier = Verifier(settings)
    if queue:
        verifier.start_queue()
    try:
        http_server.serve(create_app(verifier), settings.host, settings.port, http_server.HTTPLimits.of(settings))
    finally:
        verifier.close()
        if verifier.queue_thread is not None and verifier.queue_thread.is_alive():
            exit_now()  # still grading what it handed back: leave without waiting for it
