"""`recap.train` on Kubernetes (TorchX 0.7.0 -> Volcano Job), checked without a cluster.

1. The Volcano Job that the user's command builds, taken from the real CLI's `--dryrun` output:
   shape, resources, env, retries, and the container command run in a shell the way the pod would
   run it (with Volcano's svc-plugin host variables), so the rendezvous endpoint really resolves to
   the rank-0 task.
2. Offline validation: the Volcano Job CRD's openAPIV3Schema (jsonschema, unknown fields rejected as
   the API server's strict field validation would; skipped without the CRD file, see CRD), a round
   trip through the kubernetes client models, and kubernetes-validate on the pod templates.
3. Submit, status and cancel against a Kubernetes API emulator on 127.0.0.1 (tests/k8s_emulator.py):
   once through the `torchx` CLI, once through the TorchX runner API, asserting on what the emulator
   received and stored.
4. docker/: their torch/torchrec pins and extras must match pyproject.toml (the CPU image is built
   and run by tests/cluster/test_local_docker.py).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_emulator import GROUP, PLURAL, VERSION, running_emulator
from kmock import action

from torchx_components import recap

REPO = Path(__file__).resolve().parents[1]
# Test data, not in the project: volcano-sh/volcano's config/crd/volcano/bases/batch.volcano.sh_jobs.yaml
CRD = Path(
    os.environ.get("RECAP_VOLCANO_CRD") or REPO.parent / "shared" / "volcano" / "batch.volcano.sh_jobs.yaml"
)

IMAGE = "ghcr.io/x/recap:1"
NAMESPACE, QUEUE = "ml", "default"
# The command under test: `torchx run <RUN_ARGS> [--dryrun] <TRAIN_ARGS>`.
RUN_ARGS = ["run", "-s", "kubernetes", "--workspace", "", "-cfg", f"queue={QUEUE},namespace={NAMESPACE}"]
TRAIN_ARGS = [
    "recap.train", "-j", "2x2", "--output", "s3://bucket/run", "--image", IMAGE,
    "--env", "AWS_ENDPOINT_URL=http://minio:9000", "--max_retries", "2", "--", "training.num_train_steps=50",
]  # fmt: skip
# Credentials in the submitting shell: they must never be copied into the Job.
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIARECAPTESTKEYID0001",
    "AWS_SECRET_ACCESS_KEY": "recap-test-secret-7f3a9c",
    "AZURE_STORAGE_CONNECTION_STRING": "AccountName=x;AccountKey=recap-test-azure-key-5e1d",
    "GOOGLE_APPLICATION_CREDENTIALS": "/home/me/recap-test-gcp-key.json",
}
# Env the trainer container may carry: ours (--env, component defaults) and TorchX's own.
ALLOWED_ENV = {
    "AWS_ENDPOINT_URL",
    "LOGLEVEL",
    "OMP_NUM_THREADS",
    "PYTHONUNBUFFERED",
    "TORCHX_JOB_ID",
    "TORCHX_RANK0_HOST",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
}
RDZV_PORT = inspect.signature(recap.train).parameters["rdzv_port"].default
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# The kubernetes client (36.x) on urllib3 1.26 (pinned by torchx 0.7.0) warns on every response.
pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheader:DeprecationWarning")


# --------------------------------------------------------------------------------------------------
# helpers


def torchx_cli(args: list[str], home: Path, kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
    """Run the `torchx` CLI from the repo root (so .torchxconfig applies, as for a user)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOGLEVEL", "TORCHXCONFIG", "KUBECONFIG")}
    env.update(FAKE_SECRETS, HOME=str(home), KUBECONFIG=str(kubeconfig or home / "no-such-kubeconfig"))
    return subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def parse_dryrun(stdout: str) -> dict[str, Any]:
    """The Volcano Job YAML that `torchx run --dryrun` prints after '=== SCHEDULER REQUEST ==='."""
    _, sep, request = stdout.partition("=== SCHEDULER REQUEST ===")
    assert sep, f"no scheduler request in dryrun output:\n{stdout}"
    return yaml.safe_load(request)


def app_handle(stdout: str) -> str:
    handles = [line for line in stdout.splitlines() if line.startswith("kubernetes://")]
    assert len(handles) == 1, stdout
    return handles[0]


def containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for task in job["spec"]["tasks"]:
        (container,) = task["template"]["spec"]["containers"]
        out.append(container)
    return out


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def svc_plugin_env(job: dict[str, Any]) -> dict[str, str]:
    """What Volcano's svc plugin injects into every pod: VC_<TASK>_HOSTS / VC_<TASK>_NUM per task,
    TASK upper-cased with '-' -> '_', hosts `<job>-<task>-<i>.<job>` (its headless service)."""
    name, env = job["metadata"]["name"], {}
    for task in job["spec"]["tasks"]:
        key = task["name"].replace("-", "_").upper()
        hosts = [f"{name}-{task['name']}-{i}.{name}" for i in range(task["replicas"])]
        env[f"VC_{key}_HOSTS"], env[f"VC_{key}_NUM"] = ",".join(hosts), str(len(hosts))
    return env


def run_container_command(container: dict[str, Any], extra_env: dict[str, str], tmp: Path) -> list[str]:
    """Run the container's command with bash as the pod would, with the image's `python3` replaced by a
    stub that prints its argv."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "python3"
    print_argv = "import json, sys; print(json.dumps(sys.argv[1:]))"
    stub.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(print_argv)} "$@"\n')
    stub.chmod(0o755)
    entry, *args = container["command"]
    assert [entry, args[0]] == ["bash", "-c"] and len(args) == 2, container["command"]
    script = args[1]
    assert script.startswith("exec python3 "), script  # the image's interpreter, no path of the host
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", **env_of(container), **extra_env}
    out = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=True
    )
    return json.loads(out.stdout)


def split_torchrun(argv: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """`-m recap_app.launch (torchrun) --opt value ... -m module args...` -> (options, module, args)."""
    assert argv[:2] == ["-m", "recap_app.launch"], argv
    rest = argv[2:]
    end = rest.index("-m")
    opts, i = {}, 0
    while i < end:
        assert rest[i].startswith("--"), rest
        if i + 1 < end and not rest[i + 1].startswith("--"):
            opts[rest[i]], i = rest[i + 1], i + 2
        else:
            opts[rest[i]], i = "", i + 1
    return opts, rest[end + 1], rest[end + 2 :]


def volcano_status(phase: str, task_phases: dict[str, str]) -> dict[str, Any]:
    """A Volcano Job .status as the controller writes it (job phase + per-task pod phase counts)."""
    return {
        "state": {"phase": phase},
        "minAvailable": len(task_phases),
        "running": sum(p == "Running" for p in task_phases.values()),
        "taskStatusCount": {task: {"phase": {p: 1}} for task, p in task_phases.items()},
    }


@functools.cache
def crd_validator() -> Any:
    """jsonschema validator for the Volcano Job CRD, rejecting unknown fields like the API server's
    strict field validation (structural schemas: objects with `properties` allow nothing else)."""
    import jsonschema

    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    assert (crd["spec"]["group"], crd["spec"]["names"]["plural"]) == (GROUP, PLURAL)

    def strict(node: Any) -> Any:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)
        return node

    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def crd_errors(obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator().iter_errors(obj)]


# --------------------------------------------------------------------------------------------------
# 1. the Job built by the CLI's --dryrun


@pytest.fixture(scope="module")
def dryrun(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("home")
    proc = torchx_cli([*RUN_ARGS, "--dryrun", *TRAIN_ARGS], home)
    assert proc.returncode == 0, proc.stderr
    return {"job": parse_dryrun(proc.stdout), "stdout": proc.stdout, "stderr": proc.stderr}


def test_dryrun_builds_volcano_job(dryrun: dict[str, Any]) -> None:
    job = dryrun["job"]
    name = job["metadata"]["name"]
    assert (job["apiVersion"], job["kind"]) == (f"{GROUP}/{VERSION}", "Job")
    assert name.startswith("recap-train-") and DNS1123_LABEL.fullmatch(name)
    spec = job["spec"]
    assert spec["queue"] == QUEUE and spec["schedulerName"] == "volcano"
    assert spec["maxRetry"] == 2  # --max_retries
    assert "svc" in spec["plugins"]  # the plugin that sets VC_<TASK>_HOSTS and the headless service
    # One task per replica (TorchX applies macros per replica), one pod each.
    tasks = spec["tasks"]
    assert [t["name"] for t in tasks] == ["trainer-0", "trainer-1"]
    for task in tasks:
        assert task["replicas"] == 1 and task["minAvailable"] == 1 and task["maxRetry"] == 2
        pod = task["template"]
        assert pod["spec"]["restartPolicy"] == "Never"
        # time after a pod's SIGTERM for the trainer's preemption checkpoint (recap_app/kubernetes_compat.py)
        assert pod["spec"]["terminationGracePeriodSeconds"] == 120
        assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == name
        # The svc plugin makes the pod's hostname `<job>-<task>-0`: it must be a DNS-1123 label.
        assert DNS1123_LABEL.fullmatch(f"{name}-{task['name']}-0")
    # The namespace is not in the object: TorchX passes it in the URL at submit (checked below).
    assert "namespace" not in job["metadata"]


def test_dryrun_resources_image_env(dryrun: dict[str, Any]) -> None:
    job, text = dryrun["job"], dryrun["stdout"]
    defaults = inspect.signature(recap.train).parameters
    cpu, mem = defaults["cpu"].default, defaults["memMB"].default
    for i, c in enumerate(containers(job)):
        assert c["image"] == IMAGE
        # TorchX asks for the whole host: limits as given, requests minus 100m CPU / 1024 MB.
        assert c["resources"]["limits"] == {"cpu": f"{cpu * 1000}m", "memory": f"{mem}M"}
        assert c["resources"]["requests"] == {"cpu": f"{cpu * 1000 - 100}m", "memory": f"{mem - 1024}M"}
        assert c["ports"] == [{"containerPort": RDZV_PORT, "name": "c10d"}]
        env = env_of(c)
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert set(env) <= ALLOWED_ENV, set(env) - ALLOWED_ENV
        assert ("TORCHX_RANK0_HOST" in env) == (i == 0)
    for secret in FAKE_SECRETS.values():
        assert secret not in text and secret not in dryrun["stderr"]


def test_dryrun_carries_nothing_of_the_submitting_machine(dryrun: dict[str, Any]) -> None:
    """No interpreter, checkout or home path of the host in the Job: the pods have none of them."""
    text = dryrun["stdout"].partition("=== SCHEDULER REQUEST ===")[2]
    for path in {str(REPO), sys.prefix, sys.executable, os.path.realpath(sys.executable), str(Path.home())}:
        assert path not in text, path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # No --output: .torchxconfig's default, a relative path of this checkout.
        (["--image", IMAGE], "--output runs/recap-local is a path on the submitting machine"),
        (["--image", IMAGE, "--output", "/data/runs/x"], "--output /data/runs/x is not on a mounted volume"),
        (
            ["--output", "s3://bucket/run"],
            "-s kubernetes runs role 'trainer' in a container image: pass --image",
        ),
    ],
)
def test_dryrun_refuses_what_the_pod_would_lose(args: list[str], message: str, tmp_path: Path) -> None:
    """An output the pod would write into its own throwaway filesystem, or no image at all, is refused
    at submit time with one `recap: error:` line (no traceback), before anything reaches a cluster."""
    proc = torchx_cli([*RUN_ARGS, "--dryrun", "recap.train", "-j", "2x2", *args], tmp_path)
    assert proc.returncode == 1, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"recap: error: {message}"), proc.stderr
    assert "Traceback" not in proc.stderr and "SCHEDULER REQUEST" not in proc.stdout
    mounted = ["--image", IMAGE, "--output", "/data/runs/x", "--mounts", "type=volume,src=runs,dst=/data"]
    if "/data" in message:  # the same path on a mounted volume (a PVC) is accepted
        proc = torchx_cli([*RUN_ARGS, "--dryrun", "recap.train", "-j", "2x2", *mounted], tmp_path)
        assert proc.returncode == 0 and "claimName: runs" in proc.stdout, proc.stderr


def test_container_command_reaches_rank0_and_trainer(dryrun: dict[str, Any], tmp_path: Path) -> None:
    job = dryrun["job"]
    name = job["metadata"]["name"]
    rank0_host = f"{name}-trainer-0-0.{name}"  # what VC_TRAINER_0_HOSTS holds in every pod
    expected_hosts = ["localhost", rank0_host]  # rank 0 rendezvous on itself, the others reach it
    for container, host in zip(containers(job), expected_hosts, strict=True):
        argv = run_container_command(container, svc_plugin_env(job), tmp_path)
        opts, module, trainer_args = split_torchrun(argv)
        assert opts["--rdzv_backend"] == "c10d"
        assert opts["--rdzv_endpoint"] == f"{host}:{RDZV_PORT}"
        assert opts["--rdzv_id"] == name
        assert (opts["--nnodes"], opts["--nproc_per_node"]) == ("2", "2")
        assert module == "recap_app.train"
        out = trainer_args.index("--output")
        assert trainer_args[out + 1] == "s3://bucket/run"
        assert trainer_args[-1] == "training.num_train_steps=50"  # the trailing override


def test_gpu_requests_nvidia_gpu() -> None:
    """Through the runner API (same code path as the CLI): --gpu > 0 asks for nvidia.com/gpu."""
    from torchx.runner import get_runner
    from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

    args = ["-j", "2x4", "--gpu", "4", "--image", IMAGE, "--output", "s3://bucket/run"]
    with get_runner() as runner:
        info = runner.dryrun_component(
            "recap.train", args, "kubernetes", cfg={"queue": QUEUE, "namespace": NAMESPACE}, workspace=None
        )
    assert info._cfg["namespace"] == NAMESPACE
    job = sanitize_for_serialization(info.request.resource)
    assert len(job["spec"]["tasks"]) == 2
    for c in containers(job):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "4"
        assert "--nproc_per_node 4" in c["command"][2]


# --------------------------------------------------------------------------------------------------
# 2. offline validation


def test_volcano_crd_schema(dryrun: dict[str, Any]) -> None:
    if not CRD.exists():
        pytest.skip(
            f"Volcano Job CRD not found at {CRD}: set RECAP_VOLCANO_CRD to a copy of volcano-sh/volcano's "
            "config/crd/volcano/bases/batch.volcano.sh_jobs.yaml (README, On Kubernetes)"
        )
    job = dryrun["job"]
    assert crd_errors(job) == []
    # The statuses the emulator tests set are ones Volcano could write.
    for phase in ("Pending", "Running", "Completing", "Completed"):
        status = volcano_status(phase, {"trainer-0": "Running", "trainer-1": "Running"})
        assert crd_errors({**job, "status": status}) == []
    # The validator has teeth: a misspelt field and a wrong type are both caught.
    bad = copy.deepcopy(job)
    bad["spec"]["tasks"][0]["maxRetries"] = bad["spec"]["tasks"][0].pop("maxRetry")
    bad["spec"]["tasks"][1]["replicas"] = "1"
    errors = crd_errors(bad)
    assert any("maxRetries" in e for e in errors) and any("replicas" in e for e in errors), errors


def test_kubernetes_client_model_round_trip(dryrun: dict[str, Any]) -> None:
    """Every field of the pod templates is one the kubernetes client models know, with the right type:
    deserialising into V1PodTemplateSpec and serialising back gives the same dict (unknown keys would
    be dropped)."""
    from kubernetes.client import ApiClient

    api = ApiClient()

    class Response:  # what ApiClient.deserialize reads
        def __init__(self, obj: Any) -> None:
            self.data = json.dumps(obj)

    job = dryrun["job"]
    meta = api.deserialize(Response(job["metadata"]), "V1ObjectMeta")
    assert api.sanitize_for_serialization(meta) == job["metadata"]
    for task in job["spec"]["tasks"]:
        template = api.deserialize(Response(task["template"]), "V1PodTemplateSpec")
        assert api.sanitize_for_serialization(template) == task["template"]
        (container,) = template.spec.containers
        assert container.image == IMAGE and container.command[:2] == ["bash", "-c"]
    typo = copy.deepcopy(job["spec"]["tasks"][0]["template"])
    typo["spec"]["containers"][0]["commmand"] = ["x"]
    assert api.sanitize_for_serialization(api.deserialize(Response(typo), "V1PodTemplateSpec")) != typo


def test_pod_templates_kubernetes_validate(dryrun: dict[str, Any]) -> None:
    """kubernetes-validate (bundled, offline schemas) in strict mode, oldest and newest it ships."""
    import kubernetes_validate
    from kubernetes_validate import utils
    from packaging.version import Version

    versions = sorted(set(utils.all_versions()), key=Version)
    for k8s in (versions[0], versions[-1]):
        for task in dryrun["job"]["spec"]["tasks"]:
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": task["name"]},
                "template": task["template"],
            }
            kubernetes_validate.validate(pod_template, k8s, strict=True)
    typo = copy.deepcopy(pod_template)
    typo["template"]["spec"]["containers"][0]["commmand"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError, match="commmand"):
        kubernetes_validate.validate(typo, versions[-1], strict=True)


# --------------------------------------------------------------------------------------------------
# 3. submit / status / cancel against the emulator


def test_cli_submit_status_cancel(dryrun: dict[str, Any], tmp_path: Path) -> None:
    with running_emulator(tmp_path, namespace=NAMESPACE) as emu:
        # Submit: the same command as the dryrun, without --dryrun.
        proc = torchx_cli([*RUN_ARGS, *TRAIN_ARGS], tmp_path, emu.kubeconfig)
        assert proc.returncode == 0, proc.stderr
        handle = app_handle(proc.stdout)
        name = handle.rpartition(":")[2]
        assert handle == f"kubernetes://torchx/{NAMESPACE}:{name}"

        creates = [r for r in emu.requests() if r.action == action.CREATE]
        assert len(creates) == 1
        (create,) = creates
        assert (
            create.method == "POST"
            and create.url.path == f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/jobs"
        )
        # What reached the API server is what --dryrun printed (up to the unique job name).
        dry_name = dryrun["job"]["metadata"]["name"]
        assert create.data == json.loads(json.dumps(dryrun["job"]).replace(dry_name, name))
        for secret in FAKE_SECRETS.values():
            assert secret not in create.text
        assert emu.job(NAMESPACE, name)["spec"]["queue"] == QUEUE

        # Status: the Volcano controller reports the job running with both tasks up.
        emu.set_status(
            NAMESPACE, name, volcano_status("Running", {"trainer-0": "Running", "trainer-1": "Running"})
        )
        proc = torchx_cli(["status", handle], tmp_path, emu.kubeconfig)
        assert proc.returncode == 0, proc.stderr
        assert "State: RUNNING" in proc.stdout
        assert re.search(r"trainer\[0\]:RUNNING", proc.stdout) and re.search(
            r"trainer\[1\]:RUNNING", proc.stdout
        )

        # Cancel: TorchX deletes the Volcano Job.
        proc = torchx_cli(["cancel", handle], tmp_path, emu.kubeconfig)
        assert proc.returncode == 0, proc.stderr
        deletes = [r for r in emu.requests() if r.action == action.DELETE]
        assert [(r.method, r.url.path) for r in deletes] == [
            ("DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/jobs/{name}")
        ]
        assert emu.job(NAMESPACE, name) is None

        # Status of the cancelled job: TorchX's "does not exist", not a traceback.
        proc = torchx_cli(["status", handle], tmp_path, emu.kubeconfig)
        assert proc.returncode == 1 and "does not exist" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_runner_api_states_against_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TorchX runner (what the CLI and Python users call) maps Volcano phases to TorchX states."""
    from kubernetes.config import kube_config
    from torchx.runner import get_runner
    from torchx.schedulers.kubernetes_scheduler import TASK_STATE
    from torchx.specs import AppState

    with running_emulator(tmp_path, namespace=NAMESPACE) as emu:
        # kubernetes reads $KUBECONFIG once, at import: point its default at the emulator's config.
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(emu.kubeconfig))
        with get_runner() as runner:
            # TorchX warns on any max_retries > 0 that Volcano retries are unreliable (volcano#1651).
            with pytest.warns(UserWarning, match="Volcano"):
                info = runner.dryrun_component(
                    "recap.train", TRAIN_ARGS[1:], "kubernetes",
                    cfg={"queue": QUEUE, "namespace": NAMESPACE}, workspace=None,
                )  # fmt: skip
            handle = runner.schedule(info)
            name = handle.rpartition(":")[2]
            assert emu.job(NAMESPACE, name)["spec"]["tasks"][1]["name"] == "trainer-1"
            assert runner.status(handle).state == AppState.UNKNOWN  # no controller has written status

            both = ("trainer-0", "trainer-1")
            for phase, task_phase, expected in [
                ("Pending", "Pending", AppState.PENDING),
                ("Running", "Running", AppState.RUNNING),
                ("Restarting", "Failed", AppState.RUNNING),
                # Missing from TorchX 0.7.0's table (KeyError); recap_app.kubernetes_compat maps it.
                ("Completing", "Succeeded", AppState.RUNNING),
                ("Completed", "Succeeded", AppState.SUCCEEDED),
                ("Failed", "Failed", AppState.FAILED),
                ("Terminated", "Failed", AppState.FAILED),
                ("Aborted", "Failed", AppState.CANCELLED),
            ]:
                emu.set_status(NAMESPACE, name, volcano_status(phase, dict.fromkeys(both, task_phase)))
                status = runner.status(handle)
                assert status.state == expected, phase
                (role,) = status.roles
                assert role.role == "trainer" and sorted(r.id for r in role.replicas) == [0, 1]
                assert {r.state for r in role.replicas} == {TASK_STATE[task_phase]}
                listed = [app for app in runner.list("kubernetes") if app.app_handle == handle]
                assert [app.state for app in listed] == [expected], phase

            emu.set_status(NAMESPACE, name, volcano_status("Running", dict.fromkeys(both, "Running")))
            runner.cancel(handle)
            assert emu.job(NAMESPACE, name) is None
            assert [r.url.path for r in emu.requests() if r.action == action.DELETE] == [
                f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/jobs/{name}"
            ]
            # A deleted job does not exist (TorchX 0.7.0 let the API's 404 escape instead).
            assert runner.status(handle) is None
        # Nothing but the expected 404s went wrong inside the emulator.
        errors = emu.inspect(lambda handler: list(handler.errors))
        assert all(getattr(err, "status", None) == 404 for err in errors), errors


