"""Logic puzzles from reasoning-gym, two tasks for each of the seven Enigmata
categories of the paper (Appendix B: crypto, arithmetic, logic, grid, graph,
search, sequential), generated with seeds into train and test splits.

Each item's reference carries the dataset name, its configuration and the
generated entry, so the verifier grades it with reasoning-gym's own scorer
(services.verifier.puzzles) without generating anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from services.tasks.records import TaskItem

# category -> reasoning-gym datasets, default configurations: each is generated
# in milliseconds and its scorer gives the gold answer full marks.
CATALOG: dict[str, tuple[str, ...]] = {
    "crypto": ("caesar_cipher", "cryptarithm"),
    "arithmetic": ("basic_arithmetic", "puzzle24"),
    "logic": ("knights_knaves", "syllogism"),
    "grid": ("mini_sudoku", "n_queens"),
    "graph": ("shortest_path", "course_schedule"),
    "search": ("word_ladder", "jugs"),
    "sequential": ("tower_of_hanoi", "number_sequence"),
}
MAX_PER_TASK = 1 << 20
INSTRUCTION = "\n\nThink it through, then give only the final answer inside <answer> </answer>."


def generate(dataset: str, count: int, seed: int, options: dict | None = None) -> Iterator[tuple[dict, dict]]:
    """(config, entry) pairs of one reasoning-gym dataset, configured by ``options`` beyond its defaults."""
    import reasoning_gym

    if count <= 0:  # reasoning-gym refuses an empty dataset
        return
    config = {**(options or {}), "seed": seed, "size": count}
    try:
        data = reasoning_gym.create_dataset(dataset, **config)
    except (AssertionError, TypeError, ValueError) as err:  # its checks are asserts; a wrong type fails in them
        raise ValueError(f"{dataset}: bad configuration {options}: {err}") from None
    for i in range(count):
        entry = data[i]
        yield config, {"question": entry["question"], "answer": entry["answer"], "metadata": entry["metadata"]}


def reference(dataset: str, config: dict, entry: dict) -> str:
    """The grader's reference for a puzzle (services/verifier/puzzles.py): the reasoning-gym
    dataset, its configuration and the entry (sets in metadata become lists)."""
    return json.dumps({"dataset": dataset, "config": config, "entry": entry}, default=list)


def catalog_of(names: list[str]) -> dict[str, tuple[str, ...]]:
    """A catalog of the reasoning-gym datasets named ``dataset`` or ``dataset=category`` (the
    category defaults to the dataset's name); ValueError naming an unknown dataset."""
    from reasoning_gym.factory import DATASETS

    catalog: dict[str, tuple[str, ...]] = {}
    for name in names:
        dataset, _, category = name.partition("=")
        if dataset not in DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r} (reasoning-gym has {len(DATASETS)}, e.g. "
                             f"{', '.join(sorted(DATASETS)[:5])})")  # fmt: skip
        catalog[category or dataset] = (*catalog.get(category or dataset, ()), dataset)
    return catalog


def parse_options(specs: list[str]) -> dict[str, dict]:
    """{dataset: {field: value}} of ``DATASET.FIELD=VALUE`` specs (the value read as JSON, else as
    text), checked against the dataset's configuration class; ValueError naming a bad spec."""
    import dataclasses

    from reasoning_gym.factory import DATASETS

    options: dict[str, dict] = {}
    for spec in specs:
        target, sep, text = spec.partition("=")
        dataset, dot, field = target.partition(".")
        if not (sep and dot and dataset and field):
            raise ValueError(f"option {spec!r}: expected DATASET.FIELD=VALUE, e.g. chain_sum.max_terms=3")
        if dataset not in DATASETS:
            raise ValueError(f"option {spec!r}: unknown reasoning-gym dataset {dataset!r}")
        fields = {f.name for f in dataclasses.fields(DATASETS[dataset][1])} - {"seed", "size"}
        if field not in fields:
            raise ValueError(f"option {spec!r}: {dataset} has no field {field!r} (it has {', '.join(sorted(fields))})")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options.setdefault(dataset, {})[field] = value
    return options


def build_splits(
    train_per_task: int,
    test_per_task: int,
    seed: int,
    catalog: dict[str, tuple[str, ...]] | None = None,
    options: dict[str, dict] | None = None,
) -> dict[str, list[TaskItem]]:
    """Train and test splits of ``catalog`` (category -> datasets; the Enigmata-like CATALOG by
    default), each dataset configured by its ``options`` (reasoning-gym's defaults otherwise); test
    questions never appear in train."""
    if not (0 <= train_per_task < MAX_PER_TASK and 0 <= test_per_task < MAX_PER_TASK) or seed < 0:
        raise ValueError(f"items per task must be in [0, {MAX_PER_TASK}) and the seed >= 0")
    splits: dict[str, list[TaskItem]] = {"test": [], "train": []}
    for category, datasets in (catalog or CATALOG).items():
        for dataset in datasets:
            seen: set[str] = set()
            # reasoning-gym draws item i from Random(seed + i): splits start 2**20 apart so their items never coincide
            base = seed << 21
            for split, count, split_seed in (("test", test_per_task, base | 1 << 20), ("train", train_per_task, base)):
                for config, entry in generate(dataset, count, split_seed, (options or {}).get(dataset)):
                    if entry["question"] in seen:
                        continue
                    seen.add(entry["question"])
                    prompt = entry["question"] + INSTRUCTION
                    item_id = f"{dataset}-{split}-{len(splits[split])}"
                    gold = str(entry["answer"])
                    splits[split].append(
                        TaskItem(item_id, "puzzle", category, prompt, reference(dataset, config, entry), gold)
                    )
    return splits
