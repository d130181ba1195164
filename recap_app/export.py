"""`recap export`: load a sharded training checkpoint into an unsharded ranker in one process.

No process group, no torchrun: DCP reads every rank's shards (`no_dist=True`) into plain tensors. The
result is the ranker's state dict saved with torch.save to any URL, ready for serving or analysis.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from typing import Any

import torch

from recap_app.builder import build_ranker
from recap_app.checkpoint import load_model_weights, resolve_checkpoint
from recap_app.config import RecapConfig, load_config
from recap_app.errors import exit_on_input_error
from recap_app.logs import log, setup_logging
from recap_app.nonfinite import NonFiniteError, nonfinite_names
from recap_app.ranker import RecapRanker
from recap_app.storage import check_bucket, write


def load_unsharded(
    config: RecapConfig, checkpoint_url: str, storage_options: dict[str, Any] | None = None
) -> RecapRanker:
    """The ranker of `config` with the weights of a (sharded) checkpoint, on CPU, in eval mode."""
    ranker = build_ranker(config)  # checkpoints hold the ranker's own keys
    load_model_weights(ranker, checkpoint_url, storage_options, no_dist=True)
    return ranker.eval()


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="recap export", description=__doc__)
    parser.add_argument("--config", default="local", help="config the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="a step folder, e.g. RUN/checkpoints/step-200")
    parser.add_argument("--output", required=True, help="URL of the torch.save'd ranker state dict")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    with exit_on_input_error():
        config = load_config(args.config, args.overrides)
        check_bucket(args.output, config.storage.options)  # before the work, not after it
        url = resolve_checkpoint(args.checkpoint, config.storage.options)
        ranker = load_unsharded(config, url, config.storage.options)
        bad = nonfinite_names(ranker.state_dict())
        if bad:
            raise NonFiniteError(
                f"checkpoint {url} holds NaN / inf in {len(bad)} tensor(s) {bad[:5]}: not exported"
            )
    buf = io.BytesIO()
    torch.save(ranker.state_dict(), buf)
    write(args.output, buf.getvalue(), config.storage.options)
    params = sum(t.numel() for t in ranker.state_dict().values())
    log(f"exported {url} -> {args.output} ({params} values, {len(buf.getvalue()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
