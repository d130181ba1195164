"""Bad days (issue 10): corrupt data, corrupt checkpoints and broken storage end cleanly, naming the file
or URL and the cause in one line, with nothing lost. Real processes, real emulators on 127.0.0.1, real
(tmpfs) filesystems; see docs/robustness.md "Bad days: corrupt files and broken storage".

The one-process runs that only have to fail are started together (a thread each): each costs ~10 s of
imports on two cores, the checks themselves are instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import storage_servers
import torch
from e2e_lib import Result, run, torchrun
from torchx.specs.finder import ComponentValidationException

from recap_app import data, storage, synthetic_data
from recap_app.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    list_steps,
    load_checkpoint,
)
from recap_app.config import CheckpointConfig, RecapConfig, load_config
from recap_app.export import load_unsharded

RECAP = str(Path(sys.executable).parent / "recap")
TRAIN = ["-m", "recap_app.train"]
FAST = ["training.log_every_n=2", "eval.num_batches=1", "embedding_log.every_n=0"]


def last_line(res: Result) -> str:
    return res.output.rstrip().splitlines()[-1] if res.output.strip() else ""


# Storage settings a job must not inherit from the test process (each job says what it needs).
_STORE_ENV = ("AWS_", "AZURE_", "STORAGE_EMULATOR_HOST", "FSSPEC_")


def run_together(*jobs: tuple[list[str], dict[str, str], Path]) -> list[Result]:
    """(command, extra env, cwd) jobs run concurrently, with no storage settings but their own; their
    Results in order (none checked)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(_STORE_ENV)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(run, cmd, env={**base, **env}, inherit_env=False, cwd=cwd, timeout=240, check=False)
            for cmd, env, cwd in jobs
        ]
        return [f.result() for f in futures]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs at `path` (needs root and mount permission; the test is skipped, saying why, without)."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): needs root / CAP_SYS_ADMIN"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------------------------------------ corrupt data
TABLES = (
    "model.embeddings.tables=["
    "{name: user, num_embeddings: 100, embedding_dim: 4, feature_names: [user_id]},"
    "{name: author, num_embeddings: 50, embedding_dim: 4, feature_names: [author_id]}]"
)


def small_config(*overrides: str) -> RecapConfig:
    return load_config("local", ["data.num_continuous=4", "data.num_binary=2", TABLES, *overrides])


