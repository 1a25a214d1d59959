"""User-level DP (``privacy.unit=user``): DP-FedAvg around any strategy that supports it, all of
it in one place.

A strategy whose payload is a plain tensor set (``Supports.user_level``) gets one of these in
place of its plain aggregation; the round (strategies/base.py) asks it whom to sample (Poisson,
from a secret stream), whether a reply's update is within C (``clipping=client``), and what to
release: the clipped updates' noised mean over the expected number of devices, made even when
nobody answered, which the strategy then aggregates as its one payload (post-processing), and
after it the next round's C (adaptive clipping, Andrew et al. 2021). The server's loop asks it
for the population's ledger: whether a round fits the per-user budget, and each round's event,
charged there. The math is privacy/user_level.py's; sigma is calibrated once before start
(server/prepared.py) and carried with the config, checked here where it is used.

With ``aggregation=central`` the guarantee is central: the server sees each device's update.
With ``aggregation=secure`` the devices add the noise as discrete Gaussian shares and SecAgg+
shows the server only the noised sum (server/secure_round.py, client/secure_aggregation.py);
here it is the plan and the release.
"""

from __future__ import annotations

import functools
from logging import WARNING
from pathlib import Path
from typing import Any, Protocol

from flwr.common import log

from privfed.config import RunConfig
from privfed.privacy import user_level
from privfed.privacy.calibration import user_noise_multiplier, user_sampling_rate
from privfed.privacy.events import PrivacyEvent
from privfed.privacy.invariants import required
from privfed.privacy.ledger import EventKey, Ledger
from privfed.privacy.secure_plan import SecurePlan, secure_plan
from privfed.randomness import RandomStream
from privfed.strategies.replies import InvalidReply, RoundOutcome
from privfed.tensors import State


class UpdateAudit(Protocol):
    """What a user-level audit plugs into the release (audit/user_canaries.py): canary
    devices' updates, released with the real ones, and a look at each release."""

    def updates(self, reference: State, clip_norm: float) -> list[State]: ...

    def observe(self, server_round: int, released: State, reference: State) -> None: ...


