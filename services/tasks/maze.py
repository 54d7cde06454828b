"""The paper's maze task (Appendix A.1, Figure 14, Table 4).

An n x n grid of '*' (wall), '.' (open), 'S' (start) and 'E' (end), carved by a
randomized depth-first backtracker on the odd cells, so every open cell is
reachable and a path from S to E always exists. The answer is a string of
moves U/D/L/R; any path that reaches E counts (see services.verifier.maze).
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
TRAIN_SIZES = (9, 11, 13, 15)
TEST_SIZES = (7, 9, 11, 13, 15, 17, 19, 21)

PAPER_PROMPT = """You need to solve the following maze.

'*' denotes the wall that you cannot walk through, '.' denotes available area that you can walk through. 'S' denotes the starting point, 'E' denotes the destination.

You need to start from the starting point and cross through the available area to reach the destination. There are four movement actions, including Left, Right, Up, Down.

You need to use L to denote Left movement, R to denote Right movement, U to denote Up movement, and D to denote Down movement.

You can analysis the maze to find the correct path, and you should write the final path in the <answer> </answer>, e.g., <answer> LLRRDUL </answer>.

```
## Maze
{maze}
```

Now try to analyze the maze and put the final path in the <answer> </answer>."""


@dataclass(frozen=True)
class MazeItem:
    """One maze of a dataset split."""

    id: str
    size: int
    maze: str  # rows joined by newlines
    answer: str  # a shortest path, for supervised warm-up and reference

    def prompt(self, template: str = "compact") -> str:
        return render_prompt(self.maze, template)


def render_prompt(maze: str, template: str = "compact") -> str:
    """'paper': the paper's exact wording (Figure 14); 'compact': the grid and a newline, for small models."""
    if template == "paper":
        return PAPER_PROMPT.format(maze=maze)
    if template == "compact":
        return maze + "\n"
    raise ValueError(f"unknown prompt template {template!r}; known: paper, compact")


def generate_maze(size: int, rng: random.Random) -> str:
    """A random size x size maze (size odd, >= 5) with S and E on distinct open cells."""
    if size < 5 or size % 2 == 0:
        raise ValueError(f"maze size must be odd and >= 5, got {size}")
    grid = [["*"] * size for _ in range(size)]
    start = (rng.randrange(1, size, 2), rng.randrange(1, size, 2))
    grid[start[0]][start[1]] = "."
    stack = [start]
    while stack:  # depth-first backtracker over the odd cells
        r, c = stack[-1]
        neighbours = [
            (r + dr, c + dc)
            for dr, dc in ((-2, 0), (2, 0), (0, -2), (0, 2))
            if 0 < r + dr < size - 1 and 0 < c + dc < size - 1 and grid[r + dr][c + dc] == "*"
        ]
        if not neighbours:
            stack.pop()
            continue
        nr, nc = rng.choice(neighbours)
        grid[(r + nr) // 2][(c + nc) // 2] = "."
        grid[nr][nc] = "."
        stack.append((nr, nc))
    open_cells = [(r, c) for r in range(size) for c in range(size) if grid[r][c] == "."]
    (sr, sc), (er, ec) = rng.sample(open_cells, 2)
    grid[sr][sc], grid[er][ec] = "S", "E"
    return "\n".join("".join(row) for row in grid)


def shortest_path(maze: str) -> str:
    """A shortest move string from S to E (breadth-first search)."""
    rows = maze.split("\n")
    start = next((r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch == "S")
    previous: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if rows[r][c] == "E":
            path = []
            cell = (r, c)
            while previous[cell] is not None:
                cell, move = previous[cell]
                path.append(move)
            return "".join(reversed(path))
        for move, (dr, dc) in MOVES.items():
            nr, nc = r + dr, c + dc
            if 0 <= nr < len(rows) and 0 <= nc < len(rows[nr]) and rows[nr][nc] != "*" and (nr, nc) not in previous:
                previous[(nr, nc)] = ((r, c), move)
                queue.append((nr, nc))
    raise ValueError("the maze has no path from S to E")


def unique_mazes(size: int, count: int, rng: random.Random, exclude: set[str]) -> Iterator[str]:
    """``count`` mazes of one size not in ``exclude`` (which grows as they are drawn)."""
    made, attempts = 0, 0
    while made < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"could not draw {count} distinct {size}x{size} mazes ({made} found)")
        maze = generate_maze(size, rng)
        if maze in exclude:
            continue
        exclude.add(maze)
        made += 1
        yield maze


def build_splits(
    train_sizes: Iterable[int], test_sizes: Iterable[int], train_per_size: int, test_per_size: int, seed: int
) -> dict[str, list[MazeItem]]:
    """Train and test splits, deduplicated within and across splits (test drawn first)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[MazeItem]] = {"test": [], "train": []}
    for split, sizes, per_size in (("test", test_sizes, test_per_size), ("train", train_sizes, train_per_size)):
        for size in sizes:
            for i, maze in enumerate(unique_mazes(size, per_size, rng, seen)):
                splits[split].append(MazeItem(f"maze{size}-{split}-{i}", size, maze, shortest_path(maze)))
    return splits


def read_jsonl(path: Path) -> list[MazeItem]:
    """Load a split, checking every record (a dataset is outside input too)."""
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            item = MazeItem(str(record["id"]), int(record["size"]), str(record["maze"]), str(record["answer"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a maze record ({err})") from None
        rows = item.maze.split("\n")
        if len(rows) != item.size or any(len(row) != item.size for row in rows) or set(item.maze) - set("SE*.\n"):
            raise ValueError(f"{path}:{number}: maze is not a {item.size}x{item.size} grid of S, E, * and .")
        items.append(item)
    return items