def truncate(path: str | Path) -> None:
    """Cut a file in half (its Parquet footer goes with the second half)."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def break_row_group(path: str | Path, row_group: int) -> None:
    """Overwrite the first page header of a row group's first column: the footer stays readable, reading
    that row group fails ("Couldn't deserialize thrift")."""
    offset = pq.ParquetFile(str(path)).metadata.row_group(row_group).column(0).data_page_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)


def parquet_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


def test_unreadable_files_fail_naming_them_or_are_dropped(tmp_path):
    """A truncated file and a CSV named .parquet among good ones: fail names the file and what to do;
    skip drops both on every rank alike (same row-group order everywhere) and reads every other row;
    more than data.max_corrupt_fraction of the row groups dropped fails."""
    root = tmp_path / "ds"
    synthetic_data.write_synthetic_dataset(
        str(root), small_config(), 2000, num_files=4, rows_per_group=64, seed=3
    )
    files = parquet_files(root)
    good_rows = sum(pq.ParquetFile(str(f)).metadata.num_rows for f in files[:2])
    truncate(files[2])
    files[3].write_text("a,b\n1,2\n")  # a CSV named .parquet

    with pytest.raises(data.CorruptDataError) as e:
        data.ParquetBatchReader(str(root), small_config(), 64, 0, 1, repeat=False)
    msg = str(e.value)
    assert msg.startswith(
        f"{files[2]}: cannot be read as Parquet (ArrowInvalid: Parquet magic bytes not found"
    )
    assert "(1 more unreadable file(s) under" in msg and "set data.on_corrupt=skip" in msg, msg
    assert "\n" not in msg

    skip = small_config("data.on_corrupt=skip", "data.max_corrupt_fraction=0.2")
    readers = [data.ParquetBatchReader(str(root), skip, 50, r, 2, repeat=False) for r in range(2)]
    assert [[f.url for f in r.dropped_files] for r in readers] == [[str(files[2]), str(files[3])]] * 2
    assert readers[0].units == readers[1].units and readers[0].num_rows == good_rows
    assert sum(b.batch_size for r in readers for b in r) == good_rows
    # 2 dropped files of 16 + 2 row groups (a dropped file counts as one): 11 % > 10 %
    with pytest.raises(
        data.CorruptDataError, match=r"2 of 18 row groups unreadable .* data.max_corrupt_fraction=0.1;"
    ):
        data.ParquetBatchReader(str(root), small_config("data.on_corrupt=skip"), 50, 0, 1, repeat=False)


def test_row_group_failing_mid_run_keeps_every_rank_in_step(tmp_path):
    """A row group whose footer entry is fine but whose pages are not: fail names file and row group;
    skip yields exactly the clean run's batches on every rank (lockstep), the bad rows replaced by
    zero-weight copies of readable rows (from the next row group when the bad one comes first), and
    reports each once on a batch (`corrupt_units`)."""
    root = tmp_path / "ds"
    synthetic_data.write_synthetic_dataset(
        str(root), small_config(), 2000, num_files=3, rows_per_group=64, seed=7
    )
    clean = [
        [
            b.weights.clone()
            for b in data.ParquetBatchReader(
                str(root), small_config(), 32, r, 2, repeat=False, shuffle_seed=5
            )
        ]
        for r in range(2)
    ]
    probe = data.ParquetBatchReader(str(root), small_config(), 32, 0, 2, repeat=False, shuffle_seed=5)
    order = probe.epoch_order(0)
    first, later = order[0], order[3]  # rank 0's first row group (nothing read before it) and a later one
    for unit in (first, later):
        break_row_group(probe.files[unit.file].path, unit.row_group)

    with pytest.raises(data.CorruptDataError) as e:
        list(data.ParquetBatchReader(str(root), small_config(), 32, 0, 2, repeat=False, shuffle_seed=5))
    assert str(e.value).startswith(
        f"{probe.files[first.file].url} row group {first.row_group}: cannot be read as Parquet "
        "(OSError: Couldn't deserialize thrift"
    )

    skip = small_config("data.on_corrupt=skip")
    bad = {probe.unit_index[(u.file, u.row_group)] for u in (first, later)}
    for rank in range(2):
        reader = data.ParquetBatchReader(str(root), skip, 32, rank, 2, repeat=False, shuffle_seed=5)
        batches = list(reader)
        assert [b.batch_size for b in batches] == [len(w) for w in clean[rank]]  # the same batches
        reported = [u for b in batches for u in b.corrupt_units]
        zero_rows = sum(int((b.weights == 0).all(dim=1).sum()) for b in batches)
        clean_zero_rows = sum(int((w == 0).all(dim=1).sum()) for w in clean[rank])
        if rank == 0:
            assert sorted(reported) == sorted(bad) and set(reader.bad_units) == bad
            assert zero_rows - clean_zero_rows == first.num_rows + later.num_rows
        else:
            assert reported == [] and zero_rows == clean_zero_rows


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory) -> Path:
    """The local config's data: 4 files of 2048 rows in 256-row groups (32 row groups)."""
    root = tmp_path_factory.mktemp("bad-days-data")
    config = load_config("local", [])
    synthetic_data.write_synthetic_dataset(
        str(root / "train"), config, 8192, num_files=4, rows_per_group=256, seed=1
    )
    synthetic_data.write_synthetic_dataset(
        str(root / "eval"), config, 1024, num_files=1, rows_per_group=256, seed=2
    )
    return root


