"""The GPU paths in one short run, for a machine with a CUDA device: every
advantage estimator on CUDA against the CPU, the transformers rollout engine on
CUDA (greedy output and log-probs against the CPU, a weight swap from a file),
a CUDA training step (the trainer's log-probs, loss and AdamW step) against the
same step on the CPU, a bf16 autocast step, and NCCL collectives. Prints one
JSON report; exits non-zero if a check fails.

    python3 scripts/gpu_check.py [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "models" / "tiny-maze"
MAZES = [
    "*******\n*S..*.*\n***.*.*\n*...*.*\n*.***.*\n*....E*\n*******\n",
    "*******\n*S....*\n*****.*\n*E....*\n*******\n*******\n*******\n",
]


def advantages_on_cuda() -> dict:
    from services.trainer.advantage import Estimator, compute_advantages

    generator = torch.Generator().manual_seed(0)
    accuracy = torch.rand(512, 1, generator=generator)
    rewards = (torch.rand(512, 32, generator=generator) < accuracy).double()
    entropy = torch.rand(512, generator=generator).double()
    worst = {}
    for estimator in Estimator:
        options: dict = {"entropy": entropy} if estimator == Estimator.PASSK_ADAPTIVE else {}
        if estimator == Estimator.PASSK_BOOTSTRAP:
            options["seed"] = 1
        cpu = compute_advantages(estimator, rewards, k=8, **options)
        on_gpu = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in options.items()}
        gpu = compute_advantages(estimator, rewards.cuda(), k=8, **on_gpu)
        assert gpu.is_cuda and torch.isfinite(gpu).all(), estimator
        worst[estimator.value] = float((gpu.cpu() - cpu).abs().max())
    return worst


def engine_on_cuda() -> dict:
    from safetensors.torch import load_file, save_file

    from services.common.schemas import SamplingParams
    from services.rollout.engine import HFEngine

    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    cpu, gpu = HFEngine(MODEL, threads=4), HFEngine(MODEL, device="cuda")
    _, on_cpu = cpu.generate(MAZES, 2, greedy)
    _, on_gpu = gpu.generate(MAZES, 2, greedy)
    same_tokens = all(a[0].token_ids == b[0].token_ids for a, b in zip(on_cpu, on_gpu, strict=True))
    logprob_gap = max(
        max((abs(x - y) for x, y in zip(a[0].logprobs, b[0].logprobs, strict=False)), default=0.0)
        for a, b in zip(on_cpu, on_gpu, strict=True)
    )
    original = load_file(MODEL / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in original.items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(perturbed, f"{tmp}/v1.safetensors")
        save_file(original, f"{tmp}/v2.safetensors")
        swap1 = gpu.load_weights(Path(f"{tmp}/v1.safetensors"), 1)
        _, changed = gpu.generate(MAZES, 1, greedy)
        swap2 = gpu.load_weights(Path(f"{tmp}/v2.safetensors"), 2)
        _, restored = gpu.generate(MAZES, 1, greedy)
    sampled = SamplingParams(temperature=1.0, max_tokens=24, seed=3)
    start = time.perf_counter()
    _, many = gpu.generate(MAZES * 16, 32, sampled)
    seconds = time.perf_counter() - start
    tokens = sum(len(g.token_ids) for gens in many for g in gens)
    return {
        "greedy_tokens_equal_cpu": same_tokens,
        "max_logprob_gap_vs_cpu": logprob_gap,
        "perturbed_changes_output": [c[0].token_ids for c in changed] != [g[0].token_ids for g in on_gpu],
        "original_restores_output": [r[0].token_ids for r in restored] == [g[0].token_ids for g in on_gpu],
        "swap_seconds": [swap1, swap2],
        "sampling_tokens_per_s": tokens / seconds,
    }


def training_step(device: str, autocast: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from services.trainer.advantage import compute_advantages
    from services.trainer.loss import policy_loss, response_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    prompts = [[1, *torch.randint(3, 16, (40,), generator=generator).tolist()] for _ in range(4)]
    responses = [[torch.randint(3, 16, (6,), generator=generator).tolist() for _ in range(8)] for _ in range(4)]
    rewards = (torch.rand(4, 8, generator=generator) < 0.5).double()
    advantages = compute_advantages("passk_analytic", rewards, k=4).float().view(-1).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logprobs, _, mask = response_logprobs(model, prompts, responses, pad_id=0)
        loss, stats = policy_loss(logprobs.float(), logprobs.detach().float(), advantages, mask)
    optimizer.zero_grad()
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    before = next(model.parameters()).detach().clone()
    optimizer.step()
    moved = float((next(model.parameters()).detach() - before).abs().max())
    return {"loss": loss.item(), "grad_norm": norm, "param_change": moved, "clip_fraction": stats.clip_fraction}


def nccl() -> dict:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.arange(1 << 24, device="cuda", dtype=torch.float32)  # 64 MiB
        dist.all_reduce(x)
        dist.broadcast(x, src=0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        return {"backend": dist.get_backend(), "all_reduce_64MiB_ms": (time.perf_counter() - start) * 100,
                "sum_correct": bool(x[5].item() == 5.0)}  # fmt: skip
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report["advantages_max_gap_vs_cpu"] = advantages_on_cuda()
    report["engine"] = engine_on_cuda()
    cpu, gpu = training_step("cpu"), training_step("cuda")
    report["training_step"] = {"cpu": cpu, "cuda": gpu, "bf16_autocast": training_step("cuda", autocast=True)}
    report["nccl"] = nccl()
    checks = {
        # bootstrap draws its groups on the tensor's device: its gap is reported, not required to be 0
        "advantages": max(v for k, v in report["advantages_max_gap_vs_cpu"].items() if k != "passk_bootstrap") < 1e-9,
        "greedy": report["engine"]["greedy_tokens_equal_cpu"] and report["engine"]["max_logprob_gap_vs_cpu"] < 1e-3,
        "swap": report["engine"]["perturbed_changes_output"] and report["engine"]["original_restores_output"],
        "training": abs(cpu["loss"] - gpu["loss"]) < 1e-4 and abs(cpu["grad_norm"] - gpu["grad_norm"]) < 1e-3
        and gpu["param_change"] > 0,
        "bf16": all(map(lambda v: v == v and abs(v) < 1e6, report["training_step"]["bf16_autocast"].values())),
        "nccl": report["nccl"]["sum_correct"],
    }  # fmt: skip
    report["checks"] = checks
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
