"""The original trio from the-algorithm-ml's model.py, made to work for any world size on CPU and GPU.

- ModelAndLoss: wraps ranker + loss so a torchrec pipeline can train it on a Pipelineable batch.
- maybe_shard_model: DistributedModelParallel with topology, sharders and a collective plan.
- log_sharded_tensor_content: gather an embedding table of any sharding type to rank 0, log it, save it.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.streamable import Pipelineable

from recap_app.logs import ALL_RANKS, log
from recap_app.safe_pickle import UntrustedInputError
from recap_app.storage import url_to_fs, write

LossOutput = torch.Tensor | Mapping[str, torch.Tensor]


class ModelAndLoss(torch.nn.Module):
    """`forward(batch) -> (loss, outputs)`: the signature TrainPipelineSparseDist expects.

    The model takes the Pipelineable batch and returns a dict with at least "logits". `loss_fn(logits,
    labels, weights)` returns a scalar or a dict with "loss" (plus per-task entries merged into outputs).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., LossOutput]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Pipelineable) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = dict(self.model(batch))
        if "logits" not in outputs:
            raise KeyError(f"model output must contain 'logits', got keys {sorted(outputs)}")
        losses = self.loss_fn(outputs["logits"], batch.labels.float(), batch.weights.float())
        if isinstance(losses, Mapping):
            if "loss" not in losses:
                raise KeyError(f"loss_fn returned a dict without 'loss': {sorted(losses)}")
            outputs.update(losses)
            loss = losses["loss"]
        else:
            loss = losses
            outputs["loss"] = loss
        outputs["labels"] = batch.labels
        outputs["weights"] = batch.weights
        return loss, outputs


class CpuRowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """Adds row_wise on CPU, which torchrec lists as CUDA-only although it works over gloo."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def _memory_per_rank_bytes(local_world_size: int) -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(local_world_size, 1)


def format_plan(plan: ShardingPlan) -> str:
    """One line per table: module, table, sharding type, compute kernel, ranks."""
    lines = []
    for module_path, module_plan in sorted(plan.plan.items()):
        for table, p in sorted(module_plan.items()):
            ranks = sorted(set(p.ranks or []))
            shards = ""
            if p.sharding_spec is not None:
                shards = " shards=" + ", ".join(
                    f"rank{s.placement.rank()}:{list(s.shard_offsets)}+{list(s.shard_sizes)}"
                    for s in p.sharding_spec.shards
                )
            lines.append(
                f"  {module_path or '<root>'}.{table}: {p.sharding_type} / {p.compute_kernel} "
                f"on ranks {ranks}{shards}"
            )
    return "sharding plan:\n" + "\n".join(lines)


def maybe_shard_model(
    model: torch.nn.Module,
    device: torch.device,
    *,
    sharding_constraints: Mapping[str, Sequence[str]] | None = None,
    use_row_wise_cpu_sharder: bool = True,
    fused_params: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> torch.nn.Module:
    """DistributedModelParallel when torch.distributed is initialised; otherwise `model` itself.

    sharding_constraints maps a table name to the sharding types it may take (e.g. {"user": ["row_wise"]}).
    The plan is made by EmbeddingShardingPlanner on rank 0 on a Topology of this job and broadcast (a
    planning error is raised on every rank), then logged on rank 0. Tables that hold values (not on the
    meta device) keep rank 0's values once sharded, as DDP keeps rank 0's dense parameters.
    """
    if not dist.is_initialized():
        return model

    world_size = dist.get_world_size()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    compute_device = device.type
    capacity: dict[str, int] = {}
    if compute_device == "cuda":
        capacity["hbm_cap_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        capacity["ddr_cap_bytes"] = _memory_per_rank_bytes(local_world_size)
    # torchrec warns that a Topology built directly will fail in later releases: use its factory.
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local_world_size, **capacity),
        kernel_config=KernelConfig(compute_device=compute_device),
    )
    sharder_cls = (
        CpuRowWiseEmbeddingBagCollectionSharder
        if use_row_wise_cpu_sharder and compute_device == "cpu"
        else EmbeddingBagCollectionSharder
    )
    sharders: list[ModuleSharder[torch.nn.Module]] = [sharder_cls(fused_params=fused_params)]
    constraints = {
        table: ParameterConstraints(sharding_types=[ShardingType(t).value for t in types])
        for table, types in (sharding_constraints or {}).items()
    }
    planner_kwargs: dict[str, Any] = {
        "topology": topology,
        "constraints": constraints,
        # torchrec's default (HeuristicalStorageReservation) is deprecated as over-tuned; its default
        # share, 15% of each device's memory, kept for dense parameters, optimizer state and buffers.
        "storage_reservation": FixedPercentageStorageReservation(percentage=0.15),
    }
    if batch_size is not None:
        planner_kwargs["batch_size"] = batch_size
    planner = EmbeddingShardingPlanner(**planner_kwargs)
    pg = dist.GroupMember.WORLD
    plan = _collective_plan(planner, model, sharders, pg)
    log(format_plan(plan))
    # torchrec copies the tables' values into the shards only for CUDA modules; on CPU the shards would
    # start from a fresh random init. Keep what the model holds (not for meta tables: nothing to keep).
    initial_tables = {name: t for name, _, t in embedding_weights(model) if not t.is_meta}
    sharded = DistributedModelParallel(
        module=model,
        device=device,
        env=ShardingEnv.from_process_group(pg),
        plan=plan,
        sharders=sharders,
    )
    if initial_tables:
        _load_initial_tables(sharded, initial_tables, device)
    return sharded


def _collective_plan(
    planner: EmbeddingShardingPlanner,
    model: torch.nn.Module,
    sharders: list[ModuleSharder[torch.nn.Module]],
    pg: dist.ProcessGroup,
) -> ShardingPlan:
    """planner.collective_plan, except that a planning error on rank 0 is raised on every rank:
    torchrec's version leaves the other ranks waiting in the broadcast forever."""
    result: list[Any] = [None]
    if dist.get_rank(pg) == 0:
        try:
            result = [planner.plan(model, sharders)]
        except Exception as e:
            result = [f"{type(e).__name__}: {e}"]
            dist.broadcast_object_list(result, src=0, group=pg)
            raise
    dist.broadcast_object_list(result, src=0, group=pg)
    if isinstance(result[0], str):
        raise RuntimeError(f"sharding plan failed on rank 0: {result[0]}")
    return result[0]


