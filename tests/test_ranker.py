"""Numerics of the heavy ranker's pieces against hand-written formulas and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from recap_testlib import NUM_BINARY, NUM_CONTINUOUS, TABLES, TASKS, make_examples, tiny_model_config
from torchrec.sparse.jagged_tensor import KeyedTensor

from recap_app.config import (
    BatchNormConfig,
    DoubleNormLogConfig,
    DropoutConfig,
    LayerNormConfig,
    MaskBlockConfig,
    MaskNetConfig,
    MlpConfig,
    load_config,
)
from recap_app.ranker import (
    DoubleNormLog,
    MaskBlock,
    MaskNet,
    Mlp,
    NumericCalibration,
    RecapRanker,
    log1p_abs,
    sanitize,
)

pytestmark = pytest.mark.timeout(60)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values for every parameter (zero biases / unit norms would hide wiring mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def layer_norm(x: torch.Tensor, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight + bias
    return y


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


# ------------------------------------------------------------------------------------- featurization
def test_log1p_abs_hand_values():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0, math.e - 1])
    expected = torch.tensor([-1.3862944, -0.4054651, 0.0, 0.4054651, 1.3862944, 1.0])
    torch.testing.assert_close(log1p_abs(x), expected)


def test_double_norm_log_without_norms_hand_values():
    """Non-finite -> 0, log1p-abs, clamp at clip_magnitude; binary appended untouched."""
    config = DoubleNormLogConfig(batch_norm=None, layer_norm=None, clip_magnitude=2.0)
    module = DoubleNormLog(4, 2, config)
    continuous = torch.tensor(
        [
            [float("nan"), 100.0, -0.5, float("inf")],
            [float("-inf"), -100.0, 0.5, 1.0],
        ]
    )
    binary = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = module(continuous, binary)
    expected = torch.tensor(
        [
            [0.0, 2.0, -0.4054651, 0.0, 1.0, 0.0],  # log1p(100) = 4.6 clamps to 2
            [0.0, -2.0, 0.4054651, 0.6931472, 0.0, 1.0],
        ]
    )
    torch.testing.assert_close(out, expected)


def test_double_norm_log_eval_mode_matches_manual_with_known_running_stats():
    config = DoubleNormLogConfig(
        batch_norm=BatchNormConfig(affine=True, momentum=0.01),
        clip_magnitude=1.5,
        layer_norm=LayerNormConfig(epsilon=1e-3, elementwise_affine=True),
    )
    module = DoubleNormLog(3, 2, config)
    assert module.batch_norm.momentum == 0.01 and module.batch_norm.affine
    assert module.layer_norm.eps == 1e-3
    running_mean = torch.tensor([0.5, -1.0, 2.0])
    running_var = torch.tensor([4.0, 0.25, 1.0])
    bn_w, bn_b = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.1, -0.2, 0.3])
    ln_w, ln_b = torch.tensor([1.0, 2.0, 0.5, -1.0, 3.0]), torch.tensor([0.0, 0.1, -0.1, 0.2, 0.0])
    with torch.no_grad():
        module.batch_norm.running_mean.copy_(running_mean)
        module.batch_norm.running_var.copy_(running_var)
        module.batch_norm.weight.copy_(bn_w)
        module.batch_norm.bias.copy_(bn_b)
        module.layer_norm.weight.copy_(ln_w)
        module.layer_norm.bias.copy_(ln_b)
    module.eval()
    continuous = torch.tensor([[float("nan"), 3.0, 50.0], [-7.0, float("inf"), 0.2], [1.0, -2.0, 3.0]])
    binary = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    x = torch.where(torch.isfinite(continuous), continuous, torch.zeros(()))
    x = torch.sign(x) * torch.log(1 + x.abs())
    x = (x - running_mean) / torch.sqrt(running_var + 1e-5) * bn_w + bn_b
    x = x.clamp(-1.5, 1.5)
    expected = layer_norm(torch.cat([x, binary], dim=1), ln_w, ln_b, eps=1e-3)

    out = module(continuous, binary)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)
    # The clamp did bite on this input, at both ends (else the clip_magnitude check proves nothing).
    assert (x == 1.5).any() and (x == -1.5).any()


def test_double_norm_log_train_mode_uses_batch_statistics():
    config = DoubleNormLogConfig(layer_norm=None, clip_magnitude=100.0)
    module = DoubleNormLog(2, 0, config).train()
    continuous = torch.tensor([[1.0, -3.0], [3.0, 0.0], [-2.0, 8.0], [0.0, 1.0]])
    x = log1p_abs(continuous)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)  # BN init: w=1, b=0
    torch.testing.assert_close(module(continuous, torch.zeros(4, 0)), expected)
    assert module.clip_magnitude.item() == 100.0
    assert "clip_magnitude" in module.state_dict()


# ------------------------------------------------------------------------------------------------- Mlp
def test_mlp_layer_structure_with_everything():
    config = MlpConfig(
        layer_sizes=[16, 8, 4],
        batch_norm=BatchNormConfig(affine=False, momentum=0.2),
        dropout=DropoutConfig(rate=0.3),
        final_layer_activation=True,
    )
    mlp = Mlp(10, config)
    kinds = [type(m).__name__ for m in mlp.layers]
    assert kinds == [
        "Linear", "BatchNorm1d", "ReLU", "Dropout",
        "Linear", "BatchNorm1d", "ReLU", "Dropout",
        "Linear", "ReLU",
    ]  # fmt: skip
    linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 16), (16, 8), (8, 4)]
    for bn, width in zip(
        [m for m in mlp.layers if isinstance(m, torch.nn.BatchNorm1d)], [16, 8], strict=True
    ):
        assert bn.num_features == width and not bn.affine and bn.momentum == 0.2
    assert all(m.p == 0.3 for m in mlp.layers if isinstance(m, torch.nn.Dropout))
    assert mlp.out_features == 4
    for m in linears:  # xavier-uniform weights, zero biases
        bound = math.sqrt(6.0 / (m.in_features + m.out_features))
        assert m.weight.abs().max() <= bound and m.weight.std() > 0
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    mlp.eval()
    assert mlp(torch.randn(5, 10)).shape == (5, 4)
    assert (mlp(torch.randn(5, 10)) >= 0).all()  # final ReLU


def test_mlp_plain_structure_and_forward():
    mlp = randomize_(Mlp(6, MlpConfig(layer_sizes=[5, 3])))
    assert [type(m).__name__ for m in mlp.layers] == ["Linear", "ReLU", "Linear"]
    x = torch.randn(4, 6)
    expected = linear(torch.relu(linear(x, mlp.layers[0])), mlp.layers[2])
    torch.testing.assert_close(mlp(x), expected)
    assert (mlp(x) < 0).any()  # no final activation


def test_mlp_single_layer():
    mlp = Mlp(6, MlpConfig(layer_sizes=[1], final_layer_activation=False))
    assert [type(m).__name__ for m in mlp.layers] == ["Linear"]
    assert mlp.out_features == 1


# -------------------------------------------------------------------------------------------- MaskNet
def mask_block_manual(block: MaskBlock, net: torch.Tensor, mask_input: torch.Tensor) -> torch.Tensor:
    """LayerNorm(W_h (net * (W2 relu(W1 m + b1) + b2)) + b_h)."""
    if block.input_layer_norm is not None:
        ln = block.input_layer_norm
        net = layer_norm(net, ln.weight, ln.bias, ln.eps)
    w1, w2 = block.mask_layer[0], block.mask_layer[2]
    mask = linear(torch.relu(linear(mask_input, w1)), w2)
    hidden = linear(net * mask, block.hidden_layer)
    ln = block.layer_norm
    return layer_norm(hidden, ln.weight, ln.bias, ln.eps)


@pytest.mark.parametrize("input_layer_norm", [False, True])
def test_mask_block_matches_formula(input_layer_norm):
    config = MaskBlockConfig(output_size=5, aggregation_size=7, input_layer_norm=input_layer_norm)
    block = randomize_(MaskBlock(config, input_dim=6, mask_input_dim=4))
    assert block.mask_layer[0].in_features == 4 and block.mask_layer[0].out_features == 7
    assert block.mask_layer[2].out_features == 6 and block.hidden_layer.in_features == 6
    assert (block.input_layer_norm is not None) == input_layer_norm
    net, mask_input = torch.randn(3, 6), torch.randn(3, 4)
    torch.testing.assert_close(block(net, mask_input), mask_block_manual(block, net, mask_input))


def test_mask_block_reduction_factor_sizes_hidden_layer():
    block = MaskBlock(MaskBlockConfig(output_size=5, reduction_factor=1.5), input_dim=6, mask_input_dim=4)
    assert block.mask_layer[0].out_features == 6  # int(4 * 1.5)
    fresh = MaskBlock(MaskBlockConfig(output_size=5, aggregation_size=3), 6, 4)
    for layer in (fresh.mask_layer[0], fresh.mask_layer[2], fresh.hidden_layer):
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_mask_net_parallel_concatenates_block_outputs():
    config = MaskNetConfig(
        use_parallel=True,
        mask_blocks=[
            MaskBlockConfig(output_size=3, aggregation_size=4),
            MaskBlockConfig(output_size=5, aggregation_size=2),
        ],
    )
    net = randomize_(MaskNet(6, config))
    assert net.out_features == 8 and net.mlp is None
    assert [(b.hidden_layer.in_features, b.mask_layer[0].in_features) for b in net.mask_blocks] == [
        (6, 6),
        (6, 6),
    ]
    x = torch.randn(4, 6)
    expected = torch.cat([mask_block_manual(b, x, x) for b in net.mask_blocks], dim=1)
    torch.testing.assert_close(net(x), expected)


def test_mask_net_parallel_with_mlp():
    config = MaskNetConfig(
        use_parallel=True,
        mask_blocks=[MaskBlockConfig(output_size=3, aggregation_size=4)] * 2,
        mlp=MlpConfig(layer_sizes=[7, 2]),
    )
    net = randomize_(MaskNet(5, config))
    assert net.out_features == 2 and net.mlp.layers[0].in_features == 6
    x = torch.randn(4, 5)
    shared = torch.cat([mask_block_manual(b, x, x) for b in net.mask_blocks], dim=1)
    torch.testing.assert_close(net(x), net.mlp(shared))


def test_mask_net_stacked_feeds_outputs_forward():
    config = MaskNetConfig(
        use_parallel=False,
        mask_blocks=[
            MaskBlockConfig(output_size=3, aggregation_size=4),
            MaskBlockConfig(output_size=5, aggregation_size=2),
        ],
        mlp=MlpConfig(layer_sizes=[2]),
    )
    net = randomize_(MaskNet(6, config))
    b1, b2 = net.mask_blocks
    # Each block's net input is the previous output; the mask input is always the MaskNet input.
    assert (b1.hidden_layer.in_features, b1.mask_layer[0].in_features) == (6, 6)
    assert (b2.hidden_layer.in_features, b2.mask_layer[0].in_features) == (3, 6)
    assert net.mlp.layers[0].in_features == 5 and net.out_features == 2
    x = torch.randn(4, 6)
    expected = net.mlp(mask_block_manual(b2, mask_block_manual(b1, x, x), x))
    torch.testing.assert_close(net(x), expected)


# -------------------------------------------------------------------------------------- calibration
def test_numeric_calibration_formula_and_hand_values():
    calibration = NumericCalibration(pos_downsampling_rate=0.5, neg_downsampling_rate=0.1)
    assert calibration.ratio.item() == pytest.approx(0.2)
    p = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    r = 0.2
    torch.testing.assert_close(calibration(p), p * r / (1 - p + p * r))
    torch.testing.assert_close(calibration(torch.tensor([0.5])), torch.tensor([1 / 6]))
    assert "ratio" in calibration.state_dict()


def test_numeric_calibration_identity_when_rates_equal():
    p = torch.rand(10)
    torch.testing.assert_close(NumericCalibration(0.3, 0.3)(p), p)
    torch.testing.assert_close(NumericCalibration(1.0, 1.0)(p), p)


# ------------------------------------------------------------------------------------------- ranker
def build(config=None, **kw) -> RecapRanker:
    torch.manual_seed(0)
    return RecapRanker(config or tiny_model_config(**kw), NUM_CONTINUOUS, NUM_BINARY)


EMBEDDING_DIMS = 8 * 3  # t0 pools f_user, t1 pools f_author and f_tweet, dim 8 each
INPUT_DIMS = NUM_CONTINUOUS + NUM_BINARY + EMBEDDING_DIMS


def first_linear(module: torch.nn.Module) -> torch.nn.Linear:
    return next(m for m in module.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize(
    "multi_task_type, tower_in",
    [("share_all", 12), ("share_partial", INPUT_DIMS + 12), ("share_none", INPUT_DIMS)],
)
def test_multi_task_types_input_sizes_and_shapes(multi_task_type, tower_in):
    ranker = build(multi_task_type=multi_task_type)
    assert ranker.input_dims == INPUT_DIMS
    if multi_task_type == "share_none":
        assert ranker.backbone is None
    else:
        assert first_linear(ranker.backbone).in_features == INPUT_DIMS
        assert ranker.backbone.out_features == 12
    assert sorted(ranker.towers) == sorted(sanitize(t) for t in TASKS)
    for tower in ranker.towers.values():
        assert first_linear(tower).in_features == tower_in
    out = ranker.train()(make_examples(8).batch())
    assert set(out) == {"logits", "probabilities", "calibrated_probabilities"}
    for value in out.values():
        assert value.shape == (8, len(TASKS))
        assert torch.isfinite(value).all()


def capture_features(ranker: RecapRanker, batch) -> torch.Tensor:
    """The concatenated dense+sparse feature vector the ranker builds (input of backbone/towers)."""
    seen = {}
    target = ranker.backbone if ranker.backbone is not None else next(iter(ranker.towers.values()))
    handle = target.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        ranker(batch)
    finally:
        handle.remove()
    return seen["x"]


def test_features_are_preprocessed_dense_then_pooled_embeddings_in_config_order():
    ranker = build().eval()
    examples = make_examples(8)
    batch = examples.batch()
    weights = {t: ranker.embedding_bag_collection.embedding_bags[t].weight for t in ("t0", "t1")}
    table_of = {f: t["name"] for t in TABLES for f in t["feature_names"]}
    pooled = [
        torch.stack([weights[table_of[f]][ids].sum(0) for ids in examples.ids[f]])  # sum pooling by hand
        for f in ("f_user", "f_author", "f_tweet")
    ]
    expected = torch.cat([ranker.preprocessor(batch.continuous_features, batch.binary_features), *pooled], 1)
    torch.testing.assert_close(capture_features(ranker, batch), expected)


def test_share_partial_and_none_wiring():
    for multi_task_type in ("share_partial", "share_none"):
        ranker = build(multi_task_type=multi_task_type).eval()
        batch = make_examples(8).batch()
        x = capture_features(ranker, batch)
        net = torch.cat([x, ranker.backbone(x)], 1) if multi_task_type == "share_partial" else x
        logits = torch.cat([ranker.towers[sanitize(t)](net) for t in TASKS], 1)
        torch.testing.assert_close(ranker(batch)["logits"], logits)


def test_permuted_kjt_key_order_gives_same_output():
    ranker = build().eval()
    examples = make_examples(8)
    reference = ranker(examples.batch())
    for order in (["f_tweet", "f_user", "f_author"], ["f_author", "f_tweet", "f_user"]):
        out = ranker(examples.batch(key_order=order))
        for key in reference:
            torch.testing.assert_close(out[key], reference[key])


class ReorderedEbc(torch.nn.Module):
    """Wraps an EBC and returns its KeyedTensor with keys reversed, as a sharded EBC may."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, features):
        kt = self.ebc(features)
        keys = list(reversed(kt.keys()))
        return KeyedTensor.from_tensor_list(keys, [kt[k] for k in keys])


