"""Typed, validated run configuration.

Hydra composes the YAML under ``privfed/conf/`` (the only source of defaults); :func:`load_config`
turns the composed ``DictConfig`` into frozen pydantic models once, checking types, ranges and
combinations. Every component then reads these objects, never raw ``cfg["..."]`` lookups.

A bad value raises :class:`ConfigError` whose message names the key and the reason, e.g.
``num_rounds: must be >= 1, got 0``; the CLI prints that one line and exits with code 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and why."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StrategyConfig(BaseModel):
    # Strategy-specific keys are free-form here; each strategy validates its own.
    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    name: str
    target: str | None = Field(default=None, alias="_target_")


class AccountantConfig(_Frozen):
    backend: Literal["embedded", "http"]
    url: str | None = Field(pattern=r"^https?://")
    client_tokens_file: str | None
    ca_file: str | None
    timeout_s: float = Field(gt=0, le=600)
    retry_for_s: float = Field(ge=0, le=3600)
    # A registered accountant's name (privacy/accountant.py ACCOUNTANTS, checked there before a
    # run starts): pld, privacy loss distributions where every event has one, else RDP (the
    # tighter of the two is used); rdp, RDP only. Calibration and enforcement both use it.
    method: str


class SecureAggregationConfig(_Frozen):
    """``privacy.user.aggregation=secure``: SecAgg+ over the devices' distributed discrete
    Gaussian shares (privfed/privacy/secure_plan.py, distributed_dg.py, secagg.py)."""

    bits: int = Field(ge=8, le=62)  # the ring Z_(2^bits); sums in int64
    min_survivors: float = Field(gt=0, le=1)  # of the expected devices per round
    neighbours: int = Field(ge=0)  # 0: every device of the round
    threshold: float = Field(gt=0, le=1)  # of a neighbourhood
    beta: float = Field(ge=0, lt=1)
    k_stddevs: float = Field(gt=0, le=64)


class UserLevelConfig(_Frozen):
    """``privacy.unit=user``: DP-FedAvg (McMahan et al. 2018) over whole devices; see
    privfed/privacy/user_level.py. Central: the server clips (or checks the clients' clipping)
    and adds the noise, so it holds against everyone who sees the global model, not the server."""

    epsilon: float | None = Field(gt=0)  # per user, over the run
    delta: float = Field(gt=0, lt=1)
    # null: calibrate from epsilon; 0: a clip-only control (no noise, no user-level guarantee)
    noise_multiplier: float | None = Field(ge=0)
    clip_norm: float = Field(gt=0)  # C: L2 bound of a device's update, all tensors
    # the server's step along the released mean update (post-processing: no privacy cost)
    server_learning_rate: float = Field(gt=0, le=100)
    clipping: Literal["server", "client"]
    # adaptive clipping (Andrew et al. 2021): clip_norm is then the first round's C
    adaptive: bool
    target_quantile: float = Field(gt=0, lt=1)
    clip_learning_rate: float = Field(gt=0)
    count_noise_std: float | None = Field(gt=0)  # null: expected devices / 20
    # central: the server adds the noise; secure: devices add shares, the server sees the sum
    aggregation: Literal["central", "secure"]
    secure: SecureAggregationConfig

    @property
    def clip_only(self) -> bool:
        """A control arm: updates clipped, nothing noised, no user-level guarantee."""
        return self.noise_multiplier == 0

    @model_validator(mode="after")
    def _adaptive(self) -> UserLevelConfig:
        if self.aggregation == "secure":
            if self.clipping != "client":
                raise ValueError(
                    "clipping: aggregation=secure needs clipping=client (the server never sees "
                    "an update to clip)"
                )
            if self.clip_only:
                raise ValueError(
                    "noise_multiplier: 0 (clip-only) has no noise to share; aggregation=secure "
                    "needs a guarantee to distribute"
                )
        if self.adaptive and self.clip_only:
            raise ValueError("adaptive: its count is noised inside sigma; not with sigma 0")
        if self.adaptive and self.clipping != "server":
            raise ValueError(
                "adaptive: with clipping=server only (the server measures each update's norm "
                "against the round's C)"
            )
        return self


class PrivacyConfig(_Frozen):
    enabled: bool
    epsilon: float | None = Field(gt=0)
    delta: float | None = Field(gt=0, lt=1)
    noise_multiplier: float | None = Field(ge=0)
    max_grad_norm: float | None = Field(gt=0)
    clipping: Literal["flat", "per_layer"]
    per_layer_split: Literal["equal", "size"]
    grad_sample_mode: Literal["hooks", "functorch", "ghost"]
    suggested_learning_rate: float = Field(gt=0)  # train.learning_rate (conf: by privacy mode)
    accountant: AccountantConfig
    # record: the record-level DP-SGD above (enabled) alone; user: DP-FedAvg over whole devices
    # (privacy.user), composed with the record-level DP-SGD when enabled is true as well
    unit: Literal["record", "user"]
    user: UserLevelConfig

    @property
    def user_level(self) -> bool:
        return self.unit == "user"

    @model_validator(mode="after")
    def _combinations(self) -> PrivacyConfig:
        if self.user_level and self.user.epsilon is None and not self.user.clip_only:
            raise ValueError("user.epsilon: required for privacy.unit=user (the user's budget)")
        if self.user_level and self.user.aggregation == "secure" and self.enabled:
            raise ValueError(
                "user.aggregation: secure with record-level DP-SGD as well (privacy.enabled) is "
                "not supported yet; use privacy=user (user-level DP alone)"
            )
        if not self.enabled:
            return self
        if self.max_grad_norm is None:
            raise ValueError("max_grad_norm: required when privacy is enabled")
        if self.delta is None:
            raise ValueError("delta: required when privacy is enabled (epsilon without delta)")
        if self.epsilon is None:
            raise ValueError("epsilon: required when privacy is enabled (the per-client budget)")
        if self.clipping == "per_layer" and self.grad_sample_mode == "ghost":
            raise ValueError(
                "clipping: per_layer cannot be combined with grad_sample_mode=ghost "
                "(Opacus ghost clipping supports flat clipping only)"
            )
        if self.accountant.backend == "http" and not self.accountant.url:
            raise ValueError("accountant.url: required when accountant.backend=http")
        if self.accountant.backend == "http" and self.user_level:
            raise ValueError(
                "accountant.backend: with unit=user each device keeps its record-level ledger "
                "itself (a report to the operator's accountant would say it was sampled); use "
                "backend=embedded"
            )
        return self


class LoraConfig(_Frozen):
    r: int = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)


class TinyBertConfig(_Frozen):
    hidden_size: int = Field(ge=8)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=8)


class ModelConfig(_Frozen):
    name: str
    source: Literal["minilm", "tiny_bert", "hf"]
    path: str | None
    max_length: int = Field(ge=8, le=4096)
    # cls: the backbone's own sequence-classification head (BERT's pooler on [CLS]); mean: the
    # mean-pooled, centred, unit-norm sentence feature and a linear head (models/head.py), the
    # head recipe's, so that a head trained on the frozen features carries over to adapters
    pooling: Literal["cls", "mean"]
    device: Literal["cpu", "cuda"]
    lora: LoraConfig
    train_head: bool
    tiny: TinyBertConfig | None

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if self.source == "hf" and not self.path:
            raise ValueError("path: required for model=hf (a local folder or a hub id)")
        if self.source == "tiny_bert" and self.tiny is None:
            raise ValueError("tiny: required for source=tiny_bert")
        return self


class PartitionerConfig(_Frozen):
    name: Literal["iid", "dirichlet", "label"]
    alpha: float = Field(gt=0)
    classes_per_client: int = Field(ge=1)


class DataConfig(_Frozen):
    name: str
    path: str | None
    text_column: str
    label_column: str
    test_fraction: float = Field(gt=0, lt=1)
    # A public validation split, carved from the held-out data beside the test split: every
    # selection (tuning, FedMentor's utility signal) reads it, never the test split.
    validation_fraction: float = Field(ge=0, lt=1)
    # The held-out splits (and a max_examples subsample) follow this seed, not the run's: every
    # seed of a study is evaluated on the same test split.
    split_seed: int = Field(ge=0)
    max_examples: int | None = Field(ge=10)
    cache_dir: str
    partitioner: PartitionerConfig

    @model_validator(mode="after")
    def _path(self) -> DataConfig:
        if self.name == "hf" and not self.path:
            raise ValueError("path: required for data=hf")
        if self.test_fraction + self.validation_fraction >= 0.9:
            raise ValueError(
                f"validation_fraction: with test_fraction={self.test_fraction} it leaves less "
                "than 10% of the data for the clients"
            )
        return self


class ClientResources(_Frozen):
    num_cpus: float = Field(gt=0)
    num_gpus: float = Field(ge=0)


class FederationConfig(_Frozen):
    mode: Literal["simulation", "deployment"]
    num_clients: int = Field(ge=1)
    clients_per_round: int = Field(ge=1)
    client_resources: ClientResources
    ray_num_cpus: int | None = Field(ge=1)
    ray_address: str | None  # an existing Ray cluster (HOST:PORT); None: Ray starts here
    round_timeout_s: float = Field(gt=0)
    # One model per client process (client/local_model.py).
    reuse_client_model: bool
    # Simulation: up to this many client messages per Ray call, run in turn by one actor
    # (privfed/simulation_bundling.py); 1: one call per message, as Flower does.
    messages_per_call: int = Field(ge=1)
    # Such a call's durable writes (releases, ledger records) flushed once after its last client,
    # before its replies leave (privacy/durability.py); false: each flushed as it is made.
    flush_per_call: bool
    superlink: str | None
    insecure: bool
    root_certificates: str | None

    @model_validator(mode="after")
    def _counts(self) -> FederationConfig:
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round: {self.clients_per_round} is more than "
                f"num_clients={self.num_clients}"
            )
        if self.mode == "deployment" and not self.superlink:
            raise ValueError("superlink: required for federation=deployment")
        if self.ray_address is not None:
            if self.mode != "simulation":
                raise ValueError("ray_address: only for federation=local (the simulation)")
            if self.ray_num_cpus is not None:
                raise ValueError(
                    "ray_address: a Ray cluster brings its own CPUs; leave ray_num_cpus null"
                )
            host, _, port = self.ray_address.rpartition(":")
            if self.ray_address != "auto" and (not host or not port.isdigit()):
                raise ValueError(
                    f"ray_address: {self.ray_address!r} is not HOST:PORT (the head's "
                    "`ray start --head --port PORT`) or 'auto'"
                )
        return self


class TrainConfig(_Frozen):
    local_epochs: float = Field(gt=0, le=1000)
    # DP-SGD (or SGD) steps per round; null: from local_epochs (max(1, round(epochs / q)))
    local_steps: int | None = Field(ge=1, le=100_000)
    # poisson: Poisson-sampled batches at q = batch_size / n (DP-SGD); full_batch: every step
    # takes every local example (q = 1: full-batch DP gradient descent)
    sampling: Literal["poisson", "full_batch"]
    batch_size: int = Field(ge=1)
    physical_batch_size: int = Field(ge=1)
    optimizer: Literal["adam", "sgd"]
    learning_rate: float = Field(gt=0)
    lr_schedule: Literal["constant", "cosine"]
    weighting: Literal["num_examples", "uniform"]


class EvalConfig(_Frozen):
    batch_size: int = Field(ge=1)
    # false: the run never evaluates on the test split (only on validation). A tuner runs with
    # false, so that no selection can see test accuracy (bench/frontier.py).
    test: bool


class RecipeConfig(_Frozen):
    """What trains (privfed/conf/recipe/): the strategy's adapters with the head on the
    fine-tuned encoder, or the head alone on the frozen encoder's cached features."""

    name: str
    trains: Literal["adapters", "head"]
    # head: start from DP class prototypes (one Gaussian release per client, models/head.py)
    prototypes: bool
    # the prototypes' share of the budget, as a share of one Gaussian mechanism's 1/sigma^2
    # (1: all of it, and then no round may train: num_rounds=0)
    prototype_share: float = Field(gt=0, le=1)
    prototype_scale: float = Field(gt=0)  # the head's logit scale at its start


class TelemetryConfig(_Frozen):
    prometheus_port: int | None = Field(ge=0, le=65535)
    prometheus_host: str
    progress: bool
    plot: bool


class AuditConfig(_Frozen):
    """``privfed audit.enabled=true``: a one-run privacy audit of the run (privfed/audit)."""

    enabled: bool
    canaries: int = Field(ge=2, le=1_000_000)  # m
    canary_scale: float = Field(gt=0)  # a canary's gradient norm, in units of C
    confidence: float = Field(gt=0, lt=1)
    seed: int = Field(ge=0)  # which canaries are in, and where: apart from the run's
    # Deliberately break the mechanism while the accountant still charges the intact one, to
    # check that the audit notices: no_noise (sigma 0 in DP-SGD), no_clipping, or known_noise
    # (the noise drawn from a stream the run's config determines: what the white-box auditor,
    # who knows the config, must catch).
    break_mechanism: Literal["none", "no_noise", "no_clipping", "known_noise"]


class RunConfig(_Frozen):
    seed: int = Field(ge=0)
    num_rounds: int = Field(ge=0, le=100_000)  # 0: only a recipe's prototypes
    resume: str | None
    strategy: StrategyConfig
    privacy: PrivacyConfig
    model: ModelConfig
    data: DataConfig
    federation: FederationConfig
    train: TrainConfig
    eval: EvalConfig
    telemetry: TelemetryConfig
    recipe: RecipeConfig
    audit: AuditConfig
    # The run's DP-SGD noise multiplier as `privfed` calibrated it before start (cli.prepare):
    # the server and the clients use it as it travels with this config, checked against the
    # budget, never searched again. Not a setting: a user's value is privacy.noise_multiplier.
    planned_noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # The same for DP-FedAvg's (privacy.unit=user; 0 for the clip-only control).
    planned_user_noise_multiplier: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _cross(self) -> RunConfig:
        if self.model.device == "cpu" and self.federation.client_resources.num_gpus > 0:
            raise ValueError("federation.client_resources.num_gpus: > 0 needs model.device=cuda")
        if self.audit.break_mechanism != "none" and not self.audit.enabled:
            raise ValueError("audit.break_mechanism: only inside an audit (audit.enabled=true)")
        # What a strategy supports is checked against its class (strategies/registry.py).
        self._check_recipe()
        if self.audit.enabled and self.privacy.user_level:  # canary devices (audit/user_*)
            if self.privacy.user.aggregation == "secure":
                raise ValueError(
                    "audit.enabled: the user-level audit's canary devices enter the central "
                    "release; privacy.user.aggregation=secure has none"
                )
            if self.audit.break_mechanism not in ("none", "no_noise"):
                raise ValueError(
                    "audit.break_mechanism: a user-level audit can break no_noise only "
                    f"(DP-FedAvg's noise), not {self.audit.break_mechanism}"
                )
            if self.federation.mode != "simulation":
                raise ValueError("audit.enabled: the audit runs on a simulated federation")
        elif self.audit.enabled:
            if not self.privacy.enabled:
                raise ValueError("audit.enabled: audits a DP run; privacy=none has no epsilon")
            if self.privacy.grad_sample_mode == "ghost":
                raise ValueError(
                    "audit.enabled: canaries enter as per-sample gradients, which ghost clipping "
                    "never materialises; use privacy.grad_sample_mode=hooks"
                )
            if self.federation.mode != "simulation":
                raise ValueError("audit.enabled: the audit runs on a simulated federation")
        return self

    def _check_recipe(self) -> None:
        recipe = self.recipe
        if self.num_rounds == 0 and not recipe.prototypes:
            raise ValueError("num_rounds: must be >= 1 (0 only for a prototypes-only head)")
        if self.num_rounds and recipe.prototypes and recipe.prototype_share == 1:
            if self.privacy.enabled:
                raise ValueError(
                    "recipe.prototype_share: 1 spends the whole budget on the prototypes; "
                    "with num_rounds > 0 use a smaller share (or num_rounds=0)"
                )
        self._check_prototypes()
        if recipe.trains == "head" and self.audit.enabled:
            raise ValueError("audit.enabled: the canaries are token rows; not with trains=head")

    def _check_prototypes(self) -> None:
        """A head from DP prototypes first, then the head (trains=head) or the adapters too
        (trains=adapters: the two-stage recipe), under one budget."""
        recipe = self.recipe
        if not recipe.prototypes:
            return
        if self.privacy.user_level:
            raise ValueError("recipe.prototypes: record-level releases; not with privacy.unit=user")
        if recipe.trains == "adapters" and self.model.pooling != "mean":
            raise ValueError(
                "recipe.prototypes: with trains=adapters the model's head must be the "
                "prototypes' (model.pooling=mean)"
            )


def one_line(
    err: ValidationError | Sequence[Any],
    prefix: str = "",
    *,
    missing: str | None = None,
    extra: str | None = None,
) -> str:
    """The first of pydantic's errors as one line: ``key.sub: why[, got value]``. Every
    validation message privfed prints or answers is this one (the run config, a strategy's
    settings, the accountant service's 422s).

    ``err``: the error, or its ``errors()`` list (FastAPI's RequestValidationError gives that);
    ``prefix`` goes before the key (``"strategy."``); ``missing`` and ``extra`` replace
    pydantic's words for a key that is not there or not known.
    """
    errors = err.errors() if isinstance(err, ValidationError) else err
    first: dict[str, Any] = (
        dict(errors[0]) if errors else {"loc": (), "msg": "invalid", "type": "?"}
    )
    loc = prefix + ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    # pydantic prefixes messages raised in validators with "Value error, ".
    msg = first["msg"].removeprefix("Value error, ")
    if kind == "missing" and missing is not None:
        msg = missing
    elif kind == "extra_forbidden" and extra is not None:
        msg = extra
    elif "input" in first and kind not in ("value_error", "missing"):
        value = first["input"]
        if not isinstance(value, dict | list):
            msg = f"{msg}, got {value!r}"
    if kind == "value_error" and ":" in msg.split(" ")[0]:
        # The validator already named a sub-key ("delta: required ...").
        return f"{loc}.{msg}" if loc else msg
    return f"{loc}: {msg}" if loc else msg


def with_todays_keys(saved: dict[str, Any], today: dict[str, Any]) -> dict[str, Any]:
    """A saved run's config (``resume=``) with every key it predates taken from ``today``'s
    composition: what it gives stays as it is. ``strategy`` is its own YAML's (a strategy's
    settings belong to it) and ``hydra`` is Hydra's."""
    out = dict(saved)
    for key, value in today.items():
        if key in ("strategy", "hydra"):
            continue
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = with_todays_keys(out[key], value)
    return out


# What privfed writes into the config once it has calibrated (cli.prepare), and the setting a user
# gives instead.
PLANNED = {
    "planned_noise_multiplier": "privacy.noise_multiplier",
    "planned_user_noise_multiplier": "privacy.user.noise_multiplier",
}


def load_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a composed config (a plain dict; ``hydra`` keys are ignored).

    Raises
    ------
    ConfigError
        With one line naming the first invalid key and the reason.
    """
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    for planned, setting in PLANNED.items():
        if planned in raw:
            raise ConfigError(
                f"{planned}: set by privfed after calibration, not a setting "
                f"({setting} fixes the noise)"
            )
    _reject_non_finite(raw, prefix="")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(one_line(err)) from None


def _reject_non_finite(node: Any, prefix: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _reject_non_finite(value, f"{prefix}{key}.")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix.rstrip('.')}: must be finite, got {node}")
