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

# gcsfs probes hierarchical-namespace buckets on every open unless told not to; against emulators and
# most buckets that costs a 60 s timeout. Must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_SECRET_KEY = re.compile(
    r"(secret|token|password|passwd|credential|account_key|sas|connection_string|key_id)", re.IGNORECASE
)
REDACTED = "***"


def has_scheme(url: str) -> bool:
    return "://" in url


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it. Object-store listings are not cached, so a
    checkpoint written by another rank or process is seen at once."""
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if has_scheme(url) else "file"
    if protocol in ("s3", "s3a", "gs", "gcs"):
        options.setdefault("use_listings_cache", False)
    if protocol == "s3" and "endpoint_url" not in options:
        endpoint = os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with '/', whatever the backend."""
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def redact(value: Any) -> Any:
    """A copy of a config-like structure with secret-looking keys' values replaced by ***."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value
