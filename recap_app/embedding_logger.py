"""The periodic embedding dump: which tables, how often, where, how many dumps are kept. The gathering and
writing of one table is the original's `log_sharded_tensor_content` (recap_app/model.py)."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

import torch

from recap_app.config import EmbeddingLogConfig
from recap_app.logs import current_rank, log
from recap_app.model import embedding_weights, log_sharded_tensor_content
from recap_app.storage import join, url_to_fs

_STEP = re.compile(r"step-(\d+)$")


class EmbeddingLogger:
    """Writes the configured tables to `{root}/step-N/<table>.npy` every `cfg.every_n` steps and after the
    last step, then keeps the newest `cfg.keep_latest_k` step folders (rank 0 deletes older ones on a
    background thread; a failed deletion is logged, never fatal). Collective: every rank calls `maybe_log`
    at the same steps."""

    def __init__(
        self, cfg: EmbeddingLogConfig, root: str, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.cfg, self.root, self.storage_options = cfg, root, dict(storage_options or {})
        self._purger: threading.Thread | None = None

    def should_log(self, step: int, last_step: bool = False) -> bool:
        return last_step or bool(self.cfg.every_n and step % self.cfg.every_n == 0)

    def maybe_log(self, model: torch.nn.Module, step: int, last_step: bool = False) -> str | None:
        """The step's folder URL when it wrote one, else None."""
        if not self.should_log(step, last_step):
            return None
        url = join(self.root, f"step-{step}")
        wanted = self.cfg.tables
        written = 0
        for weight_name, table, tensor in embedding_weights(model):
            if wanted is None or table in wanted:
                log_sharded_tensor_content(
                    weight_name, table, tensor, output_url=url, storage_options=self.storage_options
                )
                written += 1
        if not written:
            log(f"step {step}: no embedding table to write (embedding_log.tables={wanted})")
            return None
        log(f"step {step}: {written} embedding table(s) written to {url}")
        if current_rank() == 0 and self.cfg.keep_latest_k:
            self._purge_in_background()
        return url

    def _purge_in_background(self) -> None:
        if self._purger is not None and self._purger.is_alive():
            return  # the running purge sees the newest folders next time
        self._purger = threading.Thread(target=self.purge, name="embedding-purge", daemon=True)
        self._purger.start()

    def purge(self) -> list[int]:
        """Delete step folders older than the newest keep_latest_k; returns the steps deleted."""
        keep, deleted = self.cfg.keep_latest_k, []
        try:
            fs, path = url_to_fs(self.root, self.storage_options)
            steps = sorted(
                int(m.group(1)) for p in fs.ls(path, detail=False) if (m := _STEP.search(p.rstrip("/")))
            )
            for step in steps[:-keep] if keep else []:
                fs.rm(f"{path.rstrip('/')}/step-{step}", recursive=True)
                deleted.append(step)
            if deleted:
                log(f"embeddings: deleted step(s) {deleted} under {self.root} (keep_latest_k={keep})")
        except Exception as e:  # never fatal: a leftover folder costs space, not correctness
            log(f"embedding cleanup under {self.root} failed: {e!r}", level=logging.WARNING)
        return deleted

    def join_purger(self, timeout: float = 60.0) -> None:
        if self._purger is not None:
            self._purger.join(timeout)
