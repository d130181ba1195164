"""Surviving failure with real processes: a rank SIGKILLed mid-training under TorchX, a rank killed inside a
checkpoint save, bit-exact resume, and the object store going away in the middle of saves.

Faults come from tests/fault_injection.py, a `recap train` main that installs them through the
product's extension points (a trainer callback, a checkpoint writer factory), chosen by env FAULT_*.
Every run is small (the `local` config, 256 examples a step, tens of steps); the data set is
generated once per module and read from local disk, also by the S3 run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from recap_app import storage
from recap_app.checkpoint import list_steps
from recap_app.config import load_config
from recap_app.export import load_unsharded
from recap_app.synthetic_data import ensure_synthetic_data

VENV_BIN = Path(sys.executable).parent
FAULT_MAIN = str(Path(__file__).with_name("fault_injection.py"))
FAULT_COMPONENTS = str(Path(__file__).with_name("fault_components.py"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
FAST = [
    "training.log_every_n=5",
    "eval.every_n=0",
    "eval.num_batches=2",
    "embedding_log.every_n=0",
]


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    """The trainer's own synthetic data set, generated once: the overrides that point a run at it."""
    root = tmp_path_factory.mktemp("data")
    ensure_synthetic_data(str(root), load_config("local", []))
    return [f"data.train_url={root}/train", f"data.eval_url={root}/eval"]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def _tail(text: str, n: int = 8000) -> str:
    return text[-n:]


