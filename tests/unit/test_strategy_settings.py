"""Each strategy's settings: a frozen, validated model whose only defaults are conf/'s."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from privfed.config import ConfigError
from privfed.strategies.base import Supports
from privfed.strategies.lora import LoraFedAvg
from privfed.strategies.registry import STRATEGIES, build_strategy
from privfed.strategies.settings import Count, StrategySettings

from ..helpers import TINY, compose_raw, run_config

CONF = Path(__file__).resolve().parents[2] / "privfed" / "conf" / "strategy"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_conf_gives_exactly_the_settings_each_strategy_declares(name):
    # conf/strategy/<name>.yaml is the one source of defaults: it names every field of the
    # strategy's Settings and nothing else, and the model accepts it as it is.
    given = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    settings = STRATEGIES[name].Settings
    fields = {f.alias or n for n, f in settings.model_fields.items()}
    assert set(given) == fields, name
    for field in settings.model_fields.values():
        if field.alias != "_target_":
            assert field.is_required(), f"{name}: a default in code besides conf/"
    strategy = build_strategy(run_config(*TINY, f"strategy={name}"))
    assert strategy.settings.name == name
    with pytest.raises(Exception, match="frozen"):
        strategy.settings.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("strategy=rqm", "strategy.levels=true"), "strategy.levels: Input should be a valid int"),
        (("strategy=rqm", "strategy.levels=300"), "strategy.levels: Input should be less than"),
        (("strategy=rqm", "strategy.clip='0.1'"), "strategy.clip: Input should be a valid number"),
        (
            ("strategy=rqm", "+strategy.clipp=0.1"),
            "strategy.clipp: not a setting of strategy 'rqm'",
        ),
        (("strategy=fed_sb", "strategy.init=pca"), "strategy.init: Input should be 'svd' or"),
        (("strategy=fed_sb", "strategy.init_budget_share=1"), "strategy.init_budget_share"),
        (("strategy=fedmentor", "strategy.gamma=0"), "strategy.gamma: Input should be greater"),
        (
            ("strategy=fedmentor", "strategy.domains.low.sensitivity=-1"),
            "strategy.domains.low.sensitivity: Input should be greater than 0",
        ),
        (("strategy=fedmentor", "strategy.client_domains=[high]"), "client_domains: has 1 entries"),
        (("strategy=fedmentor", "~strategy.sigma_min"), "strategy.sigma_min: missing"),
        (("strategy=fedsvd", "strategy.refactor_every=1.5"), "strategy.refactor_every: Input"),
    ],
)
def test_a_bad_setting_fails_before_start_with_one_line_naming_it(overrides, message):
    from privfed.cli import prepare

    with pytest.raises((ConfigError, ValueError), match=message.replace("(", r"\(")) as err:
        prepare(compose_raw(*TINY, *overrides))
    assert "\n" not in str(err.value)


class UsersOwnStrategy(LoraFedAvg):
    """A strategy outside the package, with settings of its own (strategy._target_)."""

    name = "users_own"

    class Settings(StrategySettings):
        warmup_rounds: Count

    settings: Settings


def test_a_users_own_strategy_declares_its_settings_the_same_way():
    target = f"strategy._target_={__name__}.UsersOwnStrategy"
    given = build_strategy(run_config(*TINY, target, "+strategy.warmup_rounds=2"))
    assert isinstance(given, UsersOwnStrategy) and given.settings.warmup_rounds == 2
    with pytest.raises(ValueError, match="strategy.warmup_rounds: missing: .*Settings needs it"):
        build_strategy(run_config(*TINY, target))


class UsersHeadOnlyStrategy(LoraFedAvg):
    """A user's strategy that declares it cannot take user-level DP but can train a head."""

    name = "users_head_only"
    supports: ClassVar[Supports] = Supports(
        user_level=False, why_not_user_level="it says so", head_alone=True
    )


def test_what_a_strategy_supports_is_read_from_its_class_not_from_a_list():
    target = f"strategy._target_={__name__}.UsersHeadOnlyStrategy"
    # it declares head_alone: a head run builds, though its name is on no list
    head = build_strategy(run_config(*TINY, target, "recipe=head"))
    assert isinstance(head, UsersHeadOnlyStrategy)
    with pytest.raises(ValueError, match="privacy.unit: .* not users_head_only: it says so"):
        build_strategy(run_config(*TINY, target, "privacy=user"))
    with pytest.raises(ValueError, match="recipe.prototypes: with strategy=.*not users_head_only"):
        build_strategy(run_config(*TINY, target, "recipe=head", "recipe.prototypes=true"))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_package_strategy_is_refused_exactly_where_it_declares_no_support(name):
    cls = STRATEGIES[name]
    cases = {  # feature: (the run that needs it, the key its refusal names)
        "user_level": (("privacy=user",), "privacy.unit"),
        "head_alone": (("recipe=head",), "recipe.trains"),
    }
    extra = ("strategy.init=random",) if name == "fed_sb" else ()
    for feature, (overrides, key) in cases.items():
        cfg = run_config(*TINY, f"strategy={name}", *extra, *overrides)
        if getattr(cls.supports, feature):
            assert isinstance(build_strategy(cfg), cls)
        else:
            with pytest.raises(ValueError, match=f"^{key}: .*{name}"):
                build_strategy(cfg)
