"""RCE and (weighted) AUROC against references written from the original's formulas
(the-algorithm-ml metrics/rce.py, metrics/auroc.py), including saturated predictions and ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recap_app.metrics import relative_cross_entropy, task_metrics, weighted_auroc

pytestmark = pytest.mark.timeout(60)
EPS = 1e-7


def reference_rce(p: list[float], y: list[float], w: list[float]) -> float:
    """Straight from _binary_cross_entropy_with_clipping and RCE.compute, one example at a time."""

    def bce(pred: float, target: float) -> float:
        pred = min(max(pred, EPS), 1.0 - EPS)
        return -target * math.log(pred + EPS) - (1.0 - target) * math.log(1.0 - pred + EPS)

    total = sum(w)
    mean_label = sum(wi * yi for wi, yi in zip(w, y, strict=True)) / total
    model = sum(wi * bce(pi, yi) for pi, yi, wi in zip(p, y, w, strict=True)) / total
    baseline = bce(mean_label, mean_label)
    return (1.0 - model / baseline) * 100.0 if baseline else -math.inf


def sample(n: int, seed: int, saturated: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels at a 10 % rate, predictions that know something, weights in [0.2, 3]; a `saturated` share of
    predictions at exactly 0 or 1 (right and wrong alike)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(np.float64)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 2.0 * y - 2.5)))
    k = int(n * saturated)
    idx = rng.choice(n, k, replace=False)
    p[idx] = rng.integers(0, 2, k).astype(np.float64)
    w = rng.uniform(0.2, 3.0, n)
    return p.astype(np.float32).astype(np.float64), y, w


def rce(p, y, w) -> float:
    return relative_cross_entropy(torch.tensor(p), torch.tensor(y), torch.tensor(w))


@pytest.mark.parametrize("saturated", [0.0, 0.001, 0.01])
def test_rce_equals_the_original_formula(saturated):
    p, y, w = sample(20_000, seed=1, saturated=saturated)
    expected = reference_rce(p.tolist(), y.tolist(), w.tolist())
    assert rce(p, y, w) == pytest.approx(expected, abs=1e-6)
    # float32 probabilities, as the model outputs them, give the same value
    assert relative_cross_entropy(
        torch.tensor(p, dtype=torch.float32), torch.tensor(y), torch.tensor(w)
    ) == pytest.approx(expected, abs=1e-6)


def test_saturated_predictions_hand_value():
    # one confident miss (p = 1, y = 0) and three exact hits: the + eps bounds its CE at -log(2e-7)
    p, y, w = [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]
    miss = -math.log(1.0 - (1.0 - EPS) + EPS)  # = -log(2e-7) = 15.42
    hit = -math.log(1.0 - EPS + EPS)  # = 0 for y = 1 at p = 1 - eps
    hit0 = -math.log(1.0 - EPS + EPS)  # y = 0 at p = eps
    model = (miss + hit + 2 * hit0) / 4
    baseline = -(0.25 * math.log(0.25 + EPS) + 0.75 * math.log(0.75 + EPS))
    assert miss == pytest.approx(15.424948, abs=1e-6)
    assert rce(p, y, w) == pytest.approx(100 * (1 - model / baseline), abs=1e-9)


def test_no_positive_is_minus_inf_and_no_negative_too():
    p = np.array([0.1, 0.2, 0.3])
    assert rce(p, np.zeros(3), np.ones(3)) == -math.inf
    assert rce(p, np.ones(3), np.ones(3)) == -math.inf
    assert reference_rce(p.tolist(), [0.0] * 3, [1.0] * 3) == -math.inf


def test_a_constant_rate_predictor_scores_zero_and_weights_count():
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0], dtype=np.float64)
    w = np.array([1, 1, 1, 1, 3, 1, 1, 1], dtype=np.float64)
    rate = (y * w).sum() / w.sum()
    assert rce(np.full(8, rate), y, w) == pytest.approx(0.0, abs=1e-9)
    assert rce(np.full(8, 0.25), y, w) < -1.0  # the unweighted rate is worse under these weights


def brute_force_auroc(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Every positive-negative pair, weighted by the product of weights, ties half."""
    pos, neg = y > 0.5, y <= 0.5
    sp, sn = p[pos][:, None], p[neg][None, :]
    pair_w = w[pos][:, None] * w[neg][None, :]
    wins = (sp > sn) + 0.5 * (sp == sn)
    return float((pair_w * wins).sum() / pair_w.sum())


def test_weighted_auroc_equals_pairwise_definition_with_ties():
    p, y, w = sample(3000, seed=2)
    p = np.round(p, 2)  # many ties
    w = np.where(y > 0.5, w * (1 + 4 * (1 - p)), w)  # weight on the positives scored low
    got = weighted_auroc(torch.tensor(p), torch.tensor(y), torch.tensor(w))
    assert got == pytest.approx(brute_force_auroc(p, y, w), abs=1e-6)
    unweighted = brute_force_auroc(p, y, np.ones_like(w))
    assert abs(got - unweighted) > 1e-3  # the weights matter here
    ones = weighted_auroc(torch.tensor(p), torch.tensor(y), torch.ones(len(p), dtype=torch.float64))
    assert ones == pytest.approx(unweighted, abs=1e-6)


def test_weighted_auroc_hand_value():
    # positives 0.8 (w 2), 0.4 (w 1); negatives 0.4 (w 1), 0.1 (w 3)
    p, y, w = [0.8, 0.4, 0.4, 0.1], [1.0, 1.0, 0.0, 0.0], [2.0, 1.0, 1.0, 3.0]
    # pairs: (0.8,0.4) 2, (0.8,0.1) 6, (0.4,0.4) tie 1 * 0.5, (0.4,0.1) 3 -> 11.5 / (3 * 4)
    assert weighted_auroc(torch.tensor(p), torch.tensor(y), torch.tensor(w)) == pytest.approx(11.5 / 12)


def test_task_metrics_weighted_flag():
    p, y, w = sample(2000, seed=3)
    probs, labels, weights = (torch.tensor(np.stack([a, a[::-1]], 1)) for a in (p, y, w))
    plain = task_metrics(probs, labels, weights, ["a", "b"])
    weighted = task_metrics(probs, labels, weights, ["a", "b"], weighted=True)
    assert plain["auroc/a"] == pytest.approx(brute_force_auroc(p, y, np.ones_like(w)), abs=1e-6)
    assert weighted["auroc/a"] == pytest.approx(brute_force_auroc(p, y, w), abs=1e-6)
    assert weighted["auroc/b"] == pytest.approx(brute_force_auroc(p[::-1], y[::-1], w[::-1]), abs=1e-6)
    assert (
        plain["rce/a"]
        == weighted["rce/a"]
        == pytest.approx(reference_rce(p.tolist(), y.tolist(), w.tolist()))
    )
    one_class = task_metrics(probs[:5], torch.zeros(5, 2), weights[:5], ["a", "b"], weighted=True)
    assert math.isnan(one_class["auroc/a"]) and one_class["rce/a"] == -math.inf
