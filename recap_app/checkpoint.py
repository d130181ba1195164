"""Checkpoints with torch.distributed.checkpoint (DCP) through fsspec, laid out as torchtitan does.

`{root}/step-{N}/` holds one DCP checkpoint. A step counts only when its `.metadata` exists: DCP writes
it last, on rank 0, after every rank's data is written, so a crash mid-save leaves a folder without it,
which resume ignores and the next save's cleanup deletes. Saves are asynchronous by default: training
waits only for the staging copy to CPU; the previous save is awaited before the next starts. Keep-latest-k
deletion runs on a background thread on rank 0; its failures are logged, never fatal.

Storage failure policy (e.g. the object store goes away mid-save): DCP reports a failed write on every
rank, so every rank takes the same branch. A periodic save that fails is logged with its URL and
training goes on from the last complete checkpoint, which stays intact; after `max_consecutive_failures`
failed periodic saves in a row the job fails. The final save is retried `final_attempts` times with
backoff, then the job fails (non-zero exit), so a scheduler retry resumes from the last complete step.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.planner import LoadPlan

from recap_app import faults
from recap_app.logs import log
from recap_app.storage import exists, has_scheme, join, url_to_fs

_STEP_DIR = re.compile(r"^step-(\d+)$")
METADATA = ".metadata"


# What a failed save raises: DCP reports failures on any rank as CheckpointException, on every rank, and
# that is a BaseException, not an Exception (without it here the policy below never applied).
SAVE_ERRORS = (Exception, dcp.CheckpointException)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (storage unreachable, permissions, ...); names the URL."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model built from the config."""


def step_url(root: str, step: int) -> str:
    return join(root, f"step-{step}")


def list_steps(root: str, storage_options: Mapping[str, Any] | None = None) -> tuple[list[int], list[int]]:
    """(complete steps, partial steps) under root, each sorted ascending."""
    fs, path = url_to_fs(root, storage_options)
    if not fs.exists(path):
        return [], []
    complete, partial = [], []
    for entry in fs.ls(path, detail=False):
        m = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if not m:
            continue
        step = int(m.group(1))
        (complete if fs.exists(f"{entry.rstrip('/')}/{METADATA}") else partial).append(step)
    return sorted(complete), sorted(partial)


def latest_step(root: str, storage_options: Mapping[str, Any] | None = None) -> int | None:
    complete, _ = list_steps(root, storage_options)
    return complete[-1] if complete else None


