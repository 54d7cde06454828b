"""The tiny mixture model's warm-up: its tokenizer covers every prompt and answer it learns, the
answers it learns are the ones the graders score correct, and a short build gives a model that
loads and generates."""

import json
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.trainer.tiny_mixture import (
    PUZZLE_OPTIONS,
    ROW_CYCLE,
    build_tiny_mixture,
    build_tokenizer,
    curriculum,
    supervised_batch,
)
from services.verifier.graders import GRADERS


def test_the_learned_answers_are_graded_correct_and_every_character_has_a_token():
    tokenizer = build_tokenizer()
    rng = random.Random(0)
    rows = curriculum(puzzle_pool=30)
    assert {row.split("/")[0] for row in rows} == {"maze", "puzzle", "math"} and len(rows) == 7
    for row, example in rows.items():
        for _ in range(10):
            prompt, answer, reference = example(rng)
            assert GRADERS[row.split("/")[0]](answer, reference) == 1.0, (row, answer)
            assert GRADERS[row.split("/")[0]]("<answer>no</answer>", reference) == 0.0, row
            ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == prompt + answer
    assert set(ROW_CYCLE) == set(rows)  # every row is learned
    chain_sums = [json.loads(rows["puzzle/arithmetic"](rng)[2]) for _ in range(20)]
    assert all(c["config"]["max_terms"] == PUZZLE_OPTIONS["chain_sum"]["max_terms"] for c in chain_sums)
    assert all(c["entry"]["metadata"]["num_terms"] <= 3 for c in chain_sums)
    ids, labels = supervised_batch(tokenizer, rows["math/linear"], 4, rng)
    learned = [tokenizer.decode([t for t in row if t != -100]) for row in labels.tolist()]
    assert all(text.startswith("\\boxed{") and text.endswith("}</s>") for text in learned), learned
    assert ((labels != -100) <= (ids != tokenizer.pad_token_id)).all()  # no loss on padding


def test_a_short_build_loads_and_generates(tmp_path):
    out = build_tiny_mixture(
        tmp_path / "m", steps=7, horizon=50, batch=4, puzzle_pool=20, snapshots={3: tmp_path / "s3"}
    )
    assert (tmp_path / "s3" / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer("Compute 2 + 2.", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert len(tokenizer) == 4 + 97 and tokenizer.unk_token_id not in tokenizer("{x}<answer>~")["input_ids"]
