"""A strategy's own settings: a frozen, validated model per strategy, read from ``strategy.*``.

Every strategy class names its ``Settings`` (a subclass of :class:`StrategySettings`); the run
validates them before anything starts (``AdapterStrategy.validate_params``). The defaults live in
``privfed/conf/strategy/<name>.yaml`` and only there: the fields here have none, so a key the
YAML forgets is an error, not a silent second default.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privfed.config import RunConfig, one_line

# Numbers as a config file gives them: a bool or a string is not a number, inf and nan are not
# settings (int -> float is fine: `server_lr: 1`).
Real = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
Fraction = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1)]
Count = Annotated[int, Field(strict=True, ge=1)]


class StrategySettings(BaseModel):
    """What every strategy has: its name (and a ``_target_`` class, for a user's own)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: str
    target: str | None = Field(default=None, alias="_target_")


S = TypeVar("S", bound=StrategySettings)


def read_settings(settings: type[S], cfg: RunConfig) -> S:
    """``cfg.strategy`` as ``settings``; a bad value: ``ValueError("strategy.<key>: why")``."""
    raw: dict[str, Any] = cfg.strategy.model_dump(by_alias=True)
    try:
        return settings.model_validate(raw)
    except ValidationError as err:
        name = raw.get("name")
        # the package's strategies: their YAML gives every key; a user's: their own config
        missing = f"missing (privfed/conf/strategy/{name}.yaml gives every key)"
        if raw.get("_target_") and not str(raw["_target_"]).startswith("privfed."):
            missing = f"missing: {settings.__qualname__} needs it, give it in your strategy config"
        extra = f"not a setting of strategy {name!r}"
        raise ValueError(one_line(err, "strategy.", missing=missing, extra=extra)) from None
