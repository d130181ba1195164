"""A missing bucket / container is an error naming the URL, never created: S3 (moto), GCS
(gcp-storage-emulator) and Azure (azurite), real servers on 127.0.0.1."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import fsspec
import pytest
from e2e_lib import run

from recap_app import storage

RECAP = str(Path(sys.executable).parent / "recap")
SCHEMES = {"s3": "s3", "gcs": "gs", "azure": "az"}


def missing_name() -> str:
    return f"no-such-bucket-{uuid.uuid4().hex[:8]}"


def raw_fs(backend: str, server) -> fsspec.AbstractFileSystem:
    """The backend's filesystem without recap (no bucket check), with listings uncached."""
    return fsspec.filesystem(
        SCHEMES[backend], skip_instance_cache=True, use_listings_cache=False, **server.storage_options
    )


def test_s3fs_makedirs_creates_missing_buckets(s3_server):
    """Why the check exists: plain s3fs creates a bucket when asked to make a folder under it."""
    fs, bucket = raw_fs("s3", s3_server), missing_name()
    fs.makedirs(f"{bucket}/x", exist_ok=True)
    assert fs.exists(bucket)


@pytest.mark.parametrize("backend", list(SCHEMES))
def test_write_to_missing_bucket_fails_and_creates_nothing(request, backend: str, monkeypatch):
    server = request.getfixturevalue(f"{backend}_server")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    storage.fsspec_clear_instance_caches()
    bucket = missing_name()
    url = f"{SCHEMES[backend]}://{bucket}/run/metrics.jsonl"
    what = "container" if backend == "azure" else "bucket"
    with pytest.raises(storage.BucketNotFoundError) as err:
        storage.write(url, "{}\n")
    assert str(err.value) == f"{what} {bucket!r} of {url} does not exist (recap does not create {what}s)"
    assert not raw_fs(backend, server).exists(bucket)
    # an existing bucket still works, and is checked once
    ok = server.url(f"buckets-{uuid.uuid4().hex[:8]}/x.txt")
    storage.write(ok, "hi")
    assert storage.exists(ok)
    assert (SCHEMES[backend], server.bucket) in storage._EXISTING_BUCKETS


def test_train_into_missing_bucket_fails_with_one_line(s3_server, tmp_path: Path):
    """`recap train --output s3://no-such-bucket/x`: `recap: error: bucket ... does not exist`, exit 1, and
    the bucket still does not exist (the synthetic data, metrics and checkpoints would each create it)."""
    bucket = missing_name()
    out = f"s3://{bucket}/x"
    res = run(
        [RECAP, "train", "--output", out, "training.num_train_steps=1"],
        env=s3_server.env, cwd=tmp_path, timeout=180, check=False,
    )  # fmt: skip
    assert res.returncode == 1, res.tail()
    line = f"recap: error: bucket '{bucket}' of {out} does not exist (recap does not create buckets)"
    assert res.output.rstrip().splitlines()[-1] == line, res.tail()
    assert "Traceback" not in res.output
    assert not raw_fs("s3", s3_server).exists(bucket)


def test_export_checks_its_output_bucket_first(s3_server, tmp_path: Path):
    """`recap export --output s3://missing/...` fails before loading anything (here: a checkpoint that
    does not exist either, which would otherwise be the error)."""
    bucket = missing_name()
    out = f"s3://{bucket}/model.pt"
    res = run(
        [RECAP, "export", "--checkpoint", str(tmp_path / "none"), "--output", out],
        env=s3_server.env, cwd=tmp_path, timeout=180, check=False,
    )  # fmt: skip
    assert res.returncode == 1, res.tail()
    assert res.output.rstrip().splitlines()[-1] == (
        f"recap: error: bucket '{bucket}' of {out} does not exist (recap does not create buckets)"
    )
    assert not raw_fs("s3", s3_server).exists(bucket)
