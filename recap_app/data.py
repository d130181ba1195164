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
                                                                     0..n ids per example, each in
                                                                     [0, num_embeddings) of its table;
                                                                     a null list reads as empty
``label/<task name>``   ``float32``                                  0/1 label, one per ``model.tasks``
                                                                     entry (e.g. ``label/recap.engagement
                                                                     .is_favorited``)
``weight/<task name>``  ``float32``                                  example weight for that task
======================  ===========================================  =====================================

Also accepted on read (Spark and friends write these): ``list<float>`` / ``large_list`` for
``continuous`` / ``binary`` when every row has the configured width, any integer list type for id
features, and any numeric or boolean type for labels and weights (all cast to the types above).
Missing columns, a wrong fixed-list width, nulls in dense / label / weight columns, labels other than
0 / 1, weights that are negative or not finite, and ids outside their table raise ``ParquetSchemaError``
naming the file URL, the row group and the column(s).

A batch is a ``RecapBatch``: continuous [B, N_c] and binary [B, N_b] float32, a ``KeyedJaggedTensor``
whose keys are the sparse feature names in config order (lengths int32, values int64), labels and
weights [B, T] float32 with tasks in config order.

Reading
-------
``url`` is a file, a directory (searched recursively for ``*.parquet`` / ``*.parq``, skipping names
that start with ``_`` or ``.``), a glob, or a key prefix, on any fsspec backend. The work units are
the (file, row group) pairs in sorted file order; in each epoch unit i (after an optional per-epoch
shuffle with seed ``shuffle_seed + epoch``) belongs to global reader ``i % (world_size * num_workers)``,
where global reader = ``rank * num_workers + worker``. With ``shuffle_seed`` the rows inside each row
group are permuted as well, differently every epoch (seeded by seed, epoch and row group). Each reader
streams its row groups, carries leftover rows across row groups and yields batches of exactly
``batch_size`` rows; with ``repeat`` it loops over epochs forever and drops each epoch's last partial
batch, without it the last partial batch is yielded once. ``skip_batches`` skips batches using the
Parquet footers' row counts: whole row groups are skipped unread, only the one holding the resume
point is decoded.

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
from recap_app.config import RecapConfig
from recap_app.errors import InputError
from recap_app.storage import has_scheme, url_to_fs

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


