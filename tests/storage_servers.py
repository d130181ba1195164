"""Real object-store emulators as separate server processes, for tests.

Each server runs on 127.0.0.1 with a free port, in its own process group, with its log in a temp dir:

- S3:    ``moto_server`` (moto[server]); dummy AWS keys; bucket ``recap-test``.
- GCS:   ``gcp-storage-emulator``; bucket ``recap-test``; reached through ``STORAGE_EMULATOR_HOST``.
- Azure: ``azurite-blob`` (npm ``azurite@3.35.0``, installed on first use into ~/.cache/recap-azurite,
         outside the repo); container ``recap-test``; reached through ``AZURE_STORAGE_CONNECTION_STRING``.

Use them as context managers (``with moto_server() as s3: ...``) or through the pytest fixtures in
``tests/conftest.py``. A started server gives:

- ``base_url``          e.g. ``s3://recap-test/`` (``gs://``, ``az://``)
- ``env``               the variables a child process (or in-process fsspec) needs to reach it
- ``storage_options``   explicit fsspec options equivalent to ``env`` (not needed when ``env`` is set)
- ``endpoint``          the server's http://127.0.0.1:PORT
- ``stop()`` / ``start()``  kill the server process group / start it again ON THE SAME PORT, so
                        ``env`` and URLs handed out earlier stay valid (a fault-injection test can
                        stop the store in the middle of a save, then bring it back).
- ``pause()`` / ``resume()``  SIGSTOP / SIGCONT: the port stays open but nothing answers (a hung
                        store rather than a refused connection); clients then wait for their timeouts.
- ``persistent``        whether objects survive ``stop()``/``start()``: GCS and Azure keep their data
                        on disk in a temp dir; S3 (moto) replays its request recording on restart.
- ``log_tail()``        the last lines of the server's log.
- ``ensure_running()``  undo pause()/stop() (conftest does it after every test).

Measured here, with default client settings, a write to a stopped store fails after: s3fs ~7 s
(EndpointConnectionError), gcsfs ~33 s (aiohttp ClientConnectorError, after its 6 retries), adlfs
~84 s (azure.core ServiceRequestError, after azure-core's retries). A fault-injection test that wants
a quick failure must lower the clients' retries (e.g. s3fs ``config_kwargs={"retries": ...}``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HOST = "127.0.0.1"
BUCKET = "recap-test"
AZURITE_VERSION = "3.35.0"
AZURITE_DIR = Path(os.environ.get("RECAP_AZURITE_DIR", Path.home() / ".cache" / "recap-azurite"))
# The well-known Azurite development account (public, documented by Microsoft; not a secret).
AZURE_ACCOUNT = "devstoreaccount1"
AZURE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_BIN = Path(sys.executable).parent
_LIVE: set[StorageServer] = set()


def live_servers() -> list[StorageServer]:
    """Servers started and not yet closed (running, stopped or paused)."""
    return list(_LIVE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout=5.0):
    """(status, body) of one HTTP request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class ServerError(RuntimeError):
    pass


class _EarlyExit(Exception):
    pass


_libc = None


def _die_with_parent() -> None:
    """In the forked child: have the kernel SIGTERM the server when the test process dies, even by
    SIGKILL (atexit would not run then). Linux only; tied to the thread that started the server."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class StorageServer:
    """One emulator process. Subclasses say how to run it, when it is ready, and what to create."""

    name = "?"
    scheme = "?"
    persistent = False
    start_timeout = 30.0

    def __init__(self, bucket: str = BUCKET):
        self.bucket = bucket
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"recap-{self.name}-"))
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.paused = False

    # --- what subclasses define -------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def child_env(self) -> dict[str, str]:
        """Environment of the server process itself."""
        return dict(os.environ)

    def is_ready(self) -> bool:
        raise NotImplementedError

    def after_start(self, first: bool) -> None:
        """Create the bucket/container (idempotent)."""

    @property
    def env(self) -> dict[str, str]:
        raise NotImplementedError

    @property
    def storage_options(self) -> dict:
        return {}

    # --- common -----------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.bucket}/"

    def url(self, *parts: str) -> str:
        return self.base_url + "/".join(p.strip("/") for p in parts)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> StorageServer:
        """Start the server (on the same port as before, if it ran before) and wait until it answers.
        Raises ServerError, with the server's log tail, if it exits or is not ready in time."""
        if self.running:
            return self
        first = self.proc is None
        for attempt in range(3):
            try:
                self._spawn_and_wait()
                break
            except _EarlyExit as e:
                # The port was free when chosen but may have been taken since. A first start may pick
                # another; a restart must keep its port (URLs and env handed out name it).
                if not first or attempt == 2:
                    raise ServerError(str(e)) from None
                self.port = free_port()
        self.after_start(first)
        return self

    def _spawn_and_wait(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.child_env(),
                cwd=self.workdir,
                start_new_session=True,  # own process group: stop() kills every child with it
                preexec_fn=_die_with_parent,
            )
        _LIVE.add(self)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise _EarlyExit(
                    f"{self.name} server exited with {self.proc.returncode} during start"
                    f" (port {self.port}); log tail:\n{self.log_tail()}"
                )
            try:
                if self.is_ready():
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.name} server not ready on port {self.port} after {self.start_timeout:.0f} s;"
                    f" log tail:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 5.0) -> None:
        """Kill the server's process group (SIGTERM, then SIGKILL) and reap it."""
        proc, self.paused = self.proc, False
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGCONT, 0), (signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            if not wait:
                continue
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Whatever else is left in the group (a grandchild that ignored SIGTERM).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the server: connections are accepted by the kernel but never answered."""
        if self.running:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.running:
            os.killpg(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def ensure_running(self) -> None:
        """Undo a test's pause() or stop() (the pytest fixtures call this after every test)."""
        if self.paused:
            self.resume()
        if not self.running:
            self.start()

    def close(self) -> None:
        """Stop for good and delete the work dir (data and log)."""
        self.stop()
        _LIVE.discard(self)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> StorageServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.base_url} at {self.endpoint} {state}>"


