"""Multi-task BCE-with-logits, as the original's build_multi_task_loss: per-task mean, then mean of tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def build_multi_task_loss(task_names: Sequence[str], pos_weights: Sequence[float] | None = None) -> LossFn:
    """Returns loss_fn(logits [B,T], labels [B,T], weights [B,T]) -> {"loss", "loss/<task>", ...}.

    Mean reduction keeps the gradient of a data-parallel run equal to the single-process one.
    """
    names = list(task_names)
    pw = torch.tensor(list(pos_weights) if pos_weights is not None else [1.0] * len(names))
    if pw.numel() != len(names):
        raise ValueError(f"got {pw.numel()} pos_weights for {len(names)} tasks")

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        # Skipped while torchrec's pipeline FX-traces the model: shapes are proxies then.
        if not is_fx_symbolic_tracing() and (logits.shape != labels.shape or labels.shape != weights.shape):
            raise ValueError(
                f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and weights "
                f"{tuple(weights.shape)} must have the same shape [batch, {len(names)}]"
            )
        losses = {}
        for i, name in enumerate(names):
            losses[f"loss/{name}"] = F.binary_cross_entropy_with_logits(
                logits[:, i],
                labels[:, i].type_as(logits),
                weight=weights[:, i].type_as(logits),
                pos_weight=pw[i].to(logits.device),
                reduction="mean",
            )
        losses["loss"] = torch.stack(list(losses.values())).mean()
        return losses

    return loss_fn
