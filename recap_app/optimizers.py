"""Optimizers as the original pairs them: a sparse optimizer fused into the embedding backward (torchrec),
Adam for everything dense, and the dense learning-rate schedule as a function of the step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recap_app.config import LearningRateConfig, OptimizerConfig, SparseOptimizerConfig, SparseOptimizerType

_SPARSE_OPTIMIZERS: dict[SparseOptimizerType, type[torch.optim.Optimizer]] = {
    SparseOptimizerType.SGD: torch.optim.SGD,
    SparseOptimizerType.ADAGRAD: torch.optim.Adagrad,
    SparseOptimizerType.ROWWISE_ADAGRAD: RowWiseAdagrad,
}


def apply_sparse_optimizer(tables: torch.nn.Module, cfg: SparseOptimizerConfig) -> None:
    """Mark the tables' parameters for an optimizer applied in backward, which torchrec fuses into the
    sharded embedding kernels (CPU supports sgd / adagrad / rowwise_adagrad)."""
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate}
    if cfg.type != SparseOptimizerType.SGD:
        kwargs["eps"] = cfg.eps
    apply_optimizer_in_backward(_SPARSE_OPTIMIZERS[cfg.type], tables.parameters(), kwargs)


def build_dense_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> KeyedOptimizerWrapper:
    """Adam over every parameter without an in-backward optimizer. Data-parallel tables lose theirs when
    sharded, so this one takes them too."""
    adam = cfg.adam
    return KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.Adam(
            params,
            lr=cfg.dense.learning_rate,
            betas=(adam.beta_1, adam.beta_2),
            eps=adam.epsilon,
            weight_decay=adam.weight_decay,
        ),
    )


def learning_rate(step: int, cfg: LearningRateConfig) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to final_fraction over decay_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.decay == "cosine" and cfg.decay_steps:
        progress = min(1.0, (step - cfg.warmup_steps) / cfg.decay_steps)
        scale = cfg.final_fraction + (1 - cfg.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.learning_rate * scale
    return cfg.learning_rate


def set_learning_rate(optimizer: torch.optim.Optimizer | KeyedOptimizerWrapper, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
