"""The run record: `{output}/runs.jsonl`, one line per start of a run on that output.

What a person needs to trust (or debug) a run weeks later: the resolved config (secrets redacted), the
world size and batch each start trained with, the step it started from, the package versions, the host and
the scheduler job. Written by rank 0 after resume is decided; rewritten whole (object stores cannot
append).
"""

from __future__ import annotations

import json
import platform
import socket
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from recap_app.config import RecapConfig
from recap_app.lease import job_id
from recap_app.storage import join, redact, url_to_fs, write

RUN_RECORD = "runs.jsonl"
PACKAGES = ("recap", "torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchx", "fsspec", "pyarrow")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def config_summary(config: RecapConfig) -> str:
    """One log line for the resolved config; the whole of it (redacted) is in the run record."""
    dc, save_dir = config.data, config.training.save_dir
    tables = ", ".join(
        f"{t.name} {t.num_embeddings}x{t.embedding_dim}" for t in config.model.embeddings.tables
    )
    data = f"{dc.train_url} (eval {dc.eval_url or 'synthetic'})" if dc.train_url else "synthetic"
    return redact(
        f"config: {len(config.model.tasks)} tasks, {len(config.model.embeddings.tables)} embedding tables "
        f"({tables or 'none'}), {dc.num_continuous} continuous + {dc.num_binary} binary features, "
        f"global batch {dc.global_batch_size}, {config.training.num_train_steps} steps, data {data}; "
        f"the full resolved config (secrets redacted) is in {join(save_dir, RUN_RECORD)}"
    )


def read_run_record(output: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    fs, path = url_to_fs(join(output, RUN_RECORD), storage_options)
    if not fs.exists(path):
        return []
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]


def append_run_record(
    config: RecapConfig, *, world_size: int, per_rank_batch: int, start_step: int, resumed: bool
) -> dict[str, Any]:
    """Append this start's entry (rank 0 only) and return it."""
    output, opts = config.training.save_dir, config.storage.options
    entry = {
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "job_id": job_id(),
        "world_size": world_size,
        "per_rank_batch_size": per_rank_batch,
        "global_batch_size": config.data.global_batch_size,
        "start_step": start_step,
        "resumed": resumed,
        "versions": package_versions(),
        "config": redact(config.model_dump(mode="json")),
    }
    records = [*read_run_record(output, opts), entry]
    write(join(output, RUN_RECORD), "".join(json.dumps(r, sort_keys=True) + "\n" for r in records), opts)
    return entry
