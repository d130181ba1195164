"""Every path is a URL: the whole trainer path, as real processes, on every storage backend.

For local, file://, s3:// (moto), gs:// (gcp-storage-emulator) and az:// (azurite), each a real server
process (tests/storage_servers.py):

  generate-data -> train 20 steps on 2 ranks (torchrun) -> resume to 30 -> evaluate -> export,

with data, checkpoints, embedding logs, metrics, eval metrics and the exported model all on that backend.
To keep the file's runtime down each phase is ONE launch for all five backends (tests/e2e_lib.py runs
the real `main(argv)` of the module once per backend inside it); the per-backend tests then check what
each backend holds. Also: the issue's Done-when check through `torchx run -s local_cwd` against S3, warm
start, checkpoint/config mismatch errors, and that credentials never reach logs or metrics.

Run with -s to see per-backend timings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pytest
import storage_servers
import torch
import yaml
from conftest import BACKENDS
from e2e_lib import Result, driver_cmd, not_in, run

from recap_app import storage
from recap_app.config import load_config
from recap_app.export import load_unsharded
from recap_app.model import load_embedding_table
from recap_app.ranker import RecapRanker
from recap_app.run_record import read_run_record

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

VENV_BIN = str(Path(sys.executable).parent)
TABLES = ("user", "author")  # the local config's embedding tables
TASKS = load_config("local").task_names
# moto accepts any key pair. The servers' own secret ("testing") is too common a word to prove its
# absence from logs, so the runs here sign with a distinctive one.
AWS_SECRET = f"e2e-aws-secret-{uuid.uuid4().hex}"
AZURE_KEY = storage_servers.AZURE_KEY  # the account key inside AZURE_STORAGE_CONNECTION_STRING
SECRETS = {"AWS_SECRET_ACCESS_KEY": AWS_SECRET, "Azure account key": AZURE_KEY}

# Tiny runs: 20 steps with checkpoints and embedding logs every 10, a metrics record every 5 steps,
# eval on 4 batches per rank at the last step only.
RUN_OVERRIDES = [
    "checkpoint.every_n=10",
    "embedding_log.every_n=10",
    "training.log_every_n=5",
    "eval.num_batches=4",
]
EVAL_BATCHES = 4  # per rank, of global_batch_size / 2 examples


def assert_no_secrets(text: str, where: str) -> None:
    for name, secret in SECRETS.items():
        not_in(secret, text, f"{where} ({name})")


def read_text(url: str) -> str:
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "r") as f:
        return f.read()


def read_jsonl(url: str) -> list[dict]:
    return [json.loads(line) for line in read_text(url).splitlines() if line.strip()]


def train_steps(metrics: list[dict]) -> list[int]:
    """Steps of the training records (eval records carry eval/* keys and no loss)."""
    return [r["step"] for r in metrics if "loss" in r]


def ranker_state(run_url: str, step: int, overrides: list[str] | None = None) -> dict[str, torch.Tensor]:
    ranker = load_unsharded(load_config("local", overrides or []), f"{run_url}/checkpoints/step-{step}")
    return ranker.state_dict()


# ------------------------------------------------------------------------------------------- fixtures
@dataclass
class Stores:
    urls: dict[str, str]  # backend -> fresh root URL for this module
    env: dict[str, str]  # what a child process needs to reach every store
    servers: dict[str, storage_servers.StorageServer]


@pytest.fixture(scope="module")
def stores(request, tmp_path_factory) -> Stores:
    """A fresh root on every backend, and one environment that reaches them all (also set in os.environ
    for the module, so in-process fsspec reads work)."""
    servers = {b: request.getfixturevalue(f"{b}_server") for b in ("s3", "gcs", "azure")}
    env = {k: v for s in servers.values() for k, v in s.env.items()}
    env["AWS_SECRET_ACCESS_KEY"] = AWS_SECRET
    assert AZURE_KEY in env["AZURE_STORAGE_CONNECTION_STRING"]
    tag = uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("e2e")
    urls = {"local": str(root / "local"), "file": f"file://{root}/file"}
    urls.update({b: s.url(f"e2e-{tag}") for b, s in servers.items()})
    assert list(urls) == BACKENDS  # every backend of the storage_url fixture, in its order
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        storage.fsspec_clear_instance_caches()
        yield Stores(urls, env, servers)
    storage.fsspec_clear_instance_caches()


@dataclass
class FullPath:
    urls: dict[str, str]
    phases: dict[str, Result] = field(default_factory=dict)

    def section(self, phase: str, backend: str) -> str:
        return self.phases[phase].sections()[list(self.urls).index(backend)]


@pytest.fixture(scope="module")
def full_path(stores, tmp_path_factory) -> FullPath:
    """generate-data, train 20, resume to 30, evaluate, export: one launch per phase for all backends."""
    urls, env = stores.urls, stores.env
    cwd = tmp_path_factory.mktemp("cwd")  # relative paths (none expected) land here, not in the repo

    def train_jobs(steps: int) -> list[list[str]]:
        return [
            [
                "--output",
                f"{u}/run",
                f"training.num_train_steps={steps}",
                f"data.train_url={u}/data/train",
                f"data.eval_url={u}/data/eval",
                *RUN_OVERRIDES,
            ]  # fmt: skip
            for u in urls.values()
        ]

    phases = {
        "generate-data": driver_cmd(
            "recap_app.cli",
            [
                [
                    "generate-data",
                    "--output",
                    f"{u}/data",
                    "--num-examples",
                    "20000",
                    "--num-eval-examples",
                    "4000",
                ]
                for u in urls.values()
            ],
        ),
        "train": driver_cmd("recap_app.train", train_jobs(20), nproc=2),
        "resume": driver_cmd("recap_app.train", train_jobs(30), nproc=2),
        "evaluate": driver_cmd(
            "recap_app.evaluate",
            [
                [
                    "--checkpoint",
                    f"{u}/run",
                    "--data",
                    f"{u}/data/eval",
                    "--output",
                    f"{u}/eval",
                    "--num-batches",
                    str(EVAL_BATCHES),
                ]  # fmt: skip
                for u in urls.values()
            ],
            nproc=2,
        ),
        "export": driver_cmd(
            "recap_app.cli",
            [["export", "--checkpoint", f"{u}/run", "--output", f"{u}/model.pt"] for u in urls.values()],
        ),
    }
    result = FullPath(urls)
    for phase, cmd in phases.items():
        result.phases[phase] = run(cmd, env=env, cwd=cwd, timeout=240, what=f"phase {phase}")
    print("\nseconds per job (in one launch per phase; launch total in brackets):")
    print(f"  {'phase':14}" + "".join(f"{b:>8}" for b in urls))
    for phase, res in result.phases.items():
        secs = res.job_seconds()
        print(
            f"  {phase:14}"
            + "".join(f"{secs.get(i, math.nan):8.1f}" for i in range(len(urls)))
            + f"  [{res.seconds:.1f}]"
        )
    return result


# ------------------------------------------------------------------------------------------ full path
@pytest.mark.parametrize("backend", BACKENDS)
def test_full_path(full_path: FullPath, backend: str):
    url = full_path.urls[backend]
    run_url = f"{url}/run"

    # train 20: checkpoints and embedding logs every 10 steps, all on the backend
    first = full_path.section("train", backend)
    assert "training steps 0..20" in first, first[-3000:]
    assert "resumed from" not in first
    for step in (10, 20, 30):
        assert storage.exists(f"{run_url}/checkpoints/step-{step}/.metadata"), step
        for table in TABLES:
            assert storage.exists(f"{run_url}/embeddings/step-{step}/{table}.npy"), (step, table)

    # resume: from the step-20 checkpoint, metrics continue from 20 (no step twice, none lost)
    second = full_path.section("resume", backend)
    assert f"resumed from {run_url}/checkpoints/step-20 at step 20" in second, second[-3000:]
    assert "training steps 20..30" in second
    metrics = read_jsonl(f"{run_url}/metrics.jsonl")
    assert train_steps(metrics) == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in metrics if "eval/loss" in r] == [20, 30]
    assert_no_secrets(json.dumps(metrics), f"{backend} metrics.jsonl")

    # evaluate: eval_metrics.json with a per-task AUROC, scored from the newest checkpoint
    ev = json.loads(read_text(f"{url}/eval/eval_metrics.json"))
    assert ev["checkpoint"] == f"{run_url}/checkpoints/step-30"
    assert ev["data"] == f"{url}/data/eval"
    assert ev["examples"] == EVAL_BATCHES * 256
    for task in TASKS:
        assert 0.0 <= ev[f"auroc/{task}"] <= 1.0, (task, ev)
        assert math.isfinite(ev[f"rce/{task}"]), (task, ev)

    # embedding logs == the tables in the checkpoint of the same step (gathered from both ranks' shards)
    for step in (20, 30):
        state = ranker_state(run_url, step)
        for table in TABLES:
            logged = load_embedding_table(f"{run_url}/embeddings/step-{step}", table)
            in_ckpt = state[f"embedding_bag_collection.embedding_bags.{table}.weight"]
            assert logged.shape == in_ckpt.shape, (step, table)
            assert torch.equal(logged, in_ckpt), (step, table)

    # export: `recap export --checkpoint RUN` -> the unsharded ranker's state dict of the newest step
    fs, path = storage.url_to_fs(f"{url}/model.pt")
    with fs.open(path, "rb") as f:
        exported = torch.load(f, weights_only=True)
    assert exported.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(exported[k], v), k

    for phase in full_path.phases:
        assert_no_secrets(full_path.section(phase, backend), f"{backend} {phase} log")


def test_full_path_logs_hold_no_credentials(full_path: FullPath):
    """Whole launch logs (all ranks, torchrun's own lines), not just the per-backend sections."""
    for phase, res in full_path.phases.items():
        assert_no_secrets(res.output, f"{phase} log")
        assert "AZURE_STORAGE_CONNECTION_STRING" not in res.output, phase


# --------------------------------------------------------------------------------- torchx, Done-when
def test_torchx_local_cwd_s3_train_and_resume(s3_server, tmp_path, monkeypatch):
    """The issue's Done-when check: `torchx run -s local_cwd recap.train -j 1x2 --output s3://...` from
    an unrelated directory writes checkpoints and embeddings to S3, and a second run resumes at step 20.

    Credentials and the endpoint reach the job only through the inherited environment: torchx's local
    scheduler starts each replica with os.environ plus the role's env (`_get_replica_env`), and the
    component puts no credentials into the role's env (checked on the AppDef below)."""
    from torchx_components.recap import train as train_component

    out = s3_server.url(f"torchx-{uuid.uuid4().hex[:8]}/run")
    env = {**s3_server.env, "AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    for key, value in env.items():  # the checks below read the bucket in this process
        monkeypatch.setenv(key, value)
    storage.fsspec_clear_instance_caches()
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    cwd = tmp_path / "anywhere"
    cwd.mkdir()
    assert not (cwd / ".torchxconfig").exists()

    role_env = train_component(output=out).roles[0].env
    assert set(role_env) <= {"LOGLEVEL", "OMP_NUM_THREADS", "PYTHONUNBUFFERED"}, role_env

    def torchx(steps: int) -> Result:
        cmd = [
            shutil.which("torchx", path=env["PATH"]), "run", "-s", "local_cwd", "--log", "recap.train",
            "-j", "1x2", "--output", out, "--",
            f"training.num_train_steps={steps}", "checkpoint.every_n=10",
        ]  # fmt: skip
        res = run(cmd, env=env, cwd=cwd, timeout=240, what=f"torchx run ({steps} steps)")
        assert_no_secrets(res.output, f"torchx log ({steps} steps)")
        return res

    first = torchx(20)
    assert f"checkpoint step-20: saved to {out}/checkpoints/step-20" in first.output, first.tail()
    for obj in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        assert storage.exists(f"{out}/checkpoints/step-20/{obj}"), obj
    for table in TABLES:
        assert storage.exists(f"{out}/embeddings/step-20/{table}.npy"), table
    assert train_steps(read_jsonl(f"{out}/metrics.jsonl")) == [20]

    second = torchx(30)
    assert f"resumed from {out}/checkpoints/step-20 at step 20" in second.output, second.tail()
    assert storage.exists(f"{out}/checkpoints/step-30/.metadata")
    metrics = read_jsonl(f"{out}/metrics.jsonl")
    assert train_steps(metrics) == [20, 30]
    assert_no_secrets(json.dumps(metrics), "torchx metrics.jsonl")
    # Nothing was written into the directory torchx ran from (the output is explicit and remote).
    assert list(cwd.iterdir()) == []


# ------------------------------------------------------------------------ warm start, mismatch errors
WARM_STEPS = 2


def author_table(num_embeddings: int, embedding_dim: int) -> str:
    """An override replacing the local config's tables with the author table resized."""
    return (
        "model.embeddings.tables=["
        "{name: user, num_embeddings: 2000, embedding_dim: 16, feature_names: [user_id], id_transform: hash},"
        f" {{name: author, num_embeddings: {num_embeddings}, embedding_dim: {embedding_dim},"
        " feature_names: [author_id], id_transform: hash}]"
    )


AUTHOR_KEY = "model.embedding_bag_collection.embedding_bags.author.weight"


@dataclass
class WarmStart:
    source: str  # the step folder warm-started from
    output: str
    storage_options: dict
    result: Result


@pytest.fixture(scope="module")
def warm_start(full_path, stores, tmp_path_factory) -> WarmStart:
    """One 2-rank launch, two jobs, both with credentials only in the config's storage options (no AWS_*
    in the environment, so any code path that drops the options fails):
      0. warm start from the S3 run's step-20 into a fresh S3 output, 2 steps;
      1. warm start from the same checkpoint with the author table resized: must fail clearly.
    Options come after the overrides in these command lines, as a user may type them."""
    s3 = stores.servers["s3"]
    source = f"{full_path.urls['s3']}/run/checkpoints/step-20"
    output = s3.url(f"warm-{uuid.uuid4().hex[:8]}")
    options = {**s3.storage_options, "secret": AWS_SECRET}
    data = f"{full_path.urls['s3']}/data"
    tmp = tmp_path_factory.mktemp("warm")
    cfg = yaml.safe_load(resources.files("recap_app.configs").joinpath("local.yaml").read_text())
    cfg["storage"] = {"options": options}
    cfg_path = tmp / "with-credentials.yaml"  # in a file, so the secret is not on any command line
    cfg_path.write_text(yaml.safe_dump(cfg))
    common = [
        "--config", str(cfg_path), f"checkpoint.initial_checkpoint={source}",
        f"data.train_url={data}/train", f"data.eval_url={data}/eval",
        "training.log_every_n=1", "eval.num_batches=2", "embedding_log.every_n=0",
    ]  # fmt: skip
    jobs = [
        ["--output", output, f"training.num_train_steps={WARM_STEPS}", *common],
        # fewer author rows: only the (row-wise sharded) table differs, every dense shape still fits
        ["--output", f"{output}-mismatch", "training.num_train_steps=1", *common, author_table(500, 16)],
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    res = run(
        driver_cmd("recap_app.train", jobs, nproc=2), env=env, inherit_env=False, cwd=tmp, timeout=180,
        check=False,
    )  # fmt: skip
    assert len(res.sections()) == 2, f"the warm start job did not finish; log tail:\n{res.tail()}"
    assert res.returncode != 0, "the mismatched warm start should have failed"
    return WarmStart(source, output, options, res)


def test_warm_start(warm_start: WarmStart):
    log = warm_start.result.sections()[0]
    out, opts = warm_start.output, warm_start.storage_options
    assert f"warm start: model weights from {warm_start.source} (optimizer and step fresh)" in log, log[
        -3000:
    ]
    assert "resumed from" not in log
    assert f"training steps 0..{WARM_STEPS}" in log

    # the step restarts at 0: the first metrics record is step 1
    fs, path = storage.url_to_fs(f"{out}/metrics.jsonl", opts)
    with fs.open(path, "r") as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    assert train_steps(metrics) == list(range(1, WARM_STEPS + 1))

    # the weights come from the source: WARM_STEPS warm-up Adam steps (lr <= 3e-4) move a dense weight by
    # well under 1e-3, while the source is far from a fresh initialisation
    config = load_config("local")
    warm = load_unsharded(config, f"{out}/checkpoints/step-{WARM_STEPS}", opts).named_parameters()
    source = dict(load_unsharded(config, warm_start.source, opts).named_parameters())
    torch.manual_seed(config.training.seed)
    fresh = dict(
        RecapRanker(config.model, config.data.num_continuous, config.data.num_binary).named_parameters()
    )
    for name, w in warm:
        src = source[name].detach()
        if ".embedding_bags." in name:
            # the fused sparse optimizer updates only the rows looked up: every other row is untouched
            same_rows = (w.detach() == src).all(dim=1).float().mean().item()
            assert same_rows > 0.3, (name, same_rows)
            assert not torch.equal(w, src), name
        else:
            assert (w.detach() - src).abs().max().item() < 1e-3, name
    dense_gap = max((source[n] - fresh[n]).abs().max().item() for n in fresh if ".embedding_bags." not in n)
    assert dense_gap > 5e-3  # so the closeness above is not a property of any two models

    # the optimizer is fresh: Adam has taken WARM_STEPS steps, not 20 + WARM_STEPS, and the train step
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    url = f"{out}/checkpoints/step-{WARM_STEPS}"
    key = "optimizer.state.model.backbone.mask_blocks.0.hidden_layer.weight.step"
    got = {key: torch.tensor(0.0), "train_state": {"step": torch.tensor(-1)}}
    dcp.load(got, storage_reader=FsspecReader(url, **opts), no_dist=True)
    assert got[key].item() == WARM_STEPS
    assert got["train_state"]["step"].item() == WARM_STEPS


def test_storage_options_secret_redacted(warm_start: WarmStart):
    """Credentials given as config storage options work everywhere and are logged as ***."""
    log = warm_start.result.output
    assert_no_secrets(log, "warm start log")
    config_lines = [ln for ln in log.splitlines() if " INFO config: " in ln]
    assert len(config_lines) == 2, config_lines  # one summary line per job, rank 0 only
    for line, output in zip(config_lines, (warm_start.output, f"{warm_start.output}-mismatch"), strict=True):
        assert line.endswith(f"the full resolved config (secrets redacted) is in {output}/runs.jsonl"), line
    # The full config, in the run record of the job that started (the mismatched one failed before).
    (record,) = read_run_record(warm_start.output, warm_start.storage_options)
    options = record["config"]["storage"]["options"]
    assert options["secret"] == storage.REDACTED
    assert options["endpoint_url"] == warm_start.storage_options["endpoint_url"]
    fs, path = storage.url_to_fs(f"{warm_start.output}/runs.jsonl", warm_start.storage_options)
    assert_no_secrets(fs.cat_file(path).decode(), "warm start runs.jsonl")
    fs, path = storage.url_to_fs(f"{warm_start.output}/metrics.jsonl", warm_start.storage_options)
    with fs.open(path, "r") as f:
        assert_no_secrets(f.read(), "warm start metrics.jsonl")


def test_warm_start_mismatch_names_keys(warm_start: WarmStart):
    log = warm_start.result.sections()[1]
    # the message alone (recap_app/errors.py), on each rank
    assert f"recap: error: checkpoint {warm_start.source} does not match the model config" in log, log[-3000:]
    assert "CheckpointMismatchError" not in log
    assert f"shape mismatches (1): {AUTHOR_KEY}: checkpoint (1000, 16) vs model (500, 16)" in log, log[-3000:]
    assert "not in model" not in log  # the checkpoint's optimizer state is not what a warm start loads
    assert not storage.exists(f"{warm_start.output}-mismatch/checkpoints", warm_start.storage_options)


def test_export_mismatch_names_keys(full_path: FullPath, tmp_path):
    """`recap export` with a config whose table dim differs from the checkpoint's: the error names the
    table and the dense layers whose input width follows from it; nothing is written."""
    from recap_app.export import main as export_main

    run_url = f"{full_path.urls['local']}/run"
    out = tmp_path / "model.pt"
    with pytest.raises(SystemExit) as err:  # the message alone, no traceback (recap_app/errors.py)
        export_main(["--checkpoint", run_url, "--output", str(out), author_table(1000, 8)])
    msg = str(err.value.code)
    assert msg.startswith(f"recap: error: checkpoint {run_url}/checkpoints/step-30 does not match the model")
    assert f"{AUTHOR_KEY}: checkpoint (1000, 16) vs model (1000, 8)" in msg
    assert "model.backbone.mask_blocks.0.hidden_layer.weight: checkpoint (64, 72) vs model (64, 64)" in msg
    assert "Traceback" not in msg  # DCP's per-rank tracebacks are summarised, not pasted
    assert "not in model" not in msg
    assert not out.exists()
