"""recap's CPU image, built here with `make image`, running `torchx run -s local_docker recap.train`.

The closest this host gets to the Kubernetes pods: the image the README's Kubernetes commands name, one
container per replica on TorchX's `torchx` bridge network, rank 0 found by its container hostname, the
output on the host through a bind mount or in S3 (the moto emulator on 127.0.0.1, reached from the
containers through a relay on the bridge's gateway). The engine is Docker when its daemon answers, else
podman serving the Docker API (tests/cluster/container_lib.py); skipped when neither can be had.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from torchx.schedulers.docker_scheduler import LABEL_APP_ID, LABEL_REPLICA_ID, DockerScheduler, ensure_network
from torchx.specs import AppState

from recap_app.docker_compat import RecapDockerScheduler

from . import container_lib
from .conftest import _TIMINGS

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]  # a fresh host installs and builds first

TORCHX = str(Path(sys.prefix) / "bin" / "torchx")
HANDLE_RE = re.compile(r"^local_docker://[^/\s]+/(\S+)$", re.MULTILINE)
FINISHED_RE = re.compile(r"Job finished: (\w+)")
RANK_RE = re.compile(r"\[rank (\d)\] INFO rank \d/(\d) on cpu")
UID = 1001  # the image's `recap` user, who writes the outputs
TABLES = ["author", "user"]


@pytest.fixture(scope="module")
def engine() -> container_lib.Engine:
    t0 = time.monotonic()
    try:
        eng = container_lib.engine()
    except container_lib.Unavailable as e:
        pytest.skip(f"no container engine: {e}")
    _TIMINGS.append(f"{time.monotonic() - t0:6.1f}s  container engine: {eng.tool}")
    return eng


@pytest.fixture(scope="module")
def docker_host(engine) -> Iterator[str]:
    """The Docker API TorchX talks to; podman's leftovers on the host go with it."""
    with container_lib.docker_api(engine) as host:
        yield host


@pytest.fixture(scope="module")
def docker_client(docker_host):
    import docker

    client = docker.DockerClient(base_url=docker_host)
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(engine, docker_host) -> str:
    build = container_lib.build_image(engine)
    if build.base_seconds:
        _TIMINGS.append(f"{build.base_seconds:6.1f}s  base image {container_lib.BASE_IMAGE} (debootstrap)")
    _TIMINGS.append(
        f"{build.seconds:6.1f}s  make image ({engine.tool}): {build.image}, {build.size / 1e9:.2f} GB"
    )
    return build.image


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    app_id: str | None
    state: str | None

    def diagnose(self) -> str:
        return (
            f"$ {' '.join(self.proc.args)}  (exit {self.proc.returncode})\n"
            f"--- stdout\n{self.proc.stdout[-3000:]}\n--- stderr\n{self.proc.stderr[-8000:]}"
        )


@pytest.fixture
def torchx_run(docker_host, docker_client, tmp_path) -> Iterator:
    """``torchx run -s local_docker --wait --log ...`` from an empty directory; removes its containers."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (tmp_path / "torchxconfig.empty").write_text("")
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update(DOCKER_HOST=docker_host, TORCHXCONFIG=str(tmp_path / "torchxconfig.empty"))
    app_ids: list[str] = []

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> Run:
        # No workspace: TorchX 0.7.0 would otherwise build an image of the cwd on top of --image.
        cmd = [TORCHX, "run", "-s", "local_docker", "--workspace", "", "--wait", "--log", *args]
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
        m, finished = HANDLE_RE.search(proc.stdout), FINISHED_RE.findall(proc.stderr)
        if m:
            app_ids.append(m.group(1))
        outcome = finished[-1] if finished else f"exit {proc.returncode}"
        _TIMINGS.append(
            f"{time.monotonic() - t0:6.1f}s  torchx run -s local_docker {' '.join(args)} -> {outcome}"
        )
        return Run(proc, m.group(1) if m else None, finished[-1] if finished else None)

    yield run
    for app_id in app_ids:
        for c in docker_client.containers.list(all=True, filters={"label": f"{LABEL_APP_ID}={app_id}"}):
            c.remove(force=True)


def _train(torchx_run, image: str, output: str, steps: int, component: tuple[str, ...] = (), **kw) -> Run:
    """The issue's command, plus per-replica resources that fit this host; ``kw`` goes to torchx_run."""
    return torchx_run(
        *kw.pop("scheduler", ()), "recap.train", "-j", "2x1", "--cpu", "1", "--memMB", "3072",
        "--image", image, "--output", output, *component,
        "--", f"training.num_train_steps={steps}", "checkpoint.every_n=10",
        **kw,
    )  # fmt: skip


