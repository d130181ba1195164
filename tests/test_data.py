"""recap_app.data: schema checks, synthetic data, sharded streaming reader, resume, CLI."""

from __future__ import annotations

import itertools
import math
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from recap_app import data, synthetic_data
from recap_app.batch import RecapBatch
from recap_app.config import RecapConfig, load_config

TABLES = (
    "model.embeddings.tables=["
    "{name: user, num_embeddings: 100, embedding_dim: 4, feature_names: [user_id]},"
    "{name: author, num_embeddings: 50, embedding_dim: 4, feature_names: [author_id]}]"
)


@pytest.fixture(scope="module")
def config() -> RecapConfig:
    """Tiny shapes; the local config's four (dotted) task names."""
    return load_config("local", ["data.num_continuous=4", "data.num_binary=2", TABLES])


@pytest.fixture(scope="module")
def dataset(config, tmp_path_factory) -> str:
    """2000 rows in 3 files of 64-row groups: 33 row groups of uneven sizes."""
    url = str(tmp_path_factory.mktemp("ds") / "train")
    synthetic_data.write_synthetic_dataset(url, config, 2000, num_files=3, rows_per_group=64, seed=7)
    return url


def row_keys(batch: RecapBatch) -> list[bytes]:
    """An example's identity: the bytes of its continuous row (unique in generated data)."""
    return [row.tobytes() for row in batch.continuous_features.numpy()]


def fingerprint(batch: RecapBatch) -> tuple:
    kjt = batch.sparse_features
    return (
        tuple(row_keys(batch)),
        batch.binary_features.numpy().tobytes(),
        kjt.lengths().numpy().tobytes(),
        kjt.values().numpy().tobytes(),
        batch.labels.numpy().tobytes(),
    )


def all_rows(url: str, config: RecapConfig) -> list[bytes]:
    reader = data.ParquetBatchReader(url, config, 10_000, 0, 1, repeat=False)
    return [k for b in reader for k in row_keys(b)]


def write(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), str(path))
    return str(path)


def hand_made_columns(config: RecapConfig, continuous_width: int = 4) -> dict:
    n = 3
    cols = {
        "continuous": pa.FixedSizeListArray.from_arrays(
            pa.array(np.arange(n * continuous_width, dtype=np.float32)), continuous_width
        ),
        "binary": pa.FixedSizeListArray.from_arrays(pa.array([1, 0, 0, 1, 1, 1], pa.float32()), 2),
        "user_id": pa.array([[1, 2], [], [5]], pa.list_(pa.int64())),
        "author_id": pa.array([[7], [8, 9], None], pa.list_(pa.int64())),
    }
    for i, task in enumerate(config.task_names):
        cols[f"label/{task}"] = pa.array([1.0, 0.0, float(i % 2)], pa.float32())
        cols[f"weight/{task}"] = pa.array([1.0, 2.0, 0.5], pa.float32())
    return cols


# ------------------------------------------------------------------------------------------ generator
def test_same_seed_same_content_any_layout_and_stale_parts_removed(config, tmp_path):
    a = synthetic_data.write_synthetic_dataset(str(tmp_path / "a"), config, 3000, num_files=3, seed=1)
    b = synthetic_data.write_synthetic_dataset(
        str(tmp_path / "b"), config, 3000, num_files=1, rows_per_group=100, seed=1
    )
    c = synthetic_data.write_synthetic_dataset(str(tmp_path / "c"), config, 3000, num_files=3, seed=2)
    assert [p.rsplit("/", 1)[-1] for p in a] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    table = {k: pa.concat_tables([pq.read_table(p) for p in v]) for k, v in (("a", a), ("b", b), ("c", c))}
    assert table["a"].num_rows == 3000
    assert content(table["a"]) == content(table["b"])
    assert content(table["a"]) != content(table["c"])
    # Same seed again, into the first place, with fewer files: identical rows, no stale parts.
    again = synthetic_data.write_synthetic_dataset(str(tmp_path / "a"), config, 3000, num_files=1, seed=1)
    assert data.list_parquet_files(str(tmp_path / "a")) == again
    assert content(pq.read_table(again[0])) == content(table["a"])