# ---------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Layout:
    """What the config asks of a file: column names and shapes."""

    num_continuous: int
    num_binary: int
    features: tuple[str, ...]
    table_sizes: tuple[int, ...]  # num_embeddings of each feature's table
    tasks: tuple[str, ...]

    @staticmethod
    def of(config: RecapConfig) -> Layout:
        features, sizes = [], []
        for table in config.model.embeddings.tables:
            for name in table.feature_names:
                features.append(name)
                sizes.append(table.num_embeddings)
        return Layout(
            num_continuous=config.data.num_continuous,
            num_binary=config.data.num_binary,
            features=tuple(features),
            table_sizes=tuple(sizes),
            tasks=tuple(config.task_names),
        )

    @property
    def columns(self) -> list[str]:
        cols = [CONTINUOUS] + ([BINARY] if self.num_binary else []) + list(self.features)
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
    for name, width, key in (
        (CONTINUOUS, layout.num_continuous, "data.num_continuous"),
        (BINARY, layout.num_binary, "data.num_binary"),
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


def _scalar(table: pa.Table, name: str, where: str) -> np.ndarray:
    arr = _column(table, name)
    if arr.null_count:
        raise ParquetSchemaError(f"{where}: column {name!r} has {arr.null_count} null value(s)")
    return np.array(arr.to_numpy(zero_copy_only=False), dtype=np.float32)


def _ids(table: pa.Table, name: str, size: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """An id list column as (offsets [rows + 1], ids), every id checked against its table's size."""
    arr = _column(table, name)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    values = arr.flatten()
    if values.null_count:
        raise ParquetSchemaError(f"{where}: column {name!r} holds {values.null_count} null id(s)")
    ids = np.array(values.to_numpy(zero_copy_only=False), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        bad = ids[(ids < 0) | (ids >= size)]
        raise ParquetSchemaError(
            f"{where}: column {name!r} has id(s) outside [0, {size}) of its embedding table, "
            f"e.g. {bad[:5].tolist()} (raise num_embeddings or hash the ids)"
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
        [_ids(table, f, size, where) for f, size in zip(layout.features, layout.table_sizes, strict=True)],
        _targets(table, [label_column(t) for t in layout.tasks], where, labels=True),
        _targets(table, [weight_column(t) for t in layout.tasks], where, labels=False),
        (where,),
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


class ParquetBatchReader(IterableDataset):
    """Streams this rank's (and DataLoader worker's) share of Parquet row groups as RecapBatches.

    Files are listed and their footers read (and schema-checked) at construction, so a bad URL or
    file fails at once, in the main process. `storage_options` default to `config.storage.options`.
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
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pad and (repeat or skip_batches):
            raise ValueError("pad is for one pass from the start: it needs repeat=False and skip_batches=0")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        if shuffle_seed is not None and shuffle_seed < 0:
            raise ValueError(f"shuffle_seed must be >= 0, got {shuffle_seed}")
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

        fs, paths = _find_parquet(url, self.storage_options)
        self.files = [_File(_display(url, fs, p), p) for p in paths]

        def footer(f: _File) -> None:
            with fs.open(f.path, "rb") as fobj:
                pf = pq.ParquetFile(fobj)
                check_schema(pf.schema_arrow, self.layout, f.url)
                md = pf.metadata
                f.row_group_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]

        if len(self.files) > 1:
            with ThreadPoolExecutor(max_workers=min(16, len(self.files))) as pool:
                list(pool.map(footer, self.files))
        else:
            footer(self.files[0])
        self.units = [
            _Unit(i, g, rows) for i, f in enumerate(self.files) for g, rows in enumerate(f.row_group_rows)
        ]
        self.num_rows = sum(u.num_rows for u in self.units)
        self._check_enough_units(1)

    # ------------------------------------------------------------------------------------- planning
    def _check_enough_units(self, num_workers: int) -> None:
        readers = self.world_size * max(num_workers, 1)
        if len(self.units) < readers:
            raise DataError(
                f"{self.url}: {len(self.units)} row group(s) in {len(self.files)} file(s) is fewer than "
                f"ranks x workers = {self.world_size} x {max(num_workers, 1)} = {readers}, so some reader "
                "would get no data; write more (smaller) row groups or use fewer ranks / workers"
            )

    def epoch_units(self, epoch: int, reader: int, num_readers: int) -> list[_Unit]:
        """The units global reader `reader` of `num_readers` reads in `epoch`, in order."""
        order: Sequence[int] = range(len(self.units))
        if self.shuffle_seed is not None:
            order = np.random.default_rng(self.shuffle_seed + epoch).permutation(len(self.units))
        return [self.units[order[i]] for i in range(reader, len(self.units), num_readers)]

    def _epoch_batches(self, units: Sequence[_Unit]) -> int:
        rows = sum(u.num_rows for u in units)
        return rows // self.batch_size if self.repeat else -(-rows // self.batch_size)

    def rank_rows(self, rank: int) -> int:
        """Rows `rank` reads in one epoch (without DataLoader workers)."""
        return sum(u.num_rows for u in self.epoch_units(0, rank, self.world_size))

    def padded_batches(self) -> int:
        """Batches every rank yields with `pad`: as many as the rank with the most rows needs."""
        return max(
            self._epoch_batches(self.epoch_units(0, r, self.world_size)) for r in range(self.world_size)
        )

    def worker_batch_counts(self, num_workers: int) -> list[float]:
        """Batches each of this rank's workers yields in total (inf with repeat)."""
        workers = max(num_workers, 1)
        if self.repeat:
            return [math.inf] * workers
        readers = self.world_size * workers
        return [
            float(self._epoch_batches(self.epoch_units(0, self.rank * workers + w, readers)))
            for w in range(workers)
        ]

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
        self._check_enough_units(num_workers)
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
                raise DataError(f"{self.url}: rank {self.rank} has only empty row groups, nothing to pad")
            yield last.padding(self.batch_size)

    def _stream(self, reader: int, num_readers: int, skip: int) -> Iterator[Columns]:
        epoch = 0
        while True:
            units = self.epoch_units(epoch, reader, num_readers)
            n = self._epoch_batches(units)
            if self.repeat and n == 0:
                raise DataError(
                    f"{self.url}: reader {reader} of {num_readers} (rank x worker) gets "
                    f"{sum(u.num_rows for u in units)} rows in epoch {epoch}, less than one batch of "
                    f"{self.batch_size}; use more data, a smaller batch or fewer ranks / workers"
                )
            if skip >= n:
                skip -= n
            else:
                yield from self._read_epoch(units, skip * self.batch_size, epoch)
                skip = 0
            if not self.repeat:
                return
            epoch += 1

    def _read_row_group(self, pf: pq.ParquetFile, unit: _Unit, epoch: int) -> pa.Table:
        """One row group, its rows permuted when shuffling (seeded by seed, epoch and unit, so that a
        resumed reader skips into the same order)."""
        table = pf.read_row_group(unit.row_group, columns=self.layout.columns)
        if self.shuffle_seed is None:
            return table
        rng = np.random.default_rng([self.shuffle_seed, epoch, unit.file, unit.row_group])
        return table.take(rng.permutation(table.num_rows))

    def _read_epoch(self, units: Sequence[_Unit], skip_rows: int, epoch: int) -> Iterator[Columns]:
        fs, _ = url_to_fs(self.url, self.storage_options)
        size = self.batch_size
        current: tuple[int, Any, pq.ParquetFile] | None = None
        pending: Columns | None = None
        try:
            for unit in units:
                if skip_rows >= unit.num_rows:  # footers say how many rows: skip unread
                    skip_rows -= unit.num_rows
                    continue
                if current is None or current[0] != unit.file:
                    if current is not None:
                        current[1].close()
                    fobj = fs.open(self.files[unit.file].path, "rb")
                    current = (unit.file, fobj, pq.ParquetFile(fobj))
                where = f"{self.files[unit.file].url} row group {unit.row_group}"
                cols = _decode(self._read_row_group(current[2], unit, epoch), self.layout, where)
                if skip_rows:
                    cols = cols.slice(skip_rows, cols.num_rows)
                    skip_rows = 0
                pending = cols if pending is None else Columns.concat([pending, cols])
                start = 0
                while pending.num_rows - start >= size:
                    yield pending.slice(start, start + size)
                    start += size
                pending = pending.slice(start, pending.num_rows)
                if pending.num_rows <= cols.num_rows:  # the rows left over all come from this row group
                    pending.sources = (where,)
        finally:
            if current is not None:
                current[1].close()
        if not self.repeat and pending is not None and pending.num_rows:
            yield pending


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
        storage_options=storage_options,
    )
    if num_workers > 0:
        reader._check_enough_units(num_workers)
        skips, rotation = plan_worker_skips(skip_batches, reader.worker_batch_counts(num_workers))
        reader._worker_plan = _WorkerPlan(num_workers, skips, rotation)
    return DataLoader(
        reader,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=torch.cuda.is_available(),
    )
