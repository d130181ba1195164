"""The non-finite guard (recap_app/nonfinite.py): a NaN / inf loss never reaches a checkpoint, an embedding
log or an export. Real 2-rank torchrun runs of the `local` config on small generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
from e2e_lib import run, torchrun

from recap_app.checkpoint import list_steps
from recap_app.config import load_config
from recap_app.data import Layout, weight_column
from recap_app.export import load_unsharded
from recap_app.export import main as export_main
from recap_app.ranker import RecapRanker
from recap_app.synthetic_data import write_synthetic_dataset

QUIET = ["training.log_every_n=2", "eval.every_n=0", "eval.num_batches=1", "data.global_batch_size=128"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Good generated data, and the same with every weight of one row group (of 8) set to 3e38: finite,
    valid input, but its loss overflows to inf (a NaN / inf label is refused at decode, see test_data)."""
    root = tmp_path_factory.mktemp("nonfinite-data")
    config = load_config("local", [])
    write_synthetic_dataset(f"{root}/good", config, 4096, num_files=2, rows_per_group=512, seed=1)
    write_synthetic_dataset(f"{root}/eval", config, 512, num_files=1, rows_per_group=128, seed=2)
    write_synthetic_dataset(f"{root}/bad", config, 4096, num_files=2, rows_per_group=512, seed=1)
    table = pq.read_table(f"{root}/bad/part-00000.parquet")
    for task in Layout.of(config).tasks:
        column = weight_column(task)
        weights = table.column(column).to_numpy().copy()
        weights[:512] = 3e38
        table = table.set_column(table.schema.get_field_index(column), column, [weights])
    pq.write_table(table, f"{root}/bad/part-00000.parquet", row_group_size=512)
    return {"good": f"{root}/good", "bad": f"{root}/bad", "eval": f"{root}/eval"}


def _train(out: Path, *overrides: str, check: bool = False):
    cmd = torchrun(2, "-m", "recap_app.train", "--output", str(out), *QUIET, *overrides)
    return run(cmd, timeout=240, check=check)


def _finite(url: str) -> bool:
    weights = load_unsharded(load_config("local", []), url).state_dict()
    return all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())


def test_huge_learning_rate_fails_and_writes_nothing_nonfinite(tmp_path, data):
    """lr=1e30: the loss is NaN from step 2. The job exits non-zero naming the step and the batch; the
    step-1 checkpoint and embedding log (finite) are the last ones written."""
    out = tmp_path / "run"
    res = _train(
        out, "optimizer.dense.learning_rate=1e30", "training.num_train_steps=10", "checkpoint.every_n=1",
        "embedding_log.every_n=1", "training.log_every_n=1", f"data.train_url={data['good']}",
        f"data.eval_url={data['eval']}",
    )  # fmt: skip
    assert res.returncode != 0, res.tail()
    assert "recap: error: step 2: non-finite loss for task(s) ['recap.engagement.is_favorited'" in res.output
    assert "nothing after step 1 was saved" in res.output
    assert "Traceback" not in res.output.split("recap: error:")[0][-2000:]
    assert list_steps(str(out / "checkpoints")) == ([1], [])
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["step-1"]
    assert _finite(str(out / "checkpoints/step-1"))
    losses = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1]  # step 1 logged, no record of the NaN step


def test_overflowing_batch_fail_names_the_file(tmp_path, data):
    res = _train(
        tmp_path / "run", "training.num_train_steps=40", f"data.train_url={data['bad']}",
        f"data.eval_url={data['eval']}",
    )  # fmt: skip
    assert res.returncode != 0, res.tail()
    assert "non-finite loss for task(s)" in res.output, res.tail()
    assert "bad/part-00000.parquet row group 0" in res.output.split("recap: error:")[1], res.tail()


def test_skip_policy_skips_those_batches_and_finishes(tmp_path, data):
    """training.on_nonfinite=skip: the overflowing batches' updates are left out (backward, optimizer and
    batch-norm statistics), counted in metrics.jsonl, and the run ends with finite checkpoints."""
    out = tmp_path / "run"
    _train(
        out, "training.num_train_steps=40", "checkpoint.every_n=20", "training.on_nonfinite=skip",
        "data.global_batch_size=256",
        f"data.train_url={data['bad']}", f"data.eval_url={data['eval']}", check=True,
    )  # fmt: skip
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "nonfinite_skipped" in r]
    skipped = train[-1]["nonfinite_skipped"]
    assert 0 < skipped < 40, train
    # a window (2 steps) with a trained step logs its finite mean; a window all skipped logs null (NaN)
    previous = 0
    for r in train:
        all_skipped = r["nonfinite_skipped"] - previous == 2
        assert (r["loss"] is None) == all_skipped, train
        previous = r["nonfinite_skipped"]
    assert list_steps(str(out / "checkpoints"))[0] == [20, 40]
    assert _finite(str(out / "checkpoints/step-40"))


def test_export_refuses_nonfinite_weights(tmp_path):
    config = load_config("local", [])
    ranker = RecapRanker(config.model, config.data.num_continuous, config.data.num_binary)
    state = ranker.state_dict()
    next(t for t in state.values() if t.is_floating_point()).fill_(float("nan"))
    dcp.save({"model": state}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    with pytest.raises(SystemExit) as err:
        export_main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "model.pt")])
    assert str(err.value.code).startswith(f"recap: error: checkpoint {tmp_path / 'ckpt'} holds NaN / inf")
    assert not (tmp_path / "model.pt").exists()
