"""The server's Prometheus endpoint, scraped over HTTP on 127.0.0.1."""

from __future__ import annotations

import urllib.request

from privfed.telemetry.prometheus import ServerMetrics

from ..helpers import free_port


def test_metrics_are_served_and_updated_per_round():
    port = free_port()
    metrics = ServerMetrics(port)
    try:
        row = {
            "round": 2,
            "accuracy": 0.75,
            "loss": 0.6,
            "epsilon_max": 3.5,
            "noise_multiplier": 1.1,
            "clients_trained": 3,
            "clients_sat_out": 1,
            "clients_rejected": 2,
            "clients_failed": 0,
            "bytes_down": 1000,
            "bytes_up": 400,
            "domain/high/sigma": 2.5,
            "domain/high/decision": "lowered",
        }
        metrics.observe_round(row, {"client-0": 3.5, "client-1": 3.25})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()
    assert "privfed_accuracy 0.75" in body
    assert 'privfed_epsilon_spent{client="client-1"} 3.25' in body
    assert 'privfed_clients_total{outcome="rejected"} 2.0' in body
    assert 'privfed_bytes_total{direction="up"} 400.0' in body
    assert "privfed_rounds_total 1.0" in body
    assert 'privfed_domain{domain="high",quantity="sigma"} 2.5' in body
    assert "decision" not in body  # strings stay in metrics.jsonl
