"""The typed configuration of the ``train`` flow: defaults in code, overrides from YAML and flags.

The Prefect UI renders this model as the flow's parameter form; every field is documented.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from models.columns import EVENT_TYPES
from models.errors import ConfigError
from models.metrics import ACCURACY_METRICS
from tasks.checks.validate import ValidationSettings
from tasks.data.adapters import FORMATS
from tasks.data.shards import BUCKETS
from tasks.monitoring.settings import MonitorSettings
from tasks.ranking.reranker import RankerConfig
from tasks.splitting.split import EvalSample, Selection
from tasks.transformer.sequence import SequenceConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Where the shop's events and catalogue come from."""

    path: str | None = Field(
        None, description="File or folder of raw data; empty means the built-in demo shop."
    )
    format: str = Field("parquet", description=f"Format of `path`, one of {', '.join(FORMATS)}.")
    column_map: dict[str, str] = Field(
        default_factory=dict,
        description="For csv/parquet: canonical column name -> column name in the file.",
    )
    event_map: dict[str, str] = Field(
        default_factory=dict,
        description="For csv/parquet: event name in the file -> view, cart, fav or purchase.",
    )
    name: str | None = Field(
        None, description="Shop name: its MLflow experiment, run folder and champion. Empty: "
        "'demo' for the built-in shop, else <format>-<stem>-<6 hex of the SHA-256 of the "
        "resolved absolute path> (<stem>-<digest> for csv and parquet), so two logs of one "
        "format in two folders are two shops.")
    demo_events: int = Field(200_000, gt=0, description="Events in the built-in demo shop.")
    demo_seed: int = Field(0, description="Seed of the built-in demo shop.")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; choose one of {', '.join(FORMATS)}")
        return value


class SplitConfig(_Strict):
    """How events are cut into train, validation and test (see PROTOCOL in the README)."""

    protocol: Literal["auto", "time", "leave_one_out"] = Field(
        "auto", description="'auto': leave-one-out for ordered data without timestamps, else time."
    )
    valid_share: float = Field(0.1, description="Share of events (by time) in the validation.")
    test_share: float = Field(0.1, description="Share of events (by time) in the test window.")
    valid_days: float | None = Field(None, description="Validation window in days (not share).")
    test_days: float | None = Field(None, description="Test window in days (overrides share).")
    target_event_types: list[str] | None = Field(
        None, description="Event types that count as targets; empty means all types."
    )

    @field_validator("target_event_types")
    @classmethod
    def _known_types(cls, value: list[str] | None) -> list[str] | None:
        unknown = set(value or ()) - set(EVENT_TYPES)
        if unknown:
            raise ValueError(f"unknown event types {sorted(unknown)}; allowed: {EVENT_TYPES}")
        return value


