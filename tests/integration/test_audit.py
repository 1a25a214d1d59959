"""`privfed audit.enabled=true` end to end: a correct run passes with both auditors' lower bounds
below the theoretical epsilon, and each deliberately broken mechanism (noise off, clipping off,
noise derived from the config) is caught while the accountant still charges the intact one:
non-zero exit and a message naming the auditor, the mechanism and the strategy."""

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
    by_auditor = summary["epsilon_audit_lower_by_auditor"]
    assert set(by_auditor) == {"released", "white_box"}
    assert max(by_auditor.values()) == summary["epsilon_audit_lower"]
    audit = json.loads((run / "audit.json").read_text())["audit"]
    assert audit["canaries"] == 1000
    assert all(0 < a["guesses"] <= 1000 for a in audit["auditors"].values())
    assert (run / "audit.png").stat().st_size > 10_000
    assert len(list((run / "audit").glob("round_*_client_*.npz"))) == 2 * 3  # rounds x clients


@pytest.mark.parametrize("broken", ["no_noise", "no_clipping"])
def test_a_mechanism_switched_off_is_caught(tmp_path, tiny_overrides, broken):
    proc = run_privfed(tmp_path, *tiny_overrides, *AUDIT, f"audit.break_mechanism={broken}")
    assert proc.returncode == 3, proc.stdout[-4000:]
    assert "FAILED" in proc.stdout and f"broken: {broken}" in proc.stdout
    assert "strategy=lora" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epsilon_audit_lower"] > summary["epsilon_theory"] * 1.5
    assert summary["audit_passed"] is False


def test_noise_a_server_can_regenerate_is_caught_by_the_white_box_auditor(tmp_path, tiny_overrides):
    """The noise is Gaussian with the right std, so the releases alone look fine; but it comes
    from a stream the run's config determines, and the auditor that knows the config removes
    it (issue 12's attack)."""
    proc = run_privfed(tmp_path, *tiny_overrides, *AUDIT, "audit.break_mechanism=known_noise")
    assert proc.returncode == 3, proc.stdout[-4000:]
    assert "FAILED (white_box auditor)" in proc.stdout and "broken: known_noise" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    by_auditor = summary["epsilon_audit_lower_by_auditor"]
    assert by_auditor["released"] <= summary["epsilon_theory"]
    assert by_auditor["white_box"] > summary["epsilon_theory"] * 1.5
