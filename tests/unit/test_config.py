"""Config validation: every bad value fails with one line naming the key and the reason."""

from __future__ import annotations

import pytest

from privfed.cli import prepare
from privfed.config import ConfigError

from ..helpers import TINY, compose_raw, free_port, run_config


def test_defaults_compose_and_validate():
    cfg = run_config()
    assert cfg.strategy.name == "lora"
    assert cfg.privacy.enabled and cfg.privacy.epsilon == 8.0 and cfg.privacy.delta == 1e-5
    assert cfg.model.source == "minilm" and cfg.data.name == "bbc_news"
    assert cfg.federation.num_clients == 10 and cfg.federation.clients_per_round == 10


def test_clients_per_round_follows_num_clients():
    assert run_config("federation.num_clients=20").federation.clients_per_round == 20


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["num_rounds=0"], "num_rounds: must be >= 1 (0 only for a prototypes-only head)"),
        (["privacy.epsilon=-1"], "privacy.epsilon: Input should be greater than 0, got -1"),
        (
            ["privacy.delta=null"],
            "privacy.delta: required when privacy is enabled (epsilon without delta)",
        ),
        (
            ["privacy.clipping=per_layer", "privacy.grad_sample_mode=ghost"],
            "privacy.clipping: per_layer cannot be combined with grad_sample_mode=ghost",
        ),
        (["privacy.clipping=median"], "privacy.clipping: Input should be 'flat' or 'per_layer'"),
        (
            ["federation.clients_per_round=11"],
            "federation.clients_per_round: 11 is more than num_clients=10",
        ),
        (["model.lora.r=0"], "model.lora.r: Input should be greater than or equal to 1, got 0"),
        (["train.batch_size=abc"], "train.batch_size: Input should be a valid integer"),
        (["privacy.epsilon=nan"], "privacy.epsilon: must be finite, got nan"),
        (
            ["federation.client_resources.num_gpus=0.5"],
            "federation.client_resources.num_gpus: > 0 needs model.device=cuda",
        ),
        (["+unknown_key=1"], "unknown_key: Extra inputs are not permitted"),
        (
            ["audit.break_mechanism=no_noise"],
            "audit.break_mechanism: only inside an audit (audit.enabled=true)",
        ),
        (
            ["audit.enabled=true", "privacy=none"],
            "audit.enabled: audits a DP run; privacy=none has no epsilon",
        ),
        (["audit.enabled=true", "privacy.grad_sample_mode=ghost"], "audit.enabled: canaries"),
        (["audit.canaries=1"], "audit.canaries: Input should be greater than or equal to 2"),
        (["audit.confidence=1"], "audit.confidence: Input should be less than 1"),
        (
            ["federation.ray_address=head-node"],
            "federation.ray_address: 'head-node' is not HOST:PORT",
        ),
        (
            ["federation.ray_address=10.0.0.5:6379", "federation.ray_num_cpus=2"],
            "federation.ray_address: a Ray cluster brings its own CPUs",
        ),
    ],
)
def test_bad_values_name_the_key_and_the_reason(overrides, expected):
    with pytest.raises(ConfigError) as err:
        run_config(*overrides)
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_audit_needs_dp_sgd_and_enough_trainable_coordinates():
    with pytest.raises(ConfigError, match=r"audit.enabled: strategy rqm releases through"):
        prepare(
            compose_raw(
                *TINY,
                "audit.enabled=true",
                "strategy=rqm",
                "strategy.mode=privacy",
                "strategy.keep_prob=0.5",
                "privacy.epsilon=1000",
            )
        )
    with pytest.raises(ConfigError, match=r"audit.canaries: 1000000 canaries need as many"):
        prepare(compose_raw(*TINY, "audit.enabled=true", "audit.canaries=1000000"))


def test_an_unregistered_accountant_is_refused_before_start(capsys):
    """A method is a name in privacy/accountant.py's registry, checked before anything starts
    (before the CLI says it loads torch)."""
    with pytest.raises(ConfigError) as err:
        prepare(compose_raw(*TINY, "privacy.accountant.method=moments"))
    assert str(err.value) == (
        "privacy.accountant.method: must be a registered accountant (pld, rdp), got 'moments'"
    )
    seen = capsys.readouterr()
    assert "loading torch" not in seen.out + seen.err


