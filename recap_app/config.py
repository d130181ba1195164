"""The one config object threaded through the trainer: pydantic schema, YAML loading, dotted overrides.

Unknown keys are rejected with their full dotted path so a typo never silently falls back to a default.
"""

from __future__ import annotations

import enum
from importlib import resources
from typing import Any

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recap_app.errors import InputError
from recap_app.storage import has_secret_value, is_secret_key


class ConfigError(InputError, ValueError):
    """A config that cannot be used: not found, not YAML, a bad override or a failed validation."""

    every_rank = True


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


# ----------------------------------------------------------------------------------------------- model
class BatchNormConfig(StrictModel):
    affine: bool = True
    momentum: float = Field(0.1, gt=0, le=1)


class DropoutConfig(StrictModel):
    rate: float = Field(gt=0, lt=1)


class MlpConfig(StrictModel):
    layer_sizes: list[int] = Field(min_length=1)
    batch_norm: BatchNormConfig | None = None
    dropout: DropoutConfig | None = None
    final_layer_activation: bool = False


class MaskBlockConfig(StrictModel):
    output_size: int = Field(gt=0)
    input_layer_norm: bool = False
    # Exactly one of these sizes the mask's hidden layer (as in the original).
    reduction_factor: float | None = Field(None, gt=0)
    aggregation_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_size(self) -> MaskBlockConfig:
        if (self.reduction_factor is None) == (self.aggregation_size is None):
            raise ValueError("set exactly one of reduction_factor or aggregation_size")
        return self


class MaskNetConfig(StrictModel):
    mask_blocks: list[MaskBlockConfig] = Field(min_length=1)
    mlp: MlpConfig | None = None
    use_parallel: bool = True


class ArchitectureConfig(StrictModel):
    """One of an MLP or a MaskNet: a backbone or a task tower."""

    mlp: MlpConfig | None = None
    mask_net: MaskNetConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ArchitectureConfig:
        if (self.mlp is None) == (self.mask_net is None):
            raise ValueError("set exactly one of mlp or mask_net")
        return self


class AffineMapConfig(StrictModel):
    scale: float = 1.0
    bias: float = 0.0


class TaskConfig(ArchitectureConfig):
    affine_map: AffineMapConfig | None = None
    pos_weight: float = Field(1.0, gt=0)
    # Training data is often downsampled; calibration maps probabilities back to the true rate.
    pos_downsampling_rate: float = Field(1.0, gt=0, le=1)
    neg_downsampling_rate: float = Field(1.0, gt=0, le=1)


class LayerNormConfig(StrictModel):
    epsilon: float = Field(1e-5, ge=0)
    elementwise_affine: bool = True


class DoubleNormLogConfig(StrictModel):
    batch_norm: BatchNormConfig | None = Field(default_factory=lambda: BatchNormConfig(momentum=0.01))
    clip_magnitude: float = Field(5.0, gt=0)
    layer_norm: LayerNormConfig | None = Field(default_factory=LayerNormConfig)


class MultiTaskType(enum.StrEnum):
    SHARE_ALL = "share_all"
    SHARE_PARTIAL = "share_partial"
    SHARE_NONE = "share_none"


class ShardingType(enum.StrEnum):
    DATA_PARALLEL = "data_parallel"
    TABLE_WISE = "table_wise"
    COLUMN_WISE = "column_wise"
    ROW_WISE = "row_wise"
    TABLE_ROW_WISE = "table_row_wise"
    TABLE_COLUMN_WISE = "table_column_wise"


class PoolingType(enum.StrEnum):
    SUM = "sum"
    MEAN = "mean"


class EmbeddingTableConfig(StrictModel):
    name: str = Field(min_length=1)
    num_embeddings: int = Field(gt=0)
    embedding_dim: int = Field(gt=0)
    feature_names: list[str] = Field(min_length=1)
    pooling: PoolingType = PoolingType.SUM
    # Planner constraints: the sharding types this table may take (None lets the planner choose).
    sharding_types: list[ShardingType] | None = None


class EmbeddingsConfig(StrictModel):
    tables: list[EmbeddingTableConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> EmbeddingsConfig:
        names = [t.name for t in self.tables]
        features = [f for t in self.tables for f in t.feature_names]
        for what, values in (("table name", names), ("feature name", features)):
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"duplicate embedding {what}(s): {dup}")
        return self

    @property
    def feature_names(self) -> list[str]:
        return [f for t in self.tables for f in t.feature_names]


class ModelConfig(StrictModel):
    featurization: DoubleNormLogConfig = Field(default_factory=DoubleNormLogConfig)
    multi_task_type: MultiTaskType = MultiTaskType.SHARE_ALL
    backbone: ArchitectureConfig | None = None
    tasks: dict[str, TaskConfig] = Field(min_length=1)
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)

    @model_validator(mode="after")
    def _backbone_matches_type(self) -> ModelConfig:
        if self.multi_task_type != MultiTaskType.SHARE_NONE and self.backbone is None:
            raise ValueError(f"multi_task_type={self.multi_task_type.value} needs a backbone")
        return self


