"""Errors a grader raises to say the request, not the answer, is at fault."""


class InvalidReference(ValueError):
    """The reference (gold answer, maze, puzzle entry) cannot be used to grade."""
