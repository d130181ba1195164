"""`recap import-config ORIGINAL.yaml --output recap.yaml`: a the-algorithm-ml recap config
(projects/home/recap/config.py RecapConfig, e.g. config/local_prod.yaml) as a recap config.

Carried over: the model (featurization, backbone and towers as MLP or MaskNet, affine maps, pos_weight,
multi_task_type, large embedding tables), the TwHIN inputs named in seg_dense_schema.renamed_features,
train_data's batch size, truncation widths and per-task downsampling rates (the calibration), Adam and
the multi-task learning rates, and the training cadence. Everything else set in the file (tf.data
options, schema paths, validation partitions, features recap has no equivalent for) is listed with its
path and value, both on stdout and as comments atop the output, never dropped silently; fields left
null are absent and not listed.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Iterator, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from recap_app.config import RecapConfig
from recap_app.errors import InputError, exit_on_input_error

Path = tuple[str, ...]
TWHIN = ("user_embedding", "user_eng_embedding", "author_embedding")  # the original's concat order
TWHIN_DIM = 200  # home_recap_2022 segdense.json; the width lives in the schema file, not the YAML
# Widths of home_recap_2022 when the file does not truncate (its segdense.json, not the YAML, has them).
DEFAULT_WIDTHS = {"continuous_feature_truncation": 2117, "binary_feature_truncation": 59}


class ImportConfigError(InputError, ValueError):
    """The file is not an original recap config, or asks for something recap cannot build."""


def dotted(path: Path) -> str:
    """A path the way recap's overrides spell it: brackets around keys holding dots."""
    out = ""
    for part in path:
        out += f"[{part}]" if "." in part else ("." if out else "") + part
    return out


class _Source:
    """The original config, remembering which leaves were carried over (or explained) so that every
    other leaf set in the file is listed."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.used: set[Path] = set()
        self.reasons: list[tuple[Path, Any, str]] = []  # subtrees not carried: value, why (listed once)

    def node(self, *path: str) -> Any:
        """The value at `path` (None when absent); marks nothing."""
        value: Any = self.data
        for part in path:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value

    def take(self, *path: str, default: Any = None) -> Any:
        """The value at `path`, marked carried over (with its whole subtree)."""
        self.used.add(path)
        value = self.node(*path)
        return default if value is None else value

    def skip(self, path: Path, reason: str, value: Any = None) -> None:
        """`path` (and its subtree) is not carried over, for `reason`: listed once, if set."""
        value = self.node(*path) if value is None else value
        if _set(value):
            self.reasons.append((path, value, reason))
        self.used.add(path)

    def leftovers(self) -> list[str]:
        """Every set leaf neither carried nor explained, then the explained subtrees."""
        out = [
            f"{dotted(p)}: {v!r}: no recap equivalent"
            for p, v in _leaves((), self.data)
            if not any(p[: len(u)] == u for u in self.used)
        ]
        return out + [f"{dotted(p)}: {_short(v)}: {why}" for p, v, why in self.reasons]


def _set(value: Any) -> bool:
    return value is not None and value != {} and value != []


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, dict) else "{" + ", ".join(map(str, value)) + "}"
    return text if len(text) <= 120 else text[:117] + "..."


def _leaves(path: Path, value: Any) -> Iterator[tuple[Path, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves((*path, str(k)), v)
    elif _set(value):
        yield path, value


# ------------------------------------------------------------------------------------------------- model
def _learning_rate(src: _Source, path: Path) -> dict[str, Any] | None:
    """The one schedule kind set (the original writes the others as null)."""
    chosen = {k: v for k, v in (src.take(*path) or {}).items() if v is not None}
    return chosen or None


def _mlp(src: _Source, path: Path) -> dict[str, Any]:
    cfg = src.node(*path)
    out: dict[str, Any] = {"layer_sizes": src.take(*path, "layer_sizes")}
    if cfg.get("layers"):
        raise ImportConfigError(
            f"{dotted(path)}.layers: per-layer MLP configs are not supported; use layer_sizes"
        )
    bn = src.take(*path, "batch_norm")
    out["batch_norm"] = (
        {"affine": bn.get("affine", True), "momentum": bn.get("momentum", 0.1)} if bn else None
    )
    dropout = src.take(*path, "dropout")
    out["dropout"] = {"rate": dropout.get("rate", 0.1)} if dropout else None
    out["final_layer_activation"] = src.take(*path, "final_layer_activation", default=False)
    return out


def _mask_net(src: _Source, path: Path) -> dict[str, Any]:
    blocks = [
        {
            "output_size": b["output_size"],
            "input_layer_norm": b.get("input_layer_norm", False),
            "reduction_factor": b.get("reduction_factor"),
            "aggregation_size": b.get("aggregation_size"),
        }
        for b in src.take(*path, "mask_blocks", default=[])
    ]
    mlp = _mlp(src, (*path, "mlp")) if src.node(*path, "mlp") else None
    return {"mask_blocks": blocks, "mlp": mlp, "use_parallel": src.take(*path, "use_parallel", default=False)}


def _architecture(src: _Source, path: Path) -> dict[str, Any]:
    """A TaskModel's architecture: MLP or MaskNet (recap builds neither DCN nor DLRM)."""
    for unsupported in ("dcn_config", "dlrm_config"):
        if src.node(*path, unsupported):
            raise ImportConfigError(f"{dotted((*path, unsupported))}: recap builds MLP and MaskNet only")
    if src.node(*path, "mlp_config"):
        return {"mlp": _mlp(src, (*path, "mlp_config"))}
    if src.node(*path, "mask_net_config"):
        return {"mask_net": _mask_net(src, (*path, "mask_net_config"))}
    raise ImportConfigError(f"{dotted(path)}: no mlp_config or mask_net_config")


