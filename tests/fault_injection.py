"""`recap train` with faults, for the real-process fault-tolerance tests (tests/test_fault_tolerance.py).

Run it like `python -m recap_app.train` (under torchrun, or as a TorchX script); it calls the product's
main with a trainer callback and a checkpoint writer factory, its public extension points. Faults are
chosen by environment variables (nothing in recap_app reads them):

- ``FAULT_KILL_AT_STEP=S`` + ``FAULT_KILL_RANK=R`` (default 1): rank R SIGKILLs itself at the end of
  training step S (mid-training, wherever the async checkpoint writer happens to be).
- ``FAULT_KILL_IN_SAVE_STEP=S`` + ``FAULT_KILL_RANK=R``: rank R SIGKILLs itself inside the save of
  checkpoint step S, after writing its own shard and before DCP can commit ``.metadata``.
- ``FAULT_ONCE_FILE=PATH``: a kill fires only while PATH does not exist, and creates it first, so the
  restarted attempt (torchrun --max_restarts, scheduler retry) runs clean.
- ``FAULT_PAUSE_BEFORE_SAVE_STEPS=S1,S2,..`` + ``FAULT_PAUSE_DIR=DIR``: every rank, when saving step Si
  (after the previous async save was awaited, before this one starts), creates
  ``DIR/reached-before-save-Si-rank-R`` and waits until ``DIR/release-before-save-Si`` exists, so a test
  can stop or start the object store right then.
- ``FAULT_PAUSE_IN_SAVE_STEPS=S1,..`` (+ ``FAULT_PAUSE_DIR``): the same (``in-save-Si``) inside the save,
  once this rank's shard is written and before ``.metadata`` is: the store can go away mid-save.

Not a fault but an observer: ``RECORD_ROWS_DIR=DIR`` makes every rank append, after each step, one line
per example it trained on (a digest of the example's continuous features) to ``DIR/rank-R-pid-P.txt``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

from torch.distributed.checkpoint.storage import StorageWriter

from recap_app import train
from recap_app.checkpoint import storage_writer
from recap_app.logs import ALL_RANKS, current_rank, log
from recap_app.trainer import Trainer


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _listed(name: str, step: int) -> bool:
    return str(step) in os.environ.get(name, "").split(",")


def _is_victim() -> bool:
    return current_rank() == int(os.environ.get("FAULT_KILL_RANK") or 1)


def _kill_once(what: str) -> None:
    once = os.environ.get("FAULT_ONCE_FILE")
    if once:
        if os.path.exists(once):
            return
        Path(once).write_text(f"{what}\n")
    log(f"FAULT INJECTION: SIGKILL {what}", rank=ALL_RANKS)
    os.kill(os.getpid(), signal.SIGKILL)


def _pause(tag: str) -> None:
    """Create DIR/reached-TAG-rank-R, then wait for DIR/release-TAG."""
    folder = Path(os.environ["FAULT_PAUSE_DIR"])
    (folder / f"reached-{tag}-rank-{current_rank()}").touch()
    log(f"FAULT INJECTION: paused ({tag})", rank=ALL_RANKS)
    while not (folder / f"release-{tag}").exists():
        time.sleep(0.05)
    log(f"FAULT INJECTION: released ({tag})", rank=ALL_RANKS)


class KillAtStep:
    """Trainer callback: the victim rank dies at the end of step FAULT_KILL_AT_STEP."""

    def on_step_end(self, trainer: Trainer) -> None:
        if _env_int("FAULT_KILL_AT_STEP") == trainer.step and _is_victim():
            _kill_once(f"rank {current_rank()} after step {trainer.step}")


def faulty_writer(url: str, step: int, storage_options: dict | None = None) -> StorageWriter:
    """Checkpoint writer factory: the default writer, paused before the save or killed / paused once
    this rank's shard is written, as the environment asks."""
    if _listed("FAULT_PAUSE_BEFORE_SAVE_STEPS", step):
        _pause(f"before-save-{step}")
    writer = storage_writer(url, storage_options)
    kill = _env_int("FAULT_KILL_IN_SAVE_STEP") == step and _is_victim()
    pause = _listed("FAULT_PAUSE_IN_SAVE_STEPS", step)
    if not (kill or pause):
        return writer
    write_data = writer.write_data

    def write_then_fault(plan, planner):
        written = write_data(plan, planner)
        written.wait()
        if kill:
            _kill_once(f"rank {current_rank()} in the save of step {step}")
        if pause:
            _pause(f"in-save-{step}")
        return written

    writer.write_data = write_then_fault
    return writer


class RecordRows:
    """Trainer callback: the examples each step trained on, for exactly-once checks across resumes."""

    def on_step_end(self, trainer: Trainer) -> None:
        folder = os.environ.get("RECORD_ROWS_DIR")
        if not folder:
            return
        rows = trainer.pipeline.last_batch.continuous_features.cpu().numpy()
        digests = "".join(hashlib.sha1(row.tobytes()).hexdigest() + "\n" for row in rows)
        with open(Path(folder) / f"rank-{current_rank()}-pid-{os.getpid()}.txt", "a") as f:
            f.write(digests)


if __name__ == "__main__":
    callbacks = [KillAtStep(), RecordRows()]
    sys.exit(train.main(callbacks=callbacks, checkpoint_writer_factory=faulty_writer))
