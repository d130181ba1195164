"""Per-task evaluation metrics (AUROC, RCE); the run's sinks are in metrics_logger.py.

RCE follows the original (the-algorithm-ml metrics/rce.py): relative cross entropy in percent,
100 * (1 - CE(model) / CE(baseline)), where the baseline always predicts the (weighted) positive rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import binary_auroc

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
