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
backoff, then the job fails (non-zero exit), so a scheduler retry resumes from the last complete step;
when the cause is a storage one recap can name (no space left, read-only, permissions, unreachable) that
is one line, `CheckpointStorageError`.

A complete step that cannot be read on resume (truncated shard or `.metadata`) is named with its file
(`CheckpointCorruptError`); `checkpoint.on_corrupt=fallback` moves it to `step-N.corrupt` and resumes from
the next older complete step (Checkpointer.load).
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.storage import StorageWriter

from recap_app.config import CheckpointConfig, CorruptCheckpointPolicy
from recap_app.errors import InputError
from recap_app.logs import log
from recap_app.safe_pickle import (
    DCP_METADATA_GLOBALS,
    RefusedGlobalError,
    UntrustedInputError,
    restricted_load,
)
from recap_app.storage import describe_error, errors_named, exists, has_scheme, join, storage_cause, url_to_fs

_STEP_DIR = re.compile(r"^step-(\d+)$")
METADATA = ".metadata"


# What a failed save raises: DCP reports failures on any rank as CheckpointException, on every rank, and
# that is a BaseException, not an Exception (without it here the policy below never applied).
SAVE_ERRORS = (Exception, dcp.CheckpointException)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (storage unreachable, permissions, ...); names the URL."""


class CheckpointStorageError(CheckpointSaveError, InputError):
    """A save failed for a storage cause recap can name in words (no space left, read-only, permission
    denied, unreachable): the job ends with that one line instead of a traceback."""


class CheckpointMismatchError(InputError, ValueError):
    """The checkpoint's keys or shapes do not match the model built from the config."""


class CheckpointNotFoundError(InputError, FileNotFoundError):
    """No complete checkpoint where the user pointed."""


class CheckpointUntrustedError(UntrustedInputError):
    """Loading the checkpoint would unpickle an arbitrary object (run code); refused, nothing was run."""


class CheckpointCorruptError(InputError):
    """A complete checkpoint (its `.metadata` exists) holds a file that cannot be read (truncated,
    overwritten); the message names the file."""


CORRUPT_SUFFIX = ".corrupt"
# What reading damaged checkpoint bytes raises (torch.load of a truncated shard: EOFError or
# "PytorchStreamReader failed ..." RuntimeError; a missing shard: FileNotFoundError). Storage failures
# are told apart first (describe_error); anything else (a bug) keeps its traceback.
_CORRUPT_READ = (EOFError, pickle.UnpicklingError, RuntimeError, ValueError, OSError, zipfile.BadZipFile)


def step_url(root: str, step: int) -> str:
    return join(root, f"step-{step}")


def list_steps(root: str, storage_options: Mapping[str, Any] | None = None) -> tuple[list[int], list[int]]:
    """(complete steps, partial steps) under root, each sorted ascending. Only `step-N` folders count:
    `step-N.corrupt` (a quarantined checkpoint, see Checkpointer.load) is neither."""
    with errors_named(root, "list checkpoints under"):
        fs, path = url_to_fs(root, storage_options)
        if not fs.exists(path):
            return [], []
        entries = fs.ls(path, detail=False)
    complete, partial = [], []
    for entry in entries:
        m = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if not m:
            continue
        step = int(m.group(1))
        (complete if fs.exists(f"{entry.rstrip('/')}/{METADATA}") else partial).append(step)
    return sorted(complete), sorted(partial)


def latest_step(root: str, storage_options: Mapping[str, Any] | None = None) -> int | None:
    complete, _ = list_steps(root, storage_options)
    return complete[-1] if complete else None


