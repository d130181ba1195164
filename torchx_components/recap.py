"""TorchX components for recap: `torchx run recap.train`, `recap.generate_data`, `recap.evaluate`.

Each is a typed function returning an AppDef; its docstring is the `--help`. The same command runs on
`-s local_cwd`, `-s slurm` and `-s kubernetes`: only the scheduler and its run options change.
"""

import argparse
import os
import shlex
import sys
from typing import Dict, List, Optional, Tuple

from torchx import specs
from torchx.components.dist import _TORCH_DEBUG_FLAGS, parse_nnodes
from torchx.specs import builders, file_linter, macros
from torchx.specs.finder import ComponentValidationException

from recap_app.errors import SubmitError


def in_image(image: str) -> bool:
    """Whether the job runs in a container image (kubernetes, local_docker, any scheduler given an
    `--image`) rather than on this machine's checkout (local_cwd, slurm: no image, or local_dir's image,
    a directory). The component cannot see the scheduler, so the image decides."""
    return bool(image) and not os.path.isdir(image)


def _python(image: str) -> str:
    """Shell text for the interpreter. In an image: its `python3`, never a path of the submitting host.
    On this machine: this interpreter where it exists (Slurm nodes sharing the filesystem), else
    `python3`. Never relies on `torchrun` being on PATH."""
    if in_image(image):
        return "exec python3"
    here = shlex.quote(sys.executable)
    return f'PY={here}; [ -x "$PY" ] || PY=python3; exec "$PY"'


