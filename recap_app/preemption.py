"""Preemption and liveness: a SIGTERM ends a run at an agreed step with a checkpoint of that step, and a
stuck or vanished rank ends it within `training.collective_timeout_s`, naming the step and the rank.

SIGTERM is what Kubernetes sends on pod deletion and Slurm on preemption, `scancel` or ahead of the time
limit (`--signal`); torchrun forwards it to every worker, then kills them after 30 s. Each rank may see
the signal at a different step, but a checkpoint save is collective, so the ranks agree on the step to
stop at through the job's c10d store: the first rank to see a signal proposes its step + 2 (ranks run
within one step of each other, since every step has collectives), and every rank reads the agreed step
at the top of each step. Both cost one store round trip per step, no device sync.

The same store carries each rank's heartbeat (a thread, every few seconds) and last started step, so a
collective that times out can say which rank went quiet: a stopped (SIGSTOP, a frozen node) or vanished
rank's heartbeat is stale.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import timedelta
from types import FrameType

import torch.distributed as dist

from recap_app.errors import FaultError
from recap_app.logs import log

# The exit status of a preempted run: 128 + SIGTERM, what a process killed by SIGTERM reports. Slurm
# (TorchX's requeue, --max_retries) and Volcano (maxRetry) retry a non-zero exit; the retry resumes here.
PREEMPTED_EXIT_CODE = 143
_STOP_KEY = "recap/preempt/stop_step"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class CollectiveTimeoutError(FaultError):
    """A collective did not complete in time: a rank is stopped, hung or gone."""


class StepCoordinator:
    """Per step, on every rank: record the step in the store, and learn whether (and where) to stop."""

    def __init__(self, rank: int, world_size: int, heartbeat_s: float = 5.0) -> None:
        self.rank, self.world_size, self.heartbeat_s = rank, world_size, heartbeat_s
        self.store = dist.distributed_c10d._get_default_store()
        self._beating = threading.Event()
        self.signal_name: str | None = None
        self.signal_time = 0.0
        self.stop_step: int | None = None
        self._proposed = False
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------------------------------- signals
    def install(self) -> None:
        """Catch SIGTERM / SIGINT (remembered; the loop stops at the agreed step); start the heartbeat."""
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._beating.set()
        threading.Thread(target=self._heartbeat, name="recap-heartbeat", daemon=True).start()

    def restore(self) -> None:
        self._beating.clear()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _heartbeat(self) -> None:
        while self._beating.is_set():
            try:
                self.store.set(f"recap/alive/rank-{self.rank}", str(time.time()))
            except Exception:
                return  # the store (the job) is gone
            time.sleep(self.heartbeat_s)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name, self.signal_time = signal.Signals(signum).name, time.monotonic()

    # ------------------------------------------------------------------------------------ each step
    def should_stop(self, step: int) -> bool:
        """Called at the top of every step (`step` = steps completed) on every rank, in lockstep."""
        try:
            if self.signal_name is not None and not self._proposed:
                self._proposed = True
                self.store.compare_set(_STOP_KEY, "", str(step + 2))
            if self.stop_step is None and self.store.check([_STOP_KEY]):
                self.stop_step = int(self.store.get(_STOP_KEY))
        except dist.DistError as e:  # the store lives in rank 0's torchrun agent: that node is gone
            raise FaultError(
                f"step {step + 1}: the job's rendezvous store is unreachable (rank 0's node stopped?): "
                f"{type(e).__name__}"
            ) from None
        return self.stop_step is not None and step >= self.stop_step

    def seconds_since_signal(self) -> float:
        return time.monotonic() - self.signal_time if self.signal_name else 0.0

    # -------------------------------------------------------------------------------------- liveness
    def timeout_error(self, step: int, timeout_s: float, error: BaseException) -> CollectiveTimeoutError:
        """Name the ranks whose heartbeat went stale (read from the store, briefly)."""
        self.store.set_timeout(timedelta(seconds=5))
        now, quiet = time.time(), {}
        for r in range(self.world_size):
            try:
                age = now - float(self.store.get(f"recap/alive/rank-{r}"))
            except Exception:
                age = float("inf")
            if age > 3 * self.heartbeat_s:
                quiet[r] = age
        who = (
            f"rank(s) {sorted(quiet)} sent no heartbeat for {min(quiet.values()):.0f}s or more "
            "(stopped or gone)"
            if quiet
            else "every rank is alive (one may be hung inside the step)"
        )
        return CollectiveTimeoutError(
            f"step {step + 1}: a collective did not complete within training.collective_timeout_s="
            f"{timeout_s:.0f}s; {who}. A scheduler retry (--max_retries) resumes from the last complete "
            f"checkpoint ({type(error).__name__})"
        )


def is_collective_failure(error: BaseException) -> bool:
    """A gloo / nccl collective that timed out or lost its peer: DistBackendError, or gloo's RuntimeErrors
    ("Timed out waiting ...", "Application timeout caused pair closure", "Connection reset by peer")."""
    if isinstance(error, dist.DistBackendError):
        return True
    text = str(error).lower()
    signs = ("timed out", "timeout", "pair closure", "connection closed by peer", "connection reset by peer")
    return isinstance(error, RuntimeError) and any(s in text for s in signs)


def log_preempted(step: int, signal_name: str, saved_in: float | None, since_signal: float) -> None:
    what = f"checkpoint step-{step} saved in {saved_in:.1f}s" if saved_in is not None else "no checkpoint"
    log(
        f"{signal_name} received: stopped at step {step}, {what} ({since_signal:.1f}s after the signal); "
        f"exiting with status {PREEMPTED_EXIT_CODE} so the scheduler's retry resumes here"
    )