def content(table: pa.Table) -> dict[str, bytes]:
    """Column name -> the bytes of its values (and list lengths): equal tables with NaNs compare equal."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type):
            out[name + "#lengths"] = pc.list_value_length(col).to_numpy().tobytes()
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
            col = col.flatten()
        out[name] = col.to_numpy().tobytes()
    return out


def test_generated_data_is_in_range_and_learnable(tmp_path):
    config = load_config("local")
    synthetic_data.write_synthetic_dataset(str(tmp_path), config, 20_000, num_files=1, seed=3)
    (b,) = data.ParquetBatchReader(str(tmp_path), config, 20_000, 0, 1, repeat=False)
    rates = b.labels.mean(0).numpy()
    assert ((rates > 0.04) & (rates < 0.45)).all(), rates
    assert torch.equal(b.weights, torch.ones_like(b.weights))
    assert set(b.binary_features.unique().tolist()) <= {0.0, 1.0}
    c = b.continuous_features.numpy().astype(np.float64)
    assert 0 < (~np.isfinite(c)).mean() < 1e-3  # rare non-finite values exercise the model's fill
    c = np.where(np.isfinite(c), c, 0.0)
    assert c.max() > 1e3  # heavy-tailed counts
    y = b.labels.numpy()[:, 0]
    train, test = slice(0, 15_000), slice(15_000, None)

    # Dense signal: logistic regression on log-scaled features (a few Newton steps).
    x = np.concatenate([np.sign(c) * np.log1p(np.abs(c)), b.binary_features.numpy()], axis=1)
    x = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-6), np.ones((len(x), 1))], axis=1)
    w = np.zeros(x.shape[1])
    for _ in range(8):
        p = 1 / (1 + np.exp(-x[train] @ w))
        hessian = (x[train] * (p * (1 - p))[:, None]).T @ x[train] + 1e-3 * np.eye(len(w))
        w -= np.linalg.solve(hessian, x[train].T @ (p - y[train]))
    assert auroc(x[test] @ w, y[test]) > 0.65

    # Sparse signal: ids' positive rates on the train rows predict the test rows.
    score = np.zeros(len(y))
    base = y[train].mean()
    for jt in b.sparse_features.to_dict().values():
        ids, rows = jt.values().numpy(), np.repeat(np.arange(len(y)), jt.lengths().numpy())
        seen = rows < 15_000
        size = int(ids.max()) + 1
        pos = np.bincount(ids[seen], weights=y[rows[seen]], minlength=size)
        rate = (pos + 5 * base) / (np.bincount(ids[seen], minlength=size) + 5)
        score += np.bincount(rows, weights=rate[ids] - base, minlength=len(y))
    assert auroc(score[test], y[test]) > 0.55


def auroc(score: np.ndarray, y: np.ndarray) -> float:
    ranks = np.empty(len(score))
    ranks[np.argsort(score, kind="stable")] = np.arange(1, len(score) + 1)
    pos = y.sum()
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(y) - pos)))


def test_reader_batches_train_the_ranker(config, dataset):
    from recap_app.loss import build_multi_task_loss
    from recap_app.ranker import RecapRanker

    batch = next(iter(data.make_dataloader(dataset, config, 16, 0, 1)))
    model = RecapRanker(config.model, config.data.num_continuous, config.data.num_binary)
    out = model(batch)
    loss = build_multi_task_loss(config.task_names)(out["logits"], batch.labels, batch.weights)["loss"]
    loss.backward()
    assert out["logits"].shape == (16, 4) and torch.isfinite(loss)


def test_generate_data_main(tmp_path):
    rc = synthetic_data.generate_data_main(
        ["--output", f"file://{tmp_path}", "--num-examples", "600", "--num-eval-examples", "300"]
        + ["--num-files", "2", "--rows-per-group", "100", "data.num_continuous=3", "data.num_binary=0"]
    )
    assert rc == 0
    config = load_config("local", ["data.num_continuous=3", "data.num_binary=0"])
    train, evaluation = all_rows(str(tmp_path / "train"), config), all_rows(str(tmp_path / "eval"), config)
    assert (len(train), len(evaluation)) == (600, 300)
    assert not set(train) & set(evaluation)
    assert "binary" not in pq.read_schema(str(tmp_path / "train" / "part-00000.parquet")).names


# --------------------------------------------------------------------------------------------- schema
def test_hand_made_file_gives_exact_batch(config, tmp_path):
    url = write(tmp_path / "x.parquet", hand_made_columns(config))
    (batch,) = data.ParquetBatchReader(url, config, 8, 0, 1, repeat=False)
    kjt = batch.sparse_features
    assert kjt.keys() == ["user_id", "author_id"]
    assert kjt.lengths().tolist() == [2, 0, 1, 1, 2, 0]
    assert kjt.values().tolist() == [1, 2, 5, 7, 8, 9]
    assert kjt.lengths().dtype in (torch.int32, torch.int64) and kjt.values().dtype == torch.int64
    assert [t.tolist() for t in kjt["author_id"].to_dense()] == [[7], [8, 9], []]
    assert torch.equal(batch.continuous_features, torch.arange(12, dtype=torch.float32).view(3, 4))
    assert batch.binary_features.tolist() == [[1, 0], [0, 1], [1, 1]]
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (3, 4)
    assert batch.labels[:, 1].tolist() == [1, 0, 1] and batch.labels[:, 0].tolist() == [1, 0, 0]
    assert batch.weights[:, 3].tolist() == [1.0, 2.0, 0.5]
    # With repeat a partial batch never comes; batches of 2 then carry nothing over.
    reader = data.ParquetBatchReader(url, config, 2, 0, 1, repeat=True)
    first, second = itertools.islice(reader, 2)
    assert first.batch_size == second.batch_size == 2
    assert torch.equal(first.continuous_features, second.continuous_features)


def test_variable_lists_of_the_right_width_are_accepted(config, tmp_path):
    cols = hand_made_columns(config)
    cols["continuous"] = pa.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], pa.list_(pa.float64()))
    (batch,) = data.ParquetBatchReader(write(tmp_path / "x.parquet", cols), config, 8, 0, 1, repeat=False)
    assert torch.equal(batch.continuous_features, torch.arange(12, dtype=torch.float32).view(3, 4))
    cols["continuous"] = pa.array([[0, 1, 2, 3], [4, 5, 6], [8, 9, 10, 11]], pa.list_(pa.float32()))
    url = write(tmp_path / "y.parquet", cols)
    with pytest.raises(data.ParquetSchemaError, match=r"y\.parquet row group 0: column 'continuous'.*3\.\.4"):
        list(data.ParquetBatchReader(url, config, 8, 0, 1, repeat=False))


@pytest.mark.parametrize("list_type", [pa.list_(pa.float32()), pa.list_(pa.float32(), 4)])
def test_null_inside_a_continuous_list_is_named(config, tmp_path, list_type):
    """A null element (not a null row) of `continuous` was read as NaN, then zero-filled: silently."""
    cols = hand_made_columns(config)
    cols["continuous"] = pa.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, None, 10, None]], list_type)
    url = write(tmp_path / "holes.parquet", cols)
    with pytest.raises(
        data.ParquetSchemaError,
        match=r"holes\.parquet row group 0: column 'continuous' holds 2 null value\(s\) inside its "
        r"lists, first in row 2 \(write NaN",
    ):
        list(data.ParquetBatchReader(url, config, 8, 0, 1, repeat=False))
    cols["continuous"] = pa.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, float("nan"), 10, 11]], list_type)
    (batch,) = data.ParquetBatchReader(write(tmp_path / "nan.parquet", cols), config, 8, 0, 1, repeat=False)
    assert math.isnan(batch.continuous_features[2, 1]) and batch.continuous_features[2, 2] == 10


def test_missing_columns_are_named_with_the_file(config, tmp_path):
    cols = hand_made_columns(config)
    del cols["user_id"], cols["label/recap.engagement.is_replied"]
    url = write(tmp_path / "bad.parquet", cols)
    with pytest.raises(data.ParquetSchemaError) as e:
        data.ParquetBatchReader(url, config, 8, 0, 1, repeat=False)
    assert url in str(e.value)
    assert "'user_id'" in str(e.value) and "'label/recap.engagement.is_replied'" in str(e.value)


def test_wrong_width_is_named_with_the_file(config, tmp_path):
    url = write(tmp_path / "wide.parquet", hand_made_columns(config, continuous_width=5))
    with pytest.raises(data.ParquetSchemaError, match="width 5, expected 4") as e:
        data.ParquetBatchReader(f"file://{url}", config, 8, 0, 1, repeat=False)
    assert f"file://{url}" in str(e.value) and "'continuous'" in str(e.value)
    assert "data.num_continuous" in str(e.value)


def test_ids_outside_the_table_are_named(config, tmp_path):
    cols = hand_made_columns(config)
    cols["author_id"] = pa.array([[7], [50], []], pa.list_(pa.int64()))  # author table has 50 rows
    url = write(tmp_path / "ids.parquet", cols)
    with pytest.raises(
        data.ParquetSchemaError, match=r"ids\.parquet row group 0: column 'author_id'.*\[50\]"
    ):
        list(data.ParquetBatchReader(url, config, 8, 0, 1, repeat=False))


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("label/recap.engagement.is_replied", [1.0, float("nan"), 0.0], r"labels must be 0 or 1, got nan"),
        (
            "label/recap.engagement.is_replied",
            [1.0, 5.0, -3.0],
            r"labels must be 0 or 1, got 5\.0 in row 1 \(2 bad",
        ),
        (
            "weight/recap.engagement.is_favorited",
            [1.0, -1.0, 0.0],
            r"weights must be finite and >= 0, got -1\.0",
        ),
        (
            "weight/recap.engagement.is_favorited",
            [float("inf"), 1.0, 0.0],
            r"weights must be finite.*got inf",
        ),
    ],
)
def test_bad_labels_and_weights_are_named(config, tmp_path, column, values, message):
    """Labels other than 0/1 and negative or non-finite weights fail at decode, naming file, row group and
    column: they would otherwise train silently (a NaN loss, or 5 read as a probability target)."""
    cols = hand_made_columns(config)
    cols[column] = pa.array(values, pa.float32())
    url = write(tmp_path / "targets.parquet", cols)
    with pytest.raises(
        data.ParquetSchemaError, match=rf"targets\.parquet row group 0: column '{column}': {message}"
    ):
        list(data.ParquetBatchReader(url, config, 8, 0, 1, repeat=False))


def test_no_files_and_too_little_data_are_clear(config, tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        data.ParquetBatchReader(str(tmp_path / "nothing-here"), config, 8, 0, 1, repeat=True)
    one_file = data.list_parquet_files(dataset)[0]  # 11 row groups, 667 rows
    # fewer row groups than readers is fine: each reader takes a run of rows, not whole row groups
    loaders = [data.make_dataloader(one_file, config, 8, r, 4, num_workers=3, repeat=False) for r in range(4)]
    seen = [k for loader in loaders for b in loader for k in row_keys(b)]
    assert sorted(seen) == sorted(all_rows(one_file, config))
    with pytest.raises(
        data.DataError, match=r"667 rows give reader 0 of 12 \(rank x worker\) less than one batch"
    ):
        next(iter(data.ParquetBatchReader(one_file, config, 64, 0, 12, repeat=True)))


# --------------------------------------------------------------------------------------------- listing
def test_file_urls_globs_prefixes_and_hidden_files(config, dataset, tmp_path):
    files = data.list_parquet_files(dataset)
    assert len(files) == 3 and files == sorted(files)
    (tmp_path / "d" / "_temporary").mkdir(parents=True)
    for name in ("_SUCCESS", "_temporary/part-9.parquet", ".part-0.parquet.crc", "notes.txt"):
        (tmp_path / "d" / name).write_text("x")
    for f in files:
        (tmp_path / "d" / f.rsplit("/", 1)[-1]).write_bytes(open(f, "rb").read())
    d = tmp_path / "d"
    assert data.list_parquet_files(str(d)) == [str(d / f"part-0000{i}.parquet") for i in range(3)]
    assert data.list_parquet_files(f"file://{d}") == [f"file://{d}/part-0000{i}.parquet" for i in range(3)]
    assert data.list_parquet_files(f"file://{d}/part-0000[02].parquet") == [
        f"file://{d}/part-00000.parquet",
        f"file://{d}/part-00002.parquet",
    ]
    assert data.list_parquet_files(f"{d}/part-0000") == [str(d / f"part-0000{i}.parquet") for i in range(3)]
    expected = sorted(all_rows(dataset, config))
    assert sorted(all_rows(f"file://{d}", config)) == expected
    assert sorted(all_rows(f"file://{tmp_path}/*/part-*.parquet", config)) == expected


# --------------------------------------------------------------------------------------------- sharding
def test_two_ranks_two_workers_read_every_row_once(config, dataset):
    rows = all_rows(dataset, config)
    assert len(rows) == len(set(rows)) == 2000
    seen: list[bytes] = []
    for rank in range(2):
        reader = data.ParquetBatchReader(dataset, config, 32, rank, 2, repeat=False)
        loader = DataLoader(reader, batch_size=None, num_workers=2, collate_fn=data._identity)
        sizes = []
        for batch in loader:
            sizes.append(batch.batch_size)
            seen.extend(row_keys(batch))
        assert sizes.count(32) >= len(sizes) - 2  # one partial batch per worker at most
    assert len(seen) == len(set(seen)) and set(seen) == set(rows)


def test_repeat_epochs_cover_each_reader_share_once_per_epoch(config, dataset):
    """Each of the 4 readers (2 ranks x 2 workers) streams its epochs back to back with the same number of
    full batches; within an epoch no row is read twice across readers and fewer than 4 x 32 are left."""
    reader = data.ParquetBatchReader(dataset, config, 32, 0, 1, repeat=True, shuffle_seed=5)
    n = reader.start.lane_batches(4, 32)
    assert n == 2000 // (4 * 32)
    epochs: list[list[bytes]] = [[], [], []]
    for g in range(4):
        stream = reader._stream(g, 4, 0)
        for keys in epochs:
            batches = [c.to_batch(reader.layout.features) for c in itertools.islice(stream, n)]
            assert len(batches) == n and all(b.batch_size == 32 for b in batches)
            keys.extend(k for b in batches for k in row_keys(b))
    for keys in epochs:
        assert len(keys) == len(set(keys)) == 4 * n * 32 > 2000 - 4 * 32
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled per epoch


def test_shuffle_permutes_rows_inside_row_groups_per_epoch(config, dataset):
    """With a seed, each row group's rows come out permuted (the same rows, another order), differently
    in each epoch; without one, in file order."""
    in_file_order = all_rows(dataset, config)
    reader = data.ParquetBatchReader(dataset, config, 1, 0, 1, repeat=True, shuffle_seed=5)
    stream = iter(reader)
    epochs = [[k for b in itertools.islice(stream, reader.num_rows) for k in row_keys(b)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(in_file_order)
    offset = 0
    for unit in reader.units:  # each row group, as the file holds it and as each epoch read it
        group = in_file_order[offset : offset + unit.num_rows]
        offset += unit.num_rows
        members = set(group)
        read = [[k for k in epoch if k in members] for epoch in epochs]
        assert group != read[0] != read[1] != group, unit
        start = epochs[0].index(read[0][0])
        assert epochs[0][start : start + unit.num_rows] == read[0]  # still read as one block
    unshuffled = data.ParquetBatchReader(dataset, config, 10_000, 0, 1, repeat=False)
    assert [k for b in unshuffled for k in row_keys(b)] == in_file_order


def test_world_size_three_without_workers_covers_every_row_once(config, dataset):
    seen = [
        k
        for rank in range(3)
        for b in data.make_dataloader(dataset, config, 50, rank, 3, repeat=False)
        for k in row_keys(b)
    ]
    assert sorted(seen) == sorted(all_rows(dataset, config))


def rows_with_ids(batch: RecapBatch) -> list[tuple]:
    """Each example as (continuous bytes, its id list per sparse feature)."""
    jagged = batch.sparse_features.to_dict().values()
    per_feature = [[tuple(r.tolist()) for r in jt.to_dense()] for jt in jagged]
    return list(zip(row_keys(batch), *per_feature, strict=True))


@pytest.mark.parametrize("batch_size", [50, 300, 1000])
def test_padded_one_pass_gives_every_rank_equal_full_batches(config, dataset, batch_size):
    """pad: 3 ranks with unequal shares each yield the same number of full batches; the first
    rank_rows(rank) rows are the rank's real rows (every row once over the ranks), the rest are
    zero-weight copies of real rows, ids included."""
    readers = [
        data.ParquetBatchReader(dataset, config, batch_size, rank, 3, repeat=False, pad=True)
        for rank in range(3)
    ]
    shares = [reader.rank_rows(rank) for rank, reader in enumerate(readers)]
    assert len(set(shares)) > 1 and sum(shares) == 2000
    real = []
    for reader, n in zip(readers, shares, strict=True):
        batches = list(reader)
        assert len(batches) == readers[0].padded_batches() == -(-max(shares) // batch_size)
        assert all(b.batch_size == batch_size for b in batches)
        rows = [r for b in batches for r in rows_with_ids(b)]
        weights = torch.cat([b.weights for b in batches])
        assert (weights[:n] > 0).all() and (weights[n:] == 0).all()
        assert len(rows) > n and set(rows[n:]) <= set(rows[:n])  # padding: this rank's own rows
        real.extend(key for key, *_ in rows[:n])
    assert sorted(real) == sorted(all_rows(dataset, config))
    with pytest.raises(ValueError, match="repeat=False"):
        data.ParquetBatchReader(dataset, config, 50, 0, 1, repeat=True, pad=True)


# ----------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("repeat", [False, True])
def test_skip_batches_equals_reading_and_discarding(config, dataset, repeat):
    def stream(skip: int) -> list[tuple]:
        reader = data.ParquetBatchReader(
            dataset, config, 48, 1, 2, repeat=repeat, shuffle_seed=3, skip_batches=skip
        )
        return [fingerprint(b) for b in itertools.islice(reader, 40 - skip)]

    full = stream(0)
    assert len(full) == 40 if repeat else 15 < len(full) < 40
    for skip in (1, 3, 7, 25, 33):  # inside a row group, across row groups, across epochs
        assert stream(skip) == full[skip:], skip


def test_make_dataloader_resumes_the_combined_stream_of_workers(config, dataset):
    def loader(skip: int, repeat: bool):
        # rank 1 of 3 with 2 workers: runs of 334 and 333 rows, 10 and 9 batches of 37
        return data.make_dataloader(
            dataset, config, 37, 1, 3, num_workers=2, repeat=repeat, skip_batches=skip
        )

    full = [fingerprint(b) for b in loader(0, False)]
    reader = loader(0, False).dataset
    counts = reader.worker_batch_counts(2)
    assert counts[0] != counts[1]  # uneven workers: exhaustion is part of the replay
    assert len(full) == sum(counts)
    for skip in (5, len(full) - 2):
        assert [fingerprint(b) for b in loader(skip, False)] == full[skip:]
    endless = [fingerprint(b) for b in itertools.islice(loader(0, True), 20)]
    assert [fingerprint(b) for b in itertools.islice(loader(7, True), 13)] == endless[7:]


def test_resume_on_other_world_sizes_trains_every_example_of_the_epoch_once(config, dataset):
    """The DataPosition carries the epoch's untrained rows across world sizes: 7 steps on 2 ranks, 5 on
    4 ranks x 2 workers, the rest of the epoch on 1 rank (global batch 100 each time) train each of the
    2000 rows exactly once; the next batch is the next epoch's."""
    seed, n = 11, 2000

    def steps(start, world, workers, batch, count):
        def loader(rank):
            return data.make_dataloader(
                dataset, config, batch, rank, world, num_workers=workers, shuffle_seed=seed, start=start
            )

        loaders = [iter(loader(r)) for r in range(world)]
        return [k for _ in range(count) for loader in loaders for k in row_keys(next(loader))]

    start = data.ParquetBatchReader(dataset, config, 50, 0, 1, repeat=True).start
    assert start == data.DataPosition(0, ((0, n),))
    seen = steps(start, 2, 0, 50, 7)
    after_2 = start.advance(7, lanes=2, workers=1, batch_size=50, num_rows=n)
    assert after_2.rows == n - 700 and after_2.epoch == 0
    seen += steps(after_2, 4, 2, 25, 5)
    after_4 = after_2.advance(5, lanes=8, workers=2, batch_size=25, num_rows=n)
    assert after_4.rows == n - 1200
    left = after_4.lane_batches(1, 100)
    assert left == 8
    seen += steps(after_4, 1, 0, 100, left)
    assert len(seen) == len(set(seen)) == n
    after_1 = after_4.advance(left, lanes=1, workers=1, batch_size=100, num_rows=n)
    assert after_1 == data.DataPosition(1, ((0, n),))
    assert data.DataPosition.from_tensors(after_2.to_tensors()) == after_2
    next_epoch = data.ParquetBatchReader(dataset, config, 100, 0, 1, repeat=True, shuffle_seed=seed)
    assert steps(after_4, 1, 0, 100, left + 1)[-100:] == [
        k for b in itertools.islice(next_epoch, n // 100, n // 100 + 1) for k in row_keys(b)
    ]


def test_plan_worker_skips_replays_round_robin():
    def simulate(skip: int, counts: list[float]) -> tuple[list[int], int | None]:
        consumed, order = [0] * len(counts), []
        for _ in range(64):
            for w in range(len(counts)):
                if consumed[w] < counts[w]:
                    order.append(w)
                    consumed[w] += 1
        taken = [order[:skip].count(w) for w in range(len(counts))]
        return taken, (order[skip] if skip < len(order) else None)

    for counts in ([3, 5, 1], [4, 4], [math.inf] * 3, [2, math.inf, 0], [0, 0]):
        for skip in range(12):
            consumed, nxt = data.plan_worker_skips(skip, counts)
            taken, expected_next = simulate(skip, counts)
            assert consumed == taken, (counts, skip)
            if expected_next is not None:
                # The resumed loader starts at `nxt` and skips exhausted workers: same next worker.
                rotated = [(nxt + i) % len(counts) for i in range(len(counts))]
                assert next(w for w in rotated if consumed[w] < counts[w]) == expected_next, (counts, skip)


# -------------------------------------------------------------------------------------- object store
@pytest.fixture(scope="module")
def s3(request):
    """conftest's session S3 emulator (moto) when there is one, else a private one for this module."""
    try:
        yield request.getfixturevalue("s3_server")
    except pytest.FixtureLookupError:
        import storage_servers

        with storage_servers.moto_server() as server:
            yield server


def test_s3_write_list_and_sharded_read_in_worker_processes(config, s3):
    opts = s3.storage_options
    url = s3.url(f"data-test-{uuid.uuid4().hex[:8]}")
    files = synthetic_data.write_synthetic_dataset(
        url, config, 600, num_files=2, rows_per_group=50, seed=4, storage_options=opts
    )
    assert files == [f"{url}/part-00000.parquet", f"{url}/part-00001.parquet"]
    assert data.list_parquet_files(f"{url}/part-*.parquet", opts) == files
    seen = [
        k
        for rank in range(2)
        for b in data.make_dataloader(
            url, config, 64, rank, 2, num_workers=2, repeat=False, storage_options=opts
        )
        for k in row_keys(b)
    ]
    assert len(seen) == len(set(seen)) == 600