class EvalConfig(_Strict):
    """Which metrics are computed and which one selects models."""

    ks: list[int] = Field([10, 20], description="Cut-offs K of every ranking metric.")
    exclude_seen: bool | None = Field(
        None, description="Remove already seen items; empty means the protocol's default."
    )
    primary_metric: str = Field(
        "ndcg@10", description="Metric that selects and promotes models; at a cut-off of ks "
        "(left at its default, ndcg at the smallest K when ks leaves out 10).")
    selection_share: float = Field(
        0.2, ge=0, lt=1, description="Share of the validation users (drawn by hash) every "
        "family is selected on and none is tuned on: no early stopping, trial or boosting uses "
        "their targets. 0: select and tune on every validation user.")
    test_user_share: float = Field(
        1.0, gt=0, le=1, description="Share of the test users scored, drawn by hash with the "
        "run's seed: the same users for every family, both engines and both sides of the "
        "promotion gate; the metrics are the sample's, each with its standard error (se.*). "
        "Below 1 for a shop whose test window holds millions of users: the test scoring's cost "
        "follows the share.")

    def selection(self, seed: int) -> Selection:
        """The selection holdout of a run."""
        return Selection(self.selection_share, seed)

    def test_sample(self, seed: int) -> EvalSample:
        """The test users a run scores."""
        return EvalSample(self.test_user_share, seed)

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError(f"ks must list positive cut-offs; got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _primary_at_a_cut_off(self) -> EvalConfig:
        name, _, k = self.primary_metric.partition("@")
        known = (*ACCURACY_METRICS, "coverage", "novelty")
        if name not in known:
            raise ValueError(f"primary_metric {self.primary_metric!r} is not a metric shoprank "
                             f"computes; choose one of {', '.join(f'{m}@K' for m in known)}")
        if k.isdigit() and int(k) in self.ks:
            return self
        if "primary_metric" in self.model_fields_set:
            raise ValueError(
                f"primary_metric {self.primary_metric!r} is not at a cut-off of ks {self.ks}: "
                f"add its K to ks or choose one of {', '.join(f'{name}@{k}' for k in self.ks)}")
        self.primary_metric = f"ndcg@{min(self.ks)}"
        return self


class BaselineConfig(_Strict):
    """Settings of the baselines every run reports next to the models."""

    recent_days: float = Field(7.0, gt=0, description="Window of the recent-popularity baseline.")


class ContentConfig(_Strict):
    """Item understanding from the catalogue's text (titles, descriptions, categories, brands)."""

    enabled: bool = Field(
        True, description="Encode the catalogue's text into item vectors (cached by content) "
        "and report the content model: the nearest items of a user's recent items, the one "
        "model that can recommend items with no events. Off without an items table.")
    encoder: str = Field(
        "wordllama", description="'wordllama' (weights inside the package, nothing "
        "downloaded) or 'sentence-transformers:<folder>' (a saved model on disk).")
    ranker_candidates: bool = Field(
        True, description="The content neighbours join the ranker's candidates (source "
        "'content', quota ranker.candidates.n_external), and the nearest items without events "
        "(source 'content_new', ranker.candidates.n_new per user), with their rank and score "
        "as features.")
    new_item_weight: float = Field(
        0.4, ge=0, le=1, description="`shoprank catalogue update`: weight of the new items "
        "nearest a user's items (in text space) against the model's list, by weighted "
        "reciprocal rank (0 leaves the lists as they are; 0.4 puts the best match near rank 7 "
        "of a top 10).")


class RegistryConfig(_Strict):
    """How the best model is registered and when it replaces the champion."""

    enabled: bool = Field(
        True, description="Package the best model on validation and register it as challenger."
    )
    promote: bool = Field(
        True, description="Promote inside `train`; false leaves it to the `promote` flow, which "
        "a deployment runs on the event shoprank.model.evaluated.",
    )
    model_name: str = Field("shoprank", description="Name of the registered model in MLflow.")
    families: list[str] | None = Field(
        None, description="Model families that may be chosen; empty means every servable one."
    )
    margin: float = Field(
        0.0, ge=0, description="Relative gain of the primary metric the challenger needs over "
        "the champion (0.01: 1% better).",
    )
    coverage_tolerance: float = Field(
        0.1, ge=0, le=1, description="Largest relative drop of coverage@10 a challenger may have."
    )
    latency_tolerance: float = Field(
        0.5, ge=0, description="Largest relative growth of the p99 latency of one-user requests."
    )
    latency_slack_ms: float = Field(
        25.0, ge=0, description="Latency growth in ms always tolerated (timing noise: both "
        "models answer from precomputed lists in 1-5 ms in process, and one scheduling hiccup "
        "on a busy machine moves a p99 of 200 requests by 10 ms or more).")
    latency_requests: int = Field(
        200, gt=0, description="Single-user requests timed per model for the latency guardrail."
    )
    cold_tolerance: float = Field(
        0.2, ge=0, le=1, description="Largest relative drop of cold5.recall@20 (test targets "
        "whose item had at most 5 events before the test window: new items) a challenger may "
        "have; checked when both sides have cold_min_users users with such a target.")
    cold_min_users: int = Field(
        50, ge=1, description="Users with a cold target both sides need for the cold guardrail.")


class ServeConfig(_Strict):
    """How the packaged model answers requests and where `shoprank serve` listens."""

    host: str = Field("127.0.0.1", description="Address the model server binds to.")
    port: int = Field(5001, gt=0, lt=65536, description="Port of the model server.")
    model_uri: str = Field(
        "models:/shoprank@champion", description="Registered model (or alias) to serve."
    )
    workers: int | None = Field(
        None, gt=0, description="Server worker processes; empty means one per CPU core. Each "
        "opens the same memory-mapped lists, shared through the file cache.")
    default_k: int = Field(10, gt=0, description="List length when a request gives no k.")
    max_k: int = Field(
        200, gt=0, description="Largest k a request may ask for. Every known user's top max_k "
        "(+16 for exclusions) is precomputed when the model is packaged: users x (max_k + 16) "
        "x 12 bytes on disk, memory-mapped when served.")
    session_items: int = Field(
        5, gt=0, description="Newest recent_items of a request that the session model uses."
    )
    session_weight: float = Field(
        0.5, ge=0, le=1, description="Weight of a known user's live session (recent_items) "
        "against the model's list, by weighted reciprocal rank: 0 ignores the session, 1 "
        "answers with the session model alone.")


class LGBMConfig(_Strict):
    """The LightGBM re-ranker in the train flow (candidates, features, Optuna study)."""

    enabled: bool = Field(True, description="Tune, test and offer the ranker for promotion.")
    n_trials: int = Field(4, ge=1, description="Optuna trials per study (a re-run resumes it).")
    timeout_s: float | None = Field(240, gt=0, description="Stop starting trials after this.")
    storage: str | None = Field(None, description="Optuna storage URL; sqlite in mlruns/.")
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Further RankerConfig settings (candidates, features, extra_windows, ...).",
    )

    def settings(self, seed: int) -> RankerConfig:
        """The full ranker configuration."""
        try:
            return RankerConfig.model_validate({
                **self.extra, "n_trials": self.n_trials, "timeout_s": self.timeout_s,
                "storage": self.storage, "seed": seed})
        except ValidationError as err:
            raise ConfigError(f"invalid ranker.extra settings: {err}") from err


