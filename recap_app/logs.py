"""Rank-aware logging: rank 0 speaks by default; `rank=ALL_RANKS` lets every rank speak, prefixed."""

from __future__ import annotations

import logging
import os
import sys
import warnings

ALL_RANKS = -1
logger = logging.getLogger("recap")


def current_rank() -> int:
    # torch.distributed only if something imported it already (no process group can exist otherwise):
    # logging must not cost torch's import, so a main can speak before it.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: int | str | None = None) -> None:
    """Idempotent: one stderr handler with the rank in every line, at `level`, else $RECAP_LOG_LEVEL
    (e.g. DEBUG), else INFO. (LOGLEVEL is torchrun's own.)"""
    if logger.handlers:
        return
    level = level or os.environ.get("RECAP_LOG_LEVEL", "").upper() or logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [rank {current_rank()}] %(levelname)s %(message)s", "%H:%M:%S")
    )
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    # Deprecation notices torch and torchrec raise about each other's internals (torchrec's ShardedTensor,
    # reduce_scatter_tensor, broadcast_buffers): once per rank and call site, and nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(rec)?\.")
    # torchrec's tracer calls torch.fx's is_fx_tracing(), which logs a deprecation line on every rank.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def log(msg: str, rank: int = 0, level: int = logging.INFO) -> None:
    """Log on `rank` only (ALL_RANKS: on every rank)."""
    if rank == ALL_RANKS or rank == current_rank():
        setup_logging()
        logger.log(level, msg)
