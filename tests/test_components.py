"""The TorchX components' AppDefs: roles, replicas, torchrun arguments, registration and config."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from torchx.specs import AppDef, macros

from torchx_components import recap

REPO = Path(__file__).resolve().parents[1]
TORCHX = str(Path(sys.executable).parent / "torchx")


def _command(app: AppDef) -> list[str]:
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    if recap.in_image(role.image):  # in a container: the image's python3, nothing of this machine
        assert role.args[1].startswith("exec python3 ") and sys.executable not in role.args[1]
        return shlex.split(role.args[1].removeprefix("exec python3 "))
    # The interpreter prelude ends with `exec "$PY"`; the rest is the torchrun command line.
    prelude, _, command = role.args[1].partition('exec "$PY" ')
    assert f"PY={shlex.quote(sys.executable)}" in prelude
    return shlex.split(command)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_train_single_node_1x2() -> None:
    app = recap.train("training.num_train_steps=20", output="/tmp/out", j="1x2", max_retries=3)
    (role,) = app.roles
    assert (role.num_replicas, role.min_replicas, role.max_retries) == (1, 1, 3)
    cmd = _command(app)
    assert cmd[:2] == ["-m", "recap_app.launch"]  # torchrun, quiet on signals
    assert _flag(cmd, "--nnodes") == "1"
    assert _flag(cmd, "--nproc_per_node") == "2"
    assert _flag(cmd, "--rdzv_endpoint") == "localhost:0"  # one node: torchrun picks a free port
    assert _flag(cmd, "--max_restarts") == "3"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in role.env  # one node: the trainer handles restarts
    assert role.env["OMP_NUM_THREADS"] == "1"  # default --cpu 2 over 2 processes
    assert _flag(cmd, "--rdzv_id") == macros.app_id
    module_at = cmd.index("recap_app.train")
    assert cmd[module_at - 1] == "-m"
    assert cmd[module_at + 1 :] == [
        "--config",
        "local",
        "--output",
        "/tmp/out",
        "training.num_train_steps=20",
    ]


def test_train_multi_node_2x4_resources_env_mounts() -> None:
    app = recap.train(
        output="s3://bucket/run",
        j="2x4",
        cpu=8,
        gpu=4,
        memMB=32000,
        env={"AWS_ENDPOINT_URL": "http://minio:9000"},
        mounts=["type=bind", "src=/data", "dst=/data"],
        rdzv_port=29600,
        image="ghcr.io/x/recap:1",
    )
    (role,) = app.roles
    assert (role.num_replicas, role.min_replicas) == (2, 2)
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (8, 4, 32000)
    assert role.image == "ghcr.io/x/recap:1"
    assert role.env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # a fresh rendezvous store per restart
    assert role.env["OMP_NUM_THREADS"] == "2"  # 8 CPUs over 4 processes
    assert recap.train(j="1x4", cpu=32, env={"OMP_NUM_THREADS": "3"}).roles[0].env["OMP_NUM_THREADS"] == "3"
    assert role.port_map == {"c10d": 29600}
    assert role.mounts[0].src_path == "/data"
    cmd = _command(app)
    assert _flag(cmd, "--nnodes") == "2"
    assert _flag(cmd, "--nproc_per_node") == "4"
    # Multi-node: rank 0's host comes from the scheduler's variable, expanded by bash on each node.
    assert "${" + macros.rank0_env + ":=localhost}:29600" in app.roles[0].args[1]
    assert _flag(cmd, "--output") == "s3://bucket/run"  # URLs are passed through untouched


def test_relative_local_output_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cmd = _command(recap.train(output="runs/x"))
    assert _flag(cmd, "--output") == str(tmp_path / "runs/x")


def test_image_jobs_carry_no_path_of_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a container image the command runs the image's python3 and an output must outlive the
    container: a URL or a path under a mount; a local or relative one is refused in one line."""
    monkeypatch.chdir(tmp_path)
    image = "ghcr.io/x/recap:1"
    app = recap.train(output="s3://b/run", image=image)
    assert str(tmp_path) not in app.roles[0].args[1] and sys.prefix not in app.roles[0].args[1]
    assert _flag(_command(app), "--output") == "s3://b/run"
    mounted = recap.train(
        output="/data/runs/x", image=image, mounts=["type=volume", "src=claim", "dst=/data"]
    )
    assert _flag(_command(mounted), "--output") == "/data/runs/x"
    bind = ["type=bind", "src=/host/out", "dst=/out"]
    assert _flag(_command(recap.train(output="file:///out/r", image=image, mounts=bind)), "--output") == (
        "file:///out/r"
    )
    for output, mounts in (
        ("runs/x", None),
        ("/data/runs/x", None),
        ("/database/x", ["type=volume", "src=c", "dst=/data"]),
    ):
        with pytest.raises(SystemExit, match=r"^recap: error: --output .* object-store URL") as e:
            recap.train(output=output, image=image, mounts=mounts)
        assert "\n" not in str(e.value.code)
    with pytest.raises(SystemExit, match="recap: error: --data eval is a path on the submitting machine"):
        recap.evaluate(checkpoint="s3://b/run", data="eval", output="s3://b/ev", image=image)
    with pytest.raises(SystemExit, match="recap: error: --output out is a path on the submitting"):
        recap.generate_data(output="out", image=image)
    # An image that is a directory (TorchX's local_dir scheduler) is this machine.
    local_dir = recap.train(output="runs/x", image=str(tmp_path))
    assert _flag(_command(local_dir), "--output") == str(tmp_path / "runs/x")


