"""A real single-host Slurm cluster for the cluster tests (``make test-cluster``; needs root).

Use the session fixture ``slurm_cluster`` (a :class:`SlurmCluster`)::

    pytestmark = pytest.mark.cluster

    def test_train(slurm_cluster):
        wd = slurm_cluster.workdir("train-2x1")          # fresh dir under slurm_cluster.out_dir
        run = slurm_cluster.torchx_run("recap.train", "-j", "2x1", cwd=wd, timeout=600)
        assert run.state == "SUCCEEDED", run.diagnose()

Jobs run in ``cwd`` with the submitting environment (``slurm_cluster.env``: the venv's ``bin`` first
on PATH, a hermetic empty ``.torchxconfig`` unless ``config=`` is given, e.g. the project's:
``config=slurm_cluster.repo / ".torchxconfig"``), so Slurm's and torchx's
``slurm-<id>-<role>-<k>.{out,err}`` land in ``cwd``. Every node is this host.

The fixture runs ``slurm_up.sh`` (idempotent: a running cluster is reused) and, at the end, runs
``slurm_down.sh`` only if this session started the cluster. ``RECAP_SLURM_KEEP=1`` keeps it running,
``RECAP_SLURM_KEEP=0`` always stops it. Output root: ``RECAP_SLURM_TEST_OUT`` (default
``/tmp/recap-slurm-tests``), one ``session-*`` dir per run.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
UP, DOWN = HERE / "slurm_up.sh", HERE / "slurm_down.sh"
HANDLE_RE = re.compile(r"^slurm://[^/\s]+/(\d+)$", re.MULTILINE)
FINISHED_RE = re.compile(r"Job finished: (\w+)")
_TIMINGS: list[str] = []  # shown at the end of the run (pytest_terminal_summary)


@dataclass
class TorchxRun:
    """One ``torchx run -s slurm --wait ...``: ``state`` is what torchx reported at the end."""

    cluster: SlurmCluster
    cwd: Path
    proc: subprocess.CompletedProcess
    handle: str | None
    app_id: str | None
    state: str | None
    seconds: float

    def diagnose(self) -> str:
        """Everything useful for an assertion message: torchx output, job logs, sacct."""
        parts = [
            f"$ {' '.join(map(str, self.proc.args))}  (exit {self.proc.returncode}, {self.seconds:.1f}s)",
            f"--- stdout\n{self.proc.stdout[-3000:]}",
            f"--- stderr\n{self.proc.stderr[-5000:]}",
        ]
        if self.app_id:
            for f in sorted(self.cwd.glob(f"slurm-{self.app_id}*")):
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
            parts.append("--- sacct -D\n" + self.cluster.sh("sacct", "-D", "-j", self.app_id).stdout)
        return "\n".join(parts)


@dataclass
class SlurmCluster:
    env: dict[str, str]
    out_dir: Path
    partition: str
    nodes: list[str]
    up_seconds: float
    repo: Path = REPO  # e.g. torchx(..., config=slurm_cluster.repo / ".torchxconfig")

    def workdir(self, name: str) -> Path:
        """A fresh directory for one job (its cwd and log dir), visible to every node."""
        d = self.out_dir / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    @staticmethod
    def free_port() -> int:
        """A free TCP port, e.g. for ``dist.ddp --rdzv_port``: every virtual node is 127.0.0.1, so two
        concurrent multi-node jobs with the default 29500 would meet in one rendezvous store."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def sh(self, *cmd: str, cwd: Path | None = None, timeout: float = 60, env: dict | None = None):
        return subprocess.run(
            list(cmd),
            cwd=cwd,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def torchx(self, *args: str, cwd: Path, timeout: float = 120, config: Path | None = None):
        """Run the venv's ``torchx`` CLI; ``config``: a .torchxconfig to use instead of none."""
        env = dict(self.env, TORCHXCONFIG=str(config)) if config else self.env
        return self.sh(str(Path(sys.prefix) / "bin" / "torchx"), *args, cwd=cwd, timeout=timeout, env=env)

    def torchx_run(
        self, *component_args: str, cwd: Path, timeout: float = 300, config: Path | None = None
    ) -> TorchxRun:
        """``torchx run -s slurm --wait COMPONENT_ARGS...`` in ``cwd``."""
        t0 = time.monotonic()
        try:
            proc = self.torchx(
                "run", "-s", "slurm", "--wait", *component_args, cwd=cwd, timeout=timeout, config=config
            )
        except subprocess.TimeoutExpired as e:
            # Don't leave the job running on the shared cluster.
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
            if m := HANDLE_RE.search(out):
                self.sh("scancel", m.group(1))
            pytest.fail(f"torchx run {' '.join(component_args)}: no result in {timeout}s (cancelled)\n{out}")
        m = HANDLE_RE.search(proc.stdout)
        finished = FINISHED_RE.findall(proc.stderr)
        seconds = time.monotonic() - t0
        outcome = finished[-1] if finished else f"exit {proc.returncode}"
        _TIMINGS.append(f"{seconds:6.1f}s  torchx run {' '.join(component_args)} -> {outcome}")
        return TorchxRun(
            cluster=self,
            cwd=cwd,
            proc=proc,
            handle=m.group(0) if m else None,
            app_id=m.group(1) if m else None,
            state=finished[-1] if finished else None,
            seconds=seconds,
        )


def _cluster_answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["scontrol", "ping"], env=env, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.fail(
            "the cluster tests start munged, MariaDB and Slurm daemons and need root "
            "(.ci/run runs them as root); run `make test` for the rest",
            pytrace=False,
        )
    env = dict(os.environ)
    # Jobs inherit the submitting environment: dist.ddp runs `torchrun` by name.
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONUNBUFFERED"] = "1"

    was_running = _cluster_answers(env)
    t0 = time.monotonic()
    try:
        up = subprocess.run([str(UP)], capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"slurm_up.sh timed out after 600s\n{e.stdout or ''}\n{e.stderr or ''}", pytrace=False)
    up_seconds = time.monotonic() - t0
    if up.returncode != 0:
        pytest.fail(f"slurm_up.sh failed ({up.returncode}):\n{up.stdout}\n{up.stderr}", pytrace=False)
    _TIMINGS.append(f"{up_seconds:6.1f}s  slurm_up.sh: {up.stdout.strip().splitlines()[-1]}")

    root = Path(os.environ.get("RECAP_SLURM_TEST_OUT", "/tmp/recap-slurm-tests"))
    root.mkdir(parents=True, exist_ok=True)
    out_dir = root / time.strftime(f"session-%Y%m%d-%H%M%S-{os.getpid()}")
    out_dir.mkdir()
    empty_config = out_dir / "torchxconfig.empty"
    empty_config.write_text("")
    env["TORCHXCONFIG"] = str(empty_config)  # neither $HOME's nor the cwd's .torchxconfig

    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %P"], capture_output=True, text=True, timeout=30)
    rows = [line.split() for line in sinfo.stdout.splitlines() if line.strip()]
    cluster = SlurmCluster(
        env=env,
        out_dir=out_dir,
        partition=next(p.rstrip("*") for _, p in rows if p.endswith("*")),
        nodes=sorted({n for n, _ in rows}),
        up_seconds=up_seconds,
    )
    yield cluster

    keep = os.environ.get("RECAP_SLURM_KEEP")
    if keep == "1" or (keep is None and was_running):
        return
    down = subprocess.run([str(DOWN)], capture_output=True, text=True, timeout=300, check=False)
    assert down.returncode == 0, f"slurm_down.sh failed:\n{down.stdout}\n{down.stderr}"
    _TIMINGS.append(f"        slurm_down.sh: {down.stdout.strip().splitlines()[-1]}")


def pytest_terminal_summary(terminalreporter):
    if _TIMINGS:
        terminalreporter.section("cluster timings")
        for line in _TIMINGS:
            terminalreporter.write_line(line)
