"""Resume on another world size keeps the data position exact: `-j 1x2` -> `-j 1x4` -> `-j 1x1` (global
batch 256 each time, so per-rank batches 128, 64, 256) trains every example of the epoch exactly once.

Real torchrun runs of tests/fault_injection.py (recap train with a callback that records, on every rank,
the examples each step trained on)."""

from __future__ import annotations

from pathlib import Path

from e2e_lib import run, torchrun

from recap_app.config import load_config
from recap_app.synthetic_data import write_synthetic_dataset

MAIN = str(Path(__file__).with_name("fault_injection.py"))
SMALL = ["training.log_every_n=1", "eval.every_n=0", "eval.num_batches=1", "embedding_log.every_n=0"]


def test_resume_on_2_then_4_then_1_ranks_trains_every_example_once(tmp_path):
    rows = 4096  # 16 steps of 256 per epoch
    data = tmp_path / "data"
    config = load_config("local", [])
    write_synthetic_dataset(str(data / "train"), config, rows, num_files=3, rows_per_group=300, seed=3)
    write_synthetic_dataset(str(data / "eval"), config, 512, num_files=1, rows_per_group=64, seed=4)
    record = tmp_path / "rows"
    record.mkdir()
    out = str(tmp_path / "run")
    common = [
        "--output", out, f"data.train_url={data}/train", f"data.eval_url={data}/eval",
        "checkpoint.every_n=1", *SMALL,
    ]  # fmt: skip
    env = {"RECORD_ROWS_DIR": str(record), "PYTHONPATH": str(Path(MAIN).parent)}
    logs = []
    for nproc, steps in ((2, 5), (4, 9), (1, 16)):
        res = run(torchrun(nproc, MAIN, *common, f"training.num_train_steps={steps}"), env=env, timeout=300)
        logs.append(res.output)
    assert (
        "resuming with world size 4 and per-rank batch 64 (saved with 2 and 128): 2816 rows of epoch 0"
        in logs[1]
    )
    assert (
        "resuming with world size 1 and per-rank batch 256 (saved with 4 and 64): 1792 rows of epoch 0"
        in logs[2]
    )
    seen = [line for f in sorted(record.iterdir()) for line in f.read_text().splitlines()]
    assert len(seen) == rows, len(seen)
    assert len(set(seen)) == rows  # every example of the epoch, each exactly once
    runs = (Path(out) / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 3
