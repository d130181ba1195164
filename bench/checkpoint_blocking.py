"""How long a checkpoint blocks training: async vs synchronous save, side by side, production config.

Run with torchrun, e.g.
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/checkpoint_blocking.py [OUTPUT_URL]
Prints, per mode, the seconds training is blocked and the seconds until the checkpoint is durable.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time

import torch.distributed as dist

from recap_app.builder import RANKER_PREFIX, build_training
from recap_app.checkpoint import Checkpointer, ModuleState
from recap_app.config import CheckpointConfig, load_config
from recap_app.distributed import setup_distributed
from recap_app.logs import log, setup_logging
from recap_app.storage import url_to_fs

REPEATS = 3


def checkpoint_bytes(root: str) -> int:
    fs, path = url_to_fs(f"{root}/sync")
    return fs.du(path)


def main() -> None:
    setup_logging()
    runtime = setup_distributed()
    root = sys.argv[1] if len(sys.argv) > 1 else None
    local_tmp = None
    if root is None:
        local_tmp = tempfile.mkdtemp(prefix="recap-ckpt-bench-") if runtime.rank == 0 else ""
        holder = [local_tmp]
        dist.broadcast_object_list(holder)
        root = holder[0]
    config = load_config("production", ["data.global_batch_size=64"])
    parts = build_training(config, runtime)
    parts.optimizer.init_state()  # Adam moments and Adagrad state exist, as after the first step
    states = {"model": ModuleState(parts.model, RANKER_PREFIX), "optimizer": parts.optimizer}
    results: dict[str, list[tuple[float, float]]] = {"sync": [], "async": []}
    step = 0
    for _ in range(REPEATS):
        for mode in ("sync", "async"):
            step += 1
            cfg = CheckpointConfig(every_n=1, keep_latest_k=1, async_save=(mode == "async"))
            ckpt = Checkpointer(cfg, f"{root}/{mode}", states, process_group=runtime.checkpoint_group)
            dist.barrier()
            start = time.perf_counter()
            blocked = ckpt.save(step)
            ckpt.wait()
            durable = time.perf_counter() - start
            ckpt.close()
            results[mode].append((blocked, durable))
    if runtime.rank == 0:
        sync_block = statistics.median(b for b, _ in results["sync"])
        async_block = statistics.median(b for b, _ in results["async"])
        print(
            f"production config, {runtime.world_size} rank(s), "
            f"checkpoint {checkpoint_bytes(root) / 1e6:.0f} MB"
        )
        for mode in ("sync", "async"):
            blocks = ", ".join(f"{b:.2f}" for b, _ in results[mode])
            durables = ", ".join(f"{d:.2f}" for _, d in results[mode])
            print(f"  {mode:5s}: blocked s [{blocks}]  durable s [{durables}]")
        print(
            f"  median blocking: sync {sync_block:.2f}s, async {async_block:.2f}s, "
            f"ratio sync/async = {sync_block / max(async_block, 1e-9):.1f}x"
        )
    dist.barrier()
    if local_tmp:
        shutil.rmtree(local_tmp, ignore_errors=True)
    log("done")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
