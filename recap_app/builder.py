"""Config -> ranker -> sharded model -> optimizers: what the trainer, evaluation and export build alike.

The canonical torchrec order (its examples' golden_training): the sparse optimizer is applied in backward
on the unsharded tables, DistributedModelParallel shards them by a plan, then the dense optimizer and the
fused one are combined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from recap_app.config import RecapConfig
from recap_app.distributed import Runtime
from recap_app.loss import build_multi_task_loss
from recap_app.model import ModelAndLoss, maybe_shard_model
from recap_app.optimizers import apply_sparse_optimizer, build_dense_optimizer
from recap_app.ranker import RecapRanker

# The loss wrapper's attribute holding the ranker: checkpoints save the ranker's own keys without it.
RANKER_PREFIX = "model."


def build_ranker(config: RecapConfig, embedding_device: torch.device | None = None) -> RecapRanker:
    """The unsharded ranker of `config` (tables on `embedding_device`; meta: allocated by sharding)."""
    return RecapRanker(
        config.model, config.data.num_continuous, config.data.num_binary, embedding_device=embedding_device
    )


def build_sharded_model(config: RecapConfig, runtime: Runtime) -> torch.nn.Module:
    """ModelAndLoss(ranker, multi-task loss) sharded by DistributedModelParallel, with the sparse
    optimizer fused into the tables. Seeded by training.seed, so every rank builds the same dense init."""
    torch.manual_seed(config.training.seed)
    # Tables are allocated by DistributedModelParallel, shard by shard, not here.
    ranker = build_ranker(config, embedding_device=torch.device("meta"))
    if ranker.embedding_bag_collection is not None:
        apply_sparse_optimizer(ranker.embedding_bag_collection, config.optimizer.sparse)
    tasks = config.model.tasks
    model = ModelAndLoss(ranker, build_multi_task_loss(list(tasks), [t.pos_weight for t in tasks.values()]))
    constraints = {
        t.name: [s.value for s in t.sharding_types]
        for t in config.model.embeddings.tables
        if t.sharding_types
    }
    return maybe_shard_model(
        model,
        runtime.device,
        sharding_constraints=constraints,
        use_row_wise_cpu_sharder=config.training.use_row_wise_cpu_sharder,
        # The planner's estimate of a rank's batch; evaluation takes any world size (the Trainer checks
        # that training's global batch divides).
        batch_size=-(-config.data.global_batch_size // runtime.world_size),
    )


@dataclass
class TrainingParts:
    """The sharded model and its optimizers: `optimizer` steps both, `dense` carries the LR schedule."""

    model: torch.nn.Module
    optimizer: CombinedOptimizer
    dense_optimizer: KeyedOptimizerWrapper


def build_training(config: RecapConfig, runtime: Runtime) -> TrainingParts:
    model = build_sharded_model(config, runtime)
    dense = build_dense_optimizer(model, config.optimizer)
    return TrainingParts(model, CombinedOptimizer([model.fused_optimizer, dense]), dense)
