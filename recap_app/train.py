"""The training main: setup -> build -> shard -> optimizers -> pipeline -> loop (log, eval, save) -> done.

Run under torchrun (`torchx run recap.train`) or as a single process (`recap train`); either way a
process group is set up (gloo on CPU, nccl on GPU) so the same sharded code path and checkpoints are used.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recap_app import data, faults, synthetic_data
from recap_app.checkpoint import Checkpointer, load_model_weights
from recap_app.config import LearningRateConfig, RecapConfig, SparseOptimizerType, load_config
from recap_app.distributed import Runtime, setup_distributed
from recap_app.errors import exit_on_input_error
from recap_app.evaluation import evaluate, format_eval, one_pass_loader
from recap_app.logs import ALL_RANKS, log, setup_logging
from recap_app.loss import build_multi_task_loss
from recap_app.metrics import MetricsWriter
from recap_app.model import ModelAndLoss, embedding_weights, log_sharded_tensor_content, maybe_shard_model
from recap_app.ranker import RecapRanker
from recap_app.storage import exists, join, redact, write

_SPARSE_OPTIMIZERS: dict[SparseOptimizerType, type[torch.optim.Optimizer]] = {
    SparseOptimizerType.SGD: torch.optim.SGD,
    SparseOptimizerType.ADAGRAD: torch.optim.Adagrad,
    SparseOptimizerType.ROWWISE_ADAGRAD: RowWiseAdagrad,
}


# ------------------------------------------------------------------------------------------------ build
@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: CombinedOptimizer
    dense_optimizer: KeyedOptimizerWrapper

    def state_dict(self, step: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train": {"step": step},
        }


def build(config: RecapConfig, runtime: Runtime) -> TrainState:
    """Ranker -> fused sparse optimizer -> ModelAndLoss -> DMP -> dense Adam -> combined optimizer."""
    torch.manual_seed(config.training.seed)
    ranker = RecapRanker(
        config.model,
        config.data.num_continuous,
        config.data.num_binary,
        # Tables are allocated by DistributedModelParallel, shard by shard, not here.
        embedding_device=torch.device("meta"),
    )
    if ranker.embedding_bag_collection is not None:
        sparse = config.optimizer.sparse
        kwargs: dict[str, Any] = {"lr": sparse.learning_rate}
        if sparse.type != SparseOptimizerType.SGD:
            kwargs["eps"] = sparse.eps
        apply_optimizer_in_backward(
            _SPARSE_OPTIMIZERS[sparse.type], ranker.embedding_bag_collection.parameters(), kwargs
        )
    tasks = config.model.tasks
    model = ModelAndLoss(ranker, build_multi_task_loss(list(tasks), [t.pos_weight for t in tasks.values()]))
    constraints = {
        t.name: [s.value for s in t.sharding_types]
        for t in config.model.embeddings.tables
        if t.sharding_types
    }
    model = maybe_shard_model(
        model,
        runtime.device,
        sharding_constraints=constraints,
        use_row_wise_cpu_sharder=config.training.use_row_wise_cpu_sharder,
        batch_size=config.data.per_rank_batch_size(runtime.world_size),
    )
    adam = config.optimizer.adam
    # Data-parallel tables lose their in-backward optimizer when sharded: the dense optimizer takes them.
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.Adam(
            params,
            lr=config.optimizer.dense.learning_rate,
            betas=(adam.beta_1, adam.beta_2),
            eps=adam.epsilon,
            weight_decay=adam.weight_decay,
        ),
    )
    optimizer = CombinedOptimizer([model.fused_optimizer, dense_optimizer])
    return TrainState(model, optimizer, dense_optimizer)


def learning_rate(step: int, cfg: LearningRateConfig) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to final_fraction over decay_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.decay == "cosine" and cfg.decay_steps:
        progress = min(1.0, (step - cfg.warmup_steps) / cfg.decay_steps)
        scale = cfg.final_fraction + (1 - cfg.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.learning_rate * scale
    return cfg.learning_rate


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed the global RNG (dropout's) from (seed, rank, step) before each step, so a resumed run draws
    the same masks as an uninterrupted one whatever consumed random numbers before (model init, eval and
    its data loader's base seed): without it a resume was not bit-exact. CPU and CUDA generators alike."""
    torch.manual_seed(hash((seed, rank, step)) & 0xFFFF_FFFF_FFFF_FFFF)  # int tuples hash reproducibly