def test_pooled_embeddings_selected_by_key_not_position():
    ranker = build().eval()
    batch = make_examples(8).batch()
    reference = ranker(batch)["logits"]
    ranker.embedding_bag_collection = ReorderedEbc(ranker.embedding_bag_collection)
    torch.testing.assert_close(ranker(batch)["logits"], reference)


def test_affine_map_scales_and_shifts_logits():
    plain = tiny_model_config(tasks={t: {"mlp": {"layer_sizes": [8, 1]}} for t in TASKS})
    mapped = tiny_model_config(
        tasks={
            TASKS[0]: {"mlp": {"layer_sizes": [8, 1]}, "affine_map": {"scale": 2.5, "bias": -0.75}},
            TASKS[1]: {"mlp": {"layer_sizes": [8, 1]}},
        }
    )
    a, b = build(plain).eval(), build(mapped).eval()
    a.load_state_dict({k: v for k, v in b.state_dict().items() if not k.startswith("affine_maps")})
    batch = make_examples(8).batch()
    raw, out = a(batch), b(batch)
    assert isinstance(b.affine_maps[sanitize(TASKS[1])], torch.nn.Identity)
    torch.testing.assert_close(out["logits"][:, 0], 2.5 * raw["logits"][:, 0] - 0.75)
    torch.testing.assert_close(out["logits"][:, 1], raw["logits"][:, 1])
    torch.testing.assert_close(out["probabilities"], torch.sigmoid(out["logits"]))