class TransformerFlowConfig(_Strict):
    """The sequential transformer in the train flow (Optuna study, refit, candidate source)."""

    enabled: bool = Field(True, description="Tune, test and offer the transformer for promotion.")
    n_trials: int = Field(3, ge=1, description="Optuna trials per study (a re-run resumes it).")
    timeout_s: float | None = Field(
        120, gt=0, description="Time budget of the study: no trial starts after it, and a "
        "running trial stops after its current epoch.")
    storage: str | None = Field(None, description="Optuna storage URL; sqlite in mlruns/.")
    candidates: bool = Field(
        True, description="Feed its nearest items to the LightGBM ranker's candidate stage."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Further SequenceConfig settings (model, space, patience, n_candidates, ...).",
    )

    def settings(self, seed: int) -> SequenceConfig:
        """The full transformer configuration."""
        try:
            return SequenceConfig.model_validate({
                **self.extra, "n_trials": self.n_trials, "timeout_s": self.timeout_s,
                "storage": self.storage, "candidates": self.candidates, "seed": seed})
        except ValidationError as err:
            raise ConfigError(f"invalid transformer.extra settings: {err}") from err


class DaskConfig(_Strict):
    """Where the per-shard tasks of ``engine: dask`` run, and how the events are sharded."""

    address: str | None = Field(
        None, description="Scheduler of a running Dask cluster (tcp://host:8786); empty starts "
        "a LocalCluster on this machine for the run.")
    workers: int | None = Field(
        None, gt=0, description="Worker processes of the LocalCluster (one thread each); empty "
        "means one per CPU core.")
    memory_limit: str = Field(
        "auto", description="Memory limit of each LocalCluster worker ('auto': the machine's "
        "memory shared equally; or e.g. '6GiB').")
    shards: int | None = Field(
        None, gt=0, description="User shards of the events; empty sizes them to the cluster: "
        "as few as fit half a worker's memory (about 2 KB per event), a multiple of the workers.")
    buckets: int = Field(
        BUCKETS, gt=0, description="Item buckets of the map-reduce stages (baselines, the "
        "ranker's tables): a reducer sums one bucket of every shard's partials. Fixed, whatever "
        "the number of shards.")


