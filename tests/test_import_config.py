"""`recap import-config`: a config in the-algorithm-ml's format (tests/data/the_algorithm_ml_recap.yaml,
every section) translated, everything not carried listed, and the result trained by `recap train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from recap_app.config import IdTransform, load_config
from recap_app.import_config import ImportConfigError, translate

pytestmark = pytest.mark.timeout(300)
ORIGINAL = Path(__file__).with_name("data") / "the_algorithm_ml_recap.yaml"
RECAP = str(Path(sys.executable).parent / "recap")
FAV, REP, RT = (f"recap.engagement.{t}" for t in ("is_favorited", "is_replied", "is_retweeted"))


def original() -> dict:
    return yaml.safe_load(ORIGINAL.read_text())


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[str, str]:
    out = str(tmp_path_factory.mktemp("imported") / "recap.yaml")
    run = subprocess.run(
        [RECAP, "import-config", str(ORIGINAL), "--output", out], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout


def test_model_is_carried_over(imported):
    m = load_config(imported[0]).model
    f = m.featurization
    assert (f.batch_norm.affine, f.batch_norm.momentum, f.clip_magnitude) == (True, 0.01, 4.0)
    assert (f.layer_norm.epsilon, f.layer_norm.elementwise_affine) == (0.0, True)
    assert m.multi_task_type == "share_all"
    blocks = m.backbone.mask_net.mask_blocks
    assert [(b.output_size, b.aggregation_size, b.reduction_factor, b.input_layer_norm) for b in blocks] == [
        (16, 16, None, False),
        (8, None, 0.5, True),
    ]
    assert m.backbone.mask_net.use_parallel and m.backbone.mask_net.mlp.layer_sizes == [24]
    assert m.backbone.mask_net.mlp.final_layer_activation
    assert list(m.tasks) == [FAV, REP, RT]
    fav, rep, rt = m.tasks[FAV], m.tasks[REP], m.tasks[RT]
    assert (fav.affine_map.scale, fav.affine_map.bias) == (2.0, -0.5) and rep.affine_map is None
    assert (fav.pos_downsampling_rate, fav.neg_downsampling_rate) == (0.8, 0.05)  # from train_data.tasks
    assert (rt.pos_downsampling_rate, rt.neg_downsampling_rate) == (1.0, 0.1)
    assert rep.pos_weight == 2.0 and rep.mlp.dropout.rate == 0.1 and rep.mlp.batch_norm.momentum == 0.1
    assert rt.mask_net is not None and not rt.mask_net.use_parallel
    assert [(t.name, t.num_embeddings, t.feature_names, t.id_transform) for t in m.embeddings.tables] == [
        ("user_id", 500, ["user_id"], IdTransform.HASH),
        ("author_id", 300, ["author_id"], IdTransform.HASH),
    ]
    assert {k: v.dim for k, v in m.dense_embeddings.items()} == {
        "user_embedding": 200,
        "user_eng_embedding": 200,
        "author_embedding": 200,
    }  # in the original's concatenation order


def test_data_optimizer_and_training_are_carried_over(imported):
    c = load_config(imported[0])
    assert (c.data.num_continuous, c.data.num_binary, c.data.global_batch_size) == (24, 6, 64)
    o = c.optimizer
    assert (o.adam.beta_1, o.adam.beta_2, o.adam.epsilon) == (0.95, 0.999, 1e-7)
    ramp = o.backbone_learning_rate.linear_ramp_to_constant
    assert (ramp.learning_rate, ramp.num_ramp_steps) == (0.001, 4)
    assert o.tower_learning_rates[FAV].constant == 0.002
    assert o.tower_learning_rates[REP].piecewise_constant.learning_rate_values == [0.003, 0.001]
    assert o.tower_learning_rates[RT].linear_ramp_to_cosine.final_num_steps == 9
    assert (o.sparse.type, o.sparse.learning_rate) == ("sgd", 0.05)
    assert (c.training.num_train_steps, c.training.log_every_n) == (10, 5)
    assert (c.checkpoint.every_n, c.checkpoint.keep_latest_k, c.eval.every_n, c.eval.num_batches) == (
        5,
        2,
        5,
        3,
    )
    assert c.embedding_log.tables == ["user_id"]


def test_everything_not_carried_is_listed_with_its_path(imported):
    path, stdout = imported
    header = [line for line in Path(path).read_text().splitlines() if line.startswith("#")]
    for listed in (
        "model.position_debias_config",
        "model.stratifiers",
        "model.large_embeddings.optimizer.learning_rate",
        "model.large_embeddings.tables.1.vocab: '/data/author_vocab'",
        "train_data.dataset_service_compression: 'AUTO'",
        "train_data.preprocess.downcast.features.continuous: 'bfloat16'",
        "train_data.tasks[recap.engagement.is_bookmarked]",
        "train_data.inputs",
        "train_data.seg_dense_schema",
        "validation_data.validation",
        "validation_data[recap.engagement.is_favorited]",
        "'pos_downsampling_rate': 0.8387, 'neg_downsampling_rate': 0.01",
        "training.eval_log_every_n: 5",
        "training.eval_timeout_in_s: 600",
    ):
        assert listed in stdout, listed
        assert any(listed in line for line in header), listed
    assert "not carried over (13)" in stdout


def test_an_unknown_field_is_listed_never_dropped():
    data = original()
    data["model"]["tasks"][FAV]["loss_weight"] = 3.0
    data["training"]["some_future_option"] = {"a": 1}
    _, not_carried, _ = translate(data)
    assert f"model.tasks[{FAV}].loss_weight: 3.0: no recap equivalent" in not_carried
    assert "training.some_future_option.a: 1: no recap equivalent" in not_carried


def test_what_recap_cannot_build_is_an_error():
    data = original()
    data["model"]["backbone"] = {"dcn_config": {"poly_degree": 2}}
    with pytest.raises(
        ImportConfigError, match=r"model.backbone.dcn_config: recap builds MLP and MaskNet only"
    ):
        translate(data)
    with pytest.raises(ImportConfigError, match="not a the-algorithm-ml recap config"):
        translate({"training": {}})


def test_the_imported_config_trains_ten_steps(imported, tmp_path):
    out = tmp_path / "run"
    cmd = [RECAP, "train", "--config", imported[0], "--output", str(out), "--", "eval.num_batches=2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=os.environ)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert (out / "checkpoints/step-10/.metadata").exists()
    assert (out / "embeddings/step-10/user_id.npy").exists()
