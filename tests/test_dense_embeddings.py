"""TwHIN-style dense embedding inputs: Parquet columns -> batch -> layer norm -> the ranker's features."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recap_app import data, synthetic_data
from recap_app.config import ConfigError, load_config
from recap_app.ranker import RecapRanker

pytestmark = pytest.mark.timeout(120)
TWHIN = "model.dense_embeddings={user_embedding: {dim: 6}, author_embedding: {dim: 4, layer_norm: true}}"


@pytest.fixture(scope="module")
def config():
    return load_config("local", ["data.num_continuous=5", "data.num_binary=2", TWHIN])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, config) -> str:
    root = tmp_path_factory.mktemp("twhin")
    synthetic_data.write_synthetic_dataset(str(root), config, 256, num_files=1, rows_per_group=128)
    return str(root)


def first_batch(url: str, config, n: int = 64):
    return next(iter(data.ParquetBatchReader(url, config, n, 0, 1, repeat=False)))


def test_generator_writes_the_columns_and_the_reader_batches_them(config, dataset):
    schema = pq.read_schema(f"{dataset}/part-00000.parquet")
    assert schema.field("user_embedding").type == pa.list_(pa.float32(), 6)
    assert schema.field("author_embedding").type == pa.list_(pa.float32(), 4)
    batch = first_batch(dataset, config)
    assert sorted(batch.dense_embeddings) == ["author_embedding", "user_embedding"]
    assert batch.dense_embeddings["user_embedding"].shape == (64, 6)
    assert batch.dense_embeddings["user_embedding"].dtype == torch.float32
    assert float(batch.dense_embeddings["user_embedding"].std()) > 0.5


def test_features_are_layer_normed_embeddings_after_the_pooled_ids(config, dataset):
    torch.manual_seed(0)
    ranker = RecapRanker(config.model, 5, 2).eval()
    assert ranker.input_dims == 5 + 2 + 16 + 16 + 6 + 4
    with torch.no_grad():  # non-trivial affine parameters, so a missing or swapped norm shows
        for norm in ranker.dense_embedding_norms.values():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    batch = first_batch(dataset, config, 16)
    seen = {}
    ranker.backbone.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    ranker(batch)
    x = seen["x"]
    for name, lo, hi in (("user_embedding", 39, 45), ("author_embedding", 45, 49)):
        v = batch.dense_embeddings[name]
        norm = ranker.dense_embedding_norms[name]
        mean, var = v.mean(1, keepdim=True), v.var(1, unbiased=False, keepdim=True)
        expected = (v - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
        torch.testing.assert_close(x[:, lo:hi], expected)


def rewrite(src: str, dst, column: str, fn) -> str:
    table = pq.read_table(f"{src}/part-00000.parquet")
    values = table.column(column).combine_chunks()
    new = fn(values)
    table = table.set_column(table.schema.get_field_index(column), column, new)
    pq.write_table(table, dst)
    return str(dst)


def test_the_forward_changes_when_the_columns_change(config, dataset, tmp_path):
    torch.manual_seed(0)
    ranker = RecapRanker(config.model, 5, 2).eval()
    base = ranker(first_batch(dataset, config))["logits"]
    same = rewrite(dataset, tmp_path / "same.parquet", "author_embedding", lambda v: v)
    torch.testing.assert_close(ranker(first_batch(same, config))["logits"], base, rtol=0, atol=0)

    def scale_and_shift(v: pa.FixedSizeListArray) -> pa.Array:
        flat = v.flatten().to_numpy().reshape(-1, 4)
        flat = flat * np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), 4)

    changed = rewrite(dataset, tmp_path / "changed.parquet", "author_embedding", scale_and_shift)
    diff = (ranker(first_batch(changed, config))["logits"] - base).abs()
    assert (diff > 1e-4).float().mean() > 0.9  # nearly every example's every task moves


def test_null_rows_read_as_zeros_and_a_wrong_width_is_named(config, dataset, tmp_path):
    def null_first_two(v: pa.FixedSizeListArray) -> pa.Array:
        rows = v.to_pylist()
        rows[0] = rows[1] = None
        return pa.array(rows, pa.list_(pa.float32(), 6))

    url = rewrite(dataset, tmp_path / "nulls.parquet", "user_embedding", null_first_two)
    emb = first_batch(url, config).dense_embeddings["user_embedding"]
    assert emb[:2].abs().sum() == 0 and emb[2:].abs().sum() > 0
    torch.testing.assert_close(emb[2:], first_batch(dataset, config).dense_embeddings["user_embedding"][2:])

    def widen(v: pa.FixedSizeListArray) -> pa.Array:
        flat = np.repeat(v.flatten().to_numpy().reshape(-1, 6), 2, axis=1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), 12)

    bad = rewrite(dataset, tmp_path / "wide.parquet", "user_embedding", widen)
    with pytest.raises(data.ParquetSchemaError, match=r"'user_embedding' has width 12, expected 6"):
        first_batch(bad, config)


def test_a_missing_column_or_a_clashing_name_is_an_input_error(config, tmp_path):
    plain = load_config("local", ["data.num_continuous=5", "data.num_binary=2"])
    synthetic_data.write_synthetic_dataset(str(tmp_path), plain, 64, num_files=1)
    with pytest.raises(data.ParquetSchemaError, match="missing column.*user_embedding"):
        first_batch(str(tmp_path), config)
    with pytest.raises(ConfigError, match="names another column"):
        load_config("local", ["model.dense_embeddings={user_id: {dim: 3}}"])