# ------------------------------------------------------------------------------------------------ data
class DataConfig(StrictModel):
    """Where examples come from and their dense shape; sparse features come from the embedding tables."""

    train_url: str = ""
    eval_url: str = ""
    num_continuous: int = Field(gt=0)
    num_binary: int = Field(ge=0)
    global_batch_size: int = Field(gt=0)
    num_workers: int = Field(0, ge=0)

    def per_rank_batch_size(self, world_size: int) -> int:
        if self.global_batch_size % world_size:
            raise ConfigError(
                f"data.global_batch_size={self.global_batch_size} must be divisible by the world size "
                f"{world_size}"
            )
        return self.global_batch_size // world_size


# ------------------------------------------------------------------------------------------- optimizer
class LearningRateConfig(StrictModel):
    """Linear warm-up to `learning_rate`, then constant or cosine decay to `final_fraction` of it."""

    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    decay: str = Field("constant", pattern="^(constant|cosine)$")
    decay_steps: int = Field(0, ge=0)
    final_fraction: float = Field(0.0, ge=0, le=1)


class AdamConfig(StrictModel):
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float = 0.0


class SparseOptimizerType(enum.StrEnum):
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"


class SparseOptimizerConfig(StrictModel):
    """Fused into the embedding backward (torchrec); CPU supports sgd / adagrad / rowwise_adagrad."""

    type: SparseOptimizerType = SparseOptimizerType.ROWWISE_ADAGRAD
    learning_rate: float = Field(0.05, gt=0)
    eps: float = 1e-8


class OptimizerConfig(StrictModel):
    dense: LearningRateConfig = Field(default_factory=lambda: LearningRateConfig(learning_rate=1e-3))
    adam: AdamConfig = Field(default_factory=AdamConfig)
    sparse: SparseOptimizerConfig = Field(default_factory=SparseOptimizerConfig)


# ------------------------------------------------------------------------------------ run components
class NonFinitePolicy(enum.StrEnum):
    FAIL = "fail"  # stop the job, naming the step, the task(s) and the batch's source
    SKIP = "skip"  # skip that batch's update (as AMP's GradScaler does), fail after too many in a row


class TrainingConfig(StrictModel):
    """The loop itself: where the run lives, how long, its seed, how often it logs, what a NaN does."""

    save_dir: str = "runs/recap"
    num_train_steps: int = Field(gt=0)
    seed: int = 0
    log_every_n: int = Field(10, gt=0)
    use_row_wise_cpu_sharder: bool = True
    on_nonfinite: NonFinitePolicy = NonFinitePolicy.FAIL
    max_consecutive_nonfinite: int = Field(10, gt=0)
    # The output's lease (recap_app/lease.py): a dead owner's lease expires after this long without a
    # heartbeat; force_lease takes a live one over (for when you know the other run is gone).
    lease_timeout_s: float = Field(300.0, gt=0)
    force_lease: bool = False
    # Every collective (gloo and nccl) fails after this long: a stopped or vanished rank ends the job in
    # bounded time, naming the step and the rank, and a scheduler retry resumes.
    collective_timeout_s: float = Field(600.0, gt=0)


class CheckpointConfig(StrictModel):
    """`{save_dir}/checkpoints/step-N` saves (recap_app/checkpoint.py): interval, retention, failures."""

    every_n: int = Field(0, ge=0)  # 0: only the final step
    keep_latest_k: int = Field(3, ge=0)  # 0: keep all
    async_save: bool = True
    # Warm start: load the model (not optimizer, not step) from this checkpoint URL when not resuming.
    initial_checkpoint: str | None = None
    # Failed periodic saves in a row before the job fails; attempts of the final save.
    max_consecutive_failures: int = Field(3, gt=0)
    final_attempts: int = Field(3, gt=0)
    # On SIGTERM / SIGINT the ranks stop at an agreed step and save it, if the signal came at most this
    # long ago (torchrun kills its workers 30 s after forwarding a signal; keep the save inside that).
    preemption_timeout_s: float = Field(25.0, gt=0)


class EvalConfig(StrictModel):
    """Periodic evaluation during training on data.eval_url (and always after the last step)."""

    every_n: int = Field(0, ge=0)
    # Periodic evals score at most this many batches per rank, each eval example at most once.
    num_batches: int = Field(20, gt=0)


class EmbeddingLogConfig(StrictModel):
    """Embedding table dumps to `{save_dir}/embeddings/step-N/` (and always after the last step)."""

    every_n: int = Field(0, ge=0)
    tables: list[str] | None = None  # None: every table
    keep_latest_k: int = Field(3, ge=0)  # step folders kept, the newest; 0: keep all