def storage_writer(url: str, storage_options: Mapping[str, Any] | None = None) -> FsspecWriter:
    """The default DCP storage writer of a save to `url`."""
    # FsspecWriter is also an AsyncStager whose staging copes with torchrec's ShardedTensors; DCP's
    # default stager does not ('data_ptr' not supported for ShardedTensor). Object-store streams cannot
    # fsync, and DCP then falls back to os.sync() of the whole machine per file: skip it there.
    local = not has_scheme(url) or url.startswith("file://")
    return FsspecWriter(url, sync_files=local, **dict(storage_options or {}))


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner without its torch<=2.3 guess, and without pickled items.

    When a rank's state lacks some checkpoint keys, as with the optimizer state of table-wise sharded
    tables, DCP takes the checkpoint for a pre-2.4 one and re-flattens the state the old way, then fails
    ("Missing key in checkpoint state_dict: train"). Our checkpoints are all written by torch >= 2.13.

    DCP's own planner torch.loads every non-tensor (BytesIO) item with weights_only off, i.e. runs
    whatever the file says; recap checkpoints hold tensors only, so such an item is refused at planning,
    before anything is read."""

    def __init__(self, url: str = "") -> None:
        super().__init__()
        self.url = url

    def create_local_plan(self) -> LoadPlan:
        plan = create_default_local_load_plan(self.state_dict, self.metadata, not self.allow_partial_load)
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise self._refused(item)
        return plan

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise self._refused(read_item)

    def _refused(self, item: ReadItem) -> CheckpointUntrustedError:
        return _pickled_item_refusal(self.url, self.metadata, item.dest_index.fqn)


def _pickled_item_refusal(url: str, metadata: Any, fqn: str) -> CheckpointUntrustedError:
    info = getattr(metadata, "storage_data", {}).get(MetadataIndex(fqn))
    where = join(url, getattr(info, "relative_path", METADATA))
    return CheckpointUntrustedError(
        f"checkpoint {where}: refused to unpickle item {fqn!r} (a pickled object; recap checkpoints "
        "hold tensors only)"
    )


class _SafeReader(FsspecReader):
    """DCP's fsspec reader with `.metadata` unpickled through an allow-list of DCP's metadata types (its
    own read_metadata is a plain pickle.load: a crafted file would run code on every rank that loads it).
    The metadata is read once per reader: `load_checkpoint` reads it first, so a refusal is the error the
    user sees (DCP itself would bury it under "metadata is None")."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.url = url
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is None and self._metadata is not None:
            return self._metadata
        path = self._get_metadata_path(rank)
        name = join(self.url, str(path).rsplit("/", 1)[-1])
        with errors_named(name, "read"), self.fs.create_stream(path, "rb") as f:
            raw = f.read()
        md = read_checkpoint_metadata(raw, name)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        if rank is None:
            self._metadata = md
        return md

    def read_data(self, plan: LoadPlan, planner: Any) -> torch.futures.Future:
        """DCP's read, one shard file at a time, so that a failure names its file: a truncated or
        overwritten shard raises CheckpointCorruptError, a storage failure a StorageError."""
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in per_file.items():
            name = join(self.url, relative_path)
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except InputError:
                raise
            except _CORRUPT_READ as e:
                described = describe_error(name, e, "read")
                if described is not None:
                    raise described from e
                raise CheckpointCorruptError(f"checkpoint {name}: cannot be read ({_one_line(e)})") from e
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(None)
        return fut


def read_checkpoint_metadata(data: bytes, name: str) -> Metadata:
    """Unpickle a DCP `.metadata` (its bytes; `name` is its URL, for errors) admitting only DCP's
    metadata types: anything else is refused before it is imported, let alone called."""
    try:
        md = restricted_load(data, DCP_METADATA_GLOBALS)
    except RefusedGlobalError as e:
        raise CheckpointUntrustedError(
            f"checkpoint {name}: refused to unpickle {e.module}.{e.name} (not a checkpoint metadata type)"
        ) from None
    except Exception as e:  # truncated or overwritten: the bytes are all here, they do not unpickle
        raise CheckpointCorruptError(f"checkpoint {name}: cannot be read ({_one_line(e)})") from e
    if not isinstance(md, Metadata):
        raise CheckpointUntrustedError(f"checkpoint {name}: holds a {type(md).__name__}, not DCP metadata")
    return md


def _reader(url: str, storage_options: Mapping[str, Any] | None) -> _SafeReader:
    return _SafeReader(url, **dict(storage_options or {}))


