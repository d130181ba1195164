"""`python -m recap_app.launch ...`: torchrun (torch.distributed.run, same arguments), quiet on signals.

On SIGTERM / SIGINT torchrun's agent forwards the signal to its workers (recap's trainer then saves the
step it reached, see preemption.py), waits for them, and raises SignalException with a traceback that
says nothing a user can act on. This wrapper turns it into one line and the conventional exit status
128 + signal (143 for SIGTERM), which Slurm (TorchX's requeue) and Volcano (maxRetry) retry.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.run import parse_args, run


@record  # as torchrun's own main: a real failure still reaches TorchX's error file; a signal does not
def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except SignalException as e:
        print(f"recap: torchrun stopped by {e.sigval.name}; its workers saved their step", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
