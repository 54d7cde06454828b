"""A step whose gradient is not finite stops the run before the optimizer moves, so no checkpoint can
hold its result; a finite step moves the parameters, each estimator its own way."""

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.trainer.advantage import Estimator
from services.trainer.batch import Batch
from services.trainer.config import TrainerSettings, stage_at
from services.trainer.distributed import Ranks
from services.trainer.step import Optimization, train_on


def setup(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    settings = TrainerSettings(model_dir=str(model_dir), n_rollout=4, k=2, prompts_per_step=2, estimator="grpo")
    return model, Optimization(model, optimizer, scheduler, None, pad_id=0), settings


def batch() -> Batch:
    responses = [[[5, 6], [7], [8, 9, 10], [5]], [[6], [6, 7], [9], [10, 5]]]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    logprobs = [[[-1.0] * len(r) for r in group] for group in responses]
    return Batch([[4, 5, 6], [7, 8]], responses, rewards, torch.ones(2, 4, dtype=torch.bool), logprobs, [0, 0])


def test_a_finite_step_moves_the_parameters(tiny_model):
    model, opt, settings = setup(tiny_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = train_on(batch(), opt, settings, stage_at(settings, 1), 0, Ranks(0, 1, torch.device("cpu")))
    assert metrics["updates"] == 1 and metrics["grad_norm"] > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_nan_gradient_stops_before_the_optimizer_step(tiny_model):
    model, opt, settings = setup(tiny_model)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="non-finite gradient at version 7"):
        train_on(batch(), opt, settings, stage_at(settings, 1), 7, Ranks(0, 1, torch.device("cpu")))
    for name, parameter in model.named_parameters():
        assert torch.equal(before[name], parameter) or torch.isnan(before[name]).any(), name
    assert not opt.optimizer.state  # AdamW never stepped: no moments to save


def test_each_estimator_moves_the_weights_its_own_way(tiny_model):
    """The same batch from the same start: every estimator's step has a gradient, and two estimators
    whose advantages differ take different steps. Plain SGD, so a step is the
    gradient itself (Adam's first step is about lr * sign(gradient) and would hide a rescaling)."""
    steps, advantages = {}, {}
    for estimator in Estimator:
        model, opt, settings = setup(tiny_model)
        opt.optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        opt.scheduler = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda s: 1.0)
        settings = settings.model_copy(update={"estimator": estimator.value})
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        metrics = train_on(batch(), opt, settings, stage_at(settings, 1), 0, Ranks(0, 1, torch.device("cpu")))
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert metrics["grad_norm"] > 0 and metrics["adv_abs_mean"] > 0, estimator
        steps[estimator] = after - before
        advantages[estimator] = (metrics["adv_mean"], metrics["adv_abs_mean"], metrics["adv_std"])
    for a, b in itertools.combinations(Estimator, 2):
        if advantages[a] != pytest.approx(advantages[b]):
            assert not torch.allclose(steps[a], steps[b], rtol=1e-3, atol=1e-9), (a, b)
