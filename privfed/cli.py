"""``privfed``: the Hydra entry point.

    privfed                                   # default federation (privfed/conf/config.yaml)
    privfed strategy=lora privacy.epsilon=3 privacy.clipping=per_layer num_rounds=10
    privfed privacy=none                      # non-private baseline
    privfed -m privacy.epsilon=1,3,8          # multirun sweep
    privfed resume=outputs/<date>/<time>      # continue a killed run

Order of work: compose -> validate everything (types, ranges, combinations, the strategy's own
parameters, the data partition, whether the privacy budget can be met) -> only then start the
federation. A bad value prints one line naming the key and the reason and exits with code 2,
leaving nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from privfed.config import ConfigError, RunConfig, load_config, with_todays_keys
from privfed.telemetry.console import say, show_bars

if TYPE_CHECKING:
    from privfed.server.prepared import PreparedRun

EXIT_BAD_CONFIG = 2
# Inside the package (package data): an installed privfed finds its config from any directory.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def _fail(message: str, run_dir: Path | None) -> None:
    print(f"privfed: invalid config: {message}", file=sys.stderr)
    if run_dir is not None and run_dir.exists():
        leftovers = {p.name for p in run_dir.iterdir()} - {".hydra", "cli.log", "privfed.log"}
        if not leftovers:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing started: leave nothing behind
    raise SystemExit(EXIT_BAD_CONFIG)


def prepare(raw: dict[str, Any], run_dir: Path | None = None) -> tuple[RunConfig, float | None]:
    """Validate a composed config completely; returns it with the run's noise multiplier (see
    :func:`prepare_run`)."""
    prepared = prepare_run(raw, run_dir)
    return prepared.cfg, prepared.sigma


def prepare_run(raw: dict[str, Any], run_dir: Path | None = None) -> PreparedRun:
    """Validate a composed config completely and prepare the run once (server/prepared.py):
    what a simulation then plays. Says what it does, phase by phase (after ``run_dir``, once
    the values themselves are valid).

    Raises ConfigError (one line: key and reason) on anything that would fail later.
    """
    cfg = load_config(raw)
    from privfed.privacy.accountant import check_configured  # numpy and pydantic: no torch

    check_configured(cfg)
    show = cfg.telemetry.progress
    if run_dir is not None:
        say("run directory", str(run_dir), show)
    say("start", "loading torch, transformers, Flower and Ray", show)
    # Imported only now: they take seconds, and the values above are checked without them.
    from privfed.privacy.calibration import BudgetUnreachableError
    from privfed.privacy.invariants import required
    from privfed.server import prepared as preparation

    try:
        prepared = preparation.prepare_run(cfg, lambda phase, what: say(phase, what, show))
        cfg = prepared.cfg
        if cfg.audit.enabled:
            _check_audit(cfg, prepared.strategy, prepared.model)
        say("privacy", _privacy_plan(cfg, prepared.data.sizes(), prepared.sigma), show)
        if cfg.privacy.user_level:
            sigma = required(prepared.user_sigma, "user sigma")
            say("user-level", _user_level_plan(cfg, sigma), show)
        if cfg.privacy.enabled and cfg.privacy.accountant.backend == "http":
            _check_accountant_service(cfg)
    except BudgetUnreachableError as err:
        raise ConfigError(f"privacy.epsilon: {err}") from None
    except (ValueError, FileNotFoundError, OSError) as err:
        raise ConfigError(str(err)) from None
    return prepared


def _user_level_plan(cfg: RunConfig, sigma: float) -> str:
    """One line: DP-FedAvg's noise and what it protects."""
    from privfed.privacy.calibration import user_sampling_rate

    u = cfg.privacy.user
    if u.clip_only:
        return (
            f"a CLIP-ONLY CONTROL: updates clipped to C = {u.clip_norm:g}, no noise, NO "
            "user-level guarantee (privacy.user.noise_multiplier=0); for comparison only"
        )
    where = (
        "added by the devices as discrete Gaussian shares that secure aggregation sums (the "
        "server sees the noised sum only; the survivors' noise, above)"
        if u.aggregation == "secure"
        else "added by the server (central: it protects a device against everyone who sees the "
        "model, not the server)"
    )
    adaptive = (
        f"; adaptive clipping from C = {u.clip_norm:g} towards the {u.target_quantile:g} "
        f"quantile of update norms (the count's noise is part of the same sigma)"
        if u.adaptive
        else ""
    )
    return (
        f"DP-FedAvg noise multiplier {sigma:.4f} for epsilon = {u.epsilon:g}, delta = "
        f"{u.delta:g} per user (a whole device) over {cfg.num_rounds} rounds "
        f"({cfg.privacy.accountant.method.upper()}); Poisson sampling of devices at q = "
        f"{user_sampling_rate(cfg):.4f}, updates clipped to C = {u.clip_norm:g} by the "
        f"{u.clipping}, noise std {sigma * u.clip_norm:.4g} on their sum, " + where + adaptive
    )


