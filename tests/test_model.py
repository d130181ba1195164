"""model.py single-process: ModelAndLoss, maybe_shard_model without a process group, the table log."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from recap_testlib import NUM_BINARY, NUM_CONTINUOUS, TASKS, make_examples, tiny_model_config
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan

from recap_app.config import EmbeddingLogConfig
from recap_app.embedding_logger import EmbeddingLogger
from recap_app.logs import setup_logging
from recap_app.loss import build_multi_task_loss
from recap_app.model import (
    CpuRowWiseEmbeddingBagCollectionSharder,
    ModelAndLoss,
    embedding_weights,
    format_plan,
    load_embedding_table,
    log_sharded_tensor_content,
    maybe_shard_model,
)
from recap_app.ranker import RecapRanker

pytestmark = pytest.mark.timeout(60)


class Toy(torch.nn.Module):
    """logits = continuous @ W (one column per task), plus an extra output."""

    def __init__(self, logits_key: str = "logits") -> None:
        super().__init__()
        self.linear = torch.nn.Linear(NUM_CONTINUOUS, len(TASKS))
        self.logits_key = logits_key

    def forward(self, batch):
        logits = self.linear(batch.continuous_features)
        return {self.logits_key: logits, "extra": logits.sum(1)}


def batch_with_int_labels():
    batch = make_examples(8).batch()
    batch.labels = batch.labels.to(torch.int64)
    return batch


def test_scalar_loss_fn():
    seen = {}

    def loss_fn(logits, labels, weights):
        seen.update(logits=logits, labels=labels, weights=weights)
        return ((torch.sigmoid(logits) - labels) ** 2 * weights).mean()

    model = ModelAndLoss(Toy(), loss_fn)
    batch = batch_with_int_labels()
    loss, outputs = model(batch)
    assert seen["labels"].dtype == torch.float32  # labels handed to the loss as float
    torch.testing.assert_close(seen["labels"], batch.labels.float())
    torch.testing.assert_close(seen["weights"], batch.weights)
    assert outputs["loss"] is loss
    assert set(outputs) == {"logits", "extra", "loss", "labels", "weights"}
    assert outputs["labels"] is batch.labels and outputs["weights"] is batch.weights
    expected = ((torch.sigmoid(outputs["logits"]) - batch.labels.float()) ** 2 * batch.weights).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.model.linear.weight.grad is not None


def test_dict_loss_fn_merges_into_outputs():
    model = ModelAndLoss(Toy(), build_multi_task_loss(TASKS, [2.0, 1.0]))
    batch = make_examples(8).batch()
    loss, outputs = model(batch)
    expected = build_multi_task_loss(TASKS, [2.0, 1.0])(outputs["logits"], batch.labels, batch.weights)
    assert set(outputs) == {"logits", "extra", "loss", "labels", "weights"} | {f"loss/{t}" for t in TASKS}
    torch.testing.assert_close(loss, expected["loss"])
    assert outputs["loss"] is loss
    for t in TASKS:
        torch.testing.assert_close(outputs[f"loss/{t}"], expected[f"loss/{t}"])
    assert loss.shape == ()


def test_model_output_without_logits_raises():
    with pytest.raises(KeyError, match="logits"):
        ModelAndLoss(Toy(logits_key="scores"), build_multi_task_loss(TASKS))(make_examples(8).batch())


def test_dict_loss_without_loss_raises():
    def loss_fn(logits, labels, weights):
        return {"loss/a": logits.mean()}

    with pytest.raises(KeyError, match="'loss'"):
        ModelAndLoss(Toy(), loss_fn)(make_examples(8).batch())


def test_model_and_loss_with_ranker_trains():
    torch.manual_seed(0)
    ranker = RecapRanker(tiny_model_config(), NUM_CONTINUOUS, NUM_BINARY)
    model = ModelAndLoss(ranker, build_multi_task_loss(TASKS))
    batch = make_examples(8).batch()
    loss, outputs = model(batch)
    assert outputs["logits"].shape == outputs["calibrated_probabilities"].shape == (8, len(TASKS))
    loss.backward()
    table = ranker.embedding_bag_collection.embedding_bags["t0"].weight
    assert table.grad is not None and table.grad.abs().sum() > 0
    assert all(p.grad is not None for p in ranker.backbone.parameters())


# ----------------------------------------------------------------------------------- maybe_shard_model
def test_maybe_shard_model_without_process_group_returns_the_same_object():
    assert not dist.is_initialized()
    model = ModelAndLoss(Toy(), build_multi_task_loss(TASKS))
    assert maybe_shard_model(model, torch.device("cpu")) is model
    assert (
        maybe_shard_model(
            model,
            torch.device("cpu"),
            sharding_constraints={"t0": ["row_wise"]},
            use_row_wise_cpu_sharder=False,
            fused_params={"learning_rate": 0.1},
            batch_size=4,
        )
        is model
    )


def test_cpu_row_wise_sharder_adds_row_wise_on_cpu_only():
    cpu = CpuRowWiseEmbeddingBagCollectionSharder().sharding_types("cpu")
    default_cpu = EmbeddingBagCollectionSharder().sharding_types("cpu")
    assert "row_wise" not in default_cpu  # why the subclass exists
    assert set(cpu) == set(default_cpu) | {"row_wise"}
    assert CpuRowWiseEmbeddingBagCollectionSharder().sharding_types("cuda") == (
        EmbeddingBagCollectionSharder().sharding_types("cuda")
    )


def test_format_plan_lists_every_table():
    plan = ShardingPlan(
        {
            "model.embedding_bag_collection": EmbeddingModuleShardingPlan(
                {
                    "t1": ParameterSharding(sharding_type="table_wise", compute_kernel="fused", ranks=[1]),
                    "t0": ParameterSharding(
                        sharding_type="data_parallel", compute_kernel="dense", ranks=[0, 1]
                    ),
                }
            )
        }
    )
    text = format_plan(plan)
    assert text.splitlines() == [
        "sharding plan:",
        "  model.embedding_bag_collection.t0: data_parallel / dense on ranks [0, 1]",
        "  model.embedding_bag_collection.t1: table_wise / fused on ranks [1]",
    ]


# ------------------------------------------------------------------------------ embedding table log
def test_embedding_weights_of_unsharded_model():
    torch.manual_seed(0)
    model = ModelAndLoss(
        RecapRanker(tiny_model_config(), NUM_CONTINUOUS, NUM_BINARY), build_multi_task_loss(TASKS)
    )
    found = {table: (name, tuple(t.shape)) for name, table, t in embedding_weights(model)}
    assert found == {
        "t0": ("model.embedding_bag_collection.embedding_bags.t0.weight", (20, 8)),
        "t1": ("model.embedding_bag_collection.embedding_bags.t1.weight", (30, 8)),
    }


def test_embedding_logger_writes_selected_tables_and_keeps_the_latest_k(tmp_path: Path):
    """Dumps at steps 10..50 with keep_latest_k=2 leave step-40 and step-50; an empty table selection
    writes nothing and claims nothing; the log is one INFO line per table plus one per dump."""
    model = ModelAndLoss(
        RecapRanker(tiny_model_config(), NUM_CONTINUOUS, NUM_BINARY), build_multi_task_loss(TASKS)
    )
    root = tmp_path / "embeddings"
    emb = EmbeddingLogger(EmbeddingLogConfig(every_n=10, tables=["t1"], keep_latest_k=2), str(root))
    setup_logging()  # before adding a handler: it sets up the logger only while it has none
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("recap").addHandler(handler)
    try:
        for step in range(10, 60, 10):
            assert emb.maybe_log(model, step) == str(root / f"step-{step}")
            emb.join_purger()
        assert emb.maybe_log(model, 55) is None  # not a logging step
    finally:
        logging.getLogger("recap").removeHandler(handler)
    assert sorted(p.name for p in root.iterdir()) == ["step-40", "step-50"]
    assert [p.name for p in (root / "step-50").iterdir()] == ["t1.npy"]
    info = [r.getMessage() for r in records if r.levelno >= logging.INFO and "step 50" in r.getMessage()]
    assert info == [f"step 50: 1 embedding table(s) written to {root}/step-50"]
    per_table = [r.getMessage() for r in records if r.getMessage().startswith("embedding t1")]
    assert len(per_table) == 5 and per_table[-1].endswith(f"-> {root}/step-50/t1.npy")
    assert emb.purge() == []  # nothing left to delete

    none = EmbeddingLogger(EmbeddingLogConfig(tables=[]), str(tmp_path / "none"))
    assert none.maybe_log(model, 7, last_step=True) is None
    assert not (tmp_path / "none").exists()


def test_log_plain_tensor_returns_a_detached_copy():
    weight = torch.nn.Parameter(torch.randn(5, 3))
    full = log_sharded_tensor_content("w", "table", weight)
    assert torch.equal(full, weight.detach())
    assert not full.requires_grad
    full.add_(1.0)  # a copy: the model's table is untouched
    assert not torch.equal(full, weight.detach())


@pytest.mark.parametrize("style", ["file_url", "plain_path", "memory"])
def test_log_writes_and_loads_back(tmp_path: Path, style: str):
    weight = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 7
    url = {
        "file_url": f"file://{tmp_path}/emb/step-3",
        "plain_path": str(tmp_path / "emb" / "step-3"),
        "memory": f"memory://test-model-{tmp_path.name}/emb",
    }[style]
    full = log_sharded_tensor_content("w", "user", weight, output_url=url)
    assert torch.equal(full, weight)
    if style != "memory":
        written = tmp_path / "emb" / "step-3" / "user.npy"
        assert written.is_file()
        np.testing.assert_array_equal(np.load(written), weight.numpy())
    loaded = load_embedding_table(url, "user")
    assert loaded.dtype == torch.float32 and torch.equal(loaded, weight)
    # A trailing slash on the URL names the same file.
    assert torch.equal(load_embedding_table(url + "/", "user"), weight)


def test_load_by_run_and_step_and_with_numpy_alone(tmp_path: Path):
    """What load_embedding_table's docstring promises: a run URL + step, and the file read by NumPy alone
    (plainly, and through fsspec as for an object store)."""
    import fsspec

    weight = torch.randn(7, 3)
    log_sharded_tensor_content("w", "user", weight, output_url=f"{tmp_path}/run/embeddings/step-40")
    assert torch.equal(load_embedding_table(f"file://{tmp_path}/run", "user", step=40), weight)
    np.testing.assert_array_equal(np.load(tmp_path / "run/embeddings/step-40/user.npy"), weight.numpy())
    with fsspec.open(f"file://{tmp_path}/run/embeddings/step-40/user.npy", "rb") as f:
        np.testing.assert_array_equal(np.load(f), weight.numpy())


def test_log_without_output_url_writes_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log_sharded_tensor_content("w", "user", torch.ones(2, 2))
    assert list(tmp_path.iterdir()) == []


def test_load_missing_table_raises(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_embedding_table(str(tmp_path), "nope")
