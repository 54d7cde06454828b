"""The maze path checker, with the semantics of the paper's released checker.

The answer is the text inside the last ``<answer>...</answer>`` or else inside
the last ``\\boxed{...}`` (or, with neither, the whole response). Moves are
U/D/L/R, case-insensitive; every other character is ignored. The answer is
correct if and only if the path never leaves the grid, never enters a wall,
and ends on E (passing E on the way does not count).
"""

from __future__ import annotations

MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}


def extract_answer(response: str) -> str:
    text = response
    if "<answer>" in text and "</answer>" in text:
        text = text.rsplit("<answer>", 1)[1].strip().split("</answer>", 1)[0].strip()
    if "boxed" not in text:
        return text
    tail = text.rsplit("boxed", 1)[1]
    if not tail.startswith("{"):
        return tail.split("$", 1)[0].strip()
    depth, out = 1, []
    for ch in tail[1:]:  # the balanced {...} after \boxed
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            break
        out.append(ch)
    return "".join(out)


def parse_maze(maze: str) -> tuple[list[str], tuple[int, int]]:
    """Rows and the start cell; ValueError for a grid that is not a maze."""
    rows = maze.strip().split("\n")
    if not rows or any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("maze rows must all have the same length")
    if set("".join(rows)) - set("SE*."):
        raise ValueError("maze may only hold S, E, * and .")
    starts = [(r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch == "S"]
    if len(starts) != 1 or "".join(rows).count("E") != 1:
        raise ValueError("maze needs exactly one S and one E")
    return rows, starts[0]


def check(response: str, maze: str) -> bool:
    """True if the response's path leads from S to E through open cells."""
    rows, (r, c) = parse_maze(maze)
    for ch in extract_answer(response).upper():
        if ch not in MOVES:
            continue
        dr, dc = MOVES[ch]
        r, c = r + dr, c + dc
        if not (0 <= r < len(rows) and 0 <= c < len(rows[0])) or rows[r][c] == "*":
            return False
    return rows[r][c] == "E"
