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
from recap_app.storage import errors_named, has_secret_value, is_secret_key


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


class IdTransform(enum.StrEnum):
    """How a feature's raw int64 ids become rows of its table (recap_app/data.py transform_ids)."""

    NONE = "none"  # ids are rows already: each must lie in [0, num_embeddings)
    MODULO = "modulo"  # id mod num_embeddings (floor: -1 -> num_embeddings - 1)
    HASH = "hash"  # SplitMix64 of the id's 64 bits, then mod num_embeddings


class EmbeddingTableConfig(StrictModel):
    name: str = Field(min_length=1)
    num_embeddings: int = Field(gt=0)
    embedding_dim: int = Field(gt=0)
    feature_names: list[str] = Field(min_length=1)
    # `none` keeps configs written before raw ids were accepted reading (and resuming) as they did.
    id_transform: IdTransform = IdTransform.NONE
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


class DenseEmbeddingConfig(StrictModel):
    """A pretrained vector per example (the original's TwHIN user / engagement / author inputs)."""

    dim: int = Field(gt=0)
    layer_norm: bool = True  # the original layer-norms each (torch.nn.LayerNorm(dim), eps 1e-5)


_RESERVED_COLUMNS = ("continuous", "binary")


class ModelConfig(StrictModel):
    featurization: DoubleNormLogConfig = Field(default_factory=DoubleNormLogConfig)
    multi_task_type: MultiTaskType = MultiTaskType.SHARE_ALL
    backbone: ArchitectureConfig | None = None
    tasks: dict[str, TaskConfig] = Field(min_length=1)
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    # Read from fixed-size float list columns of these names; joined after the pooled id embeddings.
    dense_embeddings: dict[str, DenseEmbeddingConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _backbone_matches_type(self) -> ModelConfig:
        if self.multi_task_type != MultiTaskType.SHARE_NONE and self.backbone is None:
            raise ValueError(f"multi_task_type={self.multi_task_type.value} needs a backbone")
        return self

    @model_validator(mode="after")
    def _dense_embedding_columns(self) -> ModelConfig:
        taken = set(_RESERVED_COLUMNS) | set(self.embeddings.feature_names)
        clash = sorted(n for n in self.dense_embeddings if n in taken or n.startswith(("label/", "weight/")))
        if clash:
            raise ValueError(
                f"dense_embeddings {clash}: names another column (continuous, binary, an id feature)"
            )
        return self


# ------------------------------------------------------------------------------------------------ data
class CorruptDataPolicy(enum.StrEnum):
    FAIL = "fail"  # stop, naming the file and row group
    SKIP = "skip"  # drop unreadable files, stand in for unreadable row groups (recap_app/data.py)


class DataConfig(StrictModel):
    """Where examples come from and their dense shape; sparse features come from the embedding tables."""

    train_url: str = ""
    eval_url: str = ""
    num_continuous: int = Field(gt=0)
    num_binary: int = Field(ge=0)
    global_batch_size: int = Field(gt=0)
    num_workers: int = Field(0, ge=0)
    # Parquet files / row groups that cannot be read (truncated, not Parquet): fail, or skip them and
    # fail only when more than this fraction of the dataset's row groups was skipped.
    on_corrupt: CorruptDataPolicy = CorruptDataPolicy.FAIL
    max_corrupt_fraction: float = Field(0.1, ge=0, le=1)

    def per_rank_batch_size(self, world_size: int) -> int:
        if self.global_batch_size % world_size:
            raise ConfigError(
                f"data.global_batch_size={self.global_batch_size} must be divisible by the world size "
                f"{world_size}"
            )
        return self.global_batch_size // world_size


# ------------------------------------------------------------------------------------------- optimizer
class PiecewiseConstant(StrictModel):
    """`learning_rate_values[i]` from boundary i-1 (inclusive) up to boundary i."""

    learning_rate_boundaries: list[int]
    learning_rate_values: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> PiecewiseConstant:
        if len(self.learning_rate_values) != len(self.learning_rate_boundaries) + 1:
            raise ValueError(
                "learning_rate_values needs exactly one more entry than learning_rate_boundaries"
            )
        if self.learning_rate_boundaries != sorted(self.learning_rate_boundaries):
            raise ValueError("learning_rate_boundaries must be ascending")
        return self


class LinearRampToConstant(StrictModel):
    """0 at step 0, `learning_rate` from `num_ramp_steps` on."""

    learning_rate: float = Field(ge=0)
    num_ramp_steps: int = Field(gt=0)


class LinearRampToCosine(StrictModel):
    """Linear ramp to `learning_rate`, cosine decay to `final_learning_rate` at `final_num_steps`."""

    learning_rate: float = Field(ge=0)
    final_learning_rate: float = Field(ge=0)
    num_ramp_steps: int = Field(gt=0)
    final_num_steps: int = Field(gt=0)

    @model_validator(mode="after")
    def _order(self) -> LinearRampToCosine:
        if self.final_num_steps <= self.num_ramp_steps:
            raise ValueError("final_num_steps must be greater than num_ramp_steps")
        return self


_LEGACY_SCHEDULE_KEYS = ("warmup_steps", "decay", "decay_steps", "final_fraction")


class LearningRateConfig(StrictModel):
    """One of the original's four schedules (the-algorithm-ml optimizers/config.py LearningRate), a
    function of the step. A bare number is shorthand for `constant`."""

    constant: float | None = Field(None, ge=0)
    piecewise_constant: PiecewiseConstant | None = None
    linear_ramp_to_constant: LinearRampToConstant | None = None
    linear_ramp_to_cosine: LinearRampToCosine | None = None

    @model_validator(mode="before")
    @classmethod
    def _number_is_constant(cls, data: Any) -> Any:
        if isinstance(data, str):  # YAML reads `1e-3` (no dot) as a string
            try:
                data = float(data)
            except ValueError:
                return data
        if isinstance(data, int | float) and not isinstance(data, bool):
            return {"constant": data}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> LearningRateConfig:
        chosen = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "set exactly one of constant, piecewise_constant, linear_ramp_to_constant, "
                f"linear_ramp_to_cosine (got {chosen or 'none'})"
            )
        return self


