"""Output ownership: one run at a time writes under an output URL.

Rank 0 takes a lease, `{output}/lease.json` (owner host, pid, scheduler job id, start time, heartbeat),
through fsspec on every backend, and refreshes its heartbeat from a background thread while training.
A second run on a leased output refuses at once, naming the owner and how to override. The lease is
taken over:
- by the same job (same SLURM_JOB_ID, or same TorchX app through torchrun's TORCHELASTIC_RUN_ID):
  torchrun restarts and scheduler retries, without waiting;
- on the owner's host when the owner's pid is gone (a rerun after kill -9), without waiting;
- when its heartbeat is older than `lease_timeout_s` (the owner died elsewhere), with a warning;
- with `training.force_lease=true`, with a warning.
Object stores offer no atomic create here, so after writing, rank 0 reads the lease back once more after
a short pause: of two runs that raced, the one whose write was overwritten refuses.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from recap_app.errors import InputError
from recap_app.logs import log
from recap_app.storage import StorageError, errors_named, join, rm, url_to_fs, write

LEASE_FILE = "lease.json"


class OutputLeasedError(InputError):
    """Another run holds the output's lease."""


def job_id() -> str:
    """The scheduler job this process belongs to ('' when unknown)."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or ""


def _pid_alive(pid: int) -> bool:
    """True unless `pid` is gone or a zombie (PID 1 of a container may not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class OutputLease:
    """Rank 0's lease on an output URL; `acquire()` is collective (every rank gets the verdict)."""

    def __init__(
        self,
        output: str,
        *,
        timeout_s: float,
        force: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        settle_s: float = 0.5,
    ) -> None:
        self.url = join(output, LEASE_FILE)
        self.timeout_s, self.force, self.settle_s = timeout_s, force, settle_s
        self.storage_options = dict(storage_options or {})
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": job_id(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "started_unix": self.started,
            "heartbeat_unix": now,
        }

    def read(self) -> dict[str, Any] | None:
        try:
            with errors_named(self.url, "read"):
                fs, path = url_to_fs(self.url, self.storage_options)
                return json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a torn or foreign file is no owner

    def _verdict(self, held: Mapping[str, Any] | None) -> str | None:
        """None when this run may take the lease, else why not (the error message)."""
        if held is None:
            return None
        age = time.time() - float(held.get("heartbeat_unix", 0))
        same_job = bool(job_id()) and held.get("job_id") == job_id()
        dead_here = held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1)))
        if same_job or dead_here:
            log(f"taking over the lease of {self.url} from an earlier attempt of this run ({_owner(held)})")
            return None
        if age > self.timeout_s or self.force:
            why = "training.force_lease=true" if self.force else f"no heartbeat for {age:.0f}s"
            log(f"taking over the lease of {self.url} from {_owner(held)} ({why})", level=logging.WARNING)
            return None
        return (
            f"output {self.url.rsplit('/', 1)[0]} is in use by another run: {_owner(held)}, last heartbeat "
            f"{age:.0f}s ago. Use another --output, wait for it to end (a dead owner's lease expires after "
            f"training.lease_timeout_s={self.timeout_s:.0f}s), or set training.force_lease=true"
        )

    def try_take(self) -> str | None:
        """Rank 0's part of `acquire`: take the lease, or return why not (the error message)."""
        refusal = self._verdict(self.read())
        if refusal is not None:
            return refusal
        write(self.url, json.dumps(self._record()), self.storage_options)
        time.sleep(self.settle_s)
        held = self.read()
        if held is None or held.get("token") != self.token:
            return f"output {self.url.rsplit('/', 1)[0]} was claimed at the same time by {_owner(held or {})}"
        return None

    def acquire(self) -> None:
        """Collective: rank 0 takes the lease (or learns why not); every rank raises the same refusal."""
        verdict: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                verdict = [self.try_take()]
            except StorageError as e:  # the output cannot be written: every rank says so, not rank 0 alone
                verdict = [e]
        dist.broadcast_object_list(verdict, src=0)
        if isinstance(verdict[0], StorageError):
            raise verdict[0]
        if verdict[0] is not None:
            raise OutputLeasedError(verdict[0])
        if dist.get_rank() == 0:
            self.start_heartbeat()

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="output-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        """Refresh the heartbeat every timeout/4; notice (and report) a lease taken by another run."""
        while not self._stop.wait(self.timeout_s / 4):
            try:
                held = self.read()
                if held is not None and held.get("token") != self.token:
                    self.lost = True
                    log(f"lease of {self.url} taken over by {_owner(held)}", level=logging.ERROR)
                    return
                write(self.url, json.dumps(self._record()), self.storage_options)
            except Exception as e:  # the store may be down for a while: the checkpoint policy decides
                log(f"lease heartbeat to {self.url} failed: {e!r}", level=logging.WARNING)

    def check(self) -> None:
        """Collective, before writing: stop every rank when another run has taken the output over."""
        lost = [self.lost]
        dist.broadcast_object_list(lost, src=0)
        if lost[0]:
            raise OutputLeasedError(f"the lease of {self.url} was taken over by another run; stopping")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease (rank 0; only while it is still ours)."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=10)
        try:
            held = self.read()
            if held is not None and held.get("token") == self.token:
                rm(self.url, storage_options=self.storage_options)
        except Exception as e:
            log(f"could not release the lease {self.url}: {e!r}", level=logging.WARNING)


def _owner(held: Mapping[str, Any]) -> str:
    job = f", job {held['job_id']}" if held.get("job_id") else ""
    return f"host {held.get('host', '?')} pid {held.get('pid', '?')}{job}, started {held.get('started', '?')}"
