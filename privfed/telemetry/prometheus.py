"""Prometheus metrics of the server process (off unless telemetry.prometheus_port is set)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class ServerMetrics:
    def __init__(self, port: int | None, host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter("privfed_rounds", "Finished federated rounds", registry=r)
        self.round = Gauge("privfed_round", "Last finished round", registry=r)
        self.accuracy = Gauge("privfed_accuracy", "Test accuracy of the global model", registry=r)
        self.loss = Gauge("privfed_loss", "Test loss of the global model", registry=r)
        self.val_accuracy = Gauge(
            "privfed_val_accuracy", "Validation accuracy of the global model", registry=r
        )
        self.epsilon = Gauge(
            "privfed_epsilon_spent", "Epsilon spent per client", ["client"], registry=r
        )
        self.epsilon_max = Gauge(
            "privfed_epsilon_spent_max", "Max epsilon over clients", registry=r
        )
        self.noise = Gauge("privfed_noise_multiplier", "DP-SGD noise multiplier", registry=r)
        self.clients = Counter(
            "privfed_clients", "Client outcomes per round", ["outcome"], registry=r
        )
        self.bytes = Counter("privfed_bytes", "Serialized message bytes", ["direction"], registry=r)
        self.domain = Gauge(
            "privfed_domain",
            "Per-domain sigma, epsilon spent and utility (FedMentor)",
            ["domain", "quantity"],
            registry=r,
        )
        self.server = None
        if port is not None:
            self.server, _ = start_http_server(port, addr=host, registry=r)

    def observe_round(self, row: dict[str, Any], per_client: dict[str, float]) -> None:
        self.rounds.inc()
        self.round.set(row["round"])
        if row["accuracy"] is not None:  # null: eval.test=false
            self.accuracy.set(row["accuracy"])
            self.loss.set(row["loss"])
        if row.get("val_accuracy") is not None:
            self.val_accuracy.set(row["val_accuracy"])
        if row["epsilon_max"] is not None:  # null: withheld under user-level DP
            self.epsilon_max.set(row["epsilon_max"])
        self.noise.set(row["noise_multiplier"] or 0.0)
        for client, eps in per_client.items():
            self.epsilon.labels(client=client).set(eps)
        for outcome in ("trained", "sat_out", "rejected", "failed"):
            if row[f"clients_{outcome}"] is not None:  # null: withheld under user-level DP
                self.clients.labels(outcome=outcome).inc(row[f"clients_{outcome}"])
        for direction in ("down", "up"):
            if row[f"bytes_{direction}"] is not None:
                self.bytes.labels(direction=direction).inc(row[f"bytes_{direction}"])
        for key, value in row.items():
            if key.startswith("domain/") and isinstance(value, int | float):
                _, domain, quantity = key.split("/", 2)
                self.domain.labels(domain=domain, quantity=quantity).set(value)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