def _load_initial_tables(
    sharded: torch.nn.Module, tables: Mapping[str, torch.Tensor], device: torch.device
) -> None:
    """Copy full (unsharded) tables into the local shards of `sharded`; rank 0's values win, as DDP
    does for dense parameters, so ranks built from different seeds still agree."""
    state = sharded.state_dict()
    with torch.no_grad():
        for name in sorted(tables):
            full = tables[name].detach().to(device, copy=True)
            dist.broadcast(full, src=0)
            target = state[name]
            if isinstance(target, ShardedTensor):
                for shard in target.local_shards():
                    src = full
                    for dim, (offset, size) in enumerate(
                        zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=True)
                    ):
                        src = src.narrow(dim, offset, size)
                    shard.tensor.copy_(src)
            else:
                target.copy_(full)


def _summary(t: torch.Tensor) -> str:
    f = t.detach().float()
    return (
        f"shape={list(t.shape)} dtype={t.dtype} mean={f.mean().item():.6g} std={f.std().item():.6g} "
        f"min={f.min().item():.6g} max={f.max().item():.6g} l2={f.norm().item():.6g}"
    )


def log_sharded_tensor_content(
    weight_name: str,
    table_name: str,
    weight_tensor: torch.Tensor,
    output_url: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> torch.Tensor | None:
    """Collective: gather an embedding weight to rank 0, log it, optionally write it; every rank calls it.

    weight_tensor is a ShardedTensor (any sharding type) or a plain tensor (data-parallel or unsharded
    table). Returns the full [rows, dim] tensor on rank 0 and None on other ranks. With `output_url`,
    rank 0 writes `{output_url}/{table_name}.npy` (NumPy format; load with `load_embedding_table`).
    """
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    # One INFO line per table, on rank 0; where each rank's shards lie is DEBUG (LOGLEVEL=DEBUG).
    log(f"embedding {table_name} ({weight_name})", rank=ALL_RANKS, level=logging.DEBUG)
    if isinstance(weight_tensor, ShardedTensor):
        for shard in weight_tensor.local_shards():
            md = shard.metadata
            log(
                f"  {table_name} local shard offsets={md.shard_offsets} sizes={md.shard_sizes} "
                f"placement={md.placement}",
                rank=ALL_RANKS,
                level=logging.DEBUG,
            )
        meta = weight_tensor.metadata()
        dtype = meta.tensor_properties.dtype
        full = torch.empty(meta.size, dtype=dtype) if rank == 0 else None
        weight_tensor.gather(dst=0, out=full, dtype=dtype)
    else:
        full = weight_tensor.detach().to("cpu", copy=True) if rank == 0 else None
    if full is None:
        return None
    if logging.getLogger("recap").isEnabledFor(logging.DEBUG):
        log(f"  {table_name} values:\n{full}", level=logging.DEBUG)
    written = (
        ""
        if output_url is None
        else f" -> {save_embedding_table(full, output_url, table_name, storage_options)}"
    )
    log(f"embedding {table_name}: {_summary(full)}{written}")
    return full


def _table_url(output_url: str, table_name: str) -> str:
    return f"{output_url.rstrip('/')}/{table_name}.npy"


def save_embedding_table(
    table: torch.Tensor,
    output_url: str,
    table_name: str,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write one table as `.npy` through fsspec; returns the file's URL."""
    url = _table_url(output_url, table_name)
    buf = io.BytesIO()
    np.save(buf, table.detach().cpu().float().numpy())
    write(url, buf.getvalue(), storage_options)
    return url


def load_embedding_table(
    output_url: str,
    table_name: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    step: int | None = None,
) -> torch.Tensor:
    """One table of an embedding dump as a float32 [rows, dim] torch tensor.

    `output_url` is a step folder (`<run>/embeddings/step-200`, what `log_sharded_tensor_content` was
    given), or the run's `--output` with `step=200`. Without torch, the file is plain NumPy:
    `numpy.load("<run>/embeddings/step-200/user.npy")`; on an object store
    `with fsspec.open("s3://b/run/embeddings/step-200/user.npy", "rb") as f: table = numpy.load(f)`.
    """
    if step is not None:
        output_url = f"{output_url.rstrip('/')}/embeddings/step-{step}"
    url = _table_url(output_url, table_name)
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        data = io.BytesIO(f.read())
    try:
        return torch.from_numpy(np.load(data, allow_pickle=False))  # object arrays would unpickle
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
        raise UntrustedInputError(
            f"embedding table {url}: refused to unpickle it (pickled objects; embedding tables are plain "
            "numeric .npy arrays)"
        ) from None


def embedding_weights(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(weight_name, table_name, tensor) for every EmbeddingBagCollection table, sharded or not."""
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3] == "embedding_bags" and parts[-1] == "weight":
            yield name, parts[-2], tensor
