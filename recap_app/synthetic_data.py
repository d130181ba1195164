"""Synthetic ranking data in the Parquet schema of `recap_app.data`, learnable and deterministic.

``write_synthetic_dataset`` writes a learnable dataset of this schema: continuous features are
log-normal counts and real-valued scores driven by a Gaussian latent (rare NaN / inf), binary flags
with various rates, ids drawn Zipf-like (a popular head) from each table, and every task's label is
Bernoulli(sigmoid(dense signal + sum of per-id latent signal + task bias)), with base positive rates
between 5 % and 30 %. The signal (feature weights, per-id latent vectors, biases) depends only on the
config's shapes and ``signal_seed``; ``seed`` only draws the examples, so train and eval sets written
with different seeds share the signal. Rows are drawn in fixed blocks, so the content depends on
``seed`` and ``num_examples`` only, not on the file or row-group layout. Tables with an ``id_transform``
get raw 64-bit ids (any int64), whose signal follows the row the reader maps them to; each
``model.dense_embeddings`` input is a standard normal vector that carries part of every task's signal.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from recap_app.config import IdTransform, RecapConfig, load_config
from recap_app.data import Columns, Layout, splitmix64, transform_ids
from recap_app.errors import exit_on_input_error
from recap_app.logs import log
from recap_app.storage import exists, join, url_to_fs, write

_BLOCK_ROWS = 8192  # rows are drawn in blocks keyed by (seed, block): content is layout-independent
_BASE_RATES = (0.30, 0.08, 0.12, 0.05, 0.20, 0.10, 0.15, 0.06)  # per task, cycled
_ID_LENGTHS = np.array([0, 1, 2, 3])
_ID_LENGTH_P = np.array([0.1, 0.6, 0.2, 0.1])
_LATENT_DIM = 8
_NAN_RATE, _INF_RATE = 2e-4, 2e-5
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK64


def _stable_int(*parts: object) -> int:
    return int.from_bytes(
        hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little"
    )


class _Signal:
    """The hidden model behind the labels; a function of the config's shapes and signal_seed only."""

    def __init__(self, config: RecapConfig, signal_seed: int) -> None:
        layout = Layout.of(config)
        self.layout = layout
        rng = np.random.default_rng([signal_seed, 0x5EC1A1])
        c, b, t = layout.num_continuous, layout.num_binary, len(layout.tasks)
        # Continuous: 3 of 4 are counts floor(exp(mu + sigma z)), the rest real scores scale * z.
        self.is_count = rng.random(c) < 0.75
        self.mu = rng.uniform(1.0, 5.0, c)
        self.sigma = rng.uniform(0.5, 1.5, c)
        self.scale = rng.uniform(0.1, 10.0, c)
        # Dense weights on the latent z: half the features matter; tasks share part of their weights.
        informative = rng.random(c) < 0.5
        informative[0] = True
        w = 0.6 * rng.standard_normal(c) + 0.8 * rng.standard_normal((t, c))
        w *= informative
        self.w_continuous = w / np.linalg.norm(w, axis=1, keepdims=True)  # std 1 per task
        self.p_binary = rng.uniform(0.05, 0.5, b)
        wb = rng.standard_normal((t, b))
        if b:
            std = np.sqrt((wb**2 * self.p_binary * (1 - self.p_binary)).sum(axis=1, keepdims=True))
            wb *= 0.5 / std
        self.w_binary = wb
        # Sparse: id -> hashed latent vector (unit variance per dim); task weights over the latent.
        f = len(layout.features)
        mean_len = float((_ID_LENGTHS * _ID_LENGTH_P).sum())
        self.id_salt, self.id_mult, self.id_offset, self.w_sparse = [], [], [], []
        for feature, n in zip(layout.features, layout.table_sizes, strict=True):
            table = self._table_of(config, feature)
            self.id_salt.append(_stable_int(signal_seed, "table", table) & 0xFFFFFFFFFFFF)
            mult = _stable_int(signal_seed, "mult", feature) % n or 1
            while math.gcd(mult, n) != 1:
                mult = mult % n + 1
            self.id_mult.append(mult)
            self.id_offset.append(_stable_int(signal_seed, "offset", feature) % n)
            u = 0.6 * rng.standard_normal(_LATENT_DIM) + 0.8 * rng.standard_normal((t, _LATENT_DIM))
            u *= 1.0 / (np.linalg.norm(u, axis=1, keepdims=True) * math.sqrt(mean_len * f))
            self.w_sparse.append(u)
        # Dense embeddings (TwHIN-like): standard normal vectors, each worth std 0.5 of every task's logit.
        self.w_dense = []
        for _, dim in layout.dense_embeddings:
            u = rng.standard_normal((t, dim))
            self.w_dense.append(u * 0.5 / np.linalg.norm(u, axis=1, keepdims=True))
        variance = 1.0 + (0.25 if b else 0.0) + (1.0 if f else 0.0) + 0.25 * len(self.w_dense)
        rates = np.array([_BASE_RATES[i % len(_BASE_RATES)] for i in range(t)])
        # E[sigmoid(a + X)] ~ sigmoid(a / sqrt(1 + pi var(X) / 8)) for Gaussian X.
        self.bias = np.log(rates / (1 - rates)) * math.sqrt(1 + math.pi * variance / 8)
        self._last: tuple[int, int, Columns] | None = None

    @staticmethod
    def _table_of(config: RecapConfig, feature: str) -> str:
        return next(t.name for t in config.model.embeddings.tables if feature in t.feature_names)

    def latents(self, feature: int, ids: np.ndarray) -> np.ndarray:
        keys = ids.astype(np.uint64)[:, None] * np.uint64(_LATENT_DIM) + np.arange(
            _LATENT_DIM, dtype=np.uint64
        )
        h = _splitmix64(keys ^ np.uint64(self.id_salt[feature] << 16))
        uniform = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        return (uniform * 2.0 - 1.0) * math.sqrt(3.0)

    def block(self, seed: int, block: int, n: int) -> Columns:
        layout = self.layout
        rng = np.random.default_rng([seed, block, 0xDA7A])
        c, t = layout.num_continuous, len(layout.tasks)
        z = rng.standard_normal((n, c))
        counts = np.floor(np.exp(self.mu + self.sigma * z))
        continuous = np.where(self.is_count, counts, self.scale * z).astype(np.float32)
        odd = rng.random((n, c))
        continuous[odd < _NAN_RATE] = np.nan
        continuous[odd < _INF_RATE] = np.inf
        binary = (rng.random((n, layout.num_binary)) < self.p_binary).astype(np.float32)
        logits = z @ self.w_continuous.T + (binary - self.p_binary) @ self.w_binary.T + self.bias
        sparse = []
        for f, size in enumerate(layout.table_sizes):
            lengths = _ID_LENGTHS[np.searchsorted(np.cumsum(_ID_LENGTH_P), rng.random(n), side="right")]
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            popularity = np.minimum((size * rng.random(offsets[-1]) ** 2.5).astype(np.int64), size - 1)
            ids = (popularity * self.id_mult[f] + self.id_offset[f]) % size
            if layout.transform_of(f) != IdTransform.NONE:
                # Raw 64-bit ids as real logs carry them (negative and > 2^62 included); the signal
                # follows the table row the reader maps each one to.
                ids = splitmix64(ids ^ self.id_salt[f]).view(np.int64)
            per_id = self.latents(f, transform_ids(ids, layout.transform_of(f), size)) @ self.w_sparse[f].T
            rows = np.repeat(np.arange(n), lengths)
            for k in range(t):
                logits[:, k] += np.bincount(rows, weights=per_id[:, k], minlength=n)
            sparse.append((offsets, ids.astype(np.int64)))
        dense = {}
        for (name, dim), w in zip(layout.dense_embeddings, self.w_dense, strict=True):
            dense[name] = rng.standard_normal((n, dim)).astype(np.float32)
            logits += dense[name] @ w.T
        labels = (rng.random((n, t)) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        return Columns(continuous, binary, sparse, labels, np.ones((n, t), dtype=np.float32), dense=dense)

    def rows(self, seed: int, start: int, stop: int) -> Columns:
        parts = []
        for block in range(start // _BLOCK_ROWS, (stop - 1) // _BLOCK_ROWS + 1):
            lo = block * _BLOCK_ROWS
            if self._last is None or self._last[:2] != (seed, block):  # files share boundary blocks
                self._last = (seed, block, self.block(seed, block, _BLOCK_ROWS))
            cols = self._last[2]
            parts.append(cols.slice(max(start, lo) - lo, min(stop, lo + _BLOCK_ROWS) - lo))
        return Columns.concat(parts)


@dataclass
class DatasetSummary:
    url: str
    files: list[str]
    rows: int
    bytes: int
    positives: dict[str, int]  # per task
    seconds: float

    def positive_rates(self) -> dict[str, float]:
        return {t: p / max(self.rows, 1) for t, p in self.positives.items()}


def _write_dataset(
    url: str,
    config: RecapConfig,
    num_examples: int,
    *,
    num_files: int,
    rows_per_group: int,
    seed: int,
    signal_seed: int,
    storage_options: Mapping[str, Any] | None,
    progress: bool = False,
) -> DatasetSummary:
    if num_examples < 1 or num_files < 1 or rows_per_group < 1:
        raise ValueError(
            f"num_examples ({num_examples}), num_files ({num_files}) and rows_per_group ({rows_per_group}) "
            "must be positive"
        )
    if num_files > num_examples:
        raise ValueError(f"num_files ({num_files}) must not exceed num_examples ({num_examples})")
    if seed < 0 or signal_seed < 0:
        raise ValueError(f"seed ({seed}) and signal_seed ({signal_seed}) must be >= 0")
    start_time = time.perf_counter()
    signal = _Signal(config, signal_seed)
    layout = signal.layout
    opts = dict(config.storage.options if storage_options is None else storage_options)
    fs, root = url_to_fs(url, opts)
    fs.makedirs(root, exist_ok=True)
    names = [f"part-{i:05d}.parquet" for i in range(num_files)]
    for stale in fs.glob(join(root, "part-*.parquet")):  # a previous, larger run's extra parts
        if stale.rsplit("/", 1)[-1] not in names:
            fs.rm(stale)
    bounds = np.linspace(0, num_examples, num_files + 1).round().astype(int)
    files, total_bytes = [], 0
    positives = np.zeros(len(layout.tasks), dtype=np.int64)
    metadata = {b"recap.synthetic": f"seed={seed} signal_seed={signal_seed}".encode()}
    for i, name in enumerate(names):
        cols = signal.rows(seed, int(bounds[i]), int(bounds[i + 1]))
        table = cols.to_arrow(layout).replace_schema_metadata(metadata)
        with fs.open(join(root, name), "wb") as f:
            pq.write_table(table, f, row_group_size=rows_per_group)
            total_bytes += f.tell()
        positives += cols.labels.sum(axis=0).astype(np.int64)
        files.append(join(url, name))
        if progress:
            log(f"  {files[-1]}: {cols.num_rows} rows")
    return DatasetSummary(
        url=url,
        files=files,
        rows=num_examples,
        bytes=total_bytes,
        positives=dict(zip(layout.tasks, positives.tolist(), strict=True)),
        seconds=time.perf_counter() - start_time,
    )


def write_synthetic_dataset(
    url: str,
    config: RecapConfig,
    num_examples: int,
    *,
    num_files: int = 4,
    rows_per_group: int = 1024,
    seed: int = 0,
    signal_seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write `num_examples` learnable examples as `part-00000.parquet`... under `url`; returns their URLs.

    Same (seed, signal_seed, num_examples, config shapes) -> same content. Stale `part-*.parquet` files
    beyond `num_files` (from an earlier, larger run into the same place) are deleted so readers of the
    directory see only this dataset. `storage_options` default to `config.storage.options`.
    """
    return _write_dataset(
        url,
        config,
        num_examples,
        num_files=num_files,
        rows_per_group=rows_per_group,
        seed=seed,
        signal_seed=signal_seed,
        storage_options=storage_options,
    ).files


EVAL_SEED_OFFSET = 1_000_003
EMBEDDED_TRAIN_EXAMPLES = 65_536
EMBEDDED_EVAL_EXAMPLES = 16_384


def ensure_synthetic_data(root: str, config: RecapConfig) -> tuple[str, str]:
    """The embedded default dataset of a run without data URLs: generated once under `root` (`_SUCCESS`
    marks it complete); returns its (train, eval) URLs."""
    marker = join(root, "_SUCCESS")
    opts = config.storage.options
    if not exists(marker, opts):
        log(
            f"no data.train_url / data.eval_url given: generating {EMBEDDED_TRAIN_EXAMPLES} train and "
            f"{EMBEDDED_EVAL_EXAMPLES} eval synthetic examples under {root} (once, 4 files each)"
        )
        seed = config.training.seed
        for split, n, split_seed in (
            ("train", EMBEDDED_TRAIN_EXAMPLES, seed),
            ("eval", EMBEDDED_EVAL_EXAMPLES, seed + 1),
        ):
            done = _write_dataset(
                join(root, split), config, n, num_files=4, rows_per_group=1024, seed=split_seed,
                signal_seed=0, storage_options=opts, progress=True,
            )  # fmt: skip
            log(f"{split}: {done.rows} examples, {done.bytes / 1e6:.1f} MB in {done.seconds:.1f} s")
        write(marker, "ok\n", opts)
    return join(root, "train"), join(root, "eval")


def generate_data_main(argv: list[str] | None = None) -> int:
    """`recap generate-data`: synthetic train and eval Parquet under OUTPUT/train and OUTPUT/eval."""
    parser = argparse.ArgumentParser(
        prog="recap generate-data",
        description="Write a synthetic, learnable ranking dataset (Parquet) to OUTPUT/train and "
        f"OUTPUT/eval. Eval rows are drawn with seed + {EVAL_SEED_OFFSET} from the same hidden signal.",
    )
    parser.add_argument(
        "--output", required=True, help="dataset URL (local path, file://, s3://, gs://, az://)"
    )
    parser.add_argument("--config", default="local", help="packaged config name or YAML URL (default: local)")
    parser.add_argument("--num-examples", type=int, default=100_000, help="training examples")
    parser.add_argument("--num-eval-examples", type=int, default=20_000, help="evaluation examples")
    parser.add_argument("--num-files", type=int, default=4, help="Parquet files per split")
    parser.add_argument("--rows-per-group", type=int, default=1024, help="rows per Parquet row group")
    parser.add_argument("--seed", type=int, default=0, help="example seed (same seed, same data)")
    parser.add_argument("--signal-seed", type=int, default=0, help="seed of the hidden signal")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.num_continuous=16")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    with exit_on_input_error():
        config = load_config(args.config, args.overrides)
    start = time.perf_counter()
    summaries = []
    for split, n, seed in (
        ("train", args.num_examples, args.seed),
        ("eval", args.num_eval_examples, args.seed + EVAL_SEED_OFFSET),
    ):
        if n <= 0:
            log(f"{split}: skipped (0 examples)")
            continue
        url = join(args.output, split)
        log(f"{split}: writing {n} examples to {url} ({min(args.num_files, n)} files, seed {seed})")
        s = _write_dataset(
            url,
            config,
            n,
            num_files=min(args.num_files, n),
            rows_per_group=args.rows_per_group,
            seed=seed,
            signal_seed=args.signal_seed,
            storage_options=None,
            progress=True,
        )
        summaries.append((split, s))
    for split, s in summaries:
        rates = ", ".join(f"{t}: {r:.3f}" for t, r in s.positive_rates().items())
        log(
            f"{split}: {len(s.files)} files, {s.rows} rows, {s.bytes / 1e6:.1f} MB in {s.seconds:.1f} s "
            f"at {s.url}; positive rate {rates}"
        )
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 0
