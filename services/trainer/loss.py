"""The policy loss the paper uses: DAPO's clip-higher PPO objective with a
token-level policy-gradient loss and no KL term (Sec. 2.1, Appendix A.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LossStats:
    clip_fraction: float
    ratio_mean: float


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    aggregation: str = "token",
) -> tuple[Tensor, LossStats]:
    """Clipped surrogate loss to minimize.

    Args:
        logprobs: (S, T) log-probs of the sampled tokens under the current policy.
        old_logprobs: (S, T) the same under the policy that sampled them.
        advantages: (S,) one advantage per response, shared by its tokens (Eq. 3).
        mask: (S, T) bool, the response tokens.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        aggregation: "token" averages over all tokens of the batch (DAPO);
            "sequence" averages per response, then over responses (GRPO, Eq. 4).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    maskf = mask.to(per_token.dtype)
    if aggregation == "token":
        loss = (per_token * maskf).sum() / maskf.sum().clamp_min(1)
    elif aggregation == "sequence":
        loss = ((per_token * maskf).sum(1) / maskf.sum(1).clamp_min(1)).mean()
    else:
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    with torch.no_grad():
        was_clipped = (unclipped != clipped) & mask
        stats = LossStats(
            clip_fraction=float(was_clipped.sum() / mask.sum().clamp_min(1)),
            ratio_mean=float((ratio * maskf).sum() / maskf.sum().clamp_min(1)),
        )
    return loss, stats


def token_logprobs_and_entropy(model: torch.nn.Module, sequences: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
    """(S, T-1) log-prob of each next token and (S, T-1) entropy of the distribution it came from."""
    logits = model(input_ids=sequences, attention_mask=attention).logits[:, :-1].float()
    log_p = logits.log_softmax(-1)
    chosen = log_p.gather(2, sequences[:, 1:].unsqueeze(2)).squeeze(2)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return chosen, entropy
