"""The Recap heavy ranker: a port of twitter/the-algorithm-ml projects/home/recap/model, plus sparse ids.

Behaviour follows the original (DoubleNormLog featurization, layer-normed TwHIN-style dense embedding
inputs, MaskNet, Mlp, share_all/partial/none, affine maps, numeric calibration). Added: sparse id
features pooled by a torchrec EmbeddingBagCollection whose outputs join the dense input, selected by key
(sharded outputs may reorder keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from recap_app.config import (
    ArchitectureConfig,
    DoubleNormLogConfig,
    EmbeddingsConfig,
    MaskBlockConfig,
    MaskNetConfig,
    MlpConfig,
    ModelConfig,
    MultiTaskType,
)

if TYPE_CHECKING:  # the dense model needs no torchrec: it runs (and exports) wherever torch does
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from recap_app.batch import RecapBatch


def _init_linear(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.xavier_uniform_(module.weight)
        torch.nn.init.constant_(module.bias, 0)


def log1p_abs(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log(1 + |x|): a log that is safe for negative, zero and positive values."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


class DoubleNormLog(torch.nn.Module):
    """Continuous: non-finite -> 0, log1p-abs, batch norm, clamp; then concat binary and layer-norm all."""

    def __init__(self, num_continuous: int, num_binary: int, config: DoubleNormLogConfig) -> None:
        super().__init__()
        bn = config.batch_norm
        self.batch_norm = (
            torch.nn.BatchNorm1d(num_continuous, affine=bn.affine, momentum=bn.momentum) if bn else None
        )
        self.register_buffer("clip_magnitude", torch.tensor(config.clip_magnitude), persistent=True)
        ln = config.layer_norm
        self.layer_norm = (
            torch.nn.LayerNorm(
                num_continuous + num_binary, eps=ln.epsilon, elementwise_affine=ln.elementwise_affine
            )
            if ln
            else None
        )

    def forward(self, continuous: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isfinite(continuous), continuous, torch.zeros_like(continuous))
        x = log1p_abs(x)
        if self.batch_norm is not None:
            x = self.batch_norm(x)
        x = torch.clamp(x, min=-self.clip_magnitude, max=self.clip_magnitude)
        x = torch.cat([x, binary], dim=1)
        return self.layer_norm(x) if self.layer_norm is not None else x


class Mlp(torch.nn.Module):
    """Linear (+ batch norm) + ReLU (+ dropout) per hidden layer; a last Linear, ReLU if configured."""

    def __init__(self, in_features: int, config: MlpConfig) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        size = in_features
        for width in config.layer_sizes[:-1]:
            layers.append(torch.nn.Linear(size, width))
            if config.batch_norm:
                layers.append(
                    torch.nn.BatchNorm1d(
                        width, affine=config.batch_norm.affine, momentum=config.batch_norm.momentum
                    )
                )
            layers.append(torch.nn.ReLU())
            if config.dropout:
                layers.append(torch.nn.Dropout(config.dropout.rate))
            size = width
        layers.append(torch.nn.Linear(size, config.layer_sizes[-1]))
        if config.final_layer_activation:
            layers.append(torch.nn.ReLU())
        self.layers = torch.nn.Sequential(*layers)
        self.layers.apply(_init_linear)
        self.out_features = config.layer_sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MaskBlock(torch.nn.Module):
    """LayerNorm(W_h (net * mask(mask_input))), with mask = Linear -> ReLU -> Linear (Wang et al. 2021)."""

    def __init__(self, config: MaskBlockConfig, input_dim: int, mask_input_dim: int) -> None:
        super().__init__()
        self.input_layer_norm = torch.nn.LayerNorm(input_dim) if config.input_layer_norm else None
        if config.reduction_factor is not None:
            aggregation_size = int(mask_input_dim * config.reduction_factor)
        else:
            aggregation_size = config.aggregation_size
        self.mask_layer = torch.nn.Sequential(
            torch.nn.Linear(mask_input_dim, aggregation_size),
            torch.nn.ReLU(),
            torch.nn.Linear(aggregation_size, input_dim),
        )
        self.hidden_layer = torch.nn.Linear(input_dim, config.output_size)
        self.layer_norm = torch.nn.LayerNorm(config.output_size)
        self.mask_layer.apply(_init_linear)
        self.hidden_layer.apply(_init_linear)

    def forward(self, net: torch.Tensor, mask_input: torch.Tensor) -> torch.Tensor:
        if self.input_layer_norm is not None:
            net = self.input_layer_norm(net)
        return self.layer_norm(self.hidden_layer(net * self.mask_layer(mask_input)))


class MaskNet(torch.nn.Module):
    """Parallel (outputs concatenated) or stacked mask blocks, optionally followed by an MLP."""

    def __init__(self, in_features: int, config: MaskNetConfig) -> None:
        super().__init__()
        self.use_parallel = config.use_parallel
        blocks = []
        if config.use_parallel:
            for block in config.mask_blocks:
                blocks.append(MaskBlock(block, in_features, in_features))
            shared = sum(b.output_size for b in config.mask_blocks)
        else:
            size = in_features
            for block in config.mask_blocks:
                blocks.append(MaskBlock(block, size, in_features))
                size = block.output_size
            shared = size
        self.mask_blocks = torch.nn.ModuleList(blocks)
        self.mlp = Mlp(shared, config.mlp) if config.mlp else None
        self.out_features = self.mlp.out_features if self.mlp else shared

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.use_parallel:
            net = torch.cat([block(inputs, inputs) for block in self.mask_blocks], dim=1)
        else:
            net = inputs
            for block in self.mask_blocks:
                net = block(net, inputs)
        return self.mlp(net) if self.mlp is not None else net


def build_architecture(config: ArchitectureConfig, in_features: int) -> Mlp | MaskNet:
    if config.mlp is not None:
        return Mlp(in_features, config.mlp)
    return MaskNet(in_features, config.mask_net)


class NumericCalibration(torch.nn.Module):
    """Undo pos/neg downsampling: p' = p r / (1 - p + p r), r = neg_rate / pos_rate."""

    def __init__(self, pos_downsampling_rate: float, neg_downsampling_rate: float) -> None:
        super().__init__()
        self.register_buffer(
            "ratio", torch.tensor(neg_downsampling_rate / pos_downsampling_rate), persistent=True
        )

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return probs * self.ratio / (1.0 - probs + self.ratio * probs)