def test_calibrated_probabilities_per_task():
    config = tiny_model_config()
    config.tasks[TASKS[0]].pos_downsampling_rate = 0.5
    config.tasks[TASKS[0]].neg_downsampling_rate = 0.05
    out = build(config).eval()(make_examples(8).batch())
    p, r = out["probabilities"][:, 0], 0.1
    torch.testing.assert_close(out["calibrated_probabilities"][:, 0], p * r / (1 - p + p * r))
    torch.testing.assert_close(out["calibrated_probabilities"][:, 1], out["probabilities"][:, 1])
    assert (out["calibrated_probabilities"][:, 0] < p).all()


def test_ranker_without_embeddings():
    ranker = build(tiny_model_config(tables=[]))
    assert ranker.embedding_bag_collection is None
    assert ranker.input_dims == NUM_CONTINUOUS + NUM_BINARY
    out = ranker(make_examples(8, tables=[]).batch())
    assert out["logits"].shape == (8, len(TASKS))


def test_tower_must_end_in_one_unit():
    config = tiny_model_config()
    config.tasks[TASKS[1]].mlp.layer_sizes = [8, 2]
    with pytest.raises(ValueError, match="1 unit"):
        build(config)


# ---------------------------------------------------------------------------------- packaged configs
def dense_parameter_count(ranker: RecapRanker) -> int:
    return sum(
        p.numel() for n, p in ranker.named_parameters() if not n.startswith("embedding_bag_collection")
    )


