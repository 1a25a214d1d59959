"""The accountant service's Prometheus metrics.

/metrics answers without a token (Prometheus scrapes it), so by default it shows aggregates
only: how many clients, the largest epsilon spent and the largest fraction of a budget spent.
Per-client epsilon (a list of every client id) needs ``per_client=True``
(``privfed-accountant serve --metrics-per-client``), for deployments whose /metrics is private.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServiceMetrics:
    def __init__(self, per_client: bool = False) -> None:
        r = self.registry = CollectorRegistry()
        self.per_client = per_client
        self._spent: dict[str, tuple[float, float]] = {}  # client -> (spent, budget)
        self.reports = Counter(
            "privfed_accountant_reports", "Reports by outcome", ["outcome"], registry=r
        )
        self.plans = Counter(
            "privfed_accountant_plans", "Plans by outcome", ["outcome"], registry=r
        )
        self.refusals = Counter(
            "privfed_accountant_refusals", "Plans and reports refused by the budget", registry=r
        )
        self.rejected = Counter(
            "privfed_accountant_rejected_requests", "4xx answers", ["status"], registry=r
        )
        self.failed = Counter(
            "privfed_accountant_failed_requests",
            "5xx answers (storage faults, pricing over its limits)",
            ["status"],
            registry=r,
        )
        self.storage_errors = Counter(
            "privfed_accountant_storage_errors", "Group commits that failed on storage", registry=r
        )
        self.pld_deferred = Counter(
            "privfed_accountant_pld_deferred",
            "Reports decided by RDP because their PLD could not be priced in time",
            registry=r,
        )
        self.latency = Histogram(
            "privfed_accountant_request_seconds",
            "Request latency by route",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.batch_items = Histogram(
            "privfed_accountant_commit_items",
            "Reports (and health probes) per group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "privfed_accountant_commit_seconds",
            "Duration of one group commit (its transaction and fsync)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        Gauge("privfed_accountant_clients", "Clients seen since start", registry=r).set_function(
            lambda: len(self._spent)
        )
        Gauge(
            "privfed_accountant_epsilon_spent_max",
            "Largest epsilon spent by one client (of those seen since start)",
            registry=r,
        ).set_function(lambda: max((s for s, _ in self._spent.values()), default=0.0))
        Gauge(
            "privfed_accountant_budget_fraction_max",
            "Largest fraction of its budget one client has spent",
            registry=r,
        ).set_function(lambda: max((s / b for s, b in self._spent.values() if b > 0), default=0.0))
        self.epsilon = (
            Gauge(
                "privfed_accountant_epsilon_spent",
                "Epsilon spent per client",
                ["client"],
                registry=r,
            )
            if per_client
            else None
        )

    def committed(self, items: int, seconds: float) -> None:
        self.batch_items.observe(items)
        self.commit_seconds.observe(seconds)

    def spent(self, client_id: str, epsilon: float, budget: float) -> None:
        self._spent[client_id] = (epsilon, budget)
        if self.epsilon is not None:
            self.epsilon.labels(client=client_id).set(epsilon)