def test_training_on_a_truncated_file_fails_naming_it_or_skips_and_counts(local_dataset, tmp_path):
    """`recap train` with a truncated Parquet file among good ones: exits 1 with one line naming the file
    and what to do. With data.on_corrupt=skip, 2 ranks under torchrun (and a row group of rank 0's run
    broken too) it finishes, and metrics.jsonl counts the dropped file and the skipped row group."""
    train = tmp_path / "train"
    shutil.copytree(local_dataset / "train", train)
    files = parquet_files(train)
    truncate(files[1])
    config = load_config("local", [])
    reader = data.ParquetBatchReader(
        str(train),
        load_config("local", ["data.on_corrupt=skip"]),
        128,
        0,
        2,
        repeat=True,
        shuffle_seed=config.training.seed,
    )
    unit = reader.epoch_order(0)[1]  # rank 0 reads it in its first steps
    break_row_group(reader.files[unit.file].path, unit.row_group)
    urls = [f"data.train_url={train}", f"data.eval_url={local_dataset / 'eval'}"]
    steps = ["training.num_train_steps=6", "checkpoint.every_n=0", *FAST]
    fail, skip = run_together(
        ([RECAP, "train", "--output", str(tmp_path / "fail"), *urls, *steps], {}, tmp_path),
        (
            [*torchrun(2, *TRAIN), "--output", str(tmp_path / "skip"), *urls, *steps, "data.on_corrupt=skip"],
            {},
            tmp_path,
        ),
    )
    assert fail.returncode == 1, fail.tail()
    assert last_line(fail) == (
        f"recap: error: {files[1]}: cannot be read as Parquet (ArrowInvalid: Parquet magic bytes not found "
        "in footer. Either the file is corrupted or this is not a parquet file.); fix or remove the file and "
        "run again (the run resumes from its last checkpoint), or set data.on_corrupt=skip to train "
        "without it"
    ), fail.tail()
    assert "Traceback" not in fail.output

    assert skip.returncode == 0, skip.tail()
    assert f"data.on_corrupt=skip: dropping {files[1]}: cannot be read as Parquet" in skip.output
    where = f"{reader.files[unit.file].url} row group {unit.row_group}"
    assert (
        f"data.on_corrupt=skip: {where} cannot be read (OSError: Couldn't deserialize thrift" in skip.output
    )
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert train_records[-1]["data_corrupt_files"] == 1 and train_records[-1]["data_corrupt_row_groups"] == 1
    assert all(np.isfinite(r["loss"]) for r in train_records)


# ------------------------------------------------------------------------------------ corrupt checkpoints
def test_truncated_shard_falls_back_to_the_previous_step(local_dataset, tmp_path):
    """2 ranks save steps 2 and 4; rank 1's shard of step 4 is truncated. checkpoint.on_corrupt=fail
    names the step and the file in one line; the default (fallback) moves step-4 to step-4.corrupt
    (kept, ignored by list_steps), resumes from step 2 and finishes; a truncated .metadata is named too."""
    out = tmp_path / "run"
    urls = [f"data.train_url={local_dataset / 'train'}", f"data.eval_url={local_dataset / 'eval'}"]
    base = ["checkpoint.every_n=2", "checkpoint.keep_latest_k=0", *FAST, *urls]
    run(
        [*torchrun(2, *TRAIN), "--output", str(out), "training.num_train_steps=4", *base],
        cwd=tmp_path,
        what="first run",
    )
    root = out / "checkpoints"
    shard = root / "step-4" / "__1_0.distcp"
    truncate(shard)
    truncated_size = shard.stat().st_size

    fail = run(
        [RECAP, "train", "--output", str(out), "training.num_train_steps=6", "checkpoint.on_corrupt=fail",
         *base],
        cwd=tmp_path, check=False, timeout=240,
    )  # fmt: skip
    assert fail.returncode == 1, fail.tail()
    assert last_line(fail).startswith(f"recap: error: checkpoint {shard}: cannot be read ("), fail.tail()
    assert last_line(fail).endswith(
        "; step-4 is corrupt: move it away to resume from the previous step, or set "
        "checkpoint.on_corrupt=fallback"
    )
    assert list_steps(str(root)) == ([2, 4], [])  # fail touches nothing

    res = run(
        [*torchrun(2, *TRAIN), "--output", str(out), "training.num_train_steps=6", *base],
        cwd=tmp_path,
        check=False,
        timeout=240,
    )
    assert res.returncode == 0, res.tail()
    assert f"CORRUPT CHECKPOINT: checkpoint {shard}: cannot be read (" in res.output, res.tail()
    assert f"moved step-4 to {root}/step-4.corrupt (kept for inspection)" in res.output
    assert f"resumed from {root}/step-2 at step 2" in res.output
    assert sorted(p.name for p in (root / "step-4.corrupt").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert (root / "step-4.corrupt" / "__1_0.distcp").stat().st_size == truncated_size  # kept as found
    assert list_steps(str(root)) == ([2, 4, 6], [])  # step-4 saved again by the resumed run
    config = load_config("local", [])
    for step in (2, 4, 6):
        weights = load_unsharded(config, str(root / f"step-{step}")).state_dict()
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())

    # a truncated .metadata: named, in one process too
    broken = tmp_path / "step-2-copy"
    shutil.copytree(root / "step-2", broken)
    truncate(broken / ".metadata")
    with pytest.raises(CheckpointCorruptError, match=rf"^checkpoint {broken}/\.metadata: cannot be read \("):
        load_checkpoint(str(broken), {"train_state": {}}, no_dist=True)


