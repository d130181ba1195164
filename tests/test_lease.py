"""Output ownership (recap_app/lease.py) and the run record (recap_app/run_record.py).

The lease's rank-0 logic on every storage backend (real emulators), then real `recap train` processes:
two runs on one output, a rerun after kill -9, a stale and a live foreign lease, force_lease.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from e2e_lib import run, wait_for

from recap_app.lease import LEASE_FILE, OutputLease
from recap_app.run_record import read_run_record
from recap_app.storage import exists, join, write

RECAP = [sys.executable, "-m", "recap_app.cli", "train"]
SMALL = ["training.log_every_n=10", "eval.every_n=0", "eval.num_batches=1", "embedding_log.every_n=0"]


def test_lease_on_every_backend(storage_url):
    """One run takes the lease, a second is refused naming the owner, the first releases it, then the
    second takes it; a heartbeat rewrites it in place."""
    url = storage_url.url
    first = OutputLease(url, timeout_s=60, settle_s=0.1)
    second = OutputLease(url, timeout_s=60, settle_s=0.1)
    assert first.try_take() is None
    held = first.read()
    assert held["token"] == first.token and held["pid"] == os.getpid()
    refusal = second.try_take()
    assert refusal is not None and "is in use by another run" in refusal and f"pid {os.getpid()}" in refusal
    first.start_heartbeat()  # the thread exists, so release() deletes the lease
    first.release()
    assert not exists(join(url, LEASE_FILE))
    assert second.try_take() is None
    assert second.read()["token"] == second.token


def _foreign_lease(out: Path, heartbeat_age_s: float) -> None:
    now = time.time()
    lease = {
        "token": "someone-else", "host": "other-host", "pid": 1, "job_id": "slurm-77",
        "started": "2026-01-01T00:00:00Z", "started_unix": now - 4000,
        "heartbeat_unix": now - heartbeat_age_s,
    }  # fmt: skip
    write(join(str(out), LEASE_FILE), json.dumps(lease))


def test_live_foreign_lease_refuses_stale_one_is_taken_force_overrides(tmp_path):
    out = tmp_path / "run"
    _foreign_lease(out, heartbeat_age_s=5)
    res = run([*RECAP, "--output", out, "training.num_train_steps=2", *SMALL], check=False, timeout=120)
    assert res.returncode == 1, res.tail()
    line = next(x for x in res.output.splitlines() if x.startswith("recap: error:"))
    assert "in use by another run: host other-host pid 1, job slurm-77" in line, line
    assert "training.force_lease=true" in line
    assert not (out / "checkpoints").exists()  # refused before writing anything

    res = run([*RECAP, "--output", out, "training.num_train_steps=2", *SMALL, "training.force_lease=true"])
    assert "taking over the lease" in res.output and "(training.force_lease=true)" in res.output

    _foreign_lease(out, heartbeat_age_s=400)  # older than the default lease_timeout_s=300
    res = run([*RECAP, "--output", out, "training.num_train_steps=4", *SMALL])
    assert "taking over the lease" in res.output, res.tail()
    assert re.search(r"\(no heartbeat for 4\d\ds\)", res.output), res.tail()
    assert not (out / LEASE_FILE).exists()  # released at the end

    records = read_run_record(str(out))
    assert [(r["start_step"], r["resumed"]) for r in records] == [(0, False), (2, True)]
    for r in records:
        assert r["world_size"] == 1 and r["per_rank_batch_size"] == r["global_batch_size"] == 256
        assert r["versions"]["torch"].startswith("2.") and r["versions"]["torchrec"]
        assert r["config"]["training"]["save_dir"] == str(out)


def _start(out: Path, log: Path, steps: int) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [*RECAP, "--output", str(out), f"training.num_train_steps={steps}", "checkpoint.every_n=50",
             *SMALL],
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def test_concurrent_runs_second_refuses_first_completes(tmp_path):
    out = tmp_path / "run"
    first = _start(out, tmp_path / "first.log", steps=300)
    try:
        wait_for("the first run's lease", (out / LEASE_FILE).exists, first)
        res = run([*RECAP, "--output", out, "training.num_train_steps=300", *SMALL], check=False, timeout=120)
        assert res.returncode == 1 and "is in use by another run" in res.output, res.tail()
        assert f"pid {first.pid}" in res.output
        assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert "step 300/300" in (tmp_path / "first.log").read_text()
    assert not (out / LEASE_FILE).exists()
    assert len(read_run_record(str(out))) == 1  # the refused run recorded nothing


def test_rerun_after_kill_9_takes_its_lease_back(tmp_path):
    out = tmp_path / "run"
    first = _start(out, tmp_path / "first.log", steps=5000)
    try:
        wait_for("a checkpoint", lambda: (out / "checkpoints/step-50/.metadata").exists(), first, timeout=150)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert json.loads((out / LEASE_FILE).read_text())["pid"] == first.pid  # left behind by the kill
    res = run([*RECAP, "--output", out, "training.num_train_steps=60", "checkpoint.every_n=50", *SMALL])
    assert "taking over the lease" in res.output and f"pid {first.pid}" in res.output, res.tail()
    assert "resumed from" in res.output and "step 60/60" in res.output
    assert not (out / LEASE_FILE).exists()
