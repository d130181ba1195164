"""A checkpoint URL cannot run code: crafted checkpoints on every load path, as real processes.

Two crafted checkpoints, each made from a real complete one written by `recap train`:

- "metadata": `.metadata` replaced by a pickle whose __reduce__ is `posix.system("touch MARKER")`;
- "bytes-item": `.metadata` (still only DCP types) declares a model item a pickled object
  (BytesStorageMetadata), and the shard file holds a torch.save'd payload that runs `builtins.exec`.

First proof that both run their payload under stock DCP (pickle.load, DefaultLoadPlanner); then each load
path of recap (resume, warm start, `recap evaluate`, `recap export`; also from S3, and a resume under a
real 2-rank torchrun) refuses with one line naming the file, exits non-zero, writes nothing, and the
marker is never created.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import refusal_driver
import torch
import torch.distributed.checkpoint as dcp
from e2e_lib import run, torchrun
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from recap_app import storage
from recap_app.checkpoint import read_checkpoint_metadata
from recap_app.model import load_embedding_table
from recap_app.safe_pickle import DCP_METADATA_GLOBALS, UntrustedInputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

RECAP = str(Path(sys.executable).parent / "recap")
DRIVER = str(Path(__file__).with_name("refusal_driver.py"))
KINDS = ("metadata", "bytes-item")
# The item the bytes-item checkpoint turns into a pickled object: a model key, read by every load path.
ITEM = "model.preprocessor.batch_norm.num_batches_tracked"


class _System:
    """Unpickles to `os.system(command)`."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    """Unpickles to `exec(code)`."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def craft(step_dir: Path, kind: str, marker: Path, item: str = ITEM) -> None:
    """Turn the real checkpoint `step_dir` into a crafted one whose loading would create `marker`."""
    meta = step_dir / ".metadata"
    if kind == "metadata":
        meta.write_bytes(pickle.dumps(_System(f"touch {marker}")))
        return
    md = pickle.loads(meta.read_bytes())  # our own, real file
    buf = io.BytesIO()
    torch.save(_Exec(f"open({str(marker)!r}, 'w').close()"), buf)
    shard = step_dir / "__0_0.distcp"
    offset = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(buf.getvalue())
    md.state_dict_metadata[item] = BytesStorageMetadata()
    for index in [i for i in md.storage_data if i.fqn == item]:
        del md.storage_data[index]
    md.storage_data[MetadataIndex(item)] = _StorageInfo("__0_0.distcp", offset, len(buf.getvalue()))
    meta.write_bytes(pickle.dumps(md))


def refusal(url: str, kind: str, item: str = ITEM) -> str:
    """The one-line error a crafted checkpoint at step folder `url` must end the command with."""
    if kind == "metadata":
        return (
            f"recap: error: checkpoint {url}/.metadata: refused to unpickle posix.system (not a checkpoint "
            "metadata type)"
        )
    return (
        f"recap: error: checkpoint {url}/__0_0.distcp: refused to unpickle item '{item}' (a pickled object; "
        "recap checkpoints hold tensors only)"
    )


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A real run: 2 steps of the local config, one process, its checkpoint at step 2 and its data."""
    root = tmp_path_factory.mktemp("base")
    cmd = [RECAP, "train", "--output", str(root), "training.num_train_steps=2", "eval.num_batches=1"]
    run(cmd, cwd=root, timeout=240, what="base run")
    assert (root / "checkpoints/step-2/.metadata").exists()
    return root


def crafted_run(base: Path, dest: Path, kind: str, item: str = ITEM) -> tuple[Path, Path]:
    """A copy of the base run's checkpoints with step-2 crafted; (run dir, marker path)."""
    shutil.copytree(base / "checkpoints", dest / "checkpoints")
    marker = dest.parent / f"MARKER-{dest.name}"
    craft(dest / "checkpoints/step-2", kind, marker, item)
    return dest, marker


