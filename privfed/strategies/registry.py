"""Strategy registry: names -> classes; a Hydra ``_target_`` (``module.Class``) also works, so a
user adds a strategy without touching the package."""

from __future__ import annotations

import importlib

from privfed.config import RunConfig
from privfed.strategies.base import AdapterStrategy
from privfed.strategies.fed_sb import FedSB
from privfed.strategies.fedmentor import FedMentor
from privfed.strategies.fedsvd import FedSVD
from privfed.strategies.ffa_lora import FFALoRA
from privfed.strategies.lora import LoraFedAvg
from privfed.strategies.rqm import RQM

STRATEGIES: dict[str, type[AdapterStrategy]] = {
    LoraFedAvg.name: LoraFedAvg,
    FFALoRA.name: FFALoRA,
    FedSVD.name: FedSVD,
    FedSB.name: FedSB,
    RQM.name: RQM,
    FedMentor.name: FedMentor,
}


def register(cls: type[AdapterStrategy]) -> type[AdapterStrategy]:
    """Class decorator: ``@register`` makes ``strategy.name=<cls.name>`` resolvable."""
    STRATEGIES[cls.name] = cls
    return cls


def strategy_class(cfg: RunConfig) -> type[AdapterStrategy]:
    target = cfg.strategy.target
    if target:
        module, _, attr = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"strategy._target_: cannot import {target!r} ({err})") from None
        if not (isinstance(cls, type) and issubclass(cls, AdapterStrategy)):
            raise ValueError(f"strategy._target_: {target!r} is not an AdapterStrategy")
        return cls
    if cfg.strategy.name not in STRATEGIES:
        raise ValueError(
            f"strategy.name: unknown strategy {cfg.strategy.name!r} (known: {sorted(STRATEGIES)})"
        )
    return STRATEGIES[cfg.strategy.name]


def build_strategy(cfg: RunConfig) -> AdapterStrategy:
    cls = strategy_class(cfg)
    cls.validate_params(cfg)
    return cls(cfg)
