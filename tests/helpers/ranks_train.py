"""Train the tiny model a few steps on synthetic batches, on however many ranks torchrun started,
and write the final parameters (rank 0). tests/unit/trainer/test_ranks.py runs it with 1 and 2 ranks.

    torchrun --nproc-per-node 2 tests/helpers/ranks_train.py MODEL_DIR OUT.safetensors
"""

import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from services.trainer import distributed
from services.trainer.batch import Batch
from services.trainer.config import TrainerSettings, stage_at
from services.trainer.step import Optimization, train_on

STEPS, GROUPS, N = 3, 4, 4


def synthetic(generator: torch.Generator, vocab: int) -> Batch:
    """The same batch on every rank: every rank draws it from the same seed."""
    prompts = [torch.randint(3, vocab, (12,), generator=generator).tolist() for _ in range(GROUPS)]
    responses = [
        [torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=generator)),), generator=generator).tolist()
         for _ in range(N)]
        for _ in range(GROUPS)
    ]  # fmt: skip
    rewards = torch.randint(0, 2, (GROUPS, N), generator=generator).double()
    valid = torch.ones(GROUPS, N, dtype=torch.bool)
    valid[0, 1] = False  # a failed grading
    logprobs = [[[-1.0] * len(r) for r in group] for group in responses]
    return Batch(prompts, responses, rewards, valid, logprobs, [0] * GROUPS)


def main(model_dir: str, out: str, options: str) -> None:
    ranks = distributed.init("cpu")
    torch.manual_seed(0)
    settings = TrainerSettings(
        model_dir=model_dir, n_rollout=N, k=2, prompts_per_step=GROUPS, lr=1e-3, **json.loads(options)
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    if settings.fsdp:
        distributed.shard_model(model)
    reference = None
    if settings.kl_coef:
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    opt = Optimization(model, optimizer, scheduler, reference, pad_id=0)
    generator = torch.Generator().manual_seed(1)
    metrics = []
    for step in range(1, STEPS + 1):
        batch = synthetic(generator, model.config.vocab_size)
        metrics.append(train_on(batch, opt, settings, stage_at(settings, step), step - 1, ranks))
    state = distributed.full_state(model, settings.fsdp)
    if ranks.main:
        save_file({name: t.detach().clone() for name, t in state.items()}, out)
        with open(out + ".json", "w") as f:
            json.dump(metrics, f)
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
