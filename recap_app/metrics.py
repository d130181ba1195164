"""Per-task evaluation metrics (AUROC, RCE); the run's sinks are in metrics_logger.py.

Both follow the original (the-algorithm-ml metrics/rce.py, metrics/auroc.py) formula for formula:

- `rce/<task>`: relative cross entropy in percent, 100 * (1 - CE(model) / CE(baseline)), the baseline
  always predicting the weighted positive rate; per example -y log(p + eps) - (1 - y) log(1 - p + eps)
  after clipping p to [eps, 1 - eps], eps = 1e-7, averaged with the example weights. Evaluated in float64
  (the original runs in its inputs' float32). A set without positives (or without negatives) has a
  baseline CE of exactly 0, so, as in the original, RCE is -inf (nan if the model's CE is 0 too).
- `auroc/<task>`: the Mann-Whitney U statistic, ties counted half. Unweighted by default (each example
  counts once); with `eval.weighted_auroc=true` the original's AUROCWithMWU, each positive-negative pair
  counting the product of their weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import binary_auroc

_EPS = 1e-7


def binary_cross_entropy_with_clipping(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The original's _binary_cross_entropy_with_clipping, per example (float64)."""
    p = probs.double().clamp(_EPS, 1 - _EPS)
    y = labels.double()
    return -y * torch.log(p + _EPS) - (1 - y) * torch.log(1 - p + _EPS)


def weighted_cross_entropy(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    w = weights.double()
    return float((binary_cross_entropy_with_clipping(probs, labels) * w).sum() / w.sum())


def relative_cross_entropy(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """100 * (1 - CE(probs) / CE(constant positive rate)); 0 for a model no better than the rate."""
    w = weights.double()
    rate = (labels.double() * w).sum() / w.sum()
    baseline = binary_cross_entropy_with_clipping(rate, rate)
    model = torch.tensor(weighted_cross_entropy(probs, labels, weights), dtype=torch.float64)
    return float((1.0 - model / baseline) * 100)  # a zero baseline divides as the original: -inf / nan


def _mwu(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, ties_win: bool) -> torch.Tensor:
    """The original's _compute_helper: sum over positives of weight x weighted negatives scored below
    (and, with `ties_win`, level with) it, over W+ x W-."""
    target_order = torch.argsort(labels, descending=not ties_win, stable=True)
    score_order = target_order[torch.sort(probs[target_order], stable=True)[1]]
    y, w = labels[score_order], weights[score_order]
    negatives_below = torch.cumsum((1.0 - y) * w, 0)
    positives, negatives = (y * w).sum(), ((1.0 - y) * w).sum()
    return (w * y * negatives_below).sum() / (positives * negatives)


def weighted_auroc(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """AUROCWithMWU: the mean of the ties-as-correct and ties-as-wrong statistics (ties count half)."""
    p, y, w = probs.double(), (labels > 0.5).double(), weights.double()
    if not (y.any() and (1 - y).any()):
        return float("nan")
    le, lt = _mwu(p, y, w, ties_win=True), _mwu(p, y, w, ties_win=False)
    return float(le - (le - lt) / 2.0)


def task_metrics(
    probs: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    task_names: Sequence[str],
    *,
    weighted: bool = False,
) -> dict[str, float]:
    """`auroc/<task>`, `rce/<task>`, `pos_rate/<task>` for [N, T] probabilities, labels and weights;
    `weighted`: AUROC with example weights (eval.weighted_auroc)."""
    out: dict[str, float] = {}
    for i, name in enumerate(task_names):
        p, y, w = probs[:, i], labels[:, i], weights[:, i]
        has_both = bool((y > 0.5).any() and (y < 0.5).any())
        if weighted:
            out[f"auroc/{name}"] = weighted_auroc(p, y, w)
        else:
            out[f"auroc/{name}"] = float(binary_auroc(p.float(), y.int())) if has_both else float("nan")
        out[f"rce/{name}"] = relative_cross_entropy(p, y, w)
        out[f"pos_rate/{name}"] = float(y.float().mean())
    return out
