"""Helpers for the end-to-end tests: real processes (torchrun, the recap CLI, torchx) with timeouts.

Process start-up dominates these runs (importing torchrec costs ~5 s per process, and the machine has two
cores), so a phase that must run for several storage backends runs them all in ONE launch: this file is
also a driver script,

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/e2e_lib.py MODULE JOBS_JSON

which imports MODULE (e.g. ``recap_app.train``) and calls its real ``main(argv)`` once per argv list in
JOBS_JSON, in the same ranks. The mains end with ``dist.destroy_process_group()``; the driver makes that a
no-op until the last job so the next main's ``setup_distributed()`` finds the group still there. Every
job rebuilds its model, optimizer, checkpointer and data loader from scratch, exactly as a separate
launch would; only the interpreter and the process group are shared. Without torchrun (``python
tests/e2e_lib.py recap_app.cli JOBS_JSON``) the jobs simply run one after the other.

Each job's output is framed by ``MARKER`` lines so a test can cut the log into per-job sections.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
MARKER = "=== e2e job"
_MARKER_RE = re.compile(rf"^{MARKER} (\d+) (start|end)(?: ([0-9.]+)s)?", re.MULTILINE)


@dataclass
class Result:
    cmd: list[str]
    returncode: int
    output: str  # stdout and stderr, interleaved as written
    seconds: float

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    def sections(self) -> dict[int, str]:
        """Per-job output of a driver run (see MARKER), by job index. Other ranks' lines may spill into
        a neighbouring section; rank 0's lines are always in their own job's section."""
        out: dict[int, str] = {}
        starts = [
            (int(m.group(1)), m.end()) for m in _MARKER_RE.finditer(self.output) if m.group(2) == "start"
        ]
        for n, (job, begin) in enumerate(starts):
            end = self.output.find(f"{MARKER} {starts[n + 1][0]} start", begin) if n + 1 < len(starts) else -1
            out[job] = self.output[begin : end if end >= 0 else len(self.output)]
        return out

    def job_seconds(self) -> dict[int, float]:
        return {
            int(m.group(1)): float(m.group(3))
            for m in _MARKER_RE.finditer(self.output)
            if m.group(2) == "end"
        }


def run(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    inherit_env: bool = True,
    cwd: str | os.PathLike | None = None,
    timeout: float = 300,
    check: bool = True,
    what: str = "",
) -> Result:
    """Run `cmd` in its own process group with env={**os.environ, **env} (or just `env`); kill the whole
    group on timeout. With `check`, a non-zero exit or a timeout fails with the command and log tail."""
    full_env = {**os.environ, **(env or {})} if inherit_env else dict(env or {})
    cmd = [str(c) for c in cmd]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=full_env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        res = Result(cmd, -9, output, time.perf_counter() - start)
        raise AssertionError(
            f"{what or cmd[:6]} timed out after {timeout:.0f} s; log tail:\n{res.tail()}"
        ) from None
    res = Result(cmd, proc.returncode, output, time.perf_counter() - start)
    if check and res.returncode != 0:
        raise AssertionError(f"{what or cmd[:6]} exited with {res.returncode}; log tail:\n{res.tail()}")
    return res


def wait_for(
    what: str,
    ready: Callable[[], bool],
    proc: subprocess.Popen,
    log: Path | None = None,
    timeout: float = 120,
) -> None:
    """Poll `ready()` while `proc` runs; fail (with the log's tail) if it exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{tail}"
        assert time.monotonic() < deadline, f"no {what} after {timeout}s:\n{tail}"
        time.sleep(0.1)


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *args,
    ]


def driver_cmd(module: str, jobs: Sequence[Sequence[str]], nproc: int = 0) -> list[str]:
    """Command running `module.main(argv)` for every argv in `jobs`; under torchrun when nproc > 0."""
    args = [str(HERE), module, json.dumps([list(j) for j in jobs])]
    return torchrun(nproc, *args) if nproc else [sys.executable, *args]


def not_in(secret: str, text: str, where: str) -> None:
    """Assert a secret is absent, without putting the secret or the text into the failure message."""
    if secret and secret in text:
        line = next(i for i, ln in enumerate(text.splitlines(), 1) if secret in ln)
        raise AssertionError(f"a credential appears in {where} (line {line})")


# ---------------------------------------------------------------------------------------------- driver
def _drive(module: str, jobs: list[list[str]]) -> int:
    import torch.distributed as dist

    main = importlib.import_module(module).main
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *a, **k: None  # the mains' `finally:` — we destroy once, below
    rank = int(os.environ.get("RANK", "0"))
    try:
        for i, argv in enumerate(jobs):
            if dist.is_initialized():
                dist.barrier()
            if rank == 0:
                print(f"{MARKER} {i} start {json.dumps(argv)}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            rc = main(argv)
            if rank == 0:
                print(f"{MARKER} {i} end {time.perf_counter() - start:.2f}s", file=sys.stderr, flush=True)
            if rc:
                return rc
    finally:
        dist.destroy_process_group = destroy
        if dist.is_initialized():
            destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(_drive(sys.argv[1], json.loads(sys.argv[2])))
