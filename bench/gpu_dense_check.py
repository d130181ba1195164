"""Dense heavy ranker on a GPU: numerics against the CPU and training throughput, side by side in one run.

The production architecture without embedding tables (a GPU build of fbgemm is not available to check
the sharded path). Prints a JSON report:
- max |logits_gpu - logits_cpu|, loss difference and worst relative gradient difference (fp32, TF32 off);
- training samples/s (Adam, batch 512) on the CPU and on the GPU in fp32, TF32 and bf16 autocast.
    python bench/gpu_dense_check.py
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import torch

from recap_app.config import load_config
from recap_app.loss import build_multi_task_loss
from recap_app.ranker import RecapRanker

BATCH = 512


def make_batch(config, device: torch.device, seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    t = len(config.task_names)
    cont = torch.randn(BATCH, config.data.num_continuous, generator=g).exp() * 10
    binary = (torch.rand(BATCH, config.data.num_binary, generator=g) > 0.7).float()
    labels = (torch.rand(BATCH, t, generator=g) > 0.8).float()
    return SimpleNamespace(
        continuous_features=cont.to(device),
        binary_features=binary.to(device),
        labels=labels.to(device),
        weights=torch.ones(BATCH, t, device=device),
    )


def numerics(config, loss_fn) -> dict[str, float]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cpu = RecapRanker(config.model, config.data.num_continuous, config.data.num_binary).eval()
    gpu = RecapRanker(config.model, config.data.num_continuous, config.data.num_binary).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    results = {}
    for name, model, device in (("cpu", cpu, torch.device("cpu")), ("gpu", gpu, torch.device("cuda"))):
        batch = make_batch(config, device, seed=1)
        out = model(batch)
        loss = loss_fn(out["logits"], batch.labels, batch.weights)["loss"]
        loss.backward()
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (out["logits"].detach().cpu(), loss.item(), grads)
    (lc, loss_c, gc), (lg, loss_g, gg) = results["cpu"], results["gpu"]
    worst = max(((gg[n] - gc[n]).norm() / gc[n].norm().clamp_min(1e-12)).item() for n in gc)
    return {
        "max_abs_logit_diff": (lg - lc).abs().max().item(),
        "loss_cpu": loss_c,
        "loss_gpu": loss_g,
        "worst_relative_grad_diff": worst,
        "num_grad_tensors": len(gc),
    }


def throughput(config, loss_fn, device: torch.device, steps: int, mode: str) -> float:
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    torch.manual_seed(0)
    model = RecapRanker(config.model, config.data.num_continuous, config.data.num_binary).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = [make_batch(config, device, seed=i) for i in range(4)]

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            out = model(batch)
            loss = loss_fn(out["logits"].float(), batch.labels, batch.weights)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3 if device.type == "cpu" else 20):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    config = load_config("production", ["model.embeddings.tables=[]"])
    loss_fn = build_multi_task_loss(config.task_names, [t.pos_weight for t in config.model.tasks.values()])
    report = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "cpu_threads": torch.get_num_threads(),
        "dense_params": sum(
            p.numel()
            for p in RecapRanker(
                config.model, config.data.num_continuous, config.data.num_binary
            ).parameters()
        ),
        "numerics_fp32": numerics(config, loss_fn),
        "samples_per_s": {"cpu_fp32": throughput(config, loss_fn, torch.device("cpu"), 10, "fp32")},
    }
    for mode in ("fp32", "tf32", "bf16"):
        report["samples_per_s"][f"gpu_{mode}"] = throughput(config, loss_fn, torch.device("cuda"), 200, mode)
    sps = report["samples_per_s"]
    report["gpu_bf16_over_cpu"] = sps["gpu_bf16"] / sps["cpu_fp32"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