class _Step:
    """A stand-in train state: the Checkpointer's parts are anything with state_dict / load_state_dict."""

    def __init__(self, step: int) -> None:
        self.step = step

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step), "w": torch.full((1000,), float(self.step))}

    def load_state_dict(self, state) -> None:
        self.step = int(state["step"])


def test_corrupt_checkpoint_on_an_object_store_is_copied_aside(s3_server, monkeypatch):
    """On S3 (no rename) the corrupt step is copied to step-N.corrupt, then its .metadata deleted first,
    then the rest; the load falls back to the previous complete step."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    storage.fsspec_clear_instance_caches()
    root = s3_server.url(f"bad-days-{os.urandom(4).hex()}/checkpoints")
    cfg = CheckpointConfig(async_save=False)
    for step in (10, 20):
        Checkpointer(cfg, root, {"train_state": _Step(step)}).save(step, last_step=True)
    fs, path = storage.url_to_fs(f"{root}/step-20/__0_0.distcp")
    fs.pipe_file(path, fs.cat_file(path)[:100])  # truncated

    state = _Step(0)
    assert Checkpointer(cfg, root, {"train_state": state}).load()
    assert state.step == 10
    assert list_steps(root) == ([10], [])
    corrupt = sorted(p.rsplit("/", 1)[-1] for p in fs.find(storage.url_to_fs(f"{root}/step-20.corrupt")[1]))
    assert corrupt == [".metadata", "__0_0.distcp"]
    assert not fs.exists(storage.url_to_fs(f"{root}/step-20")[1])


# ----------------------------------------------------------------------------------------- broken storage
def test_unreachable_endpoints_fail_within_connect_timeout(monkeypatch):
    """S3, GCS and Azure endpoints on a closed port: a StorageUnreachableError naming the URL and endpoint
    after storage.connect_timeout_s of retries (Azure's client alone took 102 s), not a client's own
    minutes of retries."""
    port = closed_port()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={storage_servers.AZURE_KEY};"
        f"BlobEndpoint={endpoint}/devstoreaccount1;",
    )
    storage.fsspec_clear_instance_caches()
    monkeypatch.setattr(storage, "CONNECT_TIMEOUT_S", 2.0)
    for url in ("s3://bucket/run", "gs://bucket/run", "az://container/run"):
        start = time.monotonic()
        with pytest.raises(storage.StorageUnreachableError) as e:
            storage.write(f"{url}/x.txt", "hi")
        took = time.monotonic() - start
        assert 1.5 < took < 4.0, (url, took)
        assert str(e.value).startswith(f"cannot reach {url}/x.txt: endpoint {endpoint}")
        assert "within storage.connect_timeout_s=2s (ConnectionRefusedError" in str(e.value)
    storage.fsspec_clear_instance_caches()


class _AuthMoto(storage_servers.MotoS3Server):
    """moto with authentication on after its first request (the bucket's creation): keys it never issued
    are refused, as by AWS (the shared server accepts any key)."""

    def child_env(self) -> dict[str, str]:
        return {**super().child_env(), "INITIAL_NO_AUTH_ACTION_COUNT": "1"}


def test_storage_failures_end_with_one_line(s3_server, tmp_path):
    """Each broken output or config, one `recap train` each (run together): the last line is
    `recap: error: cannot <do what> <url>: <cause in words>`, no traceback, before any data is generated."""
    with _AuthMoto() as auth_s3, mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        afile = tmp_path / "afile"
        afile.write_text("not a directory")
        storage.fsspec_clear_instance_caches()
        config_url = s3_server.url(f"bad-days-{os.urandom(4).hex()}/config.yaml")
        fs, path = storage.url_to_fs(config_url, s3_server.storage_options)
        fs.pipe_file(path, Path(__file__).parent.parent.joinpath("recap_app/configs/local.yaml").read_bytes())
        no_keys = {
            k: v
            for k, v in s3_server.env.items()
            if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")
        }
        no_keys |= {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
        s3_out = auth_s3.url("run")
        closed = f"http://127.0.0.1:{closed_port()}"
        cases = {
            "read-only": ([RECAP, "train", "--output", f"{ro}/run"], {}),
            "file in path": ([RECAP, "train", "--output", f"{afile}/run"], {}),
            "wrong keys": (
                [RECAP, "train", "--output", s3_out],
                {**auth_s3.env, "AWS_SECRET_ACCESS_KEY": "wrong"},
            ),
            "no keys": ([RECAP, "train", "--config", config_url], no_keys),
            "unreachable": (
                [RECAP, "train", "--output", "s3://recap-test/run", "storage.connect_timeout_s=3"],
                {**s3_server.env, "AWS_ENDPOINT_URL": closed, "FSSPEC_S3_ENDPOINT_URL": closed},
            ),
            "summary": ([RECAP, "summary", str(tmp_path / "no-run")], {}),
        }
        results = dict(
            zip(cases, run_together(*[(cmd, env, tmp_path) for cmd, env in cases.values()]), strict=True)
        )
        assert os.listdir(ro) == []
    expected = {
        "read-only": f"cannot write {ro}/run/lease.json: read-only file system",
        "file in path": f"cannot read {afile}/run/lease.json: {afile} is a file, not a directory",
        "wrong keys": f"cannot read {s3_out}/lease.json: permission denied, wrong or insufficient "
        "credentials (PermissionError: ",
        "no keys": f"cannot read config {config_url}: no credentials found (NoCredentialsError: Unable to "
        "locate credentials); set AWS_ACCESS_KEY_ID",
        "unreachable": f"cannot reach s3://recap-test/run: endpoint {closed} accepted no connection within "
        "storage.connect_timeout_s=3s (ConnectionRefusedError",
        "summary": f"no run at {tmp_path / 'no-run'} (nothing there; give the --output of a run)",
    }
    expected = {name: f"recap: error: {line}" for name, line in expected.items()}
    wrong = {
        name: res.tail(5)
        for name, res in results.items()
        if res.returncode != 1 or not last_line(res).startswith(expected[name]) or "Traceback" in res.output
    }
    assert not wrong, wrong
    assert afile.read_text() == "not a directory"


def test_full_disk_fails_with_no_space_left_and_keeps_earlier_checkpoints(local_dataset, tmp_path):
    """--output on a 3 MB tmpfs: steps 2 and 4 fit (1.1 MB each), the final save of step 6 does not: three
    attempts, then `recap: error: checkpoint save to <url>/step-6 failed (...): no space left on device`;
    steps 2 and 4 stay complete and load."""
    with mounted_tmpfs(tmp_path / "small", "size=3m") as small:
        out = small / "run"
        urls = [f"data.train_url={local_dataset / 'train'}", f"data.eval_url={local_dataset / 'eval'}"]
        steps = ["training.num_train_steps=6", "checkpoint.every_n=2", "checkpoint.keep_latest_k=0", *FAST]
        res = run(
            [RECAP, "train", "--output", str(out), *urls, *steps], cwd=tmp_path, check=False, timeout=240
        )
        assert res.returncode == 1, res.tail()
        line = last_line(res)
        assert line.startswith(
            f"recap: error: checkpoint save to {out}/checkpoints/step-6 failed (final save, 3 attempts): "
            "no space left on device ["
        ), res.tail()
        assert "Traceback" not in res.output
        assert list_steps(str(out / "checkpoints"))[0] == [2, 4]
        config = load_config("local", [])
        for step in (2, 4):
            weights = load_unsharded(config, str(out / "checkpoints" / f"step-{step}")).state_dict()
            assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


# ------------------------------------------------------------------------------------ config-only checks
def test_bad_shapes_fail_before_any_data_or_process_group(tmp_path):
    """`-j 1x0` (TorchX would divide by zero) and a global batch that does not split over -j are refused
    by the component; under torchrun the trainer refuses the batch before generating data."""
    from torchx_components import recap

    with pytest.raises(ComponentValidationException, match=r"^recap: error: -j 1x0: needs at least one node"):
        recap.train(j="1x0")
    with pytest.raises(
        ComponentValidationException,
        match=r"global_batch_size=255 must be divisible by the world size 2 \(-j 1x2\)",
    ):
        recap.train("data.global_batch_size=255", j="1x2")
    out = tmp_path / "run"
    res = run(
        [*torchrun(2, *TRAIN), "--output", str(out), "data.global_batch_size=255"],
        cwd=tmp_path,
        check=False,
        timeout=180,
    )
    assert res.returncode != 0
    assert "recap: error: data.global_batch_size=255 must be divisible by the world size 2" in res.output, (
        res.tail()
    )
    assert not out.exists()  # no data generated, no lease taken
