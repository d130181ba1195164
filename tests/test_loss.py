"""build_multi_task_loss against a hand computation of weighted, pos-weighted BCE-with-logits."""

from __future__ import annotations

import math

import pytest
import torch

from recap_app.loss import build_multi_task_loss

pytestmark = pytest.mark.timeout(60)

TASKS = ["a.is_liked", "b.is_replied"]
LOGITS = [[0.5, -1.0], [2.0, 0.0], [-0.3, 1.5]]
LABELS = [[1, 0], [0, 1], [1, 1]]
WEIGHTS = [[1.0, 2.0], [0.5, 1.0], [2.0, 0.0]]


def bce(x: float, y: float, w: float, pos_weight: float) -> float:
    """-w * (pos_weight * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x)))."""
    sig = 1.0 / (1.0 + math.exp(-x))
    return -w * (pos_weight * y * math.log(sig) + (1 - y) * math.log(1 - sig))


def hand_task_losses(pos_weights: list[float]) -> list[float]:
    out = []
    for t, pw in enumerate(pos_weights):
        terms = [bce(LOGITS[b][t], LABELS[b][t], WEIGHTS[b][t], pw) for b in range(len(LOGITS))]
        out.append(sum(terms) / len(terms))  # mean over the batch (weights do not renormalise)
    return out


def call(loss_fn, logits=LOGITS, labels=LABELS, weights=WEIGHTS):
    return loss_fn(torch.tensor(logits), torch.tensor(labels, dtype=torch.float32), torch.tensor(weights))


def test_single_hand_value():
    # logit 0, label 1, pos_weight 2: 2 * log(2).
    loss_fn = build_multi_task_loss(["t"], pos_weights=[2.0])
    losses = call(loss_fn, [[0.0]], [[1]], [[1.0]])
    assert losses["loss"].item() == pytest.approx(2 * math.log(2))
    assert losses["loss/t"].item() == pytest.approx(1.3862944)


def test_matches_hand_computation_with_pos_weight_and_example_weights():
    pos_weights = [2.0, 0.5]
    losses = call(build_multi_task_loss(TASKS, pos_weights))
    expected = hand_task_losses(pos_weights)
    assert set(losses) == {"loss", "loss/a.is_liked", "loss/b.is_replied"}
    assert losses["loss/a.is_liked"].item() == pytest.approx(expected[0], rel=1e-6)
    assert losses["loss/b.is_replied"].item() == pytest.approx(expected[1], rel=1e-6)
    # Mean over tasks.
    assert losses["loss"].item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert losses["loss"].shape == ()


def test_default_pos_weights_are_one():
    losses = call(build_multi_task_loss(TASKS))
    expected = hand_task_losses([1.0, 1.0])
    assert [losses[f"loss/{t}"].item() for t in TASKS] == pytest.approx(expected, rel=1e-6)


def test_pos_weight_and_weights_actually_matter():
    base = call(build_multi_task_loss(TASKS))["loss"]
    assert call(build_multi_task_loss(TASKS, [3.0, 3.0]))["loss"] > base
    unweighted = call(build_multi_task_loss(TASKS), weights=[[1.0, 1.0]] * 3)["loss"]
    assert unweighted.item() != pytest.approx(base.item())


def test_zero_weight_examples_contribute_nothing_but_count_in_mean():
    loss_fn = build_multi_task_loss(["t"])
    one = call(loss_fn, [[0.7]], [[1]], [[1.0]])["loss"]
    two = call(loss_fn, [[0.7], [5.0]], [[1], [0]], [[1.0], [0.0]])["loss"]
    assert two.item() == pytest.approx(one.item() / 2)


def test_mean_of_equal_halves_equals_full_batch():
    """Why the reduction is a mean: ranks' losses averaged like DDP give the global batch's loss."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 2, generator=g)
    labels = (torch.rand(8, 2, generator=g) > 0.5).float()
    weights = torch.rand(8, 2, generator=g)
    loss_fn = build_multi_task_loss(TASKS, [2.0, 1.0])
    full = loss_fn(logits, labels, weights)["loss"]
    halves = [loss_fn(logits[s], labels[s], weights[s])["loss"] for s in (slice(0, 4), slice(4, 8))]
    assert full.item() == pytest.approx(((halves[0] + halves[1]) / 2).item(), rel=1e-6)


def test_integer_labels_and_gradient():
    logits = torch.tensor(LOGITS, requires_grad=True)
    losses = build_multi_task_loss(TASKS)(logits, torch.tensor(LABELS), torch.tensor(WEIGHTS))
    losses["loss"].backward()
    # d/dx of the mean over tasks of the batch mean of w * BCE: w * (sigmoid(x) - y) / (B * T).
    expected = torch.tensor(WEIGHTS) * (torch.sigmoid(torch.tensor(LOGITS)) - torch.tensor(LABELS)) / 6
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize(
    "logits, labels, weights",
    [
        ([[0.0, 0.0]] * 3, [[1, 0, 1]] * 3, [[1.0, 1.0]] * 3),  # labels wider
        ([[0.0, 0.0]] * 3, [[1, 0]] * 3, [[1.0]] * 3),  # weights narrower
        ([[0.0, 0.0]] * 3, [[1, 0]] * 2, [[1.0, 1.0]] * 3),  # batch differs
    ],
)
def test_shape_mismatch_raises(logits, labels, weights):
    with pytest.raises(ValueError, match="same shape"):
        call(build_multi_task_loss(TASKS), logits, labels, weights)


def test_pos_weights_count_mismatch_raises():
    with pytest.raises(ValueError, match="3 pos_weights for 2 tasks"):
        build_multi_task_loss(TASKS, [1.0, 2.0, 3.0])
