"""`recap evaluate` / `torchx run recap.evaluate`: score a checkpoint on data, write eval_metrics.json."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch.distributed as dist

from recap_app.builder import RANKER_PREFIX, build_sharded_model
from recap_app.checkpoint import ModuleState, load_model_weights, resolve_checkpoint
from recap_app.config import load_config
from recap_app.distributed import setup_distributed
from recap_app.errors import exit_on_input_error
from recap_app.evaluation import evaluate, format_eval, one_pass_loader
from recap_app.logs import log, setup_logging
from recap_app.storage import join, write


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="recap evaluate", description=__doc__)
    parser.add_argument("--config", default="local")
    parser.add_argument("--checkpoint", required=True, help="step folder, checkpoints dir or run URL")
    parser.add_argument("--data", required=True, help="Parquet URL, directory or glob")
    parser.add_argument("--output", required=True, help="URL for eval_metrics.json")
    parser.add_argument(
        "--num-batches", type=int, default=0, help="at most this many batches per rank (0: the whole dataset)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.num_batches < 0:
        parser.error(f"--num-batches must be >= 0, got {args.num_batches}")
    with exit_on_input_error():
        config = load_config(args.config, args.overrides)
        runtime = setup_distributed()
        try:
            opts = config.storage.options
            ckpt_url = resolve_checkpoint(args.checkpoint, opts)
            model = build_sharded_model(config, runtime)
            load_model_weights(ModuleState(model, RANKER_PREFIX), ckpt_url, opts, runtime.checkpoint_group)
            batches, real_rows = one_pass_loader(args.data, config, runtime)
            metrics = evaluate(
                model,
                batches,
                config.task_names,
                runtime,
                max_batches=args.num_batches or None,
                real_rows=real_rows,
                weighted_auroc=config.eval.weighted_auroc,
            )
            log(f"{ckpt_url}: {format_eval(metrics, config.task_names)}")
            if runtime.rank == 0:
                out = join(args.output, "eval_metrics.json")
                report = {"checkpoint": ckpt_url, "data": args.data, **metrics}
                write(out, json.dumps(report, indent=2, sort_keys=True), opts)
                log(f"wrote {out}")
        finally:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
