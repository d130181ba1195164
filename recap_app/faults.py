"""Test-only fault injection for real-process fault-tolerance tests (tests/test_fault_tolerance.py).

Inert unless its environment variables are set; nothing in a normal run sets them. Each hook is a few
lines called from the training loop or the checkpointer:

- ``RECAP_FAULT_KILL_AT_STEP=S`` + ``RECAP_FAULT_KILL_RANK=R`` (default 1): rank R SIGKILLs itself right
  after training step S (mid-training, wherever the async checkpoint writer happens to be).
- ``RECAP_FAULT_KILL_IN_SAVE_STEP=S`` + ``RECAP_FAULT_KILL_RANK=R``: rank R SIGKILLs itself inside the
  save of checkpoint step S, after writing its own shard and before DCP can commit ``.metadata``.
- ``RECAP_FAULT_ONCE_FILE=PATH``: a kill fires only while PATH does not exist, and creates it first, so
  the restarted attempt (torchrun --max_restarts, scheduler retry) runs clean.
- ``RECAP_FAULT_PAUSE_BEFORE_SAVE_STEPS=S1,S2,..`` + ``RECAP_FAULT_PAUSE_DIR=DIR``: every rank, when saving
  step Si (after the previous async save was awaited, before this one starts), creates
  ``DIR/reached-before-save-Si-rank-R`` and waits until ``DIR/release-before-save-Si`` exists, so a test can
  stop or start the object store right then.
- ``RECAP_FAULT_PAUSE_IN_SAVE_STEPS=S1,..`` (+ ``RECAP_FAULT_PAUSE_DIR``): the same (``in-save-Si``) inside
  the save, once this rank's shard is written and before ``.metadata`` is: the store can go away mid-save.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from recap_app.logs import ALL_RANKS, current_rank, log


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _kill_once(what: str) -> None:
    once = os.environ.get("RECAP_FAULT_ONCE_FILE")
    if once:
        if os.path.exists(once):
            return
        Path(once).write_text(f"{what}\n")
    log(f"FAULT INJECTION: SIGKILL {what}", rank=ALL_RANKS)
    os.kill(os.getpid(), signal.SIGKILL)


def _is_victim() -> bool:
    return current_rank() == int(os.environ.get("RECAP_FAULT_KILL_RANK") or 1)


def after_train_step(step: int) -> None:
    """Called by the training loop after each step."""
    if _env_int("RECAP_FAULT_KILL_AT_STEP") == step and _is_victim():
        _kill_once(f"rank {current_rank()} after step {step}")


def wrap_checkpoint_writer(writer: Any, step: int) -> Any:
    """Called by the checkpointer on its DCP storage writer for `step`: returns it, or a copy that dies or
    pauses once this rank's shard is written (before DCP can commit `.metadata`)."""
    kill = _env_int("RECAP_FAULT_KILL_IN_SAVE_STEP") == step and _is_victim()
    pause = _listed("RECAP_FAULT_PAUSE_IN_SAVE_STEPS", step)
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


def before_checkpoint_save(step: int) -> None:
    """Called by the checkpointer before saving `step` (after awaiting the previous async save)."""
    if _listed("RECAP_FAULT_PAUSE_BEFORE_SAVE_STEPS", step):
        _pause(f"before-save-{step}")


def _listed(name: str, step: int) -> bool:
    return str(step) in os.environ.get(name, "").split(",")


def _pause(tag: str) -> None:
    """Create DIR/reached-TAG-rank-R, then wait for DIR/release-TAG."""
    folder = Path(os.environ["RECAP_FAULT_PAUSE_DIR"])
    (folder / f"reached-{tag}-rank-{current_rank()}").touch()
    log(f"FAULT INJECTION: paused ({tag})", rank=ALL_RANKS)
    while not (folder / f"release-{tag}").exists():
        time.sleep(0.05)
    log(f"FAULT INJECTION: released ({tag})", rank=ALL_RANKS)
