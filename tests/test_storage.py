"""recap_app.storage against every backend, each a real server process (tests/storage_servers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import _fsspec_filesystem

from recap_app import storage

# Seconds of a small DCP save by backend, (first in the process, second): printed with -s.
SAVE_SECONDS: dict[str, tuple[float, float]] = {}


def _state_dict(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "dense.weight": torch.randn(16, 8, generator=g),
        "dense.bias": torch.randn(8, generator=g, dtype=torch.float64),
        "ids": torch.randint(0, 1 << 40, (32,), generator=g),
        "nested": {
            "emb": torch.randn(100, 4, generator=g).to(torch.bfloat16),
            "mask": torch.rand(7, generator=g) > 0.5,
            "step": 1234 + seed,
            "name": f"run-{seed}",
        },
    }


def _assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        if isinstance(w, dict):
            _assert_identical(g, w)
        elif isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype and g.shape == w.shape, key
            # bit-identical: compare raw bytes, not values (NaN-safe, -0.0-safe)
            assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), key
        else:
            assert g == w, key


def test_round_trip(storage_url):
    url, _ = storage_url
    a, b = storage.join(url, "dir", "a.bin"), storage.join(url, "dir", "sub", "b.txt")
    payload = os.urandom(300_000)
    for target, data in ((a, payload), (b, b"hello")):
        fs, path = storage.url_to_fs(target)
        fs.makedirs(fs._parent(path), exist_ok=True)  # a no-op on object stores
        with fs.open(path, "wb") as f:
            f.write(data)

    fs, path = storage.url_to_fs(a)
    with fs.open(path, "rb") as f:
        assert f.read() == payload
    assert storage.exists(a) and storage.exists(b)
    assert storage.ls(storage.join(url, "dir")) == [a, storage.join(url, "dir", "sub")]
    # ls gives URLs that go straight back into url_to_fs
    assert storage.ls(storage.join(url, "dir", "sub")) == [b]
    fs, path = storage.url_to_fs(storage.ls(storage.join(url, "dir", "sub"))[0])
    assert fs.cat_file(path) == b"hello"

    storage.rm(a)
    assert not storage.exists(a)
    assert storage.ls(storage.join(url, "dir")) == [storage.join(url, "dir", "sub")]
    storage.rm(storage.join(url, "dir"), recursive=True)
    assert not storage.exists(b)
    assert storage.ls(storage.join(url, "dir")) == []
    storage.rm(a)  # missing: no error


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_save_load_one_process(storage_url, monkeypatch, caplog):
    url, _ = storage_url
    ckpt = storage.join(url, "step-1")
    renames: list[tuple[str, str]] = []
    real_rename = _fsspec_filesystem.FileSystem.rename

    def spy_rename(self, path, new_path):
        renames.append((str(path), str(new_path)))
        return real_rename(self, path, new_path)

    monkeypatch.setattr(_fsspec_filesystem.FileSystem, "rename", spy_rename)

    want = _state_dict(seed=1)
    t0 = time.perf_counter()
    dcp.save(want, checkpoint_id=ckpt, no_dist=True)  # no process group: a one-process save
    t1 = time.perf_counter()
    # a second save, the filesystem instance and its client now warm
    dcp.save(want, checkpoint_id=storage.join(url, "step-2"), no_dist=True)
    SAVE_SECONDS[storage_url.backend] = (t1 - t0, time.perf_counter() - t1)

    assert storage.exists(storage.join(ckpt, ".metadata"))
    assert not storage.exists(storage.join(ckpt, ".metadata.tmp"))
    names = [u.rsplit("/", 1)[-1] for u in storage.ls(ckpt)]
    assert names == [".metadata", "__0_0.distcp"]
    # URLs (file:// included) go through FsspecWriter, which writes .metadata.tmp and renames it;
    # plain paths through the local FileSystemWriter (its rename is not the fsspec one).
    if storage_url.backend == "local":
        assert renames == []
    else:
        assert [(a.rsplit("/", 1)[-1], b.rsplit("/", 1)[-1]) for a, b in renames] == [
            (".metadata.tmp", ".metadata")
        ] * 2
    # The renames went through GCS's moveTo (the emulator lacks it unless launched by storage_servers;
    # gcsfs then retries for ~33 s per rename and falls back to copy + delete, saying so).
    assert not [r.getMessage() for r in caplog.records if "moveTo" in r.getMessage()]

    got = _state_dict(seed=2)  # same structure, other values
    dcp.load(got, checkpoint_id=ckpt, no_dist=True)
    _assert_identical(got, want)
    got = _state_dict(seed=3)
    dcp.load(got, checkpoint_id=storage.join(url, "step-2"), no_dist=True)
    _assert_identical(got, want)


CHILD = textwrap.dedent(
    """
    import sys, torch, torch.distributed.checkpoint as dcp
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"w": w, "n": {"b": torch.ones(2, dtype=torch.int8)}}
    for url in sys.argv[1:]:
        dcp.save(sd, checkpoint_id=url, no_dist=True)
    """
)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_child_process_from_env_alone(s3_server, gcs_server, azure_server, tmp_path):
    """A child process that knows nothing but the URLs and the servers' `env` saves to every store
    (no storage options anywhere); the parent reads the checkpoints back. One child for all stores:
    importing torch is most of its cost."""
    servers = (s3_server, gcs_server, azure_server)
    env = {k: v for server in servers for k, v in server.env.items()}
    tag = os.urandom(4).hex()
    urls = [f"file://{tmp_path}/child"] + [server.url(f"child-{tag}") for server in servers]
    res = subprocess.run(
        [sys.executable, "-c", CHILD, *urls],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    mp = pytest.MonkeyPatch()
    try:
        for k, v in env.items():
            mp.setenv(k, v)
        storage.fsspec_clear_instance_caches()
        for url in urls:
            got = {"w": torch.zeros(3, 4), "n": {"b": torch.zeros(2, dtype=torch.int8)}}
            dcp.load(got, checkpoint_id=url, no_dist=True)
            assert torch.equal(got["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4)), url
            assert torch.equal(got["n"]["b"], torch.ones(2, dtype=torch.int8)), url
    finally:
        mp.undo()
        storage.fsspec_clear_instance_caches()


@pytest.mark.parametrize("backend", ["s3", "gcs", "azure"])
def test_server_stop_start_keeps_data_and_clients(backend, request):
    """stop()/start() restarts the server on the same port with its objects; a filesystem instance
    created before the restart (as fsspec's instance cache hands back) keeps working after it."""
    server = request.getfixturevalue(f"{backend}_server")
    mp = pytest.MonkeyPatch()
    try:
        for k, v in server.env.items():
            mp.setenv(k, v)
        storage.fsspec_clear_instance_caches()
        url = server.url(f"restart-{os.urandom(4).hex()}", "obj")
        fs, path = storage.url_to_fs(url)
        fs.pipe_file(path, b"before")
        port = server.port

        server.stop()
        assert not server.running
        with pytest.raises(OSError):
            urllib.request.urlopen(server.endpoint, timeout=2)
        server.start()
        assert server.port == port and server.running

        assert fs.cat_file(path) == b"before"  # old instance, reconnects
        assert storage.url_to_fs(url)[0] is fs  # cached instance
        fs.pipe_file(path, b"after")
        assert storage.url_to_fs(url)[0].cat_file(path) == b"after"
    finally:
        mp.undo()
        storage.fsspec_clear_instance_caches()


@pytest.mark.parametrize("backend", ["s3", "gcs", "azure"])
def test_concurrent_uploads_survive_restart(backend, request):
    """Uploads made side by side (as two ranks write their checkpoint shards) are all there after a restart:
    moto's recorder once interleaved two concurrent requests into one unreadable line, and every replay
    after it failed."""
    server = request.getfixturevalue(f"{backend}_server")
    opts = server.storage_options
    root = server.url(f"concurrent-{os.urandom(4).hex()}")
    fs, root_path = storage.url_to_fs(root, opts)
    blobs = {storage.url_to_fs(f"{root}/{i}", opts)[1]: os.urandom(200_000 + i) for i in range(12)}
    try:
        fs.pipe(blobs)  # fsspec sends these concurrently
        server.stop()
        server.start()
        fs.invalidate_cache()
        assert {path: fs.cat_file(path) for path in blobs} == blobs
    finally:
        fs.rm(root_path, recursive=True)


def test_server_pause_resume(s3_server):
    """pause() leaves the port open but unanswered (a hung store); resume() brings it back."""
    s3_server.pause()
    try:
        with pytest.raises(OSError):  # TimeoutError is an OSError
            urllib.request.urlopen(s3_server.endpoint + "/moto-api/data.json", timeout=0.5)
    finally:
        s3_server.resume()
    with urllib.request.urlopen(s3_server.endpoint + "/moto-api/data.json", timeout=5) as r:
        assert r.status == 200


def test_redact_hides_secrets_in_nested_config():
    config = {
        "run": {"name": "exp1", "steps": 10},
        "storage": {
            "s3": {
                "aws_access_key_id": "AKIA...",
                "aws_secret_access_key": "s3cr3t",
                "endpoint_url": "http://127.0.0.1:9000",
            },
            "azure": {"account_name": "devstoreaccount1", "account_key": "k3y", "connection_string": "cs"},
            "gcs": {"token": "tok", "project": "p"},
            "layers": [{"sas_token": "sv=..."}, {"size": 3}],
        },
        "password": {"nested": "whole subtree hidden"},
    }
    red = storage.redact(config)
    assert red == {
        "run": {"name": "exp1", "steps": 10},
        "storage": {
            "s3": {
                "aws_access_key_id": "***",
                "aws_secret_access_key": "***",
                "endpoint_url": "http://127.0.0.1:9000",
            },
            "azure": {"account_name": "devstoreaccount1", "account_key": "***", "connection_string": "***"},
            "gcs": {"token": "***", "project": "p"},
            "layers": [{"sas_token": "***"}, {"size": 3}],
        },
        "password": "***",
    }
    assert config["storage"]["s3"]["aws_secret_access_key"] == "s3cr3t"  # a copy; input untouched


def teardown_module(module):
    if SAVE_SECONDS:
        times = ", ".join(f"{k}={a:.2f}/{b:.2f}" for k, (a, b) in SAVE_SECONDS.items())
        print(f"\nsmall DCP save, seconds (first/second in process): {times}")


def test_redact_masks_secrets_inside_values():
    red = storage.redact(
        {
            "conn": "DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=abc+/=;BlobEndpoint=http://h",
            "endpoint": "https://user:pa55@minio:9000/bucket",
            "links": ["https://acct.blob.core.windows.net/c?sv=2024&sig=S3CRET&se=2027"],
            "train_url": "s3://bucket/data/train",
        }
    )
    assert red == {
        "conn": "DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=***;BlobEndpoint=http://h",
        "endpoint": "https://user:***@minio:9000/bucket",
        "links": ["https://acct.blob.core.windows.net/c?sv=2024&sig=***&se=2027"],
        "train_url": "s3://bucket/data/train",
    }
