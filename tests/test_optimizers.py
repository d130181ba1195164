"""Learning-rate schedules against hand-computed values and per-tower Adam parameter groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from recap_testlib import NUM_BINARY, NUM_CONTINUOUS, TASKS, make_examples, tiny_model_config

from recap_app.config import ConfigError, LearningRateConfig, OptimizerConfig, load_config
from recap_app.optimizers import (
    BACKBONE_GROUP,
    build_dense_optimizer,
    dense_param_groups,
    learning_rate,
    set_learning_rates,
    tower_group,
)
from recap_app.ranker import RecapRanker, sanitize

pytestmark = pytest.mark.timeout(120)


def lr(step: int, **schedule) -> float:
    return learning_rate(step, LearningRateConfig.model_validate(schedule))


# ------------------------------------------------------------------------------------------ schedules
def test_constant_and_bare_number():
    assert lr(0, constant=0.25) == 0.25
    assert lr(10**9, constant=0.25) == 0.25
    assert learning_rate(7, LearningRateConfig.model_validate(0.5)) == 0.5


def test_piecewise_constant_boundaries_belong_to_the_next_value():
    pc = {"learning_rate_boundaries": [10, 20], "learning_rate_values": [1.0, 0.5, 0.1]}
    got = [lr(s, piecewise_constant=pc) for s in (0, 9, 10, 19, 20, 1000)]
    assert got == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]


def test_linear_ramp_to_constant_starts_at_zero():
    ramp = {"learning_rate": 1e-4, "num_ramp_steps": 1000}
    got = [lr(s, linear_ramp_to_constant=ramp) for s in (0, 1, 250, 999, 1000, 5000)]
    assert got == pytest.approx([0.0, 1e-7, 2.5e-5, 9.99e-5, 1e-4, 1e-4], rel=1e-12, abs=0)


def test_linear_ramp_to_cosine_hand_values():
    cos = {"learning_rate": 1.0, "final_learning_rate": 0.1, "num_ramp_steps": 10, "final_num_steps": 110}
    # ramp: step / 10; then 0.1 + 0.9 * (1 + cos(pi * (step - 10) / 100)) / 2; 0.1 after step 110
    assert lr(0, linear_ramp_to_cosine=cos) == 0.0
    assert lr(5, linear_ramp_to_cosine=cos) == pytest.approx(0.5)
    assert lr(10, linear_ramp_to_cosine=cos) == pytest.approx(1.0)
    assert lr(60, linear_ramp_to_cosine=cos) == pytest.approx(0.55)  # halfway: cos(pi/2) = 0
    assert lr(35, linear_ramp_to_cosine=cos) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr(110, linear_ramp_to_cosine=cos) == pytest.approx(0.1)
    assert lr(111, linear_ramp_to_cosine=cos) == 0.1


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.dense.warmup_steps=5", "replaced by the original's schedules"),
        ("optimizer.dense.learning_rate={}", "exactly one of"),
        (
            "optimizer.backbone_learning_rate={piecewise_constant: "
            "{learning_rate_boundaries: [5], learning_rate_values: [1]}}",
            "one more entry",
        ),
        (
            "optimizer.backbone_learning_rate={linear_ramp_to_cosine: {learning_rate: 1, "
            "final_learning_rate: 0, num_ramp_steps: 5, final_num_steps: 5}}",
            "greater than num_ramp_steps",
        ),
        ("optimizer.tower_learning_rates[no.such.task]=0.1", "no task(s) ['no.such.task']"),
    ],
)
def test_bad_schedules_are_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("local", [override])
    assert message in str(e.value)


# ------------------------------------------------------------------------------------ parameter groups
FAV, REP = TASKS  # recap.engagement.is_favorited, recap.engagement.is_replied


def ranker() -> RecapRanker:
    torch.manual_seed(0)
    config = tiny_model_config(tasks={t: {"mlp": {"layer_sizes": [8, 1]}, "affine_map": {}} for t in TASKS})
    return RecapRanker(config, NUM_CONTINUOUS, NUM_BINARY)


RAMP = {"linear_ramp_to_constant": {"learning_rate": 0.01, "num_ramp_steps": 4}}


def optimizer_config(**extra) -> OptimizerConfig:
    return OptimizerConfig.model_validate(
        {
            "dense": {
                "learning_rate": {"linear_ramp_to_constant": {"learning_rate": 0.01, "num_ramp_steps": 4}}
            }
        }
        | extra
    )


def test_groups_follow_the_original_tower_then_everything_else():
    model = ranker()
    params = dict(model.named_parameters())
    groups = dense_param_groups(params, [FAV])
    assert list(groups) == [tower_group(FAV), BACKBONE_GROUP]
    key = sanitize(FAV)
    assert sorted(groups[tower_group(FAV)]) == sorted(
        n for n in params if n.startswith((f"towers.{key}.", f"affine_maps.{key}."))
    )
    # the other tower, the backbone, featurization and the tables: the backbone group
    backbone = groups[BACKBONE_GROUP]
    assert any(n.startswith(f"towers.{sanitize(REP)}.") for n in backbone)
    assert any(n.startswith("preprocessor.") for n in backbone) and any(
        n.startswith("backbone.") for n in backbone
    )
    assert set(backbone) | set(groups[tower_group(FAV)]) == set(params)
    assert not set(backbone) & set(groups[tower_group(FAV)])


def test_each_group_receives_its_own_rate_every_step():
    model = ranker()
    cfg = optimizer_config(
        backbone_learning_rate={"constant": 0.002},
        tower_learning_rates={
            FAV: {
                "piecewise_constant": {"learning_rate_boundaries": [2], "learning_rate_values": [0.5, 0.25]}
            },
            REP: {"linear_ramp_to_constant": {"learning_rate": 0.08, "num_ramp_steps": 8}},
        },
    )
    opt = build_dense_optimizer(model, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert sorted(by_name) == sorted([BACKBONE_GROUP, tower_group(FAV), tower_group(REP)])
    for step, expected in [(0, (0.002, 0.5, 0.0)), (1, (0.002, 0.5, 0.01)), (4, (0.002, 0.25, 0.04))]:
        logged = set_learning_rates(opt, step, cfg)
        got = tuple(by_name[g]["lr"] for g in (BACKBONE_GROUP, tower_group(FAV), tower_group(REP)))
        assert got == pytest.approx(expected, rel=1e-12, abs=0)
        assert logged == 0.002  # the backbone's rate is the logged `lr`
    # without backbone_learning_rate the backbone follows dense.learning_rate
    assert (
        set_learning_rates(build_dense_optimizer(model, optimizer_config()), 2, optimizer_config()) == 0.005
    )


def train_steps(model: RecapRanker, opt, cfg: OptimizerConfig, steps: range) -> None:
    batch = make_examples(16, seed=1).batch()
    for step in steps:
        set_learning_rates(opt, step, cfg)
        opt.zero_grad()
        out = model(batch)
        torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], batch.labels).backward()
        opt.step()


def test_a_zero_rate_tower_stays_put_while_the_rest_trains():
    model = ranker()
    cfg = optimizer_config(tower_learning_rates={FAV: 0.0})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, build_dense_optimizer(model, cfg), cfg, range(3))
    for name, p in model.named_parameters():
        frozen = f".{sanitize(FAV)}." in f".{name}"
        assert torch.equal(p, before[name]) == frozen, name


def test_state_dict_round_trip_continues_bit_exactly():
    """The checkpointed state (KeyedOptimizer keys it by parameter name, groups are rebuilt from the
    config and the rates from the step) continues exactly like an uninterrupted run."""
    cfg = optimizer_config(
        tower_learning_rates={FAV: {"linear_ramp_to_constant": {"learning_rate": 0.05, "num_ramp_steps": 3}}}
    )
    a = ranker()
    opt_a = build_dense_optimizer(a, cfg)
    train_steps(a, opt_a, cfg, range(3))
    saved_model = {k: v.clone() for k, v in a.state_dict().items()}
    saved_opt = copy.deepcopy(opt_a.state_dict())  # its tensors are the live state
    train_steps(a, opt_a, cfg, range(3, 6))

    b = ranker()
    b.load_state_dict(saved_model)
    opt_b = build_dense_optimizer(b, cfg)
    opt_b.init_state()
    opt_b.load_state_dict(saved_opt)
    train_steps(b, opt_b, cfg, range(3, 6))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