class StorageConfig(StrictModel):
    """How every URL of the run is opened (data, output, checkpoints, configs)."""

    # Options passed to each fsspec filesystem (endpoints, anon, ...). Credentials belong in the env.
    options: dict[str, Any] = Field(default_factory=dict)


class RecapConfig(StrictModel):
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    training: TrainingConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    embedding_log: EmbeddingLogConfig = Field(default_factory=EmbeddingLogConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _known_log_tables(self) -> RecapConfig:
        known = [t.name for t in self.model.embeddings.tables]
        unknown = sorted(set(self.embedding_log.tables or ()) - set(known))
        if unknown:
            raise ValueError(f"embedding_log.tables: no table(s) {unknown} (tables: {known})")
        return self

    @property
    def task_names(self) -> list[str]:
        return list(self.model.tasks)


# ---------------------------------------------------------------------------------------------- loading
PACKAGED_CONFIGS = ("local", "production")


def _read_yaml(config: str) -> dict[str, Any]:
    """A packaged config name (`local`) or any fsspec URL / path to a YAML file."""
    if config in PACKAGED_CONFIGS:
        text = resources.files("recap_app.configs").joinpath(f"{config}.yaml").read_text()
    else:
        try:
            with fsspec.open(config, "r") as f:
                text = f.read()
        except FileNotFoundError as e:
            raise ConfigError(
                f"config {config!r} not found (packaged configs: {', '.join(PACKAGED_CONFIGS)})"
            ) from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {config!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {config!r} must be a YAML mapping, got {type(data).__name__}")
    return data


class SecretOverrideError(ConfigError):
    """A credential given as a command-line override: it would sit in shell history, job specs (TorchX
    --dryrun prints them), process listings and logs."""


# The config's one free-form mapping: fsspec options, where credentials could go (all else is schema).
_OPTIONS_PATH = ["storage", "options"]
# gcsfs's `token` also names an authentication method; those words are not secrets.
_TOKEN_METHODS = frozenset({"anon", "google_default", "cache", "cloud", "browser"})
SECRET_HINT = (
    "credentials are not accepted on the command line; set them in the environment (AWS_ACCESS_KEY_ID / "
    "AWS_SECRET_ACCESS_KEY, AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME / "
    "AZURE_STORAGE_ACCOUNT_KEY, GOOGLE_APPLICATION_CREDENTIALS) or in a config file (--config)"
)


def refuse_secret_override(override: str) -> None:
    """Raise SecretOverrideError, naming the key but never the value, for an override that sets a
    secret-looking key under storage.options (also inside a mapping value) or whose value holds a URL
    password or connection-string key. Anything else (malformed overrides too) passes to apply_override."""
    key, _, raw = override.partition("=")
    try:
        parts = _split_key(key.strip())
    except ConfigError:
        return
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    for path, leaf in _leaves(parts, value):
        named = path[:2] == _OPTIONS_PATH and any(is_secret_key(p) for p in path[2:])
        harmless = leaf in (None, "") or (path[-1] == "token" and leaf in _TOKEN_METHODS)
        if (named and not harmless) or (isinstance(leaf, str) and has_secret_value(leaf)):
            raise SecretOverrideError(f"override {'.'.join(map(str, path))}=...: {SECRET_HINT}")


def _leaves(path: list[str], value: Any) -> list[tuple[list[str], Any]]:
    """(key path, value) of every leaf of `value` set at `path` (mapping values expand their keys)."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves([*path, str(k)], v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(path, v)]
    return [(path, value)]


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) in place. Task names may contain dots: quote them
    in brackets, e.g. `model.tasks[recap.engagement.is_replied].pos_weight=2`. Credentials are refused
    (refuse_secret_override)."""
    refuse_secret_override(override)
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    parts = _split_key(key.strip())
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i])} is not a mapping")
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        raise ConfigError(f"override {override!r}: {'.'.join(parts[:-1])} is not a mapping")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({e.problem})") from None


def _split_key(key: str) -> list[str]:
    parts: list[str] = []
    buf = ""
    i = 0
    while i < len(key):
        c = key[i]
        if c == "[":
            end = key.index("]", i)
            if buf:
                parts.append(buf)
                buf = ""
            parts.append(key[i + 1 : end])
            i = end + 1
            if i < len(key) and key[i] == ".":
                i += 1
            continue
        if c == ".":
            parts.append(buf)
            buf = ""
        else:
            buf += c
        i += 1
    if buf:
        parts.append(buf)
    if not parts or any(p == "" for p in parts):
        raise ConfigError(f"bad override key {key!r}")
    return parts


def load_config(config: str = "local", overrides: list[str] | tuple[str, ...] = ()) -> RecapConfig:
    """Load a packaged or URL config, apply dotted overrides, validate; errors name the config key."""
    data = _read_yaml(config)
    for override in overrides:
        apply_override(data, override)
    try:
        return RecapConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"invalid config {config!r}:"]
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
