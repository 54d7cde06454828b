"""The ``<answer>...</answer>`` tag that math and puzzle prompts ask the model to answer in."""

from __future__ import annotations


def last_tagged(response: str) -> str | None:
    """The text of the last ``<answer>...</answer>`` (the innermost, when an opening tag repeats
    before its close), found from the end in linear time: a regex scan is quadratic on a response
    of many unclosed tags, and both the service and the graders run this on model output."""
    end = response.rfind("</answer>")
    start = response.rfind("<answer>", 0, end) if end >= 0 else -1
    return response[start + len("<answer>") : end] if start >= 0 else None
