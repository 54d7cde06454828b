"""The trainer's ranks: torchrun's environment, gloo on CPU and NCCL on GPU.

Rank 0 talks to Redis and the rollout replicas and sends each step's batch to
the other ranks; every rank trains on its share, and their gradients are
summed (each rank's loss is already divided by the whole mini-batch's
normalizer, so the sum is exactly the mini-batch's gradient, whatever the
number of ranks). One process without torchrun is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Ranks:
    """This process's place, from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: 0 of 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
        place = torch.device("cuda", local)
    else:
        place = torch.device(device)
    if world > 1 and not dist.is_initialized():
        # the other ranks wait in a collective while rank 0 evaluates or waits on rollouts: hours, not
        # the default 30 minutes, before a wait counts as a hang
        timeout = timedelta(seconds=float(os.environ.get("PASSK_DIST_TIMEOUT_S", "7200")))
        dist.init_process_group(backend="nccl" if place.type == "cuda" else "gloo", timeout=timeout)
    return Ranks(rank, world, place)


def broadcast(obj, ranks: Ranks):
    """Rank 0's object on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_gradients(parameters: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Sum every rank's gradients in place, in one flat all-reduce."""
    if ranks.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    at = 0
    for p, g in zip(parameters, grads, strict=True):
        p.grad = flat[at : at + g.numel()].view_as(p).clone()
        at += g.numel()


def gather_rows(local: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Rows of every rank, rank-major: rank r's row i at r * rows + i (equal row counts)."""
    if ranks.world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(ranks.world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def sum_scalars(values: list[float], ranks: Ranks) -> list[float]:
    if ranks.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: each decoder layer and the rest of the model sharded across the ranks, in place. FSDP2
    averages the ranks' gradients (a sum would need PREMUL_SUM, which gloo lacks), so the training
    step scales each rank's loss by the number of ranks."""
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(getattr(model, "model", model), "layers", []):
        fully_shard(layer)
    fully_shard(model)


def full_state(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole state dict on the host, on rank 0 (a collective when sharded: every rank calls it;
    the others get an empty dict)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """The optimizer's whole state for a checkpoint (a collective when sharded; rank 0 gets it all)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """Restore a checkpoint's optimizer state (every rank passes the whole state; each keeps its shard)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