def _kill_leftovers(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker` (a test's unique tmp path). TorchX's local
    scheduler starts torchrun in a session of its own, so killing our child's group does not reach it."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


class Job:
    """A command in its own process group, output to a log file, with every process it spawned (found by
    `marker` in their command lines) killed when the job is finished with."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], marker: str) -> None:
        self.cmd, self.log, self.marker = cmd, log, marker
        self.t0 = time.monotonic()
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                cmd, cwd=log.parent, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def fail(self, why: str) -> None:
        self.kill()
        pytest.fail(f"{why}\ncommand: {' '.join(self.cmd)}\nlog tail:\n{_tail(self.text())}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        _kill_leftovers(self.marker)

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            rc = self.proc.wait(max(1.0, timeout - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self.fail(f"timed out after {timeout:.0f}s")
        self.kill()  # orphans, if any
        return rc, self.text()

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                self.fail(f"exited ({self.proc.returncode}) while waiting for {what}")
            if time.monotonic() > deadline:
                self.fail(f"no {what} after {timeout:.0f}s")
            time.sleep(0.1)


def _run(
    cmd: list[str], log: Path, env: dict[str, str], marker: str, timeout: float = 150
) -> tuple[int, str]:
    return Job(cmd, log, env, marker).finish(timeout)


def _torchrun(out: str, *overrides: str) -> list[str]:
    return [*TORCHRUN, FAULT_MAIN, "--output", out, *overrides]


def _torchx(out: Path, max_retries: int, env: dict[str, str], *overrides: str) -> list[str]:
    env_arg = ",".join(f"{k}={v}" for k, v in {**env, "PYTHONPATH": str(Path(FAULT_MAIN).parent)}.items())
    return [
        str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", f"{FAULT_COMPONENTS}:train_with_faults",
        "-j", "1x2", "--max_retries", str(max_retries), "--env", env_arg, "--output", str(out),
        "--", *overrides,
    ]  # fmt: skip


def _resumes(log: str) -> list[int]:
    """Steps the trainer resumed from, in order."""
    return [int(m) for m in re.findall(r"resumed from \S+/checkpoints/step-(\d+) at step \1\b", log)]


def _train_metrics(out: str) -> list[dict]:
    fs, path = storage.url_to_fs(storage.join(out, "metrics.jsonl"))
    return [r for r in map(json.loads, fs.cat_file(path).decode().splitlines()) if "loss" in r]


def _metric_steps(out: str) -> list[int]:
    return [r["step"] for r in _train_metrics(out)]


def _check_final_state(out: str, num_steps: int, keep: list[int], log: str) -> None:
    """Every logged step (every 5th) appears once in metrics.jsonl up to num_steps; the checkpoints are
    exactly `keep`, none partial, and each loads into an unsharded ranker with finite weights."""
    root = storage.join(out, "checkpoints")
    complete, partial = list_steps(root)
    assert partial == [], f"partial checkpoints left: {partial}\n{_tail(log)}"
    assert complete == keep, f"checkpoints {complete}, expected {keep}\n{_tail(log)}"
    assert _metric_steps(out) == list(range(5, num_steps + 1, 5))  # no gap, no duplicate
    config = load_config("local", [])
    for step in complete:
        weights = load_unsharded(config, storage.join(root, f"step-{step}")).state_dict()
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), step


def _checkpoint_tensors(url: str) -> dict[str, object]:
    """Everything in a DCP checkpoint (model, both optimizers' state, step), flattened, in one process."""
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(url, f"{tmp}/all.pt")
        nested = torch.load(f"{tmp}/all.pt", weights_only=False)

    def flat(d: dict, prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return flat(nested)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _differences(a: dict[str, object], b: dict[str, object]) -> list[str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    diffs = []
    for k in sorted(a):
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bytes(x), _bytes(y))
            if not same:
                diffs.append(f"{k}: max |diff| {(x.double() - y.double()).abs().max().item():.3g}")
        elif x != y:
            diffs.append(f"{k}: {x!r} != {y!r}")
    return diffs


# ------------------------------------------------------------------------------------------------- tests
def test_torchx_rank_sigkilled_mid_training_resumes_and_finishes(tmp_path, dataset):
    """`torchx run recap.train --max_retries 2`; rank 1 SIGKILLs itself after step 35 (once): torchrun
    restarts both ranks, which resume from the newest complete checkpoint and finish all 40 steps."""
    out, once = tmp_path / "run", tmp_path / "fired"
    fault = {
        "FAULT_KILL_AT_STEP": "35",
        "FAULT_KILL_RANK": "1",
        "FAULT_ONCE_FILE": str(once),
    }
    steps = ["training.num_train_steps=40", "checkpoint.every_n=10", "checkpoint.keep_latest_k=3"]
    cmd = _torchx(out, 2, fault, *steps, *FAST, *dataset)
    rc, log = _run(cmd, tmp_path / "torchx.log", _env(), str(tmp_path), timeout=200)
    assert rc == 0 and "SUCCEEDED" in log, _tail(log)

    assert once.read_text().strip() == "rank 1 after step 35"
    assert "FAULT INJECTION: SIGKILL rank 1 after step 35" in log
    # Step 20's save was awaited before step 30's began; step 30's (async) is usually durable by the time
    # rank 1 dies, not always. The restart resumes from the newest complete one (test 2 pins the partial
    # case down deterministically).
    (resumed,) = _resumes(log)
    assert resumed in (20, 30), _tail(log)
    assert "step 40/40" in log
    _check_final_state(str(out), 40, [20, 30, 40], log)


def test_torchx_rank_killed_inside_checkpoint_save(tmp_path, dataset):
    """Rank 1 SIGKILLs itself inside the save of step 20, its shard written but no `.metadata`: the
    restarted attempt ignores the partial step-20, resumes from step 10, saves step 20 again into the
    same folder (a complete, loadable checkpoint), and keep-latest-k prunes as usual."""
    out, once = tmp_path / "run", tmp_path / "fired"
    fault = {"FAULT_KILL_IN_SAVE_STEP": "20", "FAULT_ONCE_FILE": str(once)}
    steps = ["training.num_train_steps=40", "checkpoint.every_n=10", "checkpoint.keep_latest_k=3"]
    cmd = _torchx(out, 1, fault, *steps, *FAST, *dataset)
    rc, log = _run(cmd, tmp_path / "torchx.log", _env(), str(tmp_path), timeout=200)
    assert rc == 0 and "SUCCEEDED" in log, _tail(log)

    assert once.read_text().strip() == "rank 1 in the save of step 20"
    assert "ignoring incomplete checkpoint(s) step-20 (no .metadata" in log, _tail(log)
    assert _resumes(log) == [10], _tail(log)
    assert "checkpoint step-10: deleted (keep_latest_k=3)" in log
    # The re-saved step 20: one shard per rank and nothing left over from the killed attempt.
    assert sorted(p.name for p in (out / "checkpoints/step-20").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    _check_final_state(str(out), 40, [20, 30, 40], log)


def test_resume_is_bit_exact(tmp_path, dataset):
    """30 uninterrupted steps (with evaluations in between) == the same run SIGKILLed after step 25 and
    resumed from its last async checkpoint: every tensor of every common checkpoint, model, both
    optimizers' state and the step, is bit-identical. The config has dropout, so this also covers the
    RNG: before dropout was seeded per (seed, rank, step) the resumed run drew other masks (126 of 177
    entries differed at step 30; without dropout it was already bit-exact)."""
    config = load_config("local", [])
    assert any(t.mlp and t.mlp.dropout for t in config.model.tasks.values()), "the check needs dropout"
    steps = ["training.num_train_steps=30", "checkpoint.every_n=10", "checkpoint.keep_latest_k=0"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    marker = str(tmp_path)

    rc, log_a = _run(
        _torchrun(a, *steps, *FAST, *dataset, "eval.every_n=7"), tmp_path / "a.log", _env(), marker
    )
    assert rc == 0, _tail(log_a)
    assert log_a.count("eval loss") == 5  # steps 7, 14, 21, 28 and the final one
    kill = {"FAULT_KILL_AT_STEP": "25", "FAULT_KILL_RANK": "1"}
    rc, log_b1 = _run(_torchrun(b, *steps, *FAST, *dataset), tmp_path / "b1.log", _env(kill), marker)
    assert rc != 0 and "FAULT INJECTION: SIGKILL rank 1 after step 25" in log_b1, _tail(log_b1)
    rc, log_b2 = _run(_torchrun(b, *steps, *FAST, *dataset), tmp_path / "b2.log", _env(), marker)
    assert rc == 0, _tail(log_b2)
    (resumed,) = _resumes(log_b2)
    assert resumed in (10, 20), _tail(log_b2)  # step 20's async save may not have finished by step 25

    complete_a, _ = list_steps(f"{a}/checkpoints")
    complete_b, _ = list_steps(f"{b}/checkpoints")
    assert complete_a == [10, 20, 30] and complete_b == [10, 20, 30]
    for step in complete_b:
        diffs = _differences(
            _checkpoint_tensors(f"{a}/checkpoints/step-{step}"),
            _checkpoint_tensors(f"{b}/checkpoints/step-{step}"),
        )
        assert not diffs, f"step {step}: {len(diffs)} differ:\n" + "\n".join(diffs[:30])
    ra = load_unsharded(config, f"{a}/checkpoints/step-30").state_dict()
    rb = load_unsharded(config, f"{b}/checkpoints/step-30").state_dict()
    assert _differences(ra, rb) == []
    # The logged training losses too (every 5 steps; the resumed run logs its own windows the same way).
    losses = [{k: v for k, v in r.items() if k == "step" or k.startswith("loss")} for r in _train_metrics(a)]
    assert losses == [
        {k: v for k, v in r.items() if k == "step" or k.startswith("loss")} for r in _train_metrics(b)
    ]
    assert [r["step"] for r in losses] == list(range(5, 31, 5))


def test_object_store_outage_during_saves(s3_server, tmp_path, dataset, monkeypatch):
    """Training to s3:// while the store goes away, per the documented policy (recap_app/checkpoint.py):

    - the store stops in the middle of step 20's save (both shards written, no `.metadata`) and stays down
      through step 30's save: each failure is logged naming its URL, training continues (it also has to
      survive the metrics writes that fail meanwhile), and step 10 stays intact;
    - the store comes back: step 40 saves, and its cleanup deletes the partial step-20 folder;
    - the store stops before the final save (step 50): retried, then the job exits non-zero naming the URL.
    """
    out = s3_server.url(f"fault-tolerance-{os.urandom(4).hex()}")
    root = storage.join(out, "checkpoints")
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env = _env(
        {
            **s3_server.env,
            "AWS_MAX_ATTEMPTS": "1",  # botocore: fail a request to a stopped store in ~0.5 s, not ~7 s
            "FAULT_PAUSE_IN_SAVE_STEPS": "20",
            "FAULT_PAUSE_BEFORE_SAVE_STEPS": "30,40,50",
            "FAULT_PAUSE_DIR": str(pauses),
        }
    )
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    storage.fsspec_clear_instance_caches()
    steps = ["training.num_train_steps=50", "checkpoint.every_n=10", "checkpoint.keep_latest_k=3"]
    job = Job(_torchrun(out, *steps, *FAST, *dataset), tmp_path / "train.log", env, str(tmp_path))

    def pause(tag: str) -> None:
        job.wait_for(
            f"both ranks paused at {tag}", lambda: len(list(pauses.glob(f"reached-{tag}-rank-*"))) == 2
        )

    def release(tag: str) -> None:
        (pauses / f"release-{tag}").touch()

    try:
        pause("in-save-20")
        s3_server.stop()
        release("in-save-20")

        pause("before-save-30")  # step 20's save has failed and been reported by now
        failed = f"checkpoint save to {root}/step-20 failed (1/3 in a row); training continues"
        assert failed in job.text(), _tail(job.text())
        release("before-save-30")  # the store is still down: step 30's save fails as well

        pause("before-save-40")
        failed = f"checkpoint save to {root}/step-30 failed (2/3 in a row); training continues"
        assert failed in job.text(), _tail(job.text())
        s3_server.start()
        assert list_steps(root) == ([10], [20])  # step 10 intact; step 20's shards, no .metadata
        release("before-save-40")

        pause("before-save-50")
        job.wait_for(
            "step 40 durable and the partial step 20 deleted", lambda: "step-20: deleted" in job.text()
        )
        assert "checkpoint step-40: durable" in job.text()
        assert list_steps(root) == ([10, 40], [])
        s3_server.stop()
        release("before-save-50")
        rc, log = job.finish(timeout=120)
    finally:
        job.kill()
        s3_server.ensure_running()

    assert rc != 0, _tail(log)
    assert f"checkpoint save to {root}/step-50 failed (attempt 1/3), retry in 2s" in log, _tail(log)
    assert f"checkpoint save to {root}/step-50 failed (attempt 2/3), retry in 4s" in log, _tail(log)
    fatal = (  # the cause in words, one line, no traceback (docs/robustness.md "Bad days")
        f"recap: error: checkpoint save to {root}/step-50 failed (final save, 3 attempts): the store is "
        "unreachable ("
    )
    assert fatal in log, _tail(log)
    assert "done:" not in log
    assert f"metrics write to {out}/metrics.jsonl failed; training continues" in log
    for step in (20, 30, 40):
        assert f"step {step + 5}/50" in log  # training went on after every failed save
    storage.fsspec_clear_instance_caches()
    assert list_steps(root)[0] == [10, 40]
    assert _metric_steps(out) == list(range(5, 51, 5))  # records whose write failed went out with later ones
    assert not storage.exists(storage.join(root, "step-50", ".metadata"))
    config = load_config("local", [])
    for step in (10, 40):
        weights = load_unsharded(config, storage.join(root, f"step-{step}")).state_dict()
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
