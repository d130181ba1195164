"""RecapBatch: one training batch, a torchrec `Pipelineable` so TrainPipelineSparseDist can prefetch it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class RecapBatch(Pipelineable):
    continuous_features: torch.Tensor  # [B, num_continuous] float32
    binary_features: torch.Tensor  # [B, num_binary] float32 (0/1)
    sparse_features: KeyedJaggedTensor  # one key per sparse id feature
    labels: torch.Tensor  # [B, num_tasks] float32
    weights: torch.Tensor  # [B, num_tasks] float32
    # Where the rows came from ("<file> row group <i>; ..."), for errors about this batch.
    source: str = ""
    # model.dense_embeddings inputs by name, each [B, dim] float32 (TwHIN vectors).
    dense_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    # Unreadable row groups the reader stood in for since its previous batch (data.on_corrupt=skip).
    corrupt_units: tuple[int, ...] = ()

    def to(self, device: torch.device, non_blocking: bool = False) -> RecapBatch:
        return RecapBatch(
            continuous_features=self.continuous_features.to(device, non_blocking=non_blocking),
            binary_features=self.binary_features.to(device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            weights=self.weights.to(device, non_blocking=non_blocking),
            source=self.source,
            dense_embeddings={
                k: v.to(device, non_blocking=non_blocking) for k, v in self.dense_embeddings.items()
            },
            corrupt_units=self.corrupt_units,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.continuous_features, self.binary_features, self.labels, self.weights):
            t.record_stream(stream)
        for t in self.dense_embeddings.values():
            t.record_stream(stream)
        self.sparse_features.record_stream(stream)

    def pin_memory(self) -> RecapBatch:
        return RecapBatch(
            continuous_features=self.continuous_features.pin_memory(),
            binary_features=self.binary_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
            source=self.source,
            dense_embeddings={k: v.pin_memory() for k, v in self.dense_embeddings.items()},
            corrupt_units=self.corrupt_units,
        )

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]