def test_unknown_strategy_is_refused_before_start():
    with pytest.raises(ConfigError, match=r"strategy.name: unknown strategy 'nope'"):
        prepare(compose_raw(*TINY, "strategy.name=nope", "strategy._target_=null"))


def test_unreachable_budget_is_refused_before_start():
    with pytest.raises(ConfigError, match=r"privacy.epsilon: .*cannot be met"):
        prepare(
            compose_raw(*TINY, "privacy.epsilon=0.001", "privacy.delta=1e-10", "num_rounds=100000")
        )


def test_explicit_noise_too_small_for_the_budget_is_refused():
    with pytest.raises(ConfigError, match=r"privacy.noise_multiplier: 0.1 spends epsilon="):
        prepare(compose_raw(*TINY, "privacy.noise_multiplier=0.1"))


def test_more_clients_than_examples_is_refused():
    with pytest.raises(ConfigError, match="federation.num_clients: 500 clients"):
        prepare(
            compose_raw("model=tiny_bert", "data.max_examples=300", "federation.num_clients=500")
        )


def test_prepare_returns_the_calibrated_sigma():
    cfg, sigma = prepare(compose_raw(*TINY, "num_rounds=2"))
    assert cfg.num_rounds == 2 and sigma is not None and 0.1 < sigma < 10
    cfg, sigma = prepare(compose_raw(*TINY, "privacy=none"))
    assert sigma is None


def test_an_unreachable_accountant_service_fails_before_start(monkeypatch):
    port = free_port()  # nobody listens on it
    monkeypatch.setenv("PRIVFED_ACCOUNTANT_OPERATOR_TOKEN", "t")
    raw = compose_raw(
        *TINY,
        "privacy.accountant.backend=http",
        f"privacy.accountant.url=http://127.0.0.1:{port}",
        "privacy.accountant.retry_for_s=0",
    )
    with pytest.raises(ConfigError, match="privacy.accountant.url: no answer"):
        prepare(raw)
    monkeypatch.delenv("PRIVFED_ACCOUNTANT_OPERATOR_TOKEN")
    with pytest.raises(ConfigError, match="PRIVFED_ACCOUNTANT_OPERATOR_TOKEN"):
        prepare(raw)


def test_a_config_saved_before_a_key_existed_resumes_with_todays_default():
    """Resuming a run saved before a key (here reuse_client_model): its config.yaml lacks it
    and conf/ has no second default in the code, so the key comes from today's composition;
    what the run saved is kept, also where today's differs."""
    from privfed.config import load_config, with_todays_keys

    today = compose_raw(*TINY)
    saved = compose_raw(*TINY, "privacy.epsilon=3", "strategy=fedsvd")
    del saved["federation"]["reuse_client_model"]
    with pytest.raises(ConfigError, match="federation.reuse_client_model: Field required"):
        load_config(saved)
    resumed = load_config(with_todays_keys(saved, today))
    assert resumed.federation.reuse_client_model is True
    assert resumed.privacy.epsilon == 3 and resumed.strategy.name == "fedsvd"
    saved["federation"]["reuse_client_model"] = False
    assert load_config(with_todays_keys(saved, today)).federation.reuse_client_model is False
    # the strategy's settings are its own YAML's, never another strategy's
    assert with_todays_keys(saved, today)["strategy"] == saved["strategy"]


def test_the_code_holds_no_default_of_a_setting():
    """conf/ is the only source: every field of the run's models is required (a key the YAML
    forgets fails), but for what is not a setting (the planned sigma, a strategy's target)."""
    from pydantic import BaseModel

    from privfed.config import RunConfig

    def fields_with_defaults(model: type[BaseModel], prefix: str = "") -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            if not field.is_required():
                found.append(prefix + name)
            for arg in (*getattr(field.annotation, "__args__", ()), field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    found += fields_with_defaults(arg, f"{prefix}{name}.")
        return found

    assert set(fields_with_defaults(RunConfig)) == {
        "planned_noise_multiplier",
        "planned_user_noise_multiplier",
        "strategy.target",
    }
