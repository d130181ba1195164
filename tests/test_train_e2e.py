"""End to end: `torchx run -s local_cwd recap.train -j 1x2` from any directory, then a resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from recap_app.config import load_config
from recap_app.summary import summarize

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
FAST = ["training.log_every_n=5", "eval.every_n=0", "eval.num_batches=2"]


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{log[-6000:]}"
    return log


def _torchx_train(output: Path, cwd: Path, *overrides: str) -> str:
    cmd = ["torchx", "run", "-s", "local_cwd", "recap.train", "-j", "1x2", "--output", str(output), "--"]
    return _run([*cmd, *overrides, *FAST], cwd)


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _readme_metrics_keys(tasks: list[str]) -> tuple[set[str], set[str]]:
    """The keys of the README's two metrics.jsonl tables (training, eval), `<task>` expanded."""
    section = (REPO / "README.md").read_text().split("## metrics.jsonl", 1)[1].split("\n## ", 1)[0]
    tables = re.findall(r"\| key \| meaning \|\n\|---\|---\|\n((?:\|.*\n)+)", section)
    assert len(tables) == 2, section
    keys = []
    for table in tables:
        names = re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE)
        keys.append({n.replace("<task>", t) for n in names for t in tasks})
    return keys[0], keys[1]


def test_torchx_local_two_ranks_then_resume(tmp_path: Path) -> None:
    anywhere = tmp_path / "elsewhere"  # not the repo: no .torchxconfig, no package source beside it
    anywhere.mkdir()
    out = tmp_path / "run"
    log = _torchx_train(out, anywhere, "training.num_train_steps=20", "checkpoint.every_n=10")
    assert "sharding plan" in log
    for step in (10, 20):
        assert (out / f"checkpoints/step-{step}/.metadata").exists()
        assert sorted(p.name for p in (out / f"checkpoints/step-{step}").glob("*.distcp")) == [
            "__0_0.distcp",
            "__1_0.distcp",
        ]  # one data file per rank
    tables = sorted(p.name for p in (out / "embeddings/step-20").iterdir())
    assert tables == ["author.npy", "user.npy"]
    assert np.load(out / "embeddings/step-20/user.npy").shape == (2000, 16)
    steps = [r["step"] for r in _metrics(out) if "loss" in r]
    assert steps == [5, 10, 15, 20]
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())

    log = _torchx_train(out, anywhere, "training.num_train_steps=30", "checkpoint.every_n=10")
    assert "at step 20" in log and "resumed from" in log
    records = _metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
    tasks = sorted(load_config("local").model.tasks)
    train_keys, eval_keys = _readme_metrics_keys(tasks)  # the README documents exactly these
    assert [set(r) for r in records if "loss" in r] == [train_keys] * 6
    assert [set(r) for r in records if "eval/loss" in r] == [eval_keys] * 2
    final_eval = [r for r in records if "eval/loss" in r]
    assert final_eval and final_eval[-1]["step"] == 30
    assert 0.0 <= final_eval[-1]["eval/auroc/recap.engagement.is_favorited"] <= 1.0
    assert (out / "checkpoints/step-30/.metadata").exists()
    text = summarize(str(out))  # what `make train` prints at the end
    assert "complete steps [10, 20, 30]" in text
    assert "embeddings/step-30/: author.npy, user.npy" in text
    assert "last eval (step 30" in text and "recap.engagement.is_favorited: AUROC" in text


def test_single_process_without_torchrun(tmp_path: Path) -> None:
    """`recap train` alone forms a one-rank group: same sharded path, same checkpoint layout."""
    out = tmp_path / "single"
    log = _run(
        [str(VENV_BIN / "recap"), "train", "--output", str(out), "training.num_train_steps=10", *FAST],
        tmp_path,
    )
    assert "rank 0/1" in log
    assert log.index("recap train: output") < log.index("rank 0/1")  # said before torch's import
    assert "train: 65536 examples" in log and "/data/train/part-00003.parquet: 16384 rows" in log  # progress
    assert (out / "checkpoints/step-10/.metadata").exists()
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [5, 10]


def test_evaluate_scores_every_example_once_on_any_world_size(tmp_path: Path) -> None:
    """`recap evaluate` without --num-batches: one pass over the whole eval set. Three ranks get unequal
    shares (padded to equal batches for the sharded model) and report what one process reports. Training
    on 3 ranks, whose global batch must divide, says so in one `recap: error:` line (rank 0's)."""
    out = tmp_path / "run"
    _run(
        [str(VENV_BIN / "recap"), "train", "--output", str(out), "training.num_train_steps=10", *FAST],
        tmp_path,
    )
    eval_url = out / "data" / "eval"
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in eval_url.rglob("*.parquet"))
    reports = {}
    for nproc in (1, 3):  # 3 does not divide data.global_batch_size=256: each rank scores batches of 86
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        args = ["--checkpoint", str(out), "--data", str(eval_url), "--output", str(tmp_path / f"ev{nproc}")]
        _run([*cmd, "-m", "recap_app.evaluate", *args], tmp_path)
        reports[nproc] = json.loads((tmp_path / f"ev{nproc}" / "eval_metrics.json").read_text())
    one, three = reports[1], reports[3]
    assert one["examples"] == three["examples"] == rows
    for key, value in one.items():
        if key.startswith(("auroc/", "rce/", "pos_rate/")) or key == "loss":
            assert abs(three[key] - value) < 1e-4, (key, value, three[key])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"]
    env = {**os.environ, "LOGLEVEL": "WARNING"}
    train3 = [*cmd, "-m", "recap_app.train", "--output", str(tmp_path / "x3"), "training.num_train_steps=2"]
    proc = subprocess.run(train3, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("recap: error:")]
    assert errors == ["recap: error: data.global_batch_size=256 must be divisible by the world size 3"], (
        proc.stderr[-3000:]
    )
