"""recap_app.slurm_compat on sacct output recorded from the test cluster (Slurm 22.05.8); no Slurm needed."""

import subprocess

import pytest
from torchx.schedulers import slurm_scheduler
from torchx.specs import AppState

from recap_app.slurm_compat import (
    RecapSlurmScheduler,
    count_requeues,
    create_scheduler,
    parse_sacct,
    slurm_state,
)

# `torchx cancel` (scancel) of a one-replica utils.sh job.
CANCELLED = """JobID|JobName|Partition|Account|AllocCPUS|State|ExitCode
26|sh-0|debug|root|1|CANCELLED by 0|0:0
26.batch|batch||root|1|CANCELLED|0:15
26.0|sh||root|1|FAILED|15:0
"""
# dist.ddp -j 2x1 --max_retries 1, script exits 1: one heterogeneous group per replica.
FAILED_HET = """JobID|JobName|Partition|Account|AllocCPUS|State|ExitCode
6+0|allreduce-0|debug|root|2|FAILED|15:0
6+0.batch|batch||root|2|FAILED|15:0
6+0.0|bash||root|2|FAILED|1:0
6+1|allreduce-1|debug|root|2|FAILED|15:0
6+1.0|bash||root|2|CANCELLED|0:15
"""
FAILED_HET_DUPLICATES = "6+0|REQUEUED\n6+1|REQUEUED\n6+0|FAILED\n6+1|FAILED\n"


def _fake_sacct(monkeypatch, outputs):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        out = outputs[tuple(cmd[1:3])]
        return subprocess.CompletedProcess(cmd, 0, out if kwargs.get("text") else out.encode())

    monkeypatch.setattr(subprocess, "run", run)
    return calls


@pytest.mark.parametrize(
    "state, expected",
    [
        ("COMPLETED", AppState.SUCCEEDED),
        ("CANCELLED by 0", AppState.CANCELLED),
        ("CANCELLED by 1000", AppState.CANCELLED),
        ("REQUEUED", AppState.PENDING),
        ("FAILED", AppState.FAILED),
    ],
)
def test_slurm_state(state, expected):
    assert slurm_state(state) == expected


def test_unknown_state_is_an_error():
    with pytest.raises(ValueError, match="BOGUS"):
        slurm_state("BOGUS")


def test_upstream_describe_crashes_on_cancelled_by(monkeypatch):
    """The torchx 0.7.0 bug this module exists for; drop slurm_compat once this test fails."""
    _fake_sacct(monkeypatch, {("--parsable2", "-j"): CANCELLED})
    with pytest.raises(AssertionError, match="CANCELLED by 0"):
        slurm_scheduler.SlurmScheduler("t").describe("26")


def test_describe_cancelled(monkeypatch):
    _fake_sacct(monkeypatch, {("--parsable2", "-j"): CANCELLED, ("-D", "-X"): "26|CANCELLED by 0\n"})
    resp = create_scheduler("t").describe("26")
    assert resp.state == AppState.CANCELLED
    assert resp.msg == "CANCELLED by 0"
    assert resp.num_restarts == 0
    assert [(r.role, [x.id for x in r.replicas]) for r in resp.roles_statuses] == [("sh", [0])]


def test_describe_heterogeneous_job_counts_requeues(monkeypatch):
    calls = _fake_sacct(monkeypatch, {("--parsable2", "-j"): FAILED_HET, ("-D", "-X"): FAILED_HET_DUPLICATES})
    resp = RecapSlurmScheduler("t").describe("6")
    assert resp.state == AppState.FAILED
    assert resp.num_restarts == 1
    assert [(r.name, r.num_replicas) for r in resp.roles] == [("allreduce", 2)]
    assert [x.id for x in resp.roles_statuses[0].replicas] == [0, 1]
    assert calls[0] == ["sacct", "--parsable2", "-j", "6"]


def test_parse_sacct_matches_upstream_where_upstream_works(monkeypatch):
    _fake_sacct(monkeypatch, {("--parsable2", "-j"): FAILED_HET})
    upstream = slurm_scheduler.SlurmScheduler("t").describe("6")
    ours = parse_sacct("6", FAILED_HET)
    assert (ours.state, ours.msg, ours.roles, ours.roles_statuses) == (
        upstream.state,
        upstream.msg,
        upstream.roles,
        upstream.roles_statuses,
    )


def test_parse_sacct_other_job_or_nothing():
    assert parse_sacct("7", "") is None
    assert parse_sacct("7", "JobID|JobName|State\n").state == AppState.UNKNOWN
    resp = parse_sacct("7", FAILED_HET)  # a het component's own id is not an app id
    assert resp.state == AppState.UNKNOWN and resp.roles == []


def test_count_requeues():
    assert count_requeues("6", FAILED_HET_DUPLICATES) == 1
    assert count_requeues("6", "6+0|RUNNING\n6+1|RUNNING\n") == 0
    assert count_requeues("9", "9|REQUEUED\n9|REQUEUED\n9|FAILED\n") == 2
    assert count_requeues("9", "") == 0