class TrainConfig(_Strict):
    """Everything the ``train`` flow needs; the whole resolved object is logged with each run."""

    data: DataConfig = Field(default_factory=DataConfig)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    split: SplitConfig = Field(default_factory=SplitConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    baselines: BaselineConfig = Field(default_factory=BaselineConfig)
    content: ContentConfig = Field(default_factory=ContentConfig)
    ranker: LGBMConfig = Field(default_factory=LGBMConfig)
    transformer: TransformerFlowConfig = Field(default_factory=TransformerFlowConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    engine: Literal["local", "dask"] = Field(
        "local", description="'local': every stage in this process. 'dask': the events as "
        "Parquet shards by user, per-shard tasks on a Dask cluster (see dask), memory bounded by "
        "the shard.")
    dask: DaskConfig = Field(default_factory=DaskConfig)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    seed: int = Field(42, description="Seed of every stochastic step.")
    output_dir: str = Field("outputs", description="Folder for canonical tables, splits, models.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; MLFLOW_TRACKING_URI or ./mlruns when empty."
    )

    @model_validator(mode="after")
    def _cut_offs_servable(self) -> TrainConfig:
        above = [k for k in self.evaluation.ks if k > self.serve.max_k]
        if above:
            raise ValueError(
                f"evaluation.ks {self.evaluation.ks} has cut-offs above serve.max_k "
                f"{self.serve.max_k} ({', '.join(map(str, above))}): the packaged model serves "
                f"lists of at most serve.max_k items, and the promotion gate scores it at every "
                f"K. Lower those K to {self.serve.max_k} or less, or raise serve.max_k to "
                f"{max(above)}")
        return self


def data_name(config: TrainConfig) -> str:
    """Name of the dataset (and of its MLflow experiment) before it is loaded.

    The loaders name the loaded data the same (:func:`tasks.data.prepare.shop_name`).
    """
    from tasks.data.prepare import shop_name  # not at import: it loads Prefect and MLflow

    return shop_name(config.data.path, config.data.format, config.data.name)


DIGEST_EXCLUDED: dict[str, Any] = {
    "tracking_uri": True, "dask": {"address": True, "workers": True, "memory_limit": True},
    "monitor": True}
"""Settings that do not change a run's results: a run may be resumed with another value (the
store's address; the Dask cluster that runs it, as long as the shards stay the same; the
monitor's thresholds)."""


def config_digest(config: TrainConfig) -> str:
    """SHA-256 of the resolved settings (sorted JSON) except :data:`DIGEST_EXCLUDED`.

    Two runs with the same digest compute the same thing: ``train --resume`` continues only a
    run with the digest of its own settings.
    """
    values = config.model_dump(mode="json", exclude=DIGEST_EXCLUDED)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def merge_settings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s settings laid over it, section by section."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged


def _problem(error: Any) -> str:
    """One validation error as ``section.field: message``, without pydantic's "Value error, ".

    A check across sections (at the top: no location) names the settings in its message.
    """
    where = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Build the config from defaults, an optional YAML file, then dotted-key overrides.

    ``overrides`` use double underscores for nesting (``data__path="x"``); ``None`` values are
    ignored so unset command-line flags keep the file's values.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist; give an existing YAML file.")
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {file} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {file} must hold a mapping of settings at the top.")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node: dict[str, Any] = {}
        keys = dotted.split("__")
        cursor = node
        for key in keys[:-1]:
            cursor = cursor.setdefault(key, {})
        cursor[keys[-1]] = value
        raw = merge_settings(raw, node)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_problem(e) for e in err.errors())
        raise ConfigError(f"invalid configuration: {problems}.") from err
