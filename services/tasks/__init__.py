"""Task generators, datasets and prompt templates (maze, puzzles, math)."""
