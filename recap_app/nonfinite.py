"""The non-finite guard: a NaN or inf loss never ends in a checkpoint, an embedding log or an export.

Policy `training.on_nonfinite`:
- fail (default): each step's per-task losses are checked on the device and folded into a flag (no host
  sync per step); the flag is read at the log, eval, checkpoint and embedding-log boundaries, and before
  any save the saved tensors themselves are scanned. The job then stops with the first bad step, its
  task(s) and the batch's source (file and row group) named, and nothing after that step is written.
- skip: the update of a batch whose loss is non-finite on any rank is skipped (backward and optimizer
  step, so the fused sparse update too), as AMP's GradScaler skips a step; the count goes to the
  metrics and the job fails after `training.max_consecutive_nonfinite` skips in a row. Deciding before
  backward needs the ranks to agree each step: one small all-reduce and a host sync per step, the price
  of this policy (on GPU too).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from recap_app.config import NonFinitePolicy
from recap_app.errors import InputError


class NonFiniteError(InputError):
    """Training produced a non-finite loss or state; the message says at which step and from what data."""


def _local_tensors(value: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) for every floating tensor in a nested state dict; a ShardedTensor's local shards."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _local_tensors(v, f"{prefix}{k}.")
    elif isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            yield prefix.rstrip("."), shard.tensor
    elif isinstance(value, torch.Tensor) and value.is_floating_point():
        yield prefix.rstrip("."), value


def nonfinite_names(state: Mapping[str, Any]) -> list[str]:
    """Names of the tensors of `state` (this rank's part) holding a NaN or an inf."""
    return [name for name, t in _local_tensors(state) if not bool(torch.isfinite(t).all())]


class NonFiniteGuard:
    """Accumulates, per rank and on the device, the first step whose loss was non-finite (fail policy),
    or counts skipped steps (skip policy); `check()` is the collective that turns either into an error."""

    def __init__(
        self, policy: NonFinitePolicy, max_consecutive: int, task_names: Sequence[str], device: torch.device
    ) -> None:
        self.policy, self.max_consecutive, self.task_names = policy, max_consecutive, list(task_names)
        self.device = device
        self._first_bad = torch.tensor(-1, device=device)
        self._bad_tasks = torch.zeros(len(self.task_names), dtype=torch.bool, device=device)
        self._sources: dict[int, str] = {}
        self.skipped = 0
        self.consecutive_skipped = 0

    def losses(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([outputs[f"loss/{t}"].detach().float() for t in self.task_names])

    def record(self, step: int, outputs: Mapping[str, torch.Tensor], source: str) -> None:
        """After a step (fail policy): fold its losses into the device-side flag."""
        bad = ~torch.isfinite(self.losses(outputs))
        first = bad.any() & (self._first_bad < 0)
        self._bad_tasks |= bad & first
        self._first_bad = torch.where(first, torch.tensor(step, device=self.device), self._first_bad)
        self._sources[step] = source

    def check(self) -> None:
        """Collective (every rank, at the same steps): raise if any rank saw a non-finite loss."""
        big = torch.iinfo(torch.int64).max
        first = torch.where(self._first_bad < 0, torch.tensor(big, device=self.device), self._first_bad)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first)
        if step != big:
            mine = (
                self._bad_tasks.int()
                if int(self._first_bad) == step
                else torch.zeros_like(self._bad_tasks.int())
            )
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            sources: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(sources, self._sources.get(step) if int(self._first_bad) == step else None)
            tasks = [t for t, b in zip(self.task_names, mine.tolist(), strict=True) if b]
            where = "; ".join(s for s in sources if s) or "unknown"
            raise NonFiniteError(
                f"step {step}: non-finite loss for task(s) {tasks}, batch from {where}; nothing after step "
                f"{step - 1} was saved. Check those rows (labels, weights, features) and "
                "optimizer.dense.learning_rate, or set training.on_nonfinite=skip"
            )
        self._sources.clear()

    def check_state(self, step: int, state: Mapping[str, Any]) -> None:
        """Collective, before a save or an embedding log: refuse to write non-finite tensors."""
        names = nonfinite_names(state)
        bad = torch.tensor(len(names), device=self.device)
        dist.all_reduce(bad)
        if int(bad):
            raise NonFiniteError(
                f"step {step}: {int(bad)} tensor(s) hold NaN / inf (e.g. {names[:3] or 'on another rank'}); "
                "not saved. Lower optimizer.dense.learning_rate or check the data"
            )

    def skip_decision(self, step: int, losses: torch.Tensor, source: str) -> bool:
        """Skip policy, collective before backward: True when any rank's loss is non-finite."""
        finite = torch.isfinite(losses.detach()).all().int()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if int(finite):
            self.consecutive_skipped = 0
            return False
        self.skipped += 1
        self.consecutive_skipped += 1
        if self.consecutive_skipped >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: non-finite loss in {self.consecutive_skipped} steps in a row "
                f"(training.max_consecutive_nonfinite={self.max_consecutive}); last batch from "
                f"{source or 'unknown'}"
            )
        return True


class GuardedTrainPipeline(TrainPipelineSparseDist):
    """TrainPipelineSparseDist that, under the skip policy, leaves out the backward and optimizer step
    of a batch whose loss is non-finite on any rank (every rank skips alike, so collectives match).

    The skipped batch's forward has already moved the buffers (batch-norm running statistics), possibly
    to NaN: they are restored from a copy taken after the last good step (a few KB for the ranker)."""

    def __init__(self, *args: Any, guard: NonFiniteGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.skip = guard.policy == NonFinitePolicy.SKIP
        self.step = 0
        self.skipped_last = False
        self.last_batch: Any = None  # the batch of the last step (for trainer callbacks)
        self.last_source = ""
        self._buffers: list[torch.Tensor] | None = None

    def progress(self, dataloader_iter: Iterator[Any]) -> Any:
        if self.skip and self._buffers is None:
            self._buffers = [b.detach().clone() for b in self._model.buffers()]
        return super().progress(dataloader_iter)

    def _backward(self, losses: torch.Tensor) -> None:
        self.last_batch = self.batches[0]
        self.last_source = getattr(self.last_batch, "source", "")
        self.skipped_last = self.skip and self.guard.skip_decision(self.step, losses, self.last_source)
        if self.skipped_last:
            with torch.no_grad():
                for buffer, saved in zip(self._model.buffers(), self._buffers or [], strict=True):
                    buffer.copy_(saved)
        else:
            super()._backward(losses)

    def _optimizer_step(self) -> None:
        if self.skipped_last:
            return
        super()._optimizer_step()
        if self.skip:
            with torch.no_grad():
                for buffer, saved in zip(self._model.buffers(), self._buffers or [], strict=True):
                    saved.copy_(buffer)
