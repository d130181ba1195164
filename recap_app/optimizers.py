"""Optimizers as the original pairs them: a sparse optimizer fused into the embedding backward (torchrec),
Adam for everything dense in per-tower parameter groups, and their learning-rate schedules as functions
of the step."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recap_app.config import LearningRateConfig, OptimizerConfig, SparseOptimizerConfig, SparseOptimizerType
from recap_app.ranker import sanitize

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


BACKBONE_GROUP = "backbone"


def tower_group(task: str) -> str:
    return f"tower/{task}"


def dense_param_groups(
    named_params: Mapping[str, torch.nn.Parameter], towers: Sequence[str]
) -> dict[str, dict[str, torch.nn.Parameter]]:
    """The original's grouping (projects/home/recap/optimizer/optimizer.py): a parameter whose name holds
    `.<sanitized task>.` (its tower, its affine map) joins that task's group; every other one (backbone,
    featurization, dense embedding norms, towers without their own rate, data-parallel tables) joins
    the backbone group. Empty groups are left out."""
    groups: dict[str, dict[str, torch.nn.Parameter]] = {tower_group(t): {} for t in towers}
    backbone: dict[str, torch.nn.Parameter] = {}
    for name, param in named_params.items():
        matched = [t for t in towers if f".{sanitize(t)}." in name]
        if len(matched) > 1:
            raise ValueError(f"parameter {name} matches several towers: {matched}")
        (groups[tower_group(matched[0])] if matched else backbone)[name] = param
    missing = [t for t in towers if not groups[tower_group(t)]]
    if missing:
        raise ValueError(f"optimizer.tower_learning_rates: no parameters found for tower(s) {missing}")
    groups[BACKBONE_GROUP] = backbone
    return {k: v for k, v in groups.items() if v}


def schedule_of(cfg: OptimizerConfig, group: str) -> LearningRateConfig:
    """A group's schedule: its tower's, else the backbone's, else dense.learning_rate."""
    if group.startswith("tower/"):
        return cfg.tower_learning_rates[group.removeprefix("tower/")]
    return cfg.backbone_learning_rate or cfg.dense.learning_rate


def build_dense_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> KeyedOptimizerWrapper:
    """Adam over every parameter without an in-backward optimizer (data-parallel tables lose theirs when
    sharded, so this one takes them too), one param group per dense_param_groups group, each named by
    its `name` key. Checkpoints key the state by parameter name, so grouping never changes them."""
    adam = cfg.adam
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    groups = dense_param_groups(params, list(cfg.tower_learning_rates))

    def factory(_: Any) -> torch.optim.Adam:
        return torch.optim.Adam(
            [
                {"params": list(g.values()), "name": name, "lr": learning_rate(0, schedule_of(cfg, name))}
                for name, g in groups.items()
            ],
            betas=(adam.beta_1, adam.beta_2),
            eps=adam.epsilon,
            weight_decay=adam.weight_decay,
        )

    return KeyedOptimizerWrapper(params, factory)


def learning_rate(step: int, cfg: LearningRateConfig) -> float:
    """The rate for the step that follows `step` completed ones, as the original's compute_lr
    (the-algorithm-ml optimizers/optimizer.py): its scheduler reads 0 during the first step, so the
    ramps start at 0."""
    if cfg.constant is not None:
        return cfg.constant
    if (pc := cfg.piecewise_constant) is not None:
        return pc.learning_rate_values[bisect.bisect_right(pc.learning_rate_boundaries, step)]
    if (ramp := cfg.linear_ramp_to_constant) is not None:
        return min(ramp.learning_rate, ramp.learning_rate / ramp.num_ramp_steps * step)
    cos = cfg.linear_ramp_to_cosine
    assert cos is not None  # the config validates that exactly one kind is set
    if step < cos.num_ramp_steps:
        return cos.learning_rate / cos.num_ramp_steps * step
    if step <= cos.final_num_steps:
        progress = (step - cos.num_ramp_steps) / (cos.final_num_steps - cos.num_ramp_steps)
        return cos.final_learning_rate + (cos.learning_rate - cos.final_learning_rate) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )
    return cos.final_learning_rate


def set_learning_rates(
    optimizer: torch.optim.Optimizer | KeyedOptimizerWrapper, step: int, cfg: OptimizerConfig
) -> float:
    """Set every param group's rate for `step`; returns the backbone's (the logged `lr`)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, schedule_of(cfg, group.get("name", BACKBONE_GROUP)))
    return learning_rate(step, schedule_of(cfg, BACKBONE_GROUP))