def test_elastic_min_nodes() -> None:
    (role,) = recap.train(output="/o", j="1:3x2").roles
    assert (role.min_replicas, role.num_replicas) == (1, 3)


def test_evaluate_and_generate_data() -> None:
    cmd = _command(recap.evaluate(checkpoint="s3://b/run", data="s3://b/eval", output="s3://b/ev", j="1x2"))
    at = cmd.index("recap_app.evaluate")
    assert cmd[at + 1 :] == [
        "--config", "local", "--checkpoint", "s3://b/run", "--data", "s3://b/eval",
        "--output", "s3://b/ev", "--num-batches", "0",
    ]  # fmt: skip
    (role,) = recap.generate_data(output="gs://b/data", num_examples=10).roles
    assert role.image == ""  # no --image: this machine's checkout (local_cwd, slurm)
    assert role.num_replicas == 1
    assert "recap_app.cli generate-data --output gs://b/data" in role.args[1]
    assert "--num-examples 10" in role.args[1]


def _torchx(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TORCHX, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_registered_next_to_builtins(tmp_path: Path) -> None:
    out = _torchx("builtins", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in ("recap.train", "recap.evaluate", "recap.generate_data", "dist.ddp", "utils.echo"):
        assert f" {name}\n" in out.stdout


def test_help_is_the_docstring(tmp_path: Path) -> None:
    out = _torchx("run", "recap.train", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Train the Recap heavy ranker" in out.stdout
    assert "--max_retries" in out.stdout and "dotted config overrides" in out.stdout
    text = " ".join(out.stdout.split())
    assert "training.num_train_steps=200 (optional)" in text  # TorchX 0.7.0 said "(required)"
    assert "(required)" not in text
    assert "Help: `--help` (`-h NAME` is TorchX's named-resource option" in text


def test_repo_torchxconfig_makes_plain_run_work(tmp_path: Path) -> None:
    """From the repo root, `torchx run` alone means recap.train on local_cwd with the config's defaults."""
    out = _torchx("run", "--dryrun", cwd=REPO)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "recap_app.train" in text
    assert "--nproc_per_node 2" in text
    assert os.path.join(str(REPO), "runs/recap-local") in text


def test_bad_input_ends_with_the_message_alone(tmp_path: Path) -> None:
    """A bad config, data URL or checkpoint URL ends the command with `recap: error: ...`, no traceback."""
    recap = str(Path(sys.executable).parent / "recap")
    nothing, dest = str(tmp_path / "nothing"), str(tmp_path / "out")
    no_checkpoint = f"no complete checkpoint at or under {nothing}"
    for args, message in (
        (["train", "training.bogus=1"], "training.bogus: Extra inputs are not permitted"),
        (["train", "--config", "nope.yaml"], "config 'nope.yaml' not found"),
        (["train", "embedding_log.tables=[usr]"], "embedding_log.tables: no table(s) ['usr']"),
        (["generate-data", "--output", str(tmp_path), "model.tasks=[1"], "the value is not valid YAML"),
        (
            ["train", "--output", dest, f"data.train_url={nothing}", f"data.eval_url={nothing}"],
            f"no Parquet files at '{nothing}'",
        ),
        (["evaluate", "--checkpoint", nothing, "--data", nothing, "--output", dest], no_checkpoint),
        (["export", "--checkpoint", nothing, "--output", dest], no_checkpoint),
    ):
        out = subprocess.run([recap, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1, out.stderr
        assert "recap: error:" in out.stderr and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_recap_help_lists_commands_and_refuses_unknown_ones(tmp_path: Path) -> None:
    recap_cli = str(Path(sys.executable).parent / "recap")
    from recap_app.cli import PURPOSES

    out = subprocess.run([recap_cli, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: recap"), out.stderr
    for name, purpose in PURPOSES.items():
        assert re.search(rf"^  {name} +{re.escape(purpose)}$", out.stdout, re.MULTILINE), out.stdout
    for argv, problem in (["bogus"], "unknown command 'bogus'"), ([], "no command given"):
        out = subprocess.run([recap_cli, *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stdout == "", out
        assert out.stderr.splitlines()[-1].startswith(f"recap: error: {problem} (choose from train, "), (
            out.stderr
        )


def test_train_speaks_before_importing_torch() -> None:
    """`recap train` logs its first line before torch and torchrec load (seconds per process)."""
    probe = (
        "import sys, recap_app.train, recap_app.cli; print(sorted(m for m in sys.modules if 'torch' in m))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