def _featurization(src: _Source) -> dict[str, Any]:
    """double_norm_log_config (the only featurization the original builds) with its defaults spelled
    out: the original's differ from recap's."""
    path = ("model", "featurization_config", "double_norm_log_config")
    if not src.node(*path):
        raise ImportConfigError(f"{dotted(path)}: required (the original builds only DoubleNormLog)")
    for other in ("log1p_abs_config", "clip_log1p_abs_config", "z_score_log_config"):
        src.skip(("model", "featurization_config", other), "the original ignores it (builds DoubleNormLog)")
    concat = src.take("model", "featurization_config", "feature_names_to_concat", default=["binary"])
    if list(concat) != ["binary"]:
        src.skip(("model", "featurization_config", "feature_names_to_concat"), "recap joins binary")
    bn = src.take(*path, "batch_norm_config")
    ln = src.take(*path, "layer_norm_config")
    if ln and (ln.get("axis", -1) != -1 or ln.get("center", True) != ln.get("scale", True)):
        raise ImportConfigError(f"{dotted((*path, 'layer_norm_config'))}: needs axis -1 and center == scale")
    return {
        "batch_norm": {"affine": bn.get("affine", True), "momentum": bn.get("momentum", 0.1)} if bn else None,
        "clip_magnitude": src.take(*path, "clip_magnitude", default=5.0),
        "layer_norm": (
            {"epsilon": ln.get("epsilon", 1e-3), "elementwise_affine": ln.get("center", True)} if ln else None
        ),
    }


def _tasks(src: _Source) -> dict[str, Any]:
    """Towers with their affine map and pos_weight; the calibration's downsampling rates come from
    train_data.tasks, as the original's calibrators read them."""
    out: dict[str, Any] = {}
    for name in src.node("model", "tasks") or {}:
        path = ("model", "tasks", name)
        task = _architecture(src, path)
        affine = src.take(*path, "affine_map")
        if affine:
            task["affine_map"] = {"scale": affine.get("scale", 1.0), "bias": affine.get("bias", 0.0)}
        task["pos_weight"] = src.take(*path, "pos_weight", default=1.0)
        task["pos_downsampling_rate"] = src.take(
            "train_data", "tasks", name, "pos_downsampling_rate", default=1.0
        )
        task["neg_downsampling_rate"] = src.take(
            "train_data", "tasks", name, "neg_downsampling_rate", default=1.0
        )
        out[name] = task
    if not out:
        raise ImportConfigError("model.tasks: no tasks")
    for name in src.node("train_data", "tasks") or {}:
        if name not in out:
            why = "not in model.tasks (recap reads model.tasks' labels)"
            src.skip(("train_data", "tasks", name), why, value=name)
    return out


def _model(src: _Source, notes: list[str]) -> dict[str, Any]:
    model: dict[str, Any] = {"featurization": _featurization(src)}
    model["multi_task_type"] = src.take("model", "multi_task_type", default="share_none")
    if src.node("model", "backbone"):
        model["backbone"] = _architecture(src, ("model", "backbone"))
        src.skip(("model", "backbone", "affine_map"), "the original applies affine maps to towers only")
        if src.take("model", "backbone", "pos_weight", default=1.0) != 1.0:
            src.skip(("model", "backbone", "pos_weight"), "the original uses towers' pos_weight only")
    model["tasks"] = _tasks(src)
    model["embeddings"] = _large_embeddings(src, notes)
    model["dense_embeddings"] = _dense_embeddings(src, notes)
    for key, why in (
        ("small_embeddings", "recap has no small (discrete-feature) embeddings"),
        ("position_debias_config", "recap has no position debiasing"),
        ("stratifiers", "recap computes no stratified metrics"),
    ):
        src.skip(("model", key), why)
    return model