class DenseOptimizerConfig(StrictModel):
    learning_rate: LearningRateConfig = Field(default_factory=lambda: LearningRateConfig(constant=1e-3))

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in _LEGACY_SCHEDULE_KEYS):
            raise ValueError(
                "warmup_steps / decay / decay_steps / final_fraction were replaced by the original's "
                "schedules: learning_rate: {linear_ramp_to_constant: {learning_rate, num_ramp_steps}} or "
                "{linear_ramp_to_cosine: {learning_rate, final_learning_rate, num_ramp_steps, "
                "final_num_steps}}"
            )
        return data


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
    """Adam for dense parameters, in parameter groups as the original's multi_task_learning_rates: one
    per tower in `tower_learning_rates`, the backbone group for every other dense parameter (unlisted
    towers included) at `backbone_learning_rate`, else `dense.learning_rate`."""

    dense: DenseOptimizerConfig = Field(default_factory=DenseOptimizerConfig)
    backbone_learning_rate: LearningRateConfig | None = None
    tower_learning_rates: dict[str, LearningRateConfig] = Field(default_factory=dict)
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


class CorruptCheckpointPolicy(enum.StrEnum):
    FALLBACK = "fallback"  # rename it step-N.corrupt, resume from the newest readable complete step
    FAIL = "fail"  # stop, naming the step and the file


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
    # A complete step that cannot be read on resume.
    on_corrupt: CorruptCheckpointPolicy = CorruptCheckpointPolicy.FALLBACK


class EvalConfig(StrictModel):
    """Periodic evaluation during training on data.eval_url (and always after the last step)."""

    every_n: int = Field(0, ge=0)
    # Periodic evals score at most this many batches per rank, each eval example at most once.
    num_batches: int = Field(20, gt=0)
    # AUROC with example weights (the original's AUROCWithMWU); false: every example counts once.
    weighted_auroc: bool = False


class EmbeddingLogConfig(StrictModel):
    """Embedding table dumps to `{save_dir}/embeddings/step-N/` (and always after the last step)."""

    every_n: int = Field(0, ge=0)
    tables: list[str] | None = None  # None: every table
    keep_latest_k: int = Field(3, ge=0)  # step folders kept, the newest; 0: keep all


class StorageConfig(StrictModel):
    """How every URL of the run is opened (data, output, checkpoints, configs)."""

    # Options passed to each fsspec filesystem (endpoints, anon, ...). Credentials belong in the env.
    options: dict[str, Any] = Field(default_factory=dict)
    # An object store's endpoint that accepts no connection for this long fails the run, naming it.
    connect_timeout_s: float = Field(30.0, gt=0)


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

    @model_validator(mode="after")
    def _known_towers(self) -> RecapConfig:
        unknown = sorted(set(self.optimizer.tower_learning_rates) - set(self.model.tasks))
        if unknown:
            raise ValueError(f"optimizer.tower_learning_rates: no task(s) {unknown} in model.tasks")
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
            with errors_named(config, "read config"), fsspec.open(config, "r") as f:
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
