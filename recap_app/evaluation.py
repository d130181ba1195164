"""Periodic and stand-alone evaluation: score batches on every rank, gather, per-task AUROC / RCE / loss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from recap_app import data
from recap_app.config import RecapConfig
from recap_app.distributed import Runtime
from recap_app.metrics import task_metrics


def evaluate(
    model: torch.nn.Module,
    batches: Iterator[Any],
    num_batches: int,
    config: RecapConfig,
    runtime: Runtime,
) -> dict[str, float]:
    """Score num_batches batches per rank; gather to every rank; per-task AUROC, RCE and loss."""
    was_training = model.training
    model.eval()
    probs, labels, weights, losses = [], [], [], []
    with torch.no_grad():
        for _ in range(num_batches):
            batch = next(batches).to(runtime.device)
            loss, out = model(batch)
            probs.append(out["probabilities"].float())
            labels.append(out["labels"].float())
            weights.append(out["weights"].float())
            losses.append(loss.detach().float())
    model.train(was_training)
    local = torch.cat([torch.cat(probs), torch.cat(labels), torch.cat(weights)], dim=1).to(runtime.device)
    gathered = [torch.empty_like(local) for _ in range(runtime.world_size)]
    dist.all_gather(gathered, local)
    every = torch.cat(gathered).cpu()
    t = len(config.task_names)
    metrics = task_metrics(every[:, :t], every[:, t : 2 * t], every[:, 2 * t :], config.task_names)
    mean_loss = torch.stack(losses).mean().to(runtime.device)
    dist.all_reduce(mean_loss)
    metrics["loss"] = float(mean_loss) / runtime.world_size
    metrics["examples"] = int(every.shape[0])
    return metrics


def eval_batches(url: str, config: RecapConfig, runtime: Runtime) -> Iterator[Any]:
    loader = data.make_dataloader(
        url,
        config,
        config.data.per_rank_batch_size(runtime.world_size),
        runtime.rank,
        runtime.world_size,
        num_workers=0,
        repeat=True,
        storage_options=config.data.storage_options,
    )
    return iter(loader)


def format_eval(metrics: dict[str, float], config: RecapConfig) -> str:
    main = config.task_names[0]
    parts = [f"eval loss {metrics['loss']:.4f} on {metrics['examples']} examples"]
    parts += [
        f"{name.rsplit('.', 1)[-1]}: auroc {metrics[f'auroc/{name}']:.4f} rce {metrics[f'rce/{name}']:.2f}"
        for name in config.task_names
    ]
    return f"[{main} is the main task] " + " | ".join(parts)
