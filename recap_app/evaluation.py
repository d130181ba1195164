"""Periodic and stand-alone evaluation: score batches on every rank, gather, per-task AUROC / RCE / loss.

The trainer's Validator calls the model directly after `pipeline.detach()`. torchrec's
EvalPipelineSparseDist was the alternative; it rewrites the same sharded module's forward as the
training pipeline does (two pipelines cannot share a model without detaching either), and the padded
one-pass loader needs each batch's real rows counted here, so the direct call stays the simpler one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from recap_app import data
from recap_app.config import EvalConfig, RecapConfig
from recap_app.distributed import Runtime
from recap_app.logs import log
from recap_app.metrics import task_metrics


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    task_names: Sequence[str],
    runtime: Runtime,
    *,
    max_batches: int | None = None,
    real_rows: int | None = None,
    progress_every_s: float = 30.0,
    weighted_auroc: bool = False,
) -> dict[str, float]:
    """Score `batches` (at most `max_batches`) on every rank, gather; per-task AUROC, RCE, the mean loss.

    With `real_rows` (a padded one-pass loader, see one_pass_loader) only this rank's first `real_rows`
    rows count; the zero-weight padding after them adds nothing to the loss sums. Long passes log
    their progress on rank 0 every `progress_every_s` seconds. `weighted_auroc`: see metrics.py.
    """
    was_training = model.training
    model.eval()
    scored, loss_sum, examples = [], 0.0, 0
    start = last = time.perf_counter()
    with torch.no_grad():
        for i, batch in enumerate(itertools.islice(batches, max_batches), 1):
            batch = batch.to(runtime.device)
            loss, out = model(batch)
            rows = batch.labels.shape[0]
            keep = rows if real_rows is None else max(0, min(rows, real_rows - examples))
            # the loss is a mean over the batch of weighted terms: times rows, a sum over its real rows
            loss_sum += float(loss) * rows
            scored.append(
                torch.cat([out["probabilities"], out["labels"], out["weights"]], dim=1)[:keep].float()
            )
            examples += keep
            now = time.perf_counter()
            if now - last >= progress_every_s:
                last = now
                log(f"eval: {i} batches, {examples} examples on rank 0 ({examples / (now - start):.0f} ex/s)")
    model.train(was_training)
    t = len(task_names)
    local = torch.cat(scored) if scored else torch.zeros(0, 3 * t)
    every = _all_gather_rows(local.to(runtime.device), runtime.world_size).cpu()
    metrics = task_metrics(
        every[:, :t], every[:, t : 2 * t], every[:, 2 * t :], list(task_names), weighted=weighted_auroc
    )
    totals = torch.tensor([loss_sum, float(examples)], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(totals)
    metrics["loss"] = float(totals[0] / totals[1])
    metrics["examples"] = int(every.shape[0])
    return metrics


def _all_gather_rows(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's rows of `local` ([n_rank, C], n_rank may differ), concatenated in rank order."""
    counts = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=local.device))
    sizes = [int(c) for c in counts]
    padded = local.new_zeros(max(sizes), local.shape[1])
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)])


class Validator:
    """Periodic evaluation during training: every `cfg.every_n` steps and after the last, the first
    `cfg.num_batches` batches per rank of a one-pass loader built once (files listed at start)."""

    def __init__(
        self, cfg: EvalConfig, loader: DataLoader, real_rows: int, task_names: Sequence[str]
    ) -> None:
        self.cfg, self.loader, self.real_rows = cfg, loader, real_rows
        self.task_names = list(task_names)

    def should_validate(self, step: int, last_step: bool = False) -> bool:
        return last_step or bool(self.cfg.every_n and step % self.cfg.every_n == 0)

    def validate(self, model: torch.nn.Module, runtime: Runtime) -> dict[str, float]:
        return evaluate(
            model,
            self.loader,
            self.task_names,
            runtime,
            max_batches=self.cfg.num_batches,
            real_rows=self.real_rows,
            weighted_auroc=self.cfg.weighted_auroc,
        )


def eval_batch_size(global_batch_size: int, world_size: int) -> int:
    """Per-rank eval batch: the global batch over the ranks, rounded up. Scores do not depend on it (every
    example once, padding weighs nothing), so evaluation runs on any world size, unlike training."""
    return -(-global_batch_size // world_size)


def one_pass_loader(url: str, config: RecapConfig, runtime: Runtime) -> tuple[DataLoader, int]:
    """Every example of `url` once over the ranks: (loader, this rank's real rows). Every rank gets as
    many full batches (zero-weight padding after its real rows), as a sharded model's collectives need.
    Each pass over the loader starts from the beginning: periodic evals take the first
    training.num_eval_steps batches, the same examples each time, without listing the files again."""
    loader = data.make_dataloader(
        url,
        config,
        eval_batch_size(config.data.global_batch_size, runtime.world_size),
        runtime.rank,
        runtime.world_size,
        num_workers=0,
        repeat=False,
        pad=True,
        storage_options=config.storage.options,
    )
    return loader, loader.dataset.rank_rows(runtime.rank)


def format_eval(metrics: dict[str, float], task_names: Sequence[str]) -> str:
    main = task_names[0]
    parts = [f"eval loss {metrics['loss']:.4f} on {metrics['examples']} examples"]
    parts += [
        f"{name.rsplit('.', 1)[-1]}: auroc {metrics[f'auroc/{name}']:.4f} rce {metrics[f'rce/{name}']:.2f}"
        for name in task_names
    ]
    return f"[{main} is the main task] " + " | ".join(parts)
