"""TorchX 0.7.0's Slurm scheduler with its ``sacct`` parsing fixed.

``SlurmScheduler.describe`` in torchx 0.7.0 looks sacct's whole ``State`` column up in
``SLURM_STATES`` and asserts it is there. sacct reports a job cancelled by someone as
``CANCELLED by <uid>``, so ``torchx status``, ``torchx run --wait`` and ``torchx log`` crash with
``AssertionError: failed to translate slurm state CANCELLED by 0 to torchx state`` for every job
stopped by ``scancel`` or ``torchx cancel``. (Later torchx matches the state by prefix.) It also
leaves ``num_restarts`` at -1 although its retries are ``scontrol requeue``\\ s that sacct records.

:class:`RecapSlurmScheduler` changes ``describe``: the state is read from the first word of
``State``, and ``num_restarts`` counts the job's ``REQUEUED`` accounting records. It adds one run option,
``signal`` (default ``TERM@120``): every replica group asks Slurm for ``#SBATCH --signal=TERM@120``, a
SIGTERM to the job steps two minutes before the time limit, so the trainer saves the step it reached
(recap_app/preemption.py) and the requeue (``--max_retries``) resumes there instead of losing the work
since the last periodic checkpoint. Everything else (submission, logs, cancel) is torchx's.

To use it from the ``torchx`` CLI, register it in ``pyproject.toml``. A ``torchx.schedulers``
entry-point group with any entry *replaces* torchx's builtin schedulers, so list the builtins
still used as well::

    [project.entry-points."torchx.schedulers"]
    slurm = "recap_app.slurm_compat:create_scheduler"
    local_cwd = "torchx.schedulers.local_scheduler:create_scheduler"
    kubernetes = "torchx.schedulers.kubernetes_scheduler:create_scheduler"

From Python: ``Runner(name, scheduler_factories={"slurm": create_scheduler, ...})``.
"""

from __future__ import annotations

import csv
import subprocess
from typing import Any

from torchx.schedulers.api import DescribeAppResponse
from torchx.schedulers.slurm_scheduler import SLURM_STATES, SlurmBatchRequest, SlurmScheduler
from torchx.specs import AppDef, AppDryRunInfo, AppState, runopts

from recap_app.scheduler_compat import describe_response

# SIGTERM to the job steps 120 s before the time limit: time for the ranks to agree on a step and save it.
DEFAULT_SIGNAL = "TERM@120"


def slurm_state(state: str) -> AppState:
    """Map sacct's ``State`` (``COMPLETED``, ``CANCELLED by 0``, ...) to an :class:`AppState`."""
    word = state.split(" ", 1)[0]
    if word not in SLURM_STATES:
        raise ValueError(f"unknown Slurm job state {state!r}")
    return SLURM_STATES[word]


def _is_job_record(job_id: str, app_id: str) -> bool:
    """``app_id`` itself or one of its heterogeneous components (``123+1``), not a step (``.batch``)."""
    return "." not in job_id and job_id.partition("+")[0] == app_id


def parse_sacct(app_id: str, sacct_parsable2: str) -> DescribeAppResponse | None:
    """torchx 0.7.0's ``describe`` parsing of ``sacct --parsable2 -j APP_ID``, state bug fixed."""
    lines = sacct_parsable2.split("\n")
    if len(lines) <= 1:
        return None
    msg = ""
    app_state = AppState.UNKNOWN
    replicas = []
    for row in csv.DictReader(lines, delimiter="|"):
        if not _is_job_record(row["JobID"], app_id):
            continue
        msg = row["State"]
        app_state = slurm_state(msg)
        # torchx names each replica's group "<role>-<replica id>"; sacct may lag behind.
        role, _, replica_id = row["JobName"].rpartition("-")
        if role and replica_id.isdigit():
            replicas.append((role, int(replica_id), app_state))
    return describe_response(app_id, app_state, replicas, msg=msg)


def count_requeues(app_id: str, sacct_duplicates: str) -> int:
    """Requeues of ``app_id`` in ``sacct -D -X -n -P -o JobID,State -j APP_ID`` (first component)."""
    first = {app_id, f"{app_id}+0"}
    records = (line.split("|") for line in sacct_duplicates.splitlines() if line.strip())
    return sum(1 for job_id, state, *_ in records if job_id in first and state.startswith("REQUEUED"))


class RecapSlurmScheduler(SlurmScheduler):
    """torchx 0.7.0's ``slurm`` scheduler; ``describe`` survives cancelled jobs and counts retries, and
    jobs are signalled (SIGTERM) ahead of their time limit."""

    def _run_opts(self) -> runopts:
        opts = super()._run_opts()
        opts.add(
            "signal",
            type_=str,
            default=DEFAULT_SIGNAL,
            help="sbatch --signal for every replica group: SIGTERM this many seconds before the time "
            "limit, so recap checkpoints the step it reached ('' to leave it out)",
        )
        return opts

    def _submit_dryrun(self, app: AppDef, cfg: Any) -> AppDryRunInfo[SlurmBatchRequest]:
        info = super()._submit_dryrun(app, cfg)
        signal = cfg.get("signal", DEFAULT_SIGNAL)
        if signal:
            for replica in info.request.replicas.values():
                replica.sbatch_opts["signal"] = signal
        return info

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        out = _run(["sacct", "--parsable2", "-j", app_id])
        resp = parse_sacct(app_id, out)
        if resp is not None:
            dups = _run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", app_id])
            resp.num_restarts = count_requeues(app_id, dups)
        return resp


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True).stdout


def create_scheduler(session_name: str, **kwargs: Any) -> RecapSlurmScheduler:
    return RecapSlurmScheduler(session_name=session_name)
