"""The Trainer: `__init__` builds every part (through builder.py) and restores them, `train()` orders the
components, `train_step()` runs one step. Each component decides when it acts (checkpointer, validator,
metrics, embedding logger), as in torchtitan's trainer; the loop only says which comes first.

Extension points: `callbacks` (objects with `on_step_end(trainer)`, called on every rank after each step's
components have acted) and `checkpoint_writer_factory` (see Checkpointer); tests inject faults there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from recap_app import data
from recap_app.batch import RecapBatch
from recap_app.builder import RANKER_PREFIX, build_training
from recap_app.checkpoint import Checkpointer, CheckpointMismatchError, ModuleState, WriterFactory
from recap_app.config import RecapConfig
from recap_app.distributed import Runtime
from recap_app.embedding_logger import EmbeddingLogger
from recap_app.evaluation import Validator, format_eval, one_pass_loader
from recap_app.lease import OutputLease
from recap_app.logs import log
from recap_app.metrics_logger import MetricsLogger, MetricsWriter
from recap_app.nonfinite import GuardedTrainPipeline, NonFiniteError, NonFiniteGuard
from recap_app.optimizers import set_learning_rates
from recap_app.preemption import StepCoordinator, is_collective_failure, log_preempted
from recap_app.run_record import append_run_record, config_summary
from recap_app.storage import check_bucket, join
from recap_app.synthetic_data import ensure_synthetic_data


class TrainerCallback(Protocol):
    def on_step_end(self, trainer: Trainer) -> None: ...


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed the global RNG (dropout's) from (seed, rank, step) before each step, so a resumed run draws
    the same masks as an uninterrupted one whatever consumed random numbers before (model init, eval and
    its data loader's base seed): without it a resume was not bit-exact. CPU and CUDA generators alike."""
    torch.manual_seed(hash((seed, rank, step)) & 0xFFFF_FFFF_FFFF_FFFF)  # int tuples hash reproducibly


