"""`recap train` / `python -m recap_app.train` (what `torchx run recap.train` runs under torchrun).

Run under torchrun or as a single process; either way a process group is set up (gloo on CPU, nccl on
GPU) so the same sharded code path and checkpoints are used. The work is the Trainer's (trainer.py).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from recap_app.config import RecapConfig, load_config
from recap_app.errors import exit_on_input_error
from recap_app.logs import ALL_RANKS, log, setup_logging
from recap_app.storage import set_connect_timeout

if TYPE_CHECKING:  # torch and torchrec take seconds to import: main says so first, then imports them
    from recap_app.checkpoint import WriterFactory
    from recap_app.trainer import TrainerCallback


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="recap train", description="Train the Recap heavy ranker (run under torchrun for >1 rank)."
    )
    parser.add_argument("--config", default="local", help="packaged config name or YAML URL")
    parser.add_argument("--output", default=None, help="run URL (overrides training.save_dir)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.num_train_steps=20")
    # Intermixed: overrides may come before, between or after the options (`x=1 --output URL y=2`).
    return parser.parse_intermixed_args(argv)


def load_run_config(args: argparse.Namespace) -> RecapConfig:
    config = load_config(args.config, args.overrides)
    if args.output:
        config.training.save_dir = args.output
    return config


def check_before_start(config: RecapConfig) -> None:
    """What the config alone can refuse, before any data is generated or a process group formed (a
    batch that does not split over torchrun's WORLD_SIZE would otherwise fail after both)."""
    set_connect_timeout(config.storage.connect_timeout_s)
    config.data.per_rank_batch_size(int(os.environ.get("WORLD_SIZE", "1")))


def main(
    argv: Sequence[str] | None = None,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    checkpoint_writer_factory: WriterFactory | None = None,
) -> int:
    """The command line; `callbacks` and `checkpoint_writer_factory` go to the Trainer (extension points
    for programs that wrap this main, such as the fault-injection tests)."""
    setup_logging()
    args = parse_args(argv)
    start = time.perf_counter()
    with exit_on_input_error():
        config = load_run_config(args)  # a config error ends the run before the slow imports
        check_before_start(config)
        log(f"recap train: output {config.training.save_dir}; loading torch and torchrec")
        import torch.distributed as dist

        from recap_app.distributed import setup_distributed
        from recap_app.preemption import PREEMPTED_EXIT_CODE
        from recap_app.trainer import Trainer

        runtime = setup_distributed(config.training.collective_timeout_s)
        took = time.perf_counter() - start
        log(f"rank {runtime.rank}/{runtime.world_size} on {runtime.device} ({took:.1f} s)", rank=ALL_RANKS)
        try:
            trainer = Trainer(
                config, runtime, callbacks=callbacks, checkpoint_writer_factory=checkpoint_writer_factory
            )
            summary = trainer.train()
        finally:
            dist.destroy_process_group()
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


if __name__ == "__main__":
    raise SystemExit(main())
