"""Ranking examples as Parquet on any fsspec URL: the schema and a streaming per-rank reader.

Synthetic datasets of this schema come from `recap_app.synthetic_data`.

Parquet schema (one row per ranking example; other columns are ignored)
-----------------------------------------------------------------------
======================  ===========================================  =====================================
column                  Arrow type                                   meaning
======================  ===========================================  =====================================
``continuous``          ``fixed_size_list<float32>[N_c]``            N_c = ``data.num_continuous`` raw
                                                                     values (counts, scores); NaN / inf
                                                                     allowed (the model maps them to 0)
``binary``              ``fixed_size_list<float32>[N_b]``            N_b = ``data.num_binary`` 0/1 flags;
                                                                     not read (may be absent) if N_b = 0
``<feature name>``      ``list<int64>``                              one column per sparse id feature in
                                                                     ``model.embeddings.tables[*]
                                                                     .feature_names`` (e.g. ``user_id``):
                                                                     0..n ids per example: any int64
                                                                     under the table's id_transform
                                                                     `hash` / `modulo`, else (`none`)
                                                                     each in [0, num_embeddings);
                                                                     a null list reads as empty
``<embedding name>``    ``fixed_size_list<float32>[dim]``            one column per entry of
                                                                     ``model.dense_embeddings`` (e.g.
                                                                     TwHIN ``user_embedding``); a null
                                                                     row reads as zeros
``label/<task name>``   ``float32``                                  0/1 label, one per ``model.tasks``
                                                                     entry (e.g. ``label/recap.engagement
                                                                     .is_favorited``)
``weight/<task name>``  ``float32``                                  example weight for that task
======================  ===========================================  =====================================

Also accepted on read (Spark and friends write these): ``list<float>`` / ``large_list`` for
``continuous`` / ``binary`` when every row has the configured width, any integer list type for id
features, and any numeric or boolean type for labels and weights (all cast to the types above).
Missing columns, a wrong fixed-list width, nulls in dense / label / weight columns, labels other than
0 / 1, weights that are negative or not finite, and ids outside their table (``id_transform: none``)
raise ``ParquetSchemaError`` naming the file URL, the row group and the column(s).

A batch is a ``RecapBatch``: continuous [B, N_c] and binary [B, N_b] float32, a ``KeyedJaggedTensor``
whose keys are the sparse feature names in config order (lengths int32, values int64), labels and
weights [B, T] float32 with tasks in config order.

Reading
-------
``url`` is a file, a directory (searched recursively for ``*.parquet`` / ``*.parq``, skipping names
that start with ``_`` or ``.``), a glob, or a key prefix, on any fsspec backend. Each epoch has an order
of all rows: the (file, row group) units in sorted file order, or with ``shuffle_seed`` permuted with
seed ``shuffle_seed + epoch`` and the rows inside each row group permuted too (seeded by seed, epoch and
row group). The readers (global reader = ``rank * num_workers + worker``) each take one contiguous run of
that order, so a reader touches few row groups: with ``repeat`` every reader gets the same number of
full batches of ``batch_size`` (the rest of the epoch, fewer than readers x batch_size rows, is left
out) and the readers move to the next epoch together, forever; without it the rows are split into
near-equal runs and each reader's last batch may be partial.

Where the training stream stands is a ``DataPosition``: the epoch and the rows of its order not trained
on yet. A resumed run deals those rows out again to however many ranks and workers it has (and any
batch size), so a run moved from 2 to 4 ranks to 1 mid-epoch trains every example of the epoch at most
once, and all of them but the few left out at a re-deal. ``skip_batches`` skips batches from the start
position using the Parquet footers' row counts: whole row groups are skipped unread.

Unreadable data (``data.on_corrupt``): a file whose footer cannot be read (truncated, not Parquet) and a
row group that fails mid-run raise ``CorruptDataError`` naming the file (and row group), or with ``skip``
the file is dropped on every rank alike and the row group's rows are replaced by zero-weight copies of the
reader's readable rows, so that every reader still yields the batches it was dealt (``_StandIn``); the
trainer counts them over all ranks (``CorruptTally``) and fails past ``data.max_corrupt_fraction``.

``make_dataloader`` wraps the reader in a DataLoader. With ``num_workers > 0`` the DataLoader takes
batches from the workers round-robin (skipping exhausted workers), so the reader's own
``skip_batches`` (per worker) is not the same as batches of the combined stream. ``make_dataloader``
therefore replays the round-robin arithmetically from every worker's batch count (known from the
footers) to get each worker's skip and the worker that comes next, and rotates the worker ids so
that the restarted DataLoader continues with that worker: a resumed loader yields exactly the
batches an uninterrupted one would have yielded after ``skip_batches`` batches, with or without
``repeat``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from fsspec import AbstractFileSystem
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recap_app.batch import RecapBatch
from recap_app.config import CorruptDataPolicy, IdTransform, RecapConfig
from recap_app.errors import InputError
from recap_app.logs import ALL_RANKS, log
from recap_app.storage import errors_named, has_scheme, url_to_fs

CONTINUOUS = "continuous"
BINARY = "binary"
PARQUET_SUFFIXES = (".parquet", ".parq")


def label_column(task: str) -> str:
    return f"label/{task}"


def weight_column(task: str) -> str:
    return f"weight/{task}"


class DataError(InputError, ValueError):
    """The data at a URL cannot be read as configured (the message says where, and what to change)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data URL names no Parquet file."""


class ParquetSchemaError(DataError):
    """A Parquet file does not match the ranking-example schema (the message names file and column)."""


class CorruptDataError(DataError):
    """A file or row group cannot be read as Parquet (truncated, overwritten, not Parquet at all)."""


def is_corrupt(error: BaseException) -> bool:
    """Whether a read failed on the bytes themselves: Arrow's own errors (no magic bytes, bad thrift,
    bad compression) and EOF. Storage failures (OSError with an errno, or a backend's class) are not."""
    return isinstance(error, pa.ArrowException | EOFError) or (type(error) is OSError and error.errno is None)


def _cause(error: BaseException) -> str:
    text = "".join(c if c.isprintable() else "?" for c in " ".join(str(error).split()))
    return f"{type(error).__name__}: {text[:300]}"


def corrupt_hint(where: str, error: BaseException) -> str:
    return (
        f"{where}: cannot be read as Parquet ({_cause(error)}); fix or remove the file and run again (the "
        "run resumes from its last checkpoint), or set data.on_corrupt=skip to train without it"
    )


# ---------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Layout:
    """What the config asks of a file: column names and shapes."""

    num_continuous: int
    num_binary: int
    features: tuple[str, ...]
    table_sizes: tuple[int, ...]  # num_embeddings of each feature's table
    tasks: tuple[str, ...]
    id_transforms: tuple[IdTransform, ...] = ()  # per feature (empty: all `none`)
    dense_embeddings: tuple[tuple[str, int], ...] = ()  # (column, dim) of each model.dense_embeddings

    @staticmethod
    def of(config: RecapConfig) -> Layout:
        features, sizes, transforms = [], [], []
        for table in config.model.embeddings.tables:
            for name in table.feature_names:
                features.append(name)
                sizes.append(table.num_embeddings)
                transforms.append(table.id_transform)
        return Layout(
            num_continuous=config.data.num_continuous,
            num_binary=config.data.num_binary,
            features=tuple(features),
            table_sizes=tuple(sizes),
            tasks=tuple(config.task_names),
            id_transforms=tuple(transforms),
            dense_embeddings=tuple((n, e.dim) for n, e in config.model.dense_embeddings.items()),
        )

    def transform_of(self, feature: int) -> IdTransform:
        return self.id_transforms[feature] if self.id_transforms else IdTransform.NONE

    @property
    def columns(self) -> list[str]:
        cols = [CONTINUOUS] + ([BINARY] if self.num_binary else []) + list(self.features)
        cols += [name for name, _ in self.dense_embeddings]
        return cols + [label_column(t) for t in self.tasks] + [weight_column(t) for t in self.tasks]


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)


