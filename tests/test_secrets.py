"""Credentials never go on a command line: overrides of secret-looking storage options (and values that
carry a URL password or an account key) are refused by every `recap` command and by the TorchX components
before an AppDef exists, so no `--dryrun` (local_cwd, slurm, kubernetes) prints them; non-secret options
(`anon`, `endpoint_url`, ...) still work, end to end against S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import refusal_driver
from e2e_lib import not_in, run
from torchx.specs.finder import ComponentValidationException

from recap_app import storage
from recap_app.config import SECRET_HINT, SecretOverrideError, load_config
from torchx_components import recap

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DRIVER = str(Path(__file__).with_name("refusal_driver.py"))
SECRET = f"recap-secret-{uuid.uuid4().hex}"

# (override, the key path the refusal names)
REFUSED = [
    (f"storage.options.secret={SECRET}", "storage.options.secret"),
    (f"storage.options.key={SECRET}", "storage.options.key"),
    (f"storage.options.token={SECRET}", "storage.options.token"),
    (f"storage.options.account_key={SECRET}", "storage.options.account_key"),
    (f"storage.options.sas_token={SECRET}", "storage.options.sas_token"),
    (f"storage.options.credential={SECRET}", "storage.options.credential"),
    (f"storage.options.password={SECRET}", "storage.options.password"),
    (
        f"storage.options.connection_string=AccountName=a;AccountKey={SECRET}",
        "storage.options.connection_string",
    ),
    (f"storage={{options: {{client_secret: {SECRET}}}}}", "storage.options.client_secret"),
    (
        f"storage.options.client_kwargs={{aws_secret_access_key: {SECRET}}}",
        "storage.options.client_kwargs.aws_secret_access_key",
    ),
    (f"storage.options[SSECustomerKey]={SECRET}", "storage.options.SSECustomerKey"),
    (f"storage.options.secret=[{SECRET}", "storage.options.secret"),  # not even valid YAML: still not echoed
    (f"data.train_url=https://user:{SECRET}@host/train", "data.train_url"),
]  # fmt: skip
ALLOWED = {
    "storage.options.anon=true": ("anon", True),
    "storage.options.endpoint_url=http://127.0.0.1:9000": ("endpoint_url", "http://127.0.0.1:9000"),
    "storage.options.use_listings_cache=false": ("use_listings_cache", False),
    "storage.options.token=anon": ("token", "anon"),  # gcsfs's anonymous mode, not a secret
    "storage.options.config_kwargs={signature_version: s3v4}": (
        "config_kwargs",
        {"signature_version": "s3v4"},
    ),
    "storage.options.requester_pays=true": ("requester_pays", True),
}


def expected(path: str) -> str:
    return f"override {path}=...: {SECRET_HINT}"


@pytest.mark.parametrize(("override", "path"), REFUSED)
def test_secret_overrides_are_refused_without_the_value(override: str, path: str):
    with pytest.raises(SecretOverrideError) as err:
        load_config("local", [override])
    assert str(err.value) == expected(path)
    assert SECRET not in str(err.value)


def test_non_secret_overrides_still_work():
    config = load_config(
        "local", [*ALLOWED, "model.tasks[recap.engagement.is_replied].pos_weight=2", "training.seed=3"]
    )
    assert config.storage.options == dict(ALLOWED.values())
    assert config.model.tasks["recap.engagement.is_replied"].pos_weight == 2


@pytest.mark.parametrize(
    "name",
    ["secret", "key", "token", "account_key", "connection_string", "sas_token", "aws_secret_access_key",
     "aws_access_key_id", "key_id", "SSECustomerKey", "client_secret", "AZURE_STORAGE_CONNECTION_STRING",
     "AccountKey", "password", "credential", "session_token"],
)  # fmt: skip
def test_secret_key_names(name: str):
    assert storage.is_secret_key(name)


@pytest.mark.parametrize(
    "name",
    ["anon", "endpoint_url", "use_listings_cache", "client_kwargs", "config_kwargs", "signature_version",
     "account_name", "region_name", "requester_pays", "max_keys", "recap.engagement.is_replied",
     "keep_latest_k", "project", "version_aware"],
)  # fmt: skip
def test_non_secret_key_names(name: str):
    assert not storage.is_secret_key(name)


def test_every_recap_command_refuses(tmp_path: Path):
    """train, evaluate, export, generate-data: `recap: error:` with the key, exit 1, the value nowhere in
    the output. One process runs all four (tests/refusal_driver.py); one real `recap` process too."""
    out = str(tmp_path / "out")
    override, path = REFUSED[0]
    jobs = [
        ["train", "--output", out, override],
        ["evaluate", "--checkpoint", out, "--data", out, "--output", out, override],
        ["export", "--checkpoint", out, "--output", f"{out}/m.pt", override],
        ["generate-data", "--output", out, override],
    ]
    res = run([sys.executable, DRIVER, json.dumps(jobs)], cwd=tmp_path, timeout=240, what="refusals")
    results = refusal_driver.parse(res.output)
    assert [results[i] for i in range(len(jobs))] == [(1, f"recap: error: {expected(path)}")] * len(jobs)
    not_in(SECRET, res.output, "recap output")
    assert not (tmp_path / "out").exists()
    cli = subprocess.run(
        [str(BIN / "recap"), "generate-data", "--output", out, REFUSED[3][0]],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 1
    assert cli.stderr.strip() == f"recap: error: {expected(REFUSED[3][1])}"
    not_in(SECRET, cli.stdout + cli.stderr, "recap generate-data output")


def test_components_refuse_before_building_an_appdef():
    override, path = REFUSED[1]
    for build in (
        lambda: recap.train(override, output="s3://b/r"),
        lambda: recap.evaluate(override, checkpoint="s3://b/r", data="s3://b/d", output="s3://b/e"),
        lambda: recap.generate_data(override, output="s3://b/d"),
    ):
        with pytest.raises(ComponentValidationException) as err:
            build()
        assert str(err.value) == f"recap: error: {expected(path)}"
    with pytest.raises(ComponentValidationException, match="--env AWS_SECRET_ACCESS_KEY=...: credentials"):
        recap.train(output="s3://b/r", env={"AWS_SECRET_ACCESS_KEY": SECRET})
    with pytest.raises(ComponentValidationException, match="a URL holds a credential") as err:
        recap.train(output=f"https://u:{SECRET}@host/run")
    assert SECRET not in str(err.value)
    # what stays allowed
    app = recap.train(*ALLOWED, output="s3://b/r", env={"AWS_ENDPOINT_URL": "http://minio:9000"})
    assert "storage.options.endpoint_url=http://127.0.0.1:9000" in app.roles[0].args[1]


SCHEDULERS = {
    "local_cwd": [],
    "slurm": [],
    "kubernetes": ["-cfg", "queue=default,namespace=ml"],
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_torchx_dryrun_never_prints_a_secret(scheduler: str, tmp_path: Path):
    """`torchx run -s SCHEDULER --dryrun --workspace ""`: a secret override fails with the message alone
    (exit 1, no value); an accepted run's dry run shows the non-secret options but none of the submitting
    shell's credentials."""
    env = {"AWS_SECRET_ACCESS_KEY": f"env-{SECRET}", "HOME": str(tmp_path), "PATH": f"{BIN}:/usr/bin:/bin"}
    base = [
        str(BIN / "torchx"),
        "run",
        "-s",
        scheduler,
        *SCHEDULERS[scheduler],
        "--dryrun",
        "--workspace",
        "",
    ]
    image = ["--image", "ghcr.io/x/recap:1"] if scheduler == "kubernetes" else []  # pods need one
    train = ["recap.train", *image, "--output", "s3://bucket/run", "--"]

    refused = run([*base, *train, REFUSED[0][0]], env=env, cwd=tmp_path, timeout=120, check=False)
    assert refused.returncode == 1, refused.tail()
    assert f"recap: error: {expected(REFUSED[0][1])}" in refused.output
    not_in(SECRET, refused.output, f"{scheduler} refused dryrun")
    assert "Traceback" not in refused.output

    accepted = run([*base, *train, *ALLOWED], env=env, cwd=tmp_path, timeout=120, what=f"{scheduler} dryrun")
    assert "storage.options.endpoint_url=http://127.0.0.1:9000" in accepted.output
    not_in(SECRET, accepted.output, f"{scheduler} dryrun")


def test_anon_and_endpoint_url_overrides_work_against_s3(s3_server, tmp_path: Path):
    """The options that stay allowed do their job: `endpoint_url` as an override is what reaches moto
    (the environment names no endpoint), through a real `recap generate-data`."""
    env = {k: v for k, v in s3_server.env.items() if k not in ("AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL")}
    out = s3_server.url(f"secrets-{uuid.uuid4().hex[:8]}")
    cmd = [
        str(BIN / "recap"), "generate-data", "--output", out, "--num-examples", "64",
        "--num-eval-examples", "0", "--num-files", "1",
        f"storage.options.endpoint_url={s3_server.endpoint}", "storage.options.anon=false",
    ]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    run(cmd, env={**full_env, **env}, inherit_env=False, cwd=tmp_path, timeout=120, what="generate-data")
    assert storage.exists(f"{out}/train/part-00000.parquet", s3_server.storage_options)
