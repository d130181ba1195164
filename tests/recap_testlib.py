"""Shared helpers for the model tests: tiny configs and hand-made batches (no data pipeline involved)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recap_app.batch import RecapBatch
from recap_app.config import ModelConfig

NUM_CONTINUOUS = 6
NUM_BINARY = 3
TASKS = ["recap.engagement.is_favorited", "recap.engagement.is_replied"]
# Two tables; the second pools two features so feature order != table order matters.
TABLES = [
    {"name": "t0", "num_embeddings": 20, "embedding_dim": 8, "feature_names": ["f_user"]},
    {"name": "t1", "num_embeddings": 30, "embedding_dim": 8, "feature_names": ["f_author", "f_tweet"]},
]


def tiny_model_config(
    tables: list[dict] | None = None,
    multi_task_type: str = "share_all",
    task_batch_norm: bool = True,
    **overrides,
) -> ModelConfig:
    tower = {"mlp": {"layer_sizes": [8, 1]}}
    if task_batch_norm:
        tower["mlp"]["batch_norm"] = {"affine": False, "momentum": 0.1}
    data = {
        "multi_task_type": multi_task_type,
        "backbone": {
            "mask_net": {
                "use_parallel": True,
                "mask_blocks": [
                    {"output_size": 8, "aggregation_size": 8},
                    {"output_size": 8, "reduction_factor": 0.5},
                ],
                "mlp": {"layer_sizes": [12], "final_layer_activation": True},
            }
        },
        "tasks": {name: tower for name in TASKS},
        "embeddings": {"tables": TABLES if tables is None else tables},
    }
    data.update(overrides)
    return ModelConfig.model_validate(data)


@dataclass
class RawExamples:
    """Per-example data from which batches over any subset of examples (and any key order) are built."""

    continuous: torch.Tensor
    binary: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    ids: dict[str, list[list[int]]]  # feature -> per example list of ids

    def batch(self, rows: list[int] | range | None = None, key_order: list[str] | None = None) -> RecapBatch:
        rows = list(range(len(self.labels))) if rows is None else list(rows)
        keys = list(self.ids) if key_order is None else key_order
        lengths, values = [], []
        for key in keys:
            for r in rows:
                lengths.append(len(self.ids[key][r]))
                values.extend(self.ids[key][r])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.tensor(values, dtype=torch.int64),
            lengths=torch.tensor(lengths, dtype=torch.int32),
        )
        idx = torch.tensor(rows)
        return RecapBatch(
            continuous_features=self.continuous[idx],
            binary_features=self.binary[idx],
            sparse_features=kjt,
            labels=self.labels[idx],
            weights=self.weights[idx],
        )


def make_examples(
    batch_size: int = 8,
    tables: list[dict] | None = None,
    num_tasks: int = len(TASKS),
    seed: int = 0,
    num_continuous: int = NUM_CONTINUOUS,
    num_binary: int = NUM_BINARY,
) -> RawExamples:
    g = torch.Generator().manual_seed(seed)
    tables = TABLES if tables is None else tables
    continuous = torch.randn(batch_size, num_continuous, generator=g) * 10
    binary = (torch.rand(batch_size, num_binary, generator=g) > 0.5).float()
    labels = (torch.rand(batch_size, num_tasks, generator=g) > 0.5).float()
    weights = torch.rand(batch_size, num_tasks, generator=g) + 0.5
    ids: dict[str, list[list[int]]] = {}
    for t in tables:
        for f in t["feature_names"]:
            per_row = []
            for r in range(batch_size):
                n = int(torch.randint(0, 4, (1,), generator=g)) if r else 2  # row 0 never empty
                per_row.append(torch.randint(0, t["num_embeddings"], (n,), generator=g).tolist())
            ids[f] = per_row
    return RawExamples(continuous, binary, labels, weights, ids)