def _writer(url: str, storage_options: Mapping[str, Any] | None) -> FsspecWriter:
    # FsspecWriter is also an AsyncStager whose staging copes with torchrec's ShardedTensors; DCP's
    # default stager does not ('data_ptr' not supported for ShardedTensor). Object-store streams cannot
    # fsync, and DCP then falls back to os.sync() of the whole machine per file: skip it there.
    local = not has_scheme(url) or url.startswith("file://")
    return FsspecWriter(url, sync_files=local, **dict(storage_options or {}))


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner without its torch<=2.3 guess. When a rank's state lacks some checkpoint
    keys, as with the optimizer state of table-wise sharded tables, DCP takes the checkpoint for a
    pre-2.4 one and re-flattens the state the old way, then fails ("Missing key in checkpoint
    state_dict: train"). Our checkpoints are all written by torch >= 2.13."""

    def create_local_plan(self) -> LoadPlan:
        return create_default_local_load_plan(self.state_dict, self.metadata, not self.allow_partial_load)


def _reader(url: str, storage_options: Mapping[str, Any] | None) -> FsspecReader:
    return FsspecReader(url, **dict(storage_options or {}))


class Checkpointer:
    """Save / resume / prune `step-N` checkpoints under `root` for a state dict of stateful parts."""

    def __init__(
        self,
        root: str,
        *,
        keep_latest_k: int = 3,
        async_save: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        process_group: dist.ProcessGroup | None = None,
        max_consecutive_failures: int = 3,
        final_attempts: int = 3,
        retry_backoff_s: float = 2.0,
    ) -> None:
        self.root = root
        self.max_consecutive_failures = max_consecutive_failures
        self.final_attempts = final_attempts
        self.retry_backoff_s = retry_backoff_s
        self.consecutive_failures = 0
        self.keep_latest_k = keep_latest_k
        self.async_save = async_save
        self.storage_options = dict(storage_options or {})
        # Async saves run their collectives on a CPU (gloo) group; on CUDA/NCCL jobs pass one here.
        self.process_group = process_group
        self._pending: Future | None = None
        self._pending_step: int | None = None
        self._purger: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Any], *, final: bool = False) -> float:
        """Save `state` as step-`step`; returns the seconds training was blocked.

        Async (unless `final` or async is off): waits for the previous save, stages to CPU, returns;
        the write goes on in the background. Final saves are synchronous so the job ends durable.
        """
        start = time.perf_counter()
        self.wait()
        faults.before_checkpoint_save(step)  # test-only hook; inert unless RECAP_FAULT_* is set
        url = step_url(self.root, step)
        try:
            done = step in list_steps(self.root, self.storage_options)[0]
        except Exception as e:  # store unreachable: the save below fails too, on every rank alike
            log(f"cannot list {self.root} before saving step-{step}: {e!r}", level=logging.WARNING)
            done = False
        if done:
            log(f"checkpoint step-{step} already complete; not saving again")
            return 0.0
        if self.async_save and not final:
            try:
                self._pending = dcp.async_save(
                    state, storage_writer=self._writer(url, step), process_group=self.process_group
                )
            except SAVE_ERRORS as e:
                self._failed(step, e, fatal=False)
                return time.perf_counter() - start
            self._pending_step = step
            blocked = time.perf_counter() - start
            log(f"checkpoint step-{step}: async save started to {url} (blocked {blocked:.2f}s)")
            return blocked
        attempts = self.final_attempts if final else 1
        for attempt in range(1, attempts + 1):
            try:
                dcp.save(state, storage_writer=self._writer(url, step), process_group=self.process_group)
                break
            except SAVE_ERRORS as e:
                if attempt == attempts:
                    self._failed(step, e, fatal=final)
                    return time.perf_counter() - start
                delay = self.retry_backoff_s * 2 ** (attempt - 1)
                log(
                    f"checkpoint save to {url} failed (attempt {attempt}/{attempts}), "
                    f"retry in {delay:.0f}s: {_brief(e)}",
                    level=logging.WARNING,
                )
                time.sleep(delay)
        blocked = time.perf_counter() - start
        log(f"checkpoint step-{step}: saved to {url} in {blocked:.2f}s")
        self._succeeded()
        return blocked

    def _writer(self, url: str, step: int) -> FsspecWriter:
        return faults.wrap_checkpoint_writer(_writer(url, self.storage_options), step)

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is durable or has failed (see the policy above)."""
        if self._pending is None:
            return
        pending, step = self._pending, self._pending_step
        self._pending, self._pending_step = None, None
        start = time.perf_counter()
        try:
            pending.result()
        except SAVE_ERRORS as e:
            self._failed(step, e, fatal=False)
            return
        log(f"checkpoint step-{step}: durable (waited {time.perf_counter() - start:.2f}s)")
        self._succeeded()

    def _succeeded(self) -> None:
        self.consecutive_failures = 0
        if _rank() == 0:
            self._purge_in_background()

    def _failed(self, step: int, error: BaseException, *, fatal: bool) -> None:
        url = step_url(self.root, step)
        self.consecutive_failures += 1
        if fatal or self.consecutive_failures >= self.max_consecutive_failures:
            how = (
                f"final save, {self.final_attempts} attempts"
                if fatal
                else f"{self.consecutive_failures} periodic saves in a row"
            )
            raise CheckpointSaveError(f"checkpoint save to {url} failed ({how}): {_brief(error)}") from error
        log(
            f"checkpoint save to {url} failed ({self.consecutive_failures}/{self.max_consecutive_failures} "
            f"in a row); training continues, the last complete checkpoint is intact: {_brief(error)}",
            level=logging.ERROR,
        )

    # ----------------------------------------------------------------------------------------- prune
    def _purge_in_background(self) -> None:
        if self._purger is not None and self._purger.is_alive():
            return  # the running purge will see the newest state next time
        self._purger = threading.Thread(target=self._purge, name="checkpoint-purge", daemon=True)
        self._purger.start()

    def _purge(self) -> None:
        """Delete partial step folders older than the newest complete one, and complete ones past k."""
        try:
            complete, partial = list_steps(self.root, self.storage_options)
            doomed = [s for s in partial if complete and s < complete[-1]]
            if self.keep_latest_k > 0:
                doomed += complete[: -self.keep_latest_k]
            fs, _ = url_to_fs(self.root, self.storage_options)
            for step in sorted(doomed):
                _, path = url_to_fs(step_url(self.root, step), self.storage_options)
                fs.rm(path, recursive=True)
                log(f"checkpoint step-{step}: deleted (keep_latest_k={self.keep_latest_k})")
        except Exception as e:  # never fatal: a leftover folder costs space, not correctness
            log(f"checkpoint cleanup under {self.root} failed: {e!r}", level=logging.WARNING)

    def join_purger(self, timeout: float = 60.0) -> None:
        if self._purger is not None:
            self._purger.join(timeout)

    # ------------------------------------------------------------------------------------------ load
    def latest_step(self) -> int | None:
        """The newest complete step; says which incomplete ones (interrupted saves) it passes over."""
        complete, partial = list_steps(self.root, self.storage_options)
        if partial:
            names = ", ".join(f"step-{s}" for s in partial)
            log(f"ignoring incomplete checkpoint(s) {names} (no {METADATA}: save interrupted)")
        return complete[-1] if complete else None

    def load(self, step: int, state: dict[str, Any]) -> None:
        """Load step-`step` into `state` in place (optimizer state must be initialised first)."""
        load_checkpoint(step_url(self.root, step), state, self.storage_options, self.process_group)

    def close(self) -> None:
        self.wait()
        self.join_purger()


def load_checkpoint(
    url: str,
    state: dict[str, Any],
    storage_options: Mapping[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
    *,
    no_dist: bool = False,
) -> None:
    """DCP-load `url` into `state` in place; a checkpoint that does not fit names the mismatched keys."""
    if not exists(join(url, METADATA), storage_options):
        raise FileNotFoundError(f"no complete checkpoint at {url} (missing {METADATA})")
    reader = _reader(url, storage_options)
    try:
        with warnings.catch_warnings():
            # with no_dist, DCP says it assumes a single-process load: asked for, not news
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(
                state,
                storage_reader=reader,
                planner=_LoadPlanner(),
                process_group=process_group,
                no_dist=no_dist,
            )
    except (Exception, dcp.CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        lines = _mismatch_lines(url, state, storage_options)
        if not lines:
            raise  # keys and shapes fit (e.g. the store is unreachable): the original error says what
        raise CheckpointMismatchError("\n".join([_mismatch_head(url, e), *lines])) from e


def load_model_weights(
    model: torch.nn.Module,
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
    *,
    no_dist: bool = False,
) -> None:
    """Load only the "model" entry of a checkpoint into `model` (warm start, evaluation, export)."""
    state = {"model": model.state_dict()}
    load_checkpoint(url, state, storage_options, process_group, no_dist=no_dist)
    model.load_state_dict(state["model"])


def describe_mismatch(
    url: str, state: Mapping[str, Any], storage_options: Mapping[str, Any] | None, error: BaseException
) -> str:
    """Compare the checkpoint's metadata with the state's flattened keys and shapes."""
    lines = _mismatch_lines(url, state, storage_options)
    if not lines:
        return f"loading checkpoint {url} failed: {_brief(error)}"
    return "\n".join([_mismatch_head(url, error), *lines])


def _mismatch_head(url: str, error: BaseException) -> str:
    return f"checkpoint {url} does not match the model config ({_brief(error)})"


def _brief(error: BaseException) -> str:
    """One line per failed rank for DCP's CheckpointException (its str() holds every rank's traceback)."""
    if isinstance(error, dcp.CheckpointException):
        causes = {f"{type(exc).__name__}: {exc}" for exc, _ in error.failures.values()}
        return f"{type(error).__name__} on rank(s) {sorted(error.failures)}: " + " | ".join(sorted(causes))
    return f"{type(error).__name__}: {error}"


def _mismatch_lines(
    url: str, state: Mapping[str, Any], storage_options: Mapping[str, Any] | None
) -> list[str]:
    """Keys missing from the checkpoint, checkpoint keys the state lacks (under the state's top-level
    keys only: a warm start loads "model" from a checkpoint that also holds "optimizer"), and shape
    differences. [] when they all fit or the metadata cannot be read."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    try:
        md = _reader(url, storage_options).read_metadata()
    except Exception:
        return []
    flat, _ = flatten_state_dict(dict(state))
    saved = md.state_dict_metadata
    # Optimizer state of sharded tables is per rank (a table-wise table's only on its rank): not a misfit.
    loaded = tuple(f"{k}." for k in state if k != "optimizer")
    missing = sorted(k for k in flat if k not in saved)
    unexpected = sorted(k for k in saved if k not in flat and (k in state or k.startswith(loaded)))
    shapes = []
    for k, v in flat.items():
        size = getattr(saved.get(k), "size", None)
        if size is not None and hasattr(v, "size") and tuple(size) != tuple(v.size()):
            shapes.append(f"{k}: checkpoint {tuple(size)} vs model {tuple(v.size())}")
    parts = []
    if missing:
        parts.append(f"  missing in checkpoint: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        parts.append(f"  not in model: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    if shapes:
        parts.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes[:20]))
    return parts


def resolve_checkpoint(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A step folder as given, or the newest complete step under a run or checkpoints URL."""
    if exists(join(url, METADATA), storage_options):
        return url
    for root in (join(url, "checkpoints"), url):
        step = latest_step(root, storage_options)
        if step is not None:
            return step_url(root, step)
    raise FileNotFoundError(f"no complete checkpoint at or under {url}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
