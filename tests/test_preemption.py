"""Preemption and liveness with real processes (recap_app/preemption.py, recap_app/launch.py):

- SIGTERM to the torchrun agent of a `torchx run -s local_cwd recap.train -j 1x2`, as Kubernetes or Slurm
  would send it: every rank stops at one agreed step, a checkpoint of that step is saved, the job exits
  143 with one line and no traceback from recap; a rerun resumes at that step (nothing lost).
- SIGSTOP of rank 1 with training.collective_timeout_s=20: the job fails within 60 s naming the step and
  the stopped rank.
- The Slurm and Kubernetes submissions ask for the signal / grace period (dry runs).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from e2e_lib import run, wait_for

from recap_app.checkpoint import list_steps
from recap_app.slurm_compat import create_scheduler
from torchx_components import recap

VENV_BIN = Path(sys.executable).parent
LAUNCH = [
    sys.executable,
    "-m",
    "recap_app.launch",
    "--standalone",
    "--nproc_per_node",
    "2",
    "-m",
    "recap_app.train",
]
SMALL = ["training.log_every_n=20", "eval.every_n=0", "eval.num_batches=1", "embedding_log.every_n=0"]


def _pids(marker: str, module: str) -> list[int]:
    """Processes whose command line holds `marker` (a test's tmp path) and `module`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and module in cmd and "torchx" not in cmd.split(" ", 2)[1]:
                found.append(int(proc.name))
    return found


def _env_rank(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def test_sigterm_saves_the_step_reached_and_rerun_resumes_there(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "torchx.log"
    cmd = [
        str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", "recap.train", "-j", "1x2", "--output", str(out),
        "--", "training.num_train_steps=100000", "checkpoint.every_n=1000", *SMALL,
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "wb") as f:
        job = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for("step 40", lambda: "step 40/100000" in log.read_text(), job, log)
        (agent,) = _pids(str(out), "recap_app.launch")
        os.kill(agent, signal.SIGTERM)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    stopped = re.findall(r"SIGTERM received: stopped at step (\d+), checkpoint step-\1 saved in", text)
    assert len(stopped) == 1, text[-4000:]  # rank 0 speaks
    step = int(stopped[0])
    assert step >= 40 and "exiting with status 143" in text
    assert "recap: torchrun stopped by SIGTERM" in text
    assert "Traceback" not in text and "SignalException" not in text, text[-4000:]
    assert job.returncode != 0
    assert list_steps(str(out / "checkpoints")) == ([step], [])
    res = run(
        [*LAUNCH, "--output", str(out), f"training.num_train_steps={step + 5}", *SMALL],
        timeout=180,
    )  # fmt: skip
    assert f"resumed from {out}/checkpoints/step-{step} at step {step}" in res.output
    assert f"step {step + 5}/{step + 5}" in res.output


def test_stopped_rank_fails_the_job_in_bounded_time_naming_it(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "train.log"
    cmd = [
        *LAUNCH, "--output", str(out), "training.num_train_steps=100000", "training.collective_timeout_s=20",
        *SMALL,
    ]  # fmt: skip
    with open(log, "wb") as f:
        job = subprocess.Popen(cmd, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("step 40", lambda: "step 40/100000" in log.read_text(), job, log)
        workers = [p for p in _pids(str(out), "recap_app.train") if _env_rank(p) is not None]
        (rank1,) = [p for p in workers if _env_rank(p) == 1]
        os.kill(rank1, signal.SIGSTOP)
        stopped_at = time.monotonic()
        job.wait(timeout=90)
        took = time.monotonic() - stopped_at
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    assert job.returncode != 0
    assert took < 60, (took, text[-3000:])
    line = next(x for x in text.splitlines() if "recap: error: step" in x)
    assert "a collective did not complete within training.collective_timeout_s=20s" in line, line
    assert re.search(r"rank\(s\) \[1\] sent no heartbeat for \d+s or more \(stopped or gone\)", line), line


def test_slurm_jobs_are_signalled_ahead_of_their_time_limit():
    app = recap.train(output="/tmp/out", j="2x1")
    script = str(create_scheduler("t").submit_dryrun(app, {}))
    assert script.count("--signal=TERM@120") == 2  # each replica group
    script = str(create_scheduler("t").submit_dryrun(app, {"signal": "TERM@600"}))
    assert script.count("--signal=TERM@600") == 2
    assert "--signal" not in str(create_scheduler("t").submit_dryrun(app, {"signal": ""}))
