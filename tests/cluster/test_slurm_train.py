"""`torchx run -s slurm recap.train` on the real Slurm cluster: the same command as locally."""

import json
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
