"""Raw 64-bit ids: per-table id_transform (none | modulo | hash), its fixed hash, and training on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recap_app import data, synthetic_data
from recap_app.config import IdTransform, load_config

pytestmark = pytest.mark.timeout(300)
EXTREMES = [2**63 - 1, -(2**63), -1, 0, 2**62 + 12345, -987654321987654321]


def splitmix64_reference(x: int) -> int:
    """SplitMix64 in Python integers (Steele, Lea & Flood 2014), for the 64 bits of a signed id."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_hash_is_splitmix64_mod_n_for_any_int64():
    ids = np.array(EXTREMES, dtype=np.int64)
    got = data.transform_ids(ids, IdTransform.HASH, 100_003)
    assert got.tolist() == [splitmix64_reference(i & (2**64 - 1)) % 100_003 for i in EXTREMES]
    # fixed constants: these values never change between runs, ranks or releases
    assert splitmix64_reference(0) == 0xE220A8397B1DCDAF
    assert int(data.splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF
    assert got.dtype == np.int64 and ((got >= 0) & (got < 100_003)).all()


def test_modulo_is_floor_modulo_and_none_is_identity():
    ids = np.array(EXTREMES, dtype=np.int64)
    assert data.transform_ids(ids, IdTransform.MODULO, 1000).tolist() == [i % 1000 for i in EXTREMES]
    assert data.transform_ids(ids, IdTransform.NONE, 1000) is ids


def test_hash_spreads_ids_over_the_table():
    rows = data.transform_ids(np.arange(200_000, dtype=np.int64) * 1024, IdTransform.HASH, 1000)
    counts = np.bincount(rows, minlength=1000)
    assert counts.min() > 120 and counts.max() < 290  # mean 200; ids sharing low bits still spread


def _dataset_with_extreme_ids(root: Path, config) -> str:
    """The synthetic generator's raw-id data (hash tables), with the int64 extremes put in row 0..5."""
    url = str(root)
    synthetic_data.write_synthetic_dataset(url, config, 1024, num_files=1, seed=5)
    path = root / "part-00000.parquet"
    table = pq.read_table(path)
    ids = table.column("user_id").to_pylist()
    for i, extreme in enumerate(EXTREMES):
        ids[i] = [extreme]
    table = table.set_column(
        table.schema.get_field_index("user_id"), "user_id", pa.array(ids, pa.list_(pa.int64()))
    )
    pq.write_table(table, path, row_group_size=256)
    return url


def test_generator_writes_raw_ids_and_the_reader_maps_them(tmp_path):
    config = load_config("local", [])
    assert {t.id_transform for t in config.model.embeddings.tables} == {IdTransform.HASH}
    url = _dataset_with_extreme_ids(tmp_path, config)
    raw = np.array([i for row in pq.read_table(url).column("author_id").to_pylist() for i in row])
    assert raw.min() < -(2**62) and raw.max() > 2**62  # the generator's raw ids span the int64 range
    (batch,) = data.ParquetBatchReader(url, config, 1024, 0, 1, repeat=False, shuffle_seed=None)
    user = batch.sparse_features["user_id"]
    first = user.values()[: len(EXTREMES)].tolist()
    assert first == [splitmix64_reference(i & (2**64 - 1)) % 2000 for i in EXTREMES]
    assert int(user.values().max()) < 2000 and int(user.values().min()) >= 0
    # `none` keeps the range check and names the column
    strict = load_config("local", [])
    strict.model.embeddings.tables[0].id_transform = IdTransform.NONE
    with pytest.raises(data.ParquetSchemaError, match="'user_id' has id.s. outside"):
        list(data.ParquetBatchReader(url, strict, 1024, 0, 1, repeat=False))


def test_training_on_raw_int64_ids(tmp_path):
    config = load_config("local", [])
    url = _dataset_with_extreme_ids(tmp_path / "data", config)
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "recap"), "train", "--output", str(out), "--"]
    cmd += [f"data.train_url={url}", f"data.eval_url={url}", "data.global_batch_size=128"]
    cmd += ["training.num_train_steps=10", "training.log_every_n=5", "eval.num_batches=2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=os.environ)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (out / "checkpoints/step-10/.metadata").exists()