def test_volcano_job_parsing_unknown_and_missing_status() -> None:
    """A job no controller has touched, or a phase a newer Volcano adds, reads UNKNOWN; no crash."""
    from torchx.specs import AppState

    from recap_app.kubernetes_compat import parse_volcano_job

    bare = parse_volcano_job("ns:job", {"metadata": {"name": "job"}})
    assert (bare.state, bare.roles, bare.msg) == (AppState.UNKNOWN, [], "")
    status = volcano_status("Suspended", {"trainer-0": "Running", "trainer-1": "Hibernating"})
    resp = parse_volcano_job("ns:job", {"status": status})
    assert (resp.state, resp.msg) == (AppState.UNKNOWN, "Suspended")
    (role,) = resp.roles_statuses
    assert {r.id: r.state for r in role.replicas} == {0: AppState.RUNNING, 1: AppState.UNKNOWN}


# --------------------------------------------------------------------------------------------------
# 4. images (keep docker/'s pins in step with pyproject; tests/cluster/test_local_docker.py builds them)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("dockerfile, accel", [("Dockerfile", "cpu"), ("Dockerfile.cuda", "cuda")])
def test_dockerfile_matches_pyproject(dockerfile: str, accel: str) -> None:
    text = (REPO / "docker" / dockerfile).read_text()
    project = pyproject()
    pins = dict(
        re.fullmatch(r"([\w.-]+)\s*==\s*(\S+)", d).groups() for d in project["dependencies"] if "==" in d
    )
    for arg, package in [("TORCH_VERSION", "torch"), ("TORCHREC_VERSION", "torchrec")]:
        assert re.findall(rf"^ARG {arg}=(\S+)$", text, re.MULTILINE) == [pins[package]], (dockerfile, arg)
    installs = re.findall(r'"\.\[([\w,]+)\]"', text)
    assert installs == [f"{accel},s3,gcs,azure"], installs
    assert set(installs[0].split(",")) <= set(project["optional-dependencies"])


def test_dockerignore() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert {".git", ".venv", "runs"} <= patterns
    # The [cpu] extra installs packaging/fbgemm-gpu-cpu-shim from the build context.
    assert not any(
        p.startswith(("packaging", "recap_app", "torchx_components", "pyproject")) for p in patterns
    )