def _set_learning_rate(optimizer: KeyedOptimizerWrapper, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------------------- data
def resolve_data_urls(config: RecapConfig, runtime: Runtime) -> tuple[str, str]:
    """The configured train/eval URLs, or synthetic Parquet generated once under {save_dir}/data."""
    train_url, eval_url = config.data.train_url, config.data.eval_url
    if train_url and eval_url:
        return train_url, eval_url
    root = join(config.training.save_dir, "data")
    if runtime.rank == 0:
        ensure_synthetic_data(root, config)
    dist.barrier()
    return train_url or join(root, "train"), eval_url or join(root, "eval")


SYNTHETIC_TRAIN_EXAMPLES = 65_536
SYNTHETIC_EVAL_EXAMPLES = 16_384


def ensure_synthetic_data(root: str, config: RecapConfig) -> None:
    """Generate the embedded default dataset once; `_SUCCESS` marks it complete."""
    marker = join(root, "_SUCCESS")
    if exists(marker, config.data.storage_options):
        return
    log(f"no data.train_url / data.eval_url given: generating synthetic Parquet under {root}")
    opts = config.data.storage_options
    synthetic_data.write_synthetic_dataset(
        join(root, "train"), config, SYNTHETIC_TRAIN_EXAMPLES, seed=config.training.seed, storage_options=opts
    )
    synthetic_data.write_synthetic_dataset(
        join(root, "eval"),
        config,
        SYNTHETIC_EVAL_EXAMPLES,
        seed=config.training.seed + 1,
        storage_options=opts,
    )
    write(marker, "ok\n", opts)


# ------------------------------------------------------------------------------------------ embeddings
def log_embeddings(model: torch.nn.Module, config: RecapConfig, step: int) -> str:
    """Gather and write every (or every configured) table to {save_dir}/embeddings/step-N/."""
    url = join(config.training.save_dir, "embeddings", f"step-{step}")
    wanted = config.training.embedding_log_tables
    for weight_name, table, tensor in embedding_weights(model):
        if wanted is None or table in wanted:
            log_sharded_tensor_content(
                weight_name, table, tensor, output_url=url, storage_options=config.data.storage_options
            )
    return url


# ------------------------------------------------------------------------------------------------ train
class Progress:
    """Throughput and ETA on rank 0: examples/s per worker and global since the last report."""

    def __init__(self, total_steps: int, start_step: int, per_rank_batch: int, world_size: int) -> None:
        self.total, self.per_rank_batch, self.world = total_steps, per_rank_batch, world_size
        self.start_step = start_step
        self.t0 = self.last_t = time.perf_counter()
        self.last_step = start_step

    def report(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = step - self.last_step
        per_worker = steps * self.per_rank_batch / max(now - self.last_t, 1e-9)
        done = step - self.start_step
        eta = (now - self.t0) / max(done, 1) * (self.total - step)
        self.last_t, self.last_step = now, step
        return {
            "examples_per_s_per_worker": per_worker,
            "examples_per_s": per_worker * self.world,
            "eta_s": eta,
            "elapsed_s": now - self.t0,
        }


def _write_metrics(writer: MetricsWriter | None, record: dict[str, Any]) -> None:
    """Rank 0's metrics go to the run's storage: when it is unreachable the write is logged and training
    goes on, as for a periodic checkpoint (the record stays queued; the next write rewrites them all)."""
    if writer is None:
        return
    try:
        writer.write(record)
    except Exception as e:
        log(f"metrics write to {writer.url} failed; training continues: {e!r}", level=logging.WARNING)


def train(config: RecapConfig, runtime: Runtime) -> dict[str, Any]:
    """Train to training.num_train_steps, resuming from the newest complete checkpoint in save_dir."""
    tc = config.training
    save_dir = tc.save_dir
    log(f"config: {json.dumps(redact(config.model_dump(mode='json')), sort_keys=True)}")
    train_url, eval_url = resolve_data_urls(config, runtime)
    state = build(config, runtime)
    model, optimizer = state.model, state.optimizer
    checkpointer = Checkpointer(
        join(save_dir, "checkpoints"),
        keep_latest_k=tc.keep_latest_k,
        async_save=tc.async_checkpoint,
        storage_options=config.data.storage_options,
        process_group=runtime.checkpoint_group,
    )
    step = 0
    resume = checkpointer.latest_step()
    if resume is not None:
        optimizer.init_state()  # optimizer state is lazy; DCP loads in place
        ckpt = state.state_dict(0)
        checkpointer.load(resume, ckpt)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["train"]["step"])
        log(f"resumed from {join(checkpointer.root, f'step-{resume}')} at step {step}")
    elif tc.initial_checkpoint:
        load_model_weights(
            model, tc.initial_checkpoint, config.data.storage_options, runtime.checkpoint_group
        )
        log(f"warm start: model weights from {tc.initial_checkpoint} (optimizer and step fresh)")

    per_rank = config.data.per_rank_batch_size(runtime.world_size)
    writer = (
        MetricsWriter(save_dir, config.data.storage_options, resume_step=step) if runtime.rank == 0 else None
    )
    if step >= tc.num_train_steps:
        log(f"nothing to do: step {step} >= training.num_train_steps={tc.num_train_steps}")
        checkpointer.close()
        return {"step": step, "save_dir": save_dir}

    # Skip what earlier runs trained on so a resumed run continues the same data stream.
    loader = data.make_dataloader(
        train_url,
        config,
        per_rank,
        runtime.rank,
        runtime.world_size,
        num_workers=config.data.num_workers,
        repeat=True,
        shuffle_seed=tc.seed,
        skip_batches=step,
        storage_options=config.data.storage_options,
    )
    train_data = iter(loader)
    eval_data, eval_rows = one_pass_loader(eval_url, config, runtime)  # files listed once, read per eval
    pipeline = TrainPipelineSparseDist(model, optimizer, runtime.device, execute_all_batches=True)
    progress = Progress(tc.num_train_steps, step, per_rank, runtime.world_size)
    log(
        f"training steps {step}..{tc.num_train_steps} on {runtime.world_size} rank(s), "
        f"batch {per_rank}/rank ({config.data.global_batch_size} global), data {train_url}, output {save_dir}"
    )
    loss_sums: dict[str, torch.Tensor] = {}
    steps_in_window = 0
    last_eval: dict[str, float] = {}
    model.train()
    while step < tc.num_train_steps:
        lr = learning_rate(step, config.optimizer.dense)
        _set_learning_rate(state.dense_optimizer, lr)
        seed_step(tc.seed, runtime.rank, step)
        outputs = pipeline.progress(train_data)
        step += 1
        faults.after_train_step(step)  # test-only hook; inert unless RECAP_FAULT_* is set
        steps_in_window += 1
        for k, v in outputs.items():
            if k == "loss" or k.startswith("loss/"):
                loss_sums[k] = loss_sums.get(k, 0) + v.detach().float()
        last = step == tc.num_train_steps

        if step % tc.log_every_n == 0 or last:
            names = sorted(loss_sums)
            means = torch.stack([loss_sums[k] for k in names]).to(runtime.device) / steps_in_window
            dist.all_reduce(means)
            means = (means / runtime.world_size).tolist()
            record: dict[str, Any] = {"step": step, "lr": lr, **dict(zip(names, means, strict=True))}
            record.update(progress.report(step))
            loss_sums, steps_in_window = {}, 0
            log(
                f"step {step}/{tc.num_train_steps} ({100 * step / tc.num_train_steps:.0f}%) "
                f"loss {record['loss']:.4f} lr {lr:.2e} | {record['examples_per_s']:.0f} ex/s global, "
                f"{record['examples_per_s_per_worker']:.0f} ex/s/worker | eta {record['eta_s']:.0f}s | "
                + " ".join(f"{t.rsplit('.', 1)[-1]} {record[f'loss/{t}']:.4f}" for t in config.task_names)
            )
            _write_metrics(writer, record)

        if (tc.eval_every_n and step % tc.eval_every_n == 0) or last:
            pipeline.detach()  # the model is called directly below; progress() re-attaches it
            last_eval = evaluate(
                model, eval_data, config, runtime, max_batches=tc.num_eval_steps, real_rows=eval_rows
            )
            log(f"step {step}: {format_eval(last_eval, config)}")
            _write_metrics(writer, {"step": step, **{f"eval/{k}": v for k, v in last_eval.items()}})

        if (tc.checkpoint_every_n and step % tc.checkpoint_every_n == 0) or last:
            checkpointer.save(step, state.state_dict(step), final=last)
        if (tc.embedding_log_every_n and step % tc.embedding_log_every_n == 0) or last:
            log(f"embedding tables written to {log_embeddings(model, config, step)}")

    checkpointer.close()
    if writer:
        writer.close()
    summary = {"step": step, "save_dir": save_dir, "eval": last_eval}
    log(f"done: {json.dumps(summary, sort_keys=True)}")
    return summary


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="recap train", description="Train the Recap heavy ranker (run under torchrun for >1 rank)."
    )
    parser.add_argument("--config", default="local", help="packaged config name or YAML URL")
    parser.add_argument("--output", default=None, help="run URL (overrides training.save_dir)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.num_train_steps=20")
    # Intermixed: overrides may come before, between or after the options (`x=1 --output URL y=2`).
    return parser.parse_intermixed_args(argv)


def load_run_config(args: argparse.Namespace) -> RecapConfig:
    config = load_config(args.config, args.overrides)
    if args.output:
        config.training.save_dir = args.output
    return config


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    with exit_on_input_error():
        config = load_run_config(args)
        runtime = setup_distributed()
        log(f"rank {runtime.rank}/{runtime.world_size} on {runtime.device}", rank=ALL_RANKS)
        try:
            train(config, runtime)
        finally:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
