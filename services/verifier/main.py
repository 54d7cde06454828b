"""``passk serve verifier``: the queue worker and the HTTP app in one process."""

from __future__ import annotations

import uvicorn

from services.common.config import VerifierSettings
from services.common.logs import setup_logging
from services.verifier.app import create_app
from services.verifier.service import Verifier


def run(settings: VerifierSettings, *, queue: bool = True) -> None:
    setup_logging("verifier")
    verifier = Verifier(settings)
    if queue:
        verifier.start_queue()
    try:
        uvicorn.run(create_app(verifier), host=settings.host, port=settings.port, log_level="warning")
    finally:
        verifier.close()