def _large_embeddings(src: _Source, notes: list[str]) -> dict[str, Any]:
    """Tables as recap's sharded ones, fed raw ids hashed into the table (feature = table name)."""
    path = ("model", "large_embeddings")
    tables = []
    for i, t in enumerate(src.node(*path, "tables") or []):
        tables.append(
            {
                "name": t["name"],
                "num_embeddings": t["num_embeddings"],
                "embedding_dim": t["embedding_dim"],
                "feature_names": [t["name"]],
                "id_transform": "hash",
            }
        )
        for key in ("pretrained", "vocab"):
            if t.get(key):
                src.skip((*path, "tables", str(i), key), "recap initialises tables itself", t[key])
    if tables:
        notes.append(
            "model.embeddings.tables: each table reads the id column named like the table, ids hashed"
        )
    src.used.add((*path, "tables"))
    src.used.add((*path, "optimizer", "init_learning_rate"))
    src.skip((*path, "optimizer", "learning_rate"), "recap's fused sparse optimizer has a constant rate")
    return {"tables": tables}


def _dense_embeddings(src: _Source, notes: list[str]) -> dict[str, Any]:
    renamed = src.node("train_data", "seg_dense_schema", "renamed_features") or {}
    out = {name: {"dim": TWHIN_DIM, "layer_norm": True} for name in TWHIN if name in renamed}
    if out:
        notes.append(
            f"model.dense_embeddings: {list(out)} of {TWHIN_DIM} floats each (the width of home_recap_2022's "
            "segdense.json, which the YAML does not hold), read from Parquet columns of these names"
        )
    return out


# -------------------------------------------------------------------------------------- data, optimizer
def _data(src: _Source, notes: list[str]) -> dict[str, Any]:
    widths = {}
    for key, default in DEFAULT_WIDTHS.items():
        value = src.take("train_data", "preprocess", "truncate_and_slice", key)
        if value is None:
            notes.append(f"train_data.preprocess.truncate_and_slice.{key} not set: {default} assumed")
        widths[key] = value or default
    src.skip(
        ("train_data", "inputs"),
        "TFRecord inputs; recap reads Parquet (set data.train_url; empty: synthetic data)",
    )
    src.skip(
        ("train_data", "seg_dense_schema"),
        "recap reads Parquet columns continuous, binary, <id features>, <dense embeddings>, label/<task>",
    )
    return {
        "train_url": "",
        "eval_url": "",
        "num_continuous": widths["continuous_feature_truncation"],
        "num_binary": widths["binary_feature_truncation"],
        "global_batch_size": src.take("train_data", "global_batch_size"),
    }


def _validation(src: _Source) -> None:
    """recap evaluates one eval set (data.eval_url, the train batch size): each partition is listed."""
    for name, part in (src.node("validation_data") or {}).items():
        part = part or {}
        summary = [f"batch {part.get('global_batch_size')}", f"inputs {part.get('inputs')!r}"]
        if part.get("evaluation_tasks"):
            summary.append(f"evaluation_tasks {part['evaluation_tasks']}")
        rates = {t: r for t, r in (part.get("tasks") or {}).items() if r}
        if rates:
            summary.append(f"downsampling {rates}")
        why = "recap evaluates one set (data.eval_url at data.global_batch_size; no eval.partitions)"
        src.skip(("validation_data", name), f"{why}: {'; '.join(summary)}", list(part))
    src.used.add(("validation_data",))