def sanitize(task_name: str) -> str:
    """ModuleDict keys cannot contain '.', task names do."""
    return task_name.replace(".", "__")


def build_embedding_bag_collection(
    config: EmbeddingsConfig, device: torch.device | None = None
) -> EmbeddingBagCollection:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    tables = [
        EmbeddingBagConfig(
            name=t.name,
            num_embeddings=t.num_embeddings,
            embedding_dim=t.embedding_dim,
            feature_names=list(t.feature_names),
            pooling=pooling[t.pooling.value],
        )
        for t in config.tables
    ]
    return EmbeddingBagCollection(tables=tables, device=device)


class RecapRanker(torch.nn.Module):
    """Multi-task ranker: features -> [backbone] -> per-task towers -> affine map -> sigmoid -> calibration.

    `forward(batch)` returns logits / probabilities / calibrated_probabilities, each [B, num_tasks].
    """

    def __init__(
        self,
        config: ModelConfig,
        num_continuous: int,
        num_binary: int,
        embedding_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.multi_task_type = config.multi_task_type
        self.task_names = list(config.tasks)
        self.preprocessor = DoubleNormLog(num_continuous, num_binary, config.featurization)
        self.sparse_feature_names = config.embeddings.feature_names
        self.embedding_bag_collection = (
            build_embedding_bag_collection(config.embeddings, embedding_device)
            if config.embeddings.tables
            else None
        )
        # TwHIN-style pretrained vectors, each layer-normed as the original's entrypoint.py does.
        self.dense_embedding_names = list(config.dense_embeddings)
        self.dense_embedding_norms = torch.nn.ModuleDict(
            {
                name: torch.nn.LayerNorm(e.dim) if e.layer_norm else torch.nn.Identity()
                for name, e in config.dense_embeddings.items()
            }
        )
        input_dims = num_continuous + num_binary
        input_dims += sum(t.embedding_dim * len(t.feature_names) for t in config.embeddings.tables)
        input_dims += sum(e.dim for e in config.dense_embeddings.values())
        self.input_dims = input_dims

        self.backbone = (
            build_architecture(config.backbone, input_dims)
            if config.multi_task_type != MultiTaskType.SHARE_NONE
            else None
        )
        tower_inputs = {
            MultiTaskType.SHARE_NONE: input_dims,
            MultiTaskType.SHARE_ALL: self.backbone.out_features if self.backbone else 0,
            MultiTaskType.SHARE_PARTIAL: input_dims + (self.backbone.out_features if self.backbone else 0),
        }[config.multi_task_type]

        towers, affine_maps, calibrators = {}, {}, {}
        for name, task in config.tasks.items():
            key = sanitize(name)
            tower = build_architecture(task, tower_inputs)
            if tower.out_features != 1:
                raise ValueError(f"model.tasks[{name}]: tower must end in 1 unit, got {tower.out_features}")
            towers[key] = tower
            if task.affine_map is not None:
                affine = torch.nn.Linear(1, 1)
                with torch.no_grad():
                    affine.weight.fill_(task.affine_map.scale)
                    affine.bias.fill_(task.affine_map.bias)
                affine_maps[key] = affine
            else:
                affine_maps[key] = torch.nn.Identity()
            calibrators[key] = NumericCalibration(task.pos_downsampling_rate, task.neg_downsampling_rate)
        self.towers = torch.nn.ModuleDict(towers)
        self.affine_maps = torch.nn.ModuleDict(affine_maps)
        self.calibrators = torch.nn.ModuleDict(calibrators)

    def forward(self, batch: RecapBatch) -> dict[str, torch.Tensor]:
        features = [self.preprocessor(batch.continuous_features, batch.binary_features)]
        if self.embedding_bag_collection is not None:
            pooled = self.embedding_bag_collection(batch.sparse_features)
            # Select by key: a sharded EBC may return its keys in another order.
            features.extend(pooled[name] for name in self.sparse_feature_names)
        # Indexed, not searched: torchrec's train pipeline traces this with the batch as an fx proxy.
        features.extend(
            self.dense_embedding_norms[n](batch.dense_embeddings[n]) for n in self.dense_embedding_names
        )
        x = torch.cat(features, dim=1)

        if self.multi_task_type == MultiTaskType.SHARE_ALL:
            net = self.backbone(x)
        elif self.multi_task_type == MultiTaskType.SHARE_PARTIAL:
            net = torch.cat([x, self.backbone(x)], dim=1)
        else:
            net = x

        logits, probabilities, calibrated = [], [], []
        for name in self.task_names:
            key = sanitize(name)
            task_logits = self.affine_maps[key](self.towers[key](net))
            probs = torch.sigmoid(task_logits)
            logits.append(task_logits)
            probabilities.append(probs)
            calibrated.append(self.calibrators[key](probs))
        return {
            "logits": torch.cat(logits, dim=1),
            "probabilities": torch.cat(probabilities, dim=1),
            "calibrated_probabilities": torch.cat(calibrated, dim=1),
        }
