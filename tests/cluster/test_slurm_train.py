"""`torchx run -s slurm recap.train` on the real Slurm cluster: the same command as locally."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.cluster

TINY = [
    "training.num_train_steps=20",
    "checkpoint.every_n=10",
    "training.log_every_n=5",
    "eval.every_n=0",
    "eval.num_batches=2",
]


def _train(cluster, j: str, wd: Path, output: Path, *overrides: str):
    return cluster.torchx_run(
        "recap.train", "-j", j, "--cpu", "1", "--memMB", "2048",
        "--rdzv_port", str(cluster.free_port()), "--output", str(output), "--", *overrides,
        cwd=wd, timeout=420,
    )  # fmt: skip


@pytest.mark.timeout(900)
@pytest.mark.parametrize("j", ["1x2", "2x1"])
def test_recap_train_on_slurm(slurm_cluster, j):
    wd = slurm_cluster.workdir(f"recap-train-{j}")
    output = wd / "run"  # on the filesystem every (virtual) node shares
    run = _train(slurm_cluster, j, wd, output, *TINY)
    assert run.proc.returncode == 0 and run.state == "SUCCEEDED", run.diagnose()

    for step in (10, 20):
        assert (output / f"checkpoints/step-{step}/.metadata").exists(), run.diagnose()
    assert len(list((output / "checkpoints/step-20").glob("*.distcp"))) == 2  # world size 2 either way
    assert sorted(p.name for p in (output / "embeddings/step-20").iterdir()) == ["author.npy", "user.npy"]
    assert np.load(output / "embeddings/step-20/user.npy").shape == (2000, 16)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20]
    assert records[-1]["step"] == 20 and "eval/auroc/recap.engagement.is_favorited" in records[-1]

    status = slurm_cluster.torchx("status", run.handle, cwd=wd)
    assert status.returncode == 0 and "State: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    log = slurm_cluster.torchx("log", "--streams", "stderr", run.handle, cwd=wd, timeout=60)
    assert log.returncode == 0, log.stderr
    assert "step 20/20 (100%)" in log.stdout and "rank 0/2" in log.stdout, log.stdout[-3000:]
    if j == "2x1":  # the same output resumes from its newest checkpoint on another submission
        again = _train(slurm_cluster, j, wd, output, *TINY, "training.num_train_steps=30")
        assert again.state == "SUCCEEDED", again.diagnose()
        assert (output / "checkpoints/step-30/.metadata").exists()
        log = slurm_cluster.torchx("log", "--streams", "stderr", again.handle, cwd=wd, timeout=60)
        assert "at step 20" in log.stdout, log.stdout[-3000:]


@pytest.mark.timeout(900)
def test_scancel_signal_term_saves_the_step_and_the_requeue_resumes(slurm_cluster):
    """`scancel --signal=TERM` (what a preemption or the time limit's --signal sends) mid-run, with
    `--max_retries 1`: the ranks save the step they reached and exit 143, TorchX's batch script requeues
    the job, and the requeued job resumes at that step by itself and ends SUCCEEDED."""
    wd = slurm_cluster.workdir("recap-train-preempted")
    output = wd / "run"
    steps = ["training.num_train_steps=600", "checkpoint.every_n=1000", "training.log_every_n=20",
             "eval.every_n=0", "eval.num_batches=2", "embedding_log.every_n=0"]  # fmt: skip
    done: dict = {}
    steps_at = ["--max_retries", "1"]  # a component option: before `--`
    thread = threading.Thread(
        target=lambda: done.update(
            run=slurm_cluster.torchx_run(
                "recap.train", "-j", "1x2", "--cpu", "1", "--memMB", "2048", *steps_at,
                "--rdzv_port", str(slurm_cluster.free_port()), "--output", str(output), "--", *steps,
                cwd=wd, timeout=600,
            )
        )
    )  # fmt: skip
    thread.start()
    deadline = time.monotonic() + 300
    while not _metric_steps(output) or max(_metric_steps(output)) < 60:
        assert thread.is_alive() and time.monotonic() < deadline, done.get("run") and done["run"].diagnose()
        time.sleep(0.5)
    (job_id,) = {line.split("+")[0] for line in slurm_cluster.sh("squeue", "-h", "-o", "%i").stdout.split()}
    signalled = slurm_cluster.sh("scancel", "--signal=TERM", job_id)
    assert signalled.returncode == 0, signalled.stderr
    thread.join(timeout=600)
    run = done["run"]
    assert run.state == "SUCCEEDED", run.diagnose()
    starts = [json.loads(line) for line in (output / "runs.jsonl").read_text().splitlines()]
    assert [s["resumed"] for s in starts] == [False, True], starts
    stopped = starts[1]["start_step"]
    assert stopped >= 60  # the step reached when the signal came, saved then: nothing lost
    assert (output / f"checkpoints/step-{stopped}/.metadata").exists()
    assert (output / "checkpoints/step-600/.metadata").exists()
    status = slurm_cluster.torchx("status", run.handle, cwd=wd)
    assert "Num Restarts: 1" in status.stdout, status.stdout


def _metric_steps(output: Path) -> list[int]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