def _optimizer(src: _Source, tasks: Sequence[str], notes: list[str]) -> dict[str, Any]:
    adam = src.take("optimizer", "adam", default={})
    out: dict[str, Any] = {
        "adam": {
            "beta_1": adam.get("beta_1", 0.9),
            "beta_2": adam.get("beta_2", 0.999),
            "epsilon": adam.get("epsilon", 1e-7),
        }
    }
    single = _learning_rate(src, ("optimizer", "single_task_learning_rate"))
    mtl = ("optimizer", "multi_task_learning_rates")
    backbone = _learning_rate(src, (*mtl, "backbone_learning_rate"))
    if single or backbone:
        out["dense"] = {"learning_rate": single or backbone}
    else:
        notes.append(
            "optimizer: no single_task_learning_rate or backbone_learning_rate: recap's default applies"
        )
    if backbone:
        out["backbone_learning_rate"] = copy.deepcopy(backbone)  # no YAML alias in the output
    towers = {}
    for task in src.node(*mtl, "tower_learning_rates") or {}:
        if task in tasks:
            towers[task] = _learning_rate(src, (*mtl, "tower_learning_rates", task))
        else:
            src.skip((*mtl, "tower_learning_rates", task), "not in model.tasks")
    if towers:
        out["tower_learning_rates"] = towers
    init_lr = src.node("model", "large_embeddings", "optimizer", "init_learning_rate")
    if init_lr:
        out["sparse"] = {"type": "sgd", "learning_rate": init_lr}  # the original's fused EBC optimizer
    return out


def _training(src: _Source, out: dict[str, Any]) -> None:
    t = ("training",)
    every = src.take(*t, "checkpoint_every_n", default=1000)
    out["training"] = {
        "save_dir": os.path.expandvars(src.take(*t, "save_dir", default="/tmp/model")),
        "num_train_steps": src.take(*t, "num_train_steps", default=1_000_000),
        "log_every_n": src.take(*t, "train_log_every_n", default=1000),
    }
    out["checkpoint"] = {"every_n": every}
    if src.node(*t, "checkpoint_max_to_keep"):
        out["checkpoint"]["keep_latest_k"] = src.take(*t, "checkpoint_max_to_keep")
    if src.node(*t, "initial_checkpoint_dir"):
        out["checkpoint"]["initial_checkpoint"] = src.take(*t, "initial_checkpoint_dir")
    # The original evaluates each checkpoint; num_eval_steps < 0 (the whole set) has no recap equivalent.
    out["eval"] = {"every_n": every}
    steps = src.node(*t, "num_eval_steps")
    if steps is not None and steps > 0:
        out["eval"]["num_batches"] = src.take(*t, "num_eval_steps")
    for key, why in (
        ("eval_log_every_n", "recap logs each evaluation (eval.every_n = checkpoint_every_n)"),
        ("eval_timeout_in_s", "recap evaluates inside the training job"),
        ("gradient_accumulation", "recap has no gradient accumulation"),
    ):
        src.skip((*t, key), why)


def translate(original: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """(recap config, fields not carried over, assumptions made)."""
    if not isinstance(original, dict) or not isinstance(original.get("model"), dict):
        raise ImportConfigError("not a the-algorithm-ml recap config (no `model` mapping)")
    src, notes = _Source(original), []
    out: dict[str, Any] = {"model": _model(src, notes), "data": _data(src, notes)}
    _validation(src)
    out["optimizer"] = _optimizer(src, list(out["model"]["tasks"]), notes)
    _training(src, out)
    tables_to_log = src.take("model", "large_embeddings", "tables_to_log")
    if tables_to_log:
        out["embedding_log"] = {"tables": list(tables_to_log)}
    src.skip(("which_metrics",), "recap computes AUROC and RCE per task")
    try:
        RecapConfig.model_validate(out)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ImportConfigError(f"the translated config is not valid: {where}") from None
    return out, src.leftovers(), notes


def render(config: dict[str, Any], source: str, not_carried: list[str], notes: list[str]) -> str:
    head = [f"# Translated by `recap import-config` from {source}."]
    head += ["# Assumed:"] + [f"#   - {n}" for n in notes] if notes else []
    head += ["# Not carried over:"] + [f"#   - {n}" for n in not_carried] if not_carried else []
    return "\n".join(head) + "\n" + yaml.safe_dump(config, sort_keys=False, width=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recap import-config", description=__doc__.split("\n\n")[0])
    parser.add_argument("original", help="a the-algorithm-ml recap YAML (e.g. config/local_prod.yaml)")
    parser.add_argument("--output", required=True, help="where to write the recap YAML")
    args = parser.parse_args(argv)
    from recap_app.storage import write  # fsspec: the output may be any URL

    with exit_on_input_error():
        try:
            with open(args.original) as f:
                original = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise ImportConfigError(f"{args.original}: {e}") from None
        config, not_carried, notes = translate(original)
        write(args.output, render(config, args.original, not_carried, notes))
    print(f"wrote {args.output}")
    for title, lines in (("assumed", notes), ("not carried over", not_carried)):
        print(f"{title} ({len(lines)}):" + "".join(f"\n  - {line}" for line in lines))
    return 0