class _HelpFormatter(file_linter.TorchXArgumentHelpFormatter):
    """TorchX 0.7.0's component help marks a component's `*args` "(required)"; argparse can parse none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == argparse.REMAINDER:
            return f"{action.help or ''} (optional)"
        return super()._get_help_string(action)


# TorchX builds every component's parser with this formatter (importing a component module installs it).
builders.TorchXArgumentHelpFormatter = _HelpFormatter


class _noquote(str):
    """An argument holding a shell expansion, passed to bash unquoted (as torchx's dist.py marks them)."""


def _shell_words(words: List[str]) -> str:
    return " ".join(w if isinstance(w, _noquote) else shlex.quote(w) for w in words)


def _mount_points(mounts: Optional[List[str]]) -> List[str]:
    parsed = specs.parse_mounts(mounts) if mounts else []
    return [m.dst_path for m in parsed if isinstance(m, (specs.BindMount, specs.VolumeMount))]


def _job_path(option: str, url: str, image: str, mounts: Optional[List[str]], *, output: bool) -> str:
    """A path argument as the job must see it. On this machine: made absolute at submit time, so the job
    writes where the user meant. In an image: a URL or an absolute path, passed as is; an output must
    also be on a mounted volume, since the container's own filesystem vanishes with it."""
    if not url or ("://" in url and not url.startswith("file://")):
        return url
    if not in_image(image):
        return url if "://" in url else os.path.abspath(url)
    path = url.removeprefix("file://")
    mounted = os.path.isabs(path) and any(
        os.path.commonpath([path, dst]) == dst for dst in map(os.path.normpath, _mount_points(mounts))
    )
    if mounted or (os.path.isabs(path) and not output):
        return url
    where = "a path on the submitting machine" if not os.path.isabs(path) else "not on a mounted volume"
    why = "in the image it would be lost with the container" if output else "the image has no such path"
    raise SubmitError(
        f"--{option} {url} is {where}; {why}: pass an object-store URL (--{option} s3://bucket/runs/x, "
        f"gs://, az://) or a path under a --mounts destination (--mounts type=volume,src=<claim>,dst=/data "
        f"--{option} /data/runs/x)"
    )


def _refuse_secrets(overrides: List[str], env: Optional[Dict[str, str]], urls: List[str]) -> None:
    """Refuse credentials before the AppDef exists: its args and env are printed by `--dryrun` and land
    in sbatch scripts and Volcano Job specs. TorchX prints the message alone (ComponentValidationException);
    the value never appears in it. Jobs inherit the submitting environment (local_cwd, Slurm) or use a
    pod identity (Kubernetes), so credentials never need to be passed here."""
    from recap_app.config import SECRET_HINT, ConfigError, refuse_secret_override
    from recap_app.storage import has_secret_value, is_secret_key

    for override in overrides:
        try:
            refuse_secret_override(override)
        except ConfigError as e:
            raise ComponentValidationException(f"recap: error: {e}") from None
    for name in env or {}:
        if is_secret_key(name):
            raise ComponentValidationException(f"recap: error: --env {name}=...: {SECRET_HINT}")
    for url in urls:
        if has_secret_value(url):
            raise ComponentValidationException(f"recap: error: a URL holds a credential: {SECRET_HINT}")


def _check_j(j: str) -> Tuple[int, int, int]:
    """(min nodes, max nodes, processes per node); a -j naming no process (1x0, 0x2) is refused before
    an AppDef exists (TorchX would divide by zero)."""
    try:
        min_nnodes, max_nnodes, nproc, _ = parse_nnodes(j)
    except (ValueError, AssertionError) as e:
        raise ComponentValidationException(f"recap: error: -j {j}: expected NxP or MIN:MAXxP ({e})") from None
    if nproc < 1 or min_nnodes < 1 or max_nnodes < min_nnodes:
        raise ComponentValidationException(
            f"recap: error: -j {j}: needs at least one node and one process per node (e.g. 1x2)"
        )
    return min_nnodes, int(max_nnodes), nproc


def _check_shape(j: str, config: str, overrides: List[str]) -> None:
    """_check_j, and for a fixed -j (not elastic MIN:MAX) a global batch that splits over its world size:
    checked at submit time, not by a job that has already generated data and formed its process group
    (an elastic job's world size is known only when it runs; the trainer checks it then, first thing)."""
    min_nnodes, max_nnodes, nproc = _check_j(j)
    if min_nnodes != max_nnodes or "://" in config:
        return  # a remote config is read by the job itself (credentials may not be here)
    from recap_app.config import ConfigError, load_config

    try:
        batch = load_config(config, overrides).data.global_batch_size
    except ConfigError:
        return  # the job reports it, with the same message
    if batch % (max_nnodes * nproc):
        raise ComponentValidationException(
            f"recap: error: data.global_batch_size={batch} must be divisible by the world size "
            f"{max_nnodes * nproc} (-j {j})"
        )


def torchrun_role(
    name: str,
    module: str,
    module_args: List[str],
    *,
    j: str,
    image: str = "",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.Role:
    """One role of N replicas, each running `python -m recap_app.launch ... -m MODULE ARGS` (torchrun) with P
    processes (torchx's dist.ddp recipe plus torchrun restarts = max_retries). Public for components
    that run a program wrapping recap's mains (e.g. `recap_app.train.main` with callbacks)."""
    min_nnodes, max_nnodes, nproc_per_node, nnodes_rep = parse_nnodes(j)
    if max_nnodes == 1:
        rdzv_endpoint = "localhost:0"  # one node: torchrun picks a free port
    else:
        # The scheduler sets the rank-0 host variable (TORCHX_RANK0_HOST, SLURM_..., VC_..._HOSTS).
        rdzv_endpoint = _noquote(f"$${{{macros.rank0_env}:=localhost}}:{rdzv_port}")
    role_env = dict(env or {})
    if max_nnodes > 1:
        # torchrun shares one rendezvous store across restart attempts; restarted workers then meet the
        # dead attempt's keys and hang. Multi-node restart counts can differ per node (pytorch#135712),
        # so the trainer's per-attempt prefix cannot help there: ask for a fresh store per attempt.
        role_env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # Each process's share of the replica's CPUs as its thread count (torchrun's default is 1, announced
    # in a banner); an OMP_NUM_THREADS in --env wins.
    role_env.setdefault("OMP_NUM_THREADS", str(max(1, cpu // nproc_per_node)))
    role_env.setdefault("LOGLEVEL", os.getenv("LOGLEVEL", "WARNING"))
    role_env.setdefault("PYTHONUNBUFFERED", "1")
    if debug:
        role_env.update(_TORCH_DEBUG_FLAGS)
    torchrun = [
        "-m", "recap_app.launch",
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", rdzv_endpoint,
        "--rdzv_id", macros.app_id,
        "--nnodes", nnodes_rep,
        "--nproc_per_node", str(nproc_per_node),
        "--max_restarts", str(max_retries),
        "--tee", "3",
        "-m", module,
    ]  # fmt: skip
    return specs.Role(
        name=name,
        image=image,
        min_replicas=min_nnodes,
        num_replicas=int(max_nnodes),
        entrypoint="bash",
        args=["-c", f"{_python(image)} {_shell_words(torchrun + module_args)}"],
        env=role_env,
        resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
        port_map={"c10d": rdzv_port},
        max_retries=max_retries,
        mounts=specs.parse_mounts(mounts) if mounts else [],
    )


def train(
    *overrides: str,
    config: str = "local",
    output: str = "runs/recap",
    j: str = "1x2",
    image: str = "",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """Train the Recap heavy ranker with sharded embedding tables (torchrun; gloo on CPU, nccl on GPU).

    Resumes from the newest complete checkpoint under OUTPUT/checkpoints. Config overrides go after
    `--`, e.g. `torchx run recap.train -j 2x4 --output s3://bucket/run -- training.num_train_steps=1000`.
    Help: `--help` (`-h NAME` is TorchX's named-resource option, as in dist.ddp).

    Args:
        overrides: dotted config overrides after `--`, e.g. -- training.num_train_steps=200
        config: packaged config name (local, production) or a YAML URL
        output: run URL (local path, file://, s3://, gs://, az://) for checkpoints, embeddings, metrics;
            a relative path is made absolute on this machine
        j: {nnodes}x{nproc_per_node}; multi-node when nnodes > 1 (e.g. 2x4)
        image: container image (kubernetes, local_docker); empty: this machine's interpreter and paths
            (local_cwd, slurm). In an image the output must be a URL or under a --mounts destination
        cpu: CPUs per replica
        gpu: GPUs per replica (nproc_per_node must not exceed it on GPU hosts)
        memMB: memory per replica in MB
        h: named resource, `-h NAME` (takes precedence over cpu, gpu, memMB); help is `--help`
        env: extra environment, e.g. AWS_ENDPOINT_URL=http://...,LOGLEVEL=INFO (never put secrets here)
        max_retries: scheduler retries and torchrun restarts; each restart resumes from the last checkpoint
        rdzv_port: port on the rank-0 host for the c10d rendezvous (multi-node only)
        mounts: mounts, e.g. type=bind,src=/data,dst=/data[,readonly]
        debug: enable torch.distributed debug flags
    """
    _refuse_secrets(list(overrides), env, [config, output])
    _check_shape(j, config, list(overrides))
    output = _job_path("output", output, image, mounts, output=True)
    args = ["--config", config, "--output", output, *overrides]
    role = torchrun_role(
        "trainer", "recap_app.train", args, j=j, image=image, cpu=cpu, gpu=gpu, memMB=memMB, h=h,
        env=env, max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts, debug=debug,
    )  # fmt: skip
    return specs.AppDef(name="recap-train", roles=[role])


def evaluate(
    *overrides: str,
    checkpoint: str,
    data: str,
    output: str,
    config: str = "local",
    j: str = "1x2",
    image: str = "",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    num_batches: int = 0,
) -> specs.AppDef:
    """Score a checkpoint on a Parquet dataset; writes OUTPUT/eval_metrics.json (per-task AUROC, RCE).

    Args:
        overrides: dotted config overrides (must describe the model the checkpoint was trained with)
        checkpoint: checkpoint URL, e.g. runs/x/checkpoints/step-200 or a run URL (newest step is used)
        data: Parquet URL, directory or glob to score
        output: URL where eval_metrics.json is written
        config: packaged config name or YAML URL
        j: {nnodes}x{nproc_per_node}
        image: container image (kubernetes, local_docker); empty: this machine's interpreter and paths
            (local_cwd, slurm). In an image the output must be a URL or under a --mounts destination
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        h: named resource
        env: extra environment
        max_retries: scheduler retries and torchrun restarts
        rdzv_port: rendezvous port (multi-node only)
        mounts: mounts, e.g. type=bind,src=/data,dst=/data
        num_batches: at most this many batches per rank (0: the whole dataset, every example once)
    """
    _refuse_secrets(list(overrides), env, [config, checkpoint, data, output])
    _check_j(j)
    checkpoint = _job_path("checkpoint", checkpoint, image, mounts, output=False)
    data = _job_path("data", data, image, mounts, output=False)
    output = _job_path("output", output, image, mounts, output=True)
    args = [
        "--config", config, "--checkpoint", checkpoint, "--data", data, "--output", output,
        "--num-batches", str(num_batches), *overrides,
    ]  # fmt: skip
    role = torchrun_role(
        "evaluator", "recap_app.evaluate", args, j=j, image=image, cpu=cpu, gpu=gpu, memMB=memMB, h=h,
        env=env, max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts, debug=False,
    )  # fmt: skip
    return specs.AppDef(name="recap-evaluate", roles=[role])


def generate_data(
    *overrides: str,
    output: str,
    config: str = "local",
    num_examples: int = 100_000,
    num_eval_examples: int = 20_000,
    num_files: int = 4,
    seed: int = 0,
    image: str = "",
    cpu: int = 1,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Write a synthetic, learnable ranking dataset (Parquet) to OUTPUT/train and OUTPUT/eval.

    Args:
        overrides: dotted config overrides shaping the data (tasks, feature counts, tables)
        output: dataset URL (local path, file://, s3://, gs://, az://)
        config: packaged config name or YAML URL
        num_examples: training examples
        num_eval_examples: evaluation examples
        num_files: Parquet files per split
        seed: generator seed (same seed, same data)
        image: container image (kubernetes, local_docker); empty: this machine's interpreter and paths
            (local_cwd, slurm). In an image the output must be a URL or under a --mounts destination
        cpu: CPUs
        memMB: memory in MB
        env: extra environment
        mounts: mounts, e.g. type=bind,src=/data,dst=/data
    """
    _refuse_secrets(list(overrides), env, [config, output])
    args = [
        "-m", "recap_app.cli", "generate-data", "--output",
        _job_path("output", output, image, mounts, output=True), "--config", config,
        "--num-examples", str(num_examples), "--num-eval-examples", str(num_eval_examples),
        "--num-files", str(num_files), "--seed", str(seed), *overrides,
    ]  # fmt: skip
    role = specs.Role(
        name="generator",
        image=image,
        entrypoint="bash",
        args=["-c", f"{_python(image)} {_shell_words(args)}"],
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
        resource=specs.resource(cpu=cpu, gpu=0, memMB=memMB),
        mounts=specs.parse_mounts(mounts) if mounts else [],
    )
    return specs.AppDef(name="recap-generate-data", roles=[role])
