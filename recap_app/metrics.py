"""Per-task evaluation metrics (AUROC, RCE) and the run's metric sinks (metrics.jsonl, TensorBoard).

RCE follows the original (the-algorithm-ml metrics/rce.py): relative cross entropy in percent,
100 * (1 - CE(model) / CE(baseline)), where the baseline always predicts the (weighted) positive rate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics.functional.classification import binary_auroc

from recap_app.logs import log
from recap_app.storage import has_scheme, join, url_to_fs, write

_EPS = 1e-7


def weighted_cross_entropy(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    p = probs.double().clamp(_EPS, 1 - _EPS)
    y = labels.double()
    w = weights.double()
    ce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    return float((ce * w).sum() / w.sum())


def relative_cross_entropy(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """100 * (1 - CE(probs) / CE(constant positive rate)); 0 for a model no better than the rate."""
    rate = float((labels.double() * weights.double()).sum() / weights.double().sum())
    baseline = weighted_cross_entropy(torch.full_like(probs, rate, dtype=torch.float64), labels, weights)
    if baseline == 0:
        return float("nan")
    return 100.0 * (1.0 - weighted_cross_entropy(probs, labels, weights) / baseline)


def task_metrics(
    probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, task_names: Sequence[str]
) -> dict[str, float]:
    """`auroc/<task>`, `rce/<task>`, `pos_rate/<task>` for [N, T] probabilities, labels and weights."""
    out: dict[str, float] = {}
    for i, name in enumerate(task_names):
        p, y, w = probs[:, i], labels[:, i], weights[:, i]
        has_both = bool((y > 0.5).any() and (y < 0.5).any())
        out[f"auroc/{name}"] = float(binary_auroc(p.float(), y.int())) if has_both else float("nan")
        out[f"rce/{name}"] = relative_cross_entropy(p, y, w)
        out[f"pos_rate/{name}"] = float(y.float().mean())
    return out


def read_metrics(url: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] when it does not exist yet)."""
    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Rank 0's sink: `{output}/metrics.jsonl` through fsspec (rewritten whole, since object stores cannot
    append) and TensorBoard event files under `{output}/tensorboard/` for local outputs."""

    def __init__(
        self, output_url: str, storage_options: Mapping[str, Any] | None = None, resume_step: int = 0
    ) -> None:
        self.url = join(output_url, "metrics.jsonl")
        self.storage_options = dict(storage_options or {})
        self.records = [
            r for r in read_metrics(self.url, self.storage_options) if r.get("step", 0) <= resume_step
        ]
        self.tensorboard = None
        tb_url = join(output_url, "tensorboard")
        if not has_scheme(output_url) or output_url.startswith("file://"):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(tb_url.removeprefix("file://"))
        else:
            log(f"TensorBoard events are written for local outputs only; metrics stay in {self.url}")

    def write(self, record: Mapping[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(clean)
        write(
            self.url,
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records),
            self.storage_options,
        )
        if self.tensorboard is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self.tensorboard.add_scalar(k, v, step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