def check_schema(schema: pa.Schema, config: RecapConfig | Layout, url: str) -> None:
    """Raise ParquetSchemaError naming `url` and the offending columns if `schema` cannot be read."""
    layout = config if isinstance(config, Layout) else Layout.of(config)
    names = set(schema.names)
    missing = [c for c in layout.columns if c not in names]
    if missing:
        raise ParquetSchemaError(
            f"{url}: missing column(s) {missing}; a ranking-example file needs {layout.columns} "
            "(see recap_app/data.py for the schema)"
        )
    problems = []
    dense = [(n, d, f"model.dense_embeddings[{n}].dim") for n, d in layout.dense_embeddings]
    for name, width, key in (
        (CONTINUOUS, layout.num_continuous, "data.num_continuous"),
        (BINARY, layout.num_binary, "data.num_binary"),
        *dense,
    ):
        if name == BINARY and not width:
            continue
        t = schema.field(name).type
        if not _is_list(t) or not _is_numeric(t.value_type):
            problems.append(f"column {name!r} has type {t}, expected fixed_size_list<float32>[{width}]")
        elif pa.types.is_fixed_size_list(t) and t.list_size != width:
            problems.append(f"column {name!r} has width {t.list_size}, expected {width} ({key}={width})")
    for name in layout.features:
        t = schema.field(name).type
        if not _is_list(t) or not pa.types.is_integer(t.value_type):
            problems.append(f"sparse id column {name!r} has type {t}, expected list<int64>")
    for name in layout.columns[len(layout.columns) - 2 * len(layout.tasks) :]:
        t = schema.field(name).type
        if not _is_numeric(t):
            problems.append(f"column {name!r} has type {t}, expected float32")
    if problems:
        raise ParquetSchemaError(f"{url}: " + "; ".join(problems))