def data_overrides(base: Path) -> list[str]:
    return [f"data.train_url={base}/data/train", f"data.eval_url={base}/data/eval"]


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", KINDS)
def test_crafted_checkpoint_runs_code_under_plain_dcp(base: Path, tmp_path: Path, kind: str):
    """The attack is real: stock DCP (pickle.load of .metadata, DefaultLoadPlanner) runs the payload."""
    run_dir, marker = crafted_run(base, tmp_path / "run", kind)
    state = {"model": {ITEM.split(".", 1)[1]: torch.tensor(0)}}
    with contextlib.suppress(Exception, dcp.CheckpointException):  # whatever DCP makes of it afterwards
        dcp.load(state, checkpoint_id=str(run_dir / "checkpoints/step-2"), no_dist=True)
    assert marker.exists()


def test_real_metadata_needs_only_allowed_globals(base: Path):
    """What recap's own checkpoints pickle is admitted: the allow-list covers it (a torch upgrade that
    adds a type fails here, not in a user's resume)."""
    seen: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    meta = base / "checkpoints/step-2/.metadata"
    Recorder(io.BytesIO(meta.read_bytes())).load()
    assert seen <= DCP_METADATA_GLOBALS, seen - DCP_METADATA_GLOBALS
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in seen
    md = read_checkpoint_metadata(meta.read_bytes(), "x")
    assert md.state_dict_metadata.keys() == pickle.loads(meta.read_bytes()).state_dict_metadata.keys()


def test_every_load_path_refuses(base: Path, s3_server, tmp_path: Path, monkeypatch):
    """Resume, warm start, evaluate and export, on both crafted kinds, locally and from S3 (warm start
    and export): one `recap` process runs every command to its exit (tests/refusal_driver.py)."""
    jobs, expect = [], []  # expect: (message, paths that must not exist afterwards)
    markers = []
    for kind in KINDS:
        run_dir, marker = crafted_run(base, tmp_path / kind, kind)
        markers.append(marker)
        step = f"{run_dir}/checkpoints/step-2"
        out = tmp_path / f"out-{kind}"
        data = data_overrides(base)
        jobs += [
            ["train", "--output", str(run_dir), "training.num_train_steps=4", *data],
            ["train", "--output", f"{out}/warm", f"checkpoint.initial_checkpoint={step}", *data],
            ["evaluate", "--checkpoint", str(run_dir), "--data", f"{base}/data/eval", "--output", f"{out}/e"],
            ["export", "--checkpoint", str(run_dir), "--output", f"{out}/model.pt"],
        ]  # fmt: skip
        expect += [
            (refusal(step, kind), [run_dir / "checkpoints/step-4", run_dir / "metrics.jsonl"]),
            # the output's lease comes and goes; nothing the run would produce is written
            (
                refusal(step, kind),
                [out / "warm/checkpoints", out / "warm/metrics.jsonl", out / "warm/runs.jsonl"],
            ),
            (refusal(step, kind), [out / "e"]),
            (refusal(step, kind), [out / "model.pt"]),
        ]
        # the same checkpoint in S3
        s3_run = s3_server.url(f"trust-{kind}-{uuid.uuid4().hex[:8]}")
        fs, path = storage.url_to_fs(s3_run, s3_server.storage_options)
        fs.put(str(run_dir / "checkpoints"), f"{path}/checkpoints", recursive=True)
        s3_step = f"{s3_run}/checkpoints/step-2"
        assert storage.exists(f"{s3_step}/.metadata", s3_server.storage_options)
        jobs += [
            ["train", "--output", f"{out}/s3-warm", f"checkpoint.initial_checkpoint={s3_step}", *data],
            ["export", "--checkpoint", s3_run, "--output", f"{out}/s3-model.pt"],
        ]  # fmt: skip
        expect += [
            (refusal(s3_step, kind), [out / "s3-warm/checkpoints", out / "s3-warm/metrics.jsonl"]),
            (refusal(s3_step, kind), [out / "s3-model.pt"]),
        ]

    res = run(
        [sys.executable, DRIVER, json.dumps(jobs)],
        env=s3_server.env,
        cwd=tmp_path,
        timeout=400,
        what="refusals",
    )
    results = refusal_driver.parse(res.output)
    assert len(results) == len(jobs), res.tail()
    for i, (message, absent) in enumerate(expect):
        code, got = results[i]
        assert code == 1 and got == message, (jobs[i], code, got)
        assert "\n" not in got
        for path in absent:
            assert not path.exists(), (jobs[i], path)
    for marker in markers:
        assert not marker.exists(), marker
    assert "Traceback" not in res.output, res.tail()


