"""URL -> fsspec filesystem. Local paths, file://, s3://, gs://, az:// (abfs://) all go through here.

Credentials and endpoints come from the environment (AWS_*, STORAGE_EMULATOR_HOST / GOOGLE_*,
AZURE_STORAGE_*) or from config storage options; they are never logged (see `redact`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

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
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path)


def write(url: str, content: bytes | str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a whole file (text as UTF-8), creating its parent folder where the backend has folders.
    One PUT on object stores, so readers never see half a file there."""
    fs, path = url_to_fs(url, storage_options)
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)


def ls(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Entries directly under `url`, as URLs of the same kind (fsspec's own `ls` drops the scheme, and
    a bare "bucket/key" path cannot be passed back to `url_to_fs`). Sorted; [] for a missing dir."""
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
    `url_to_fs` builds one from the current environment; buckets are checked again too."""
    _EXISTING_BUCKETS.clear()
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
