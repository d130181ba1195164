"""Shared pytest fixtures.

Storage (real emulator servers, see tests/storage_servers.py):

- ``s3_server``, ``gcs_server``, ``azure_server``: session-scoped running servers (started on first use).
- ``storage_url``: parametrised over local / file / s3 / gcs / azure; yields ``StorageURL(url, env)``
  (a 2-tuple: ``url, env = storage_url``) where ``url`` is a fresh, unique location for this test
  (a plain directory path for "local", ``file://...``, ``s3://recap-test/<test>-<id>``, ...) and
  ``env`` the variables a child process needs to reach the store. They are also set in os.environ
  for the duration of the test, so in-process fsspec calls and subprocesses that inherit the
  environment both work. ``storage_server`` gives the server behind it (None for local/file), e.g.
  to ``stop()``/``start()`` it in the middle of a test.
"""

from __future__ import annotations

import re
import uuid
from typing import NamedTuple

import pytest
import storage_servers

from recap_app import storage

BACKENDS = ["local", "file", "s3", "gcs", "azure"]


@pytest.fixture(scope="session")
def s3_server():
    with storage_servers.moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server():
    with storage_servers.gcs_server() as server:
        yield server


@pytest.fixture(scope="session")
def azure_server():
    with storage_servers.azurite_server() as server:
        yield server


@pytest.fixture(autouse=True)
def _storage_servers_back_up():
    """A test that stop()s or pause()s a shared server and fails before undoing it must not take
    the server down for the tests after it."""
    yield
    for server in storage_servers.live_servers():
        server.ensure_running()


class StorageURL(NamedTuple):
    url: str
    env: dict[str, str]

    @property
    def backend(self) -> str:
        return {"s3": "s3", "gs": "gcs", "az": "azure", "file": "file"}.get(
            self.url.split("://", 1)[0] if "://" in self.url else "", "local"
        )


@pytest.fixture(params=BACKENDS)
def storage_backend(request) -> str:
    return request.param


@pytest.fixture
def storage_server(request, storage_backend):
    """The running server for the current backend, or None for local/file."""
    if storage_backend in ("local", "file"):
        return None
    return request.getfixturevalue(f"{storage_backend}_server")


@pytest.fixture
def storage_url(request, storage_backend, storage_server, tmp_path, monkeypatch) -> StorageURL:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:80]
    unique = f"{name}-{uuid.uuid4().hex[:8]}"
    if storage_backend == "local":
        url, env = str(tmp_path / unique), {}
    elif storage_backend == "file":
        url, env = f"file://{tmp_path / unique}", {}
    else:
        url, env = storage_server.url(unique), dict(storage_server.env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # fsspec caches filesystem instances per options, built from the environment of the moment;
    # start each test from a clean slate and leave none behind that point at this test's setup.
    storage.fsspec_clear_instance_caches()
    yield StorageURL(url, env)
    storage.fsspec_clear_instance_caches()