class UserLevelDP:
    """DP-FedAvg for one run (McMahan et al. 2018), with its state: this round's C."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.settings = cfg.privacy.user
        # this round's C: adaptive clipping moves it, from noised releases only (public)
        self.clip_norm = self.settings.clip_norm
        self.audit: UpdateAudit | None = None  # a user-level audit's canary devices
        self.ledger: Ledger | None = None  # the population's, on the server (open_ledger)
        # aggregation=secure: the update's coordinates, which the plan needs (server/prepared.py)
        self.dim: int | None = None

    # -- the plan -----------------------------------------------------------------------------
    @functools.cached_property
    def sigma(self) -> float:
        """The round's noise multiplier: the planned one (or the user's), checked against the
        per-user budget; searched only where the config carries none (BudgetUnreachableError)."""
        sigma = user_noise_multiplier(self.cfg, self.dim)
        return required(sigma, "the user-level noise multiplier")

    @property
    def secure(self) -> bool:
        """``aggregation=secure``: devices add the noise, SecAgg+ hides each one's vector."""
        return self.settings.aggregation == "secure"

    @property
    def secure_plan(self) -> SecurePlan:
        """The secure round's plan (lattice, each device's noise, survivors): what every device
        needs to make its share."""
        dim = required(self.dim, "the update's size (server/prepared.py sets it)")
        return secure_plan(self.cfg, self.rate, dim, self.sigma)

    @property
    def rate(self) -> float:
        """Each device's Poisson sampling rate q = clients_per_round / num_clients."""
        return user_sampling_rate(self.cfg)

    @property
    def expected_devices(self) -> float:
        """The fixed denominator: q N, the expected number of sampled devices."""
        return self.rate * self.cfg.federation.num_clients

    @property
    def count_noise_std(self) -> float:
        """Adaptive clipping's noise on the count (default: expected devices / 20, the paper's)."""
        given = self.settings.count_noise_std
        return given if given is not None else self.expected_devices / 20.0

    @functools.cached_property
    def update_sigma(self) -> float:
        """The noise multiplier on the updates' sum: the round's own, or with adaptive clipping
        what is left of it beside the count's noise (ValueError if nothing is)."""
        if not self.settings.adaptive:
            return self.sigma
        return user_level.update_noise_multiplier(self.sigma, self.count_noise_std)

    def round_event(self) -> PrivacyEvent:
        """One round for the population: a sampled Gaussian, or under secure aggregation the
        distributed discrete Gaussian every sampled device records itself."""
        if self.secure:
            return self.secure_plan.event()
        return user_level.round_event(self.rate, self.sigma)

    # -- the round ----------------------------------------------------------------------------
    def sample(self, node_ids: list[int]) -> list[int]:
        """Poisson sampling from a secret stream: the amplification holds only if nobody can
        tell who was sampled."""
        stream = RandomStream.secret("user_level.client_sampling")
        return user_level.poisson_sample(node_ids, self.rate, stream)

    def on_device(self, payload: State, reference: State) -> State:
        """What a device sends: with ``clipping=client`` its update clipped to C by itself
        (the server then checks it: :meth:`screen`); otherwise as it is."""
        if self.settings.clipping != "client":
            return payload
        return user_level.clipped_payload(payload, reference, self.settings.clip_norm)

    def screen(self, payload: State, reference: State) -> None:
        """``clipping=client``: a device's update over C is rejected, not clipped quietly."""
        if self.settings.clipping != "client":
            return
        norm = user_level.l2_norm(user_level.update_of(payload, reference))
        limit = self.settings.clip_norm
        if norm > limit * (1 + user_level.CLIENT_CLIP_SLACK):
            raise InvalidReply(
                f"update norm {norm:.4g} exceeds privacy.user.clip_norm={limit:g} "
                "(clipping=client: devices clip their own updates)"
            )

    def release(
        self, server_round: int, reference: State, payloads: list[State], out: RoundOutcome
    ) -> State:
        """The round's one release: ``reference`` plus the clipped updates' noised mean over
        the expected number of devices (privacy/user_level.py), also when nobody answered.
        Nothing per device goes into ``out``; with adaptive clipping, the noised fraction
        within C, which also moves the next round's C."""
        updates = [user_level.update_of(p, reference) for p in payloads]
        clip_norm, sigma = self.clip_norm, self.update_sigma
        if self.audit is not None:  # canary devices, indistinguishable from real ones
            updates += self.audit.updates(reference, clip_norm)
            if self.cfg.audit.break_mechanism == "no_noise":  # charged as if intact
                sigma = 0.0
        released = user_level.noised_mean(
            reference,
            updates,
            clip_norm,
            sigma,
            self.expected_devices,
            RandomStream.secret("user_level.noise"),
            self.settings.server_learning_rate,
        )
        if self.audit is not None:
            self.audit.observe(server_round, released, reference)
        out.extra = {}  # e.g. aggregation_error would describe un-noised updates
        if self.settings.adaptive:  # the next round's C, from a noised count (in the round's sigma)
            within = user_level.noised_fraction_within(
                [user_level.l2_norm(u) for u in updates],
                clip_norm,
                self.count_noise_std,
                self.expected_devices,
                RandomStream.secret("user_level.count_noise"),
            )
            self.clip_norm = user_level.next_clip_norm(
                clip_norm, within, self.settings.target_quantile, self.settings.clip_learning_rate
            )
            out.extra = {"user_fraction_within_clip": within}
        return released

    def release_secure(self, reference: State, summed: State) -> State:
        """Secure aggregation's release: ``reference`` plus the server's step along the noised
        sum of the clipped updates (decoded from the ring) over the expected devices, the same
        post-processing as the central release; nothing else of the round is seen."""
        step = self.settings.server_learning_rate / self.expected_devices
        return {
            name: (ref.double() + step * summed[name].double()).to(ref.dtype)
            for name, ref in reference.items()
        }

    # -- the population's ledger (on the server) ----------------------------------------------
    def open_ledger(self, path: Path) -> Ledger:
        """The population's ledger with the per-user budget: DP-FedAvg is the server's own
        mechanism, so the server charges it (each device accounts its record level itself)."""
        ledger = Ledger(path)
        ledger.set_budget(
            user_level.POPULATION,
            self.settings.epsilon,  # type: ignore[arg-type]  # required for unit=user
            self.settings.delta,
            self.cfg.privacy.accountant.method,
        )
        self.ledger = ledger
        return ledger

    def allows(self, server_round: int) -> bool:
        """Before a round: does its release fit the population's budget?"""
        if self.ledger is None or self.settings.clip_only:
            return True
        answer = self.ledger.plan(user_level.POPULATION, self.round_event())
        if not answer.accepted:
            log(
                WARNING,
                "privfed: user-level budget: round %d would spend epsilon=%.3f > %g; stopping",
                server_round,
                answer.epsilon_after,
                answer.epsilon_budget,
            )
        return answer.accepted

    def charge(self, server_round: int, run_id: str, process_id: str) -> float | None:
        """After the round's release, before anything of it is written: one sampled Gaussian
        for the population. Keyed by the server process too: a round replayed after a crash is
        a second release with fresh noise, and is charged again. Returns the epsilon spent."""
        if self.ledger is None or self.settings.clip_only:
            return None  # a clip-only control releases without noise: no guarantee to charge
        name = f"{user_level.EVENT_NAME}/{process_id}"
        key = EventKey(run_id, user_level.POPULATION, server_round, name)
        answer = self.ledger.report(key, self.round_event())
        if not answer.accepted:  # allows() said it fits: a changed ledger
            raise RuntimeError(f"user-level budget refused round {server_round}: {answer}")
        return answer.epsilon_spent

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"user_clip_norm": self.clip_norm}  # adaptive clipping's state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip_norm = state.get("user_clip_norm", self.clip_norm)