class MotoS3Server(StorageServer):
    """moto_server (launched through this module, see ``_run_moto_server``). moto keeps state in memory
    only; it records every request to a file and replays the recording after a restart, so objects
    survive stop()/start()."""

    name = "s3"
    scheme = "s3"
    persistent = True

    def command(self):
        return [sys.executable, __file__, "s3-emulator", "-H", HOST, "-p", str(self.port)]

    def child_env(self):
        env = dict(os.environ)
        env.update(MOTO_ENABLE_RECORDING="True", MOTO_RECORDER_FILEPATH=str(self.recording))
        return env

    def is_ready(self):
        status, _ = _http("GET", f"{self.endpoint}/moto-api/data.json", timeout=2)
        return status == 200

    @property
    def recording(self) -> Path:
        return self.workdir / "recording.jsonl"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop, then drop a line the kill left half-written (a request being recorded when the server
        died; its client got no answer), which would otherwise run into the next start's first line."""
        super().stop(timeout)
        if self.recording.exists():
            text = self.recording.read_bytes()
            if text and not text.endswith(b"\n"):
                self.recording.write_bytes(text[: text.rfind(b"\n") + 1])

    def after_start(self, first):
        if not first and self.recording.exists():
            status, body = _http("POST", f"{self.endpoint}/moto-api/recorder/replay-recording", timeout=60)
            if status != 200:
                raise ServerError(f"moto replay failed ({status}): {body[:500]!r}\n{self.log_tail()}")
        status, body = _http("PUT", f"{self.endpoint}/{self.bucket}")  # CreateBucket, path-style
        if status != 200:
            raise ServerError(f"create bucket {self.bucket}: {status} {body[:500]!r}")

    @property
    def env(self):
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,  # botocore reads it (s3fs without options)
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint,  # fsspec config, read when fsspec is imported
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def storage_options(self):
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}


class GcsEmulatorServer(StorageServer):
    """gcp-storage-emulator, storing on disk under its work dir (so data survives a restart).

    The emulator lacks the ``objects.moveTo`` call that gcsfs uses for ``mv``/``rename``; it answers
    501, which gcsfs retries with backoff for ~33 s before falling back to copy + delete. Every
    torch.distributed.checkpoint save renames ``.metadata.tmp`` to ``.metadata``, so with the plain
    emulator each save takes ~34 s. With ``move_to=True`` (default) the emulator is launched through
    this module, which adds a moveTo route (copy + delete, as the real service behaves for clients).
    """

    name = "gcs"
    scheme = "gs"
    persistent = True

    def __init__(self, bucket: str = BUCKET, move_to: bool = True):
        super().__init__(bucket)
        self.move_to = move_to

    def command(self):
        emulator = (
            [sys.executable, __file__, "gcs-emulator"]
            if self.move_to
            else [str(_BIN / "gcp-storage-emulator")]
        )
        data = ["--data-dir", str(self.workdir / "data")]
        return emulator + data + ["start", "--host", HOST, "--port", str(self.port), "-q"]

    def is_ready(self):
        status, _ = _http("GET", f"{self.endpoint}/storage/v1/b?project=test", timeout=2)
        return status == 200

    def after_start(self, first):
        body = json.dumps({"name": self.bucket}).encode()
        status, out = _http(
            "POST",
            f"{self.endpoint}/storage/v1/b?project=test",
            body,
            {"Content-Type": "application/json"},
        )
        if status not in (200, 409):
            raise ServerError(f"create bucket {self.bucket}: {status} {out[:500]!r}")

    @property
    def env(self):
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            # gcsfs probes for hierarchical namespaces on every open, 60 s each against the emulator.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # No credentials: skip the GCE metadata-server probe in gcsfs's credential search.
            "NO_GCE_CHECK": "true",
        }

    @property
    def storage_options(self):
        return {"endpoint_url": self.endpoint, "token": "anon"}


