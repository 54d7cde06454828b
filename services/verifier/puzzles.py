"""Puzzle grading by reasoning-gym's own scorers.

The reference is JSON: ``{"dataset": name, "config": {...}, "entry": {...}}``,
the reasoning-gym dataset that generated the puzzle, its configuration (some
scorers read it, e.g. puzzle24's number range) and the generated entry
(question, answer, metadata). The answer is the text of the last
``<answer>...</answer>``, as reasoning-gym extracts it. Rewards are binary, as
in the paper's Enigmata training: full marks are correct, reasoning-gym's
partial credit (e.g. 0.01 for a well-formed wrong answer) is wrong.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from services.verifier.errors import InvalidReference

MAX_REFERENCE = 262_144


def parse_reference(reference: str) -> tuple[str, str, dict[str, Any]]:
    """(dataset, canonical config JSON, entry); InvalidReference for anything else."""
    from reasoning_gym.factory import DATASETS

    if len(reference) > MAX_REFERENCE:
        raise InvalidReference(f"puzzle reference over {MAX_REFERENCE} characters")
    try:
        data = json.loads(reference)
    except json.JSONDecodeError as err:
        raise InvalidReference(f"puzzle reference is not JSON: {err}") from err
    try:  # \udcxx escapes decode to lone surrogates, which no grader can use (or echo in JSON)
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidReference("puzzle reference holds lone surrogates (\\udXXX escapes of no character)") from None
    if not isinstance(data, dict) or set(data) != {"dataset", "config", "entry"}:
        raise InvalidReference("puzzle reference must be an object with exactly dataset, config and entry")
    name, config, entry = data["dataset"], data["config"], data["entry"]
    if name not in DATASETS:
        raise InvalidReference(f"unknown reasoning-gym dataset {name!r}")
    if not isinstance(config, dict) or not isinstance(entry, dict) or "answer" not in entry:
        raise InvalidReference("puzzle config must be an object and entry an object with an answer")
    return name, json.dumps({**config, "size": 1}, sort_keys=True), entry


@functools.lru_cache(maxsize=128)
def dataset(name: str, config_json: str):
    """The reasoning-gym dataset whose ``score_answer`` grades (built once per configuration)."""
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(name, **json.loads(config_json))
    except (TypeError, ValueError, AssertionError) as err:  # reasoning-gym validates configs with asserts
        raise InvalidReference(f"bad config for {name}: {err}") from err


def score(response: str, reference: str) -> float:
    """reasoning-gym's own score of the response (partial credit included)."""
    from reasoning_gym.utils import extract_answer

    name, config_json, entry = parse_reference(reference)
    return float(dataset(name, config_json).score_answer(answer=extract_answer(response), entry=entry))


def grade(response: str, reference: str) -> float:
    return 1.0 if score(response, reference) >= 1.0 else 0.0


def warm() -> None:
    import reasoning_gym  # noqa: F401  (the import is the warming)