def _privacy_plan(cfg: RunConfig, sizes: list[int], sigma: float | None) -> str:
    """One line: the noise the run calibrated and what each client does with it."""
    p = cfg.privacy
    if not p.enabled:
        if p.user_level:
            return "no record-level DP-SGD on the devices (user-level DP only, below)"
        return "none (a non-private run: no clipping, no noise, no accounting)"
    from privfed.privacy.calibration import client_plans, prototype_noise_multiplier

    prototypes = ""
    sigma_p = prototype_noise_multiplier(cfg)
    if sigma_p is not None:
        prototypes = (
            f"the head's prototypes: one Gaussian release per client, noise multiplier "
            f"{sigma_p:.4f} ({cfg.recipe.prototype_share:g} of the budget as 1/sigma^2)"
        )
        if cfg.num_rounds == 0:
            return f"{prototypes}, for epsilon = {p.epsilon:g}, delta = {p.delta:g}; no rounds"
        prototypes = f"; {prototypes}"

    plans = sorted(set(client_plans(sizes, cfg.train)))
    qs = [q for q, _ in plans]
    steps = sorted({s for _, s in plans})
    passes = sorted({round(q * s, 2) for q, s in plans})
    passes_txt = f"{passes[0]:.2f}" if len(passes) == 1 else f"{passes[0]:.2f}-{passes[-1]:.2f}"
    rounds = f"{cfg.num_rounds} round{'s' if cfg.num_rounds != 1 else ''}"
    sigma_txt = f"{sigma:.4f}" if sigma is not None else "the strategy's own mechanism"
    return (
        f"noise multiplier {sigma_txt} for epsilon = {p.epsilon:g}, delta = {p.delta:g} over "
        f"{rounds} ({p.accountant.method.upper()} accountant); per client and round: "
        f"sampling rate {min(qs):.3f}-{max(qs):.3f}, "
        f"{'/'.join(map(str, steps))} DP-SGD step(s) ({passes_txt} expected passes over its "
        f"data), clipping {p.clipping} at C = {p.max_grad_norm:g}" + prototypes
    )


def _check_audit(cfg: RunConfig, strategy: Any, model: Any) -> None:
    """Canaries enter DP-SGD, one trainable coordinate each: both must exist. ``model`` is the
    prepared run's (the server's), so it is read, never re-frozen here."""
    from privfed.models.backbone import adapter_names

    if strategy.uses_own_mechanism():
        raise ValueError(
            f"audit.enabled: strategy {cfg.strategy.name} releases through its own mechanism "
            "here, not DP-SGD; the audit's canaries enter DP-SGD"
        )
    from privfed.audit.canaries import CanaryPlan

    adapters = set(adapter_names(model))
    # what DP-SGD trains, in parameter order (set_trainable's set), without setting it
    numels = [
        p.numel() for n, p in model.named_parameters() if n in adapters and strategy.trainable(n)
    ]
    CanaryPlan(cfg.audit, cfg.federation.num_clients).coordinates(numels)  # m <= coordinates


def _check_accountant_service(cfg: RunConfig) -> None:
    """The service answers and the operator token is accepted, before anything starts."""
    from privfed.privacy.backends import server_accountant
    from privfed.privacy.service.client import AccountantError, AccountantUnavailable

    url = cfg.privacy.accountant.url
    try:
        accountant = server_accountant(cfg.privacy, Path("unused"), retry_for_s=5.0)
        accountant.clients()
    except AccountantUnavailable as err:
        raise ValueError(f"privacy.accountant.url: no answer from {url} ({err})") from None
    except AccountantError as err:
        raise ValueError(f"privacy.accountant: {url} refused the operator token ({err})") from None


def _resolve(cfg: DictConfig) -> dict[str, Any]:
    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping of keys to values")
    return {str(key): value for key, value in raw.items()}


def run(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    show = bool(OmegaConf.select(cfg, "telemetry.progress", default=True))
    show_bars(show)  # in this process only: Ray actors load the same data quietly
    # Flower logs through its own console handler; keep its DEBUG lines out of Hydra's root one.
    logging.getLogger("flwr").propagate = False
    try:
        raw = _resolve(cfg)
        if raw.get("resume"):
            resume_dir = Path(str(raw["resume"]))
            if not (resume_dir / "config.yaml").exists():
                raise ConfigError(f"resume: {resume_dir} has no config.yaml (not a privfed run)")
            shutil.rmtree(run_dir, ignore_errors=True)  # the resumed run writes to its own dir
            run_dir = resume_dir
            saved = _resolve(OmegaConf.load(resume_dir / "config.yaml"))  # type: ignore[arg-type]
            # A key added since the run was saved takes today's default (conf/ is the only
            # source of defaults); every key the run saved stays as it was.
            raw = with_todays_keys(saved, raw)
            raw["resume"] = str(resume_dir)
        prepared = prepare_run(raw, run_dir)
        run_cfg = prepared.cfg
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        _fail(f"{key}: {getattr(err, 'msg', err)}".lstrip(": "), run_dir)
    except ConfigError as err:
        _fail(str(err), run_dir)

    from privfed.telemetry.run_dir import RunDirectory

    directory = RunDirectory(run_dir)
    if not directory.config_file.exists():
        directory.config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    if run_cfg.federation.mode == "simulation":
        from privfed.simulation import run_simulation

        run_simulation(prepared, directory)  # the server plays the prepared run itself
        if run_cfg.audit.enabled and run_cfg.privacy.user_level:
            from privfed.audit.user_report import finish_user_audit

            finish_user_audit(run_cfg, directory.path)  # exits 3 if the bound exceeds epsilon
        elif run_cfg.audit.enabled:
            from privfed.audit.report import finish_audit

            finish_audit(run_cfg, directory.path)  # exits 3 if the bound exceeds the theory
    else:
        from privfed.deployment import submit

        submit(run_cfg, directory)
    say(
        "run directory",
        f"{directory.path} (config.yaml, metrics.jsonl, summary.json, plot.png)",
        show,
    )
    summary = directory.summary_file
    if summary.exists():
        import json

        return json.loads(summary.read_text()).get("final_accuracy")
    return None


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> float | None:
    return run(cfg)


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's DB layer logs at INFO
    _hydra_main()


if __name__ == "__main__":
    main()
