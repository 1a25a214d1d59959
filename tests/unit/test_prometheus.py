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


def test_a_user_level_round_exports_nothing_per_device():
    """Under user-level DP the round's row is withheld (server/report.py) and the loop passes no
    per-client epsilon: the scrape then names no client and counts none."""
    from privfed.server.report import round_row, withhold_counts
    from privfed.strategies.replies import RoundOutcome

    out = RoundOutcome(sampled=3, trained=2, failed=1, bytes_down=900, bytes_up=600)
    row = withhold_counts(
        round_row(2, out, (0.5, 1.2), {"client-0": 1.0}, 8.0, 1.1, (1.0, 1.5), {})
    )
    assert row["epsilon_max"] is None and row["bytes_up_per_client"] is None
    port = free_port()
    metrics = ServerMetrics(port)
    try:
        metrics.observe_round(row, {})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()
    assert "privfed_accuracy 0.5" in body
    assert "client-" not in body
    assert "privfed_clients_total{" not in body and "privfed_bytes_total{" not in body
    samples = [line for line in body.splitlines() if not line.startswith("#")]
    assert "privfed_epsilon_spent_max 0.0" in samples  # never set: the gauge's initial value