# ----------------------------------------------------------------------------------- columns <-> batch
@dataclass
class Columns:
    """Decoded rows as numpy: what batches are cut from (and what the generator writes)."""

    continuous: np.ndarray  # [n, C] float32
    binary: np.ndarray  # [n, B] float32
    sparse: list[tuple[np.ndarray, np.ndarray]]  # per feature: offsets int64 [n + 1], ids int64
    labels: np.ndarray  # [n, T] float32
    weights: np.ndarray  # [n, T] float32
    sources: tuple[str, ...] = ()  # the row groups these rows came from (for error messages)
    dense: dict[str, np.ndarray] = field(default_factory=dict)  # per dense embedding: [n, dim] float32
    # Row groups (reader unit indices) found unreadable and stood in for since the previous batch.
    corrupt_units: tuple[int, ...] = ()

    @property
    def num_rows(self) -> int:
        return self.labels.shape[0]

    def slice(self, start: int, stop: int) -> Columns:
        sparse = []
        for offsets, values in self.sparse:
            lo, hi = offsets[start], offsets[stop]
            sparse.append((offsets[start : stop + 1] - lo, values[lo:hi]))
        return Columns(
            self.continuous[start:stop],
            self.binary[start:stop],
            sparse,
            self.labels[start:stop],
            self.weights[start:stop],
            self.sources,
            {k: v[start:stop] for k, v in self.dense.items()},
        )

    def padding(self, num_rows: int) -> Columns:
        """`num_rows` copies of these rows (cycled) with zero weights: filler that a weighted loss ignores."""
        idx = np.arange(num_rows) % self.num_rows
        sparse = []
        for offsets, values in self.sparse:
            starts, lengths = offsets[idx], np.diff(offsets)[idx]
            new_offsets = np.zeros(num_rows + 1, dtype=np.int64)
            np.cumsum(lengths, out=new_offsets[1:])
            gather = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
            sparse.append((new_offsets, values[gather]))
        return Columns(
            self.continuous[idx],
            self.binary[idx],
            sparse,
            self.labels[idx],
            np.zeros_like(self.weights[idx]),
            self.sources,
            {k: v[idx] for k, v in self.dense.items()},
        )

    @staticmethod
    def concat(parts: Sequence[Columns]) -> Columns:
        if len(parts) == 1:
            return parts[0]
        sparse = []
        for f in range(len(parts[0].sparse)):
            lengths = np.concatenate([np.diff(p.sparse[f][0]) for p in parts])
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            sparse.append((offsets, np.concatenate([p.sparse[f][1] for p in parts])))
        return Columns(
            np.concatenate([p.continuous for p in parts]),
            np.concatenate([p.binary for p in parts]),
            sparse,
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.weights for p in parts]),
            tuple(dict.fromkeys(s for p in parts for s in p.sources)),
            {k: np.concatenate([p.dense[k] for p in parts]) for k in parts[0].dense},
            tuple(u for p in parts for u in p.corrupt_units),
        )

    def to_batch(self, keys: Sequence[str]) -> RecapBatch:
        """Owned copies (a view would drag its whole row group into the DataLoader's shared memory)."""
        n = self.num_rows
        if keys:
            lengths = np.concatenate([np.diff(o) for o, _ in self.sparse]).astype(np.int32)
            values = np.concatenate([v for _, v in self.sparse]).astype(np.int64, copy=True)
            kjt = KeyedJaggedTensor(
                keys=list(keys), values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
            )
        else:
            kjt = KeyedJaggedTensor(
                keys=[],
                values=torch.empty(0, dtype=torch.int64),
                lengths=torch.empty(0, dtype=torch.int32),
                stride=n,
            )
        return RecapBatch(
            continuous_features=torch.from_numpy(self.continuous.copy()),
            binary_features=torch.from_numpy(self.binary.copy()),
            sparse_features=kjt,
            labels=torch.from_numpy(self.labels.copy()),
            weights=torch.from_numpy(self.weights.copy()),
            source="; ".join(self.sources),
            dense_embeddings={k: torch.from_numpy(v.copy()) for k, v in self.dense.items()},
            corrupt_units=self.corrupt_units,
        )

    def to_arrow(self, layout: Layout) -> pa.Table:
        n = self.num_rows
        cols: dict[str, pa.Array] = {
            CONTINUOUS: pa.FixedSizeListArray.from_arrays(
                pa.array(self.continuous.reshape(-1)), layout.num_continuous
            )
        }
        if layout.num_binary:
            cols[BINARY] = pa.FixedSizeListArray.from_arrays(
                pa.array(self.binary.reshape(-1)), layout.num_binary
            )
        for name, (offsets, values) in zip(layout.features, self.sparse, strict=True):
            cols[name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
        for name, dim in layout.dense_embeddings:
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(self.dense[name].reshape(-1)), dim)
        for i, task in enumerate(layout.tasks):
            cols[label_column(task)] = pa.array(np.ascontiguousarray(self.labels[:, i]))
        for i, task in enumerate(layout.tasks):
            cols[weight_column(task)] = pa.array(np.ascontiguousarray(self.weights[:, i]))
        table = pa.table(cols)
        assert table.num_rows == n
        return table


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _dense(table: pa.Table, name: str, width: int, where: str) -> np.ndarray:
    """A fixed-width float list column as [rows, width]; variable-length lists must all have `width`."""
    n = table.num_rows
    if not width:
        return np.zeros((n, 0), dtype=np.float32)
    arr = _column(table, name)
    if arr.null_count:
        raise ParquetSchemaError(f"{where}: column {name!r} has {arr.null_count} null row(s)")
    if not pa.types.is_fixed_size_list(arr.type) and n:
        lo, hi = pc.min_max(pc.list_value_length(arr)).values()
        if lo.as_py() != width or hi.as_py() != width:
            raise ParquetSchemaError(
                f"{where}: column {name!r} has rows of {lo.as_py()}..{hi.as_py()} values, expected {width}"
            )
    values = arr.flatten()
    if name == BINARY:
        values = pc.fill_null(values, 0)
    elif values.null_count:  # NaN is the way to say "missing" here; a null would pass as NaN, unnoticed
        row = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0]) // width
        raise ParquetSchemaError(
            f"{where}: column {name!r} holds {values.null_count} null value(s) inside its lists, first in "
            f"row {row} (write NaN for a missing value)"
        )
    return np.array(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, width)


def _embedding(table: pa.Table, name: str, dim: int, where: str) -> np.ndarray:
    """A dense embedding column as [rows, dim]; a null row (an entity without a vector) reads as zeros."""
    arr = _column(table, name)
    if not arr.null_count:
        return _dense(table, name, dim, where)
    present = pc.is_valid(arr).to_numpy(zero_copy_only=False)
    out = np.zeros((table.num_rows, dim), dtype=np.float32)
    out[present] = _dense(pa.table({name: arr.filter(present)}), name, dim, where)
    return out


