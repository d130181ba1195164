"""The trainer's metrics component: the loss window, throughput / ETA, metrics.jsonl and TensorBoard.

Every rank takes part in the window's all-reduce; rank 0 alone logs and writes, on a background thread: a
store that hangs or is down never blocks a step. A write that fails is logged and training goes on, as for
a periodic checkpoint: the record stays queued and goes out with the next write, which rewrites the whole
file.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from recap_app.logs import log
from recap_app.storage import errors_named, has_scheme, join, url_to_fs, write


def read_metrics(url: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] when it does not exist yet)."""
    with errors_named(url, "read"):
        fs, path = url_to_fs(url, storage_options)
        if not fs.exists(path):
            return []
        with fs.open(path, "r") as f:
            return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Rank 0's sink: `{output}/metrics.jsonl` through fsspec (rewritten whole, since object stores cannot
    append) and TensorBoard event files under `{output}/tensorboard/` for local outputs.

    Writes never block training: `write` queues the record and returns; a background thread rewrites the
    file with every record so far. A store that hangs or is down delays the file, not the steps; a failed
    rewrite is logged and its records go out with the next one. `close` (also run at exit) waits for the
    last rewrite at most `close_timeout_s`. TensorBoard's folder is created at the first record, so a run
    with nothing to do adds no empty event file."""

    def __init__(
        self,
        output_url: str,
        storage_options: Mapping[str, Any] | None = None,
        resume_step: int = 0,
        close_timeout_s: float = 60.0,
    ) -> None:
        self.url = join(output_url, "metrics.jsonl")
        self.storage_options = dict(storage_options or {})
        self.close_timeout_s = close_timeout_s
        self.records = [
            r for r in read_metrics(self.url, self.storage_options) if r.get("step", 0) <= resume_step
        ]
        self.tensorboard: Any = None
        self._tb_dir: str | None = None
        if not has_scheme(output_url) or output_url.startswith("file://"):
            self._tb_dir = join(output_url, "tensorboard").removeprefix("file://")
        else:
            log(f"TensorBoard events are written for local outputs only; metrics stay in {self.url}")
        self._queued: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="metrics-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a run that fails still leaves the records it logged

    def write(self, record: Mapping[str, Any]) -> None:
        """Queue one record (non-finite floats become null); returns at once."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self._cond:
            self._queued.append(clean)
            self._cond.notify()

    def _run(self) -> None:
        dirty = False  # records the file does not have yet (the last rewrite failed)
        while True:
            with self._cond:
                while not self._queued and not self._closing:
                    self._cond.wait()
                batch, self._queued, closing = self._queued, [], self._closing
            if batch or dirty:
                self.records.extend(batch)
                dirty = not self._rewrite()
                self._tensorboard(batch)
            if closing:
                return

    def _rewrite(self) -> bool:
        try:
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
            write(self.url, text, self.storage_options)
            return True
        except Exception as e:
            log(
                f"metrics write to {self.url} failed; training continues, the next write retries: {e!r}",
                level=logging.WARNING,
            )
            return False

    def _tensorboard(self, records: Sequence[Mapping[str, Any]]) -> None:
        if self._tb_dir is None or not records:
            return
        if self.tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(self._tb_dir)
        for record in records:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self.tensorboard.add_scalar(k, v, int(record["step"]))
        self.tensorboard.flush()

    def close(self) -> None:
        """Write what is queued and stop, waiting at most close_timeout_s (then the file may lack the last
        records: said in the log)."""
        atexit.unregister(self.close)
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._thread.join(self.close_timeout_s)
        if self._thread.is_alive():
            log(
                f"metrics write to {self.url} still running after {self.close_timeout_s:.0f}s; its last "
                "records may be missing",
                level=logging.WARNING,
            )
        elif self.tensorboard is not None:
            self.tensorboard.close()


class Progress:
    """Throughput and ETA: examples/s per worker and global since the last report."""

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


class MetricsLogger:
    """Accumulates the per-step losses, and every `log_every_n` steps (and at the last) reduces them over
    ranks, logs one progress line and writes a record; evaluation results go to the same sinks."""

    def __init__(
        self,
        *,
        log_every_n: int,
        task_names: Sequence[str],
        device: torch.device,
        writer: MetricsWriter | None,
    ) -> None:
        self.log_every_n, self.task_names, self.device, self.writer = (
            log_every_n,
            list(task_names),
            device,
            writer,
        )
        self.progress = Progress(0, 0, 0, 1)
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0

    def start(self, step: int, total_steps: int, per_rank_batch: int, world_size: int) -> None:
        """Start the throughput clock at `step` (after building and resuming, before the first step)."""
        self.progress = Progress(total_steps, step, per_rank_batch, world_size)

    def record(self, outputs: Mapping[str, torch.Tensor]) -> None:
        """Add one step's losses to the window (no host sync: they stay tensors until the log)."""
        self._steps += 1
        for k, v in outputs.items():
            if k == "loss" or k.startswith("loss/"):
                self._sums[k] = self._sums.get(k, 0) + v.detach().float()

    def should_log(self, step: int, last_step: bool = False) -> bool:
        return last_step or step % self.log_every_n == 0

    def log(self, step: int, lr: float, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Collective: the window's mean losses over every rank, logged and written by rank 0 with `extra`.
        A window whose every step was skipped (non-finite) has no losses: they are logged as NaN."""
        names = ["loss", *(f"loss/{t}" for t in self.task_names)]
        sums = [self._sums.get(k, torch.tensor(float("nan"), device=self.device)) for k in names]
        means = torch.stack(sums).to(self.device) / max(self._steps, 1)
        dist.all_reduce(means)
        means = (means / dist.get_world_size()).tolist()
        record: dict[str, Any] = {
            "step": step,
            "lr": lr,
            **dict(zip(names, means, strict=True)),
            **(extra or {}),
        }
        record.update(self.progress.report(step))
        self._sums, self._steps = {}, 0
        total = self.progress.total
        log(
            f"step {step}/{total} ({100 * step / total:.0f}%) "
            f"loss {record['loss']:.4f} lr {lr:.2e} | {record['examples_per_s']:.0f} ex/s global, "
            f"{record['examples_per_s_per_worker']:.0f} ex/s/worker | eta {record['eta_s']:.0f}s | "
            + " ".join(f"{t.rsplit('.', 1)[-1]} {record[f'loss/{t}']:.4f}" for t in self.task_names)
        )
        self._write(record)
        return record

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        self._write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})

    def _write(self, record: Mapping[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(record)  # queued: a slow or unreachable store never blocks a step

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
