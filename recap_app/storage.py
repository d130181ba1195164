"""URL -> fsspec filesystem. Local paths, file://, s3://, gs://, az:// (abfs://) all go through here.

Credentials and endpoints come from the environment (AWS_*, STORAGE_EMULATOR_HOST / GOOGLE_*,
AZURE_STORAGE_*) or from config storage options; they are never logged (see `redact`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec import AbstractFileSystem

from recap_app.errors import InputError

# gcsfs probes hierarchical-namespace buckets on every open unless told not to; against emulators and
# most buckets that costs a 60 s timeout. Must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Key names that hold credentials, matched per word of the name (snake_case, kebab-case, camelCase), so
# `key`, `account_key`, `aws_secret_access_key`, `SSECustomerKey`, `sas_token` or `client_secret` are
# caught while `use_listings_cache`, `endpoint_url`, `anon`, `signature_version` or a task name are not.
# Shared by `redact` (logged configs) and config overrides (refused on the command line).
_SECRET_WORDS = frozenset(
    {
        "secret", "token", "password", "passwd", "passphrase", "credential", "credentials",
        "key", "sas", "sig", "auth", "authorization",
    }
)  # fmt: skip
_SECRET_JOINED = ("connectionstring", "accountkey")  # AZURE_STORAGE_CONNECTION_STRING, AccountKey
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
REDACTED = "***"
# Secrets inside values: a URL's password (scheme://user:PASSWORD@host) and key=value pairs of
# connection strings (AccountKey=...;SharedAccessSignature=...).
_URL_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^@\s/]+@")
_SECRET_PAIR = re.compile(
    r"((?:AccountKey|SharedAccessSignature|SharedAccessKey|Password|sig)=)[^;&\s]+", re.I
)


def is_secret_key(name: object) -> bool:
    """Whether a mapping key names a credential (see _SECRET_WORDS)."""
    text = str(name)
    if {w.lower() for w in _WORD.findall(text)} & _SECRET_WORDS:
        return True
    joined = re.sub(r"[^a-z]", "", text.lower())
    return any(j in joined for j in _SECRET_JOINED)


def has_secret_value(text: str) -> bool:
    """Whether a string carries a credential: a URL password or a connection-string / SAS key pair."""
    return bool(_URL_PASSWORD.search(text) or _SECRET_PAIR.search(text))


def has_scheme(url: str) -> bool:
    return "://" in url


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it. Object-store listings are not cached, so a
    checkpoint written by another rank or process is seen at once.

    Endpoints and credentials may come from the environment alone: s3 from AWS_* (AWS_ENDPOINT_URL /
    FSSPEC_S3_ENDPOINT_URL, passed explicitly here because fsspec reads FSSPEC_* only when it is first
    imported), gs from STORAGE_EMULATOR_HOST / Google default credentials, az from
    AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME/_KEY (adlfs reads those itself; an
    `az://container/path` URL needs no storage options then).

    fsspec caches filesystem instances per (class, options), and s3fs/adlfs read the environment only
    when an instance is created, so an instance outlives a change of environment in the same process
    (gcsfs reads STORAGE_EMULATOR_HOST per request). Long-running jobs never change it; tests that
    start servers call `fsspec_clear_instance_caches()` (tests/conftest.py does, around every test).
    Instances survive a restart of the store itself: their clients reconnect.

    An object-store URL whose bucket / container does not exist raises BucketNotFoundError (checked once
    per bucket and process): nothing recap does may create one.
    """
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if has_scheme(url) else "file"
    if protocol in _OBJECT_STORES:
        options.setdefault("use_listings_cache", False)
    if protocol in ("s3", "s3a") and "endpoint_url" not in options:
        endpoint = os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    if protocol in _OBJECT_STORES:
        check_reachable(url, options)
    fs, path = fsspec.core.url_to_fs(url, **options)
    if protocol in _BUCKET_STORES:
        _check_bucket(fs, path, url)
    return fs, path


# adlfs caches listings too: without az/abfs here a blob written by another process can stay unseen.
_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl")
_BUCKET_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
_CONTAINER_STORES = ("az", "abfs", "abfss")
# (protocol, bucket) pairs seen to exist in this process: each is checked once per run.
_EXISTING_BUCKETS: set[tuple[str, str]] = set()


class BucketNotFoundError(InputError):
    """The bucket (or Azure container) of an object-store URL does not exist; recap never creates one."""


