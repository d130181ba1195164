"""Tiny gloo all-reduce for the cluster smoke tests: each rank contributes rank + 1.

Prints one line per rank, ``allreduce rank=R world=W sum=S expected=E``, and exits 1 on a mismatch
(or always, with ``--fail``, to exercise TorchX retries).
"""

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail", action="store_true", help="exit 1 after the all-reduce")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    expected = world * (world + 1) / 2
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    print(
        f"allreduce rank={rank} world={world} sum={t.item():g} expected={expected:g} "
        f"node={node} restart={restarts}",
        flush=True,
    )
    dist.destroy_process_group()
    if t.item() != expected:
        return 1
    return 1 if args.fail else 0


if __name__ == "__main__":
    sys.exit(main())
