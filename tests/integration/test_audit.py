"""`privfed audit.enabled=true` end to end: a correct run passes with its lower bound below the
theoretical epsilon, and a deliberately broken mechanism (noise off while the accountant still
charges it) is caught: non-zero exit and a message naming the mechanism and strategy."""

from __future__ import annotations

import json

import pytest

from .conftest import run_privfed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AUDIT = ("audit.enabled=true", "num_rounds=2", "privacy.epsilon=1")


def test_a_correct_run_passes_the_audit(tmp_path, tiny_overrides):
    proc = run_privfed(tmp_path, *tiny_overrides, *AUDIT, "privacy.clipping=per_layer")
    assert proc.returncode == 0, proc.stdout[-4000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epsilon_theory"] == pytest.approx(1.0, rel=1e-3)
    assert 0.0 <= summary["epsilon_audit_lower"] <= summary["epsilon_theory"]
    assert summary["audit_passed"] is True
    audit = json.loads((run / "audit.json").read_text())["audit"]
    assert audit["canaries"] == 1000 and 0 < audit["guesses"] <= 1000
    assert (run / "audit.png").stat().st_size > 10_000
    assert len(list((run / "audit").glob("round_*_client_*.npz"))) == 2 * 3  # rounds x clients


def test_noise_switched_off_is_caught(tmp_path, tiny_overrides):
    proc = run_privfed(tmp_path, *tiny_overrides, *AUDIT, "audit.break_mechanism=no_noise")
    assert proc.returncode == 3, proc.stdout[-4000:]
    assert "FAILED" in proc.stdout and "broken: no_noise" in proc.stdout
    assert "strategy=lora" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epsilon_audit_lower"] > summary["epsilon_theory"] * 1.5
    assert summary["audit_passed"] is False