def _check_replicas(docker_client, run: Run) -> None:
    """Two containers, one per replica, both done; rank 0 reached by replica 0's hostname."""
    containers = docker_client.containers.list(all=True, filters={"label": f"{LABEL_APP_ID}={run.app_id}"})
    by_replica = {int(c.labels[LABEL_REPLICA_ID]): c for c in containers}
    assert sorted(by_replica) == [0, 1], run.diagnose()
    rank0_host = by_replica[0].attrs["Config"]["Hostname"]
    ranks = []
    for c in by_replica.values():
        env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
        assert env["TORCHX_RANK0_HOST"] == rank0_host, env
        assert c.attrs["State"]["ExitCode"] == 0 and "torchx" in c.attrs["NetworkSettings"]["Networks"]
        found = RANK_RE.findall(c.logs().decode(errors="replace"))
        assert len(found) == 1 and found[0][1] == "2", (c.name, found, run.diagnose())
        ranks.append(int(found[0][0]))
    # The two containers share no network namespace: one rendezvous of world size 2 means replica 1
    # reached replica 0's c10d store at $TORCHX_RANK0_HOST.
    assert sorted(ranks) == [0, 1], run.diagnose()
    assert len({c.attrs["Config"]["Hostname"] for c in containers}) == 2


def test_image_runs_recap(engine, image):
    """The image the Kubernetes job runs: recap's CLI and imports, its own user, nothing of the build."""
    help_ = engine.run("run", "--rm", image, "recap", "--help")
    assert help_.stdout.startswith("usage: recap"), help_.stdout
    imports = engine.run("run", "--rm", image, "python", "-c", "import torchrec, recap_app; print('ok')")
    assert imports.stdout.strip() == "ok", imports.stderr
    probe = engine.run(
        "run", "--rm", image, "sh", "-c",
        'id -u; ls -A /mnt; echo "PIP_CONFIG_FILE=${PIP_CONFIG_FILE-unset}"; pip config list',
    ).stdout.splitlines()  # fmt: skip
    # The harness's pip config, CA bundle and index mounts were the build's only: /mnt is empty again,
    # and pip's configuration is the Dockerfile's ENV (":env:.no-cache-dir=...") and nothing else.
    assert probe[:2] == [str(UID), "PIP_CONFIG_FILE=unset"], probe
    assert [line for line in probe[2:] if not line.startswith(":env:.")] == [], probe
    assert (
        "PIP_CONFIG_FILE" not in engine.run("image", "inspect", "--format", "{{.Config.Env}}", image).stdout
    )


def test_cuda_image_builds(engine):
    """docker/Dockerfile.cuda builds (running it needs a GPU node); only where its bases are in the local
    image store: this project's machines reach no container registry, so the test does not try to pull
    (`podman pull` them first on a machine that can, and the build runs)."""
    dockerfile = (container_lib.REPO / "docker" / "Dockerfile.cuda").read_text()
    for base in re.findall(r"^ARG (?:CUDA|UV)_IMAGE=(\S+)$", dockerfile, re.MULTILINE):
        if engine.run("image", "inspect", base, check=False).returncode != 0:
            pytest.skip(f"CUDA image not built: its base {base} is not in the local image store")
    build = container_lib.build_cuda_image(engine)
    _TIMINGS.append(f"{build.seconds:6.1f}s  make image-cuda: {build.image}, {build.size / 1e9:.2f} GB")
    code = "import torch, recap_app.config; print(torch.version.cuda)"  # fbgemm_gpu needs a driver
    probe = engine.run("run", "--rm", build.image, "python", "-c", code)
    assert probe.stdout.strip().startswith("13."), probe.stdout + probe.stderr