def check_bucket(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Fail early, before any work, when the bucket / container `url` would be written to is missing."""
    url_to_fs(url, storage_options)


def _check_bucket(fs: AbstractFileSystem, path: str, url: str) -> None:
    """Raise BucketNotFoundError when the bucket of `url` does not exist, once per bucket and process.

    s3fs creates a missing bucket on makedirs at or under it, which storage.write and DCP's writer call,
    and gcsfs / adlfs create one on a bucket-level mkdir: a mistyped URL would create a bucket (in the
    caller's account, with default settings) instead of failing. Other failures of the check (no
    permission to read the bucket, store unreachable) are left to the operation itself to report."""
    protocol, bucket = url.split("://", 1)[0], path.split("/", 1)[0]
    if not bucket or (protocol, bucket) in _EXISTING_BUCKETS:
        return
    try:
        fs.info(bucket)
    except FileNotFoundError:
        what = "container" if protocol in _CONTAINER_STORES else "bucket"
        raise BucketNotFoundError(
            f"{what} {bucket!r} of {url} does not exist (recap does not create {what}s)"
        ) from None
    except Exception:
        return
    _EXISTING_BUCKETS.add((protocol, bucket))


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    with errors_named(url, "read"):
        fs, path = url_to_fs(url, storage_options)
        return fs.exists(path)


def write(url: str, content: bytes | str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a whole file (text as UTF-8), creating its parent folder where the backend has folders.
    One PUT on object stores, so readers never see half a file there."""
    with errors_named(url, "write"):
        fs, path = url_to_fs(url, storage_options)
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)


def ls(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Entries directly under `url`, as URLs of the same kind (fsspec's own `ls` drops the scheme, and
    a bare "bucket/key" path cannot be passed back to `url_to_fs`). Sorted; [] for a missing dir."""
    with errors_named(url, "list"):
        fs, path = url_to_fs(url, storage_options)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
    names.discard("")
    return sorted(join(url, n) for n in names)


def rm(url: str, recursive: bool = False, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete a file, or with `recursive` a whole prefix/directory. A missing target is not an error."""
    fs, path = url_to_fs(url, storage_options)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def fsspec_clear_instance_caches() -> None:
    """Forget every cached fsspec filesystem instance (all imported implementations), so the next
    `url_to_fs` builds one from the current environment; buckets and endpoints are checked again too."""
    _EXISTING_BUCKETS.clear()
    _REACHED.clear()
    seen: set[type] = set()
    stack: list[type] = [AbstractFileSystem]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        cls.clear_instance_cache()
        stack.extend(cls.__subclasses__())


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with '/', whatever the backend."""
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def redact(value: Any) -> Any:
    """A copy of a config-like structure with secret-looking keys' values replaced by ***, and URL
    passwords and connection-string keys inside any string value masked."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_key(k) else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return _SECRET_PAIR.sub(rf"\1{REDACTED}", _URL_PASSWORD.sub(rf"\1{REDACTED}@", value))
    return value


# --------------------------------------------------------------------------------- storage errors
class StorageError(InputError):
    """A URL could not be read or written for a reason outside recap (space, permissions, credentials,
    network): the message names the URL and the cause in words, instead of a backend traceback."""


class StorageUnreachableError(StorageError):
    """An object store's endpoint did not accept a connection within storage.connect_timeout_s."""


_ERRNO_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "no space left (disk quota exceeded)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a path component is a file, not a directory",
}
_NETWORK_ERRNOS = {
    errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT
}  # fmt: skip
# Backend exception class names (botocore, google-auth, azure-core, aiohttp), matched by name so this
# module imports none of them.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                   "CredentialUnavailableError"}  # fmt: skip
_BAD_CREDENTIALS = {"ClientAuthenticationError", "RefreshError", "InvalidAccessKeyId"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                "ServerDisconnectedError", "ServiceRequestError", "ConnectionClosedError"}  # fmt: skip


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, its causes and contexts, and the per-rank failures a DCP CheckpointException holds."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        todo += [exc for exc, _ in (getattr(e, "failures", None) or {}).values()]


def _one_line(error: BaseException) -> str:
    text = "".join(c if c.isprintable() else "?" for c in " ".join(str(error).split()))
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def storage_cause(error: BaseException) -> str | None:
    """The cause of a storage failure in words ("no space left on device", "permission denied (...)"),
    or None when `error` is not one (a missing file, corrupt content, a bug)."""
    for e in _chain(error):
        names = {c.__name__ for c in type(e).__mro__}
        if isinstance(e, StorageError):
            return str(e)
        if isinstance(e, OSError) and e.errno in _ERRNO_CAUSES:
            return _ERRNO_CAUSES[e.errno]
        if names & _NO_CREDENTIALS:
            return f"no credentials found ({_one_line(e)}); {_CREDENTIALS_HINT}"
        if names & _BAD_CREDENTIALS or isinstance(e, PermissionError):
            return f"permission denied, wrong or insufficient credentials ({_one_line(e)})"
        network = isinstance(e, OSError) and e.errno in _NETWORK_ERRNOS
        if network or names & _UNREACHABLE or isinstance(e, ConnectionError | TimeoutError | socket.gaierror):
            return f"the store is unreachable ({_one_line(e)})"
    return None


