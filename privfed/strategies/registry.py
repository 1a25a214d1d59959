"""Strategy registry: one YAML file registers a strategy.

``privfed/conf/strategy/<name>.yaml`` names the class (``_target_: module.Class``) and gives
every one of its settings' defaults; ``strategy=<name>`` selects it. A strategy outside the
package works the same way from the user's own config (``strategy._target_=my.module.Class``).
Adding a strategy is therefore two files: its module and its YAML (CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from privfed.config import RunConfig
from privfed.strategies.base import AdapterStrategy
from privfed.strategies.settings import StrategySettings

STRATEGY_CONF = Path(__file__).resolve().parent.parent / "conf" / "strategy"


def _load(target: str, where: str) -> type[AdapterStrategy]:
    module, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{where}: cannot import {target!r} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, AdapterStrategy)):
        raise ValueError(f"{where}: {target!r} is not an AdapterStrategy")
    return cls


def _discover() -> tuple[dict[str, type[AdapterStrategy]], dict[str, dict[str, Any]]]:
    found: dict[str, type[AdapterStrategy]] = {}
    specs: dict[str, dict[str, Any]] = {}
    for path in sorted(STRATEGY_CONF.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        cls = _load(spec["_target_"], f"privfed/conf/strategy/{path.name}: _target_")
        if not spec["name"] == cls.name == path.stem:
            raise ValueError(
                f"privfed/conf/strategy/{path.name}: name {spec['name']!r}, class name "
                f"{cls.name!r} and file name must agree"
            )
        found[cls.name] = cls
        specs[cls.name] = spec
    return found, specs


# name -> class, and name -> its YAML (the settings' defaults), from the package's strategy YAMLs
STRATEGIES, DEFAULTS = _discover()


def default_settings(name: str) -> StrategySettings:
    """A package strategy's settings as its YAML gives them (read once, at discovery)."""
    return STRATEGIES[name].Settings.model_validate(DEFAULTS[name])


def strategy_class(cfg: RunConfig) -> type[AdapterStrategy]:
    target = cfg.strategy.target
    if target:
        return _load(target, "strategy._target_")
    if cfg.strategy.name not in STRATEGIES:
        raise ValueError(
            f"strategy.name: unknown strategy {cfg.strategy.name!r} (known: {sorted(STRATEGIES)})"
        )
    return STRATEGIES[cfg.strategy.name]


def supporting(feature: str) -> list[str]:
    """The package's strategies whose ``supports`` has ``feature`` (a field of Supports)."""
    return [name for name, cls in STRATEGIES.items() if getattr(cls.supports, feature)]


def check_supported(cls: type[AdapterStrategy], cfg: RunConfig) -> None:
    """The run's modes against what the strategy declares (``AdapterStrategy.supports``);
    ``ValueError("<key>: why")`` naming the strategies that would do."""
    supports, name = cls.supports, cls.name
    if cfg.privacy.user_level and not supports.user_level:
        raise ValueError(
            f"privacy.unit: user-level DP supports {', '.join(supporting('user_level'))}; "
            f"not {name}: {supports.why_not_user_level}"
        )
    if cfg.recipe.trains == "head" and not supports.head_alone:
        raise ValueError(
            f"recipe.trains: head trains no LoRA factors, which {name} aggregates its own way; "
            f"use strategy={', '.join(supporting('head_alone'))}"
        )
    if cfg.recipe.prototypes and not supports.prototype_head:
        raise ValueError(
            f"recipe.prototypes: with strategy={', '.join(supporting('prototype_head'))} (the "
            f"head aggregated by FedAvg), not {name}"
        )


def build_strategy(cfg: RunConfig) -> AdapterStrategy:
    cls = strategy_class(cfg)
    check_supported(cls, cfg)
    cls.validate_params(cfg)
    return cls(cfg)