def _scalar(table: pa.Table, name: str, where: str) -> np.ndarray:
    arr = _column(table, name)
    if arr.null_count:
        raise ParquetSchemaError(f"{where}: column {name!r} has {arr.null_count} null value(s)")
    return np.array(arr.to_numpy(zero_copy_only=False), dtype=np.float32)


_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_M1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """SplitMix64 (Steele, Lea & Flood 2014; the output function of Java's SplittableRandom) of each
    int64's 64 bits, as uint64: fixed constants, no seed, so every rank and every run maps an id alike."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.int64, copy=False).view(np.uint64) + _SPLITMIX_GAMMA
        z ^= z >> np.uint64(30)
        z *= _SPLITMIX_M1
        z ^= z >> np.uint64(27)
        z *= _SPLITMIX_M2
        z ^= z >> np.uint64(31)
    return z


def transform_ids(ids: np.ndarray, transform: IdTransform, num_embeddings: int) -> np.ndarray:
    """Raw int64 ids -> table rows in [0, num_embeddings): `hash` is splitmix64(id) mod num_embeddings,
    `modulo` is id mod num_embeddings (floor), `none` returns them as they are."""
    if transform == IdTransform.HASH:
        return (splitmix64(ids) % np.uint64(num_embeddings)).astype(np.int64)
    if transform == IdTransform.MODULO:
        return np.mod(ids, num_embeddings)
    return ids


def _ids(
    table: pa.Table, name: str, size: int, where: str, transform: IdTransform = IdTransform.NONE
) -> tuple[np.ndarray, np.ndarray]:
    """An id list column as (offsets [rows + 1], table rows): raw ids hashed or reduced by `transform`,
    or with `none` checked against the table's size."""
    arr = _column(table, name)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    values = arr.flatten()
    if values.null_count:
        raise ParquetSchemaError(f"{where}: column {name!r} holds {values.null_count} null id(s)")
    ids = np.array(values.to_numpy(zero_copy_only=False), dtype=np.int64)
    if transform != IdTransform.NONE:
        ids = transform_ids(ids, transform, size)
    elif ids.size and (ids.min() < 0 or ids.max() >= size):
        bad = ids[(ids < 0) | (ids >= size)]
        raise ParquetSchemaError(
            f"{where}: column {name!r} has id(s) outside [0, {size}) of its embedding table, "
            f"e.g. {bad[:5].tolist()} (raw ids: set the table's id_transform to hash)"
        )
    offsets = np.zeros(table.num_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, ids


def _targets(table: pa.Table, columns: Sequence[str], where: str, *, labels: bool) -> np.ndarray:
    """Labels ([rows, tasks], each 0 or 1) or weights (finite, >= 0): anything else would train on
    garbage (a NaN loss, or a label 5 read as a probability target), so it fails naming the column."""
    values = np.stack([_scalar(table, c, where) for c in columns], axis=1)
    bad = ~((values == 0) | (values == 1)) if labels else ~(np.isfinite(values) & (values >= 0))
    if bad.any():
        rows, cols = np.nonzero(bad)
        what = "labels must be 0 or 1" if labels else "weights must be finite and >= 0"
        raise ParquetSchemaError(
            f"{where}: column {columns[cols[0]]!r}: {what}, got {float(values[rows[0], cols[0]])} in row "
            f"{rows[0]} ({int(bad.sum())} bad value(s) in this row group)"
        )
    return values


def _decode(table: pa.Table, layout: Layout, where: str) -> Columns:
    """Arrow row group -> Columns; `where` ("<url> row group <i>") names the place in errors."""
    return Columns(
        _dense(table, CONTINUOUS, layout.num_continuous, where),
        _dense(table, BINARY, layout.num_binary, where),
        [
            _ids(table, f, size, where, layout.transform_of(i))
            for i, (f, size) in enumerate(zip(layout.features, layout.table_sizes, strict=True))
        ],
        _targets(table, [label_column(t) for t in layout.tasks], where, labels=True),
        _targets(table, [weight_column(t) for t in layout.tasks], where, labels=False),
        (where,),
        {name: _embedding(table, name, dim, where) for name, dim in layout.dense_embeddings},
    )


# ---------------------------------------------------------------------------------------------- listing
def _display(url: str, fs: AbstractFileSystem, path: str) -> str:
    return path if not has_scheme(url) else fs.unstrip_protocol(path)


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def _parquet_paths(fs: AbstractFileSystem, path: str) -> list[str]:
    """A file as is; a glob's, a directory's (recursive) or a prefix's *.parquet files; sorted."""

    def files_under(root: str) -> list[str]:
        found = fs.find(root, detail=True)
        root = root.rstrip("/")
        return [
            p
            for p, info in found.items()
            if info.get("type") == "file" and p.endswith(PARQUET_SUFFIXES) and not _hidden(p[len(root) :])
        ]

    if any(c in path for c in "*?["):
        out = []
        for p, info in fs.glob(path, detail=True).items():
            if info.get("type") == "directory":
                out.extend(files_under(p))
            elif p.endswith(PARQUET_SUFFIXES) and not _hidden(p.rsplit("/", 1)[-1]):
                out.append(p)
        return sorted(set(out))
    if fs.isfile(path):
        return [path]
    if fs.isdir(path):
        return sorted(files_under(path))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    return sorted(
        p
        for p, info in fs.glob(path + "*", detail=True).items()
        if info.get("type") == "file" and p.endswith(PARQUET_SUFFIXES) and not _hidden(p[len(parent) :])
    )


def _find_parquet(
    url: str, storage_options: Mapping[str, Any] | None
) -> tuple[AbstractFileSystem, list[str]]:
    with errors_named(url, "list data under"):
        fs, path = url_to_fs(url, storage_options)
        paths = _parquet_paths(fs, path)
    if not paths:
        raise DataNotFoundError(
            f"no Parquet files at {url!r} (a file, a directory holding *.parquet, a glob or a prefix)"
        )
    return fs, paths


def list_parquet_files(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The Parquet files `url` names (see module docstring), sorted; DataNotFoundError if none."""
    fs, paths = _find_parquet(url, storage_options)
    return [_display(url, fs, p) for p in paths]


# ----------------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class _Unit:
    file: int  # index into the reader's files
    row_group: int
    num_rows: int


@dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands, whatever the world size: the epoch, and the rows of that epoch's
    order not trained on yet, as [start, end) intervals of it (in order). A fresh epoch is one interval
    over every row. Saved in checkpoints; a resume on any number of ranks and workers deals out exactly
    these rows, so every example is trained on at most once per epoch (see the module docstring)."""

    epoch: int
    segments: tuple[tuple[int, int], ...]

    @staticmethod
    def fresh(epoch: int, num_rows: int) -> DataPosition:
        return DataPosition(epoch, ((0, num_rows),))

    @property
    def rows(self) -> int:
        return sum(b - a for a, b in self.segments)

    def take(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Rows [lo, hi) of the concatenated segments, as intervals of the epoch's order."""
        out, offset = [], 0
        for a, b in self.segments:
            start, stop = max(lo, offset), min(hi, offset + b - a)
            if start < stop:
                out.append((a + start - offset, a + stop - offset))
            offset += b - a
        return out

    def lane_batches(self, lanes: int, batch_size: int) -> int:
        """Full batches each of `lanes` readers gets from these rows (the rest, < lanes x batch, is left)."""
        return self.rows // (lanes * batch_size)

    def advance(self, steps: int, lanes: int, workers: int, batch_size: int, num_rows: int) -> DataPosition:
        """The position after every rank trained `steps` batches from here with `lanes` = ranks x workers
        readers (a DataLoader takes its workers' batches in turn)."""
        pos = self
        while True:
            n = pos.lane_batches(lanes, batch_size)
            if steps < n * workers:
                break
            steps -= n * workers
            pos = DataPosition.fresh(pos.epoch + 1, num_rows)
            if pos.lane_batches(lanes, batch_size) == 0:
                raise DataError(
                    f"{num_rows} rows give no full batch of {batch_size} to each of {lanes} readers"
                )
        if steps == 0:
            return pos
        share, left = n * batch_size, []
        for lane in range(lanes):
            done = steps // workers + (1 if lane % workers < steps % workers else 0)
            left += pos.take(lane * share + done * batch_size, (lane + 1) * share)
        left += pos.take(lanes * share, pos.rows)  # never dealt out this round: still unseen
        return DataPosition(pos.epoch, _coalesce(left))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        segments = torch.tensor(self.segments, dtype=torch.int64).reshape(-1, 2)
        return {"data_epoch": torch.tensor(self.epoch), "data_segments": segments}

    @staticmethod
    def from_tensors(state: Mapping[str, torch.Tensor]) -> DataPosition:
        segments = tuple((int(a), int(b)) for a, b in state["data_segments"].tolist())
        return DataPosition(int(state["data_epoch"]), segments)


def _coalesce(intervals: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for a, b in intervals:
        if a >= b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


@dataclass
class _WorkerPlan:
    """Set by make_dataloader: per logical worker skip counts and the rotation of DataLoader worker ids."""

    num_workers: int
    skips: list[int]
    rotation: int = 0


@dataclass
class _File:
    url: str  # for messages
    path: str  # inside the filesystem
    row_group_rows: list[int] = field(default_factory=list)
    unreadable: str = ""  # why its footer cannot be read (data.on_corrupt=skip drops the file)


class ParquetBatchReader(IterableDataset):
    """Streams this rank's (and DataLoader worker's) share of the examples as RecapBatches.

    Files are listed and their footers read (and schema-checked) at construction, so a bad URL or
    file fails at once, in the main process. `storage_options` default to `config.storage.options`.
    With `repeat`, the stream starts at `start` (a saved DataPosition; default: the first epoch's start);
    `skip_batches` applies to each worker's own stream (see make_dataloader for the combined stream).
    """

    def __init__(
        self,
        url: str,
        config: RecapConfig,
        batch_size: int,
        rank: int,
        world_size: int,
        *,
        repeat: bool,
        shuffle_seed: int | None = None,
        skip_batches: int = 0,
        pad: bool = False,
        start: DataPosition | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_reader_args(batch_size, rank, world_size, repeat, shuffle_seed, skip_batches, pad, start)
        self.url = url
        self.layout = Layout.of(config)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        self.shuffle_seed = shuffle_seed
        self.skip_batches = skip_batches
        self.pad = pad
        self.storage_options = dict(config.storage.options if storage_options is None else storage_options)
        self._worker_plan: _WorkerPlan | None = None
        self.on_corrupt = config.data.on_corrupt
        self.max_corrupt_fraction = config.data.max_corrupt_fraction
        self.files, self.dropped_files = self._read_footers()
        self.units = [
            _Unit(i, g, rows) for i, f in enumerate(self.files) for g, rows in enumerate(f.row_group_rows)
        ]
        self.unit_index = {(u.file, u.row_group): i for i, u in enumerate(self.units)}
        self.bad_units: dict[int, str] = {}  # unreadable row groups met by this process (skip policy)
        self.num_rows = sum(u.num_rows for u in self.units)
        self.start = start or DataPosition.fresh(0, self.num_rows)
        self._check_corrupt_fraction(0)

    def _read_footers(self) -> tuple[list[_File], list[_File]]:
        """(readable files, unreadable ones). Every rank reads every footer, so with the skip policy
        every rank drops the same files and the row-group order stays identical across ranks."""
        fs, paths = _find_parquet(self.url, self.storage_options)
        files = [_File(_display(self.url, fs, p), p) for p in paths]

        def footer(f: _File) -> None:
            try:
                with errors_named(f.url, "read"), fs.open(f.path, "rb") as fobj:
                    pf = pq.ParquetFile(fobj)
                    md = pf.metadata
            except Exception as e:
                if not is_corrupt(e):
                    raise
                f.unreadable = corrupt_hint(f.url, e)
                return
            check_schema(pf.schema_arrow, self.layout, f.url)
            f.row_group_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]

        with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
            list(pool.map(footer, files))
        bad = [f for f in files if f.unreadable]
        if bad and self.on_corrupt == CorruptDataPolicy.FAIL:
            more = f" ({len(bad) - 1} more unreadable file(s) under {self.url})" if len(bad) > 1 else ""
            raise CorruptDataError(bad[0].unreadable + more)
        if len(bad) == len(files):
            raise CorruptDataError(f"{self.url}: no readable Parquet file; the first: {bad[0].unreadable}")
        for f in bad:
            log(
                f"data.on_corrupt=skip: dropping {f.unreadable.split('; fix or remove')[0]}",
                level=logging.WARNING,
            )
        return [f for f in files if not f.unreadable], bad

    def _check_corrupt_fraction(self, bad_row_groups: int) -> None:
        """Fail when the dropped files (one row group each: their footers are unreadable) and the
        skipped row groups exceed data.max_corrupt_fraction of the dataset's row groups."""
        bad = len(self.dropped_files) + bad_row_groups
        total = len(self.units) + len(self.dropped_files)
        if bad and bad / total > self.max_corrupt_fraction:
            raise CorruptDataError(
                f"{self.url}: {bad} of {total} row groups unreadable ({len(self.dropped_files)} file(s) "
                f"dropped, {bad_row_groups} row group(s) skipped), more than data.max_corrupt_fraction="
                f"{self.max_corrupt_fraction:g}; fix or remove the files named in the log"
            )

    # ------------------------------------------------------------------------------------- planning
    def epoch_order(self, epoch: int) -> list[_Unit]:
        """The row groups in `epoch`'s order (permuted per epoch with a shuffle seed)."""
        if self.shuffle_seed is None:
            return list(self.units)
        order = np.random.default_rng(self.shuffle_seed + epoch).permutation(len(self.units))
        return [self.units[i] for i in order]

    def lane_share(self, position: DataPosition, lane: int, lanes: int) -> tuple[list[tuple[int, int]], int]:
        """Reader `lane` of `lanes`'s rows from `position` (intervals of the epoch's order) and its batch
        count: one contiguous run of the position's rows each, so a reader reads few row groups. With
        repeat every reader gets the same number of full batches; one pass splits every row."""
        if self.repeat:
            n = position.lane_batches(lanes, self.batch_size)
            share = n * self.batch_size
            return position.take(lane * share, (lane + 1) * share), n
        lo, hi = lane * position.rows // lanes, (lane + 1) * position.rows // lanes
        return position.take(lo, hi), -(-(hi - lo) // self.batch_size)

    def rank_rows(self, rank: int) -> int:
        """Rows `rank` reads in one pass (without DataLoader workers)."""
        intervals, _ = self.lane_share(self.start, rank, self.world_size)
        return sum(b - a for a, b in intervals)

    def padded_batches(self) -> int:
        """Batches every rank yields with `pad`: as many as the rank with the most rows needs."""
        return max(self.lane_share(self.start, r, self.world_size)[1] for r in range(self.world_size))

    def worker_batch_counts(self, num_workers: int) -> list[float]:
        """Batches each of this rank's workers yields in total (inf with repeat)."""
        workers = max(num_workers, 1)
        if self.repeat:
            return [math.inf] * workers
        lanes = self.world_size * workers
        return [float(self.lane_share(self.start, self.rank * workers + w, lanes)[1]) for w in range(workers)]

    # ------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[RecapBatch]:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        worker = info.id if info is not None else 0
        skip = self.skip_batches
        plan = self._worker_plan
        if plan is not None and info is not None:
            if plan.num_workers != num_workers:
                raise RuntimeError(
                    f"reader planned for {plan.num_workers} workers runs in a DataLoader with {num_workers}"
                )
            worker = (worker + plan.rotation) % num_workers
            skip = plan.skips[worker]
        if self.pad and info is not None:
            raise RuntimeError("a padded reader runs in the main process (num_workers=0)")
        stream = self._stream(self.rank * num_workers + worker, self.world_size * num_workers, skip)
        if self.pad:
            stream = self._padded(stream)
        keys = self.layout.features
        return (cols.to_batch(keys) for cols in stream)

    def _padded(self, stream: Iterator[Columns]) -> Iterator[Columns]:
        """Exactly padded_batches() batches of batch_size rows: the last partial batch, and any batch
        after this rank's data ends, filled with zero-weight copies of its rows (Columns.padding). Every
        rank then runs as many forward passes of the same size, as a sharded model's collectives need;
        the real rows are the first rank_rows(rank) of the stream."""
        count, last = 0, None
        for cols in stream:
            last = cols
            if cols.num_rows < self.batch_size:
                cols = Columns.concat([cols, cols.padding(self.batch_size - cols.num_rows)])
            yield cols
            count += 1
        for _ in range(count, self.padded_batches()):
            if last is None:
                raise DataError(f"{self.url}: rank {self.rank} has no rows, nothing to pad")
            yield last.padding(self.batch_size)

    def _stream(self, lane: int, lanes: int, skip: int) -> Iterator[Columns]:
        position = self.start
        while True:
            intervals, n = self.lane_share(position, lane, lanes)
            if self.repeat and n == 0 and position.rows == self.num_rows:
                raise DataError(
                    f"{self.url}: {self.num_rows} rows give reader {lane} of {lanes} (rank x worker) less "
                    f"than one batch of {self.batch_size}; use more data, a smaller batch or fewer ranks / "
                    "workers"
                )
            if skip >= n:
                skip -= n
            else:
                yield from self._read(position.epoch, intervals, skip * self.batch_size)
                skip = 0
            if not self.repeat:
                return
            position = DataPosition.fresh(position.epoch + 1, self.num_rows)

    def _read_row_group(self, pf: pq.ParquetFile, unit: _Unit, epoch: int) -> pa.Table:
        """One row group, its rows permuted when shuffling (seeded by seed, epoch and unit, so that a
        resumed reader skips into the same order)."""
        table = pf.read_row_group(unit.row_group, columns=self.layout.columns)
        if self.shuffle_seed is None:
            return table
        rng = np.random.default_rng([self.shuffle_seed, epoch, unit.file, unit.row_group])
        return table.take(rng.permutation(table.num_rows))

    def _pieces(self, epoch: int, intervals: Sequence[tuple[int, int]]) -> Iterator[tuple[_Unit, int, int]]:
        """(row group, first row, end row) pieces covering `intervals` of the epoch's order."""
        order = self.epoch_order(epoch)
        starts = np.concatenate([[0], np.cumsum([u.num_rows for u in order])])
        for a, b in intervals:
            i = int(np.searchsorted(starts, a, side="right")) - 1
            while i < len(order) and starts[i] < b:
                yield order[i], max(a, starts[i]) - starts[i], min(b, starts[i + 1]) - starts[i]
                i += 1

    def _read(self, epoch: int, intervals: Sequence[tuple[int, int]], skip_rows: int) -> Iterator[Columns]:
        """Batches of the rows of `intervals` after the first `skip_rows` (skipped unread where whole)."""
        size = self.batch_size
        opened = _OpenFile(self)
        stand_in = _StandIn(self)
        pending: Columns | None = None
        try:
            for unit, lo, hi in self._pieces(epoch, intervals):
                if skip_rows >= hi - lo:
                    skip_rows -= hi - lo
                    continue
                lo, skip_rows = lo + skip_rows, 0
                where = f"{self.files[unit.file].url} row group {unit.row_group}"
                cols = self._piece(opened, stand_in, unit, epoch, (lo, hi), where)
                if cols is None:
                    continue  # an unreadable row group, stood in for once readable rows come
                pending = cols if pending is None else Columns.concat([pending, cols])
                start = 0
                while pending.num_rows - start >= size:
                    batch = pending.slice(start, start + size)
                    batch.corrupt_units = stand_in.take_new()
                    yield batch
                    start += size
                pending = pending.slice(start, pending.num_rows)
                if pending.num_rows <= cols.num_rows:  # the rows left over all come from this row group
                    pending.sources = (where,)
        finally:
            opened.close()
        stand_in.settle()
        if not self.repeat and pending is not None and pending.num_rows:
            pending.corrupt_units = stand_in.take_new()
            yield pending

    def _piece(
        self,
        opened: _OpenFile,
        stand_in: _StandIn,
        unit: _Unit,
        epoch: int,
        rows: tuple[int, int],
        where: str,
    ) -> Columns | None:
        """Rows [lo, hi) of one row group, decoded; an unreadable one goes to `stand_in` (the policy)."""
        lo, hi = rows
        index = self.unit_index[(unit.file, unit.row_group)]
        if index in self.bad_units:  # met in an earlier epoch: not read again
            return stand_in.replace(index, hi - lo, where, None)
        try:
            with errors_named(self.files[unit.file].url, "read"):
                table = self._read_row_group(opened.get(unit.file), unit, epoch).slice(lo, hi - lo)
        except Exception as e:
            if not is_corrupt(e):
                raise
            opened.close()  # the file may be broken as a whole: reopen it for its next row group
            return stand_in.replace(index, hi - lo, where, e)
        return stand_in.good(_decode(table, self.layout, where))


class _OpenFile:
    """The reader's one open Parquet file (consecutive pieces mostly come from the same file)."""

    def __init__(self, reader: ParquetBatchReader) -> None:
        self.reader = reader
        self.current: tuple[int, Any, pq.ParquetFile] | None = None

    def get(self, file: int) -> pq.ParquetFile:
        if self.current is None or self.current[0] != file:
            self.close()
            fs, _ = url_to_fs(self.reader.url, self.reader.storage_options)
            fobj = fs.open(self.reader.files[file].path, "rb")
            try:
                self.current = (file, fobj, pq.ParquetFile(fobj))
            except BaseException:
                fobj.close()
                raise
        return self.current[2]

    def close(self) -> None:
        if self.current is not None:
            self.current[1].close()
            self.current = None


class _StandIn:
    """data.on_corrupt for a row group that fails mid-run (its file's footer was readable).

    fail: CorruptDataError naming the file and row group. skip: the reader still yields exactly the rows
    (so the batches) it was dealt, because every rank must run every step: the unreadable row group's
    rows are replaced by zero-weight copies of this reader's readable rows (Columns.padding; the
    weighted loss ignores them), from the previous row group read, or the next one when it comes first.
    It is logged once per process and reported on the next batch (`corrupt_units`), which the trainer
    counts over every rank (CorruptTally)."""

    def __init__(self, reader: ParquetBatchReader) -> None:
        self.reader = reader
        self.template: Columns | None = None
        self.owed = 0
        self.new: list[int] = []

    def replace(self, index: int, rows: int, where: str, error: BaseException | None) -> Columns | None:
        reader = self.reader
        if error is not None:
            if reader.on_corrupt == CorruptDataPolicy.FAIL:
                raise CorruptDataError(corrupt_hint(where, error)) from error
            reader.bad_units[index] = _cause(error)
            log(
                f"data.on_corrupt=skip: {where} cannot be read ({_cause(error)}); its {rows} rows are "
                "replaced by zero-weight copies of readable rows",
                rank=ALL_RANKS,
                level=logging.WARNING,
            )
        self.new.append(index)
        if self.template is None:
            self.owed += rows
            return None
        return self.template.padding(rows)

    def good(self, cols: Columns) -> Columns:
        self.template = cols
        if self.owed:
            cols, self.owed = Columns.concat([cols, cols.padding(self.owed)]), 0
        return cols

    def take_new(self) -> tuple[int, ...]:
        new, self.new = tuple(self.new), []
        return new

    def settle(self) -> None:
        if self.owed:
            raise CorruptDataError(
                f"{self.reader.url}: every row group dealt to reader (rank {self.reader.rank}) is "
                "unreadable; nothing to stand in for them (see the log for the files)"
            )


class CorruptTally:
    """The training stream's unreadable row groups over every rank (data.on_corrupt=skip): counted as
    the batches are taken, reduced at each metrics log (a collective), reported as metrics, and the
    run fails on every rank alike once they exceed data.max_corrupt_fraction of the row groups."""

    def __init__(self, reader: ParquetBatchReader, device: torch.device) -> None:
        self.reader, self.device = reader, device
        self.units: set[int] = set()

    def watch(self, batches: Iterator[RecapBatch]) -> Iterator[RecapBatch]:
        for batch in batches:
            self.units.update(batch.corrupt_units)
            yield batch

    def reduce(self) -> dict[str, int]:
        """Collective: metrics.jsonl keys for the unreadable files and distinct row groups so far."""
        import torch.distributed as dist

        count = torch.tensor([len(self.units)], dtype=torch.int64, device=self.device)
        dist.all_reduce(count)
        bad = 0
        if int(count):
            flags = torch.zeros(len(self.reader.units), dtype=torch.int32)
            flags[sorted(self.units)] = 1
            flags = flags.to(self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad = int(flags.sum())
        self.reader._check_corrupt_fraction(bad)
        return {"data_corrupt_files": len(self.reader.dropped_files), "data_corrupt_row_groups": bad}


def _check_reader_args(
    batch_size: int,
    rank: int,
    world_size: int,
    repeat: bool,
    shuffle_seed: int | None,
    skip_batches: int,
    pad: bool,
    start: DataPosition | None,
) -> None:
    if pad and (repeat or skip_batches):
        raise ValueError("pad is for one pass from the start: it needs repeat=False and skip_batches=0")
    if start is not None and not repeat:
        raise ValueError("a start position is for the repeating training stream (repeat=True)")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
    if shuffle_seed is not None and shuffle_seed < 0:
        raise ValueError(f"shuffle_seed must be >= 0, got {shuffle_seed}")


def plan_worker_skips(skip_batches: int, batch_counts: Sequence[float]) -> tuple[list[int], int]:
    """Replay a DataLoader's round-robin over workers with `batch_counts` batches each (exhausted
    workers drop out) for `skip_batches` batches: returns each worker's consumed batches and the
    worker whose batch comes next (the rotation for the resumed DataLoader's worker ids)."""
    workers = len(batch_counts)
    consumed = [0] * workers
    remaining = skip_batches
    while remaining > 0:
        active = [w for w in range(workers) if consumed[w] < batch_counts[w]]
        if not active:
            break
        rounds = min(batch_counts[w] - consumed[w] for w in active)
        if remaining >= rounds * len(active):  # finite: some worker runs out within these rounds
            for w in active:
                consumed[w] += int(rounds)
            remaining -= int(rounds) * len(active)
            continue
        q, r = divmod(remaining, len(active))
        for i, w in enumerate(active):
            consumed[w] += q + (1 if i < r else 0)
        return consumed, active[r] if r else 0
    return consumed, 0


def _identity(batch: RecapBatch) -> RecapBatch:
    return batch


def make_dataloader(
    url: str,
    config: RecapConfig,
    batch_size: int,
    rank: int,
    world_size: int,
    *,
    num_workers: int = 0,
    repeat: bool = True,
    skip_batches: int = 0,
    shuffle_seed: int | None = None,
    pad: bool = False,
    start: DataPosition | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DataLoader:
    """A DataLoader over this rank's share of `url`, yielding RecapBatches of `batch_size` (per rank).

    `skip_batches` skips exactly that many batches of the loader's combined stream, whatever
    `num_workers` is (see the module docstring). `pad` (one pass, num_workers=0): every rank yields
    the same number of full batches (ParquetBatchReader._padded). Pins memory only when CUDA is available.
    """
    reader = ParquetBatchReader(
        url,
        config,
        batch_size,
        rank,
        world_size,
        repeat=repeat,
        shuffle_seed=shuffle_seed,
        skip_batches=skip_batches if num_workers == 0 else 0,
        pad=pad,
        start=start,
        storage_options=storage_options,
    )
    if num_workers > 0:
        skips, rotation = plan_worker_skips(skip_batches, reader.worker_batch_counts(num_workers))
        reader._worker_plan = _WorkerPlan(num_workers, skips, rotation)
    return DataLoader(
        reader,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=torch.cuda.is_available(),
    )