_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS or "
    "AZURE_STORAGE_CONNECTION_STRING in the environment"
)


def describe_error(url: str, error: BaseException, action: str = "access") -> StorageError | None:
    """A one-line StorageError naming `url` and the cause of `error`, or None when `error` is not a
    storage failure (then the caller's own handling applies)."""
    if isinstance(error, StorageError):
        return error
    cause = storage_cause(error)
    if cause is None:
        return None
    if cause == _ERRNO_CAUSES[errno.ENOTDIR]:
        cause = _file_in_path(url) or cause
    return StorageError(f"cannot {action} {url}: {cause}")


def _file_in_path(url: str) -> str | None:
    """For a local URL: which ancestor of it is a file ("<path> is a file, not a directory")."""
    if has_scheme(url) and not url.startswith("file://"):
        return None
    path = os.path.abspath(url.removeprefix("file://"))
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        if os.path.isfile(path):
            return f"{path} is a file, not a directory"
    return None


@contextlib.contextmanager
def errors_named(url: str, action: str = "access") -> Iterator[None]:
    """Re-raise a storage failure inside the block as a StorageError naming `url` and the cause
    (describe_error); every other exception passes unchanged."""
    try:
        yield
    except Exception as e:
        described = describe_error(url, e, action)
        if described is None or described is e:
            raise
        raise described from e


# ------------------------------------------------------------------------------ reachable endpoints
CONNECT_TIMEOUT_S = 30.0
# Endpoints (host, port) that answered once in this process: each is probed once per run.
_REACHED: set[tuple[str, int]] = set()


def set_connect_timeout(seconds: float) -> None:
    """How long url_to_fs waits for an object store's endpoint to accept a connection (config
    storage.connect_timeout_s; the mains set it once the config is loaded)."""
    global CONNECT_TIMEOUT_S
    CONNECT_TIMEOUT_S = float(seconds)


def _endpoint(protocol: str, options: Mapping[str, Any]) -> str | None:
    """The explicit endpoint URL of an object-store URL's client (None: the cloud's default endpoint,
    left to the client's own retries)."""
    if protocol in ("s3", "s3a"):
        return options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if protocol in ("gs", "gcs"):
        return options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
    if protocol in _CONTAINER_STORES:
        conn = options.get("connection_string") or os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
        m = re.search(r"BlobEndpoint=([^;]+)", conn)
        return m.group(1) if m else None
    return None


def _proxied(scheme: str, host: str) -> bool:
    """Whether requests to `host` go through an HTTP(S) proxy (then a direct probe proves nothing)."""
    env = {k.lower(): v for k, v in os.environ.items()}
    if not env.get(f"{scheme}_proxy"):
        return False
    no_proxy = [h.strip().lstrip(".") for h in env.get("no_proxy", "").split(",") if h.strip()]
    return not any(h == "*" or host == h or host.endswith(f".{h}") for h in no_proxy)


def check_reachable(url: str, options: Mapping[str, Any]) -> None:
    """Fail within CONNECT_TIMEOUT_S, naming the URL and endpoint, when an object store's explicit
    endpoint accepts no TCP connection: clients retry far longer (adlfs ~100 s, gcsfs ~33 s) before
    their own error, which names neither. Retries with backoff until the deadline; once per endpoint."""
    endpoint = _endpoint(url.split("://", 1)[0], options)
    if not endpoint:
        return
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    host, scheme = parts.hostname or "", parts.scheme or "http"
    port = parts.port or (443 if scheme == "https" else 80)
    if (host, port) in _REACHED or _proxied(scheme, host):
        return
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    delay, error = 0.25, None
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, left))):
                _REACHED.add((host, port))
                return
        except OSError as e:
            error = e
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(delay, left))
        delay = min(delay * 2, 4.0)
    raise StorageUnreachableError(
        f"cannot reach {url}: endpoint {endpoint} accepted no connection within "
        f"storage.connect_timeout_s={CONNECT_TIMEOUT_S:g}s ({_one_line(error)}); check the endpoint "
        "(AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST, AZURE_STORAGE_CONNECTION_STRING, storage.options) "
        "and the network"
    )
