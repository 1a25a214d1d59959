"""Strategy registry: one YAML file registers a strategy.

``privfed/conf/strategy/<name>.yaml`` names the class (``_target_: module.Class``) and gives
every one of its settings' defaults; ``strategy=<name>`` selects it. A strategy outside the
package works the same way from the user's own config (``strategy._target_=my.module.Class``).
Adding a strategy is therefore two files: its module and its YAML (CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from privfed.config import RunConfig
from privfed.strategies.base import AdapterStrategy

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


def _discover() -> dict[str, type[AdapterStrategy]]:
    found: dict[str, type[AdapterStrategy]] = {}
    for path in sorted(STRATEGY_CONF.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        cls = _load(spec["_target_"], f"privfed/conf/strategy/{path.name}: _target_")
        if not spec["name"] == cls.name == path.stem:
            raise ValueError(
                f"privfed/conf/strategy/{path.name}: name {spec['name']!r}, class name "
                f"{cls.name!r} and file name must agree"
            )
        found[cls.name] = cls
    return found


# name -> class, from the package's strategy YAMLs
STRATEGIES: dict[str, type[AdapterStrategy]] = _discover()


def strategy_class(cfg: RunConfig) -> type[AdapterStrategy]:
    target = cfg.strategy.target
    if target:
        return _load(target, "strategy._target_")
    if cfg.strategy.name not in STRATEGIES:
        raise ValueError(
            f"strategy.name: unknown strategy {cfg.strategy.name!r} (known: {sorted(STRATEGIES)})"
        )
    return STRATEGIES[cfg.strategy.name]


def build_strategy(cfg: RunConfig) -> AdapterStrategy:
    cls = strategy_class(cfg)
    cls.validate_params(cfg)
    return cls(cfg)