class Trainer:
    """Trains `config` on `runtime` to training.num_train_steps, resuming from the newest complete
    checkpoint under training.save_dir. Its own state (`train_state` in checkpoints) is the step, the
    world size, the per-rank batch and the data position."""

    def __init__(
        self,
        config: RecapConfig,
        runtime: Runtime,
        *,
        callbacks: Sequence[TrainerCallback] = (),
        checkpoint_writer_factory: WriterFactory | None = None,
    ) -> None:
        self.config, self.runtime, self.callbacks = config, runtime, list(callbacks)
        self.step = 0
        self.lr = 0.0
        self.preempted: str | None = None
        self.per_rank_batch = config.data.per_rank_batch_size(runtime.world_size)
        tc = config.training
        log(config_summary(config))
        check_bucket(tc.save_dir, config.storage.options)  # a missing bucket is an error, never created
        self.lease = OutputLease(
            tc.save_dir,
            timeout_s=tc.lease_timeout_s,
            force=tc.force_lease,
            storage_options=config.storage.options,
        )
        self.lease.acquire()
        try:
            self._build(checkpoint_writer_factory)
        except BaseException:
            self.lease.release()
            raise

    def _build(self, checkpoint_writer_factory: WriterFactory | None) -> None:
        """Every part, restored from the newest checkpoint (or warm-started), then the run record."""
        config, runtime = self.config, self.runtime
        save_dir, opts = config.training.save_dir, config.storage.options
        self.train_url, eval_url = self._data_urls()
        parts = build_training(config, runtime)
        self.model, self.optimizer, self.dense_optimizer = parts.model, parts.optimizer, parts.dense_optimizer
        self.checkpointer = Checkpointer(
            config.checkpoint,
            join(save_dir, "checkpoints"),
            {
                "model": ModuleState(self.model, RANKER_PREFIX),
                "optimizer": self.optimizer,
                "train_state": self,
            },
            storage_options=opts,
            process_group=runtime.checkpoint_group,
            writer_factory=checkpoint_writer_factory,
        )
        # Files listed and footers read once, before resuming: the row count sizes the data position.
        self.train_loader = self._train_loader()
        self.train_rows = self.train_loader.dataset.num_rows
        self.corrupt_data = data.CorruptTally(self.train_loader.dataset, runtime.device)  # on_corrupt=skip
        self.data_start, self.start_step = data.DataPosition.fresh(0, self.train_rows), 0
        resumed = self.checkpointer.load()
        self.train_loader.dataset.start = self.data_start  # read when the loader is iterated
        if runtime.rank == 0:
            append_run_record(
                config,
                world_size=runtime.world_size,
                per_rank_batch=self.per_rank_batch,
                start_step=self.step,
                resumed=resumed,
            )
        self.validator = Validator(
            config.eval, *one_pass_loader(eval_url, config, runtime), config.task_names
        )
        self.embedding_logger = EmbeddingLogger(config.embedding_log, join(save_dir, "embeddings"), opts)
        writer = MetricsWriter(save_dir, opts, resume_step=self.step) if runtime.rank == 0 else None
        self.metrics = MetricsLogger(
            log_every_n=config.training.log_every_n,
            task_names=config.task_names,
            device=runtime.device,
            writer=writer,
        )
        tc = config.training
        self.guard = NonFiniteGuard(
            tc.on_nonfinite, tc.max_consecutive_nonfinite, config.task_names, runtime.device
        )
        self.pipeline = GuardedTrainPipeline(
            self.model, self.optimizer, runtime.device, execute_all_batches=True, guard=self.guard
        )

    # ------------------------------------------------------------------------------------ train state
    def data_position(self) -> data.DataPosition:
        """Where the training stream stands now: the start position advanced by the steps trained since."""
        workers = max(self.config.data.num_workers, 1)
        return self.data_start.advance(
            self.step - self.start_step,
            lanes=self.runtime.world_size * workers,
            workers=workers,
            batch_size=self.per_rank_batch,
            num_rows=self.train_rows,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so loading it needs no unpickling of arbitrary objects."""
        return {
            "step": torch.tensor(self.step),
            "world_size": torch.tensor(self.runtime.world_size),
            "per_rank_batch_size": torch.tensor(self.per_rank_batch),
            "data_rows": torch.tensor(self.train_rows),
            **self.data_position().to_tensors(),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Resume at the saved step and data position, on any world size and batch: the position is a
        set of rows, dealt out again to this run's ranks (recap_app/data.py)."""
        missing = sorted(
            {"step", "world_size", "per_rank_batch_size", "data_rows", "data_epoch"} - set(state)
        )
        if missing:
            raise CheckpointMismatchError(
                f"checkpoint under {self.checkpointer.root} has no train_state {missing} (written by another "
                "version of recap?); start a new --output or warm-start with checkpoint.initial_checkpoint"
            )
        self.step = int(state["step"])
        saved = int(state["world_size"]), int(state["per_rank_batch_size"])
        position = data.DataPosition.from_tensors(state)
        if int(state["data_rows"]) != self.train_rows or any(
            b > self.train_rows for _, b in position.segments
        ):
            log(
                f"the training data changed since the checkpoint ({int(state['data_rows'])} rows, now "
                f"{self.train_rows}): the data stream restarts at epoch {position.epoch + 1}",
                level=logging.WARNING,
            )
            position = data.DataPosition.fresh(position.epoch + 1, self.train_rows)
        elif saved != (self.runtime.world_size, self.per_rank_batch):
            log(
                f"resuming with world size {self.runtime.world_size} and per-rank batch "
                f"{self.per_rank_batch} (saved with {saved[0]} and {saved[1]}): {position.rows} rows of "
                f"epoch {position.epoch} left, dealt out to this run's ranks"
            )
        self.data_start, self.start_step = position, self.step

    # ----------------------------------------------------------------------------------------- build
    def _data_urls(self) -> tuple[str, str]:
        """The configured train/eval URLs, or the embedded synthetic dataset under {save_dir}/data."""
        dc = self.config.data
        if dc.train_url and dc.eval_url:
            return dc.train_url, dc.eval_url
        if self.runtime.rank == 0:
            ensure_synthetic_data(join(self.config.training.save_dir, "data"), self.config)
        dist.barrier()
        root = join(self.config.training.save_dir, "data")
        return dc.train_url or join(root, "train"), dc.eval_url or join(root, "eval")

    def _train_loader(self) -> DataLoader:
        """This rank's share of the training data, repeating (from the reader's `start`)."""
        return data.make_dataloader(
            self.train_url,
            self.config,
            self.per_rank_batch,
            self.runtime.rank,
            self.runtime.world_size,
            num_workers=self.config.data.num_workers,
            repeat=True,
            shuffle_seed=self.config.training.seed,
            storage_options=self.config.storage.options,
        )

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Run the remaining steps; each component acts at the steps it chooses, the last step included."""
        total, rt = self.config.training.num_train_steps, self.runtime
        if self.step >= total:
            log(f"nothing to do: step {self.step} >= training.num_train_steps={total}")
            self.close()
            return {"step": self.step, "save_dir": self.config.training.save_dir}
        batches = self.corrupt_data.watch(iter(self.train_loader))
        self.metrics.start(self.step, total, self.per_rank_batch, rt.world_size)
        log(
            f"training steps {self.step}..{total} on {rt.world_size} rank(s), batch {self.per_rank_batch}"
            f"/rank ({self.config.data.global_batch_size} global), data {self.train_url}, "
            f"output {self.config.training.save_dir}"
        )
        self.last_eval: dict[str, float] = {}
        self.model.train()
        coordinator = StepCoordinator(rt.rank, rt.world_size)
        coordinator.install()
        try:
            self._loop(batches, coordinator)
        except BaseException as e:
            if isinstance(e, NonFiniteError):
                self.checkpointer.wait()  # an earlier, finite checkpoint in flight still lands
            self.lease.release()  # this run writes no more (a kill -9 leaves it: see lease.py)
            if is_collective_failure(e):
                timeout = self.config.training.collective_timeout_s
                raise coordinator.timeout_error(self.step, timeout, e) from None
            raise
        finally:
            coordinator.restore()
        self.close()
        summary = {
            "step": self.step,
            "save_dir": self.config.training.save_dir,
            "eval": self.last_eval,
            "preempted": self.preempted,
        }
        log(f"done: {json.dumps(summary, sort_keys=True)}")
        return summary

    def _loop(self, batches: Iterator[RecapBatch], coordinator: StepCoordinator) -> None:
        total = self.config.training.num_train_steps
        while self.step < total:
            if coordinator.should_stop(self.step):
                self._preempt(coordinator)
                return
            self.train_step(batches)
            self._components_act(last_step=self.step == total)
            for callback in self.callbacks:
                callback.on_step_end(self)

    def _preempt(self, coordinator: StepCoordinator) -> None:
        """Every rank at the agreed step: a synchronous checkpoint of it, if there is time left."""
        self.preempted = coordinator.signal_name or "a signal on another rank"
        saved_in = None
        if coordinator.seconds_since_signal() <= self.config.checkpoint.preemption_timeout_s:
            self.guard.check()
            self._check_before_writing(self.step)
            start = time.perf_counter()
            self.checkpointer.save(self.step, last_step=True)
            saved_in = time.perf_counter() - start
        log_preempted(self.step, self.preempted, saved_in, coordinator.seconds_since_signal())

    def train_step(self, batches: Iterator[RecapBatch]) -> dict[str, torch.Tensor]:
        """One optimizer step on the next batch (the pipeline already holds the following ones); under
        the skip policy a non-finite batch's update is left out and its losses are not logged."""
        self.lr = set_learning_rates(self.dense_optimizer, self.step, self.config.optimizer)
        seed_step(self.config.training.seed, self.runtime.rank, self.step)
        self.pipeline.step = self.step + 1
        outputs = self.pipeline.progress(batches)
        self.step += 1
        if not self.pipeline.skipped_last:
            self.metrics.record(outputs)
            self.guard.record(self.step, outputs, self.pipeline.last_source)
        return outputs

    def _components_act(self, last_step: bool) -> None:
        """Each component at the steps it chooses; the non-finite flag is read first at any of them."""
        step = self.step
        log_now = self.metrics.should_log(step, last_step)
        eval_now = self.validator.should_validate(step, last_step)
        save_now = self.checkpointer.should_save(step, last_step)
        embed_now = self.embedding_logger.should_log(step, last_step)
        if log_now or eval_now or save_now or embed_now:
            self.guard.check()
        if log_now:
            extra = {"nonfinite_skipped": self.guard.skipped, **self.corrupt_data.reduce()}
            self.metrics.log(step, self.lr, extra)
        if eval_now:
            self.last_eval = self.validate()
        if save_now or embed_now:
            self._check_before_writing(step)
        self.checkpointer.save(step, last_step=last_step)
        self.embedding_logger.maybe_log(self.model, step, last_step)

    def _check_before_writing(self, step: int) -> None:
        """Collective, before a checkpoint or an embedding log: the output is still this run's, and nothing
        about to be written holds NaN / inf."""
        self.lease.check()
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        self.guard.check_state(step, state)

    def validate(self) -> dict[str, float]:
        self.pipeline.detach()  # the model is called directly; the next progress() re-attaches it
        metrics = self.validator.validate(self.model, self.runtime)
        log(f"step {self.step}: {format_eval(metrics, self.config.task_names)}")
        self.metrics.log_eval(self.step, metrics)
        return metrics

    def close(self) -> None:
        """Wait for the last save, close the metrics sinks, give the output's lease back."""
        try:
            self.checkpointer.close()
            self.metrics.close()
        finally:
            self.lease.release()