def ensure_azurite(version: str = AZURITE_VERSION) -> Path:
    """Path of azurite-blob, installing azurite into AZURITE_DIR with npm when it is missing."""
    exe = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    pkg = AZURITE_DIR / "node_modules" / "azurite" / "package.json"
    if exe.exists() and pkg.exists() and json.loads(pkg.read_text()).get("version") == version:
        return exe
    npm = shutil.which("npm")
    if npm is None:
        raise ServerError("npm not found: cannot install azurite")
    AZURITE_DIR.mkdir(parents=True, exist_ok=True)
    with open(AZURITE_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test sessions: one installs, the others wait
        if exe.exists() and pkg.exists() and json.loads(pkg.read_text()).get("version") == version:
            return exe
        _npm_install(npm, version)
    if not exe.exists():
        raise ServerError(f"npm install azurite@{version} did not produce {exe}")
    return exe


def _npm_install(npm: str, version: str) -> None:
    res = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", f"azurite@{version}"],
        cwd=AZURITE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode != 0:
        raise ServerError(
            f"npm install azurite@{version} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        )


class AzuriteServer(StorageServer):
    """azurite-blob. Stores under its work dir (``--location``) rather than ``--inMemoryPersistence``
    so that blobs survive stop()/start(); pass ``in_memory=True`` for the in-memory store."""

    name = "azure"
    scheme = "az"

    def __init__(self, bucket: str = BUCKET, in_memory: bool = False):
        self.exe = ensure_azurite()
        super().__init__(bucket)
        self.in_memory = in_memory
        self.persistent = not in_memory

    def command(self):
        cmd = [
            str(self.exe),
            "--blobHost",
            HOST,
            "--blobPort",
            str(self.port),
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ]
        if self.in_memory:
            cmd.append("--inMemoryPersistence")
        else:
            cmd += ["--location", str(self.workdir / "data")]
        return cmd

    def is_ready(self):
        with socket.create_connection((HOST, self.port), timeout=1):
            pass
        status, _ = _http("GET", f"{self.endpoint}/{AZURE_ACCOUNT}?comp=list", timeout=2)
        return status > 0  # any HTTP answer (403 without auth) means it serves

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={AZURE_KEY};"
            f"BlobEndpoint={self.endpoint}/{AZURE_ACCOUNT};"
        )

    def after_start(self, first):
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(self.connection_string) as client:
            with contextlib.suppress(ResourceExistsError):
                client.create_container(self.bucket)

    @property
    def env(self):
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    @property
    def storage_options(self):
        return {"connection_string": self.connection_string}


@contextlib.contextmanager
def moto_server(bucket: str = BUCKET) -> Iterator[MotoS3Server]:
    with MotoS3Server(bucket) as server:
        yield server


@contextlib.contextmanager
def gcs_server(bucket: str = BUCKET, move_to: bool = True) -> Iterator[GcsEmulatorServer]:
    with GcsEmulatorServer(bucket, move_to=move_to) as server:
        yield server


@contextlib.contextmanager
def azurite_server(bucket: str = BUCKET, in_memory: bool = False) -> Iterator[AzuriteServer]:
    with AzuriteServer(bucket, in_memory=in_memory) as server:
        yield server


SERVERS = {"s3": MotoS3Server, "gcs": GcsEmulatorServer, "azure": AzuriteServer}


@atexit.register
def _kill_leftovers() -> None:
    """A crashed or interrupted test run still takes its servers down."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close()


def _run_gcs_emulator(argv: list[str]) -> None:
    """gcp-storage-emulator's main, plus the objects.moveTo route it lacks (copy, then delete)."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.__main__ import main
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def move(request, response, storage, *args, **kwargs):
        bucket, src, dst = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
        try:
            obj = objects._copy(request.base_url, storage, bucket, src, bucket, dst)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        objects._delete(storage, bucket, src)
        response.json(obj)

    routes = tuple(
        (
            rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
            {server.POST: move},
        )
        for prefix in (server.settings.API_ENDPOINT, "")
    )
    server.HANDLERS = routes + tuple(server.HANDLERS)  # before the generic object route
    sys.exit(main(argv))


def _run_moto_server(argv: list[str]) -> None:
    """moto_server's main, with two fixes to its request recorder:

    - moto appends each request's JSON and then its newline in separate writes, unlocked, from the
      threads of a threaded server; two concurrent uploads (two ranks saving checkpoint shards) can then
      land as ``{a}{b}\\n\\n``, and every later replay fails on that line. Recording is serialised here.
    - a failed replay answers a bare 500; the traceback goes to the server log here.
    """
    import threading
    import traceback

    from moto.moto_api._internal.recorder.models import Recorder
    from moto.server import main

    lock = threading.Lock()
    record, replay = Recorder._record_request, Recorder.replay_recording

    def record_serialised(self, request, body=None):
        with lock:
            record(self, request, body)

    def replay_logged(self, target_host=None):
        try:
            replay(self, target_host)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            raise

    Recorder._record_request, Recorder.replay_recording = record_serialised, replay_logged
    main(argv)


if __name__ == "__main__" and sys.argv[1:2] == ["gcs-emulator"]:
    _run_gcs_emulator(sys.argv[2:])
if __name__ == "__main__" and sys.argv[1:2] == ["s3-emulator"]:
    _run_moto_server(sys.argv[2:])
