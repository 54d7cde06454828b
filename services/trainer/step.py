"""One training step on every rank: from a step's batch of scored groups to
updated parameters.

1. Noise rewards, if configured (the same draws on every rank).
2. Without gradients, each rank recomputes the log-probs of its groups under
   the policy before the step (the PPO "old" policy; the sampler's own
   log-probs differ by the engine's numerics) and their entropies, and under
   the reference policy when there is a KL term. Entropies are gathered, since
   the adaptive estimator needs every group's.
3. Advantages of the whole batch, on every rank alike (pure functions of the
   same inputs).
4. The batch in mini-batches, one optimizer update each; within one, each
   rank runs its share in micro-batches and the gradients are summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.trainer import distributed
from services.trainer.advantage import compute_advantages
from services.trainer.batch import Batch, flip_negatives, mini_batches, negative_diversity, normalizer, shard
from services.trainer.binomial import pass_at_k
from services.trainer.config import Stage, TrainerSettings
from services.trainer.diagnostics import advantage_diagnostics, diagnostics_by_task
from services.trainer.distributed import Ranks
from services.trainer.loss import policy_loss, response_logprobs
from services.trainer.token_shaping import Covariance


@dataclass
class Optimization:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    reference: torch.nn.Module | None
    pad_id: int


def masked_advantages(
    estimator: str, rewards: torch.Tensor, valid: torch.Tensor, k: int, options: dict
) -> torch.Tensor:
    """Advantages of the valid answers, each group estimated on its valid answers alone; 0 for the
    masked ones and for groups left with fewer than max(2, k) valid answers."""
    usable = valid.sum(1) >= max(2, k)
    advantages = torch.zeros(rewards.shape)
    if usable.any():
        options = {key: (v[usable] if key == "entropy" else v) for key, v in options.items()}
        advantages[usable] = compute_advantages(estimator, rewards[usable], k=k, mask=valid[usable], **options).float()
    return advantages


def token_loss_options(s: TrainerSettings, version: int, rank: int) -> dict:
    """The token-level options of the preset as ``policy_loss`` arguments; Clip-Cov's draws come from
    a generator seeded by the run, the version and the rank (the same on a resumed run)."""
    options: dict = {}
    if s.entropy_advantage is not None:
        options["entropy_advantage"] = (s.entropy_advantage.alpha, s.entropy_advantage.kappa)
    if s.top_entropy is not None:
        options["top_entropy"] = s.top_entropy
    if s.covariance is not None:
        options["covariance"] = Covariance(**s.covariance.model_dump())
        options["generator"] = torch.Generator().manual_seed((s.seed * 1_000_003 + version) * 1_009 + rank)
    return options


def _chunks(index: list[int], size: int) -> list[list[int]]:
    size = size or len(index) or 1
    return [index[i : i + size] for i in range(0, len(index), size)]


def _padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows])


def _forward(model: torch.nn.Module, batch: Batch, groups: list[int], pad_id: int, autocast: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        prompts, responses = [batch.prompts[g] for g in groups], [batch.responses[g] for g in groups]
        return response_logprobs(model, prompts, responses, pad_id)


def train_on(
    batch: Batch,
    opt: Optimization,
    s: TrainerSettings,
    stage: Stage,
    version: int,
    ranks: Ranks,
    rows: list[str] | None = None,
) -> dict:
    n, model = s.n_rollout, opt.model
    device = ranks.device
    autocast = device.type == "cuda"
    if batch.groups % ranks.world or (s.mini_batch_prompts or batch.groups) % ranks.world:
        raise ValueError(f"prompts per step and per mini-batch must divide among {ranks.world} ranks")

    # 1. noise rewards: the same draws on every rank
    rewards, valid = batch.rewards, batch.valid
    generator = torch.Generator().manual_seed(s.seed * 1_000_003 + version)
    flipped = torch.zeros_like(valid)
    if s.noise_rewards:
        rewards, flipped = flip_negatives(rewards, valid, s.noise_rewards, generator)

    # 2. old (and reference) log-probs of this rank's groups, before any update: a pass of its own only
    # when the step takes several updates or the estimator needs entropies first; with one update the
    # training forward itself is the policy before the update
    mine = shard(list(range(batch.groups)), ranks.rank, ranks.world)
    index_batches = mini_batches(batch.groups, s.mini_batch_prompts or batch.groups)
    pre_pass = len(index_batches) > 1 or stage.estimator == "passk_adaptive"
    old: dict[int, torch.Tensor] = {}
    ref: dict[int, torch.Tensor] = {}
    entropy_local = torch.zeros(len(mine), n, dtype=torch.float64)

    def remember(part: list[int], lp: torch.Tensor, ent: torch.Tensor, mask: torch.Tensor) -> None:
        tokens = mask.sum(1).clamp_min(1)
        per_response = ((ent.detach().float() * mask).sum(1) / tokens).double().cpu().view(len(part), n)
        ref_lp = None
        if opt.reference is not None:
            with torch.no_grad():
                ref_lp = _forward(opt.reference, batch, part, opt.pad_id, autocast)[0]
        for j, g in enumerate(part):
            width = max(1, *(len(r) for r in batch.responses[g]))  # the group's own width
            old[g] = lp[j * n : (j + 1) * n, :width].detach().float()
            if ref_lp is not None:
                ref[g] = ref_lp[j * n : (j + 1) * n, :width].float()
            entropy_local[mine.index(g)] = per_response[j]

    def entropies() -> torch.Tensor:
        gathered = distributed.gather_rows(entropy_local.to(device), ranks).cpu()
        out = torch.zeros(batch.groups, n, dtype=torch.float64)
        for r in range(ranks.world):  # rank-major rows back into group order
            out[shard(list(range(batch.groups)), r, ranks.world)] = gathered[r * len(mine) : (r + 1) * len(mine)]
        return out

    if pre_pass:
        with torch.no_grad():
            for part in _chunks(mine, s.micro_batch_prompts):
                remember(part, *_forward(model, batch, part, opt.pad_id, autocast))
    response_entropy = entropies() if pre_pass else None

    # 3. advantages of the whole batch
    options = dict(stage.estimator_options)
    if stage.estimator == "passk_adaptive":
        options["entropy"] = response_entropy  # computed by the pre-pass
    if stage.estimator == "passk_bootstrap" and "seed" not in options:
        options["seed"] = s.seed * 1_000_003 + version  # fresh bootstrap groups each step
    k = min(stage.k, n)
    advantages = masked_advantages(stage.estimator, rewards, valid, k, options)
    bonus = None
    if batch.bonus is not None:  # outcome-based exploration: on the advantage, after the estimator
        bonus = s.outcome_bonus_c * batch.bonus * valid
        advantages = advantages + bonus.to(advantages.dtype)

    # 4. one update per mini-batch; each rank's share in micro-batches, gradients summed
    lengths = batch.lengths()
    token_options = token_loss_options(s, version, ranks.rank)
    parameters = [p for p in model.parameters() if p.requires_grad]
    losses, clip, shaped, kls, norms, updates = [], [], [], [], [], 0
    for index in index_batches:
        denominator = normalizer(valid[index], lengths[index], s.loss_aggregation)
        opt.optimizer.zero_grad(set_to_none=True)
        local_loss = local_clipped = local_tokens = local_kl = local_shaped = 0.0
        for part in _chunks(shard(index, ranks.rank, ranks.world), s.micro_batch_prompts):
            lp, ent, mask = _forward(model, batch, part, opt.pad_id, autocast)
            if not pre_pass:
                remember(part, lp, ent, mask)
            width = lp.shape[1]
            response_mask = mask & valid[part].reshape(-1, 1).to(device)
            loss, stats = policy_loss(
                lp.float(),
                _padded([old[g] for g in part], width).to(device),
                advantages[part].reshape(-1).to(device),
                response_mask,
                clip_low=s.clip_low,
                clip_high=s.clip_high,
                aggregation=s.loss_aggregation,
                normalizer=denominator,
                entropy=ent.float(),
                entropy_coef=s.entropy_coef,
                ref_logprobs=_padded([ref[g] for g in part], width).to(device) if ref else None,
                kl_coef=s.kl_coef,
                **token_options,
            )
            # FSDP2 averages the ranks' gradients; the normalized losses need their sum
            (loss * ranks.world if s.fsdp else loss).backward()
            count = float(response_mask.sum())
            local_loss += float(loss.detach())
            local_clipped += stats.clip_fraction * count
            local_shaped += stats.shaped_fraction * count
            local_tokens += count
            local_kl += stats.kl
        if not s.fsdp:  # FSDP2 has reduce-scattered them already
            distributed.sum_gradients(parameters, ranks)
        norm = torch.nn.utils.clip_grad_norm_(parameters, s.max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
        if not math.isfinite(norm):  # the norm covers every gradient on every rank
            raise FloatingPointError(f"non-finite gradient at version {version}")
        norms.append(norm)
        opt.optimizer.step()
        opt.scheduler.step()
        updates += 1
        sums = distributed.sum_scalars([local_loss, local_clipped, local_tokens, local_kl, local_shaped], ranks)
        total_loss, clipped, tokens, kl, shaped_tokens = sums
        losses.append(total_loss)
        clip.append(clipped / max(tokens, 1.0))
        shaped.append(shaped_tokens / max(tokens, 1.0))
        kls.append(kl)

    if response_entropy is None:
        response_entropy = entropies()
    correct = (rewards > 0) & valid
    real_correct = (batch.rewards > 0) & valid
    batch_pass_k = pass_at_k(valid.sum(1), real_correct.sum(1), k) if bool((valid.sum(1) >= k).all()) else None
    token_counts = lengths[valid].double()
    by_task = diagnostics_by_task(advantages, rewards, valid, k, rows, response_entropy) if rows else None
    return {
        "estimator": str(stage.estimator),
        "k": k,
        "loss": sum(losses) / len(losses),
        "reward_mean": float(batch.rewards[valid].mean()) if valid.any() else 0.0,
        "trained_reward_mean": float(rewards[valid].mean()) if valid.any() else 0.0,
        "flipped_rewards": int(flipped.sum()),
        f"batch_pass@{k}": float(batch_pass_k.mean()) if batch_pass_k is not None else None,
        "positive_fraction": float(correct[valid].double().mean()) if valid.any() else 0.0,
        "adv_abs_mean": float(advantages[valid].abs().mean()) if valid.any() else 0.0,
        "adv_mean": float(advantages[valid].mean()) if valid.any() else 0.0,
        "adv_std": float(advantages[valid].std()) if int(valid.sum()) > 1 else 0.0,
        "eta_mean": float(advantages.abs().sum(1).mean()),
        "entropy": float(response_entropy[valid].mean()) if valid.any() else 0.0,
        "negative_diversity": negative_diversity(batch.responses, batch.rewards, valid),
        "outcome_bonus_mean": float(bonus[valid].mean()) if bonus is not None and valid.any() else None,
        "response_tokens": float(token_counts.mean()) if token_counts.numel() else 0.0,
        "clip_fraction": sum(clip) / len(clip),
        "token_shaped_fraction": sum(shaped) / len(shaped),
        "kl": sum(kls) / len(kls),
        "grad_norm": sum(norms) / len(norms),
        "updates": updates,
        "lr": opt.scheduler.get_last_lr()[0],
        "failed_verdicts": int((~valid).sum()),
        "groups": batch.groups,
        **advantage_diagnostics(advantages, rewards, valid, k),
        # per task of a mixture (``rows[i]``: group i's task/row), merged into the per-task figures
        **({"task_diagnostics": by_task} if by_task is not None else {}),
    }