@pytest.mark.parametrize("kind", KINDS)
def test_torchrun_resume_refuses(base: Path, tmp_path: Path, kind: str):
    """A real 2-rank torchrun resume: every rank ends with the one-line refusal; nothing trained. The base
    checkpoint has world size 1 (a resume on 2 ranks is fine: the data position is re-dealt), and the
    pickled item is `train_state.step`, the first thing a resume reads."""
    item = "train_state.step"
    run_dir, marker = crafted_run(base, tmp_path / "run", kind, item)
    cmd = torchrun(2, "-m", "recap_app.train", "--output", str(run_dir), "training.num_train_steps=4")
    res = run([*cmd, *data_overrides(base)], cwd=tmp_path, timeout=240, check=False)
    assert res.returncode != 0, res.tail()
    line = refusal(f"{run_dir}/checkpoints/step-2", kind, item)
    assert res.output.count(line) == 2, res.tail()  # rank 0 and rank 1
    assert not marker.exists()
    assert not (run_dir / "checkpoints/step-4").exists()
    assert "training steps" not in res.output


def test_embedding_table_with_pickled_objects_is_refused(tmp_path: Path):
    """`load_embedding_table` reads .npy with allow_pickle=False: an object array (or a bare pickle) named
    like a table is refused with its URL, and its payload never runs (it does under allow_pickle=True)."""
    marker = tmp_path / "MARKER"
    payload = np.array([_System(f"touch {marker}")], dtype=object)
    np.save(tmp_path / "user.npy", payload, allow_pickle=True)
    (tmp_path / "author.npy").write_bytes(pickle.dumps(_System(f"touch {marker}")))
    for table in ("user", "author"):
        with pytest.raises(UntrustedInputError, match=f"embedding table {tmp_path}/{table}.npy: refused"):
            load_embedding_table(str(tmp_path), table)
    assert not marker.exists()
    np.load(tmp_path / "user.npy", allow_pickle=True)  # the proof that it is an attack
    assert marker.exists()
    np.save(tmp_path / "good.npy", np.ones((3, 2), dtype=np.float32))
    assert load_embedding_table(str(tmp_path), "good").shape == (3, 2)


def test_recap_sources_never_unpickle_unsafely():
    """Every torch.load in recap_app passes weights_only=True and every np.load allow_pickle=False; no
    pickle.load(s) at all (checkpoint metadata goes through recap_app/safe_pickle.py)."""
    root = Path(__file__).resolve().parents[1] / "recap_app"
    for source in root.rglob("*.py"):
        text = source.read_text()
        for call, needed in (("torch.load(", "weights_only=True"), ("np.load(", "allow_pickle=False")):
            for chunk in text.split(call)[1:]:
                assert needed in chunk.split(")")[0], (source.name, call)
        assert "pickle.load(" not in text and "pickle.loads(" not in text, source.name


class _ByName:
    """Pickles as `getattr(cls, name)`, as some Python 3.11 builds pickle enum members."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_enum_members_pickled_by_name_load_and_other_getattrs_are_refused():
    """Inside the recap image, DCP's `.metadata` pickles `_MEM_FORMAT_ENCODING` members as
    `getattr(_MEM_FORMAT_ENCODING, "TORCH_CONTIGUOUS_FORMAT")`: that loads; a getattr on anything but an
    allowed Enum class is refused, nothing called."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, TensorProperties

    from recap_app.safe_pickle import DCP_METADATA_GLOBALS, RefusedGlobalError, restricted_load

    member = _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    data = pickle.dumps(_ByName(_MEM_FORMAT_ENCODING, member.name))
    assert b"getattr" in data
    assert restricted_load(data, DCP_METADATA_GLOBALS) is member
    with pytest.raises(RefusedGlobalError):
        restricted_load(pickle.dumps(_ByName(TensorProperties, "create_from_tensor")), DCP_METADATA_GLOBALS)
    with pytest.raises(RefusedGlobalError):
        restricted_load(pickle.dumps(_ByName(_MEM_FORMAT_ENCODING, "__class__")), DCP_METADATA_GLOBALS)