def test_podman_stopped_state(engine, image, docker_client):
    """A real container caught in podman's `stopped` state: torchx 0.7.0's local_docker crashes on it,
    recap's registered local_docker reads the exit code."""
    if engine.tool != "podman":
        pytest.skip("`stopped` is podman's state; Docker never reports it")
    for code, expected in ((0, AppState.SUCCEEDED), (3, AppState.FAILED)):
        for _attempt in range(5):  # the state lasts a fraction of a second: poll for it
            c = docker_client.containers.run(image, ["sh", "-c", f"exit {code}"], detach=True)
            while c.status not in ("stopped", "exited"):
                time.sleep(0.005)
                c.reload()
            if c.status == "stopped":
                break
            c.remove(force=True)
        assert c.status == "stopped", "podman never showed `stopped` in 5 tries"
        try:
            with pytest.raises(KeyError, match="stopped"):
                DockerScheduler("t")._get_app_state(c)
            assert RecapDockerScheduler("t")._get_app_state(c) == expected  # c.status is still `stopped`
        finally:
            c.remove(force=True)


def test_train_and_resume_local_output(image, torchx_run, docker_client, tmp_path):
    """Checkpoints, embedding logs and metrics land on the host through a bind mount at the same path."""
    output = tmp_path / "run"
    output.mkdir()
    os.chown(output, UID, UID)  # the image's user writes there
    mount = ("--mounts", f"type=bind,src={output},dst={output}")

    first = _train(torchx_run, image, str(output), 20, mount)
    assert first.proc.returncode == 0 and first.state == "SUCCEEDED", first.diagnose()
    _check_replicas(docker_client, first)
    for step in (10, 20):
        assert (output / f"checkpoints/step-{step}/.metadata").exists(), first.diagnose()
    assert len(list((output / "checkpoints/step-20").glob("*.distcp"))) == 2
    assert sorted(p.stem for p in (output / "embeddings/step-20").iterdir()) == TABLES
    assert np.load(output / "embeddings/step-20/user.npy").shape == (2000, 16)
    assert (output / "checkpoints/step-20/.metadata").stat().st_uid == UID  # written from a container

    second = _train(torchx_run, image, str(output), 30, mount)
    assert second.state == "SUCCEEDED", second.diagnose()
    _check_replicas(docker_client, second)
    assert f"resumed from {output}/checkpoints/step-20 at step 20" in second.proc.stderr, second.diagnose()
    assert (output / "checkpoints/step-30/.metadata").exists()
    assert sorted(p.stem for p in (output / "embeddings/step-30").iterdir()) == TABLES
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [20, 30]  # the second run appended


def test_train_and_resume_s3_output(image, torchx_run, docker_client, s3_server):
    """The same with `--output s3://...`: the containers reach the emulator (on the host's 127.0.0.1)
    through a relay on the `torchx` bridge's gateway; credentials come from the submitting environment
    (`-cfg copy_env=AWS_*`), not from the AppDef."""
    import s3fs

    ensure_network(docker_client)  # TorchX's own: the network its containers join
    gateway = docker_client.networks.get("torchx").attrs["IPAM"]["Config"][0]["Gateway"]
    output = s3_server.url(f"local-docker-{uuid.uuid4().hex[:8]}/run")
    fs = s3fs.S3FileSystem(**s3_server.storage_options, use_listings_cache=False)
    key = output.removeprefix("s3://")
    with container_lib.tcp_relay(gateway, ("127.0.0.1", s3_server.port)) as port:
        env = {**s3_server.env, "AWS_ENDPOINT_URL": f"http://{gateway}:{port}"}
        del env["FSSPEC_S3_ENDPOINT_URL"]
        cfg = ("-cfg", "copy_env=AWS_*")
        first = _train(torchx_run, image, output, 20, scheduler=cfg, env=env)
        assert first.proc.returncode == 0 and first.state == "SUCCEEDED", first.diagnose()
        _check_replicas(docker_client, first)
        for step in (10, 20):
            assert fs.exists(f"{key}/checkpoints/step-{step}/.metadata"), first.diagnose()
        assert len(fs.glob(f"{key}/checkpoints/step-20/*.distcp")) == 2
        assert sorted(Path(p).stem for p in fs.ls(f"{key}/embeddings/step-20")) == TABLES

        second = _train(torchx_run, image, output, 30, scheduler=cfg, env=env)
        assert second.state == "SUCCEEDED", second.diagnose()
    assert f"resumed from {output}/checkpoints/step-20 at step 20" in second.proc.stderr, second.diagnose()
    assert fs.exists(f"{key}/checkpoints/step-30/.metadata")
    assert sorted(Path(p).stem for p in fs.ls(f"{key}/embeddings/step-30")) == TABLES
    assert "testing" not in json.dumps(first.proc.args), "credentials on the command line"
