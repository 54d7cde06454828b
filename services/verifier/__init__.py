"""Verifier services: sandboxed graders for maze, puzzle and math answers (see
the project issues for status)."""