def test_local_config_builds_and_runs():
    config = load_config("local")
    data = config.data
    torch.manual_seed(0)
    ranker = RecapRanker(config.model, data.num_continuous, data.num_binary)
    assert ranker.input_dims == 32 + 8 + 16 + 16
    tables = [
        t.model_dump(include={"name", "num_embeddings", "feature_names"})
        for t in config.model.embeddings.tables
    ]
    examples = make_examples(
        8, tables, len(config.task_names), num_continuous=data.num_continuous, num_binary=data.num_binary
    )
    out = ranker.train()(examples.batch())
    assert out["logits"].shape == (8, len(config.task_names))
    assert torch.isfinite(out["logits"]).all()


def test_production_config_builds_on_meta_tables_with_51m_dense_params():
    config = load_config("production")
    ranker = RecapRanker(
        config.model,
        config.data.num_continuous,
        config.data.num_binary,
        embedding_device=torch.device("meta"),
    )
    assert len(config.task_names) == 10
    assert ranker.input_dims == 2117 + 59 + 4 * 64 + 3 * 200  # + the three TwHIN inputs
    assert all(w.is_meta for w in ranker.embedding_bag_collection.parameters())
    assert all(not p.is_meta for n, p in ranker.named_parameters() if not n.startswith("embedding_bag"))
    # 4 mask blocks (3 * 3032 * 1024 weights each) + MLP 4096->2048 + 10 towers 2048-256-128-1 + norms;
    # without the TwHIN inputs (600 more inputs, 3 layer norms of 200) it was 43_885_460.
    count = dense_parameter_count(ranker)
    assert count == 43_885_460 + 4 * (3 * 600 * 1024 + 600) + 3 * 2 * 200
    assert 51e6 < count < 52e6
    assert ranker.backbone.out_features == 2048
