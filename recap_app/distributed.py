"""Process-group setup from the environment torchrun gives (or a one-process group when run directly).

gloo on CPU, nccl on GPU, plus a separate gloo group for checkpoint collectives.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    # A gloo group for checkpoint collectives only (see setup_distributed).
    checkpoint_group: dist.ProcessGroup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restart_safe_store() -> dict[str, Any]:
    """Under torchrun's shared agent store, init_process_group arguments that namespace it per attempt.

    torch 2.13's torchrun keeps ONE TCPStore for the whole job and hands it to every restarted attempt
    without a per-attempt prefix, so a restarted worker finds the dead attempt's process-group keys and
    hangs in gloo's rendezvous (seen with --max_restarts after a SIGKILLed rank: init_process_group never
    returns). TORCHELASTIC_RESTART_COUNT is the same on every worker of one agent; across several nodes
    it can differ (pytorch#135712): multi-node jobs should launch torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per attempt), which also turns this off.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart is None:
        return {}
    world_size = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
    )
    return {
        "store": dist.PrefixStore(f"recap/attempt-{restart}", store),
        "rank": int(os.environ["RANK"]),
        "world_size": world_size,
    }


def setup_distributed(collective_timeout_s: float | None = None) -> Runtime:
    """Join the torchrun job from its environment, or form a one-process group when run directly.
    `collective_timeout_s` bounds every collective of both groups (gloo's and nccl's default is 30 min)."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
        )
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = timedelta(seconds=collective_timeout_s) if collective_timeout_s else None
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout, **_restart_safe_store())
    # Async checkpoint saves run collectives from a background thread: they need a group of their own,
    # else they interleave with training's collectives on the default group and deadlock.
    checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)
    return Runtime(device, dist.get_rank(), dist.get_world_size(), checkpoint_group)