class ModuleState:
    """A module's state dict under its keys minus `prefix`: the trainer's model is the ranker inside a
    loss wrapper (`model.`), and checkpoints hold the ranker's own keys, so evaluation and export load
    them into a ranker without rebuilding the wrapper."""

    def __init__(self, module: torch.nn.Module, prefix: str = "") -> None:
        self.module, self.prefix = module, prefix

    def state_dict(self) -> dict[str, Any]:
        n = len(self.prefix)
        return {k[n:]: v for k, v in self.module.state_dict().items() if k.startswith(self.prefix)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict({f"{self.prefix}{k}": v for k, v in state.items()})


WriterFactory = Callable[[str, int], StorageWriter]


class Checkpointer:
    """Saves and restores the run's stateful parts, registered once (`states`: name -> object with
    state_dict / load_state_dict), as `step-N` checkpoints under `root`; decides itself when to save.

    `writer_factory(url, step)` makes the DCP storage writer of each save (default: `storage_writer`);
    it is the extension point for other storage layers and for fault injection in tests.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        root: str,
        states: Mapping[str, Any],
        *,
        storage_options: Mapping[str, Any] | None = None,
        process_group: dist.ProcessGroup | None = None,
        writer_factory: WriterFactory | None = None,
        retry_backoff_s: float = 2.0,
    ) -> None:
        self.cfg = cfg
        self.root = root
        self.states = dict(states)
        self.storage_options = dict(storage_options or {})
        # Async saves run their collectives on a CPU (gloo) group; on CUDA/NCCL jobs pass one here.
        self.process_group = process_group
        self.writer_factory = writer_factory or (lambda url, step: storage_writer(url, self.storage_options))
        self.retry_backoff_s = retry_backoff_s
        self.consecutive_failures = 0
        self._pending: Future | None = None
        self._pending_step: int | None = None
        self._purger: threading.Thread | None = None

    def _state_dict(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        return {name: self.states[name].state_dict() for name in names or self.states}

    # ------------------------------------------------------------------------------------------ save
    def should_save(self, step: int, last_step: bool = False) -> bool:
        return last_step or bool(self.cfg.every_n and step % self.cfg.every_n == 0)

    def save(self, step: int, last_step: bool = False) -> float:
        """Save every registered part as step-`step` when it is time; returns the seconds training was
        blocked. Async (unless `last_step` or async is off): waits for the previous save, stages to CPU,
        returns while the write goes on. The last step's save is synchronous, so the job ends durable."""
        if not self.should_save(step, last_step):
            return 0.0
        start = time.perf_counter()
        self.wait()
        if self._already_complete(step):
            log(f"checkpoint step-{step} already complete; not saving again")
            return 0.0
        if self.cfg.async_save and not last_step:
            self._save_async(step)
        else:
            self._save_sync(step, attempts=self.cfg.final_attempts if last_step else 1, final=last_step)
        return time.perf_counter() - start

    def _already_complete(self, step: int) -> bool:
        try:
            return step in list_steps(self.root, self.storage_options)[0]
        except Exception as e:  # store unreachable: the save fails too, on every rank alike
            log(f"cannot list {self.root} before saving step-{step}: {e!r}", level=logging.WARNING)
            return False

    def _save_async(self, step: int) -> None:
        start = time.perf_counter()
        url = step_url(self.root, step)
        try:
            self._pending = dcp.async_save(
                self._state_dict(),
                storage_writer=self.writer_factory(url, step),
                process_group=self.process_group,
            )
        except SAVE_ERRORS as e:
            self._failed(step, e, fatal=False)
            return
        self._pending_step = step
        blocked = time.perf_counter() - start
        log(f"checkpoint step-{step}: async save started to {url} (blocked {blocked:.2f}s)")

    def _save_sync(self, step: int, *, attempts: int, final: bool) -> None:
        start = time.perf_counter()
        url = step_url(self.root, step)
        for attempt in range(1, attempts + 1):
            try:
                dcp.save(
                    self._state_dict(),
                    storage_writer=self.writer_factory(url, step),
                    process_group=self.process_group,
                )
                break
            except SAVE_ERRORS as e:
                if attempt == attempts:
                    self._failed(step, e, fatal=final)
                    return
                delay = self.retry_backoff_s * 2 ** (attempt - 1)
                log(
                    f"checkpoint save to {url} failed (attempt {attempt}/{attempts}), "
                    f"retry in {delay:.0f}s: {_brief(e)}",
                    level=logging.WARNING,
                )
                time.sleep(delay)
        log(f"checkpoint step-{step}: saved to {url} in {time.perf_counter() - start:.2f}s")
        self._succeeded()

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
        limit = self.cfg.max_consecutive_failures
        if fatal or self.consecutive_failures >= limit:
            how = (
                f"final save, {self.cfg.final_attempts} attempts"
                if fatal
                else f"{self.consecutive_failures} periodic saves in a row"
            )
            cause = storage_cause(error)
            if cause is not None:
                raise CheckpointStorageError(
                    f"checkpoint save to {url} failed ({how}): {cause} [{_brief(error)}]"
                ) from error
            raise CheckpointSaveError(f"checkpoint save to {url} failed ({how}): {_brief(error)}") from error
        log(
            f"checkpoint save to {url} failed ({self.consecutive_failures}/{limit} in a row); "
            f"training continues, the last complete checkpoint is intact: {_brief(error)}",
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
        keep = self.cfg.keep_latest_k
        try:
            complete, partial = list_steps(self.root, self.storage_options)
            doomed = [s for s in partial if complete and s < complete[-1]]
            if keep > 0:
                doomed += complete[:-keep]
            fs, _ = url_to_fs(self.root, self.storage_options)
            for step in sorted(doomed):
                _, path = url_to_fs(step_url(self.root, step), self.storage_options)
                fs.rm(path, recursive=True)
                log(f"checkpoint step-{step}: deleted (keep_latest_k={keep})")
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

    def load(self) -> bool:
        """Resume every part from the newest complete step (True), else warm-start the model from
        `initial_checkpoint` when one is configured (False: optimizers and step stay fresh).

        A complete step that cannot be read (checkpoint.on_corrupt): `fail` stops naming the step and
        file; `fallback` (default) moves it aside to `step-N.corrupt` (kept; list_steps ignores it) and
        tries the next older complete step. Every rank takes the same branch (a collective decision)."""
        step = self.latest_step()
        while step is not None:
            error = self._try_resume(step)
            if error is None:
                return True
            step = self._fall_back(step, error)
        if self.cfg.initial_checkpoint:
            load_model_weights(
                self.states["model"], self.cfg.initial_checkpoint, self.storage_options, self.process_group
            )
            log(f"warm start: model weights from {self.cfg.initial_checkpoint} (optimizer and step fresh)")
        return False

    def _try_resume(self, step: int) -> CheckpointCorruptError | None:
        """Resume from `step`: None when done, else why it is corrupt, on every rank alike (DCP already
        reports any rank's failed read to all; the all-reduce makes it a decision all ranks share)."""
        url = step_url(self.root, step)
        error: CheckpointCorruptError | None = None
        try:
            self._resume(url, step)
        except CheckpointCorruptError as e:
            error = e
        if _agree_any(error is not None, self.process_group):
            return error or CheckpointCorruptError(f"checkpoint {url}: another rank could not read it")
        return None

    def _resume(self, url: str, step: int) -> None:
        for part in self.states.values():
            if hasattr(part, "init_state"):
                part.init_state()  # optimizer state is lazy; DCP loads in place
        # The train state first (its tensors shaped as saved: the data position varies in size),
        # so it can refuse a resume before the rest is read.
        state = {"train_state": self._saved_tensors(url, "train_state")}
        load_checkpoint(url, state, self.storage_options, self.process_group)
        self.states["train_state"].load_state_dict(state["train_state"])
        names = [n for n in self.states if n != "train_state"]
        state = self._state_dict(names)
        load_checkpoint(url, state, self.storage_options, self.process_group)
        for name in names:
            self.states[name].load_state_dict(state[name])
        log(f"resumed from {url} at step {step}")

    def _fall_back(self, step: int, error: CheckpointCorruptError) -> int | None:
        """checkpoint.on_corrupt for an unreadable complete `step`: raise, or move it aside (rank 0)
        and return the next older complete step (None: none left, the run starts fresh)."""
        if self.cfg.on_corrupt == CorruptCheckpointPolicy.FAIL:
            raise CheckpointCorruptError(
                f"{error}; step-{step} is corrupt: move it away to resume from the previous step, or set "
                "checkpoint.on_corrupt=fallback"
            )
        failed = None
        if _rank() == 0:
            try:
                moved = self._quarantine(step)
                log(
                    f"CORRUPT CHECKPOINT: {error}; moved step-{step} to {moved} (kept for inspection), "
                    "resuming from the newest readable complete step",
                    level=logging.ERROR,
                )
            except Exception as e:
                failed = e
        if _agree_any(failed is not None, self.process_group):
            raise CheckpointCorruptError(
                f"{error}; moving step-{step} aside failed ({_one_line(failed) if failed else 'on rank 0'}): "
                "move it away by hand to resume from the previous step"
            )
        older = [s for s in list_steps(self.root, self.storage_options)[0] if s < step]
        return older[-1] if older else None

    def _quarantine(self, step: int) -> str:
        """Move step-N to step-N.corrupt (another suffix if taken). A rename where there are folders;
        object stores have none: every file is copied, then `.metadata` deleted first (from then on
        the step is incomplete, so a crash midway leaves nothing resumable), then the rest."""
        src = step_url(self.root, step)
        dst = src + CORRUPT_SUFFIX
        fs, src_path = url_to_fs(src, self.storage_options)
        if fs.exists(url_to_fs(dst, self.storage_options)[1]):
            dst = f"{dst}-{int(time.time())}"
        _, dst_path = url_to_fs(dst, self.storage_options)
        with errors_named(src, f"move to {dst}"):
            if isinstance(fs, LocalFileSystem):
                fs.mv(src_path, dst_path, recursive=True)
                return dst
            for path in fs.find(src_path):
                fs.copy(path, dst_path + path[len(src_path.rstrip("/")) :])
            fs.rm(f"{src_path.rstrip('/')}/{METADATA}")
            fs.rm(src_path, recursive=True)
        return dst

    def _saved_tensors(self, url: str, part: str) -> dict[str, torch.Tensor]:
        """Empty tensors shaped like the checkpoint's `part.*` entries (which must all be tensors)."""
        metadata = _reader(url, self.storage_options).read_metadata()
        out = {}
        for key, item in metadata.state_dict_metadata.items():
            if key.startswith(f"{part}."):
                if not isinstance(item, TensorStorageMetadata):
                    raise _pickled_item_refusal(url, metadata, key)
                out[key[len(part) + 1 :]] = torch.empty(item.size, dtype=item.properties.dtype)
        return out

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
        raise CheckpointNotFoundError(f"no complete checkpoint at {url} (missing {METADATA})")
    reader = _reader(url, storage_options)
    reader.read_metadata()  # allow-listed unpickling; its refusal is the error to show
    try:
        with warnings.catch_warnings():
            # with no_dist, DCP says it assumes a single-process load: asked for, not news
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(
                state,
                storage_reader=reader,
                planner=_LoadPlanner(url),
                process_group=process_group,
                no_dist=no_dist,
            )
    except (Exception, dcp.CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        _raise_if_untrusted(e)
        lines = _mismatch_lines(url, state, storage_options)
        if not lines:
            raise  # keys and shapes fit (e.g. the store is unreachable): the original error says what
        raise CheckpointMismatchError("\n".join([_mismatch_head(url, e), *lines])) from e


def load_model_weights(
    model: torch.nn.Module | ModuleState,
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
    *,
    no_dist: bool = False,
) -> None:
    """Load only the "model" entry of a checkpoint (the ranker's keys) into `model`: a ranker, or a
    ModuleState over a wrapper holding one (warm start, evaluation, export)."""
    state = {"model": model.state_dict()}
    load_checkpoint(url, state, storage_options, process_group, no_dist=no_dist)
    model.load_state_dict(state["model"])


def _raise_if_untrusted(error: BaseException) -> None:
    """Re-raise a refusal by the planner, a corrupt file or a storage failure (named by _SafeReader):
    DCP wraps every rank's failure into one CheckpointException, a traceback per rank."""
    if isinstance(error, InputError):
        raise error
    if isinstance(error, dcp.CheckpointException):
        failures = [exc for exc, _ in error.failures.values()]
        for kind in (CheckpointUntrustedError, CheckpointCorruptError, InputError):
            for exc in failures:
                if isinstance(exc, kind):
                    raise exc from None


def _one_line(error: BaseException) -> str:
    text = "".join(c if c.isprintable() else "?" for c in " ".join(str(error).split()))
    if not text and isinstance(error, EOFError):
        text = "the file ends early (truncated)"
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


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
    raise CheckpointNotFoundError(f"no complete checkpoint at or under {url}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _agree_any(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """Collective: whether `flag` is set on any rank (CPU tensor: the checkpoint group is gloo)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
