"""The periodic embedding dump: which tables, how often, where. The gathering and writing of one table is
the original's `log_sharded_tensor_content` (recap_app/model.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from recap_app.config import EmbeddingLogConfig
from recap_app.logs import log
from recap_app.model import embedding_weights, log_sharded_tensor_content
from recap_app.storage import join


class EmbeddingLogger:
    """Writes the configured tables to `{root}/step-N/<table>.npy` every `cfg.every_n` steps and after the
    last step. Collective: every rank calls `maybe_log` at the same steps."""

    def __init__(
        self, cfg: EmbeddingLogConfig, root: str, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.cfg, self.root, self.storage_options = cfg, root, dict(storage_options or {})

    def should_log(self, step: int, last_step: bool = False) -> bool:
        return last_step or bool(self.cfg.every_n and step % self.cfg.every_n == 0)

    def maybe_log(self, model: torch.nn.Module, step: int, last_step: bool = False) -> str | None:
        """The step's folder URL when it wrote one, else None."""
        if not self.should_log(step, last_step):
            return None
        url = join(self.root, f"step-{step}")
        wanted = self.cfg.tables
        for weight_name, table, tensor in embedding_weights(model):
            if wanted is None or table in wanted:
                log_sharded_tensor_content(
                    weight_name, table, tensor, output_url=url, storage_options=self.storage_options
                )
        log(f"embedding tables written to {url}")
        return url
